"""Banded attention read from its index structure, rewritten as one dense site with a band mask.

Longformer and LED compute local attention without an N x N product: queries and keys are cut into overlapping
chunks (``as_strided``), multiplied chunk by chunk, and the chunk products are shifted into a ``[b, n, h, 2w+1]``
band by pads, views and slice copies into zeros, the band's corners filled with −∞; the values go through the
mirror image (a padded, chunked copy and a diagonalised probability matrix). No rule over op names follows
that, and the next model spells it another way. So this pass reads what the index ops *do*, by running them:

1. From a softmax, the ops between its scores and the products that feed them (and every in-place write into
   those tensors) are the scores' *assembly*; from each product, the ops back to its operands' sources are
   pure index ops (views, ``as_strided``, pads, slices). Nothing else may enter: an input read for its values
   other than through a product ends the reading (the assembly then depends only on the products).
2. The index ops are run on numbered tensors (element ``i`` holds ``i + 1`` plus a large offset: the operands'
   index ops twice, with two offsets, so a copied element and a constant such as a pad or a zero fill tell
   themselves apart; the assembly once per term). That gives, for every score, which query row and key row its
   product paired (the feature axis contracted in step), which mask element each additive term carries, and
   where −∞ was written, and the number a term is scaled by after its product (a second run at another offset);
   a run on random values checks the scores are exactly the sum of those terms (a constant that happened to look
   like a number would fail it). The same reading of the value side gives, for
   every output element, which probabilities met which value rows.
3. The reading is accepted when it is a band: each score row has one query (an affine position in the source
   tensors), its slot ``s`` reads key ``i + s - left`` along the same axis, the −∞ entries are exactly the keys
   past either end, the value product sums every slot of the row once with that key's value row, and the output
   is an affine (strided) view of ``rows x features``. Anything else is left as it was.

The rewrite is ``softmax(q @ kᵀ + mask, masked to |band|) @ v`` in a ``[..., n, d]`` layout, the band a fill
by ``outside_band`` (a function of the lengths only), so ``find_sites`` reads a plain site and the lowering
runs it on the banded kernel (``SiteCall.band``), O(n·w), never N x N. A post-softmax fill of whole query rows
with 0 (Longformer's padded queries) becomes the same fill of those output rows. The reading holds for the shapes
it was read at: a graph with symbolic sizes is not rewritten, and the capture compiles static graphs once a band
is seen (``STATIC_SHAPES``).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph import (hint_int, input_cone, insert_call, is_mutating, meta_value, owner_path, reads_only_shape,
                     remove_dead, shape)
from .normalize import MASKED_FILL, MATMUL, SOFTMAX, op_kind

#: offsets of the two numbered runs: an element copied by the index ops differs by exactly ``_SHIFT``
_SHIFT = float(2 ** 30)

_MOVE_METHODS = {"view", "reshape", "transpose", "permute", "as_strided", "contiguous", "unfold", "expand",
                 "flatten", "unflatten", "squeeze", "unsqueeze", "narrow", "clone", "movedim", "swapaxes", "t",
                 "__getitem__", "detach"}
_MOVE_FUNCTIONS = {operator.getitem, torch.as_strided, torch.transpose, torch.reshape, torch.permute, torch.flatten,
                   torch.unflatten, torch.squeeze, torch.unsqueeze, torch.narrow, torch.movedim, F.pad,
                   torch._C._nn.pad, torch.swapaxes, torch.clone, torch.detach}
#: ops that read an input for its dtype and device (and shape) only, besides ``graph.reads_only_shape``'s (position)
_METADATA_METHODS = {"new_zeros": 0, "new_ones": 0, "new_full": 0, "new_empty": 0, "type_as": 1}
_METADATA_FUNCTIONS = {torch.zeros_like: 0, torch.ones_like: 0, torch.empty_like: 0}
_CASTS = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous"}
_ASSEMBLY_METHODS = _CASTS | {"new_zeros", "new_ones", "new_full", "new_empty", "tril", "triu", "flip", "bool",
                              "expand_as", "fill_", "zero_", "copy_", "masked_fill_", "__and__", "__or__",
                              "__invert__", "logical_not", "lt", "le", "gt", "ge", "eq", "ne", "size", "dim"}
_ASSEMBLY_FUNCTIONS = {torch.full_like, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full, torch.zeros,
                       torch.ones, torch.arange, torch.tril, torch.triu, torch.flip, torch.logical_not,
                       torch.logical_and, torch.logical_or, operator.setitem, operator.add, operator.sub,
                       operator.mul, operator.floordiv, operator.neg, operator.lt, operator.le, operator.gt,
                       operator.ge, operator.eq, operator.ne, operator.and_, operator.or_, operator.invert,
                       torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne}


class _NotABand(Exception):
    pass


#: ``gm.meta`` key: ``{(owner path, stack trace)}`` of each band's softmax: the capture compiles the modules whose
#: forward holds a band with static shapes
STATIC_SHAPES = "rewrite_static_shapes"
#: ``node.meta`` key on a softmax whose band is read at fixed shapes only (the report names it there, not here)
BAND_AT_STATIC_SHAPES = "rewrite_band_at_static_shapes"
#: ``node.meta`` key on a rewritten band's score product: ``{"reach": (left, right), "flops": F}``, F the FLOPs of
#: the products the original computed (its chunks), for the report's "before"
BAND = "rewrite_band"


def bands_as_dense(gm: fx.GraphModule) -> int:
    """Rewrite every banded attention of ``gm`` read as described above; returns how many. The reading holds for
    the sizes it was made at, so each band's module goes into ``gm.meta[STATIC_SHAPES]``: the capture gives it an
    entry of its own that compiles static graphs (Dynamo would otherwise make the next shape's graph symbolic,
    where Longformer's chunk arithmetic also breaks the graph inside the attention). A band in a graph with
    symbolic sizes is read at the example's sizes, to ask for that, and left as it was. Run under
    ``graph.module_names`` so the modules are named."""
    found = 0
    for sm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SOFTMAX]:
        try:
            band = _read_band(sm)
        except _NotABand:
            continue
        gm.meta.setdefault(STATIC_SHAPES, set()).add((owner_path(sm), sm.meta.get("stack_trace") or ""))
        if any(_symbolic(n) for n in (sm, band.output, band.q[0], band.k[0], band.v[0])):
            sm.meta[BAND_AT_STATIC_SHAPES] = True
            continue
        _write_dense(gm.graph, band)
        found += 1
    if found:
        gm.graph.lint()
        gm.recompile()
    return found


# --- reading ---------------------------------------------------------------------------------------------------

class _Band:
    """What a banded attention reads from where (every position a flat index into its source's elements)."""

    def __init__(self, softmax: fx.Node):
        self.softmax = softmax
        self.region: set = set()         # every node the rewrite replaces
        self.rows: tuple = ()            # the scores' row dims (all but the slots)
        self.slots = 0
        self.token_dim = 0               # which row dim is the query position
        self.left = self.right = 0
        self.q = self.k = self.v = None  # (source node, size, stride, offset)
        self.masks: list = []            # ((source node, size, stride, offset), factor): terms [..., nq, nk]
        self.scale = 1.0                 # the number q·kᵀ is multiplied by (a scale after the products)
        self.after_softmax: list = []    # the casts and dropout between the softmax and the value product
        self.row_fills: list = []        # condition nodes: whole query rows filled with 0 after the softmax
        self.output = None               # the node whose value the rewrite gives
        self.output_view = None          # (layout, size, stride, offset) of it on ``rows x features``
        self.flops = 0                   # what the original's products computed


def _read_band(sm: fx.Node) -> _Band:
    scores = sm.args[0]
    s_shape = _example_shape(scores)
    if s_shape is None or len(s_shape) < 2 or sm.kwargs.get("dim") != len(s_shape) - 1 or len(sm.args) != 1:
        raise _NotABand
    b = _Band(sm)
    b.rows, b.slots = tuple(s_shape[:-1]), s_shape[-1]
    assembly, products = _assembly(scores, stop=lambda n: _is_product(n) or not _assembles(n))
    value_product, prob_chain = _value_side(b, sm)
    if not products or not _gathers(assembly, products + [value_product]):
        raise _NotABand  # plain attention (find_sites reads it), or no product at all
    if max(_numel(s_shape), *(_numel(_example_shape(p) or ()) for p in products + [value_product])) > MAX_READ:
        raise _NotABand
    terms = _read_terms(assembly, products, scores, s_shape)
    b.flops = sum(2 * _numel(_example_shape(p)) * _contracted(p) for p in products + [value_product])
    _read_scores(b, terms)
    _read_values(b, value_product, prob_chain, terms)
    b.region |= assembly | set(products) | {sm} | set(prob_chain)
    return b


#: the most elements a band's scores or products may have to be read: the numbered runs hold a few such tensors in
#: float64 (Longformer-base at 4k tokens, products of 47 M: about 3 GB at the peak, 13 s); larger is left as it was
MAX_READ = 2 ** 26
#: index ops that move elements to other positions (a plain attention's views and masks never do)
_GATHERING_METHODS = {"as_strided", "unfold", "new_zeros", "new_full", "new_empty", "roll", "index_select", "gather"}


def _gathers(assembly: set, products: list) -> bool:
    """Whether the scores' assembly or a product's operands move elements to other positions: ``as_strided``,
    ``unfold``, pads, copies into new tensors (a band's chunks and shifts)."""
    nodes = set(assembly)
    for p in products:
        for operand in _operands(p):
            nodes.update(_source(operand)[1] if isinstance(operand, fx.Node) else [])
    for n in nodes:
        if n.op == "call_method" and n.target in _GATHERING_METHODS:
            return True
        if n.op == "call_function" and n.target in (F.pad, torch._C._nn.pad, operator.setitem, torch.as_strided,
                                                     torch.roll, torch.index_select, torch.gather):
            return True
    return False


def _example_shape(node: Any) -> Optional[tuple]:
    """The node's shape on the captured example (a symbolic size read at its example value)."""
    s = shape(node)
    if s is None:
        return None
    dims = tuple(hint_int(d) for d in s)
    return None if any(d is None for d in dims) else dims


def _symbolic(node: Any) -> bool:
    return any(not isinstance(d, int) for d in (shape(node) or ()))


def _is_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is MATMUL


def _is_product(node: fx.Node) -> bool:
    """``a @ b``, or an einsum of two operands (the canonical spelling keeps some einsums as they are)."""
    return _is_matmul(node) or (node.op == "call_function" and op_kind(node) == "einsum" and len(node.args) >= 2
                                and isinstance(node.args[0], str) and node.args[0].count(",") == 1)


def _assembles(node: fx.Node) -> bool:
    """An op that places, fills, masks or adds values (or computes sizes and position patterns): what the scores'
    assembly may be made of. Anything else ends it: a product, or a term added to the scores as it is."""
    if node.op not in ("call_function", "call_method"):
        return False
    if _is_move(node) or op_kind(node) in ("add", "iadd", "sub", "masked_fill", "where"):
        return True
    if op_kind(node) in ("mul", "div", "imul", "idiv") and len(node.args) == 2 and \
            isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool):
        return True  # a scale (the softmax's, after the products): read as each term's factor
    if node.op == "call_method":
        return node.target in _ASSEMBLY_METHODS
    return node.target in _ASSEMBLY_FUNCTIONS or (
        node.target is torch.div and node.kwargs.get("rounding_mode") is not None)


def _is_move(node: Any) -> bool:
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        if node.target in ("view", "to") and any(isinstance(a, torch.dtype) for a in node.args[1:]):
            return False
        return node.target in _MOVE_METHODS
    if node.op == "call_function":
        if node.target in (F.pad, torch._C._nn.pad):
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            return mode == "constant"
        if node.target is operator.getitem:
            return _plain_index(node.args[1])
        return node.target in _MOVE_FUNCTIONS
    return False


def _plain_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


def _shape_only(node: fx.Node, inp: fx.Node) -> bool:
    """Whether ``node`` reads ``inp`` for its shape, dtype or device only."""
    if reads_only_shape(node, inp):
        return True
    if node.op == "call_method":
        pos = _METADATA_METHODS.get(node.target)
    elif node.op == "call_function":
        pos = _METADATA_FUNCTIONS.get(node.target)
    else:
        pos = None
    if pos is None or len(node.args) <= pos or node.args[pos] is not inp:
        return False
    return all(a is not inp for i, a in enumerate(node.args) if i != pos) and inp not in node.kwargs.values()


def _data_inputs(node: fx.Node) -> list:
    return [i for i in node.all_input_nodes if not _shape_only(node, i)]


def _assembly(root: fx.Node, stop) -> tuple[set, list]:
    """The nodes ``root`` is computed from back to the ``stop`` nodes, with every in-place write into any of them
    (or into a view of one); and the ``stop`` nodes reached. Any other input read for its values: not a band."""
    region: set = set()
    stops: list = []
    order = {n: i for i, n in enumerate(root.graph.nodes)}

    def walk(start: fx.Node) -> None:
        work = [start]
        while work:
            n = work.pop()
            if n in region or n in stops:
                continue
            if stop(n):
                stops.append(n)
                continue
            if n.op not in ("call_function", "call_method"):
                raise _NotABand
            region.add(n)
            work.extend(_data_inputs(n))

    walk(root)
    changed = True
    while changed:
        changed = False
        aliases = _views_of(region)
        for n in root.graph.nodes:
            if order[n] >= order[root]:
                break
            if n not in region and is_mutating(n) and n.args and n.args[0] in aliases:
                if stop(n):
                    raise _NotABand  # written in place by what does not assemble scores (it would end the walk)
                for a in _alias_path(n.args[0], region):
                    region.add(a)
                walk(n)
                changed = True
    return region, stops


def _views_of(region: set) -> set:
    out = set(region)
    work = list(region)
    while work:
        n = work.pop()
        for u in n.users:
            if u not in out and _is_move(u) and u.args[0] is n:
                out.add(u)
                work.append(u)
    return out


def _alias_path(node: fx.Node, region: set) -> list:
    path = []
    while node not in region and _is_move(node):
        path.append(node)
        node = node.args[0]
    return path


def _source(operand: fx.Node) -> tuple[fx.Node, list]:
    """The node ``operand`` is an index view of, and the index ops in between (source first)."""
    chain = []
    node = operand
    while _is_move(node):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _evaluate(nodes: list, env: dict) -> dict:
    """Run ``nodes`` (graph order) on the values in ``env``. An input outside it is computed when it depends on no
    input of the graph (a size), and otherwise read for its shape only (the reading admits no other)."""
    env = dict(env)
    for n in nodes:
        if n not in env:
            env[n] = _run(n, env)
    return env


def _run(n: fx.Node, env: dict) -> Any:
    def value(a):
        if a not in env:
            env[a] = _constant(a, env)
        return env[a]
    args = fx.node.map_arg(n.args, value)
    kwargs = fx.node.map_arg(n.kwargs, value)
    try:
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception as err:  # noqa: BLE001 - an op the numbered run cannot take: not read
        raise _NotABand from err
    raise _NotABand


def _constant(a: fx.Node, env: dict) -> Any:
    """The value of an input outside the nodes run: computed when its cone reads no graph input (a size, a
    position pattern), else zeros of its example shape (it is read for its shape or dtype only)."""
    cone = input_cone(a, limit=64)
    if cone is not None and not cone[1]:
        for n in [x for x in a.graph.nodes if x in cone[0]]:
            if n not in env:
                env[n] = _run(n, env)
        return env[a]
    meta = meta_value(a)
    if isinstance(meta, torch.Tensor):  # read for its shape or dtype only
        shape_ = _example_shape(a)
        if shape_ is None:
            raise _NotABand
        return torch.zeros(shape_, dtype=meta.dtype)
    if isinstance(meta, torch.SymInt) and hint_int(meta) is not None:
        return hint_int(meta)
    raise _NotABand


def _numbered(shape_: tuple, offset: float) -> torch.Tensor:
    """Element ``i`` of the tensor holds ``i + 1 + offset`` (float64: exact integers)."""
    return torch.arange(1, 1 + _numel(shape_), dtype=torch.float64).view(shape_) + offset


def _numel(shape_: tuple) -> int:
    out = 1
    for d in shape_:
        out *= d
    return out


def _decode(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat element index, -1 where a constant), and the constants' values, from the two numbered runs."""
    copied = (second - first) == _SHIFT
    index = torch.where(copied, first - 1, torch.full_like(first, -1)).to(torch.int64)
    return index, torch.where(copied, torch.zeros_like(first), first)


def _through_moves(chain: list, source_shape: tuple, source: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
    runs = [_evaluate(chain, {source: _numbered(source_shape, off)})[chain[-1]] if chain else
            _numbered(source_shape, off) for off in (0.0, _SHIFT)]
    return _decode(*runs)


class _Operand:
    """A product operand as an index view of its source: per element, the source element it holds."""

    def __init__(self, operand: fx.Node):
        self.source, chain = _source(operand)
        self.shape = _example_shape(self.source)
        if self.shape is None or _example_shape(operand) is None:
            raise _NotABand
        self.ones = _is_ones(self.source)
        if self.ones:
            self.index = torch.zeros(_example_shape(operand), dtype=torch.int64)
            self.constant = torch.ones(_example_shape(operand), dtype=torch.float64)
        else:
            self.index, self.constant = _through_moves(chain, self.shape, self.source)


def _is_ones(node: fx.Node) -> bool:
    """A tensor of ones made from shapes alone (``x.new_ones(size)``, ``torch.ones(size)``, ``ones_like``)."""
    if node.op == "call_method" and node.target == "new_ones":
        return True
    return node.op == "call_function" and node.target in (torch.ones, torch.ones_like)


class _Product:
    """A product of two operands (``a @ b``, or an einsum of two) in letters: ``out`` names the output dims, ``c``
    the one contracted dim; each operand is read as an index view of its source."""

    def __init__(self, p: fx.Node):
        operands, self.letters, self.out = _letters(p)
        self.node = p
        self.operands = [_Operand(o) for o in operands]
        contracted = set(self.letters[0]) & set(self.letters[1]) - set(self.out)
        if len(contracted) != 1 or any(ch not in self.out and ch not in contracted for ch in "".join(self.letters)):
            raise _NotABand
        self.c = contracted.pop()
        self.out_shape = _example_shape(p)
        if self.out_shape is None:
            raise _NotABand
        for op, letters in zip(self.operands, self.letters):
            if op.index.dim() != len(letters):
                raise _NotABand

    def size(self, ch: str) -> int:
        return self.out_shape[self.out.index(ch)]

    def rows(self, i: int, feature: str, constants: bool = False, want: Optional[list] = None) -> tuple:
        """Operand ``i``'s rows of consecutive features along ``feature``: the first element of each (-1: a row of
        constants), laid over ``want`` (default: the output dims without ``feature``; a broadcast view), and the
        step."""
        op, letters = self.operands[i], self.letters[i]
        base, step = _feature_rows(op.index, op.constant, letters.index(feature), constants)
        want = [ch for ch in self.out if ch != feature] if want is None else want
        return self.laid_out(base, letters.replace(feature, ""), want), step

    def laid_out(self, x: torch.Tensor, have: str, want: list) -> torch.Tensor:
        """``x`` (dims ``have``) over the dims ``want`` (output letters, or ``c``), broadcast where it lacks one."""
        if any(ch not in want for ch in have):
            raise _NotABand
        kept = [ch for ch in want if ch in have]
        x = x.permute([have.index(ch) for ch in kept])
        x = x.reshape([x.shape[kept.index(ch)] if ch in have else 1 for ch in want])
        return x.expand([self.operand_size(ch) for ch in want])

    def operand_size(self, ch: str) -> int:
        if ch in self.out:
            return self.size(ch)
        for op, letters in zip(self.operands, self.letters):
            if ch in letters:
                return op.index.shape[letters.index(ch)]
        raise _NotABand


def _contracted(p: fx.Node) -> int:
    """How many products of pairs make one output element of ``p`` (a term added as it is: 0)."""
    if not _is_product(p):
        return 0
    operands, letters, out = _letters(p)
    sizes = {ch: d for o, ls in zip(operands, letters) for ch, d in zip(ls, _example_shape(o) or ())}
    return _numel(tuple(d for ch, d in sizes.items() if ch not in out))


def _operands(p: fx.Node) -> list:
    """The two operands of a product (an einsum takes them as a tuple or one by one)."""
    if _is_matmul(p):
        return list(p.args[:2])
    return list(p.args[1] if len(p.args) == 2 and isinstance(p.args[1], (tuple, list)) else p.args[1:])


def _letters(p: fx.Node) -> tuple[list, list, str]:
    """(operand nodes, their letters, output letters) of a matmul or a two-operand einsum."""
    if _is_matmul(p):
        a, b = p.args[0], p.args[1]
        ra, rb = len(_example_shape(a) or ()), len(_example_shape(b) or ())
        if ra < 2 or rb < 2:
            raise _NotABand
        batch = "ijklmnop"[:max(ra, rb) - 2]
        return [a, b], [batch[len(batch) - (ra - 2):] + "xc", batch[len(batch) - (rb - 2):] + "cy"], batch + "xy"
    eq = p.args[0] if isinstance(p.args[0], str) else None
    operands = _operands(p)
    if eq is None or "..." in eq or "->" not in eq or len(operands) != 2:
        raise _NotABand
    inputs, out = eq.replace(" ", "").split("->")
    letters = inputs.split(",")
    if len(letters) != 2 or any(len(set(x)) != len(x) for x in letters + [out]):
        raise _NotABand
    return list(operands), letters, out


def _feature_rows(index: torch.Tensor, constant: torch.Tensor, dim: int,
                  constants: bool = False) -> tuple[torch.Tensor, int]:
    """Rows along ``dim`` that are consecutive features of one source row: the row's first element (-1 for a row
    of constants) and the step between features. Anything else (a mixed row; a nonzero constant unless
    ``constants``): not a band."""
    base = index.select(dim, 0).unsqueeze(dim)
    width = index.shape[dim]
    copied = base >= 0
    step = 0
    if width > 1:
        sample = index.select(dim, 1).unsqueeze(dim)[copied]
        if sample.numel() == 0:
            raise _NotABand
        step = int(sample[0] - base[copied][0])
        if step == 0:
            raise _NotABand
    ar = torch.arange(width).view([-1 if i == dim % index.dim() else 1 for i in range(index.dim())])
    expected = torch.where(copied, base + step * ar, torch.full_like(index, -1))
    if not torch.equal(index, expected):
        raise _NotABand
    if not constants and bool(((~copied).expand_as(constant) & (constant != 0)).any()):
        raise _NotABand
    return base.squeeze(dim), step


class _Terms:
    """The scores as a sum of product terms, read at every score: for each product its element (-1: zero) and
    where −∞ was written."""

    def __init__(self):
        self.products: list = []
        self.elements: list = []   # per product: [scores] flat product index or -1
        self.scales: list = []     # per product: the number it is multiplied by on its way to the scores
        self.neg_inf = None


def _read_terms(assembly: set, products: list, scores: fx.Node, s_shape: tuple) -> _Terms:
    nodes = [n for n in scores.graph.nodes if n in assembly]
    p_shapes = [_example_shape(p) for p in products]
    if any(s is None for s in p_shapes):
        raise _NotABand
    t = _Terms()
    for p, p_shape in zip(products, p_shapes):
        # one numbered run per term (the random run below catches a constant that looks like a number)
        env = {q: (_numbered(s, _SHIFT) if q is p else torch.zeros(s, dtype=torch.float64))
               for q, s in zip(products, p_shapes)}
        run = _evaluate(nodes, env)[scores]
        if tuple(run.shape) != s_shape:
            raise _NotABand
        neg_inf = torch.isneginf(run)
        if t.neg_inf is None:
            t.neg_inf = neg_inf
        elif not torch.equal(t.neg_inf, neg_inf):
            raise _NotABand
        copied = (run > _SHIFT) & (run <= _SHIFT + _numel(p_shape))
        scale = 1.0
        if bool((~copied & ~neg_inf & (run != 0)).any()):  # scaled after the product? a second run says by what
            env[p] = _numbered(p_shape, 2 * _SHIFT)
            step = (_evaluate(nodes, env)[scores] - run).masked_fill(neg_inf, 0.0) / _SHIFT
            scale = float(step[step != 0][0]) if bool((step != 0).any()) else 0.0
            copied = (step != 0) & ~neg_inf
            if scale == 0.0 or not torch.allclose(step[copied], torch.full_like(step[copied], scale), rtol=1e-9) \
                    or bool((~copied & ~neg_inf & (run != 0)).any()):
                raise _NotABand  # a score the softmax sees holds a constant, or a sum of elements of one term
            run = torch.where(copied, run / scale, run)
        t.elements.append(torch.where(copied, (run - (_SHIFT + 1)).round(), -1.0).to(torch.int64))
        t.scales.append(scale)
    # the scores are the sum of those terms (the assembly is linear in the products), checked at random values
    g = torch.Generator().manual_seed(0)
    randoms = [torch.randn(s, dtype=torch.float64, generator=g) for s in p_shapes]
    got = _evaluate(nodes, dict(zip(products, randoms)))[scores]
    want = torch.zeros(s_shape, dtype=torch.float64)
    for r, index, scale in zip(randoms, t.elements, t.scales):
        want = want + scale * torch.where(index >= 0, r.reshape(-1)[index.clamp_min(0)], torch.zeros_like(want))
    want = want.masked_fill(t.neg_inf, float("-inf"))
    if not torch.equal(torch.isneginf(got), t.neg_inf) or not torch.allclose(got[~t.neg_inf], want[~t.neg_inf]):
        raise _NotABand
    t.products = list(products)
    return t


def _product_pairs(prod: "_Product") -> tuple:
    """For a product of two tensors contracting their features: per product element, the first source element of
    each side's row (-1: zeros), with each side's source, shape and feature step, and the feature width."""
    if any(op.ones for op in prod.operands):
        raise _NotABand
    sides = []
    for i, op in enumerate(prod.operands):
        rows, step = prod.rows(i, prod.c)
        sides.append((op.source, op.shape, step, rows))
    return sides[0], sides[1], prod.operand_size(prod.c)


def _mask_elements(prod: "_Product") -> tuple:
    """``ones @ m`` (either side) over a contraction of one: per product element the element of ``m`` it holds."""
    ones = [op.ones for op in prod.operands]
    if ones.count(True) != 1 or prod.operand_size(prod.c) != 1:
        raise _NotABand
    i = ones.index(False)
    elements, _ = prod.rows(i, prod.c)
    return prod.operands[i].source, prod.operands[i].shape, elements


def _read_scores(b: _Band, t: _Terms) -> None:
    """Query, key and mask views of a band, from the terms read at every score (see the module docstring)."""
    valid = ~t.neg_inf
    if not bool(valid.any(-1).all()):
        raise _NotABand  # a row of no key at all
    qk, masks = None, []
    for p, elements, scale in zip(t.products, t.elements, t.scales):
        if bool((elements[valid] < 0).any()):
            raise _NotABand  # a term missing from a score the softmax sees
        at = elements.clamp_min(0)
        if not _is_product(p):  # a term added as it is (gathered by index ops): its own elements
            if _example_shape(p) is None:
                raise _NotABand
            masks.append((p, _example_shape(p), elements, scale))
            continue
        prod = _Product(p)
        if not any(op.ones for op in prod.operands):
            if qk is not None:
                raise _NotABand  # two products of data: not one attention
            (qs, qshape, qstep, rows), (ks, kshape, kstep, cols), width = _product_pairs(prod)
            qk = (qs, qshape, qstep, rows.reshape(-1)[at], ks, kshape, kstep, cols.reshape(-1)[at], width)
            b.scale = scale
        else:
            ms, mshape, mel = _mask_elements(prod)
            masks.append((ms, mshape, mel.reshape(-1)[at], scale))
    if qk is None:
        raise _NotABand
    qs, qshape, qstep, q_at, ks, kshape, kstep, k_at, width = qk
    nrows = len(b.rows)
    q_fit = _affine(q_at.view(valid.shape), valid)
    k_fit = _affine(k_at.view(valid.shape), valid)
    if q_fit is None or k_fit is None:
        raise _NotABand
    if q_fit[1][-1] != 0:   # the keys on the left: ``k @ qᵀ`` read row-wise is the same product
        qs, qshape, qstep, q_fit, ks, kshape, kstep, k_fit = ks, kshape, kstep, k_fit, qs, qshape, qstep, q_fit
    if q_fit[1][-1] != 0:
        raise _NotABand  # every slot of a row reads the same query
    slot_step = k_fit[1][-1]
    token = [d for d in range(nrows) if b.rows[d] > 1 and k_fit[1][d] == slot_step and q_fit[1][d] != 0]
    if slot_step <= 0 or len(token) != 1:
        raise _NotABand
    a = b.token_dim = token[0]
    n = b.rows[a]
    # slot s of row i reads key i + s - left: at i = 0 the first slot the softmax sees is ``left``
    first_row = valid.select(a, 0).reshape(-1, b.slots)[0]
    left = int(first_row.nonzero()[0])
    i = torch.arange(n).view([n if d == a else 1 for d in range(nrows)] + [1])
    j = i + torch.arange(b.slots).view([1] * nrows + [b.slots]) - left
    if not torch.equal(((j >= 0) & (j < n)).expand(valid.shape), valid):
        raise _NotABand  # −∞ exactly on the keys past either end, nowhere else
    b.left, b.right = left, b.slots - 1 - left
    if b.right < 0:
        raise _NotABand
    q_steps, k_steps = q_fit[1][:nrows], k_fit[1][:nrows]
    b.q = _strided(qs, qshape, b.rows, a, q_fit[0], q_steps, [(width, qstep)])
    b.k = _strided(ks, kshape, b.rows, a, k_fit[0] + slot_step * left, k_steps, [(width, kstep)])
    for ms, mshape, m_at, scale in masks:
        fit = _affine(m_at.view(valid.shape), valid)
        if fit is None:
            raise _NotABand
        m0, steps = fit
        key_step = steps[-1]                         # m = m0 + Σ μ_d r_d + μ_s s, and s = j - i + left
        rows_steps = [st - key_step if d == a else st for d, st in enumerate(steps[:nrows])]
        b.masks.append((_strided(ms, mshape, b.rows, a, m0 + key_step * left, rows_steps, [(n, key_step)]), scale))


def _coords(shape_: tuple) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(d) for d in shape_], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], 1)


