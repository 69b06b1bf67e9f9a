"""Block routing attention: BiFormer's bi-level routing (2-D regions) and its 1-D / causal cousin (MoBA).

Tokens are cut into blocks (``layout="1d"``: ``block`` consecutive tokens; ``layout="2d"``: square regions
of about ``block`` patches on the site's vision grid). Mean-pooled block queries score mean-pooled block
keys; each query block keeps its ``topk`` best key blocks (its own block always included) and runs exact
attention over the tokens of those blocks only. Routing is parameter-free and uses the layer's own q/k
(BiFormer's ``param_routing=False``, without LePE). It equals exact attention when ``topk`` covers every
block. Time O(N·topk·block·d + (N/block)²·d).

At causal sites (1-D only) a query block routes among the blocks that do not start after it, and tokens
keep the causal pattern. Prefix tokens of a vision site (CLS, registers) attend to every key and are
attended to by every query; at 1-D sites the first ``sinks`` tokens play that part (Longformer's global
tokens, StreamingLLM's attention sinks; at causal sites they see only what precedes them).

``summary=True`` keeps the mass of the blocks a query block did not choose instead of dropping it: each
unchosen block is attended as one pooled token, its mean key and mean value with a ``log(size)`` bias
(ToMe's proportional attention; the compression branch of NSA/MoBA-style sparse attention), so softmax
still normalises over every key. On MiniLM this lowers the error of a routing setting by about a third
for ``N/block`` extra scores per query (BENCHMARKS.md).

``per_head=True`` spends the same number of blocks differently: ``topk`` becomes the mean over kv heads,
and each head's own count is fitted on calibration q/k/v (``fit``; else on the first batch it sees) to
minimise the summed relative output error of the heads, as heads differ (some are local, some global).
The fit is one pass of statistics: on sampled query rows (an eighth of them), every key block's attention
mass and partial output give the routed output at every count by a cumulative sum in routing order, so its
cost does not grow with the number of counts (``fit_errors``; a few exact calls at N = 1500). The counts
are a buffer (``head_topk``), saved and restored with the model.

On CPU without gradients every query block runs as one tile of the C++ kernel of
``rewrite.kernels.routed_blocks``: its scores against each chosen key block are one small GEMM on the block
where it lies (1-D blocks are never copied or gathered; routing and pooling use block sums), the softmax runs
once over the tile, and the sinks and pooled blocks are extra keys of the head. Where the kernel cannot be
built (no C++ compiler; ``REWRITE_CPU_KERNELS=0``) each query block is a 64-query "head" of torch's fused SDPA
over its gathered keys, in chunks whose keys fit in cache (``routed_blocks_attention``): about half as fast at
long N, as that kernel runs such heads on 32-row tiles (``bench/bench_mixers.py --part tiles``). With gradients
or under a compiler every block's keys are gathered at once (``_routed_sdpa``: differentiable, traceable).

On CUDA tensors (or CPU ones with ``REWRITE_MIXER_KERNELS=1`` and ``TRITON_INTERPRET=1``, see
``rewrite/kernels/README.md``) the plain 1-D form (``summary=False``, no ``sinks``; ``per_head`` included) runs
on the Triton block-sparse kernel: the same routing picks the key blocks, which become the kernel's block mask
(per batch and query head; causal sites add the kernel's causal mask), so time is proportional to the kept
blocks; fp16 / bf16 inputs reach the kernel in their own dtype. The routing block must be a kernel block size
(a power of two from 16 to 256). Everything else keeps the PyTorch path: 2-D regions (not contiguous token
ranges), ``sinks`` (they shift the blocks off the kernel's grid and attend globally), ``summary`` (pooled
tokens are not blocks of keys), dropout (the kernel has none), a per-query site mask (only key-padding masks
are passed, never an [N, N] one), float64, head dims over 256.

Example::

    model = rewrite.optimize(model, {"_default": rewrite.BlockRouting(block=64, topk=3)}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses
import math

import sympy
import torch

from ..actions import Action, RewriteError, register_action, register_handler
from ..cost import B, H, N, Nk, d, dv
from . import _layout
from . import _dense
from . import _base
from ..kernels import routed_blocks

LAYOUTS = ("auto", "1d", "2d")


@register_action
@dataclasses.dataclass(frozen=True)
class BlockRouting(Action):
    """Route each block of queries to its ``topk`` most similar key blocks (own block included)."""

    block: int = 64
    topk: int = 3
    layout: str = "auto"
    sinks: int = 0
    summary: bool = False
    per_head: bool = False
    exact = False
    requires = (_base.SelfAttention("block routing needs as many queries as keys"), _base.LayoutResolves())

    def __post_init__(self):
        _base.check_int(self, "block", self.block, 1, "Give the tokens per block (1-D) or per region (2-D), e.g. 64.")
        _base.check_int(self, "topk", self.topk, 1, "Give how many key blocks each query block keeps, e.g. topk=3.")
        _base.check_choice(self, "layout", self.layout, LAYOUTS)
        _base.check_int(self, "sinks", self.sinks, 0, "Give how many first tokens every query sees (1-D), e.g. sinks=1.")
        if not isinstance(self.summary, bool):
            raise RewriteError(f"BlockRouting(summary={self.summary!r}) is invalid: use True (attend to unchosen "
                               "blocks through their pooled key/value) or False (drop them).")
        if not isinstance(self.per_head, bool):
            raise RewriteError(f"BlockRouting(per_head={self.per_head!r}) is invalid: use True (topk is the mean "
                               "over kv heads, each head's own share fitted on calibration data) or False.")

    def flops(self) -> sympy.Expr:
        """Pooling, block-to-block routing scores, attention over ``topk`` blocks of keys (1-D blocks), the
        sink columns and rows, and with ``summary`` one pooled score per block and query."""
        blocks = sympy.ceiling(Nk / self.block)
        kept = sympy.Min(self.topk * self.block, Nk)
        routing = B * H * (N + Nk) * d + 2 * B * H * sympy.ceiling(N / self.block) * blocks * d
        total = _layout.attention_flops(N, kept) + routing
        if self.sinks:
            s = sympy.Integer(self.sinks)
            total += _layout.attention_flops(N, sympy.Min(s, Nk)) + _layout.attention_flops(sympy.Min(s, N), Nk)
        if self.summary:
            total += _layout.attention_flops(N, blocks) + B * H * Nk * dv
        return total


def region_order(gh: int, gw: int, block: int) -> list:
    """Grid positions (row-major; -1 = padding) of square-ish regions of about ``block`` patches: ``nb`` lists
    of the same length."""
    side = max(1, math.isqrt(block))
    nrh, nrw = -(-gh // side), -(-gw // side)
    rh, rw = -(-gh // nrh), -(-gw // nrw)       # balanced region sides
    nrh, nrw = -(-gh // rh), -(-gw // rw)
    order = []
    for a in range(nrh):
        for b in range(nrw):
            order.append([(r * gw + col) if r < gh and col < gw else -1
                          for r in range(a * rh, (a + 1) * rh) for col in range(b * rw, (b + 1) * rw)])
    return order


def line_order(n: int, block: int) -> list:
    """Consecutive blocks of ``block`` tokens (-1 pads the last one)."""
    bs = min(block, n)
    nb = -(-n // bs)
    return [[i if i < n else -1 for i in range(b * bs, (b + 1) * bs)] for b in range(nb)]


class BlockRoutingAttention(_base.SDPAMixer):
    """SDPA-signature block-routed attention.

    ``grid=(gh, gw)`` with ``prefix_tokens`` selects 2-D regions; otherwise 1-D blocks of ``block`` tokens after
    the first ``sinks`` tokens. ``summary`` attends to unchosen blocks through their pooled key/value.
    """

    #: buffers whose values a compiled graph bakes in (per-head counts decide the graph's structure): the
    #: rewrite recompiles when they change (``Session.guard_baked_state``)
    baked_state = ("head_topk",)

    __name__ = "block_routing_attention"

    def __init__(self, block: int = 64, topk: int = 3, grid: tuple | None = None, prefix_tokens: int = 0,
                 causal: bool = False, sinks: int = 0, summary: bool = False, per_head: bool = False):
        super().__init__()
        self.block, self.topk = int(block), int(topk)
        self.grid = tuple(int(x) for x in grid) if grid else None
        self.prefix_tokens, self.causal = int(prefix_tokens or 0), bool(causal)
        self.sinks, self.summary, self.per_head = int(sinks or 0), bool(summary), bool(per_head)
        self._layouts: dict = {}
        if self.per_head:
            self.register_buffer("head_topk", torch.zeros(0, dtype=torch.long))  # [Hkv] once fitted
        self._counts = None  # ((id, version) of head_topk, its values as ints): see _head_counts
        if self.grid is not None and self.causal:
            raise ValueError("2-D block routing has no causal form")
        if self.grid is not None and self.sinks:
            raise ValueError("2-D block routing takes its global tokens from prefix_tokens, not sinks")

    def _config(self) -> dict:
        return {"block": self.block, "topk": self.topk, "grid": self.grid, "prefix_tokens": self.prefix_tokens,
                "causal": self.causal, "sinks": self.sinks, "summary": self.summary, "per_head": self.per_head}

    # ------------------------------------------------------------------------------- per-head calibration
    @torch.no_grad()
    def fit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, is_causal: bool = False,
            scale=None) -> BlockRoutingAttention:
        """Fit each kv head's block count on calibration ``q [..., Hq, N, D]``, ``k, v [..., Hkv, N, D]``.

        One pass of statistics (``fit_errors``) gives each head's relative output error at every count
        1..blocks on sampled query rows; a small dynamic program then picks the counts (summing to ``topk`` ×
        kv heads) of least summed error. Costs about an eighth of one exact attention call plus terms that
        grow as ``N² / block`` (every count of every sampled row), whatever the number of counts. ``scale`` defaults to SDPA's ``1/sqrt(D)``."""
        c = _layout.canon(q, k, v, attn_mask, scale)
        errors = fit_errors(self, c, self.causal or bool(is_causal))             # [nb, Hkv]
        self.head_topk = allocate_blocks(errors, min(self.topk, errors.shape[0]) * errors.shape[1]).to(q.device)
        return self

    def _head_counts(self, q, k, v, attn_mask, is_causal, scale, hkv: int) -> tuple:
        """Each kv head's block count as Python ints, the same in eager runs and while a compiler traces (the
        buffer's values are not readable then: the counts of the last real run are used, never a fallback)."""
        buf = self.head_topk
        if _layout.has_no_data(buf) or _layout.has_no_data(q):
            if self._counts is None or len(self._counts[1]) != hkv:
                raise RuntimeError("BlockRoutingAttention(per_head=True) is traced before its head counts were "
                                   "fitted or read: run it once on real inputs (or call fit) first")
            return self._counts[1]
        if buf.numel() != hkv:
            self.fit(q, k, v, attn_mask, is_causal, scale)
            buf = self.head_topk
        key = (id(buf), buf._version)
        if self._counts is None or self._counts[0] != key:
            self._counts = (key, tuple(int(x) for x in buf.tolist()))
        return self._counts[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Fitted counts load into a fresh (unfitted, empty) module: take the saved shape first."""
        saved = state_dict.get(prefix + "head_topk")
        if self.per_head and saved is not None and saved.shape != self.head_topk.shape:
            self.head_topk = torch.empty(saved.shape, dtype=saved.dtype, device=self.head_topk.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _layout(self, n: int) -> tuple:
        """(order: ``nb`` lists of ``bs`` body positions, -1 = padding; prefix count; valid slot indices or
        None when every slot is a token). Plain Python, so it also works while shapes are inferred."""
        if n not in self._layouts:
            if self.grid is None:
                p = min(self.sinks, n - 1)
                order = line_order(n - p, self.block)
            else:
                gh, gw = self.grid
                if self.prefix_tokens + gh * gw != n:
                    raise ValueError(f"BlockRoutingAttention: grid {self.grid} with {self.prefix_tokens} prefix "
                                     f"tokens does not cover {n} tokens")
                order, p = region_order(gh, gw, self.block), self.prefix_tokens
            slots = [i for i, x in enumerate(x for row in order for x in row) if x >= 0]
            self._layouts[n] = (order, p, None if len(slots) == len(order) * len(order[0]) else slots)
        return self._layouts[n]

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        c = _layout.canon(q, k, v, attn_mask, scale)
        bf, hkv, g, n, nk, _, dv = c.dims
        if n != nk:
            raise ValueError(f"BlockRoutingAttention needs as many queries as keys (got {n} and {nk})")
        causal = self.causal or bool(is_causal)
        if not self.per_head:
            out = self._kernel(c, self.topk, causal, dropout_p)
            return c.finish(out if out is not None else self._attend(c, self.topk, causal, dropout_p))
        counts = self._head_counts(q, k, v, attn_mask, is_causal, scale, hkv)
        out = self._kernel(c, self.head_topk, causal, dropout_p)
        if out is not None:
            return c.finish(out)
        if len(set(counts)) == 1 or (_dense.cpu_inference(c, dropout_p) and routed_blocks.available()):
            return c.finish(self._attend(c, counts, causal, dropout_p))       # one pass: the kernel skips slots
        out = c.q.new_empty(bf, hkv, g, n, dv)
        for t in sorted(set(counts)):                                           # one routed pass per count
            heads = torch.tensor([h for h, x in enumerate(counts) if x == t], device=c.q.device)
            bias = c.bias
            if bias is not None and bias.shape[1] > 1:
                bias = bias.index_select(1, heads)
            part = _layout.Canon(c.q.index_select(1, heads), c.k.index_select(1, heads), c.v.index_select(1, heads),
                           bias, c.scale, (), c.out_dtype, c.mask_floor)
            out.index_copy_(1, heads, self._attend(part, int(t), causal, dropout_p))
        return c.finish(out)

    @staticmethod
    def _block_affinity(qb: torch.Tensor, kb: torch.Tensor, valid, causal: bool, zero_padding: bool = False) -> torch.Tensor:
        """Routing scores ``[Bf, Hkv, G, nb, nb]`` of mean-pooled query blocks ``qb [Bf, Hkv, G, nb, bs, D]``
        against mean-pooled key blocks ``kb [Bf, Hkv, nb, bs, D]`` (padding slots, ``~valid [nb, bs]``, left
        out; ``valid`` None: no padding): a block's own block scores +inf (always kept) and, causally, later
        blocks -inf."""
        nb, bs = qb.shape[-3], qb.shape[-2]
        if valid is None:   # sums rank blocks as means do (every score is scaled by bs²), and are cheaper
            qr, kr = qb.sum(-2), kb.sum(-2)                                    # [.., nb, D]
        elif zero_padding:  # padding slots hold zeros (1-D blocks): sums over the valid count (a [1, bs]
            # product per block is several times slower on CPU)
            count = valid.sum(-1, keepdim=True).clamp(min=1).to(qb.dtype)       # [nb, 1]
            qr, kr = qb.sum(-2).div_(count), kb.sum(-2).div_(count)
        else:                                                                  # a weighted mean: one matmul
            w = valid.to(qb.dtype)
            w = (w / w.sum(-1, keepdim=True).clamp(min=1)).view(nb, 1, bs)
            qr, kr = (w @ qb).squeeze(-2), (w @ kb).squeeze(-2)
        return BlockRoutingAttention._route(qr, kr, causal)

    @staticmethod
    def _route(qr: torch.Tensor, kr: torch.Tensor, causal: bool) -> torch.Tensor:
        """Routing scores ``[Bf, Hkv, G, nb, nb]`` of pooled query blocks ``qr [Bf, Hkv, G, nb, D]`` against pooled
        key blocks ``kr [Bf, Hkv, nb, D]``."""
        nb = qr.shape[-2]
        aff = _dense.grouped_scores(qr, kr)
        if causal:
            aff = aff.masked_fill(torch.ones(nb, nb, dtype=torch.bool, device=qr.device).triu(1), _layout.NEG_INF)
        return aff.masked_fill(torch.eye(nb, dtype=torch.bool, device=qr.device), float("inf"))

    def _kernel(self, c: _layout.Canon, topk, causal: bool, dropout_p: float):
        """Routed attention on the Triton block-sparse kernel (``[Bf, Hkv, G, N, Dv]``), or None where the kernel
        would not compute this call exactly (see the module docstring). ``topk``: an int, or per-kv-head counts
        ``[Hkv]`` (``per_head``)."""
        from ..kernels._common import mixer_kernels
        if not mixer_kernels(c.q):
            return None
        bf, hkv, g, n, _, dd, dv = c.dims
        blk = self.block
        if (self.grid is not None or self.sinks or self.summary or dropout_p or c.q.dtype == torch.float64
                or max(dd, dv) > 256 or blk < 16 or blk > 256 or blk & (blk - 1)):
            return None
        servable, mask = _dense.kernel_key_mask(c)
        if not servable:
            return None
        order_list, p, _ = self._layout(n)
        nb = len(order_list)
        if p or nb != -(-n // blk):
            return None
        dev = c.q.device
        order = torch.tensor(order_list, dtype=torch.long, device=dev)
        bs = order.shape[1]
        valid = order >= 0
        pos = torch.where(valid, order, torch.zeros_like(order))
        flat = pos.reshape(-1)
        # the routing of ``_attend`` (same pooled scores, same picks)
        qb = c.q.index_select(-2, flat).view(bf, hkv, g, nb, bs, dd)
        kb = c.k.index_select(-2, flat).view(bf, hkv, nb, bs, dd)
        aff = self._block_affinity(qb, kb, valid, causal)
        if isinstance(topk, torch.Tensor):                                     # per-head counts: the best t_h
            counts = topk.to(dev).clamp(max=nb)
            t = int(counts.max())
            idx = aff.topk(t, dim=-1).indices                                  # sorted: best first
            rank_ok = torch.arange(t, device=dev) < counts.view(hkv, 1, 1, 1)  # [Hkv, 1, 1, t]
            picked = torch.zeros(bf, hkv, g, nb, nb, dtype=torch.bool, device=dev)
            picked.scatter_(-1, idx, rank_ok.expand(bf, hkv, g, nb, t).clone())
        else:
            idx = aff.topk(min(int(topk), nb), dim=-1).indices
            picked = torch.zeros(bf, hkv, g, nb, nb, dtype=torch.bool, device=dev).scatter_(-1, idx, True)
        from ..kernels.block_sparse_attention import block_sparse_attention
        q, k, v = c.kernel_qkv()
        out = block_sparse_attention(q.reshape(bf, hkv * g, n, dd), k, v, picked.view(bf, hkv * g, nb, nb),
                                     blk, attn_mask=mask, is_causal=causal, scale=c.scale)
        return out.view(bf, hkv, g, n, dv)

    def _attend(self, c: _layout.Canon, topk, causal: bool, dropout_p: float) -> torch.Tensor:
        """Routed attention of canonical ``c`` with ``topk`` blocks per query block: ``[Bf, Hkv, G, N, Dv]``.
        ``topk``: an int, or per-kv-head counts (a tuple; all equal unless the C++ kernel serves the call, which
        skips the picks past a head's count, marked -1).

        Every query block attends to its ``topk`` chosen key blocks followed by the extra keys of its head: the
        pooled blocks (``summary``) and the sinks. The mask holds only what is not all-visible (padding slots,
        the causal pattern, the site's mask, the pooled blocks' log-size bias), never N×N. On CPU without
        gradients (``_dense.cpu_inference``, compiled or not) the C++ kernel of ``rewrite.kernels.routed_blocks`` runs each
        query block as one tile, reading 1-D blocks where they lie (no padded copies, no gathers); without that
        kernel, the query blocks go in chunks whose keys are gathered into a small reused buffer for fused SDPA
        (``routed_blocks_attention``); elsewhere every block's keys are gathered at once (differentiable,
        traceable)."""
        bf, hkv, g, n, _, dd, dv = c.dims
        order_list, p, slots = self._layout(n)
        nb, bs = len(order_list), len(order_list[0])
        blocks = _Blocks(c, order_list, p, slots, line=self.grid is None)
        kernel = _dense.cpu_inference(c, dropout_p) and routed_blocks.available()
        in_place = kernel and blocks.line
        counts = tuple(topk) if isinstance(topk, (tuple, list)) else None
        t = min(max(counts) if counts else topk, nb)
        sums = None
        if in_place:                       # 1-D blocks stay where they lie: routing and pooling from block sums
            sums = [blocks.line_sums(x) for x in (c.q, c.k)]
            qr, kr = (x if blocks.valid is None else x / blocks.counts().to(x.dtype).view(nb, 1) for x in sums)
            idx = self._route(qr, kr, causal).topk(t, dim=-1).indices          # [Bf, Hkv, G, nb, t]
            qb = kb = vb = None
        else:
            qb, kb, vb = (blocks.gather(c.q, bf, hkv, g, "block_routing.pad.q"),
                          blocks.gather(c.k, bf, hkv, slot="block_routing.pad.k"),
                          blocks.gather(c.v, bf, hkv, slot="block_routing.pad.v"))
            idx = self._block_affinity(qb, kb, blocks.valid, causal, blocks.line).topk(t, dim=-1).indices
        if counts and len(set(counts)) > 1:                                   # picks past a head's count: -1
            beyond = torch.arange(t, device=idx.device) >= torch.tensor(counts, device=idx.device).view(hkv, 1, 1, 1)
            idx = idx.masked_fill(beyond, -1)
        extra_k, extra_v = [], []
        masks = [blocks.routed_mask(c, idx, causal, padding=not in_place)]
        if self.summary and nb > 1:
            if in_place and c.bias is None:
                pooled_from = (sums[1], blocks.line_sums(c.v))
            elif in_place:
                pooled_from = (blocks.gather(c.k, bf, hkv, slot="block_routing.pad.k"),
                               blocks.gather(c.v, bf, hkv, slot="block_routing.pad.v"))
            else:
                pooled_from = (kb, vb)
            k_mean, v_mean, pooled_mask = self._pooled(c, pooled_from, blocks, idx, causal)
            extra_k.append(k_mean)
            extra_v.append(v_mean)
            masks.append(pooled_mask)
        if p:
            extra_k.append(c.k[:, :, None, :p])
            extra_v.append(c.v[:, :, None, :p])
            masks.append(None if c.bias is None else _dense.gather_bias(
                c.bias, (bf, hkv, g), blocks.query_pos().view(1, 1, 1, nb, bs, 1),
                torch.arange(p, device=c.q.device).view(1, 1, 1, 1, 1, p)))
        mask = _join_masks(masks, [t * bs] + [x.shape[-2] for x in extra_k], c.q)   # [Bf·Hkv·G|1, nb, bs|1, S]
        extras = _extra_keys(extra_k, extra_v, bf, hkv) if extra_k else None
        ek, ev = extras if extras is not None else (None, None)
        per = 1 if ek is None else nb * (g if ek.shape[0] != bf * hkv * g else 1)   # query blocks per extras row
        if in_place:
            out = routed_blocks.routed_blocks_forward(
                c.q.reshape(bf, hkv * g, n, dd), c.k, c.v, idx.reshape(bf, hkv * g, nb, t), bs, p, ek, ev, per,
                mask, c.scale).view(bf, hkv, g, n, dv)
            if p:
                out[..., :p, :] = self._prefix_rows(c, p, causal, dropout_p)
            return out
        if kernel:
            out = routed_blocks.routed_blocks_forward(
                qb.reshape(bf, hkv * g, nb * bs, dd), kb.reshape(bf, hkv, nb * bs, dd), vb.reshape(bf, hkv, nb * bs, dv),
                idx.reshape(bf, hkv * g, nb, t), bs, 0, ek, ev, per, mask, c.scale)
        elif _dense.flash_cpu_serves(c, dropout_p):
            out = routed_blocks_attention(qb.reshape(1, -1, bs, dd), kb.reshape(bf * hkv * nb, bs, dd),
                                          vb.reshape(bf * hkv * nb, bs, dv), idx, mask, c.scale, extras)
        else:
            out = _routed_sdpa(qb, kb, vb, idx, mask, extras, c.scale, dropout_p)
        out = blocks.body(out.reshape(bf, hkv, g, nb * bs, dv))
        if not p:
            return out
        return torch.cat([self._prefix_rows(c, p, causal, dropout_p), out], -2)

    @staticmethod
    def _prefix_rows(c: _layout.Canon, p: int, causal: bool, dropout_p: float) -> torch.Tensor:
        """The ``p`` prefix (sink / CLS) queries' rows ``[Bf, Hkv, G, p, Dv]``: they attend to every key
        (causally, to what precedes them)."""
        pre = _layout.Canon(c.q[..., :p, :], c.k, c.v, _dense.bias_rows(c.bias, slice(0, p)), c.scale, (),
                            c.out_dtype, c.mask_floor)
        return _dense.sdpa_rows(pre, c.k, c.v, pre.bias, causal=causal, dropout_p=dropout_p)

    @staticmethod
    def _pooled(c, pooled_from: tuple, blocks, idx, causal: bool) -> tuple:
        """Every block's pooled key and value ``[Bf, Hkv, G|1, nb, D]`` and the mask ``[Bf, Hkv, G, nb, bs|1,
        nb]`` of the pooled tokens for each query block: -inf for the blocks it chose (causally, also for the
        blocks that do not end before it) and, otherwise, the log-sum-exp of the site mask over the block's
        keys for that query.

        A block's pooled key and value are the means over its member keys that some query may see (padding
        slots and keys the mask hides from every query are left out). Its score ``q·k̄·scale`` plus that
        log-sum-exp, which is ``log(size)`` without a mask and ``log(#visible)`` for 0/-inf masks, makes the
        block carry the mass of its keys.

        ``pooled_from``: the key and value blocks ``[Bf, Hkv, nb, bs, D]``, or (1-D blocks without a site mask)
        their sums over each block ``[Bf, Hkv, nb, D]``.
        """
        bf, hkv, g = c.dims[:3]
        nb, bs = blocks.nb, blocks.bs
        kb, vb = pooled_from
        dev = kb.device
        valid = blocks.valid if blocks.valid is not None else torch.ones(nb, bs, dtype=torch.bool, device=dev)
        member = valid.to(c.q.dtype).view(1, 1, 1, nb, bs)                  # [1, 1, 1, nb, bs]
        log_bias = torch.where(valid, 0.0, _layout.NEG_INF).to(c.q.dtype).view(1, 1, 1, 1, 1, nb, bs)
        if c.bias is not None:
            rows = c.bias.shape[-2]
            cols = blocks.slots_of(c.bias, -1).view(*c.bias.shape[:3], rows, nb, bs)
            seen = cols.amax(-3) > c.mask_floor                              # [Bm, Hm, Gm, nb, bs]
            member = member * seen.to(c.q.dtype)
            b = cols.masked_fill(~valid, _layout.NEG_INF)
            if rows > 1:                                                     # per-query mask: rows in slot order
                b = blocks.slots_of(b, -3).view(*c.bias.shape[:3], nb, bs, nb, bs)
            else:
                b = b.view(*c.bias.shape[:3], 1, 1, nb, bs)
            log_bias = b
        count = member.sum(-1, keepdim=True)
        if kb.dim() == 4:                    # block sums
            k_mean, v_mean = (x.div(count.clamp(min=1).view(nb, 1)).unsqueeze(2) for x in (kb, vb))
        elif c.bias is None and blocks.line:   # 1-D padding slots hold zeros: plain sums (a [1, bs] @ [bs, D]
            # product per block is several times slower on CPU)
            k_mean, v_mean = (x.sum(-2).div_(count.clamp(min=1).view(nb, 1)).unsqueeze(2) for x in (kb, vb))
        else:
            weight = (member / count.clamp(min=1)).unsqueeze(-2)             # [.., nb, 1, bs]
            k_mean = (weight @ kb.unsqueeze(2)).squeeze(-2)                  # [Bf, Hkv, G|1, nb, D]
            v_mean = (weight @ vb.unsqueeze(2)).squeeze(-2)
        lse = torch.logsumexp(log_bias, dim=-1)                               # [.., nb|1, bs|1, nb]
        if c.bias is not None:                                                # no visible member: -inf
            lse = lse.masked_fill((count.squeeze(-1) == 0).view(*count.shape[:3], 1, 1, nb), _layout.NEG_INF)
        picked = (idx >= 0).to(torch.int32)                                   # -1: no pick (per-head counts)
        chosen = torch.zeros(bf, hkv, g, nb, nb, dtype=torch.int32, device=dev).scatter_add_(
            -1, idx.clamp(min=0), picked) > 0
        if causal:  # blocks that do not end before the query block: never pooled
            chosen = chosen | torch.ones(nb, nb, dtype=torch.bool, device=dev).triu()
        return k_mean, v_mean, lse.masked_fill(chosen.unsqueeze(-2), _layout.NEG_INF)


#: elements of the key and value blocks one chunk of query blocks gathers (4 MiB in fp32): small enough to be
#: in cache when the fused kernel reads them, large enough that the chunks' own calls cost little
ROUTED_CHUNK_ELEMENTS = 1 << 20


def _extra_keys(keys: list, values: list, bf: int, hkv: int) -> tuple:
    """The extra keys and values of each head (``[Bf, Hkv, G|1, E_i, D]`` parts) joined: ``[Bf·Hkv·G|1, E, D]``."""
    gk = max(x.shape[2] for x in keys)
    k = _cat([x.expand(bf, hkv, gk, *x.shape[-2:]) for x in keys])
    v = _cat([x.expand(bf, hkv, gk, *x.shape[-2:]) for x in values])
    return k.reshape(bf * hkv * gk, *k.shape[-2:]), v.reshape(bf * hkv * gk, *v.shape[-2:])


def _routed_sdpa(qb, kb, vb, idx, mask, extras, scale: float, dropout_p) -> torch.Tensor:
    """Every query block's chosen key blocks (and its head's extra keys) gathered at once, then one SDPA call:
    ``[Bf·Hkv·G, nb, bs, Dv]`` (differentiable and traceable, unlike ``routed_blocks_attention``)."""
    bf, hkv, g, nb, t = idx.shape
    bs, dd, dv = kb.shape[-2], kb.shape[-1], vb.shape[-1]
    rows = (torch.arange(bf * hkv, device=idx.device).view(bf, hkv, 1, 1, 1) * nb + idx).reshape(-1)
    keys = [_layout.index_rows(kb.reshape(bf * hkv * nb, bs, dd), rows, "block_routing.k")
            .view(bf * hkv * g, nb, t * bs, dd)]
    values = [_layout.index_rows(vb.reshape(bf * hkv * nb, bs, dv), rows, "block_routing.v")
              .view(bf * hkv * g, nb, t * bs, dv)]
    for part, parts in zip(extras or (), (keys, values)):     # [Bf·Hkv·G|1, E, D] -> every query block's
        e = part.view(bf * hkv, -1, 1, *part.shape[-2:]).expand(bf * hkv, g, nb, *part.shape[-2:])
        parts.append(e.reshape(bf * hkv * g, nb, *part.shape[-2:]))
    keys = _layout.cat_rows(keys, -2, "block_routing.keys")
    values = _layout.cat_rows(values, -2, "block_routing.values")
    return torch.nn.functional.scaled_dot_product_attention(
        qb.reshape(bf * hkv * g, nb, bs, dd), keys, values, attn_mask=mask, dropout_p=float(dropout_p or 0.0),
        scale=scale)


def routed_blocks_attention(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, idx: torch.Tensor, mask,
                            scale: float, extras=None) -> torch.Tensor:
    """Fused CPU attention of query blocks ``q [1, F, bs, D]`` (``F = Bf·Hkv·G·nb``) over their chosen key blocks
    ``idx [Bf, Hkv, G, nb, t]`` of ``kb, vb [Bf·Hkv·nb, bs, D]``, followed by their head's ``extras`` (keys and
    values ``[Bf·Hkv·G|1, E, D]``, or None), with the mask ``[Bf·Hkv·G|1, nb, bs|1, t·bs + E]`` (or None):
    ``[1, F, bs, Dv]``. Query blocks go in chunks, each chunk's keys gathered by one index op into a reused
    buffer: whole blocks, or with extras single rows of the blocks and the extras laid end to end."""
    bf, hkv, g, nb, t = idx.shape
    heads, bs, dd, dv = q.shape[1], q.shape[2], q.shape[3], vb.shape[-1]
    dev = idx.device
    rows = (torch.arange(bf * hkv, device=dev).view(bf, hkv, 1, 1, 1) * nb + idx).reshape(heads, t)
    width = t * bs + (0 if extras is None else extras[0].shape[-2])
    if mask is not None:
        mask = mask.expand(bf * hkv * g, nb, mask.shape[-2], width).reshape(heads, mask.shape[-2], width)
    if extras is None:
        src_k, src_v, index, per_block = kb, vb, rows.reshape(-1), t
    else:
        ek, ev = extras
        src_k = _layout.cat_rows([kb.reshape(-1, dd), ek.reshape(-1, dd)], 0, "block_routing.src.k")
        src_v = _layout.cat_rows([vb.reshape(-1, dv), ev.reshape(-1, dv)], 0, "block_routing.src.v")
        per = nb * (g if ek.shape[0] != bf * hkv * g else 1)              # query blocks per extras row
        e = torch.arange(ek.shape[-2], device=dev)
        tokens = (rows.unsqueeze(-1) * bs + torch.arange(bs, device=dev)).reshape(heads, t * bs)
        extra = kb.shape[0] * bs + (torch.arange(heads, device=dev) // per).unsqueeze(-1) * e.numel() + e
        index, per_block = torch.cat([tokens, extra], -1).reshape(-1), width
    out = q.new_empty(1, heads, bs, dv)
    step = max(1, ROUTED_CHUNK_ELEMENTS // (width * (dd + dv)))
    for h0 in range(0, heads, step):
        h1 = min(heads, h0 + step)
        chunk = index[h0 * per_block:h1 * per_block]
        keys = _layout.index_rows(src_k, chunk, "block_routing.k").view(h1 - h0, 1, width, dd)
        values = _layout.index_rows(src_v, chunk, "block_routing.v").view(h1 - h0, 1, width, dv)
        # the blocks as the kernel's batch, not its heads: its output is then [B, T, H, D] = [B, T, D], in place
        o, _ = _dense.FLASH_CPU(q[0, h0:h1].unsqueeze(1), keys, values,
                                attn_mask=None if mask is None else mask[h0:h1].unsqueeze(1), scale=scale)
        out[0, h0:h1] = o.view(h1 - h0, bs, dv)
    return out


def _cat(parts: list, dim: int = -2) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _join_masks(masks: list, widths: list, like: torch.Tensor):
    """The additive SDPA mask ``[Bf·Hkv·G|1, nb, bs|1, S]`` of the key parts (``masks[i]`` None: part ``i``, of
    ``widths[i]`` keys, all visible; else ``[.., nb|1, bs|1, S_i]`` with leading dims ``[Bf|1, Hkv|1, G|1]``);
    None when every part is all visible."""
    if all(m is None for m in masks):
        return None
    lead = torch.broadcast_shapes(*(m.shape[:-1] for m in masks if m is not None))
    full = [torch.zeros((), dtype=like.dtype, device=like.device).expand(*lead, w) if m is None
            else m.to(like.dtype).expand(*lead, m.shape[-1]) for m, w in zip(masks, widths)]
    mask = _cat(full, dim=-1)
    bf, hkv, g, nb, rows = mask.shape[:5]
    return mask.reshape(bf * hkv * g, nb, rows, mask.shape[-1])


class _Blocks:
    """The body tokens of one call as ``nb`` blocks of ``bs`` slots (``order``; padding slots -1) after ``p``
    prefix tokens: gathers q/k/v into blocks, builds the routed blocks' mask, and puts block outputs back in
    token order. ``line``: the 1-D layout, whose slots are the body tokens in order (padding at the end), so
    blocks are a view (or one padded copy) instead of an index gather."""

    def __init__(self, c: _layout.Canon, order_list: list, p: int, slots, line: bool):
        self.nb, self.bs, self.p, self.slots, self.line = len(order_list), len(order_list[0]), p, slots, line
        self.n = c.dims[3]
        self.pad = self.nb * self.bs - (self.n - p)                          # padding slots at the end (line)
        dev = self.device = c.q.device
        order = torch.tensor(order_list, dtype=torch.long, device=dev)
        valid = order >= 0                                                   # [nb, bs]
        self.valid = None if slots is None else valid
        self.flat = torch.where(valid, order + p, torch.zeros_like(order)).reshape(-1)  # token of each slot

    def gather(self, t: torch.Tensor, bf: int, hkv: int, g: int = 0, slot: str = "block_routing.pad") -> torch.Tensor:
        """``t [Bf, Hkv, (G,) N, D]`` as blocks ``[Bf, Hkv, (G,) nb, bs, D]`` (a padded copy in the scratch
        buffer ``slot`` when the body does not fill its last block: one slot per tensor of a call)."""
        lead = (bf, hkv, g) if g else (bf, hkv)
        if self.line:
            if self.pad:
                body = _layout.padded_rows(t, self.p, self.nb * self.bs, slot)
            else:
                body = t[..., self.p:, :] if self.p else t
            return body.reshape(*lead, self.nb, self.bs, t.shape[-1])
        return t.index_select(-2, self.flat).view(*lead, self.nb, self.bs, t.shape[-1])

    def line_sums(self, t: torch.Tensor) -> torch.Tensor:
        """``t [..., N, D]``'s sums over each 1-D block of body tokens ``[..., nb, D]``, read where the rows lie
        (no padded copy: the short last block is summed apart)."""
        body = t[..., self.p:, :]
        full = (self.n - self.p) // self.bs
        sums = body[..., :full * self.bs, :].unflatten(-2, (full, self.bs)).sum(-2)
        if full == self.nb:
            return sums
        return torch.cat([sums, body[..., full * self.bs:, :].sum(-2, keepdim=True)], -2)

    def counts(self) -> torch.Tensor:
        """The tokens of each block ``[nb]``."""
        return torch.full((self.nb,), self.bs, device=self.device) if self.valid is None else self.valid.sum(-1)

    def slots_of(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t`` with its token dim ``dim`` (size N) read in slot order (size nb·bs)."""
        if self.line and not self.p and not self.pad:
            return t
        return t.index_select(dim, self.flat)

    def query_pos(self) -> torch.Tensor:
        """The token index of every slot ``[nb, bs]`` (padding slots: 0)."""
        return self.flat.view(self.nb, self.bs)

    def routed_mask(self, c: _layout.Canon, idx: torch.Tensor, causal: bool, padding: bool = True):
        """The mask ``[Bf|1, Hkv|1, G|1, nb, bs|1, t·bs]`` of the routed key blocks ``idx [Bf, Hkv, G, nb, t]``
        (padding slots unless ``padding`` is False, the causal pattern, the site's mask), or None when every
        routed key is visible."""
        nb, bs = self.nb, self.bs
        lead, t, dev = idx.shape[:3], idx.shape[-1], idx.device
        keep = None
        if self.valid is not None and padding:                                # padding key slots
            keep = self.valid[idx].view(*lead, nb, 1, t * bs)
        if causal:  # 1-D blocks: slot order is token order, so a key is visible iff its block is earlier, or it
            # is the query's own block and the key's slot is not after the query's
            rel = (idx - torch.arange(nb, device=dev).view(nb, 1)).view(*lead, nb, 1, t, 1)
            own = torch.ones(bs, bs, dtype=torch.bool, device=dev).tril().view(bs, 1, bs)
            vis = ((rel < 0) | ((rel == 0) & own)).view(*lead, nb, bs, t * bs)
            keep = vis if keep is None else keep & vis
        mask = None if keep is None else torch.zeros(keep.shape, dtype=c.q.dtype, device=dev).masked_fill_(
            ~keep, _layout.NEG_INF)
        if c.bias is not None:
            pos = self.query_pos()
            kpos = pos[idx].view(*lead, nb, 1, t * bs)
            site = _dense.gather_bias(c.bias, tuple(lead), pos.view(1, 1, 1, nb, bs, 1), kpos)
            mask = site if mask is None else mask + site
        return mask

    def body(self, out: torch.Tensor) -> torch.Tensor:
        """Block outputs ``[Bf, Hkv, G, nb·bs, Dv]`` as the body tokens' rows ``[Bf, Hkv, G, N - p, Dv]``."""
        if self.line:
            return out[..., :self.n - self.p, :]
        dest = self.flat
        if self.slots is not None:
            keep = torch.tensor(self.slots, dtype=torch.long, device=out.device)
            out, dest = out.index_select(-2, keep), dest.index_select(0, keep)
        full = out.new_zeros(*out.shape[:3], self.n, out.shape[-1]).index_copy(-2, dest, out)
        return full[..., self.p:, :]


