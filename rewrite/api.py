"""The Python door: ``optimize``, ``find_attention``, ``report``."""
from __future__ import annotations

import dataclasses
import pickle
import time
from typing import Any, Optional, Sequence

import torch

from .actions import RewriteError
from .backend import check_then, make_compiler
from .capture import DEFAULT_RECOMPILE_LIMIT, ModelCapture, capture_choosing_nesting, mha_fastpath_off, run_example
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


@dataclasses.dataclass
class Recipe:
    """What ``optimize`` was asked for, enough to rebuild the capture on a copied or unpickled model."""
    policy: Any
    fitted: dict
    then: str
    dynamic: Optional[bool]
    recompile_limit: int
    report: Any = None
    nested_breaks: bool = False   # Dynamo nests graph breaks (``_capture_first_call`` chose it)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        try:
            pickle.dumps(self.policy)
        except Exception:  # noqa: BLE001 - a lambda policy: the plan it resolved to pickles instead
            state["policy"] = {"version": 1, "sites": dict(getattr(self.report, "plan", {}) or {})}
        return state


def _capture(model: torch.nn.Module, session: Session, recipe: Recipe) -> ModelCapture:
    capture = ModelCapture(model, make_compiler(session, recipe.then), session.report, dynamic=recipe.dynamic,
                           recompile_limit=recipe.recompile_limit, recipe=recipe, rebuild=_rebuild,
                           nested_breaks=getattr(recipe, "nested_breaks", False))
    capture.session = session

    def guard():
        changed = session.changed_state()
        if changed:
            session.state_guards.clear()  # re-read by the proofs of the recompile
        return changed

    capture.guard = guard
    return capture


def _rebuild(model: torch.nn.Module, recipe: Recipe, report: RewriteReport, modules: dict,
             static_paths: tuple = ()) -> ModelCapture:
    """The capture of a deep copy or an unpickled model: the same plan, its own entry points and cache, the same
    modules of static shapes (so its first call does not compile a graph through a band first). Runs while the
    copy is still being built (see ``ModelCapture.__deepcopy__``), so it touches no submodule by name."""
    policy = Policy(recipe.policy)
    policy.fitted = dict(recipe.fitted or {})
    report.start_over()
    recipe.report = report
    session = Session(policy, report, model, mode="rewrite")
    capture = _capture(model, session, recipe)
    capture.static_paths.update(static_paths)
    capture._install("", model)
    for path, module in modules.items():
        capture._install(path, module)
    return capture


def _capture_first_call(model: torch.nn.Module, recipe: Recipe, args: tuple, kwargs: dict) -> tuple:
    """Install a capture of ``recipe`` on ``model`` (replacing any) and run the example through it: the rewrite
    of every graph it captures, checked. Returns ``(report, session)``; undoes the capture on failure."""
    _undo(model)
    pol = Policy(recipe.policy)
    pol.fitted = recipe.fitted   # the same dict: what mixers fit during the call is the recipe's too
    report = RewriteReport(pol.describe())
    recipe.report = report
    session = Session(pol, report, model, mode="rewrite")
    capture = _capture(model, session, recipe)
    model.__dict__[_KEY] = capture  # before the first call, so that a failure below undoes what it attached
    capture.install()
    try:
        run_example(model, args, kwargs)
        if report.graphs == 0:
            why = "; ".join(f"{f.where}: {f.why}" for f in report.fallbacks)
            raise RewriteError(f"torch.compile captured no graph of this {type(model).__name__}, so nothing could be "
                               "searched or rewritten: " + (why or "Dynamo ran its forward without tracing it "
                               "(torch._dynamo.disable, code Dynamo skips, or C++ only)") +
                               ". Pass the module whose forward computes the attention in Python.")
    except BaseException:
        _undo(model)
        raise
    return report, session


def _check_and_widen(model: torch.nn.Module, report: RewriteReport, session: Session) -> None:
    """The chosen capture's checks (every policy key used; not only internal errors), then entries of their own
    for the modules that own sites. Undoes the capture on failure."""
    try:
        unused = session.policy.unused_keys()
        if unused:
            names = ", ".join(s.name for s in session.sites) or "(none)"
            raise RewriteError(f"Policy key(s) {', '.join(repr(k) for k in unused)} match no attention site. "
                               f"The sites found are: {names}. Fix the names or patterns.")
        if not session.sites and not report.rejected and session.errors:
            raise RewriteError("The model could not be rewritten: " + "; ".join(session.errors))
        capture = model.__dict__[_KEY]
        capture.add_entries(site.name for site in session.sites)
        capture._sites_seen = report.site_count()
    except BaseException:
        _undo(model)
        raise


def _rewritten(report: RewriteReport) -> int:
    return sum(row.status == "rewritten" for row in report.sites)


def _graph_breaks() -> list:
    from torch._dynamo.utils import counters
    return [BreakRow(reason=str(reason), count=int(n)) for reason, n in counters["graph_break"].items()]


def model_session(model: torch.nn.Module) -> Optional[Session]:
    """The pipeline session of a model returned by :func:`optimize` (its policy, sites and fitted state)."""
    capture = model.__dict__.get(_KEY)
    return getattr(capture, "session", None)


_KEY = "_rewrite"


def _undo(model: torch.nn.Module) -> None:
    capture = model.__dict__.get(_KEY)
    if capture is not None:
        capture.uninstall()
        for owner_path, key in getattr(capture.session, "attached", []):
            try:
                model.get_submodule(owner_path)._modules.pop(key, None)
            except AttributeError:
                pass
    for attr in ("rewrite_report", _KEY):
        model.__dict__.pop(attr, None)


