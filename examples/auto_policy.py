"""An auto policy: measure cheaper mixers per layer on calibration data, keep the most attention FLOPs cut
within an error budget, and plot FLOPs and error per layer.

    python examples/auto_policy.py                       # MiniLM-L6, real weights and real texts
    python examples/auto_policy.py --tiny --plot p.png   # a random 2-layer BERT, seconds

The auto policy swaps one site at a time to each candidate on the calibration batches, measures the damage
to the output (1 - cosine by default), then picks one action per site (a multiple-choice knapsack) so the
whole model stays within ``max_error``, checks that end to end and backs off if needed.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rewrite  # noqa: E402
from _common import batch, load  # noqa: E402

CALIBRATION = [
    "Compilers read programs, find patterns, and replace them with cheaper programs that compute the same thing.",
    "The weather service expects rain tomorrow afternoon, clearing by the evening with a light westerly wind.",
    "A sentence embedding model maps a text to a vector so that similar texts land close to each other.",
    "Sliding windows keep only nearby tokens; block routing keeps the few key blocks a query needs most.",
    "The committee met on Tuesday to discuss the budget, and agreed to postpone the vote until next month.",
    "Attention lets every token look at every other token, which costs time quadratic in the length.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer BERT instead of MiniLM")
    ap.add_argument("--max-error", type=float, default=0.01, help="error budget (1 - cosine), default 0.01")
    ap.add_argument("--plot", default="auto_policy.png", help="where to write the plot (PNG)")
    ap.add_argument("--all-candidates", action="store_true",
                    help="measure every training-free candidate (minutes on MiniLM) instead of a short list")
    args = ap.parse_args()

    if not callable(getattr(rewrite, "auto", None)):
        print("This version of rewrite has no auto policy yet (rewrite.auto). It measures candidate mixers per "
              "layer on calibration data and keeps the most FLOPs cut within an error budget; once it lands, run "
              "this example again. Meanwhile use the exact policy or a policy map (examples/optimize_hf.py).")
        return 0

    model, tokenizer, _ = load(args.tiny)
    length = 32 if args.tiny else 128
    example = batch(tokenizer, length=length, fixed=True)
    # batches like the example: the same keys, padded to one length
    calibration = [batch(tokenizer, CALIBRATION[i:i + 2], length=length, fixed=True)
                   for i in range(0, len(CALIBRATION), 2)]
    candidates = None  # None: every training-free candidate this rewrite has (--all-candidates)
    if not args.all_candidates:  # a short list: each candidate costs one measured run per site
        t = rewrite.action_types()
        short = ((("SlidingWindow", {"window": 8, "sinks": 1}), ("SharedQuery", {})) if args.tiny else
                 (("SlidingWindow", {"window": 64, "sinks": 1}), ("BlockRouting", {"block": 32, "topk": 2})))
        candidates = [t[n](**kw) for n, kw in short if n in t]
    policy = rewrite.auto(max_error=args.max_error, candidates=candidates)
    model = rewrite.optimize(model, policy, example_kwargs=example, calibration=calibration)
    report = model.rewrite_report
    print(report)
    try:
        path = report.plot(args.plot)
        print(f"\nplot: {path}")
    except ImportError:
        print("\n(no plot: matplotlib is not installed)")
    with torch.no_grad():
        model(**example)  # the rewritten model runs as usual; rewrite.save(model, folder) keeps the plan
    return 0


if __name__ == "__main__":
    sys.exit(main())
