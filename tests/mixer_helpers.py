"""Helpers of the mixer tests: the reference attention, input strategies, hand-made sites and calls, padded
masks, and a tiny BERT end-to-end runner. The contract every action meets is tests/test_action_contract.py."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import strategies as st

import rewrite
from rewrite.actions import build_target
from rewrite.passes.lower import SiteCall
from rewrite.sites import AttentionSite

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


def assert_like_sdpa(mixer, dtype, dv: int = 16, contiguous: bool = False, **kwargs) -> torch.Tensor:
    """``mixer`` on grouped-query inputs (4 query heads over 2 key/value heads, 12 tokens, values ``dv`` wide) gives
    SDPA's shape and dtype, finite; ``kwargs`` go to both (``is_causal``). Returns the mixer's output."""
    q, k = torch.randn(2, 4, 12, 16, dtype=dtype), torch.randn(2, 2, 12, 16, dtype=dtype)
    v = torch.randn(2, 2, 12, dv, dtype=dtype)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    out = mixer(q, k, v, enable_gqa=True, **kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()
    assert out.is_contiguous() or not contiguous
    return out


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
def make_call(q_shape, k_shape, is_causal=False) -> SiteCall:
    """A site's call with placeholder q, k, v carrying example values of these shapes."""
    g = fx.Graph()
    nodes = []
    for name, shp in (("q", q_shape), ("k", k_shape), ("v", k_shape)):
        n = g.placeholder(name)
        n.meta["val"] = torch.empty(shp)
        nodes.append(n)
    return SiteCall(q=nodes[0], k=nodes[1], v=nodes[2], is_causal=is_causal)


def make_site(q_shape=(2, 4, 16, 16), k_shape=None, mask="none", is_causal=False, **kw) -> AttentionSite:
    k_shape = k_shape or q_shape
    kw.setdefault("gqa", q_shape[1] != k_shape[1])
    return AttentionSite(name="layer", q_shape=q_shape, k_shape=k_shape, v_shape=k_shape, heads=q_shape[1],
                         kv_heads=k_shape[1], head_dim=q_shape[-1], mask=mask, is_causal=is_causal,
                         cross=q_shape[-2] != k_shape[-2], **kw)


def build(action, nq=16, nk=None, heads=4, kv_heads=None, d=8, causal=False, mask="none", grid=None, prefix=None):
    """What ``action`` builds (requirements checked, then its handler) for a hand-made ``[1, heads, nq, d]`` site."""
    nk = nq if nk is None else nk
    kv_heads = kv_heads or heads
    kinds = "+".join(x for x in (("causal" if causal else ""), ("" if mask == "none" else mask)) if x) or "none"
    q_shape, k_shape = (1, heads, nq, d), (1, kv_heads, nk, d)
    site = make_site(q_shape, k_shape, mask=kinds, is_causal=causal, grid=grid, prefix_tokens=prefix)
    return build_target(action, make_call(q_shape, k_shape, causal and kinds == "causal"), site)


def padded_mask(b, nq, nk, pad, causal, expanded=True, kind="additive"):
    """HF-style mask: [B, 1, Nq, Nk] (or [B, 1, 1, Nk]); the last ``pad`` keys of the last row are padding."""
    valid = torch.ones(b, nk, dtype=torch.bool)
    if pad:
        valid[-1, nk - pad:] = False
    allowed = valid[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq))
    elif expanded:
        allowed = allowed.expand(b, 1, nq, nk)
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


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


def draw_qkv(draw, a: int, hq: int, hkv: int, n: int, d: int, dv: int, gen: torch.Generator) -> tuple:
    """q ``[a, hq, n, d]``, k ``[a, hkv, n, d]``, v ``[a, hkv, n, dv]``: contiguous, or (drawn) views of ``[a, n, h,
    d]`` tensors transposed, whose rows are strided as Hugging Face layers hand them over."""
    if draw(st.booleans()):
        return (torch.randn(a, n, hq, d, generator=gen).transpose(1, 2),
                torch.randn(a, n, hkv, d, generator=gen).transpose(1, 2),
                torch.randn(a, n, hkv, dv, generator=gen).transpose(1, 2))
    return tuple(torch.randn(a, h, n, x, generator=gen) for h, x in ((hq, d), (hkv, d), (hkv, dv)))


def needs_cpu_kernel(kernel):
    """Skips a test where ``kernel`` (a package of ``rewrite.kernels`` with a C++ kernel) cannot be built here."""
    return pytest.mark.skipif(not kernel.available(), reason=f"kernel unavailable: {kernel.why_unavailable()}")
