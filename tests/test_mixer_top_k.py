"""TopK: the k largest (masked) scores per query, renormalised; exact for k >= Nk; any Nq, Nk."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_mixer_a_common import (additive, assert_close, assert_decreasing, attention_case,  # noqa: E402
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
