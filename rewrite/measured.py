"""Measured policies: decide per site from statistics, times and errors measured on calibration batches.

* :func:`auto` — the least measured time while the whole model's measured error stays within ``max_error``
  (or the least error within ``max_time``, a fraction of the exact model's measured time, or within
  ``max_cost``, a fraction of the exact attention FLOPs). Each candidate is first timed alone at each site
  against the exact call (on the q/k/v/mask the site saw); those not faster are dropped before their errors
  are measured. Then a multiple-choice knapsack over swap-one errors and measured milliseconds, and an
  end-to-end check on the calibration batches — joint error, and the whole model timed against exact —
  with back-off (the chosen site with the most error per millisecond saved goes gentler; the one saving
  least goes exact when the plan is not faster) until the plan fits and is faster than exact, or is exact.
* :func:`mixed_span` — MASFormer: full (exact) attention at ``full_layers`` sites, the ones whose
  swap-one damage under the local mixer is largest; the local mixer everywhere else.
* :func:`isomer` — Isomer/PoNet: a shared-context mixer where the measured query-independence is high
  and its swap-one error is small, exact elsewhere.

Example::

    model = rewrite.optimize(model, rewrite.auto(max_error=0.01), example_kwargs=batch, calibration=batches)
    rewrite.report(model).plot("plan.png")
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Optional, Sequence

import torch

from . import cost
from .actions import Action, Exact, RewriteError, action_types
from .calibrate import (CalibrationState, candidate_key, error_bound, example_errors, fit_candidates, metric_fn,
                        progress, run_batch)
from .select import Option, solve
from .timing import EXACT, default_timer, plan_label, ratio_text, time_site_calls


def default_candidates() -> list:
    """Training-free candidates, gentlest first within each family (those whose classes are registered).

    Block routing with one sink token, pooled summaries of the unchosen blocks and per-head block counts
    leads: measured on MiniLM with real text it has about half the error of plain routing at the same cost
    (BENCHMARKS.md). Blocks of 32 give finer cost steps than 64 at a few hundred tokens."""
    t = action_types()
    out = []
    if "BlockRouting" in t:
        routing = dict(sinks=1, summary=True, per_head=True)
        out += [t["BlockRouting"](block=32, topk=k, **routing) for k in (10, 8, 7, 6, 5, 4)]
        out += [t["BlockRouting"](block=64, topk=k, **routing) for k in (4, 3, 2)]
    if "SlidingWindow" in t:
        out += [t["SlidingWindow"](window=w, sinks=4) for w in (256, 128)]
    if "TokenMerge" in t:
        out += [t["TokenMerge"](r=128)]
    if "MergeTokens" in t:  # block-level: chosen on whole models after the per-site plan (merge_schedule.py);
        # steps of 8: at 4x512 on MiniLM one step moves the error bound by about 0.002 and the time by about 3%.
        # Merging within 64 positions: on calibration text as on held-out text, less error than anywhere (BENCHMARKS)
        out += [t["MergeTokens"](r=r, window=64) for r in range(8, 72, 8)]
    return out


@dataclasses.dataclass
class CandidateRow:
    """One candidate at one site: symbolic FLOPs, the measured time of the mixer alone (milliseconds per call,
    on the site's calibration call) and the swap-one error; ``declined`` says why it was not measured."""
    action: str
    flops: Optional[float]
    error: Optional[float]
    declined: str = ""
    ms: Optional[float] = None


@dataclasses.dataclass
class CalibrationRow:
    """What calibration measured at one site, the choice and why. Times are milliseconds per call of the
    site alone (``calls`` calls per forward of the model)."""
    name: str
    ordinal: int
    stats: dict
    exact_flops: Optional[float]
    candidates: list
    choice: str = EXACT
    why: str = ""
    exact_ms: Optional[float] = None
    chosen_ms: Optional[float] = None
    chosen_flops: Optional[float] = None
    calls: int = 1

    @property
    def key(self) -> tuple:
        return (self.name, self.ordinal)

    def candidate(self, action: Optional[str]) -> Optional[CandidateRow]:
        return next((c for c in self.candidates if c.action == action), None)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CalibrationReport:
    """The measured policy's run: rows per site, the joint error, back-offs, and the whole model's time with
    the plan against exact (medians of interleaved runs on the calibration batches, milliseconds)."""
    policy: str
    metric: str
    batches: int
    rows: list
    joint_error: Optional[float] = None
    budget: Optional[float] = None
    backoffs: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    message: str = ""
    objective: str = "time"
    time_budget: Optional[float] = None
    model_ms: Optional[float] = None
    exact_model_ms: Optional[float] = None
    attention_ms: Optional[float] = None
    attention_share: Optional[float] = None
    timing_seconds: float = 0.0
    #: the block-level settings tried after the per-site plan (merge_schedule.MergeRow)
    token_merging: list = dataclasses.field(default_factory=list)

    def speedup(self) -> Optional[float]:
        """Exact model time over the plan's (> 1: the plan is faster), at the calibration shapes."""
        if not self.model_ms or self.exact_model_ms is None:
            return None
        return self.exact_model_ms / self.model_ms

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class PlanChecks:
    """End-to-end checks of a plan ``{site key: candidate key or None}`` on the calibration batches, memoised:
    calling it gives the joint error bound; :meth:`time` the model's seconds with the plan and exact."""

    def __init__(self, joint_error: Callable, time_plans: Callable):
        self._joint_error, self._time_plans = joint_error, time_plans
        self._errors: dict = {}
        self._times: dict = {}

    def __call__(self, plan: dict) -> float:
        label = plan_label(plan)
        if label not in self._errors:
            self._errors[label] = 0.0 if not label.plan else self._joint_error(plan)
        return self._errors[label]

    def time(self, plan: dict) -> tuple[float, float]:
        """(seconds with the plan, seconds exact), timed interleaved in one run."""
        label = plan_label(plan)
        if label not in self._times:
            self._times[label] = self._time_plans(plan)
        return self._times[label]

    def timed(self) -> bool:
        return bool(self._times)


class MeasuredPolicy:
    """Base of policies that need calibration batches."""
    name = "measured"
    metric: Any = "cosine"
    candidates: Optional[Sequence[Action]] = None
    show_progress: bool = True
    timer: Optional[Callable] = None

    def candidate_list(self) -> list:
        return list(self.candidates) if self.candidates is not None else default_candidates()

    def candidates_for(self, site) -> list:
        """The per-site candidates: block-level actions are chosen on whole models afterwards."""
        return [a for a in self.candidate_list() if not getattr(a, "block_level", False)]

    def choose(self, rows: list, measure_joint: Callable) -> tuple[dict, str, list, Optional[float], dict]:
        """``(plan by site key, message, back-off steps, joint error bound, why per site)``.
        ``measure_joint`` is a :class:`PlanChecks`: ``measure_joint(plan)`` is the joint error bound and
        ``measure_joint.time(plan)`` the measured (plan, exact) seconds of the whole model."""
        raise NotImplementedError

    def prune_above(self) -> Optional[float]:
        """Swap-one error above which harsher settings of the same mixer family are not measured."""
        return None

    def faster_only(self) -> Optional[float]:
        """A candidate must be at least this fraction faster than exact at its site to have its error measured
        and be chosen (None: every candidate is measured, whatever its time)."""
        return None

    def describe(self) -> str:
        skip = ("candidates", "show_progress", "timer")
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                           if f.name not in skip and not callable(getattr(self, f.name)))
        return f"{self.name}({fields})"


