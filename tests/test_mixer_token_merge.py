"""TokenMerge: ToMe bipartite matching on keys, proportional attention; exact at r = 0 (and on duplicates)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_helpers import (additive, assert_close, assert_decreasing, attention_case,  # noqa: E402
                                 LargestAllocation, bert_end_to_end, build, reference, rel_err, run_case)

import rewrite  # noqa: E402
from rewrite import cost  # noqa: E402
from rewrite.actions import Decline  # noqa: E402
from rewrite.mixers.token_merge import TokenMergeAttention  # noqa: E402


def tome_reference(q, k, v, mask, r):
    """Token-by-token ToMe on the keys of each (batch, kv head), written with Python loops."""
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[-3], k.shape[-2]
    g = h // hkv
    m = additive(mask)
    m = torch.zeros(b, h, nq, nk) if m is None else m.expand(b, h, nq, nk)
    out = torch.zeros(b, h, nq, v.shape[-1])
    r = min(r, nk // 2)
    for bb in range(b):
        for kh in range(hkv):
            heads = slice(kh * g, (kh + 1) * g)
            kk, vv, mb = k[bb, kh], v[bb, kh], m[bb, heads]
            if r == 0:
                out[bb, heads] = F.scaled_dot_product_attention(q[bb, heads], kk, vv, attn_mask=mb)
                continue
            visible = mb.amax(dim=(0, 1)) > torch.finfo(torch.float32).min / 2
            a_ids, b_ids = list(range(0, nk, 2)), list(range(1, nk, 2))
            unit = F.normalize(kk, dim=-1)
            sim = unit[a_ids] @ unit[b_ids].T
            sim[~visible[a_ids]] = -math.inf
            sim[:, ~visible[b_ids]] = -math.inf
            best, partner = sim.max(-1)
            order = best.argsort(descending=True, stable=True).tolist()
            groups = {j: [j] for j in b_ids}
            for ia in order[:r]:
                groups[b_ids[partner[ia]]].append(a_ids[ia])
            cols = [[a_ids[ia]] for ia in sorted(order[r:])] + [groups[j] for j in b_ids]
            keys, vals, bias = [], [], []
            for grp in cols:
                wgt = visible[grp].float()
                if wgt.sum() == 0:
                    wgt = torch.ones(len(grp))
                keys.append((kk[grp] * wgt[:, None]).sum(0) / wgt.sum())
                vals.append((vv[grp] * wgt[:, None]).sum(0) / wgt.sum())
                bias.append(torch.logsumexp(mb[..., grp], -1))
            out[bb, heads] = F.scaled_dot_product_attention(q[bb, heads], torch.stack(keys), torch.stack(vals),
                                                            attn_mask=torch.stack(bias, -1))
    return out


@settings(max_examples=20, deadline=None)
@given(case=attention_case(same_len=False, allow_causal=False))
def test_exact_when_r_is_zero(case):
    assert_close(run_case(TokenMergeAttention(0), case), reference(case["q"], case["k"], case["v"], case["mask"]))


@settings(max_examples=20, deadline=None)
@given(case=attention_case(same_len=False, allow_causal=False, max_len=24), r=st.integers(1, 14))
def test_matches_loop_reference(case, r):
    out = run_case(TokenMergeAttention(r), case)
    assert_close(out, tome_reference(case["q"], case["k"], case["v"], case["mask"], r), atol=5e-5, rtol=5e-5)


@settings(max_examples=15, deadline=None)
@given(n_pairs=st.integers(1, 12), r=st.integers(0, 12), seed=st.integers(0, 999), padded=st.booleans())
def test_exact_on_duplicated_tokens_thanks_to_proportional_attention(n_pairs, r, seed, padded):
    """Keys/values in identical pairs: merging r <= N/2 pairs with + log(size) changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, n_pairs, 8, generator=gen).repeat_interleave(2, dim=-2)
    v = torch.randn(2, 2, n_pairs, 8, generator=gen).repeat_interleave(2, dim=-2)
    q = torch.randn(2, 4, 7, 8, generator=gen)
    mask = None
    if padded:  # padding removes whole pairs
        mask = torch.ones(2, 1, 1, 2 * n_pairs, dtype=torch.bool)
        mask[0, ..., 2 * ((n_pairs + 1) // 2):] = False
    assert_close(TokenMergeAttention(r)(q, k, v, attn_mask=mask), reference(q, k, v, mask), atol=1e-5, rtol=1e-4)


def test_padding_keys_never_leak_into_visible_ones():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 8, generator=gen)
    k, v = torch.randn(1, 2, 10, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen)
    mask = torch.zeros(1, 1, 1, 10)
    mask[..., 5:] = torch.finfo(torch.float32).min          # Hugging Face style padding
    out = TokenMergeAttention(5)(q, k, v, attn_mask=mask)
    v2 = v.clone()
    v2[..., 5:, :] = 1e3                                     # change only the padded values
    k2 = k.clone()
    k2[..., 5:, :] = torch.randn(1, 2, 5, 8, generator=gen)
    assert_close(TokenMergeAttention(5)(q, k2, v2, attn_mask=mask), out)


def test_handler_declines_causal_and_serves_cross_attention():
    action = rewrite.TokenMerge(r=4)
    assert isinstance(build(action, nq=32, causal=True, mask="causal"), Decline)
    assert isinstance(build(action, nq=1, nk=32, causal=True, mask="boolean"), Decline)   # decoding
    assert isinstance(build(action, nq=16, nk=40), TokenMergeAttention)                   # cross-attention
    assert isinstance(build(action, nq=16, heads=8, kv_heads=2, mask="additive"), TokenMergeAttention)
    with pytest.raises(ValueError, match="causal"):
        x = torch.randn(1, 1, 4, 4)
        TokenMergeAttention(2)(x, x, x, is_causal=True)


def test_flops_fall_with_r():
    ev = lambda a: cost.evaluate(a.flops(), B=1, H=1, N=1024, Nk=1024, d=64, dv=64)  # noqa: E731
    exact = cost.evaluate(cost.exact_flops(), B=1, H=1, N=1024, Nk=1024, d=64, dv=64)
    f = [ev(rewrite.TokenMerge(r=r)) for r in (0, 128, 512, 4096)]
    assert f[0] > exact and f[1] < f[0] and f[2] < f[1] and f[3] == f[2]   # r is capped at Nk / 2


def test_error_falls_as_fewer_tokens_merge():
    """ViT-like keys (many near-duplicate patches): error grows with r, and is tiny for small r."""
    gen = torch.Generator().manual_seed(0)
    n = 128
    proto, vproto = torch.randn(16, 32, generator=gen) * 2, torch.randn(16, 32, generator=gen)
    which = torch.randint(0, 16, (n,), generator=gen)   # keys and values of a token come from one patch type
    k = proto[which] + 0.2 * torch.randn(1, 2, n, 32, generator=gen)
    v = vproto[which] + 0.2 * torch.randn(1, 2, n, 32, generator=gen)
    q = torch.randn(1, 2, n, 32, generator=gen)
    exact = reference(q, k, v)
    errors = [rel_err(TokenMergeAttention(r)(q, k, v), exact) for r in (64, 48, 16, 0)]
    assert_decreasing(errors)
    assert errors[-1] < 1e-6 and errors[-2] < 0.05, errors


@pytest.mark.parametrize("r, exact", [(4, False), (0, True)])
def test_bert_end_to_end(r, exact):
    bert_end_to_end(rewrite.TokenMerge(r=r), exact_expected=exact)


# ----------------------------------------------------------------- matching in row blocks, a broadcast key bias
@settings(max_examples=20, deadline=None)
@given(case=attention_case(same_len=False, allow_causal=False, min_len=9, max_len=31), r=st.integers(1, 15))
def test_matching_in_row_blocks_equals_loop_reference(case, r):
    """The A·Bᵀ similarities a few rows at a time (several blocks at these sizes): odd lengths, every mask
    kind, GQA; the same as the token-by-token reference."""
    from rewrite.mixers import _dense
    saved = _dense.ROW_CHUNK_ELEMENTS
    _dense.ROW_CHUNK_ELEMENTS = 40
    try:
        out = run_case(TokenMergeAttention(r), case)
    finally:
        _dense.ROW_CHUNK_ELEMENTS = saved
    assert_close(out, tome_reference(case["q"], case["k"], case["v"], case["mask"], r), atol=5e-5, rtol=5e-5)


def test_no_quadratic_tensor_with_a_padding_mask():
    from rewrite.mixers import _dense

    n = 1024
    q, k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    mask[..., -100:] = False
    saved = _dense.ROW_CHUNK_ELEMENTS
    _dense.ROW_CHUNK_ELEMENTS = 1 << 14
    try:
        with torch.no_grad(), LargestAllocation() as seen:
            out = TokenMergeAttention(64)(q, k, v, attn_mask=mask)
    finally:
        _dense.ROW_CHUNK_ELEMENTS = saved
    assert out.shape == (1, 2, n, 8) and torch.isfinite(out).all()
    assert seen.largest < 2 * n * n * 4 / 16, seen.largest     # the bipartite [N/2, N/2] never at once
