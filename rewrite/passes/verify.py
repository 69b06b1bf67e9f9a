"""Run a graph on its captured inputs and measure each rewritten site against the original subgraph.

The original and the replacement are both in the graph while this runs (the replacement is not yet
wired in), so one run gives both values. Dropout runs at p = 0 and the RNG state is restored after.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from .normalize import DROPOUT

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-7, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-4)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set, replacements: set):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.replacements, self.values = wanted, replacements, {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target is DROPOUT:
            out = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
        elif n in self.replacements and "dropout_p" in n.kwargs:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            kwargs = dict(kwargs, dropout_p=0.0)
            target = self.fetch_attr(n.target) if n.op == "call_module" else n.target
            out = target(*args, **kwargs)
        else:
            out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def record(gm: fx.GraphModule, example_inputs: Iterable, wanted: set, replacements: set = frozenset()) -> dict:
    """Values of ``wanted`` nodes when ``gm`` runs on ``example_inputs`` (dropout off)."""
    rng = torch.random.get_rng_state()
    try:
        with torch.no_grad():
            rec = _Recorder(gm, set(wanted), set(replacements))
            rec.run(*example_inputs)
    finally:
        torch.random.set_rng_state(rng)
    return rec.values


def relative_error(ref: Any, out: Any) -> float:
    """Max absolute difference relative to the reference's largest magnitude (inf on shape/NaN mismatch)."""
    if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor) or ref.shape != out.shape:
        return float("inf")
    r, o = ref.detach(), out.detach()
    if r.dtype != o.dtype:
        r, o = r.float(), o.float()
    r_fin = torch.isfinite(r)
    if bool(r_fin.all()):  # the common case: no inf/NaN anywhere, no masked copies needed
        if not bool(torch.isfinite(o).all()):
            return float("inf")
        diff = (r.float() - o.float()).abs().max().item() if r.numel() else 0.0
        return diff / max(r.abs().max().item() if r.numel() else 0.0, 1e-6)
    r, o = r.double(), o.double()
    if not torch.equal(torch.isnan(r), torch.isnan(o)):
        return float("inf")
    fin = torch.isfinite(r) & torch.isfinite(o)
    if not torch.equal(fin, torch.isfinite(r)) or not torch.equal(r[~fin], o[~fin]):
        return float("inf")
    if not fin.any():
        return 0.0
    diff = (r[fin] - o[fin]).abs().max().item()
    scale = max(r[fin].abs().max().item(), 1e-6)
    return diff / scale
