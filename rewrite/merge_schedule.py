"""Token merging in a measured plan: which ``MergeTokens`` setting ``auto`` adds after choosing its per-site plan,
and whether merging alone (every site exact) beats that (``merging_alone_if_faster``).

A block-level action cannot be calibrated by a per-site switch (it changes the shape of everything after its
block), so it is chosen after the per-site plan, on a whole model: one copy, rewritten with the per-site plan and
the ladder's harshest ``MergeTokens`` at every site the plan leaves exact, measures every setting (its mergers
take each setting in turn), gentlest first: its error on the calibration examples (the same bound as the per-site plan's: the per-example
mean plus two standard deviations, :func:`calibrate.error_bound`); the ladder stops at the first setting over
the budget. Then the harshest setting within the budget is timed against the per-site plan (interleaved,
median) and chosen if it is faster, else the next gentler one.

Example::

    model = rewrite.optimize(model, rewrite.auto(max_error=0.01), example_kwargs=batch, calibration=batches)
    print(rewrite.report(model).calibration.token_merging)     # what each setting measured
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from .actions import Exact
from .calibrate import error_bound, example_errors, metric_fn, progress, run_batch
from .timing import ModelRun, default_timer


#: what a ladder's mergers are added to: the per-site plan, or every site exact (merging alone)
AFTER_PLAN, ALONE = "per-site plan", "every site exact"


@dataclasses.dataclass
class MergeRow:
    """One setting of a ladder: its error bound, its time and the time without it (ms), and the outcome;
    ``base`` is what the mergers were added to (``AFTER_PLAN`` or ``ALONE``)."""
    action: str
    error: Optional[float] = None
    ms: Optional[float] = None
    plan_ms: Optional[float] = None
    outcome: str = ""
    base: str = AFTER_PLAN


def merge_ladder(policy) -> list:
    """The block-level candidates of ``policy``, gentlest first (none where its budget is not an error)."""
    if getattr(policy, "max_error", None) is None or getattr(policy, "objective", "time") != "time":
        return []
    return [a for a in policy.candidate_list() if getattr(a, "block_level", False)]


def with_merging(plan: dict, action) -> dict:
    """``plan`` (by module name) with ``action`` at every site it leaves exact."""
    return {name: (action if isinstance(chosen, Exact) else chosen) for name, chosen in plan.items()}


def choose_merging(model: torch.nn.Module, plan: dict, policy, batches: Sequence, build: Callable,
                   rows: list, modules_of: Callable, base: str = AFTER_PLAN) -> tuple[dict, Optional[torch.nn.Module]]:
    """The plan with the best token merging added (or ``plan``), and the copy of ``model`` it measured rewritten
    with that plan (None where it built none): ``build(plan)`` returns an optimized copy of ``model``,
    ``modules_of(copy)`` the mergers its block-level actions inserted (by site key); ``rows`` receives a
    :class:`MergeRow` per setting tried.

    One copy is built, with the harshest setting; each setting is measured on it by setting its mergers (they
    read their settings on every call). Errors first, gentlest up, until a setting is over the budget (error
    grows with ``r``); then times, harshest within the budget down, until one is faster than the per-site plan
    (time falls with ``r``, so usually the first timed wins and the gentler ones are not timed)."""
    ladder = merge_ladder(policy)
    if not ladder or not plan:
        return plan, None
    metric = metric_fn(policy.metric)
    with torch.no_grad():
        refs = [run_batch(model, b) for b in batches]
        candidate = build(with_merging(plan, ladder[-1]))
        mergers = [m for ms in modules_of(candidate).values() for m in ms]
        if not mergers:   # every site declined merging (a decoder, say): nothing to measure or time
            rows.append(MergeRow(ladder[-1].describe(), base=base, outcome=_declined(candidate)))
            return plan, None
        within = []
        for action in progress(ladder, "token merging", enabled=policy.show_progress):
            row = MergeRow(action.describe(), base=base)
            rows.append(row)
            set_merging(mergers, action)
            row.error = error_bound([e for r, b in zip(refs, batches)
                                     for e in example_errors(metric, r, run_batch(candidate, b), b)])
            if row.error > policy.max_error:
                row.outcome = f"error {row.error:.3g} over the budget {policy.max_error:g}; harsher settings not tried"
                break
            within.append((row, action))
        without = build(plan) if within else None
        chosen = _fastest_within(policy, plan, without, candidate, mergers, batches, within)
        return chosen, (without if chosen is plan else candidate)   # the candidate's mergers hold the chosen setting


def merging_alone_if_faster(model: torch.nn.Module, plan: dict, merged: dict, merged_copy, policy,
                            batches: Sequence, build: Callable, rows: list, modules_of: Callable) -> dict:
    """``merged`` (the per-site plan with its merging; ``merged_copy``: the copy ``choose_merging`` measured it
    on, or None), or token merging alone where that is faster.

    A per-site plan that routes some sites spends error budget that merging could have spent everywhere, and a
    merged token saves its whole block, not only its attention: so when the per-site plan is not all exact,
    merging alone (every site exact) gets its own ladder, and the two whole plans are timed against each other
    (interleaved, median); merging alone is kept when it is faster by ``policy.min_gain``."""
    if all(isinstance(a, Exact) for a in plan.values()) or not merge_ladder(policy):
        return merged
    exact_plan = {name: Exact() for name in plan}
    first = len(rows)
    alone, alone_copy = choose_merging(model, exact_plan, policy, batches, build, rows, modules_of, base=ALONE)
    if alone is exact_plan:
        return merged
    winner = next(r for r in rows[first:] if r.outcome == "chosen")
    timer = policy.timer or default_timer
    with torch.no_grad():
        alone_ms, merged_ms = _time_pair(timer, merged_copy if merged_copy is not None else build(merged),
                                         alone_copy, merged, alone, batches[0])
    if alone_ms is None or not alone_ms < merged_ms * (1 - policy.min_gain):
        winner.outcome = (f"best of merging alone, but the per-site plan with its merging is as fast or faster "
                          f"({merged_ms:.4g} ms vs {alone_ms:.4g} ms)" if alone_ms is not None else
                          "best of merging alone; not timed against the per-site plan")
        return merged
    for row in rows[:first]:
        if row.outcome == "chosen":
            row.outcome = f"best after the per-site plan, but merging alone is faster ({alone_ms:.4g} ms vs {merged_ms:.4g} ms)"
    return alone


def _declined(built: torch.nn.Module) -> str:
    """Why no site of ``built`` (rewritten with a block-level action everywhere it could go) took a merger."""
    rep = getattr(built, "rewrite_report", None)      # what rewrite.report(built) returns
    reasons = [s.reason for s in (rep.sites if rep is not None else []) if getattr(s, "reason", "")]
    return "declined at every site" + (f": {reasons[0]}" if reasons else "")


def set_merging(mergers: list, action) -> None:
    """Give every merger ``action``'s settings (the fields of the action that the merger has)."""
    for merger in mergers:
        for field in dataclasses.fields(action):
            if hasattr(merger, field.name):
                setattr(merger, field.name, getattr(action, field.name))


