"""Find attention sites in a canonical graph (run ``normalize`` first).

A site is ``softmax(f(q @ kt)) @ v`` where ``f`` is a chain of scalar scales (``mul``/``div``), additive
terms (masks, biases) and fills (``masked_fill``/``where``), possibly with dtype casts, and between the
softmax and the value product only casts and dropout. Every check that fails is reported in words; a
softmax that is not attention-like (no product on either side) is not reported at all.

The score chain is kept as an ordered list of operations, outermost last, so that lowering can rebuild
``scores = alpha * (q @ kt) + beta`` exactly whatever order the model applied them in.

General rules of the canonical form, each exact (issue 15, "every spelling in the wild"):

* liveness: users whose results go nowhere, read only a shape, build other softmaxes' scores, or hand a
  detached copy of the scores to the caller do not block a site;
* the row maximum subtracted before the softmax (its stabiliser) changes no probability;
* score columns concatenated to the scores whose probabilities are dropped after the softmax are extra keys
  with zero values (attention sinks);
* a second score product added to the scores is more features of q and k (two streams);
* reshapes of the probabilities that compose to the identity are the identity;
* ``v @ pᵀ`` is ``(p @ vᵀ)ᵀ`` (values on the left, channels first); several value products reading one softmax
  are one product over the values side by side.
* a soft-cap ``c * tanh(·)`` (Gemma 2, see ``softcap.py``) between the scales and the masks is recorded on
  the site, and only a target that takes ``softcap`` serves it.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import sys
from typing import Any, Optional

import torch
import torch.fx as fx

from ..graph import (factory_number, input_cone, with_descendants, is_dead, is_reshape, is_scalar_like, owner_path, rank, reads_only_shape,
                     same_shape, same_size, shape,
                     static_int)
from ..sites import MASKED_BELOW
from .normalize import CAT, DROPOUT, MASKED_FILL, MATMUL, PERMUTE, SDPA, SOFTMAX, WHERE, op_kind
from .softcap import cap_problem, constant_number, is_tanh

#: ``torch.export`` graphs spell a masked softmax ``aten._safe_softmax``: softmax, with rows of −∞ giving 0
_SAFE = getattr(torch.ops.aten, "_safe_softmax", None)
SAFE_SOFTMAX = {_SAFE, _SAFE.default} if _SAFE is not None else set()

_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as"}
_PASSTHROUGH_METHODS = {"contiguous", "clone"}


def is_cast(node: fx.Node) -> bool:
    """A dtype conversion or a value-preserving copy (no change of shape)."""
    if node.op == "call_method" and node.target in _CAST_METHODS | _PASSTHROUGH_METHODS:
        before, after = shape(node.args[0]), shape(node)
        return before is not None and same_shape(before, after)
    if node.op == "call_function":
        name = str(node.target)
        if any(k in name for k in ("_to_copy", "aten.to.", "convert_element_type", "aten.clone", "aten.alias",
                                   "aten.contiguous", "aten.lift_fresh")):
            return same_shape(shape(node.args[0]), shape(node))
    return False


@dataclasses.dataclass
class ScoreOp:
    """One step of the score chain, applied outward from ``q @ kt``."""
    kind: str                      # "scale" | "add" | "fill" | "cast" | "softcap" (value: the cap) | "floor"
    value: Any = None              # scale factor / additive term / fill value
    power: int = 1                 # scale: +1 multiply, -1 divide; add: +1 add, -1 subtract
    cond: Optional[fx.Node] = None  # fill: where the fill applies
    fill_where_true: bool = True   # fill: True for masked_fill(cond, v) / where(cond, v, x)
    node: Optional[fx.Node] = None
    fill_value: Optional[float] = None  # fill: its value, read from the graph (mask_semantics.read_fill_values)
    #: stream: ``(q2, kt2, factors)`` of a second score product added to the scores, ``factors`` its own scales
    #: as ``(value, power)``; lowering concatenates its features onto q and k
    stream: Optional[tuple] = None


@dataclasses.dataclass
class SiteMatch:
    """A matched (or rejected) attention region, with the FX nodes lowering needs."""
    name: str
    softmax: Optional[fx.Node]
    output: Optional[fx.Node] = None          # the value product (or the SDPA call)
    qk: Optional[fx.Node] = None
    q: Optional[fx.Node] = None
    kt: Optional[fx.Node] = None
    v: Optional[fx.Node] = None
    ops: list = dataclasses.field(default_factory=list)
    dropout_p: Any = 0.0
    softmax_dtype: Optional[torch.dtype] = None
    region: list = dataclasses.field(default_factory=list)
    status: str = "matched"
    reason: str = ""
    returned: bool = False   # rejected because the captured graph returns an intermediate (see _Returned)
    kind: str = "eager"
    ordinal: int = 0
    index: int = 0
    sdpa_kwargs: dict = dataclasses.field(default_factory=dict)
    merge: Optional[fx.Node] = None           # a view merging split batch dims back before the value product
    dead_users: list = dataclasses.field(default_factory=list)  # users of the region whose results go nowhere
    #: ``probs.masked_fill(cond, 0)`` after the softmax, with the same ``cond`` as a fill of the scores: rows
    #: whose every key is masked come out 0 (as SDPA gives them), the rest unchanged
    zeroed_rows: Optional[fx.Node] = None
    safe_softmax: bool = False                # aten._safe_softmax (export graphs): rows of −∞ give 0, as SDPA does
    shape_users: list = dataclasses.field(default_factory=list)  # (user, node): users reading only a shape
    #: nodes of the site that read the score chain besides the chain itself (the row max a stabiliser subtracts)
    internal: set = dataclasses.field(default_factory=set)
    #: extra keys (attention sinks): score columns concatenated to the scores before the softmax, their
    #: probabilities dropped before the value product; ``extra_first``: concatenated before the real keys
    extra_columns: Optional[fx.Node] = None
    extra_first: bool = False
    kept_columns: Optional[tuple] = None      # (slice node, "head" | "tail"): the probabilities of the real keys
    values_left: bool = False                 # ``v @ pᵀ`` (channels first): ``v`` is ``[.., d, Nk]``
    values_split: bool = False                # scores split (b·h) -> (b, h) for the mask, ``v`` already (b, h, n, d)
    #: ``(product, v)`` of further value products reading the same probabilities (``p @ v1``, ``p @ v2``): one
    #: call over the values side by side, its output split after
    more_outputs: list = dataclasses.field(default_factory=list)
    softcap: Optional[float] = None           # scores soft-capped to cap * tanh(s / cap) before any mask


class _Reject(Exception):
    pass


class _Returned(_Reject):
    """An intermediate is a graph output: the model returns it, or a graph break separates it from the code that
    drops it (which a capture that nests graph breaks can see)."""


def _single_user(node: fx.Node, what: str, m: Optional["SiteMatch"] = None, ours: Optional[fx.Node] = None) -> fx.Node:
    """The one user of ``node`` whose result is used. Users whose results go nowhere (a clone kept for an
    intermediates record nobody reads) are not users: they are remembered on ``m`` and removed with the site.
    With ``ours`` (the site's own user of a score node), users that only build the scores of other softmaxes
    (LiLT's two streams share their scaled products) are not users either: the rewrite never changes ``node``,
    and it is dead once every site sharing it is rewritten."""
    users = [u for u in node.users if not reads_only_shape(u, node) and (m is None or u not in m.internal)]
    if m is not None:
        m.shape_users.extend((u, node) for u in node.users if reads_only_shape(u, node))
    live = [u for u in users if not is_dead(u)]
    if ours is not None and ours in live:
        live = [ours] + [u for u in live if u is not ours and not _only_scores_of_softmax(u) and not _a_record(u)]
    if len(live) != 1:
        returned = any(u.op == "output" for u in live)
        raise (_Returned if returned else _Reject)(f"{what} are used elsewhere ({len(live)} users: "
                      f"{', '.join(_describe(u) for u in live[:3])}), so rewriting would change them"
                      + ("; the captured graph returns them: the model returns them, or a graph break separates "
                         "them from code that drops them (see the report's graph breaks)" if returned else ""))
    if m is not None:
        for u in users:
            if u is not live[0] and is_dead(u):
                m.dead_users.extend(_with_descendants(u))
    return live[0]


def _with_descendants(node: fx.Node) -> list:
    """``node`` and every node fed by it, parents before children (``remove_dead`` pops leaves first)."""
    return with_descendants(node)


#: elementwise steps a score chain takes on its way to a softmax
_SCORE_STEPS = {torch.mul, torch.div, torch.add, torch.sub, MASKED_FILL, WHERE}


def _only_scores_of_softmax(node: fx.Node, depth: int = 6) -> bool:
    """Whether every use of ``node`` ends in a softmax over its last dim through score steps (scales, masks,
    sums, casts) alone."""
    if node.op == "call_function" and node.target is SOFTMAX:
        return node.kwargs.get("dim") == (rank(node) or 0) - 1
    if depth == 0 or not (is_cast(node) or (node.op == "call_function" and node.target in _SCORE_STEPS)):
        return False
    live = [u for u in node.users if not reads_only_shape(u, node) and not is_dead(u)]
    return bool(live) and all(_only_scores_of_softmax(u, depth - 1) for u in live)


def _a_record(node: fx.Node) -> bool:
    """A detached copy of the scores handed to the caller and nothing else (openai-whisper returns
    ``qk.detach()`` beside the output, for alignment heads): no gradient and no further computation flows
    from it, so the attention itself can still be fused; the score product stays computed for the record."""
    return node.op in ("call_method", "call_function") and _is_call_named(node, "detach") and _only_returned(node)


def _only_returned(node: fx.Node, depth: int = 4) -> bool:
    """Whether every use of ``node`` is the graph's output, directly or through casts and detaches."""
    for u in node.users:
        if u.op == "output":
            continue
        if depth and (is_cast(u) or _is_call_named(u, "detach")) and _only_returned(u, depth - 1):
            continue
        return False
    return bool(node.users)


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "a graph output"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target}"


def _produces_matmul(node: Any, depth: int = 6) -> bool:
    """Whether a product (matmul) is among the inputs of ``node`` within ``depth`` steps. Reading a product's
    shape is no dependence on it: a column built from a parameter to the scores' size (``repeat(sink, 'h -> b h
    i 1', b=s.shape[0])``) is not a product."""
    frontier, seen = [node], set()
    for _ in range(depth + 1):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target is MATMUL:
                return True
            nxt.extend(i for i in n.all_input_nodes if not reads_only_shape(n, i))
        frontier = nxt
    return False


def _feeds_matmul(node: fx.Node, depth: int = 4) -> bool:
    for u in node.users:
        if u.op == "call_function" and u.target is MATMUL:
            return True
        if depth and _feeds_matmul(u, depth - 1):
            return True
    return False


def find_sites(gm: fx.GraphModule) -> tuple[list[SiteMatch], list[SiteMatch], list[str]]:
    """All attention sites of a canonical graph, the attention-like regions rejected (with why), and the modules of
    the other softmax ops (no score product before them nor value product after: routers, gates, pooling, or
    attention written in a form the matcher does not read)."""
    sites, rejected, others = [], [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is SOFTMAX or node.target in SAFE_SOFTMAX:
            m = _match_softmax(node)
            if m is None:
                others.append(owner_path(node))
                continue
            (sites if m.status == "matched" else rejected).append(m)
        elif node.target is SDPA or op_kind(node) == "sdpa":
            sites.append(_match_sdpa(node))
        elif node.target is torch.nn.functional.multi_head_attention_forward:
            sites.append(_match_mha(node))
        elif node.target in _FUSED_FAST_PATHS:
            rejected.append(SiteMatch(name=owner_path(node), softmax=None, output=node, status="rejected",
                                      reason=_FUSED_FAST_PATHS[node.target]))
    counts: dict = {}
    for i, m in enumerate(sorted(sites + rejected, key=lambda m: _order(gm, m))):
        m.index = i
        m.ordinal = counts.get(m.name, 0)
        counts[m.name] = m.ordinal + 1
    return sites, rejected, others


_FAST_PATH_FIX = ("; rewrite.optimize captures the Python path itself, and for torch.compile(backend=...) call "
                  "torch.backends.mha.set_fastpath_enabled(False) first")
#: PyTorch's fused C++ fast paths of nn.MultiheadAttention / nn.TransformerEncoderLayer (eval, no grad): the
#: attention inside is out of reach, so they are reported with the way to expose it
_FUSED_FAST_PATHS = {
    op: f"PyTorch's fused {what} fast path hides the attention in one C++ op{_FAST_PATH_FIX}"
    for op, what in ((getattr(torch, "_transformer_encoder_layer_fwd", None), "TransformerEncoderLayer"),
                     (getattr(torch, "_native_multi_head_attention", None), "MultiheadAttention"))
    if op is not None
}


def _order(gm: fx.GraphModule, m: SiteMatch) -> int:
    anchor = m.softmax or m.output
    for i, n in enumerate(gm.graph.nodes):
        if n is anchor:
            return i
    return 0


def _match_sdpa(node: fx.Node) -> SiteMatch:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    kw = {n: (node.args[i] if i < len(node.args) else node.kwargs.get(n, d)) for i, (n, d) in enumerate(zip(names, defaults))}
    return SiteMatch(name=owner_path(node), softmax=None, output=node, q=kw["query"], v=kw["value"],
                     kt=kw["key"], kind="sdpa", dropout_p=kw["dropout_p"], sdpa_kwargs=kw, region=[node])


def _match_mha(node: fx.Node) -> SiteMatch:
    """``nn.MultiheadAttention`` as Dynamo keeps it: one opaque call (it runs SDPA inside when it can)."""
    args = list(node.args) + [None] * 20
    need_weights = node.kwargs.get("need_weights", args[15] if args[15] is not None else True)
    m = SiteMatch(name=owner_path(node), softmax=None, output=node, q=args[0], kt=args[1], v=args[2], kind="mha",
                  region=[node])
    m.sdpa_kwargs = {"num_heads": args[4], "need_weights": need_weights}
    return m


def _match_softmax(sm: fx.Node) -> Optional[SiteMatch]:
    m = SiteMatch(name=owner_path(sm), softmax=sm)
    try:
        _match_probabilities(m)
        _match_scores(m)
        _check_softcap(m)
        _check_zeroed_rows(m)
        _check_shapes(m)
    except _Reject as why:
        if not (_produces_matmul(sm.args[0]) or _feeds_matmul(sm)):
            return None  # a softmax that is not attention-like (a router, a classifier head): not ours
        m.status, m.reason, m.returned = "rejected", str(why), isinstance(why, _Returned)
    return m


def _match_probabilities(m: SiteMatch) -> None:
    sm = m.softmax
    r = rank(sm)
    m.safe_softmax = sm.target is not SOFTMAX
    dim = sm.args[1] if m.safe_softmax else sm.kwargs.get("dim")
    if m.safe_softmax and isinstance(dim, int) and r:
        dim %= r
    if r is None or r < 2:
        raise _Reject("the softmax input has no known shape of rank >= 2")
    if dim != r - 1:
        raise _Reject(f"softmax is over dim {dim - r} (dim {dim}), not the last (key) dim, so it is not "
                      "attention's row normalisation")
    m.softmax_dtype = (sm.args[2] if len(sm.args) > 2 else sm.kwargs.get("dtype")) if m.safe_softmax \
        else sm.kwargs.get("dtype")
    m.region.append(sm)
    p = sm
    while True:
        products = _value_products(p)
        if products:
            m.output, m.v = products[0]
            m.more_outputs = products[1:]
            m.region.extend(prod for prod, _ in products)
            return
        u = _single_user(p, "the attention probabilities", m)
        if is_cast(u):
            p = u
        elif u.op == "call_function" and u.target is DROPOUT:
            if m.dropout_p not in (0.0, 0):
                raise _Reject("two dropouts on the probabilities")
            # every spelling normalize leaves (an in-place dropout whose input is read again stays positional)
            pval = u.args[1] if len(u.args) > 1 else u.kwargs.get("p", 0.5)
            training = u.args[2] if len(u.args) > 2 else u.kwargs.get("training", True)
            inplace = u.args[3] if len(u.args) > 3 else u.kwargs.get("inplace", False)
            if inplace is not False:
                raise _Reject("the probabilities' dropout is in place and its input is read elsewhere")
            if not isinstance(pval, (int, float)) or isinstance(pval, bool):
                raise _Reject("dropout's probability is not a constant")
            m.dropout_p = pval if training is True else (0.0 if training is False else _Reject)
            if m.dropout_p is _Reject:
                raise _Reject("dropout's training flag is not a constant")
            p = u
        elif (u.op == "call_function" and u.target is MASKED_FILL and u.args[0] is p and m.zeroed_rows is None
              and _is_zero(u.args[2]) and isinstance(u.args[1], fx.Node)):
            m.zeroed_rows = u.args[1]
            p = u
        elif is_reshape(u):
            p = _probability_views(m, p, u)
        elif _kept_columns(u, p) is not None and m.kept_columns is None:
            m.kept_columns = (u, _kept_columns(u, p))
            p = u
        elif _swaps_last_two(u) and not m.values_left:
            product = _single_user(u, "the transposed probabilities", m)
            if not (product.op == "call_function" and product.target is MATMUL and product.args[1] is u
                    and product.args[0] is not u):
                raise _Reject(f"the transposed probabilities feed {_describe(product)}, not a value product")
            m.region.append(u)  # v @ pᵀ (channels first): out[.., d, Nq] = (p @ vᵀ)ᵀ
            m.output, m.v, m.values_left = product, product.args[0], True
            m.region.append(product)
            return
        elif u.op == "call_function" and u.target is MATMUL:
            if u.args[0] is not p:
                raise _Reject("the probabilities are the right operand of the product (v @ p form), which sums "
                              "over queries, not keys")
            m.output, m.v = u, u.args[1]
            m.region.append(u)
            return
        else:
            raise _Reject(f"the probabilities feed {_describe(u)}, not a value product")
        m.region.append(p)


def _value_products(p: fx.Node) -> list:
    """``[(p @ v1, v1), (p @ v2, v2), ...]`` when the probabilities feed several value products and nothing else,
    with values that can lie side by side (the same batch and key dims, a known width); else []."""
    live = [u for u in p.users if not reads_only_shape(u, p) and not is_dead(u)]
    if len(live) < 2 or not all(u.op == "call_function" and u.target is MATMUL and u.args[0] is p
                                and u.args[1] is not p for u in live):
        return []
    shapes = [shape(u.args[1]) for u in live]
    if any(s is None or len(s) != len(shapes[0]) or not same_shape(tuple(s[:-1]), tuple(shapes[0][:-1]))
           or static_int(s[-1]) is None for s in shapes):
        return []
    return [(u, u.args[1]) for u in live]


def _probability_views(m: SiteMatch, p: fx.Node, first: fx.Node) -> fx.Node:
    """Follow a run of reshapes of the probabilities from ``first``: reshapes keep the row-major order, so a
    run that ends in the shape it started from is the identity (GroupViT's ``view(B, H, N, N).view(B*H, N,
    N)``), and one that ends in another grouping of the batch dims only merges a split of the scores back."""
    run = [first]
    while True:
        live = [u for u in run[-1].users if not reads_only_shape(u, run[-1]) and not is_dead(u)]
        if len(live) != 1 or not is_reshape(live[0]):
            break
        run.append(_single_user(run[-1], "the attention probabilities", m))
    end, start = shape(run[-1]), shape(p)
    m.region.extend(run[:-1])
    if same_shape(end, start):
        return run[-1]
    if (m.merge is None and start is not None and len(end) >= 3 and len(start) >= 3 and len(end) != len(start)
            and same_shape(tuple(end[-2:]), tuple(start[-2:]))):
        m.merge = run[-1]
        return run[-1]
    raise _Reject("the probabilities are reshaped into another layout before the value product")


def _swaps_last_two(node: fx.Node) -> bool:
    if not (node.op == "call_function" and node.target is PERMUTE):
        return False
    perm = list(node.args[1])
    return len(perm) >= 2 and perm[:-2] == list(range(len(perm) - 2)) and perm[-2:] == [len(perm) - 1, len(perm) - 2]


def _kept_columns(node: fx.Node, p: fx.Node) -> Optional[str]:
    """``"head"`` when ``node`` keeps the first columns of ``p``'s last dim (``p[..., :-1]``), ``"tail"`` when it
    keeps the last ones (``p[..., 1:]``), else None. Where the kept columns go is checked against the scores."""
    r = rank(p)
    if r is None or rank(node) != r:
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        if not isinstance(index, tuple) or not index:
            return None
        lead, last = index[:-1], index[-1]
        if lead not in ((Ellipsis,), tuple([slice(None)] * (r - 1))) or not isinstance(last, slice):
            return None
        start, stop, step = last.start, last.stop, last.step
    elif node.op == "call_function" and str(node.target).startswith("aten.slice.Tensor"):
        args = list(node.args) + [None] * 5
        if args[1] not in (-1, r - 1):
            return None
        start, stop, step = args[2], args[3], args[4]
    else:
        return None
    if step not in (None, 1):
        return None
    if start in (None, 0) and isinstance(stop, (int, fx.Node)) and stop is not None:
        return "head"
    if isinstance(start, int) and start > 0 and stop in (None, sys.maxsize):
        return "tail"
    return None


def _is_zero(value: Any) -> bool:
    """0 as a number, or a tensor made from the number 0 in the graph (``torch.scalar_tensor(0)``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return factory_number(value) == 0


def _check_zeroed_rows(m: SiteMatch) -> None:
    """Probabilities zeroed after the softmax: exact only where the scores were filled under the same condition
    (the zeroed entries are 0 already, but for rows with no key left, which the original made NaN or uniform)."""
    if m.zeroed_rows is None:
        return
    if not any(op.kind == "fill" and op.fill_where_true and same_expression(op.cond, m.zeroed_rows) for op in m.ops):
        raise _Reject("the probabilities are zeroed after the softmax where the scores were not masked, which "
                      "changes the rows' sums")


def same_expression(a: Any, b: Any, depth: int = 12) -> bool:
    """Whether two graph values are computed the same way from the same inputs (the same node, or the same op on
    the same expressions), e.g. a mask comparison written twice."""
    if a is b:
        return True
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if depth == 0 or a.op != b.op or a.target != b.target or a.op in ("placeholder", "get_attr"):
            return False
        if len(a.args) != len(b.args) or set(a.kwargs) != set(b.kwargs):
            return False
        return (all(same_expression(x, y, depth - 1) for x, y in zip(a.args, b.args))
                and all(same_expression(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_expression(x, y, depth - 1) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


def _match_scores(m: SiteMatch) -> None:
    node, ours = m.softmax.args[0], m.softmax
    ops: list[ScoreOp] = []
    while True:
        if not isinstance(node, fx.Node):
            raise _Reject("the scores are not a tensor computed in the graph")
        _single_user(node, "the attention scores", m, ours=ours)
        if node.op == "call_function" and node.target is MATMUL:
            m.qk, m.q, m.kt = node, node.args[0], node.args[1]
            m.region.append(node)
            break
        m.region.append(node)
        ours, node = node, _score_step(m, node, ops)
    ops.reverse()  # innermost (closest to q @ kt) first
    m.ops = ops


def _score_step(m: SiteMatch, node: fx.Node, ops: list) -> fx.Node:
    """Record the score op ``node`` applies (outermost first) and return the node it applies it to."""
    full = shape(node)
    if is_cast(node):
        ops.append(ScoreOp("cast", node=node))
        return node.args[0]
    if node.op == "call_function" and node.target in (torch.mul, torch.div):
        a, b = node.args
        if _on_chain(a, full) and _row_factor(b, a, full):
            chain, factor = a, b
        elif node.target is torch.mul and _on_chain(b, full) and _row_factor(a, b, full):
            chain, factor = b, a
        else:
            raise _Reject(f"the scores are multiplied by a factor that varies along the keys ({_describe(node)} "
                          "of two tensors)")
        ops.append(ScoreOp("scale", value=factor, power=1 if node.target is torch.mul else -1, node=node))
        return chain
    if node.op == "call_function" and node.target in (torch.add, torch.sub):
        return _additive_step(m, node, ops)
    if is_reshape(node):
        inner = _identity_views(m, node)
        if inner is not None:
            return inner
    if leading_view(node) is not None:
        kind = "split" if len(shape(node)) > len(shape(node.args[0])) else "merge"
        ops.append(ScoreOp(kind, value=leading_view(node), node=node))
        return node.args[0]
    if node.op == "call_function" and node.target in CAT:
        return _extra_key_columns(m, node, ops)
    if node.op == "call_function" and node.target is MASKED_FILL:
        x, cond, val = node.args
        if not is_scalar_like(val):
            raise _Reject("masked_fill with a non-scalar value")
        _check_fill(val)
        ops.append(ScoreOp("fill", value=val, cond=cond, fill_where_true=True, node=node))
        return x
    if node.op == "call_function" and node.target is WHERE:
        cond, a, b = node.args
        if _on_chain(a, full) and is_scalar_like(b):
            _check_fill(b)
            ops.append(ScoreOp("fill", value=b, cond=cond, fill_where_true=False, node=node))
            return a
        if _on_chain(b, full) and is_scalar_like(a):
            _check_fill(a)
            ops.append(ScoreOp("fill", value=a, cond=cond, fill_where_true=True, node=node))
            return b
        raise _Reject("torch.where on the scores with a non-scalar replacement")
    if is_tanh(node):
        return _match_softcap(m, ops, node)
    floored = _floor_of(node, full)
    if floored is not None:
        if any(op.kind not in ("cast", "split", "merge") for op in ops):
            raise _Reject("the floored scores are scaled, masked or biased again before the softmax")
        ops.append(ScoreOp("floor", value=floored[1], node=node))
        return floored[0]
    name = _describe(node)
    if "tanh" in name:
        raise _Reject("the scores pass through tanh (soft-capping), which SDPA cannot express")
    raise _Reject(f"the scores pass through {name}, which is not a scale, mask or bias")


def _floor_of(node: fx.Node, full: Optional[tuple]) -> Optional[tuple]:
    """``(scores, c)`` for ``max(scores, c)`` / ``clamp_min(scores, c)`` with a constant ``c`` at or below
    ``MASKED_BELOW`` (XGLM floors its masked scores at the dtype's minimum): it changes only scores below ``c``,
    which a mask put there, so lowering floors the mask instead."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_function" and node.target not in (torch.max, torch.maximum, torch.clamp, torch.clamp_min):
        return None
    if name in ("max", "maximum") and len(node.args) == 2 and not node.kwargs:
        pairs = (node.args, node.args[::-1])
    elif name in ("clamp", "clamp_min") and set(node.kwargs) <= {"min", "max"} and node.kwargs.get("max") is None \
            and len(node.args) <= 2:
        pairs = ((node.args[0], node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)),)
    else:
        return None
    for x, c in pairs:
        value = c if isinstance(c, (int, float)) and not isinstance(c, bool) else factory_number(c)
        if isinstance(x, fx.Node) and value is not None and value <= MASKED_BELOW and same_shape(shape(x), full) \
                and (not isinstance(c, fx.Node) or not shape(c)):
            return x, float(value)
    return None


def _additive_step(m: SiteMatch, node: fx.Node, ops: list) -> fx.Node:
    """A term added to (or subtracted from) the scores: a mask or bias, a number, the row maximum a stabiliser
    subtracts (softmax is blind to anything constant along a row), or a second score product (a stream)."""
    a, b = node.args
    full = shape(node)
    if node.target is torch.sub and isinstance(a, fx.Node) and _row_max_of(b, a, m):
        ops.append(ScoreOp("shift", value=b, power=-1, node=node))
        return a
    if _on_chain(a, full) and not _depends_on(b, a):
        chain, term, sign = a, b, (1 if node.target is torch.add else -1)
    elif node.target is torch.add and _on_chain(b, full) and not _depends_on(a, b):
        chain, term, sign = b, a, 1
    else:
        raise _Reject("an additive term on the scores could not be told apart from the scores")
    if isinstance(term, float) and not math.isfinite(term):
        raise _Reject(f"the scores are shifted by {term}, which makes every row NaN")
    stream = _product_stream(term, full) if sign == 1 else None
    if stream is not None:
        m.region.extend(stream[3])
        ops.append(ScoreOp("stream", value=term, node=node, stream=stream[:3]))
    else:
        ops.append(ScoreOp("add", value=term, power=sign, node=node))
    return chain


def _identity_views(m: SiteMatch, node: fx.Node) -> Optional[fx.Node]:
    """The input of the longest run of reshapes ending in ``node`` that gives back the shape it started from
    (the identity: reshapes keep the row-major order); None when there is no such run."""
    run, x = [node], node.args[0]
    while isinstance(x, fx.Node) and is_reshape(x) and len([u for u in x.users if not is_dead(u)]) == 1:
        run.append(x)
        x = x.args[0]
    for j in range(len(run), 1, -1):
        inner = run[j - 1].args[0]
        if same_shape(shape(inner), shape(node)):
            m.region.extend(run[1:j])
            return inner
    return None


def _row_max_of(term: Any, x: fx.Node, m: SiteMatch) -> bool:
    """Whether ``term`` is the maximum of ``x`` over its last dim, kept as a dim of 1 (``x.max(-1, keepdim=True)
    .values``, ``amax``, detached or not): subtracting it is softmax's own stabiliser and changes no
    probability (a row of −∞ is NaN either way). Its nodes join the site."""
    stats, node = [], term
    while isinstance(node, fx.Node) and (is_cast(node) or _is_call_named(node, "detach")):
        stats.append(node)
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and node.args[1] == 0:
        stats.append(node)
        node, names = node.args[0], ("max",)
    else:
        names = ("amax",)
    if not (isinstance(node, fx.Node) and any(_is_call_named(node, n) for n in names) and node.args[0] is x):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if keepdim is not True or not isinstance(dim, int) or rank(x) is None or dim % rank(x) != rank(x) - 1:
        return False
    stats.append(node)
    m.internal.update(stats)
    m.region.extend(stats)
    return True


def _is_call_named(node: fx.Node, name: str) -> bool:
    if node.op == "call_method":
        return node.target == name
    if node.op == "call_function":
        return getattr(node.target, "__name__", None) == name or str(node.target).startswith(f"aten.{name}.")
    return False


def _product_stream(term: Any, full: Optional[tuple]) -> Optional[tuple]:
    """``(q2, kt2, factors, nodes)`` when ``term`` is another score product of the scores' shape, scaled by
    scalars only (``factors``: ``(value, power)``): LiLT's ``q1 k1ᵀ/√d1 + q2 k2ᵀ/√d2``."""
    factors, nodes, node = [], [], term
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.mul, torch.div):
        nodes.append(node)
        a, b = node.args
        if isinstance(a, fx.Node) and is_scalar_like(b) and not is_scalar_like(a):
            factors.append((b, 1 if node.target is torch.mul else -1))
            node = a
        elif node.target is torch.mul and isinstance(b, fx.Node) and is_scalar_like(a) and not is_scalar_like(b):
            factors.append((a, 1))
            node = b
        else:
            return None
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is MATMUL):
        return None
    if not same_shape(shape(node), full) or not same_shape(shape(term), full):
        return None
    return node.args[0], node.args[1], factors, nodes + [node]