OBJECTIVES = ("time", "flops")
#: a candidate (or a plan) must be this much faster than exact to count as faster: timing noise aside
MIN_GAIN = 0.03


@dataclasses.dataclass
class Auto(MeasuredPolicy):
    """See :func:`auto`."""
    max_error: Optional[float] = 0.01
    max_cost: Optional[float] = None
    metric: Any = "cosine"
    candidates: Optional[Sequence[Action]] = None
    max_backoff: int = 12
    show_progress: bool = True
    max_time: Optional[float] = None
    objective: str = "time"
    timer: Optional[Callable] = None
    min_gain: float = MIN_GAIN
    name = "auto"

    def __post_init__(self):
        if self.max_cost is not None or self.max_time is not None:
            self.max_error = None if self.max_error == 0.01 else self.max_error
        if sum(b is not None for b in (self.max_error, self.max_cost, self.max_time)) != 1:
            raise RewriteError("rewrite.auto takes one budget: max_error=... (largest error allowed), max_time=... "
                               "(largest fraction of the exact model's measured time, e.g. 0.7) or max_cost=... "
                               "(largest fraction of the exact attention FLOPs, e.g. 0.6).")
        if self.max_error is not None and self.max_error < 0:
            raise RewriteError(f"max_error={self.max_error!r} must be >= 0.")
        if self.max_cost is not None and not 0 < self.max_cost <= 1:
            raise RewriteError(f"max_cost={self.max_cost!r} is a fraction of the exact attention FLOPs in (0, 1].")
        if self.max_time is not None and not 0 < self.max_time <= 1:
            raise RewriteError(f"max_time={self.max_time!r} is a fraction of the exact model's time in (0, 1].")
        if self.objective not in OBJECTIVES:
            raise RewriteError(f"objective={self.objective!r}: use 'time' (measured here, the default) or 'flops' "
                               "(symbolic, for a plan meant for another device).")
        if self.max_time is not None and self.objective != "time":
            raise RewriteError("max_time is a budget on measured time: it needs objective='time'.")

    def prune_above(self) -> Optional[float]:
        return self.max_error

    def faster_only(self) -> Optional[float]:
        return self.min_gain if self.objective == "time" else None

    def currency(self) -> str:
        """What the knapsack counts per option: FLOPs (a FLOPs budget, or the FLOPs objective) or ms."""
        return "flops" if self.max_cost is not None or self.objective == "flops" else "ms"

    def choose(self, rows, measure_joint):
        options = {r.key: site_options(r, self.currency(), self.faster_only()) for r in rows}
        try:
            plan = self._solve(options, rows, measure_joint)
        except ValueError:
            return self._all_exact(rows, options, self._unreachable(), [])
        plan, backoffs, failure = self._back_off(plan, options, rows, measure_joint)
        if failure or not any(plan.values()):
            return self._all_exact(rows, options, failure, backoffs)
        return plan, "", backoffs, measure_joint(plan), self._why(rows, plan, options)

    def _solve(self, options: dict, rows: list, checks, shortfall_ms: float = 0.0) -> dict:
        """The knapsack for this budget; ``shortfall_ms`` tightens a time budget that the end-to-end timing
        found too loose. Raises ValueError when nothing fits."""
        if self.max_error is not None:
            return solve(options, max_error=self.max_error)
        if self.max_cost is not None:
            return solve(options, max_cost=self.max_cost * sum(r.exact_flops or 0.0 for r in rows))
        _, exact_s = checks.time({})
        saving_ms = (1 - self.max_time) * exact_s * 1e3 + shortfall_ms
        return solve(options, max_cost=sum(o.cost for o in self._exact_options(options)) - saving_ms)

    @staticmethod
    def _exact_options(options: dict) -> list:
        return [next(o for o in opts if o.key is None) for opts in options.values()]

    def _unreachable(self) -> str:
        if self.max_cost is not None:
            return (f"no plan reaches max_cost={self.max_cost} (a fraction of the exact attention FLOPs) with the "
                    "candidates measured; every site stays exact. Raise the budget or add cheaper candidates.")
        return (f"no plan reaches max_time={self.max_time} (a fraction of the exact model's measured time) with the "
                "candidates measured; every site stays exact. Raise the budget or add faster candidates.")

    def _problem(self, plan: dict, checks) -> Optional[tuple]:
        """What the plan fails end to end: ``("error" | "time", text)``, or None when it fits."""
        if self.max_error is not None:
            joint = checks(plan)
            if joint > self.max_error:
                return "error", f"joint error {joint:.4g} > {self.max_error:.4g}"
        if self.objective != "time":
            return None
        plan_s, exact_s = checks.time(plan)
        limit = min(1 - self.min_gain, self.max_time if self.max_time is not None else 1.0)
        if plan_s > limit * exact_s:
            return "time", f"model {ratio_text(plan_s, exact_s)}, over {limit:.3g}x exact"
        return None

    def _back_off(self, plan: dict, options: dict, rows: list, checks) -> tuple[dict, list, str]:
        """Back off until the plan meets its budget and is faster than exact end to end: an error over budget
        sends the chosen site with the most error per time (or FLOPs) saved to a gentler option; a plan not
        faster sends the chosen site that saves least back to exact; a time budget missed is solved again,
        tighter. Returns (plan, back-off steps, failure message or "")."""
        backoffs: list = []
        shortfall_ms, problem = 0.0, None
        while any(plan.values()):
            problem = self._problem(plan, checks)
            if problem is None:
                return plan, backoffs, ""
            if len(backoffs) >= self.max_backoff or (problem[0] == "time" and self.max_cost is not None):
                return plan, backoffs, self._failure(problem)
            if problem[0] == "time" and self.max_time is not None:
                plan_s, exact_s = checks.time(plan)
                shortfall_ms += (plan_s - self.max_time * exact_s) * 1e3
                try:
                    plan = self._solve(options, rows, checks, shortfall_ms)
                except ValueError:
                    return plan, backoffs, self._failure(problem)
                backoffs.append(f"time budget tightened by {shortfall_ms:.3g} ms ({problem[1]})")
                continue
            key, new = self._step_back(plan, options, problem[0])
            backoffs.append(f"{key[0]}: {plan[key]} -> {new or 'exact'} ({problem[1]})")
            plan = {**plan, key: new}
        return plan, backoffs, self._failure(problem) if problem else ""

    def _step_back(self, plan: dict, options: dict, kind: str) -> tuple:
        """The site to back off and its new option key (None: exact)."""
        def option(key):
            return next(o for o in options[key] if o.key == plan[key])

        def saved(key):
            return max(options[key][0].cost - option(key).cost, 1e-12)

        chosen = [key for key, act in plan.items() if act is not None]
        if kind == "time":
            return min(chosen, key=saved), None
        if self.currency() == "flops":
            worst = max(chosen, key=lambda key: option(key).error)
        else:
            worst = max(chosen, key=lambda key: option(key).error / saved(key))
        return worst, gentler(options[worst], plan[worst], option(worst).error)

    def _failure(self, problem: tuple) -> str:
        if problem[0] == "error":
            return (f"no plan met max_error={self.max_error} on the calibration batches ({problem[1]}); every site "
                    "stays exact. Raise the budget or add candidates.")
        return (f"no plan was faster than exact end to end on the calibration batches ({problem[1]}); every "
                "site stays exact.")

    def _all_exact(self, rows: list, options: dict, message: str, backoffs: list):
        plan = {r.key: None for r in rows}
        if not message and self.objective == "time":
            message = nothing_faster_message(rows, self.min_gain)
        return plan, message, backoffs, 0.0, self._why(rows, plan, options)

    def _why(self, rows: list, plan: dict, options: dict) -> dict:
        why = {}
        for r in rows:
            act = plan.get(r.key)
            if act is not None:
                why[r.key] = chosen_why(r, r.candidate(act))
            elif not any(c.error is not None for c in r.candidates) and any(c.ms is not None for c in r.candidates):
                why[r.key] = "exact: " + (slowest_note(r) if self.objective == "time" else "no candidate measured")
            elif not any(c.error is not None for c in r.candidates):
                why[r.key] = "exact: every candidate declined this site"
            elif len(options[r.key]) == 1:
                why[r.key] = "exact: no measured candidate is faster here"
            else:
                why[r.key] = "exact: no candidate fits the remaining budget"
        return why


