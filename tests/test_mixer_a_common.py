"""Shared helpers for the sparse / routed / biased mixer tests, and the checks every one of them passes.

Mixers: SlidingWindow, TopK, BlockRouting, KMeansRouting, TokenMerge, Decay. Each has its own
``tests/test_mixer_<name>.py``; this file holds the reference attention, the input strategies, a tiny
BERT end-to-end runner, and the contract checks run over all six (JSON round trip, argument errors,
output shape and dtype in fp32/bf16, shape inference on fake tensors, autograd, dropout, flops).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rewrite  # noqa: E402
from rewrite import cost  # noqa: E402
from rewrite.actions import RewriteError, handler_for  # noqa: E402
from rewrite.passes.lower import SiteCall  # noqa: E402
from rewrite.sites import AttentionSite  # noqa: E402

NEG = float("-inf")


# ------------------------------------------------------------------------------------------------ reference
def additive(mask: Optional[torch.Tensor], dtype=torch.float32) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, NEG)
    return mask.to(dtype)


def reference(q, k, v, mask=None, causal=False, allow=None, bias=None, scale=None):
    """SDPA with the site mask, an optional causal pattern, a bool ``allow`` pattern and an extra bias."""
    nq, nk = q.shape[-2], k.shape[-2]
    total = additive(mask, q.dtype)
    extra = []
    if causal:
        extra.append(torch.zeros(nq, nk, dtype=q.dtype).masked_fill(
            ~torch.ones(nq, nk, dtype=torch.bool).tril(), NEG))
    if allow is not None:
        extra.append(torch.zeros(allow.shape, dtype=q.dtype).masked_fill(~allow, NEG))
    if bias is not None:
        extra.append(bias.to(q.dtype))
    for e in extra:
        total = e if total is None else total + e
    return F.scaled_dot_product_attention(q, k, v, attn_mask=total, scale=scale,
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-12)).item()


def assert_close(out, ref, atol=2e-5, rtol=2e-5):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


class LargestAllocation:
    """Context manager recording the largest tensor storage (bytes) any op produced inside it: a test that a
    mixer never materialises an N×N tensor."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        record = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        record.largest = max(record.largest, t.untyped_storage().nbytes())
                return out

        self.largest = 0
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


# ------------------------------------------------------------------------------------------------ inputs
MASK_KINDS = ("none", "bool_pad", "bool_full", "additive_full", "additive_bcast")


