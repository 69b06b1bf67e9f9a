"""Soft-capped attention (Gemma 2's ``c * tanh(s / c)`` before the mask) through ``rewrite``.

The matcher records the cap on the site; SDPA cannot express it, so every action but ``Exact(kernel="triton")``
leaves the site as it was and says why, while ``Exact(kernel="triton")`` runs it on the flash op with
``softcap``. These tests pin the op's CPU path (the chunked PyTorch reference; ``use_triton`` patched off, so a
``TRITON_INTERPRET=1`` set by the kernel tests does not send them through Triton's interpreter).
"""
from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewrite
from rewrite import Exact

_FLASH = importlib.import_module("rewrite.kernels.flash_attention")
TRITON = {"_default": Exact(kernel="triton")}


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """The flash op's CPU path: the chunked PyTorch reference."""
    monkeypatch.setattr(_FLASH, "use_triton", lambda t: False)


def _ops(model, *args, **kwargs):
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(*args, **kwargs)
    return {e.name for e in prof.events()}


def _close(got, want, tol=2e-5):
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"max abs error {err:.3e}"


# ------------------------------------------------------------------------------------------------- Gemma 2


def _gemma2(layers=2):
    tf = pytest.importorskip("transformers")
    cfg = tf.Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          attn_logit_softcapping=20.0, final_logit_softcapping=30.0, sliding_window=6,
                          query_pre_attn_scalar=8)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.Gemma2Model(cfg).eval()


def _batch(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (b, n), generator=g)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    mask = (torch.arange(n)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


BATCHES = [(3, 17, 2), (2, 9, 3)]   # random right padding, other lengths than the example's


def _gemma2_outputs(model, ref):
    with torch.no_grad():
        for b, n, seed in BATCHES:
            kw = _batch(b, n, seed)
            yield model(**kw).last_hidden_state, ref(**kw).last_hidden_state


def test_gemma2_exact_keeps_soft_capped_sites_with_the_reason():
    model = _gemma2()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_kwargs=_batch(2, 12, 0))
    rows = model.rewrite_report.sites
    assert [r.status for r in rows] == ["kept", "kept"]
    assert all(r.reason == "soft-capping tanh(s/20.0)·20.0: SDPA cannot express it; use Exact(kernel='triton')"
               for r in rows), [r.reason for r in rows]
    for got, want in _gemma2_outputs(model, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gemma2_on_the_flash_op_rewrites_every_site():
    model = _gemma2()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, TRITON, example_kwargs=_batch(2, 12, 0))
    rows = model.rewrite_report.sites
    assert len(rows) == 2 and all(r.status == "rewritten" and r.action == "Exact(kernel='triton')" for r in rows)
    for got, want in _gemma2_outputs(model, ref):
        _close(got, want)
    ops = _ops(model, **_batch(2, 12, 5))
    assert "rewrite::flash_attention_fwd" in ops and "aten::_softmax" not in ops


@pytest.mark.slow
def test_gemma2_trains_through_the_flash_op():
    """In training the rewritten graph (recompiled for train mode) gives the original's parameter gradients: the
    op's backward multiplies dS by the cap's derivative."""
    model = _gemma2()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, TRITON, example_kwargs=_batch(2, 12, 0))
    model.train(), ref.train()
    kw = _batch(3, 10, 7)
    w = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0))
    (model(**kw).last_hidden_state * w).sum().backward()
    (ref(**kw).last_hidden_state * w).sum().backward()
    assert all(r.status == "rewritten" for r in rewrite.report(model).sites)
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in want:
            _close(p.grad, want[n], tol=1e-5)


# ------------------------------------------------------------------------------------------ hand-made modules


