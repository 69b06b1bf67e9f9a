"""The rewrite pipeline for one captured graph: the only place that knows the order of the steps.

expand nn.MultiheadAttention → normalize → find sites → describe (prove causal masks, read what the masks mean) →
policy → lower beside the original → verify (example, redrawn masks, normalisation vs the graph as captured) →
commit or reject → report; ``rewrite_graph`` reads as these steps.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import cost
from .actions import Action, Decline, Exact, RewriteError, build_target
from .graph import (example_value, hint_int, input_cone, insert_call, is_mutating, meta_value, module_names, rank,
                    remove_dead, same_shape, shape, static_int)
from .passes.adversarial import adversarial_inputs
from .passes.band import BAND, BAND_AT_STATIC_SHAPES, bands_as_dense
from .passes.causal import prove_causal
from .passes.expand_mha import NOTE_KEY as MHA_NOTE, expand_mha
from .passes.find_sites import SiteMatch, find_sites
from .passes.mask_semantics import empty_row_problem, holds_only_zero_one, read_fill_values
from .passes.lower import SiteCall, band_in_mask, build_call, unrepeat
from .passes.normalize import DIV, MUL, PERMUTE, normalize
from .passes.verify import differing_output, record, relative_error, tolerance
from .mixers.sliding_window import banded_attention, banded_flops
from .policy import Policy
from .report import RewriteReport, SiteRow
from .sites import AttentionSite, SiteTable


class Session:
    """State shared by every graph captured from one model: the policy, the report, the found sites."""

    def __init__(self, policy: Policy, report: RewriteReport, model: Optional[torch.nn.Module] = None,
                 mode: str = "rewrite"):
        self.policy, self.report, self.mode = policy, report, mode
        self.sites = SiteTable()
        self._site_keys: set = set()
        self._state_ptrs: Optional[set] = None
        self.model = model
        self.calibration = None          # a calibrate.CalibrationState in mode "calibrate"
        #: a region was rejected because its graph returns an intermediate (the capture may nest graph breaks)
        self.graph_returns_intermediates = False
        self.attached: list = []         # (owner module path, name) of mixers attached to the model
        self.candidates = lambda site: []  # site -> candidate actions, in mode "calibrate"
        #: site key -> the run-time modules a block-level action inserted for it (one per captured graph): token
        #: mergers read their settings on every call, so a ladder of settings is measured on one rewritten model
        self.block_modules: dict = {}
        #: the model's tensors a causal proof or a fill value was read from, with the version they had:
        #: (id(owner), attribute) -> (owner module, attribute, tensor, version); see ``changed_state``
        self.state_guards: dict = {}

    @property
    def errors(self) -> list[str]:
        """Internal errors of this session's graphs (kept in its report, where the user reads them)."""
        return self.report.errors

    def state_ptrs(self) -> set:
        if self._state_ptrs is None:
            ptrs = set()
            if self.model is not None:
                for t in list(self.model.parameters()) + list(self.model.buffers()):
                    ptrs.add(t.data_ptr())
            self._state_ptrs = ptrs
        return self._state_ptrs

    def is_state(self, node: fx.Node, value: Any) -> bool:
        if isinstance(value, torch.nn.Parameter):
            return True
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", None)
        if callable(source):
            try:
                if source().startswith("L['self']"):
                    return True
            except Exception:
                pass
        if isinstance(value, torch.Tensor) and value.data_ptr() in self.state_ptrs():
            return True
        return False


    def guard_reads(self, nodes: list, values: dict) -> None:
        """Remember the model tensors (buffers, parameters, tensor attributes) that ``nodes`` stand for: what a
        proof or a lowering read from them holds only while they hold the same values."""
        if self.model is None or not nodes:
            return
        places = {}
        for module in self.model.modules():
            for store in (module._buffers, module._parameters, module.__dict__):
                for attr, t in store.items():
                    if isinstance(t, torch.Tensor):
                        places.setdefault(id(t), (module, attr))
        for node in nodes:
            value = values.get(node)
            place = places.get(id(value)) if isinstance(value, torch.Tensor) else None
            if place is not None:
                self._guard(*place, value)

    def guard_baked_state(self, gm: fx.GraphModule, node: fx.Node) -> None:
        """Guard the buffers a mixer declares ``baked_state`` (values a compiled graph turns into structure), as
        they stand after verification ran it (a first fit included)."""
        while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]  # through the row fixes and flattening applied to the mixer's output
        if node.op != "call_module":
            return
        module = gm.get_submodule(node.target)
        for name in getattr(module, "baked_state", ()):
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor):
                self._guard(module, name, tensor)

    def _guard(self, owner: torch.nn.Module, attr: str, tensor: torch.Tensor) -> None:
        self.state_guards[(id(owner), attr)] = (owner, attr, tensor, tensor._version)

    def changed_state(self) -> Optional[str]:
        """The first guarded tensor that was replaced or changed in place since it was read, or None."""
        for owner, attr, tensor, version in self.state_guards.values():
            now = getattr(owner, attr, None)
            if now is not tensor or getattr(now, "_version", version) != version:
                names = {id(m): n for n, m in self.model.named_modules()} if self.model is not None else {}
                where = names.get(id(owner), type(owner).__name__)
                return f"{where + '.' if where else ''}{attr}"
        return None


