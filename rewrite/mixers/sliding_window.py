"""Sliding-window (local) attention with optional sink / global tokens (Longformer local+global, MASFormer).

``window`` is the total width. At a bidirectional site query ``i`` sees keys with ``|i - j| <= window // 2``;
at a causal site it sees ``i - window < j <= i``. The first ``sinks`` tokens are seen by every query (and,
at bidirectional sites, see every key themselves, like Longformer's global tokens). The site's own mask
still applies. It equals exact attention when ``window >= 2N - 1`` (bidirectional) or ``window >= N``
(causal).

The module works in query blocks of ``Bq`` queries; block ``b`` scores only the ``chunk = Bq + left + right``
keys its band can reach, so time and memory are O(N·w), never N×N. The blocks are the "heads" of fused
``scaled_dot_product_attention`` calls, one per segment (at most three), whose keys are strided views of the
keys themselves (no padded copy): interior block ``b`` reads keys ``b·Bq - left ..``, so its band is one
``[Bq, chunk]`` mask pattern shared by every interior block; the few blocks at either end, whose band would
run past the sequence, read the first / last ``chunk`` keys and have a mask of their own. These geometry
masks are small (O(w²)) and are cached per shape; the site's mask, when there is one, is added to them.

Sink keys are not in the chunks. Without gradients or dropout (CPU), each row's log-sum-exp from the fused
kernel merges them in afterwards (a few N-sized operations); otherwise the sink keys are prepended to every
chunk (a copy) so that one differentiable SDPA call per segment sees them. Global sink queries
(bidirectional) are a plain SDPA over all keys. When one chunk would hold every key anyway (short inputs,
wide windows) the band is a dense mask over all keys.

On CUDA tensors (or CPU ones with ``REWRITE_MIXER_KERNELS=1`` and ``TRITON_INTERPRET=1``, see
``rewrite/kernels/README.md``) the band runs on the Triton block-sparse kernel instead: a block mask covering
only the blocks the band and the sink columns touch, and the exact band (``window=(left, right)``, ``sinks``)
applied in-kernel, so time is proportional to the kept blocks and no [N, N] mask is built; fp16 / bf16 inputs
reach the kernel in their own dtype (``_layout.kernel_dtype``). Global sink query rows (bidirectional) are still one
small dense SDPA. The PyTorch path above is kept where the kernel would not compute the same thing: dropout
(the kernel has none), a per-query site mask (only key-padding masks, one row broadcast over the queries, are
passed to the kernel, never an [N, N] one), float64, head dims over 256.

Example::

    model = rewrite.optimize(model, {"_default": rewrite.SlidingWindow(window=128, sinks=1)}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import sympy
import torch
import torch.nn.functional as F

from ..actions import Action, register_action, register_handler
from ..cost import N, Nk
from . import _layout
from . import _dense
from . import _base

#: the CPU fused kernel that also returns each row's log-sum-exp (used to merge the sink keys in)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _reach(window: int, causal: bool) -> tuple:
    """(left, right): how many keys before / after query i its band covers."""
    return (window - 1, 0) if causal else (window // 2, window // 2)


def _block(left: int, right: int) -> int:
    """Query block size: 32 (16 for bands under 32 keys). Each block scores a chunk of ``Bq + left + right``
    keys; measured on CPU, 32 rows keep the block products efficient while wasting little over the band
    (288 keys scored for a band of 257 at window=256), and larger blocks were slower at every window tried."""
    return 16 if left + right < 32 else 32


@register_action
@dataclasses.dataclass(frozen=True)
class SlidingWindow(Action):
    """Local attention over a band of ``window`` keys (total width) plus ``sinks`` global first tokens."""

    window: int = 256
    sinks: int = 0
    exact = False
    requires = (_base.SelfAttention("a sliding window needs as many queries as keys"),)

    def __post_init__(self):
        _base.check_int(self, "window", self.window, 1, "Give the total band width in tokens, e.g. window=256.")
        _base.check_int(self, "sinks", self.sinks, 0, "Give how many first tokens every query sees, e.g. sinks=1.")

    def flops(self) -> sympy.Expr:
        """Bidirectional form (causal sites do about the same work): each query scores its block's chunk of
        ``Bq + left + right`` keys (all ``Nk`` keys when a chunk would hold them all), plus the sink columns,
        plus the global sink rows."""
        left, right = _reach(self.window, False)
        chunk = _block(left, right) + left + right
        s = sympy.Integer(self.sinks)
        return (_layout.attention_flops(N, sympy.Min(chunk, Nk)) + _layout.attention_flops(N, sympy.Min(s, Nk))
                + _layout.attention_flops(sympy.Min(s, N), Nk))


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, _layout.NEG_INF)


@dataclasses.dataclass(frozen=True)
class _Segment:
    """Blocks ``start .. stop - 1`` whose key chunks are ``chunk`` keys from ``offset + (b - start)·step``."""

    start: int
    stop: int
    offset: int
    step: int
    chunk: int

    def windows(self, t: torch.Tensor) -> torch.Tensor:
        """``[Bh, N, D]`` keys or values as this segment's chunks ``[Bh, count, chunk, D]`` (a view)."""
        count = self.stop - self.start
        if self.step:
            span = t[:, self.offset:self.offset + (count - 1) * self.step + self.chunk]
            return span.unfold(1, self.chunk, self.step).transpose(-1, -2)
        return t[:, None, self.offset:self.offset + self.chunk].expand(t.shape[0], count, self.chunk, t.shape[-1])

    def bias_windows(self, b: torch.Tensor, bq: int) -> torch.Tensor:
        """The site's mask ``[Bm, Hm, Gm, Nqm, Nk]`` on this segment's chunks: ``[Bm, Hm, count, Gm, Bq|1, chunk]``
        (views, and a copy of the rows past the last query when the last block is partial)."""
        bm, hm, gm, nqm, n = b.shape
        count, chunk = self.stop - self.start, self.chunk

        def keys(x):                                                   # [..., Nk] -> [..., count, chunk]
            if self.step:
                return x[..., self.offset:self.offset + (count - 1) * self.step + chunk].unfold(-1, chunk, self.step)
            return x[..., None, self.offset:self.offset + chunk].expand(*x.shape[:-1], count, chunk)

        if nqm == 1:
            return keys(b).permute(0, 1, 4, 2, 3, 5)
        lo, hi = self.start * bq, self.stop * bq
        x = b[..., lo:min(hi, n), :]
        if hi > n:
            x = F.pad(x, (0, 0, 0, hi - n))
        band = keys(x).view(bm, hm, gm, count, bq, count, chunk)      # every row block against every window
        band = torch.diagonal(band, dim1=3, dim2=5)                    # [Bm, Hm, Gm, Bq, chunk, count]
        return band.permute(0, 1, 5, 2, 3, 4)


