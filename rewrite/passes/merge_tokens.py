"""Block-level token merging (``MergeTokens``): prove from the graph that everything after a merge point is
token-wise, then rewrite the block so the MLP, the residual stream and every later layer run on fewer tokens.

Runs once per captured graph after every site is lowered and committed (``pipeline._block_level``):

1. **Merge points.** For each site whose action is block-level, the residual stream after its block: the
   first residual ``add`` after the site's output (attention output, projection, dropout, ``+ x``), or the layer
   norm right after it when that add feeds nothing else (post-norm, BERT). The attention itself ran on every
   token (its keys give the similarity); everything from the merge point on can run on fewer.
2. **The proof** walks every node downstream of the first merge point in graph order, tracking which dim of
   each value is the token dim (and the batch dim) and after how many merges. Allowed: elementwise ops (whose
   other operands do not vary over tokens), ``linear``/``matmul`` and norms over the features, views and
   permutes that keep the token dim identifiable (head splits; their token-count arguments are rewritten to the
   run-time count), later SDPA sites (their padding mask is merged with the tokens, plus ``log(size)`` on the
   keys), the rows a lowering fixes after SDPA, and later merge points. At the graph's outputs every merged
   value is unmerged (gathered back to the original tokens, so every output keeps its shape). Any other op on
   merged tokens is unmerged before it when no attention site or merge point depends on it (a pooler's
   ``x[:, 0]``, a mean over tokens); otherwise the action is declined, naming the node (a position-dependent
   bias or rotary table, a causal or per-query mask, a convolution over tokens, an attention left eager...).
3. **The rewrite** inserts :class:`~rewrite.mixers.merge_tokens.TokenMerger` modules at the merge points and the
   mask, row, view and unmerge fixes above; then the whole graph is run against the graph as it was on the
   example batch and on the example with its masks redrawn: outputs must keep their shapes and stay finite
   where the original is (else the graph is restored and the action declined); the error is reported.

Example::

    outcomes = merge_tokens(gm, example_inputs, [MergeRequest(site.key, MergeTokens(r=16), output_node)], is_state)
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ..graph import hint_int, input_cone, meta_value, owner_path, rank, shape, static_int, with_descendants
from ..mixers._masks import plan_mask
from ..mixers.merge_tokens import (TokenMerger, first_row, merged_count, proportional_mask, unmerge_tokens)
from ..sites import MASKED_BELOW
from .adversarial import redraw_inputs
from .lower import ROW_FIXES
from .normalize import SDPA as _SDPA_FUNCTION, op_kind
from .verify import record, relative_error

#: the fused attention calls a lowering leaves (torch level and ATen)
SDPA = {_SDPA_FUNCTION, torch.ops.aten.scaled_dot_product_attention.default}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "truediv", "floordiv", "neg", "pos", "abs", "exp", "log", "log1p", "expm1", "sqrt",
    "rsqrt", "pow", "tanh", "sigmoid", "relu", "relu6", "gelu", "silu", "mish", "softplus", "elu", "selu", "celu",
    "leaky_relu", "hardtanh", "hardswish", "hardsigmoid", "erf", "erfc", "sin", "cos", "clamp", "clamp_min",
    "clamp_max", "where", "masked_fill", "maximum", "minimum", "dropout", "alpha_dropout", "feature_alpha_dropout",
    "to", "float", "half", "bfloat16", "double", "contiguous", "clone", "detach", "reciprocal", "square", "sign",
    "lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not", "and_", "or_", "xor", "invert",
    "expand_as", "add_", "sub_", "mul_", "div_", "iadd", "isub", "imul", "itruediv", "relu_", "gelu_", "tanh_",
    "quick_gelu", "_to_copy", "alias", "lift_fresh_copy",
}
_FEATURE_OPS = {"linear", "layer_norm", "rms_norm", "softmax", "log_softmax", "normalize", "matmul"}
_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "expand"}
_SIZED_VIEWS = {"view", "reshape", "_unsafe_view", "expand"}
_SPLITS = {"split", "chunk", "tensor_split", "unbind", "split_with_sizes"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var"}
_FREE_READS = {"dim", "ndim", "dtype", "device", "is_floating_point", "new_zeros", "new_ones", "new_empty",
               "new_full", "new_tensor"}


class Declined(Exception):
    """The graph cannot take the merge; the message says why (it goes to the report)."""


@dataclasses.dataclass
class MergeRequest:
    """A site whose action is block-level: its key, its action, and its lowered output node (SDPA or row fix)."""
    key: tuple
    action: Any
    output: fx.Node


@dataclasses.dataclass
class MergeOutcome:
    """What happened to one request: merged (``ok``) with the error at the outputs, or declined with ``note``."""
    key: tuple
    ok: bool
    note: str = ""
    error: Optional[float] = None
    tokens: list = dataclasses.field(default_factory=list)   # tokens after each merge, on the example
    attended: Optional[int] = None   # tokens this site's own attention runs on (merged by the sites before it)


@dataclasses.dataclass
class Track:
    """A value over merged tokens: after ``level`` merges, with its token dim (and batch dim, where known)."""
    level: int
    tdim: int
    bdim: Optional[int]


@dataclasses.dataclass
class _Merge:
    request: MergeRequest
    sdpa: fx.Node
    point: fx.Node
    level: int = 0


@dataclasses.dataclass
class _Plan:
    """What the proof decided, as edits for the rewrite (all refer to nodes of the graph as it was)."""
    merges: list
    track: dict = dataclasses.field(default_factory=dict)
    sites: list = dataclasses.field(default_factory=list)           # (sdpa node, q level, kv level)
    row_fixes: list = dataclasses.field(default_factory=list)       # (node, arg index, level)
    views: list = dataclasses.field(default_factory=list)           # (node, size position, input, input token dim)
    unmerge_before: list = dataclasses.field(default_factory=list)  # (node, input)
    outputs: list = dataclasses.field(default_factory=list)         # output leaves that are merged


def merge_tokens(gm: fx.GraphModule, inputs: list, requests: list, is_state: Callable) -> list:
    """Prove, rewrite and verify the requests together; one :class:`MergeOutcome` per request, in order.

    When the graph after the first merge point cannot take the merge (a convolution over tokens in an early
    layer), the earliest merges are dropped one by one (declined with that reason) and the later ones tried."""
    outcomes: dict = {}
    merges = []
    for r in requests:
        try:
            merges.append(_find_merge(r))
        except Declined as why:
            outcomes[r.key] = MergeOutcome(r.key, False, str(why))
    order = _position(gm)
    merges.sort(key=lambda m: order[m.point])
    before, plan = None, None
    if merges:
        masks = _sdpa_masks(gm)
        before = _run_both(gm, inputs, redraw_inputs(gm, masks, inputs, is_state), masks)
        plan = _prove_some(gm, merges, before[3], outcomes)
    if plan is not None:
        _rewrite(gm, inputs, plan, before, outcomes)
    return [outcomes[r.key] for r in requests]


def _prove_some(gm: fx.GraphModule, merges: list, mask_values: dict, outcomes: dict) -> Optional[_Plan]:
    """The plan for the longest suffix of ``merges`` the graph can take; the merges left out are declined."""
    first_why = ""
    for start in range(len(merges)):
        kept = merges[start:]
        for level, m in enumerate(kept, start=1):
            m.level = level
        try:
            plan = _prove(gm, kept, mask_values)
        except Declined as why:
            first_why = first_why or str(why)
            continue
        for m in merges[:start]:
            outcomes[m.request.key] = MergeOutcome(m.request.key, False, first_why)
        return plan
    for m in merges:
        outcomes[m.request.key] = MergeOutcome(m.request.key, False, first_why)
    return None


def _rewrite(gm: fx.GraphModule, inputs: list, plan: _Plan, before: tuple, outcomes: dict) -> None:
    """Apply the plan and compare the outputs with ``before``; on any failure restore the graph (declined)."""
    tokens = _token_counts(plan.merges)
    backup = copy.deepcopy(gm.graph)
    added: list = []
    try:
        _apply(gm, plan, added)
        error = _compare(before, _run_both(gm, inputs, before[1]))
    except Exception as err:  # noqa: BLE001 - any failure restores the graph as it was, and says why
        gm.graph = backup
        for name in added:
            delattr(gm, name)
        gm.recompile()
        why = str(err) if isinstance(err, Declined) else f"the merged graph failed to run ({type(err).__name__}: {err})"
        for m in plan.merges:
            outcomes[m.request.key] = MergeOutcome(m.request.key, False, why)
        return
    note = "tokens after each merge on the example: " + " -> ".join(str(t) for t in tokens)
    for m in plan.merges:
        n_in, n_out = tokens[m.level - 1], tokens[m.level]
        outcomes[m.request.key] = MergeOutcome(m.request.key, True, f"attends over {n_in} tokens, merges "
                                               f"{n_in - n_out} after its block; {note}", error, tokens, n_in)


# --- merge points -------------------------------------------------------------------------------------

def _find_merge(request: MergeRequest) -> _Merge:
    sdpa = request.output
    while sdpa.op == "call_function" and sdpa.target in ROW_FIXES:
        sdpa = sdpa.args[0]
    if not (sdpa.op == "call_function" and sdpa.target in SDPA):
        raise Declined("its attention is not lowered to scaled_dot_product_attention, so its keys cannot be "
                       "read for the similarity")
    return _Merge(request, sdpa, _residual_point(request.output))


def _residual_point(start: fx.Node) -> fx.Node:
    """The residual stream after the block of the attention whose output is ``start`` (see the module doc): the
    first add, in graph order, of a value computed from ``start`` and a [batch, tokens, features] value that is not."""
    after = set(with_descendants(start))
    node = start.next
    while node.op != "output":
        others = [a for a in node.all_input_nodes if a not in after]
        if (node in after and _name(node) in ("add", "iadd") and len(node.all_input_nodes) == 2 and len(others) == 1
                and rank(node) == 3 and rank(others[0]) == 3):
            users = list(node.users)
            if len(users) == 1 and _name(users[0]) in ("layer_norm", "rms_norm") and users[0].args[0] is node:
                return users[0]  # post-norm: the normalised sum is the residual stream
            return node
        node = node.next
    raise Declined("no residual add (x + attention(x)) of shape [batch, tokens, features] follows the site's "
                   "output, so the block's residual stream to merge is not known")


def _token_counts(merges: list) -> list:
    n = hint_int(shape(merges[0].point)[1])
    counts = [n]
    for m in merges:
        counts.append(counts[-1] - merged_count(m.request.action.r, counts[-1], m.request.action.protect_first))
    return counts


# --- the proof ------------------------------------------------------------------------------------------

def _prove(gm: fx.GraphModule, merges: list, mask_values: dict) -> _Plan:
    plan = _Plan(merges)
    points = {m.point: m for m in merges}
    sensitive, _ = input_cone([n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]
                              + list(points))
    for node in gm.graph.nodes:
        if node.op == "output":
            plan.outputs = list(dict.fromkeys(leaf for leaf in _leaves(node.args) if leaf in plan.track))
            for leaf in plan.outputs:
                if plan.track[leaf].bdim is None:
                    raise Declined(f"the output {_where(leaf)} holds merged tokens without an identifiable batch dim, "
                                   "so they cannot be unmerged")
            continue
        tracked = [a for a in node.all_input_nodes if a in plan.track]
        if node in points:
            _merge_point(plan, points[node], node, tracked)
            continue
        if not tracked:
            continue
        result, why = _visit(plan, node, mask_values)
        if result is not None:
            if isinstance(result, Track):
                plan.track[node] = result
            continue
        if node in sensitive:
            raise Declined(f"{why or 'an op that is not token-wise'} at {_where(node)}, and a later attention site "
                           "or merge depends on it")
        plan.unmerge_before.append(node)  # the op sees every original token: exactly its own semantics
    return plan


def _merge_point(plan: _Plan, m: _Merge, node: fx.Node, tracked: list) -> None:
    s = shape(node)
    if s is None or len(s) != 3:
        raise Declined(f"the residual stream at {_where(node)} is not [batch, tokens, features]")
    if m.level > 1:
        result, why = _visit(plan, node, {})
        if not isinstance(result, Track) or result.level != m.level - 1 or (result.tdim, result.bdim) != (1, 0):
            raise Declined(f"the residual stream at {_where(node)} does not follow the previous merge "
                           f"({why or 'not the same tokens'})")
        if plan.track.get(m.sdpa, None) is None:
            raise Declined("the site's own attention is not over the tokens merged before it")
    elif tracked:
        raise Declined(f"the residual stream at {_where(node)} is merged before its own site")
    keys = shape(_sdpa_arg(m.sdpa, "key"))
    if keys is None or len(keys) != 4 or hint_int(keys[-2]) != hint_int(s[1]):
        raise Declined("the site's keys [batch, heads, tokens, dim] are not over the tokens of its residual stream")
    plan.track[node] = Track(m.level, 1, 0)


def _visit(plan: _Plan, node: fx.Node, mask_values: dict) -> tuple:
    """``(Track, "")`` for a token-wise op, ``(True, "")`` for one whose result carries no tokens, or
    ``(None, why)``."""
    name = _name(node)
    if node.op == "call_function" and node.target in SDPA:
        return _visit_sdpa(plan, node, mask_values)
    if node.op == "call_function" and node.target in ROW_FIXES:
        return _visit_row_fix(plan, node)
    if name in ("size", "sym_size", "getattr", "numel") or name in _FREE_READS:
        return _visit_read(plan, node, name)
    if name in _ELEMENTWISE:
        return _broadcast(plan, node, [node.args[0]] if name == "type_as" else None)
    if name in _FEATURE_OPS:
        return _visit_feature(plan, node, name)
    if name in _VIEWS or name == "permute":
        return _visit_view(plan, node, name)
    if name == "getitem":
        return _visit_getitem(plan, node)
    if name in _SPLITS:
        return _visit_split(plan, node, name)
    if name in _REDUCTIONS:
        return _visit_reduction(plan, node)
    if name in ("cat", "concat", "stack"):
        return _visit_cat(plan, node, name)
    return None, f"`{name}` is not known to keep tokens apart"


def _broadcast(plan: _Plan, node: fx.Node, operands: Optional[list] = None) -> tuple:
    """An elementwise op: every merged operand agrees, no other operand varies over the token dim."""
    out_rank = rank(node)
    if out_rank is None:
        return None, "a value of unknown shape"
    result, sides = None, []
    for a in operands if operands is not None else _tensor_inputs(node):
        offset = out_rank - (rank(a) or 0)
        t = plan.track.get(a)
        if t is None:
            sides.append((a, offset))
            continue
        here = Track(t.level, t.tdim + offset, None if t.bdim is None else t.bdim + offset)
        if result is not None and (result.level, result.tdim) != (here.level, here.tdim):
            return None, "it combines tokens merged at different layers or in different layouts"
        result = here if result is None or result.bdim is not None else result
    if result is None:
        return True, ""  # only the dtype of a merged operand is read (type_as)
    for a, offset in sides:
        s, pos = shape(a), result.tdim - offset
        if s is not None and 0 <= pos < len(s) and static_int(s[pos]) != 1:
            return None, (f"it combines merged tokens with `{a.name}` {tuple(s)}, which has a value per original "
                          "token (a position-dependent tensor: position bias, rotary table, per-token mask)")
    return result, ""


def _visit_feature(plan: _Plan, node: fx.Node, name: str) -> tuple:
    """linear / norms / softmax / matmul over the feature (last) dims."""
    x = node.args[0]
    t = plan.track.get(x)
    r = rank(x)
    others = [a for a in _tensor_inputs(node) if a is not x]
    if t is None or r is None or any(a in plan.track for a in others):
        return None, ("a product whose rows are not the merged tokens alone (an attention left as it was, or "
                      "a token-mixing matrix)")
    if name in ("layer_norm", "rms_norm"):
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        last = len(normalized) if isinstance(normalized, (list, tuple)) else 1
    elif name in ("softmax", "log_softmax", "normalize"):
        dim = _arg(node, 1, "dim", 1 if name == "normalize" else None)
        if not isinstance(dim, int) or dim % r in (t.tdim, t.bdim):
            return None, f"`{name}` over the token dim"
        return t, ""
    else:
        last = 1
        if name == "matmul" and others and (rank(others[0]) or 0) > 2:
            return _broadcast(plan, node)  # batched weights: they must not vary over tokens either
    if t.tdim >= r - last or (t.bdim is not None and t.bdim >= r - last):
        return None, f"`{name}` over the token dim"
    offset = (rank(node) or r) - r
    return Track(t.level, t.tdim + offset, None if t.bdim is None else t.bdim + offset), ""


def _visit_view(plan: _Plan, node: fx.Node, name: str) -> tuple:
    x = node.args[0]
    t = plan.track.get(x)
    if t is None:
        return None, "a view of merged tokens through another operand"
    if name == "permute":
        perm = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
        perm = [p % len(perm) for p in perm]
        return Track(t.level, perm.index(t.tdim), None if t.bdim is None else perm.index(t.bdim)), ""
    before, after = shape(x), shape(node)
    if before is None or after is None:
        return None, "a view of unknown shape"
    if name == "expand":
        offset = len(after) - len(before)
        tdim, bdim = t.tdim + offset, None if t.bdim is None else t.bdim + offset
    else:
        tdim, bdim = _map_dim(before, t.tdim, after), _map_dim(before, t.bdim, after)
    if tdim is None:
        return None, f"a view that merges or splits the token dim ({tuple(before)} -> {tuple(after)})"
    if name in _SIZED_VIEWS:
        plan.views.append((node, tdim, x, t.tdim))
    return Track(t.level, tdim, bdim), ""


def _map_dim(before: tuple, dim: Optional[int], after: tuple) -> Optional[int]:
    """Where dim ``dim`` of a tensor of shape ``before`` is in its view of shape ``after`` (same size, same
    number of elements before it), or None."""
    if dim is None:
        return None
    sizes_before, sizes_after = [hint_int(s) for s in before], [hint_int(s) for s in after]
    if None in sizes_before or None in sizes_after:
        return None
    prefix, size = _prod(sizes_before[:dim]), sizes_before[dim]
    for j, s in enumerate(sizes_after):
        if s == size and _prod(sizes_after[:j]) == prefix:
            return j
    return None


def _visit_getitem(plan: _Plan, node: fx.Node) -> tuple:
    src, index = node.args
    t = plan.track.get(src)
    if t is None:
        return None, "an index taken with merged tokens"
    if not isinstance(meta_value(src), torch.Tensor):
        return plan.track[src], ""  # an element of a split's tuple: the split kept the token dim
    index = index if isinstance(index, tuple) else (index,)
    r = rank(src) or 0
    if any(isinstance(i, fx.Node) or isinstance(i, torch.Tensor) for i in index):
        return None, "indexing the tokens with a tensor"
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    dims: dict = {}
    pos_in, pos_out = 0, 0
    for i in index:
        if i is Ellipsis:
            for _ in range(r - explicit):
                dims[pos_in], pos_in, pos_out = pos_out, pos_in + 1, pos_out + 1
        elif i is None:
            pos_out += 1
        elif isinstance(i, slice):
            if i != slice(None) and pos_in in (t.tdim, t.bdim):
                return None, "slicing the token or batch dim"
            dims[pos_in], pos_in, pos_out = pos_out, pos_in + 1, pos_out + 1
        else:
            if pos_in in (t.tdim, t.bdim):
                return None, "indexing the token or batch dim (e.g. x[:, 0])"
            pos_in += 1
    for d in range(pos_in, r):
        dims[d], pos_out = pos_out, pos_out + 1
    return Track(t.level, dims[t.tdim], dims.get(t.bdim) if t.bdim is not None else None), ""


def _visit_split(plan: _Plan, node: fx.Node, name: str) -> tuple:
    x = node.args[0]
    t = plan.track.get(x)
    r = rank(x)
    if t is None or r is None:
        return None, "a split through another operand"
    dim = _arg(node, 2 if name in ("split", "chunk", "tensor_split", "split_with_sizes") else 1, "dim", 0)
    if not isinstance(dim, int) or dim % r in (t.tdim, t.bdim):
        return None, "a split of the token or batch dim"
    dim %= r
    if name == "unbind":
        return Track(t.level, t.tdim - (dim < t.tdim), None if t.bdim is None else t.bdim - (dim < t.bdim)), ""
    return t, ""


def _visit_reduction(plan: _Plan, node: fx.Node) -> tuple:
    x = node.args[0]
    t, r = plan.track.get(x), rank(x)
    dims = _arg(node, 1, "dim", None)
    if t is None or r is None or dims is None:
        return None, "a reduction over every dim (the tokens included)"
    dims = [d % r for d in (dims if isinstance(dims, (list, tuple)) else [dims]) if isinstance(d, int)]
    if t.tdim in dims or t.bdim in dims:
        return None, "a reduction over the tokens (a pooling: it runs on the unmerged tokens)"
    if _arg(node, 2, "keepdim", False):
        return t, ""
    return Track(t.level, t.tdim - sum(d < t.tdim for d in dims),
                 None if t.bdim is None else t.bdim - sum(d < t.bdim for d in dims)), ""


def _visit_cat(plan: _Plan, node: fx.Node, name: str) -> tuple:
    parts = node.args[0]
    if not isinstance(parts, (list, tuple)) or not all(p in plan.track for p in parts):
        return None, "it joins merged tokens with other tokens"
    first = plan.track[parts[0]]
    if any((plan.track[p].level, plan.track[p].tdim) != (first.level, first.tdim) for p in parts):
        return None, "it joins tokens merged at different layers"
    r = rank(parts[0]) or 0
    dim = _arg(node, 1, "dim", 0) % (r + (name == "stack"))
    if name != "stack":
        return (first, "") if dim not in (first.tdim, first.bdim) else (None, "a concatenation over the tokens")
    return Track(first.level, first.tdim + (dim <= first.tdim),
                 None if first.bdim is None else first.bdim + (dim <= first.bdim)), ""


def _visit_read(plan: _Plan, node: fx.Node, name: str) -> tuple:
    """A read of shape, dtype or device: fine unless the token count flows somewhere but a rewritten view."""
    x = node.args[0]
    t = plan.track.get(x)
    if name in _FREE_READS or t is None:
        return True, ""
    if name == "getattr" and node.args[1] not in ("shape",):
        return True, ""
    dim = _arg(node, 1, "dim", None) if name in ("size", "sym_size") else None
    if isinstance(dim, int) and dim % (rank(x) or 1) != t.tdim:
        return True, ""
    if name != "numel" and _feeds_views_only(plan, node, t.tdim if dim is None else None):
        return True, ""
    return None, "the number of merged tokens is read for something other than a view of them"


def _feeds_views_only(plan: _Plan, node: fx.Node, tdim: Optional[int], depth: int = 0) -> bool:
    for user in node.users:
        uname = _name(user)
        if uname in _SIZED_VIEWS and user.args and user.args[0] in plan.track:
            continue
        if uname == "getitem" and tdim is not None and isinstance(user.args[1], int) and user.args[1] != tdim:
            continue
        if uname == "getitem" and depth < 2 and _feeds_views_only(plan, user, None if isinstance(user.args[1], int)
                                                                   else tdim, depth + 1):
            continue
        return False
    return True


def _visit_sdpa(plan: _Plan, node: fx.Node, mask_values: dict) -> tuple:
    """A later attention site: its queries and/or keys are merged tokens; its mask must be a padding mask."""
    q, k, v, mask = (_sdpa_arg(node, a) for a in ("query", "key", "value", "attn_mask"))
    tq, tk, tv = plan.track.get(q), plan.track.get(k), plan.track.get(v)
    if (tk is None) != (tv is None) or (tk is not None and tk.level != tv.level):
        return None, "an attention whose keys and values are not merged alike"
    if _sdpa_arg(node, "is_causal"):
        return None, "a causal attention (merging would mix past and future tokens)"
    if tq is not None and tk is not None and tq.level != tk.level:
        return None, "an attention between tokens merged at different layers"
    for t, x in ((tq, q), (tk, k)):
        if t is not None and (rank(x) != 4 or (t.tdim, t.bdim) != (2, 0)):
            return None, "an attention whose layout is not [batch, heads, tokens, dim]"
    if isinstance(mask, fx.Node) and mask in plan.track:
        return None, "an attention mask computed from the merged tokens"
    problem = _mask_problem(mask_values.get(mask), keys_merged=tk is not None)
    if problem:
        return None, problem
    plan.sites.append((node, tq.level if tq else 0, tk.level if tk else 0))
    return (Track(tq.level, 2, 0) if tq is not None else True), ""


def _mask_problem(values: Optional[list], keys_merged: bool) -> str:
    """Why a mask (its values on the example and the redrawn batch) cannot follow merged tokens, or ""."""
    for value in values or ():
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        plan = plan_mask(value, False, value.shape[-2], value.shape[-1])
        if plan.kind not in ("none", "keys"):
            return ("an attention mask that varies over queries (causal, windowed or a relative position bias): a "
                    "merged token has no single position")
        bias = plan.key_bias
        if keys_merged and bias is not None and not bool(((bias == 0) | (bias <= MASKED_BELOW)).all()):
            return "a per-key bias on the scores that is not a padding mask (values other than 0 and masked)"
    return ""


def _visit_row_fix(plan: _Plan, node: fx.Node) -> tuple:
    out = node.args[0]
    t = plan.track.get(out)
    if t is None:
        return None, "a row fix of an attention over other tokens"
    for i, a in enumerate(node.args[1:], start=1):
        if isinstance(a, fx.Node) and a not in plan.track and shape(a) is not None and len(shape(a)) >= 2 \
                and static_int(shape(a)[-2]) != 1:
            plan.row_fixes.append((node, i, t.level))
    return t, ""


# --- the rewrite ----------------------------------------------------------------------------------------

def _apply(gm: fx.GraphModule, plan: _Plan, added: list) -> None:
    """Insert the mergers and every fix the proof listed, in graph order (so each finds its state defined)."""
    graph = gm.graph
    order = _position(gm)
    events = [(order[m.point], 1, "merge", m) for m in plan.merges]
    events += [(order[n], 0, "site", (n, lq, lk)) for n, lq, lk in plan.sites]
    events += [(order[n], 0, "row", (n, i, level)) for n, i, level in plan.row_fixes]
    events += [(order[n], 0, "view", view) for view in plan.views for n in [view[0]]]
    events += [(order[n], 0, "unmerge", n) for n in plan.unmerge_before]
    events.sort(key=lambda e: (e[0], e[1]))
    states: dict = {0: (None, None, None, None)}
    current: dict = {}    # node as the proof saw it -> the node that now holds its value (a merge point's merge)
    unmerged: dict = {}   # node -> its value unmerged (one gather serves a pooler and an output alike)
    for _, _, kind, item in events:
        if kind == "merge":
            states[item.level] = _insert_merger(gm, item, states[item.level - 1], current, added)
        elif kind == "site":
            _adjust_site(graph, *item, states)
        elif kind == "row":
            node, i, level = item
            fixed = _call(graph, node, first_row, (node.args[i],))
            node.update_arg(i, fixed)
        elif kind == "view":
            _resize_view(graph, *item, current)
        else:
            _unmerge_inputs(graph, item, plan, states, current, unmerged)
    output = next(n for n in graph.nodes if n.op == "output")
    for leaf in plan.outputs:
        live = current.get(leaf, leaf)
        restored = _unmerged(graph, output, live, plan.track[leaf], states, unmerged)
        output.args = fx.node.map_arg(output.args, lambda n, live=live, new=restored: new if n is live else n)
    graph.lint()
    gm.recompile()


def _insert_merger(gm: fx.GraphModule, m: _Merge, state: tuple, current: dict, added: list) -> tuple:
    graph, point = gm.graph, m.point
    name = f"rewrite_merge_tokens_{m.level}"
    while hasattr(gm, name):
        name += "_"
    action = m.request.action
    gm.add_submodule(name, TokenMerger(action.r, action.protect_first, action.metric, action.window))
    added.append(name)
    keys = _sdpa_arg(m.sdpa, "key")
    mask = _sdpa_arg(m.sdpa, "attn_mask") if m.level == 1 else None  # later merges carry visibility themselves
    with graph.inserting_after(point):
        call = graph.call_module(name, (point, keys, mask, *state))
    call.meta["rewrite_site"] = m.request.key
    for key in ("nn_module_stack", "stack_trace"):
        if key in point.meta:
            call.meta[key] = point.meta[key]
    parts = []
    for i in range(5):
        with graph.inserting_after(parts[-1] if parts else call):
            parts.append(graph.call_function(operator.getitem, (call, i)))
    point.replace_all_uses_with(parts[0], delete_user_cb=lambda user: user is not call)
    current[point] = parts[0]
    return tuple(parts[1:])


def _adjust_site(graph: fx.Graph, node: fx.Node, q_level: int, kv_level: int, states: dict) -> None:
    mask = _sdpa_arg(node, "attn_mask")
    level = kv_level or q_level
    size, _, rep, _ = states[level]
    new = _call(graph, node, proportional_mask, (mask, size, rep, _sdpa_arg(node, "query")), {"keys": bool(kv_level)})
    if len(node.args) > 3:
        node.update_arg(3, new)
    else:
        node.update_kwarg("attn_mask", new)


def _resize_view(graph: fx.Graph, node: fx.Node, position: int, x: fx.Node, tdim: int, current: dict) -> None:
    """The view's token-count argument becomes the run-time count of its input (a captured constant or the
    original length would not fit the merged tokens)."""
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        sizes, packed = list(node.args[1]), True
    elif "size" in node.kwargs or "shape" in node.kwargs:
        return  # keyword sizes: left as they are (the rewritten graph is run and checked)
    else:
        sizes, packed = list(node.args[1:]), False
    if len(sizes) != rank(node) or position >= len(sizes) or sizes[position] == -1:
        return
    size = _call(graph, node, torch.Tensor.size, (current.get(x, x), tdim))
    sizes[position] = size
    node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)


def _unmerge_inputs(graph: fx.Graph, node: fx.Node, plan: _Plan, states: dict, current: dict, unmerged: dict) -> None:
    original = {new: old for old, new in current.items()}
    for a in list(dict.fromkeys(node.all_input_nodes)):
        t = plan.track.get(original.get(a, a))
        if t is None:
            continue
        if t.bdim is None:
            raise Declined(f"{_where(node)} needs the original tokens back, but its input has no identifiable "
                           "batch dim")
        node.replace_input_with(a, _unmerged(graph, node, a, t, states, unmerged))


def _unmerged(graph: fx.Graph, before: fx.Node, live: fx.Node, t: Track, states: dict, unmerged: dict) -> fx.Node:
    if live not in unmerged:
        unmerged[live] = _call(graph, before, unmerge_tokens, (live, states[t.level][1], t.tdim, t.bdim))
    return unmerged[live]


# --- verification ---------------------------------------------------------------------------------------

def _run_both(gm: fx.GraphModule, inputs: list, redrawn: Optional[list], wanted: list = ()) -> tuple:
    """``(outputs on the example, the redrawn batch or None, outputs on it, {node in wanted: [its values]})``:
    the example batch and the example with its masks redrawn (``passes/adversarial.py``)."""
    outputs: list = []
    values = record(gm, inputs, set(wanted), outputs=outputs)
    found = {n: [values.get(n)] for n in wanted}
    other: list = []
    if redrawn is not None:
        try:
            values = record(gm, redrawn, set(wanted), outputs=other)
        except Exception:  # noqa: BLE001 - judged on the example alone (as the pipeline's own verification is)
            redrawn, other, values = None, [], {}
        for n in wanted:
            found[n].append(values.get(n))
    return outputs, redrawn, other, found


def _compare(before: tuple, after: tuple) -> float:
    """The largest relative error of a floating output; raises Declined on a changed shape or a new NaN."""
    worst = 0.0
    for which, ref, out in (("example", before[0], after[0]), ("redrawn masks", before[2], after[2])):
        if len(ref) != len(out):
            raise Declined(f"the merged graph returns {len(out)} outputs instead of {len(ref)}")
        for i, (a, b) in enumerate(zip(ref, out)):
            if not isinstance(a, torch.Tensor):
                continue
            if not isinstance(b, torch.Tensor) or a.shape != b.shape:
                raise Declined(f"output {i} changed shape ({tuple(a.shape)} -> {tuple(getattr(b, 'shape', ()))})")
            if a.is_floating_point():
                err = relative_error(a, b)
                if err == float("inf"):
                    raise Declined(f"output {i} is not finite where the original is, on the {which} batch")
                worst = max(worst, err)
    return worst


# --- small helpers --------------------------------------------------------------------------------------

def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return node.op
    kind = op_kind(node)
    if kind in ("mul", "div", "add", "sub", "matmul", "softmax", "where", "masked_fill", "dropout"):
        return kind
    if kind in ("permute", "transpose", "transpose_attr"):
        return "permute" if kind == "permute" else "transpose"
    target = node.target
    return str(getattr(target, "_opname", None) or getattr(target, "__name__", target))


def _sdpa_arg(node: fx.Node, name: str) -> Any:
    i = _SDPA_ARGS.index(name)
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, {"is_causal": False, "enable_gqa": False, "dropout_p": 0.0}.get(name))


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tensor_inputs(node: fx.Node) -> list:
    return [a for a in node.all_input_nodes if isinstance(meta_value(a), torch.Tensor)]


def _leaves(args: Any) -> list:
    out: list = []
    fx.node.map_arg(args, lambda n: out.append(n))
    return out


def _sdpa_masks(gm: fx.GraphModule) -> list:
    return [m for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA
            for m in [_sdpa_arg(n, "attn_mask")] if isinstance(m, fx.Node)]


def _position(gm: fx.GraphModule) -> dict:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _prod(xs: list) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _call(graph: fx.Graph, before: fx.Node, target, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """Insert ``target(*args)`` before ``before`` (no shape inference: the values change with the merge)."""
    with graph.inserting_before(before):
        node = graph.call_function(target, tuple(args), kwargs or {})
    for key in ("nn_module_stack", "stack_trace"):
        if key in before.meta:
            node.meta[key] = before.meta[key]
    return node


def _where(node: fx.Node) -> str:
    owner = owner_path(node)
    return f"`{node.name}`" + (f" in {owner}" if owner else "")
