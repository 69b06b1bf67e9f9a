"""Normalise: turn the many spellings of the ops attention is made of into one canonical form.

Dynamo graphs are torch level (``operator.matmul``, ``Tensor.softmax``, ``F.softmax``, method calls),
``torch.export`` graphs are ATen (``aten.matmul``, ``aten.softmax.int``). After this pass both use:

=================  ==========================================================================
canonical          spellings folded into it
=================  ==========================================================================
torch.matmul       ``@``, ``Tensor.matmul``, ``torch.bmm``, ``aten.matmul``, ``aten.bmm``, 2-operand
                   batched ``einsum`` (with permutes), ``baddbmm`` (with ``mul``/``add``)
torch.softmax      ``F.softmax``, ``Tensor.softmax``, ``aten.softmax.int``, ``aten._softmax``;
                   ``dim`` made non-negative, ``dtype`` kept as a keyword
torch.permute      ``transpose``/``swapaxes``/``permute``/``.mT``/``.T`` with a full, non-negative permutation
torch.mul/div/     ``operator``/method/ATen forms and their in-place forms (only where the mutated
add/sub            tensor has no other user, so the change is invisible)
torch.masked_fill  method, in-place and ATen forms
torch.where        ``Tensor.where`` and ATen forms
F.dropout          ``torch.dropout``, ``aten.dropout``; keywords ``p`` and ``training``
x + bias           ``x[idx] = f(x[idx])`` with ``f`` views and additions of terms free of ``x`` (MViTv2), where
                   ``x`` is fresh and read after the update alone; equal up to the order of the additions
masked_fill        ``s * b + c * (1 - b)`` (GPT-1's causal buffer), as ``s.masked_fill(b == 0, c)``: only where ``b``
                   is proven to hold only 0 and 1 for every input (a 0/1 buffer of the model, sliced or indexed)
one value product ``(p.view(b, h, 2, n, n)[:, :, 0] - λ p.view(...)[:, :, 1]) @ v`` (differential attention: a
                   combination of head slices of one softmax, weights constant along the keys) as
                   ``(p @ v')`` sliced and combined the same way, ``v'`` the values repeated for each slice
keys side by side  ``cat([q @ k1ᵀ, q @ k2ᵀ], -1)`` (one query against two key sets: Pegasus-X's global and block keys)
                   as ``q @ cat([k1ᵀ, k2ᵀ], -1)``, and ``p[..., :g] @ v1 + p[..., g:] @ v2`` (the probabilities' column
                   slices, each with its own values) as ``p @ cat([v1, v2], -2)``: one key set, one value product
sink key column    ``(softmax(s) @ v) * sigmoid(logsumexp(s) - t)`` (GraniteSWA: a sink applied after the
                   value product) becomes ``softmax(cat([s, t], -1))[..., :-1] @ v``, the spelling of an
                   extra key with a zero value that ``find_sites`` reads as an attention sink
=================  ==========================================================================

Every rewrite here computes the same values as the spelling it replaces (the slice update up to the rounding of
reassociated additions); nothing is approximated.
"""
from __future__ import annotations

import operator
import re
import string
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph import (infer_meta, insert_call, is_reshape, meta_value, rank, reads_only_shape, remove_dead, same_shape,
                     shape, static_int)

aten = torch.ops.aten

MATMUL = torch.matmul
SOFTMAX = torch.softmax
PERMUTE = torch.permute
MUL, DIV, ADD, SUB = torch.mul, torch.div, torch.add, torch.sub
#: every spelling of a concatenation (torch level and ATen)
CAT = {torch.cat, getattr(torch, "concat", torch.cat), getattr(torch, "concatenate", torch.cat)} | (
    {torch.ops.aten.cat.default} if hasattr(torch.ops.aten, "cat") else set())
MASKED_FILL = torch.masked_fill
WHERE = torch.where
DROPOUT = F.dropout
SDPA = F.scaled_dot_product_attention


def _aten(name: str, overloads: tuple[str, ...]) -> set:
    packet = getattr(aten, name, None)
    out = set()
    if packet is None:
        return out
    for ov in overloads:
        op = getattr(packet, ov, None)
        if op is not None:
            out.add(op)
    return out


_FN = {
    "matmul": {torch.matmul, operator.matmul, torch.bmm} | _aten("matmul", ("default",)) | _aten("bmm", ("default",)),
    "softmax": {torch.softmax, F.softmax, torch.special.softmax, torch.Tensor.softmax}
    | _aten("softmax", ("int",)) | _aten("_softmax", ("default",)),
    "transpose": {torch.transpose, torch.swapaxes, torch.swapdims} | _aten("transpose", ("int",)),
    "permute": {torch.permute} | _aten("permute", ("default",)),
    "mul": {operator.mul, torch.mul} | _aten("mul", ("Tensor", "Scalar")),
    "div": {operator.truediv, torch.true_divide} | _aten("div", ("Tensor", "Scalar")),
    "add": {operator.add} | _aten("add", ("Tensor", "Scalar")),
    "sub": {operator.sub} | _aten("sub", ("Tensor", "Scalar")),
    "imul": {operator.imul}, "idiv": {operator.itruediv}, "iadd": {operator.iadd}, "isub": {operator.isub},
    "masked_fill": {torch.masked_fill} | _aten("masked_fill", ("Scalar", "Tensor")),
    "where": _aten("where", ("self", "ScalarOther", "ScalarSelf", "Scalar")),
    "dropout": {F.dropout, torch.dropout} | _aten("dropout", ("default",)),
    "einsum": {torch.einsum, getattr(torch.functional, "einsum", torch.einsum)} | _aten("einsum", ("default",)),
    "baddbmm": {torch.baddbmm} | _aten("baddbmm", ("default",)),
    "sdpa": {SDPA} | _aten("scaled_dot_product_attention", ("default",)),
}
_METHOD = {
    "matmul": {"matmul", "bmm", "__matmul__"}, "softmax": {"softmax"}, "transpose": {"transpose", "swapaxes", "swapdims"},
    "permute": {"permute"}, "mul": {"mul", "__mul__", "multiply"}, "div": {"div", "true_divide", "__truediv__", "divide"},
    "add": {"add", "__add__"}, "sub": {"sub", "__sub__", "subtract"}, "imul": {"mul_"}, "idiv": {"div_"},
    "iadd": {"add_"}, "isub": {"sub_"}, "masked_fill": {"masked_fill", "masked_fill_"}, "where": {"where"},
    "baddbmm": {"baddbmm"}, "type_as": {"type_as"},
}


