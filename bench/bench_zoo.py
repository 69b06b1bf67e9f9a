"""The Hugging Face zoo sweep: every ``AutoModel`` type buildable from a small config, one process per type.

For each model type: build it from its default config shrunk to a few layers of width 64 (random weights,
``attn_implementation="eager"``), count its attention computations with an oracle (the same config built with
``attn_implementation="sdpa"``, counting ``scaled_dot_product_attention`` calls in one forward), optimize the
eager model with ``"exact"``, and compare outputs with the original at two shapes (the example batch and a
longer one, both with a padded row). Each type gets one row, with the statuses of ``bench/zoo_common.py``
(FULL / PARTIAL / WRONG / ERROR / SKIPPED / NONE / TIMEOUT).

Run: ``python bench/bench_zoo.py [--types bert,gpt2] [--limit N] [--timeout 180] [--jsonl out.jsonl]``.
"""
from __future__ import annotations

import argparse

from zoo_common import judged, print_row, same, sdpa_calls, sweep

#: config attributes shrunk on every (sub-)config that has them
SMALL = {"hidden_size": 64, "d_model": 64, "embed_dim": 64, "num_hidden_layers": 2, "num_layers": 2,
         "encoder_layers": 2, "decoder_layers": 2, "num_attention_heads": 4, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "num_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
         "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "d_ff": 128, "d_kv": 16, "head_dim": 16}


def shrink(cfg, depth: int = 0):
    """``cfg`` with its sizes set small, sub-configs (text, vision, encoder…) included."""
    for name, value in SMALL.items():
        current = getattr(cfg, name, None)
        if isinstance(current, int) and not isinstance(current, bool) and current > value:
            try:
                setattr(cfg, name, value)
            except Exception:  # noqa: BLE001 - a read-only attribute stays
                pass
    if depth < 2:
        for sub in vars(cfg).values():
            if hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
                shrink(sub, depth + 1)
    return cfg


def one(model_type: str) -> dict:
    """The row of one model type (run in its own process)."""
    import copy
    import torch
    import transformers as tf
    import rewrite
    from rewrite.io.inputs import example_kwargs
    torch.manual_seed(0)
    try:
        cfg = shrink(tf.AutoConfig.for_model(model_type))
        eager = tf.AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
        batches = [example_kwargs(eager, batch=2, length=n) for n in (16, 24)]
        with torch.no_grad():
            refs = [eager(**b) for b in batches]
    except Exception as err:  # noqa: BLE001 - what cannot be built or run here is skipped, with the reason
        return {"type": model_type, "status": "SKIPPED", "why": f"{type(err).__name__}: {str(err)[:160]}"}
    try:
        oracle = sdpa_calls(tf.AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval(), batches[0])
    except Exception:  # noqa: BLE001 - no SDPA path: count unknown
        oracle = None
    try:
        rewrite.optimize(eager, "exact", example_kwargs=batches[0])
        with torch.no_grad():
            equal = all(same(r, eager(**b)) for r, b in zip(refs, batches))
    except Exception as err:  # noqa: BLE001
        return {"type": model_type, "status": "ERROR", "why": f"{type(err).__name__}: {str(err)[:160]}"}
    return judged(model_type, equal, rewrite.report(eager), oracle)


def model_types() -> list:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    return sorted(MODEL_MAPPING_NAMES)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--types", default="", help="comma-separated model types (default: every AutoModel type)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=180)
    ap.add_argument("--jsonl", default="")
    args = ap.parse_args()
    if args.one:
        print_row(one(args.one))
        return
    types = args.types.split(",") if args.types else model_types()
    types = types[: args.limit] if args.limit else types
    sweep(__file__, types, args.timeout, args.jsonl, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


if __name__ == "__main__":
    main()
