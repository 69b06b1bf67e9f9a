"""Policies: which action each attention site gets.

Accepted forms:

* a preset name: ``"exact"`` (every site fused exactly) or ``"none"`` (leave everything, report only);
* a mapping from module-name patterns to actions, looked up as torchao's ``FqnToConfig`` does: the exact
  site name first, then ``"re:<regex>"`` keys by ``re.fullmatch`` in order, then ``"_default"``; a value
  of ``None`` leaves the site as it was;
* a callable ``sites -> plan`` (a mapping from site name to action), called with the sites of each
  captured graph;
* a resolved JSON plan ``{"version": 1, "sites": {name: {"action": ..., "args": {...}}}}``.

Example::

    policy = {"re:encoder\\.layer\\.[0-5]\\..*": rewrite.Exact(), "_default": None}
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

from .actions import Action, Exact, RewriteError, action_from_json

PRESETS = ("exact", "none")


class Policy:
    """A resolved policy: ``action_for(site)`` gives an :class:`Action` or ``None`` (keep)."""

    def __init__(self, spec: Any):
        self.spec = spec
        self.callable: Optional[Callable] = None
        self.mapping: Optional[dict] = None
        self.preset: Optional[str] = None
        self.used_keys: set = set()
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise RewriteError(
                    f"Unknown policy {spec!r}. Use one of the presets {', '.join(PRESETS)}, a mapping from "
                    "module names to actions, or a callable sites -> plan.")
            self.preset = spec
        elif isinstance(spec, Action):
            self.mapping = {"_default": spec}
        elif isinstance(spec, dict):
            raw = spec["sites"] if "sites" in spec and isinstance(spec.get("sites"), dict) else spec
            if "sites" in spec and spec.get("version", 1) != 1:
                raise RewriteError(f"Plan version {spec.get('version')!r} is not supported; this rewrite reads version 1.")
            self.mapping = {}
            for key, value in raw.items():
                if not isinstance(key, str):
                    raise RewriteError(f"Policy key {key!r} is not a module name or 're:' pattern.")
                if key.startswith("re:"):
                    try:
                        re.compile(key[3:])
                    except re.error as err:
                        raise RewriteError(f"Policy key {key!r} is not a valid regular expression: {err}.") from None
                self.mapping[key] = action_from_json(value)
        elif callable(spec):
            self.callable = spec
        else:
            raise RewriteError(
                f"Cannot use {type(spec).__name__} as a policy: give 'exact', 'none', a mapping from module "
                "names to actions, or a callable sites -> plan.")
        self._callable_plan: dict = {}
        self.fitted: dict = {}  # (site key, candidate key) -> state dict, from calibration

    def describe(self) -> str:
        if self.preset:
            return self.preset
        if self.callable:
            return getattr(self.callable, "__name__", "callable")
        return "map"

    def prepare(self, sites: list) -> None:
        """Called with the sites of one captured graph before ``action_for``."""
        if self.callable is None:
            return
        plan = self.callable(list(sites))
        if plan is None:
            plan = {}
        if isinstance(plan, dict) and "sites" in plan and isinstance(plan["sites"], dict):
            plan = plan["sites"]
        if not isinstance(plan, dict):
            raise RewriteError(f"The policy callable returned {type(plan).__name__}; it must return a mapping "
                               "from site name to action.")
        for name, act in plan.items():
            self._callable_plan[name] = action_from_json(act)

    def action_for(self, site) -> Optional[Action]:
        if self.preset == "exact":
            return Exact()
        if self.preset == "none":
            return None
        if self.callable is not None:
            return self._callable_plan.get(site.name)
        assert self.mapping is not None
        if site.name in self.mapping:
            self.used_keys.add(site.name)
            return self.mapping[site.name]
        for key, act in self.mapping.items():
            if key.startswith("re:") and re.fullmatch(key[3:], site.name):
                self.used_keys.add(key)
                return act
        if "_default" in self.mapping:
            self.used_keys.add("_default")
            return self.mapping["_default"]
        return None

    def unused_keys(self) -> list[str]:
        if self.mapping is None:
            return []
        return [k for k in self.mapping if k != "_default" and k not in self.used_keys]


def check_policy(spec: Any, where: str) -> None:
    """Raise a RewriteError naming ``where`` (a file, the inline policy) if ``spec`` is not a valid policy."""
    try:
        Policy(spec)
    except RewriteError as err:
        raise RewriteError(f"In {where}: {err}") from None
