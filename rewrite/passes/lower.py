"""Lower a matched site: rebuild its scores as ``alpha * (q @ kᵀ) + mask`` and call the chosen target.

The canonical call is SDPA's signature (``q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa``);
exact fused attention and every approximate mixer take it, so a handler only decides *what* to call.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from ..graph import insert_call, is_tensor_scalar, meta_value, rank, same_shape, shape, static_int
from .band import outside_band
from .find_sites import SiteMatch
from .normalize import ADD, DIV, MUL, PERMUTE, SUB, WHERE

_NEG_INF = float("-inf")


@dataclasses.dataclass
class SiteCall:
    """The canonical SDPA-signature inputs of one site, as graph nodes (or constants)."""
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: Optional[fx.Node] = None
    dropout_p: Any = 0.0
    is_causal: bool = False
    scale: Any = None
    enable_gqa: bool = False
    new_nodes: list = dataclasses.field(default_factory=list)
    flatten_output: int = 0   # >0: the call runs in a split batch layout; flatten that many leading dims after
    #: (function, extra args): applied to the call's output in order, ``out = fn(out, *args)``; they give rows
    #: whose every key is masked what the original computes (see passes/mask_semantics.py)
    row_fixes: list = dataclasses.field(default_factory=list)
    transpose_output: bool = False  # the site computed ``v @ pᵀ``: its output is SDPA's, transposed
    #: ``(product, node)`` for each further value product of the site and its slice of the joint output
    more_new: list = dataclasses.field(default_factory=list)
    #: the scores' soft-cap (``cap * tanh(scale * q @ kᵀ / cap)`` before the mask): only the flash kernel takes it
    softcap: Optional[float] = None
    #: ``(left, right)``: a −∞ fill outside keys ``i - left .. i + right`` (``band.outside_band``), kept out of
    #: ``attn_mask`` for the banded exact kernel; ``band_in_mask`` folds it in for every other target
    band: Optional[tuple] = None

    def kwargs(self) -> dict:
        kw = {"attn_mask": self.attn_mask, "dropout_p": self.dropout_p, "is_causal": self.is_causal,
              "scale": self.scale}
        if self.enable_gqa:
            kw["enable_gqa"] = True
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        return kw


class _Builder:
    def __init__(self, graph: fx.Graph, before: fx.Node):
        self.graph, self.before, self.new = graph, before, []

    def call(self, target, *args, **kwargs) -> fx.Node:
        node = insert_call(self.graph, self.before, target, args, kwargs, like=self.before)
        self.new.append(node)
        return node


def build_call(graph: fx.Graph, m: SiteMatch, causal_ops: set, is_causal: bool) -> SiteCall:
    """Insert the nodes that compute the canonical inputs of ``m`` before its output; nothing is rewired."""
    b = _Builder(graph, m.output)
    if m.kind == "sdpa":
        kw = m.sdpa_kwargs
        return SiteCall(q=kw["query"], k=kw["key"], v=kw["value"], attn_mask=kw["attn_mask"],
                        dropout_p=kw["dropout_p"], is_causal=kw["is_causal"], scale=kw["scale"],
                        enable_gqa=bool(kw["enable_gqa"]))
    q = m.q
    k = _untranspose(b, m.kt)
    v = _untranspose(b, m.v) if m.values_left else m.v  # v @ pᵀ == (p @ vᵀ)ᵀ
    if m.more_outputs:  # p @ v1, p @ v2: one product over the values side by side
        v = b.call(torch.cat, [v] + [more_v for _, more_v in m.more_outputs], -1)
    qdtype = meta_value(q).dtype
    f = _fold_score_ops(b, m, causal_ops, qdtype)
    beta, scale = f.beta, f.scale_num
    if beta is not None and meta_value(beta) is not None and meta_value(beta).dtype not in (torch.bool, qdtype):
        beta = b.call(_to_dtype, beta, qdtype)
    if f.scale_tensor is not None:
        q = b.call(MUL, q, f.scale_tensor)
    if f.streams:
        q, k, scale = _join_streams(b, q, k, scale, f.streams)
    if f.in_split:
        q, k = (b.call(torch.unflatten, t, 0, tuple(f.split)) for t in (q, k))
        v = v if m.values_split else b.call(torch.unflatten, v, 0, tuple(f.split))
    k, v, enable_gqa = _grouped_kv(q, k, v)
    if m.extra_columns is not None:
        k, v, beta = _with_extra_keys(b, m, q, k, v, beta)
    call = SiteCall(q=q, k=k, v=v, attn_mask=beta, dropout_p=m.dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa, new_nodes=b.new,
                    flatten_output=len(f.split) if f.in_split and not m.values_split else 0, row_fixes=_row_fixes(b, m, causal_ops, beta, v),
                    transpose_output=m.values_left, softcap=m.softcap, band=f.band)
    return call


def _is_band(cond: Any) -> bool:
    return isinstance(cond, fx.Node) and cond.op == "call_function" and cond.target is outside_band


def band_in_mask(graph: fx.Graph, before: fx.Node, call: SiteCall) -> None:
    """Fold ``call.band`` into ``call.attn_mask`` (an ``[nq, nk]`` pattern beside it): for targets other than the
    banded exact kernel, which see the band as SDPA would."""
    if call.band is None:
        return
    b = _Builder(graph, before)
    call.attn_mask = b.call(with_band, call.attn_mask, call.q, call.k, *call.band)
    call.new_nodes.extend(b.new)
    call.band = None


def with_band(mask: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``mask`` with keys outside ``i - left .. i + right`` of query ``i`` removed (bool: True = attend)."""
    keep = ~outside_band(q, k, left, right)
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, _NEG_INF)