def site_options(row: CalibrationRow, currency: str, faster_by: Optional[float]) -> list:
    """The knapsack's options at a site: exact, then every measured candidate (only those at least
    ``faster_by`` faster than exact, when given), each costing its FLOPs or its milliseconds per forward."""
    def cost(flops, ms):
        return flops if currency == "flops" else (ms or 0.0) * row.calls

    if currency == "ms" and row.exact_ms is None:
        return [Option(None, 0.0, 0.0)]
    opts = [Option(None, cost(row.exact_flops or 0.0, row.exact_ms), 0.0)]
    for c in row.candidates:
        if c.error is None or not math.isfinite(c.error) or (currency == "flops" and c.flops is None):
            continue
        if faster_by is not None and not is_faster(c.ms, row.exact_ms, faster_by):
            continue
        opts.append(Option(c.action, cost(c.flops, c.ms), max(c.error, 0.0)))
    return opts


def is_faster(ms: Optional[float], exact_ms: Optional[float], by: float) -> bool:
    return ms is not None and exact_ms is not None and ms < (1 - by) * exact_ms


def gentler(options: list, current, current_error: float):
    """The cheapest option with a smaller swap-one error than ``current`` (None: exact)."""
    better = [o for o in options if o.key is not None and o.key != current and o.error < current_error]
    if not better:
        return None
    return min(better, key=lambda o: (o.cost, o.error)).key


