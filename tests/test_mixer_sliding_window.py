"""SlidingWindow: band of ``window`` keys (+ sinks), exact at full width, O(N·w) memory."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from mixer_helpers import (assert_close, assert_decreasing, attention_case, bert_end_to_end, build,  # noqa: E402
                                 local_qkv, reference, rel_err, run_case)

import rewrite  # noqa: E402
from rewrite import cost  # noqa: E402
from rewrite.actions import Decline  # noqa: E402
from rewrite.mixers.sliding_window import SlidingWindowAttention  # noqa: E402


def band(n: int, window: int, sinks: int, causal: bool) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = ((j <= i) & (j > i - window)) if causal else ((i - j).abs() <= window // 2)
    if sinks:
        keep = keep | ((j < sinks) & (j <= i)) if causal else keep | (j < sinks) | (i < sinks)
    return keep


@settings(max_examples=20, deadline=None)
@given(case=attention_case(), extra=st.integers(0, 3), sinks=st.integers(0, 3))
def test_exact_at_full_width(case, extra, sinks):
    n = case["q"].shape[-2]
    window = (n if case["causal"] else 2 * n - 1) + extra
    module = SlidingWindowAttention(window, sinks, causal=case["causal"])
    assert_close(run_case(module, case), reference(case["q"], case["k"], case["v"], case["mask"], case["causal"]))


@settings(max_examples=20, deadline=None)
@given(case=attention_case(), window=st.integers(1, 20), sinks=st.integers(0, 3))
def test_matches_dense_banded_reference(case, window, sinks):
    n = case["q"].shape[-2]
    module = SlidingWindowAttention(window, sinks, causal=case["causal"])
    ref = reference(case["q"], case["k"], case["v"], case["mask"], case["causal"],
                    allow=band(n, window, sinks, case["causal"]))
    assert_close(run_case(module, case), ref)


def test_handler_declines_cross_and_decoding_and_builds_causal():
    action = rewrite.SlidingWindow(window=8)
    assert isinstance(build(action, nq=1, nk=32, causal=True, mask="causal"), Decline)   # KV-cache decoding
    assert isinstance(build(action, nq=16, nk=40), Decline)                               # cross-attention
    m = build(action, nq=32, causal=True, mask="causal")
    assert isinstance(m, SlidingWindowAttention) and m.causal
    m = build(action, nq=32, causal=True, mask="boolean")   # causal proven but kept in the mask
    assert m.causal
    assert not build(action, nq=32, mask="additive").causal


class _Storage(TorchDispatchMode):
    """Largest storage any op allocates (views share storage, so an unfold view costs nothing)."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.peak = max(self.peak, o.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_no_n_by_n_scores_and_linear_memory(causal):
    peaks = {}
    for n in (1024, 2048):
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        pad = torch.ones(1, 1, 1, n, dtype=torch.bool)
        with _Storage() as mode:
            SlidingWindowAttention(64, 2, causal=causal)(q, k, v, attn_mask=pad)
        peaks[n] = mode.peak
        assert mode.peak < 2 * n * n * 4 / 8, f"an allocation of {mode.peak} bytes is N×N-sized"
    assert 1.6 < peaks[2048] / peaks[1024] < 2.4, peaks


def test_flops_scale_linearly_and_undercut_exact():
    action = rewrite.SlidingWindow(window=256, sinks=1)
    f = action.flops()
    small = cost.evaluate(f, B=1, H=1, N=4096, Nk=4096, d=64, dv=64)
    big = cost.evaluate(f, B=1, H=1, N=8192, Nk=8192, d=64, dv=64)
    assert 1.9 < big / small < 2.1
    assert small < 0.2 * cost.evaluate(cost.exact_flops(), B=1, H=1, N=4096, Nk=4096, d=64, dv=64)
    assert cost.evaluate(rewrite.SlidingWindow(window=64).flops(), B=1, H=1, N=4096, Nk=4096, d=64, dv=64) < small


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_window_grows(causal):
    n = 128
    q, k, v = local_qkv(n)
    exact = reference(q, k, v, causal=causal)
    windows = (4, 16, 48, 2 * n)
    errors = [rel_err(SlidingWindowAttention(w, causal=causal)(q, k, v, is_causal=causal), exact) for w in windows]
    assert_decreasing(errors)
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("window, exact", [(8, False), (64, True)])
def test_bert_end_to_end(window, exact):
    bert_end_to_end(rewrite.SlidingWindow(window=window, sinks=1), exact_expected=exact)


