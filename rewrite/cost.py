"""Symbolic cost of the attention core (q, k, v to output; projections excluded), with sympy.

Example::

    >>> from rewrite.cost import exact_flops, SYMBOLS
    >>> exact_flops()
    B*H*N*Nk*(2*d + 2*dv + 5)
"""
from __future__ import annotations

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