def _extra_key_columns(m: SiteMatch, node: fx.Node, ops: list) -> fx.Node:
    """``cat([scores, columns], -1)``: score columns of extra keys (gpt-oss's attention sinks) whose
    probabilities the model drops after the softmax. That is attention over one more key whose score is the
    column and whose value is zero; lowering adds such a key."""
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    r = rank(node)
    if m.extra_columns is not None or not isinstance(dim, int) or r is None or dim % r != r - 1 \
            or not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        raise _Reject("the scores are concatenated with other tensors in a way that is not extra keys")
    if any(op.kind not in ("cast", "shift") and not (op.kind == "add" and isinstance(op.value, (int, float)))
           for op in ops):
        raise _Reject("the scores and the extra key columns concatenated to them are scaled or masked together")
    a, b = tensors
    if _produces_matmul(a, 12) and not _produces_matmul(b, 12):
        chain, cols, first = a, b, False
    elif _produces_matmul(b, 12) and not _produces_matmul(a, 12):
        chain, cols, first = b, a, True
    else:
        raise _Reject("the scores are concatenated with another score product")
    if not isinstance(cols, fx.Node) or shape(cols) is None or static_int(shape(cols)[-1]) is None:
        raise _Reject("the extra key columns concatenated to the scores have no known count")
    m.extra_columns, m.extra_first = cols, first
    return chain
