"""Linear (kernelised) attention: causal chunked form == quadratic reference, masks, GQA, handler, pipeline."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rewrite
from rewrite.actions import Decline, RewriteError
from rewrite.mixers.linear import LinearAttention
from rewrite.actions import build_target
from mixer_helpers import assert_like_sdpa, make_call, make_site, padded_mask  # noqa: E402

MIN = torch.finfo(torch.float32).min


# ------------------------------------------------------------------------------------------------- helpers


def naive(fq, fk, v, allowed):
    """Independent quadratic reference: explicit weights, explicit loops over nothing but matrices."""
    a = (fq @ fk.transpose(-1, -2)) * allowed
    return (a @ v) / (a.sum(-1, keepdim=True)).clamp_min(1e-12)


def features(mod, q, k, scale):
    r = scale ** 0.5
    if mod.feature == "elu":
        return F.elu(q * r) + 1, F.elu(k * r) + 1
    if mod.feature == "relu":
        return F.relu(q * r), F.relu(k * r)
    proj = mod._proj(q.shape[-1], q.device)
    m = proj.shape[0]

    def phi(x, rowmax):
        x = x * r
        z = x @ proj.T - 0.5 * (x * x).sum(-1, keepdim=True)
        z = z - (z.amax(-1, keepdim=True) if rowmax else z.amax((-2, -1), keepdim=True))
        return torch.exp(z) / math.sqrt(m)
    return phi(q, True), phi(k, False)


def bert_e2e(action, with_mask=False):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    m = BertModel(BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                             attn_implementation="eager")).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 16))}
    if with_mask:
        am = torch.ones(2, 16, dtype=torch.long)
        am[1, -4:] = 0
        batch["attention_mask"] = am
    rewrite.optimize(m, {"_default": action}, example_kwargs=batch)
    return m


shapes = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]), st.integers(1, 40),
                   st.sampled_from([4, 8]))


# ------------------------------------------------------------------------------------------------- property

@settings(max_examples=20, deadline=None)
@given(shapes, st.sampled_from(["elu", "relu", "favor"]), st.booleans(), st.integers(0, 3), st.sampled_from([1, 4, 16]))
def test_causal_chunked_equals_quadratic_reference(shape, feature, gqa_pad_bool, pad, chunk):
    b, (hq, hkv), n, d = shape
    torch.manual_seed(n * 7 + d)
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d + 1)
    mod = LinearAttention(feature, 8, d, seed=1, chunk=chunk)
    pad = min(pad, n - 1)
    mask = padded_mask(b, n, n, pad, causal=True, kind="bool" if gqa_pad_bool else "additive")
    out = mod(q, k, v, attn_mask=mask if pad else None, is_causal=not pad, enable_gqa=True)
    assert mod.dense_calls == 0
    ref = mod.dense(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # and an independent reference on the expanded heads
    rep = hq // hkv
    ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    fq, fk = features(mod, q, ke, 1 / math.sqrt(d))
    allowed = torch.ones(n, n).tril() * (mask.float().amax(-2, keepdim=True) > -1e4 if mask.dtype != torch.bool
                                          else mask.any(-2, keepdim=True)).float()
    torch.testing.assert_close(out, naive(fq, fk, ve, allowed if pad else torch.ones(n, n).tril()),
                               atol=2e-5, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(shapes, st.integers(1, 12), st.sampled_from(["elu", "relu", "favor"]), st.sampled_from(["none", "keys", "expanded", "bool"]))
def test_bidirectional_and_cross_equal_quadratic_reference(shape, nk, feature, mask_kind):
    b, (hq, hkv), nq, d = shape
    torch.manual_seed(nq + nk)
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    mod = LinearAttention(feature, 8, d)
    pad = min(2, nk - 1)
    mask = None if mask_kind == "none" else padded_mask(
        b, nq, nk, pad, causal=False, expanded=mask_kind != "keys", kind="bool" if mask_kind == "bool" else "additive")
    out = mod(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == (b, hq, nq, d) and mod.dense_calls == 0
    torch.testing.assert_close(out, mod.dense(q, k, v, attn_mask=mask), atol=2e-5, rtol=1e-4)


def test_padding_keys_do_not_matter():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = padded_mask(2, 10, 10, 3, causal=False)
    mod = LinearAttention("elu")
    out = mod(q, k, v, attn_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -3:] = 50.0
    v2[1, :, -3:] = -9.0
    torch.testing.assert_close(mod(q, k2, v2, attn_mask=mask), out)


def test_kv_cache_decoding_equals_full_causal_rows():
    torch.manual_seed(0)
    n, new = 20, 3
    q, k, v = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    mod = LinearAttention("favor", 16, 8)
    full = mod(q, k, v, attn_mask=padded_mask(2, n, n, 2, causal=True), enable_gqa=True)
    step = mod(q[:, :, -new:], k, v, attn_mask=padded_mask(2, new, n, 2, causal=True), enable_gqa=True)
    torch.testing.assert_close(step, full[:, :, -new:], atol=1e-5, rtol=1e-4)
    one = mod(q[:, :, -1:], k, v, attn_mask=padded_mask(2, 1, n, 2, causal=False, expanded=False), enable_gqa=True)
    torch.testing.assert_close(one, full[:, :, -1:], atol=1e-5, rtol=1e-4)


def test_general_mask_uses_dense_form_and_says_so():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    band = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs() <= 2
    mod = LinearAttention("elu")
    with pytest.warns(RuntimeWarning, match="dense"):
        out = mod(q, k, v, attn_mask=band)
    assert mod.dense_calls == 1
    fq, fk = features(mod, q, k, 0.5)
    torch.testing.assert_close(out, naive(fq, fk, v, band.float()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_output_shape_and_dtype_match_sdpa(dtype, causal):
    for feature in ("elu", "relu", "favor"):
        assert_like_sdpa(LinearAttention(feature, 16, 16), dtype, is_causal=causal)


def test_extra_leading_dims():
    q, k, v = torch.randn(2, 3, 4, 10, 8), torch.randn(2, 3, 4, 10, 8), torch.randn(2, 3, 4, 10, 8)
    out = LinearAttention("elu")(q, k, v, is_causal=True)
    assert out.shape == (2, 3, 4, 10, 8)
    torch.testing.assert_close(out[1, 2], LinearAttention("elu")(q[1, 2], k[1, 2], v[1, 2], is_causal=True))


# --------------------------------------------------------------------------------------------- action & handler

def test_json_round_trip_and_defaults():
    for act in (rewrite.Linear(), rewrite.Linear(feature="favor", features=32, seed=3), rewrite.Linear("relu")):
        assert rewrite.action_from_json(act.to_json()) == act
    assert rewrite.Linear().feature == "elu" and rewrite.Linear.exact is False
    assert rewrite.action_from_json({"action": "Linear", "args": {}}) == rewrite.Linear()


@pytest.mark.parametrize("bad", [{"feature": "softmax"}, {"features": 0}, {"features": True}, {"seed": 1.5}])
def test_validation_names_the_value(bad):
    with pytest.raises(RewriteError, match=repr(list(bad.values())[0]).strip("'")):
        rewrite.Linear(**bad)


def test_flops_symbolic():
    import sympy
    from rewrite import cost
    f = rewrite.Linear().flops()
    assert isinstance(f, sympy.Expr) and f.free_symbols <= set(cost.SYMBOLS.values())
    sizes = dict(B=1, H=12, N=4096, Nk=4096, d=64, dv=64)
    assert cost.evaluate(f, **sizes) < cost.evaluate(cost.exact_flops(), **sizes) / 10
    assert cost.evaluate(rewrite.Linear("favor").flops(causal=True), **sizes) > cost.evaluate(rewrite.Linear("favor").flops(), **sizes)


def test_handler_serves_causal_cross_and_padding_and_declines_biases():
    act = rewrite.Linear()
    assert isinstance(build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16), True),
                                     make_site(mask="causal", is_causal=True)), LinearAttention)
    assert isinstance(build_target(act, make_call((2, 4, 1, 16), (2, 4, 9, 16)),
                                     make_site((2, 4, 1, 16), (2, 4, 9, 16), mask="additive")), LinearAttention)
    for mask in ("bias", "alibi+additive", "bias+additive"):
        out = build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16)), make_site(mask=mask))
        assert isinstance(out, Decline) and "bias" in out


# ------------------------------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("action", [rewrite.Linear(), rewrite.Linear(feature="favor")])
def test_pipeline_tiny_bert(action):
    m = bert_e2e(action, with_mask=action.feature == "elu")
    rows = m.rewrite_report.sites
    assert len(rows) == 2
    for row in rows:
        assert row.status == "rewritten" and row.exact is False
        assert row.error is not None and 0 < row.error < 1
    assert "Linear" in str(m.rewrite_report)


def test_pipeline_proven_causal_does_not_leak():
    class Causal(nn.Module):
        def __init__(self, d=32, h=4, n=64):
            super().__init__()
            self.h, self.qkv, self.proj = h, nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")).softmax(-1)
            return self.proj((att @ v).transpose(1, 2).reshape(B, T, C))

    torch.manual_seed(0)
    m = Causal().eval()
    x = torch.randn(2, 16, 32)
    rewrite.optimize(m, {"_default": rewrite.Linear()}, example_inputs=(x,))
    row = m.rewrite_report.sites[0]
    assert row.status == "rewritten" and row.is_causal and not row.exact
    x2 = x.clone()
    x2[:, 10:] += 3.0
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :10], m(x2)[:, :10])


def test_pipeline_padded_gpt2_runtime_causal_mask_does_not_leak():
    """HF builds GPT-2's causal+padding mask outside the model, so the site is not proven causal; the mixer
    reads the mask at run time and must still use its causal form."""
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    m = GPT2Model(GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=64, vocab_size=100,
                             bos_token_id=0, eos_token_id=0, attn_implementation="eager")).eval()
    ids = torch.randint(0, 100, (2, 16))
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, -4:] = 0
    rewrite.optimize(m, {"_default": rewrite.Linear()}, example_kwargs={"input_ids": ids, "attention_mask": am})
    assert all(r.status == "rewritten" and not r.exact for r in m.rewrite_report.sites)
    ids2 = ids.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 1) % 100
    with torch.no_grad():
        a = m(input_ids=ids, attention_mask=am).last_hidden_state
        b = m(input_ids=ids2, attention_mask=am).last_hidden_state
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:12], b[:, 8:12])