@st.composite
def attention_case(draw, same_len: bool = True, allow_causal: bool = True, min_len: int = 1, max_len: int = 40):
    """q, k, v (GQA-shaped), a mask of a drawn kind, and a causal flag."""
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2]))
    h = hkv * g
    nq = draw(st.integers(min_len, max_len))
    nk = nq if same_len else draw(st.integers(min_len, max_len))
    d = draw(st.sampled_from([4, 8, 16]))
    dv = draw(st.sampled_from([d, d + 3]))
    causal = allow_causal and same_len and draw(st.booleans())
    kind = draw(st.sampled_from(MASK_KINDS))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=gen)
    k = torch.randn(b, hkv, nk, d, generator=gen)
    v = torch.randn(b, hkv, nk, dv, generator=gen)
    mask = None
    if kind == "bool_pad":
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool)
        cut = draw(st.integers(1, nk))
        mask[0, ..., cut:] = False
    elif kind == "bool_full":
        mask = torch.rand(b, h, nq, nk, generator=gen) > 0.3
    elif kind == "additive_full":
        mask = torch.randn(b, h, nq, nk, generator=gen)
    elif kind == "additive_bcast":
        mask = torch.randn(1, 1, 1, nk, generator=gen)
        mask[..., nk // 2:] = torch.finfo(torch.float32).min  # Hugging Face style padding
        mask[..., 0] = 0.0
    return {"q": q, "k": k, "v": v, "mask": mask, "causal": causal, "kind": kind}


def run_case(module, case: dict) -> torch.Tensor:
    """Call a mixer module the way the pipeline does: ``is_causal`` only without another mask."""
    if case["causal"] and case["mask"] is None:
        return module(case["q"], case["k"], case["v"], is_causal=True)
    return module(case["q"], case["k"], case["v"], attn_mask=case["mask"])


def local_qkv(n: int, d: int = 32, heads: int = 2, batch: int = 1, seed: int = 0, sharp: float = 3.0):
    """Structured inputs whose scores peak near the diagonal (smooth position features plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float32)
    freqs = torch.logspace(-2.2, -0.3, d // 2)
    feat = torch.cat([torch.cos(pos[:, None] * freqs), torch.sin(pos[:, None] * freqs)], -1)
    feat = feat * sharp
    q = feat + 0.3 * torch.randn(batch, heads, n, d, generator=gen)
    k = feat + 0.3 * torch.randn(batch, heads, n, d, generator=gen)
    v = torch.randn(batch, heads, n, d, generator=gen)
    return q, k, v


def assert_decreasing(errors: list, slack: float = 1.02):
    for a, b in zip(errors, errors[1:]):
        assert b <= a * slack + 1e-6, errors
    assert errors[-1] < errors[0], errors
    assert all(math.isfinite(e) for e in errors), errors


# ------------------------------------------------------------------------------------------------ sites
def make_site(nq=16, nk=None, heads=4, kv_heads=None, d=8, causal=False, mask="none", grid=None,
              prefix=None) -> AttentionSite:
    nk = nq if nk is None else nk
    kv_heads = kv_heads or heads
    mask_kind = "+".join(x for x in (("causal" if causal else ""), ("" if mask == "none" else mask)) if x) or "none"
    return AttentionSite(name="layers.0.attn", q_shape=(1, heads, nq, d), k_shape=(1, kv_heads, nk, d),
                         v_shape=(1, kv_heads, nk, d), heads=heads, kv_heads=kv_heads, head_dim=d,
                         is_causal=causal, mask=mask_kind, cross=nq != nk, gqa=heads != kv_heads, grid=grid,
                         prefix_tokens=prefix)


def make_call(causal=False) -> SiteCall:
    return SiteCall(q=None, k=None, v=None, attn_mask=None, is_causal=causal)


def build(action, **site_kw):
    """What the handler of ``action`` returns for a hand-made site."""
    site = make_site(**site_kw)
    return handler_for(action)(action, make_call(site.is_causal and site.mask == "causal"), site)


# ------------------------------------------------------------------------------------------------ end to end
def tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                     vocab_size=100, attn_implementation="eager")
    model = BertModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 16)),
             "attention_mask": torch.tensor([[1] * 16, [1] * 11 + [0] * 5])}
    return model, batch


def bert_end_to_end(action, exact_expected: bool):
    """Optimize a tiny BERT with ``action`` everywhere; check the report and (when exact) the outputs."""
    model, batch = tiny_bert()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    rewrite.optimize(model, {"_default": action}, example_kwargs=batch)
    report = model.rewrite_report
    assert len(report.sites) == 2, str(report)
    for row in report.sites:
        assert row.status == "rewritten", str(report)
        assert row.exact is False
        assert row.error is not None and math.isfinite(row.error)
        assert "declined" not in (row.reason or ""), row.reason
        assert type(action).__name__ in row.action
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    if exact_expected:
        assert max(r.error for r in report.sites) < 1e-5, str(report)
        torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    else:
        assert max(r.error for r in report.sites) > 1e-4, str(report)
        assert torch.isfinite(out).all()
    return report


# ------------------------------------------------------------------------------------------------ contract
ACTIONS = {
    "SlidingWindow": (lambda: rewrite.SlidingWindow(window=4, sinks=1), {"window": 0}),
    "TopK": (lambda: rewrite.TopK(k=3), {"k": 0}),
    "BlockRouting": (lambda: rewrite.BlockRouting(block=4, topk=2), {"layout": "3d"}),
    "KMeansRouting": (lambda: rewrite.KMeansRouting(clusters=2, window=5), {"clusters": 0}),
    "TokenMerge": (lambda: rewrite.TokenMerge(r=3), {"r": -1}),
    "Decay": (lambda: rewrite.Decay(gamma=0.8), {"gamma": 1.5}),
}


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_action_json_round_trip_defaults_and_errors(name):
    make, bad = ACTIONS[name]
    action = make()
    assert action.exact is False
    js = action.to_json()
    assert js["action"] == name
    assert rewrite.action_from_json(js) == action
    assert rewrite.action_from_json(name) == getattr(rewrite, name)()   # every argument has a default
    with pytest.raises(RewriteError, match=list(bad)[0]):
        getattr(rewrite, name)(**bad)
    with pytest.raises(RewriteError):
        getattr(rewrite, name)(**{list(bad)[0]: "x"})
    expr = action.flops()
    assert isinstance(expr, sympy.Expr)
    assert expr.free_symbols <= set(cost.SYMBOLS.values())
    val = cost.evaluate(expr, B=1, H=1, N=4096, Nk=4096, d=64, dv=64)
    assert 0 < val


@pytest.mark.parametrize("name", sorted(ACTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shape_dtype_fake_and_grad(name, dtype):
    make, _ = ACTIONS[name]
    action = make()
    n = 17
    module = build(action, nq=n, heads=4, kv_heads=2, d=8)
    assert isinstance(module, torch.nn.Module)
    q = torch.randn(2, 4, n, 8, dtype=dtype)
    k = torch.randn(2, 2, n, 8, dtype=dtype)
    v = torch.randn(2, 2, n, 8, dtype=dtype)
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., 12:] = False
    out = module(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    assert torch.isfinite(out).all()
    # shapes are inferred on fake tensors when the pipeline inserts the call
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fq, fk = torch.randn(2, 4, n, 8, dtype=dtype), torch.randn(2, 2, n, 8, dtype=dtype)
        fout = module(fq, fk, fk)
    assert fout.shape == (2, 4, n, 8) and fout.dtype == dtype
    if dtype == torch.float32:  # differentiable in q, k, v (for fine-tuning through the mixer)
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        module(qs, ks, vs, attn_mask=mask).square().sum().backward()
        for t in (qs, ks, vs):
            assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_layouts_3d_and_5d(name):
    """``(b h) n d`` inputs and extra leading batch dims give SDPA's shapes."""
    module = build(ACTIONS[name][0](), nq=10, heads=4, kv_heads=2, d=8)
    q, k, v = torch.randn(6, 10, 8), torch.randn(6, 10, 8), torch.randn(6, 10, 5)
    assert module(q, k, v, attn_mask=torch.randn(6, 10, 10)).shape == (6, 10, 5)
    q, k, v = torch.randn(2, 3, 4, 10, 8), torch.randn(2, 3, 2, 10, 8), torch.randn(2, 3, 2, 10, 8)
    out = module(q, k, v, attn_mask=torch.ones(3, 1, 1, 10, dtype=torch.bool), enable_gqa=True)
    assert out.shape == (2, 3, 4, 10, 8)


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_dropout_applies_to_probabilities(name):
    module = build(ACTIONS[name][0](), nq=12, heads=2, d=8)
    q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    torch.manual_seed(0)
    a = module(q, k, v, dropout_p=0.5)
    b = module(q, k, v, dropout_p=0.0)
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert torch.equal(module(q, k, v), b)
