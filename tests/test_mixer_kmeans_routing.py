"""KMeansRouting: calibrated centroids, balanced clusters, exact with one cluster and window >= N."""
from __future__ import annotations


import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_helpers import (assert_close, assert_decreasing, attention_case, bert_end_to_end, build,  # noqa: E402
                                 reference, rel_err, run_case, tiny_bert)

import rewrite  # noqa: E402
from rewrite import cost  # noqa: E402
from rewrite.actions import Decline  # noqa: E402
from rewrite.mixers.kmeans_routing import KMeansRoutingAttention, slot_layout  # noqa: E402


@settings(max_examples=20, deadline=None)
@given(case=attention_case(), extra=st.integers(0, 4))
def test_exact_with_one_cluster_and_full_window(case, extra):
    n = case["q"].shape[-2]
    module = KMeansRoutingAttention(1, n + extra, causal=case["causal"])
    assert_close(run_case(module, case), reference(case["q"], case["k"], case["v"], case["mask"], case["causal"]))


@settings(max_examples=20, deadline=None)
@given(case=attention_case(min_len=2), clusters=st.integers(1, 5), window=st.integers(1, 12))
def test_matches_dense_reference_of_its_routing(case, clusters, window):
    module = KMeansRoutingAttention(clusters, window, causal=case["causal"])
    out = run_case(module, case)
    allow = module.allowed(case["q"], case["k"], causal=case["causal"])
    n = case["q"].shape[-2]
    # every query sees its own key and at most window + 1 keys
    assert allow.diagonal(dim1=-2, dim2=-1).all()
    assert (allow.sum(-1) <= min(window, n) + 1).all()
    ref = reference(case["q"], case["k"], case["v"], case["mask"], case["causal"], allow=allow)
    assert_close(out, ref)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), c=st.integers(1, 6), bq=st.integers(1, 9), seed=st.integers(0, 999))
