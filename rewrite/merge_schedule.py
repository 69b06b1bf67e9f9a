"""Token merging in a measured plan: which ``MergeTokens`` setting ``auto`` adds after choosing its per-site plan.

A block-level action cannot be calibrated by a per-site switch (it changes the shape of everything after its
block), so it is chosen after the per-site plan, on whole models: for each setting of the ladder, gentlest
first, the model is rewritten with the per-site plan and ``MergeTokens`` at every site the plan leaves exact,
its error measured on the calibration batches (the same bound as the per-site plan's: the mean plus two
standard errors) and its time against the per-site plan's (interleaved, median). The fastest setting within
the error budget that is faster wins; the ladder stops at the first setting over the budget.

Example::

    model = rewrite.optimize(model, rewrite.auto(max_error=0.01), example_kwargs=batch, calibration=batches)
    print(rewrite.report(model).calibration.token_merging)     # what each setting measured
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from .actions import Exact
from .calibrate import error_bound, metric_fn, progress, run_batch
from .timing import ModelRun, default_timer


@dataclasses.dataclass
class MergeRow:
    """One setting of the ladder: its error bound, its time and the per-site plan's (ms), and the outcome."""
    action: str
    error: Optional[float] = None
    ms: Optional[float] = None
    plan_ms: Optional[float] = None
    outcome: str = ""


def merge_ladder(policy) -> list:
    """The block-level candidates of ``policy``, gentlest first (none where its budget is not an error)."""
    if getattr(policy, "max_error", None) is None or getattr(policy, "objective", "time") != "time":
        return []
    return [a for a in policy.candidate_list() if getattr(a, "block_level", False)]


def with_merging(plan: dict, action) -> dict:
    """``plan`` (by module name) with ``action`` at every site it leaves exact."""
    return {name: (action if isinstance(chosen, Exact) else chosen) for name, chosen in plan.items()}


def choose_merging(model: torch.nn.Module, plan: dict, policy, batches: Sequence, build: Callable,
                   rows: list) -> dict:
    """The plan with the best token merging added (or ``plan``): ``build(plan)`` returns an optimized copy of
    ``model``; ``rows`` receives a :class:`MergeRow` per setting tried."""
    ladder = merge_ladder(policy)
    if not ladder or not plan:
        return plan
    metric = metric_fn(policy.metric)
    timer = policy.timer or default_timer
    with torch.no_grad():
        refs = [run_batch(model, b) for b in batches]
        base = build(plan)
        best, best_ms = plan, None
        for action in progress(ladder, "token merging", enabled=policy.show_progress):
            row = MergeRow(action.describe())
            rows.append(row)
            merged = with_merging(plan, action)
            candidate = build(merged)
            row.error = error_bound([metric(r, run_batch(candidate, b), b) for r, b in zip(refs, batches)])
            if row.error > policy.max_error:
                row.outcome = f"error {row.error:.3g} over the budget {policy.max_error:g}; harsher settings not tried"
                break
            row.ms, row.plan_ms = _time_pair(timer, base, candidate, plan, merged, batches[0])
            if row.ms is None:
                row.outcome = "not timed (the timer does not time whole models with token merging)"
                break
            if row.ms >= row.plan_ms * (1 - policy.min_gain) or (best_ms is not None and row.ms >= best_ms):
                row.outcome = "not faster"
                continue
            best, best_ms = merged, row.ms
            row.outcome = "chosen"
    for r in rows:
        if r.outcome == "chosen" and r.ms != best_ms:
            r.outcome = "within budget; a harsher setting is faster"
    return best


def _time_pair(timer, base, candidate, plan: dict, merged: dict, batch) -> tuple:
    """(ms with merging, ms of the per-site plan), timed interleaved; (None, None) where the timer cannot."""
    labels = {name: ModelRun(tuple(sorted((k, 0, a.describe()) for k, a in p.items() if not isinstance(a, Exact))))
              for name, p in (("plan", plan), ("merged", merged))}
    try:
        out = timer({labels["merged"]: lambda: run_batch(candidate, batch), labels["plan"]: lambda: run_batch(base, batch)})
    except KeyError:  # a table timer (tests, another device) without these runs
        return None, None
    return out[labels["merged"]] * 1e3, out[labels["plan"]] * 1e3
