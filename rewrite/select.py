"""Budgeted selection: one candidate per site, as a multiple-choice knapsack.

Every site has options ``(key, cost, error)``, one of which is exact (error 0). Errors are the measured
swap-one damages on calibration data, treated as additive (the end-to-end check that follows catches
compounding). Two modes:

* error budget: minimise total cost subject to total error <= ``max_error``;
* cost budget: minimise total error subject to total cost <= ``max_cost``.

Both are solved exactly up to the discretisation of the constrained quantity (``grid`` steps) by dynamic
programming over sites, O(sites × options × grid).

Example::

    >>> from rewrite.select import Option, solve
    >>> opts = {"a": [Option("exact", 10, 0), Option("cheap", 2, 0.006)],
    ...         "b": [Option("exact", 10, 0), Option("cheap", 2, 0.006)]}
    >>> sorted(solve(opts, max_error=0.01).values())
    ['cheap', 'exact']
"""
from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Optional


@dataclasses.dataclass(frozen=True)
class Option:
    key: Hashable
    cost: float
    error: float


def solve(options: dict, max_error: Optional[float] = None, max_cost: Optional[float] = None,
          grid: int = 4000) -> dict:
    """Pick one option per site; returns ``{site: option key}``. Exactly one budget must be given."""
    if (max_error is None) == (max_cost is None):
        raise ValueError("give exactly one of max_error and max_cost")
    sites = list(options)
    if max_error is not None:
        return _dp(sites, options, budget=max_error, weight=lambda o: o.error, value=lambda o: o.cost, grid=grid)
    return _dp(sites, options, budget=max_cost, weight=lambda o: o.cost, value=lambda o: o.error, grid=grid)


def _dp(sites, options, budget, weight, value, grid):
    """min Σ value subject to Σ weight <= budget; weights rounded up to the grid (never over budget)."""
    if budget < 0:
        budget = 0.0
    unit = budget / grid if budget > 0 else 1.0
    INF = math.inf

    def units(o) -> int:
        w = max(weight(o), 0.0)
        if budget <= 0:
            return 0 if w == 0 else grid + 1
        return int(math.ceil(w / unit - 1e-9))

    best = [INF] * (grid + 1)
    best[0] = 0.0
    choice: list = []
    for site in sites:
        new = [INF] * (grid + 1)
        pick = [None] * (grid + 1)
        for o in options[site]:
            u = units(o)
            if u > grid:
                continue
            v = value(o)
            for g in range(grid - u, -1, -1):
                if best[g] == INF:
                    continue
                cand = best[g] + v
                if cand < new[g + u] - 1e-12 or (abs(cand - new[g + u]) <= 1e-12 and pick[g + u] is not None
                                                   and weight(o) < weight(pick[g + u][0])):
                    new[g + u] = cand
                    pick[g + u] = (o, g)
        best = new
        choice.append(pick)
    end = min(range(grid + 1), key=lambda g: (best[g], g))
    if best[end] == INF:
        raise ValueError("no plan fits the budget")
    plan = {}
    g = end
    for site, pick in zip(reversed(sites), reversed(choice)):
        o, g_prev = pick[g]
        plan[site] = o.key
        g = g_prev
    return plan