def test_slot_layout_places_every_query_once_in_a_block_of_its_cluster(n, c, bq, seed):
    cluster = torch.randint(0, c, (2, 3, n), generator=torch.Generator().manual_seed(seed))
    slot_q, slot_of, blk_c = slot_layout(cluster, c, bq)
    assert slot_q.shape == (2, 3, (-(-n // bq) + c) * bq) and blk_c.shape == (2, 3, slot_q.shape[-1] // bq)
    ar = torch.arange(n).expand(2, 3, n)
    assert torch.equal(slot_q.gather(-1, slot_of), ar)                      # each query sits in its slot
    assert ((slot_q < n).sum(-1) == n).all()                                 # and only there
    assert torch.equal(blk_c.gather(-1, slot_of // bq), cluster)             # its block is its cluster's


def test_fit_recovers_planted_directions_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    dirs = F.normalize(torch.randn(3, 16, generator=gen), dim=-1)
    labels = torch.arange(300) % 3
    x = dirs[labels] + 0.05 * torch.randn(300, 16, generator=gen)
    q = x.view(1, 1, 300, 16).repeat(1, 2, 1, 1)       # 2 query heads share 1 kv head
    k = x.view(1, 1, 300, 16)
    a = KMeansRoutingAttention(3, 100).fit(q, k)
    b = KMeansRoutingAttention(3, 100).fit([q[..., :150, :], q[..., 150:, :]], [k[..., :150, :], k[..., 150:, :]])
    assert a.centroids.shape == (1, 3, 16) and bool(a.fitted)
    torch.testing.assert_close(a.centroids.norm(dim=-1), torch.ones(1, 3))
    match = (a.centroids[0] @ dirs.T).amax(0)
    assert (match > 0.99).all(), match
    torch.testing.assert_close(KMeansRoutingAttention(3, 100).fit(q, k).centroids, a.centroids)
    assert ((b.centroids[0] @ dirs.T).amax(0) > 0.99).all()
    # centroids are buffers (saved with the model), never parameters
    assert "centroids" in dict(a.named_buffers()) and not list(a.parameters())


def test_lazy_fit_on_first_call_then_frozen():
    m = KMeansRoutingAttention(2, 4)
    assert not bool(m.fitted)
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    m(q, k, v)
    assert bool(m.fitted) and m.centroids.shape == (2, 2, 8)
    before = m.centroids.clone()
    m(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), v)
    assert torch.equal(before, m.centroids)


def test_clustered_inputs_route_well_and_error_falls_with_window():
    """Tokens from 4 topics attend within their topic: routing with fitted centroids is nearly exact."""
    gen = torch.Generator().manual_seed(1)
    n, d = 128, 16
    dirs = F.normalize(torch.randn(4, d, generator=gen), dim=-1) * 4
    topic = torch.randint(0, 4, (n,), generator=gen)
    q = (dirs[topic] + 0.3 * torch.randn(1, 2, n, d, generator=gen))
    k = (dirs[topic] + 0.3 * torch.randn(1, 2, n, d, generator=gen))
    v = torch.randn(1, 2, n, d, generator=gen)
    exact = reference(q, k, v)
    errors = []
    for window in (4, 16, 48, n):
        m = KMeansRoutingAttention(4, window).fit(q, k)
        errors.append(rel_err(m(q, k, v), exact))
    assert_decreasing(errors)
    assert errors[-1] < 1e-5
    assert errors[-2] < 0.1, errors  # each topic has ~32 tokens: a 48-key window holds its topic


def test_state_dict_round_trip_into_a_fresh_module():
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    m = KMeansRoutingAttention(3, 5).fit(q, k)
    fresh = KMeansRoutingAttention(3, 5)
    assert not fresh.fitted
    fresh.load_state_dict(m.state_dict())
    assert fresh.fitted and torch.equal(fresh.centroids, m.centroids)
    assert torch.equal(fresh(q, k, v), m(q, k, v))


def test_optimize_keeps_centroids_in_the_model_state_dict():
    model, batch = tiny_bert()
    rewrite.optimize(model, {"_default": rewrite.KMeansRouting(clusters=2, window=5)}, example_kwargs=batch)
    keys = [key for key in model.state_dict() if key.endswith("centroids")]
    assert len(keys) == 2, keys
    assert all(model.state_dict()[key].shape == (4, 2, 16) for key in keys)


def test_handler_declines_cross_and_serves_causal():
    action = rewrite.KMeansRouting(clusters=2, window=8)
    assert isinstance(build(action, nq=1, nk=32, causal=True, mask="causal"), Decline)
    assert isinstance(build(action, nq=16, nk=40), Decline)
    m = build(action, nq=32, causal=True, mask="causal")
    assert isinstance(m, KMeansRoutingAttention) and m.causal and m.clusters == 2 and m.window == 8


def test_flops_fall_with_window():
    ev = lambda a: cost.evaluate(a.flops(), B=1, H=1, N=4096, Nk=4096, d=64, dv=64)  # noqa: E731
    exact = cost.evaluate(cost.exact_flops(), B=1, H=1, N=4096, Nk=4096, d=64, dv=64)
    f = [ev(rewrite.KMeansRouting(clusters=8, window=w)) for w in (64, 512, 4096)]
    assert f == sorted(f) and f[0] < 0.05 * exact and f[1] < 0.25 * exact and f[-1] > exact


@pytest.mark.parametrize("clusters, window, exact", [(2, 5, False), (1, 16, True)])
def test_bert_end_to_end(clusters, window, exact):
    bert_end_to_end(rewrite.KMeansRouting(clusters=clusters, window=window), exact_expected=exact)


def test_cpu_forms_equal_the_slot_form(monkeypatch):
    """The C++ kernel (one tile per head and cluster) and the fused-SDPA form (queries sorted by cluster, one kernel
    call per head and cluster) give the slot form's output, with GQA, batches, empty clusters, windows wider than
    the keys and (C++ kernel and slot form) key-padding masks of both kinds."""
    from rewrite.kernels import cluster_attention
    from rewrite.mixers import _dense
    gen = torch.Generator().manual_seed(1)
    for b, hq, hkv, n, nc, w in [(2, 4, 2, 100, 3, 32), (3, 2, 1, 50, 2, 80), (2, 8, 2, 33, 8, 5)]:
        q, k, v = (torch.randn(b, h, n, 16, generator=gen) for h in (hq, hkv, hkv))
        pad = torch.ones(b, 1, 1, n, dtype=torch.bool)
        pad[0, ..., n // 3:] = False
        additive = torch.zeros(b, 1, 1, n).masked_fill(~pad, torch.finfo(torch.float32).min)
        module = KMeansRoutingAttention(nc, w)
        for mask in (None, pad, additive):
            kernel = module(q, k, v, attn_mask=mask)
            with monkeypatch.context() as m:
                m.setenv("REWRITE_CPU_KERNELS", "0")
                fused = module(q, k, v) if mask is None else None
                m.setattr(_dense, "flash_cpu_serves", lambda *args: False)
                slots = module(q, k, v, attn_mask=mask)
            assert_close(kernel, slots)
            if fused is not None:
                assert_close(fused, slots)
    if shutil.which("ninja") and (shutil.which("c++") or shutil.which("g++")):   # then the kernel was compared
        assert cluster_attention.available(), cluster_attention.why_unavailable()
