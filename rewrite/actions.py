"""Rewrite actions: frozen dataclasses that name what a site becomes, and the handler registry.

An action is pure data (JSON round-trip). It declares what it needs of a site (``requires``); where the site
meets it, a *handler* registered for its type builds the replacement from the site's canonical call and its
:class:`~rewrite.sites.AttentionSite` (:func:`build_target` does both), or returns a :class:`Decline` (or
``None``) saying why it cannot serve it: the site then gets :class:`Exact`, with the reason in the report.

Example::

    >>> import rewrite
    >>> rewrite.Exact().to_json()
    {'action': 'Exact', 'args': {'kernel': 'sdpa'}}
    >>> rewrite.action_from_json({'action': 'Exact', 'args': {}})
    Exact(kernel='sdpa')
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

_ACTION_TYPES: dict[str, type] = {}
_HANDLERS: dict[type, Callable] = {}


class RewriteError(ValueError):
    """A user-facing error: the message names the problem and the fix."""


class Decline(str):
    """What a handler returns to refuse one site; the text says why (it goes to the report)."""


def register_action(cls):
    """Class decorator: make a frozen action dataclass known by its class name (for JSON plans)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass to be registered as an action")
    _ACTION_TYPES[cls.__name__] = cls
    return cls


def register_handler(action_type: type):
    """Decorator: ``handler(action, call, site) -> module | function | Decline | None`` builds the replacement for
    one site (a callable with SDPA's signature), or declines it."""
    def deco(fn):
        _HANDLERS[action_type] = fn
        return fn
    return deco


def handler_for(action) -> Optional[Callable]:
    return _HANDLERS.get(type(action))


def build_target(action, call, site):
    """The replacement for one site: the action's declared ``requires`` checked first (as torch.fx's
    ``PassBase.requires``), then its handler. Returns the handler's target, or a :class:`Decline` saying
    which requirement the site does not meet (or that the handler declined)."""
    unserved = action.unserved(site)
    if unserved:
        return Decline(unserved)
    for requirement in getattr(action, "requires", ()):
        unmet = requirement.unmet(action, call, site)
        if unmet:
            return Decline(unmet)
    handler = handler_for(action)
    if handler is None:
        raise RewriteError(f"No handler is registered for action {type(action).__name__}; register one with "
                           "@rewrite.register_handler.")
    target = handler(action, call, site)
    return target if target is not None else Decline("the handler cannot serve this site")


def action_types() -> dict[str, type]:
    return dict(_ACTION_TYPES)


class Action:
    """Base of all actions; subclasses are ``@register_action`` frozen dataclasses."""

    exact: bool = False
    #: preconditions the site must meet before the handler runs: objects with ``unmet(action, call, site)``
    #: returning why not (or ``""``); the toolkit's are in ``rewrite.mixers._base`` (``SelfAttention``,
    #: ``NoScoreBias``, ``NonCausal``)
    requires: tuple = ()
    #: the handler classifies the site's mask on the example batch (``_masks.site_mask_plan``): the pipeline
    #: evaluates it onto the site first, for these actions only
    reads_example_mask = False
    #: the action rewrites the whole block after its site, not only the attention (``MergeTokens``): its handler
    #: lowers the site itself, and the pipeline's ``_block_level`` step then rewrites the graph around it
    block_level = False

    def unserved(self, site) -> str:
        """Why this action cannot compute what ``site`` computes beyond ``softmax(q kᵀ s + mask) v`` (``""``: it
        can). Checked for every action before its ``requires``, so a new mixer never has to remember these: a
        soft-cap of the scores only the flash kernel expresses; sink keys (gpt-oss) only exact attention keeps."""
        cap = getattr(site, "softcap", None)
        if cap is not None:
            return softcap_unserved(self.describe(), cap)
        sinks = getattr(site, "sinks", 0)
        if sinks and not self.exact:
            return (f"the site has {sinks} attention sink key{'s' * (sinks > 1)} (a learned logit every query sees, "
                    f"value 0), which {type(self).__name__} does not model; keep the site Exact")
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"action": type(self).__name__, "args": dataclasses.asdict(self)}

    def describe(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({args})"


@register_action
@dataclasses.dataclass(frozen=True)
class Exact(Action):
    """Lossless fused attention. ``kernel="sdpa"`` uses ``F.scaled_dot_product_attention``."""

    kernel: str = "sdpa"
    exact = True

    def flops(self):
        from .cost import exact_flops
        return exact_flops()

    def unserved(self, site) -> str:
        cap = getattr(site, "softcap", None)
        if cap is not None and self.kernel != "triton":
            return softcap_unserved("SDPA", cap)
        return ""

    def __post_init__(self):
        if self.kernel not in ("sdpa", "triton"):
            raise RewriteError(f"Exact(kernel={self.kernel!r}) is not a known kernel; use 'sdpa' or 'triton'.")


def softcap_unserved(target: str, cap: float) -> str:
    """The report's reason for leaving a soft-capped site as it was: ``target`` cannot express the cap."""
    return f"soft-capping tanh(s/{cap!r})·{cap!r}: {target} cannot express it; use Exact(kernel='triton')"


def action_from_json(obj: Any) -> Optional[Action]:
    """Build an action from an instance, ``None``, a type name (``"Exact"``) or ``{"action", "args"}``."""
    if obj is None or isinstance(obj, Action):
        return obj
    if isinstance(obj, str):
        name, args = obj, {}
    elif isinstance(obj, dict) and "action" in obj:
        name, args = obj["action"], obj.get("args") or {}
    else:
        raise RewriteError(
            f"Cannot read {obj!r} as an action: give an action object such as rewrite.Exact(), "
            "a name such as 'Exact', or a dict {'action': 'Exact', 'args': {...}}.")
    cls = _ACTION_TYPES.get(name) or {k.lower(): v for k, v in _ACTION_TYPES.items()}.get(str(name).lower())
    if cls is None:
        known = ", ".join(sorted(_ACTION_TYPES))
        raise RewriteError(f"Unknown action {name!r}. Known actions: {known}.")
    try:
        return cls(**args)
    except TypeError as err:
        fields = ", ".join(f.name for f in dataclasses.fields(cls)) or "(none)"
        raise RewriteError(f"Bad arguments {args!r} for action {name!r}: {err}. Its arguments are: {fields}.") from None
