"""Scatterbrain: exact with a covering window, beats both its parts on structured inputs, fast == dense."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rewrite
from rewrite.actions import Decline, RewriteError
from rewrite.mixers.linear import LinearAttention
from rewrite.mixers.scatterbrain import ScatterbrainAttention
from rewrite.actions import build_target
from mixer_helpers import assert_like_sdpa, bert_end_to_end, make_call, make_site, padded_mask  # noqa: E402

MIN = torch.finfo(torch.float32).min



def structured(seed, b=2, h=2, n=256, d=32):
    """q/k with local structure (smooth positional codes: near tokens align) and global structure (a shared
    direction in every query, carried strongly by ~10% "hub" keys anywhere in the sequence)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.rand(d // 2, generator=g) * 0.3
    codes = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], -1) * 1.2
    glob = torch.randn(d, generator=g)
    glob = glob / glob.norm()
    hubs = (torch.rand(b, h, n, 1, generator=g) < 0.1).float()
    q = codes + 2.0 * glob + 0.1 * torch.randn(b, h, n, d, generator=g)
    k = codes + 3.0 * hubs * glob + 0.1 * torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    return q, k, v


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("causal", [False, True])
def test_error_below_both_parts_on_structured_inputs(causal):
    w, m = 16, 64
    errs = []
    for seed in range(3):
        q, k, v = structured(seed)
        n = q.shape[-2]
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        band = ((j <= i) & (j > i - w)) if causal else ((i - j).abs() <= w // 2)
        local = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
        lowrank = LinearAttention("favor", m, q.shape[-1], seed=0)(q, k, v, is_causal=causal)
        sb = ScatterbrainAttention(w, m, q.shape[-1], seed=0)(q, k, v, is_causal=causal)
        errs.append((rel(sb, ref), rel(local, ref), rel(lowrank, ref)))
    for e_sb, e_local, e_lowrank in errs:
        assert e_sb < e_local and e_sb < e_lowrank, errs


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 30), st.sampled_from([4, 8]),
       st.booleans(), st.integers(0, 2))
def test_exact_when_window_covers_every_key(b, heads, n, d, causal, pad):
    hq, hkv = heads
    torch.manual_seed(n)
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    pad = min(pad, n - 1)
    mask = padded_mask(b, n, n, pad, causal) if pad else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and not pad, enable_gqa=True)
    window = n if causal else 2 * n
    out = ScatterbrainAttention(window, 8, d)(q, k, v, attn_mask=mask, is_causal=causal and not pad, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 40), st.integers(0, 8),
       st.sampled_from([1, 3, 8]), st.sampled_from(["none", "keys", "expanded", "causal", "bool_causal", "flag"]))
def test_fast_form_equals_dense_reference(b, heads, nk, extra_q, window, mask_kind):
    hq, hkv = heads
    d = 8
    nq = max(1, nk - extra_q)            # Nq <= Nk: KV-cache style when shorter
    torch.manual_seed(nk * 3 + nq)
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    pad = min(2, nk - 1)
    causal = mask_kind in ("causal", "bool_causal")
    mask = None if mask_kind in ("none", "flag") else padded_mask(
        b, nq, nk, pad, causal, expanded=mask_kind != "keys", kind="bool" if mask_kind == "bool_causal" else "additive")
    mod = ScatterbrainAttention(window, 8, d, seed=2, chunk=4)
    flag = mask_kind == "flag" and nq == nk
    out = mod(q, k, v, attn_mask=mask, is_causal=flag, enable_gqa=True)
    assert mod.dense_calls == 0 and out.shape == (b, hq, nq, d)
    # the dense form sums exp(s) - (its FAVOR+ estimate) in another order: float32 cancellation of ~1e-4 at n≈130
    torch.testing.assert_close(out, mod.dense(q, k, v, attn_mask=mask, is_causal=flag, enable_gqa=True),
                               atol=1e-3, rtol=1e-3)