# ------------------------------------------------------------------------------------------------ blocked path
def _case(n, g, dv_extra, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, hkv, d = 2, 2, 8
    q = torch.randn(b, hkv * g, n, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d + dv_extra, generator=gen)
    mask = None
    if kind == "bool_pad":      # batch 0 pads its last 40% of keys: late rows see only the sinks, or nothing
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        mask[0, ..., int(0.6 * n):] = False
    elif kind == "additive_full":
        mask = torch.randn(b, hkv * g, n, n, generator=gen)
    elif kind == "bool_heads":
        mask = torch.rand(1, hkv * g, 1, n, generator=gen) > 0.2
    return q, k, v, mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sinks", [0, 1, 3])
@pytest.mark.parametrize("kind", ["none", "bool_pad", "additive_full", "bool_heads"])
def test_long_odd_lengths_match_masked_dense_reference(causal, sinks, kind):
    """Lengths far above a block's chunk (front, interior and back blocks), not multiples of the block, GQA,
    and a value width unlike the key width; inference (fused, log-sum-exp merge) and autograd paths."""
    for n, window, g, dv_extra in ((517, 64, 2, 0), (1001, 100, 1, 3), (333, 7, 1, 0)):
        q, k, v, mask = _case(n, g, dv_extra, kind)
        module = SlidingWindowAttention(window, sinks, causal=causal)
        ref = reference(q, k, v, mask, causal, allow=band(n, window, sinks, causal))
        kwargs = {"is_causal": True} if causal and mask is None else {"attn_mask": mask}
        with torch.no_grad():
            assert_close(module(q, k, v, **kwargs), ref)
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*ins, **kwargs)
        assert_close(out.detach(), ref)
        out.square().sum().backward()
        refs = [t.clone().requires_grad_() for t in (q, k, v)]
        reference(*refs, mask, causal, allow=band(n, window, sinks, causal)).square().sum().backward()
        for a, r in zip(ins, refs):
            scale = 1 + r.grad.abs().max().item()
            torch.testing.assert_close(a.grad / scale, r.grad / scale, atol=2e-5, rtol=0)


def test_rows_seeing_only_sinks_or_nothing():
    """A row whose band is all masked takes the sinks alone; a row that sees no key at all gives 0 (SDPA)."""
    n, window = 300, 16
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    mask = torch.ones(1, 1, n, n, dtype=torch.bool)
    mask[..., 100, :] = False                 # row 100 sees nothing
    mask[..., 200, 1:] = False                # row 200 sees only key 0, the sink
    for sinks in (0, 1, 2):
        module = SlidingWindowAttention(window, sinks)
        ref = reference(q, k, v, mask, allow=band(n, window, sinks, False))
        with torch.no_grad():
            out = module(q, k, v, attn_mask=mask)
        assert_close(out, ref)
        assert torch.equal(out[..., 100, :], torch.zeros_like(out[..., 100, :]))
        if sinks:
            assert_close(out[..., 200, :], v[..., 0, :])


def test_geometry_masks_cached_across_inference_mode_and_autograd():
    """The cached masks made under ``inference_mode`` still serve a later differentiable call, unchanged."""
    q, k, v = (torch.randn(1, 2, 400, 8) for _ in range(3))
    module = SlidingWindowAttention(32, 1)
    with torch.inference_mode():
        first = module(q, k, v)
    qs = q.clone().requires_grad_()
    out = module(qs, k, v)
    out.sum().backward()
    assert torch.isfinite(qs.grad).all()
    with torch.no_grad():
        assert torch.equal(module(q, k, v), first)
    assert_close(first, reference(q, k, v, allow=band(400, 32, 1, False)))


class _Packed(torch.nn.Module):
    """q, k and v unbound from one packed tensor (as in the speed benchmark): they share one length."""

    def forward(self, qkv):
        q, k, v = qkv.unbind(0)
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def test_dynamic_lengths_are_not_specialised():
    """Once the graph is dynamic, new lengths reuse it: the handler must not pin the symbolic length (a
    recompile at every length also reruns the original N×N attention to verify the rewrite)."""
    model = _Packed()
    rewrite.optimize(model, {"_default": rewrite.SlidingWindow(window=16, sinks=1)},
                     example_inputs=(torch.randn(3, 1, 2, 64, 8),))
    with torch.no_grad():
        for n in (128, 300, 517):
            x = torch.randn(3, 1, 2, n, 8)
            assert_close(model(x), reference(x[0], x[1], x[2], allow=band(n, 16, 1, False)))
        graphs = model.rewrite_report.graphs
        for n in (700, 901):
            model(torch.randn(3, 1, 2, n, 8))
    assert model.rewrite_report.graphs == graphs, "a new length recompiled (and re-verified) the graph"


@pytest.mark.parametrize("causal", [False, True])
def test_flops_track_the_counted_products(causal):
    """The cost model against torch's FLOP counter (products only) on the blocked path, with sinks."""
    from torch.utils.flop_counter import FlopCounterMode, register_flop_formula
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            *lead, nq, d = query_shape
            bh = 1
            for x in lead:
                bh *= x
            return 2 * bh * nq * key_shape[-2] * (d + value_shape[-1])
        try:
            register_flop_formula(op)(sdpa_flops)
        except RuntimeError:  # already registered
            pass
    b, h, n, d = 1, 4, 1024, 32
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    action = rewrite.SlidingWindow(window=256, sinks=1)
    module = SlidingWindowAttention(action.window, action.sinks, causal=causal)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(q, k, v, is_causal=causal)
    counted = counter.get_total_flops()
    modelled = cost.evaluate(action.flops(), B=b * h, H=1, N=n, Nk=n, d=d, dv=d)
    assert counted <= modelled <= 1.35 * counted, (counted, modelled)
