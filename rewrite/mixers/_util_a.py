"""Shared pieces of the sparse / routed / biased softmax mixers.

Used by ``sliding_window``, ``top_k``, ``block_routing``, ``kmeans_routing``, ``token_merge`` and ``decay``.
Every mixer takes SDPA's arguments and first brings them to one *canonical grouped layout*:

* ``q``    ``[Bf, Hkv, G, Nq, D]``   (``G = Hq // Hkv`` query heads share each kv head: GQA without repeats)
* ``k, v`` ``[Bf, Hkv, Nk, D]``
* ``bias`` additive float mask ``[Bm, Hm, Gm, Nqm, Nk]`` with ``Bm ∈ {1, Bf}``, ``Hm ∈ {1, Hkv}``,
  ``Gm ∈ {1, G}``, ``Nqm ∈ {1, Nq}`` (never expanded beyond what the caller gave), or ``None``.

Inputs in half precision are computed in float32 and cast back, as the output of SDPA has q's dtype; the
Triton kernel paths take them in their own dtype (``kernel_dtype``).
Rows that see no key at all give 0, as SDPA does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional

import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..actions import Decline, RewriteError
from ..cost import SOFTMAX_FLOPS_PER_SCORE, B, H, d, dv

NEG_INF = float("-inf")

#: per (batch·head) row chunk, scores kept at most this many elements at once by the dense mixers
ROW_CHUNK_ELEMENTS = 1 << 23


def attention_flops(queries, keys) -> sympy.Expr:
    """FLOPs of softmax attention where each of ``queries`` rows (per batch·head) scores ``keys`` keys."""
    return B * H * queries * keys * (2 * d + 2 * dv + SOFTMAX_FLOPS_PER_SCORE)


def is_fake(t: torch.Tensor) -> bool:
    """True for the fake tensors the rewriter uses to infer output shapes (no data to look at)."""
    try:
        from torch._subclasses.fake_tensor import is_fake as _is_fake
        return bool(_is_fake(t))
    except Exception:  # pragma: no cover
        return False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_dtype(dtype: torch.dtype, fp16: bool = True) -> torch.dtype:
    """The dtype a mixer hands the Triton kernels for inputs of ``dtype``: a half model's own dtype (its
    tensor-core dots read half the bytes; the kernels accumulate in fp32 anyway), else ``compute_dtype``.
    ``fp16=False`` for exponential features (FAVOR+): fp16 flushes their small entries to zero, so a key
    whose features are all small would vanish for the queries that see only it; bf16 has fp32's range."""
    if dtype == torch.bfloat16 or (dtype == torch.float16 and fp16):
        return dtype
    return compute_dtype(dtype)


@dataclasses.dataclass
class Canon:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float
    out_shape: tuple
    out_dtype: torch.dtype
    mask_floor: float          # additive values at or below this count as "masked" (HF uses finfo.min)

    @property
    def dims(self) -> tuple:
        bf, hkv, g, nq, dd = self.q.shape
        return bf, hkv, g, nq, self.k.shape[-2], dd, self.v.shape[-1]

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """``[Bf, Hkv, G, Nq, Dv]`` back to SDPA's output shape and dtype."""
        return out.reshape(self.out_shape).to(self.out_dtype)

    def kernel_qkv(self) -> tuple:
        """``(q, k, v)`` in ``kernel_dtype``: half inputs go back to their own dtype (exact, ``canon`` only
        widened them)."""
        dt = kernel_dtype(self.out_dtype)
        return tuple(t.to(dt) for t in (self.q, self.k, self.v))


