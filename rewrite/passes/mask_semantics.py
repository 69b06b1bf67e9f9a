"""What a site's masks mean, decided from the graph, never from the example's values.

Two facts decide whether SDPA (scores + mask) computes what the original computes for *every* input:

* A fill (``masked_fill`` / ``where``) *replaces* scores. SDPA can only add. The two agree where a row keeps a
  key (a fill at or below ``MASKED_BELOW`` underflows to 0 either way), and differ on rows whose every
  key is filled: the original gives a uniform row (every score equal) for a finite fill, NaN for −∞; SDPA
  gives the row's own softmax, or 0. So each fill's value is read — a number, or a constant, state buffer
  or tensor factory in the graph — and the lowering restores those rows (``lower.py``: ``row_fixes``).
* An additive term from the model's inputs may hold −∞ in a whole row: the original gives NaN, SDPA 0.

A fill whose value cannot be read (computed at run time), a fill above ``MASKED_BELOW``, or a finite fill
whose rows cannot be restored exactly (another term added after it) rejects the site. A fill in a split batch
layout (``(b·h, n, n)`` scores viewed as ``(b, h, n, n)``) is restored in the layout the SDPA call runs in.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ..graph import attribute_value, factory_number, input_cone, meta_value, reads_only_shape
from ..sites import MASKED_BELOW
from .causal import evaluate_constant
from .find_sites import SiteMatch

_CASTS = {"to", "type", "float", "half", "bfloat16", "double", "type_as", "detach", "clone", "contiguous"}


def read_fill_values(gm: fx.GraphModule, m: SiteMatch, values: dict,
                     is_state: Callable[[fx.Node], bool]) -> Optional[str]:
    """Set ``op.fill_value`` (a float) on every fill of ``m``; the reason to reject the site, or None."""
    for op in m.ops:
        if op.kind != "fill":
            continue
        value = static_value(gm, op.value, values, is_state)
        if value is None:
            return ("the scores are filled with a tensor computed at run time; whether it masks depends on its "
                    "value, which rewrite cannot check for every input")
        if not value <= MASKED_BELOW:
            return (f"the scores are replaced by {value:g} where a condition holds; a value above "
                    f"{MASKED_BELOW:g} still takes part in the softmax, so it is not a mask SDPA can take")
        op.fill_value = value
    return None


#: ops that pick, repeat or reshape values without computing new ones (a 0/1 tensor stays 0/1 through them)
_SELECTING = {"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "contiguous", "to", "type", "float",
              "half", "bfloat16", "double", "bool", "long", "int", "clone", "detach", "permute", "transpose",
              "flatten", "index_select", "gather", "narrow", "repeat", "__getitem__"}


def holds_only_zero_one(gate: fx.Node, values: dict, is_state: Callable[[fx.Node], bool]) -> bool:
    """Whether ``gate`` holds only 0 and 1 for every input: it only selects or reshapes values of the model's
    state (a registered 0/1 buffer sliced to the length, indexed by anything), and that state holds only 0
    and 1. What ``is_state`` reads is guarded, so a later change of the buffer is a recapture."""
    cone = input_cone(gate, limit=64, skip_input=lambda node, i: reads_only_shape(node, i))
    if cone is None:
        return False
    nodes, leaves = cone
    for node in nodes:
        value = values.get(node) if node.op == "placeholder" else meta_value(node)
        if node in leaves:
            if not isinstance(value, torch.Tensor) and node.op != "get_attr":
                continue  # a size
            tensor = attribute_value(node) if node.op == "get_attr" else (value if is_state(node) else None)
            if not isinstance(tensor, torch.Tensor) or not bool(((tensor == 0) | (tensor == 1)).all()):
                return False
        elif isinstance(value, torch.Tensor):  # size arithmetic only indexes
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
            if name not in _SELECTING and name != "getitem":
                return False
    return True


def static_value(gm: fx.GraphModule, arg: Any, values: dict, is_state: Callable[[fx.Node], bool]) -> Optional[float]:
    """The value of a one-element fill that does not depend on the model's inputs, or None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        return _one(attribute_value(arg))
    if arg.op == "placeholder":
        return _one(values.get(arg)) if is_state(arg) else None
    if arg.op == "call_function" and factory_number(arg) is not None:
        return factory_number(arg)
    if arg.op == "call_method" and arg.target in _CASTS and arg.args:
        return static_value(gm, arg.args[0], values, is_state)
    return evaluate_constant(gm, arg, values, is_state)


def _one(t: Any) -> Optional[float]:
    if isinstance(t, torch.Tensor) and t.numel() == 1 and (t.is_floating_point() or not t.dtype.is_complex):
        return float(t.detach().reshape(()).item())
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return None


def empty_row_problem(m: SiteMatch, causal_ops: set) -> Optional[str]:
    """Why rows whose every key is masked by a finite fill cannot be restored exactly; None when they can.
    A fill proven to be the causal mask never empties a row (the diagonal stays), so it is left out."""
    finite = [i for i, op in enumerate(m.ops)
              if op.kind == "fill" and i not in causal_ops and math.isfinite(getattr(op, "fill_value", -math.inf))]
    if not finite:
        return None
    if len(finite) > 1:
        return "two finite fills on the scores: rows whose every key is masked would differ from the original"
    i = finite[0]
    if m.extra_columns is not None and any(op.kind == "scale" or (op.kind == "fill" and op.fill_value != m.ops[i]
                                           .fill_value) for op in m.ops[i + 1:]):
        return ("a finite fill beside extra key columns (sinks), then scaled or filled again: rows whose every "
                "real key is masked would differ from the original")
    if any(op.kind in ("add", "fill", "stream") and j not in causal_ops for j, op in enumerate(m.ops) if j > i):
        return ("a mask term follows a finite fill: rows whose every key is masked would differ from the "
                "original")
    return None
