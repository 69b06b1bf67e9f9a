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

Cost O(N·(w·(d + m + dv) + m·(d + dv))); causal forms use chunked prefix sums. Padding masks (a bias per
key) enter both terms exactly; causal masks use the causal band and prefix sums; any other mask falls back
to the dense O(Nq·Nk) form (counted in ``dense_calls``). Sites with learned or ALiBi score biases are declined.

Training-free (TF): the paper swaps it into T2T-ViT without fine-tuning (81.7 → 81.1 top-1).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import sympy
import torch
from torch import nn

from .. import cost
from ..actions import Action, RewriteError, register_action, register_handler
from . import _util_b as U


@register_action
@dataclasses.dataclass(frozen=True)
class Scatterbrain(Action):
    """Sparse (local band of ``window`` keys) + low-rank (``features`` FAVOR+ features) attention."""

    window: int = 64
    features: int = 64
    seed: int = 0
    exact = False

    def __post_init__(self):
        for name in ("window", "features"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise RewriteError(f"Scatterbrain({name}={val!r}) must be a positive integer "
                                   f"(e.g. Scatterbrain(window=64, features=64)).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RewriteError(f"Scatterbrain(seed={self.seed!r}) must be an integer.")

    def flops(self, causal: bool = False) -> sympy.Expr:
        """Band scores/softmax/values, band low-rank correction, FAVOR+ maps, low-rank state and readout."""
        B, H, N, Nk, d, dv = (cost.SYMBOLS[s] for s in ("B", "H", "N", "Nk", "d", "dv"))
        m = self.features
        w = sympy.Min(self.window if causal else 2 * (self.window // 2) + 1, Nk)   # a band never exceeds the keys
        band = N * w * (2 * d + cost.SOFTMAX_FLOPS_PER_SCORE + 2 * m + 2 * (dv + 1))
        fmap = (N + Nk) * (2 * d * m + 2 * d + 3 * m)
        lowrank = 2 * Nk * m * (dv + 1) + 2 * N * m * (dv + 1) + N * dv
        expr = band + fmap + lowrank
        if causal:
            expr += 2 * N * sympy.Min(U.CHUNK, N) * (m + dv + 1)
        return sympy.expand(B * H * expr)


class ScatterbrainAttention(U.FastAndDense, U.WarnOnce):
    """Scatterbrain attention with SDPA's call signature (see the module docstring)."""

    def __init__(self, window: int = 64, features: int = 64, head_dim: Optional[int] = None, seed: int = 0,
                 chunk: int = U.CHUNK):
        super().__init__()
        self.__name__ = "scatterbrain_attention"
        self.window, self.features, self.seed, self.chunk = window, features, seed, chunk
        proj = U.orthogonal_gaussian(features, head_dim, seed) if head_dim else torch.empty(0)
        self.register_buffer("projection", proj, persistent=True)
        self.dense_calls = 0

    def _proj(self, d: int, device) -> torch.Tensor:
        if self.projection.numel() == 0 or self.projection.shape[1] != d:
            self.projection = U.orthogonal_gaussian(self.features, d, self.seed).to(device)
        elif self.projection.device != device:      # the mixer need not move with the model: follow the inputs
            self.projection = self.projection.to(device)
        return self.projection

    def _extent(self, causal: bool) -> tuple[int, int]:
        """Keys before and after the query's own position that the band covers."""
        if causal:
            return self.window - 1, 0
        r = self.window // 2
        return r, r

    def _run(self, q, k, v, attn_mask, is_causal, scale, dense: bool):
        dtype = q.dtype
        q, k, v, s = U.prepare(q, k, v, scale)
        nq, nk = q.shape[-2], k.shape[-2]
        plan = U.plan_mask(attn_mask, is_causal, nq, nk, q.dtype)
        r = s ** 0.5
        q, k = q * r, k * r
        proj = self._proj(q.shape[-1], q.device)
        causal = plan.kind == "causal"
        offset = plan.offset if causal else nk - nq
        v1 = U.with_ones(v)
        fast = not dense and (plan.kind in ("none", "keys") or (causal and offset == nk - nq))
        # the band looks back only at causal sites and when the queries are the last Nq < Nk positions
        # (KV-cache decoding: a decode step's padding-only mask must give the band its prefill gave)
        back_only = causal or nq < nk
        if fast:
            num = self._fast(q, k, v1, plan, proj, causal, offset, back_only)
        else:
            if not dense:
                self._dense_note("the attention mask is neither a padding nor a causal mask")
            num = self._dense(q, k, v1, plan, proj, offset, back_only)
        return U.normalise(num).to(dtype)

    def _fast(self, q, k, v1, plan: U.MaskPlan, proj, causal: bool, offset: int, back_only: bool):
        nq, nk = q.shape[-2], k.shape[-2]
        left, right = self._extent(back_only)
        pos = torch.arange(nq, device=q.device) + offset
        left = max(0, min(left, int(pos.max()) if nq else 0))
        right = max(0, min(right, nk - 1 - (int(pos.min()) if nq else 0)))
        span = torch.arange(-left, right + 1, device=q.device)
        idx = pos[:, None] + span[None, :]                              # [Nq, L] key index of each band slot
        inside = (idx >= 0) & (idx < nk)
        safe = idx.clamp(0, max(nk - 1, 0))

        fq, cq = U.favor_query(q, proj)                                 # [..., Nq, m], [..., Nq, 1]
        fk, ck = U.favor_key(k, proj, plan.key_bias)                    # [..., Nk, m], [..., 1, 1]
        kb = plan.key_bias
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        kw = k.expand(*lead, nk, k.shape[-1])[..., safe, :]            # [..., Nq, L, d]
        s_loc = (q.unsqueeze(-2) @ kw.transpose(-1, -2)).squeeze(-2)   # [..., Nq, L]
        if kb is not None:
            s_loc = s_loc + kb[..., 0, :][..., safe]
        s_loc = s_loc.masked_fill(~inside, float("-inf"))
        shift = torch.maximum(s_loc.amax(-1, keepdim=True), cq + ck)    # one shift per row
        e_loc = torch.exp(s_loc - shift)
        lr_scale = torch.exp(cq + ck - shift)                           # [..., Nq, 1]
        fkw = fk.expand(*lead, nk, fk.shape[-1])[..., safe, :]         # [..., Nq, L, m]
        lr_loc = (fq.unsqueeze(-2) @ fkw.transpose(-1, -2)).squeeze(-2) * lr_scale
        corr = (e_loc - lr_loc).masked_fill(~inside, 0.0)
        vw = v1.expand(*lead, nk, v1.shape[-1])[..., safe, :]          # [..., Nq, L, dv+1]
        num_local = (corr.unsqueeze(-2) @ vw).squeeze(-2)
        if causal:
            num_lr = U.linear_causal(fq, fk, v1, offset, self.chunk)
        else:
            num_lr = U.linear_bidirectional(fq, fk, v1)
        return num_local + num_lr * lr_scale

    def _dense(self, q, k, v1, plan: U.MaskPlan, proj, offset: int, back_only: bool):
        nq, nk = q.shape[-2], k.shape[-2]
        left, right = self._extent(back_only)
        pos = torch.arange(nq, device=q.device)[:, None] + offset
        j = torch.arange(nk, device=q.device)[None, :]
        band = (j >= pos - left) & (j <= pos + right)                   # [Nq, Nk]
        bias = plan.dense_bias(q.device, q.dtype)
        scores = q @ k.transpose(-1, -2) + bias
        fq, cq = U.favor_query(q, proj)
        fk, ck = U.favor_key(k, proj, None)
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
    bad = U.decline_bias("Scatterbrain", site)
    if bad:
        return bad
    return ScatterbrainAttention(action.window, action.features, U.head_dim(call, site), action.seed)