def chosen_why(row: CalibrationRow, c: CandidateRow) -> str:
    parts = [f"swap-one error {c.error:.2e}"]
    if c.ms is not None and row.exact_ms:
        parts.append(f"{c.ms:.3g} ms vs exact {row.exact_ms:.3g} ms")
    if c.flops is not None and row.exact_flops:
        parts.append(f"{c.flops / row.exact_flops:.0%} of exact FLOPs")
    return ", ".join(parts)


def slowest_note(row: CalibrationRow) -> str:
    """Why no candidate was measured at a site whose candidates are all slower than exact."""
    timed = [c for c in row.candidates if c.ms is not None]
    best = min(timed, key=lambda c: c.ms)
    return f"no candidate is faster here (fastest {best.action}: {best.ms:.3g} ms vs exact {row.exact_ms:.3g} ms)"


def nothing_faster_message(rows: list, min_gain: float) -> str:
    """The message when every site stays exact because no candidate is faster than exact anywhere."""
    timed = [(c, r) for r in rows for c in r.candidates if c.ms is not None and r.exact_ms is not None]
    if not timed or any(is_faster(c.ms, r.exact_ms, min_gain) for c, r in timed):
        return ""
    c, r = min(timed, key=lambda cr: cr[0].ms / cr[1].exact_ms)
    return (f"nothing pays off here: no candidate is faster than exact attention at any site (the closest, "
            f"{c.action} at {r.name}: {c.ms:.3g} ms vs exact {r.exact_ms:.3g} ms); every site stays exact.")