def test_stable_with_large_logits():
    """Logits in the hundreds: exp would overflow without the per-row shift."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 64, 16) * 6, torch.randn(1, 2, 64, 16) * 6, torch.randn(1, 2, 64, 16)
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        mod = ScatterbrainAttention(8, 16, 16)
        out = mod(q, k, v, is_causal=causal)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, mod.dense(q, k, v, is_causal=causal), atol=1e-4, rtol=1e-4)
        full = ScatterbrainAttention(128, 16, 16)(q, k, v, is_causal=causal)
        torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)


def test_general_mask_uses_dense_form():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    strided = (torch.arange(9)[:, None] + torch.arange(9)[None, :]) % 2 == 0
    mod = ScatterbrainAttention(20, 8, 4)
    with pytest.warns(RuntimeWarning, match="dense"):
        out = mod(q, k, v, attn_mask=strided)
    assert mod.dense_calls == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=strided), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_output_shape_and_dtype_match_sdpa(dtype, causal):
    assert_like_sdpa(ScatterbrainAttention(4, 16, 16), dtype, is_causal=causal)


def test_json_validation_and_flops():
    import sympy
    from rewrite import cost
    for act in (rewrite.Scatterbrain(), rewrite.Scatterbrain(window=16, features=24, seed=5)):
        assert rewrite.action_from_json(act.to_json()) == act
    assert rewrite.Scatterbrain.exact is False
    for bad in ({"window": 0}, {"features": -3}, {"window": 2.5}):
        with pytest.raises(RewriteError, match="Scatterbrain"):
            rewrite.Scatterbrain(**bad)
    f = rewrite.Scatterbrain().flops()
    assert isinstance(f, sympy.Expr) and f.free_symbols <= set(cost.SYMBOLS.values())
    sizes = dict(B=1, H=12, N=4096, Nk=4096, d=64, dv=64)
    assert cost.evaluate(f, **sizes) < cost.evaluate(cost.exact_flops(), **sizes) / 4


def test_handler():
    act = rewrite.Scatterbrain()
    assert isinstance(build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16), True),
                                           make_site(mask="causal", is_causal=True)), ScatterbrainAttention)
    assert isinstance(build_target(act, make_call((2, 4, 1, 16), (2, 4, 9, 16)),
                                           make_site((2, 4, 1, 16), (2, 4, 9, 16), mask="additive")),
                      ScatterbrainAttention)
    for mask in ("bias", "alibi+additive"):
        out = build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16)), make_site(mask=mask))
        assert isinstance(out, Decline)


def test_pipeline_tiny_bert():
    bert_end_to_end(rewrite.Scatterbrain(window=8, features=16), exact_expected=False)
    # a window covering the sequence is exact up to float error
    bert_end_to_end(rewrite.Scatterbrain(window=64, features=16), exact_expected=True)


def test_kv_cache_decoding_matches_the_full_causal_forward():
    """A decode step's mask is padding-only ([B, 1, 1, Nk]); with queries at the last positions the band must
    still be the causal one the full forward used."""
    torch.manual_seed(0)
    n = 24
    q, k, v = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    mod = ScatterbrainAttention(5, 16, 8, chunk=4)
    full = mod(q, k, v, attn_mask=padded_mask(2, n, n, 2, causal=True), enable_gqa=True)
    for new in (1, 3):
        step = mod(q[:, :, -new:], k, v, attn_mask=padded_mask(2, new, n, 2, causal=True), enable_gqa=True)
        torch.testing.assert_close(step, full[:, :, -new:], atol=1e-5, rtol=1e-4)
    one = mod(q[:, :, -1:], k, v, attn_mask=padded_mask(2, 1, n, 2, causal=False, expanded=False), enable_gqa=True)
    torch.testing.assert_close(one, full[:, :, -1:], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_pipeline_llama_cached_decoding_equals_full_forward():
    """GQA decoder through the real pipeline: prefill + cached steps give the logits of one full forward."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager")
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (2, 12))
    am = torch.ones_like(ids)
    am[1, -3:] = 0
    rewrite.optimize(m, {"_default": rewrite.Scatterbrain(window=4, features=16)},
                     example_kwargs={"input_ids": ids, "attention_mask": am})
    assert all(r.status == "rewritten" for r in m.rewrite_report.sites)
    x = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        full = m(input_ids=x, use_cache=False).logits
        pre = m(input_ids=x[:, :6], use_cache=True)
        step = m(input_ids=x[:, 6:7], past_key_values=pre.past_key_values, use_cache=True)
    torch.testing.assert_close(pre.logits, full[:, :6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.logits, full[:, 6:7], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the blocked CPU path against the gathered form
def gathered_reference(mod, q, k, v, attn_mask=None, is_causal=False):
    """The previous fast formulation: every query gathers its band's keys ([Nq, w, d] copies), the low-rank
    term from global (or chunked prefix) sums, the estimate subtracted on the band; one shift per row."""
    from rewrite.mixers import _layout, _linear, _masks
    dtype = q.dtype
    q, k, v, s = _layout.prepare(q, k, v, None)
    nq, nk = q.shape[-2], k.shape[-2]
    plan = _masks.plan_mask(attn_mask, is_causal, nq, nk, q.dtype)
    q, k = q * s ** 0.5, k * s ** 0.5
    proj = mod._proj(q.shape[-1], q.device)
    causal = plan.kind == "causal"
    offset = plan.offset if causal else nk - nq
    assert plan.kind in ("none", "keys") or (causal and offset == nk - nq)
    v1 = _linear.with_ones(v)
    left, right = mod._extent(causal or nq < nk)
    left, right = max(0, min(left, offset + nq - 1)), max(0, min(right, nk - 1 - offset))
    idx = (torch.arange(nq) + offset)[:, None] + torch.arange(-left, right + 1)[None, :]
    inside, safe = (idx >= 0) & (idx < nk), idx.clamp(0, nk - 1)
    fq, cq = _linear.favor_query(q, proj)
    fk, ck = _linear.favor_key(k, proj, plan.key_bias)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    s_loc = (q.unsqueeze(-2) @ k.expand(*lead, nk, k.shape[-1])[..., safe, :].transpose(-1, -2)).squeeze(-2)
    if plan.key_bias is not None:
        s_loc = s_loc + plan.key_bias[..., 0, :][..., safe]
    s_loc = s_loc.masked_fill(~inside, float("-inf"))
    shift = torch.maximum(s_loc.amax(-1, keepdim=True), cq + ck)
    lr_scale = torch.exp(cq + ck - shift)
    lr_loc = (fq.unsqueeze(-2) @ fk.expand(*lead, nk, fk.shape[-1])[..., safe, :].transpose(-1, -2)).squeeze(-2)
    corr = (torch.exp(s_loc - shift) - lr_loc * lr_scale).masked_fill(~inside, 0.0)
    num_local = (corr.unsqueeze(-2) @ v1.expand(*lead, nk, v1.shape[-1])[..., safe, :]).squeeze(-2)
    num_lr = _linear.linear_causal(fq, fk, v1, offset, mod.chunk) if causal else _linear.linear_bidirectional(fq, fk, v1)
    return _linear.normalise(num_local + num_lr * lr_scale).to(dtype)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(1, 1, 1), (2, 2, 1), (1, 4, 2)]), st.integers(33, 140), st.integers(0, 5),
       st.sampled_from([1, 4, 9, 40, 65]), st.sampled_from(["none", "keys", "expanded", "causal", "bool_causal", "flag"]),
       st.integers(0, 99))
