"""``torch.export`` artifacts: export a model, rewrite its ATen graph, export the rewritten graph again, and
write programs (serialised in memory first: a full disk is an error, not an abort)."""
from __future__ import annotations

import inspect
import io
import os
from typing import Any, Optional

import torch

from ..actions import RewriteError
from ..policy import Policy
from .files import atomic_path, check_space, first_line
from .inputs import max_length


def _by_name(fn, args: tuple, kwargs: dict, specs: list) -> Optional[dict]:
    """Per-input dynamic-shape specs keyed by ``fn``'s parameter names (the form ``torch.export`` matches best)."""
    if len(specs) != len(args) + len(kwargs):
        return None
    names = list(kwargs)
    if args:
        try:
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            return None
        if len(params) < len(args):
            return None
        names = [p.name for p in params[:len(args)]] + names
    return dict(zip(names, specs))


def _dynamic_shapes(model, args: tuple, kwargs: dict, limit: Optional[int]):
    """Batch (dim 0) dynamic for every tensor input; length (dim 1) for 2-d integer inputs (tokens, masks)."""
    from torch.export import Dim
    batch = Dim("batch", min=1, max=65536)
    length = Dim("length", min=1, max=limit or 65536)

    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        d = {0: batch}
        if t.dim() == 2 and not t.is_floating_point():
            d[1] = length
        return d

    values = list(args) + list(kwargs.values())
    if any(not isinstance(v, (torch.Tensor, int, float, bool, type(None))) for v in values):
        return None
    return _by_name(model.forward, args, kwargs, [spec(v) for v in values])


def export_model(model: torch.nn.Module, args: tuple, kwargs: dict):
    """``torch.export`` (non-strict) with dynamic batch and length where the model allows; static otherwise."""
    limit = max_length(model)
    errors = []
    for dyn in (True, False):
        try:
            ds = _dynamic_shapes(model, args, kwargs, limit) if dyn else None
            if dyn and ds is None:
                continue
            from ..capture import mha_fastpath_off
            with torch.no_grad(), mha_fastpath_off():
                return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=ds), dyn
        except Exception as err:
            errors.append(f"{type(err).__name__}: {first_line(err)}")
    raise RewriteError(f"torch.export could not capture {type(model).__name__} ({errors[-1]}). Drop --export: the "
                       "rewritten folder works through Dynamo, which handles graph breaks and KV caches.")


def rewrite_program(program, policy: Any, args: tuple, kwargs: dict, mode: str = "rewrite"):
    """Rewrite the graph of an exported program by ``policy``; returns ``(graph_module, session)``.

    ``mode="find"`` only finds the sites. The graph module runs with the program's calling convention;
    ``session.dynamic_shapes`` holds the program's dynamic input dims, for exporting the graph module again.
    """
    from ..pipeline import Session, rewrite_graph
    from ..report import RewriteReport
    pol = Policy(policy)
    dynamic = program_dynamic_shapes(program, args, kwargs)  # before rewriting: the graph's metadata is shared
    gm = program.module()
    session = Session(pol, RewriteReport(pol.describe()), gm, mode=mode)
    session.dynamic_shapes = dynamic
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    try:
        with torch.no_grad():
            rewrite_graph(gm, flat, session)
    except RewriteError:
        raise
    except Exception as err:
        raise RewriteError(f"The exported graph could not be rewritten ({type(err).__name__}: {first_line(err)}).") from None
    unused = pol.unused_keys()
    if unused and mode == "rewrite":
        names = ", ".join(s.name for s in session.sites) or "(none)"
        raise RewriteError(f"Policy key(s) {', '.join(map(repr, unused))} match no attention site of the exported "
                           f"graph. The sites found are: {names}. Fix the names or patterns.")
    return gm, session


def program_dynamic_shapes(program, args: tuple, kwargs: dict):
    """The dynamic dims of an exported program's user inputs, as ``Dim`` specs for re-exporting it."""
    from torch.export import Dim
    user = list(program.graph_signature.user_inputs)
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    dims: dict = {}
    specs = []
    for name in user:
        val = vals.get(name)
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        d = {}
        for i, s in enumerate(val.shape):
            if isinstance(s, torch.SymInt):
                expr = s.node.expr
                if expr not in dims:
                    rng = program.range_constraints.get(expr)
                    lo = int(rng.lower) if rng is not None and rng.lower.is_finite else 1
                    hi = int(rng.upper) if rng is not None and rng.upper.is_finite else None
                    dims[expr] = Dim(f"d{len(dims)}", min=max(lo, 1), max=hi) if hi else Dim(f"d{len(dims)}", min=max(lo, 1))
                d[i] = dims[expr]
        specs.append(d or None)
    if any(not isinstance(v, (torch.Tensor, int, float, bool, type(None))) for v in list(args) + list(kwargs.values())):
        return None
    if not any(specs):
        return None
    return _by_name(program.module().forward, args, kwargs, specs)


def reexport(gm: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes=None):
    """Export a rewritten graph module again; returns ``(program, dynamic)``.

    Tries the given dynamic dims, then the batch dim alone (some mixers specialise on the length), then
    static shapes; ``dynamic`` is ``"all"``, ``"batch"`` or ``""``.
    """
    attempts = []
    if dynamic_shapes is not None:
        attempts.append(("all", dynamic_shapes))
        batch_only = {k: ({0: v[0]} if isinstance(v, dict) and 0 in v else None) for k, v in dynamic_shapes.items()}
        if batch_only != dynamic_shapes and any(batch_only.values()):
            attempts.append(("batch", batch_only))
    attempts.append(("", None))
    last = None
    for kind, ds in attempts:
        try:
            with torch.no_grad():
                return torch.export.export(gm, args, kwargs, strict=False, dynamic_shapes=ds), kind
        except Exception as err:
            last = err
    raise RewriteError(f"The rewritten graph could not be exported again ({type(last).__name__}: "
                       f"{first_line(last)}). Drop --export; the rewritten folder still works.") from None


def program_bytes(program) -> bytes:
    """A program serialised in memory: torch.export.save writing straight to a full disk aborts the process
    (the C++ writer's destructor fails); writing these bytes ourselves fails with an error instead."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def save_program(program, path: str, overwrite: bool = False, data: Optional[bytes] = None) -> str:
    data = program_bytes(program) if data is None else data
    check_space(path, len(data))
    with atomic_path(path, overwrite=overwrite, is_dir=False) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def split_example(example: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a stored example (positional inputs of .pt2 programs sit under ``__args__``)."""
    example = dict(example)
    args = tuple(example.pop("__args__", ()))
    return args, example