class Capped(nn.Module):
    """q, k, v [B, H, N, D] -> soft-capped attention written in one of several spellings, no mask."""

    def __init__(self, spelling="div_mul", cap=30.0):
        super().__init__()
        self.spelling, self.cap = spelling, cap

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2))
        c, sp = self.cap, self.spelling
        if sp == "div_mul":                  # Gemma 2's eager code
            s = s * q.shape[-1] ** -0.5
            s = s / c
            s = torch.tanh(s)
            s = s * c
        elif sp == "reciprocal_commuted":    # c * tanh(s * (1/c)), method tanh, scale after the product
            s = c * ((s / math.sqrt(q.shape[-1])) * (1.0 / c)).tanh()
        elif sp == "functional":
            s = F.tanh(s / (c * math.sqrt(q.shape[-1]))) * c
        elif sp == "negative":               # (-c) tanh(s / -c) is the same cap
            s = -c * torch.tanh(s / -c)
        elif sp == "inner_not_inverse":      # c tanh(a s) with a != 1/c: the cap is c, the scale a c
            s = c * torch.tanh(s * 0.05)
        elif sp == "tensor_constant":        # the cap as a tensor made in forward
            s = torch.tanh(s / torch.tensor(c * math.sqrt(q.shape[-1]))) * torch.tensor(c)
        elif sp == "cast_between":           # tanh in fp32, cast back, then the cap
            s = torch.tanh(s.float() / c).to(q.dtype) * c
        return torch.matmul(torch.softmax(s, dim=-1), v)


SPELLINGS = ["div_mul", "reciprocal_commuted", "functional", "negative", "inner_not_inverse", "tensor_constant",
             "cast_between"]


def _qkv(b=2, h=2, n=11, d=16, seed=0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) * (spread if i < 2 else 1.0) for i in range(3))


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spellings_are_recognised_and_run_on_the_flash_op(spelling):
    model = Capped(spelling, cap=3.0)
    args = _qkv()
    sites = rewrite.find_attention(model, example_inputs=args)
    assert [s.softcap for s in sites] == [3.0], sites
    assert "softcap" in sites.table().splitlines()[0] and sites.to_json()[0]["softcap"] == 3.0
    rewrite.optimize(model, TRITON, example_inputs=args)
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten", row.reason
    for seed, n in ((1, 11), (2, 30)):   # the example's shape, then another length
        args = _qkv(n=n, seed=seed)
        with torch.no_grad():
            _close(model(*args), Capped(spelling, cap=3.0)(*args))
    uncapped = torch.softmax(args[0] @ args[1].transpose(-1, -2) / 4.0, -1) @ args[2]
    assert (model(*args) - uncapped).abs().max().item() > 1e-2     # the cap of 3 really bites


def test_every_other_action_declines_and_the_site_stays_as_it_was():
    args = _qkv()
    for policy, target in (("exact", "SDPA"), ({"_default": rewrite.TopK(k=4)}, "TopK(k=4)"),
                           ({"_default": rewrite.SlidingWindow(window=4)}, "SlidingWindow(")):
        model = Capped("div_mul", cap=30.0)
        rewrite.optimize(model, policy, example_inputs=args)
        row = model.rewrite_report.sites[0]
        assert row.status == "kept", row
        assert row.reason.startswith(f"soft-capping tanh(s/30.0)·30.0: {target}"), row.reason
        assert row.reason.endswith("cannot express it; use Exact(kernel='triton')"), row.reason
        ops = _ops(model, *args)
        assert "aten::tanh" in ops and "rewrite::flash_attention_fwd" not in ops
        with torch.no_grad():
            torch.testing.assert_close(model(*args), Capped("div_mul", cap=30.0)(*args), rtol=0, atol=0)