def test_blocked_path_equals_gathered_and_dense_forms(shape, nk, extra_q, window, mask_kind, seed):
    """Odd lengths over several query blocks, padding / causal masks, GQA, KV-cache queries: the blocked band
    equals the gathered formulation it replaced and the dense reference."""
    b, hq, hkv = shape
    d = 8
    nq = max(1, nk - extra_q)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) * 2 for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    causal = mask_kind in ("causal", "bool_causal")
    mask = None if mask_kind in ("none", "flag") else padded_mask(
        b, nq, nk, min(7, nk - 1), causal, expanded=mask_kind != "keys",
        kind="bool" if mask_kind == "bool_causal" else "additive")
    flag = mask_kind == "flag" and nq == nk
    mod = ScatterbrainAttention(window, 12, d, seed=seed, chunk=8)
    out = mod(q, k, v, attn_mask=mask, is_causal=flag, enable_gqa=True)
    assert mod.dense_calls == 0
    kv = (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
    torch.testing.assert_close(out, gathered_reference(mod, q, *kv, attn_mask=mask, is_causal=flag),
                               atol=2e-5, rtol=1e-4)
    # the dense form sums exp(s) - (its FAVOR+ estimate) in another order: float32 cancellation of ~1e-4 at n≈130
    torch.testing.assert_close(out, mod.dense(q, k, v, attn_mask=mask, is_causal=flag, enable_gqa=True),
                               atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_path_differentiable_and_equal_without_grad(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 77, 8), torch.randn(2, 2, 77, 8), torch.randn(2, 2, 77, 8)
    mask = padded_mask(2, 77, 77, 5, causal)
    mod = ScatterbrainAttention(10, 8, 8, chunk=8)
    with torch.no_grad():
        ref = mod(q, k, v, attn_mask=mask, enable_gqa=True)
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    out = mod(*ts, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    out.square().sum().backward()
    dense = [t.clone().requires_grad_() for t in (q, k, v)]
    mod.dense(*dense, attn_mask=mask, enable_gqa=True).square().sum().backward()
    for a, b in zip(ts, dense):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3)


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest storage (bytes) any operation returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_memory_is_linear_in_length(causal):
    """No [N, N] (nor [N, w, d]) tensor: at N = 2048 every allocation stays far below N² floats."""
    n, d = 2048, 16
    q, k, v = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
    mod = ScatterbrainAttention(32, 16, d)
    with torch.no_grad(), _LargestAllocation() as seen:
        mod(q, k, v, is_causal=causal)
    assert seen.largest < n * n * 4 / 16, seen.largest