@dataclasses.dataclass
class _Folded:
    """A site's score ops folded into ``scale_num * scale_tensor * (q @ kᵀ) + Σ streams + beta``."""
    scale_num: Any = 1.0                     # Python-level factor (number, SymFloat, or a node of one)
    scale_tensor: Optional[fx.Node] = None   # a tensor factor constant along the keys: folded into q
    beta: Optional[fx.Node] = None
    band: Optional[tuple] = None
    split: Optional[tuple] = None
    in_split: bool = False
    streams: list = dataclasses.field(default_factory=list)  # [q2, kt2, [(factor, power), ...]]


def _fold_score_ops(b: "_Builder", m: SiteMatch, causal_ops: set, qdtype: torch.dtype) -> _Folded:
    f = _Folded()
    for i, op in enumerate(m.ops):
        if op.kind in ("cast", "shift") or i in causal_ops:
            continue  # casts, and the row maximum subtracted: softmax does not see it
        if op.kind in ("split", "merge"):  # the scores change layout from here on: bring beta along
            if op.kind == "split":
                f.split = op.value
            f.in_split = op.kind == "split"
            if f.beta is not None:
                f.beta = b.call(_relayout, f.beta, m.q, m.kt, tuple(f.split), f.in_split)
        elif op.kind == "scale":
            _fold_scale(b, f, op, m, qdtype)
        elif op.kind == "stream":
            q2, kt2, factors = op.stream
            f.streams.append([q2, kt2, list(factors)])
        elif op.kind == "add":
            term = op.value
            if isinstance(term, (int, float)) and not isinstance(term, bool) and math.isfinite(term):
                continue  # the same number added to every score: softmax does not see it
            term_value = meta_value(term) if isinstance(term, fx.Node) else None
            if isinstance(term_value, torch.Tensor) and term_value.dtype == torch.bool:
                term = b.call(_to_dtype, term, qdtype)  # a bool *added* to scores adds 0 or 1: not SDPA's bool mask
            if f.beta is None:
                f.beta = term if op.power == 1 else b.call(torch.neg, term)
            else:
                f.beta = b.call(ADD if op.power == 1 else SUB, f.beta, term)
        elif op.kind == "floor":  # max(s, c): q·kᵀ is finite, so only a mask reaches below c; floor the mask
            if f.beta is not None:
                if meta_value(f.beta) is not None and meta_value(f.beta).dtype == torch.bool:
                    f.beta = b.call(WHERE, f.beta, b.call(_zero_like_scores, m.q, qdtype), op.value)
                else:
                    f.beta = b.call(torch.clamp_min, f.beta, op.value)
        elif op.kind == "fill":
            cond = op.cond
            if _is_band(cond) and float_value(op.value) == _NEG_INF and op.fill_where_true and \
                    not any(other.kind == "fill" for j, other in enumerate(m.ops) if j != i):
                f.band = tuple(cond.args[2:4])  # −∞ stays −∞ whatever is added after: the band is a separate mask
                continue
            if f.beta is None and float_value(op.value) == _NEG_INF and _only_op(m, i, causal_ops):
                # a lone -inf fill is a boolean mask: SDPA takes True = attend
                f.beta = b.call(torch.logical_not, cond) if op.fill_where_true else _as_bool(b, cond)
                continue
            base = f.beta if f.beta is not None else 0.0
            f.beta = b.call(WHERE, cond, op.value, base) if op.fill_where_true else b.call(WHERE, cond, base, op.value)
    return f