def rewrite_graph(gm: fx.GraphModule, example_inputs: list, session: Session) -> fx.GraphModule:
    """Rewrite one captured graph in place according to the session's policy; record what happened."""
    session.report.graphs += 1
    expand_mha(gm)
    captured = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # as captured: normalize must compute the same
    run = GraphRun(gm, example_inputs, session)
    normalized = normalize(gm, binary=lambda node: holds_only_zero_one(node, run.values, run.is_state_read))
    with module_names(session.model):
        normalized += bands_as_dense(gm)
    matches = _find(gm, session)
    if not matches:
        return _as_captured(gm, captured) if normalized else gm
    sites = [_describe_site(run, m) for m in matches]
    session.guard_reads(run.reads, run.values)
    _ask_policy(session.policy.prepare, [s.site for s in sites])
    for s in sites:
        _lower(run, s)
    checked = _verify(run, sites, captured if normalized else None)
    for s in sites:
        _commit_or_reject(run, s, checked)
    _block_level(run, sites)
    _finish(run, sites)
    return gm


@dataclasses.dataclass
class Lowered:
    """One site on its way through ``rewrite_graph``: what was decided for it and what was inserted."""
    match: SiteMatch
    site: AttentionSite
    causal_ops: set
    action: Optional[Action] = None
    call: Optional[SiteCall] = None
    new: Optional[fx.Node] = None     # the replacement's output node, not yet wired in; None: left as it was
    note: str = ""


class GraphRun:
    """One captured graph with its example values, and the model state its proofs read."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, session: Session):
        self.gm, self.session = gm, session
        self.inputs = [_concrete(x) for x in example_inputs]
        self.values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], self.inputs))
        self.reads: list = []

    def is_state(self, node: fx.Node) -> bool:
        return self.session.is_state(node, self.values.get(node))

    def is_state_read(self, node: fx.Node) -> bool:
        """``is_state``, remembering the node: what a proof or a fill value reads from the model is guarded."""
        if self.is_state(node):
            self.reads.append(node)
            return True
        return False


def _find(gm: fx.GraphModule, session: Session) -> list:
    """The matched sites; rejected attention-like regions go to the report."""
    with module_names(session.model):
        matches, rejected, others = find_sites(gm)
    session.report.record_other_softmax(others)
    for r in rejected:
        if r.softmax is not None and r.softmax.meta.get(BAND_AT_STATIC_SHAPES):
            continue  # a band seen at symbolic sizes: its entry recompiles with static shapes, where it is read
        session.report.record_rejected(r.name, r.reason, r.ordinal)
        session.graph_returns_intermediates |= r.returned
        _add_site(session, _describe(r, {}, False, []))
    return matches


def _as_captured(gm: fx.GraphModule, captured: fx.GraphModule) -> fx.GraphModule:
    """Nothing to rewrite: the graph runs exactly as it was captured, not as normalised."""
    gm.graph = captured.graph
    gm.recompile()
    return gm


def _describe_site(run: GraphRun, m: SiteMatch) -> Lowered:
    """Prove its causal mask, read what its masks mean, and describe the site for the policy."""
    unreadable_fill = read_fill_values(run.gm, m, run.values, run.is_state_read)
    causal_ops, is_causal = _prove(run.gm, m, run.values, run.is_state, run.reads)
    problem = unreadable_fill or empty_row_problem(m, causal_ops)
    if problem and not unreadable_fill:  # a static fill that never empties a row (a causal band) empties none
        problem = empty_row_problem(m, causal_ops | _fills_keeping_rows(run.gm, m, causal_ops, run.values,
                                                                         run.is_state, run.reads))
    if problem:
        m.status, m.reason = "rejected", problem
    site = _describe(m, run.values, is_causal, causal_ops, run.is_state, run.session.model)
    _add_site(run.session, site)
    return Lowered(m, site, causal_ops)


def _lower(run: GraphRun, s: Lowered) -> None:
    """Decide the site's action and insert its replacement beside the original (nothing is rewired yet)."""
    session, m = run.session, s.match
    action = _ask_policy(session.policy.action_for, s.site) if session.mode == "rewrite" else None
    kept_band = action is None and session.mode == "rewrite" and _band(m) is not None
    if kept_band:  # its chunked spelling is gone from the graph (passes/band.py): "as it was" is the exact band
        action = Exact()
    if m.status == "rejected":  # by what its masks mean (passes/mask_semantics.py)
        s.note = m.reason
        return
    if m.kind == "mha":  # left opaque by expand_mha: the note says why
        s.note = f"nn.MultiheadAttention kept as one call: {m.output.meta.get(MHA_NOTE, 'not expandable')}"
        return
    kept = _beyond_sdpa(session, action, s.site)
    if kept:
        s.action, s.note = action, _with_note(kept, m)   # left as it was
        return
    if session.calibration is not None:
        s.action, s.call, s.new, s.note = _switch_site(session, run.gm.graph, m, s.site, s.causal_ops)
        return
    if action is None or (m.kind == "sdpa" and isinstance(action, Exact)):
        s.action = action
        s.note = _with_note("already scaled_dot_product_attention" if action is not None
                            else "the policy leaves it as it was", m)
        return
    call = build_call(run.gm.graph, m, *_causal_for_sdpa(m, s.causal_ops))
    if not (isinstance(action, Exact) and action.kernel != "triton"):
        band_in_mask(run.gm.graph, m.output, call)  # the banded kernel serves exact SDPA only
    if action.reads_example_mask:
        _example_mask_onto(s.site, call)
    target = build_target(action, call, s.site)
    _restore_fitted(session, s.site, action, target)
    target = _attach_state(session, s.site, action, target)
    note = ""
    if isinstance(target, Decline):
        note = f"{type(action).__name__} declined: {target}; fell back to Exact"
        action = Exact()
        target = build_target(action, call, s.site)
    s.action, s.call, s.new = action, call, _insert_target(run.gm, m, target, call,
                                                           block_level=getattr(action, "block_level", False))
    if kept_band:
        note = "the policy leaves it: its chunked spelling is not kept, so it runs exact on the banded kernel"
    s.note = _with_note(note, m)


