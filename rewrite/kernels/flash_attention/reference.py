"""Plain-PyTorch attention: the CPU path of ``rewrite::flash_attention`` and the oracle for its kernels.

Semantics (shared with the Triton kernels, see ``triton.py``):

* ``q`` [B, Hq, Nq, D], ``k`` [B, Hkv, Nk, D], ``v`` [B, Hkv, Nk, Dv]; ``Hq % Hkv == 0`` and query head ``h``
  reads key/value head ``h // (Hq // Hkv)`` (grouped-query attention without repeating K/V in the kernel).
* scores ``s = scale * q @ k^T`` (``scale`` defaults to ``1/sqrt(D)``), then, in this order,
  ``s = softcap * tanh(s / softcap)`` when ``softcap`` is given (Gemma 2's logit soft-capping, as
  FlashAttention-2's ``softcap``: it bounds the scores to (-softcap, softcap) before any mask or bias),
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

``attention_chunked`` is the CPU forward of the op: the same semantics, computed over key chunks with an
online softmax, so it never holds more than [B, Hq, Nq, chunk] scores. ``attention_reference`` (all scores at
once, differentiable by autograd) is the oracle of the tests.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "attention_chunked", "attention_reference_backward", "dropout_keep_mask",
           "alibi_bias", "reduce_to_mask", "DEFAULT_KEY_CHUNK"]

#: keys per chunk of ``attention_chunked``: [B, Hq, Nq, 512] fp32 scores at a time; shorter sequences are one chunk
DEFAULT_KEY_CHUNK = 512


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


def _capped_scores(q, k, scale, softcap):
    """``scale * q @ k^T``, soft-capped when ``softcap`` is given; and the cap's derivative ``1 - tanh^2``
    (None without a cap), which the backward multiplies into dS."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is None:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, 1.0 - t * t


def _masked(s, attn_mask, is_causal, alibi_slopes, q_start: int = 0, k_start: int = 0):
    """Scores with the mask, ALiBi and causality applied (``-inf`` where masked); the tile starts at query row
    ``q_start`` and key ``k_start`` (``attn_mask`` is already sliced to the tile)."""
    nq, nk = s.shape[-2], s.shape[-1]
    keep = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask
        else:
            s = s + attn_mask.float()
    if alibi_slopes is not None or is_causal:
        i = torch.arange(q_start, q_start + nq, device=s.device)[:, None]
        j = torch.arange(k_start, k_start + nk, device=s.device)[None, :]
        if alibi_slopes is not None:
            s = s + alibi_slopes.float().to(s.device)[:, None, None] * (j - i).float()
        if is_causal:
            keep = (j <= i) if keep is None else (keep & (j <= i))
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _probs(q, k, attn_mask, is_causal, scale, alibi_slopes, softcap=None):
    """fp32 softmax probabilities [B, Hq, Nq, Nk] (fully masked rows all 0), the logsumexp [B, Hq, Nq] and the
    soft-cap's derivative (None without one); k is already repeated to Hq heads."""
    s, dcap = _capped_scores(q, k, scale, softcap)
    s = _masked(s, attn_mask, is_causal, alibi_slopes)
    # softmax that leaves fully masked rows at 0 (and their gradients finite): shift by the detached row max
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (m + torch.log(denom)).squeeze(-1)
    return p, lse, dcap


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
                        dropout_p: float = 0.0, dropout_mask=None, return_lse: bool = False, softcap=None):
    """Attention with this package's semantics (module docstring); returns ``out`` or ``(out, lse)``.
    Differentiable (autograd) in q, k, v.

    ``dropout_mask`` (bool, broadcastable to [B, Hq, Nq, Nk]) is the keep-mask used when ``dropout_p > 0``.
    ``softcap``: Gemma 2's logit soft-capping, ``s = softcap * tanh(s / softcap)`` before the mask.
    """
    qf, kf, vf, scale, _ = _prepare(q, k, v, scale)
    p, lse, _ = _probs(qf, kf, attn_mask, is_causal, scale, alibi_slopes, softcap)
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("dropout_p > 0 needs the keep-mask (dropout_mask) in the reference")
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, vf).to(q.dtype)
    return (out, lse) if return_lse else out


def _key_slice(t, start: int, stop: int):
    """Keys [start, stop) of a tensor broadcast along its last (key) dim; a size-1 key dim is kept whole."""
    if t is None or t.dim() == 0 or t.shape[-1] == 1:
        return t
    return t[..., start:stop]


