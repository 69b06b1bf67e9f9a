"""Cost of BlockRouting's per-head fit in units of one exact attention call (issue 14, point 6).

q, k, v of a 1,500-token encoder site (B=1, H=12, d=64, fp32, CPU, random); the fit and exact SDPA are timed
alternately in one process (median of pairs). Run: ``python bench/bench_fit.py [--n 1500]``; point PYTHONPATH
at another checkout to time its fit the same way.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rewrite.mixers.block_routing import BlockRoutingAttention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, args.n, 64) for _ in range(3))
    print(f"N={args.n}, B=1, H=12, d=64, fp32, {torch.get_num_threads()} threads")
    with torch.no_grad():
        for block, topk in ((64, 4), (32, 8)):
            module = BlockRoutingAttention(block, topk, per_head=True)
            module.fit(q, k, v)
            te, tf = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v)
                te.append(time.perf_counter() - t)
                t = time.perf_counter()
                module.fit(q, k, v)
                tf.append(time.perf_counter() - t)
            print(f"block={block} topk={topk}: fit {statistics.median(tf) * 1e3:.0f} ms = "
                  f"{statistics.median(b / a for a, b in zip(te, tf)):.1f} exact calls "
                  f"(exact {statistics.median(te) * 1e3:.1f} ms); counts {module.head_topk.tolist()}", flush=True)


if __name__ == "__main__":
    main()
