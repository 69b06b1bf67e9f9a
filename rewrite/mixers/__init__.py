"""Rewrite targets: one file per action, each with its handler registered by action type."""
from . import exact  # noqa: F401  (registers the Exact handler)