def _match_softcap(m: SiteMatch, ops: list, tanh: fx.Node) -> fx.Node:
    """``c * tanh(x)`` on the scores (``ops``: outermost first; the last one not a cast multiplies the tanh, if
    any). Recorded as a cap of ``|c|`` and, inside it, a scale by ``c``, as
    ``c * tanh(a * qk) = |c| * tanh(c a qk / |c|)``: lowering folds ``c`` (and the inner ``1 / c``) into the
    kernel's scale whatever the spelling. Returns the tanh's input, where the walk goes on."""
    if m.softcap is not None:
        raise _Reject("the scores are soft-capped (tanh) twice")
    last = next((i for i in range(len(ops) - 1, -1, -1) if ops[i].kind != "cast"), None)
    outer = ops.pop(last) if last is not None and ops[last].kind == "scale" else None
    factor = 1.0 if outer is None else constant_number(outer.value)
    if factor is not None and outer is not None and outer.power == -1:
        factor = 1.0 / factor if factor else 0.0
    problem = cap_problem(factor)
    if problem:
        raise _Reject(problem)
    if any(op.kind in ("scale", "split", "merge") for op in ops):
        raise _Reject("the soft-capped scores are scaled or reshaped before the softmax, which the flash kernel's "
                      "soft-capping cannot express")
    m.softcap = abs(factor)
    ops.append(ScoreOp("softcap", value=m.softcap, node=tanh))
    ops.append(ScoreOp("scale", value=factor, node=outer.node if outer is not None else tanh))
    return tanh.args[0]


