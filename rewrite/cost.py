"""Symbolic cost of the attention core (q, k, v to output; projections excluded), with sympy.

Example::

    >>> from rewrite.cost import exact_flops, SYMBOLS
    >>> exact_flops()
    B*H*N*Nk*(2*d + 2*dv + 5)
"""
from __future__ import annotations

import math

import sympy

B, H, N, Nk, d, dv = sympy.symbols("B H N Nk d dv", positive=True, integer=True)
SYMBOLS = {"B": B, "H": H, "N": N, "Nk": Nk, "d": d, "dv": dv}

#: softmax and mask work per score: scale, mask add, max, exp, sum, divide (counted as 5 per score)
SOFTMAX_FLOPS_PER_SCORE = 5


def exact_flops() -> sympy.Expr:
    """Score product, softmax and value product of dense softmax attention."""
    return sympy.factor(B * H * N * Nk * (2 * d + 2 * dv + SOFTMAX_FLOPS_PER_SCORE))


def exact_bytes(element_bytes: int = 4, materialized_scores: bool = True) -> sympy.Expr:
    """Bytes moved: q, k, v and output once; eager attention also writes and reads the N×Nk scores."""
    io = B * H * (N * d + Nk * d + Nk * dv + N * dv)
    scores = 4 * B * H * N * Nk if materialized_scores else 0
    return element_bytes * (io + scores)


def evaluate(expr: sympy.Expr, **sizes) -> float:
    return float(expr.subs({SYMBOLS[k]: v for k, v in sizes.items() if k in SYMBOLS}))


def crossover(cheaper, reference, head_dim: int = 64, value_dim: int = None, lo: float = 1.0, hi: float = 1e7):
    """The sequence length N (self-attention, B = H = 1) above which ``cheaper`` costs fewer FLOPs than
    ``reference``; None when it never does in [lo, hi]. Both are actions (or sympy expressions).

    Example::

        >>> import rewrite
        >>> round(crossover(rewrite.Linear(), rewrite.Exact(), head_dim=64))  # doctest: +SKIP
        66
    """
    value_dim = head_dim if value_dim is None else value_dim
    fa = cheaper.flops() if hasattr(cheaper, "flops") else cheaper
    fb = reference.flops() if hasattr(reference, "flops") else reference
    diff = (fa - fb).subs({B: 1, H: 1, Nk: N, d: head_dim, dv: value_dim})
    f = sympy.lambdify(N, diff, modules=["math", {"Min": min, "Max": max, "ceiling": math.ceil, "floor": math.floor}])
    if f(hi) >= 0:
        return None
    if f(lo) < 0:
        return lo
    a, b = lo, hi
    for _ in range(200):
        mid = (a * b) ** 0.5 if b / a > 4 else (a + b) / 2
        if f(mid) < 0:
            b = mid
        else:
            a = mid
        if b - a < 1e-6 * b:
            break
    return b