def _zero_like_scores(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=q.device)


def _fold_scale(b: "_Builder", f: _Folded, op, m: SiteMatch, qdtype: torch.dtype) -> None:
    """A scale of everything inside it: the product, the streams added so far and the mask so far. A tensor
    factor (one element, or constant along the keys: see find_sites._row_factor) multiplies q, in q's layout
    and dtype."""
    factor = op.value
    if is_tensor_scalar(factor):
        on_q = factor
        if f.in_split and rank(factor) > 2:
            on_q = b.call(_relayout, factor, m.q, m.kt, tuple(f.split), False)
        if meta_value(factor).dtype != qdtype:
            on_q = b.call(_to_dtype, on_q, qdtype)
        if op.power == 1:
            f.scale_tensor = on_q if f.scale_tensor is None else b.call(MUL, f.scale_tensor, on_q)
        else:
            f.scale_tensor = (b.call(torch.reciprocal, on_q) if f.scale_tensor is None
                              else b.call(DIV, f.scale_tensor, on_q))
    else:
        f.scale_num = _pymul(b, f.scale_num, factor, op.power)
    for stream in f.streams:
        stream[2].append((factor, op.power))
    if f.beta is not None:
        f.beta = b.call(MUL if op.power == 1 else DIV, f.beta, factor)


def _join_streams(b: "_Builder", q: fx.Node, k: fx.Node, scale: Any, streams: list) -> tuple:
    """``(q', k', 1.0)``: ``s·q kᵀ + Σ f_i q_i k_iᵀ == [s·q, f_1 q_1, …] [k, k_1, …]ᵀ``, one product over the
    features of every stream side by side (the value product is unchanged)."""
    qs = [q if isinstance(scale, (int, float)) and scale == 1 else b.call(MUL, q, scale)]
    ks = [k]
    for q2, kt2, factors in streams:
        for factor, power in factors:
            q2 = b.call(MUL if power == 1 else DIV, q2, factor)
        qs.append(q2)
        ks.append(_untranspose(b, kt2))
    return b.call(torch.cat, qs, -1), b.call(torch.cat, ks, -1), 1.0


def _with_extra_keys(b: "_Builder", m: SiteMatch, q: fx.Node, k: fx.Node, v: fx.Node, beta: Any) -> tuple:
    """``(k', v', mask')`` with the extra keys a site's extra score columns stand for: keys and values of
    zeros (``q·0 = 0``, so the mask column alone is their score, and they add nothing to the output)."""
    count = static_int(shape(m.extra_columns)[-1])
    mask = b.call(_mask_with_columns, beta, m.extra_columns, q, k, m.extra_first)
    k2 = b.call(_with_zero_rows, k, count, m.extra_first)
    v2 = b.call(_with_zero_rows, v, count, m.extra_first)
    return k2, v2, mask


def _with_zero_rows(x: torch.Tensor, count: int, first: bool) -> torch.Tensor:
    """``x`` with ``count`` rows of zeros before (``first``) or after its rows (dim -2)."""
    zeros = x.new_zeros(*x.shape[:-2], count, x.shape[-1])
    return torch.cat([zeros, x] if first else [x, zeros], -2)


def _mask_with_columns(mask: Optional[torch.Tensor], columns: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       first: bool) -> torch.Tensor:
    """The float mask over the real keys (SDPA's: a bool mask is 0 / −∞) and the extra key columns beside it,
    broadcast to the queries: ``[..., Nq, Nk + extra]``."""
    if mask is None:
        mask = q.new_zeros(())
    elif mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    mask = mask.to(q.dtype)
    lead = torch.broadcast_shapes(mask.shape[:-1], columns.shape[:-1], q.shape[:-1])
    real = mask.expand(*lead, k.shape[-2])
    extra = columns.to(q.dtype).expand(*lead, columns.shape[-1])
    return torch.cat([extra, real] if first else [real, extra], -1)


