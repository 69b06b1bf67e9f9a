"""TopK: the k largest (masked) scores per query, renormalised; exact for k >= Nk; any Nq, Nk."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_helpers import (additive, assert_close, assert_decreasing, attention_case,  # noqa: E402
                                 bert_end_to_end, build, local_qkv, reference, rel_err, run_case)

import rewrite  # noqa: E402
from rewrite import cost  # noqa: E402
from rewrite.mixers.top_k import TopKAttention  # noqa: E402


def topk_reference(case, k):
    """Dense scores, everything under each row's k-th largest dropped, then softmax (ties kept)."""
    q, kk, v = case["q"], case["k"], case["v"]
    g = q.shape[-3] // kk.shape[-3]
    kk, v = kk.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    s = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if case["mask"] is not None:
        s = s + additive(case["mask"])
    if case["causal"]:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    th = s.topk(min(k, s.shape[-1]), dim=-1).values[..., -1:]
    s = s.masked_fill(s < th, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


@settings(max_examples=20, deadline=None)
@given(case=attention_case(same_len=False), extra=st.integers(0, 5))
def test_exact_when_k_covers_all_keys(case, extra):
    module = TopKAttention(case["k"].shape[-2] + extra, causal=case["causal"])
    assert_close(run_case(module, case), reference(case["q"], case["k"], case["v"], case["mask"], case["causal"]))


@settings(max_examples=20, deadline=None)
@given(case=attention_case(same_len=False) | attention_case(same_len=True), k=st.integers(1, 12))
def test_matches_thresholded_reference(case, k):
    assert_close(run_case(TopKAttention(k, causal=case["causal"]), case), topk_reference(case, k))


def test_value_product_paths_agree():
    """Gathered values (k small against Nk) and dense scattered probabilities give the same result."""
    q, k, v = torch.randn(2, 4, 50, 8), torch.randn(2, 2, 200, 8), torch.randn(2, 2, 200, 6)
    case = {"q": q, "k": k, "v": v, "mask": None, "causal": False}
    for kk in (3, 40, 60):   # 3, 40: gather path (4k < Nk); 60: dense path
        assert_close(TopKAttention(kk)(q, k, v), topk_reference(case, kk))


def test_handler_serves_every_site_kind():
    action = rewrite.TopK(k=8)
    for kw in ({"nq": 1, "nk": 32, "causal": True, "mask": "boolean"}, {"nq": 16, "nk": 40},
               {"nq": 32, "causal": True, "mask": "causal"}, {"nq": 32, "heads": 8, "kv_heads": 2}):
        assert isinstance(build(action, **kw), TopKAttention), kw


def test_flops_between_selection_and_exact():
    exact = cost.evaluate(cost.exact_flops(), B=1, H=1, N=4096, Nk=4096, d=64, dv=64)
    f = [cost.evaluate(rewrite.TopK(k=k).flops(), B=1, H=1, N=4096, Nk=4096, d=64, dv=64) for k in (16, 256, 8192)]
    assert f[0] < f[1] < exact and f[0] > 0.4 * exact  # selection still scores every key
    assert abs(f[2] / exact - 1) < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_k_grows(causal):
    n = 128
    q, k, v = local_qkv(n)
    exact = reference(q, k, v, causal=causal)
    errors = [rel_err(TopKAttention(kk)(q, k, v, is_causal=causal), exact) for kk in (2, 8, 32, n)]
    assert_decreasing(errors)
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("k, exact", [(3, False), (16, True)])
def test_bert_end_to_end(k, exact):
    bert_end_to_end(rewrite.TopK(k=k), exact_expected=exact)


# -------------------------------------------------------- two-stage selection, row chunks, weighted-gather values
def dense_topk_reference(q, k, v, mask, causal, kk):
    """The previous formulation: dense masked scores, ``topk``, probabilities scattered into a dense
    ``[Nq, Nk]`` matrix and multiplied with every value."""
    g = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s + additive(mask)
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    vals, idx = s.topk(min(kk, s.shape[-1]), dim=-1)
    p = torch.softmax(vals, -1).nan_to_num(0.0)
    return torch.zeros_like(s).scatter_(-1, idx, p) @ v


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(1, 1, 1), (2, 3, 1), (1, 4, 2)]), st.integers(1, 90), st.integers(150, 700),
       st.sampled_from([1, 3, 5, 8]), st.sampled_from(["none", "bool_full", "additive_full", "additive_bcast"]),
       st.booleans(), st.booleans(), st.integers(0, 999))
def test_grouped_selection_and_row_chunks_equal_dense_form(shape, nq, nk, kk, kind, causal, small_chunks, seed):
    """Odd lengths where the two-stage (group maxima first) selection runs, several row chunks, masks, causal,
    GQA: the same output as the dense scatter formulation."""
    from rewrite.mixers import _dense
    b, hq, hkv = shape
    causal = causal and kind == "none"
    nk = nq if causal else nk
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, dd, generator=gen) for h, n, dd in ((hq, nq, 8), (hkv, nk, 8), (hkv, nk, 5)))
    mask = None
    if kind == "bool_full":
        mask = torch.rand(b, hq, nq, nk, generator=gen) > 0.6
    elif kind == "additive_full":
        mask = torch.randn(1, 1, nq, nk, generator=gen)
    elif kind == "additive_bcast":
        mask = torch.zeros(b, 1, 1, nk)
        mask[..., nk // 3:] = torch.finfo(torch.float32).min
    saved = _dense.ROW_CHUNK_ELEMENTS
    _dense.ROW_CHUNK_ELEMENTS = 3000 if small_chunks else saved
    try:
        out = TopKAttention(kk, causal=causal)(q, k, v, attn_mask=mask, enable_gqa=True)
    finally:
        _dense.ROW_CHUNK_ELEMENTS = saved
    assert_close(out, dense_topk_reference(q, k, v, mask, causal, kk))


def test_select_top_keeps_the_values_of_topk():
    from rewrite.mixers.top_k import _group_size, select_top
    gen = torch.Generator().manual_seed(0)
    for nk, kk in ((4096, 128), (1024, 16), (640, 5), (512, 1)):
        gs = _group_size(nk, kk)
        assert gs > 1
        for sc in (torch.randn(3, 7, nk, generator=gen),
                   torch.randn(3, 7, nk, generator=gen).masked_fill(torch.rand(3, 7, nk, generator=gen) > 0.1,
                                                                     float("-inf")),
                   torch.randint(0, 4, (3, 7, nk), generator=gen).float()):          # many ties
            vals, idx = select_top(sc, kk, gs)
            ref = sc.topk(kk, -1).values
            torch.testing.assert_close(vals.sort(-1).values, ref.sort(-1).values)
            assert torch.equal(torch.gather(sc, -1, idx), vals)
            assert (idx.sort(-1).values.diff(dim=-1) > 0).all()                     # distinct keys


def test_grad_path_equals_no_grad_path():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 33, 8, generator=gen), torch.randn(1, 2, 300, 8, generator=gen), \
        torch.randn(1, 2, 300, 8, generator=gen)
    mask = torch.randn(1, 1, 33, 300, generator=gen)
    module = TopKAttention(4)
    with torch.no_grad():
        ref = module(q, k, v, attn_mask=mask, enable_gqa=True)
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    out = module(*ts, attn_mask=mask, enable_gqa=True)
    assert_close(out, ref)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in ts)
