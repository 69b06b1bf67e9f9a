"""``rewrite::block_sparse_attention``: flash-style attention restricted to the kept blocks of a block mask.

Ops (``torch.ops.rewrite.<name>`` after ``import rewrite.kernels``):

* ``block_sparse_attention(q, k, v, block_mask, block_size_q=64, block_size_k=64, attn_mask=None,
  is_causal=False, scale=None, window_left=-1, window_right=-1, sinks=0) -> Tensor`` -- public,
  CompositeImplicitAutograd (traced down to the kernel op);
* ``block_sparse_attention_fwd(...) -> (out, lse)`` -- kernel op with fake impl and autograd;
* ``block_sparse_attention_bwd(...) -> (dq, dk, dv)``.

``block_mask``: bool [B or 1, H or 1, ceil(Nq / block_size_q), ceil(Nk / block_size_k)]; see ``masks.py`` for
builders (sliding window, fixed patterns, top-k block routing, from a dense mask). Inside kept blocks the
optional ``attn_mask`` (additive or boolean) and a top-left causal mask apply. GQA is native (Hq a multiple of
Hkv). Rows with no admissible key give 0. On the Triton path block sizes must be powers of two >= 16; the
reference (CPU) path takes any block size. Gradients flow to q, k, v (not to the masks).

Optional token-level band, applied in-kernel (no [Nq, Nk] mask is built): with ``window_left >= 0`` key ``j``
is admissible for query ``i`` only if ``j >= i - window_left``, with ``window_right >= 0`` only if
``j <= i + window_right`` (a negative value leaves that side unbounded), and the first ``sinks`` keys are
admissible whatever the band says. The band is ANDed with the block mask, ``attn_mask`` and causal masking,
so pass a block mask covering the blocks the band (and the sink columns) touch, e.g. ``band_block_mask``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._common import use_triton
from .masks import (band_block_mask, block_mask_from_dense, causal_block_mask, fixed_block_mask, kept_fraction, num_blocks,
                    sliding_window_block_mask, topk_block_mask)
from .reference import block_sparse_reference, block_sparse_reference_backward, expand_block_mask

__all__ = ["block_sparse_attention", "band_block_mask", "block_sparse_reference", "expand_block_mask", "sliding_window_block_mask",
           "fixed_block_mask", "topk_block_mask", "block_mask_from_dense", "causal_block_mask", "kept_fraction",
           "num_blocks"]


@torch.library.custom_op("rewrite::block_sparse_attention_fwd", mutates_args=())
def block_sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                               attn_mask: Optional[torch.Tensor], block_size_q: int, block_size_k: int,
                               is_causal: bool, scale: float, window_left: int = -1, window_right: int = -1,
                               sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    window = _window(window_left, window_right)
    if use_triton(q):
        from . import triton as _kernels
        return _kernels.bs_fwd(q, k, v, block_mask, attn_mask, block_size_q, block_size_k, is_causal, scale,
                               window, sinks)
    out, lse = block_sparse_reference(q, k, v, block_mask, block_size_q, block_size_k, attn_mask, is_causal, scale,
                                      return_lse=True, window=window, sinks=sinks)
    return out.contiguous(), lse.contiguous()


def _window(left: int, right: int):
    """(left, right) of the band, or None when neither side is bounded (sinks alone then change nothing)."""
    return None if left < 0 and right < 0 else (int(left), int(right))


@block_sparse_attention_fwd.register_fake
def _(q, k, v, block_mask, attn_mask, block_size_q, block_size_k, is_causal, scale, window_left=-1,
      window_right=-1, sinks=0):
    B, H, Nq, _ = q.shape
    return q.new_empty((B, H, Nq, v.shape[3])), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("rewrite::block_sparse_attention_bwd", mutates_args=())
def block_sparse_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, block_mask: torch.Tensor,
                               attn_mask: Optional[torch.Tensor], block_size_q: int, block_size_k: int,
                               is_causal: bool, scale: float, window_left: int = -1, window_right: int = -1,
                               sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    window = _window(window_left, window_right)
    if use_triton(q):
        from . import triton as _kernels
        return _kernels.bs_bwd(grad_out, q, k, v, out, lse, block_mask, attn_mask, block_size_q, block_size_k,
                               is_causal, scale, window, sinks)
    return block_sparse_reference_backward(grad_out, q, k, v, block_mask, block_size_q, block_size_k, attn_mask,
                                           is_causal, scale, window=window, sinks=sinks)


@block_sparse_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, block_mask, attn_mask, block_size_q, block_size_k, is_causal, scale,
      window_left=-1, window_right=-1, sinks=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, block_mask, attn_mask, bq, bk, is_causal, scale = inputs[:9]
    band = tuple(inputs[9:]) + (-1, -1, 0)[len(inputs) - 9:]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_mask, attn_mask)
    ctx.bq, ctx.bk, ctx.is_causal, ctx.scale, ctx.band = bq, bk, is_causal, scale, band


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, block_mask, attn_mask = ctx.saved_tensors
    dq, dk, dv = block_sparse_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, block_mask, attn_mask,
                                            ctx.bq, ctx.bk, ctx.is_causal, ctx.scale, *ctx.band)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


block_sparse_attention_fwd.register_autograd(_backward, setup_context=_setup_context)

_lib = torch.library.Library("rewrite", "FRAGMENT")
_lib.define(
    "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_mask, int block_size_q=64, "
    "int block_size_k=64, Tensor? attn_mask=None, bool is_causal=False, float? scale=None, "
    "int window_left=-1, int window_right=-1, int sinks=0) -> Tensor"
)


def _composite(q, k, v, block_mask, block_size_q=64, block_size_k=64, attn_mask=None, is_causal=False, scale=None,
               window_left=-1, window_right=-1, sinks=0):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("block_sparse_attention expects q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]")
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hq % Hkv or k.shape[3] != D or v.shape[:3] != k.shape[:3] or k.shape[0] != B:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    bm = block_mask
    while bm.dim() < 4:
        bm = bm.unsqueeze(0)
    want = (num_blocks(Nq, block_size_q), num_blocks(Nk, block_size_k))
    if tuple(bm.shape[-2:]) != want or bm.shape[0] not in (1, B) or bm.shape[1] not in (1, Hq):
        raise ValueError(f"block_mask {tuple(block_mask.shape)} does not fit [B|1, Hq|1, {want[0]}, {want[1]}]")
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("block_sparse_attention: attn_mask receives no gradient; detach it")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if sinks < 0:
        raise ValueError(f"block_sparse_attention: sinks must be >= 0, got {sinks}")
    if window_left < 0 and window_right < 0:
        window_left = window_right = -1
        sinks = 0          # no band: sinks change nothing
    out, _ = torch.ops.rewrite.block_sparse_attention_fwd(q, k, v, bm.bool(), attn_mask, int(block_size_q),
                                                          int(block_size_k), bool(is_causal), float(scale),
                                                          int(window_left), int(window_right), int(sinks))
    return out


_lib.impl("block_sparse_attention", _composite, "CompositeImplicitAutograd")


def block_sparse_attention(q, k, v, block_mask, block_size=64, attn_mask=None, is_causal=False, scale=None,
                           window=None, sinks=0):
    """Block-sparse attention. ``block_size`` is an int or a (block_q, block_k) pair; other arguments as in
    ``flash_attention`` (GQA is accepted whenever Hq is a multiple of Hkv). ``window=(left, right)`` adds the
    in-kernel band ``i - left <= j <= i + right`` (None or a negative side: unbounded) and ``sinks`` keeps the
    first keys admissible for every query despite the band (see the module docstring)."""
    if isinstance(block_size, (tuple, list)):
        bq, bk = (int(x) for x in block_size)
    else:
        bq = bk = int(block_size)
    left, right = (-1, -1) if window is None else (-1 if w is None else int(w) for w in window)
    if window is not None and left < 0 and right < 0:
        left = right = 1 << 30      # an explicit unbounded band: keep it (sinks are then moot anyway)
    return torch.ops.rewrite.block_sparse_attention(q, k, v, block_mask, bq, bk, attn_mask, is_causal, scale,
                                                    left, right, int(sinks))
