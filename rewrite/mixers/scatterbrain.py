"""Scatterbrain: exact attention on a local band plus a low-rank FAVOR+ estimate everywhere else.

For query i with band ``W(i)`` (the keys near its position)::

    o_i = [ Σ_{j∈W(i)} (exp(s_ij) - φ(q_i)·φ(k_j)) v_j + φ(q_i) · Σ_j φ(k_j) v_jᵀ ] / [ the same with v = 1 ]

``s_ij = q_i·k_j·scale``; φ are FAVOR+ positive random features (``features`` of them, fixed by ``seed``), so
``φ(q)·φ(k)`` estimates ``exp(s)``. The low-rank term covers every key and the band term replaces its
estimate by the exact value inside the band (the double-counting correction). Everything is computed
against one shift per row (the larger of the band's maximum score and the low-rank term's scale), so it is
log-sum-exp stable. When the band covers every key the low-rank terms cancel and the result is exact
softmax attention.

``window`` is the band: bidirectionally the keys with ``|i - j| <= window // 2``; causally the last
``window`` keys up to and including the query's own position. When Nq != Nk the queries are taken to be
the *last* Nq key positions and, for Nq < Nk, the band is the causal one (KV-cache decoding: a decode step's
mask is padding-only, yet it must see the band the prefill saw, so cached and full forwards agree). For
cross-attention the band is then an arbitrary slice of the other sequence (still a valid approximation,
but not a local one).

Cost O(N·(w·(d + m + dv) + m·(d + dv))) in time and O(N·(d + m + dv)) in memory: the band is computed a
block of ``Bq`` queries at a time against the window of keys the block can reach (one shared ``[Bq, w + Bq]``
band pattern, the windows strided views of the keys), the estimate subtracted there only; the low-rank term
comes from the feature sums (global, or chunked prefix sums for causal forms). Padding masks (a bias per
key) enter both terms exactly; causal masks use the causal band and prefix sums; any other mask falls back
to the dense O(Nq·Nk) form (counted in ``dense_calls``). Sites with learned or ALiBi score biases are declined.

On CUDA tensors (or CPU ones with ``REWRITE_MIXER_KERNELS=1`` and ``TRITON_INTERPRET=1``, see
``rewrite/kernels/README.md``) the low-rank sums ``Σ_j φ(q_i)·φ(k_j) [v_j, 1]`` (every key, or the causal
prefix) run on the Triton linear-attention kernel (``rewrite::linear_attention_core``) with this module's
FAVOR+ features as ``identity`` features: key padding already folded into the key features, each query's
features already scaled by its row's shift. The kernel normalises, so its output is multiplied back by the
normaliser computed here (O(N·m), differentiable). Features reach it in bf16 for bf16 inputs and in fp32
otherwise (fp16 would flush small exponential features to zero). The band stays in PyTorch (its weights,
exact minus estimate, are no softmax the block-sparse kernel computes). The PyTorch low-rank path stays for
causal KV-cache decoding (a causal mask with Nk > Nq: the cached keys would be a starting state, which the
kernel does not take), masks that are neither padding nor causal (the dense form), and float64; with more
than 256 features the kernel op itself uses its chunked PyTorch form.

Training-free (TF): the paper swaps it into T2T-ViT without fine-tuning (81.7 → 81.1 top-1).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import functools
import math

import sympy
import torch

from .. import cost
from ..actions import Action, RewriteError, register_action, register_handler
from ._layout import kernel_dtype
from . import _layout
from .linear import kernel_linear
from . import _masks
from . import _linear
from . import _base

#: query block of the band (16 for bands narrower than that)
_BLOCK = 32
#: band scores of one group of blocks at most this many elements (1 MiB in fp32: the group's scores and estimate stay
#: in cache through their eight elementwise passes; 32 MiB groups were 15-20% slower at N = 1k and 4k)
_GROUP_ELEMENTS = 1 << 18
#: the linear-attention kernel's eps for the low-rank sums. Its division is undone afterwards, so any eps > 0
#: gives the same sums; 1 keeps the kernel's quotient, and the gradient it is handed, at the scale of the sums
#: where they are tiny (features scaled far down by the band's shift), and the kernel's normaliser differs
#: from ours (rounding, half inputs) by a smaller relative amount than with a tiny eps
_KERNEL_EPS = 1.0


def _build_band(bq: int, left: int, right: int, dtype: torch.dtype, device) -> tuple:
    """Block row ``r`` against window column ``c`` is in the band iff ``0 <= c - r <= left + right``: the
    additive ``[Bq, chunk]`` pattern (0 / -inf) and the same as 1 / 0."""
    r = torch.arange(bq, device=device)[:, None]
    c = torch.arange(bq + left + right, device=device)[None, :]
    keep = (c >= r) & (c <= r + left + right)
    return (torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf")),
            keep.to(dtype))


_cached_band = functools.lru_cache(maxsize=16)(_build_band)


def _band_corrections(qbuf, fq, lq, windows: tuple, band, inside, ip: bool) -> tuple:
    """Exact minus low-rank attention on every block's band, times the values: ``(num [T, Bq, dv+1], the low-rank
    query features rescaled to each row's shift [T, Bq, m])``, in groups of blocks that keep scores small.
    ``ip``: in place, into buffers reused by every group (no autograd)."""
    kw, fkw, vw, kbw = windows
    blocks, bq, chunk = qbuf.shape[0], qbuf.shape[1], kw.shape[1]
    step = max(1, _GROUP_ELEMENTS // (bq * chunk))
    num = qbuf.new_empty(blocks, bq, vw.shape[-1]) if ip else []
    fql_all = fq if ip else []
    if ip:   # the groups' scores and estimates in two buffers reused by every group (fresh group-sized
        # blocks freed between kept results would fragment the heap)
        sbuf, lbuf = qbuf.new_empty(min(step, blocks), bq, chunk), qbuf.new_empty(min(step, blocks), bq, chunk)
    for t0 in range(0, blocks, step):
        g = slice(t0, min(blocks, t0 + step))
        size = g.stop - g.start
        # scores + band pattern
        s = torch.baddbmm(band, qbuf[g], kw[g].transpose(1, 2), out=sbuf[:size]) if ip else \
            torch.baddbmm(band, qbuf[g], kw[g].transpose(1, 2))
        s = s.add_(kbw[g]) if ip else s + kbw[g]                   # + key bias (and padding)
        shift = torch.maximum(s.amax(-1, keepdim=True), lq[g])     # one shift per row
        e = s.sub_(shift).exp_() if ip else torch.exp(s - shift)
        lr_scale = (lq[g] - shift).exp_()                           # [G, Bq, 1]
        fql = fq[g].mul_(lr_scale) if ip else fq[g] * lr_scale
        lr_loc = torch.bmm(fql, fkw[g].transpose(1, 2), out=lbuf[:size]) if ip else \
            torch.bmm(fql, fkw[g].transpose(1, 2))                # the estimate on the window
        corr = e.addcmul_(lr_loc, inside, value=-1.0) if ip else e - lr_loc * inside   # exact - estimate
        if ip:
            torch.bmm(corr, vw[g], out=num[g])
        else:
            num.append(torch.bmm(corr, vw[g]))
            fql_all.append(fql)
    if not ip:
        num, fql_all = torch.cat(num), torch.cat(fql_all)
    return num, fql_all


def _band(bq: int, left: int, right: int, dtype: torch.dtype, device) -> tuple:
    if all(isinstance(x, int) for x in (bq, left, right)) and not torch.compiler.is_compiling():
        with torch.inference_mode(False):       # usable later outside inference mode too
            return _cached_band(bq, left, right, dtype, device)
    return _build_band(bq, left, right, dtype, device)



@register_action
@dataclasses.dataclass(frozen=True)
class Scatterbrain(Action):
    """Sparse (local band of ``window`` keys) + low-rank (``features`` FAVOR+ features) attention."""

    window: int = 64
    features: int = 64
    seed: int = 0
    exact = False
    requires = (_base.NoScoreBias(),)

    def __post_init__(self):
        for name in ("window", "features"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise RewriteError(f"Scatterbrain({name}={val!r}) must be a positive integer "
                                   f"(e.g. Scatterbrain(window=64, features=64)).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RewriteError(f"Scatterbrain(seed={self.seed!r}) must be an integer.")

    def flops(self, causal: bool = False) -> sympy.Expr:
        """What the blocked CPU form computes: each query block of ``Bq`` rows scores a window of
        ``Bq + left + right`` keys (a band never wider than the keys), exactly and by the estimate, and sums
        its values; FAVOR+ maps; the low-rank state and readout. Rows are padded per head by about one window
        (``N + span + Bq`` rows)."""
        B, H, N, Nk, d, dv = (cost.SYMBOLS[s] for s in ("B", "H", "N", "Nk", "d", "dv"))
        m = self.features
        span0 = self.window - 1 if causal else 2 * (self.window // 2)
        bq = _BLOCK if span0 >= _BLOCK else 16
        span = sympy.Min(span0, 2 * (Nk - 1))                          # a band never exceeds the keys
        rows = N + span + bq
        band = rows * (bq + span) * (2 * d + cost.SOFTMAX_FLOPS_PER_SCORE + 2 * m + 2 * (dv + 1))
        fmap = (rows + Nk) * (2 * d * m + 2 * d + 3 * m)
        lowrank = 2 * Nk * m * (dv + 1) + 2 * rows * m * (dv + 1) + N * dv
        expr = band + fmap + lowrank
        if causal:
            expr += 2 * N * sympy.Min(_linear.CHUNK, N) * (m + dv + 1)
        return sympy.expand(B * H * expr)


class ScatterbrainAttention(_base.FastAndDense, _linear.FavorProjection, _base.WarnOnce):
    """Scatterbrain attention with SDPA's call signature (see the module docstring)."""

    def __init__(self, window: int = 64, features: int = 64, head_dim: Optional[int] = None, seed: int = 0,
                 chunk: int = _linear.CHUNK):
        super().__init__()
        self.__name__ = "scatterbrain_attention"
        self.window, self.features, self.seed, self.chunk = window, features, seed, chunk
        proj = _linear.orthogonal_gaussian(features, head_dim, seed) if head_dim else torch.empty(0)
        self.register_buffer("projection", proj, persistent=True)
        self.dense_calls = 0

    def _extent(self, causal: bool) -> tuple[int, int]:
        """Keys before and after the query's own position that the band covers."""
        if causal:
            return self.window - 1, 0
        r = self.window // 2
        return r, r

    def _run(self, q, k, v, attn_mask, is_causal, scale, dense: bool):
        dtype = q.dtype
        q, k, v, plan = _linear.scaled_inputs(q, k, v, attn_mask, is_causal, scale)
        nq, nk = q.shape[-2], k.shape[-2]
        proj = self._proj(q.shape[-1], q.device)
        causal = plan.kind == "causal"
        offset = plan.offset if causal else nk - nq
        v1 = _linear.with_ones(v)
        fast = not dense and (plan.kind in ("none", "keys") or (causal and offset == nk - nq))
        # the band looks back only at causal sites and when the queries are the last Nq < Nk positions
        # (KV-cache decoding: a decode step's padding-only mask must give the band its prefill gave)
        back_only = causal or nq < nk
        if fast:
            num = self._fast(q, k, v1, plan, proj, causal, offset, back_only, dtype)
        else:
            if not dense:
                self._dense_note("the attention mask is neither a padding nor a causal mask")
            num = self._dense(q, k, v1, plan, proj, offset, back_only)
        return _linear.normalise(num).to(dtype)

    def _fast(self, q, k, v1, plan: _masks.MaskPlan, proj, causal: bool, offset: int, back_only: bool,
              dtype: torch.dtype = torch.float32):
        """Blocked band plus low-rank sums: time and memory O(N·(w + m)·d), never an ``[Nq, Nk]`` tensor.

        Queries go in blocks of ``Bq`` rows. Block ``b`` of a head reads ``chunk = Bq + left + right``
        consecutive keys from ``b·Bq + offset - left`` on, so every block has the same ``[Bq, chunk]`` band
        pattern. The keys of every (batch, head) are laid one after the other in one zero-padded buffer of
        ``nb2·Bq`` rows each (``nb2`` covers the last block's window), so the windows of all blocks of all
        heads are one strided view of it that batched products read without a copy; the padding carries a
        ``-inf`` key bias. The blocks (and a few blocks of padding per head, whose rows are dropped) go in
        groups that keep their scores small."""
        nq, nk = q.shape[-2], k.shape[-2]
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2],
                                      () if plan.key_bias is None else plan.key_bias.shape[:-2])
        bh, dd, dv1, m = math.prod(lead), q.shape[-1], v1.shape[-1], proj.shape[0]
        if nq == 0 or nk == 0 or bh == 0:
            return q.new_zeros(*lead, nq, dv1)
        left, right = self._extent(back_only)
        # the first and last positions are offset and offset + nq - 1: from sizes, not tensor values
        left = max(0, min(left, offset + nq - 1))
        right = max(0, min(right, nk - 1 - offset))
        span = left + right
        bq = _BLOCK if span >= _BLOCK else 16
        nb = -(-nq // bq)
        nb2 = nb + -(-span // bq)                                       # blocks per head in the buffers
        rows, chunk, lo = nb2 * bq, bq + span, offset - left            # window of block b: keys lo + b·Bq ..
        dev, dt = q.device, q.dtype
        ip = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v1)))   # in place

        fk, ck = _linear.favor_key(k, proj, plan.key_bias)                    # [..., Nk, m], [..., 1, 1]
        j0, j1 = max(lo, 0), min(nk, lo + rows)                         # the keys the windows reach

        def key_buffer(x, fill, slot: str):                             # [..., Nk, c] -> [Bh·rows + span, c]
            # without autograd a reused scratch buffer (a fresh one is page-faulted memory on every call), of
            # which only the padding is filled
            shape = (bh * rows + span, x.shape[-1])
            buf = _layout.scratch_or_empty(slot, shape, x) if ip else x.new_empty(shape)
            body = buf[:bh * rows].view(*lead, rows, x.shape[-1])
            body[..., :j0 - lo, :].fill_(fill)
            body[..., j1 - lo:, :].fill_(fill)
            buf[bh * rows:].fill_(fill)
            body[..., j0 - lo:j1 - lo, :] = x[..., j0:j1, :]
            return buf

        kbuf, fkbuf = key_buffer(k, 0.0, "scatterbrain.k"), key_buffer(fk, 0.0, "scatterbrain.fk")
        vbuf = key_buffer(v1, 0.0, "scatterbrain.v")
        kbias = torch.full((bh * rows + span,), float("-inf"), dtype=dt, device=dev)
        kbias[:bh * rows].view(*lead, rows)[..., j0 - lo:j1 - lo] = (
            0.0 if plan.key_bias is None else plan.key_bias[..., 0, j0:j1])
        qbuf = _layout.scratch_or_empty("scatterbrain.q", (bh, rows, dd), q) if ip else q.new_empty(bh, rows, dd)
        qbuf.view(*lead, rows, dd)[..., :nq, :] = q
        qbuf.view(*lead, rows, dd)[..., nq:, :].zero_()
        fq, cq = _linear.favor_query(qbuf, proj)                              # [Bh, rows, m], [Bh, rows, 1]
        lq = (cq + ck.expand(*lead, 1, 1).reshape(bh, 1, 1)).view(bh * nb2, bq, 1)   # log-scale of the low rank
        fq = fq.view(bh * nb2, bq, m)
        qbuf = qbuf.view(bh * nb2, bq, dd)

        # the windows of every block: strided views of the buffers (block t = head·nb2 + b starts at row t·Bq)
        kw = kbuf.as_strided((bh * nb2, chunk, dd), (bq * dd, dd, 1))
        fkw = fkbuf.as_strided((bh * nb2, chunk, m), (bq * m, m, 1))
        vw = vbuf.as_strided((bh * nb2, chunk, dv1), (bq * dv1, dv1, 1))
        kbw = kbias.as_strided((bh * nb2, 1, chunk), (bq, chunk, 1))
        band, inside = _band(bq, left, right, dt, dev)                # [Bq, chunk] additive, and 0/1
        num, fql_all = _band_corrections(qbuf, fq, lq, (kw, fkw, vw, kbw), band, inside, ip)
        num, fql_all = num.view(bh, rows, dv1), fql_all.view(bh, rows, m)
        lr = self._kernel_lowrank(fql_all.view(*lead, rows, m)[..., :nq, :], fk, v1, causal, dtype)
        if lr is not None:
            return num[:, :nq].reshape(*lead, nq, dv1) + lr
        if causal:   # (φ(q)·scale) against the prefix sums: scale times the low-rank term
            lr = _linear.linear_causal(fql_all.view(*lead, rows, m)[..., :nq, :], fk, v1, offset, self.chunk)
            return num[:, :nq].reshape(*lead, nq, dv1) + lr
        state = fk.transpose(-1, -2) @ v1                               # [..., m, dv+1]
        state = state.expand(*lead, m, dv1).reshape(bh, m, dv1)
        num = num.baddbmm_(fql_all, state) if ip else torch.baddbmm(num, fql_all, state)
        return num[:, :nq].reshape(*lead, nq, dv1)

    @staticmethod
    def _kernel_lowrank(fq, fk, v1, causal: bool, dtype: torch.dtype):
        """The low-rank sums ``[Σ_j (fq_i·fk_j) v_j, Σ_j fq_i·fk_j]`` over every key (``j <= i`` when causal)
        on the Triton linear-attention kernel, or None where it cannot run them (see the module docstring)."""
        if causal and fq.shape[-2] != fk.shape[-2]:
            return None          # KV-cache decoding: the cached keys would be a starting state
        out = kernel_linear(fq, fk, v1[..., :-1], "identity", causal, _KERNEL_EPS,
                            kernel_dtype(dtype, fp16=False))
        if out is None:
            return None
        # the kernel divides by its own Σ fq·fk + eps: multiply by ours (differentiable, unlike its den
        # output) to get the sum back
        z = fk.cumsum(-2) if causal else fk.sum(-2, keepdim=True)
        den = (fq * z).sum(-1, keepdim=True) if causal else fq @ z.transpose(-1, -2)
        return torch.cat([out * (den + _KERNEL_EPS), den], dim=-1)

    def _dense(self, q, k, v1, plan: _masks.MaskPlan, proj, offset: int, back_only: bool):
        nq, nk = q.shape[-2], k.shape[-2]
        left, right = self._extent(back_only)
        pos = torch.arange(nq, device=q.device)[:, None] + offset
        j = torch.arange(nk, device=q.device)[None, :]
        band = (j >= pos - left) & (j <= pos + right)                   # [Nq, Nk]
        bias = plan.dense_bias(q.device, q.dtype)
        scores = q @ k.transpose(-1, -2) + bias
        fq, cq = _linear.favor_query(q, proj)
        fk, ck = _linear.favor_key(k, proj, None)
        lr_log = cq + ck + bias                                         # log-scale of each low-rank entry
        shift = torch.maximum(scores.masked_fill(~band, float("-inf")).amax(-1, keepdim=True),
                              lr_log.amax(-1, keepdim=True))
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        exact = torch.exp(scores - shift)
        lowrank = (fq @ fk.transpose(-1, -2)) * torch.exp(lr_log - shift)
        weights = torch.where(band, exact, lowrank)
        return weights @ v1


@register_handler(Scatterbrain)
def scatterbrain_handler(action: Scatterbrain, call, site):
    return ScatterbrainAttention(action.window, action.features, _base.head_dim(site), action.seed)
