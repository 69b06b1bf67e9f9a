"""The layer-wise policy target on MiniLM (real weights) and real text.

Calibrate on 8 full 512-token passages (the Python language reference), in batches of ``--batch`` (4:
the 4x512 shape), evaluate on 24 passages from other sources (standard-library docstrings, license
texts). The metric is 1 − cosine of the mean-pooled sentence embeddings. For each policy: the held-out
cosine, the attention FLOPs cut (from the report), the measured time of the rewritten model against the
exact rewrite (interleaved runs on the held-out batches, median), the seconds calibration took, and the
per-layer plan; the auto plan is also drawn to ``docs/plan_minilm.png``.

Run: ``python bench/bench_policy.py`` (``--quick`` for 4 calibration / 4 evaluation passages of 256 tokens,
``--length``/``--batch`` for other shapes, ``--threads 1`` on a shared machine). Timings are of this machine: say
which, and whether it was shared.
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
from rewrite.timing import interleaved_median  # noqa: E402
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


def batched(single: list, size: int) -> list:
    """Passages of one row each, stacked ``size`` at a time (all have the same length)."""
    return [{k: torch.cat([b[k] for b in single[i:i + size]]) for k in single[0]}
            for i in range(0, len(single) - size + 1, size)]


def time_against_exact(model, exact, batches) -> tuple[float, float]:
    """(ms per forward of ``model``, of ``exact``), interleaved on the batches, median."""
    turns = {"plan": iter(range(10 ** 6)), "exact": iter(range(10 ** 6))}

    def runner(name, m):
        return lambda: m(**batches[next(turns[name]) % len(batches)])
    with torch.no_grad():
        got = interleaved_median({"plan": runner("plan", model), "exact": runner("exact", exact)},
                                 warmup=1, min_repeats=5, max_repeats=11, budget_s=20.0)
    return got["plan"] * 1e3, got["exact"] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--policies", default="auto,mixed_span,isomer")
    ap.add_argument("--length", type=int, default=None, help="tokens per passage (512; 256 with --quick)")
    ap.add_argument("--batch", type=int, default=4, help="passages per batch (4)")
    ap.add_argument("--max-error", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core). On a shared machine use 1: "
                    "OpenMP threads spinning against other processes make the many small ops of token merging "
                    "erratically slow, and every timing (calibration's included) with them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    from transformers import AutoModel, AutoTokenizer
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    length = args.length or (256 if args.quick else 512)
    calib = batched(passages(tok, ["reference"], 4 if args.quick else 8, length=length, seed=0), args.batch)
    held = batched(passages(tok, ["docstrings", "licenses"], 4 if args.quick else 24, length=length, seed=1),
                   args.batch)
    base = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    exact = rewrite.optimize(copy.deepcopy(base), "exact", example_kwargs=calib[0])
    policies = {
        "auto": rewrite.auto(max_error=args.max_error, metric=embedding_error),
        "mixed_span": rewrite.mixed_span(full_layers=2, local=rewrite.SlidingWindow(window=128, sinks=1),
                                         metric=embedding_error),
        "isomer": rewrite.isomer(metric=embedding_error),
    }
    shape = f"{args.batch}x{length}"
    print(f"MiniLM-L6, calibration {len(calib)} batch(es) of {shape} tokens (language reference), "
          f"held-out {len(held)} of {shape} (docstrings, licenses); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    summary = []
    for name in args.policies.split(","):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        rewrite.optimize(model, policies[name], example_kwargs=calib[0], calibration=calib)
        took = time.perf_counter() - t0
        rep = rewrite.report(model)
        before, after = rep.attention_flops()
        cut = 1 - after / before if before else 0.0
        cos = evaluate(model, base, held)
        plan_ms, exact_ms = time_against_exact(model, exact, held)
        cal = rep.calibration
        print(f"\n=== {name}: held-out embedding cosine {cos:.4f}, attention FLOPs cut {cut:.1%}, held-out time "
              f"{plan_ms:.0f} ms vs exact {exact_ms:.0f} ms ({exact_ms / plan_ms:.2f}x), calibration {cal.seconds:.0f} s "
              f"(timing {cal.timing_seconds:.0f} s), {took:.0f} s to calibrate and rewrite")
        print(rep.calibration_table())
        summary.append((name, cos, cut, exact_ms / plan_ms, cal.seconds, took))
        if name == "auto":
            os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
            rep.plot(os.path.join(ROOT, "docs", "plan_minilm.png"))
    print(f"\n| policy ({shape}) | held-out cosine | attention FLOPs cut | speed vs exact (held-out, interleaved) "
          "| calibration s | total s |\n|---|---|---|---|---|---|")
    for name, cos, cut, speed, cal_s, took in summary:
        print(f"| {name} | {cos:.4f} | {cut:.1%} | {speed:.2f}x | {cal_s:.0f} | {took:.0f} |")


if __name__ == "__main__":
    main()
