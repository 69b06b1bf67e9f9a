"""Measured policies: decide per site from statistics and errors measured on calibration batches.

* :func:`auto` — as much attention-FLOP cut as possible while the whole model's measured error stays
  within ``max_error`` (or as little error as possible within ``max_cost``, a fraction of the exact
  attention FLOPs): a multiple-choice knapsack over swap-one errors, then an end-to-end check on the
  calibration batches with back-off (the chosen site with the largest error returns to exact) until the
  joint error fits.
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
import math
import time
from typing import Any, Callable, Optional, Sequence

import torch

from . import cost
from .actions import Action, Exact, RewriteError, action_types
from .calibrate import (CalibrationState, candidate_key, fit_candidates, metric_fn, progress,
                        run_batch)
from .select import Option, solve


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
    return out


@dataclasses.dataclass
class CandidateRow:
    action: str
    flops: Optional[float]
    error: Optional[float]
    declined: str = ""


@dataclasses.dataclass
class CalibrationRow:
    """What calibration measured at one site, the choice and why."""
    name: str
    ordinal: int
    stats: dict
    exact_flops: Optional[float]
    candidates: list
    choice: str = "Exact(kernel='sdpa')"
    why: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CalibrationReport:
    policy: str
    metric: str
    batches: int
    rows: list
    joint_error: Optional[float] = None
    budget: Optional[float] = None
    backoffs: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    message: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class MeasuredPolicy:
    """Base of policies that need calibration batches."""
    name = "measured"
    metric: Any = "cosine"
    candidates: Optional[Sequence[Action]] = None
    show_progress: bool = True

    def candidate_list(self) -> list:
        return list(self.candidates) if self.candidates is not None else default_candidates()

    def candidates_for(self, site) -> list:
        return self.candidate_list()

    def choose(self, rows: list, measure_joint: Callable) -> tuple[dict, str, list, Optional[float], dict]:
        """``(plan by site key, message, back-off steps, joint error bound, why per site)``."""
        raise NotImplementedError

    def prune_above(self) -> Optional[float]:
        """Swap-one error above which harsher settings of the same mixer family are not measured."""
        return None

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                           if f.name not in ("candidates", "show_progress") and not callable(getattr(self, f.name)))
        return f"{self.name}({fields})"


@dataclasses.dataclass
class Auto(MeasuredPolicy):
    max_error: Optional[float] = 0.01
    max_cost: Optional[float] = None
    metric: Any = "cosine"
    candidates: Optional[Sequence[Action]] = None
    max_backoff: int = 12
    show_progress: bool = True
    name = "auto"

    def __post_init__(self):
        if self.max_cost is not None:
            self.max_error = None if self.max_error == 0.01 else self.max_error
        if (self.max_error is None) == (self.max_cost is None):
            raise RewriteError("rewrite.auto takes one budget: max_error=... (largest error allowed) or "
                               "max_cost=... (largest fraction of the exact attention FLOPs, e.g. 0.6).")
        if self.max_error is not None and self.max_error < 0:
            raise RewriteError(f"max_error={self.max_error!r} must be >= 0.")
        if self.max_cost is not None and not 0 < self.max_cost <= 1:
            raise RewriteError(f"max_cost={self.max_cost!r} is a fraction of the exact attention FLOPs in (0, 1].")

    def prune_above(self) -> Optional[float]:
        return self.max_error

    @staticmethod
    def _gentler(options: list, current, current_error: float):
        """The cheapest measured option with a smaller swap-one error than ``current`` (None: exact)."""
        better = [o for o in options if o.key is not None and o.key != current and o.error < current_error]
        if not better:
            return None
        return min(better, key=lambda o: (o.cost, o.error)).key

    def choose(self, rows, measure_joint):
        options = {}
        for r in rows:
            opts = [Option(None, r.exact_flops or 0.0, 0.0)]
            opts += [Option(c.action, c.flops, max(c.error, 0.0)) for c in r.candidates
                     if c.error is not None and c.flops is not None and math.isfinite(c.error)]
            options[(r.name, r.ordinal)] = opts
        total_exact = sum(r.exact_flops or 0.0 for r in rows)
        backoffs: list = []
        try:
            if self.max_error is not None:
                plan = solve(options, max_error=self.max_error)
            else:
                plan = solve(options, max_cost=self.max_cost * total_exact)
        except ValueError:
            plan = {k: None for k in options}
            why = {k: "exact: no plan reaches the budget" for k in options}
            return plan, (f"no plan reaches max_cost={self.max_cost} (a fraction of the exact attention FLOPs) with "
                          "the candidates measured; every site stays exact. Raise the budget or add cheaper "
                          "candidates."), [], 0.0, why
        joint = measure_joint(plan)
        budget = self.max_error
        while budget is not None and joint > budget and len(backoffs) < self.max_backoff:
            chosen = [(k, a) for k, a in plan.items() if a is not None]
            if not chosen:
                break
            err_of = {(r.name, r.ordinal): {c.action: c.error for c in r.candidates} for r in rows}
            worst = max(chosen, key=lambda ka: err_of[ka[0]].get(ka[1], 0.0))
            plan[worst[0]] = self._gentler(options[worst[0]], worst[1], err_of[worst[0]].get(worst[1], 0.0))
            backoffs.append(f"{worst[0][0]}: {worst[1]} -> {plan[worst[0]] or 'exact'} "
                            f"(joint error {joint:.4g} > {budget:.4g})")
            joint = measure_joint(plan)
        why = {}
        for r in rows:
            key = (r.name, r.ordinal)
            act = plan.get(key)
            c = next((c for c in r.candidates if c.action == act), None)
            if act is None:
                measured = [c for c in r.candidates if c.error is not None]
                why[key] = ("exact: every candidate declined this site" if not measured else
                            "exact: no candidate fits the remaining budget")
            else:
                why[key] = f"swap-one error {c.error:.2e}, {c.flops / max(r.exact_flops or 1, 1):.0%} of exact FLOPs"
        msg = ""
        if budget is not None and joint > budget:
            plan = {k: None for k in plan}
            joint = 0.0
            msg = (f"no plan met max_error={budget} on the calibration batches; every site stays exact. "
                   "Raise the budget or add candidates.")
        return plan, msg, backoffs, joint, why


@dataclasses.dataclass
class MixedSpan(MeasuredPolicy):
    full_layers: Any = 2
    local: Optional[Action] = None
    metric: Any = "cosine"
    show_progress: bool = True
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
         candidates: Optional[Sequence[Action]] = None, progress: bool = True) -> Auto:
    """The most attention FLOPs cut within ``max_error`` (or the least error within ``max_cost``)."""
    return Auto(max_error=max_error, max_cost=max_cost, metric=metric, candidates=candidates, show_progress=progress)


def mixed_span(full_layers: Any = 2, local: Optional[Action] = None, metric: Any = "cosine",
               progress: bool = True) -> MixedSpan:
    """MASFormer: exact attention at ``full_layers`` sites (a count, chosen by measured damage, or names)."""
    return MixedSpan(full_layers=full_layers, local=local, metric=metric, show_progress=progress)


def isomer(shared: Optional[Action] = None, threshold: float = 0.9, max_site_error: float = 0.005,
           metric: Any = "cosine", progress: bool = True) -> Isomer:
    """Isomer: a shared-context mixer where queries hardly matter (measured), exact elsewhere."""
    return Isomer(shared=shared, threshold=threshold, max_site_error=max_site_error, metric=metric,
                  show_progress=progress)


# --- the calibration run -------------------------------------------------------------------------------

def calibrate_and_plan(model: torch.nn.Module, policy: MeasuredPolicy, args: tuple, kwargs: dict,
                       batches: Sequence) -> tuple[dict, dict, CalibrationReport]:
    """Capture with switchable sites, measure on ``batches``, choose. Returns (plan by name, fitted, report)."""
    from .backend import make_compiler
    from .capture import ModelCapture, run_example
    from .pipeline import Session
    from .policy import Policy
    from .report import RewriteReport

    if not batches:
        raise RewriteError(f"Policy {policy.name} measures errors on calibration data: pass "
                           "calibration=[batch, ...] (batches like the example inputs).")
    metric = metric_fn(policy.metric)
    start = time.perf_counter()
    state = CalibrationState()
    session = Session(Policy("none"), RewriteReport("calibrate"), model, mode="calibrate")
    session.calibration = state
    session.candidates = policy.candidates_for
    capture = ModelCapture(model, make_compiler(session, "eager"), session.report).install()
    show = policy.show_progress
    try:
        run_example(model, args, kwargs)
        with torch.no_grad():
            refs = [run_batch(model, b) for b in progress(batches, "reference", enabled=show)]
            state.collect_stats = True
            for b in progress(batches, "statistics", enabled=show):
                run_batch(model, b)
            state.collect_stats = False
            fitted = fit_candidates(state)

            def per_batch(use: dict) -> list:
                state.use = {k: v for k, v in use.items() if v is not None}
                try:
                    return [metric(r, run_batch(model, b), b) for r, b in zip(refs, batches)]
                finally:
                    state.use = {}

            def error_with(use: dict) -> float:
                errs = per_batch(use)
                return sum(errs) / len(errs)

            def joint_bound(use: dict) -> float:
                """The end-to-end check bounds the *expected* error of unseen batches like these: the mean
                over calibration batches plus two standard errors (one batch alone is not bounded: the
                budget is on the average, as the metric is)."""
                errs = per_batch(use)
                mean = sum(errs) / len(errs)
                std = (sum((e - mean) ** 2 for e in errs) / max(len(errs) - 1, 1)) ** 0.5
                return mean + 2 * std / len(errs) ** 0.5

            keys = sorted(state.switches, key=lambda k: state.sites[k].index)
            cand_keys = {k: sorted({ck for sw in state.switches[k] for ck in sw.candidates},
                                   key=lambda ck: list(map(candidate_key, policy.candidates_for(state.sites[k]))).index(ck))
                         for k in keys}
            errors = _swap_one_errors(state, keys, cand_keys, error_with, policy.prune_above(), show)
            rows = [_row(state, k, cand_keys[k], errors, policy) for k in keys]
            plan_keys, message, backoffs, joint, why = policy.choose(rows, joint_bound)
    finally:
        capture.uninstall()
        state.use = {}
    for r in rows:
        act = plan_keys.get((r.name, r.ordinal))
        r.choice = act if act is not None else Exact().describe()
        r.why = why.get((r.name, r.ordinal), "")
    plan = _plan_by_name(rows, plan_keys, policy)
    rep = CalibrationReport(policy=policy.describe(), metric=getattr(policy.metric, "__name__", str(policy.metric)),
                            batches=len(batches), rows=rows, joint_error=joint,
                            budget=getattr(policy, "max_error", None), backoffs=backoffs,
                            seconds=time.perf_counter() - start, message=message)
    fitted_by_name = {((state.sites[k].name, state.sites[k].ordinal), ck): v for (k, ck), v in fitted.items()}
    return plan, fitted_by_name, rep


def _swap_one_errors(state: CalibrationState, keys: list, cand_keys: dict, error_with, prune: Optional[float],
                     show: bool) -> dict:
    """The error of each candidate at each site with every other site exact: ``{(site key, candidate): error}``.
    A family is ordered from least to most aggressive: once a gentler setting is over the whole budget
    (``prune``), the harsher ones are not measured (and cannot be chosen)."""
    total = sum(len(v) for v in cand_keys.values())
    errors = {}
    bar = progress(range(total), "swap-one errors", total=total, enabled=show)
    for k in keys:
        failed_families: set = set()
        for ck in cand_keys[k]:
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


def _row(state: CalibrationState, key, cand_keys, errors, policy) -> CalibrationRow:
    site = state.sites[key]
    st = state.stats.get(key)
    sizes = state.sizes.get(key)
    by_key = {candidate_key(a): a for a in policy.candidates_for(site)}
    cands = []
    for ck in by_key:
        if ck in cand_keys and (key, ck) in errors:
            cands.append(CandidateRow(ck, _flops(by_key[ck], sizes), errors[(key, ck)]))
        else:
            cands.append(CandidateRow(ck, None, None, state.declined.get((key, ck), "not built")))
    return CalibrationRow(name=site.name, ordinal=site.ordinal, stats=st.to_json() if st else {},
                          exact_flops=_flops(Exact(), sizes), candidates=cands)


def _flops(action: Action, sizes: Optional[dict]) -> Optional[float]:
    if sizes is None or not hasattr(action, "flops"):
        return None
    try:
        return cost.evaluate(action.flops(), **sizes)
    except Exception:
        return None


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
