"""Plain-PyTorch routed block attention: the semantics of ``cpu.cpp`` and the oracle of its tests.

The rows after the first ``prefix`` ones are cut into ``nb`` blocks of ``block`` rows (the last may be short).
Query block ``i`` of head ``h`` attends to the key blocks ``blocks[a, h, i, 0..t-1]`` (same cut of the keys, kv
head ``h // (Hq / Hkv)``; the missing rows of a short block are hidden) followed by the ``E`` extra keys
``extra_k[f // extra_per]``, where ``f = (a·Hq + h)·nb + i`` (its head's pooled blocks or sinks, say), with the
additive ``mask [M, nb|1, block|1, t·block + E]`` (query block ``f`` reads ``mask[f // nb if M > 1 else 0, i]``).
A block index -1 is no block: its ``block`` columns are hidden (how per-head block counts share one call).
A row whose every score is -inf outputs 0. The first ``prefix`` rows of the output are left to the caller (0
here).
"""
from __future__ import annotations

import torch

__all__ = ["routed_blocks_reference"]


def routed_blocks_reference(q, k, v, blocks, block: int, prefix: int = 0, extra_k=None, extra_v=None,
                            extra_per: int = 1, mask=None, scale: float = 1.0) -> torch.Tensor:
    """``[A, Hq, N, Dv]`` for ``q [A, Hq, N, D]``, ``k [A, Hkv, N, D]``, ``v [A, Hkv, N, Dv]``, ``blocks [A, Hq, nb,
    t]`` (int64)."""
    a, hq, n, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    nb, t = blocks.shape[-2:]
    slots = nb * block

    def cut(x):                                    # [A, H, nb, block, D] of the rows after the prefix, 0-padded
        body = x[:, :, prefix:].double()
        return torch.nn.functional.pad(body, (0, 0, 0, slots - body.shape[2])).view(a, x.shape[1], nb, block, -1)

    qb, kb, vb = cut(q), cut(k), cut(v)
    present = torch.nn.functional.pad(torch.ones(n - prefix, dtype=torch.bool, device=q.device),
                                      (0, slots - (n - prefix))).view(nb, block)
    kv_head = torch.arange(hq, device=q.device) // (hq // hkv)
    pick = blocks.reshape(a, hq, nb * t).clamp(min=0)                 # -1: no block (hidden below)
    keys = kb[:, kv_head].gather(2, pick[..., None, None].expand(-1, -1, -1, block, kb.shape[-1]))
    values = vb[:, kv_head].gather(2, pick[..., None, None].expand(-1, -1, -1, block, dv))
    keys, values = keys.view(a, hq, nb, t * block, -1), values.view(a, hq, nb, t * block, dv)
    seen = (present[blocks.clamp(min=0)] & (blocks >= 0).unsqueeze(-1)).view(a, hq, nb, 1, t * block)
    scores = (qb @ keys.transpose(-1, -2)) * scale                     # [A, Hq, nb, block, t·block]
    scores = scores.masked_fill(~seen, float("-inf"))
    if extra_k is not None and extra_k.shape[1]:
        rows = torch.arange(a * hq * nb, device=q.device) // extra_per
        ek, ev = extra_k.double()[rows].view(a, hq, nb, -1, extra_k.shape[-1]), extra_v.double()[rows].view(a, hq, nb, -1, dv)
        scores = torch.cat([scores, (qb @ ek.transpose(-1, -2)) * scale], -1)
        values = torch.cat([values, ev], -2)
    if mask is not None:
        m = mask.double()
        m = m.view(1, 1, *m.shape[1:]) if m.shape[0] == 1 else m.view(a, hq, *m.shape[1:])
        scores = scores + m
    top = scores.amax(-1, keepdim=True)
    live = top > float("-inf")
    weights = torch.where(live, torch.exp(scores - torch.where(live, top, torch.zeros_like(top))),
                          torch.zeros_like(scores))
    total = weights.sum(-1, keepdim=True)
    out = (weights @ values) / torch.where(total > 0, total, torch.ones_like(total))
    out = out.reshape(a, hq, slots, dv)[:, :, :n - prefix]
    return torch.cat([out.new_zeros(a, hq, prefix, dv), out], 2).to(q.dtype)
