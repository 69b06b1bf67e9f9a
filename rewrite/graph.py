"""Small helpers over torch.fx graphs shared by the passes: metadata, shapes, names, node surgery."""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx


def meta_value(node: Any) -> Any:
    """The example value recorded for a node (Dynamo: ``example_value``; export: ``val``)."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    if "example_value" in meta:
        return meta["example_value"]
    return meta.get("val")


def tensor_meta(node: Any) -> Optional[torch.Tensor]:
    val = meta_value(node)
    return val if isinstance(val, torch.Tensor) else None


def shape(node: Any) -> Optional[tuple]:
    t = tensor_meta(node)
    return tuple(t.shape) if t is not None else None


def rank(node: Any) -> Optional[int]:
    t = tensor_meta(node)
    return t.dim() if t is not None else None


def dtype(node: Any) -> Optional[torch.dtype]:
    t = tensor_meta(node)
    return t.dtype if t is not None else None


def is_scalar_like(arg: Any) -> bool:
    """A Python number, a symbolic number, or a node whose value is a number or a one-element tensor."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return True
    if isinstance(arg, (torch.SymInt, torch.SymFloat)):
        return True
    if isinstance(arg, fx.Node):
        val = meta_value(arg)
        if isinstance(val, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(val, bool):
            return True
        if isinstance(val, torch.Tensor) and all(_is_one(s) for s in val.shape):
            return True
    return False


def is_tensor_scalar(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and isinstance(meta_value(arg), torch.Tensor)


def static_int(size) -> Optional[int]:
    """The value of a size when it is the same for every input (a constant), else None. Never adds a
    Dynamo guard: deciding on a symbolic size's current value would specialise the graph to it."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        return size.node.maybe_as_int()
    return None


def hint_int(size) -> Optional[int]:
    """The value a size has on the captured inputs (for reports only; adds no guard)."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else None
    return None


def _is_one(size) -> bool:
    return static_int(size) == 1


def same_size(a, b) -> bool:
    """True when two (possibly symbolic) sizes are equal for every input; adds no guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def same_shape(a, b) -> bool:
    """Shapes equal dim by dim for every input (see ``same_size``)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(same_size(x, y) for x, y in zip(a, b))


def fake_mode_of(nodes: Iterable[fx.Node]):
    """The fake mode that owns the example values of ``nodes`` (not the ambient tracing context's)."""
    for n in nodes:
        val = meta_value(n)
        mode = getattr(val, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def infer_meta(node: fx.Node) -> None:
    """Fill a new node's example value by running its target on the example values of its inputs."""
    args = fx.node.map_arg(node.args, meta_value)
    kwargs = fx.node.map_arg(node.kwargs, meta_value)
    inputs = [n for n in node.all_input_nodes]
    mode = fake_mode_of(inputs)
    try:
        if mode is not None:
            with mode:
                val = _run_target(node, args, kwargs)
        else:
            val = _run_target(node, args, kwargs)
    except Exception:  # noqa: BLE001 - a node whose shape cannot be inferred is simply not matched on shape
        val = None
    key = "example_value" if any("example_value" in n.meta for n in inputs) else "val"
    node.meta[key] = val


def _run_target(node: fx.Node, args, kwargs):
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    raise ValueError(node.op)


def insert_call(graph: fx.Graph, before: fx.Node, target, args=(), kwargs=None, like: Optional[fx.Node] = None,
                method: bool = False) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, copying provenance from ``like``."""
    with graph.inserting_before(before):
        node = (graph.call_method(target, tuple(args), kwargs or {}) if method
                else graph.call_function(target, tuple(args), kwargs or {}))
    src = like if like is not None else before
    for key in ("nn_module_stack", "source_fn_stack", "stack_trace", "seq_nr"):
        if key in src.meta:
            node.meta[key] = src.meta[key]
    infer_meta(node)
    return node


_MUTATING_METHODS = {"copy_", "fill_", "zero_", "set_", "resize_", "index_put_", "scatter_", "masked_scatter_"}


def attribute_value(node: fx.Node) -> Any:
    """The object a ``get_attr`` node reads from its graph's module (None when the path does not resolve)."""
    obj: Any = node.graph.owning_module
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj


def is_dead(node: fx.Node, depth: int = 8) -> bool:
    """A node whose value reaches no graph output and no side effect (bounded: deeper chains count as used)."""
    if node.op in ("output", "placeholder", "call_module") or is_mutating(node) or depth == 0:
        return False
    return all(is_dead(u, depth - 1) for u in node.users)


def is_mutating(node: fx.Node) -> bool:
    """In-place and side-effecting calls must never be removed as dead code."""
    if node.op == "call_method":
        return node.target.endswith("_") or node.target in _MUTATING_METHODS
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if name in ("iadd", "isub", "imul", "itruediv", "iand", "ior", "setitem", "_set_grad_enabled",
                    "manual_seed", "_assert", "print"):
            return True
        if name.endswith("_") and not name.startswith("_"):
            return True
        if getattr(getattr(node.target, "_schema", None), "is_mutable", False):
            return True
        return node.is_impure()
    return False  # placeholders, outputs and submodule calls are never candidates for removal here


_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze}


def is_reshape(node: fx.Node) -> bool:
    """A view that keeps the elements in their row-major order (view/reshape/flatten/unflatten/unsqueeze/
    squeeze); ``x.view(dtype)`` reinterprets bits and is not one."""
    if not node.args or not isinstance(node.args[0], fx.Node) or shape(node) is None or shape(node.args[0]) is None:
        return False
    if any(isinstance(a, torch.dtype) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return False
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    if node.op == "call_function":
        name = str(node.target)
        return node.target in _RESHAPE_FUNCTIONS or any(
            name.startswith(f"aten.{n}.") for n in ("view", "_unsafe_view", "reshape", "unsqueeze", "squeeze"))
    return False


def remove_dead(graph: fx.Graph, candidates: Iterable[fx.Node]) -> int:
    """Erase nodes left without users, starting from ``candidates`` and walking up their inputs.

    Unlike ``Graph.eliminate_dead_code`` this never touches the rest of the graph, and never removes a
    mutating call.
    """
    work = list(candidates)
    removed = 0
    seen_erased: set = set()
    while work:
        node = work.pop()
        if node in seen_erased or node.graph is not graph:
            continue
        if node.op not in ("call_function", "call_method") or node.users or is_mutating(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        seen_erased.add(node)
        removed += 1
        work.extend(inputs)
    return removed


_FACTORIES = (torch.tensor, torch.scalar_tensor, torch.as_tensor, torch.full, torch.zeros)


def factory_number(node: Any) -> Optional[float]:
    """The number a tensor factory in the graph fills its tensor with (``torch.tensor(-1e4)``, ``torch.full(s,
    v)``, ``torch.scalar_tensor(0)``, ``torch.zeros(s)``), or None for anything else."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _FACTORIES):
        return None
    if node.target is torch.zeros:
        return 0.0
    data = node.args[-1] if node.target is torch.full else (node.args[0] if node.args else None)
    return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None


def reads_only_shape(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads nothing of ``node`` but its shape (``x.expand_as(node)``, ``x.reshape_as(node)``,
    ``node.size()``, ``node.dim()``, ``sym_size``): such a user is unaffected by what ``node`` holds or when it is
    mutated."""
    if user.op == "call_method":
        if user.target in ("expand_as", "reshape_as", "view_as"):
            return len(user.args) == 2 and user.args[1] is node and user.args[0] is not node
        if user.target in ("size", "dim"):
            return user.args and user.args[0] is node
    if user.op == "call_function":
        if "sym_size" in str(user.target):
            return bool(user.args) and user.args[0] is node
        if user.target is getattr and len(user.args) == 2 and user.args[0] is node:
            return user.args[1] in ("shape", "ndim")
    return False


# --- module names -----------------------------------------------------------------------------------

_DYNAMO_ROOT = re.compile(r"^L\['self'\]\.?|^L\[\"self\"\]\.?|^self\.?")


def normalize_module_path(path: str) -> str:
    """Turn Dynamo's ``L['self'].layers[0]`` / ``L['self'].layers.0`` / ``getattr(...)`` into ``layers.0``."""
    p = path.strip()
    getattr_form = re.compile(r"getattr\(([^()]*), '([^']*)'\)")
    while getattr_form.search(p):
        p = getattr_form.sub(r"\1.\2", p)
    p = _DYNAMO_ROOT.sub("", p)
    p = re.sub(r"(^|\.)_modules\['([^']*)'\]", r"\1\2", p)
    p = re.sub(r"\[['\"]([^'\"]*)['\"]\]", r".\1", p)
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    p = p.replace("..", ".").strip(".")
    return p


#: id(module) -> its ``named_modules()`` path, for the model being rewritten (see ``module_names``)
_NAMES_BY_ID: dict = {}


class module_names:
    """Context: resolve owners through the model's own ``named_modules()`` (Dynamo keys the stack by id)."""

    def __init__(self, model: Optional[torch.nn.Module]):
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()} if model is not None else {}

    def __enter__(self):
        self.saved = dict(_NAMES_BY_ID)
        _NAMES_BY_ID.clear()
        _NAMES_BY_ID.update(self.names)
        _NAMED_MODEL.append(self.model)
        return self

    def __exit__(self, *exc):
        _NAMES_BY_ID.clear()
        _NAMES_BY_ID.update(self.saved)
        _NAMED_MODEL.pop()


_NAMED_MODEL: list = [None]   # the model of the innermost ``module_names`` context


#: the module path of the capture entry being compiled (see ``entry_root``)
_ENTRY_ROOT: list = [""]


class entry_root:
    """Context: code on no module's stack belongs to the capture entry at ``path``, the module Dynamo is compiling
    (the model itself: ``""``; a child given an entry of its own: its path)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        _ENTRY_ROOT.append(self.path)
        return self

    def __exit__(self, *exc):
        _ENTRY_ROOT.pop()


_ROOT_ARG = re.compile(r"^L\['[A-Za-z_]+'\](\[\d+\])?\.?")


def owner_path(node: fx.Node) -> str:
    """The dotted ``named_modules()`` path of the innermost module on the node's module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return _resumed_owner(node)
    key, (path, _type) = list(stack.items())[-1]
    if _NAMES_BY_ID and isinstance(key, str) and key.isdigit() and int(key) in _NAMES_BY_ID:
        return _NAMES_BY_ID[int(key)]
    name = normalize_module_path(path)
    if name == normalize_module_path(path) and path.startswith("L[") and not path.startswith("L['self']"):
        name = normalize_module_path(_ROOT_ARG.sub("", path))
    return name


def _resumed_owner(node: fx.Node) -> str:
    """The owner of a node on no module stack: the capture entry's own forward, or (a graph Dynamo resumed inside
    a module's forward after a graph break, whose nodes carry no stack) the module whose forward holds the node's
    source line: the entry if it is one of them, else the first (one graph serves every instance of its class)."""
    model, entry = _NAMED_MODEL[-1], _ENTRY_ROOT[-1]
    running = modules_running(model, node.meta.get("stack_trace") or "") if model is not None else []
    return entry if not running or entry in running else running[0]


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_RESUMED = re.compile(r"^torch_dynamo_resume_in_(\w+)_at_\d+$")


def modules_running(model: torch.nn.Module, stack_trace: str) -> list[str]:
    """The paths of the modules whose class's ``forward`` holds ``stack_trace``'s innermost frame that is one (every
    instance of that class), or []: found by source location, so a graph compiled from a frame Dynamo resumed
    inside a module (no module stack on its nodes) still names it."""
    codes: dict = {}   # a forward's code object -> the paths of the modules that run it
    for name, module in model.named_modules():
        code = getattr(type(module).forward, "__code__", None)
        if code is not None:
            codes.setdefault(code, []).append(name)
    for filename, line, function in reversed(_FRAME.findall(stack_trace or "")):
        resumed = _RESUMED.match(function)
        function = resumed.group(1) if resumed else function
        for code, names in codes.items():
            if code.co_filename == filename and code.co_name == function:
                lines = [n for _, _, n in code.co_lines() if n is not None]
                if lines and min(lines) <= int(line) <= max(lines):
                    return names
    return []


# --- values on the example batch ------------------------------------------------------------------

def _is_graph_leaf(n: fx.Node) -> bool:
    return n.op in ("placeholder", "get_attr")


def input_cone(roots: Any, is_leaf: Callable[[fx.Node], bool] = _is_graph_leaf, limit: Optional[int] = None,
               skip_input: Optional[Callable[[fx.Node, fx.Node], bool]] = None) -> Optional[tuple[set, list]]:
    """The nodes ``roots`` (a node or several) are computed from, themselves included, walking inputs and
    stopping at ``is_leaf`` nodes (placeholders and attributes by default) and at inputs ``skip_input(node,
    input)`` says to leave out: ``(cone, leaves)``, or None when the cone grows past ``limit`` nodes."""
    work = [r for r in (roots if isinstance(roots, (list, tuple)) else [roots]) if isinstance(r, fx.Node)]
    cone: set = set()
    leaves: list = []
    while work:
        n = work.pop()
        if n in cone:
            continue
        cone.add(n)
        if limit is not None and len(cone) > limit:
            return None
        if is_leaf(n):
            leaves.append(n)
            continue
        work.extend(i for i in n.all_input_nodes if skip_input is None or not skip_input(n, i))
    return cone, leaves


def with_descendants(node: fx.Node) -> list:
    """``node`` and every node fed by it, parents before children (breadth first)."""
    out, seen, work = [], set(), [node]
    while work:
        n = work.pop(0)
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        work.extend(n.users)
    return out


#: the largest mask computation (graph nodes) a handler evaluates on the example batch
EXAMPLE_CONE_LIMIT = 400


def example_value(node: Any) -> Any:
    """The value a graph node had on the captured example batch, or None where that cannot be known.

    Only the node's cone of inputs is evaluated, from the inputs Dynamo recorded for the graph's placeholders
    (``meta["grapharg"]``); a cone that is large, calls a submodule or has side effects is not evaluated.
    The pipeline uses it to hand handlers a site's mask as built at run time (e.g. a decoder's causal mask
    combined with padding in one data-dependent tensor, which the causal prover cannot see through)."""
    if not isinstance(node, fx.Node):
        return node
    found = input_cone(node, is_leaf=lambda n: n.op == "placeholder", limit=EXAMPLE_CONE_LIMIT)
    if found is None or any(n.op == "call_module" or _mutates(n, is_mutating) for n in found[0]):
        return None
    cone = found[0]
    gm = node.graph.owning_module
    if gm is None:
        return None
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad():
            for n in node.graph.nodes:
                if n not in cone:
                    continue
                if n.op == "placeholder":
                    value = _placeholder_example(n)
                    if value is None:
                        return None
                    interp.env[n] = value
                else:
                    interp.env[n] = interp.run_node(n)
                if n is node:
                    break
    except Exception:  # noqa: BLE001 - a mask that cannot be evaluated here is simply not known
        return None
    return interp.env.get(node)


def _mutates(n: Any, is_mutating) -> bool:
    import operator
    if n.op == "placeholder":
        return False
    if n.op == "call_function" and getattr(operator, getattr(n.target, "__name__", ""), None) is n.target:
        # the operator module: only its in-place forms (iand, setitem, ...) mutate; and_/or_ do not
        name = n.target.__name__
        return name in ("setitem", "delitem") or (name.startswith("i") and (hasattr(operator, name[1:]) or hasattr(operator, name[1:] + "_")))
    return is_mutating(n)


def _placeholder_example(n: Any) -> Any:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
    arg = n.meta.get("grapharg")
    try:
        value = arg.example if arg is not None else None
    except Exception:  # noqa: BLE001 - a freed example
        return None
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        value = value.node.hint
    if isinstance(value, torch.Tensor) and _is_fake(value):
        return None
    if value is not None and getattr(arg, "pass_arg_as_tensor", False) and not isinstance(value, torch.Tensor):
        value = torch.tensor(value)
    return value
