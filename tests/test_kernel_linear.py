"""rewrite::linear_attention: Triton kernels vs the quadratic reference (and the chunked reference).

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton loads).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("REWRITE_KERNELS_AUTOTUNE", "0")

import importlib  # noqa: E402

import pytest  # noqa: E402

import rewrite.kernels as kernels  # noqa: E402
from rewrite.kernels.flash_attention import attention_reference  # noqa: E402
from rewrite.kernels.linear_attention import (favor_projection, linear_attention_chunked,  # noqa: E402
                                              linear_attention_quadratic)

pytest.importorskip("triton")


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(device, B, H, Nq, Nk, D, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*shape):
        return (0.5 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)

    return mk(B, H, Nq, D), mk(B, H, Nk, D), mk(B, H, Nk, Dv or D)


def _assert_close(a, b, tol, what=""):
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.float().abs().max().item()) if b.numel() else 1.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.2f}"


def _projection(device, m, d, seed=0):
    return favor_projection(m, d, torch.Generator().manual_seed(seed), device=device)


def _check(q, k, v, fmap, causal, projection=None, tol=2e-5):
    out = kernels.linear_attention(q, k, v, fmap, projection, causal)
    ref = linear_attention_quadratic(q, k, v, fmap, projection, causal)
    _assert_close(out, ref, tol, "out")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        _assert_close(a, b, tol if q.dtype == torch.float32 else 5 * tol, f"d{name}")
    return out


@pytest.mark.parametrize("fmap", ["elu", "relu", "favor"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("N", [1, 33, 64])
def test_matches_quadratic(device, fmap, causal, N):
    q, k, v = _qkv(device, 1, 2, N, N, 16)
    proj = _projection(device, 32, 16) if fmap == "favor" else None
    _check(q, k, v, fmap, causal, proj)


@pytest.mark.parametrize("fmap,causal", [("elu", True), ("relu", False)])
def test_head_dim_80_and_value_dim(device, fmap, causal):
    """Feature dim 80 (padded to 128 in-kernel, tiled in the backward) and a different value dim."""
    q, k, v = _qkv(device, 2, 2, 33, 33, 80, Dv=32)
    _check(q, k, v, fmap, causal)


def test_bidirectional_cross_lengths(device):
    q, k, v = _qkv(device, 1, 2, 7, 33, 32)
    _check(q, k, v, "elu", False)


def test_favor_many_features(device):
    """m = 96 features (not a power of two) with head dim 32."""
    q, k, v = _qkv(device, 1, 2, 33, 33, 32)
    _check(q, k, v, "favor", True, _projection(device, 96, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    q, k, v = _qkv(device, 1, 2, 33, 33, 32, dtype=dtype)
    out = _check(q, k, v, "elu", True, tol=2e-2)
    assert out.dtype == dtype


def test_chunked_reference_equals_quadratic(device):
    q, k, v = (t.detach() for t in _qkv(device, 2, 2, 70, 70, 16))
    for fmap in ("elu", "relu"):
        for causal in (True, False):
            a = linear_attention_chunked(q, k, v, fmap, None, causal, chunk_size=16)
            b = linear_attention_quadratic(q, k, v, fmap, None, causal)
            _assert_close(a, b, 1e-5, f"{fmap} causal={causal}")


def test_favor_approximates_softmax():
    """FAVOR+ with many orthogonal features estimates softmax attention (exp(q.k / sqrt(D)) kernel)."""
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in _qkv("cpu", 1, 2, 64, 64, 16))
    exact = attention_reference(q, k, v, is_causal=True)
    approx = linear_attention_quadratic(q, k, v, "favor", _projection("cpu", 1024, 16), causal=True)
    elu = linear_attention_quadratic(q, k, v, "elu", None, causal=True)
    err_favor = (approx - exact).abs().mean().item()
    assert err_favor < 0.05
    assert err_favor < (elu - exact).abs().mean().item()


def test_relu_zero_rows_are_finite(device):
    """relu features can vanish: the eps-normalised output is 0, never NaN."""
    q, k, v = _qkv(device, 1, 2, 16, 16, 16)
    with torch.no_grad():
        q[:, :, 3] = -1.0
    out = kernels.linear_attention(q, k, v, "relu", causal=True)
    assert torch.isfinite(out).all() and out[:, :, 3].abs().max().item() == 0.0


# ------------------------------------------------------------------------------------------ registration


def test_ops_registered_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert hasattr(torch.ops.rewrite, "linear_attention")
    with FakeTensorMode():
        q = torch.empty(2, 4, 100, 64)
        v = torch.empty(2, 4, 100, 48)
        out = torch.ops.rewrite.linear_attention(q, q, v, "elu", None, True)
        assert out.shape == (2, 4, 100, 48)
        w = torch.empty(128, 64)
        out = torch.ops.rewrite.linear_attention(q, q, v, "favor", w, False)
        assert out.shape == (2, 4, 100, 48)


def test_opcheck(device):
    q, k, v = _qkv(device, 1, 2, 20, 20, 16)
    torch.library.opcheck(torch.ops.rewrite.linear_attention_core.default, (q, k, v, "elu", True, 1e-6))


def test_torch_compile_fullgraph(device):
    q, k, v = _qkv(device, 1, 2, 16, 16, 16)
    f = torch.compile(lambda q, k, v: kernels.linear_attention(q, k, v, "elu", causal=True), backend="aot_eager",
                      fullgraph=True)
    _assert_close(f(q, k, v), linear_attention_quadratic(q, k, v, "elu", None, True), 2e-5, "compiled")


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    tk = importlib.import_module("rewrite.kernels.linear_attention.triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def boom(*a, **k):
        raise AssertionError("Triton path taken on CPU without TRITON_INTERPRET")

    monkeypatch.setattr(tk, "la_fwd", boom)
    monkeypatch.setattr(tk, "la_bwd", boom)
    for causal in (True, False):
        q, k, v = _qkv("cpu", 1, 2, 150, 150, 16)   # several 64-row chunks of the chunked reference
        _check(q, k, v, "elu", causal, tol=1e-5)


def test_errors(device):
    q, k, v = _qkv(device, 1, 2, 8, 16, 16)
    with pytest.raises(ValueError, match="Nq == Nk"):
        kernels.linear_attention(q, k, v, "elu", causal=True)
    with pytest.raises(ValueError, match="projection"):
        kernels.linear_attention(q, k, v, "favor")
    with pytest.raises(ValueError, match="unknown feature map"):
        kernels.linear_attention(q, k, v, "softmax")