def canon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
          scale: Optional[float]) -> Canon:
    """Bring SDPA arguments (any leading batch dims, GQA, bool or additive mask) to the grouped layout."""
    if min(q.dim(), k.dim(), v.dim()) < 3 or (3 in (q.dim(), k.dim(), v.dim()) and
                                               not q.dim() == k.dim() == v.dim() == 3):
        raise ValueError(f"expected q, k, v as [..., H, N, D] (or all three as [B, N, D]); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    cdt = compute_dtype(q.dtype)
    headless = q.dim() == 3
    if headless:  # (b h) n d: one head per batch entry
        q, k, v = q.unsqueeze(-3), k.unsqueeze(-3), v.unsqueeze(-3)
        if attn_mask is not None and attn_mask.dim() >= 3:
            attn_mask = attn_mask.unsqueeze(-3)
    lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    hq, hkv, nq, nk, dd = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1]
    if v.shape[-3] != hkv or v.shape[-2] != nk:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or length")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    g = hq // hkv
    bf = math.prod(lead) if lead else 1
    out_shape = (*lead, nq, v.shape[-1]) if headless else (*lead, hq, nq, v.shape[-1])

    def flat(t, h, n):
        t = t.expand(*lead, h, n, t.shape[-1]) if tuple(t.shape[:-3]) != tuple(lead) else t
        return t.reshape(bf, h, n, t.shape[-1]).to(cdt)

    qf = flat(q, hq, nq).view(bf, hkv, g, nq, dd)
    kf, vf = flat(k, hkv, nk), flat(v, hkv, nk)
    if scale is None:
        scale = 1.0 / math.sqrt(dd)
    bias, floor = None, NEG_INF
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=cdt, device=attn_mask.device).masked_fill_(~attn_mask, NEG_INF)
        else:
            floor = torch.finfo(attn_mask.dtype).min / 2 if attn_mask.dtype.is_floating_point else NEG_INF
            bias = attn_mask.to(cdt)
        nd = len(lead) + 3
        if bias.dim() > nd:
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} has more dims than the attention scores")
        bias = bias.reshape((1,) * (nd - bias.dim()) + tuple(bias.shape))
        mlead, mh, mq, mk = bias.shape[:-3], bias.shape[-3], bias.shape[-2], bias.shape[-1]
        if mk != nk:
            bias = bias.expand(*bias.shape[:-1], nk)
        if all(s == 1 for s in mlead):
            bias = bias.reshape(1, mh, mq, nk)
        else:
            bias = bias.expand(*lead, mh, mq, nk).reshape(bf, mh, mq, nk)
        if mh == 1:
            bias = bias.view(bias.shape[0], 1, 1, mq, nk)
        elif mh == hq:
            bias = bias.reshape(bias.shape[0], hkv, g, mq, nk)
        else:
            raise ValueError(f"attn_mask heads ({mh}) broadcast neither to 1 nor to {hq} query heads")
        if mq not in (1, nq):
            raise ValueError(f"attn_mask query length {mq} is neither 1 nor {nq}")
    return Canon(qf, kf, vf, bias, float(scale), out_shape, q.dtype, floor)


