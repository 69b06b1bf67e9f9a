"""The Hugging Face zoo sweep: every ``AutoModel`` type buildable from a small config, one process per type.

For each model type: build it from its default config shrunk to a few layers of width 64 (random weights,
``attn_implementation="eager"``), count its attention computations with an oracle (the same config built with
``attn_implementation="sdpa"``, counting ``scaled_dot_product_attention`` calls in one forward), optimize the
eager model with ``"exact"``, and compare outputs with the original at two shapes (the example batch and a
longer one, both with a padded row). Each type gets one row, with the statuses of ``bench/zoo_common.py``
(FULL / PARTIAL / WRONG / ERROR / SKIPPED / NONE / TIMEOUT).

The shrink keeps a config consistent (:func:`shrink`): per-layer lists (layer kinds, stage widths, per-layer
overrides of heterogeneous configs) are cut with their count keeping one layer of each kind, lists of layer
indices renumbered to the kept layers, a backbone's stage names and output stages cut with them; a backbone's
stage count (as many as its ``depths``) is kept, each stage cut to two blocks. Multi-head models keep as many
key/value heads as heads; sizes that equalled the hidden or head width follow it, and so do sizes that equalled
another named hidden width (``*hidden_size``), head counts of another stack (``*_num_attention_heads``), widths
one tower restates from another (a size or a stage-width list that equalled any tower's hidden width, SAM's
``vit_dim``), two widths side by side (``TWO_WIDTHS``), a state-space mixer's heads x head width (``expand`` x
hidden) and a hierarchy's final width (first stage's doubled per stage). Rotary and multimodal-rotary sections fit
the head (the multi-head latent head spans the rope part over its partial rotary factor); images (and crops) shrink
to a few patches but keep a window at every stage of a windowed hierarchy, with the patches a side derived from
them; clips to 16 frames; a two-stage detector to 16 queries; a timm backbone becomes transformers' ResNet. Sizes
a default config leaves unset (``UNSET``: head width, key/value heads, a mixture of experts' counts, a
forecaster's ``prediction_length``) are set; layers sharing another's cache (Gemma 3n) keep a producer of each
kind; a forecaster's label window fits its context. Types whose configuration names timm get timm (from
``.deps/timm``, :func:`zoo_common.import_timm`) imported in their process before transformers, which decides on
import whether timm is there. Inputs come from the product's own generator (``rewrite.io.inputs.example_kwargs``:
the other modality of a dual encoder, layout boxes, flattened patches with ``grid_thw``, speech features, video
clips, time-series histories, trajectories, NaViT patch rows, region features...). What does not run is
tried again with the other audio layouts (:func:`flipped`), then without a cache, then with four heads of the
original head width, then with only the layer counts shrunk.

Run: ``python bench/bench_zoo.py [--types bert,gpt2] [--limit N] [--timeout 180] [--jsonl out.jsonl]``;
``python bench/bench_zoo.py --table a.jsonl b.jsonl`` prints the markdown summary (later files win per type).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import inspect
import json
import math
import os
import re
import time

from zoo_common import STATUSES, fused_calls, import_timm, judged, print_row, same, sdpa_calls, softmax_calls, sweep

#: config attributes shrunk on every (sub-)config that has them
SMALL = {"hidden_size": 64, "d_model": 64, "embed_dim": 64, "num_hidden_layers": 2, "num_layers": 2,
         "encoder_layers": 2, "decoder_layers": 2, "num_attention_heads": 4, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "num_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
         "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "d_ff": 128, "d_kv": 16, "head_dim": 16,
         "depth": 2}


#: counts whose per-layer (or per-stage) lists are cut with them
COUNTS = ("num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers", "num_stages", "depth")


def shrink(cfg, depth: int = 0, keep_head_width: bool = False, keep_widths: bool = False):
    """``cfg`` with its sizes set small, sub-configs (text, vision, encoder…) included, kept consistent.

    ``keep_head_width``: the fallback for models whose code assumes their head width (rotary sections written
    for it): four heads of the original width instead of four heads of 16. ``keep_widths``: the last fallback,
    for widths tied by rules the config does not state (LiLT's six box embeddings, Reformer's axial factors):
    only the layer counts shrink."""
    before_tree = _snapshot(cfg) if depth == 0 else None
    original = dict(vars(cfg))
    overrides, overridden = _take_per_layer_overrides(cfg)
    before = {name: getattr(cfg, name, None) for name in COUNTS}
    widths = _widths(cfg)
    kv = getattr(cfg, "num_key_value_heads", None)
    grouped = kv is not None and kv != getattr(cfg, "num_attention_heads", None)
    staged = _stage_widths(cfg) if not keep_widths else set()
    small = {k: v for k, v in SMALL.items() if (not keep_widths or k in COUNTS) and k not in _stage_counts(cfg)}
    if keep_head_width and widths["head"]:
        small.update({n: 4 * widths["head"] for n in ("hidden_size", "d_model", "embed_dim")})
        small.update({n: widths["head"] for n in ("head_dim", "d_kv")})
    for name, value in small.items():
        current = getattr(cfg, name, None)
        if name not in staged and isinstance(current, int) and not isinstance(current, bool) and current > value:
            _set(cfg, name, value)
    if not grouped and isinstance(getattr(cfg, "num_attention_heads", None), int) and kv is not None:
        _set(cfg, "num_key_value_heads", cfg.num_attention_heads)  # multi-head (or latent) attention stays so
    kept = _cut_layer_lists(cfg, before)
    _follow_widths(cfg, widths)
    _keep_inner_width(cfg, original, widths)
    _keep_final_stage_width(cfg, original)
    _agree(cfg)
    _put_per_layer_overrides(cfg, overrides, overridden, kept)
    if depth < 2:
        for sub in vars(cfg).values():
            if hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
                shrink(sub, depth + 1, keep_head_width, keep_widths)
    if before_tree is not None:
        _follow_tower_widths(cfg, before_tree)
    return cfg


def _configs(cfg, depth: int = 0) -> list:
    """``cfg`` and its sub-configs (two levels down, as :func:`shrink` goes)."""
    subs = [v for v in vars(cfg).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")] if depth < 2 else []
    return [cfg] + [c for sub in subs for c in _configs(sub, depth + 1)]


def _snapshot(cfg) -> dict:
    """Every (sub-)config's attributes before the shrink, by the config's identity."""
    return {id(c): dict(vars(c)) for c in _configs(cfg)}


HIDDEN = ("hidden_size", "d_model", "embed_dim")


def _follow_tower_widths(cfg, before: dict) -> None:
    """Widths one tower reads from another, which its config restates as a number: a size (or a list of stage
    widths starting or ending with it) that equalled a tower's hidden width and that the shrink left alone takes
    that tower's shrunk width (SAM's ``vit_dim`` and its neck's ``output_channels`` read by the mask decoder,
    SAM 2's ``embed_dim_per_stage`` and ``backbone_channel_list`` around its Hiera backbone's ``hidden_size``).
    Lists are scaled by the same factor; a width two towers shrank differently is left alone."""
    moved = {}
    for c in _configs(cfg):
        old = before.get(id(c), {})
        for name in HIDDEN:
            was, now = old.get(name), getattr(c, name, None)
            if isinstance(was, int) and isinstance(now, int) and now < was:
                moved.setdefault(was, set()).add(now)
    moved = {was: now.pop() for was, now in moved.items() if len(now) == 1}
    for c in _configs(cfg):
        old = before.get(id(c), {})
        for name, value in list(vars(c).items()):
            if not isinstance(value, (int, list, tuple)) or name.startswith("_") or name in HIDDEN or name in SMALL \
                    or not isinstance(old.get(name), type(value)) or old.get(name) != value \
                    or any(w in name for w in NOT_WIDTHS) or name.startswith("qk_") \
                    or not name.endswith(("_dim", "channels", "_size", "_per_stage", "_list", "pos_feats")):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value in moved:
                _set(c, name, moved[value])
            elif "pos_feats" in name and isinstance(value, int) and 2 * value in moved:
                _set(c, name, moved[2 * value] // 2)  # sine and cosine features: half a width each
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v > 0 for v in value):
                was = value[0] if value[0] in moved else value[-1] if value[-1] in moved else None
                if was is not None and all(v * moved[was] % was == 0 for v in value):
                    _set(c, name, type(value)(v * moved[was] // was for v in value))


def _widths(cfg) -> dict:
    """The config's hidden width and per-head width before the shrink, and its other named hidden widths
    (``*hidden_size``: MobileBERT's ``true_hidden_size``, a predictor's ``pred_hidden_size``)."""
    hidden = next((getattr(cfg, n) for n in ("hidden_size", "d_model", "embed_dim") if isinstance(getattr(cfg, n, None), int)), None)
    heads = next((getattr(cfg, n) for n in ("num_attention_heads", "num_heads") if isinstance(getattr(cfg, n, None), int)), None)
    named = {v for n, v in vars(cfg).items() if n.endswith("hidden_size") and isinstance(v, int)
             and not isinstance(v, bool) and v > SMALL["hidden_size"]}
    return {"hidden": hidden, "head": hidden // heads if hidden and heads else None, "named": named}


#: names of sizes that are not widths, even when they equal one
NOT_WIDTHS = ("position", "vocab", "token", "image", "length", "sampling", "layers", "heads", "window", "codebook_size")


#: sizes that are two hidden widths side by side (Zamba 2's attention reads the hidden state beside the input
#: embeddings; NeuCodec's quantizer reads its semantic and acoustic encodings): twice the shrunk width
TWO_WIDTHS = ("attention_hidden_size", "quantization_dim")


def _follow_widths(cfg, before: dict) -> None:
    """Sizes that equalled the hidden width or the head width (a conv's groups, a per-head projection) follow
    them; sizes named after another tower's hidden width (BLIP-2's ``encoder_hidden_size``) take the shrunk one,
    and so do sizes that equalled such a width (MobileBERT's ``intra_bottleneck_size``, its ``true_hidden_size``);
    head counts of another stack (a predictor's ``pred_num_attention_heads``) that no longer divide its shrunk
    width (``pred_hidden_size``) shrink like the main one."""
    now = _widths(cfg)
    heads = SMALL["num_attention_heads"]
    # attention over two widths side by side (Zamba 2): its heads are twice as wide too
    doubled = any(isinstance(getattr(cfg, n, None), int) and getattr(cfg, n) == 2 * (before["hidden"] or 0)
                  for n in TWO_WIDTHS)
    for name, value in list(vars(cfg).items()):
        width = getattr(cfg, name[: -len("num_attention_heads")] + "hidden_size", None)
        if name.endswith("_num_attention_heads") and isinstance(value, int) and not isinstance(value, bool) \
                and value > heads and isinstance(width, int) and width % value:
            _set(cfg, name, heads)  # (their stack's width, pred_hidden_size, shrunk below a multiple of them)
        if not isinstance(value, int) or isinstance(value, bool) or name in SMALL or name.startswith("_") \
                or any(w in name for w in NOT_WIDTHS) or name.startswith("qk_"):
            continue
        if before["hidden"] and now["hidden"] and name in TWO_WIDTHS and value == 2 * before["hidden"]:
            _set(cfg, name, 2 * now["hidden"])
        elif name.endswith("hidden_size") and value > SMALL["hidden_size"]:
            _set(cfg, name, SMALL["hidden_size"])
        elif before["hidden"] and now["hidden"] and value == before["hidden"] and value > now["hidden"]:
            _set(cfg, name, now["hidden"])
        elif before["head"] and now["head"] and value > now["head"] and ("dim" in name or name.endswith("channels")) \
                and (value == before["head"] or value == 2 * before["head"] and doubled):
            _set(cfg, name, now["head"] * value // before["head"])
        elif value in before["named"] and name.endswith(("_size", "_dim")):
            _set(cfg, name, SMALL["hidden_size"])


def _stage_counts(cfg) -> set:
    """The counts that count a backbone's stages (Swin's ``num_layers``: as many as ``depths`` and one less than
    ``stage_names``): kept, each stage cut to two blocks instead (detection heads read every stage)."""
    depths, names = getattr(cfg, "depths", None), getattr(cfg, "stage_names", None)
    if not isinstance(depths, (list, tuple)) or not isinstance(names, (list, tuple)) or len(names) != len(depths) + 1:
        return set()
    return {n for n in COUNTS if getattr(cfg, n, None) == len(depths)}


def _keep_final_stage_width(cfg, old: dict) -> None:
    """A hierarchical model whose final width (``hidden_size``) was its first stage's doubled per stage (CLAP's
    audio Swin: ``patch_embeds_hidden_size`` x 2 ** (stages - 1)) keeps that relation over the stages it kept."""
    depths, hidden = old.get("depths"), old.get("hidden_size")
    for name in ("embed_dim", "patch_embeds_hidden_size"):
        first = old.get(name)
        if isinstance(depths, (list, tuple)) and depths and isinstance(first, int) and isinstance(hidden, int) \
                and hidden == first * 2 ** (len(depths) - 1) and isinstance(getattr(cfg, name, None), int):
            _set(cfg, "hidden_size", getattr(cfg, name) * 2 ** (len(cfg.depths) - 1))
            return


def _keep_inner_width(cfg, old: dict, before: dict) -> None:
    """A state-space mixer's inner width (``expand`` x hidden) split into heads (Mamba 2's ``num_heads`` x
    ``head_dim``, Zamba 2's ``n_mamba_heads`` x ``mamba_headdim``) stays so: its heads shrink like attention
    heads, the head width follows, and its groups (``n_groups``) still divide the heads."""
    expand = next((v for k, v in old.items() if "expand" in k and isinstance(v, (int, float))
                   and not isinstance(v, bool)), None)
    hidden, now = before["hidden"], _widths(cfg)["hidden"]
    if not expand or not hidden or not now or now == hidden:
        return
    ints = {k: v for k, v in old.items() if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}
    for heads in [k for k in ints if "heads" in k]:
        for width in [k for k in ints if "head" in k and "dim" in k]:
            if ints[heads] * ints[width] == int(expand * hidden) and isinstance(getattr(cfg, heads, None), int):
                count = min(getattr(cfg, heads), SMALL["num_heads"])
                _set(cfg, heads, count)
                _set(cfg, width, max(1, int(expand * now) // count))
                for groups in [k for k in ints if "groups" in k and isinstance(getattr(cfg, k, None), int)]:
                    if count % getattr(cfg, groups):
                        _set(cfg, groups, math.gcd(count, getattr(cfg, groups)))


def _stage_widths(cfg) -> set:
    """Hierarchical models (Swin): heads per stage, the first stage's width a multiple of its heads, the final
    width (``hidden_size``) the first one doubled per stage."""
    heads, embed = getattr(cfg, "num_heads", None), getattr(cfg, "embed_dim", None)
    if not isinstance(heads, (list, tuple)) or not heads or not isinstance(embed, int):
        return set()
    hidden = getattr(cfg, "hidden_size", None)
    ratio = hidden // embed if isinstance(hidden, int) and hidden > embed and hidden % embed == 0 else None
    _set(cfg, "embed_dim", min(embed, 16 * heads[0]))
    if ratio:
        _set(cfg, "hidden_size", cfg.embed_dim * ratio)
    return {"embed_dim", "hidden_size"}


def _code_default_sections(cfg):
    """The multimodal rotary sections a model's code falls back to when its config names none
    (``rope_parameters.get("mrope_section", [8, 12, 12])`` in GLM-4V and its kin), or None."""
    module = type(cfg).__module__.replace(".configuration_", ".modeling_")
    spec = importlib.util.find_spec(module) if module != type(cfg).__module__ else None
    if spec is None or spec.origin is None:
        return None
    with open(spec.origin) as f:
        found = re.search(r'get\(\s*"mrope_section"\s*,\s*\[([\d,\s]+)\]\s*\)', f.read())
    return [int(x) for x in found.group(1).split(",") if x.strip()] if found else None


def _set(cfg, name, value) -> None:
    try:
        setattr(cfg, name, value)
    except Exception:  # noqa: BLE001 - a read-only attribute stays
        pass


def _cut_layer_lists(cfg, before: dict) -> list:
    """Per-layer lists (layer types, stage widths and depths) follow their shrunk count. A list of layer kinds
    keeps one layer of each kind (a hybrid model keeps an attention layer), the count grown to hold them.
    Returns the original indices of the layers kept."""
    kept = None
    for count, old in before.items():
        new = getattr(cfg, count, None)
        if not isinstance(old, int) or not isinstance(new, int) or new >= old:
            continue
        lists = {n: v for n, v in vars(cfg).items() if isinstance(v, (list, tuple)) and len(v) == old
                 and not n.startswith("_")}
        kinds = [v for v in lists.values() if all(isinstance(x, str) for x in v)]
        firsts = {kind.index(k) for kind in kinds for k in kind}
        kept = sorted(firsts | set([i for i in range(old) if i not in firsts][: max(0, new - len(firsts))]))
        if len(kept) > new:
            _set(cfg, count, len(kept))
        for name, value in lists.items():
            _set(cfg, name, type(value)(value[i] for i in kept))
        for name, idx in list(vars(cfg).items()):  # lists of layer indices (attention layers of a hybrid)
            if any(w in name for w in ("index", "indices", "idx", "_ids")) and not name.startswith("_") \
                    and isinstance(idx, (list, tuple)) and idx and all(isinstance(i, int) and 0 <= i < old for i in idx):
                # the kept layers among them renumbered (Zamba 2's hybrid layers, kept as a layer kind), else
                # folded into the new count
                renumbered = [kept.index(i) for i in idx if i in kept] if kinds else []
                _set(cfg, name, type(idx)(renumbered or sorted({i % getattr(cfg, count) for i in idx})))
        _cut_stages(cfg, old, kept)
    return kept


def _cut_stages(cfg, old: int, kept: list) -> None:
    """A backbone's stage names (the stem, then one per layer or stage) follow its cut count, and the stages it
    outputs (``out_indices`` / ``out_features``) are those kept, renumbered; the last one where none is kept."""
    names, indices = getattr(cfg, "stage_names", None), getattr(cfg, "_out_indices", None)
    if not isinstance(names, (list, tuple)) or len(names) != old + 1 \
            or not hasattr(cfg, "set_output_features_output_indices"):
        return
    _set(cfg, "stage_names", list(names[: len(kept) + 1]))
    renumbered = [kept.index(i - 1) + 1 for i in (indices or []) if i >= 1 and i - 1 in kept] or [len(kept)]
    cfg.set_output_features_output_indices(out_features=None, out_indices=renumbered)


def _take_per_layer_overrides(cfg) -> tuple:
    """A heterogeneous config's per-layer overrides and the global values they override, removed from ``cfg``
    (so the shrink can read and set those attributes); :func:`_put_per_layer_overrides` puts them back."""
    spec = cfg.__dict__.get("_heterogeneity_spec")
    if spec is None:
        return {}, {}
    overrides = {i: dict(o) for i, o in spec.per_layer_overrides.items()}
    cfg.allow_global_per_layer_attribute_access = True
    globals_ = {a: getattr(cfg, a, None) for o in overrides.values() for a in o}
    cfg.per_layer_config = None
    cfg.allow_global_per_layer_attribute_access = False
    return overrides, globals_


def _put_per_layer_overrides(cfg, overrides: dict, globals_: dict, kept) -> None:
    """The overrides of the layers kept, renumbered, each size scaled as its global value was."""
    if not overrides:
        return
    kept = kept if kept is not None else list(range(len(overrides) + 1))
    renumbered = {}
    for new, old in enumerate(kept):
        layer = {}
        for attr, value in overrides.get(old, {}).items():
            was, now = globals_.get(attr), getattr(cfg, attr, None)
            if isinstance(value, int) and isinstance(was, int) and isinstance(now, int) and was and now != was:
                value = max(1, value * now // was)
            layer[attr] = value
        if layer:
            renumbered[new] = layer
    if renumbered:
        cfg.per_layer_config = renumbered


#: sizes a default config may leave unset (None) that the model's code reads as numbers, with what they become
#: (a callable of the config): a head width of hidden / heads, as many key/value heads as heads, a small mixture
#: of experts (only in a config that sets another of its sizes: an unset count can also mean no experts), a
#: forecast window
UNSET = {
    "head_dim": lambda c: c.hidden_size // c.num_attention_heads if isinstance(getattr(c, "hidden_size", None), int)
    and isinstance(getattr(c, "num_attention_heads", None), int) else None,
    "num_key_value_heads": lambda c: getattr(c, "num_attention_heads", None),
    "num_experts": lambda c: 4, "n_routed_experts": lambda c: 4, "num_experts_per_tok": lambda c: 2,
    "top_k_experts": lambda c: 2, "n_shared_experts": lambda c: 1,
    "moe_intermediate_size": lambda c: getattr(c, "intermediate_size", None),
    "prediction_length": lambda c: 8, "context_length": lambda c: getattr(c, "prediction_length", None),
}
EXPERTS = ("num_experts", "n_routed_experts", "num_experts_per_tok", "top_k_experts", "n_shared_experts",
           "moe_intermediate_size")


def _agree(cfg) -> None:
    """Sizes that must agree after the shrink: rotary dims within a head, MLA heads' rope part, no timm backbone;
    sizes the default config leaves unset (:data:`UNSET`) set."""
    experts = any(isinstance(getattr(cfg, n, None), int) for n in EXPERTS)
    for name, value in UNSET.items():
        if name in vars(cfg) and getattr(cfg, name, None) is None and value(cfg) is not None \
                and (experts or name not in EXPERTS):
            _set(cfg, name, value(cfg))
    label, context = getattr(cfg, "label_length", None), getattr(cfg, "context_length", None)
    if isinstance(label, int) and isinstance(context, int) and label > context:
        _set(cfg, "label_length", context)  # a forecaster's decoder starts from the last label_length steps
    shared, kinds = getattr(cfg, "num_kv_shared_layers", None), getattr(cfg, "layer_types", None)
    if isinstance(shared, int) and shared > 0 and isinstance(kinds, (list, tuple)) and kinds:
        # layers reusing an earlier layer's cache (Gemma 3n) come after a producer of each kind
        producers = max(kinds.index(k) for k in set(kinds)) + 1
        _set(cfg, "num_kv_shared_layers", max(0, min(shared, len(kinds) - producers)))
    if getattr(cfg, "two_stage", False) and isinstance(getattr(cfg, "num_queries", None), int) \
            and cfg.num_queries > 16:
        _set(cfg, "num_queries", 16)  # a two-stage detector picks its queries among a small image's few tokens
    moe = getattr(cfg, "moe_intermediate_size", None)
    if isinstance(moe, int) and moe % 4:
        _set(cfg, "moe_intermediate_size", moe + 4 - moe % 4)  # grouped expert matmuls need 16-byte strides
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    head = getattr(cfg, "head_dim", None) or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                              and heads else None)
    rotary = getattr(cfg, "rotary_dim", None)
    if isinstance(rotary, int) and isinstance(head, int) and rotary > head:
        _set(cfg, "rotary_dim", head)
    for params in (getattr(cfg, "rope_parameters", None), getattr(cfg, "rope_scaling", None)):
        sections = params.get("mrope_section") if isinstance(params, dict) else None
        if isinstance(params, dict) and sections is None and params is getattr(cfg, "rope_parameters", None):
            sections = _code_default_sections(cfg)   # written in the model's code, sized for the original head
            if sections is not None:
                params["mrope_section"] = sections
        partial = getattr(cfg, "partial_rotary_factor", None) or params.get("partial_rotary_factor") or 1.0 \
            if isinstance(params, dict) else 1.0
        half = int(head * partial) // 2 if isinstance(head, int) else None
        if half and isinstance(sections, list) and sum(sections) > half:
            # multimodal rotary sections (time, rows, columns) split half the rotary part of a head: scaled with it
            scaled = [max(1, x * half // sum(sections)) for x in sections]
            scaled[-1] += half - sum(scaled)
            params["mrope_section"] = scaled
    for name in ("depth_coefficient", "width_coefficient"):  # compound-scaled convnets (EfficientNet-B7)
        factor = getattr(cfg, name, None)
        if isinstance(factor, float) and factor > 1.0:
            _set(cfg, name, 1.0)
            if name == "width_coefficient" and isinstance(getattr(cfg, "hidden_dim", None), int):
                _set(cfg, "hidden_dim", round(cfg.hidden_dim / factor))  # the head's width is scaled with it
    layers, offset = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "attn_layer_offset", None)
    if isinstance(layers, int) and isinstance(offset, int) and offset >= layers:
        _set(cfg, "attn_layer_offset", layers - 1)  # a hybrid (Jamba) keeps an attention layer
    rope = getattr(cfg, "qk_rope_head_dim", None)
    if isinstance(rope, int) and getattr(cfg, "head_dim", None) is not None:
        # multi-head latent attention: the rotary embedding (the head width's partial rotary factor) spans the
        # rope part
        params = getattr(cfg, "rope_parameters", None)
        params = params if isinstance(params, dict) else {}
        kinds = [p for p in params.values() if isinstance(p, dict)]  # (per layer kind: Dots 3)
        partial = getattr(cfg, "partial_rotary_factor", None) or params.get("partial_rotary_factor") or \
            next((p["partial_rotary_factor"] for p in kinds if p.get("partial_rotary_factor")), None) or 1.0
        _set(cfg, "head_dim", int(round(rope / partial)))
    depths = getattr(cfg, "depths", None)
    if isinstance(depths, (list, tuple)) and all(isinstance(d, int) for d in depths):  # stages of a backbone
        _set(cfg, "depths", type(depths)(min(d, 2) for d in depths))
    if "vocab_size" in vars(cfg) and cfg.vocab_size is None:  # (ESM's default config leaves it to the checkpoint)
        _set(cfg, "vocab_size", 64)
        if "pad_token_id" in vars(cfg) and cfg.pad_token_id is None:  # and its padding id with it
            _set(cfg, "pad_token_id", 1)
    if getattr(cfg, "use_timm_backbone", False):
        _set(cfg, "use_timm_backbone", False)
        _set(cfg, "use_pretrained_backbone", False)
    arch = str(getattr(cfg, "architecture", ""))
    patch = re.search(r"patch(\d+)", arch)
    if getattr(cfg, "model_type", None) == "timm_wrapper" and arch.startswith("vit") and patch \
            and not getattr(cfg, "model_args", None):
        # a timm ViT tower (PE's video encoder) is built from its name: shrunk through timm's own arguments
        _set(cfg, "model_args", {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 4 * int(patch.group(1))})
    backbone = getattr(cfg, "backbone_config", None)
    if getattr(backbone, "model_type", None) == "timm_backbone":  # timm is optional here: transformers' ResNet
        import transformers as tf
        stages = [f"stage{i}" for i in (getattr(backbone, "out_indices", None) or [1, 2, 3, 4]) if 1 <= i <= 4]
        _set(cfg, "backbone_config", tf.ResNetConfig(out_features=stages))
    patch = getattr(cfg, "patch_size", None)
    patch = patch if isinstance(patch, int) and patch > 0 else 16
    small = patch * max(2, -(-64 // patch))
    window, depths = getattr(cfg, "window_size", None), getattr(cfg, "depths", None)
    if isinstance(window, int) and isinstance(depths, (list, tuple)) and depths:
        small = max(small, patch * window * 2 ** (len(depths) - 1))  # a windowed hierarchy: a window at every stage
    for key in ("image_size", "crop_size"):  # (V-JEPA 2 names its input size crop_size)
        size = getattr(cfg, key, None)
        if isinstance(size, int) and size > small:
            _set(cfg, key, small)  # fewer patches: a faster sweep; position tables are built for it
            for name, value in list(vars(cfg).items()):  # patches a side the config derived (SAM's prompts)
                if name.endswith("embedding_size") and value == size // patch:
                    _set(cfg, name, small // patch)
    for name in ("num_frames", "frames_per_clip"):  # long clips: 16 frames
        if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) > 16:
            _set(cfg, name, 16)


def widest(cfg, depth: int = 0) -> int:
    """The largest hidden width among ``cfg`` and its sub-configs."""
    own = max([v for v in (getattr(cfg, n, None) for n in ("hidden_size", "d_model", "embed_dim"))
               if isinstance(v, int)] or [0])
    subs = [widest(v, depth + 1) for v in vars(cfg).values() if depth < 2 and hasattr(v, "to_dict")
            and hasattr(v, "model_type")]
    return max([own] + subs)


def flipped(batch: dict, flip: str = "") -> dict:
    """``batch`` in the other audio layout the config does not decide: speech features' last two axes swapped
    (``flip="features"``: frames-first vs mels-first) or given a channel axis (``flip="channel"``: CLAP reads a
    spectrogram as a one-channel image), a waveform given a channel axis (``flip="waveform"``: codecs read
    (batch, 1, samples), NeuCodec beside its features). The next tries when the first layout does not run."""
    if flip == "features" and getattr(batch.get("input_features"), "dim", lambda: 0)() == 3:
        return {**batch, "input_features": batch["input_features"].transpose(1, 2).contiguous()}
    if flip == "channel" and getattr(batch.get("input_features"), "dim", lambda: 0)() == 3:
        return {**batch, "input_features": batch["input_features"][:, None]}  # (CLAP: spectrogram as an image)
    if flip == "waveform" and getattr(batch.get("input_values"), "dim", lambda: 0)() == 2:
        return {**batch, "input_values": batch["input_values"][:, None]}
    if flip:
        raise ValueError("nothing to flip")
    return batch


def uses_timm(model_type: str) -> bool:
    """Whether ``model_type`` builds a timm model: its configuration module, or that of a sub-config it names
    (``model_type="..."``), mentions timm. Read from the sources, before transformers is imported: transformers
    decides once, on import, whether timm and torchvision are there."""
    models = os.path.join(importlib.util.find_spec("transformers").submodule_search_locations[0], "models")
    sources = {}
    for path in glob.glob(os.path.join(models, "*", "configuration_*.py")):
        with open(path) as f:
            text = f.read()
        for name in re.findall(r'^\s*model_type\s*=\s*"([\w-]+)"', text, re.M):
            sources[name] = text
    todo, seen = [model_type], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in sources:
            continue
        seen.add(name)
        if "timm" in sources[name]:
            return True
        todo += re.findall(r'model_type="([\w-]+)"', sources[name])
    return False


def one(model_type: str) -> dict:
    """The row of one model type (run in its own process)."""
    if model_type.startswith("timm") or uses_timm(model_type):
        try:
            import_timm()  # (from .deps/timm: scripts/setup.sh)
        except ImportError:
            pass  # the type is skipped with transformers' reason
    import copy
    import torch
    import transformers as tf
    import rewrite
    from rewrite.io.inputs import example_kwargs
    failure = None
    tries = ({}, {"flip": "features"}, {"flip": "channel"}, {"flip": "waveform"}, {"no_cache": True},
             {"keep_head_width": True}, {"keep_widths": True})
    for attempt in tries:
        if attempt.get("keep_widths") and widest(tf.AutoConfig.for_model(model_type)) > 1024:
            continue  # full-width layers of a large model: too slow for a sweep
        torch.manual_seed(0)
        flip = attempt.get("flip", "")
        try:
            cfg = shrink(tf.AutoConfig.for_model(model_type), keep_head_width=attempt.get("keep_head_width", False),
                         keep_widths=attempt.get("keep_widths", False))
            named = auto_classes().get(model_type)
            if getattr(cfg, "architectures", None) is None and isinstance(named, (tuple, list)):
                cfg.architectures = [named[0]]  # a type with several AutoModel classes (Funnel): the first
            eager = tf.AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
            batches = [flipped(example_kwargs(eager, batch=2, length=n), flip) for n in (16, 24)]
            if attempt.get("no_cache"):  # a model whose cache cannot be built from its config here (BLT)
                if "use_cache" not in inspect.signature(eager.forward).parameters:
                    raise ValueError("no use_cache argument")
                batches = [{**b, "use_cache": False} for b in batches]
            with torch.no_grad():
                refs = [seeded(eager, b) for b in batches]
            break
        except Exception as err:  # noqa: BLE001 - what cannot be built or run here is skipped, with the reason
            failure = failure or err
    else:
        return {"type": model_type, "status": "SKIPPED", "why": f"{type(failure).__name__}: {str(failure)[:160]}"}
    try:
        oracle = sdpa_calls(tf.AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval(), batches[0])
    except Exception:  # noqa: BLE001 - no SDPA path: count unknown
        oracle = None
    pristine = copy.deepcopy(eager)   # for a second policy (soft-capped sites, below)
    try:
        start = time.perf_counter()
        rewrite.optimize(eager, "exact", example_kwargs=batches[0])
        optimize_s = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            equal = all(same(r, seeded(eager, b)) for r, b in zip(refs, batches))
    except Exception as err:  # noqa: BLE001
        return {"type": model_type, "status": "ERROR", "why": f"{type(err).__name__}: {str(err)[:160]}"}
    rep = rewrite.report(eager)
    row = _judged(model_type, eager, equal, batches, oracle)
    row["optimize_s"] = optimize_s
    if row["status"] == "PARTIAL" and any("soft-capping" in (r.reason or "") for r in rep.sites):
        row = _softcapped(model_type, pristine, batches, refs, oracle) or row
    return row


def _judged(model_type: str, model, equal: bool, batches: list, oracle) -> dict:
    """The row of an optimized ``model`` (``zoo_common.judged``), its counts taken on ``batches``: fused calls and
    softmax ops left at the example's shape, softmax ops left at both."""
    import rewrite
    return judged(model_type, equal, rewrite.report(model), oracle, calls=lambda: fused_calls(model, batches[0]),
                  softmax_left=lambda: softmax_calls(model, batches[0]),
                  left_by_shape=lambda: tuple(softmax_calls(model, b) for b in batches))


