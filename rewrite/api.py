"""The Python door: ``optimize``, ``find_attention``, ``report``."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Optional, Sequence

import torch

from .actions import RewriteError
from .backend import make_compiler
from .pipeline import Session, rewrite_graph
from .policy import Policy
from .report import BreakRow, RewriteReport
from .sites import SiteTable


def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise RewriteError(f"rewrite works on torch.nn.Module models; got {type(model).__name__}. "
                           "Load the model first (e.g. AutoModel.from_pretrained(...)) and pass the module.")


def _inputs(example_inputs: Any, example_kwargs: Optional[dict]) -> tuple[tuple, dict]:
    if example_inputs is None:
        example_inputs = ()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict) and example_kwargs is None:
        example_inputs, example_kwargs = (), example_inputs
    example_kwargs = dict(example_kwargs or {})
    if not example_inputs and not example_kwargs:
        raise RewriteError("No example inputs: pass example_inputs=(tensor, ...) or example_kwargs={...} with a "
                           "batch the model accepts, so its attention can be captured and checked.")
    return tuple(example_inputs), example_kwargs


@contextlib.contextmanager
def mha_fastpath_off():
    """Switch off the fused C++ fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` for the
    duration. In eval without grad they take it, and Dynamo captures it as one opaque op with no attention in
    sight; their Python path is what ``expand_mha`` turns into a site."""
    getter = getattr(getattr(torch.backends, "mha", None), "get_fastpath_enabled", None)
    if getter is None:
        yield
        return
    before = getter()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _through_call_impl(self, *args, **kwargs):
    return self._call_impl(*args, **kwargs)


def compile_in_place(model: torch.nn.Module, backend, dynamic: Optional[bool] = None) -> None:
    """Like ``model.compile(backend=...)``, for every model: the compiled frame is a function of this file that
    calls the module (``nn.Module.compile`` compiles ``_call_impl`` itself, and Dynamo traces nothing when the
    model's own ``forward`` lives in ``torch.nn``, e.g. a bare ``nn.TransformerEncoder``); the module is the
    argument named ``self``, as in ``nn.Module.compile``, so its submodules keep their names. Every call runs with the MHA fast path off
    (``mha_fastpath_off``), so a recompile for a new shape sees the attention too."""
    compiled = torch.compile(_through_call_impl, backend=backend, dynamic=dynamic)

    def call(*args, **kwargs):
        with mha_fastpath_off():
            return compiled(model, *args, **kwargs)

    model._compiled_call_impl = call


def _run(model, args, kwargs):
    try:
        with torch.no_grad(), mha_fastpath_off():
            return model(*args, **kwargs)
    except Exception as err:
        inner = err
        while inner.__cause__ is not None or getattr(inner, "inner_exception", None) is not None:
            inner = getattr(inner, "inner_exception", None) or inner.__cause__
            if isinstance(inner, RewriteError):
                raise inner from None
        if isinstance(err, RewriteError):
            raise
        raise RewriteError(
            f"The model could not be run and captured on the example inputs ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Check that the example inputs are a batch this model "
            "accepts (run model(*example_inputs, **example_kwargs) without rewrite first).") from err


def _graph_breaks() -> list:
    from torch._dynamo.utils import counters
    return [BreakRow(reason=str(reason), count=int(n)) for reason, n in counters["graph_break"].items()]


def _undo(model: torch.nn.Module) -> None:
    model._compiled_call_impl = None
    session = model.__dict__.get("_rewrite_session")
    for owner, key in getattr(session, "attached", []):
        owner._modules.pop(key, None)
    for attr in ("rewrite_report", "_rewrite_session"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def optimize(model: torch.nn.Module, policy: Any = "exact", example_inputs: Sequence = (),
             example_kwargs: Optional[dict] = None, calibration: Optional[list] = None, then: str = "eager",
             dynamic: Optional[bool] = None, fitted: Optional[dict] = None) -> torch.nn.Module:
    """Rewrite every attention site of ``model`` by ``policy``; returns the same model object.

    The model is compiled in place with the rewrite backend (``model.compile``), so its class, parameters,
    ``generate()``, ``save_pretrained``, ``train()``/``eval()`` and autograd all stay as they were; each
    graph Dynamo captures (including recompiles for new shapes or modes) is rewritten by the same policy.

    ``fitted`` hands back state that mixers fitted on calibration data, keyed by
    ``((site name, ordinal), action description)`` as ``rewrite.save`` stores it (``rewrite.load`` uses it).

    Example::

        model = rewrite.optimize(model, "exact", example_kwargs=tokenizer(texts, return_tensors="pt"))
        print(model.rewrite_report)
    """
    _check_model(model)
    args, kwargs = _inputs(example_inputs, example_kwargs)
    from .measured import MeasuredPolicy, auto, calibrate_and_plan
    if isinstance(policy, str) and policy == "auto":
        policy = auto()
    _undo(model)
    calibration_report = None
    start = time.perf_counter()
    if isinstance(policy, MeasuredPolicy):
        plan, fitted, calibration_report = calibrate_and_plan(model, policy, args, kwargs, list(calibration or []))
        pol = Policy(plan)
        pol.fitted = fitted
    else:
        pol = Policy(policy)
    if fitted:
        pol.fitted = {**pol.fitted, **fitted}
    report = RewriteReport(pol.describe())
    session = Session(pol, report, model, mode="rewrite")
    from torch._dynamo.utils import counters
    counters["graph_break"].clear()
    compile_in_place(model, make_compiler(session, then), dynamic=dynamic)
    try:
        _run(model, args, kwargs)
        if report.graphs == 0:
            raise RewriteError(f"torch.compile captured no graph of this {type(model).__name__}, so nothing could be "
                               "searched or rewritten: its forward runs outside Dynamo (torch._dynamo.disable, "
                               "or C++ only). Pass the module whose forward computes the attention in Python.")
        unused = pol.unused_keys()
        if unused:
            names = ", ".join(s.name for s in session.sites) or "(none)"
            raise RewriteError(f"Policy key(s) {', '.join(repr(k) for k in unused)} match no attention site. "
                               f"The sites found are: {names}. Fix the names or patterns.")
        if not session.sites and not report.rejected and session.errors:
            raise RewriteError("The model could not be rewritten: " + "; ".join(session.errors))
    except BaseException:
        model.__dict__["_rewrite_session"] = session  # so that _undo also removes what this run attached
        _undo(model)
        raise
    report.optimize_seconds = time.perf_counter() - start
    report.calibration = calibration_report
    report.breaks = _graph_breaks()
    model.__dict__["rewrite_report"] = report
    model.__dict__["_rewrite_session"] = session
    return model


def report(model: torch.nn.Module) -> RewriteReport:
    """The :class:`RewriteReport` of a model returned by :func:`optimize`."""
    rep = getattr(model, "rewrite_report", None)
    if rep is None:
        raise RewriteError("This model has no rewrite report: run rewrite.optimize(model, policy, ...) first.")
    return rep


def find_attention(model: torch.nn.Module, example_inputs: Sequence = (), example_kwargs: Optional[dict] = None,
                   capture: str = "dynamo") -> SiteTable:
    """Find every attention site of ``model`` without changing it; returns a printable table of sites.

    ``capture="dynamo"`` (default) traces with Dynamo; ``capture="export"`` uses ``torch.export``
    (ATen graphs). Site names are the same either way.

    Example::

        print(rewrite.find_attention(model, example_kwargs=batch))
    """
    _check_model(model)
    args, kwargs = _inputs(example_inputs, example_kwargs)
    session = Session(Policy("none"), RewriteReport("none"), model, mode="find")
    if capture == "dynamo":
        compiled = torch.compile(model, backend=make_compiler(session, "eager"))
        _run(compiled, args, kwargs)
    elif capture == "export":
        gm, flat = export_graph(model, args, kwargs)
        rewrite_graph(gm, flat, session)
    else:
        raise RewriteError(f"capture={capture!r} is not known; use 'dynamo' or 'export'.")
    if session.errors:
        raise RewriteError("Attention could not be searched in a captured graph: " + "; ".join(session.errors))
    return session.sites


def export_graph(model: torch.nn.Module, args: tuple, kwargs: dict):
    """``torch.export`` the model (non-strict) and return its ATen graph module and flat example inputs."""
    try:
        with mha_fastpath_off():
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:
        raise RewriteError(f"torch.export could not capture this model ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}). Use capture='dynamo', which handles "
                           "graph breaks and KV caches.") from err
    gm = ep.module()
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    return gm, flat
