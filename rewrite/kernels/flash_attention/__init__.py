"""``rewrite::flash_attention``: fused exact attention (FlashAttention-2 style), forward and backward.

Ops (all in the ``rewrite`` namespace, visible as ``torch.ops.rewrite.<name>`` after ``import rewrite.kernels``):

* ``flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
  alibi_slopes=None, rng_state=None, softcap=None) -> Tensor`` -- the public op, with SDPA's argument order. It is
  CompositeImplicitAutograd: it checks its arguments, draws the dropout seed, and calls
  ``flash_attention_fwd``; under ``torch.compile`` / ``torch.export`` it is traced down to that op.
* ``flash_attention_fwd(...) -> (out, lse, dropout_keep_mask)`` -- the kernel op (custom op with a fake
  implementation and autograd: its backward calls ``flash_attention_bwd``). ``lse`` is the natural-log
  logsumexp of each score row (fp32, ``-inf`` for a fully masked row); the keep-mask is empty unless asked for.
* ``flash_attention_bwd(..., mask_grad=False) -> (dq, dk, dv, d_attn_mask)``; ``d_attn_mask`` is empty unless
  ``mask_grad``.

Path: CUDA tensors run the Triton kernels (``triton.py``), CPU tensors the PyTorch reference (``reference.py``:
the forward over key chunks, ``attention_chunked``) unless ``TRITON_INTERPRET=1``, in which case CPU tensors run
the Triton kernels in Triton's interpreter.

Semantics are documented in ``reference.py`` (causal is top-left aligned like SDPA; ALiBi is
``slope[h] * (j - i)``; fully masked rows give 0; ``softcap`` is Gemma 2's ``softcap * tanh(s / softcap)`` on the
scaled scores, before the mask and ALiBi, as FlashAttention-2's ``softcap``). Gradients flow to ``q``, ``k``,
``v`` and to a float ``attn_mask`` that requires grad (a learned bias such as T5's relative positions: the backward adds dS into
an fp32 buffer of the mask's own size, summing in-kernel over the batch, head and query dims the mask is shared
along); ``alibi_slopes`` get none.

Dropout: when ``dropout_p > 0`` the Triton path draws a Philox keep-mask from ``rng_state`` = (seed, offset)
(drawn from torch's RNG when not given) and regenerates it in the backward; the CPU reference path draws its
own mask (a CPU generator seeded from ``rng_state``), so the two paths do not draw the same mask.
``flash_attention(..., return_dropout_mask=True)`` returns ``(out, keep_mask)`` with the exact mask used, so a
test can replay it through the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._common import new_rng_state, use_triton
from .reference import (alibi_bias, attention_chunked, attention_reference, attention_reference_backward,
                        dropout_keep_mask, reduce_to_mask)

__all__ = ["flash_attention", "attention_reference", "alibi_bias", "alibi_slopes"]

_EMPTY_MASK_SHAPE = (0,)


def _check(q, k, v, attn_mask, alibi_slopes, dropout_p, softcap=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention expects q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv]")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: {D} vs {k.shape[3]}")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if alibi_slopes is not None and alibi_slopes.numel() != Hq:
        raise ValueError(f"alibi_slopes needs one slope per query head ({Hq}), got {alibi_slopes.numel()}")
    if torch.is_grad_enabled() and alibi_slopes is not None and alibi_slopes.requires_grad:
        raise ValueError("flash_attention: alibi_slopes receive no gradient; detach them (or pass the ALiBi "
                         "bias as a float attn_mask, which does)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0.0 < softcap < math.inf):
        raise ValueError(f"softcap must be a positive finite number (the cap of softcap * tanh(s / softcap)) or None, "
                         f"got {softcap!r}")
    if attn_mask is not None:
        target = (B, Hq, Nq, k.shape[2])
        if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, target) != torch.Size(target):
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Nq, Nk] = {target}")


# ------------------------------------------------------------------------------------------ kernel ops


@torch.library.custom_op("rewrite::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                        alibi_slopes: Optional[torch.Tensor], rng_state: Optional[torch.Tensor], is_causal: bool,
                        scale: float, dropout_p: float, return_dropout_mask: bool,
                        softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, keep-mask); ``softcap`` 0 means none."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    if dropout_p > 0.0 and rng_state is None:
        raise ValueError("flash_attention_fwd: dropout needs rng_state")
    if use_triton(q):
        from . import triton as _kernels
        out, lse, mask = _kernels.flash_fwd(q, k, v, attn_mask, alibi_slopes, rng_state, is_causal, scale,
                                            dropout_p, return_dropout_mask, softcap)
        return out, lse, mask.bool()
    keep = dropout_keep_mask(rng_state, (B, Hq, Nq, Nk), dropout_p, q.device) if dropout_p > 0.0 else None
    out, lse = attention_chunked(q, k, v, attn_mask, is_causal, scale, alibi_slopes, dropout_p, keep,
                                 softcap=softcap or None)
    if return_dropout_mask and keep is not None:
        mask = keep
    else:
        mask = torch.empty(_EMPTY_MASK_SHAPE, dtype=torch.bool, device=q.device)
    return out.contiguous(), lse.contiguous(), mask


@flash_attention_fwd.register_fake
def _(q, k, v, attn_mask, alibi_slopes, rng_state, is_causal, scale, dropout_p, return_dropout_mask, softcap=0.0):
    B, Hq, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    out = q.new_empty((B, Hq, Nq, Dv))
    lse = q.new_empty((B, Hq, Nq), dtype=torch.float32)
    shape = (B, Hq, Nq, Nk) if (return_dropout_mask and dropout_p > 0.0) else _EMPTY_MASK_SHAPE
    return out, lse, q.new_empty(shape, dtype=torch.bool)


@torch.library.custom_op("rewrite::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, attn_mask: Optional[torch.Tensor],
                        alibi_slopes: Optional[torch.Tensor], rng_state: Optional[torch.Tensor], is_causal: bool,
                        scale: float, dropout_p: float, mask_grad: bool = False,
                        softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_attn_mask); the last is empty unless ``mask_grad`` (a float ``attn_mask`` only).
    ``softcap`` 0 means none."""
    mask_grad = bool(mask_grad) and attn_mask is not None and attn_mask.is_floating_point()
    if use_triton(q):
        from . import triton as _kernels
        dq, dk, dv, ds = _kernels.flash_bwd(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, rng_state,
                                            is_causal, scale, dropout_p, mask_grad, softcap)
    else:
        B, Hq, Nq, _ = q.shape
        keep = (dropout_keep_mask(rng_state, (B, Hq, Nq, k.shape[2]), dropout_p, q.device)
                if dropout_p > 0.0 else None)
        dq, dk, dv, ds = attention_reference_backward(grad_out, q, k, v, attn_mask, is_causal, scale, alibi_slopes,
                                                      dropout_p, keep, return_dscores=True, softcap=softcap or None)
    dmask = reduce_to_mask(ds, attn_mask) if mask_grad else q.new_empty(_EMPTY_MASK_SHAPE)
    return dq, dk, dv, dmask