#: query rows per 64 tokens of a block the per-head fit samples (evenly spaced in the block; at least 2 a
#: block): a fixed share of the rows, so the fit's exact pass costs an eighth of an exact call at any block size
FIT_ROWS_PER_BLOCK = 8

#: elements of the fit's per-row, per-block partial outputs held at once (rows go in chunks)
FIT_CHUNK_ELEMENTS = 1 << 23


def fit_errors(module: BlockRoutingAttention, c: _layout.Canon, causal: bool) -> torch.Tensor:
    """``[nb, Hkv]``: each kv head's relative squared output error ``sum ||routed - exact||² / sum ||exact||²``
    when every query block keeps its best ``t`` key blocks, for every ``t`` in 1..nb, on sampled query rows.

    One exact pass over the sampled rows gives, per row, the probability mass and partial output of every key
    block (and of the sinks); the routed output at count ``t`` is then the renormalised sum of the sinks and
    the row's ``t`` first blocks in routing order (a cumulative sum), plus, with ``summary``, the pooled tokens
    of the blocks after them: every count at the price of one partial exact pass. (With a site mask the pooled
    tokens are weighted as if unmasked: an estimate for the fit, not the forward.)"""
    bf, hkv, g, n, _, dd, dv = c.dims
    order_list, p, slots = module._layout(n)
    blocks = _Blocks(c, order_list, p, slots, line=module.grid is None)
    nb, bs = blocks.nb, blocks.bs
    qb, kb, vb = blocks.gather(c.q, bf, hkv, g), blocks.gather(c.k, bf, hkv), blocks.gather(c.v, bf, hkv)
    rank = module._block_affinity(qb, kb, blocks.valid, causal, blocks.line).argsort(-1, descending=True)
    valid = blocks.valid if blocks.valid is not None else torch.ones(nb, bs, dtype=torch.bool, device=c.q.device)
    per = min(bs, max(2, FIT_ROWS_PER_BLOCK * bs // 64))
    picks = torch.linspace(0, bs - 1, per, device=c.q.device).round().long().unique()
    pooled = _fit_pooled_keys(c, kb, vb, valid) if module.summary and nb > 1 else None
    errors = torch.zeros(nb, hkv, dtype=torch.float64, device=c.q.device)
    norm = torch.zeros(hkv, dtype=torch.float64, device=c.q.device)
    step = max(1, FIT_CHUNK_ELEMENTS // max(1, bf * hkv * g * len(picks) * nb * (dv + 2)))
    for start in range(0, nb, step):
        qblocks = torch.arange(start, min(nb, start + step), device=c.q.device)
        err, nrm = _fit_chunk(c, blocks, vb, valid, rank, qblocks, picks, pooled, causal)
        errors += err
        norm += nrm
    return (errors / norm.clamp(min=1e-30)).float()


def _fit_pooled_keys(c, kb, vb, valid) -> tuple:
    """Every block's pooled key, value ``[Bf, Hkv, nb, D]`` and ``log(#members)`` ``[nb]`` (see ``_pooled``)."""
    member = valid.to(c.q.dtype)
    count = member.sum(-1)
    weight = (member / count.clamp(min=1).unsqueeze(-1)).unsqueeze(-2)         # [nb, 1, bs]
    log_count = torch.where(count > 0, count.clamp(min=1).log(), torch.full_like(count, _layout.NEG_INF))
    return (weight @ kb).squeeze(-2), (weight @ vb).squeeze(-2), log_count


def _fit_chunk(c, blocks, vb, valid, rank, qblocks, picks, pooled, causal) -> tuple:
    """``fit_errors`` for the sampled rows of the query blocks ``qblocks``: (summed squared errors ``[nb, Hkv]``,
    summed squared exact outputs ``[Hkv]``)."""
    bf, hkv, g, n, _, dd, dv = c.dims
    nb, bs, p = blocks.nb, blocks.bs, blocks.p
    nq, per = len(qblocks), len(picks)
    pos = blocks.query_pos().index_select(0, qblocks)[:, picks]                # [nq, per] token of each row
    row_ok = valid.index_select(0, qblocks)[:, picks].reshape(-1).to(torch.float64)
    rows = pos.reshape(-1)
    scores = _dense.grouped_scores(c.q.index_select(-2, rows), c.k).mul_(c.scale)   # [Bf, Hkv, G, R, N]
    if c.bias is not None:
        scores = scores + (c.bias.index_select(-2, rows) if c.bias.shape[-2] > 1 else c.bias)
    if causal:
        scores = scores.masked_fill(torch.arange(n, device=rows.device).view(1, n) > rows.view(-1, 1),
                                    _layout.NEG_INF)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    probs = torch.exp(scores - lse).nan_to_num_(0.0)                           # rows seeing nothing: 0
    body = blocks.slots_of(probs, -1).view(bf, hkv, g, nq * per, nb, bs) * valid
    mass = body.sum(-1)                                                         # [Bf, Hkv, G, R, nb]
    part = torch.einsum("bhgrns,bhnsd->bhgrnd", body, vb)                       # [Bf, Hkv, G, R, nb, Dv]
    sink_mass = probs[..., :p].sum(-1, keepdim=True) if p else torch.zeros_like(mass[..., :1])
    sink_out = _dense.grouped_values(probs[..., :p], c.v[..., :p, :]) if p else torch.zeros_like(part[..., 0, :])
    exact = sink_out + part.sum(-2)                                             # [Bf, Hkv, G, R, Dv]
    order = rank.index_select(3, qblocks).repeat_interleave(per, dim=3)         # [Bf, Hkv, G, R, nb]
    cum_mass = mass.gather(-1, order).cumsum_(-1).add_(sink_mass)
    cum_out = part.gather(-2, order.unsqueeze(-1).expand(*order.shape, dv)).cumsum_(-2).add_(sink_out.unsqueeze(-2))
    if pooled is not None:
        k_mean, v_mean, log_count = pooled
        w = torch.exp(_dense.grouped_scores(c.q.index_select(-2, rows), k_mean) * c.scale + log_count - lse)
        if causal:  # blocks that do not end before the query block are never pooled
            w = w.masked_fill(torch.arange(nb, device=rows.device).view(1, nb) >= qblocks.repeat_interleave(
                per).view(-1, 1), 0.0)
        w = w.nan_to_num_(0.0).gather(-1, order)                                # in routing order
        rest = w.sum(-1, keepdim=True) - w.cumsum(-1)                           # pooled mass after count t
        v_sorted = v_mean.unsqueeze(2).unsqueeze(3).expand(bf, hkv, g, nq * per, nb, dv).gather(
            -2, order.unsqueeze(-1).expand(*order.shape, dv))
        rest_out = (w.unsqueeze(-1) * v_sorted).flip(-2).cumsum(-2).flip(-2) - w.unsqueeze(-1) * v_sorted
        cum_mass, cum_out = cum_mass.add_(rest), cum_out.add_(rest_out)
    routed = cum_out.div_(torch.where(cum_mass > 0, cum_mass, torch.ones_like(cum_mass)).unsqueeze(-1))
    err = routed.sub_(exact.unsqueeze(-2)).pow_(2).sum(-1, dtype=torch.float64) * row_ok.view(-1, 1)  # [.., R, nb]
    nrm = exact.double().pow(2).sum(-1) * row_ok
    return err.sum((0, 2, 3)).transpose(0, 1), nrm.sum((0, 2, 3))


def allocate_blocks(errors: torch.Tensor, total: int) -> torch.Tensor:
    """Per-head counts ``t_h >= 1`` with ``sum t_h <= total`` minimising ``sum errors[t_h - 1, h]`` (a
    knapsack over heads, exact by dynamic programming). ``errors`` is ``[max_count, heads]``."""
    counts, heads = errors.shape
    total = max(heads, min(int(total), counts * heads))
    err = errors.tolist()
    best = {0: (0.0, ())}                      # blocks used -> (summed error, counts so far)
    for h in range(heads):
        nxt: dict = {}
        for used, (e, picks) in best.items():
            for t in range(1, min(counts, total - used - (heads - h - 1)) + 1):
                cand = (e + err[t - 1][h], picks + (t,))
                if used + t not in nxt or cand[0] < nxt[used + t][0]:
                    nxt[used + t] = cand
        best = nxt
    return torch.tensor(min(best.values())[1], dtype=torch.long)



@register_handler(BlockRouting)
def block_routing_handler(action: BlockRouting, call, site):
    grid, prefix, causal = _base.resolve_grid_layout("BlockRouting", action.layout, call, site)
    if grid is not None:
        return BlockRoutingAttention(action.block, action.topk, grid, prefix, summary=action.summary,
                                     per_head=action.per_head)
    return BlockRoutingAttention(action.block, action.topk, None, 0, causal=causal, sinks=action.sinks,
                                 summary=action.summary, per_head=action.per_head)