def attention_chunked(q, k, v, attn_mask=None, is_causal=False, scale=None, alibi_slopes=None,
                      dropout_p: float = 0.0, dropout_mask=None, softcap=None, chunk: int = DEFAULT_KEY_CHUNK):
    """``attention_reference(..., return_lse=True)`` over key chunks of ``chunk`` keys with an online softmax
    (running row max, sum and output, fp32): at most [B, Hq, Nq, chunk] scores exist at once. Forward only
    (no autograd graph is kept: the op's backward is ``attention_reference_backward``).

    Example::

        >>> q = k = v = torch.randn(1, 2, 1000, 64)
        >>> out, lse = attention_chunked(q, k, v, is_causal=True, softcap=30.0, chunk=256)
    """
    if chunk < 1:
        raise ValueError(f"attention_chunked: chunk must be at least 1 key, got {chunk}")
    qf, kf, vf, scale, _ = _prepare(q, k, v, scale)
    B, H, Nq, Nk = qf.shape[0], qf.shape[1], qf.shape[2], kf.shape[2]
    row_max = qf.new_full((B, H, Nq, 1), float("-inf"))
    row_sum = qf.new_zeros((B, H, Nq, 1))
    acc = qf.new_zeros((B, H, Nq, vf.shape[-1]))
    with torch.no_grad():
        for start in range(0, Nk, chunk):
            stop = min(start + chunk, Nk)
            s, _ = _capped_scores(qf, kf[:, :, start:stop], scale, softcap)
            s = _masked(s, _key_slice(attn_mask, start, stop), is_causal, alibi_slopes, 0, start)
            new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
            shift = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)  # all masked so far
            e = torch.exp(s - shift)
            rescale = torch.exp(row_max - shift)
            row_sum = row_sum * rescale + e.sum(dim=-1, keepdim=True)   # the normaliser: un-dropped probabilities
            if dropout_p > 0.0:
                if dropout_mask is None:
                    raise ValueError("dropout_p > 0 needs the keep-mask (dropout_mask) in the reference")
                e = e * _key_slice(dropout_mask, start, stop).to(e.dtype) / (1.0 - dropout_p)
            acc = acc * rescale + torch.matmul(e, vf[:, :, start:stop])
            row_max = new_max
    empty = row_sum == 0
    out = acc / torch.where(empty, torch.ones_like(row_sum), row_sum)
    lse = torch.where(empty, torch.full_like(row_sum, float("-inf")), row_max + torch.log(row_sum))
    return out.to(q.dtype), lse.squeeze(-1)


def reduce_to_mask(dscores: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """The gradient of an additive ``attn_mask`` from the score gradient ``dscores`` [B, Hq, Nq, Nk]: summed
    over the dims the mask was broadcast along, in the mask's shape and dtype."""
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    dims = [i for i, (m, full) in enumerate(zip(shape, dscores.shape)) if m == 1 and full != 1]
    grad = dscores.sum(dim=dims, keepdim=True) if dims else dscores
    return grad.reshape(attn_mask.shape).to(attn_mask.dtype)


def attention_reference_backward(grad_out, q, k, v, attn_mask=None, is_causal=False, scale=None,
                                 alibi_slopes=None, dropout_p: float = 0.0, dropout_mask=None,
                                 return_dscores: bool = False, softcap=None):
    """(dq, dk, dv) of ``attention_reference`` written out (no autograd: the CPU backward of the op runs
    where autograd recording is off). Same algebra as the kernels: dS = P * (dP - rowsum(dP * P)).
    ``return_dscores``: also return dS [B, Hq, Nq, Nk] (fp32), the gradient of an additive mask before
    ``reduce_to_mask``. With ``softcap``, dS (the mask's gradient) is taken after the cap and multiplied by the
    cap's derivative ``1 - tanh^2`` on its way to q and k."""
    B, Hq, Nq, _ = q.shape
    Hkv = k.shape[1]
    qf, kf, vf, scale, group = _prepare(q, k, v, scale)
    p, _, dcap = _probs(qf, kf, attn_mask, is_causal, scale, alibi_slopes, softcap)
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
    ds_raw = ds if dcap is None else ds * dcap
    dq = torch.matmul(ds_raw, kf) * scale
    dk = torch.matmul(ds_raw.transpose(-1, -2), qf) * scale
    if group > 1:
        dk = dk.view(B, Hkv, group, *dk.shape[2:]).sum(2)
        dv = dv.view(B, Hkv, group, *dv.shape[2:]).sum(2)
    if return_dscores:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
