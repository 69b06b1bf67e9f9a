"""Distance-decay attention: softmax attention with the bias ``log(gamma) * dist(i, j)`` (RMT MaSA, RetNet).

``dist`` is ``|i - j|`` along the sequence (``layout="1d"``), or the Manhattan distance between patch
positions on the site's vision grid (``layout="2d"``; prefix tokens such as CLS sit at distance 0 from
everything). As in RMT's code the decay is an additive logit bias, i.e. the "⊙ γ^dist" of the paper up to
normalisation. It equals exact attention when ``gamma == 1``. Training-free but function-changing:
calibrate ``gamma`` per layer. Same cost as exact attention (plus the bias): without a site mask the 1-D bias
is a strided view of one ``2N - 1`` vector fed to fused SDPA (causal: in row blocks over the keys up to each
block's last query); otherwise the bias is built a block of query rows at a time. Causal sites get RetNet's
1-D causal decay; 2-D decay has no causal form.

Example::

    model = rewrite.optimize(vit, {"_default": rewrite.Decay(gamma=0.9, layout="2d")}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import sympy
import torch
import torch.nn.functional as F

from ..actions import Action, RewriteError, register_action, register_handler
from ..cost import B, H, N, Nk
from . import _layout
from . import _dense
from . import _base

LAYOUTS = ("auto", "1d", "2d")

#: causal 1-D decay runs its queries in this many row blocks (each of at least ``_CAUSAL_BLOCK`` rows), each
#: against the keys up to its last query: about (1 + 1/splits) / 2 of the pairs are scored
_CAUSAL_SPLITS = 8
_CAUSAL_BLOCK = 256


@register_action
@dataclasses.dataclass(frozen=True)
class Decay(Action):
    """Softmax attention plus ``log(gamma) * distance``; ``layout`` picks 1-D or grid Manhattan distance."""

    gamma: float = 0.95
    layout: str = "auto"
    exact = False
    requires = (_base.SelfAttention("a distance decay needs query and key positions to agree"), _base.LayoutResolves())

    def __post_init__(self):
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not (0 < self.gamma <= 1):
            raise RewriteError(f"Decay(gamma={self.gamma!r}) is invalid: gamma must be a number in (0, 1]; "
                               "1 is exact attention, e.g. gamma=0.95.")
        _base.check_choice(self, "layout", self.layout, LAYOUTS)

    def flops(self) -> sympy.Expr:
        """Exact attention plus the distance bias (a multiply-add per score)."""
        return _layout.attention_flops(N, Nk) + 2 * B * H * N * Nk


class DecayAttention(_base.SDPAMixer):
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

    def distance(self, rows: slice, nk: int, device, dtype=torch.float32) -> torch.Tensor:
        """``dist[i, j]`` for the query rows ``rows`` (``[R, Nk]`` in ``dtype``; built in that dtype, with no
        integer ``[R, Nk]`` temporaries)."""
        if self.grid is None:
            i = torch.arange(rows.start, rows.stop, device=device, dtype=dtype)[:, None]
            return (i - torch.arange(nk, device=device, dtype=dtype)).abs_()
        p, (gh, gw) = self.prefix_tokens, self.grid
        ay = (torch.arange(gh, device=device, dtype=dtype)[:, None] - torch.arange(gh, device=device, dtype=dtype)).abs_()
        ax = (torch.arange(gw, device=device, dtype=dtype)[:, None] - torch.arange(gw, device=device, dtype=dtype)).abs_()
        ip = (torch.arange(rows.start, rows.stop, device=device) - p).clamp_(min=0)
        patches = (ay[ip // gw][:, :, None] + ax[ip % gw][:, None, :]).view(len(ip), gh * gw)   # [R, gh·gw]
        dist = torch.nn.functional.pad(patches, (p, 0))                  # prefix keys: distance 0
        if rows.start < p:                                               # prefix queries: distance 0
            dist[:p - rows.start] = 0
        return dist

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        c = _layout.canon(q, k, v, attn_mask, scale)
        bf, hkv, g, nq, nk, dd, dv = c.dims
        if nq != nk:
            raise ValueError(f"DecayAttention needs as many queries as keys (got {nq} and {nk})")
        if self.grid is not None and self.prefix_tokens + self.grid[0] * self.grid[1] != nk:
            raise ValueError(f"DecayAttention: grid {self.grid} with {self.prefix_tokens} prefix tokens does not "
                             f"cover {nk} tokens")
        causal = self.causal or bool(is_causal)
        log_gamma = math.log(self.gamma)
        if log_gamma == 0.0:
            return c.finish(_dense.sdpa_rows(c, c.k, c.v, c.bias, causal=causal, dropout_p=dropout_p))
        if self.grid is None and c.bias is None and nq > 0:
            return c.finish(self._toeplitz(c, log_gamma, causal, dropout_p))
        dt, dev = c.q.dtype, c.q.device
        extra = lambda rows: self.distance(rows, nk, dev, dt).mul_(log_gamma)  # noqa: E731
        return c.finish(_dense.sdpa_rows(c, c.k, c.v, c.bias, extra=extra, causal=causal, dropout_p=dropout_p))

    @staticmethod
    def _toeplitz(c: _layout.Canon, log_gamma: float, causal: bool, dropout_p) -> torch.Tensor:
        """1-D decay without a site mask: fused SDPA calls whose bias is a strided view of one ``2N - 1``
        vector (nothing N×N is built). The bias ``log_gamma·|i - j|`` depends on ``i - j``; with the queries
        in reverse order it depends on ``i' + j`` alone, which a view with strides (1, 1) expresses (the
        output rows are put back in order after). Causal: queries go in row blocks that score only the keys
        up to their last query (about half the pairs), the future keys of each block ``-inf`` in the same
        vector."""
        bf, hkv, g, n, _, dd, dv = c.dims
        t = torch.arange(2 * n - 1, device=c.q.device, dtype=c.q.dtype)
        u = (t - (n - 1)).abs_().mul_(log_gamma)                         # bias at i' + j = t, i' = N - 1 - i
        if causal:                                                       # key j after query i: i' + j > N - 1
            u[n:] = _layout.NEG_INF
        q = c.q.view(bf, hkv * g, n, dd)
        p = float(dropout_p or 0.0)
        step = max(_CAUSAL_BLOCK, -(-n // _CAUSAL_SPLITS)) if causal else n
        outs = []
        for a in range(0, n, step):
            b = min(n, a + step)
            # rows a .. b-1 reversed against keys 0 .. b-1: t = (b-1-i) + j, i.e. u[t + N - b]
            bias = u[n - b:].as_strided((b - a, b), (1, 1))
            out = F.scaled_dot_product_attention(q[..., a:b, :].flip(-2), c.k[..., :b, :], c.v[..., :b, :],
                                                 attn_mask=bias, dropout_p=p, scale=c.scale, enable_gqa=g > 1)
            outs.append(out.flip(-2))
        out = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
        return out.view(bf, hkv, g, n, dv)


@register_handler(Decay)
def decay_handler(action: Decay, call, site):
    grid, prefix, causal = _base.resolve_grid_layout("Decay", action.layout, call, site)
    if grid is not None:
        return DecayAttention(action.gamma, grid, prefix, causal=False)
    return DecayAttention(action.gamma, None, 0, causal=causal)
