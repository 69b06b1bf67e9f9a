"""Builders of block masks for ``rewrite::block_sparse_attention``.

Every builder returns a bool tensor [B or 1, H or 1, num_q_blocks, num_k_blocks]; ``True`` = compute the block.
Block rows and columns are aligned top-left (query block ``r`` and key block ``r`` cover the same positions
when ``block_q == block_k``), like the kernel's causal mask.
"""
from __future__ import annotations

import math

import torch

__all__ = ["num_blocks", "band_block_mask", "sliding_window_block_mask", "fixed_block_mask", "topk_block_mask",
           "block_mask_from_dense", "causal_block_mask", "kept_fraction"]


def num_blocks(n: int, block: int) -> int:
    return (int(n) + int(block) - 1) // int(block)


def _grid(nqb: int, nkb: int, device):
    r = torch.arange(nqb, device=device)[:, None]
    c = torch.arange(nkb, device=device)[None, :]
    return r, c


def causal_block_mask(nq: int, nk: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """Blocks holding at least one (i, j) with j <= i (top-left causal)."""
    r, c = _grid(num_blocks(nq, block_q), num_blocks(nk, block_k), device)
    last_row = torch.clamp((r + 1) * block_q - 1, max=max(nq - 1, 0))
    return (c * block_k <= last_row)[None, None]


def band_block_mask(nq: int, nk: int, block_q: int, block_k: int, left: int, right: int, sinks: int = 0,
                    device=None) -> torch.Tensor:
    """Blocks holding at least one (i, j) with ``i - left <= j <= i + right`` (negative: unbounded side), plus
    the key blocks of the first ``sinks`` keys: the block mask to pair with the kernel's ``window`` band.
    [1, 1, ceil(Nq / block_q), ceil(Nk / block_k)]; O((N / block)^2) booleans, never an [Nq, Nk] mask."""
    r, c = _grid(num_blocks(nq, block_q), num_blocks(nk, block_k), device)
    row0 = r * block_q
    row1 = torch.clamp(row0 + block_q - 1, max=max(nq - 1, 0))
    col0 = c * block_k
    col1 = torch.clamp(col0 + block_k - 1, max=max(nk - 1, 0))
    keep = torch.ones_like(r * c, dtype=torch.bool)
    if left >= 0:
        keep = keep & (col1 >= row0 - left)
    if right >= 0:
        keep = keep & (col0 <= row1 + right)
    if sinks:
        keep = keep | (col0 < sinks)
    return keep[None, None]


def sliding_window_block_mask(num_q_blocks: int, num_k_blocks: int, window_blocks: int, causal: bool = True,
                              device=None) -> torch.Tensor:
    """Local attention: query block r sees key blocks r - window_blocks + 1 .. r (causal) or
    |r - c| < window_blocks (bidirectional)."""
    r, c = _grid(num_q_blocks, num_k_blocks, device)
    if causal:
        m = (c <= r) & (c > r - window_blocks)
    else:
        m = (c - r).abs() < window_blocks
    return m[None, None]


def fixed_block_mask(num_q_blocks: int, num_k_blocks: int, local_blocks: int = 2, global_blocks: int = 1,
                     stride: int | None = None, causal: bool = True, device=None) -> torch.Tensor:
    """A fixed pattern (Sparse Transformer / Longformer style): a local band of ``local_blocks`` blocks,
    the first ``global_blocks`` key blocks (attention sinks), and, when ``stride`` is given, every
    ``stride``-th key block (summary columns)."""
    r, c = _grid(num_q_blocks, num_k_blocks, device)
    m = (c - r).abs() < local_blocks
    m = m | (c < global_blocks)
    if stride:
        m = m | ((c % stride) == stride - 1)
    if causal:
        m = m & (c <= r)
    return m[None, None]


def topk_block_mask(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, causal: bool = True,
                    block_size_k: int | None = None, keep_diagonal: bool = True) -> torch.Tensor:
    """Block routing (MoBA / NSA-selection style): mean-pool queries and keys per block, score query blocks
    against key blocks, and keep the ``topk`` best key blocks per query block (the diagonal block is always
    kept when ``keep_diagonal``). Returns bool [B, Hq, num_q_blocks, num_k_blocks]. Not differentiable."""
    bq = int(block_size)
    bk = int(block_size_k or block_size)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    with torch.no_grad():
        qp = _block_mean(q.float(), bq)                          # [B, Hq, NQB, D]
        kp = _block_mean(k.float(), bk)                          # [B, Hkv, NKB, D]
        if Hq != Hkv:
            kp = kp.repeat_interleave(Hq // Hkv, dim=1)
        scores = qp @ kp.transpose(-1, -2) / math.sqrt(D)        # [B, Hq, NQB, NKB]
        nqb, nkb = scores.shape[-2:]
        allowed = causal_block_mask(Nq, Nk, bq, bk, q.device) if causal else torch.ones(
            1, 1, nqb, nkb, dtype=torch.bool, device=q.device)
        r, c = _grid(nqb, nkb, q.device)
        diag = (c == r)[None, None] & allowed
        scores = scores.masked_fill(~allowed, float("-inf"))
        if keep_diagonal:
            scores = scores.masked_fill(diag, float("inf"))
        kk = min(int(topk), nkb)
        idx = scores.topk(kk, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
        return mask & allowed


def _block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    B, H, N, D = x.shape
    nb = num_blocks(N, block)
    pad = nb * block - N
    if pad:
        x = torch.cat([x, x.new_zeros(B, H, pad, D)], dim=2)
    counts = torch.full((nb,), float(block), device=x.device)
    if pad:
        counts[-1] = block - pad
    return x.view(B, H, nb, block, D).sum(3) / counts[:, None]


def block_mask_from_dense(mask: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """The block mask [.., ceil(Nq/bq), ceil(Nk/bk)] keeping every block where a bool mask [.., Nq, Nk] has
    any True (so block-sparse attention with ``attn_mask=mask`` equals dense masked attention)."""
    *lead, nq, nk = mask.shape
    nqb, nkb = num_blocks(nq, block_q), num_blocks(nk, block_k)
    m = torch.zeros(*lead, nqb * block_q, nkb * block_k, dtype=torch.bool, device=mask.device)
    m[..., :nq, :nk] = mask.bool()
    m = m.view(*lead, nqb, block_q, nkb, block_k).any(-1).any(-2)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m


def kept_fraction(block_mask: torch.Tensor) -> float:
    return float(block_mask.float().mean())