def _measured_plan(model: torch.nn.Module, policy, args: tuple, kwargs: dict, batches: list,
                   fitted: Optional[dict], dynamic: Optional[bool]) -> tuple:
    """``(plan by name, fitted state, calibration report)`` of a measured policy: the per-site plan from the
    calibration run, then token merging tried on whole rewritten copies of the model (merge_schedule.py)."""
    import copy

    from .measured import calibrate_and_plan, plan_is_merging_alone
    from .merge_schedule import ALONE, choose_merging, merging_alone_if_faster
    plan, fitted_now, calibration = calibrate_and_plan(model, policy, args, kwargs, batches)
    fitted = {**fitted_now, **(fitted or {})}

    def build(candidate_plan: dict) -> torch.nn.Module:
        return optimize(copy.deepcopy(model), candidate_plan, example_inputs=args, example_kwargs=kwargs,
                        fitted=fitted, dynamic=dynamic)

    blocks_of = lambda built: model_session(built).block_modules  # noqa: E731
    merged, merged_copy = choose_merging(model, plan, policy, batches, build, calibration.token_merging, blocks_of)
    merged = merging_alone_if_faster(model, plan, merged, merged_copy, policy, batches, build,
                                     calibration.token_merging, blocks_of)
    if merged is not plan:
        chosen = next(r for r in calibration.token_merging if r.outcome == "chosen")
        alone = chosen.base == ALONE
        if alone:
            plan_is_merging_alone(calibration)
        base_ms = calibration.exact_model_ms if alone else calibration.model_ms
        if base_ms:  # exact / plan, then plan / merged: both ratios measured interleaved
            calibration.model_ms = base_ms * chosen.ms / chosen.plan_ms
        where = "at every site (every site exact: faster than the per-site plan with merging)" if alone else \
            "after every site the per-site plan leaves exact"
        merging = (f"token merging pays off: {chosen.action} {where} "
                   f"(error bound {chosen.error:.3g}; {chosen.ms:.4g} ms vs {chosen.plan_ms:.4g} ms without it)")
        calibration.message = merging + (f". Per-site mixers: {calibration.message}" if calibration.message else "")
    return merged, fitted, calibration


def optimize(model: torch.nn.Module, policy: Any = "exact", example_inputs: Sequence = (),
             example_kwargs: Optional[dict] = None, calibration: Optional[list] = None, then: str = "eager",
             dynamic: Optional[bool] = None, fitted: Optional[dict] = None,
             recompile_limit: int = DEFAULT_RECOMPILE_LIMIT) -> torch.nn.Module:
    """Rewrite every attention site of ``model`` by ``policy``; returns the same model object.

    The model keeps its class, parameters, ``generate()``, ``save_pretrained``, ``train()``/``eval()`` and
    autograd; its calls run through a Dynamo capture of its own (one cache and ``recompile_limit`` per model,
    shared with no other model), and so do direct calls of its submodules that own attention (an encoder that
    ``generate()`` calls on its own). Every graph Dynamo captures — recompiles for new shapes, dtypes or modes
    included — is rewritten by the same policy and verified. A call Dynamo cannot compile runs the original code
    with a warning, counted in ``rewrite.report(model).fallbacks``. Calling ``optimize`` again replaces the first.

    ``fitted`` hands back state that mixers fitted on calibration data, keyed by
    ``((site name, ordinal), action description)`` as ``rewrite.save`` stores it (``rewrite.load`` uses it).

    Example::

        model = rewrite.optimize(model, "exact", example_kwargs=tokenizer(texts, return_tensors="pt"))
        print(model.rewrite_report)
    """
    _check_model(model)
    args, kwargs = _inputs(example_inputs, example_kwargs)
    check_then(then)  # before a calibration run, not after it
    from .measured import MeasuredPolicy, auto
    if isinstance(policy, str) and policy == "auto":
        policy = auto()
    _undo(model)
    calibration_report = None
    start = time.perf_counter()
    if isinstance(policy, MeasuredPolicy):
        policy, fitted, calibration_report = _measured_plan(model, policy, args, kwargs, list(calibration or []),
                                                            fitted, dynamic)
    recipe = Recipe(policy, dict(fitted or {}), then, dynamic, recompile_limit)

    def attempt(nested: bool) -> tuple:
        report, session = _capture_first_call(model, dataclasses.replace(recipe, nested_breaks=nested), args, kwargs)
        return (report, session), session, _rewritten(report)
    (report, session), nested = capture_choosing_nesting(attempt)
    if nested:
        report.record_capture_note("graph breaks nested: the graph after a break inside a module goes on into its "
                                   "callers' code, which drops what the attention returned")
    _check_and_widen(model, report, session)
    report.optimize_seconds = time.perf_counter() - start
    report.attach_calibration(calibration_report)
    report.breaks = _graph_breaks()
    model.__dict__["rewrite_report"] = report
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
        runner = ModelCapture(model, make_compiler(session, "eager"), session.report)
        run_example(_Detached(runner), args, kwargs)
    elif capture == "export":
        gm, flat = export_graph(model, args, kwargs)
        rewrite_graph(gm, flat, session)
    else:
        raise RewriteError(f"capture={capture!r} is not known; use 'dynamo' or 'export'.")
    if session.errors:
        raise RewriteError("Attention could not be searched in a captured graph: " + "; ".join(session.errors))
    return session.sites


class _Detached:
    """Calls a capture without installing it, so ``run_example`` can run it like a model."""

    def __init__(self, capture: ModelCapture):
        self.capture = capture

    def __call__(self, *args, **kwargs):
        return self.capture.run_detached(args, kwargs)


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