def _beyond_sdpa(session: "Session", action, site: AttentionSite) -> str:
    """Why a site that computes more than SDPA expresses (a soft-cap) stays as it was: a calibration switch holds
    SDPA, and an action that cannot serve it has no exact fallback (``""``: the site is lowered as usual)."""
    gap = Exact().unserved(site)
    if not gap or (action is None and session.calibration is None):
        return ""
    return gap if session.calibration is not None else action.unserved(site)


@dataclasses.dataclass
class Checked:
    """Values of the graph's nodes on the example (``values``) and with its masks redrawn (``redrawn``)."""
    values: dict
    redrawn: Optional[dict]


def _verify(run: GraphRun, sites: list, captured: Optional[fx.GraphModule]) -> Checked:
    """Run the graph (originals and replacements side by side) on the example and on the example with its
    masks redrawn; where normalisation changed the graph, check it computes what the graph as captured did."""
    wanted = set()
    for s in sites:
        m = s.match
        wanted |= {m.output, m.q, m.kt, m.v}
        wanted |= {op.value for op in m.ops if op.kind == "scale" and isinstance(op.value, fx.Node)}
        wanted |= {product for product, _ in m.more_outputs}
        if s.new is not None:
            wanted |= {s.new, s.call.q, s.call.k, s.call.v} | {piece for _, piece in s.call.more_new}
            if isinstance(s.call.scale, fx.Node):
                wanted.add(s.call.scale)
    outputs: list = []
    values = record(run.gm, run.inputs, wanted, outputs=outputs)
    redrawn, batch, redrawn_outputs = _verify_redrawn(run.gm, [s.match for s in sites], run.inputs, wanted,
                                                      run.is_state)
    if captured is not None and not any(is_mutating(n) for n in captured.graph.nodes):
        problem = differing_output(run.gm, outputs, captured, run.inputs)
        if problem is None and batch is not None:
            problem = differing_output(run.gm, redrawn_outputs, captured, batch)
        if problem:
            raise RewriteError(f"rewrite's normalisation changed what a captured graph computes ({problem}). This "
                               "is a bug in rewrite, not in the model: please report it with the model. Nothing "
                               "was rewritten.")
    return Checked(values, redrawn)


def _commit_or_reject(run: GraphRun, s: Lowered, checked: Checked) -> None:
    """Wire the replacement in if it passed (exact: within tolerance on both runs), else remove it; report."""
    m, site, action, call, new, vals = s.match, s.site, s.action, s.call, s.new, checked.values
    site.scale = _scale_value(m, vals)
    row = _row(m, site, vals)
    graph = run.gm.graph
    if new is None:
        row.status, row.reason = ("rejected" if m.status == "rejected" else "kept"), s.note
        row.action = action.describe() if action is not None else "-"
        row.exact = True
        row.flops_after, row.flops_after_expr = row.flops_before, row.flops_before_expr
        run.session.report.record_site(row)
        return
    err = _site_error(vals, m, new, call)
    tol = tolerance(vals[m.output].dtype) if isinstance(vals.get(m.output), torch.Tensor) else 1e-4
    row.action, row.exact, row.error = action.describe(), bool(action.exact), err
    where = ""
    if action.exact and err <= tol and checked.redrawn is not None:
        err_redrawn = _site_error(checked.redrawn, m, new, call)
        if not err_redrawn <= tol:
            err, where = err_redrawn, " on the example with its masks redrawn (random padding, a row with no key)"
    if action.exact and not err <= tol:
        remove_dead(graph, [new] + [piece for _, piece in call.more_new] + list(reversed(call.new_nodes)))
        row.status = "rejected"
        row.reason = (f"the fused call differs from the original by {err:.2e} (tolerance {tol:.0e}){where}; "
                      "left as it was")
        site.status, site.reason = "rejected", row.reason
    else:
        m.output.replace_all_uses_with(new)
        for product, piece in call.more_new:
            product.replace_all_uses_with(piece)
        _detach_shape_users(graph, m)
        remove_dead(graph, [m.output] + list(m.region) + list(m.dead_users))  # dead users go first
        row.status, row.reason = "rewritten", s.note
        row.flops_after, row.flops_after_expr = _action_flops(action, vals, m, row)
        row.bytes_after = _bytes(vals, m, materialized=False)
    run.session.report.plan[site.name] = action.to_json()
    run.session.report.record_site(row)


def _site_error(vals: dict, m: SiteMatch, new: fx.Node, call: SiteCall) -> float:
    """The relative error of the replacement against the original, the worst over the site's outputs."""
    pairs = [(m.output, new)] + list(call.more_new)
    return max(relative_error(vals.get(original), vals.get(replacement)) for original, replacement in pairs)


def _block_level(run: GraphRun, sites: list) -> None:
    """Block-level actions (``MergeTokens``): once every site is lowered and committed, one pass rewrites the graph
    around them (passes/merge_tokens.py). A decline leaves each such site exact, with the reason."""
    chosen = [s for s in sites if getattr(s.action, "block_level", False) and s.new is not None
              and s.site.status != "rejected"]
    if not chosen:
        return
    from .passes.merge_tokens import MergeRequest, merge_tokens
    outcomes = merge_tokens(run.gm, run.inputs, [MergeRequest(s.site.key, s.action, s.new) for s in chosen],
                            run.is_state)
    rows = {(r.name, r.ordinal): r for r in run.session.report.sites}
    merged = {s.site.key for s, outcome in zip(chosen, outcomes) if outcome.ok}
    for node in run.gm.graph.nodes:
        if node.op == "call_module" and node.meta.get("rewrite_site") in merged:
            run.session.block_modules.setdefault(node.meta["rewrite_site"], []).append(run.gm.get_submodule(node.target))
    for s, outcome in zip(chosen, outcomes):
        row = rows.get(s.site.key)
        if outcome.ok:
            note, row.error = outcome.note, outcome.error
            if row.flops_after is not None:  # its attention runs on the tokens the merges before it left
                row.flops_after *= (outcome.attended / outcome.tokens[0]) ** 2
        else:
            note = f"{type(s.action).__name__} declined: {outcome.note}; fell back to Exact"
            row.action, row.exact = Exact().describe(), True
            run.session.report.plan[s.site.name] = Exact().to_json()
        if note not in row.reason:  # a recompile (another length) reports its own token counts once
            row.reason = "; ".join(x for x in (row.reason, note) if x)


