"""Flow attention: bidirectional and causal fast forms == quadratic reference, masks, handler, pipeline."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewrite
from rewrite.actions import Decline, RewriteError
from rewrite.mixers.flow import FlowAttention
from rewrite.actions import build_target
from mixer_helpers import assert_like_sdpa, bert_end_to_end, make_call, make_site  # noqa: E402

MIN = torch.finfo(torch.float32).min


def padded_mask(b, n, pad, causal, expanded=True, kind="additive"):
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad:
        valid[-1, n - pad:] = False
    allowed = valid[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    elif expanded:
        allowed = allowed.expand(b, 1, n, n)
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, MIN)


def flowformer_causal(q, k, v, eps=1e-6):
    """Independent reference written from Flowformer's causal equations (prefix means, prefix softmax)."""
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    n = q.shape[-2]
    tri = torch.ones(n, n).tril()
    cnt = tri.sum(-1, keepdim=True)
    inc = (fq * (tri @ fk) / cnt).sum(-1, keepdim=True) + eps
    out = (fk * (tri @ fq) / cnt).sum(-1, keepdim=True) + eps
    inc_c = (fq * (tri @ (fk / out)) / cnt).sum(-1, keepdim=True)
    out_c = (fk * (tri @ (fq / inc)) / cnt).sum(-1, keepdim=True).clamp(max=1.0)
    alloc = torch.sigmoid(inc_c)
    comp = torch.exp(out_c) / ((tri @ torch.exp(out_c)) / cnt)
    scores = (fq @ fk.transpose(-1, -2)) * tri
    return alloc * (scores @ (comp * v)) / (cnt * inc)


def flowformer_bidirectional(q, k, v, eps=1e-6):
    """Independent reference from Flowformer's non-causal equations (sums, softmax competition × N)."""
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    n = k.shape[-2]
    inc = (fq * fk.sum(-2, keepdim=True)).sum(-1, keepdim=True) + eps * n
    out = (fk * fq.sum(-2, keepdim=True)).sum(-1, keepdim=True) + eps * n
    inc_c = (fq * (fk / out).sum(-2, keepdim=True)).sum(-1, keepdim=True)
    out_c = (fk * (fq / inc).sum(-2, keepdim=True)).sum(-1, keepdim=True).clamp(max=1.0)
    alloc = torch.sigmoid(inc_c)
    comp = torch.softmax(out_c, dim=-2) * n
    return alloc * (fq @ (fk.transpose(-1, -2) @ (comp * v))) / inc


shapes = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]), st.integers(1, 40),
                   st.sampled_from([4, 8]))


@settings(max_examples=20, deadline=None)
@given(shapes, st.booleans(), st.integers(0, 3), st.sampled_from([1, 4, 16]), st.booleans())
def test_causal_form_equals_quadratic_reference(shape, causal, pad, chunk, as_bool):
    b, (hq, hkv), n, d = shape
    torch.manual_seed(n + d)
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    mod = FlowAttention(chunk=chunk)
    pad = min(pad, n - 1)
    mask = padded_mask(b, n, pad, causal, kind="bool" if as_bool else "additive") if pad else None
    out = mod(q, k, v, attn_mask=mask, is_causal=causal and not pad, enable_gqa=True)
    assert mod.dense_calls == 0 and out.shape == (b, hq, n, d)
    ref = mod.dense(q, k, v, attn_mask=padded_mask(b, n, pad, causal), enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 30), st.sampled_from([4, 8]))
def test_matches_flowformer_equations(n, d):
    torch.manual_seed(n)
    q, k, v = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    mod = FlowAttention(chunk=8)
    torch.testing.assert_close(mod(q, k, v, is_causal=True), flowformer_causal(q, k, v), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mod(q, k, v), flowformer_bidirectional(q, k, v), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_positions_do_not_matter(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    mask = padded_mask(2, 12, 3, causal)
    mod = FlowAttention()
    out = mod(q, k, v, attn_mask=mask)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[1, :, -3:], k2[1, :, -3:], v2[1, :, -3:] = 5.0, -7.0, 30.0
    torch.testing.assert_close(mod(q2, k2, v2, attn_mask=mask)[:, :, :-3], out[:, :, :-3])


def test_causal_does_not_leak():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    mod = FlowAttention(chunk=4)
    out = mod(q, k, v, is_causal=True)
    q[..., 12:, :] += 2
    k[..., 12:, :] -= 2
    v[..., 12:, :] *= 3
    torch.testing.assert_close(mod(q, k, v, is_causal=True)[..., :12, :], out[..., :12, :])


def test_general_mask_dense_and_decode_refused():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    band = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs() <= 2
    mod = FlowAttention()
    with pytest.warns(RuntimeWarning, match="dense"):
        out = mod(q, k, v, attn_mask=band)
    assert mod.dense_calls == 1 and torch.isfinite(out).all()
    causal_decode = torch.arange(9)[None, :] <= torch.arange(3)[:, None] + 6
    with pytest.raises(RewriteError, match="Nq=3 != Nk=9"):
        mod(q[..., -3:, :], k, v, attn_mask=causal_decode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_output_shape_and_dtype_match_sdpa(dtype, causal):
    assert_like_sdpa(FlowAttention(), dtype, is_causal=causal)


def test_json_round_trip_and_flops():
    import sympy
    from rewrite import cost
    act = rewrite.Flow()
    assert rewrite.action_from_json(act.to_json()) == act and act.to_json() == {"action": "Flow", "args": {}}
    assert rewrite.Flow.exact is False
    f = act.flops()
    assert isinstance(f, sympy.Expr) and f.free_symbols <= set(cost.SYMBOLS.values())
    sizes = dict(B=1, H=12, N=4096, Nk=4096, d=64, dv=64)
    assert cost.evaluate(f, **sizes) < cost.evaluate(cost.exact_flops(), **sizes) / 10
    with pytest.raises(RewriteError, match="Bad arguments"):
        rewrite.action_from_json({"action": "Flow", "args": {"window": 3}})


def test_handler():
    act = rewrite.Flow()
    assert isinstance(build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16), True),
                                   make_site(mask="causal", is_causal=True)), FlowAttention)
    assert isinstance(build_target(act, make_call((2, 4, 8, 16), (2, 2, 8, 16)),
                                   make_site((2, 4, 8, 16), (2, 2, 8, 16), mask="additive", gqa=True)), FlowAttention)
    out = build_target(act, make_call((2, 4, 1, 16), (2, 4, 9, 16)), make_site((2, 4, 1, 16), (2, 4, 9, 16)))
    assert isinstance(out, Decline) and "Nq != Nk" in out
    out = build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16)), make_site(mask="alibi+additive"))
    assert isinstance(out, Decline) and "alibi" in out


def test_pipeline_tiny_bert():
    bert_end_to_end(rewrite.Flow(), exact_expected=False)