def op_kind(node: fx.Node) -> Optional[str]:
    """Which family of spellings a node belongs to (``None`` when it is none of ours)."""
    if node.op == "call_function":
        if node.target is torch.add and node.kwargs.get("alpha", 1) == 1:
            return "add"
        if node.target is torch.sub and node.kwargs.get("alpha", 1) == 1:
            return "sub"
        if node.target is torch.div and node.kwargs.get("rounding_mode") is None:
            return "div"
        if node.target is torch.where and len(node.args) == 3:
            return "where"
        if node.target is getattr and len(node.args) == 2 and node.args[1] in ("mT", "T", "mH"):
            return "transpose_attr"
        for kind, targets in _FN.items():
            if node.target in targets:
                return kind
    elif node.op == "call_method":
        if node.target == "where":
            return "where"
        if node.target == "t":
            return "transpose_attr"
        for kind, names in _METHOD.items():
            if node.target in names:
                return kind
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def normalize(gm: fx.GraphModule, binary: Callable[[fx.Node], bool] = lambda node: False) -> int:
    """Rewrite ``gm`` in place into the canonical spelling; returns how many nodes changed. ``binary(node)``:
    whether ``node`` is proven to hold only 0 and 1 for every input (``mask_semantics.holds_only_zero_one``),
    which a 0/1 gate on the scores needs before it is a fill."""
    graph = gm.graph
    changed = 0
    for node in list(graph.nodes):
        kind = op_kind(node)
        if kind is None:
            continue
        new = _canonical(graph, node, kind)
        if new is not None and new is not node:
            new.meta.setdefault("normalized_from", node.name)  # names the op if the whole-graph check fails
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed += 1
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.setitem and _slice_update_as_bias(graph, node):
            changed += 1
    for node in list(graph.nodes):
        if _is_logsumexp(node) and _sink_scaling_as_extra_key(graph, node):
            changed += 1
        elif node.op == "call_function" and node.target in (ADD, SUB) and _gate_as_fill(graph, node, binary):
            changed += 1
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is MATMUL and _slices_after_the_product(graph, node):
            changed += 1
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in CAT and _products_side_by_side(graph, node):
            changed += 1
        elif node.op == "call_function" and node.target is ADD and _slice_products_summed(graph, node):
            changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def _replace(graph: fx.Graph, node: fx.Node, target, args, kwargs=None, method: bool = False) -> fx.Node:
    new = insert_call(graph, node, target, args, kwargs or {}, like=node, method=method)
    if meta_value(new) is None:  # could not infer: the old node's value is the same value
        for key in ("example_value", "val"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
    return new


def _canonical(graph: fx.Graph, node: fx.Node, kind: str) -> Optional[fx.Node]:
    is_method = node.op == "call_method"
    a = node.args
    if kind == "matmul":
        if node.target is MATMUL or node.kwargs:
            return None
        return _replace(graph, node, MATMUL, (a[0], a[1]))
    if kind == "softmax":
        return _softmax(graph, node)
    if kind in ("transpose", "permute", "transpose_attr"):
        return _permute(graph, node, kind)
    if kind in ("mul", "div", "add", "sub", "imul", "idiv", "iadd", "isub"):
        base = {"imul": "mul", "idiv": "div", "iadd": "add", "isub": "sub"}.get(kind, kind)
        inplace = base != kind
        if inplace and isinstance(a[0], fx.Node) and len(a[0].users) > 1 and not _private_mutation(a[0], node):
            return None  # the mutation is visible through an alias: keep it
        if len(a) != 2 or set(node.kwargs) - {"alpha"}:
            return None  # rounding_mode, out=, ...: an argument the canonical form would drop
        target = {"mul": MUL, "div": DIV, "add": ADD, "sub": SUB}[base]
        if node.target is target and not node.kwargs:
            return None
        if node.kwargs.get("alpha", 1) != 1:
            return None
        if not isinstance(a[0], fx.Node) and not isinstance(a[1], fx.Node):
            return None
        if not isinstance(a[0], fx.Node) or not isinstance(meta_value(a[0]), torch.Tensor):
            if not isinstance(a[1], fx.Node) or not isinstance(meta_value(a[1]), torch.Tensor):
                return None  # scalar arithmetic (SymInt/float): leave Python semantics alone
        new = _replace(graph, node, target, (a[0], a[1]))
        if inplace:
            _redirect_later_readers(a[0], node, new)
        return new
    if kind == "masked_fill":
        inplace = is_method and node.target.endswith("_")
        if inplace and len(a[0].users) > 1 and not _private_mutation(a[0], node):
            return None
        if inplace:
            new = _replace(graph, node, MASKED_FILL, (a[0], _arg(node, 1, "mask"), _arg(node, 2, "value")))
            _redirect_later_readers(a[0], node, new)
            return new
        if node.target is MASKED_FILL:
            return None
        return _replace(graph, node, MASKED_FILL, (a[0], _arg(node, 1, "mask"), _arg(node, 2, "value")))
    if kind == "where":
        if is_method:  # x.where(cond, y) == torch.where(cond, x, y)
            return _replace(graph, node, WHERE, (a[1], a[0], a[2] if len(a) > 2 else node.kwargs.get("other")))
        if node.target is WHERE:
            return None
        return _replace(graph, node, WHERE, tuple(a[:3]))
    if kind == "type_as":  # only the dtype of the reference is read: make that explicit
        ref, src = meta_value(a[1]), meta_value(a[0])
        if not isinstance(ref, torch.Tensor) or not isinstance(src, torch.Tensor) or ref.device != src.device:
            return None  # type_as also moves across devices
        return _replace(graph, node, "to", (a[0], ref.dtype), method=True)
    if kind == "dropout":
        if node.target is DROPOUT and set(node.kwargs) == {"p", "training"} and len(a) == 1:
            return None
        if node.target is DROPOUT:
            p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
            inplace = _arg(node, 3, "inplace", False)
        else:  # torch.dropout(x, p, train) / aten.dropout(x, p, train)
            p, training, inplace = _arg(node, 1, "p", 0.5), _arg(node, 2, "train", True), False
        if inplace is not False:
            # nn.Dropout(p, inplace=True): the same values, unless the input is read elsewhere after it
            if inplace is not True or not isinstance(a[0], fx.Node) or (
                    len(a[0].users) > 1 and not _private_mutation(a[0], node)):
                return None
            new = _replace(graph, node, DROPOUT, (a[0],), {"p": p, "training": training})
            _redirect_later_readers(a[0], node, new)
            return new
        return _replace(graph, node, DROPOUT, (a[0],), {"p": p, "training": training})
    if kind == "einsum":
        return _einsum(graph, node)
    if kind == "baddbmm":
        return _baddbmm(graph, node)
    return None


def _softmax(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    x = node.args[0]
    r = rank(x)
    if r is None:
        return None
    if node.op == "call_function" and node.target in _aten("_softmax", ("default",)):
        dim, half_to_float = node.args[1], node.args[2]
        dtype = torch.float32 if half_to_float else None
    else:
        dim = _arg(node, 1, "dim")
        dtype = node.kwargs.get("dtype")
        if node.op == "call_function" and node.target is F.softmax and len(node.args) > 3:
            dtype = node.args[3]
        elif node.target is not F.softmax and len(node.args) > 2:
            dtype = node.args[2]
    if not isinstance(dim, int):
        return None  # implicit or symbolic dim: not ours to guess
    dim = dim % r if r else dim
    kwargs = {"dim": dim}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if node.target is SOFTMAX and node.op == "call_function" and dict(node.kwargs) == kwargs and len(node.args) == 1:
        return None
    return _replace(graph, node, SOFTMAX, (x,), kwargs)


def _permute(graph: fx.Graph, node: fx.Node, kind: str) -> Optional[fx.Node]:
    x = node.args[0]
    r = rank(x)
    if r is None:
        return None
    perm = list(range(r))
    if kind == "transpose_attr":
        attr = node.args[1] if node.op == "call_function" else "T"
        if attr == "mH" and meta_value(x) is not None and meta_value(x).is_complex():
            return None
        if attr == "T" or node.target == "t":
            perm = perm[::-1]
        else:
            if r < 2:
                return None
            perm[-1], perm[-2] = perm[-2], perm[-1]
    elif kind == "transpose":
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        d0, d1 = d0 % r, d1 % r
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        if not all(isinstance(d, int) for d in dims) or len(dims) != r:
            return None
        perm = [d % r for d in dims]
        if node.op == "call_function" and node.target is PERMUTE and list(node.args[1]) == perm:
            return None
    return _replace(graph, node, PERMUTE, (x, perm))


_EINSUM_TERM = re.compile(r"^[a-zA-Z]*$")


def _einsum(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    """A two-operand batched contraction ``...i,...j->`` over one index becomes permute + matmul."""
    eq = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if not isinstance(eq, str) or len(operands) != 2 or "->" not in eq:
        return None
    eq = _without_ellipsis(eq.replace(" ", ""), operands)
    if eq is None:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or not all(_EINSUM_TERM.match(t) for t in terms + [out]):
        return None
    a_idx, b_idx = terms
    if len(set(a_idx)) != len(a_idx) or len(set(b_idx)) != len(b_idx) or len(set(out)) != len(out):
        return None
    contracted = [c for c in a_idx if c in b_idx and c not in out]
    batch = [c for c in out if c in a_idx and c in b_idx]
    free_a = [c for c in a_idx if c not in b_idx]
    free_b = [c for c in b_idx if c not in a_idx]
    if len(contracted) == 1 and (len(free_a) != 1 or len(free_b) != 1):
        return _einsum_broadcast(graph, node, a_idx, b_idx, out, contracted[0], operands)
    if len(contracted) != 1 or len(free_a) != 1 or len(free_b) != 1:
        return None
    if set(out) != set(batch + free_a + free_b) or any(c not in out for c in free_a + free_b):
        return None
    a, b = operands
    a_order = batch + free_a + contracted
    b_order = batch + contracted + free_b
    a_p = _permute_to(graph, node, a, a_idx, a_order)
    b_p = _permute_to(graph, node, b, b_idx, b_order)
    mm = insert_call(graph, node, MATMUL, (a_p, b_p), like=node)
    mm_order = batch + free_a + free_b
    if mm_order == list(out):
        return mm
    return _permute_to(graph, node, mm, "".join(mm_order), list(out))


def _without_ellipsis(eq: str, operands) -> Optional[str]:
    """``eq`` with each ``...`` spelled as letters of its own (``...qhd,...khd->...hqk`` on 5-D operands:
    ``ABqhd,ABkhd->ABhqk``): the ellipsis dims of the two operands align on the right, as einsum broadcasts them.
    None when an operand's rank is unknown or the equation is not one this pass reads."""
    if "..." not in eq:
        return eq
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or any(t.count("...") > 1 for t in terms + [out]) or eq.count(".") != 3 * eq.count("..."):
        return None
    spans = []
    for term, operand in zip(terms, operands):
        value = meta_value(operand)
        if not isinstance(value, torch.Tensor):
            return None
        spans.append(value.dim() - len(term.replace("...", "")) if "..." in term else 0)
    if min(spans) < 0:
        return None
    width = max(spans)
    fresh = [c for c in string.ascii_letters if c not in eq][:width]
    if len(fresh) < width:
        return None

    def spell(term: str, n: int) -> str:
        return term.replace("...", "".join(fresh[width - n:]))
    return f"{spell(terms[0], spans[0])},{spell(terms[1], spans[1])}->{spell(out, width)}"


def _einsum_broadcast(graph: fx.Graph, node: fx.Node, a_idx: str, b_idx: str, out: str, c: str,
                      operands) -> Optional[fx.Node]:
    """A contraction with batch indices on one side only (multi-query attention: ``bhid,bjd->bhij``): the
    operand without them gets size-1 dims there, and matmul broadcasts. The output must end in the row index
    (of ``a`` only) and the column index (of ``b`` only); every other output index is a batch index."""
    if len(out) < 2:
        return None
    i, j = out[-2], out[-1]
    batch = list(out[:-2])
    if i not in a_idx or i in b_idx or j not in b_idx or j in a_idx or c in out:
        return None
    if set(a_idx) != {x for x in batch if x in a_idx} | {i, c} or set(b_idx) != {x for x in batch if x in b_idx} | {c, j}:
        return None
    a, b = operands
    a_p = _broadcast_to(graph, node, a, a_idx, batch, [i, c])
    b_p = _broadcast_to(graph, node, b, b_idx, batch, [c, j])
    return insert_call(graph, node, MATMUL, (a_p, b_p), like=node)


def _broadcast_to(graph, before, x, have: str, batch: list, tail: list) -> fx.Node:
    """``x`` (indices ``have``) permuted to its batch indices in ``batch`` order then ``tail``, with a size-1 dim
    for each batch index it lacks."""
    present = [b for b in batch if b in have]
    x = _permute_to(graph, before, x, have, present + tail)
    for pos, b in enumerate(batch):
        if b not in have:
            x = insert_call(graph, before, torch.unsqueeze, (x, pos), like=before)
    return x


def _permute_to(graph, before, x, have: str, want: list) -> fx.Node:
    perm = [have.index(c) for c in want]
    if perm == list(range(len(perm))):
        return x
    return insert_call(graph, before, PERMUTE, (x, perm), like=before)


def _baddbmm(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    """``baddbmm(input, b1, b2, beta, alpha) == beta * input + alpha * (b1 @ b2)``."""
    inp, b1, b2 = node.args[0], _arg(node, 1, "batch1"), _arg(node, 2, "batch2")
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if len(node.args) > 3:
        beta = node.args[3]
    if len(node.args) > 4:
        alpha = node.args[4]
    mm = insert_call(graph, node, MATMUL, (b1, b2), like=node)
    if not (isinstance(alpha, (int, float)) and alpha == 1):
        mm = insert_call(graph, node, MUL, (mm, alpha), like=node)
    if isinstance(beta, (int, float)) and beta == 0:
        return mm  # beta == 0 ignores input entirely, even NaN/inf (as baddbmm documents)
    bias = inp
    if not (isinstance(beta, (int, float)) and beta == 1):
        bias = insert_call(graph, node, MUL, (inp, beta), like=node)
    return insert_call(graph, node, ADD, (mm, bias), like=node)


#: producers whose output is a fresh tensor (never a view of another one)
_FRESH = {MATMUL, SOFTMAX, MUL, DIV, ADD, SUB, MASKED_FILL, WHERE}


def _private_mutation(x: fx.Node, inplace: fx.Node) -> bool:
    """An in-place op on a fresh intermediate whose other readers all come after it.

    Then ``x.op_(y)`` is the same as ``x2 = op(x, y)`` with those readers reading ``x2``.
    """
    if not (x.op == "call_function" and x.target in _FRESH):
        return False
    later = set()
    n = inplace.next
    while n.op != "root":
        later.add(n)
        n = n.next
    return all(u is inplace or u in later or reads_only_shape(u, x) for u in x.users)


def _redirect_later_readers(x: fx.Node, inplace: fx.Node, new: fx.Node) -> None:
    for u in list(x.users):
        if u is not inplace and u is not new and not reads_only_shape(u, x):
            u.replace_input_with(x, new)


def _slice_update_as_bias(graph: fx.Graph, setitem: fx.Node) -> bool:
    """``x[idx] = f(x[idx])`` with ``f`` views and additions of terms that do not read ``x`` (MViTv2 adds its
    decomposed relative position so) becomes ``x + bias``, ``bias`` zero outside ``idx`` and ``f(0)`` inside:
    the same values up to the order of the additions (``(x + a) + b`` against ``x + (a + b)``). Done only where
    ``x`` is a fresh tensor read after the update alone (the update is then invisible)."""
    x, idx, val = setitem.args
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target in _FRESH and isinstance(val, fx.Node)):
        return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    chain, read = _additive_chain(val, x, idx, order)
    if read is None or len(read.users) != 1:
        return False
    if any(u is not setitem and u is not read and order[u] < order[setitem] for u in x.users):
        return False
    like = meta_value(x)
    size = insert_call(graph, setitem, "size", (x,), method=True)  # x's shape only: no dependence on its values
    zeros = insert_call(graph, setitem, zeros_at, (size, idx, like.dtype, like.device), like=x)
    env = {read: zeros}
    with graph.inserting_before(setitem):
        for n in reversed(chain):  # from the read outward: f(0)
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    bias = insert_call(graph, setitem, scatter_into_zeros, (size, idx, env[val], like.dtype), like=x)
    new = insert_call(graph, setitem, ADD, (x, bias), like=x)
    for u in list(x.users):
        if u is not setitem and u is not read and u is not new and u is not size and order.get(u, 0) > order[setitem]:
            u.replace_input_with(x, new)
    graph.erase_node(setitem)
    remove_dead(graph, [val])
    return True


def _additive_chain(val: fx.Node, x: fx.Node, idx: Any, order: dict) -> tuple:
    """``(nodes from val inward, the read x[idx])`` when ``val`` is views and additions of x-free terms applied to
    ``x[idx]``; ``([], None)`` otherwise."""
    chain, node = [], val
    for _ in range(16):
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] is x:
            return (chain, node) if node.args[1] == idx else ([], None)
        chain.append(node)
        if is_reshape(node):
            node = node.args[0]
        elif node.op == "call_function" and node.target is ADD and len(node.args) == 2:
            a, b = node.args
            a_reads, b_reads = _reads(a, x, order), _reads(b, x, order)
            if a_reads == b_reads:
                return [], None
            node = a if a_reads else b
        else:
            return [], None
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return [], None
    return [], None


def _reads(arg: Any, x: fx.Node, position: dict, limit: int = 2000) -> bool:
    """Whether ``arg`` is computed from ``x``. Nodes placed before ``x`` (``position``: each node's place in the
    graph) cannot be, the graph being in topological order, so the walk stops there: a term built from a deep
    model's earlier layers is cheap to clear."""
    start = position[x]
    seen, work = set(), [arg]
    while work and len(seen) < limit:
        n = work.pop()
        if not isinstance(n, fx.Node) or n in seen or position.get(n, start) < start:
            continue
        if n is x:
            return True
        seen.add(n)
        work.extend(n.all_input_nodes)
    return len(seen) >= limit


def zeros_at(size: torch.Size, index: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros shaped like ``torch.zeros(size)[index]``."""
    return torch.zeros(size, dtype=dtype, device=device)[index]


def scatter_into_zeros(size: torch.Size, index: Any, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``size`` with ``values`` written at ``index``."""
    out = values.new_zeros(size, dtype=dtype)
    out[index] = values
    return out


# --- a sink applied after the value product: (softmax(s) @ v) * sigmoid(logsumexp(s) - t) ---------------------
#
# softmax over the keys plus one key of score t and value 0 gives Σ e^s v / (Z + e^t) with Z = Σ e^s, and
# Z / (Z + e^t) = sigmoid(log Z - t): the scaling is that sink, exactly. The extra key is spelled as find_sites
# reads sinks (a column concatenated to the scores, its probability dropped), so every rule about sinks (which
# targets serve them, how masks and fully masked rows behave) applies unchanged.

_VALUE_PRESERVING = {"to", "float", "half", "bfloat16", "double", "type", "contiguous"}


def _is_logsumexp(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in {torch.logsumexp} | _aten("logsumexp", ("default",))) \
        or (node.op == "call_method" and node.target == "logsumexp")


def _through_casts(node: fx.Node) -> fx.Node:
    """``node`` with dtype casts and copies in front of it stepped over (towards its inputs)."""
    while node.op == "call_method" and node.target in _VALUE_PRESERVING and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _forward_casts(node: fx.Node) -> tuple[fx.Node, list]:
    """Follow ``node``'s single users while they are casts (or ``unsqueeze(-1)``); returns the last one and the
    casts/unsqueezes stepped over."""
    steps = []
    while True:
        user = _only_user(node)
        if user is None or user.op != "call_method" or user.args[0] is not node:
            return node, steps
        if user.target in _VALUE_PRESERVING or (user.target == "unsqueeze" and tuple(user.args[1:]) in ((-1,),)):
            steps.append(user)
            node = user
            continue
        return node, steps


def _sink_scaling_as_extra_key(graph: fx.Graph, lse: fx.Node) -> bool:
    """Rewrite ``o = (softmax(s) @ v) * sigmoid(logsumexp(s) - t)`` into the extra-key spelling; False if the
    graph around ``lse`` is not exactly that (any other user, another dim, a sign flipped)."""
    scores = _through_casts(lse.args[0]) if isinstance(lse.args[0], fx.Node) else None
    r = rank(scores)
    dim = _arg(lse, 1, "dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    keepdim = _arg(lse, 2, "keepdim", False)
    if scores is None or r is None or not isinstance(dim, int) or dim % r != r - 1 or keepdim not in (True, False):
        return False
    sub = _only_user(lse)
    if sub is None or op_kind(sub) != "sub" or sub.args[0] is not lse or not isinstance(sub.args[1], fx.Node) \
            or not same_shape(shape(sub), shape(lse)):
        return False
    sink = sub.args[1]
    last, _ = _forward_casts(sub)
    gate = _only_user(last)
    if gate is None or not ((gate.op == "call_function" and gate.target in (torch.sigmoid, torch.special.expit,
                                                                         F.sigmoid))
                            or (gate.op == "call_method" and gate.target == "sigmoid")):
        return False
    last, steps = _forward_casts(gate)
    if sum(s.target == "unsqueeze" for s in steps) != (0 if keepdim else 1):
        return False
    mul = _only_user(last)
    if mul is None or op_kind(mul) != "mul" or len(mul.args) != 2 or last not in mul.args:
        return False
    operand = mul.args[1] if mul.args[0] is last else mul.args[0]
    product = _through_casts(operand)
    softmaxes = [u for u in scores.users if u.op == "call_function" and u.target is SOFTMAX
                 and u.kwargs.get("dim") == r - 1]
    if product.op != "call_function" or product.target is not MATMUL or len(softmaxes) != 1:
        return False
    path = _value_side_path(softmaxes[0], product)
    if path is None or len(product.users) != 1 or any(len(n.users) != 1 for n in [softmaxes[0], *path]):
        return False  # probabilities read elsewhere (returned): they exclude the sink, so the site is kept
    softmax = softmaxes[0]

    def call(before, target, *args, method=False, kwargs=None):
        return insert_call(graph, before, target, args, kwargs, like=softmax, method=method)

    sizes = call(product, "size", scores, method=True)
    dims = [call(product, operator.getitem, sizes, i) for i in range(r - 1)]
    column = sink if keepdim else call(product, "unsqueeze", sink, -1, method=True)
    column = call(product, "to", call(product, "expand", column, *dims, 1, method=True), meta_value(scores).dtype,
                  method=True)
    probs = call(product, SOFTMAX, call(product, torch.cat, [scores, column], -1), kwargs=dict(softmax.kwargs))
    current = call(product, operator.getitem, probs, (Ellipsis, slice(None, -1, None)))
    with graph.inserting_before(product):
        for step in path:  # the casts and dropout between the probabilities and the value product, again
            current = graph.node_copy(step, lambda n: current if n is (step.args[0]) else n)
            infer_meta(current)
    result = call(product, MATMUL, *(current if a is product.args[0] else a for a in product.args))
    with graph.inserting_before(mul):
        for step in _through_casts_chain(operand, product):  # the casts between the product and the scaling
            result = graph.node_copy(step, lambda n, prev=result, s=step: prev if n is s.args[0] else n)
            infer_meta(result)
    if meta_value(result).dtype != meta_value(mul).dtype:
        result = call(mul, "to", result, meta_value(mul).dtype, method=True)
    mul.replace_all_uses_with(result)
    remove_dead(graph, [mul])
    return True


def _value_side_path(softmax: fx.Node, product: fx.Node) -> Optional[list]:
    """The casts and dropouts leading from ``softmax`` to the left operand of ``product``, first first; None
    when the probabilities reach it any other way."""
    node, path = product.args[0], []
    while node is not softmax:
        if not isinstance(node, fx.Node) or not (
                (node.op == "call_method" and node.target in _VALUE_PRESERVING)
                or (node.op == "call_function" and node.target is DROPOUT)):
            return None
        path.append(node)
        node = node.args[0]
    return path[::-1]


def _through_casts_chain(node: fx.Node, product: fx.Node) -> list:
    """The casts from ``product`` up to ``node`` (which is ``product`` or casts of it), first first."""
    chain = []
    while node is not product:
        chain.append(node)
        node = node.args[0]
    return chain[::-1]


# --- a 0/1 gate: s * b + c * (1 - b) ---------------------------------------------------------------------------

def _gate_as_fill(graph: fx.Graph, node: fx.Node, binary: Callable[[fx.Node], bool]) -> bool:
    """Rewrite ``s * b + c * (1 - b)`` (or ``s * b - c * (1 - b)``, any operand order) into
    ``s.masked_fill(b == 0, ±c)``: the two agree exactly where ``b`` is 0 or 1, so only a ``b`` that
    ``binary`` proves to hold nothing else is taken."""
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    for kept, other in (node.args, node.args[::-1]):
        if other is node.args[0] and node.target is SUB:
            continue  # c * (1 - b) - s * b: the scores negated, not a gate
        gated, fill = _product(kept), _product(other)
        if gated is None or fill is None:
            continue
        for scores, gate in (gated, gated[::-1]):
            for factor, rest in (fill, fill[::-1]):
                value = _number(factor)
                if value is None or not _is_one_minus(rest, gate) or not isinstance(scores, fx.Node) \
                        or meta_value(scores) is None or not same_shape(shape(scores), shape(node)) \
                        or not binary(gate):
                    continue
                value = -value if node.target is SUB else value
                cond = insert_call(graph, node, torch.eq, (gate, 0), like=node)
                new = insert_call(graph, node, MASKED_FILL, (scores, cond, value), like=node)
                if meta_value(new) is None or meta_value(new).dtype != meta_value(node).dtype:
                    new = insert_call(graph, node, "to", (new, meta_value(node).dtype), like=node, method=True)
                new.meta.setdefault("normalized_from", node.name)
                node.replace_all_uses_with(new)
                remove_dead(graph, [node])
                return True
    return False


def _product(node: fx.Node) -> Optional[tuple]:
    return tuple(node.args) if node.op == "call_function" and node.target is MUL and len(node.args) == 2 else None


def _number(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _is_one_minus(node: Any, gate: fx.Node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is SUB \
        and len(node.args) == 2 and _number(node.args[0]) == 1.0 and node.args[1] is gate


# --- a combination of head slices of the probabilities times v (differential attention) ------------------------
#
# (Σ c_i W[idx_i]) @ v, with W a view of the probabilities that splits their leading dims, idx_i integers on
# those dims, and each c_i constant along the keys, is Σ c_i ((W @ v_W)[idx_i]) where v_W repeats v along the
# integer-indexed dims: matrix products are linear and act on each leading index alone. Written as the
# probabilities (before the view) times v_W viewed the same way, it is one ordinary value product.

def _slices_after_the_product(graph: fx.Graph, product: fx.Node) -> bool:
    combination, v = product.args[0], product.args[1]
    if not isinstance(combination, fx.Node) or not isinstance(v, fx.Node) or rank(v) is None \
            or combination.op != "call_function" or combination.target is operator.getitem:
        return False
    leaves, inner = [], set()
    if not _linear_in_slices(combination, leaves, inner, top=True) or not leaves:
        return False
    split = leaves[0].args[0]
    if any(leaf.args[0] is not split for leaf in leaves) or len(split.users) != len(leaves):
        return False
    probs, lead_w = split.args[0], shape(split)[:-2]
    if rank(probs) is None or not same_shape(shape(probs)[-2:], shape(split)[-2:]):
        return False
    indices = [_index(leaf) for leaf in leaves]
    if any(idx is None for idx in indices):
        return False
    indexed = sorted({i for idx in indices for i, x in enumerate(idx) if isinstance(x, int)})
    kept = [lead_w[i] for i in range(len(lead_w)) if i not in indexed]
    if not indexed or rank(v) != len(kept) + 2 or not same_shape(tuple(shape(v)[:-2]), tuple(kept)) \
            or any(sum(isinstance(x, int) for x in idx) != len(indexed) for idx in indices):
        return False

    def call(target, *args, method=False):
        return insert_call(graph, product, target, args, like=product, method=method)

    def sizes(node, dims):
        every = call("size", node, method=True)
        return [call(operator.getitem, every, i) for i in dims]

    lead_sizes = _lead_sizes(split, len(lead_w))  # from the view's arguments: a size() of it would keep it alive
    if lead_sizes is None:
        return False
    v_w = v
    for axis in indexed:
        v_w = call("unsqueeze", v_w, axis, method=True)
    v_w = call("expand", v_w, *[lead_sizes[i] if i in indexed else -1 for i in range(len(lead_w))], -1, -1,
               method=True)
    v_p = call("reshape", v_w, *sizes(probs, range(rank(probs) - 2)), *sizes(v, (-2, -1)), method=True)
    values = call(MATMUL, probs, v_p)
    per_slice = call("view", values, *lead_sizes, *sizes(values, (-2, -1)), method=True)
    env = {leaf: call(operator.getitem, per_slice, leaf.args[1]) for leaf in leaves}
    result = _rebuild(combination, env, inner, call)
    if not same_shape(shape(result), shape(product)):  # the checks above make the shapes agree
        remove_dead(graph, [result])
        return False
    product.replace_all_uses_with(result)
    remove_dead(graph, [product])
    return True


def _lead_sizes(view: fx.Node, count: int) -> Optional[list]:
    """The first ``count`` sizes a ``view``/``reshape`` call names, when it names them all explicitly."""
    if view.op != "call_method" or view.target not in ("view", "reshape"):
        return None
    named = view.args[1:]
    if len(named) == 1 and isinstance(named[0], (list, tuple)):
        named = tuple(named[0])
    lead = list(named[:count])
    if len(lead) != count or any(isinstance(x, int) and x < 0 for x in lead):
        return None
    return lead


def _index(leaf: fx.Node) -> Optional[tuple]:
    """A slice's index when it picks whole leading positions (integers or full slices) and keeps the last two
    dims whole; None otherwise."""
    idx = leaf.args[1] if isinstance(leaf.args[1], tuple) else (leaf.args[1],)
    r = rank(leaf.args[0])
    if r is None or len(idx) > r - 2 or not all(isinstance(x, int) or x == slice(None) for x in idx):
        return None
    return idx


def _linear_in_slices(node: Any, leaves: list, inner: set, top: bool = False, depth: int = 8) -> bool:
    """Whether ``node`` is a sum of slices ``W[idx]`` of a reshape ``W`` (collected in ``leaves``) times weights
    constant along the keys, each intermediate used only here (collected in ``inner``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth == 0 or (not top and len(node.users) != 1):
        return False
    if node.target is operator.getitem:
        if isinstance(node.args[0], fx.Node) and is_reshape(node.args[0]):
            leaves.append(node)
            return True
        return False
    inner.add(node)
    if node.target in (ADD, SUB) and len(node.args) == 2:
        return all(_linear_in_slices(a, leaves, inner, depth=depth - 1) for a in node.args)
    if node.target in (MUL, DIV) and len(node.args) == 2:
        for term, weight in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if term is node.args[1] and node.target is DIV:
                break
            found: list = []
            if _linear_in_slices(term, found, inner, depth=depth - 1) and _constant_along_keys(weight):
                leaves.extend(found)
                return True
        return False
    if node.target in (torch.neg, operator.neg) and len(node.args) == 1:
        return _linear_in_slices(node.args[0], leaves, inner, depth=depth - 1)
    return False


def _constant_along_keys(weight: Any) -> bool:
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        return True
    value = meta_value(weight)
    return isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[-1] == 1)


def _rebuild(node: fx.Node, env: dict, inner: set, call: Callable) -> fx.Node:
    """``node``'s expression with its slices replaced by ``env`` (the combination applied to the products)."""
    if node in env:
        return env[node]
    args = tuple(_rebuild(a, env, inner, call) if isinstance(a, fx.Node) and (a in env or a in inner) else a
                 for a in node.args)
    return call(node.target, *args)


# --- keys side by side: one query against several key sets, one softmax over all of them ----------------------

def side_by_side(dim: int, *parts: torch.Tensor) -> torch.Tensor:
    """``parts`` broadcast to their common batch dims (all but the last two) and concatenated along ``dim``
    (-1: transposed keys ``[.., d, n_i]``; -2: values ``[.., n_i, d]``)."""
    batch = torch.broadcast_shapes(*(p.shape[:-2] for p in parts))
    return torch.cat([p.expand(*batch, *p.shape[-2:]) for p in parts], dim)


def _single_use_product(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is MATMUL and len(node.users) == 1


def _products_side_by_side(graph: fx.Graph, cat: fx.Node) -> bool:
    """``cat([a @ b1, a @ b2, ...], -1)`` with one left operand ``a`` as ``a @ side_by_side(-1, b1, b2, ...)``: the
    columns of a product are the products with the columns of its right operand."""
    parts = _arg(cat, 0, "tensors")
    dim = _arg(cat, 1, "dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not all(map(_single_use_product, parts)):
        return False
    r = rank(cat)
    if r is None or dim not in (-1, r - 1) or len({p.args[0] for p in parts}) != 1:
        return False
    if any(rank(p.args[1]) is None or rank(p.args[1]) < 2 or rank(p.args[0]) < 2 for p in parts):
        return False
    return _as_one_product(graph, cat, parts[0].args[0], -1, [p.args[1] for p in parts])


def _as_one_product(graph: fx.Graph, node: fx.Node, left: fx.Node, dim: int, rights: list) -> bool:
    """``node`` replaced by ``left @ side_by_side(dim, *rights)`` where that has ``node``'s shape (False, and the
    graph as it was, where not); what only ``node`` read is removed with it."""
    joint = _replace(graph, node, side_by_side, (dim, *rights))
    new = _replace(graph, node, MATMUL, (left, joint))
    if not same_shape(shape(new), shape(node)):
        remove_dead(graph, [new, joint])
        return False
    node.replace_all_uses_with(new)
    remove_dead(graph, [node])
    return True


def _last_dim_slice(node: Any) -> Optional[tuple]:
    """``(x, start, stop)`` where ``node`` is ``x[..., start:stop]`` (int bounds, every other dim whole); ``stop`` is
    None where the slice runs to the end (the last dim's size may be symbolic)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    x, index = node.args
    index = index if isinstance(index, tuple) else (index,)
    r = rank(x)
    if len(index) == 2 and index[0] is Ellipsis:
        last = index[1]
    elif r is not None and len(index) == r and all(i == slice(None) for i in index[:-1]):
        last = index[-1]
    else:
        return None
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    size = static_int((shape(x) or (None,))[-1])
    start, stop = last.start or 0, last.stop
    if not isinstance(start, int) or not (stop is None or isinstance(stop, int)):
        return None
    if size is not None:  # negative bounds, and a stop past the end, as Python reads them
        start = start + size if start < 0 else start
        stop = None if stop is None or stop >= size else (stop + size if stop < 0 else stop)
    elif start < 0 or (stop is not None and stop < 0):
        return None
    return (x, start, stop) if 0 <= start and (stop is None or start < stop) else None


def _summed_terms(node: fx.Node, top: bool = True) -> list:
    """The terms of a chain of additions (inner additions used only by the chain)."""
    if node.op == "call_function" and node.target is ADD and len(node.args) == 2 and not node.kwargs \
            and (top or len(node.users) == 1):
        return [t for a in node.args for t in (_summed_terms(a, False) if isinstance(a, fx.Node) else [a])]
    return [node]


def _slice_products_summed(graph: fx.Graph, add: fx.Node) -> bool:
    """``p[..., :g] @ v1 + p[..., g:] @ v2`` (slices that tile the last dim of ``p``, each read once) as
    ``p @ side_by_side(-2, v1, v2)``: a product summed over column blocks is the product over all columns."""
    terms = _summed_terms(add)
    if len(terms) < 2 or not all(map(_single_use_product, terms)):
        return False
    slices = [_last_dim_slice(t.args[0]) for t in terms]
    if any(s is None or len(t.args[0].users) != 1 for s, t in zip(slices, terms)):
        return False
    if len({s[0] for s in slices}) != 1:
        return False
    order = sorted(range(len(terms)), key=lambda i: slices[i][1])
    bounds = [(slices[i][1], slices[i][2]) for i in order]
    if bounds[0][0] != 0 or bounds[-1][1] is not None or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        return False  # the slices must tile the columns: from 0, each where the last stopped, the last to the end
    return _as_one_product(graph, add, slices[0][0], -2, [terms[i].args[1] for i in order])

