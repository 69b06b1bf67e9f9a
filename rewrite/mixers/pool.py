"""Pooling token mixer (PoolFormer's token mixer; PoNet's local max-pooling).

The attention output of token i becomes a pooled average (``kind="avg"``) or maximum (``kind="max"``) of the
values ``v`` in a window of ``size`` tokens around it; queries and keys are not used (no ``q·kᵀ``).

* 1-D (text, or ``layout="1d"``): the centred window ``|i - j| <= size // 2``; under a causal mask (proven, or
  found at run time, e.g. a padded decoder batch) the last ``size`` tokens up to and including i, with
  queries at the last Nq positions (KV-cache steps of a proven-causal site).
* 2-D (vision, when the site's ``grid`` is known, or ``layout="2d"``): a ``size × size`` window on the
  ``grid`` of patch tokens; the site's ``prefix_tokens`` (e.g. a CLS token) get the global pool over
  all tokens. 2-D has no causal form: causal sites run 1-D (``layout="2d"`` declines them).

PoolFormer's mixer is ``pool(x) - x`` because its block adds x back; here the mixer replaces the attention
core (before the output projection), whose output is an average of values, so it returns ``pool(v)``
itself. Average pooling excludes padding (``count_include_pad=False``).

**Training needed.** PoolFormer/PoNet train this mixer from scratch; swapped into a pretrained model it
discards the learned attention pattern, and the error the pipeline measures and reports is large. Use it
for retraining or distillation experiments, not as a drop-in.

Masks: a padding mask removes masked tokens from every window (a window with no valid token gives 0);
causal masks select the causal window; any other 1-D mask is applied inside the centred window. Sites
with learned or ALiBi score biases are declined, and so is Nq != Nk at a site not proven causal: cross-
attention and a decoder's KV-cache steps look alike there (a padding-only mask), and only the latter has a
meaning for pooling, so a decoder pooled at prefill falls back to Exact for its cached steps (reported).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import sympy
import torch
import torch.nn.functional as F
from torch import nn

from .. import cost
from ..actions import Action, Decline, RewriteError, register_action, register_handler
from . import _layout
from . import _masks
from . import _base

KINDS = ("avg", "max")


@register_action
@dataclasses.dataclass(frozen=True)
class Pool(Action):
    """Average or max pooling of the values over a window of ``size`` tokens (1-D or 2-D, see module docs).

    ``layout``: ``"auto"`` (2-D where the site's image grid is known and it is not causal, else 1-D), ``"1d"`` or
    ``"2d"``; ``dims=1``/``dims=2`` is a deprecated alias.
    Training needed: the error of a training-free swap is large (measured and reported).
    """

    kind: str = "avg"
    size: int = 3
    layout: str = "auto"
    dims: Optional[int] = None  # deprecated alias of layout (1 -> "1d", 2 -> "2d")
    exact = False
    requires = (_base.NoScoreBias(), _base.LayoutResolves())

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RewriteError(f"Pool(kind={self.kind!r}) is not known; use 'avg' or 'max'.")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1 or self.size % 2 == 0:
            raise RewriteError(f"Pool(size={self.size!r}) must be an odd positive integer (the window is centred "
                               "on each token), e.g. Pool(size=3).")
        _base.check_layout(self)

    def flops(self, causal: bool = False) -> sympy.Expr:
        """One add (or compare) per value element in the window, plus the average's division."""
        B, H, N, dv = (cost.SYMBOLS[s] for s in ("B", "H", "N", "dv"))
        window = self.size ** 2 if self.layout == "2d" else self.size
        expr = N * dv * window + (N * dv if self.kind == "avg" else 0)
        return sympy.expand(B * H * expr)


class PoolMixer(nn.Module):
    """Pooling mixer with SDPA's call signature (see the module docstring). ``grid`` None means 1-D."""

    def __init__(self, kind: str = "avg", size: int = 3, grid: Optional[tuple] = None, prefix_tokens: int = 0):
        super().__init__()
        self.__name__ = f"pool_{kind}"
        self.kind, self.size, self.grid, self.prefix = kind, size, (tuple(grid) if grid else None), prefix_tokens

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        _base.refuse_dropout(self, dropout_p)
        if _layout.is_shape_inference(q, k, v, attn_mask):
            return _layout.fake_output(q, v)
        dtype = q.dtype
        q, k, v, _ = _layout.prepare(q, k, v, scale)
        nq, nk = q.shape[-2], k.shape[-2]
        plan = _masks.plan_mask(attn_mask, is_causal, nq, nk, v.dtype)
        lead = torch.broadcast_shapes(q.shape[:-2], v.shape[:-2])
        v = v.expand(*lead, nk, v.shape[-1])
        if self.grid is not None:
            out = self._pool2d(v, plan)
        else:
            out = self._pool1d(v, plan)
        return out.to(dtype)

    # ------------------------------------------------------------------------------------------- 1-D
    def _pool1d(self, v: torch.Tensor, plan: _masks.MaskPlan) -> torch.Tensor:
        nq, nk = plan.nq, plan.nk
        causal = plan.kind == "causal"
        offset = plan.offset if causal else nk - nq
        pos = torch.arange(nq, device=v.device) + offset
        span = (torch.arange(-(self.size - 1), 1, device=v.device) if causal else
                torch.arange(-(self.size // 2), self.size // 2 + 1, device=v.device))
        idx = pos[:, None] + span[None, :]                                   # [Nq, L]
        inside = (idx >= 0) & (idx < nk)
        safe = idx.clamp(0, max(nk - 1, 0))
        if plan.kind == "general":
            allowed = plan.allowed(v.device)                                 # [..., Nq, Nk]
            allowed = allowed.expand(*allowed.shape[:-2], nq, nk)
            ok = torch.gather(allowed, -1, safe.expand(*allowed.shape[:-2], nq, safe.shape[-1]))
        elif plan.key_bias is not None:
            ok = plan.key_valid()[..., 0, :][..., safe]                     # [..., Nq, L]
        else:
            ok = torch.ones_like(inside)
        ok = ok & inside
        lead = v.shape[:-2]
        ok = ok.expand(*lead, nq, idx.shape[-1])
        vw = v[..., safe, :]                                                 # [..., Nq, L, dv]
        return self._reduce(vw, ok.unsqueeze(-1), dim=-2)

    def _reduce(self, vw: torch.Tensor, ok: torch.Tensor, dim: int) -> torch.Tensor:
        if self.kind == "avg":
            okf = ok.to(vw.dtype)
            return (vw * okf).sum(dim) / okf.sum(dim).clamp_min(1.0)
        out = vw.masked_fill(~ok, float("-inf")).amax(dim)
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))

    # ------------------------------------------------------------------------------------------- 2-D
    def _pool2d(self, v: torch.Tensor, plan: _masks.MaskPlan) -> torch.Tensor:
        gh, gw = self.grid
        p = self.prefix
        n = plan.nk
        if plan.nq != n or n != p + gh * gw:
            raise RewriteError(f"Pool 2-D: {plan.nq} queries / {n} tokens do not match the grid {gh}x{gw} with "
                               f"{p} prefix token(s).")
        if plan.kind not in ("none", "keys"):
            raise RewriteError("Pool 2-D has no causal or general-mask form; keep this site Exact.")
        lead, dv = v.shape[:-2], v.shape[-1]
        valid = plan.key_valid()
        ok = (valid[..., 0, :] if valid is not None else torch.ones(n, dtype=torch.bool, device=v.device))
        ok = ok.expand(*lead, n)
        flat_v = v.reshape(-1, n, dv)
        flat_ok = ok.reshape(-1, n)
        img = flat_v[:, p:, :].transpose(1, 2).reshape(-1, dv, gh, gw)
        img_ok = flat_ok[:, p:].reshape(-1, 1, gh, gw)
        s, pad = self.size, self.size // 2
        if self.kind == "avg":
            okf = img_ok.to(img.dtype)
            num = F.avg_pool2d(img * okf, s, stride=1, padding=pad, count_include_pad=True)
            den = F.avg_pool2d(okf, s, stride=1, padding=pad, count_include_pad=True)
            pooled = num / den.clamp_min(1.0 / (s * s))
            pooled = torch.where(den > 0, pooled, torch.zeros_like(pooled))
        else:
            pooled = F.max_pool2d(img.masked_fill(~img_ok, float("-inf")), s, stride=1, padding=pad)
            pooled = torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))
        grid_out = pooled.reshape(-1, dv, gh * gw).transpose(1, 2)          # [M, gh*gw, dv]
        parts = []
        if p:
            glob = self._reduce(flat_v, flat_ok.unsqueeze(-1), dim=-2)       # [M, dv]
            parts.append(glob.unsqueeze(1).expand(-1, p, dv))
        parts.append(grid_out)
        return torch.cat(parts, dim=1).reshape(*lead, n, dv)


@register_handler(Pool)
def pool_handler(action: Pool, call, site):
    grid, prefix, causal = _base.resolve_grid_layout("Pool", action.layout, call, site)
    if _base.is_cross(site) and not causal:
        return Decline("Pool mixes the values of the query's own sequence; cross-attention and KV-cache decoding "
                       "without a proven causal mask (Nq != Nk) are not supported")
    return PoolMixer(action.kind, action.size, grid, prefix)
