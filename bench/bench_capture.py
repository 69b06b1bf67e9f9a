"""Per-call cost of an optimized model's own capture, where it shows most: a tiny model at a tiny batch.

Compares the eager model, plain ``torch.compile(backend="eager")`` and ``rewrite.optimize(..., "exact")``,
interleaved in one process (median of 15 rounds of 50 calls). Run: ``python bench/bench_capture.py``.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewrite  # noqa: E402


def main() -> None:
    import transformers
    torch.set_num_threads(1)
    cfg = transformers.BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                                  vocab_size=1000)
    base = transformers.BertModel(cfg).eval()
    base.config._attn_implementation = "eager"
    batch = {"input_ids": torch.randint(0, 1000, (1, 16))}
    fns = {"eager": base,
           "torch.compile(backend='eager')": torch.compile(copy.deepcopy(base), backend="eager"),
           "rewrite.optimize exact": rewrite.optimize(copy.deepcopy(base), "exact", example_kwargs=batch)}
    times: dict = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            for _ in range(20):
                f(**batch)
        for _ in range(15):
            for k, f in fns.items():
                start = time.perf_counter()
                for _ in range(50):
                    f(**batch)
                times[k].append((time.perf_counter() - start) / 50 * 1e6)
    print(f"torch {torch.__version__}, 1 thread, 2-layer BERT (hidden 64), batch 1x16")
    for k, v in times.items():
        print(f"{k:34s} {statistics.median(v):8.0f} us/call")
    print("fallbacks:", rewrite.report(fns["rewrite.optimize exact"]).fallbacks)


if __name__ == "__main__":
    main()