def _detach_shape_users(graph: fx.Graph, m: SiteMatch) -> None:
    """Users that read only the shape of the scores (XLM's ``mask.expand_as(scores)``) read it from q and k
    instead, so the N x N scores are not computed for their shape alone. A node whose shape is not the
    product's (a broadcast on the way) keeps its readers, and stays computed."""
    for user, node in m.shape_users:
        if user.graph is not graph or not same_shape(shape(node), shape(m.qk)):
            continue
        size = insert_call(graph, user, scores_shape, (m.q, m.kt), {})
        if user.op == "call_method" and user.target in ("expand_as", "reshape_as", "view_as"):
            how = {"expand_as": "expand", "reshape_as": "reshape", "view_as": "view"}[user.target]
            new = insert_call(graph, user, how, (user.args[0], size), {}, like=user, method=True)
        elif user.op == "call_function" and user.target is getattr:
            new = size if user.args[1] == "shape" else insert_call(graph, user, len, (size,), {})
        elif user.op == "call_method" and user.target == "dim":
            new = insert_call(graph, user, len, (size,), {})
        else:  # size() / size(d) / sym_size(d)
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
            new = size if dim is None else insert_call(graph, user, operator.getitem, (size, dim), {})
        user.replace_all_uses_with(new)
        graph.erase_node(user)


def scores_shape(q: torch.Tensor, kt: torch.Tensor) -> torch.Size:
    """The shape of ``q @ kt``."""
    return torch.Size(torch.broadcast_shapes(q.shape[:-2], kt.shape[:-2]) + (q.shape[-2], kt.shape[-1]))


def _finish(run: GraphRun, sites: list) -> None:
    """Guard the state the kept replacements baked in; lint and recompile the graph."""
    for s in sites:
        if s.new is not None and s.site.status != "rejected":
            run.session.guard_baked_state(run.gm, s.new)
    run.gm.graph.lint()
    run.gm.recompile()


def _verify_redrawn(gm: fx.GraphModule, matches: list, example_inputs: list, wanted: set, is_state) -> tuple:
    """``(values of wanted, the batch, the graph's outputs)`` on the example with its mask inputs redrawn
    (passes/adversarial.py); ``(None, None, None)`` when the graph has no mask input, changes state in place (a
    second run would change it twice), or cannot run so."""
    if any(is_mutating(n) for n in gm.graph.nodes):
        return None, None, None
    batch = adversarial_inputs(gm, matches, example_inputs, is_state)
    if batch is None:
        return None, None, None
    outputs: list = []
    try:
        return record(gm, batch, wanted, outputs=outputs), batch, outputs
    except Exception:  # noqa: BLE001 - a model that refuses such masks (an assert on them) is verified as before
        return None, None, None


def _ask_policy(method, arg):
    """Call the policy; its own failure (a callable policy that raises) is the user's to see, named, never a
    graph quietly left as it was."""
    try:
        return method(arg)
    except RewriteError:
        raise
    except Exception as err:
        policy = getattr(method, "__self__", None)
        name = policy.describe() if policy is not None else "policy"
        raise RewriteError(f"The policy {name!r} raised {type(err).__name__}: {err}. Fix the policy; the model was "
                           "left as it was.") from err


def _with_note(reason: str, m: SiteMatch) -> str:
    """The reason, plus what an earlier pass changed at this site (e.g. an expanded nn.MultiheadAttention)."""
    note = m.output.meta.get(MHA_NOTE)
    return "; ".join(x for x in (reason, note) if x)


def _switch_site(session: "Session", graph: fx.Graph, m: SiteMatch, site: AttentionSite, causal_ops: set) -> tuple:
    """Calibration: lower the site to a switch holding the exact call and every candidate for it; returns
    ``(action, call, new node, note)`` as ``_lower`` records them."""
    state = session.calibration  # a calibrate.CalibrationState: it makes the switches (no import upwards)
    call = build_call(graph, m, *_causal_for_sdpa(m, causal_ops))
    band_in_mask(graph, m.output, call)
    actions = session.candidates(site)
    if any(a.reads_example_mask for a in actions):
        _example_mask_onto(site, call)
    exact = build_target(Exact(), call, site)
    candidates = {}
    for action in actions:
        ck = action.describe()
        target = build_target(action, call, site)
        if isinstance(target, Decline):
            state.declined[(site.key, ck)] = str(target)
        else:
            candidates[ck] = target
    new = _insert_target(graph.owning_module, m, state.switch_for(site, exact, candidates), call)
    return Exact(), call, new, "calibrating"


def _example_mask_onto(site: AttentionSite, call: SiteCall) -> None:
    """The site's lowered mask on the example batch, for handlers (which never evaluate the graph)."""
    if not isinstance(call.attn_mask, fx.Node):
        site.example_mask, site.example_mask_known = call.attn_mask, True
        return
    value = example_value(call.attn_mask)
    site.example_mask, site.example_mask_known = value, value is not None


