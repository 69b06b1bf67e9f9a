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
The counts are a buffer (``head_topk``), saved and restored with the model.

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

        For every count 1..blocks the routed output of each head is compared with exact attention; a small
        dynamic program then picks the counts (summing to ``topk`` × kv heads) of least summed relative
        squared error. ``scale`` defaults to SDPA's ``1/sqrt(D)``."""
        c = _layout.canon(q, k, v, attn_mask, scale)
        causal = self.causal or bool(is_causal)
        exact = _dense.sdpa_rows(c, c.k, c.v, c.bias, causal=causal)                # [Bf, Hkv, G, N, Dv]
        norm = exact.double().pow(2).sum((0, 2, 3, 4)).clamp(min=1e-30)       # [Hkv]
        nb = len(self._layout(c.dims[3])[0])
        errors = torch.stack([(self._attend(c, t, causal, 0.0) - exact).double().pow(2).sum((0, 2, 3, 4)) / norm
                              for t in range(1, nb + 1)])                       # [nb, Hkv]
        self.head_topk = allocate_blocks(errors, min(self.topk, nb) * errors.shape[1]).to(q.device)
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
    def _block_affinity(qb: torch.Tensor, kb: torch.Tensor, valid: torch.Tensor, causal: bool) -> torch.Tensor:
        """Routing scores ``[Bf, Hkv, G, nb, nb]`` of mean-pooled query blocks ``qb [Bf, Hkv, G, nb, bs, D]``
        against mean-pooled key blocks ``kb [Bf, Hkv, nb, bs, D]`` (padding slots, ``~valid [nb, bs]``, left
        out): a block's own block scores +inf (always kept) and, causally, later blocks -inf."""
        nb, bs = valid.shape
        w = valid.to(qb.dtype)
        w = w / w.sum(-1, keepdim=True).clamp(min=1)
        qr = (qb * w.view(nb, bs, 1)).sum(-2)                                  # [Bf, Hkv, G, nb, D]
        kr = (kb * w.view(nb, bs, 1)).sum(-2)                                  # [Bf, Hkv, nb, D]
        aff = _dense.grouped_scores(qr, kr)
        if causal:
            aff = aff.masked_fill(torch.ones(nb, nb, dtype=torch.bool, device=qb.device).triu(1), _layout.NEG_INF)
        return aff.masked_fill(torch.eye(nb, dtype=torch.bool, device=qb.device), float("inf"))

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

    def _attend(self, c: _layout.Canon, topk: int, causal: bool, dropout_p: float) -> torch.Tensor:
        """Routed attention of canonical ``c`` with ``topk`` blocks per query block: ``[Bf, Hkv, G, N, Dv]``."""
        bf, hkv, g, n, _, dd, dv = c.dims
        dev = c.q.device
        order_list, p, slots = self._layout(n)
        order = torch.tensor(order_list, dtype=torch.long, device=dev)
        nb, bs = order.shape
        valid = order >= 0                                                   # [nb, bs]
        pos = torch.where(valid, order + p, torch.zeros_like(order))         # token index of each slot
        flat = pos.reshape(-1)
        qb = c.q.index_select(-2, flat).view(bf, hkv, g, nb, bs, dd)
        kb = c.k.index_select(-2, flat).view(bf, hkv, nb, bs, dd)
        vb = c.v.index_select(-2, flat).view(bf, hkv, nb, bs, dv)

        aff = self._block_affinity(qb, kb, valid, causal)
        t = min(topk, nb)
        idx = aff.topk(t, dim=-1).indices                                      # [Bf, Hkv, G, nb, t]

        # gather the chosen key blocks per query block: [Bf, Hkv, G, nb, t*bs, D]
        gi = idx.reshape(bf, hkv, g, nb * t, 1, 1)
        kg = torch.gather(kb.unsqueeze(2).expand(bf, hkv, g, nb, bs, dd), 3,
                          gi.expand(bf, hkv, g, nb * t, bs, dd)).view(bf, hkv, g, nb, t * bs, dd)
        vg = torch.gather(vb.unsqueeze(2).expand(bf, hkv, g, nb, bs, dv), 3,
                          gi.expand(bf, hkv, g, nb * t, bs, dv)).view(bf, hkv, g, nb, t * bs, dv)
        scores = (qb @ kg.transpose(-1, -2)).mul_(c.scale)                     # [Bf, Hkv, G, nb, bs, t*bs]

        kpos = pos[idx].reshape(bf, hkv, g, nb, 1, t * bs)
        kvalid = valid[idx].reshape(bf, hkv, g, nb, 1, t * bs)
        qpos = pos.view(nb, bs, 1)
        keep = kvalid & (kpos <= qpos) if causal else kvalid
        scores = scores.masked_fill(~keep, _layout.NEG_INF)
        if c.bias is not None:
            scores = scores + _dense.gather_bias(c.bias, (bf, hkv, g), qpos.view(1, 1, 1, nb, bs, 1), kpos)

        parts = [scores]
        pooled_v = None
        if self.summary and nb > 1:
            # one pooled token per block a query block did not choose (and, causally, that ends before it)
            chosen = torch.zeros(bf, hkv, g, nb, nb, dtype=torch.bool, device=dev).scatter_(-1, idx, True)
            if causal:  # blocks that do not end before the query block: never pooled
                chosen = chosen | torch.ones(nb, nb, dtype=torch.bool, device=dev).triu()
            pooled_scores, pooled_v = self._pooled(c, qb, kb, vb, valid, pos, flat)
            parts.append(pooled_scores.masked_fill(chosen.unsqueeze(-2), _layout.NEG_INF))
        if p:
            pre = _dense.grouped_scores(qb.reshape(bf, hkv, g, nb * bs, dd), c.k[..., :p, :]).mul_(c.scale)
            pre = pre.view(bf, hkv, g, nb, bs, p)
            if c.bias is not None:
                cols = torch.arange(p, device=dev).view(1, 1, 1, 1, 1, p)
                pre = pre + _dense.gather_bias(c.bias, (bf, hkv, g), qpos.view(1, 1, 1, nb, bs, 1), cols)
            parts.append(pre)
        probs = _dense.dropout(_dense.safe_softmax(torch.cat(parts, -1) if len(parts) > 1 else scores), dropout_p)
        out_b = probs[..., :t * bs] @ vg                                       # [Bf, Hkv, G, nb, bs, Dv]
        at = t * bs
        if pooled_v is not None:
            out_b = out_b + probs[..., at:at + nb] @ pooled_v.unsqueeze(-3)    # [.., nb, bs, nb] @ [.., 1, nb, Dv]
            at += nb
        if p:
            out_b = out_b + _dense.grouped_values(probs[..., at:].reshape(bf, hkv, g, nb * bs, p),
                                             c.v[..., :p, :]).view(bf, hkv, g, nb, bs, dv)

        # body slots back to token order; prefix queries attend to everything (causally: to what precedes)
        body = out_b.reshape(bf, hkv, g, nb * bs, dv)
        dest = flat
        if slots is not None:
            keep_slots = torch.tensor(slots, dtype=torch.long, device=dev)
            body, dest = body.index_select(-2, keep_slots), flat.index_select(0, keep_slots)
        out = body.new_zeros(bf, hkv, g, n, dv).index_copy(-2, dest, body)
        if p:
            pre = _layout.Canon(c.q[..., :p, :], c.k, c.v, _dense.bias_rows(c.bias, slice(0, p)), c.scale, (), c.out_dtype,
                          c.mask_floor)
            out = torch.cat([_dense.sdpa_rows(pre, c.k, c.v, pre.bias, causal=causal, dropout_p=dropout_p),
                             out[..., p:, :]], dim=-2)
        return out

    @staticmethod
    def _pooled(c, qb, kb, vb, valid, pos, flat) -> tuple:
        """Scores of every body query against every block's pooled token ``[Bf, Hkv, G, nb, bs, nb]`` and the
        pooled values ``[Bf, Hkv, G|1, nb, Dv]``.

        A block's pooled key and value are the means over its member keys that some query may see (padding
        slots and keys the mask hides from every query are left out). Its score is ``q·k̄·scale`` plus the
        log-sum-exp of the mask over the block's keys for that query, which is ``log(size)`` without a mask
        and ``log(#visible)`` for 0/-inf masks, so the block carries the mass of its keys.
        """
        bf, hkv, g, nb, bs, dd = qb.shape
        member = valid.to(c.q.dtype).view(1, 1, 1, nb, bs)                  # [1, 1, 1, nb, bs]
        log_bias = torch.where(valid, 0.0, _layout.NEG_INF).to(c.q.dtype).view(1, 1, 1, 1, 1, nb, bs)
        if c.bias is not None:
            rows = c.bias.shape[-2]
            cols = c.bias.index_select(-1, flat).view(*c.bias.shape[:3], rows, nb, bs)
            seen = cols.amax(-3) > c.mask_floor                              # [Bm, Hm, Gm, nb, bs]
            member = member * seen.to(c.q.dtype)
            b = cols.masked_fill(~valid, _layout.NEG_INF)
            if rows > 1:                                                     # per-query mask: rows in slot order
                b = b.index_select(-3, flat).view(*c.bias.shape[:3], nb, bs, nb, bs)
            else:
                b = b.view(*c.bias.shape[:3], 1, 1, nb, bs)
            log_bias = b
        count = member.sum(-1, keepdim=True)
        weight = member / count.clamp(min=1)                                  # [.., nb, bs]
        k_mean = (weight.unsqueeze(-1) * kb.unsqueeze(2)).sum(-2)             # [Bf, Hkv, G|1, nb, D]
        v_mean = (weight.unsqueeze(-1) * vb.unsqueeze(2)).sum(-2)
        scores = (qb.reshape(bf, hkv, g, nb * bs, dd) @ k_mean.transpose(-1, -2)).mul_(c.scale)
        scores = scores.view(bf, hkv, g, nb, bs, nb)
        # log-sum-exp of the mask over each block's keys; blocks with no visible member get -inf
        lse = torch.logsumexp(log_bias, dim=-1)                               # [.., nb|1, bs|1, nb]
        lse = lse.masked_fill((count.squeeze(-1) == 0).view(*count.shape[:3], 1, 1, nb), _layout.NEG_INF) \
            if c.bias is not None else lse
        return scores + lse, v_mean


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
