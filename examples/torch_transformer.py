"""A plain-PyTorch ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside): fused exactly, then windowed.

    python examples/torch_transformer.py            # 4 layers, 1024 tokens
    python examples/torch_transformer.py --tiny     # 2 layers, 128 tokens

In eval without grad PyTorch runs such a model through a fused C++ fast path, where no attention is visible;
``rewrite.optimize`` captures its Python path instead, where each ``nn.MultiheadAttention`` call becomes
in-projection -> SDPA -> out-projection, so every policy reaches it. Here: the exact policy (the same values),
then a sliding window of 64 keys on the last half of the layers (measured error and FLOPs in the report).
"""
import argparse
import copy
import time

import torch
import torch.nn as nn

import rewrite


def build(layers: int, width: int = 256, heads: int = 4) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def timed(model, x, repeats: int = 3) -> float:
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="2 layers and 128 tokens")
    args = ap.parse_args()
    layers, tokens = (2, 128) if args.tiny else (4, 1024)
    original = build(layers)
    x = torch.randn(2, tokens, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = original(x)

    exact = rewrite.optimize(copy.deepcopy(original), "exact", example_inputs=(x,))
    print(rewrite.report(exact))
    with torch.no_grad():
        print(f"exact: max |difference| vs the original: {(exact(x) - reference).abs().max():.2e}\n")

    late = {f"layers.{i}.self_attn": rewrite.SlidingWindow(64) for i in range(layers // 2, layers)}
    windowed = rewrite.optimize(copy.deepcopy(original), {**late, "_default": rewrite.Exact()}, example_inputs=(x,))
    print(rewrite.report(windowed))
    with torch.no_grad():
        out = windowed(x)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).min().item()
    print(f"windowed: cosine to the original output {cos:.4f}; time {timed(windowed, x) * 1e3:.1f} ms vs "
          f"{timed(original, x) * 1e3:.1f} ms for the original (one run, a noisy machine)")


if __name__ == "__main__":
    main()