def _check_softcap(m: SiteMatch) -> None:
    """Only scales and casts may come before a soft-cap: the kernel caps ``scale * q @ kᵀ`` and adds masks after."""
    if m.softcap is None:
        return
    cap = next(i for i, op in enumerate(m.ops) if op.kind == "softcap")
    if any(op.kind not in ("scale", "cast") for op in m.ops[:cap]):
        raise _Reject("a mask or bias is added before the soft-capping tanh; the flash kernel caps the scores "
                      "before its mask, so it cannot express this")


def _check_fill(value: Any) -> None:
    if isinstance(value, (int, float)) and not value <= MASKED_BELOW:
        raise _Reject(f"the scores are replaced by {value!r} where a condition holds; a value above "
                      f"{MASKED_BELOW:g} still takes part in the softmax, so it is not a mask SDPA can take")


def _row_factor(factor: Any, chain: fx.Node, full: Optional[tuple]) -> bool:
    """A factor of the scores that lowering folds into q: a number or a one-element tensor, or a tensor constant
    along the keys (size 1 in the last dim, broadcasting into the scores: per head, per query row, per batch) not
    computed from the scores themselves, since ``(q @ kᵀ) * t == (q * t) @ kᵀ`` row by row (XCiT's per-head
    temperature)."""
    if is_scalar_like(factor):
        return True
    size = shape(factor) if isinstance(factor, fx.Node) else None
    if not size or full is None or len(size) > len(full) or static_int(size[-1]) != 1:
        return False
    if not all(static_int(x) == 1 or same_size(x, y) for x, y in zip(reversed(size), reversed(full))):
        return False
    return not _depends_on(factor, chain)


