"""SharedQuery: exact when all queries are equal, calibrated causal prefix form, masks, handler, pipeline."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rewrite
from rewrite.actions import Decline, RewriteError
from rewrite.mixers.shared_query import SharedQueryAttention
from rewrite.actions import build_target
from mixer_helpers import assert_like_sdpa, bert_end_to_end, make_call, make_site, padded_mask  # noqa: E402

MIN = torch.finfo(torch.float32).min



shapes = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]), st.integers(1, 24),
                   st.sampled_from([4, 8]))


@settings(max_examples=20, deadline=None)
@given(shapes, st.sampled_from(["none", "keys", "expanded", "bool"]), st.integers(0, 3))
def test_mean_is_exact_when_all_queries_are_equal(shape, mask_kind, pad):
    b, (hq, hkv), n, d = shape
    torch.manual_seed(n + d)
    q = torch.randn(b, hq, 1, d).expand(b, hq, n, d)
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d + 2)
    pad = min(pad, n - 1)
    mask = None if mask_kind == "none" else padded_mask(
        b, n, n, pad, False, expanded=mask_kind != "keys", kind="bool" if mask_kind == "bool" else "additive")
    if mask is not None and pad:       # padded queries may be anything: the mean is over valid tokens only
        q = q.clone()
        q[-1, :, n - pad:] = 11.0
    mod = SharedQueryAttention("mean")
    out = mod(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == ref.shape and mod.dense_calls == 0
    valid = slice(None) if not (mask is not None and pad) else slice(0, n - pad)
    torch.testing.assert_close(out[..., valid, :], ref[..., valid, :], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, mod.dense(q, k, v, attn_mask=mask, enable_gqa=True), atol=1e-5, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(shapes, st.booleans(), st.integers(0, 3), st.integers(0, 5))
def test_calibrated_equals_softmax_of_its_fixed_query(shape, causal, pad, extra_k):
    """The calibrated vector q̄: every form equals SDPA run with q̄ as every query (causal: the prefix form,
    including KV-cache decoding with Nq < Nk)."""
    b, (hq, hkv), nq, d = shape
    nk = nq + (extra_k if causal else 0)
    torch.manual_seed(nq * 5 + nk)
    q, k, v = torch.randn(b, hq, nq, d) * 2, torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    mod = SharedQueryAttention("calibrated").fit(torch.randn(3, hq, 7, d) + 1.0)
    qbar = mod.calibrated_query().float().expand(b, hq, nq, d)
    pad = min(pad, nk - 1)
    mask = padded_mask(b, nq, nk, pad, causal) if (pad or nq != nk) else None
    flag = causal and mask is None
    out = mod(q, k, v, attn_mask=mask, is_causal=flag, enable_gqa=True)
    ref = F.scaled_dot_product_attention(qbar, k, v, attn_mask=mask, is_causal=flag, enable_gqa=True)
    assert mod.dense_calls == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mod.dense(q, k, v, attn_mask=mask, is_causal=flag, enable_gqa=True), ref,
                               atol=1e-5, rtol=1e-4)


def test_prefix_softmax_is_stable_for_large_scores():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 50, 8) * 30, torch.randn(1, 2, 50, 8)
    mod = SharedQueryAttention("calibrated").fit(torch.randn(1, 2, 5, 8) * 30)
    out = mod(torch.zeros(1, 2, 50, 8), k, v, is_causal=True)
    assert torch.isfinite(out).all()
    ref = F.scaled_dot_product_attention(mod.calibrated_query().float().expand(1, 2, 50, 8), k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_mean_at_a_runtime_causal_mask_never_leaks():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    mask = padded_mask(2, 12, 12, 2, causal=True)
    mod = SharedQueryAttention("mean")
    with pytest.warns(RuntimeWarning, match="dense"):
        out = mod(q, k, v, attn_mask=mask)
    q2, k2 = q.clone(), k.clone()
    q2[..., 6:, :] += 3
    k2[..., 6:, :] -= 3
    torch.testing.assert_close(mod(q2, k2, v, attn_mask=mask)[..., :6, :], out[..., :6, :])
    # row i uses the mean of the queries it may see: row 0 is exact attention of query 0 alone
    torch.testing.assert_close(out[..., :1, :], F.scaled_dot_product_attention(q[..., :1, :], k, v, attn_mask=mask[..., :1, :]))


def test_fit_accumulates_and_state_dict_round_trips():
    mod = SharedQueryAttention("calibrated")
    a, b = torch.randn(2, 4, 5, 8), torch.randn(3, 4, 7, 8)
    mod.fit(a).fit(b)
    expect = torch.cat([a.transpose(0, 1).reshape(4, -1, 8), b.transpose(0, 1).reshape(4, -1, 8)], 1).mean(1)
    torch.testing.assert_close(mod.calibrated_query().squeeze(1).float(), expect)
    fresh = SharedQueryAttention("calibrated")
    fresh.load_state_dict(mod.state_dict())
    assert fresh.fitted
    torch.testing.assert_close(fresh.calibrated_query(), mod.calibrated_query())
    with pytest.raises(RewriteError, match="calibrated"):
        mod.fit(torch.randn(1, 3, 5, 8))


def test_unfitted_calibrated_fits_on_first_real_call():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    mod = SharedQueryAttention("calibrated")
    assert not mod.fitted
    mod(q, k, v)
    assert mod.fitted
    torch.testing.assert_close(mod.calibrated_query().squeeze(1).float(), q[0].mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query", ["mean", "calibrated"])
def test_output_shape_and_dtype_match_sdpa(dtype, query):
    assert_like_sdpa(SharedQueryAttention(query), dtype, contiguous=True)


def test_json_validation_and_flops():
    import sympy
    from rewrite import cost
    for act in (rewrite.SharedQuery(), rewrite.SharedQuery(query="calibrated")):
        assert rewrite.action_from_json(act.to_json()) == act
    assert rewrite.SharedQuery().query == "mean" and rewrite.SharedQuery.exact is False
    with pytest.raises(RewriteError, match="'median'"):
        rewrite.SharedQuery(query="median")
    f = rewrite.SharedQuery().flops()
    assert isinstance(f, sympy.Expr) and f.free_symbols <= set(cost.SYMBOLS.values())
    sizes = dict(B=1, H=12, N=1024, Nk=1024, d=64, dv=64)
    assert cost.evaluate(f, **sizes) < cost.evaluate(cost.exact_flops(), **sizes) / 100


def test_handler():
    mean, cal = rewrite.SharedQuery(), rewrite.SharedQuery(query="calibrated")
    causal_call, causal_site = make_call((2, 4, 8, 16), (2, 4, 8, 16), True), make_site(mask="causal", is_causal=True)
    out = build_target(mean, causal_call, causal_site)
    assert isinstance(out, Decline) and "calibrated" in out
    assert isinstance(build_target(cal, causal_call, causal_site), SharedQueryAttention)
    assert isinstance(build_target(mean, make_call((2, 4, 1, 16), (2, 4, 9, 16)),
                                           make_site((2, 4, 1, 16), (2, 4, 9, 16), mask="additive")), SharedQueryAttention)
    out = build_target(cal, make_call((2, 4, 8, 16), (2, 4, 8, 16)), make_site(mask="bias+additive"))
    assert isinstance(out, Decline) and "bias" in out


@pytest.mark.parametrize("query", ["mean", "calibrated"])
def test_pipeline_tiny_bert(query):
    report = bert_end_to_end(rewrite.SharedQuery(query=query), exact_expected=False)
    assert all(row.flops_after is None or row.flops_after < row.flops_before for row in report.sites)


def test_calibrated_kv_cache_decoding_matches_full_causal_forward():
    torch.manual_seed(0)
    n = 15
    q, k, v = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    mod = SharedQueryAttention("calibrated").fit(torch.randn(2, 4, 5, 8))
    full = mod(q, k, v, attn_mask=padded_mask(2, n, n, 2, causal=True), enable_gqa=True)
    step = mod(q[:, :, -3:], k, v, attn_mask=padded_mask(2, 3, n, 2, causal=True), enable_gqa=True)
    torch.testing.assert_close(step, full[:, :, -3:], atol=1e-5, rtol=1e-4)
    one = mod(q[:, :, -1:], k, v, attn_mask=padded_mask(2, 1, n, 2, causal=False, expanded=False), enable_gqa=True)
    torch.testing.assert_close(one, full[:, :, -1:], atol=1e-5, rtol=1e-4)