def _softcapped(model_type: str, model, batches: list, refs: list, oracle) -> dict:
    """The row of a model whose soft-capped sites SDPA cannot serve, judged again on the policy the report names
    for them, ``Exact(kernel="triton")`` (on CPU the flash op's chunked exact path serves soft-capped sites, SDPA
    the others); None when that does not make it FULL."""
    import torch
    import rewrite
    try:
        rewrite.optimize(model, {"_default": rewrite.Exact(kernel="triton")}, example_kwargs=batches[0])
        with torch.no_grad():
            equal = all(same(r, seeded(model, b)) for r, b in zip(refs, batches))
    except Exception:  # noqa: BLE001 - the first row stands
        return None
    row = _judged(model_type, model, equal, batches, oracle)
    if row["status"] != "FULL":
        return None
    row["why"] = "soft-capped sites on Exact(kernel='triton') (its chunked exact path on CPU), the rest on SDPA"
    return row


def seeded(model, batch: dict):
    """One forward with the random generator reset first: models that draw noise in their forward (UnivNet's
    vocoder, sampling VAEs) give the same draws to the original and the optimized model, which run the same ops in
    the same order."""
    import torch
    torch.manual_seed(1234)
    return model(**batch)


def table(paths: list) -> str:
    """The markdown summary of sweep rows read from ``paths`` (JSON lines; a type's row in a later file replaces
    an earlier one): counts per status, FULL listed, every other row with its reason, grouped by reason."""
    rows = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row["type"]] = row
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in STATUSES}
    out = ["| " + " | ".join(STATUSES) + " | types |", "|" + "---|" * (len(STATUSES) + 1),
           "| " + " | ".join(f"**{v}**" if k == "WRONG" else str(v) for k, v in counts.items()) + f" | {len(rows)} |", ""]
    for status in STATUSES:
        chosen = sorted((r for r in rows.values() if r["status"] == status), key=lambda r: r["type"])
        if not chosen:
            continue
        if status == "FULL":
            out.append(f"FULL ({len(chosen)}): " + ", ".join(r["type"] for r in chosen) + ".\n")
            beside = [f"{r['type']} ({_reason(r)})" for r in chosen if r.get("why")]
            if beside:
                out.append("FULL with a reason beside (a rejected region, or sites SDPA already computes): "
                           + "; ".join(beside) + ".\n")
            continue
        out.append(f"{status} ({len(chosen)}):\n")
        groups = {}
        for r in chosen:
            groups.setdefault(_reason(r), []).append(r["type"])
        out += [f"- {why or '(no reason given)'}: {', '.join(types)}" for why, types in sorted(groups.items())]
        out.append("")
    slow = sorted((r for r in rows.values() if r.get("optimize_s") is not None), key=lambda r: -r["optimize_s"])[:8]
    if slow:
        out.append("Slowest `optimize` calls: " + ", ".join(f"{r['type']} {r['optimize_s']} s" for r in slow) + ".")
    return "\n".join(out)


def _reason(row: dict) -> str:
    """A row's reason with its variable parts (sizes, class names) kept, first line only."""
    return (row.get("why") or "").splitlines()[0][:140] if row.get("why") else ""


def auto_classes() -> dict:
    """Model type -> its AutoModel class name(s) (read late: transformers imports slowly)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    return MODEL_MAPPING_NAMES


def model_types() -> list:
    return sorted(auto_classes())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--types", default="", help="comma-separated model types (default: every AutoModel type)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=180)
    ap.add_argument("--jsonl", default="")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="print the markdown summary of these sweep files")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.one:
        print_row(one(args.one))
        return
    types = args.types.split(",") if args.types else model_types()
    types = types[: args.limit] if args.limit else types
    sweep(__file__, types, args.timeout, args.jsonl, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})

if __name__ == "__main__":
    main()
