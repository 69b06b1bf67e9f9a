"""Plain-PyTorch cluster attention: the semantics of ``cpu.cpp`` and the oracle of its tests.

Query ``i`` of head ``h`` (cluster ``c = cluster[a, h, i]``) attends, with one softmax, to the ``w`` keys
``window[a, h // (Hq / Hkv), c]`` of its kv head, plus its own key ``i`` unless the window holds it (a key is
counted once), with an optional additive per-key bias (a key-padding mask). A row that sees nothing outputs 0.
KMeansRouting's bidirectional form.
"""
from __future__ import annotations

import torch

__all__ = ["cluster_attention_reference"]


def cluster_attention_reference(q, k, v, cluster, window, scale: float, key_bias=None) -> torch.Tensor:
    """``[A, Hq, N, Dv]`` for ``q [A, Hq, N, D]``, ``k [A, Hkv, N, D]``, ``v [A, Hkv, N, Dv]``, ``cluster [A, Hq, N]``
    and ``window [A, Hkv, C, w]`` (int64); ``key_bias [A|1, Hq|1, N]`` is added to the score of each key."""
    a, hq, n, _ = q.shape
    hkv = k.shape[1]
    kv_head = torch.arange(hq, device=q.device) // (hq // hkv)
    win = window[:, kv_head]                                                   # [A, Hq, C, w]
    keys_of = win.gather(2, cluster.unsqueeze(-1).expand(-1, -1, -1, win.shape[-1]))   # [A, Hq, N, w]
    own = torch.arange(n, device=q.device).view(1, 1, n, 1)
    idx = torch.cat([keys_of, own.expand(a, hq, n, 1)], -1)                    # [A, Hq, N, w + 1]
    hidden = torch.cat([torch.zeros_like(keys_of, dtype=torch.bool), (keys_of == own).any(-1, keepdim=True)], -1)
    kk, vv = k[:, kv_head].double(), v[:, kv_head].double()
    keys = kk.gather(2, idx.reshape(a, hq, -1, 1).expand(-1, -1, -1, kk.shape[-1])).view(a, hq, n, -1, kk.shape[-1])
    values = vv.gather(2, idx.reshape(a, hq, -1, 1).expand(-1, -1, -1, vv.shape[-1])).view(a, hq, n, -1, vv.shape[-1])
    scores = (keys @ q.double().unsqueeze(-1)).squeeze(-1) * scale               # [A, Hq, N, w + 1]
    if key_bias is not None:
        bias = key_bias.double().expand(a, hq, n)
        scores = scores + bias.gather(2, idx.reshape(a, hq, -1)).view(a, hq, n, -1)
    scores = scores.masked_fill(hidden, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    live = top > float("-inf")                                                 # a row that sees nothing: 0
    probs = torch.where(live, torch.softmax(torch.where(live, scores, torch.zeros_like(scores)), -1),
                        torch.zeros_like(scores))
    return (probs.unsqueeze(-2) @ values).squeeze(-2).to(q.dtype)