def _on_chain(node: Any, full: Optional[tuple]) -> bool:
    """The operand that carries the scores: a tensor with the full score shape built from a product."""
    return isinstance(node, fx.Node) and same_shape(shape(node), full) and _produces_matmul(node, depth=12)


def _depends_on(node: Any, target: fx.Node, limit: int = 2000) -> bool:
    # a shape carries no values: reading one is no dependence
    found = input_cone(node, is_leaf=lambda n: n is target, limit=limit, skip_input=lambda n, i: reads_only_shape(n, i))
    return found is not None and target in found[0]


def leading_view(node: fx.Node) -> Optional[tuple]:
    """For a view/reshape that only regroups the leading (batch) dims and keeps the last two: the new
    leading sizes as the graph gives them (ints or size nodes); otherwise None."""
    if not (node.op == "call_method" and node.target in ("view", "reshape")) and not (
            node.op == "call_function" and (node.target is torch.reshape or "aten.view" in str(node.target)
                                            or "aten._unsafe_view" in str(node.target) or "aten.reshape" in str(node.target))):
        return None
    src, out = shape(node.args[0]), shape(node)
    if src is None or out is None or len(src) < 3 or len(out) < 3:
        return None
    if not same_shape(tuple(src[-2:]), tuple(out[-2:])) or len(src) == len(out):
        return None
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = tuple(sizes[0])
    if len(sizes) != len(out):
        return None
    lead = tuple(sizes[:-2])
    if any(isinstance(s, int) and s < 0 for s in lead):
        lead = tuple(s if not (isinstance(s, int) and s < 0) else _static(out[i]) for i, s in enumerate(lead))
        if any(s is None for s in lead):
            return None
    return lead