@dataclasses.dataclass
class MixedSpan(MeasuredPolicy):
    full_layers: Any = 2
    local: Optional[Action] = None
    metric: Any = "cosine"
    show_progress: bool = True
    timer: Optional[Callable] = None
    name = "mixed_span"

    def candidate_list(self) -> list:
        if self.local is not None:
            return [self.local]
        t = action_types()
        return [t["SlidingWindow"](window=128, sinks=1)]

    def choose(self, rows, measure_joint):
        local = candidate_key(self.candidate_list()[0])
        if isinstance(self.full_layers, int):
            damage = sorted(rows, key=lambda r: -(next((c.error for c in r.candidates if c.action == local
                                                        and c.error is not None), math.inf)))
            full = {(r.name, r.ordinal) for r in damage[: self.full_layers]}
            rule = "among the {} sites the local mixer damages most".format(self.full_layers)
        else:
            full = {(r.name, r.ordinal) for r in rows if r.name in set(self.full_layers)}
            rule = "named in full_layers"
        plan, why = {}, {}
        for r in rows:
            key = (r.name, r.ordinal)
            ok = any(c.action == local and c.error is not None for c in r.candidates)
            plan[key] = None if key in full or not ok else local
            why[key] = f"exact: {rule}" if key in full else (f"local: swap-one error "
                                                             f"{next(c.error for c in r.candidates if c.action == local):.2e}"
                                                             if ok else "exact: the local mixer declined")
        return plan, "", [], measure_joint(plan), why


@dataclasses.dataclass
class Isomer(MeasuredPolicy):
    shared: Optional[Action] = None
    threshold: float = 0.9
    max_site_error: float = 0.005
    metric: Any = "cosine"
    show_progress: bool = True
    timer: Optional[Callable] = None
    name = "isomer"

    def candidate_list(self) -> list:
        if self.shared is not None:
            return [self.shared]
        return [action_types()["SharedQuery"](query="mean")]

    def choose(self, rows, measure_joint):
        shared = candidate_key(self.candidate_list()[0])
        plan, why = {}, {}
        for r in rows:
            key = (r.name, r.ordinal)
            qi = r.stats.get("query_independence", 0.0)
            c = next((c for c in r.candidates if c.action == shared and c.error is not None), None)
            if c is not None and qi >= self.threshold and c.error <= self.max_site_error:
                plan[key], why[key] = shared, f"query-independence {qi:.3f} >= {self.threshold}, error {c.error:.2e}"
            else:
                plan[key] = None
                why[key] = (f"exact: query-independence {qi:.3f} < {self.threshold}" if qi < self.threshold else
                            "exact: shared query declined or too damaging")
        return plan, "", [], measure_joint(plan), why


def auto(max_error: Optional[float] = 0.01, max_cost: Optional[float] = None, metric: Any = "cosine",
         candidates: Optional[Sequence[Action]] = None, progress: bool = True, max_time: Optional[float] = None,
         objective: str = "time", timer: Optional[Callable] = None) -> Auto:
    """A plan per site, measured on the calibration batches, with one budget:

    * ``max_error`` (default 0.01): the least measured time within that error;
    * ``max_time``: the least error within that fraction of the exact model's measured time (e.g. 0.7);
    * ``max_cost``: the least error within that fraction of the exact attention FLOPs (e.g. 0.6).

    Time is measured here, on this device, at the calibration shapes and dtype: each candidate alone at each
    site against the exact call, then the whole model with the plan against exact. A candidate not faster than
    exact at its site is never chosen (nor measured for error), and the plan returned is never slower than
    exact end to end: when nothing pays off, every site stays exact and the report says why.
    ``objective="flops"`` chooses by symbolic FLOPs instead (a plan meant for another device: nothing is
    pruned by time, though the report still shows it). ``timer`` replaces the clock: ``timer(runs) ->
    seconds per label`` (see :mod:`rewrite.timing`).

    Example::

        model = rewrite.optimize(model, rewrite.auto(max_error=0.01), example_kwargs=batch, calibration=batches)
        print(rewrite.report(model).calibration.speedup())     # exact time / plan time, > 1 (or exactly 1)
    """
    return Auto(max_error=max_error, max_cost=max_cost, metric=metric, candidates=candidates, show_progress=progress,
                max_time=max_time, objective=objective, timer=timer)


def mixed_span(full_layers: Any = 2, local: Optional[Action] = None, metric: Any = "cosine",
               progress: bool = True, timer: Optional[Callable] = None) -> MixedSpan:
    """MASFormer: exact attention at ``full_layers`` sites (a count, chosen by measured damage, or names).
    The report shows the measured time of each site and of the model; the choice does not depend on it."""
    return MixedSpan(full_layers=full_layers, local=local, metric=metric, show_progress=progress, timer=timer)


