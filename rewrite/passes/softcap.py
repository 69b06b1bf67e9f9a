"""Soft-capping of attention scores (Gemma 2's ``attn_logit_softcapping``): ``c * tanh(s / c)`` before the mask.

``find_sites`` recognises the tanh between the score product and the softmax (any spelling of tanh; the cap
a Python number or a constant made in the graph; ``tanh(s / c) * c``, ``c * tanh(s * (1 / c))`` and the other
commutations) and records the cap on the site. SDPA cannot express it; the flash kernel can
(``rewrite.kernels.flash_attention(..., softcap=c)``, as FlashAttention-2's ``softcap``), so only
``Exact(kernel="triton")`` serves such a site and every other action leaves it as it was, saying why.

Example::

    >>> rewrite.find_attention(gemma2_model, example_kwargs=batch)[0].softcap
    50.0
    >>> rewrite.optimize(gemma2_model, {"_default": rewrite.Exact(kernel="triton")}, example_kwargs=batch)
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx as fx

from ..graph import factory_number

_TANH_FUNCTIONS = {torch.tanh, torch.nn.functional.tanh, torch.Tensor.tanh}
_TANH_ATEN = {getattr(torch.ops.aten.tanh, "default", None)} - {None}


def is_tanh(node: fx.Node) -> bool:
    """``torch.tanh(x)``, ``F.tanh(x)``, ``x.tanh()`` or ``aten.tanh`` (an out-of-place tanh of one tensor)."""
    if node.op == "call_function":
        return (node.target in _TANH_FUNCTIONS or node.target in _TANH_ATEN) and len(node.args) == 1 \
            and not node.kwargs
    return node.op == "call_method" and node.target == "tanh" and len(node.args) == 1 and not node.kwargs


def constant_number(value: Any) -> Optional[float]:
    """A cap's value: a Python number, or a tensor the graph makes from a number (``torch.tensor(30.0)``);
    ``None`` for anything else (a tensor read from the model's state could change after the rewrite)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    number = factory_number(value)
    return float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else None


def cap_problem(factor: Optional[float]) -> Optional[str]:
    """Why ``factor * tanh(...)`` is not a soft-cap the kernel takes (``None``: it is)."""
    if factor is None:
        return "the number multiplying tanh (the soft-cap) is not a constant"
    if factor == 0 or not math.isfinite(factor):
        return f"the scores are soft-capped by {factor!r}, which is not a finite non-zero cap"
    return None
