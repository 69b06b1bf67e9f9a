"""Block-level token merging (``MergeTokens``) on MiniLM-L6 with its real weights: speed and embedding accuracy.

For each ``r`` (tokens merged after every one of the 6 layers), MiniLM is optimized with ``MergeTokens(r)`` on every
site and compared with the same model optimized exactly (SDPA, the fastest exact form here):

* accuracy: the cosine of mean-pooled sentence embeddings (pooled with the attention mask, as sentence-transformers
  does) to the original model's, on held-out real text (``docstrings`` passages; the example batch the rewrite
  verifies on comes from another source, ``reference``), batches of ``--batch`` passages of ``--length`` tokens;
* speed: forward time of exact vs merged, interleaved (A, B, A, B, ...), the median of ``--repeats`` each.

Run: ``python bench/bench_merge_tokens.py [--batch 4 --length 512 --r 0,16,32,48,64 --threads 1]``.

Measured on a shared 2-core CPU (load 8-11 from other processes, so ``--threads 1``; speed-ups from separate runs
varied by about +-0.05), 4x512, held-out cosine over 8 passages, ``metric="hidden"``:

=============================  ==========================================  ========  ==================
r after each layer             tokens after each layer                     cosine    speed-up vs exact
=============================  ==========================================  ========  ==================
0                              512 (no merge)                              1.0000    0.98x, 0.99x, 1.00x, 1.11x
32                             512 480 448 416 384 352 320                 0.9973    1.19x
48                             512 464 416 368 320 272 224                 0.9931    1.28x, 1.31x, 1.32x, 1.35x
40/48/56/64/72/80              512 472 424 368 304 232 152                 0.9917    1.10x (one noisy run)
64                             512 448 384 320 256 192 128                 0.9840    1.50x, 1.53x
=============================  ==========================================  ========  ==================

With ``metric="keys"`` (ToMe's choice on ViT) r = 48 keeps a cosine of only 0.9646.

``--window 64`` (merge only tokens at most 64 positions apart, what ``auto`` uses): see BENCHMARKS.md, "Local
merging", for its errors on 8 calibration and 24 held-out passages.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import rewrite  # noqa: E402


def batches(tok, source: str, count: int, batch: int, length: int, seed: int) -> list:
    from text_passages import passages
    singles = passages(tok, [source], count * batch, length=length, seed=seed)
    return [{k: torch.cat([s[k] for s in singles[i * batch:(i + 1) * batch]]) for k in singles[0]}
            for i in range(count)]


def pooled(out, batch) -> torch.Tensor:
    m = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)


def cosine(ref, model, evals) -> float:
    with torch.no_grad():
        cos = [torch.nn.functional.cosine_similarity(pooled(ref(**b), b), pooled(model(**b), b), dim=-1)
               for b in evals]
    return float(torch.cat(cos).mean())


def interleaved(fns: list, batch, repeats: int) -> list:
    """Median seconds of each fn, run A, B, A, B, ... after one warm-up each."""
    times = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn(**batch)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t = time.perf_counter()
                fn(**batch)
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--r", default="0,16,32,48,64",
                    help="settings, comma-separated: a number is that r after every layer; a schedule gives one r per "
                         "layer joined by '/', e.g. 40/48/56/64/72/80")
    ap.add_argument("--evals", type=int, default=3, help="held-out batches for the cosine")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--protect-first", type=int, default=1)
    ap.add_argument("--metric", default="hidden", choices=("hidden", "keys"))
    ap.add_argument("--window", type=int, default=0, help="merge only tokens at most this many positions apart "
                    "(0: any two, as ToMe)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default). On a shared machine "
                    "use 1: OpenMP threads spinning against other processes make small ops erratically slow")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer
    from rewrite.demo import minilm_folder
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    example = batches(tok, "reference", 1, args.batch, args.length, seed=1)[0]
    evals = batches(tok, "docstrings", args.evals, args.batch, args.length, seed=2)
    base = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    exact = rewrite.optimize(copy.deepcopy(base), "exact", example_kwargs=example)
    print(f"MiniLM-L6, {args.batch}x{args.length}, {torch.get_num_threads()} threads; exact = every site SDPA")
    print("| r after each layer | tokens after each layer | cosine (held-out) | exact s | merged s | speed-up |")
    print("|---|---|---|---|---|---|")
    layers = [f"encoder.layer.{i}.attention.self" for i in range(base.config.num_hidden_layers)]
    for r in args.r.split(","):
        per_layer = [int(x) for x in r.split("/")] if "/" in r else [int(r)] * len(layers)
        policy = {name: rewrite.MergeTokens(r=k, protect_first=args.protect_first, metric=args.metric,
                                            window=args.window or None)
                  for name, k in zip(layers, per_layer)}
        model = rewrite.optimize(copy.deepcopy(base), policy, example_kwargs=example)
        rows = rewrite.report(model).sites
        declined = [row.reason for row in rows if "declined" in row.reason]
        tokens = rows[0].reason.split("example: ")[-1] if not declined else "declined: " + declined[0]
        cos = cosine(base, model, evals)
        t_exact, t_merged = interleaved([exact, model], evals[0], args.repeats)
        print(f"| {r} | {tokens} | {cos:.4f} | {t_exact:.3f} | {t_merged:.3f} | {t_exact / t_merged:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
