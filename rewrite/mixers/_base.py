"""What every mixer module and handler shares: the module bases (SDPA's call signature), argument checks, the
declines of one grammar, and what a handler reads off an :class:`~rewrite.sites.AttentionSite` (lengths,
causality, vision grid, mask kinds). Handlers read sites, never graph nodes.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..actions import Decline, RewriteError
from ._layout import fake_output, is_shape_inference

class SDPAMixer(nn.Module):
    """Base of the mixer modules: SDPA's call signature.

    ``__name__`` lets the module be the target of an FX ``call_function`` node (FX names nodes by it).
    """

    __name__ = "sdpa_mixer"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config().items())

    def _config(self) -> dict:
        return {}


def refuse_dropout(module, dropout_p) -> None:
    """Mixers that form no attention probabilities cannot drop them: say so rather than ignore ``dropout_p``."""
    if isinstance(dropout_p, (int, float)) and dropout_p > 0:
        raise RewriteError(f"{type(module).__name__} forms no attention probabilities for dropout_p={dropout_p} to "
                           "drop: run the model in eval() for inference, or set its attention dropout to 0 to "
                           "fine-tune through this mixer (or keep the site Exact).")


class FastAndDense(torch.nn.Module):
    """A mixer whose ``_run(..., dense)`` computes either its fast form or its quadratic reference.

    ``forward`` is the fast form (SDPA's signature); ``dense`` the reference with an explicit ``[Nq, Nk]``
    weight matrix, which the tests compare it with and which serves masks the fast form cannot.
    """

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        refuse_dropout(self, dropout_p)
        if is_shape_inference(q, k, v, attn_mask):
            return fake_output(q, v)
        return self._run(q, k, v, attn_mask, is_causal, scale, dense=False)

    def dense(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return self._run(q, k, v, attn_mask, is_causal, scale, dense=True)


class _CountedNotes:
    """Mixin state: count the calls a mixer served another way than its fast form, and warn once per kind."""

    def _note(self, counter: str, message: str) -> None:
        setattr(self, counter, getattr(self, counter, 0) + 1)
        warned = self.__dict__.setdefault("_warned_kinds", set())
        if counter not in warned:
            warned.add(counter)
            warnings.warn(f"{type(self).__name__}: {message} (counted in .{counter})", RuntimeWarning, stacklevel=4)


class WarnOnce(_CountedNotes):
    """Mixin: count dense-path calls and warn about them once per module."""

    def _dense_note(self, what: str) -> None:
        self._note("dense_calls", f"{what}; used the dense O(Nq*Nk) form for this call")


class ExactFallback(_CountedNotes):
    """Mixin: count calls served by exact attention instead (a mask the mixer cannot honour), warn once."""

    def _exact_note(self, why: str) -> None:
        self._note("exact_calls", f"{why}; this call ran exact attention instead")


def check_int(action, name: str, value, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RewriteError(f"{type(action).__name__}({name}={value!r}) is invalid: {name} must be an integer "
                           f">= {minimum}. {fix}")


def check_choice(action, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise RewriteError(f"{type(action).__name__}({name}={value!r}) is invalid: use one of "
                           f"{', '.join(repr(c) for c in choices)}.")


#: the token layout of every action that has a 1-D and a 2-D form
LAYOUTS = ("auto", "1d", "2d")


def check_layout(action) -> None:
    """Check an action's ``layout`` and read its deprecated ``dims`` alias (``1`` or ``2``) into it.

    The alias is cleared once read, so ``Pool(dims=2) == Pool(layout="2d")`` and plans saved with ``dims``
    load as the same action."""
    dims = getattr(action, "dims", None)
    name = type(action).__name__
    if dims is not None:
        if isinstance(dims, bool) or dims not in (1, 2):
            raise RewriteError(f"{name}(dims={dims!r}) is invalid: use layout='1d' or layout='2d' "
                               "(dims is a deprecated alias of layout).")
        if action.layout not in ("auto", f"{dims}d"):
            raise RewriteError(f"{name}(layout={action.layout!r}, dims={dims!r}) disagree; give layout alone.")
        warnings.warn(f"{name}(dims={dims}) is deprecated; use {name}(layout='{dims}d')", DeprecationWarning,
                      stacklevel=4)
        object.__setattr__(action, "layout", f"{dims}d")
        object.__setattr__(action, "dims", None)
    check_choice(action, "layout", action.layout, LAYOUTS)


def site_lengths(site) -> tuple:
    """(Nq, Nk) of a site as ints (the captured values of symbolic lengths), or None where unknown. For
    messages and checks only: reading them adds no guard, so a dynamic graph is not pinned to one length."""
    from ..graph import hint_int
    qs, ks = tuple(getattr(site, "q_shape", ()) or ()), tuple(getattr(site, "k_shape", ()) or ())
    return (hint_int(qs[-2]) if len(qs) >= 2 else None), (hint_int(ks[-2]) if len(ks) >= 2 else None)


def is_cross(site) -> bool:
    """Nq may differ from Nk at this site (cross-attention or KV-cache decoding): the lengths are not the
    same size for every input. Decided without guards (``int()`` of a symbolic length would specialise the
    graph to it and recompile it at every new length)."""
    if getattr(site, "cross", False):
        return True
    from ..graph import same_size
    qs, ks = tuple(getattr(site, "q_shape", ()) or ()), tuple(getattr(site, "k_shape", ()) or ())
    if len(qs) < 2 or len(ks) < 2 or qs[-2] is None or ks[-2] is None:
        return False
    return not same_size(qs[-2], ks[-2])


def site_causal(call, site) -> bool:
    return bool(getattr(site, "is_causal", False) or getattr(call, "is_causal", False)
                or "causal" in str(getattr(site, "mask", "") or ""))


def site_grid(site) -> tuple[Optional[tuple], int]:
    """``((gh, gw), prefix tokens)`` when the site knows its vision grid, else ``(None, prefix tokens)``."""
    prefix = int(getattr(site, "prefix_tokens", None) or 0)
    grid = getattr(site, "grid", None)
    if not grid:
        return None, prefix
    try:
        gh, gw = (int(x) for x in grid)
    except Exception:  # noqa: BLE001 - a grid that is not two ints is no grid
        return None, prefix
    return (gh, gw), prefix


def resolve_grid_layout(what: str, layout: str, call, site):
    """Resolve a mixer's ``layout`` ("auto", "1d", "2d") against the site's vision grid.

    Returns ``(grid, prefix, causal)`` (``grid`` None for 1-D) or a :class:`Decline` saying why the 2-D
    form cannot serve the site: unknown grid, a causal site, or a grid that does not match its tokens. An
    action that declares :class:`LayoutResolves` gets the tuple in its handler.
    """
    grid, prefix = site_grid(site)
    causal = site_causal(call, site)
    if layout == "2d" and grid is None:
        return Decline(f"{what}(layout='2d') needs the site's vision grid (site.grid) and it is unknown here; "
                       "use layout='1d' or 'auto'")
    if layout == "auto":
        layout = "2d" if grid is not None and not causal else "1d"
    if layout != "2d":
        return None, 0, causal
    if causal:
        return Decline(f"{what} has no causal 2-D form; use {what}(layout='1d') at causal sites")
    gh, gw = grid
    nq, _ = site_lengths(site)
    if nq is not None and nq != prefix + gh * gw:
        return Decline(f"the site's grid {gh}x{gw} with {prefix} prefix tokens does not match its {nq} tokens")
    return (gh, gw), prefix, False


def head_dim(site) -> Optional[int]:
    """The site's head dim as an int, or None."""
    from ..graph import hint_int
    hd = getattr(site, "head_dim", None)
    if hd is None:
        qs = tuple(getattr(site, "q_shape", ()) or ())
        hd = hint_int(qs[-1]) if qs else None
    return int(hd) if hd is not None else None


def mask_kinds(site) -> set:
    return set(str(getattr(site, "mask", "none") or "none").split("+"))


# --- requirements: what an action needs of a site, declared once on the action (``Action.requires``) ---------

class SelfAttention:
    """The site has as many queries as keys for every input (not cross-attention or KV-cache decoding)."""

    def __init__(self, needs: str):
        self.needs = needs

    def unmet(self, action, call, site) -> str:
        if not is_cross(site):
            return ""
        nq, nk = site_lengths(site)
        return f"{self.needs}; this site has Nq != Nk (Nq={nq}, Nk={nk}: cross-attention or KV-cache decoding)"


class NoScoreBias:
    """The site adds no score bias (learned relative position, ALiBi): the mixer never forms the scores."""

    def unmet(self, action, call, site) -> str:
        bad = mask_kinds(site) & {"bias", "alibi"}
        if not bad:
            return ""
        return (f"{type(action).__name__} cannot honour the site's {'/'.join(sorted(bad))} score bias (only "
                "padding masks and causal masks); keep this site Exact or use a mixer that keeps softmax scores")


class LayoutResolves:
    """The action's ``layout`` resolves against the site (:func:`resolve_grid_layout`): a 2-D form has the
    site's grid, which matches its tokens, and the site is not causal."""

    def unmet(self, action, call, site) -> str:
        resolved = resolve_grid_layout(type(action).__name__, action.layout, call, site)
        return resolved if isinstance(resolved, Decline) else ""


class NonCausal:
    """The site is not causal: the mixer has no causal form (``why`` says what would go wrong)."""

    def __init__(self, why: str):
        self.why = why

    def unmet(self, action, call, site) -> str:
        return self.why if site_causal(call, site) else ""
