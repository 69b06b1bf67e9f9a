"""Soft-capping (Gemma 2's ``c * tanh(s / c)`` before the mask) in ``rewrite::flash_attention``.

The Triton kernels (Triton's interpreter on a machine without CUDA) and the CPU paths (the chunked forward
``attention_chunked``, the reference backward) against the formula written out naively in float64, with
autograd through it as the oracle of the gradients.
"""
import os

import torch

if not torch.cuda.is_available():  # no GPU: run the kernels in Triton's interpreter (set before Triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("REWRITE_KERNELS_AUTOTUNE", "0")

import importlib  # noqa: E402

import pytest  # noqa: E402

import rewrite.kernels as kernels  # noqa: E402
from rewrite.kernels.flash_attention import reference  # noqa: E402

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLASH = importlib.import_module("rewrite.kernels.flash_attention")


def naive(q, k, v, cap, mask=None, causal=False, scale=None):
    """Gemma 2's eager attention in float64: scale, cap, then the mask, softmax (fully masked rows: 0)."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    s = torch.tanh(s / cap) * cap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(h, n, s):
        return (torch.randn(B, h, n, D, generator=g) * s).to(DEVICE, dtype).requires_grad_(True)

    return mk(Hq, Nq, spread), mk(Hkv, Nk, spread), mk(Hkv, Nk, 1.0)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


def _padding(B, Nq, Nk, lengths, additive=True):
    keep = torch.arange(Nk)[None, :] < torch.tensor(lengths)[:, None]
    if not additive:
        return keep[:, None, None, :].expand(B, 1, Nq, Nk).to(DEVICE)
    return torch.zeros(B, 1, 1, Nk).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min).to(DEVICE)


CASES = [
    # B, Hq, Hkv, Nq, Nk, cap, mask kind, causal
    (2, 2, 2, 33, 33, 50.0, "none", False),
    (2, 2, 2, 20, 33, 5.0, "additive", False),       # padding, several key tiles, a small cap (tanh saturates)
    (1, 2, 2, 24, 24, 30.0, "boolean", True),        # boolean keep-mask with fully masked rows, and causal
    (2, 4, 2, 17, 17, 20.0, "additive", True),       # GQA 4/2, causal + padding
]


def _mask(kind, B, Nq, Nk):
    if kind == "additive":
        return _padding(B, Nq, Nk, [Nk, Nk - 9][:B])
    if kind == "boolean":
        keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[:, :, 3] = False                            # a row with no key at all
        return keep.to(DEVICE)
    return None


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,cap,kind,causal", CASES)
def test_kernel_matches_naive_fp32(B, Hq, Hkv, Nq, Nk, cap, kind, causal):
    q, k, v = _qkv(B, Hq, Hkv, Nq, Nk, 32)
    mask = _mask(kind, B, Nq, Nk)
    out = kernels.flash_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=Hq != Hkv, softcap=cap)
    want = naive(q, k, v, cap, mask, causal)
    assert _err(out, want) < 2e-5
    if kind == "boolean":
        assert out[:, :, 3].abs().max().item() == 0.0
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g.double())
    for name, a, b in zip("qkv", got, ref):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert _err(a, b) < 5e-5, f"d{name}: {_err(a, b):.2e}"


def test_kernel_matches_naive_bf16():
    q, k, v = _qkv(2, 4, 2, 24, 24, 32, dtype=torch.bfloat16)
    mask = _padding(2, 24, 24, [24, 15])
    out = kernels.flash_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True, softcap=50.0)
    assert out.dtype == torch.bfloat16
    assert _err(out, naive(q, k, v, 50.0, mask, causal=True)) < 2e-2
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(naive(q, k, v, 50.0, mask, causal=True), (q, k, v), g.double())
    for name, a, b in zip("qkv", got, ref):
        assert _err(a, b) < 5e-2, f"d{name}: {_err(a, b):.2e}"


def test_cap_changes_the_result():
    """The cap is really applied: a small cap differs from no cap (scores of spread 3 exceed 1.0 often)."""
    q, k, v = _qkv(1, 2, 2, 16, 16, 32)
    plain = kernels.flash_attention(q, k, v)
    capped = kernels.flash_attention(q, k, v, softcap=1.0)
    assert _err(capped, plain) > 1e-2
    assert _err(capped, naive(q, k, v, 1.0)) < 2e-5


def test_learned_bias_gradient_is_taken_after_the_cap():
    """A float mask added after the cap gets dS itself; q and k get dS * (1 - tanh^2)."""
    q, k, v = _qkv(2, 2, 2, 17, 20, 32)
    bias = torch.randn(1, 2, 17, 20, generator=torch.Generator().manual_seed(5)).to(DEVICE).requires_grad_(True)
    out = kernels.flash_attention(q, k, v, attn_mask=bias, softcap=10.0)
    want = naive(q, k, v, 10.0, bias)
    assert _err(out, want) < 2e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, bias), g)
    ref = torch.autograd.grad(want, (q, k, bias), g.double())
    for name, a, b in zip(("dq", "dk", "dbias"), got, ref):
        assert _err(a, b) < 5e-5, f"{name}: {_err(a, b):.2e}"


# ------------------------------------------------------------------------------------ the CPU paths


@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_chunked_forward_matches_naive(chunk):
    q, k, v = _qkv(2, 4, 2, 19, 37, 16)
    for mask, causal in ((None, False), (_padding(2, 19, 37, [37, 5]), True), (_mask("boolean", 2, 19, 37), False)):
        out, lse = reference.attention_chunked(q, k, v, mask, causal, softcap=7.5, chunk=chunk)
        assert not out.requires_grad
        assert _err(out, naive(q, k, v, 7.5, mask, causal)) < 2e-6
        full_out, full_lse = reference.attention_reference(q, k, v, mask, causal, return_lse=True, softcap=7.5)
        finite = torch.isfinite(full_lse)
        assert torch.equal(finite, torch.isfinite(lse))           # -inf exactly on the rows with no key
        assert (lse[finite] - full_lse[finite]).abs().max().item() < 1e-5


def test_chunked_forward_without_cap_alibi_and_dropout_match_reference():
    q, k, v = _qkv(1, 4, 4, 21, 29, 16, seed=2)
    slopes = kernels.alibi_slopes(4)
    keep = torch.rand(1, 4, 21, 29, generator=torch.Generator().manual_seed(3)) > 0.2
    out, _ = reference.attention_chunked(q, k, v, None, True, None, slopes, 0.2, keep, chunk=8)
    ref = reference.attention_reference(q, k, v, None, True, None, slopes, 0.2, keep)
    assert _err(out, ref) < 2e-6


def test_cpu_op_path_is_exact_with_gradients(monkeypatch):
    """The op's CPU path (what CPU tensors run without TRITON_INTERPRET): chunked forward, reference backward."""
    monkeypatch.setattr(FLASH, "use_triton", lambda t: False)
    q, k, v = (t.detach().cpu().requires_grad_(True) for t in _qkv(1, 2, 1, 520, 520, 8, seed=4))
    mask = _padding(1, 520, 520, [333]).cpu()
    out = kernels.flash_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True, softcap=30.0)
    want = naive(q, k, v, 30.0, mask, causal=True)
    assert _err(out, want) < 2e-6                       # Nk = 520 > DEFAULT_KEY_CHUNK: two chunks
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g),
                          torch.autograd.grad(want, (q, k, v), g.double())):
        assert _err(a, b) < 1e-5, f"d{name}: {_err(a, b):.2e}"


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_softcap_is_refused(bad):
    q, k, v = _qkv(1, 1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        kernels.flash_attention(q, k, v, softcap=bad)


def test_op_traces_with_softcap():
    """``torch.ops.rewrite.flash_attention`` takes ``softcap`` too (what graphs and export see)."""
    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 8, 8, 16))
    out = torch.ops.rewrite.flash_attention(q, k, v, softcap=4.0)
    assert _err(out, naive(q, k, v, 4.0)) < 2e-5


