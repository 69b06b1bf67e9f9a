"""Measured time: what calibration times, and how (interleaved runs, median).

Two kinds of runs are timed while calibrating, each named by a label a timer receives:

* :class:`SiteRun` — one mixer (or the exact call) alone at one site, on the q/k/v/mask the site saw on the
  calibration batches;
* :class:`ModelRun` — the whole model on the calibration batches with a plan (``plan=()`` is all exact).

A *timer* is any callable ``timer(runs) -> seconds``: ``runs`` maps labels to zero-argument callables and the
answer maps the same labels to seconds per call. :func:`interleaved_median` is the real one. Tests (or a
user who times on another device) pass their own, e.g. one that reads a table::

    >>> from rewrite.timing import SiteRun, interleaved_median
    >>> out = interleaved_median({"a": lambda: sum(range(100)), "b": lambda: sum(range(10))}, repeats=3)
    >>> sorted(out) == ["a", "b"] and all(s > 0 for s in out.values())
    True
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Optional

import torch

from .actions import Exact

#: the candidate key of the exact call in a :class:`SiteRun` (the exact mixer's description)
EXACT = Exact().describe()


@dataclasses.dataclass(frozen=True)
class SiteRun:
    """Time ``action`` (a candidate key, or :data:`EXACT`) alone on a site's recorded call.

    ``signature`` names the call's shapes, dtypes and device: timings are shared between sites with the same
    signature (a ladder of settings over a dozen equal layers is timed once)."""
    site: tuple            # (module name, ordinal) of the first site timed with this signature
    action: str
    signature: tuple


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """Time the whole model with ``plan``: ``((site name, ordinal, candidate key), ...)`` for the sites that
    are not exact; ``()`` is the exact model."""
    plan: tuple


Timer = Callable[[dict], dict]


def clock() -> float:
    """The clock the real timer reads (seconds); a module-level function so a test may swap it."""
    return time.perf_counter()


def interleaved_median(runs: dict, warmup: int = 1, repeats: Optional[int] = None, min_repeats: int = 3,
                       max_repeats: int = 15, budget_s: float = 0.5, sync: Optional[Callable] = None,
                       reference: Any = None, drop_above: Optional[float] = None, screen_rounds: int = 2) -> dict:
    """Seconds per call of each run: warm-up, then rounds that run every callable once (A, B, C, then
    C, B, A: the order alternates so drift and cache effects fall on every run alike), median per run.

    Without ``repeats``, as many rounds as fit ``budget_s`` (from the warm-up's duration), between
    ``min_repeats`` and ``max_repeats``. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each
    reading of the clock so asynchronous devices are timed to completion. With ``reference`` (a label) and
    ``drop_above``, a run clearly slower than the reference runs no more rounds (its median is of the samples
    it has): after round ``r`` of the first ``screen_rounds``, one whose best sample is over
    ``drop_above * (screen_rounds - r)`` times the reference's worst."""
    items = list(runs.items())
    sync = sync or (lambda: None)
    sync()
    start = clock()
    for _ in range(warmup):
        for _, fn in items:
            fn()
    sync()
    per_round = (clock() - start) / max(warmup, 1)
    if repeats is None:
        repeats = min_repeats if per_round <= 0 else int(budget_s / per_round)
        repeats = max(min_repeats, min(max_repeats, repeats))
    samples: dict = {label: [] for label, _ in items}
    active = items
    for r in range(repeats):
        for label, fn in (active if r % 2 == 0 else active[::-1]):
            sync()
            t0 = clock()
            fn()
            sync()
            samples[label].append(clock() - t0)
        if reference in samples and drop_above is not None and r < screen_rounds:
            # the fewer samples, the wider the gap must be: 2x the factor after one round, 1x after two
            factor = drop_above * (screen_rounds - r)
            worst = max(samples[reference])
            active = [(label, fn) for label, fn in active
                      if label == reference or min(samples[label]) <= factor * worst]
    return {label: statistics.median(s) for label, s in samples.items()}


def default_timer(runs: dict) -> dict:
    """The timer calibration uses unless given one: :func:`interleaved_median`, synchronising CUDA when a
    CUDA device is in use, with a longer budget for whole-model runs. Mixers at a site that are clearly
    slower than the exact call (over 2.5x after one round, 1.25x after two) are not timed further."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    whole_model = any(isinstance(label, ModelRun) for label in runs)
    if whole_model:
        return interleaved_median(runs, warmup=1, min_repeats=3, max_repeats=9, budget_s=3.0, sync=sync)
    exact = next((label for label in runs if getattr(label, "action", None) == EXACT), None)
    return interleaved_median(runs, warmup=1, min_repeats=5, max_repeats=25, budget_s=0.5, sync=sync,
                              reference=exact, drop_above=1.25)


def call_signature(q, k, v, kw: dict) -> tuple:
    """Shapes, dtypes and device of a site call, and the settings that change its work (the cache key)."""
    mask = kw.get("attn_mask")
    mask_sig = None if not isinstance(mask, torch.Tensor) else (tuple(mask.shape), str(mask.dtype))
    return (tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), str(q.device), mask_sig,
            bool(kw.get("is_causal")), bool(kw.get("enable_gqa")))


def time_site_calls(calls: dict, candidates: dict, timer: Timer) -> tuple[dict, dict]:
    """Seconds per call of the exact call and each candidate at each site, timed alone on the site's call.

    ``calls`` maps a site key to ``(exact, candidate modules by key, (q, k, v, kwargs))``; ``candidates`` maps
    a site key to the candidate keys to time. Returns ``(exact seconds by site, seconds by (site, candidate))``.
    Sites whose calls share a :func:`call_signature` share timings: each (candidate, signature) is timed once,
    interleaved with the exact call at that signature."""
    cache: dict = {}
    exact_s, cand_s = {}, {}
    for key, (exact, modules, (q, k, v, kw)) in calls.items():
        sig = call_signature(q, k, v, kw)
        todo = [ck for ck in candidates.get(key, ()) if ck in modules and (ck, sig) not in cache]
        if (EXACT, sig) not in cache or todo:
            runs = {SiteRun(key, EXACT, sig): _bound(exact, q, k, v, kw)}
            runs.update({SiteRun(key, ck, sig): _bound(modules[ck], q, k, v, kw) for ck in todo})
            with torch.no_grad():
                got = timer(runs)
            for label, seconds in got.items():
                cache.setdefault((label.action, sig), float(seconds))
        exact_s[key] = cache[(EXACT, sig)]
        for ck in candidates.get(key, ()):
            if (ck, sig) in cache:
                cand_s[(key, ck)] = cache[(ck, sig)]
    return exact_s, cand_s


def _bound(fn: Callable, q, k, v, kw: dict) -> Callable[[], Any]:
    return lambda: fn(q, k, v, **kw)


def plan_label(plan: dict) -> ModelRun:
    """The :class:`ModelRun` of a plan ``{(site name, ordinal): candidate key or None}``."""
    return ModelRun(tuple(sorted((k[0], k[1], a) for k, a in plan.items() if a is not None)))


def ratio_text(seconds: float, exact_seconds: float) -> str:
    """``"1.90 ms vs exact 1.40 ms"``."""
    return f"{seconds * 1e3:.3g} ms vs exact {exact_seconds * 1e3:.3g} ms"

