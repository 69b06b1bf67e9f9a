"""rewrite: find every attention site of a PyTorch model, fuse it exactly or replace it, and report it.

Example::

    import rewrite
    sites = rewrite.find_attention(model, example_kwargs=batch)
    model = rewrite.optimize(model, "exact", example_kwargs=batch)
    print(model.rewrite_report)
"""
from .actions import Action, Exact, RewriteError, action_from_json, register_action, register_handler
from . import mixers as _mixers  # noqa: F401  (registers the handlers)
from .api import find_attention, optimize, report
from .backend import backend, backend_report
from .report import RewriteReport
from .sites import AttentionSite

__all__ = ["Action", "Exact", "RewriteError", "AttentionSite", "RewriteReport", "action_from_json", "backend",
           "backend_report", "find_attention", "optimize", "register_action", "register_handler", "report"]
__version__ = "0.1.0"
