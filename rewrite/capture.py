"""Capture: each optimized model runs through Dynamo entry points of its own.

Dynamo keys its cache and its recompile limit on the *code object* it compiles. Had every model compiled one
shared function, all models, recompiles and captures of a process would share one small cache, and past its
limit a frame runs uncompiled: the original attention behind a report that says "rewritten". So a
:class:`ModelCapture` gives each model (and each of its modules that owns attention, so that ``generate()``
calling ``model.get_encoder()(...)`` directly is rewritten too) a function with its own code object and, where
PyTorch offers it, its own recompile region and limit. Anything that still makes a frame run uncompiled — a
limit, a shape Dynamo cannot trace — falls back to the original code *visibly*: a warning, and a row in
``report.fallbacks`` with how many calls it cost.

Example::

    capture = ModelCapture(model, compiler, report)
    capture.install()                 # model(...) now runs the rewritten graphs
    capture.add_entries(["encoder.layers.0.self_attn"])   # the encoder (and every ancestor) on its own too
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import threading
import types
import warnings
from typing import Any, Callable, Iterable, Optional

import torch

from .actions import RewriteError

#: Recompiles one model may make per entry point before a frame falls back (reported) to the original code.
DEFAULT_RECOMPILE_LIMIT = 64
#: Image sizes a model compiles static graphs for before its image dims are left to Dynamo's dynamic shapes.
STATIC_IMAGE_SIZES = 4
#: Dynamo's process-wide cap on compiles of one code object; models of one class that break their graphs inside
#: the same method all count against it, so it is raised while a capture runs.
_ACCUMULATED_LIMIT = 1 << 16

_COMPILE_PARAMS = inspect.signature(torch.compile).parameters
_ISOLATES = "isolate_recompiles" in _COMPILE_PARAMS and "recompile_limit" in _COMPILE_PARAMS


# --- process-wide switches, applied by the first capture that runs and restored by the last ----------------

class _SharedSettings:
    """Process-wide switches, reference-counted under a lock: the first entry applies them (``_apply``, which
    returns the values it replaced), nested calls and threads share them, and the user's own values come back
    when the last one leaves (``_restore``), in whatever order threads leave."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: dict = {}

    def _apply(self, *args) -> dict:
        raise NotImplementedError

    def _restore(self, saved: dict) -> None:
        for key, value in saved.items():
            setattr(torch._dynamo.config, key, value)

    @contextlib.contextmanager
    def __call__(self, *args):
        with self.lock:
            if self.depth == 0:
                self.saved = self._apply(*args)
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    self._restore(self.saved)
                    self.saved = {}


def _set_dynamo(wanted: dict) -> dict:
    """Set Dynamo config values that this torch has; returns the values they replaced."""
    config, saved = torch._dynamo.config, {}
    for key, value in wanted.items():
        if hasattr(config, key):
            saved[key] = getattr(config, key)
            setattr(config, key, value)
    return saved


class _CaptureSettings(_SharedSettings):
    """Switches a capture needs while it runs: the fused MHA fast path off (it hides attention in one C++ op);
    Dynamo guarding on module hooks (so hooks registered after ``optimize`` fire: a recompile); Dynamo's
    accumulated compile cap raised."""

    def _apply(self, limit: Optional[int] = None) -> dict:
        saved = {}
        getter = getattr(getattr(torch.backends, "mha", None), "get_fastpath_enabled", None)
        if getter is not None:
            saved["fastpath"] = getter()
            torch.backends.mha.set_fastpath_enabled(False)
        config = torch._dynamo.config
        wanted = {"skip_nnmodule_hook_guards": False,
                  "accumulated_recompile_limit": max(config.accumulated_recompile_limit, _ACCUMULATED_LIMIT)}
        if limit is not None and not _ISOLATES:
            wanted["recompile_limit"] = max(config.recompile_limit, limit)
        return {**saved, **_set_dynamo(wanted)}

    def _restore(self, saved: dict) -> None:
        saved = dict(saved)
        if "fastpath" in saved:
            torch.backends.mha.set_fastpath_enabled(saved.pop("fastpath"))
        super()._restore(saved)


capture_settings = _CaptureSettings()


