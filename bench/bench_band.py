"""Banded attention: Longformer's sliding-chunk attention as the model computes it vs the rewritten site.

A Longformer-base encoder (hidden 768, 12 heads, attention window 512: 256 keys each side; random weights, eager
attention) at batch 1 and long inputs, ``optimize(model, "exact")`` against the original in one process,
interleaved, median of ``--repeats`` calls: the whole forward, and one layer's attention module alone. The
rewrite reads the band from the chunk arithmetic (``rewrite/passes/band.py``) and runs it on the banded kernel
(``rewrite.mixers.sliding_window.banded_attention``). Outputs are compared at every length.

Run: ``python bench/bench_band.py [--lengths 1024,4096] [--layers 2] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewrite  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, the calls alternated so that the machine's drift hits all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def longformer(layers: int):
    from transformers import LongformerConfig, LongformerModel
    cfg = LongformerConfig(num_hidden_layers=layers, attention_window=512, max_position_embeddings=8194)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return LongformerModel(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    model = longformer(args.layers)
    original = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        mask = torch.ones(1, n, dtype=torch.long)
        mask[0, n - n // 8:] = 0                      # a padded tail
        return {"input_ids": torch.randint(5, 1000, (1, n), generator=gen), "attention_mask": mask}

    t0 = time.perf_counter()
    rewrite.optimize(model, "exact", example_kwargs=batch(lengths[0]))
    print(f"optimize: {time.perf_counter() - t0:.1f} s; threads {torch.get_num_threads()}")
    print(model.rewrite_report)
    print("\n| length | original forward | rewritten | speed-up | original attention | rewritten | speed-up | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for n in lengths:
            b = batch(n)
            diff = (model(**b).last_hidden_state - original(**b).last_hidden_state).abs().max().item()
            whole = interleaved({"original": lambda: original(**b), "rewritten": lambda: model(**b)}, args.repeats)
            hidden = torch.randn(1, n, 768, generator=gen)
            att_args = _attention_args(b["attention_mask"])
            layer_o, layer_r = original.encoder.layer[0].attention, model.encoder.layer[0].attention
            part = interleaved({"original": lambda: layer_o(hidden, **att_args),
                                "rewritten": lambda: layer_r(hidden, **att_args)}, args.repeats)
            print(f"| {n} | {whole['original'] * 1e3:.0f} ms | {whole['rewritten'] * 1e3:.0f} ms | "
                  f"{whole['original'] / whole['rewritten']:.2f}x | {part['original'] * 1e3:.1f} ms | "
                  f"{part['rewritten'] * 1e3:.1f} ms | {part['original'] / part['rewritten']:.2f}x | {diff:.1e} |")


def _attention_args(mask: torch.Tensor) -> dict:
    """The arguments LongformerModel gives each layer's attention: the mask as 0 / -10000 per key."""
    extended = (1.0 - mask.float()) * -10000.0
    return {"attention_mask": extended, "is_index_masked": extended < 0,
            "is_index_global_attn": extended > 0, "is_global_attn": False}


if __name__ == "__main__":
    main()