def isomer(shared: Optional[Action] = None, threshold: float = 0.9, max_site_error: float = 0.005,
           metric: Any = "cosine", progress: bool = True, timer: Optional[Callable] = None) -> Isomer:
    """Isomer: a shared-context mixer where queries hardly matter (measured), exact elsewhere. The report
    shows the measured time of each site and of the model; the choice does not depend on it."""
    return Isomer(shared=shared, threshold=threshold, max_site_error=max_site_error, metric=metric,
                  show_progress=progress, timer=timer)


# --- the calibration run -------------------------------------------------------------------------------

def calibrate_and_plan(model: torch.nn.Module, policy: MeasuredPolicy, args: tuple, kwargs: dict,
                       batches: Sequence) -> tuple[dict, dict, CalibrationReport]:
    """Capture with switchable sites, measure on ``batches``, choose. Returns (plan by name, fitted, report)."""
    from .capture import capture_choosing_nesting

    if not batches:
        raise RewriteError(f"Policy {policy.name} measures errors on calibration data: pass "
                           "calibration=[batch, ...] (batches like the example inputs).")
    metric = metric_fn(policy.metric)
    start = time.perf_counter()
    installed: list = []

    def attempt(nested: bool) -> tuple:   # as optimize captures (api.optimize)
        if installed:
            installed.pop().uninstall()
        state, capture = _calibration_capture(model, policy, args, kwargs, nested_breaks=nested)
        installed.append(capture)
        return (state, capture), capture.session, len(state.sites)
    (state, capture), _ = capture_choosing_nesting(attempt)
    try:
        run = CalibrationRun(model, policy, state, batches, metric)
        with torch.no_grad():
            rows, choice, checks = run.measure_and_choose()
            plan_s, exact_s = checks.time({k: a for k, a in choice[0].items()})
    finally:
        capture.uninstall()
        state.use = {}
    plan_keys, message, backoffs, joint, why = choice
    for r in rows:
        act = plan_keys.get(r.key)
        chosen = r.candidate(act)
        r.choice = act if act is not None else EXACT
        r.why = why.get(r.key, "")
        r.chosen_ms = chosen.ms if chosen is not None else r.exact_ms
        r.chosen_flops = chosen.flops if chosen is not None else r.exact_flops
    plan = _plan_by_name(rows, plan_keys, policy)
    attention_ms = sum(r.exact_ms * r.calls for r in rows if r.exact_ms is not None)
    rep = CalibrationReport(policy=policy.describe(), metric=getattr(policy.metric, "__name__", str(policy.metric)),
                            batches=len(batches), rows=rows, joint_error=joint,
                            budget=getattr(policy, "max_error", None), backoffs=backoffs,
                            seconds=time.perf_counter() - start, message=message,
                            objective=getattr(policy, "objective", "time"),
                            time_budget=getattr(policy, "max_time", None), model_ms=plan_s * 1e3,
                            exact_model_ms=exact_s * 1e3, attention_ms=attention_ms,
                            attention_share=attention_ms / (exact_s * 1e3) if exact_s > 0 else None,
                            timing_seconds=run.timing_seconds)
    fitted_by_name = {((state.sites[k].name, state.sites[k].ordinal), ck): v for (k, ck), v in run.fitted.items()}
    return plan, fitted_by_name, rep


def _calibration_capture(model: torch.nn.Module, policy: MeasuredPolicy, args: tuple, kwargs: dict,
                         nested_breaks: bool) -> tuple:
    """A capture with switchable sites installed on ``model`` and run once on the example: ``(state, capture)``."""
    from .backend import make_compiler
    from .capture import ModelCapture, run_example
    from .pipeline import Session
    from .policy import Policy
    from .report import RewriteReport
    state = CalibrationState()
    session = Session(Policy("none"), RewriteReport("calibrate"), model, mode="calibrate")
    session.calibration = state
    session.candidates = policy.candidates_for
    capture = ModelCapture(model, make_compiler(session, "eager"), session.report, nested_breaks=nested_breaks)
    capture.session = session
    capture.install()
    try:
        run_example(model, args, kwargs)
    except BaseException:
        capture.uninstall()
        raise
    return state, capture


