"""Rewrite targets: one file per action, each registering its action class and its handler.

Every module in this package is imported here, so adding a mixer is adding one file.
"""
import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