def safe_softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax whose rows with no finite score give zeros (SDPA's convention), not NaN."""
    if not (scores.requires_grad and torch.is_grad_enabled()):
        # fused softmax; a row of -inf gives NaN, which becomes 0 (this path is never differentiated)
        return torch.softmax(scores, dim=dim).nan_to_num_(0.0)
    mx = scores.amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(scores - mx)
    s = e.sum(dim=dim, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def dropout(p: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SDPA applies ``dropout_p`` to the probabilities whatever the module mode; so do we."""
    if dropout_p and dropout_p > 0:
        return F.dropout(p, float(dropout_p), training=True)
    return p


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q [..., G, R, D]`` against ``k [..., Nk, D]`` → ``[..., G, R, Nk]`` without repeating k over G."""
    *lead, g, r, dd = q.shape
    return (q.reshape(*lead, g * r, dd) @ k.transpose(-1, -2)).view(*lead, g, r, k.shape[-2])


def grouped_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p [..., G, R, Nk]`` times ``v [..., Nk, Dv]`` → ``[..., G, R, Dv]``."""
    *lead, g, r, nk = p.shape
    return (p.reshape(*lead, g * r, nk) @ v).view(*lead, g, r, v.shape[-1])


def bias_rows(bias: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    """The rows ``rows`` of a canonical bias (a bias with one query row serves every row)."""
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., rows, :]


def row_chunks(c: Canon, per_row: Optional[int] = None) -> Iterator[slice]:
    """Query-row slices small enough that one chunk's dense scores (or ``per_row`` elements a row) stay
    under ``ROW_CHUNK_ELEMENTS``."""
    bf, hkv, g, nq, nk, _, _ = c.dims
    per_row = max(1, bf * hkv * g * nk if per_row is None else per_row)
    step = max(1, ROW_CHUNK_ELEMENTS // per_row)
    for start in range(0, nq, step):
        yield slice(start, min(nq, start + step))


def heads_mask(b: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    """A canonical bias ``[Bm, Hm, Gm, R, Nk]`` as an SDPA mask ``[Bm, 1|H, R, Nk]``."""
    bm, hm, gm, r, nk = b.shape
    if hm == 1 and gm == 1:
        return b.view(bm, 1, r, nk)
    return b.expand(bm, hkv, g, r, nk).reshape(bm, hkv * g, r, nk)


def sdpa_rows(c: Canon, keys: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor],
              extra=None, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Fused SDPA of every query of ``c`` against ``keys``/``values [Bf, Hkv, Nk', D]`` (GQA, no repeats).

    ``bias`` is canonical over the ``Nk'`` keys; ``extra(rows) -> [R, Nk']`` adds a per-chunk bias; ``causal``
    adds SDPA's top-left causal pattern. Rows go in chunks so a built mask stays under
    ``ROW_CHUNK_ELEMENTS``. Returns ``[Bf, Hkv, G, Nq, Dv]``.
    """
    bf, hkv, g, nq, _, dd, _ = c.dims
    nk, dv = keys.shape[-2], values.shape[-1]
    q = c.q.view(bf, hkv * g, nq, dd)
    gqa = g > 1
    if bias is None and extra is None and (not causal or nq == nk):
        out = F.scaled_dot_product_attention(q, keys, values, dropout_p=float(dropout_p or 0.0),
                                             is_causal=bool(causal), scale=c.scale, enable_gqa=gqa)
        return out.view(bf, hkv, g, nq, dv)
    mask_heads = 1 if bias is None else bias.shape[0] * bias.shape[1] * bias.shape[2]
    outs = []
    for rows in row_chunks(c, per_row=mask_heads * nk):
        mask = None if bias is None else heads_mask(bias_rows(bias, rows), hkv, g)
        if extra is not None:
            e = extra(rows).to(q.dtype)
            mask = e if mask is None else mask + e
        if causal:
            keep = causal_keep(rows, nq, nk, q.device)
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, NEG_INF) \
                if mask is None else mask.masked_fill(~keep, NEG_INF)
        outs.append(F.scaled_dot_product_attention(q[..., rows, :], keys, values, attn_mask=mask,
                                                   dropout_p=float(dropout_p or 0.0), scale=c.scale,
                                                   enable_gqa=gqa))
    out = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
    return out.view(bf, hkv, g, nq, dv)


def causal_keep(rows: slice, nq: int, nk: int, device) -> torch.Tensor:
    """Top-left aligned causal pattern (SDPA's ``is_causal``): key j visible to query i iff j <= i."""
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i


def gather_bias(bias: torch.Tensor, full: tuple, rows: Optional[torch.Tensor], cols: torch.Tensor) -> torch.Tensor:
    """``bias[..., rows[...,r], cols[...,r,c]]`` for index tensors shaped like the scores they feed.

    ``bias`` is canonical ``[Bm, Hm, Gm, Nqm, Nk]``; ``full`` = ``(Bf, Hkv, G)``; ``rows`` broadcasts to
    ``[Bf, Hkv, G, *S, R, 1]`` (ignored when the bias has one query row) and ``cols`` to
    ``[Bf, Hkv, G, *S, R|1, C]``. The result has the broadcast shape of ``cols`` and ``rows`` and never holds
    more than that many elements (the bias itself is not expanded).
    """
    nqm, nk = bias.shape[-2], bias.shape[-1]
    flat = bias.contiguous().view(*bias.shape[:3], nqm * nk).expand(*full, nqm * nk)
    index = cols if nqm == 1 or rows is None else rows * nk + cols
    index = index.expand(*full, *index.shape[3:])
    return torch.gather(flat, -1, index.reshape(*full, -1)).view(index.shape)


def check_int(action, name: str, value, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RewriteError(f"{type(action).__name__}({name}={value!r}) is invalid: {name} must be an integer "
                           f">= {minimum}. {fix}")


def check_choice(action, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise RewriteError(f"{type(action).__name__}({name}={value!r}) is invalid: use one of "
                           f"{', '.join(repr(c) for c in choices)}.")


def site_lengths(site) -> tuple:
    """(Nq, Nk) of a site as ints (the captured values of symbolic lengths), or None where unknown. For
    messages and checks only: reading them adds no guard, so a dynamic graph is not pinned to one length."""
    from ..graph import hint_int
    qs, ks = tuple(getattr(site, "q_shape", ()) or ()), tuple(getattr(site, "k_shape", ()) or ())
    return (hint_int(qs[-2]) if len(qs) >= 2 else None), (hint_int(ks[-2]) if len(ks) >= 2 else None)


def is_cross(site) -> bool:
    """Nq may differ from Nk at this site (cross-attention or KV-cache decoding): the lengths are not the
    same size for every input. Decided without guards (``int()`` of a symbolic length would specialise the
    graph to it and recompile it at every new length)."""
    if getattr(site, "cross", False):
        return True
    from ..graph import same_size
    qs, ks = tuple(getattr(site, "q_shape", ()) or ()), tuple(getattr(site, "k_shape", ()) or ())
    if len(qs) < 2 or len(ks) < 2 or qs[-2] is None or ks[-2] is None:
        return False
    return not same_size(qs[-2], ks[-2])


def decline_cross(site, needs: str) -> Optional[Decline]:
    """A Decline saying ``needs`` and the site's lengths when Nq may differ from Nk (``is_cross``), else None."""
    if not is_cross(site):
        return None
    nq, nk = site_lengths(site)
    return Decline(f"{needs}; this site has Nq={nq}, Nk={nk} (cross-attention or KV-cache decoding)")


def site_causal(call, site) -> bool:
    return bool(getattr(site, "is_causal", False) or getattr(call, "is_causal", False)
                or "causal" in str(getattr(site, "mask", "") or ""))


def site_grid(site) -> Optional[tuple]:
    """((gh, gw), prefix) when the site knows its vision grid, else None."""
    grid = getattr(site, "grid", None)
    if not grid:
        return None
    try:
        gh, gw = (int(x) for x in grid)
    except Exception:
        return None
    return (gh, gw), int(getattr(site, "prefix_tokens", 0) or 0)


class SDPAMixer(nn.Module):
    """Base of the mixer modules: SDPA's call signature.

    ``__name__`` lets the module be the target of an FX ``call_function`` node (FX names nodes by it).
    """

    __name__ = "sdpa_mixer"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config().items())

    def _config(self) -> dict:
        return {}


def resolve_grid_layout(what: str, layout: str, call, site):
    """Resolve a mixer's ``layout`` ("auto", "1d", "2d") against the site's vision grid.

    Returns ``(grid, prefix, causal)`` (``grid`` None for 1-D) or a :class:`Decline` saying why the 2-D
    form cannot serve the site: unknown grid, a causal site, or a grid that does not match its tokens.
    """
    grid = site_grid(site)
    causal = site_causal(call, site)
    if layout == "2d" and grid is None:
        return Decline(f"{what}(layout='2d') needs the site's vision grid (site.grid) and it is unknown here; "
                       "use layout='1d' or 'auto'")
    if layout == "auto":
        layout = "2d" if grid is not None and not causal else "1d"
    if layout != "2d":
        return None, 0, causal
    if causal:
        return Decline(f"{what} has no causal 2-D form; use {what}(layout='1d') at causal sites")
    (gh, gw), prefix = grid
    nq, _ = site_lengths(site)
    if nq is not None and nq != prefix + gh * gw:
        return Decline(f"the site's grid {gh}x{gw} with {prefix} prefix tokens does not match its {nq} tokens")
    return (gh, gw), prefix, False


def kernel_key_mask(c: Canon):
    """The site mask as the block-sparse kernel takes it: ``(True, None)`` without a mask, ``(True, [Bm,
    Hq|1, 1, N])`` for a key-padding mask (broadcast over queries in-kernel, clamped at the mask floor so that
    ``finfo.min`` masks stay finite in the kernel's log2 domain, as in SDPA), ``(False, None)`` for a
    per-query mask, which would reach the kernel as an N×N tensor: the caller keeps its PyTorch path."""
    if c.bias is None:
        return True, None
    bm, hm, gm, rows, nk = c.bias.shape
    if rows != 1:
        return False, None
    return True, c.bias.reshape(bm, hm * gm, 1, nk).clamp(min=c.mask_floor)
