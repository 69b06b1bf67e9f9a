"""GPU benchmark of the Triton kernels in ``rewrite.kernels``.

Sections (bf16 unless noted; times are medians of ``triton.testing.do_bench``):

1. flash attention forward and backward TFLOP/s at N = 1k..16k, head dim 64 / 128, causal and not, against
   torch SDPA (flash backend) and FlexAttention (when available);
2. ALiBi computed in-kernel against SDPA fed a materialised [1, H, N, N] bias, at N = 8k;
3. block-sparse attention time against dense flash time x kept fraction (sliding window, top-k routing);
4. linear attention (elu, causal and not) against exact flash attention at N = 16k.

Run: ``python bench/bench_kernels.py`` (``--quick`` for fewer sizes, ``--no-flex`` to skip FlexAttention).
A correctness spot check against SDPA runs first. On a machine without CUDA it prints that a GPU is needed
and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    sys.stdout.flush()


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sequence lengths")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (it times the Triton kernels); no GPU found, nothing to do.")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)

    import torch.nn.functional as F
    import triton.testing

    import rewrite.kernels as K
    from rewrite.kernels.block_sparse_attention import sliding_window_block_mask, topk_block_mask, num_blocks
    from rewrite.kernels.flash_attention import alibi_slopes

    dev = "cuda"
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100)  # ms

    def make(B, H, N, D, requires_grad=False, Hkv=None):
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g)
        k = torch.randn(B, Hkv or H, N, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, Hkv or H, N, D, device=dev, dtype=dtype, generator=g)
        return [t.requires_grad_(requires_grad) for t in (q, k, v)]

    # --- correctness spot check ----------------------------------------------------------------------
    q, k, v = make(2, 4, 1000, 64, True)
    for causal in (False, True):
        out = K.flash_attention(q, k, v, is_causal=causal)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        want = torch.autograd.grad(ref, (q, k, v), g)
        errs = [(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(got, want)]
        print(f"spot check causal={causal}: max |out - sdpa| {errs[0]:.2e}, grads {max(errs[1:]):.2e}")

    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = (torch.compile(flex_attention), create_block_mask)
        except Exception as e:  # pragma: no cover
            print(f"FlexAttention unavailable: {e}")

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    # --- 1. flash forward / backward TFLOP/s ---------------------------------------------------------
    lengths = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384]
    rows = []
    for D in (64, 128):
        H = 2048 // D
        for causal in (False, True):
            for N in lengths:
                B = max(1, 16384 // N)
                q, k, v = make(B, H, N, D, True)
                flops = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
                res = {}
                impls = {"rewrite": lambda: K.flash_attention(q, k, v, is_causal=causal),
                         "sdpa-flash": lambda: sdpa_flash(q, k, v, causal)}
                if flex is not None:
                    fa, cbm = flex
                    bm = cbm((lambda b, h, qi, ki: qi >= ki) if causal else (lambda b, h, qi, ki: qi >= 0),
                             None, None, N, N, device=dev)
                    impls["flex"] = lambda: fa(q, k, v, block_mask=bm)
                for name, fn in impls.items():
                    try:
                        t_f = bench(fn)
                        o = fn()
                        do = torch.randn_like(o)
                        t_b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                        res[name] = (flops / t_f * 1e-9, 2.5 * flops / t_b * 1e-9)
                    except Exception as e:  # keep going: report what ran
                        print(f"  {name} N={N} D={D} causal={causal} failed: {type(e).__name__}: {e}")
                        res[name] = (None, None)
                row = [D, causal, N, B, H]
                for name in ("rewrite", "sdpa-flash", "flex"):
                    f, b = res.get(name, (None, None))
                    row += [_fmt(f), _fmt(b)]
                rows.append(row)
                del q, k, v
                torch.cuda.empty_cache()
    _table("flash attention TFLOP/s (fwd, bwd)",
           ["D", "causal", "N", "B", "H", "rewrite fwd", "rewrite bwd", "SDPA-flash fwd", "SDPA-flash bwd",
            "Flex fwd", "Flex bwd"], rows)

    # --- 2. ALiBi in-kernel vs SDPA with a materialised bias ------------------------------------------
    rows = []
    N, H, D = 8192, 16, 64
    q, k, v = make(1, H, N, D)
    slopes = alibi_slopes(H, device=dev)
    for causal in (True, False):
        t_ours = bench(lambda: K.flash_attention(q, k, v, is_causal=causal, alibi_slopes=slopes))
        i = torch.arange(N, device=dev)
        bias = (slopes[:, None, None] * (i[None, :] - i[:, None])[None].float())
        if causal:
            bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf"))
        bias = bias[None].to(dtype)
        try:
            t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
        except Exception as e:
            print(f"  SDPA with bias failed: {e}")
            t_sdpa = None
        rows.append([N, H, D, causal, _fmt(t_ours, 3), _fmt(t_sdpa, 3),
                     _fmt(t_sdpa / t_ours if t_sdpa else None, 2), f"{bias.numel() * bias.element_size() / 2**30:.1f}"])
        del bias
        torch.cuda.empty_cache()
    _table("ALiBi at 8k: in-kernel vs SDPA + materialised bias (forward, ms)",
           ["N", "H", "D", "causal", "rewrite ms", "SDPA+bias ms", "speed-up", "bias GiB"], rows)

    # --- 3. block-sparse vs dense x kept fraction ------------------------------------------------------
    rows = []
    for N in ([8192] if args.quick else [8192, 16384]):
        H, D, blk = 16, 64, 128
        q, k, v = make(1, H, N, D, True)
        t_dense = bench(lambda: K.flash_attention(q, k, v))
        nb = num_blocks(N, blk)
        masks = {
            "sliding 8 blocks": sliding_window_block_mask(nb, nb, 8, causal=False, device=dev),
            "sliding 32 blocks": sliding_window_block_mask(nb, nb, 32, causal=False, device=dev),
            "top-k 8 (causal)": topk_block_mask(q, k, blk, 8, causal=True),
            "top-k 16 (causal)": topk_block_mask(q, k, blk, 16, causal=True),
        }
        for name, bm in masks.items():
            causal = "causal" in name
            frac = bm.float().mean().item()
            t = bench(lambda: K.block_sparse_attention(q, k, v, bm, blk, is_causal=causal))
            o = K.block_sparse_attention(q, k, v, bm, blk, is_causal=causal)
            do = torch.randn_like(o)
            t_b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
            rows.append([N, name, f"{frac:.3f}", _fmt(t, 3), _fmt(t_dense * frac, 3), _fmt(t / (t_dense * frac), 2),
                         _fmt(t_b, 3)])
        del q, k, v
        torch.cuda.empty_cache()
    _table("block-sparse (block 128, H 16, D 64): time vs dense time x kept fraction (ms)",
           ["N", "mask", "kept", "fwd ms", "dense x kept ms", "ratio", "bwd ms"], rows)

    # --- 4. linear vs exact at 16k ----------------------------------------------------------------------
    rows = []
    N, H, D = 16384, 16, 64
    q, k, v = make(1, H, N, D, True)
    for causal in (True, False):
        t_exact = bench(lambda: K.flash_attention(q, k, v, is_causal=causal))
        t_lin = bench(lambda: K.linear_attention(q, k, v, "elu", causal=causal))
        o = K.linear_attention(q, k, v, "elu", causal=causal)
        do = torch.randn_like(o)
        t_lin_b = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
        rows.append([N, H, D, causal, _fmt(t_exact, 3), _fmt(t_lin, 3), _fmt(t_exact / t_lin, 2), _fmt(t_lin_b, 3)])
    _table("linear attention (elu) vs exact flash at 16k (ms)",
           ["N", "H", "D", "causal", "exact fwd", "linear fwd", "speed-up", "linear bwd"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
