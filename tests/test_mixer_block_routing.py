"""BlockRouting: mean-pooled block routing (1-D blocks, 2-D grid regions), exact when topk covers all blocks."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_helpers import (additive, assert_close, assert_decreasing, attention_case, bert_end_to_end,  # noqa: E402
                                 build, local_qkv, reference, rel_err, run_case)

import rewrite  # noqa: E402
from rewrite import cost  # noqa: E402
from rewrite.actions import Decline  # noqa: E402
from rewrite.mixers.block_routing import BlockRoutingAttention, line_order, region_order  # noqa: E402


def routing_reference_allow(q, k, order, prefix, topk, causal):
    """Bool ``[B, H, N, N]`` pattern built token by token from the same routing rule (loops, no gathers)."""
    b, h, n, _ = q.shape
    g = h // k.shape[-3]
    kk = k.repeat_interleave(g, -3)
    block_of = torch.full((n,), -1)
    for bi, row in enumerate(order):
        for x in row:
            if x >= 0:
                block_of[x + prefix] = bi
    nb = len(order)
    members = [(block_of == c).nonzero().squeeze(-1) for c in range(nb)]
    kr = torch.stack([kk[:, :, m].mean(2) for m in members], 2)               # [B, H, nb, D]
    allow = torch.zeros(b, h, n, n, dtype=torch.bool)
    for c in range(nb):
        aff = (q[:, :, members[c]].mean(2).unsqueeze(2) * kr).sum(-1)           # [B, H, nb]
        if causal:
            aff[..., c + 1:] = float("-inf")
        aff[..., c] = float("inf")
        chosen = aff.topk(min(topk, nb), -1).indices
        for bb in range(b):
            for hh in range(h):
                for sel in chosen[bb, hh].tolist():
                    allow[bb, hh][members[c][:, None], members[sel][None, :]] = True
    if prefix:
        allow[..., :prefix, :] = True
        allow[..., :, :prefix] = True
    return allow


@settings(max_examples=20, deadline=None)
@given(case=attention_case(), block=st.integers(1, 12), extra=st.integers(0, 2))
def test_exact_when_topk_covers_all_blocks(case, block, extra):
    n = case["q"].shape[-2]
    module = BlockRoutingAttention(block, -(-n // block) + extra, causal=case["causal"])
    assert_close(run_case(module, case), reference(case["q"], case["k"], case["v"], case["mask"], case["causal"]))


@settings(max_examples=15, deadline=None)
@given(case=attention_case(max_len=30), block=st.integers(1, 9), topk=st.integers(1, 4))
def test_1d_matches_token_level_reference(case, block, topk):
    n = case["q"].shape[-2]
    module = BlockRoutingAttention(block, topk, causal=case["causal"])
    allow = routing_reference_allow(case["q"], case["k"], line_order(n, block), 0, topk, case["causal"])
    ref = reference(case["q"], case["k"], case["v"], case["mask"], case["causal"], allow=allow)
    assert_close(run_case(module, case), ref)


@settings(max_examples=15, deadline=None)
@given(gh=st.integers(1, 7), gw=st.integers(1, 7), prefix=st.integers(0, 2), block=st.sampled_from([1, 4, 9, 16]),
       topk=st.integers(1, 5), kind=st.sampled_from(["none", "bool_pad", "additive_full"]), seed=st.integers(0, 999))
def test_2d_regions_match_token_level_reference(gh, gw, prefix, block, topk, kind, seed):
    n = prefix + gh * gw
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, 8, generator=gen)
    k, v = torch.randn(2, 2, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
    mask = None
    if kind == "bool_pad":
        mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
        mask[0, ..., n // 2 + 1:] = False
    elif kind == "additive_full":
        mask = torch.randn(2, 4, n, n, generator=gen)
    module = BlockRoutingAttention(block, topk, grid=(gh, gw), prefix_tokens=prefix)
    allow = routing_reference_allow(q, k, region_order(gh, gw, block), prefix, topk, False)
    assert_close(module(q, k, v, attn_mask=mask), reference(q, k, v, mask, allow=allow))
    nb = len(region_order(gh, gw, block))
    full = BlockRoutingAttention(block, nb, grid=(gh, gw), prefix_tokens=prefix)
    assert_close(full(q, k, v, attn_mask=mask), reference(q, k, v, mask))


def test_regions_are_square_and_cover_the_grid():
    order = region_order(14, 14, 64)       # 14x14 ViT grid, ~8x8 regions -> 2x2 regions of 7x7
    assert len(order) == 4 and all(len(r) == 49 for r in order)
    assert sorted(x for r in order for x in r) == list(range(196))
    order = region_order(5, 7, 4)
    flat = [x for r in order for x in r if x >= 0]
    assert sorted(flat) == list(range(35))
    assert [x for x in line_order(10, 4)[-1]] == [8, 9, -1, -1]


def test_handler_layouts_and_declines():
    assert isinstance(build(rewrite.BlockRouting(layout="2d"), nq=16), Decline)                 # no grid known
    assert isinstance(build(rewrite.BlockRouting(), nq=1, nk=32, causal=True, mask="causal"), Decline)
    assert isinstance(build(rewrite.BlockRouting(), nq=16, nk=40), Decline)                     # cross
    assert isinstance(build(rewrite.BlockRouting(layout="2d"), nq=17, grid=(4, 4), prefix=1, causal=True,
                            mask="causal"), Decline)                                            # no causal 2-D
    assert isinstance(build(rewrite.BlockRouting(layout="2d"), nq=20, grid=(4, 4), prefix=1), Decline)  # mismatch
    m = build(rewrite.BlockRouting(block=4), nq=17, grid=(4, 4), prefix=1)
    assert m.grid == (4, 4) and m.prefix_tokens == 1                                           # auto -> 2-D
    m = build(rewrite.BlockRouting(block=4, layout="1d"), nq=17, grid=(4, 4), prefix=1)
    assert m.grid is None
    m = build(rewrite.BlockRouting(block=4), nq=32, causal=True, mask="causal")
    assert m.grid is None and m.causal


def test_flops_fall_with_topk():
    ev = lambda a: cost.evaluate(a.flops(), B=1, H=1, N=4096, Nk=4096, d=64, dv=64)  # noqa: E731
    exact = cost.evaluate(cost.exact_flops(), B=1, H=1, N=4096, Nk=4096, d=64, dv=64)
    f = [ev(rewrite.BlockRouting(block=64, topk=t)) for t in (1, 3, 16, 64)]
    assert f == sorted(f) and f[0] < 0.05 * exact and abs(f[-1] / exact - 1) < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_topk_grows(causal):
    n = 128
    q, k, v = local_qkv(n)
    exact = reference(q, k, v, causal=causal)
    errors = [rel_err(BlockRoutingAttention(16, t, causal=causal)(q, k, v, is_causal=causal), exact)
              for t in (1, 2, 4, 8)]
    assert_decreasing(errors)
    assert errors[-1] < 1e-5


def test_error_falls_as_topk_grows_2d():
    gh = gw = 12
    n = 1 + gh * gw
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coords = torch.stack([yy.flatten(), xx.flatten()], -1).float()
    feat = torch.cat([torch.zeros(1, 16), torch.cat([torch.cos(coords[:, :1] * torch.linspace(0.1, 1.0, 4)),
                                                     torch.sin(coords[:, :1] * torch.linspace(0.1, 1.0, 4)),
                                                     torch.cos(coords[:, 1:] * torch.linspace(0.1, 1.0, 4)),
                                                     torch.sin(coords[:, 1:] * torch.linspace(0.1, 1.0, 4))], -1)])
    q = 2 * feat + 0.2 * torch.randn(1, 2, n, 16, generator=gen)
    k = 2 * feat + 0.2 * torch.randn(1, 2, n, 16, generator=gen)
    v = torch.randn(1, 2, n, 16, generator=gen)
    exact = reference(q, k, v)
    errors = [rel_err(BlockRoutingAttention(16, t, grid=(gh, gw), prefix_tokens=1)(q, k, v), exact)
              for t in (1, 2, 4, 9)]
    assert_decreasing(errors)
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("topk, exact", [(1, False), (4, True)])
def test_bert_end_to_end(topk, exact):
    bert_end_to_end(rewrite.BlockRouting(block=4, topk=topk), exact_expected=exact)


# --- sinks and pooled summaries of the unchosen blocks ------------------------------------------------------

def summary_reference(q, k, v, mask, causal, block, topk, sinks):
    """Token-level loops for ``BlockRouting(sinks=.., summary=True)``: exact scores where the routing allows,
    plus one pooled column per unchosen block (mean visible key/value, mask log-sum-exp over its keys)."""
    b, h, n, d = q.shape
    g = h // k.shape[-3]
    kk, vv = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    p = min(sinks, n - 1)
    order = line_order(n - p, block)
    allow = routing_reference_allow(q, k, order, p, topk, causal)
    scale = d ** -0.5
    add = additive(mask) if mask is not None else torch.zeros(1, 1, 1, n)
    add = add.expand(b, h, n, n) if add.shape[-2] == n else add.expand(b, h, 1, n)
    causal_ok = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
    exact = (q @ kk.transpose(-1, -2)) * scale + add
    exact = exact.masked_fill(~(allow & causal_ok), float("-inf"))
    members = [[x + p for x in row if x >= 0] for row in order]
    own = {i: c for c, m in enumerate(members) for i in m}
    visible = add.amax(-2) > torch.finfo(torch.float32).min / 2                     # [b, h, n]
    pooled = torch.full((b, h, n, len(members)), float("-inf"))
    pooled_v = torch.zeros(b, h, len(members), v.shape[-1])
    for c, m in enumerate(members):
        idx = torch.tensor(m)
        vis = visible[..., idx].float()                                            # [b, h, |m|]
        cnt = vis.sum(-1, keepdim=True)
        kbar = (vis.unsqueeze(-1) * kk[..., idx, :]).sum(-2) / cnt.clamp(min=1)
        pooled_v[..., c, :] = (vis.unsqueeze(-1) * vv[..., idx, :]).sum(-2) / cnt.clamp(min=1)
        for i in range(p, n):
            if allow[0, 0, i, m[0]] and allow[..., i, m[0]].all() or c == own[i] or (causal and c > own[i]):
                continue
            lse = torch.logsumexp(add[..., i if add.shape[-2] == n else 0, idx], -1)
            logit = (q[..., i, :] * kbar).sum(-1) * scale + lse
            logit = torch.where(cnt.squeeze(-1) > 0, logit, torch.full_like(logit, float("-inf")))
            chosen = allow[..., i, m[0]]                                           # per (batch, head)
            pooled[..., i, c] = torch.where(chosen, torch.full_like(logit, float("-inf")), logit)
    probs = torch.softmax(torch.cat([exact, pooled], -1), -1).nan_to_num(0.0)
    return probs[..., :n] @ vv + probs[..., n:] @ pooled_v


@settings(max_examples=20, deadline=None)
@given(case=attention_case(), block=st.integers(1, 12), extra=st.integers(0, 2), sinks=st.integers(0, 3),
       summary=st.booleans())
def test_sinks_and_summary_exact_when_topk_covers_all_blocks(case, block, extra, sinks, summary):
    n = case["q"].shape[-2]
    module = BlockRoutingAttention(block, -(-n // block) + extra, causal=case["causal"], sinks=sinks, summary=summary)
    assert_close(run_case(module, case), reference(case["q"], case["k"], case["v"], case["mask"], case["causal"]))


@settings(max_examples=15, deadline=None)
@given(case=attention_case(max_len=30), block=st.integers(1, 9), topk=st.integers(1, 4), sinks=st.integers(0, 3))
def test_sinks_match_token_level_reference(case, block, topk, sinks):
    n = case["q"].shape[-2]
    p = min(sinks, n - 1)
    module = BlockRoutingAttention(block, topk, causal=case["causal"], sinks=sinks)
    allow = routing_reference_allow(case["q"], case["k"], line_order(n - p, block), p, topk, case["causal"])
    ref = reference(case["q"], case["k"], case["v"], case["mask"], case["causal"], allow=allow)
    assert_close(run_case(module, case), ref)


@settings(max_examples=15, deadline=None)
@given(case=attention_case(max_len=24), block=st.integers(1, 6), topk=st.integers(1, 3), sinks=st.integers(0, 2))
def test_summary_matches_token_level_reference(case, block, topk, sinks):
    module = BlockRoutingAttention(block, topk, causal=case["causal"], sinks=sinks, summary=True)
    ref = summary_reference(case["q"], case["k"], case["v"], case["mask"], case["causal"], block, topk, sinks)
    assert_close(run_case(module, case), ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_summary_is_exact_when_blocks_are_uniform(causal):
    """A pooled block equals its keys exactly when they are all the same: then summary=True is exact
    whatever the routing drops (and dropping them, summary=False, is not)."""
    gen = torch.Generator().manual_seed(0)
    n, block = 48, 8
    k = torch.randn(1, 2, n // block, 1, 16, generator=gen).expand(1, 2, n // block, block, 16).reshape(1, 2, n, 16)
    v = torch.randn(1, 2, n // block, 1, 16, generator=gen).expand(1, 2, n // block, block, 16).reshape(1, 2, n, 16)
    q = torch.randn(1, 2, n, 16, generator=gen)
    exact = reference(q, k, v, causal=causal)
    pooled = BlockRoutingAttention(block, 1, causal=causal, summary=True)(q, k, v, is_causal=causal)
    dropped = BlockRoutingAttention(block, 1, causal=causal)(q, k, v, is_causal=causal)
    if causal:  # the own block is causal inside: uniform keys, but only a prefix of them is visible
        exact, pooled, dropped = exact[..., block:, :], pooled[..., block:, :], dropped[..., block:, :]
    assert rel_err(pooled, exact) < 1e-5 < rel_err(dropped, exact)


@pytest.mark.parametrize("causal", [False, True])
def test_summary_and_sinks_lower_the_error(causal):
    q, k, v = local_qkv(256, sharp=1.0)
    q[..., 0, :] *= 0
    k[..., 0, :] = 3 * q[..., 1:, :].mean(-2)          # a key every query likes: an attention sink
    exact = reference(q, k, v, causal=causal)
    err = {kw: rel_err(BlockRoutingAttention(32, 2, causal=causal, **dict(kw))(q, k, v, is_causal=causal), exact)
           for kw in [(), (("summary", True),), (("summary", True), ("sinks", 1))]}
    plain, summary, both = err.values()
    assert both < summary < plain, err


def test_summary_and_sinks_flops():
    ev = lambda a: cost.evaluate(a.flops(), B=1, H=1, N=512, Nk=512, d=32, dv=32)  # noqa: E731
    base = ev(rewrite.BlockRouting(block=32, topk=6))
    assert base < ev(rewrite.BlockRouting(block=32, topk=6, sinks=1)) < ev(rewrite.BlockRouting(block=32, topk=7))
    assert base < ev(rewrite.BlockRouting(block=32, topk=6, summary=True)) < ev(rewrite.BlockRouting(block=32, topk=7))
    with pytest.raises(rewrite.RewriteError, match="summary"):
        rewrite.BlockRouting(summary="yes")


# --- per-head block counts fitted on calibration data ------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_allocate_blocks_is_optimal(seed):
    import itertools

    from rewrite.mixers.block_routing import allocate_blocks
    gen = torch.Generator().manual_seed(seed)
    counts, heads = 4, 3
    errors = torch.rand(counts, heads, generator=gen).sort(0, descending=True).values
    total = int(torch.randint(heads, counts * heads + 1, (1,), generator=gen))
    picks = allocate_blocks(errors, total).tolist()
    assert len(picks) == heads and sum(picks) <= total and min(picks) >= 1
    best = min(sum(errors[t - 1, h] for h, t in enumerate(ts))
               for ts in itertools.product(range(1, counts + 1), repeat=heads) if sum(ts) <= total)
    assert float(sum(errors[t - 1, h] for h, t in enumerate(picks))) == pytest.approx(float(best))


@pytest.mark.parametrize("causal", [False, True])
def test_per_head_counts_route_each_head_with_its_own_count(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 40, 8, generator=gen) for _ in range(3))
    module = BlockRoutingAttention(8, 2, causal=causal, sinks=1, summary=True, per_head=True)
    module.head_topk = torch.tensor([1, 3, 2, 5])
    out = module(q, k, v, is_causal=causal)
    for h, t in enumerate([1, 3, 2, 5]):
        alone = BlockRoutingAttention(8, t, causal=causal, sinks=1, summary=True)(q, k, v, is_causal=causal)
        assert_close(out[:, h], alone[:, h])


def test_per_head_fit_spends_blocks_where_heads_need_them():
    """Head 0 is local (a few blocks suffice), head 1 attends to random far keys: fitting gives head 1
    more blocks, keeps the mean count, and lowers the error against one count for all heads."""
    n, block, topk = 128, 16, 3
    ql, kl, vl = local_qkv(n, d=16, heads=1, sharp=4.0)
    gen = torch.Generator().manual_seed(3)
    qg = torch.randn(1, 1, n, 16, generator=gen)
    kg = qg[..., torch.randperm(n, generator=gen), :] * 1.5
    q, k, v = torch.cat([ql, qg], 1), torch.cat([kl, kg], 1), torch.cat([vl, torch.randn(1, 1, n, 16)], 1)
    fitted = BlockRoutingAttention(block, topk, per_head=True).fit(q, k, v)
    assert fitted.head_topk.sum() == topk * 2 and fitted.head_topk[1] > fitted.head_topk[0]
    exact = reference(q, k, v)
    assert rel_err(fitted(q, k, v), exact) < rel_err(BlockRoutingAttention(block, topk)(q, k, v), exact)


def test_per_head_counts_are_saved_fitted_lazily_and_declared_in_the_action():
    q, k, v = local_qkv(64, d=8, heads=3)
    first = BlockRoutingAttention(8, 2, per_head=True)
    out = first(q, k, v)                                   # no fit(): the first batch fits the counts
    assert first.head_topk.shape == (3,) and int(first.head_topk.sum()) == 6
    fresh = BlockRoutingAttention(8, 2, per_head=True)
    fresh.load_state_dict(first.state_dict())
    assert torch.equal(fresh.head_topk, first.head_topk)
    assert_close(fresh(q, k, v), out)
    action = rewrite.BlockRouting(block=8, topk=2, per_head=True)
    assert rewrite.actions.action_from_json(action.to_json()) == action
    with pytest.raises(rewrite.RewriteError, match="per_head"):
        rewrite.BlockRouting(per_head=1)


def test_per_head_state_lands_in_the_model_state_dict():
    from mixer_helpers import tiny_bert
    model, batch = tiny_bert()
    rewrite.optimize(model, {"_default": rewrite.BlockRouting(block=4, topk=2, per_head=True)}, example_kwargs=batch)
    counts = {key: t for key, t in model.state_dict().items() if key.endswith("head_topk")}
    assert len(counts) == 2 and all(t.shape == (4,) and int(t.sum()) == 8 for t in counts.values()), counts
