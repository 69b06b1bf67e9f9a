"""Decay: softmax attention + log(gamma)·distance (1-D |i-j|, 2-D Manhattan on grids); exact at gamma = 1."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_helpers import (assert_close, assert_decreasing, attention_case, bert_end_to_end, build,  # noqa: E402
                                 LargestAllocation, local_qkv, reference, rel_err, run_case)

import rewrite  # noqa: E402
from rewrite import cost  # noqa: E402
from rewrite.actions import Decline, RewriteError  # noqa: E402
from rewrite.mixers.decay import DecayAttention  # noqa: E402


def manhattan(gh, gw, prefix):
    n = prefix + gh * gw
    dist = torch.zeros(n, n)
    for i in range(prefix, n):
        for j in range(prefix, n):
            (yi, xi), (yj, xj) = divmod(i - prefix, gw), divmod(j - prefix, gw)
            dist[i, j] = abs(yi - yj) + abs(xi - xj)
    return dist


@settings(max_examples=20, deadline=None)
@given(case=attention_case())
def test_exact_when_gamma_is_one(case):
    module = DecayAttention(1.0, causal=case["causal"])
    assert_close(run_case(module, case), reference(case["q"], case["k"], case["v"], case["mask"], case["causal"]))


@settings(max_examples=20, deadline=None)
@given(case=attention_case(), gamma=st.floats(0.05, 1.0))
def test_1d_matches_biased_reference(case, gamma):
    n = case["q"].shape[-2]
    i = torch.arange(n)
    bias = math.log(gamma) * (i[:, None] - i[None, :]).abs().float()
    ref = reference(case["q"], case["k"], case["v"], case["mask"], case["causal"], bias=bias)
    assert_close(run_case(DecayAttention(gamma, causal=case["causal"]), case), ref)


@settings(max_examples=15, deadline=None)
@given(gh=st.integers(1, 6), gw=st.integers(1, 6), prefix=st.integers(0, 2), gamma=st.floats(0.1, 1.0),
       seed=st.integers(0, 999))
def test_2d_matches_manhattan_reference(gh, gw, prefix, gamma, seed):
    n = prefix + gh * gw
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, 8, generator=gen)
    k, v = torch.randn(2, 2, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
    mask = torch.randn(2, 1, n, n, generator=gen)
    out = DecayAttention(gamma, grid=(gh, gw), prefix_tokens=prefix)(q, k, v, attn_mask=mask)
    assert_close(out, reference(q, k, v, mask, bias=math.log(gamma) * manhattan(gh, gw, prefix)))


def test_handler_layouts_and_declines():
    assert isinstance(build(rewrite.Decay(layout="2d"), nq=16), Decline)                          # no grid
    assert isinstance(build(rewrite.Decay(), nq=1, nk=32, causal=True, mask="boolean"), Decline)  # decoding
    assert isinstance(build(rewrite.Decay(), nq=16, nk=40), Decline)                              # cross
    assert isinstance(build(rewrite.Decay(layout="2d"), nq=17, grid=(4, 4), prefix=1, causal=True,
                            mask="causal"), Decline)                                              # no causal 2-D
    assert isinstance(build(rewrite.Decay(layout="2d"), nq=18, grid=(4, 4), prefix=1), Decline)   # mismatch
    m = build(rewrite.Decay(), nq=17, grid=(4, 4), prefix=1)
    assert m.grid == (4, 4) and m.prefix_tokens == 1
    assert build(rewrite.Decay(layout="1d"), nq=17, grid=(4, 4), prefix=1).grid is None
    m = build(rewrite.Decay(), nq=32, causal=True, mask="causal")
    assert m.grid is None and m.causal
    with pytest.raises(RewriteError, match="gamma"):
        rewrite.Decay(gamma=0.0)


def test_flops_slightly_above_exact():
    ev = lambda e: cost.evaluate(e, B=1, H=1, N=1024, Nk=1024, d=64, dv=64)  # noqa: E731
    assert 1.0 < ev(rewrite.Decay().flops()) / ev(cost.exact_flops()) < 1.05


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_gamma_nears_one(causal):
    q, k, v = local_qkv(96)
    exact = reference(q, k, v, causal=causal)
    errors = [rel_err(DecayAttention(g, causal=causal)(q, k, v, is_causal=causal), exact)
              for g in (0.3, 0.7, 0.95, 0.999, 1.0)]
    assert_decreasing(errors)
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("gamma, exact", [(0.8, False), (1.0, True)])
def test_bert_end_to_end(gamma, exact):
    bert_end_to_end(rewrite.Decay(gamma=gamma), exact_expected=exact)


def test_vit_end_to_end_uses_the_grid():
    """A tiny ViT: the site knows its 4x4 grid and CLS token, so 'auto' picks 2-D Manhattan decay."""
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=128,
                               image_size=32, patch_size=8, attn_implementation="eager")).eval()
    batch = {"pixel_values": torch.randn(2, 3, 32, 32)}
    site = rewrite.find_attention(model, example_kwargs=batch)[0]
    assert tuple(site.grid) == (4, 4) and site.prefix_tokens == 1
    rewrite.optimize(model, {"_default": rewrite.Decay(gamma=0.5)}, example_kwargs=batch)
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten" and "declined" not in (row.reason or "") and row.error > 1e-3
    handler = rewrite.actions.handler_for(rewrite.Decay())
    module = handler(rewrite.Decay(gamma=0.5), None, site)
    assert isinstance(module, DecayAttention) and module.grid == (4, 4) and module.prefix_tokens == 1


# ------------------------------------------------------------- the strided (Toeplitz) bias and causal row blocks
@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(1, 1, 1), (2, 2, 1), (1, 4, 2)]), st.integers(1, 130), st.floats(0.05, 0.999),
       st.booleans(), st.sampled_from([3, 16, 256]), st.integers(0, 999))
def test_strided_bias_equals_the_dense_bias(shape, n, gamma, causal, block, seed):
    """Without a site mask the bias is a strided view and causal rows go in blocks: odd lengths, GQA, the same
    output as SDPA with the dense ``log(gamma)·|i - j|`` bias built out."""
    from rewrite.mixers import decay
    b, hq, hkv = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, dd, generator=gen) for h, dd in ((hq, 8), (hkv, 8), (hkv, 5)))
    i = torch.arange(n)
    bias = math.log(gamma) * (i[:, None] - i[None, :]).abs().float()
    ref = reference(q, k, v, causal=causal, bias=bias)
    saved = decay._CAUSAL_BLOCK
    decay._CAUSAL_BLOCK = block
    try:
        out = DecayAttention(gamma, causal=causal)(q, k, v, is_causal=causal, enable_gqa=True)
    finally:
        decay._CAUSAL_BLOCK = saved
    assert_close(out, ref)


def test_no_quadratic_tensor_without_a_site_mask():
    n = 1024
    q, k, v = torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
    with torch.no_grad(), LargestAllocation() as seen:
        for causal in (False, True):
            DecayAttention(0.9, causal=causal)(q, k, v, is_causal=causal)
    assert seen.largest < n * n * 4 / 16, seen.largest
