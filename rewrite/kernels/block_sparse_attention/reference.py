"""Plain-PyTorch block-sparse attention: the CPU path of ``rewrite::block_sparse_attention`` and the oracle.

Query block ``qb`` (rows ``qb*block_q ... qb*block_q + block_q - 1``) attends to key block ``kb`` iff
``block_mask[b, h, qb, kb]`` (the mask is broadcast from [B or 1, H or 1, ceil(Nq/block_q), ceil(Nk/block_k)]).
Inside kept blocks the usual rules of ``rewrite::flash_attention`` apply: the optional ``attn_mask``
(additive float or boolean, broadcastable to [B, H, Nq, Nk]), top-left causal masking, GQA head mapping.
A row with no admissible key gives 0.

Optional band (``window=(left, right)``, either side None or negative = unbounded): key ``j`` is admissible
for query ``i`` only if ``i - left <= j <= i + right``, unless ``j < sinks``. It is ANDed with the rest.
"""
from __future__ import annotations

import torch

from ..flash_attention.reference import attention_reference, attention_reference_backward

__all__ = ["band_keep", "block_sparse_reference", "block_sparse_reference_backward", "expand_block_mask"]


def expand_block_mask(block_mask: torch.Tensor, nq: int, nk: int, block_q: int, block_k: int) -> torch.Tensor:
    """The element-level keep mask [Bm, Hm, Nq, Nk] of a block mask."""
    rows = torch.arange(nq, device=block_mask.device) // block_q
    cols = torch.arange(nk, device=block_mask.device) // block_k
    return block_mask[..., rows, :][..., cols]


def band_keep(nq: int, nk: int, window, sinks: int = 0, device=None) -> torch.Tensor:
    """[Nq, Nk] bool: ``i - left <= j <= i + right`` (a None / negative side unbounded) or ``j < sinks``."""
    i = torch.arange(nq, device=device).view(-1, 1)
    j = torch.arange(nk, device=device).view(1, -1)
    left, right = window
    keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left is not None and left >= 0:
        keep = keep & (j >= i - left)
    if right is not None and right >= 0:
        keep = keep & (j <= i + right)
    return keep | (j < int(sinks or 0))


def _full_mask(q, k, block_mask, block_q, block_k, attn_mask, window=None, sinks=0):
    """The additive element mask equivalent to (block mask AND band AND attn_mask)."""
    nq, nk = q.shape[2], k.shape[2]
    keep = expand_block_mask(block_mask.bool(), nq, nk, block_q, block_k)
    if window is not None:
        keep = keep & band_keep(nq, nk, window, sinks, q.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
        bias = torch.zeros((), device=q.device)
    elif attn_mask is not None:
        bias = attn_mask.float()
    else:
        bias = torch.zeros((), device=q.device)
    return torch.where(keep, bias, torch.tensor(float("-inf"), device=q.device))


def block_sparse_reference(q, k, v, block_mask, block_q: int, block_k: int, attn_mask=None, is_causal=False,
                           scale=None, return_lse: bool = False, window=None, sinks=0):
    full = _full_mask(q, k, block_mask, block_q, block_k, attn_mask, window, sinks)
    return attention_reference(q, k, v, full, is_causal=is_causal, scale=scale, return_lse=return_lse)


def block_sparse_reference_backward(grad_out, q, k, v, block_mask, block_q: int, block_k: int, attn_mask=None,
                                    is_causal=False, scale=None, window=None, sinks=0):
    full = _full_mask(q, k, block_mask, block_q, block_k, attn_mask, window, sinks)
    return attention_reference_backward(grad_out, q, k, v, full, is_causal=is_causal, scale=scale)
