"""Plain-PyTorch block-sparse attention: the CPU path of ``rewrite::block_sparse_attention`` and the oracle.

Query block ``qb`` (rows ``qb*block_q ... qb*block_q + block_q - 1``) attends to key block ``kb`` iff
``block_mask[b, h, qb, kb]`` (the mask is broadcast from [B or 1, H or 1, ceil(Nq/block_q), ceil(Nk/block_k)]).
Inside kept blocks the usual rules of ``rewrite::flash_attention`` apply: the optional ``attn_mask``
(additive float or boolean, broadcastable to [B, H, Nq, Nk]), top-left causal masking, GQA head mapping.
A row with no admissible key gives 0.
"""
from __future__ import annotations

import torch

from ..flash_attention.reference import attention_reference, attention_reference_backward

__all__ = ["block_sparse_reference", "block_sparse_reference_backward", "expand_block_mask"]


def expand_block_mask(block_mask: torch.Tensor, nq: int, nk: int, block_q: int, block_k: int) -> torch.Tensor:
    """The element-level keep mask [Bm, Hm, Nq, Nk] of a block mask."""
    rows = torch.arange(nq, device=block_mask.device) // block_q
    cols = torch.arange(nk, device=block_mask.device) // block_k
    return block_mask[..., rows, :][..., cols]


def _full_mask(q, k, block_mask, block_q, block_k, attn_mask):
    """The additive element mask equivalent to (block mask AND attn_mask)."""
    nq, nk = q.shape[2], k.shape[2]
    keep = expand_block_mask(block_mask.bool(), nq, nk, block_q, block_k)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
        bias = torch.zeros((), device=q.device)
    elif attn_mask is not None:
        bias = attn_mask.float()
    else:
        bias = torch.zeros((), device=q.device)
    return torch.where(keep, bias, torch.tensor(float("-inf"), device=q.device))


def block_sparse_reference(q, k, v, block_mask, block_q: int, block_k: int, attn_mask=None, is_causal=False,
                           scale=None, return_lse: bool = False):
    full = _full_mask(q, k, block_mask, block_q, block_k, attn_mask)
    return attention_reference(q, k, v, full, is_causal=is_causal, scale=scale, return_lse=return_lse)


def block_sparse_reference_backward(grad_out, q, k, v, block_mask, block_q: int, block_k: int, attn_mask=None,
                                    is_causal=False, scale=None):
    full = _full_mask(q, k, block_mask, block_q, block_k, attn_mask)
    return attention_reference_backward(grad_out, q, k, v, full, is_causal=is_causal, scale=scale)