def _static(size) -> Optional[int]:
    return static_int(size)


def _check_shapes(m: SiteMatch) -> None:
    depth = 0
    for o in m.ops:  # innermost first: a split enters the (b, h) layout, a merge leaves it
        depth += 1 if o.kind == "split" else -1 if o.kind == "merge" else 0
        if depth not in (0, 1):
            raise _Reject("the scores are reshaped in a way other than splitting and merging the batch dims")
    # (b·h) scores split to (b, h) for the mask beside values already (b, h, n, d): the call runs split, no merge
    m.values_split = bool(depth) and m.merge is None and _values_split(m)
    if (depth or m.merge is not None) and not m.values_split:
        if not depth or m.merge is None:
            raise _Reject("the scores and the probabilities are reshaped differently")
        if len(shape(m.qk)) != 3 or len(shape(m.softmax)) <= 3 or not same_shape(shape(m.merge), shape(m.qk)):
            raise _Reject("the probabilities are not reshaped back to the layout of the scores")
    qs, kts, vs, ss = shape(m.q), shape(m.kt), shape(m.v), shape(m.qk)
    if None in (qs, kts, vs, ss) or len(qs) < 2 or len(kts) < 2 or len(vs) < 2:
        raise _Reject("q, k or v has no known shape")
    if not _keys_meet_values(m, kts, vs):
        raise _Reject("the key length of the scores does not match the value length")
    if not same_size(qs[-1], kts[-2]):
        raise _Reject("q and k head dims differ")
    _check_extra_keys(m)
    for o in m.ops:
        if o.kind == "stream" and not _stream_fits(m, o.stream):
            o.kind, o.power = "add", 1  # features that cannot be laid beside q's and k's: an additive bias


