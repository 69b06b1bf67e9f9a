"""Linear attention for the mixers: bidirectional and causal prefix sums, their quadratic reference, and FAVOR+
positive random features with a max shift. The causal prefix sums, the FAVOR+ log-features and the orthogonal
projection are the kernel reference's (``kernels/linear_attention/reference.py``), re-exported here; the
Triton kernel is the fast path on CUDA.
"""
from __future__ import annotations

from typing import Optional

import torch

# the shared math lives beside the kernels, in their plain reference
from ..kernels.linear_attention.reference import favor_log, linear_causal, orthogonal_gaussian  # noqa: F401
from . import _layout
from . import _masks

#: chunk length of the causal prefix-sum kernels
CHUNK = 64


def scaled_inputs(q, k, v, attn_mask, is_causal, scale) -> tuple:
    """``(q, k, v, mask plan)`` in the working dtype with GQA heads expanded and the softmax scale split as
    √scale onto q and onto k, so a feature map of each sees the scaled product."""
    q, k, v, s = _layout.prepare(q, k, v, scale)
    plan = _masks.plan_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.dtype)
    r = s ** 0.5
    return q * r, k * r, v, plan


def linear_bidirectional(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``fq (fkᵀ v1)``: every query over every key, O(N·m·dv)."""
    return fq @ (fk.transpose(-1, -2) @ v1)


def linear_dense(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Quadratic reference: ``((fq fkᵀ) ⊙ W) v1`` with an explicit ``[..., Nq, Nk]`` weight matrix."""
    a = fq @ fk.transpose(-1, -2)
    if weights is not None:
        a = a * weights
    return a @ v1


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """``[v, 1]``: one matrix product then gives numerator and normaliser together."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def normalise(num1: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Split ``[num, den]`` (from :func:`with_ones`) and divide; an empty row gives zeros."""
    return num1[..., :-1] / num1[..., -1:].clamp_min(eps)


def favor_query(q: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query features shifted by their own row maximum: ``(features, shift)``; the shift cancels per row."""
    lq = favor_log(q, proj)
    c = lq.amax(-1, keepdim=True)
    return _exp_shifted(lq, c), c


def _exp_shifted(logs: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``exp(logs - shift)``; in place where nothing differentiates through it (two fewer passes over the
    [N, m] features; ``logs`` is a temporary of the caller's)."""
    if torch.is_grad_enabled() and logs.requires_grad:
        return torch.exp(logs - shift)
    return logs.sub_(shift).exp_()


def favor_key(k: torch.Tensor, proj: torch.Tensor, key_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key features times ``exp(key bias)``, shifted by one maximum over all keys: ``(features, shift)``."""
    lk = favor_log(k, proj)
    if key_bias is not None:
        lk = lk + key_bias.transpose(-1, -2)
    c = lk.amax(dim=(-2, -1), keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    return _exp_shifted(lk, c), c


class FavorProjection:
    """Mixin for mixers with a FAVOR+ projection buffer ``projection [features, D]`` (from ``self.features``
    and ``self.seed``): drawn lazily for the inputs' head dim, and following the inputs' device."""

    def _proj(self, d: int, device) -> torch.Tensor:
        if self.projection.numel() == 0 or self.projection.shape[1] != d:
            self.projection = orthogonal_gaussian(self.features, d, self.seed).to(device)
        elif self.projection.device != device:      # the mixer need not move with the model: follow the inputs
            self.projection = self.projection.to(device)
        return self.projection
