"""The ``torch.compile`` door: a Dynamo backend that rewrites each captured graph, then hands it on.

Example::

    compiled = torch.compile(model, backend="rewrite")                       # exact policy, by name
    compiled = torch.compile(model, backend=rewrite.backend({"_default": rewrite.Exact()}, then="inductor"))
    print(rewrite.backend_report())                                          # what the "rewrite" backend did
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from .actions import RewriteError
from .capture import graph_runner
from .pipeline import Session, register_state_sources, rewrite_graph
from .policy import Policy
from .report import RewriteReport

log = logging.getLogger("rewrite")
THEN = ("eager", "inductor")


def check_then(then: str) -> None:
    if then not in THEN:
        raise RewriteError(f"then={then!r} is not known; use 'eager' (run the rewritten graph as it is) or 'inductor'.")


def make_compiler(session: Session, then: str = "eager") -> Callable:
    check_then(then)

    def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
        compile_id = torch._guards.CompileContext.current_compile_id()
        if compile_id is not None and (getattr(compile_id, "frame_compile_id", 0) or 0) > 0:
            session.report.recompiles += 1
        backup = copy.deepcopy(gm.graph)
        try:
            rewrite_graph(gm, example_inputs, session)
        except RewriteError:
            raise
        except Exception as err:  # an internal failure must never break the user's model: run it as captured
            log.warning("rewrite: a captured graph could not be rewritten (%s: %s); it runs unchanged",
                        type(err).__name__, err)
            what = f"{type(err).__name__}: {str(err)[:300]}"
            session.errors.append(what)
            for site in session.sites:  # the sites of this graph stay in the report, with the reason
                session.report.record_unrewritten(site.name, site.ordinal, f"an internal error in rewrite ({what}); "
                                                  "this graph runs as captured")
            gm.graph = backup
            gm.recompile()
        if then == "inductor":
            return graph_runner(_inductor(gm, example_inputs, session))
        return graph_runner(gm.forward)

    compile_graph.session = session  # type: ignore[attr-defined]
    return compile_graph


def _inductor(gm: fx.GraphModule, example_inputs: list, session: Session) -> Callable:
    """Compile the rewritten graph with Inductor. A mixer that Inductor cannot trace (one whose Python code
    branches on tensor values, such as a mask classified at run time) makes the whole graph run as rewritten,
    eagerly, with a warning and a note on its sites: never the unrewritten code behind the report's back."""
    from torch._inductor.compile_fx import compile_fx
    mixers = [n for n in gm.graph.nodes if n.op == "call_module" and "rewrite_site" in n.meta]
    if not mixers:
        return compile_fx(gm, example_inputs)
    for n in mixers:  # state a mixer made while the graph was verified (a first fit) needs its source too
        register_state_sources(gm, n.target, gm.get_submodule(n.target))
    try:
        return compile_fx(gm, example_inputs)
    except Exception as err:  # noqa: BLE001 - the rewritten graph itself runs; only the compiler is skipped
        what = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("rewrite: Inductor could not compile a rewritten graph (%s); it runs eagerly", what)
        note = f"then='inductor' could not compile its graph ({what[:200]}); that graph runs eagerly"
        rows = session.report._sites
        for key in dict.fromkeys(n.meta["rewrite_site"] for n in mixers):
            row = rows.get(key)
            if row is not None and note not in row.reason:
                row.reason = "; ".join(x for x in (row.reason, note) if x)
        return gm.forward


def backend(policy: Any = "exact", then: str = "eager") -> Callable:
    """A Dynamo backend for ``torch.compile(model, backend=rewrite.backend(policy))``.

    ``then`` hands the rewritten graph on: ``"eager"`` runs it as it is, ``"inductor"`` compiles it.
    Its report is ``compiler.session.report``.
    """
    session = Session(Policy(policy), RewriteReport(Policy(policy).describe()))
    return make_compiler(session, then)


_DEFAULT: dict = {}


def rewrite_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The backend registered as ``"rewrite"`` (entry point ``torch_dynamo_backends``): the exact policy."""
    if "compiler" not in _DEFAULT:
        _DEFAULT["compiler"] = backend("exact")
    return _DEFAULT["compiler"](gm, example_inputs)


def backend_report() -> RewriteReport:
    """The report of everything the named ``"rewrite"`` backend has compiled in this process."""
    if "compiler" not in _DEFAULT:
        _DEFAULT["compiler"] = backend("exact")
    return _DEFAULT["compiler"].session.report