def _keys_meet_values(m: SiteMatch, kts: tuple, vs: tuple) -> bool:
    """Whether the scores' key axis is the values' length axis for every input: known from the sizes, or (two
    symbols Dynamo gave the key and value lengths separately) from the value product itself, which multiplies the
    probabilities' last axis by the values' length: where the probabilities reach it with the scores' key length,
    the original runs only when the two agree."""
    if same_size(kts[-1], vs[-1] if m.values_left else vs[-2]):
        return True
    if m.values_left or m.output is None or op_kind(m.output) != "matmul" or len(m.output.args) != 2:
        return False
    probs, values = m.output.args
    ps = shape(probs)
    return values is m.v and ps is not None and len(ps) >= 2 and same_size(kts[-1], ps[-1])


def _values_split(m: SiteMatch) -> bool:
    """Whether the scores end split into ``(b, h)`` while ``q`` and ``kᵀ`` are in the merged ``(b·h)`` layout and
    the values already in the split one (GPT-NeoX-Japanese: ``baddbmm`` on merged heads, ``matmul`` with split
    values)."""
    qs, kts, vs, ps = shape(m.q), shape(m.kt), shape(m.v), shape(m.softmax)
    return None not in (qs, kts, vs, ps) and len(qs) == len(kts) == 3 and len(vs) == len(ps) > 3 \
        and not m.values_left and same_shape(tuple(vs[:-2]), tuple(ps[:-2]))


