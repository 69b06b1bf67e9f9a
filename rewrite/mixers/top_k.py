"""Top-k (selective hard) attention: each query keeps its ``k`` largest scores and renormalises over them.

AxFormer's selective hard attention; SEA's exact-sparse stage with an exact (not estimated) mask. The
site's mask and causality apply before the selection, so masked keys are never picked over visible ones.
It equals exact attention when ``k >= Nk``. Selection needs every score, so the time stays O(N·Nk·d);
scores are built a block of query rows at a time (memory O(rows·Nk)) and the value product touches
only the kept keys. Works for any Nq, Nk (cross-attention, KV-cache decoding) with SDPA's top-left
``is_causal`` alignment.

Example::

    model = rewrite.optimize(model, {"re:.*layer\\.[0-2]\\..*": rewrite.TopK(k=64)}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses

import sympy
import torch

from ..actions import Action, register_action, register_handler
from ..cost import SOFTMAX_FLOPS_PER_SCORE, B, H, N, Nk, d, dv
from . import _util_a as U


@register_action
@dataclasses.dataclass(frozen=True)
class TopK(Action):
    """Keep the ``k`` largest scores of each query (after the site's mask), renormalised."""

    k: int = 64
    exact = False

    def __post_init__(self):
        U.check_int(self, "k", self.k, 1, "Give how many keys each query keeps, e.g. k=64.")

    def flops(self) -> sympy.Expr:
        """All scores (2d each), a ~1-flop selection pass, softmax over the kept keys, and the value product:
        over the kept keys by a gather for small k, else a dense product with the zeroed rows (what the
        module computes, see ``dense_values`` in its forward)."""
        kept = sympy.Min(self.k, Nk)
        sparse_values = B * H * N * kept * 2 * dv
        dense_values = B * H * N * Nk * 2 * dv
        values = dense_values if self.k > 16 else sympy.Piecewise((dense_values, 8 * self.k > Nk),
                                                                   (sparse_values, True))
        return B * H * N * Nk * (2 * d + 1) + B * H * N * kept * SOFTMAX_FLOPS_PER_SCORE + values


class TopKAttention(U.SDPAMixer):
    """SDPA-signature top-k attention; ``causal`` adds the causal pattern (a site proven causal)."""

    __name__ = "top_k_attention"

    def __init__(self, k: int = 64, causal: bool = False):
        super().__init__()
        self.k, self.causal = int(k), bool(causal)

    def _config(self) -> dict:
        return {"k": self.k, "causal": self.causal}

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        c = U.canon(q, k, v, attn_mask, scale)
        bf, hkv, g, nq, nk, dd, dv = c.dims
        causal = self.causal or bool(is_causal)
        kk = min(self.k, nk)
        dense_values = kk > 16 or 8 * kk > nk   # a gather beats a dense product only for very small k
        outs = []
        for rows in U.row_chunks(c):
            sc = U.grouped_scores(c.q[..., rows, :], c.k).mul_(c.scale)
            b = U.bias_rows(c.bias, rows)
            if b is not None:
                sc = sc + b
            if causal:
                sc = sc.masked_fill(~U.causal_keep(rows, nq, nk, sc.device), U.NEG_INF)
            vals, idx = sc.topk(kk, dim=-1, sorted=False)
            p = U.dropout(U.safe_softmax(vals), dropout_p)
            if dense_values:
                dense = torch.zeros_like(sc).scatter_(-1, idx, p)
                outs.append(U.grouped_values(dense, c.v))
            else:
                r = rows.stop - rows.start
                vsrc = c.v.unsqueeze(2).expand(bf, hkv, g, nk, dv)
                vsel = torch.gather(vsrc, 3, idx.reshape(bf, hkv, g, r * kk, 1).expand(bf, hkv, g, r * kk, dv))
                outs.append((p.unsqueeze(-2) @ vsel.view(bf, hkv, g, r, kk, dv)).squeeze(-2))
        return c.finish(torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0])


@register_handler(TopK)
def top_k_handler(action: TopK, call, site):
    return TopKAttention(action.k, causal=bool(getattr(call, "is_causal", False)))
