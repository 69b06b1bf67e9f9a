"""Find attention sites in a canonical graph (run ``normalize`` first).

A site is ``softmax(f(q @ kt)) @ v`` where ``f`` is a chain of scalar scales (``mul``/``div``), additive
terms (masks, biases) and fills (``masked_fill``/``where``), possibly with dtype casts, and between the
softmax and the value product only casts and dropout. Every check that fails is reported in words; a
softmax that is not attention-like (no product on either side) is not reported at all.

The score chain is kept as an ordered list of operations, outermost last, so that lowering can rebuild
``scores = alpha * (q @ kt) + beta`` exactly whatever order the model applied them in. A soft-cap
``c * tanh(·)`` (Gemma 2, see ``softcap.py``) may sit between the scales and the masks: it is recorded on the
site, and only a target that takes ``softcap`` serves it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.fx as fx

from ..graph import (factory_number, is_mutating, is_scalar_like, owner_path, rank, reads_only_shape, same_shape, same_size, shape,
                     static_int)
from ..sites import MASKED_BELOW
from .normalize import DROPOUT, MASKED_FILL, MATMUL, SDPA, SOFTMAX, WHERE, op_kind
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
    kind: str                      # "scale" | "add" | "fill" | "cast" | "softcap" (value: the cap)
    value: Any = None              # scale factor / additive term / fill value
    power: int = 1                 # scale: +1 multiply, -1 divide; add: +1 add, -1 subtract
    cond: Optional[fx.Node] = None  # fill: where the fill applies
    fill_where_true: bool = True   # fill: True for masked_fill(cond, v) / where(cond, v, x)
    node: Optional[fx.Node] = None
    fill_value: Optional[float] = None  # fill: its value, read from the graph (mask_semantics.read_fill_values)


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
    softcap: Optional[float] = None           # scores soft-capped to cap * tanh(s / cap) before any mask


class _Reject(Exception):
    pass


def _single_user(node: fx.Node, what: str, m: Optional["SiteMatch"] = None) -> fx.Node:
    """The one user of ``node`` whose result is used. Users whose results go nowhere (a clone kept for an
    intermediates record nobody reads) are not users: they are remembered on ``m`` and removed with the site."""
    users = [u for u in node.users if not reads_only_shape(u, node)]
    if m is not None:
        m.shape_users.extend((u, node) for u in node.users if reads_only_shape(u, node))
    live = [u for u in users if not _is_dead(u)]
    if len(live) != 1:
        raise _Reject(f"{what} are used elsewhere ({len(live)} users: "
                      f"{', '.join(_describe(u) for u in live[:3])}), so rewriting would change them")
    if m is not None:
        for u in users:
            if u is not live[0]:
                m.dead_users.extend(_with_descendants(u))
    return live[0]


def _with_descendants(node: fx.Node) -> list:
    """``node`` and every node fed by it, parents before children (``remove_dead`` pops leaves first)."""
    out, seen, work = [], set(), [node]
    while work:
        n = work.pop(0)
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        work.extend(n.users)
    return out


def _is_dead(node: fx.Node, depth: int = 8) -> bool:
    """A node whose value reaches no graph output and no side effect (bounded: deeper chains count as used)."""
    if node.op in ("output", "placeholder", "call_module") or is_mutating(node) or depth == 0:
        return False
    return all(_is_dead(u, depth - 1) for u in node.users)


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "a graph output"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target}"


def _produces_matmul(node: Any, depth: int = 6) -> bool:
    """Whether a product (matmul) is among the inputs of ``node`` within ``depth`` steps."""
    frontier, seen = [node], set()
    for _ in range(depth + 1):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target is MATMUL:
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


def _feeds_matmul(node: fx.Node, depth: int = 4) -> bool:
    for u in node.users:
        if u.op == "call_function" and u.target is MATMUL:
            return True
        if depth and _feeds_matmul(u, depth - 1):
            return True
    return False


def find_sites(gm: fx.GraphModule) -> tuple[list[SiteMatch], list[SiteMatch]]:
    """All attention sites of a canonical graph, and the attention-like regions rejected (with why)."""
    sites, rejected = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is SOFTMAX or node.target in SAFE_SOFTMAX:
            m = _match_softmax(node)
            if m is None:
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
    return sites, rejected


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
        m.status, m.reason = "rejected", str(why)
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
        elif leading_view(u) is not None and m.merge is None:
            m.merge = u
            p = u
        elif u.op == "call_function" and u.target is MATMUL:
            if u.args[0] is not p:
                raise _Reject("the probabilities are the right operand of the product (v @ p form)")
            m.output, m.v = u, u.args[1]
            m.region.append(u)
            return
        else:
            raise _Reject(f"the probabilities feed {_describe(u)}, not a value product")
        m.region.append(p)


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
    node = m.softmax.args[0]
    ops: list[ScoreOp] = []
    while True:
        if not isinstance(node, fx.Node):
            raise _Reject("the scores are not a tensor computed in the graph")
        _single_user(node, "the attention scores", m)
        if node.op == "call_function" and node.target is MATMUL:
            m.qk, m.q, m.kt = node, node.args[0], node.args[1]
            m.region.append(node)
            break
        m.region.append(node)
        kind = op_kind(node) if node.op == "call_function" else None
        full = shape(node)
        if is_cast(node):
            ops.append(ScoreOp("cast", node=node))
            node = node.args[0]
        elif node.op == "call_function" and node.target in (torch.mul, torch.div):
            a, b = node.args
            if _on_chain(a, full) and is_scalar_like(b):
                chain, factor = a, b
            elif node.target is torch.mul and _on_chain(b, full) and is_scalar_like(a):
                chain, factor = b, a
            else:
                raise _Reject(f"the scores are multiplied by a non-scalar ({_describe(node)} of two tensors)")
            ops.append(ScoreOp("scale", value=factor, power=1 if node.target is torch.mul else -1, node=node))
            node = chain
        elif node.op == "call_function" and node.target in (torch.add, torch.sub):
            a, b = node.args
            if _on_chain(a, full) and not _depends_on(b, a):
                chain, term, sign = a, b, (1 if node.target is torch.add else -1)
            elif node.target is torch.add and _on_chain(b, full) and not _depends_on(a, b):
                chain, term, sign = b, a, 1
            else:
                raise _Reject("an additive term on the scores could not be told apart from the scores")
            if isinstance(term, float) and not math.isfinite(term):
                raise _Reject(f"the scores are shifted by {term}, which makes every row NaN")
            ops.append(ScoreOp("add", value=term, power=sign, node=node))
            node = chain
        elif leading_view(node) is not None:
            kind = "split" if len(shape(node)) > len(shape(node.args[0])) else "merge"
            ops.append(ScoreOp(kind, value=leading_view(node), node=node))
            node = node.args[0]
        elif node.op == "call_function" and node.target is MASKED_FILL:
            x, cond, val = node.args
            if not is_scalar_like(val):
                raise _Reject("masked_fill with a non-scalar value")
            _check_fill(val)
            ops.append(ScoreOp("fill", value=val, cond=cond, fill_where_true=True, node=node))
            node = x
        elif node.op == "call_function" and node.target is WHERE:
            cond, a, b = node.args
            if _on_chain(a, full) and is_scalar_like(b):
                _check_fill(b)
                ops.append(ScoreOp("fill", value=b, cond=cond, fill_where_true=False, node=node))
                node = a
            elif _on_chain(b, full) and is_scalar_like(a):
                _check_fill(a)
                ops.append(ScoreOp("fill", value=a, cond=cond, fill_where_true=True, node=node))
                node = b
            else:
                raise _Reject("torch.where on the scores with a non-scalar replacement")
        elif is_tanh(node):
            node = _match_softcap(m, ops, node)
        else:
            name = _describe(node)
            if "tanh" in name:
                raise _Reject("the scores pass through tanh (soft-capping), which SDPA cannot express")
            raise _Reject(f"the scores pass through {name}, which is not a scale, mask or bias")
    ops.reverse()  # innermost (closest to q @ kt) first
    m.ops = ops


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


def _on_chain(node: Any, full: Optional[tuple]) -> bool:
    """The operand that carries the scores: a tensor with the full score shape built from a product."""
    return isinstance(node, fx.Node) and same_shape(shape(node), full) and _produces_matmul(node, depth=12)


def _depends_on(node: Any, target: fx.Node, limit: int = 2000) -> bool:
    if not isinstance(node, fx.Node):
        return False
    seen, work = set(), [node]
    while work and len(seen) < limit:
        n = work.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        work.extend(n.all_input_nodes)
    return False


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
    if depth or m.merge is not None:
        if not depth or m.merge is None:
            raise _Reject("the scores and the probabilities are reshaped differently")
        if len(shape(m.qk)) != 3 or len(shape(m.softmax)) <= 3 or not same_shape(shape(m.merge), shape(m.qk)):
            raise _Reject("the probabilities are not reshaped back to the layout of the scores")
    qs, kts, vs, ss = shape(m.q), shape(m.kt), shape(m.v), shape(m.qk)
    if None in (qs, kts, vs, ss) or len(qs) < 2 or len(kts) < 2 or len(vs) < 2:
        raise _Reject("q, k or v has no known shape")
    if not same_size(kts[-1], vs[-2]):
        raise _Reject("the key length of the scores does not match the value length")
    if not same_size(qs[-1], kts[-2]):
        raise _Reject("q and k head dims differ")
