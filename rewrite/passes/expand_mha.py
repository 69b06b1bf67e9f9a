"""Expand ``nn.MultiheadAttention`` into in-projection → ``F.scaled_dot_product_attention`` → out-projection.

Dynamo keeps ``nn.MultiheadAttention`` as one opaque ``F.multi_head_attention_forward`` call, so the attention
inside it could be reported but never swapped for a mixer. This pass rewrites that call into three graph
nodes, ``mha_project`` (q, k, v as ``[B, H, N, d]`` and the merged mask), an explicit SDPA node, and
``mha_merge_heads`` (heads merged, out-projection), so the SDPA node is an ordinary site for every policy.

The expansion follows ``F.multi_head_attention_forward``'s own ``need_weights=False`` path op for op (the same
in-projection helpers, mask canonicalisation and merge, dropout only in training), so a call made with
``need_weights=False`` computes the same values. A call made with ``need_weights=True`` whose weights nobody
reads (the default of ``nn.MultiheadAttention``, used as ``attn(x, x, x)[0]``) is expanded too: it then runs
SDPA instead of materialising the [B, H, N, N] probabilities (equal up to float rounding), and the node
records a note that the report shows. Left opaque (the report says kept, with the reason): calls whose
weights are read, with ``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``, or flags that are
not constants in the graph.
"""
from __future__ import annotations

import inspect
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph import insert_call, is_dead, meta_value

MHA_FORWARD = F.multi_head_attention_forward
_SIGNATURE = inspect.signature(F.multi_head_attention_forward)

#: node meta key: why an expanded call differs from the call as written (shown in the report)
NOTE_KEY = "rewrite_mha_note"


def mha_project(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                in_proj_weight: Optional[torch.Tensor], in_proj_bias: Optional[torch.Tensor],
                q_proj_weight: Optional[torch.Tensor], k_proj_weight: Optional[torch.Tensor],
                v_proj_weight: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                attn_mask: Optional[torch.Tensor], use_separate_proj_weight: bool, drop_attn_mask: bool):
    """``nn.MultiheadAttention``'s inputs ``[L, B, E]`` (or unbatched ``[L, E]``) to SDPA's: q ``[B, H, L, d]``,
    k and v ``[B, H, S, d]`` and the additive mask (``[1, 1, L, S]``, ``[B, H, L, S]``, ``[B, 1, 1, S]`` or
    their sum), or None. ``drop_attn_mask``: the causal hint replaces ``attn_mask`` (SDPA's ``is_causal``)."""
    if query.dim() == 2:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if drop_attn_mask:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
    if use_separate_proj_weight:
        biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, *biases)
    else:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1).view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1).view(bsz, num_heads, src_len, head_dim)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1).view(bsz, num_heads, src_len, head_dim)
    mask = None
    if attn_mask is not None:   # [L, S] or [B·H, L, S]; kept broadcast rather than expanded to [B·H, L, S]
        mask = attn_mask.view(1, 1, tgt_len, src_len) if attn_mask.dim() == 2 else \
            attn_mask.view(bsz, num_heads, tgt_len, src_len)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(bsz, 1, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    return q, k, v, mask


def mha_merge_heads(attn: torch.Tensor, out_proj_weight: torch.Tensor, out_proj_bias: Optional[torch.Tensor],
                    batched: bool) -> torch.Tensor:
    """SDPA's output ``[B, H, L, d]`` back to ``nn.MultiheadAttention``'s ``[L, B, E]`` (``[L, E]`` unbatched),
    through the out-projection."""
    bsz, heads, tgt_len, head_dim = attn.shape
    out = attn.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, heads * head_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    return out if batched else out.squeeze(1)


def _constant(x) -> bool:
    return not isinstance(x, fx.Node)


def _why_opaque(node: fx.Node, a: dict) -> Optional[str]:
    """None when the call can be expanded, else the reason it stays one opaque call."""
    flags = ("add_zero_attn", "dropout_p", "training", "need_weights", "use_separate_proj_weight", "is_causal")
    if not all(_constant(a[f]) for f in flags):
        return "its flags are not constants in the captured graph"
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return "it appends bias_k / bias_v or a zero-attention key"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "it is given static_k / static_v"
    if a["is_causal"] and a["attn_mask"] is None:
        return "is_causal without attn_mask (nn.MultiheadAttention itself raises)"
    if a["need_weights"] and _weights_read(node):
        return "its attention weights are read (need_weights=True)"
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)
               for u in node.users):
        return "its output tuple is used as a whole"
    q = meta_value(a["query"])
    if not isinstance(q, torch.Tensor) or q.dim() not in (2, 3):
        return "the query's shape is unknown"
    return None


def _erase_with_dead_users(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the chain of users whose results go nowhere (the weights reshaped, then dropped)."""
    for user in list(node.users):
        _erase_with_dead_users(graph, user)
    graph.erase_node(node)


def _weights_read(node: fx.Node) -> bool:
    """Whether the weights output reaches a graph output or a side effect (WavLM reshapes them, then drops them)."""
    return any(not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0) and not is_dead(u)
               for u in node.users)


def expand_mha(gm: fx.GraphModule) -> dict:
    """Expand every expandable ``F.multi_head_attention_forward`` call in ``gm`` (module docstring).
    Returns ``{node name: reason}`` for the calls left opaque."""
    graph = gm.graph
    opaque = {}
    expanded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not MHA_FORWARD:
            continue
        try:
            a = _SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError as e:
            opaque[node.name] = f"its arguments do not bind: {e}"
            continue
        a.apply_defaults()
        a = a.arguments
        why = _why_opaque(node, a)
        if why is not None:
            opaque[node.name] = why
            node.meta[NOTE_KEY] = why
            continue
        kpm, mask = a["key_padding_mask"], a["attn_mask"]
        drop_mask = bool(a["is_causal"]) and kpm is None        # the hint becomes SDPA's is_causal
        is_causal = drop_mask
        has_mask = kpm is not None or (mask is not None and not drop_mask)
        proj = insert_call(graph, node, mha_project,
                           (a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"],
                            a["in_proj_bias"], a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"], kpm,
                            mask, bool(a["use_separate_proj_weight"]), drop_mask), like=node)
        q, k, v = (insert_call(graph, node, operator.getitem, (proj, i), like=node) for i in range(3))
        attn_mask = insert_call(graph, node, operator.getitem, (proj, 3), like=node) if has_mask else None
        dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
        sdpa = insert_call(graph, node, F.scaled_dot_product_attention, (q, k, v),
                           {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal}, like=node)
        if a["need_weights"]:
            sdpa.meta[NOTE_KEY] = ("nn.MultiheadAttention expanded to SDPA: its need_weights=True weights are never "
                                   "read, so the [B, H, N, N] probabilities are no longer built")
        out = insert_call(graph, node, mha_merge_heads,
                          (sdpa, a["out_proj_weight"], a["out_proj_bias"], meta_value(a["query"]).dim() == 3),
                          like=node)
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            _erase_with_dead_users(graph, user)
        graph.erase_node(node)
        expanded += 1
    if expanded:
        graph.lint()
        gm.recompile()
    return opaque