class CalibrationRun:
    """The measurements of one calibration: reference outputs, statistics and fits, the time of every mixer at
    every site, swap-one errors (of the candidates fast enough to matter), and end-to-end checks of plans."""

    def __init__(self, model, policy: MeasuredPolicy, state: CalibrationState, batches: Sequence, metric: Callable):
        self.model, self.policy, self.state, self.batches, self.metric = model, policy, state, list(batches), metric
        self.timer = policy.timer or default_timer
        self.show = policy.show_progress
        self.refs: list = []
        self.fitted: dict = {}
        self.timing_seconds = 0.0

    def measure_and_choose(self) -> tuple[list, tuple, PlanChecks]:
        """Returns (rows, the policy's choice, the checks it used). The capture has run the example already
        (``_calibration_capture``): its sites are known."""
        state, policy = self.state, self.policy
        self.refs = [run_batch(self.model, b) for b in progress(self.batches, "reference", enabled=self.show)]
        state.collect_stats = True
        for b in progress(self.batches, "statistics", enabled=self.show):
            run_batch(self.model, b)
        state.collect_stats = False
        keys = sorted(state.switches, key=lambda k: state.sites[k].index)
        cand_keys = {k: sorted({ck for sw in state.switches[k] for ck in sw.candidates},
                               key=list(map(candidate_key, policy.candidates_for(state.sites[k]))).index)
                     for k in keys}
        exact_s, cand_s = self._fit_and_time(cand_keys)
        errors = _swap_one_errors(state, keys, cand_keys, self.error_with, policy.prune_above(), self.show)
        rows = [_row(state, k, cand_keys[k], errors, policy, exact_s, cand_s, len(self.batches)) for k in keys]
        checks = PlanChecks(self.joint_bound, self.time_plan)
        return rows, policy.choose(rows, checks), checks

    def _fit_and_time(self, cand_keys: dict) -> tuple[dict, dict]:
        """Fit the candidates with fitted state and time every candidate at every site. A policy that prunes
        by time screens before fitting (fitting is the slow part of calibration): candidates slower than
        exact unfitted are declined and never fitted (fitting shares a budget out, it does not shrink it);
        the rest are fitted and timed again."""
        if self.policy.faster_only() is None:
            self.fitted = fit_candidates(self.state)
            return self._time_sites(cand_keys)
        failed: set = set()
        pre_exact, pre_cand = self._time_sites(cand_keys, failed)
        pre_cand = {kc: t for kc, t in pre_cand.items() if kc not in failed}   # those need their fit first
        self._decline_slower({k: [ck for ck in cks if (k, ck) in pre_cand or k not in pre_exact]
                              for k, cks in cand_keys.items()}, pre_exact, pre_cand)
        survivors = {k: [ck for ck in cks if (k, ck) not in self.state.declined] for k, cks in cand_keys.items()}
        self.fitted = fit_candidates(self.state, only={(k, ck) for k, cks in survivors.items() for ck in cks})
        if not any(survivors.values()):
            return pre_exact, pre_cand
        exact_s, cand_s = self._time_sites(survivors)
        self._decline_slower(survivors, exact_s, cand_s)
        return {**pre_exact, **exact_s}, {**pre_cand, **cand_s}

    def _time_sites(self, cand_keys: dict, failed: Optional[set] = None) -> tuple[dict, dict]:
        """Time the candidates at their sites; with ``failed``, a candidate that raises (one that cannot run
        before its fit) is recorded there instead of stopping the run."""
        t0 = time.perf_counter()
        calls = {k: (sw.exact, sw.candidates if failed is None else _guarded(k, sw.candidates, failed),
                     (q, kk, v, kw))
                 for k, (sw, q, kk, v, kw) in self.state.timing_calls.items() if k in cand_keys}
        try:
            return time_site_calls(calls, cand_keys, self.timer)
        finally:
            self.timing_seconds += time.perf_counter() - t0

    def _decline_slower(self, cand_keys: dict, exact_s: dict, cand_s: dict) -> None:
        """The cheap pruning: candidates not faster than exact at a site are not measured for error."""
        by = self.policy.faster_only()
        if by is None:
            return
        for k, cks in cand_keys.items():
            for ck in cks:
                seconds, exact = cand_s.get((k, ck)), exact_s.get(k)
                if seconds is None or exact is None:
                    self.state.declined[(k, ck)] = "not timed: the site was not called on the calibration batches"
                elif not is_faster(seconds, exact, by):
                    self.state.declined[(k, ck)] = f"not faster than exact here: {ratio_text(seconds, exact)}"

    def per_example(self, use: dict) -> list:
        """The metric per calibration example (per batch where a batch cannot be sliced) with ``use``."""
        self.state.use = {k: v for k, v in use.items() if v is not None}
        try:
            return [e for r, b in zip(self.refs, self.batches)
                    for e in example_errors(self.metric, r, run_batch(self.model, b), b)]
        finally:
            self.state.use = {}

    def error_with(self, use: dict) -> float:
        errs = self.per_example(use)
        return sum(errs) / len(errs)

    def joint_bound(self, use: dict) -> float:
        """The end-to-end check's error: :func:`calibrate.error_bound` over the calibration examples."""
        return error_bound(self.per_example(use))

    def time_plan(self, plan: dict) -> tuple[float, float]:
        """Seconds per forward of the whole model with ``plan`` and exact, interleaved on the calibration
        batches (each round runs both on the same batch, cycling through the batches)."""
        t0 = time.perf_counter()
        use = {k: v for k, v in plan.items() if v is not None}
        runs = {plan_label({}): self._runner({}), plan_label(use): self._runner(use)}
        try:
            got = self.timer(runs)
        finally:
            self.timing_seconds += time.perf_counter() - t0
        return float(got[plan_label(use)]), float(got[plan_label({})])

    def _runner(self, use: dict) -> Callable:
        turn = itertools.count()

        def run():
            self.state.use = use
            try:
                run_batch(self.model, self.batches[next(turn) % len(self.batches)])
            finally:
                self.state.use = {}
        return run