class _CappedAttention(torch.nn.Module):
    """Gemma 2's eager spelling with a padding mask."""

    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        s = torch.tanh(s / 3.0) * 3.0
        return torch.matmul(torch.softmax(s + mask, dim=-1, dtype=torch.float32).to(q.dtype), v)


def test_exact_triton_runs_the_soft_capped_kernel_end_to_end(monkeypatch):
    """``Exact(kernel="triton")`` on a soft-capped site: the Triton kernel itself (the interpreter on CPU, as
    ``REWRITE_MIXER_KERNELS=1`` asks) with ``softcap``, verified against the original."""
    import rewrite
    monkeypatch.setenv("REWRITE_MIXER_KERNELS", "1")
    calls = []
    real = FLASH._flash

    def counted(*args):
        calls.append(args[-1])                              # the softcap argument
        return real(*args)

    monkeypatch.setattr(FLASH, "_flash", counted)
    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 16, 16, 16))
    # -inf padding: a redrawn row with no key is NaN in both (the kernel scales an additive mask by log2(e),
    # so a row of finfo.min overflows to -inf there and gives 0 where the original is uniform)
    mask = torch.zeros(1, 1, 1, 16).masked_fill(torch.arange(16) >= 11, float("-inf")).to(DEVICE)
    model = _CappedAttention()
    rewrite.optimize(model, {"_default": rewrite.Exact(kernel="triton")}, example_inputs=(q, k, v, mask))
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten" and row.error < 1e-5, row.reason
    calls.clear()
    with torch.no_grad():
        out = model(q, k, v, mask)
    assert calls == [3.0]
    assert _err(out, naive(q, k, v, 3.0, mask)) < 2e-5
