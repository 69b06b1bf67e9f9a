"""The Hugging Face zoo sweep: every ``AutoModel`` type buildable from a small config, one process per type.

For each model type: build it from its default config shrunk to a few layers of width 64 (random weights,
``attn_implementation="eager"``), count its attention computations with an oracle (the same config built with
``attn_implementation="sdpa"``, counting ``scaled_dot_product_attention`` calls in one forward), optimize the
eager model with ``"exact"``, and compare outputs with the original at two shapes (the example batch and a
longer one, both with a padded row). Each type gets one row:

* FULL — every attention the oracle counts is rewritten, and the outputs are equal;
* PARTIAL — outputs equal, fewer sites rewritten than the oracle counts (the report's reasons are listed);
* WRONG — an output differs from the original (a bug: this must never happen);
* ERROR — ``optimize`` raised; SKIPPED — the model cannot be built or run from a config here (the reason);
* NONE — no attention found and the oracle counts none (not an attention model, or none at these shapes);
* TIMEOUT — the process did not finish within ``--timeout`` seconds.

Run: ``python bench/bench_zoo.py [--types bert,gpt2] [--limit N] [--timeout 180] [--jsonl out.jsonl]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def sdpa_calls(model, batch) -> int:
    """How many ``scaled_dot_product_attention`` calls one forward makes (the oracle)."""
    import torch
    import torch.nn.functional as F
    count = [0]
    original = F.scaled_dot_product_attention

    def counting(*a, **k):
        count[0] += 1
        return original(*a, **k)
    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        F.scaled_dot_product_attention = original
    return count[0]


def same(a, b) -> bool:
    import torch
    if isinstance(a, (tuple, list)):
        return all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return all(same(a[k], b[k]) for k in a if k in b)
    if hasattr(a, "to_tuple"):
        return same(a.to_tuple(), b.to_tuple())
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        return True
    scale = max(a.detach().abs().nan_to_num().max().item(), 1e-6)
    finite = torch.isfinite(a) == torch.isfinite(b)
    return bool(finite.all()) and (a - b).nan_to_num().abs().max().item() / scale < 1e-3


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
    rows = rewrite.report(eager).sites
    # a site the model already computes with SDPA is already fused: covered
    done = sum(r.status == "rewritten" or "already scaled_dot_product_attention" in (r.reason or "") for r in rows)
    reasons = sorted({r.reason[:90] for r in rows if r.status != "rewritten" and r.reason})
    expected = oracle if oracle is not None else len(rows)  # no SDPA path: every site the report lists
    status = "WRONG" if not equal else ("FULL" if rows and done >= expected and done == len(rows) else
                                        "PARTIAL" if rows or expected else "NONE")
    return {"type": model_type, "status": status, "rewritten": done, "oracle": oracle, "why": "; ".join(reasons)}


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
        print("ZOO " + json.dumps(one(args.one)), flush=True)
        return
    types = args.types.split(",") if args.types else model_types()
    types = types[: args.limit] if args.limit else types
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rows = []
    for t in types:
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", t], capture_output=True,
                                  text=True, timeout=args.timeout, env=env)
            line = next((x for x in done.stdout.splitlines() if x.startswith("ZOO ")), None)
            row = json.loads(line[4:]) if line else {"type": t, "status": "ERROR",
                                                     "why": (done.stderr.strip().splitlines() or ["no output"])[-1][:160]}
        except subprocess.TimeoutExpired:
            row = {"type": t, "status": "TIMEOUT", "why": f"over {args.timeout} s"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{row['status']:8s} {t:28s} {row.get('rewritten', '')!s:>3}/{row.get('oracle', '')!s:<3} "
              f"{row['seconds']:6.1f}s  {row.get('why', '')}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("FULL", "PARTIAL", "WRONG", "ERROR", "SKIPPED", "NONE", "TIMEOUT")}
    print("\n" + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" of {len(rows)}")


if __name__ == "__main__":
    main()