def _guarded(key, modules: dict, failed: set) -> dict:
    def guard(ck, mod):
        def run(*args, **kwargs):
            if (key, ck) in failed:
                return None
            try:
                return mod(*args, **kwargs)
            except Exception:  # noqa: BLE001 - e.g. a mixer that needs its fitted state: timed after fitting
                failed.add((key, ck))
        return run
    return {ck: guard(ck, mod) for ck, mod in modules.items()}


def _swap_one_errors(state: CalibrationState, keys: list, cand_keys: dict, error_with, prune: Optional[float],
                     show: bool) -> dict:
    """The error of each candidate at each site with every other site exact: ``{(site key, candidate): error}``.
    Candidates declined already (not faster than exact, when the policy prunes by time) are not measured. A
    family is ordered from least to most aggressive: once a gentler setting is over the whole budget
    (``prune``), the harsher ones are not measured (and cannot be chosen)."""
    todo = {k: [ck for ck in cand_keys[k] if (k, ck) not in state.declined] for k in keys}
    total = sum(len(v) for v in todo.values())
    errors = {}
    bar = progress(range(total), "swap-one errors", total=total, enabled=show)
    for k in keys:
        failed_families: set = set()
        for ck in todo[k]:
            family = ck.split("(")[0]
            if family in failed_families:
                state.declined[(k, ck)] = "skipped: a gentler setting already exceeded the error budget"
            else:
                errors[(k, ck)] = error_with({k: ck})
                if prune is not None and errors[(k, ck)] > prune:
                    failed_families.add(family)
            bar.update(1)
    bar.close()
    return errors


def _row(state: CalibrationState, key, cand_keys, errors, policy, exact_s: dict, cand_s: dict,
         batches: int) -> CalibrationRow:
    site = state.sites[key]
    st = state.stats.get(key)
    sizes = state.sizes.get(key)
    by_key = {candidate_key(a): a for a in policy.candidates_for(site)}
    cands = []
    for ck in by_key:
        ms = cand_s[(key, ck)] * 1e3 if (key, ck) in cand_s else None
        if ck in cand_keys and (key, ck) in errors:
            cands.append(CandidateRow(ck, _flops(by_key[ck], sizes), errors[(key, ck)], ms=ms))
        else:
            cands.append(CandidateRow(ck, _flops(by_key[ck], sizes), None,
                                      state.declined.get((key, ck), "not built"), ms=ms))
    return CalibrationRow(name=site.name, ordinal=site.ordinal, stats=st.to_json() if st else {},
                          exact_flops=_flops(Exact(), sizes), candidates=cands,
                          exact_ms=exact_s[key] * 1e3 if key in exact_s else None,
                          calls=max(1, round(state.calls.get(key, 0) / max(batches, 1))))


def _flops(action: Action, sizes: Optional[dict]) -> Optional[float]:
    if sizes is None or not hasattr(action, "flops"):
        return None
    try:
        return cost.evaluate(action.flops(), **sizes)
    except Exception:
        return None


def plan_is_merging_alone(report: CalibrationReport) -> None:
    """Rewrite ``report``'s rows for a final plan that keeps every site exact (token merging alone won): the sites
    the per-site plan had routed say so, with exact's time and FLOPs."""
    for r in report.rows:
        if r.choice != EXACT:
            r.why = f"exact: {r.choice} was in the per-site plan, but token merging alone is faster"
            r.choice, r.chosen_ms, r.chosen_flops = EXACT, r.exact_ms, r.exact_flops


def _plan_by_name(rows, plan_keys, policy) -> dict:
    """The plan as a policy map by module name (a module's several sites share its choice)."""
    by_key = {candidate_key(a): a for a in policy.candidate_list()}
    plan = {}
    for r in rows:
        act = plan_keys.get((r.name, r.ordinal))
        if act is None:
            plan.setdefault(r.name, Exact())
        else:
            plan[r.name] = by_key.get(act, Exact()) if not isinstance(plan.get(r.name), Exact) or r.ordinal == 0 else plan[r.name]
    return plan
