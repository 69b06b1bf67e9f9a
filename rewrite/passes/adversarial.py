"""Inputs that try to break a rewrite: the example batch, with every mask the model takes as input redrawn.

An all-visible example mask cannot tell a boolean mask *added* (0/1) from one *applied*, a fill of −5 from −∞,
or say anything about a query row that sees no key. So besides the example, each site is verified on a batch
where every graph input that feeds one of its mask terms (and is not model state) is replaced by a random mask
of the same kind — boolean, 0/1 integer, or additive 0/−∞-like float — with one query row that sees no key and
one that sees every key. Inputs that feed no mask (token ids, pixels, hidden states) are left as they were.

Example::

    batch = adversarial_inputs(gm, matches, example_inputs, is_state)   # None: nothing to perturb
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ..graph import input_cone
from .find_sites import SiteMatch

SEED = 4321


def mask_inputs(gm: fx.GraphModule, matches: list[SiteMatch], is_state: Callable[[fx.Node], bool]) -> list:
    """The placeholders that feed a mask term of any matched site and are not model state."""
    roots = []
    for m in matches:
        for op in m.ops:
            if op.kind == "add" and isinstance(op.value, fx.Node):
                roots.append(op.value)
            elif op.kind == "fill" and isinstance(op.cond, fx.Node):
                roots.append(op.cond)
        if m.kind == "sdpa" and isinstance(m.sdpa_kwargs.get("attn_mask"), fx.Node):
            roots.append(m.sdpa_kwargs["attn_mask"])
    return _inputs_of(roots, is_state)


def _inputs_of(roots: list, is_state: Callable[[fx.Node], bool]) -> list:
    """The placeholders (not model state) that ``roots`` are computed from."""
    _, leaves = input_cone(roots, is_leaf=lambda n: n.op == "placeholder")
    return [n for n in leaves if not is_state(n)]


def adversarial_inputs(gm: fx.GraphModule, matches: list[SiteMatch], example_inputs: list,
                       is_state: Callable[[fx.Node], bool]) -> Optional[list]:
    """The example inputs with every mask input redrawn (see the module docstring); None when there is none."""
    return _redrawn(gm, mask_inputs(gm, matches, is_state), example_inputs)


def redraw_inputs(gm: fx.GraphModule, masks: list, example_inputs: list,
                  is_state: Callable[[fx.Node], bool]) -> Optional[list]:
    """The example inputs with every input that the mask nodes ``masks`` are computed from redrawn (as
    ``adversarial_inputs`` does for the masks of matched sites); None when there is none."""
    return _redrawn(gm, _inputs_of([m for m in masks if isinstance(m, fx.Node)], is_state), example_inputs)


def _redrawn(gm: fx.GraphModule, found: list, example_inputs: list) -> Optional[list]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    targets = [n for n in found if n in index]
    out, changed = list(example_inputs), False
    gen = torch.Generator().manual_seed(SEED)
    for node in targets:
        i = index[node]
        new = _redraw(example_inputs[i], gen)
        if new is not None:
            out[i], changed = new, True
    return out if changed else None


def _redraw(x: Any, gen: torch.Generator) -> Optional[torch.Tensor]:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.numel() < 2 or x.shape[-1] < 2:
        return None
    keep = torch.rand(x.shape, generator=gen) > 0.4
    keep[..., 0] = True  # most rows see their first key
    flat = keep.reshape(-1, x.shape[-1])
    flat[0] = False      # one row sees no key
    if flat.shape[0] > 1:
        flat[-1] = True  # one sees every key
    keep = flat.reshape(x.shape).to(x.device)
    if x.dtype == torch.bool:
        return keep
    if not x.is_floating_point():
        values = set(torch.unique(x).tolist()) if x.numel() <= 1 << 20 else set()
        return keep.to(x.dtype) if values and values <= {0, 1} else None  # 0/1 padding masks only
    low = x.min()
    hidden = low if bool(torch.isfinite(low)) and float(low) < -1e3 else torch.tensor(float("-inf"))
    # an additive mask: 0 where visible, the example's own "hidden" value (or -inf) elsewhere
    return torch.where(keep, torch.zeros((), dtype=x.dtype, device=x.device), hidden.to(x.dtype).to(x.device))
