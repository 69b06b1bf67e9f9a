"""``rewrite::linear_attention``: chunked linear attention (causal or bidirectional), forward and backward.

Ops (``torch.ops.rewrite.<name>`` after ``import rewrite.kernels``):

* ``linear_attention(q, k, v, feature_map="elu", projection=None, causal=False, eps=1e-6) -> Tensor`` -- public,
  CompositeImplicitAutograd. ``elu`` / ``relu`` are applied inside the kernels (fused on load, derivative
  applied in the backward kernels); ``favor`` computes the FAVOR+ random features with PyTorch ops (autograd
  goes through them) from ``projection`` [m, D] and runs the kernels on the features.
* ``linear_attention_core(q, k, v, feature_map, causal, eps) -> (out, den)`` -- kernel op (fake impl +
  autograd); ``feature_map`` in {"identity", "elu", "relu"}; ``den`` [B, H, Nq] fp32 is the normaliser
  (eps included), saved for the backward.
* ``linear_attention_core_bwd(...) -> (dq, dk, dv)``.

Shapes: q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; causal needs Nq == Nk. Output dtype = v.dtype.
Semantics in ``reference.py``. CUDA -> Triton; CPU -> the chunked PyTorch reference unless
``TRITON_INTERPRET=1``. Feature / value dims over 256 (e.g. FAVOR+ with m > 256 features) use the chunked
PyTorch form on every device.
"""
from __future__ import annotations

import torch

from .._common import use_triton
from .reference import (FEATURE_MAPS, favor_features, favor_projection, feature_map, linear_attention_chunked,
                        linear_attention_chunked_backward, linear_attention_quadratic)

__all__ = ["linear_attention", "linear_attention_quadratic", "linear_attention_chunked", "feature_map",
           "favor_features", "favor_projection", "FEATURE_MAPS"]

_CORE_MAPS = ("identity", "elu", "relu")


def _triton_ok(q, v) -> bool:
    if not use_triton(q):
        return False
    from . import triton as _kernels
    return _kernels.supported(q, v)


@torch.library.custom_op("rewrite::linear_attention_core", mutates_args=())
def linear_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, causal: bool,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if feature_map not in _CORE_MAPS:
        raise ValueError(f"linear_attention_core: feature_map must be one of {_CORE_MAPS}, got {feature_map!r}")
    if _triton_ok(q, v):
        from . import triton as _kernels
        return _kernels.la_fwd(q, k, v, feature_map, causal, eps)
    out, den = linear_attention_chunked(q, k, v, feature_map, None, causal, eps, return_den=True)
    return out.contiguous(), den.contiguous()


@linear_attention_core.register_fake
def _(q, k, v, feature_map, causal, eps):
    B, H, Nq, _ = q.shape
    return v.new_empty((B, H, Nq, v.shape[3])), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("rewrite::linear_attention_core_bwd", mutates_args=())
def linear_attention_core_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, den: torch.Tensor, feature_map: str,
                              causal: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _triton_ok(q, v):
        from . import triton as _kernels
        return _kernels.la_bwd(grad_out, q, k, v, out, den, feature_map, causal)
    return linear_attention_chunked_backward(grad_out, q, k, v, out, den, feature_map, causal)


@linear_attention_core_bwd.register_fake
def _(grad_out, q, k, v, out, den, feature_map, causal, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, fmap, causal, eps = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, out, den)
    ctx.fmap, ctx.causal, ctx.eps = fmap, causal, eps


def _backward(ctx, grad_out, grad_den):
    q, k, v, out, den = ctx.saved_tensors
    dq, dk, dv = linear_attention_core_bwd(grad_out.contiguous(), q, k, v, out, den, ctx.fmap, ctx.causal, ctx.eps)
    return dq, dk, dv, None, None, None


linear_attention_core.register_autograd(_backward, setup_context=_setup_context)

_lib = torch.library.Library("rewrite", "FRAGMENT")
_lib.define(
    "linear_attention(Tensor q, Tensor k, Tensor v, str feature_map='elu', Tensor? projection=None, "
    "bool causal=False, float eps=1e-06) -> Tensor"
)


def _composite(q, k, v, feature_map="elu", projection=None, causal=False, eps=1e-6):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("linear_attention expects q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError("causal linear attention needs Nq == Nk")
    if feature_map == "favor":
        if projection is None:
            raise ValueError("feature_map='favor' needs projection [m, D] (see favor_projection)")
        if projection.shape[-1] != q.shape[-1]:
            raise ValueError(f"projection {tuple(projection.shape)} does not match head dim {q.shape[-1]}")
        fq = favor_features(q, projection, is_query=True)
        fk = favor_features(k, projection, is_query=False)
        out, _ = torch.ops.rewrite.linear_attention_core(fq, fk, v, "identity", bool(causal), float(eps))
        return out
    if feature_map not in ("elu", "relu", "identity"):
        raise ValueError(f"unknown feature map {feature_map!r}; expected one of {FEATURE_MAPS}")
    out, _ = torch.ops.rewrite.linear_attention_core(q, k, v, feature_map, bool(causal), float(eps))
    return out


_lib.impl("linear_attention", _composite, "CompositeImplicitAutograd")


def linear_attention(q, k, v, feature_map="elu", projection=None, causal=False, eps=1e-6):
    """Linear attention ``phi(q) (phi(k)^T v) / (phi(q) sum phi(k) + eps)``; see the module docstring."""
    return torch.ops.rewrite.linear_attention(q, k, v, feature_map, projection, causal, eps)
