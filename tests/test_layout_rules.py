"""The house rules of ``rewrite/`` (issue 13), checked on the source: no import cycle (module or function level),
no private name imported from another module, no helper named by a letter, no function over 80 lines (the
Triton kernels and the argparse builder aside)."""
import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rewrite")


def _modules():
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
                package = name if f == "__init__.py" else name.rsplit(".", 1)[0]
                yield path, name, package, ast.parse(open(path, encoding="utf-8").read())


def _imports():
    """(importer, imported module, names) for every relative import, wherever it is written."""
    for _, name, package, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                names = [a.name for a in node.names]
                if node.module:
                    yield name, target, names
                else:
                    for n in names:
                        yield name, f"{target}.{n}", []


def test_no_import_cycle():
    graph: dict = {}
    for importer, target, _ in _imports():
        graph.setdefault(importer, set()).add(target)
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in list(graph):
        if node not in state:
            visit(node, [node])


def test_no_private_import_across_modules():
    bad = [(importer, target, n) for importer, target, names in _imports() for n in names
           if n.startswith("_") and not n.startswith("__") and not importer.startswith("rewrite.kernels")]
    assert not bad, bad


def test_no_module_named_by_a_letter():
    generic = r"(util|utils|helper|helpers|common|misc|shared)"
    bad = [name for _, name, _, _ in _modules()
           if re.search(rf"(^|_){generic}_[a-z0-9]$", name.rsplit(".", 1)[-1])]
    assert not bad, bad


def test_no_function_over_80_lines():
    long = []
    for path, name, _, tree in _modules():
        if name.startswith("rewrite.kernels"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