def _fastest_within(policy, plan: dict, base, candidate, mergers: list, batches: Sequence, within: list) -> dict:
    """The harshest setting of ``within`` (rows and actions, gentlest first) with which ``candidate`` is faster
    than ``base`` (the per-site plan) on the clock, trying gentler ones while it is not; ``plan`` when none is."""
    timer = policy.timer or default_timer
    for i, (row, action) in enumerate(reversed(within)):
        set_merging(mergers, action)
        merged = with_merging(plan, action)
        row.ms, row.plan_ms = _time_pair(timer, base, candidate, plan, merged, batches[0])
        if row.ms is None:
            row.outcome = "not timed (the timer does not time whole models with token merging)"
            return plan
        if row.ms < row.plan_ms * (1 - policy.min_gain):
            row.outcome = "chosen"
            for gentler, _ in within[:len(within) - 1 - i]:
                gentler.outcome = "within budget; not timed (a harsher setting is faster)"
            return merged
        row.outcome = "not faster"
    return plan


def _time_pair(timer, base, candidate, plan: dict, merged: dict, batch) -> tuple:
    """(ms with merging, ms of the per-site plan), timed interleaved; (None, None) where the timer cannot."""
    labels = {name: ModelRun(tuple(sorted((k, 0, a.describe()) for k, a in p.items() if not isinstance(a, Exact))))
              for name, p in (("plan", plan), ("merged", merged))}
    try:
        out = timer({labels["merged"]: lambda: run_batch(candidate, batch), labels["plan"]: lambda: run_batch(base, batch)})
    except KeyError:  # a table timer (tests, another device) without these runs
        return None, None
    return out[labels["merged"]] * 1e3, out[labels["plan"]] * 1e3
