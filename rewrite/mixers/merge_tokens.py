"""Block-level token merging (ToMe): after a site's block, merge the ``r`` most similar tokens of the residual
stream, so the MLP, the residual stream and every later layer run on fewer tokens.

This file holds the action, its handler and the run-time pieces the graph pass inserts
(``passes/merge_tokens.py`` proves the graph can take them and rewires it):

* :class:`TokenMerger` — ToMe's bipartite soft matching on the site's keys (mean over heads, cosine): tokens
  alternate into sets A and B, each A token picks its most similar B token, and the ``r`` best pairs merge by a
  size-weighted average. It carries, per batch element, each token's *size* (how many original tokens it
  stands for), *owner* (the current index of every original token, for unmerging) and *rep* (the original
  index of one visible member, to merge masks with their tokens). Tokens a padding mask hides merge first, among
  themselves (free: no real token sees them), and into visible ones only when nothing else is left; the first
  ``protect_first`` tokens (CLS) are never merged.
* :func:`proportional_mask` — a later site's mask merged with its tokens (a merged token is visible where its
  representative is) plus ``log(size)`` on its keys: ToMe's proportional attention.
* :func:`unmerge_tokens` — at the model's outputs every original token gets its merged token's value back,
  so every output keeps its shape (and a mean over tokens is the size-weighted mean).

The site itself is lowered exactly (SDPA); the approximation is the merge after it. ``r = 0`` is exact.

Example::

    model = rewrite.optimize(bert, {"_default": rewrite.MergeTokens(r=32)}, example_kwargs=batch)
    print(model.rewrite_report)      # the tokens kept per layer, the error at the outputs

For calibration (``auto``): a per-site switch (``SiteSwitch``) cannot serve a block-level action, since it changes
the shape of everything after the block. But :class:`TokenMerger` reads ``self.r`` on every call and ``r = 0``
merges nothing (exactly the original), so one graph rewritten with ``MergeTokens`` at every candidate site can
be calibrated by setting ``.r`` (and ``.window``) on its mergers between runs: the session lists them by site
(``Session.block_modules``) and ``merge_schedule.py`` does this.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import sympy
import torch
import torch.nn.functional as F

from ..actions import Action, Decline, register_action, register_handler
from ..cost import B, H, N, d
from ..sites import MASKED_BELOW
from . import _base
from . import _masks

#: visibility tags added to the cosine of a pair (a rank-2 product, no N x N mask): padding with padding +9, visible
#: with visible +4, padding with visible -2 (cosines span 2). Padding merges first, among itself: no real token
#: sees it, so those merges cost real tokens nothing; padding and a real token merge only when nothing else is left
_VISIBLE_TAG, _MASKED_TAG = (2.0, 0.0), (-1.0, math.sqrt(8.0))
#: the score of a pair farther apart than the window: below any cosine plus tags, above a protected token's -inf
_FAR = -1e4
#: averaging weight of a padding token's value, relative to a visible one (a group of padding only: by size)
_MASKED_WEIGHT = 1e-6


@register_action
@dataclasses.dataclass(frozen=True)
class MergeTokens(Action):
    """Merge the ``r`` most similar tokens after this site's block (ToMe); later layers run on fewer tokens.

    ``metric``: what the similarity is measured on: ``"hidden"``, the residual stream being merged, or ``"keys"``,
    the site's keys averaged over heads (ToMe's choice on ViT). On MiniLM with real text (1x256, r=16 after
    every layer) the hidden states keep the embedding cosine at 0.993 where the keys give 0.980.

    ``window``: merge only tokens whose positions (the mean original position of their members) are at most
    ``window`` apart (None: any two tokens, as ToMe). Text is locally coherent; two similar tokens far apart
    (the same word in two sentences) carry different context, and merging them costs more than merging
    neighbours. On MiniLM at 4x512 with r=48 after every layer, ``window=64`` cuts the embedding error by a
    seventh on the calibration text and by a fifth on held-out text (BENCHMARKS.md). Pairs outside the window
    merge only when a token has no partner within it (``r`` is a count).
    """

    r: int = 16
    protect_first: int = 1
    metric: str = "hidden"
    window: Optional[int] = None
    exact = False
    block_level = True
    reads_example_mask = True

    def __post_init__(self):
        _base.check_int(self, "r", self.r, 0, "Give how many tokens to merge after this block, e.g. r=16 (0 is "
                        "exact).")
        _base.check_int(self, "protect_first", self.protect_first, 0, "Give how many leading tokens are never "
                        "merged, e.g. 1 for a [CLS] token.")
        _base.check_choice(self, "metric", self.metric, ("hidden", "keys"))
        if self.window is not None:
            _base.check_int(self, "window", self.window, 1, "Give the largest distance in tokens between two tokens "
                            "that may merge, e.g. window=64, or None for any two.")

    def flops(self) -> sympy.Expr:
        """This site's attention (exact, on the tokens it gets) plus the matching of its keys (cosine of N/2 x N/2
        pairs, mean over heads): the savings are in later layers, which run on ``tokens_after(N)`` tokens."""
        from ..cost import exact_flops
        return exact_flops() + B * H * N * d + 2 * B * (N / 2) ** 2 * d

    def tokens_after(self, n: int) -> int:
        """Tokens left after this merge from ``n`` (ToMe's bipartite matching merges at most half of them)."""
        return n - merged_count(self.r, n, self.protect_first)


def merged_count(r: int, n: int, protect_first: int) -> int:
    """How many tokens a merge of ``r`` removes from ``n``: at most the unprotected tokens of set A (even
    positions), and none when set B (odd positions) has no unprotected token."""
    a_free = (n + 1) // 2 - (protect_first + 1) // 2
    b_free = n // 2 - protect_first // 2
    return max(0, min(r, a_free)) if b_free > 0 else 0


@register_handler(MergeTokens)
def merge_tokens_handler(action: MergeTokens, call, site):
    """The site itself runs exact (SDPA); ``passes/merge_tokens.py`` merges the tokens after its block."""
    if _base.site_causal(call, site):
        return Decline("merging tokens averages positions, so a causal site (a decoder) would let a token see "
                       "the future; causal sites are not supported")
    plan = _masks.site_mask_plan(site, call.is_causal)
    if _masks.visibility_varies(plan):
        return Decline("merging tokens needs a mask that is the same for every query (padding); this site's "
                       "mask hides keys from some queries only (causal, windowed or position-dependent)")
    if getattr(site, "cross", False):
        return Decline("a cross-attention site: its keys are not the tokens of its block")
    return F.scaled_dot_product_attention


class TokenMerger(torch.nn.Module):
    """Merge ``r`` tokens of ``x [B, N, C]`` by bipartite soft matching on ``keys [B, H, N, d]``.

    ``forward(x, keys, mask, size, owner, rep, visible) -> (x, size, owner, rep, visible)`` with the state of the
    previous merge (``None`` before the first: then ``mask``, the site's attention mask, says which tokens are
    visible; None: all). ``self.r`` is read on every call (0: nothing merged, exactly the original).
    """

    def __init__(self, r: int, protect_first: int = 1, metric: str = "hidden", window: Optional[int] = None):
        super().__init__()
        self.r, self.protect_first, self.metric, self.window = int(r), int(protect_first), metric, window

    def extra_repr(self) -> str:
        return f"r={self.r}, protect_first={self.protect_first}, metric={self.metric!r}, window={self.window}"

    def forward(self, x, keys, mask, size, owner, rep, visible):
        b, n = x.shape[0], x.shape[1]
        if size is None:
            first = torch.arange(n, device=x.device).expand(b, n)
            size, owner, rep = torch.ones(b, n, dtype=torch.float32, device=x.device), first, first
            visible = key_visibility(mask, b, n, x.device)
        r = merged_count(self.r, n, self.protect_first)
        if r == 0:
            return x, size, owner, rep, visible
        position = token_positions(owner, size) if self.window is not None else None
        src, dst, unm = self.match(x if self.metric == "hidden" else keys, visible, r, position)
        return merge_step(x, size, owner, rep, visible, src, dst, unm)

    @torch.no_grad()
    def match(self, metric, visible, r: int, position: Optional[torch.Tensor] = None) -> tuple:
        """``(src, dst, unm)``: the A tokens merged away, their B partners, and the A tokens kept (in order).
        ``position [B, N]``: each token's position, for the window (None: no window)."""
        metric = metric.float().mean(dim=1) if metric.dim() == 4 else metric.float()  # keys: mean over heads
        b, n, c = metric.shape
        # unit features with the visibility tags as two more columns: one product gives cosine + tags
        features = metric.new_empty(b, n, c + 2)
        torch.div(metric, metric.norm(dim=-1, keepdim=True).clamp_min(1e-12), out=features[..., :c])
        features[..., c:] = torch.where(visible[..., None], metric.new_tensor(_VISIBLE_TAG),
                                        metric.new_tensor(_MASKED_TAG))
        scores = features[:, ::2] @ features[:, 1::2].transpose(1, 2)   # [B, Na, Nb] cosine + tags
        if position is not None:  # finite, so that a protected token (-inf) still never merges
            far = (position[:, ::2, None] - position[:, None, 1::2]).abs_() > self.window
            scores.masked_fill_(far, _FAR)
        p = self.protect_first
        if p:
            scores[:, :(p + 1) // 2, :] = -math.inf                      # protected A tokens are never merged away
            scores[:, :, :p // 2] = -math.inf                            # nor merged into
        order = scores.amax(dim=-1).argsort(dim=-1, descending=True, stable=True)
        src, unm = order[:, :r], order[:, r:].sort(dim=-1).values
        # the partner of the r merged tokens only: an argmax over r rows, not all of A's
        dst = scores.gather(1, src[..., None].expand(b, r, scores.shape[-1])).argmax(dim=-1)
        return src, dst, unm


def token_positions(owner: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: each current token's position, the mean original position of its members (``owner [B, N0]``:
    the current index of every original token; ``size [B, N]``: how many it stands for)."""
    original = torch.arange(owner.shape[1], dtype=size.dtype, device=size.device).expand(owner.shape)
    return torch.zeros_like(size).scatter_add_(1, owner, original) / size


def key_visibility(mask: Optional[torch.Tensor], b: int, n: int, device) -> torch.Tensor:
    """``[B, N]``: tokens some query may see as keys under ``mask`` (bool: True attends; additive: above
    ``MASKED_BELOW``); every token where there is no mask or it does not vary over keys."""
    if mask is None or mask.shape[-1] != n:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    row = mask[..., :1, :] if mask.dim() >= 2 else mask  # the same for every query (the pass checked it)
    seen = row if row.dtype == torch.bool else row > MASKED_BELOW
    while seen.dim() < 3:
        seen = seen.unsqueeze(0)
    seen = seen.reshape(seen.shape[0], -1, n).any(dim=1)                 # over heads
    return seen.expand(b, n)


def merge_step(x, size, owner, rep, visible, src, dst, unm) -> tuple:
    """Apply one matching: kept A tokens (in order), then every B token with its merged A tokens averaged in
    (weights: size, visible members only where there is one). Returns ``(x, size, owner, rep, visible)``.
    Only the ``r`` merged rows are computed on: ``b' = b + sum_a w_a (a - b) / (w_b + sum_a w_a)``."""
    b, n, c = x.shape
    na, r = (n + 1) // 2, src.shape[-1]
    kept, nb = na - r, n - na
    weight = size * torch.where(visible, 1.0, _MASKED_WEIGHT)
    wa, wb = weight[:, ::2], weight[:, 1::2]
    ws = wa.gather(1, src)
    coef = (ws / wb.scatter_add(1, dst, ws).gather(1, dst)).to(x.dtype)   # w_a / (total weight of its group)
    # the new order as rows of x: kept A tokens (even rows), then every B token (odd rows); one gather builds it
    b_rows = torch.arange(1, 2 * nb, 2, device=x.device).expand(b, nb)
    batch_start = torch.arange(0, b * n, n, device=x.device)[:, None]
    rows = torch.cat([2 * unm, b_rows], dim=1) + batch_start
    flat = x.reshape(b * n, c)
    x_new = flat.index_select(0, rows.reshape(-1)).view(b, kept + nb, c)
    delta = (flat.index_select(0, (2 * src + batch_start).reshape(-1))
             - flat.index_select(0, (2 * dst + 1 + batch_start).reshape(-1))).view(b, r, c) * coef[..., None]
    x_new[:, kept:].scatter_add_(1, dst[..., None].expand(b, r, c), delta)
    size_new = torch.cat([size[:, ::2].gather(1, unm), size[:, 1::2].scatter_add(1, dst, size[:, ::2].gather(1, src))], 1)
    # a representative member of each merged token: a visible one where there is one (masks follow it)
    big = owner.shape[1] + 1
    tagged = visible.long() * big + rep
    tb = tagged[:, 1::2].scatter_reduce(1, dst, tagged[:, ::2].gather(1, src), reduce="amax", include_self=True)
    rep_new = torch.cat([rep[:, ::2].gather(1, unm), tb % big], dim=1)
    visible_new = torch.cat([visible[:, ::2].gather(1, unm), tb >= big], dim=1)  # visible if any member is
    # where each token of the previous step went, then where each original token is now
    pos_a = torch.empty(b, na, dtype=torch.long, device=x.device)
    pos_a.scatter_(1, unm, torch.arange(kept, device=x.device).expand(b, kept))
    pos_a.scatter_(1, src, kept + dst)
    pos_b = (kept + torch.arange(nb, device=x.device)).expand(b, nb)
    step = torch.stack([pos_a[:, :nb], pos_b], dim=-1).reshape(b, 2 * nb)
    if na > nb:
        step = torch.cat([step, pos_a[:, -1:]], dim=1)
    return x_new, size_new, step.gather(1, owner), rep_new, visible_new


def _gather_tokens(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t`` (batch first, or broadcast over the batch) with dim ``dim`` taken at ``index [B, M]`` per batch."""
    dim = dim % t.dim()
    b, m = index.shape
    t = t.expand(b, *t.shape[1:])
    view = [b] + [1] * (t.dim() - 1)
    view[dim] = m
    sizes = list(t.shape)
    sizes[dim] = m
    return t.gather(dim, index.view(view).expand(sizes))


def proportional_mask(mask: Optional[torch.Tensor], size: torch.Tensor, rep: torch.Tensor, like: torch.Tensor,
                      keys: bool = True) -> Optional[torch.Tensor]:
    """The attention mask for merged tokens: one row of the original ``mask`` (the pass checked that it is the
    same for every query: a padding mask), its keys taken at each merged token's representative where ``keys``,
    plus ``log(size)`` there (proportional attention). Additive, in ``like``'s dtype (or the mask's own)."""
    bias = size.log().to(like.dtype)[:, None, None, :] if keys else None
    if mask is None:
        return bias
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask[..., :1, :]
    if bias is None:
        return mask
    if mask.shape[-1] != 1:
        mask = _gather_tokens(mask, -1, rep)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, -math.inf)
    return mask + bias.to(mask.dtype)


def first_row(t: torch.Tensor) -> torch.Tensor:
    """A per-query-row tensor ``[..., N, 1]`` over the original tokens (the rows a lowering fixes after SDPA, e.g.
    rows whose every key is masked), for merged queries: its first row, as the mask is the same for every query."""
    return t[..., :1, :]


def unmerge_tokens(y: torch.Tensor, owner: torch.Tensor, token_dim: int, batch_dim: int) -> torch.Tensor:
    """``y`` with every original token given its merged token's value (``owner [B, N0]``): the original shape."""
    moved = y.movedim((batch_dim, token_dim), (0, 1))
    b, n0 = owner.shape
    index = owner.view(b, n0, *([1] * (moved.dim() - 2))).expand(b, n0, *moved.shape[2:])
    return moved.gather(1, index).movedim((0, 1), (batch_dim, token_dim))
