"""Token-merging settings on MiniLM-L6 (real weights): the calibration error bound against the held-out error.

The held-out protocol of ``bench_policy.py``: 8 calibration passages (Python language reference) and 24 held-out
ones (standard-library docstrings, license texts), 512 tokens each, batches of 4; the metric is 1 − cosine of the
mean-pooled embedding. One model is rewritten with ``MergeTokens`` after every layer and each setting is given to
its mergers in turn (they read it on every call), so a setting costs only its forward passes. Per setting: the
FLOPs model's share of exact (linear layers and attention of a 384-wide, 1536-MLP layer on the tokens each part
sees), the calibration per-passage mean, standard deviation and the bound ``auto`` uses (mean + 2 sd), the mean
over 2 batches + 2 standard errors (the old bound), and the held-out mean and worst passage. No timing: quality
numbers are deterministic; time the settings you pick with ``bench_merge_tokens.py`` or ``bench_policy.py``.

Run: ``python bench/bench_merge_quality.py --r 48,0/64/64/64/64/64 --window 0,64`` (a setting: one r for every
layer, or one per layer joined by '/'; windows: 0 is none).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import rewrite  # noqa: E402
from bench_policy import batched, pooled  # noqa: E402
from rewrite.api import model_session  # noqa: E402
from rewrite.demo import minilm_folder  # noqa: E402
from rewrite.mixers.merge_tokens import merged_count  # noqa: E402
from text_passages import passages  # noqa: E402

WIDTH, MLP = 384, 1536


def flops_share(per_layer: list, n: int) -> float:
    """The rewritten model's FLOPs over exact's: per layer, projections and attention on the tokens it gets, the
    MLP on the tokens left after its merge."""
    def layer(n_att, n_mlp):
        return 4 * n_att * WIDTH ** 2 + 2 * n_att ** 2 * WIDTH + 2 * n_mlp * WIDTH * MLP
    total, tokens = 0.0, n
    for r in per_layer:
        after = tokens - merged_count(r, tokens, 1)
        total += layer(tokens, after)
        tokens = after
    return total / (len(per_layer) * layer(n, n))


def errors(model, base, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([1 - torch.nn.functional.cosine_similarity(pooled(base(**b), b), pooled(model(**b), b), dim=-1)
                          for b in batches])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--r", default="16,32,40,48,56,64")
    ap.add_argument("--window", default="0,64")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    calib = batched(passages(tok, ["reference"], 8, length=512, seed=0), 4)
    held = batched(passages(tok, ["docstrings", "licenses"], 24, length=512, seed=1), 4)
    base = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    layers = [f"encoder.layer.{i}.attention.self" for i in range(base.config.num_hidden_layers)]
    model = rewrite.optimize(copy.deepcopy(base), {n: rewrite.MergeTokens(r=64) for n in layers},
                             example_kwargs=calib[0])
    found = model_session(model).block_modules                     # site key (name, ordinal) -> mergers
    mergers = [found[(name, 0)][0] for name in layers]
    print("| r per layer | window | FLOPs share | calib. mean | sd | mean + 2 sd | 2 batches + 2 SE | held-out mean "
          "| held-out worst |\n|---|---|---|---|---|---|---|---|---|")
    for setting in args.r.split(","):
        per_layer = [int(x) for x in setting.split("/")] if "/" in setting else [int(setting)] * len(layers)
        for window in (int(w) for w in args.window.split(",")):
            for m, r in zip(mergers, per_layer):
                m.r, m.window = r, window or None
            cal, out = errors(model, base, calib), errors(model, base, held)
            per_batch = cal.view(len(calib), -1).mean(1)
            old = float(per_batch.mean() + 2 * per_batch.std() / len(per_batch) ** 0.5)
            print(f"| {setting} | {window or '-'} | {flops_share(per_layer, 512):.3f} | {cal.mean():.4f} | {cal.std():.4f} "
                  f"| {cal.mean() + 2 * cal.std():.4f} | {old:.4f} | {out.mean():.4f} | {out.max():.4f} |", flush=True)


if __name__ == "__main__":
    main()