def _check_extra_keys(m: SiteMatch) -> None:
    """Extra score columns are extra keys only if exactly the real keys' probabilities reach the values."""
    if m.extra_columns is None and m.kept_columns is None:
        return
    if m.extra_columns is None:
        raise _Reject("the probabilities are sliced before the value product")
    if m.kept_columns is None:
        raise _Reject("the probabilities of the columns concatenated to the scores reach the value product")
    node, side = m.kept_columns
    if (side == "tail") != m.extra_first or not same_size(shape(node)[-1], shape(m.qk)[-1]):
        raise _Reject("the probabilities kept after the softmax are not those of the real keys")


def _stream_fits(m: SiteMatch, stream: tuple) -> bool:
    """A second product ``q2 @ kt2`` can join q and k as more features: the same batch and query dims as q, the
    same batch and key dims as k, and no split batch layout."""
    q2, kt2, _ = stream
    qs, kts, q2s, kt2s = shape(m.q), shape(m.kt), shape(q2), shape(kt2)
    if q2s is None or kt2s is None or len(q2s) != len(qs) or len(kt2s) != len(kts):
        return False
    if any(o.kind in ("split", "merge") for o in m.ops) or m.values_left:
        return False
    return (same_shape(tuple(q2s[:-1]), tuple(qs[:-1])) and same_shape(tuple(kt2s[:-2]), tuple(kts[:-2]))
            and same_size(kt2s[-1], kts[-1]))