def _affine(values: torch.Tensor, where: torch.Tensor) -> Optional[tuple[int, list]]:
    """``(c0, steps)`` with ``values[i] == c0 + Σ_d i_d · steps[d]`` exactly (integers) at every index ``i`` of the
    grid where ``where`` holds, or None. Dims along which ``where`` never varies get step 0."""
    chosen = where.reshape(-1).nonzero().squeeze(1)
    if chosen.numel() == 0:
        return None
    k = min(chosen.numel(), 4096)
    pick = chosen[torch.arange(k) * (chosen.numel() - 1) // max(k - 1, 1)]
    coords = torch.stack(torch.unravel_index(pick, where.shape), 1)
    x = torch.cat([torch.ones(k, 1, dtype=torch.float64), coords.double()], 1)
    sol = torch.linalg.lstsq(x, values.reshape(-1)[pick].double().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    steps = [int(round(float(v))) for v in sol[1:]]
    for d in range(where.dim()):
        if int(where.movedim(d, 0).reshape(where.shape[d], -1).any(1).sum()) <= 1:
            steps[d] = 0
    c0 = int(values.reshape(-1)[pick[0]]) - sum(s * int(c) for s, c in zip(steps, coords[0]))
    pred = torch.full(where.shape, c0, dtype=torch.int64)
    for d, s in enumerate(steps):
        if s:
            pred += s * torch.arange(where.shape[d]).view([-1 if i == d else 1 for i in range(where.dim())])
    if bool(((pred != values) & where).any()):
        return None
    return c0, steps


def _strided(source: fx.Node, source_shape: tuple, rows: tuple, a: int, origin: int, row_steps: list,
             tail: list) -> tuple:
    """``(source, size, stride, offset)``: ``[other row dims..., n, *tail]`` as a strided view of the source's
    elements (row-major). A dim that never moves is given size 1 (it broadcasts)."""
    order = [d for d in range(len(rows)) if d != a] + [a]
    size = [rows[d] for d in order] + [w for w, _ in tail]
    stride = [row_steps[d] for d in order] + [s for _, s in tail]
    size = [sz if st != 0 else 1 for sz, st in zip(size, stride)]
    if origin < 0 or any(st < 0 for st in stride):
        raise _NotABand
    if origin + sum((sz - 1) * st for sz, st in zip(size, stride)) >= _numel(source_shape):
        raise _NotABand
    return source, tuple(size), tuple(stride), origin


def _value_side(b: _Band, sm: fx.Node) -> tuple[fx.Node, list]:
    """The value product the probabilities reach, and the ops between (casts, dropout, row fills, index ops)."""
    chain, node = [], sm
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise _NotABand  # the probabilities are used elsewhere
        u = users[0]
        if _is_product(u):
            return u, chain
        if _is_move(u) and u.args[0] is node:
            pass
        elif b.row_fills is not None and _is_row_fill(u, node):
            b.row_fills.append(u.args[1])
        elif u.args and u.args[0] is node and (
                (u.op == "call_method" and u.target in _CASTS) or op_kind(u) == "dropout"):
            b.after_softmax.append(u)
        else:
            raise _NotABand
        chain.append(u)
        node = u


def _is_row_fill(u: fx.Node, node: fx.Node) -> bool:
    """``p.masked_fill(cond, 0)`` with ``cond`` one value per query row (its last dim 1)."""
    if op_kind(u) != "masked_fill" or len(u.args) < 3 or u.args[0] is not node:
        return False
    cond, value = u.args[1], u.args[2]
    c_shape = _example_shape(cond)
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
            and c_shape is not None and len(c_shape) >= 1 and c_shape[-1] == 1)


def _read_values(b: _Band, product: fx.Node, chain: list, t: _Terms) -> None:
    """The value view and the output view of a band (see the module docstring)."""
    moves_from = next((i for i, n in enumerate(chain) if _is_move(n)), len(chain))
    if not all(_is_move(n) for n in chain[moves_from:]):
        raise _NotABand  # a cast or a fill between the index ops
    prod = _Product(product)
    probs_node = chain[moves_from - 1] if moves_from else b.softmax
    sides = [i for i, op in enumerate(prod.operands) if op.source is probs_node]
    if len(sides) != 1:
        raise _NotABand
    ip, iv = sides[0], 1 - sides[0]
    probs, values = prod.operands[ip], prod.operands[iv]
    features = [ch for ch in prod.out if ch in prod.letters[iv] and ch not in prod.letters[ip]]
    if probs.shape != b.rows + (b.slots,) or values.ones or len(features) != 1 or \
            bool(((probs.index < 0) & (probs.constant != 0)).any()):
        raise _NotABand
    f = features[0]
    keep = [ch for ch in prod.out if ch != f]                      # the product's rows: one per output row
    pa = prod.laid_out(probs.index, prod.letters[ip], keep + [prod.c])
    vb, v_step = prod.rows(iv, f, constants=True, want=keep + [prod.c])
    real = pa >= 0
    nrows, slots = len(b.rows), b.slots
    score_row = torch.where(real, pa // slots, -1)
    row_of = score_row.amax(-1)                                    # [keep...]: the score row each output row sums
    if bool((row_of < 0).any()) or bool((real & (score_row != row_of.unsqueeze(-1))).any()):
        raise _NotABand  # each output row sums the probabilities of one score row
    valid = ~t.neg_inf.reshape(-1)
    out_rows = row_of.reshape(-1)
    if int(torch.bincount(out_rows).max()) > 1:
        raise _NotABand  # two output rows of one score row
    seen = real & valid[pa.clamp_min(0)]
    hits = torch.zeros(valid.numel(), dtype=torch.int32).index_add_(0, pa[seen], torch.ones(1, dtype=torch.int32)
                                                                      .expand(int(seen.sum())))
    per_row = valid.view(-1, slots).sum(1)
    if bool((hits > 1).any()) or not torch.equal(seen.sum(-1).reshape(-1), per_row[out_rows]):
        raise _NotABand  # every slot the softmax sees, exactly once
    if bool((vb[seen] < 0).any()):
        raise _NotABand
    # the value row each seen score met, on the scores' grid: v = v0 + Σ_d ν_d r_d + ν_s s, where s = j - i + left
    met = torch.full((valid.numel(),), -1, dtype=torch.int64)
    met[pa[seen]] = vb[seen]
    a = b.token_dim
    fit = _affine(met.view(t.neg_inf.shape), met.view(t.neg_inf.shape) >= 0)
    if fit is None or fit[1][a] != fit[1][-1]:
        raise _NotABand  # a value row that moves with the query, not with the key
    v0, steps = fit
    width = prod.size(f)
    row_steps = [steps[-1] if d == a else steps[d] for d in range(nrows)]
    b.v = _strided(values.source, values.shape, b.rows, a, v0 + steps[-1] * b.left, row_steps, [(width, v_step)])
    _read_output(b, prod, keep, f, out_rows)


def _read_output(b: _Band, prod: _Product, keep: list, f: str, row_of: torch.Tensor) -> None:
    """The last index op after the value product, and its elements as a strided view of ``[rows..., features]``."""
    product = prod.node
    chain, node = [], product
    while len(node.users) == 1 and _is_move(next(iter(node.users))) and next(iter(node.users)).args[0] is node:
        node = next(iter(node.users))
        chain.append(node)
    out_shape = _example_shape(node)
    if out_shape is None:
        raise _NotABand
    runs = [_evaluate(chain, {product: _numbered(prod.out_shape, off)})[node] if chain else
            _numbered(prod.out_shape, off) for off in (0.0, _SHIFT)]
    index, _ = _decode(*runs)
    if bool((index < 0).any()):
        raise _NotABand
    pc = _coords(prod.out_shape)                                   # product element -> its row and feature
    keep_dims = [prod.out.index(ch) for ch in keep]
    row = torch.zeros(pc.shape[0], dtype=torch.int64)
    for d in keep_dims:
        row = row * prod.out_shape[d] + pc[:, d]
    width = prod.size(f)
    index = index.reshape(-1)
    logical = torch.cat([_coords(b.rows)[row_of[row[index]]], pc[:, prod.out.index(f)][index].unsqueeze(1)], 1)
    sizes = b.rows + (width,)
    layout = sorted(range(len(sizes)), key=lambda d: -_period(logical[:, d]))   # slowest-changing dim first
    flat = torch.zeros(logical.shape[0], dtype=torch.int64)
    for d in layout:
        flat = flat * sizes[d] + logical[:, d]
    fit = _affine(flat.view(out_shape), torch.ones(out_shape, dtype=torch.bool))
    if fit is None or fit[0] < 0 or any(s < 0 for s in fit[1]):
        raise _NotABand
    b.output = node
    b.output_view = (tuple(layout), out_shape, tuple(fit[1]), fit[0])
    b.region |= {product, *chain}


def _period(coord: torch.Tensor) -> int:
    """How many elements into the output's order ``coord`` first changes (its length when it never does)."""
    changed = (coord != coord[0]).nonzero()
    return int(changed[0]) if changed.numel() else coord.numel()


# --- writing ---------------------------------------------------------------------------------------------------

def _write_dense(graph: fx.Graph, b: _Band) -> None:
    at = b.output

    def call(target, *args, **kwargs) -> fx.Node:
        return insert_call(graph, at, target, args, kwargs, like=b.softmax)

    def view(spec: tuple) -> fx.Node:
        source, size, stride, offset = spec
        return call(strided_view, source, size, stride, offset)

    q, k = view(b.q), view(b.k)
    product = scores = call(MATMUL, q, call(torch.transpose, k, -2, -1))
    product.meta[BAND] = {"reach": (b.left, b.right), "flops": b.flops}
    if b.scale != 1.0:
        scores = call(torch.mul, scores, b.scale)
    for mask, factor in b.masks:
        term = view(mask)
        scores = call(torch.add, scores, term if factor == 1.0 else call(torch.mul, term, factor))
    scores = call(MASKED_FILL, scores, call(outside_band, q, k, b.left, b.right), float("-inf"))
    kwargs = dict(b.softmax.kwargs)
    kwargs["dim"] = len(b.rows)
    probs = call(SOFTMAX, scores, **kwargs)
    replaced = {b.softmax.args[0]: scores}
    for op in b.after_softmax:
        args = fx.node.map_arg(op.args[1:], lambda n: replaced.get(n, n))
        kw = fx.node.map_arg(op.kwargs, lambda n: replaced.get(n, n))
        new = (insert_call(graph, at, op.target, (probs, *args), kw, like=op, method=True) if op.op == "call_method"
               else call(op.target, probs, *args, **kw))
        probs = new
    out = call(MATMUL, probs, view(b.v))
    for cond in b.row_fills:
        out = call(rows_zeroed, out, cond, b.token_dim, len(b.rows))
    layout, size, stride, offset = b.output_view
    meta = meta_value(b.output)
    contiguous = isinstance(meta, torch.Tensor) and meta.is_contiguous()
    out = call(band_output, out, b.token_dim, layout, size, stride, offset, contiguous)
    b.output.replace_all_uses_with(out)
    _erase(graph, b.region)


def _erase(graph: fx.Graph, region: set) -> None:
    """Erase the replaced nodes (in-place writes into them too), latest first, each once nothing reads it; then
    what only they read (the operands' index ops, sizes)."""
    inputs = set()
    for n in reversed(list(graph.nodes)):
        if n in region and not n.users:
            inputs.update(n.all_input_nodes)
            graph.erase_node(n)
    remove_dead(graph, [n for n in inputs if n.graph is graph and n not in region])


# --- run time ----------------------------------------------------------------------------------------------------

def strided_view(x: torch.Tensor, size: tuple, stride: tuple, offset: int) -> torch.Tensor:
    """The elements of ``x`` (row-major) at ``offset + Σ index·stride``: a view when ``x`` is contiguous."""
    x = x.contiguous()
    return x.as_strided(size, stride, x.storage_offset() + offset)


def outside_band(q: torch.Tensor, k: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``[nq, nk]``: True where key ``j`` lies outside ``i - left <= j <= i + right`` of query ``i``."""
    i = torch.arange(q.shape[-2], device=q.device).view(-1, 1)
    j = torch.arange(k.shape[-2], device=q.device).view(1, -1)
    return (j < i - left) | (j > i + right)


def rows_zeroed(out: torch.Tensor, cond: torch.Tensor, token_dim: int, nrows: int) -> torch.Tensor:
    """``out`` ``[other rows..., n, d]`` with the rows ``cond`` (in the scores' layout, one value per row) set to 0."""
    c = cond.reshape(cond.shape[:-1])
    c = c.view((1,) * (nrows - c.dim()) + tuple(c.shape))
    return out.masked_fill(c.movedim(token_dim, -1).unsqueeze(-1), 0.0)


def band_output(out: torch.Tensor, token_dim: int, layout: tuple, size: tuple, stride: tuple, offset: int,
                contiguous: bool) -> torch.Tensor:
    """The original output: ``[rows..., features]`` (rows in the scores' order) laid out in ``layout``'s order,
    then a strided view of that."""
    rows = out.movedim(-2, token_dim).permute(layout).contiguous()
    view = rows.as_strided(size, stride, rows.storage_offset() + offset)
    return view.contiguous() if contiguous else view
