"""SlidingWindow: band of ``window`` keys (+ sinks), exact at full width, O(N·w) memory."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_mixer_a_common import (assert_close, assert_decreasing, attention_case, bert_end_to_end, build,  # noqa: E402
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
