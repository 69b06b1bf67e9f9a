"""The torch.compile door: ``torch.compile(model, backend="rewrite")``.

    python examples/compile_backend.py           # MiniLM-L6 with real weights
    python examples/compile_backend.py --tiny    # a random 2-layer BERT

The backend is registered by name (an entry point), so ``backend="rewrite"`` works without importing rewrite;
it uses the exact policy. ``rewrite.backend(policy, then="inductor")`` takes any policy and can hand the
rewritten graphs on to Inductor.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import batch, load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer BERT instead of MiniLM")
    args = ap.parse_args()
    model, tokenizer, _ = load(args.tiny)
    x = batch(tokenizer)
    with torch.no_grad():
        reference = model(**x).last_hidden_state

        compiled = torch.compile(model, backend="rewrite")      # exact policy, by name
        out = compiled(**x).last_hidden_state
        import rewrite
        print(rewrite.backend_report())
        print(f"max |difference| vs eager: {(out - reference).abs().max():.2e}\n")

        # any policy, through rewrite.backend(...): here only the first layer is fused
        be = rewrite.backend({"encoder.layer.0.attention.self": rewrite.Exact(), "_default": None})
        out2 = torch.compile(model, backend=be)(**x).last_hidden_state
        print(be.session.report)
        print(f"max |difference| vs eager: {(out2 - reference).abs().max():.2e}")
    assert torch.allclose(out, reference, atol=1e-4) and torch.allclose(out2, reference, atol=1e-4)


if __name__ == "__main__":
    main()
