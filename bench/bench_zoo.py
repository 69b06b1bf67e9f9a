"""The Hugging Face zoo sweep: every ``AutoModel`` type buildable from a small config, one process per type.

For each model type: build it from its default config shrunk to a few layers of width 64 (random weights,
``attn_implementation="eager"``), count its attention computations with an oracle (the same config built with
``attn_implementation="sdpa"``, counting ``scaled_dot_product_attention`` calls in one forward), optimize the
eager model with ``"exact"``, and compare outputs with the original at two shapes (the example batch and a
longer one, both with a padded row). Each type gets one row, with the statuses of ``bench/zoo_common.py``
(FULL / PARTIAL / WRONG / ERROR / SKIPPED / NONE / TIMEOUT).

The shrink keeps a config consistent (:func:`shrink`): per-layer lists (layer kinds, stage widths, per-layer
overrides of heterogeneous configs) are cut with their count keeping one layer of each kind, multi-head models
keep as many key/value heads as heads, sizes that equalled the hidden or head width follow it, rotary and
multimodal-rotary sections fit the head, images shrink to a few patches, a timm backbone becomes transformers'
ResNet. Sizes a default config leaves unset (``UNSET``: head width, key/value heads, a mixture of experts' counts,
a forecaster's ``prediction_length``) are set; layers sharing another's cache (Gemma 3n) keep a producer of each
kind; a forecaster's label window fits its context. Types whose configuration names timm get timm (from
``.deps/timm``, :func:`zoo_common.import_timm`) imported in their process before transformers, which decides on
import whether timm is there. Inputs come from the product's own generator (``rewrite.io.inputs.example_kwargs``:
the other modality of a dual encoder, layout boxes, flattened patches with ``grid_thw``, speech features, video
clips, time-series histories, trajectories...). What does not run is
tried again with the other audio layout, then without a cache, then with four heads of the original head
width, then with only the layer counts shrunk.

Run: ``python bench/bench_zoo.py [--types bert,gpt2] [--limit N] [--timeout 180] [--jsonl out.jsonl]``;
``python bench/bench_zoo.py --table a.jsonl b.jsonl`` prints the markdown summary (later files win per type).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import inspect
import json
import os
import re
import time

from zoo_common import STATUSES, fused_calls, import_timm, judged, print_row, same, sdpa_calls, sweep

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
    overrides, overridden = _take_per_layer_overrides(cfg)
    before = {name: getattr(cfg, name, None) for name in COUNTS}
    widths = _widths(cfg)
    kv = getattr(cfg, "num_key_value_heads", None)
    grouped = kv is not None and kv != getattr(cfg, "num_attention_heads", None)
    staged = _stage_widths(cfg) if not keep_widths else set()
    small = {k: v for k, v in SMALL.items() if not keep_widths or k in COUNTS}
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
    _agree(cfg)
    _put_per_layer_overrides(cfg, overrides, overridden, kept)
    if depth < 2:
        for sub in vars(cfg).values():
            if hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
                shrink(sub, depth + 1, keep_head_width, keep_widths)
    return cfg


def _widths(cfg) -> dict:
    """The config's hidden width and per-head width before the shrink."""
    hidden = next((getattr(cfg, n) for n in ("hidden_size", "d_model", "embed_dim") if isinstance(getattr(cfg, n, None), int)), None)
    heads = next((getattr(cfg, n) for n in ("num_attention_heads", "num_heads") if isinstance(getattr(cfg, n, None), int)), None)
    return {"hidden": hidden, "head": hidden // heads if hidden and heads else None}


#: names of sizes that are not widths, even when they equal one
NOT_WIDTHS = ("position", "vocab", "token", "image", "length", "sampling", "layers", "heads", "window", "codebook_size")


def _follow_widths(cfg, before: dict) -> None:
    """Sizes that equalled the hidden width or the head width (a conv's groups, a per-head projection) follow
    them; sizes named after another tower's hidden width (BLIP-2's ``encoder_hidden_size``) take the shrunk one."""
    now = _widths(cfg)
    for name, value in list(vars(cfg).items()):
        if not isinstance(value, int) or isinstance(value, bool) or name in SMALL or name.startswith("_") \
                or any(w in name for w in NOT_WIDTHS) or name.startswith("qk_"):
            continue
        if name.endswith("hidden_size") and value > SMALL["hidden_size"]:
            _set(cfg, name, SMALL["hidden_size"])
        elif before["hidden"] and now["hidden"] and value == before["hidden"] and value > now["hidden"]:
            _set(cfg, name, now["hidden"])
        elif before["head"] and now["head"] and value == before["head"] and value > now["head"] and "dim" in name:
            _set(cfg, name, now["head"])


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
            if ("ind" in name or "idx" in name) and isinstance(idx, (list, tuple)) and idx \
                    and all(isinstance(i, int) and 0 <= i < old for i in idx):
                _set(cfg, name, type(idx)(sorted({i % getattr(cfg, count) for i in idx})))
    return kept


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
        partial = getattr(cfg, "partial_rotary_factor", None) or params.get("partial_rotary_factor") or 1.0 \
            if isinstance(params, dict) else 1.0
        half = int(head * partial) // 2 if isinstance(head, int) else None
        if half and isinstance(sections, list) and sum(sections) > half:
            # multimodal rotary sections (time, rows, columns) split half the rotary part of a head: scaled with it
            scaled = [max(1, x * half // sum(sections)) for x in sections]
            scaled[-1] += half - sum(scaled)
            params["mrope_section"] = scaled
    for name in ("depth_coefficient", "width_coefficient"):  # compound-scaled convnets (EfficientNet-B7)
        if isinstance(getattr(cfg, name, None), float) and getattr(cfg, name) > 1.0:
            _set(cfg, name, 1.0)
    layers, offset = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "attn_layer_offset", None)
    if isinstance(layers, int) and isinstance(offset, int) and offset >= layers:
        _set(cfg, "attn_layer_offset", layers - 1)  # a hybrid (Jamba) keeps an attention layer
    rope = getattr(cfg, "qk_rope_head_dim", None)
    if isinstance(rope, int) and getattr(cfg, "head_dim", None) is not None:
        _set(cfg, "head_dim", rope)  # multi-head latent attention: the rotary embedding spans the rope part
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
    backbone = getattr(cfg, "backbone_config", None)
    if getattr(backbone, "model_type", None) == "timm_backbone":  # timm is optional here: transformers' ResNet
        import transformers as tf
        stages = [f"stage{i}" for i in (getattr(backbone, "out_indices", None) or [1, 2, 3, 4]) if 1 <= i <= 4]
        _set(cfg, "backbone_config", tf.ResNetConfig(out_features=stages))
    size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
    patch = patch if isinstance(patch, int) and patch > 0 else 16
    small = patch * max(2, -(-64 // patch))
    if isinstance(size, int) and size > small:
        _set(cfg, "image_size", small)  # fewer patches: a faster sweep; position tables are built for it


def widest(cfg, depth: int = 0) -> int:
    """The largest hidden width among ``cfg`` and its sub-configs."""
    own = max([v for v in (getattr(cfg, n, None) for n in ("hidden_size", "d_model", "embed_dim"))
               if isinstance(v, int)] or [0])
    subs = [widest(v, depth + 1) for v in vars(cfg).values() if depth < 2 and hasattr(v, "to_dict")
            and hasattr(v, "model_type")]
    return max([own] + subs)


def flipped(batch: dict, flip: bool) -> dict:
    """``batch`` in the other audio layout the config does not decide: speech features' last two axes swapped
    (frames-first vs mels-first), a waveform given a channel axis (codecs: (batch, 1, samples)). The second try
    when the first layout does not run."""
    if flip and getattr(batch.get("input_features"), "dim", lambda: 0)() == 3:
        return {**batch, "input_features": batch["input_features"].transpose(1, 2).contiguous()}
    if flip and getattr(batch.get("input_values"), "dim", lambda: 0)() == 2:
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
    tries = ({}, {"flip": True}, {"no_cache": True}, {"keep_head_width": True}, {"keep_widths": True})
    for attempt in tries:
        if attempt.get("keep_widths") and widest(tf.AutoConfig.for_model(model_type)) > 1024:
            continue  # full-width layers of a large model: too slow for a sweep
        torch.manual_seed(0)
        flip = attempt.get("flip", False)
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
    try:
        start = time.perf_counter()
        rewrite.optimize(eager, "exact", example_kwargs=batches[0])
        optimize_s = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            equal = all(same(r, seeded(eager, b)) for r, b in zip(refs, batches))
    except Exception as err:  # noqa: BLE001
        return {"type": model_type, "status": "ERROR", "why": f"{type(err).__name__}: {str(err)[:160]}"}
    rep = rewrite.report(eager)
    row = judged(model_type, equal, rep, oracle, calls=lambda: fused_calls(eager, batches[0]))
    row["optimize_s"] = optimize_s
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
