"""Top-k (selective hard) attention: each query keeps its ``k`` largest scores and renormalises over them.

AxFormer's selective hard attention; SEA's exact-sparse stage with an exact (not estimated) mask. The
site's mask and causality apply before the selection, so masked keys are never picked over visible ones.
It equals exact attention when ``k >= Nk`` (and then runs as fused SDPA). Selection needs every score, so
the time stays O(N·Nk·d); scores are built a block of query rows at a time into one reused buffer (memory
O(rows·Nk)); the selection first picks the ``k`` key groups with the largest maxima, then the ``k`` largest of
their members (see :func:`select_top`); the value product is a weighted gather of the kept keys only. Works for any Nq, Nk (cross-attention, KV-cache decoding) with SDPA's top-left
``is_causal`` alignment.

Example::

    model = rewrite.optimize(model, {"re:.*layer\\.[0-2]\\..*": rewrite.TopK(k=64)}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.nn.functional as F

from ..actions import Action, register_action, register_handler
from ..cost import SOFTMAX_FLOPS_PER_SCORE, B, H, N, Nk, d, dv
from . import _layout
from . import _dense
from . import _base


@register_action
@dataclasses.dataclass(frozen=True)
class TopK(Action):
    """Keep the ``k`` largest scores of each query (after the site's mask), renormalised."""

    k: int = 64
    exact = False

    def __post_init__(self):
        _base.check_int(self, "k", self.k, 1, "Give how many keys each query keeps, e.g. k=64.")

    def flops(self) -> sympy.Expr:
        """All scores (2d each), a ~1-flop selection pass, softmax over the kept keys and the value product
        over the kept keys only (a weighted gather); exact attention when ``k`` covers every key (what the
        module then runs)."""
        kept = sympy.Min(self.k, Nk)
        selective = B * H * N * Nk * (2 * d + 1) + B * H * N * kept * (SOFTMAX_FLOPS_PER_SCORE + 2 * dv)
        exact = B * H * N * Nk * (2 * d + 2 * dv + SOFTMAX_FLOPS_PER_SCORE)
        return sympy.Piecewise((exact, self.k >= Nk), (selective, True))


def _group_size(nk: int, kk: int) -> int:
    """Keys per group of the two-stage selection (1: select directly). Picking the ``k`` groups with the
    largest maxima first, then the ``k`` largest of their ``k·gs`` members, sorts ``nk/gs + k·gs`` values a
    row instead of ``nk``; ``gs ≈ sqrt(nk / k)`` balances the two, and it pays once the groups are many."""
    gs = 1
    while 4 * gs * gs * kk <= nk:
        gs *= 2
    return gs if gs > 1 and nk >= 4 * kk * gs else 1


def select_top(sc: torch.Tensor, kk: int, gs: int) -> tuple:
    """``sc.topk(kk, -1, sorted=False)`` for ``sc [..., Nk]`` with ``Nk`` a multiple of ``gs``.

    With ``gs > 1`` the keys form ``Nk/gs`` groups (key ``j`` in group ``j mod (Nk/gs)``). Every key among the
    ``kk`` largest lies in a group whose maximum is among the ``kk`` largest group maxima (fewer than ``kk``
    other keys beat it, so fewer than ``kk`` groups have a larger maximum), so the top ``kk`` of those groups'
    members are the top ``kk`` of the row: the same values as a plain top-k (equal scores may pick
    different keys, as top-k itself may)."""
    if gs == 1:
        return sc.topk(kk, dim=-1, sorted=False)
    *lead, nk = sc.shape
    ng = nk // gs
    gmax = sc.view(*lead, gs, ng).amax(dim=-2)                         # [..., Nk/gs]
    gs2 = _group_size(ng, kk)
    groups = select_top(gmax, kk, gs2 if ng % gs2 == 0 else 1)[1]     # [..., kk] (the same way, recursively)
    members = (groups.unsqueeze(-1) + torch.arange(0, nk, ng, device=sc.device)).view(*lead, kk * gs)
    vals, pick = torch.gather(sc, -1, members).topk(kk, dim=-1, sorted=False)
    return vals, torch.gather(members, -1, pick)


class TopKAttention(_base.SDPAMixer):
    """SDPA-signature top-k attention; ``causal`` adds the causal pattern (a site proven causal)."""

    __name__ = "top_k_attention"

    def __init__(self, k: int = 64, causal: bool = False):
        super().__init__()
        self.k, self.causal = int(k), bool(causal)

    def _config(self) -> dict:
        return {"k": self.k, "causal": self.causal}

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        c = _layout.canon(q, k, v, attn_mask, scale)
        bf, hkv, g, nq, nk, dd, dv = c.dims
        causal = self.causal or bool(is_causal)
        if self.k >= nk:   # every key kept: exact attention, fused
            return c.finish(_dense.sdpa_rows(c, c.k, c.v, c.bias, causal=causal, dropout_p=dropout_p))
        kk = self.k
        ip = not (torch.is_grad_enabled() and any(t.requires_grad for t in (c.q, c.k, c.v, c.bias)
                                                  if t is not None))
        qs = c.q * c.scale
        gs = _group_size(nk, kk)
        # keys padded to a multiple of the group size (scores of the padding are -inf, never picked first)
        keys = c.k if nk % gs == 0 else torch.nn.functional.pad(c.k, (0, 0, 0, gs - nk % gs))
        # values as one table [Bf·Hkv·Nk, Dv]: each query's output is the weighted sum of its kept rows
        table = c.v.reshape(bf * hkv * nk, dv)
        base = (torch.arange(bf * hkv, device=c.v.device) * nk).view(bf, hkv, 1, 1, 1)
        chunks = list(_dense.row_chunks(c))
        if ip:
            # every chunk's scores in one buffer and its output in place: chunk-sized blocks freed between
            # kept results would fragment the heap (resident memory growing chunk after chunk)
            longest = max(rows.stop - rows.start for rows in chunks)
            buf = qs.new_empty(bf * hkv * g * longest * max(keys.shape[-2], -(-nk // gs) * gs))
            out_all = qs.new_empty(bf, hkv, g, nq, dv)
        outs = []
        for rows in chunks:
            r = rows.stop - rows.start
            # causal: keys after the chunk's last query are seen by none of its rows
            width = min(nk, rows.stop) if causal else nk
            gsr = _group_size(width, kk) if causal else gs
            wpad = -(-width // gsr) * gsr
            if wpad > keys.shape[-2]:
                keys = torch.nn.functional.pad(c.k, (0, 0, 0, wpad - nk))
            if ip:
                q3 = qs[..., rows, :].reshape(bf * hkv, g * r, dd)
                k3 = keys[..., :wpad, :].reshape(bf * hkv, wpad, dd).transpose(1, 2)
                sc = torch.bmm(q3, k3, out=buf[:q3.shape[0] * g * r * wpad].view(-1, g * r, wpad))
                sc = sc.view(bf, hkv, g, r, wpad)
            else:
                sc = _dense.grouped_scores(qs[..., rows, :], keys[..., :wpad, :])    # [Bf, Hkv, G, R, wpad]
            b = _dense.bias_rows(c.bias, rows)
            if b is not None:
                b = b[..., :width]
                if ip:
                    sc[..., :width].add_(b)
                else:
                    sc = torch.cat([sc[..., :width] + b, sc[..., width:]], -1)
            if causal and width > rows.start + 1:
                keep = _dense.causal_keep(rows, nq, wpad, sc.device)
                sc = sc.masked_fill_(~keep, _layout.NEG_INF) if ip else sc.masked_fill(~keep, _layout.NEG_INF)
            if wpad > width:
                sc = sc.index_fill_(-1, torch.arange(width, wpad, device=sc.device), _layout.NEG_INF) if ip else \
                    sc.index_fill(-1, torch.arange(width, wpad, device=sc.device), _layout.NEG_INF)
            kr = min(kk, width)
            vals, idx = select_top(sc, kr, gsr if kr == kk else 1)
            p = _dense.dropout(_dense.safe_softmax(vals), dropout_p)                      # [Bf, Hkv, G, R, k]
            # a padding column is picked only with weight 0 (fewer than k visible keys): keep it in range
            idx = (idx.clamp_(max=nk - 1) if ip else idx.clamp(max=nk - 1)) if wpad > nk else idx
            idx = (idx + base).reshape(-1, kr)
            out = F.embedding_bag(idx, table, per_sample_weights=p.reshape(-1, kr), mode="sum").view(bf, hkv, g, r, dv)
            if ip:
                out_all[..., rows, :] = out
            else:
                outs.append(out)
        if ip:
            return c.finish(out_all)
        return c.finish(torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0])


@register_handler(TopK)
def top_k_handler(action: TopK, call, site):
    return TopKAttention(action.k, causal=bool(getattr(call, "is_causal", False)))
