"""End to end at N = 4096 (issue 14): a BERT-style encoder with 4096 positions and random weights (B = 1,
CPU, fp32), rewritten to exact SDPA and to ``SlidingWindow(256)`` on every layer; forwards timed alternately
in one process (median of pairs; the unrewritten eager model too), with the attention's and the whole model's FLOPs beside the time ratio.

The model's dense layers do not shrink with a mixer, so the end-to-end ratio is bounded by
``(attention + dense) / (window attention + dense)`` FLOPs; the bench prints that bound.
Run: ``python bench/bench_long_encoder.py [--layers 12] [--hidden 768] [--window 256] [--n 4096]``.
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


def build(n: int, layers: int, hidden: int, heads: int):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                     intermediate_size=4 * hidden, max_position_embeddings=n, attn_implementation="eager")
    model = BertModel(cfg).eval()
    # B = 1 has no padding: no attention_mask, so the model builds no [N, N] mask outside the attention
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (1, n))}
    return model, batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base, batch = build(args.n, args.layers, args.hidden, args.heads)
    models = {}
    for name, action in (("exact", rewrite.Exact()), ("window", rewrite.SlidingWindow(window=args.window)),
                         ("eager", None)):
        model = copy.deepcopy(base)
        if action is not None:
            rewrite.optimize(model, {"_default": action}, example_kwargs=batch)
        models[name] = model
    with torch.no_grad():
        for model in models.values():
            model(**batch)                                                   # compile / warm up
        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                t = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - t)
    ratio = statistics.median(a / b for a, b in zip(times["exact"], times["window"]))
    n, h, hd = args.n, args.hidden, 4 * args.hidden
    dense = 2 * n * (4 * h * h + 2 * h * hd)                                 # q, k, v, out and the MLP, per layer
    attn = 4 * n * n * h
    chunk = min(n, 32 + 2 * (args.window // 2))                              # keys a window query block scores
    bound = (attn + dense) / (4 * n * chunk * h + dense)
    print(f"N={n}, {args.layers} layers, hidden {h}, {args.heads} heads, B=1, fp32, {torch.get_num_threads()} threads")
    eager = statistics.median(a / b for a, b in zip(times["eager"], times["window"]))
    print(f"the unrewritten eager model {statistics.median(times['eager']):.2f} s ({eager:.2f}x the window's time); "
          f"exact {statistics.median(times['exact']):.2f} s, SlidingWindow({args.window}) "
          f"{statistics.median(times['window']):.2f} s: {ratio:.2f}x end to end "
          f"(FLOPs bound {bound:.2f}x; attention is {attn / (attn + dense):.0%} of exact's FLOPs)")


if __name__ == "__main__":
    main()