@flash_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, rng_state, is_causal, scale, dropout_p,
      mask_grad=False, softcap=0.0):
    if mask_grad and attn_mask is not None and attn_mask.is_floating_point():
        dmask = attn_mask.new_empty(attn_mask.shape)
    else:
        dmask = q.new_empty(_EMPTY_MASK_SHAPE)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, rng_state, is_causal, scale, dropout_p, _, softcap = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, rng_state)
    ctx.is_causal, ctx.scale, ctx.dropout_p, ctx.softcap = is_causal, scale, dropout_p, softcap


def _backward(ctx, grad_out, grad_lse, grad_mask):
    q, k, v, out, lse, attn_mask, alibi_slopes, rng_state = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])      # a learnable bias (e.g. T5's relative positions)
    dq, dk, dv, dmask = flash_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, attn_mask, alibi_slopes,
                                            rng_state, ctx.is_causal, ctx.scale, ctx.dropout_p, mask_grad,
                                            ctx.softcap)
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ public op

_lib = torch.library.Library("rewrite", "FRAGMENT")
_lib.define(
    "flash_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False, Tensor? alibi_slopes=None, "
    "Tensor? rng_state=None, float? softcap=None) -> Tensor"
)


def _flash_attention_composite(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                               enable_gqa=False, alibi_slopes=None, rng_state=None, softcap=None):
    return _flash(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, alibi_slopes, rng_state, False,
                  softcap)[0]


_lib.impl("flash_attention", _flash_attention_composite, "CompositeImplicitAutograd")


def _flash(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, alibi_slopes, rng_state, return_mask,
           softcap=None):
    squeeze = q.dim() == 3
    if squeeze:  # [H, N, D] -> [1, H, N, D]
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    _check(q, k, v, attn_mask, alibi_slopes, dropout_p, softcap)
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(f"query has {q.shape[1]} heads and key/value {k.shape[1]}: pass enable_gqa=True "
                         "(as for scaled_dot_product_attention)")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if dropout_p > 0.0 and rng_state is None:
        rng_state = new_rng_state(q.device)
    out, _, mask = torch.ops.rewrite.flash_attention_fwd(q, k, v, attn_mask, alibi_slopes, rng_state,
                                                         bool(is_causal), float(scale), float(dropout_p),
                                                         bool(return_mask), float(softcap or 0.0))
    if squeeze:
        out = out.squeeze(0)
        if mask.dim() == 4:
            mask = mask.squeeze(0)
    return out, mask


def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                    alibi_slopes=None, rng_state=None, return_dropout_mask=False, softcap=None):
    """Fused attention with ``F.scaled_dot_product_attention``'s call signature plus ALiBi and soft-capping.

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (or the same without the batch dim).
    ``attn_mask``: additive float bias or boolean keep-mask broadcastable to [B, Hq, Nq, Nk]; it may be given
    together with ``is_causal`` (both apply). ``alibi_slopes``: [Hq] slopes, bias ``slope[h] * (j - i)``.
    ``dropout_p > 0`` applies dropout (as SDPA, whatever the module's training flag); ``rng_state`` is an
    optional int64 (seed, offset) tensor; ``return_dropout_mask=True`` returns ``(out, keep_mask)`` where
    ``keep_mask`` [B, Hq, Nq, Nk] is the exact mask used (a debug path: it costs a full-size tensor).
    ``softcap``: Gemma 2's logit soft-capping, scores ``softcap * tanh(scale * q @ k^T / softcap)`` before the
    mask (FlashAttention-2's ``softcap``), e.g. ``flash_attention(q, k, v, attn_mask=pad, softcap=50.0)``.
    """
    out, mask = _flash(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, alibi_slopes, rng_state,
                       return_dropout_mask, softcap)
    return (out, mask) if return_dropout_mask else out


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The standard ALiBi slopes (Press et al.; BLOOM's ``build_alibi_tensor``) for ``num_heads`` heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(min(closest, num_heads - closest))]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
