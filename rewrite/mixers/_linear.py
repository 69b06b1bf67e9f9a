"""Linear attention: bidirectional and causal prefix sums (chunked), their quadratic reference, and FAVOR+
positive random features. The Triton kernel (``kernels/linear_attention``) is the fast path on CUDA; these
are the PyTorch forms every mixer of the family computes with elsewhere.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..actions import RewriteError

#: chunk length of the causal prefix-sum kernels
CHUNK = 64


def linear_bidirectional(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``fq (fkᵀ v1)``: every query over every key, O(N·m·dv)."""
    return fq @ (fk.transpose(-1, -2) @ v1)


def linear_causal(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor, offset: int = 0,
                  chunk: int = CHUNK) -> torch.Tensor:
    """``out_i = fq_i · Σ_{j <= i + offset} fk_j v1_jᵀ`` in chunks: O(N·(C·m + C·dv + m·dv)).

    Keys before ``offset`` (a KV cache) form the starting state; the remaining ``Nq`` keys are aligned
    with the queries and processed chunk by chunk (exact inside a chunk, a prefix state across chunks).
    """
    nq, nk = fq.shape[-2], fk.shape[-2]
    if offset < 0 or nk - offset != nq:
        raise RewriteError(f"linear_causal needs 0 <= offset == Nk - Nq (got offset {offset}, Nq {nq}, Nk {nk})")
    lead = torch.broadcast_shapes(fq.shape[:-2], fk.shape[:-2], v1.shape[:-2])
    m, dv = fq.shape[-1], v1.shape[-1]
    fq, fk, v1 = fq.expand(*lead, nq, m), fk.expand(*lead, nk, m), v1.expand(*lead, nk, dv)
    state0 = None
    if offset > 0:
        state0 = fk[..., :offset, :].transpose(-1, -2) @ v1[..., :offset, :]
        fk, v1 = fk[..., offset:, :], v1[..., offset:, :]
    n = nq
    if n == 0:
        return fq.new_zeros(*lead, 0, dv)
    c = max(1, min(chunk, n))
    nc = -(-n // c)
    pad = nc * c - n
    if pad:
        fq = F.pad(fq, (0, 0, 0, pad))
        fk = F.pad(fk, (0, 0, 0, pad))
        v1 = F.pad(v1, (0, 0, 0, pad))
    fq = fq.reshape(*lead, nc, c, m)
    fk = fk.reshape(*lead, nc, c, m)
    v1 = v1.reshape(*lead, nc, c, dv)
    tri = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    scores = (fq @ fk.transpose(-1, -2)).masked_fill(~tri, 0.0)
    intra = scores @ v1
    states = fk.transpose(-1, -2) @ v1                      # [..., nc, m, dv]
    before = states.cumsum(dim=-3) - states                 # exclusive prefix over chunks
    if state0 is not None:
        before = before + state0.unsqueeze(-3)
    out = intra + fq @ before
    out = out.reshape(*lead, nc * c, dv)
    return out[..., :n, :]


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


def orthogonal_gaussian(rows: int, dim: int, seed: int) -> torch.Tensor:
    """``[rows, dim]`` block-orthogonal Gaussian directions with chi-distributed norms (Performer's ORF)."""
    g = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(-(-rows // dim)):
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        qmat, r = torch.linalg.qr(a)
        qmat = qmat * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(qmat.T)
    w = torch.cat(blocks, dim=0)[:rows]
    norms = torch.randn(rows, dim, generator=g, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (w * norms).to(torch.float32)


def favor_log(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Log of FAVOR+ positive features: ``φ(x)_r = exp(ω_r·x - |x|²/2) / √m``, so E[φ(q)·φ(k)] = exp(q·k)."""
    m = proj.shape[0]
    return x @ proj.to(x.dtype).T - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(m)


def favor_query(q: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query features shifted by their own row maximum: ``(features, shift)``; the shift cancels per row."""
    lq = favor_log(q, proj)
    c = lq.amax(-1, keepdim=True)
    return torch.exp(lq - c), c


def favor_key(k: torch.Tensor, proj: torch.Tensor, key_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key features times ``exp(key bias)``, shifted by one maximum over all keys: ``(features, shift)``."""
    lk = favor_log(k, proj)
    if key_bias is not None:
        lk = lk + key_bias.transpose(-1, -2)
    c = lk.amax(dim=(-2, -1), keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    return torch.exp(lk - c), c


class FavorProjection:
    """Mixin for mixers with a FAVOR+ projection buffer ``projection [features, D]`` (from ``self.features``
    and ``self.seed``): drawn lazily for the inputs' head dim, and following the inputs' device."""

    def _proj(self, d: int, device) -> torch.Tensor:
        if self.projection.numel() == 0 or self.projection.shape[1] != d:
            self.projection = orthogonal_gaussian(self.features, d, self.seed).to(device)
        elif self.projection.device != device:      # the mixer need not move with the model: follow the inputs
            self.projection = self.projection.to(device)
        return self.projection
