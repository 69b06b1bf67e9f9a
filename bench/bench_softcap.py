"""CPU forward of ``rewrite::flash_attention`` with soft-capping: the chunked path (``attention_chunked``, what
the op runs on CPU) against the all-at-once reference, interleaved A,B,A,B, median of each, and the size of the
largest score tensor each one holds.

    PYTHONPATH=. python bench/bench_softcap.py [N]
"""
import statistics
import sys
import time

import torch

from rewrite.kernels.flash_attention import reference

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
B, H, D, CAP = 1, 8, 64, 50.0
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
mask = torch.zeros(B, 1, 1, N)
mask[..., N - N // 4:] = torch.finfo(torch.float32).min


def full():
    return reference.attention_reference(q, k, v, mask, True, softcap=CAP, return_lse=True)


def chunked():
    return reference.attention_chunked(q, k, v, mask, True, softcap=CAP)


with torch.no_grad():
    a, b = full()[0], chunked()[0]
    print(f"max |full - chunked| = {(a - b).abs().max().item():.2e}")
    times = {"full": [], "chunked": []}
    for _ in range(7):
        for name, fn in (("full", full), ("chunked", chunked)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    print(f"{name:8s} median {statistics.median(ts) * 1e3:8.1f} ms")
print(f"largest score tensor: full {B * H * N * N * 4 / 2**20:.0f} MiB, chunked "
      f"{B * H * N * min(N, reference.DEFAULT_KEY_CHUNK) * 4 / 2**20:.0f} MiB")