class NotACap(nn.Module):
    """tanh on the scores that the flash kernel's soft-capping cannot express."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.cap = nn.Parameter(torch.tensor(5.0))

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-1, -2) / 4.0
        if self.kind == "mask_before":      # the mask goes through tanh too
            s = 5.0 * torch.tanh((s + mask) / 5.0)
        elif self.kind == "learned_cap":    # a parameter: it may change after the rewrite
            s = self.cap * torch.tanh(s / 5.0) + mask
        elif self.kind == "scaled_after":
            s = 5.0 * torch.tanh(s / 5.0) * 0.5 + mask
        return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("kind,reason", [("mask_before", "added before the soft-capping tanh"),
                                         ("learned_cap", "not a constant"),
                                         ("scaled_after", "scaled or reshaped before the softmax")])
def test_what_is_not_a_cap_is_rejected_with_why(kind, reason):
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 1, 11).masked_fill(torch.arange(11) > 7, -1e9)
    model = NotACap(kind)
    rewrite.optimize(model, TRITON, example_inputs=(q, k, v, mask))
    rep = model.rewrite_report
    assert not [r for r in rep.sites if r.status == "rewritten"]
    reasons = [r.reason for r in rep.rejected] + [r.reason for r in rep.sites]
    assert any(reason in r for r in reasons), reasons


# ------------------------------------------------------------------------------------------ property


class DrawnCapped(nn.Module):
    def __init__(self, cap, spelling, mask_kind, kv_heads):
        super().__init__()
        self.cap, self.spelling, self.mask_kind, self.kv_heads = cap, spelling, mask_kind, kv_heads

    def forward(self, q, k, v, mask):
        rep = q.shape[1] // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        c = self.cap
        s = (s / c).tanh() * c if self.spelling == "gemma" else c * torch.tanh(s * (1.0 / c))
        if self.mask_kind == "additive":
            s = s + mask
        elif self.mask_kind == "boolean":
            s = s.masked_fill(~mask, float("-inf"))
        elif self.mask_kind == "causal":
            n = s.shape[-1]
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


@st.composite
def capped_draws(draw):
    kv = draw(st.sampled_from([1, 2]))
    return dict(cap=draw(st.sampled_from([0.5, 2.0, 7.5, 50.0])), spelling=draw(st.sampled_from(["gemma", "fa"])),
                mask=draw(st.sampled_from(["none", "additive", "boolean", "causal"])), kv=kv,
                heads=kv * draw(st.sampled_from([1, 2])), b=draw(st.integers(1, 3)), n=draw(st.integers(2, 24)),
                d=draw(st.sampled_from([8, 16])), seed=draw(st.integers(0, 1000)))


def _drawn_inputs(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, kv, d = cfg["b"], cfg["heads"], cfg["kv"], cfg["d"]
    q = torch.randn(b, h, n, d, generator=g) * 3
    k, v = torch.randn(b, kv, n, d, generator=g) * 3, torch.randn(b, kv, n, d, generator=g)
    keep = torch.rand(b, 1, 1, n, generator=g) > 0.3
    keep[..., 0] = True
    if cfg["mask"] == "boolean":
        keep = keep & (torch.rand(b, 1, n, n, generator=g) > 0.2)
        keep[..., 0, :] = False                           # a query row with no key: NaN in the original too
        return q, k, v, keep
    return q, k, v, torch.zeros(b, 1, 1, n).masked_fill(~keep, torch.finfo(torch.float32).min)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(cfg=capped_draws())
def test_soft_capped_attention_on_the_flash_op_equals_the_original(cfg):
    model = DrawnCapped(cfg["cap"], cfg["spelling"], cfg["mask"], cfg["kv"])
    rewrite.optimize(model, TRITON, example_inputs=_drawn_inputs(cfg, cfg["n"], cfg["seed"]))
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten", (row.reason, cfg)
    for n, seed in ((cfg["n"], cfg["seed"] + 1), (cfg["n"] + 5, cfg["seed"] + 2)):
        args = _drawn_inputs(cfg, n, seed)
        with torch.no_grad():
            got, want = model(*args), DrawnCapped(cfg["cap"], cfg["spelling"], cfg["mask"], cfg["kv"])(*args)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), cfg
        _close(got.nan_to_num(), want.nan_to_num())
