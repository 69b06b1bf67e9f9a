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

import torch.fx as fx

from .actions import RewriteError
from .pipeline import Session, rewrite_graph
from .policy import Policy
from .report import RewriteReport

log = logging.getLogger("rewrite")
THEN = ("eager", "inductor")


def make_compiler(session: Session, then: str = "eager") -> Callable:
    if then not in THEN:
        raise RewriteError(f"then={then!r} is not known; use 'eager' (run the rewritten graph as it is) or 'inductor'.")

    def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
        backup = copy.deepcopy(gm.graph)
        try:
            rewrite_graph(gm, example_inputs, session)
        except RewriteError:
            raise
        except Exception as err:  # an internal failure must never break the user's model: run it as captured
            log.warning("rewrite: a captured graph could not be rewritten (%s: %s); it runs unchanged",
                        type(err).__name__, err)
            session.errors.append(f"{type(err).__name__}: {err}")
            gm.graph = backup
            gm.recompile()
        if then == "inductor":
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        return gm.forward

    compile_graph.session = session  # type: ignore[attr-defined]
    return compile_graph


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