class _DataDependentTracing(_SharedSettings):
    """Dynamo tracing data-dependent output shapes and scalars (a mixture of experts' ``nonzero``, a routing
    ``.item()``) instead of breaking the graph there: a break after an attention would make its probabilities a
    graph output that the rewrite must keep."""

    def _apply(self) -> dict:
        return _set_dynamo({"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True})


_data_dependent = _DataDependentTracing()


class _NestedGraphBreaks(_SharedSettings):
    """Dynamo resuming a graph break inside the nested frame it happened in, so that the graph after it goes on
    into the callers' code (which may drop what the attention returns: its probabilities). Used only by the
    captures that need it (``ModelCapture.nested_breaks``): it also splits graphs where a break bubbling up to the
    top frame would not (a band read whole at its module's entry)."""

    def _apply(self) -> dict:
        return _set_dynamo({"nested_graph_breaks": True})


_nested = _NestedGraphBreaks()
NESTS_GRAPH_BREAKS = hasattr(torch._dynamo.config, "nested_graph_breaks")


def nested_graph_breaks(on: bool):
    return _nested() if on and NESTS_GRAPH_BREAKS else contextlib.nullcontext()


def capture_choosing_nesting(attempt: Callable[[bool], tuple]) -> tuple[Any, bool]:
    """The first call of a capture, with Dynamo's nested graph breaks where they rewrite more: ``attempt(nested)``
    installs a capture (replacing the one before) and runs the example through it, returning ``(result, session,
    sites)``; Dynamo's graph-break counters are cleared before each attempt. A second attempt, nested, is made only
    when a graph returned what an attention computes and Dynamo broke a graph (a break may separate it from the
    code that drops it); it is kept when it has more ``sites``, else the plain capture is made again. Returns
    ``(result, nested)``."""
    from torch._dynamo.utils import counters

    def run(nested: bool) -> tuple:
        counters["graph_break"].clear()
        return attempt(nested)
    plain, session, plain_sites = run(False)
    if not (session.graph_returns_intermediates and NESTS_GRAPH_BREAKS and counters["graph_break"]):
        return plain, False
    nested, _, nested_sites = run(True)
    if nested_sites > plain_sites:
        return nested, True
    return run(False)[0], False


def data_dependent_tracing(on: bool):
    """The settings of :class:`_DataDependentTracing` while a call runs, where ``on``. A model whose code cannot
    be traced so (it branches on such a size in a way Dynamo cannot guard) has its capture turn this off
    (``ModelCapture.trace_data_dependent``) and breaks there instead."""
    return _data_dependent() if on else contextlib.nullcontext()


def mha_fastpath_off():
    """The settings a capture runs under (see :class:`_CaptureSettings`), for captures outside a ModelCapture
    (``torch.export``): the MHA fast path is off, so ``nn.MultiheadAttention`` shows its attention."""
    return capture_settings()


# --- which graphs ran, and what Dynamo said, during a call on this thread ---------------------------------

class _CallState(threading.local):
    def __init__(self):
        self.graph_runs = 0
        self.active: list = []   # the ModelCaptures running on this thread, innermost last


_CALL = _CallState()


def graph_runner(fn: Callable) -> Callable:
    """Wrap what a backend returns for one graph so that a capture can tell a call that ran none of its graphs
    (a frame Dynamo ran uncompiled) from one that ran them. Keeps Dynamo's boxed calling convention."""
    def run(*args):
        _CALL.graph_runs += 1
        return fn(*args)

    run._boxed_call = getattr(fn, "_boxed_call", False)  # type: ignore[attr-defined]
    return run


class _DynamoWarnings(logging.Handler):
    """Dynamo announces a frame it will run uncompiled (a recompile limit) only as a log warning: hand each one
    to the capture running on this thread, so the report records it."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _CALL.active:
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to report
            return
        if "hit config." in message:
            first = message.splitlines()
            where = next((ln.split("function:", 1)[1].strip() for ln in first if "function:" in ln), "a frame")
            _CALL.active[-1].record_fallback(where, first[0].strip() + ": that frame runs uncompiled, with the "
                                             "original attention", calls=1)


_WATCHER = _DynamoWarnings(level=logging.WARNING)


def _watch_dynamo() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _WATCHER not in logger.handlers:
        logger.addHandler(_WATCHER)


# --- entry points ------------------------------------------------------------------------------------------

def _call_module(self, *args, **kwargs):
    return self._call_impl(*args, **kwargs)


def _own_function(fn: Callable, label: str) -> Callable:
    """A copy of ``fn`` with a code object of its own, so Dynamo gives it its own cache (and automatic-dynamic
    state, which it keys on the code's name and place)."""
    code = fn.__code__.replace(co_name=label)
    return types.FunctionType(code, fn.__globals__, label, fn.__defaults__, fn.__closure__)


_serial = itertools.count()

#: ``torch.compiler.is_exporting`` where this torch has it
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def stop_enclosing_traces(module: torch.nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing. Dynamo inlines a hook-free module's ``forward`` directly, past
    ``_compiled_call_impl``; with a hook it traces ``Module.__call__``, which calls the module's entry, and an
    entry of static shapes breaks the enclosing graph there (``ModelCapture._install``). Module-level, so a
    copied or pickled model keeps it without a reference to this capture."""
    return None


def _stop_enclosing_traces_at(module: torch.nn.Module, on: bool) -> None:
    """Give ``module`` one ``stop_enclosing_traces`` hook (``on``) or none (a deep copy carries its original's;
    a copy's root, still being built, has no hooks yet)."""
    hooks = module.__dict__.get("_forward_pre_hooks", {})
    for key in [key for key, hook in hooks.items() if hook is stop_enclosing_traces]:
        del hooks[key]
    if on:
        module.register_forward_pre_hook(stop_enclosing_traces)


def _is_dynamo_failure(err: BaseException) -> bool:
    """Whether ``err`` came from Dynamo failing to trace or compile (not from the model's own code)."""
    from torch._dynamo.exc import TorchDynamoException  # BackendCompilerFailed, Unsupported, ... included
    return isinstance(err, TorchDynamoException)


def inner_rewrite_error(err: BaseException) -> Optional[RewriteError]:
    """The RewriteError a Dynamo exception wraps (our backend's own checks raise one), if any."""
    seen = set()
    inner: Optional[BaseException] = err
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, RewriteError):
            return inner
        seen.add(id(inner))
        inner = getattr(inner, "inner_exception", None) or inner.__cause__
    return None


def _signature(args: tuple, kwargs: dict, module: torch.nn.Module) -> tuple:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return (module.training, torch.is_grad_enabled(),
            tuple((tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else type(x).__name__
                  for x in leaves))


def _callable_modules(model: torch.nn.Module, site_names: Iterable[str]) -> list[str]:
    """Every module that owns a site, and each of its ancestors below the root, that can be called on its own."""
    paths = set()
    for name in site_names:
        parts = name.split(".") if name else []
        for i in range(1, len(parts) + 1):
            paths.add(".".join(parts[:i]))
    out = []
    for path in sorted(paths):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if type(module).forward is torch.nn.Module.forward:  # containers (ModuleList, ModuleDict)
            continue
        out.append(path)
    return out


class ModelCapture:
    """One model's entry points into Dynamo, the fallbacks they took, and how to copy or pickle them.

    ``compiler`` is the Dynamo backend (the rewrite pipeline for this model's session); ``report`` receives
    fallbacks and is what ``rewrite.report(model)`` shows. ``rebuild(model, recipe, report, modules, static_paths)`` (a
    module-level function, so that it pickles by name) makes an equivalent capture on a copied or unpickled
    model from ``recipe`` (what ``optimize`` was asked for); without it, a copy is a plain model.
    """

    def __init__(self, model: torch.nn.Module, compiler: Callable, report: Any, *, dynamic: Optional[bool] = None,
                 recompile_limit: int = DEFAULT_RECOMPILE_LIMIT, recipe: Any = None,
                 rebuild: Optional[Callable] = None, nested_breaks: bool = False):
        if not isinstance(recompile_limit, int) or recompile_limit < 1:
            raise RewriteError(f"recompile_limit must be a positive int; got {recompile_limit!r}.")
        self.model = model
        self.compiler = compiler
        self.report = report
        self.dynamic = dynamic
        self.recompile_limit = recompile_limit
        self.recipe, self.rebuild = recipe, rebuild
        #: Dynamo nests graph breaks while this capture runs (see ``_NestedGraphBreaks``)
        self.nested_breaks = nested_breaks
        self.entries: dict[str, torch.nn.Module] = {}
        self._eager_signatures: dict[tuple, str] = {}
        #: whether Dynamo traces data-dependent shapes (see ``data_dependent_tracing``); off for good after a failure
        self.trace_data_dependent = True
        self._image_shapes: set = set()  # the shapes of image-like inputs seen (see _keep_image_sizes_static)
        self._first_shapes: dict = {}    # input place -> the first shape a floating 4-D+ input had there
        self._children_tried: set = set()  # entries whose failure entered their container children
        self._warned: set = set()
        self._sites_seen = 0
        self.session: Any = None   # the pipeline's state for this model, kept here for the API layer
        self._compiled: dict[str, Callable] = {}
        self._traced: dict[str, tuple] = {}   # path -> (the function Dynamo traces, its backend)
        #: entries that compile static shapes (a graph of theirs held a rewrite read at fixed sizes: a band)
        self.static_paths: set = set()
        #: called before each call: the name of model state that changed since the rewrite read it, or None
        self.guard: Optional[Callable[[], Optional[str]]] = None
        self.label = f"rewrite_{type(model).__name__}_{next(_serial)}"
        _watch_dynamo()

    # -- installing --------------------------------------------------------------------------------------
    def install(self) -> "ModelCapture":
        self._install("", self.model)
        return self

    def add_entries(self, site_names: Iterable[str]) -> None:
        """Give each module that owns one of ``site_names`` (and its ancestors) an entry point of its own."""
        for path in _callable_modules(self.model, site_names):
            if path not in self.entries:
                self._install(path, self.model.get_submodule(path))

    def _compile(self, path: str) -> Callable:
        label = f"{self.label}_{path.replace('.', '_')}" if path else self.label
        self._traced[path] = (_own_function(_call_module, label), self._compiler_for(path))
        return self._wrap(path)

    def _wrap(self, path: str) -> Callable:
        """``torch.compile`` of the entry's own function and backend (the same ones keep its compiled graphs)."""
        options = {"isolate_recompiles": True, "recompile_limit": self.recompile_limit} if _ISOLATES else {}
        fn, backend = self._traced[path]
        return torch.compile(fn, backend=backend, dynamic=False if path in self.static_paths else self.dynamic,
                             **options)

    def _compiler_for(self, path: str) -> Callable:
        """The backend of the entry at ``path``: its own forward is on no module's stack, so the sites there are
        named by the entry's path (the root's: ``""``). The modules of a graph's rewrites read at fixed sizes (a
        band: ``STATIC_SHAPES``) get static entries (``_keep_static``)."""
        from .graph import entry_root, modules_running
        from .passes.band import STATIC_SHAPES

        def compiler(gm, example_inputs):
            if path:
                with entry_root(path):
                    out = self.compiler(gm, example_inputs)
            else:
                out = self.compiler(gm, example_inputs)
            for owner, trace in sorted(gm.meta.get(STATIC_SHAPES, ()) if self.entries else ()):  # installed only
                for module_path in modules_running(self.model, trace) or [owner]:
                    self._keep_static(module_path)
            return out
        return compiler

    def _keep_static(self, path: str) -> None:
        """Give the module at ``path`` an entry compiled with static shapes: each new input shape compiles (and
        reads) a graph of its own. Enclosing entries keep Dynamo's dynamic shapes and break their graph at its
        call (a decoder generating token by token would otherwise recompile at every step); the graphs compiled
        so far stay."""
        if path in self.static_paths:
            return
        self.static_paths.add(path)
        module = self.model.get_submodule(path)
        if path in self.entries:
            self._compiled[path] = self._wrap(path)
            if path:
                _stop_enclosing_traces_at(module, True)
        else:
            self._install(path, module)
        self.report.record_capture_note(f"{path or '(model)'}: banded attention is read at fixed shapes, so it "
                                        "compiles a static graph per input shape (its callers break their graph there)")

    def _install(self, path: str, module: torch.nn.Module) -> None:
        self._compiled[path] = self._compile(path)
        if path:  # the root's entry is never traced (below)
            _stop_enclosing_traces_at(module, path in self.static_paths)
        capture = self

        if path:
            @torch._dynamo.disable
            def run_alone(*args, **kwargs):
                return capture._run(path, module, args, kwargs)

            def entry(*args, **kwargs):
                if torch.compiler.is_compiling():  # traced as part of a capture of an enclosing module
                    if path in capture.static_paths:  # a graph break: it runs its own graph of static shapes
                        return run_alone(*args, **kwargs)
                    return module._call_impl(*args, **kwargs)
                return capture._run(path, module, args, kwargs)
        else:
            # The root is never traced by its own capture (that compiles _call_module), so a trace that reaches
            # it is someone else's, e.g. torch.compile(model) on top: it breaks there and runs the rewrite.
            @torch._dynamo.disable
            def entry(*args, **kwargs):
                return capture._run(path, module, args, kwargs)

        entry._rewrite_capture = self  # type: ignore[attr-defined]
        module.__dict__["_compiled_call_impl"] = entry  # not setattr: a copy's root may not be initialised yet
        self.entries[path] = module

    def run_detached(self, args: tuple, kwargs: dict) -> Any:
        """Run the model once through a fresh capture without installing it (``find_attention``): the model's
        own entry, if it is already optimized, is left as it was."""
        return self._run("", self.model, args, kwargs, compiled=self._compile(""))

    def recapture(self, why: str) -> None:
        """Compile every entry afresh (new code objects, empty caches): the next call of each goes through the
        rewrite pipeline again, proofs and verification included."""
        entries = dict(self.entries)
        self.uninstall()
        self._eager_signatures.clear()
        for path, module in entries.items():
            self._install(path, module)
        self.report.record_recapture(why)
        self._warn_once("(model)", f"recompiled: {why}")

    def uninstall(self) -> None:
        for module in self.entries.values():
            current = module.__dict__.get("_compiled_call_impl")
            if getattr(current, "_rewrite_capture", None) is self:
                module._compiled_call_impl = None
                if module is not self.model:
                    _stop_enclosing_traces_at(module, False)
        self.entries = {}
        self._compiled = {}

    # -- running -----------------------------------------------------------------------------------------
    def _run(self, path: str, module: torch.nn.Module, args: tuple, kwargs: dict,
             compiled: Optional[Callable] = None) -> Any:
        if _is_exporting():
            raise RewriteError(
                "torch.export of a model returned by rewrite.optimize would export the original attention. Export "
                "the plain model through rewrite instead: `rewrite apply SRC -o OUT --export`, or "
                "rewrite.find_attention(model, ..., capture='export') to inspect it.")
        if self.guard is not None and compiled is None:
            changed = self.guard()
            if changed:
                self.recapture(f"{changed} changed after its values were read by a proof or a lowering")
        compiled = compiled or self._compiled[path]
        if self._eager_signatures:
            why = self._eager_signatures.get(_signature(args, kwargs, module))
            if why is not None:
                self.record_fallback(path or "(model)", why, calls=1)
                return module._call_impl(*args, **kwargs)
        if self.dynamic is None:
            self._keep_image_sizes_static(args, kwargs)
        runs = _CALL.graph_runs
        _CALL.active.append(self)
        try:
            with capture_settings(self.recompile_limit), data_dependent_tracing(self.trace_data_dependent), \
                    nested_graph_breaks(self.nested_breaks):
                out = compiled(module, *args, **kwargs)
        except Exception as err:
            inner = inner_rewrite_error(err)
            if inner is not None:
                raise inner from None
            if self.trace_data_dependent:  # code that branches on a data-dependent size: break there instead
                self.trace_data_dependent = False
                return self._run(path, module, args, kwargs, compiled)
            if not _is_dynamo_failure(err):
                raise
            return self._fall_back(path, module, args, kwargs, err)
        finally:
            _CALL.active.pop()
        if _CALL.graph_runs == runs and self._has_rewritten(path):
            self.record_fallback(path or "(model)", "Dynamo ran this call without any of its rewritten graphs "
                                 "(the frame ran uncompiled, with the original attention)", calls=1)
        if self.entries and self.report.site_count() != self._sites_seen:
            self._sites_seen = self.report.site_count()
            self.add_entries(row.name for row in self.report.sites)
        return out

    def _keep_image_sizes_static(self, args: tuple, kwargs: dict) -> None:
        """Mark image-like inputs static while the model has seen at most ``STATIC_IMAGE_SIZES`` of their shapes.
        Image-like: floating point, 4-D or more, and at least two of its non-batch dims differ from the first
        shape seen at its place (a height and a width; a sequence changes one length). Dynamo would otherwise
        recompile the second image size with symbolic height and width, and window partitioning (Swin, DaViT,
        Hiera) makes its shape reasoning take minutes (timm davit_tiny: 14 s at one size, over 10 minutes for the
        second); a static graph per size takes seconds. Past that many sizes the dims are left to Dynamo (one
        dynamic graph)."""
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        images = []
        for place, t in enumerate(leaves):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4):
                continue
            first = self._first_shapes.setdefault(place, tuple(t.shape))
            if len(first) == t.dim() and sum(a != b for a, b in zip(first[1:], t.shape[1:])) >= 2:
                images.append(t)
        if not images:
            return
        self._image_shapes.add(tuple(tuple(t.shape[1:]) for t in images))
        if len(self._image_shapes) > STATIC_IMAGE_SIZES:
            return
        for t in images:
            for dim in range(1, t.dim()):
                torch._dynamo.mark_static(t, dim)

    def _fall_back(self, path: str, module: torch.nn.Module, args: tuple, kwargs: dict, err: BaseException) -> Any:
        """Dynamo could not trace this call: run the original code, as the model did before ``optimize``. When an
        installed entry fails (the root, or a child entered this way), its container children (an encoder, a
        decoder, a stack's blocks: children with modules of their own) get entry points of their own first, so the
        original code calls them captured."""
        children = self._capture_children(path, module) if path in self.entries else []
        out = module._call_impl(*args, **kwargs)  # the model's own error, if the inputs were bad to begin with
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        runs = (f"run the original code, with its submodules {', '.join(children)} captured on their own" if children else
                "run the original code, with the original attention")
        why = f"Dynamo could not trace this input ({type(err).__name__}: {first[:200]}); calls like it {runs}"
        self._eager_signatures[_signature(args, kwargs, module)] = why
        self.record_fallback(path or "(model)", why, calls=1)
        return out

    def _capture_children(self, path: str, module: torch.nn.Module) -> list:
        """Entry points for the container children of the entry at ``path`` not yet entered (once per entry: the
        paths, or [] after). A module list has no forward of its own: its items are the children."""
        if path in self._children_tried:
            return []
        self._children_tried.add(path)
        prefix = path + "." if path else ""
        found = []
        for name, child in module.named_children():
            items = child.named_children() if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) else []
            for sub, mod in [(f"{name}.{i}", c) for i, c in items] or [(name, child)]:
                if prefix + sub not in self.entries and next(mod.children(), None) is not None:
                    found.append(prefix + sub)
                    self._install(prefix + sub, mod)
        return found

    def _has_rewritten(self, path: str) -> bool:
        prefix = path + "." if path else ""
        return any(r.status == "rewritten" and (not path or r.name == path or r.name.startswith(prefix))
                   for r in self.report.sites)

    def record_fallback(self, where: str, why: str, calls: int = 1) -> None:
        self.report.record_fallback(where, why, calls)
        self._warn_once(where, why)

    def _warn_once(self, where: str, why: str) -> None:
        if (where, why) not in self._warned:
            self._warned.add((where, why))
            warnings.warn(f"rewrite: {type(self.model).__name__} {where}: {why}. See rewrite.report(model).",
                          RuntimeWarning, stacklevel=5)

    # -- copies --------------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> Optional["ModelCapture"]:
        """A deep copy of the model gets a capture of its own (its first call compiles and verifies again).
        ``copy.deepcopy`` has built the copy's submodules before it reaches this attribute; the copy's root is
        still empty, so the rebuilt entry goes into its ``__dict__`` (``Module.__setstate__`` only adds to it)."""
        import copy
        model = memo.get(id(self.model))
        if model is None or self.rebuild is None:
            return None
        modules = {path: memo.get(id(m), m) for path, m in self.entries.items() if path}
        return self.rebuild(model, copy.deepcopy(self.recipe, memo), copy.deepcopy(self.report, memo), modules,
                            tuple(sorted(self.static_paths)))

    def __reduce__(self):
        if self.rebuild is None:
            raise RewriteError("This capture cannot be pickled; save the model with rewrite.save(model, folder).")
        modules = {path: m for path, m in self.entries.items() if path}
        return (self.rebuild, (self.model, self.recipe, self.report, modules, tuple(sorted(self.static_paths))))


def run_example(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run ``model`` on an example batch (no grad, through whatever capture is installed); a failure becomes a
    RewriteError that says the batch is the likely problem, unless it is one of rewrite's own."""
    try:
        with torch.no_grad(), capture_settings():
            return model(*args, **kwargs)
    except Exception as err:
        inner = inner_rewrite_error(err)
        if inner is not None:
            raise inner from None
        first = str(err).splitlines()[0] if str(err) else ""
        raise RewriteError(
            f"The model could not be run and captured on the example inputs ({type(err).__name__}: {first}). "
            "Check that the example inputs are a batch this model accepts (run model(*example_inputs, "
            "**example_kwargs) without rewrite first).") from err
