"""Run a graph on its captured inputs and measure each rewritten site against the original subgraph.

The original and the replacement are both in the graph while this runs (the replacement is not yet
wired in), so one run gives both values. Dropout runs at p = 0 on both sides (every spelling of it, and
every attention call's ``dropout_p``), from a fixed seed; the caller's RNG state is restored after.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

from .normalize import op_kind

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-7, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-4)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("call_function", "call_method") and op_kind(n) == "dropout":  # every spelling, off
            out = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
        elif "dropout_p" in n.kwargs and n.op in ("call_function", "call_module"):  # attention calls, both sides
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            kwargs = dict(kwargs, dropout_p=0.0)
            target = self.fetch_attr(n.target) if n.op == "call_module" else n.target
            out = target(*args, **kwargs)
        else:
            out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


#: the seed every verification run starts from, so two runs of graphs with random ops draw the same numbers
SEED = 1234


def record(gm: fx.GraphModule, example_inputs: Iterable, wanted: set, outputs: Optional[list] = None) -> dict:
    """Values of ``wanted`` nodes when ``gm`` runs on ``example_inputs`` (dropout off, fixed seed, the caller's
    RNG state restored); the graph's own outputs go to ``outputs`` when given."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        rec = _Recorder(gm, set(wanted))
        out = rec.run(*example_inputs)
    if outputs is not None:
        outputs.extend(torch.utils._pytree.tree_leaves(out))
    return rec.values


def differing_output(gm_a: fx.GraphModule, outs_a: list, gm_b: fx.GraphModule, example_inputs: list,
                     tol_of=tolerance) -> Optional[str]:
    """Run ``gm_b`` as ``record`` runs and compare its outputs with ``outs_a`` (``gm_a``'s); on a difference, the
    first normalised op whose value differs between the two graphs, named, else the output."""
    outs_b: list = []
    record(gm_b, example_inputs, set(), outputs=outs_b)
    bad = None
    for i, (a, b) in enumerate(zip(outs_a, outs_b)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            err = relative_error(b, a)
            if not err <= tol_of(b.dtype) if b.is_floating_point() else not torch.equal(a, b):
                bad = f"output {i} differs by {err:.3g}"
                break
    if bad is None and len(outs_a) == len(outs_b):
        return None
    names_b = {n.name: n for n in gm_b.graph.nodes}
    renamed = {n: names_b[n.meta["normalized_from"]] for n in gm_a.graph.nodes
               if "normalized_from" in n.meta and n.meta["normalized_from"] in names_b}
    va = record(gm_a, example_inputs, set(renamed))
    vb = record(gm_b, example_inputs, set(renamed.values()))
    for node in gm_a.graph.nodes:
        if node in renamed and node in va and renamed[node] in vb:
            x, y = va[node], vb[renamed[node]]
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and not (
                    x.shape == y.shape and relative_error(y, x) <= tol_of(y.dtype)):
                return f"{bad or 'the outputs differ'}; first at {renamed[node].format_node()}"
    return bad or "the graph's outputs differ"


def relative_error(ref: Any, out: Any) -> float:
    """Max absolute difference relative to the reference's largest magnitude (inf on shape/NaN mismatch)."""
    if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor) or ref.shape != out.shape:
        return float("inf")
    r, o = ref.detach(), out.detach()
    if not r.is_floating_point() and not o.is_floating_point() and not r.is_complex() and not o.is_complex():
        return 0.0 if torch.equal(r, o) else float("inf")   # bool and integer values (masks, ids) are equal or not
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
    infinite = ~fin & ~torch.isnan(r)  # NaN positions already agree (and NaN never equals NaN)
    if not torch.equal(fin, torch.isfinite(r)) or not torch.equal(r[infinite], o[infinite]):
        return float("inf")
    if not fin.any():
        return 0.0
    diff = (r[fin] - o[fin]).abs().max().item()
    scale = max(r[fin].abs().max().item(), 1e-6)
    return diff / scale
