"""Exact softmax attention in the grouped layout, row chunk by row chunk: what the sparse and routed mixers
build on (scores against chosen keys, SDPA over chunks with a mask, bias gathers) and the exact fallback.
Rows that see no key at all give 0, as SDPA does.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ._layout import NEG_INF, Canon, expand_kv, has_no_data, resolve_scale
from ._masks import causal_allowed, to_additive

#: per (batch·head) row chunk, scores kept at most this many elements at once by the dense mixers
ROW_CHUNK_ELEMENTS = 1 << 23


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
    """The causal pattern (SDPA's top-left ``is_causal``) for the query rows ``rows``."""
    return causal_allowed(nq, nk, 0, device)[rows]


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


def exact_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Exact SDPA, for a call a mixer cannot serve faithfully (``attn_mask`` and ``is_causal`` both honoured)."""
    if attn_mask is not None and is_causal:
        nq, nk = q.shape[-2], k.shape[-2]
        attn_mask = to_additive(attn_mask, q.dtype).masked_fill(~causal_allowed(nq, nk, 0, q.device), float("-inf"))
        is_causal = False
    if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k, v = expand_kv(q, k, v)
    scale = None if scale is None else resolve_scale(scale, q.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=float(dropout_p or 0.0),
                                          is_causal=bool(is_causal), scale=scale)


#: the CPU fused kernel that also returns each row's log-sum-exp: the routed mixers run their kept keys on it
#: and merge other keys (sinks, pooled blocks, a query's own key) in through that log-sum-exp
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def cpu_inference(c: Canon, dropout_p) -> bool:
    """Whether a CPU kernel op without autograd may serve this call: CPU, fp32, no dropout, nothing to
    differentiate. Traced calls included: the C++ kernels of ``rewrite.kernels`` are ops with fake
    implementations, so a compiled model keeps them as nodes. Elsewhere the mixers keep their differentiable path."""
    return (c.q.device.type == "cpu" and not dropout_p and c.q.dtype == torch.float32
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (c.q, c.k, c.v))))


def eager_cpu_inference(c: Canon, dropout_p) -> bool:
    """``cpu_inference`` on real tensors outside compiler tracing: for CPU paths that are not single ops (loops
    over ``.tolist()`` sizes)."""
    return cpu_inference(c, dropout_p) and not has_no_data(c.q) and not torch.compiler.is_compiling()


def flash_cpu_serves(c: Canon, dropout_p) -> bool:
    """Whether ``FLASH_CPU`` with a log-sum-exp merge serves this call: ``eager_cpu_inference`` (the kernel's
    log-sum-exp has no gradient) with equal q/v head dims (the kernel's)."""
    return FLASH_CPU is not None and c.q.shape[-1] == c.v.shape[-1] and eager_cpu_inference(c, dropout_p)