def _grouped_kv(q: fx.Node, k: fx.Node, v: fx.Node) -> tuple:
    """``(k, v, enable_gqa)``: kv heads repeated for the query heads are taken before the repeat, and a single kv
    head broadcast to every query head (multi-query) is passed as it is; SDPA's fused GQA path serves both."""
    kb, vb = unrepeat(k), unrepeat(v)
    if kb and vb and kb[1] == vb[1] and rank(q) == 4:
        return kb[0], vb[0], True
    if rank(q) == rank(k) == rank(v) == 4 and static_int(shape(k)[-3]) == 1 == static_int(shape(v)[-3]) \
            and static_int(shape(q)[-3]) != 1:
        return k, v, True
    return k, v, False


def _row_fixes(b: "_Builder", m: SiteMatch, causal_ops: set, beta: Optional[fx.Node], v: fx.Node) -> list:
    """What rows whose every key is masked need after SDPA (see passes/mask_semantics.py): NaN where the mask
    is −∞ on the whole row, then the mean of the values where a finite fill covers it."""
    fixes = []
    if beta is not None and not m.safe_softmax and _may_hold_neg_inf(m, causal_ops):
        # sites of one model usually share their mask: one pass over it serves them all
        dead = next((u for u in beta.users if u.op == "call_function" and u.target is _rows_all_neg_inf), None)
        fixes.append((_nan_rows, (dead if dead is not None else b.call(_rows_all_neg_inf, beta),)))
    for i, op in enumerate(m.ops):
        if op.kind == "fill" and i not in causal_ops and op.fill_value is not None and math.isfinite(op.fill_value):
            dead = b.call(_rows_all, _in_final_layout(b, m, i, op.cond), op.fill_where_true)
            if m.extra_columns is None:
                fixes.append((_uniform_rows, (dead, v)))
            else:
                fixes.append((_sink_rows, (dead, v, m.extra_columns, op.fill_value, m.extra_first)))
    if m.zeroed_rows is not None:  # zeroed after the softmax: those rows are 0, whatever the fill made them
        fixes.append((_zero_rows, (b.call(_rows_all, m.zeroed_rows, True),)))
    return fixes


def _layout_before(m: SiteMatch, i: int) -> tuple:
    """(the split dims, whether the scores are split) where the ``i``-th score op of ``m`` applies."""
    split, in_split = None, False
    for op in m.ops[:i]:
        if op.kind == "split":
            split, in_split = op.value, True
        elif op.kind == "merge":
            in_split = False
    return split, in_split


def _in_final_layout(b: "_Builder", m: SiteMatch, i: int, cond: fx.Node) -> fx.Node:
    """A fill condition of the ``i``-th score op seen in the layout the SDPA call runs in (the same view of the
    batch the scores went through from there: split into ``(b, h)`` or merged into ``b·h``)."""
    split, in_split = _layout_before(m, i)
    final_split, final_in_split = _layout_before(m, len(m.ops))
    if in_split and not final_in_split:
        return b.call(_relayout, cond, m.q, m.kt, tuple(split), False)
    if final_in_split and not in_split:
        return b.call(_relayout, cond, m.q, m.kt, tuple(final_split), True)
    return cond


