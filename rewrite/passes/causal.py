"""Prove that a mask term is causal (lower-triangular, top-left aligned) for every sequence length.

The proof has two parts:

1. *Structure*: the mask is a function of sizes alone. Its cone of inputs in the graph may contain
   sizes (SymInt placeholders, ``sym_size``/``size()`` reads), constants, ``arange``/``ones``/``tril``
   style factories and module buffers (a registered ``tril`` buffer sliced to the length), but no
   input data. Such a mask is the same tensor for every batch of a given length.
2. *Value*: the cone is evaluated as a small graph at the captured length and, when the capture is
   dynamic, again at lengths 1, 2, 3, 5 and 8 and at every length where the construction can change its
   mind: each integer constant ``c`` in the cone (a window, a band offset) at ``c``, ``c + 1``, ``c + 2``
   and ``2c + 1``, and each dimension of a buffer the mask reads (a ``tril`` buffer sliced to the length is
   checked whole, so every prefix is). Each must be exactly the causal pattern (0 / True on and below the
   diagonal, masked above it with a value that underflows softmax to exactly 0).

A mask built from index comparisons is piecewise affine in the length with breakpoints at its constants, so
agreement at every breakpoint is what "for every length" means here. A construction whose breakpoints lie
beyond ``MAX_PROBE`` cannot be checked and is not proven; anything that fails to evaluate at a length is not
proven either. (A sliding-window mask is causal only below its window: GPT-Neo's local layers.)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ..graph import attribute_value, input_cone, meta_value, same_size, shape
from ..sites import MASKED_BELOW
from .find_sites import ScoreOp, SiteMatch

PROBE_LENGTHS = (1, 2, 3, 5, 8)
#: the longest length a proof evaluates a mask at (an N x N mask of this side is 64 M entries)
MAX_PROBE = 8192


def _is_size_read(node: fx.Node) -> bool:
    if node.op == "call_function" and "sym_size" in str(node.target):
        return True
    if node.op == "call_method" and node.target == "size":
        return True
    return False


def prove_causal(gm: fx.GraphModule, m: SiteMatch, op: ScoreOp, values: dict, is_state: Callable[[fx.Node], bool],
                 keeps_rows: bool = False) -> tuple[bool, str]:
    """Whether ``op`` (an additive term or a fill of ``m``'s scores) is exactly the causal mask. ``keeps_rows``:
    whether the fill ``op`` leaves every query row at least one key instead (a band of GPT-Neo's local attention:
    the diagonal stays), proven the same way, at the captured length and the probed ones."""
    qs, ks = shape(m.q), shape(m.kt)
    if qs is None or ks is None:
        return False, "the query or key shape is not known"
    if not same_size(qs[-2], ks[-1]) and not (keeps_rows and all(isinstance(d, int) for d in (*qs, *ks))):
        return False, "query and key lengths differ (cross-attention or a KV cache)"  # a row-keeping fill: static
    root = op.value if op.kind == "add" else op.cond
    if not isinstance(root, fx.Node):
        return False, "the mask is not a tensor"
    if op.kind == "fill":
        fill = op.fill_value  # read by mask_semantics.read_fill_values before any proof
        if not isinstance(fill, (int, float)) or fill > MASKED_BELOW:
            return False, "the fill value is not a large negative constant"
    cone, leaves = _cone(root)
    for leaf in leaves:
        if leaf.op == "placeholder" and not is_state(leaf) and not _is_size_value(values.get(leaf)):
            return False, "the mask depends on input data"
    sub, leaf_nodes = _extract(gm, cone, leaves, root)
    length_sym = _length_symbol(qs[-2])
    captured = {leaf: _leaf_value(leaf, values) for leaf in leaves}
    ok, why = _check(sub, leaf_nodes, captured, op, None, keeps_rows)
    if not ok:
        return False, why
    if length_sym is None:
        others = _size_symbols(leaves)
        if others:   # checked at the captured sizes only, it would hold for those alone
            return False, (f"the mask depends on symbolic sizes ({', '.join(sorted(map(str, others)))}) other "
                           "than a query length that is one symbol, which the proof does not vary")
        if _captured_length(sub, leaf_nodes, captured) < 2:
            return False, "a 1x1 mask proves nothing about causality"
        return True, "static length"
    varying = [leaf for leaf in leaves
               if _changes(_at_length(meta_value(leaf), captured[leaf], length_sym, 0), captured[leaf])]
    if not varying:
        return True, "the mask does not depend on the length symbol"
    lengths = _probe_lengths(cone, leaves, values)
    if lengths is None:
        return False, f"the mask has a constant or buffer beyond {MAX_PROBE} that could change it at long lengths"
    for n in lengths:
        trial = dict(captured)
        for leaf in varying:
            trial[leaf] = _at_length(meta_value(leaf), captured[leaf], length_sym, n)
        ok, why = _check(sub, leaf_nodes, trial, op, n, keeps_rows)
        if not ok:
            return False, f"at length {n}: {why}"
    return True, "proven at the captured length and at lengths " + ", ".join(map(str, lengths))


def _size_symbols(leaves: list) -> set:
    """The free symbols of the symbolic sizes among ``leaves`` (sizes, size tuples) on the captured graph."""
    found: set = set()

    def visit(v: Any) -> None:
        if isinstance(v, torch.SymInt):
            found.update(getattr(v.node.expr, "free_symbols", ()))
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x)
    for leaf in leaves:
        visit(meta_value(leaf))
    return found


def _probe_lengths(cone: set, leaves: list, values: dict) -> Optional[list]:
    """The small lengths plus every breakpoint the cone's constants and buffers could put in the mask; None when
    one lies beyond ``MAX_PROBE``. A mask that slices a buffer cannot run past the buffer (nor can the model),
    so lengths stop at its largest dimension, which is itself checked: every prefix of the buffer is."""
    constants, buffer_dims = set(), set()

    def ints(arg):
        if isinstance(arg, bool):
            return
        if isinstance(arg, int):
            constants.add(abs(arg))
        elif isinstance(arg, (list, tuple)):
            for a in arg:
                ints(a)
        elif isinstance(arg, dict):
            for a in arg.values():
                ints(a)
        elif isinstance(arg, slice):
            for a in (arg.start, arg.stop, arg.step):
                ints(a)

    for n in cone:
        if n.op in ("call_function", "call_method"):
            ints(n.args)
            ints(n.kwargs)
    for leaf in leaves:
        value = values.get(leaf) if leaf.op != "get_attr" else attribute_value(leaf)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            buffer_dims.update(int(d) for d in value.shape)
    if buffer_dims and max(buffer_dims) > MAX_PROBE:
        return None  # the whole buffer (every prefix) is too large to check
    limit = max(buffer_dims) if buffer_dims else MAX_PROBE
    lengths = {n for n in PROBE_LENGTHS if n <= limit} | {d for d in buffer_dims if 2 <= d <= limit}
    for c in constants:
        if c < 2 or c > limit:
            if c > MAX_PROBE and c <= (max(buffer_dims) if buffer_dims else c):
                return None  # a breakpoint inside the range the model can run at, but too long to check
            continue
        lengths.update(n for n in (c, c + 1, c + 2, 2 * c + 1) if n <= limit)
    return sorted(lengths)


def evaluate_constant(gm: fx.GraphModule, node: fx.Node, values: dict, is_state) -> Optional[float]:
    """The value of a one-element tensor computed from no input data (only model state and sizes, e.g.
    ``torch.full([], torch.finfo(x.dtype).min)``), evaluated on its own; None otherwise."""
    cone, leaves = _cone(node)
    if any(leaf.op == "placeholder" and not is_state(leaf) and not _is_size_value(values.get(leaf)) for leaf in leaves):
        return None
    sub, leaf_nodes = _extract(gm, cone, leaves, node)
    try:
        with torch.no_grad():
            val = sub(*[_leaf_value(leaf, values) for leaf in leaf_nodes])
    except Exception:  # noqa: BLE001
        return None
    if isinstance(val, torch.Tensor) and val.numel() == 1:
        return float(val.item())
    return float(val) if isinstance(val, (int, float)) else None


def _captured_length(sub: fx.GraphModule, leaf_nodes: dict, values: dict) -> int:
    try:
        with torch.no_grad():
            return int(sub(*[values[leaf] for leaf in leaf_nodes]).shape[-1])
    except Exception:  # noqa: BLE001
        return 0


def _is_size_value(v: Any) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _expr(v: Any):
    if isinstance(v, torch.SymInt):
        return v.node.expr
    return None


def _length_symbol(size: Any):
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        if getattr(expr, "is_Symbol", False):
            return expr
    return None


def _cone(root: fx.Node) -> tuple[set, list]:
    return input_cone(root, is_leaf=lambda n: n.op in ("placeholder", "get_attr") or _is_size_read(n))


def _at_length(meta: Any, captured: Any, length_sym, n: int) -> Any:
    """A size leaf's value at length ``n``: the leaf itself when it is the length symbol, each entry that is when
    it is a whole size tuple (``scores.size()``); other leaves keep their captured value."""
    if length_sym is not None and _expr(meta) == length_sym:
        return n
    if isinstance(meta, (tuple, list)) and isinstance(captured, (tuple, list)) and len(meta) == len(captured):
        return type(captured)(_at_length(m, c, length_sym, n) for m, c in zip(meta, captured))
    return captured


def _changes(at_length: Any, captured: Any) -> bool:
    """Whether a leaf's value at another length differs from the captured one (a tensor leaf, a buffer, never
    does: ``_at_length`` hands it back as it is)."""
    if isinstance(captured, torch.Tensor) or isinstance(at_length, torch.Tensor):
        return at_length is not captured
    return at_length != captured


def _leaf_value(leaf: fx.Node, values: dict) -> Any:
    if leaf in values:
        return values[leaf]
    if _is_size_read(leaf):
        dim = leaf.args[1] if len(leaf.args) > 1 else leaf.kwargs.get("dim")
        src = values.get(leaf.args[0])
        if isinstance(src, torch.Tensor):
            return src.size(dim) if dim is not None else src.size()
        # a size read of an intermediate tensor (``scores.size()``): its recorded size at the captured shapes
        return _hinted(meta_value(leaf))
    return None


def _hinted(v: Any) -> Any:
    """``v`` with each symbolic size replaced by its value at the captured shapes (None when one has none)."""
    if isinstance(v, torch.SymInt):
        return v.node.hint if v.node.has_hint() else None
    if isinstance(v, (tuple, list)):
        out = [_hinted(x) for x in v]
        return None if any(x is None for x in out) else tuple(out)
    return v


def _extract(gm: fx.GraphModule, cone: set, leaves: list, root: fx.Node):
    graph = fx.Graph()
    env: dict = {}
    leaf_nodes = {}
    for n in gm.graph.nodes:
        if n not in cone:
            continue
        if n in leaves and n.op != "get_attr":
            new = graph.placeholder(f"leaf_{len(leaf_nodes)}")
            leaf_nodes[n] = new
        else:
            new = graph.node_copy(n, lambda a: env[a])
        env[n] = new
    graph.output(env[root])
    return fx.GraphModule(gm, graph), leaf_nodes


def _check(sub: fx.GraphModule, leaf_nodes: dict, leaf_values: dict, op: ScoreOp, n: Optional[int],
           keeps_rows: bool = False) -> tuple[bool, str]:
    try:
        with torch.no_grad():
            mask = sub(*[leaf_values[leaf] for leaf in leaf_nodes])
    except Exception as err:  # noqa: BLE001 - any failure means "not proven"
        return False, f"the mask could not be evaluated ({type(err).__name__})"
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
        return False, "the mask is not a matrix"
    rows, cols = mask.shape[-2], mask.shape[-1]
    if keeps_rows:  # any shape (block-local windows have more keys than queries): every row keeps a key
        if op.kind != "fill" or (mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all()):
            return False, "not a boolean fill"
        filled = mask.bool() if op.fill_where_true else ~mask.bool()
        return (True, "") if bool((~filled).any(-1).all()) else (False, "a row has every key filled")
    if rows != cols or (n is not None and rows != n):
        return False, f"the mask is {rows}x{cols}, not square at the score shape"
    visible = torch.ones(rows, cols, dtype=torch.bool, device=mask.device).tril()
    if op.kind == "fill":
        filled = mask.bool() if op.fill_where_true else ~mask.bool()
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            return False, "the fill condition is not boolean"
        ok = bool((filled == ~visible).all())
    elif mask.dtype == torch.bool:
        return False, "a boolean tensor added to the scores"
    else:
        m = mask.float()
        ok = bool(((m == 0) == visible).all() and (m[..., ~visible] <= MASKED_BELOW).all())
    return (True, "") if ok else (False, "the mask is not the lower-triangular causal pattern")