def _insert_target(gm: fx.GraphModule, m: SiteMatch, target: Any, call: SiteCall,
                   block_level: bool = False) -> fx.Node:
    """Call the replacement with SDPA's signature before the site's output; modules become submodules. SDPA is
    called in a form its fused kernels take, except for a block-level action (its pass reads the SDPA call's own
    inputs)."""
    graph = gm.graph
    args = (call.q, call.k, call.v)
    if isinstance(target, torch.nn.Module):
        name = f"rewrite_{m.name.replace('.', '_') or 'site'}_{m.ordinal}"
        i = 0
        while hasattr(gm, f"{name}_{i}"):
            i += 1
        gm.add_submodule(f"{name}_{i}", target)
        register_state_sources(gm, f"{name}_{i}", target)
        with graph.inserting_before(m.output):
            new = graph.call_module(f"{name}_{i}", args, call.kwargs())
        for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
            if key in m.output.meta:
                new.meta[key] = m.output.meta[key]
        new.meta["rewrite_site"] = (m.name, m.ordinal)
    elif target is F.scaled_dot_product_attention and call.band is not None:  # a band fill: O(n·w), not N x N
        new = insert_call(graph, m.output, banded_attention, args, {**call.kwargs(), "band": call.band},
                          like=m.output)
    elif target is F.scaled_dot_product_attention and not block_level:
        new = _sdpa_on_a_fused_kernel(graph, m.output, call)
    else:
        new = insert_call(graph, m.output, target, args, call.kwargs(), like=m.output)
    for fix, extra in call.row_fixes:
        call.new_nodes.append(new)
        new = insert_call(graph, m.output, fix, (new, *extra), {}, like=m.output)
    if call.flatten_output:
        call.new_nodes.append(new)
        new = insert_call(graph, m.output, torch.flatten, (new, 0, call.flatten_output - 1), like=m.output)
    if call.transpose_output:
        call.new_nodes.append(new)
        new = insert_call(graph, m.output, transposed_output, (new,), like=m.output)
    if m.more_outputs:  # the joint output of several value products, split back into each one's columns
        call.new_nodes.append(new)
        start, joint = 0, new
        for product, node in [(m.output, m.v)] + list(m.more_outputs):
            width = static_int(shape(node)[-1])
            piece = insert_call(graph, m.output, torch.narrow, (joint, -1, start, width), like=product)
            call.more_new.append((product, piece))
            start += width
        new = call.more_new.pop(0)[1]
    return new


def _sdpa_on_a_fused_kernel(graph: fx.Graph, before: fx.Node, call: SiteCall) -> fx.Node:
    """SDPA on the site's inputs, in a form its fused kernels take: otherwise SDPA runs its math path, which forms
    the N x N scores (3-5x slower at 1k tokens on this CPU: ``bench/bench_exact.py --layouts``). The fused kernels
    take 4-D inputs with a unit-stride feature dim, values as wide as the keys (on CPU) and a mask of rank 2 or 4."""
    def through(name: str, fn, *args) -> None:  # the call's input ``name`` becomes ``fn(input, *args)``
        node = insert_call(graph, before, fn, (getattr(call, name), *args), {}, like=before)
        call.new_nodes.append(node)
        setattr(call, name, node)

    _features_contiguous(call, through)
    value_width = _widths_matched(call, through)
    folded = rank(call.q) == 3
    if folded:  # (b·h) n d: one batch of b·h heads
        for name in ("q", "k", "v"):
            through(name, torch.unsqueeze, 0)
    if rank(call.q) == 4 and rank(call.attn_mask) == 3:  # [h, nq, nk] (or (b·h) nq nk) beside 4-D inputs
        through("attn_mask", torch.unsqueeze, 0)
    several_batch_dims = (rank(call.q) or 0) > 4 and rank(call.k) == rank(call.v) == rank(call.q)
    target = sdpa_leading_dims_flattened if several_batch_dims else F.scaled_dot_product_attention
    out = insert_call(graph, before, target, (call.q, call.k, call.v), call.kwargs(), like=before)
    after = [(torch.squeeze, (0,))] if folded else []
    if value_width is not None:
        after.append((torch.narrow, (-1, 0, value_width)))
    for fn, args in after:
        call.new_nodes.append(out)
        out = insert_call(graph, before, fn, (out, *args), {}, like=before)
    return out


def _features_contiguous(call: SiteCall, through: Callable) -> None:
    """q, k and v whose feature dim is strided on the example (keys written transposed, ``[b, h, d, n]``, and
    untransposed by the lowering) are copied contiguous first (a copy of q, k or v costs N·d)."""
    for name in ("q", "k", "v"):
        value = meta_value(getattr(call, name))
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[-1] > 1 and value.stride(-1) != 1:
            through(name, torch.Tensor.contiguous)


def _widths_matched(call: SiteCall, through: Callable) -> Optional[int]:
    """On CPU, values wider or narrower than the keys (LeViT's ``attn_ratio``) make SDPA run its math path: q and k,
    or v, are padded with zeros to the wider width (a zero feature adds nothing to q·kᵀ; the scale is kept explicit),
    and the output is cut back to the values' width, which is returned (None: the widths already match)."""
    q, v = meta_value(call.q), meta_value(call.v)
    if not (isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor)) or q.device.type != "cpu":
        return None
    d, dv = static_int(q.shape[-1]), static_int(v.shape[-1])
    if d is None or dv is None or d == dv:
        return None
    if call.scale is None:
        call.scale = d ** -0.5
    for name, width in (("q", d), ("k", d), ("v", dv)):
        if width < max(d, dv):
            through(name, F.pad, (0, max(d, dv) - width))
    return dv


