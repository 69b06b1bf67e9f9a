"""The layer-wise policy target on MiniLM (real weights) and real text.

Calibrate on 8 full 512-token passages (the Python language reference), evaluate on 24 passages from
other sources (standard-library docstrings, license texts). The metric is 1 − cosine of the mean-pooled
sentence embeddings. For each policy: the held-out cosine, the attention FLOPs cut (from the report),
and the per-layer plan; the auto plan is also drawn to ``docs/plan_minilm.png``.

Run: ``python bench/bench_policy.py`` (``--quick`` for 2 calibration / 4 evaluation passages of 256 tokens).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import rewrite  # noqa: E402
from rewrite.demo import minilm_folder  # noqa: E402
from text_passages import passages  # noqa: E402


def pooled(out, batch):
    hidden = out[0] if not isinstance(out, torch.Tensor) else out
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def embedding_error(ref, new, batch):
    """1 − cosine of the mean-pooled sentence embeddings, averaged over the batch."""
    a, b = pooled(ref, batch), pooled(new, batch)
    return float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())


def evaluate(model, ref, batches) -> float:
    with torch.no_grad():
        cos = [1 - embedding_error(ref(**b), model(**b), b) for b in batches]
    return sum(cos) / len(cos)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--policies", default="auto,mixed_span,isomer")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from transformers import AutoModel, AutoTokenizer
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    length = 256 if args.quick else 512
    calib = passages(tok, ["reference"], 2 if args.quick else 8, length=length, seed=0)
    held = passages(tok, ["docstrings", "licenses"], 4 if args.quick else 24, length=length, seed=1)
    base = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    policies = {
        "auto": rewrite.auto(max_error=0.01, metric=embedding_error),
        "mixed_span": rewrite.mixed_span(full_layers=2, local=rewrite.SlidingWindow(window=128, sinks=1),
                                         metric=embedding_error),
        "isomer": rewrite.isomer(metric=embedding_error),
    }
    print(f"MiniLM-L6, calibration {len(calib)} x {length} tokens (language reference), "
          f"held-out {len(held)} x {length} tokens (docstrings, licenses); torch {torch.__version__}")
    summary = []
    for name in args.policies.split(","):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        rewrite.optimize(model, policies[name], example_kwargs=calib[0], calibration=calib)
        took = time.perf_counter() - t0
        rep = rewrite.report(model)
        before, after = rep.attention_flops()
        cos = evaluate(model, base, held)
        print(f"\n=== {name}: held-out embedding cosine {cos:.4f}, attention FLOPs cut {1 - after / before:.1%}, "
              f"{took:.0f} s to calibrate and rewrite")
        print(rep.calibration_table())
        summary.append((name, cos, 1 - after / before, took))
        if name == "auto":
            os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
            rep.plot(os.path.join(ROOT, "docs", "plan_minilm.png"))
    print("\n| policy | held-out cosine | attention FLOPs cut | seconds |\n|---|---|---|---|")
    for name, cos, cut, took in summary:
        print(f"| {name} | {cos:.4f} | {cut:.1%} | {took:.0f} |")


if __name__ == "__main__":
    main()
