"""rewrite: find every attention site of a PyTorch model, fuse it exactly or replace it, and report it.

Example::

    import rewrite
    sites = rewrite.find_attention(model, example_kwargs=batch)
    model = rewrite.optimize(model, "exact", example_kwargs=batch)
    print(model.rewrite_report)
"""
from .actions import Action, Decline, Exact, RewriteError, action_from_json, action_types, register_action, register_handler
from . import mixers as _mixers  # noqa: F401  (registers every action and handler)
from . import kernels as _kernels  # noqa: F401  (registers torch.ops.rewrite.*; Triton itself loads lazily)
from .api import find_attention, optimize, report
from .backend import backend, backend_report
from .measured import auto, isomer, mixed_span
from .io import load, save
from .report import RewriteReport
from .sites import AttentionSite

globals().update(action_types())  # every registered action is rewrite.<Name>, e.g. rewrite.Exact()

__all__ = sorted(set(action_types()) | {"Action", "Decline", "RewriteError", "AttentionSite", "RewriteReport", "action_from_json", "backend",
           "backend_report", "find_attention", "optimize", "register_action", "register_handler", "report",
                                       "auto", "isomer", "mixed_span", "load", "save",
                                       "action_types"})
__version__ = "0.1.0"