def sdpa_leading_dims_flattened(q, k, v, attn_mask=None, **kwargs) -> torch.Tensor:
    """SDPA on inputs with several batch dims (``[b, blocks, h, n, d]``: block-local attention), run as one batch:
    the fused kernels take 4-D inputs only, and more dims run the math path (N x N scores per block, slower)."""
    lead = q.shape[:-3]
    if k.shape[:-3] != lead or v.shape[:-3] != lead:  # batch dims that broadcast: as SDPA takes them
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    if attn_mask is not None and attn_mask.dim() > 2:  # to q's batch dims, flattened (a 3-D mask skips the kernel)
        mask = attn_mask.reshape((1,) * (q.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
        attn_mask = mask.expand(*lead, *mask.shape[-3:]).flatten(0, len(lead) - 1)
    out = F.scaled_dot_product_attention(q.flatten(0, len(lead) - 1), k.flatten(0, len(lead) - 1),
                                         v.flatten(0, len(lead) - 1), attn_mask=attn_mask, **kwargs)
    return out.unflatten(0, lead)


def transposed_output(out: torch.Tensor) -> torch.Tensor:
    """SDPA's ``[.., Nq, d]`` output as the ``v @ pᵀ`` product gives it: ``[.., d, Nq]``, laid out contiguously
    (callers ``view`` it)."""
    return out.transpose(-2, -1).contiguous()


def register_state_sources(gm: fx.GraphModule, name: str, module: torch.nn.Module) -> None:
    """Give the parameters and buffers of a mixer inserted as submodule ``name`` a source, as Dynamo does for
    its own graph attributes (``gm._param_name_to_source``): AOTAutograd (``then="inductor"``) lifts every
    parameter and buffer of the graph module into a graph input and looks each one up there. They stay
    inputs (never baked in as constants), so state loaded in place later (``load_state_dict``) is used."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:  # not a Dynamo graph (torch.export, a plain GraphModule): nothing to keep in step
        return
    from torch._dynamo.source import ConstantSource
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for leaf, _ in named:
        key = f"{name}.{leaf}"
        sources.setdefault(key, ConstantSource(f"__rewrite_state__.{key}"))


def _restore_fitted(session: "Session", site: AttentionSite, action: Action, target: Any) -> None:
    """A mixer fitted during calibration gets its fitted buffers back when the final plan is applied."""
    fitted = getattr(session.policy, "fitted", None)
    if not fitted or not isinstance(target, torch.nn.Module):
        return
    state = fitted.get((site.key, action.describe()))  # fitted state is keyed as calibrate.candidate_key keys it
    if state is not None:
        target.load_state_dict(state)


def _attach_state(session: "Session", site: AttentionSite, action: Action, target: Any) -> Any:
    """A mixer with state (fitted buffers) lives on the module that owns the site, so the model's
    ``state_dict`` saves and restores it; a recompile reuses the attached instance."""
    if session.mode != "rewrite" or session.model is None or not isinstance(target, torch.nn.Module):
        return target
    if not list(target.state_dict()):
        return target
    try:
        owner = session.model.get_submodule(site.name)
    except AttributeError:
        return target
    key = f"rewrite_{type(action).__name__.lower()}_{site.ordinal}"
    existing = owner._modules.get(key)
    if type(existing) is type(target) and getattr(existing, "_rewrite_action", None) == action:
        return existing
    target._rewrite_action = action
    owner.add_module(key, target)
    session.attached.append((site.name, key))
    return target


def _concrete(x: Any) -> Any:
    """A recompile for dynamic shapes hands sizes over as SymInts: use the values they stand for."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = x.node.hint
        return hint if hint is not None else x
    return x


def _add_site(session: Session, site: AttentionSite) -> None:
    if site.key in session._site_keys:
        return
    session._site_keys.add(site.key)
    site.index = len(session.sites)
    session.sites.append(site)


def _prove(gm, m: SiteMatch, values: dict, is_state, reads: list) -> tuple[set, bool]:
    """Indices of the score ops proven to be the causal mask, and whether one was proven. The model state a
    successful proof read goes to ``reads`` (it holds only while that state does)."""
    if m.kind == "sdpa":
        return set(), bool(m.sdpa_kwargs.get("is_causal"))
    causal = {i for i, op in enumerate(m.ops) if op.kind in ("add", "fill")
              and _proven(gm, m, op, values, is_state, reads)}
    # extra keys (sinks) are seen by every query: a causal fill there stays in the mask, never is_causal (it still
    # never empties a row)
    return causal, bool(causal) and m.extra_columns is None


def _fills_keeping_rows(gm, m: SiteMatch, causal_ops: set, values: dict, is_state, reads: list) -> set:
    """Indices of the finite fills of ``m`` (not the causal mask) proven to leave every query row a key, so the
    rows a finite fill would empty (where SDPA differs from the original) do not occur. The state a proof read
    goes to ``reads``."""
    kept = {i for i, op in enumerate(m.ops) if op.kind == "fill" and i not in causal_ops
            and math.isfinite(getattr(op, "fill_value", -math.inf))
            and _proven(gm, m, op, values, is_state, reads, keeps_rows=True)}
    together = sorted(kept | {i for i in causal_ops if m.ops[i].kind == "fill"})
    if len(together) > 1 and not _keep_rows_together(m, together):
        return set()  # each keeps a key in every row, but perhaps not the same one
    return kept


def _keep_rows_together(m: SiteMatch, fills: list) -> bool:
    """Whether the fills ``fills`` of ``m`` together leave every query row a key: evaluated at the captured shape,
    which is every shape only when the scores' shape is static (otherwise: not proven)."""
    if not all(isinstance(d, int) for d in (*(shape(m.q) or (None,)), *(shape(m.kt) or (None,)))):
        return False
    filled = None
    for i in fills:
        op = m.ops[i]
        cond = example_value(op.cond)
        if not isinstance(cond, torch.Tensor):
            return False
        hit = cond.bool() if op.fill_where_true else ~cond.bool()
        filled = hit if filled is None else filled | hit
    return bool((~filled).any(-1).all())


def _proven(gm, m: SiteMatch, op, values: dict, is_state, reads: list, **how) -> bool:
    """Whether ``prove_causal`` proves ``op`` (``how``: what it proves); the model state a successful proof read
    goes to ``reads``. Anything the prover cannot evaluate is simply not proven."""
    read: list = []

    def is_state_read(node: fx.Node) -> bool:
        if is_state(node):
            read.append(node)
            return True
        return False
    try:
        ok, _why = prove_causal(gm, m, op, values, is_state_read, **how)
    except Exception:  # noqa: BLE001 - not proven
        ok = False
    if ok:
        reads.extend(read)
    return ok


def _causal_for_sdpa(m: SiteMatch, causal_ops: set) -> tuple[set, bool]:
    """SDPA takes ``is_causal`` only without another mask: otherwise the causal term stays in the mask."""
    masks = [i for i, op in enumerate(m.ops) if op.kind in ("add", "fill")]
    if causal_ops and len(causal_ops) == len(masks) and m.extra_columns is None:
        return causal_ops, True
    return set(), False


def _describe(m: SiteMatch, values: dict, is_causal: bool, causal_ops, is_state=None,
              model: Optional[torch.nn.Module] = None) -> AttentionSite:
    qs, kts, vs = shape(m.q) or (), shape(m.kt) or (), shape(m.v) or ()
    ks = tuple(kts[:-2]) + (kts[-1], kts[-2]) if len(kts) >= 2 and m.kind != "sdpa" else tuple(kts)
    site = AttentionSite(name=m.name, index=m.index, status=m.status, reason=m.reason, kind=m.kind,
                         q_shape=tuple(qs), k_shape=ks, v_shape=tuple(vs), ordinal=m.ordinal)
    if m.status != "matched":
        return site
    if m.kind == "mha":
        site.heads = m.sdpa_kwargs.get("num_heads") if isinstance(m.sdpa_kwargs.get("num_heads"), int) else None
        site.kv_heads = site.heads
        site.head_dim = _int(qs[-1]) // site.heads if site.heads and qs else None
        site.layout = "n b e (nn.MultiheadAttention)"
        return site
    site.head_dim = _int(qs[-1]) if qs else None
    split = [op.value for op in m.ops if op.kind == "split"]
    if split and len(shape(m.softmax) or ()) == 4:
        site.heads = site.kv_heads = _int(shape(m.softmax)[-3])
    elif len(qs) >= 4:  # heads at dim -3, as SDPA reads them (more leading dims are batch: blocks, windows)
        site.heads = _int(qs[-3])
        base = unrepeat(m.v) if m.kind != "sdpa" else None
        site.kv_heads = _int(shape(base[0])[-3]) if base else _int(vs[-3]) if len(vs) >= 4 else None
        site.gqa = bool(site.kv_heads and site.heads and site.kv_heads != site.heads)
    site.layout = _layout(m)
    site.cross = bool(qs and ks) and str(qs[-2]) != str(ks[-2])
    site.is_causal = is_causal
    site.dropout_p = float(m.dropout_p) if isinstance(m.dropout_p, (int, float)) else -1.0
    site.softmax_dtype = str(m.softmax_dtype).replace("torch.", "") if m.softmax_dtype else None
    q = meta_value(m.q)
    site.dtype = str(q.dtype).replace("torch.", "") if isinstance(q, torch.Tensor) else None
    site.mask = _mask_kind(m, causal_ops, is_causal, is_state)
    site.softcap = m.softcap
    site.sinks = (_int((shape(m.extra_columns) or (1,))[-1]) or 1) if m.extra_columns is not None else 0
    site.grid, site.prefix_tokens = _vision_grid(model, _int(qs[-2]) if qs else None)
    return site


def _vision_grid(model: Optional[torch.nn.Module], n: Optional[int]) -> tuple:
    """(grid, prefix_tokens) for a vision site of n tokens, from the model's config; (None, None) if unknown."""
    cfg = getattr(model, "config", None)
    if cfg is None or n is None:
        return None, None
    cfg = getattr(cfg, "vision_config", None) or cfg
    window = getattr(cfg, "window_size", None)
    if isinstance(window, int) and window * window == n:  # Swin-style windows
        return (window, window), 0
    image, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
    if image is None or patch is None:
        return None, None
    ih, iw = image if isinstance(image, (list, tuple)) else (image, image)
    ph, pw = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    gh, gw = ih // ph, iw // pw
    if 0 <= n - gh * gw <= 8:
        return (gh, gw), n - gh * gw
    return None, None


def _mask_kind(m: SiteMatch, causal_ops, is_causal: bool, is_state) -> str:
    if m.kind == "sdpa":
        kinds = []
        if m.sdpa_kwargs.get("is_causal"):
            kinds.append("causal")
        if m.sdpa_kwargs.get("attn_mask") is not None:
            mask = meta_value(m.sdpa_kwargs["attn_mask"])
            kinds.append("boolean" if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool else "additive")
        return "+".join(kinds) or "none"
    kinds = ["causal"] if is_causal or causal_ops else []
    for i, op in enumerate(m.ops):
        if op.kind not in ("add", "fill") or i in causal_ops:
            continue
        if op.kind == "add" and isinstance(op.value, (int, float)):
            continue  # a constant shift of every score: no mask at all
        if op.kind == "fill":
            kind = "boolean"
        else:
            kind = _term_kind(op.value, is_state)
        if kind not in kinds:
            kinds.append(kind)
    return "+".join(kinds) or "none"


def _term_kind(term: Any, is_state) -> str:
    if not isinstance(term, fx.Node):
        return "additive"
    _, leaves = input_cone(term)
    has_param = any(isinstance(meta_value(n), torch.Tensor) and getattr(meta_value(n), "requires_grad", False)
                    for n in leaves)
    if has_param:
        return "bias"
    s = shape(term)
    if s and len(s) >= 3 and _int(s[-2]) == 1 and (_int(s[-3]) or 0) > 1:
        return "alibi"  # per-head, constant over queries: a linear position bias
    return "additive"


def _layout(m: SiteMatch) -> str:
    qs = shape(m.q)
    if qs is None:
        return ""
    if len(qs) == 3:
        return "(b h) n d, scores as b h n n" if any(op.kind == "split" for op in m.ops) else "(b h) n d"
    if len(qs) == 4:
        src = m.q
        if src.op == "call_function" and src.target is PERMUTE and list(src.args[1]) == [0, 2, 1, 3]:
            return "b n h d -> b h n d"
        return "b h n d"
    return f"{len(qs)}-d"


def _int(v) -> Optional[int]:
    """A size for the report: its value on the captured inputs, without specialising the graph to it."""
    return hint_int(v)


def _scale_value(m: SiteMatch, vals: dict) -> Optional[float]:
    if m.kind == "sdpa":
        s = m.sdpa_kwargs.get("scale")
        q = vals.get(m.q)
        if isinstance(s, (int, float)):
            return float(s)
        return 1 / math.sqrt(q.shape[-1]) if isinstance(q, torch.Tensor) else None
    scale = 1.0
    for op in m.ops:
        if op.kind != "scale":
            continue
        f = vals.get(op.value, op.value) if isinstance(op.value, fx.Node) else op.value
        try:
            f = float(f.item()) if isinstance(f, torch.Tensor) else float(f)
        except Exception:
            return None
        scale = scale * f if op.power == 1 else scale / f
    for side in (m.q, m.kt):
        node = side
        if isinstance(node, fx.Node) and node.op == "call_function" and node.target is PERMUTE:
            node = node.args[0]
        if isinstance(node, fx.Node) and node.op == "call_function" and node.target in (MUL, DIV):
            a, b = node.args
            f = b if isinstance(b, (int, float)) else a if isinstance(a, (int, float)) and node.target is MUL else None
            if f is not None:
                scale = scale * f if node.target is MUL else scale / f
    return scale


def _action_flops(action: Action, vals: dict, m: SiteMatch, row: SiteRow) -> tuple:
    """The action's attention FLOPs at the captured shape (and its expression)."""
    sizes = _core_sizes(vals.get(m.q), vals.get(m.kt), vals.get(m.v), m.kind, m.values_left)
    flops = getattr(action, "flops", None)
    band = _band(m)
    if band is not None and isinstance(action, Exact) and action.kernel != "triton":
        flops = functools.partial(banded_flops, *band["reach"])   # it ran on the banded kernel
    if sizes is None or flops is None:
        return row.flops_before, row.flops_before_expr
    try:
        expr = flops()
        return cost.evaluate(expr, **sizes), str(expr)
    except Exception:  # noqa: BLE001 - a cost the model cannot evaluate is reported as unknown
        return None, ""


def _core_sizes(q, kt, v, kind: str, values_left: bool = False) -> Optional[dict]:
    """The cost sizes (B, H, N, Nk, d, dv) of the captured q, kᵀ and v; ``values_left``: ``v @ pᵀ``, v is [.., dv, Nk]."""
    if not all(isinstance(t, torch.Tensor) for t in (q, kt, v)) or kind == "mha":
        return None
    nk = kt.shape[-1] if kind != "sdpa" else kt.shape[-2]
    bh = math.prod(q.shape[:-2])
    return {"B": bh, "H": 1, "N": q.shape[-2], "Nk": nk, "d": q.shape[-1], "dv": v.shape[-2 if values_left else -1]}


def _bytes(vals: dict, m: SiteMatch, materialized: bool) -> Optional[float]:
    sizes = _core_sizes(vals.get(m.q), vals.get(m.kt), vals.get(m.v), m.kind, m.values_left)
    if sizes is None:
        return None
    return cost.evaluate(cost.exact_bytes(vals[m.q].element_size(), materialized), **sizes)


def _band(m: SiteMatch) -> Optional[dict]:
    """What ``passes/band.py`` recorded on a band's score product (``BAND``), or None for any other site."""
    return m.qk.meta.get(BAND) if isinstance(m.qk, fx.Node) else None


def _row(m: SiteMatch, site: AttentionSite, vals: dict) -> SiteRow:
    q, kt, v = vals.get(m.q), vals.get(m.kt), vals.get(m.v)
    sizes = _core_sizes(q, kt, v, m.kind, m.values_left)
    row = SiteRow(name=site.name, index=site.index, status="kept", ordinal=site.ordinal, is_causal=site.is_causal,
                  mask=site.mask, heads=site.heads, kv_heads=site.kv_heads, head_dim=site.head_dim)
    band = _band(m)
    if band is not None:  # the original computed its band's chunks, not N x N
        row.flops_before, row.flops_before_expr = float(band["flops"]), "the band's products as the model spelled them"
    elif sizes is not None:
        expr = cost.exact_flops()
        row.flops_before = cost.evaluate(expr, **sizes)
        row.flops_before_expr = str(expr)
    if sizes is not None:
        row.bytes_before = _bytes(vals, m, materialized=m.kind != "sdpa")
        row.shape = f"q{tuple(q.shape)} k·v Nk={sizes['Nk']}"
    return row