def _zero_rows(out: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Rows the original zeroed after its softmax (every key masked)."""
    if _none_on_cpu(dead):
        return out
    return out.masked_fill(dead, 0.0)


def _may_hold_neg_inf(m: SiteMatch, causal_ops: set) -> bool:
    """Whether the mask can be −∞ on a whole row: a −∞ fill, or a floating term from the model's inputs."""
    for i, op in enumerate(m.ops):
        if op.kind == "fill" and op.fill_value == _NEG_INF:
            return True
        if op.kind == "add":
            value = meta_value(op.value) if isinstance(op.value, fx.Node) else op.value
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return True
            if isinstance(value, float) and value == _NEG_INF:
                return True
    return False


def _rows_all_neg_inf(mask: torch.Tensor) -> torch.Tensor:
    """Query rows where the mask removes every key (bool: True = attend)."""
    if mask.dtype == torch.bool:
        return ~mask.any(-1, keepdim=True)
    return mask.amax(-1, keepdim=True) == float("-inf")


def _nan_rows(out: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The original's softmax over a row of −∞ is NaN; SDPA returns 0 there."""
    if _none_on_cpu(dead):
        return out
    return out.masked_fill(dead, float("nan"))


def _none_on_cpu(dead: torch.Tensor) -> bool:
    """No row to fix, known for free: a CPU tensor with values (on a GPU the check would cost a sync, and while
    a compiler traces there are no values, so the fix is applied as a whole there)."""
    from torch._subclasses.fake_tensor import is_fake
    return dead.device.type == "cpu" and not is_fake(dead) and not bool(dead.any())


def _rows_all(cond: torch.Tensor, where_true: bool) -> torch.Tensor:
    """Query rows whose every key a fill replaces."""
    hit = cond if where_true else ~cond
    return hit.all(-1, keepdim=True)


def _uniform_rows(out: torch.Tensor, dead: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A row of equal (finite, filled) scores is uniform: the mean of the values. SDPA would add the fill to
    the row's own scores instead."""
    if _none_on_cpu(dead):
        return out
    mean = v.mean(-2, keepdim=True)
    if mean.dim() >= 3 and out.dim() >= 3 and mean.shape[-3] != out.shape[-3]:
        mean = mean.repeat_interleave(out.shape[-3] // mean.shape[-3], dim=-3)  # grouped (GQA) values
    return torch.where(dead, mean.to(out.dtype), out)


def _sink_rows(out: torch.Tensor, dead: torch.Tensor, v: torch.Tensor, columns: torch.Tensor, fill: float,
               first: bool) -> torch.Tensor:
    """Rows whose every real key holds the (finite) fill, beside extra key columns (sinks, zero values): the
    original gives each real key ``e^fill / Z`` with ``Z = n e^fill + Σ e^col``, so the row is the values' mean
    times ``n e^fill / Z = sigmoid(fill + log n - logsumexp(col))``; SDPA would add the fill to the scores
    instead. ``v`` holds the extra keys' zero rows (before, ``first``, or after the real ones)."""
    if _none_on_cpu(dead):
        return out
    count = columns.shape[-1]
    real = v[..., count:, :] if first else v[..., :v.shape[-2] - count, :]
    mean = real.float().mean(-2, keepdim=True)
    if mean.dim() >= 3 and out.dim() >= 3 and mean.shape[-3] != out.shape[-3]:
        mean = mean.repeat_interleave(out.shape[-3] // mean.shape[-3], dim=-3)  # grouped (GQA) values
    # the sinks' distance above the fill first: both are large (-1e4, finfo.min), their difference is not
    weight = torch.sigmoid(math.log(real.shape[-2]) - (columns.float().logsumexp(-1, keepdim=True) - fill))
    return torch.where(dead, (weight * mean).to(out.dtype), out)


#: the functions a lowering applies to a site's output (``SiteCall.row_fixes``): ``fix(out, *per_row_args)``
ROW_FIXES = (_nan_rows, _uniform_rows, _zero_rows, _sink_rows)


def _relayout(term: torch.Tensor, q: torch.Tensor, kt: torch.Tensor, split: tuple, to_split: bool) -> torch.Tensor:
    """A score term (broadcastable to the scores) moved between the scores' merged layout (the product's,
    ``[*merged, Nq, Nk]``) and the split layout ``[*split, Nq, Nk]`` of a view that regroups the leading dims.

    The leading dims both layouts end with stay; the rest regroup (``[B·nW, H]`` <-> ``[B, nW, H]``; ``[B·H]`` <->
    ``[B, H]``). A term that is 1 on every regrouped dim is only re-viewed (it broadcasts as it did), otherwise it
    is broadcast over them first, as the original's add did."""
    merged = tuple(torch.broadcast_shapes(q.shape[:-2], kt.shape[:-2]))
    src, dst = (merged, tuple(split)) if to_split else (tuple(split), merged)
    if term.dim() <= 2:
        return term  # it broadcasts over every leading dim of either layout
    if term.dim() > len(src) + 2:
        raise ValueError(f"a score term of shape {tuple(term.shape)} has more dims than the scores {src}")
    term = term.reshape((1,) * (len(src) + 2 - term.dim()) + tuple(term.shape))
    kept = 0  # trailing leading dims the regrouping leaves alone
    while kept < min(len(src), len(dst)) - 1 and src[-1 - kept] == dst[-1 - kept]:
        kept += 1
    cut, rest = len(src) - kept, tuple(term.shape[len(src) - kept:])
    if all(size == 1 for size in term.shape[:cut]):
        return term.reshape((1,) * (len(dst) - kept) + rest)
    return term.expand(*src[:cut], *rest).reshape(*dst[:len(dst) - kept], *rest)


def _to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def _as_bool(b: _Builder, cond: fx.Node) -> fx.Node:
    val = meta_value(cond)
    if val is not None and val.dtype == torch.bool:
        return cond
    return b.call(_to_dtype, cond, torch.bool)


def _only_op(m: SiteMatch, i: int, causal_ops: set) -> bool:
    return all(op.kind in ("cast", "scale", "softcap") or j == i or j in causal_ops for j, op in enumerate(m.ops))


def float_value(v: Any) -> Optional[float]:
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _pymul(b: _Builder, acc: Any, factor: Any, power: int) -> Any:
    """Multiply Python-level scale factors, folding constants and emitting ``operator`` nodes otherwise."""
    if isinstance(factor, (int, float)) and isinstance(acc, (int, float)):
        return acc * factor if power == 1 else acc / factor
    if isinstance(factor, fx.Node) and isinstance(meta_value(factor), torch.Tensor):
        raise AssertionError("tensor factors are folded into q")
    return b.call(operator.mul if power == 1 else operator.truediv, acc, factor)


def _untranspose(b: _Builder, kt: fx.Node) -> fx.Node:
    """k such that ``kt == k.transpose(-2, -1)``: fold into the permute that made kt where possible."""
    r = rank(kt)
    if kt.op == "call_function" and kt.target is PERMUTE:
        x, perm = kt.args
        perm = list(perm)
        perm[-1], perm[-2] = perm[-2], perm[-1]
        if perm == list(range(r)):
            return x
        return b.call(PERMUTE, x, perm)
    perm = list(range(r))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return b.call(PERMUTE, kt, perm)


_VIEW_METHODS = {"reshape", "view"}


def unrepeat(x: fx.Node) -> Optional[tuple]:
    """``(base, n_rep)`` when x repeats each head of a 4-D ``base`` n_rep times (repeat_kv / repeat_interleave)."""
    xs = shape(x)
    if xs is None or len(xs) != 4:
        return None
    if _is_call(x, "repeat_interleave"):
        base = x.args[0]
        reps = x.args[1] if len(x.args) > 1 else x.kwargs.get("repeats")
        dim = x.args[2] if len(x.args) > 2 else x.kwargs.get("dim")
        if isinstance(reps, int) and dim in (1, -3) and shape(base) is not None and len(shape(base)) == 4:
            return base, reps
        return None
    if not (_is_call(x, "reshape") or _is_call(x, "view") or _is_call(x, "_unsafe_view")):
        return None
    ex = x.args[0]
    if not (_is_call(ex, "expand")) or shape(ex) is None or len(shape(ex)) != 5:
        return None
    unsq = ex.args[0]
    us = shape(unsq)
    if us is None or len(us) != 5 or not _is_one(us[2]):
        return None
    base = _squeeze_source(unsq)
    if base is None:
        return None
    bs, es = shape(base), shape(ex)
    if bs is None or len(bs) != 4 or not same_shape(tuple(bs), (us[0], us[1], us[3], us[4])):
        return None
    if not same_shape(tuple(es[:2]), tuple(us[:2])) or not same_shape(tuple(es[3:]), tuple(us[3:])):
        return None
    if not same_shape(tuple(xs), (es[0], es[1] * es[2], es[3], es[4])):
        return None
    n_rep = static_int(es[2])
    return (base, n_rep) if n_rep is not None else None


def _is_one(s) -> bool:
    return static_int(s) == 1


def _squeeze_source(unsq: fx.Node) -> Optional[fx.Node]:
    """The 4-D tensor that ``unsq`` adds a size-1 dim at position 2 to."""
    if _is_call(unsq, "unsqueeze"):
        dim = unsq.args[1] if len(unsq.args) > 1 else unsq.kwargs.get("dim")
        return unsq.args[0] if dim in (2, -3) else None
    if unsq.op == "call_function" and unsq.target is operator.getitem:
        src, idx = unsq.args
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None and all(
                isinstance(i, slice) and i == slice(None) for i in idx[:2]) and all(
                i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in idx[3:]):
            return src
    return None


def _is_call(node: Any, name: str) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    if node.op == "call_function":
        t = node.target
        tname = getattr(t, "__name__", "")
        return tname == name or str(t).startswith(f"aten.{name}.")
    return False
