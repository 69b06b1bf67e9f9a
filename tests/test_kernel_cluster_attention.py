"""rewrite.kernels.cluster_attention: the C++ CPU kernel of KMeansRouting against its plain-PyTorch reference."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_helpers import draw_qkv, needs_cpu_kernel

from rewrite.kernels import cluster_attention

needs_kernel = needs_cpu_kernel(cluster_attention)


@st.composite
def cluster_case(draw):
    a, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
    hq = hkv * g
    n = draw(st.integers(1, 300))
    nc = draw(st.integers(1, 5))
    w = draw(st.integers(0, min(n, 40)))
    d = draw(st.sampled_from([4, 16, 64]))
    dv = draw(st.sampled_from([d, d + 3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    q, k, v = draw_qkv(draw, a, hq, hkv, n, d, dv, gen)
    cluster = torch.randint(0, nc, (a, hq, n), generator=gen)
    window = torch.stack([torch.randperm(n, generator=gen)[:w] for _ in range(a * hkv * nc)]).view(a, hkv, nc, w)
    kind = draw(st.sampled_from(["none", "per_key", "per_head", "padding", "hides_all"]))
    bias = None
    if kind == "per_key":
        bias = torch.randn(1, 1, n, generator=gen)
    elif kind == "per_head":
        bias = torch.randn(a, hq, n, generator=gen)
    elif kind == "padding":
        bias = torch.zeros(a, 1, n).masked_fill_(torch.rand(a, 1, n, generator=gen) < 0.5, torch.finfo(torch.float32).min)
    elif kind == "hides_all":    # every key hidden: every row outputs 0
        bias = torch.full((1, 1, n), float("-inf"))
    return q, k, v, cluster, window, draw(st.sampled_from([0.125, 0.7])), bias


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(case=cluster_case())
def test_kernel_matches_reference(case):
    q, k, v, cluster, window, scale, bias = case
    out = cluster_attention.cluster_attention_forward(q, k, v, cluster, window, scale, bias)
    ref = cluster_attention.cluster_attention_reference(q, k, v, cluster, window, scale, bias)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    if bias is not None and torch.isinf(bias).all():
        assert (out == 0).all()


@needs_kernel
def test_torch_counts_its_flops():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    cluster = torch.zeros(1, 2, 30, dtype=torch.long)
    window = torch.arange(10).view(1, 1, 1, 10).expand(1, 2, 1, 10).contiguous()
    with FlopCounterMode(display=False) as counter:
        cluster_attention.cluster_attention_forward(q, k, v, cluster, window, 0.3)
    assert counter.get_total_flops() == 2 * 2 * 30 * 11 * (8 + 8)
