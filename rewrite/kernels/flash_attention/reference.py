"""Plain-PyTorch attention: the CPU path of ``rewrite::flash_attention`` and the oracle for its kernels.

Semantics (shared with the Triton kernels, see ``triton.py``):

* ``q`` [B, Hq, Nq, D], ``k`` [B, Hkv, Nk, D], ``v`` [B, Hkv, Nk, Dv]; ``Hq % Hkv == 0`` and query head ``h``
  reads key/value head ``h // (Hq // Hkv)`` (grouped-query attention without repeating K/V in the kernel).
* scores ``s = scale * q @ k^T`` (``scale`` defaults to ``1/sqrt(D)``), then, in this order,
  ``+ attn_mask`` when it is a float tensor (an additive bias broadcastable to [B, Hq, Nq, Nk]),
  ``+ alibi_slopes[h] * (j - i)`` (ALiBi, see below), and masking to ``-inf`` where a boolean
  ``attn_mask`` is False, where ``is_causal`` forbids (key ``j > i``) and past the key length.
* ``is_causal`` is top-left aligned exactly like ``torch.nn.functional.scaled_dot_product_attention``:
  query ``i`` may see key ``j`` iff ``j <= i``, whatever ``Nq`` and ``Nk`` are. With ``Nq < Nk`` (decoding
  against a KV cache) this is *not* the bottom-right alignment a cache usually wants; pass ``is_causal=False``
  with an explicit mask for that. With ``Nq > Nk``, rows ``i >= Nk`` see every key.
* ALiBi: ``bias[h, i, j] = slope[h] * (j - i)`` with absolute positions ``i`` (query) and ``j`` (key).
  Under a causal mask (``j <= i``) this equals ``-slope[h] * |i - j|`` and, up to a per-row constant that
  softmax cancels, BLOOM's ``slope[h] * j`` and MPT's ``slope[h] * (j - (N - 1))``. Without a causal mask it
  is the same linear bias (not the symmetric ``-|i - j|`` variant).
* A row whose every key is masked gives an output of 0 (and zero gradients), and ``lse = -inf``.
* Dropout (``dropout_p > 0``) zeroes probabilities where ``dropout_mask`` is False and scales the rest by
  ``1 / (1 - dropout_p)``; the normaliser is the sum of the un-dropped probabilities (as in SDPA).

Everything is computed in float32 and cast back to ``q.dtype``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "attention_reference_backward", "dropout_keep_mask", "alibi_bias",
           "reduce_to_mask"]


def alibi_bias(slopes: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """The ALiBi bias [H, Nq, Nk] of this package's convention: ``slope[h] * (j - i)``."""
    i = torch.arange(nq, device=slopes.device, dtype=torch.float32)[:, None]
    j = torch.arange(nk, device=slopes.device, dtype=torch.float32)[None, :]
    return slopes.float()[:, None, None] * (j - i)


def dropout_keep_mask(rng_state: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    """The keep-mask the CPU reference path draws for ``rng_state`` (seed, offset): deterministic, so the
    backward can draw it again. (The Triton path draws its own mask with Philox ``tl.rand``.)"""
    seed, offset = (int(x) for x in rng_state.detach().cpu().tolist())
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + offset) & ((1 << 63) - 1))
    return (torch.rand(tuple(shape), generator=gen) >= p).to(device)


def _probs(q, k, attn_mask, is_causal, scale, alibi_slopes):
    """fp32 softmax probabilities [B, Hq, Nq, Nk] (fully masked rows all 0) and the logsumexp [B, Hq, Nq];
    k is already repeated to Hq heads."""
    Nq, Nk = q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask
        else:
            s = s + attn_mask.float()
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, Nq, Nk).to(s.device)
    if is_causal:
        causal = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()
        keep = causal if keep is None else (keep & causal)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # softmax that leaves fully masked rows at 0 (and their gradients finite): shift by the detached row max
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (m + torch.log(denom)).squeeze(-1)
    return p, lse


def _prepare(q, k, v, scale):
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    group = Hq // Hkv
    qf, kf, vf = q.float(), k.float(), v.float()
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)
    return qf, kf, vf, scale, group


def attention_reference(q, k, v, attn_mask=None, is_causal=False, scale=None, alibi_slopes=None,
                        dropout_p: float = 0.0, dropout_mask=None, return_lse: bool = False):
    """Attention with this package's semantics (module docstring); returns ``out`` or ``(out, lse)``.
    Differentiable (autograd) in q, k, v.

    ``dropout_mask`` (bool, broadcastable to [B, Hq, Nq, Nk]) is the keep-mask used when ``dropout_p > 0``.
    """
    qf, kf, vf, scale, _ = _prepare(q, k, v, scale)
    p, lse = _probs(qf, kf, attn_mask, is_causal, scale, alibi_slopes)
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("dropout_p > 0 needs the keep-mask (dropout_mask) in the reference")
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, vf).to(q.dtype)
    return (out, lse) if return_lse else out


def reduce_to_mask(dscores: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """The gradient of an additive ``attn_mask`` from the score gradient ``dscores`` [B, Hq, Nq, Nk]: summed
    over the dims the mask was broadcast along, in the mask's shape and dtype."""
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    dims = [i for i, (m, full) in enumerate(zip(shape, dscores.shape)) if m == 1 and full != 1]
    grad = dscores.sum(dim=dims, keepdim=True) if dims else dscores
    return grad.reshape(attn_mask.shape).to(attn_mask.dtype)


def attention_reference_backward(grad_out, q, k, v, attn_mask=None, is_causal=False, scale=None,
                                 alibi_slopes=None, dropout_p: float = 0.0, dropout_mask=None,
                                 return_dscores: bool = False):
    """(dq, dk, dv) of ``attention_reference`` written out (no autograd: the CPU backward of the op runs
    where autograd recording is off). Same algebra as the kernels: dS = P * (dP - rowsum(dP * P)).
    ``return_dscores``: also return dS [B, Hq, Nq, Nk] (fp32), the gradient of an additive mask before
    ``reduce_to_mask``."""
    B, Hq, Nq, _ = q.shape
    Hkv = k.shape[1]
    qf, kf, vf, scale, group = _prepare(q, k, v, scale)
    p, _ = _probs(qf, kf, attn_mask, is_causal, scale, alibi_slopes)
    g = grad_out.float()
    if dropout_p > 0.0:
        drop = dropout_mask.to(p.dtype) / (1.0 - dropout_p)
        pd = p * drop
    else:
        drop, pd = None, p
    dv = torch.matmul(pd.transpose(-1, -2), g)                    # [B, Hq, Nk, Dv]
    dp = torch.matmul(g, vf.transpose(-1, -2))                    # [B, Hq, Nq, Nk]
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    if group > 1:
        dk = dk.view(B, Hkv, group, *dk.shape[2:]).sum(2)
        dv = dv.view(B, Hkv, group, *dv.shape[2:]).sum(2)
    if return_dscores:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
