"""Distance-decay attention: softmax attention with the bias ``log(gamma) * dist(i, j)`` (RMT MaSA, RetNet).

``dist`` is ``|i - j|`` along the sequence (``layout="1d"``), or the Manhattan distance between patch
positions on the site's vision grid (``layout="2d"``; prefix tokens such as CLS sit at distance 0 from
everything). As in RMT's code the decay is an additive logit bias, i.e. the "⊙ γ^dist" of the paper up to
normalisation. It equals exact attention when ``gamma == 1``. Training-free but function-changing:
calibrate ``gamma`` per layer. Same cost as exact attention (plus the bias); scores are built a block of
query rows at a time. Causal sites get RetNet's 1-D causal decay; 2-D decay has no causal form.

Example::

    model = rewrite.optimize(vit, {"_default": rewrite.Decay(gamma=0.9, layout="2d")}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import sympy
import torch

from ..actions import Action, Decline, RewriteError, register_action, register_handler
from ..cost import B, H, N, Nk
from . import _util_a as U

LAYOUTS = ("auto", "1d", "2d")


@register_action
@dataclasses.dataclass(frozen=True)
class Decay(Action):
    """Softmax attention plus ``log(gamma) * distance``; ``layout`` picks 1-D or grid Manhattan distance."""

    gamma: float = 0.95
    layout: str = "auto"
    exact = False

    def __post_init__(self):
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not (0 < self.gamma <= 1):
            raise RewriteError(f"Decay(gamma={self.gamma!r}) is invalid: gamma must be a number in (0, 1]; "
                               "1 is exact attention, e.g. gamma=0.95.")
        U.check_choice(self, "layout", self.layout, LAYOUTS)

    def flops(self) -> sympy.Expr:
        """Exact attention plus the distance bias (a multiply-add per score)."""
        return U.attention_flops(N, Nk) + 2 * B * H * N * Nk


class DecayAttention(U.SDPAMixer):
    """SDPA-signature attention with a distance-decay logit bias; ``grid=(gh, gw)`` for Manhattan distance."""

    __name__ = "decay_attention"

    def __init__(self, gamma: float = 0.95, grid: Optional[tuple] = None, prefix_tokens: int = 0,
                 causal: bool = False):
        super().__init__()
        self.gamma = float(gamma)
        self.grid = tuple(int(x) for x in grid) if grid else None
        self.prefix_tokens, self.causal = int(prefix_tokens or 0), bool(causal)

    def _config(self) -> dict:
        return {"gamma": self.gamma, "grid": self.grid, "prefix_tokens": self.prefix_tokens, "causal": self.causal}

    def distance(self, rows: slice, nk: int, device) -> torch.Tensor:
        """``dist[i, j]`` for the query rows ``rows`` (float, ``[R, Nk]``)."""
        i = torch.arange(rows.start, rows.stop, device=device)
        j = torch.arange(nk, device=device)
        if self.grid is None:
            return (i[:, None] - j[None, :]).abs().float()
        p, gw = self.prefix_tokens, self.grid[1]
        ip, jp = (i - p).clamp(min=0), (j - p).clamp(min=0)
        dist = ((ip // gw)[:, None] - (jp // gw)[None, :]).abs() + ((ip % gw)[:, None] - (jp % gw)[None, :]).abs()
        prefix = (i < p)[:, None] | (j < p)[None, :]
        return dist.masked_fill(prefix, 0).float()

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        c = U.canon(q, k, v, attn_mask, scale)
        bf, hkv, g, nq, nk, dd, dv = c.dims
        if nq != nk:
            raise ValueError(f"DecayAttention needs as many queries as keys (got {nq} and {nk})")
        if self.grid is not None and self.prefix_tokens + self.grid[0] * self.grid[1] != nk:
            raise ValueError(f"DecayAttention: grid {self.grid} with {self.prefix_tokens} prefix tokens does not "
                             f"cover {nk} tokens")
        causal = self.causal or bool(is_causal)
        log_gamma = math.log(self.gamma)
        extra = None
        if log_gamma != 0.0:
            extra = lambda rows: log_gamma * self.distance(rows, nk, c.q.device)  # noqa: E731
        return c.finish(U.sdpa_rows(c, c.k, c.v, c.bias, extra=extra, causal=causal, dropout_p=dropout_p))


@register_handler(Decay)
def decay_handler(action: Decay, call, site):
    if U.is_cross(site):
        nq, nk = U.site_lengths(site)
        return Decline(f"a distance decay needs query and key positions to agree; this site has Nq={nq}, "
                       f"Nk={nk} (cross-attention or KV-cache decoding)")
    resolved = U.resolve_grid_layout("Decay", action.layout, call, site)
    if isinstance(resolved, Decline):
        return resolved
    grid, prefix, causal = resolved
    if grid is not None:
        return DecayAttention(action.gamma, grid, prefix, causal=False)
    return DecayAttention(action.gamma, None, 0, causal=causal)