def _segments(n: int, nb: int, bq: int, left: int, right: int) -> list:
    """The blocks in up to three segments, each one strided view of the (unpadded) keys: the front blocks,
    whose band starts before key 0, all read keys ``0 .. chunk``; the interior block ``b`` reads keys from
    ``b·Bq - left``; the back blocks, whose band ends past key N - 1, all read the last ``chunk`` keys.
    Needs ``N > chunk = Bq + left + right``."""
    chunk = bq + left + right
    front = min(nb, -(-left // bq))
    back = max(front, (n + left - chunk) // bq + 1)
    segs = [_Segment(0, front, 0, 0, chunk), _Segment(front, back, front * bq - left, bq, chunk),
            _Segment(back, nb, n - chunk, 0, chunk)]
    return [sg for sg in segs if sg.stop > sg.start]


def _build_patterns(n: int, bq: int, left: int, right: int, s: int, causal: bool, dtype: torch.dtype,
                    device: torch.device) -> tuple:
    """The masks that depend only on the geometry: each segment with its additive band pattern
    ``[count|1, Bq, chunk]`` (one shared ``[Bq, chunk]`` in the interior), and the sink columns' pattern
    ``[nb, Bq, s]`` (None without sinks)."""
    nb = -(-n // bq)
    bands = []
    for seg in _segments(n, nb, bq, left, right):
        # block b = start + t, row r is query i = b·Bq + r; column col is key j = offset + t·step + col
        t = torch.arange(seg.stop - seg.start if seg.step != bq else 1, device=device).view(-1, 1, 1)
        r = torch.arange(bq, device=device).view(1, bq, 1)
        col = torch.arange(seg.chunk, device=device).view(1, 1, seg.chunk)
        dist = (seg.offset - seg.start * bq) + t * (seg.step - bq) + col - r                # j - i
        bands.append((seg, _additive((dist >= -left) & (dist <= right), dtype)))
    sink = None
    if s:
        # a sink the band already covers is not counted twice (causal: nor one after the query)
        i = torch.arange(nb * bq, device=device).view(nb, bq, 1)
        js = torch.arange(s, device=device).view(1, 1, s)
        sink = _additive((js < i - left) if causal else (js < i - left) | (js > i + right), dtype)
    return tuple(bands), sink


_cached_patterns = functools.lru_cache(maxsize=16)(_build_patterns)

#: geometry masks up to this many elements (2 MiB in fp32) are kept for the next call of the same shape
#: (every layer of a model shares them): building them is a dozen small operations, each a hand-off between
#: threads that costs milliseconds on a busy CPU
_CACHE_ELEMENTS = 1 << 19


def _patterns(c: _layout.Canon, n: int, bq: int, left: int, right: int, s: int, causal: bool) -> tuple:
    """``_build_patterns`` for this call, from a small cache when the sizes are plain numbers (not while
    tracing or on fake tensors)."""
    args = (n, bq, left, right, s, causal, c.q.dtype, c.q.device)
    size = (left + right + 4 * bq) * (bq + left + right) + (n + bq) * s      # the masks' elements, at most
    if (size <= _CACHE_ELEMENTS and all(isinstance(x, int) for x in args[:4]) and not _layout.has_no_data(c.q)
            and not torch.compiler.is_compiling()):
        with torch.inference_mode(False):   # usable later outside inference mode too
            return _cached_patterns(*args)
    return _build_patterns(*args)


class SlidingWindowAttention(_base.SDPAMixer):
    """SDPA-signature sliding-window attention; ``causal`` fixes the causal band (the site was proven causal)."""

    __name__ = "sliding_window_attention"

    def __init__(self, window: int = 256, sinks: int = 0, causal: bool = False, reach: Optional[tuple] = None):
        super().__init__()
        self.window, self.sinks, self.causal = int(window), int(sinks), bool(causal)
        #: (left, right) keys around each query, given as such (an exact band site), instead of from ``window``
        self.reach = None if reach is None else (int(reach[0]), int(reach[1]))

    def _config(self) -> dict:
        return {"window": self.window, "sinks": self.sinks, "causal": self.causal, "reach": self.reach}

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        c = _layout.canon(q, k, v, attn_mask, scale)
        n, nk = c.dims[3], c.dims[4]
        if n != nk:
            raise ValueError(f"SlidingWindowAttention needs as many queries as keys (got {n} and {nk}); "
                             "cross-attention and KV-cache decoding are declined by its handler")
        causal = self.causal or bool(is_causal)
        left, right = self.reach or _reach(self.window, causal)
        left, right = min(left, n - 1), min(right, n - 1)
        s = min(self.sinks, n)
        p = float(dropout_p or 0.0)
        out = self._kernel(c, left, right, s, causal, p)
        if out is not None:
            return c.finish(out)
        bq = _block(left, right)
        if n <= bq + left + right:
            out = self._dense(c, left, right, s, causal, p)
        else:
            out = self._banded(c, bq, left, right, s, causal, p)
        return c.finish(out)

    @staticmethod
    def _kernel(c: _layout.Canon, left: int, right: int, s: int, causal: bool, p: float):
        """The band on the Triton block-sparse kernel (``[Bf, Hkv, G, N, Dv]``), or None where the kernel would
        not compute this call exactly (then the PyTorch path runs; see the module docstring)."""
        from ..kernels._common import interpret_mode, mixer_kernels
        if not mixer_kernels(c.q):
            return None
        bf, hkv, g, n, _, dd, dv = c.dims
        if p > 0.0 or c.q.dtype == torch.float64 or max(dd, dv) > 256:
            return None          # no dropout in the kernel; fp64 / wide heads are not kernel shapes
        servable, mask = _dense.kernel_key_mask(c)
        if not servable:
            return None
        from ..kernels.block_sparse_attention import band_block_mask, block_sparse_attention
        block = 16 if interpret_mode() else (32 if left + right < 64 else 64)
        bmask = band_block_mask(n, n, block, block, left, right, s, device=c.q.device)
        q, k, v = c.kernel_qkv()
        out = block_sparse_attention(q.reshape(bf, hkv * g, n, dd), k, v, bmask, block, attn_mask=mask,
                                     is_causal=causal, scale=c.scale, window=(left, right), sinks=s)
        out = out.view(bf, hkv, g, n, dv)
        if s and not causal:     # global sink queries see every key: a small dense SDPA for those rows
            sink = _layout.Canon(c.q[..., :s, :], c.k, c.v, _dense.bias_rows(c.bias, slice(0, s)), c.scale, (), c.out_dtype,
                           c.mask_floor)
            out = torch.cat([_dense.sdpa_rows(sink, c.k, c.v, sink.bias).to(out.dtype), out[..., s:, :]], dim=-2)
        return out

    @staticmethod
    def _dense(c: _layout.Canon, left: int, right: int, s: int, causal: bool, p: float) -> torch.Tensor:
        """One chunk would hold every key: SDPA over all keys with the band (and sinks) as a mask."""
        n, dev, dt = c.dims[3], c.q.device, c.q.dtype

        def band(rows: slice) -> torch.Tensor:
            i = torch.arange(rows.start, rows.stop, device=dev).view(-1, 1)
            j = torch.arange(n, device=dev).view(1, -1)
            keep = (j >= i - left) & (j <= i + right)
            if s:
                keep = keep | ((j < s) & (j <= i)) if causal else keep | (j < s) | (i < s)
            return _additive(keep, dt)

        return _dense.sdpa_rows(c, c.k, c.v, c.bias, extra=band, dropout_p=p)

    def _banded(self, c: _layout.Canon, bq: int, left: int, right: int, s: int, causal: bool, p: float) -> torch.Tensor:
        bf, hkv, g, n, _, dd, dv = c.dims
        bh, dev = bf * hkv, c.q.device
        nb = -(-n // bq)
        npad, rows = nb * bq, g * bq

        # queries [Bf·Hkv, nb, G·Bq, D]: each block is a "head" of the SDPA calls (the G query heads sharing a
        # kv head stack their rows, so one chunk of keys serves them all)
        qp = c.q if npad == n else F.pad(c.q, (0, 0, 0, npad - n))
        qb = qp.reshape(bf, hkv, g, nb, bq, dd).transpose(2, 3).reshape(bh, nb, rows, dd)
        # keys and values [Bf·Hkv, N, D] as they are: each segment's chunks are strided views of them
        k, v = (t.reshape(bh, n, t.shape[-1]) for t in (c.k, c.v))
        k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
        bands, sink = _patterns(c, n, bq, left, right, s, causal)
        segments = [(seg, self._mask(c, seg, band, bq)) for seg, band in bands]
        sink_mask = self._sink_mask(c, sink, n, nb, bq) if s else None

        fused = (s and p == 0.0 and dd == dv and _FLASH_CPU is not None and dev.type == "cpu"
                 and not (torch.is_grad_enabled() and (c.q.requires_grad or c.k.requires_grad
                                                        or c.v.requires_grad)))
        if fused:
            out = self._merge_sinks(c, qb, k, v, segments, sink_mask)
        else:
            outs = []
            for seg, mask in segments:
                qs, ks, vs = qb[:, seg.start:seg.stop], seg.windows(k), seg.windows(v)
                if s:  # the sink keys prepended to every chunk (a copy), so one differentiable call sees them
                    count = seg.stop - seg.start
                    ks = torch.cat([k[:, None, :s].expand(bh, count, s, dd), ks], dim=2)
                    vs = torch.cat([v[:, None, :s].expand(bh, count, s, dv), vs], dim=2)
                    sm = sink_mask[:, seg.start:seg.stop]
                    lead = torch.broadcast_shapes(sm.shape[:2], mask.shape[:2])
                    mask = torch.cat([sm.expand(*lead, rows, s), mask.expand(*lead, rows, mask.shape[-1])], -1)
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=p, scale=c.scale))
            out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        out = out.reshape(bf, hkv, nb, g, bq, dv).transpose(2, 3).reshape(bf, hkv, g, npad, dv)[..., :n, :]

        if s and not causal:
            # global sink queries see every key
            sink = _layout.Canon(c.q[..., :s, :], c.k, c.v, _dense.bias_rows(c.bias, slice(0, s)), c.scale, (), c.out_dtype,
                           c.mask_floor)
            rows_out = _dense.sdpa_rows(sink, c.k, c.v, sink.bias, dropout_p=p)
            if fused:  # ``out`` is a buffer of our own that nothing differentiates through
                out[..., :s, :] = rows_out
            else:
                out = torch.cat([rows_out, out[..., s:, :]], dim=-2)
        return out

    @staticmethod
    def _mask(c: _layout.Canon, seg: _Segment, band: torch.Tensor, bq: int) -> torch.Tensor:
        """A segment's band pattern ``[count|1, Bq, chunk]`` plus the site's mask there, as the SDPA mask
        ``[1|Bf·Hkv, count|1, G·Bq, chunk]`` of its blocks (rows of the G heads stacked)."""
        bf, hkv, g = c.dims[:3]
        chunk, count = seg.chunk, seg.stop - seg.start
        if c.bias is None:
            return band.unsqueeze(1).expand(-1, g, bq, chunk).reshape(1, -1, g * bq, chunk)
        mask = band.unsqueeze(1) + seg.bias_windows(c.bias, bq)             # [Bm, Hm, count, Gm, Bq|1, chunk]
        bm, hm = mask.shape[:2]
        if bm * hm == 1:
            return mask.expand(1, 1, count, g, bq, chunk).reshape(1, count, g * bq, chunk)
        return mask.expand(bf, hkv, count, g, bq, chunk).reshape(bf * hkv, count, g * bq, chunk)

    def _sink_mask(self, c: _layout.Canon, sink: torch.Tensor, n: int, nb: int, bq: int) -> torch.Tensor:
        """The sink columns' pattern ``[nb, Bq, s]`` plus the site's mask on those columns, as the mask
        ``[1|Bf·Hkv, nb, G·Bq, s]`` of the sink scores."""
        bf, hkv, g = c.dims[:3]
        s = sink.shape[-1]
        if c.bias is not None:
            mask = sink.view(nb, 1, bq, s) + self._rows_by_block(c.bias[..., :s], n, nb, bq)  # [Bm, Hm, nb, Gm, Bq|1, s]
        else:
            mask = sink.view(1, 1, nb, 1, bq, s)
        bm, hm = mask.shape[:2]
        if bm * hm == 1:
            return mask.expand(1, 1, nb, g, bq, s).reshape(1, nb, g * bq, s)
        return mask.expand(bf, hkv, nb, g, bq, s).reshape(bf * hkv, nb, g * bq, s)

    @staticmethod
    def _merge_sinks(c: _layout.Canon, qb, k, v, segments, sink_mask) -> torch.Tensor:
        """Fused banded attention per segment, then the sink columns merged in through each row's
        log-sum-exp (the kernel's second output)."""
        bh, nb, rows, dd = qb.shape
        s, dv = sink_mask.shape[-1], v.shape[-1]
        outs, lses = [], []
        for seg, mask in segments:
            out, lse = _FLASH_CPU(qb[:, seg.start:seg.stop], seg.windows(k), seg.windows(v), attn_mask=mask,
                                  scale=c.scale)
            if c.bias is not None:
                # the kernel gives a row whose band is all masked out a log-sum-exp of 0: make it -inf
                lse = lse.masked_fill(~(mask > _layout.NEG_INF).any(-1), _layout.NEG_INF)
            outs.append(out)
            lses.append(lse)
        lse = (torch.cat(lses, dim=1) if len(lses) > 1 else lses[0]).unsqueeze(-1)          # [Bf·Hkv, nb, G·Bq, 1]
        ss = torch.baddbmm(sink_mask.reshape(-1, nb * rows, s), qb.reshape(bh, nb * rows, dd),
                           k[:, :s].transpose(1, 2), alpha=c.scale).view(bh, nb, rows, s)  # sink scores
        merged = torch.empty(bh, nb, rows, dv, dtype=qb.dtype, device=qb.device)
        if s == 1:
            # the sink's share of the row's probability mass: out + share·(v_sink - out)
            share = torch.sub(ss, lse).sigmoid_()
            if c.bias is not None:  # a row that sees no key at all (both -inf) gives 0
                share = share.nan_to_num_(0.0)
            vsink = v[:, :1].view(bh, 1, 1, dv)
            for (seg, _), out in zip(segments, outs):
                torch.lerp(out, vsink, share[:, seg.start:seg.stop], out=merged[:, seg.start:seg.stop])
            return merged
        total = torch.logaddexp(lse, torch.logsumexp(ss, -1, keepdim=True))
        a, ps = (lse - total).exp_().nan_to_num_(0.0), (ss - total).exp_().nan_to_num_(0.0)
        for (seg, _), out in zip(segments, outs):
            torch.mul(out, a[:, seg.start:seg.stop], out=merged[:, seg.start:seg.stop])
        return merged.view(bh, nb * rows, dv).baddbmm_(ps.view(bh, nb * rows, s), v[:, :s]).view(bh, nb, rows, dv)

    @staticmethod
    def _rows_by_block(b: torch.Tensor, n: int, nb: int, bq: int) -> torch.Tensor:
        """A bias ``[Bm, Hm, Gm, Nqm, C]`` laid out as ``[Bm, Hm, nb|1, Gm, Bq|1, C]`` for the block scores."""
        bm, hm, gm, nqm, cols = b.shape
        if nqm == 1:
            return b.view(bm, hm, 1, gm, 1, cols)
        b = F.pad(b, (0, 0, 0, nb * bq - n))
        return b.view(bm, hm, gm, nb, bq, cols).transpose(2, 3)


def banded_flops(left: int, right: int) -> sympy.Expr:
    """``banded_attention``'s FLOPs: each query block scores a chunk of ``Bq + left + right`` keys."""
    return _layout.attention_flops(N, sympy.Min(_block(left, right) + left + right, Nk))


@functools.lru_cache(maxsize=64)
def _band_module(left: int, right: int) -> SlidingWindowAttention:
    return SlidingWindowAttention(reach=(left, right))


def banded_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                     band=(0, 0)):
    """Exact attention where query ``i`` sees keys ``i - left .. i + right`` (``band = (left, right)``), with
    ``attn_mask`` applied inside the band: what SDPA computes with the band folded into its mask, in O(n·(left +
    right)) time and memory (the query blocks above). A row whose every key in the band is masked with −∞ is NaN,
    as the softmax over it is. The lowering of an exact site whose scores a band fill masks (``SiteCall.band``,
    e.g. Longformer's local attention read by ``passes/band.py``).

    Example::

        out = banded_attention(q, k, v, attn_mask=key_padding_bias, band=(256, 256))
    """
    if is_causal:
        raise ValueError("banded_attention takes the band alone; give a causal band as band=(left, 0)")
    left, right = int(band[0]), int(band[1])
    out = _band_module(left, right)(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                                    enable_gqa=enable_gqa)
    dead = _band_dead_rows(attn_mask, q.shape[-2], left, right)
    return out if dead is None else out.masked_fill(dead, float("nan"))


def _band_dead_rows(mask, n: int, left: int, right: int):
    """``[..., n, 1]``: rows whose keys in the band are all removed by ``mask`` (−∞, or False), or None (no such row
    can be: no mask, or nothing removed; on CPU, where the check is free of a device sync)."""
    from torch._subclasses.fake_tensor import is_fake
    if mask is None or (mask.device.type == "cpu" and not is_fake(mask)
                        and not bool((~mask if mask.dtype == torch.bool else torch.isneginf(mask)).any())):
        return None
    kept = (mask if mask.dtype == torch.bool else ~torch.isneginf(mask)).to(torch.int32)
    nk = kept.shape[-1]
    seen = F.pad(kept.cumsum(-1), (1, 0))                                  # [..., rows, nk + 1]: keys kept before j
    i = torch.arange(n, device=kept.device)
    hi = (i + right).clamp(max=nk - 1) + 1
    lo = (i - left).clamp(min=0)
    if kept.shape[-2] == 1:
        count = seen[..., hi] - seen[..., lo]                               # [..., 1, n]
        return (count == 0).transpose(-1, -2)
    lead = seen.shape[:-2]
    hi_idx, lo_idx = (x.view(n, 1).expand(*lead, n, 1) for x in (hi, lo))
    return (seen.gather(-1, hi_idx) - seen.gather(-1, lo_idx)) == 0


@register_handler(SlidingWindow)
def sliding_window_handler(action: SlidingWindow, call, site):
    return SlidingWindowAttention(action.window, action.sinks, causal=_base.site_causal(call, site))
