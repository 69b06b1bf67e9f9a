"""rewrite::flash_attention: the Triton kernels against the PyTorch reference (and SDPA).

On a machine without CUDA the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
Triton is imported, so it is set here at the top (scripts/test.sh exports it too). On a GPU the same tests
run the compiled kernels on CUDA tensors.
"""
import os

import torch

if not torch.cuda.is_available():  # no GPU: run the kernels in Triton's interpreter (set before Triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("REWRITE_KERNELS_AUTOTUNE", "0")  # one config per launch: no tuning sweep per test shape

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rewrite.kernels as kernels  # noqa: E402
from rewrite.kernels.flash_attention import alibi_slopes, attention_reference  # noqa: E402

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def device():
    return "cuda" if ON_GPU else "cpu"


def _qkv(device, B, Hq, Hkv, Nq, Nk, D, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    Dv = Dv or D

    def mk(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    return mk(B, Hq, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, Dv)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _assert_close(a, b, tol, what=""):
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.float().abs().max().item()) if b.numel() else 1.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.2f}"


def _check(device, q, k, v, tol=2e-5, **kw):
    """Forward and backward (dq, dk, dv) of the kernel path vs the fp32 reference."""
    enable_gqa = q.shape[1] != k.shape[1]
    out = kernels.flash_attention(q, k, v, enable_gqa=enable_gqa, **kw)
    ref_kw = dict(kw)
    ref = attention_reference(q, k, v, **ref_kw)
    _assert_close(out, ref, tol, "out")
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        _assert_close(a, b, tol * 10 if q.dtype != torch.float32 else tol, f"d{name}")
    return out


# ----------------------------------------------------------------------------------------------- shapes

SHAPES = [
    # B, Hq, Hkv, Nq, Nk, D, Dv, causal
    (1, 2, 2, 33, 33, 32, 32, False),   # odd length, last tile masked
    (2, 2, 2, 16, 16, 16, 16, True),    # one full tile, causal
    (1, 2, 2, 64, 64, 32, 32, True),    # several tiles, causal diagonal tiles
    (1, 4, 2, 7, 33, 80, 80, False),    # GQA 4/2, Nq < Nk, head dim 80 (padded to 128)
    (1, 4, 1, 33, 7, 32, 32, True),     # MQA, Nq > Nk, causal (rows i >= Nk see every key)
    (1, 2, 2, 7, 33, 32, 32, True),     # Nq < Nk causal: top-left alignment as SDPA
    (1, 2, 2, 1, 64, 96, 96, False),    # decode-like single query, head dim 96
    (1, 2, 2, 16, 33, 32, 16, False),   # value head dim differs from the key head dim
    (1, 2, 2, 1, 1, 16, 16, True),      # N = 1
]


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,causal", SHAPES)
def test_matches_reference(device, B, Hq, Hkv, Nq, Nk, D, Dv, causal):
    q, k, v = _qkv(device, B, Hq, Hkv, Nq, Nk, D, Dv)
    _check(device, q, k, v, is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(device, causal):
    """The reference's semantics are SDPA's (including top-left causal with Nq != Nk and GQA)."""
    q, k, v = _qkv(device, 1, 4, 2, 7, 33, 32)
    out = kernels.flash_attention(q, k, v, is_causal=causal, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    _assert_close(out, ref, 2e-5, "vs SDPA")


def test_non_contiguous_inputs(device):
    """[B, N, H, D] activations viewed as [B, H, N, D] (the usual projection layout): strides, no copies."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 33, 4, 32, generator=g).to(device).transpose(1, 2).requires_grad_(True)
               for _ in range(3))
    assert not q.is_contiguous()
    _check(device, q, k, v, is_causal=True)


def test_custom_scale(device):
    q, k, v = _qkv(device, 1, 2, 2, 16, 16, 32)
    _check(device, q, k, v, scale=0.3)


# ----------------------------------------------------------------------------------------------- masks


def _rand(device, *shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("kind", ["padding", "full_bias", "bool_2d", "bool_causal"])
def test_masks(device, kind):
    B, H, Nq, Nk, D = 2, 2, 33, 33, 32
    q, k, v = _qkv(device, B, H, H, Nq, Nk, D)
    causal = False
    if kind == "padding":   # [B, 1, 1, Nk] additive, -inf on padded keys: broadcast through zero strides
        lengths = torch.tensor([33, 20])
        keep = torch.arange(Nk)[None, :] < lengths[:, None]
        mask = torch.zeros(B, 1, 1, Nk).masked_fill(~keep[:, None, None, :], float("-inf")).to(device)
    elif kind == "full_bias":  # [B, H, Nq, Nk] arbitrary float bias
        mask = _rand(device, B, H, Nq, Nk)
    elif kind == "bool_2d":   # [Nq, Nk] boolean keep-mask, with one fully masked row
        mask = (_rand(device, Nq, Nk) > -0.5)
        mask[3] = False
    else:                     # boolean [B, 1, Nq, Nk] combined with is_causal
        mask = (_rand(device, B, 1, Nq, Nk) > -1.0)
        causal = True
    out = _check(device, q, k, v, attn_mask=mask, is_causal=causal)
    if kind == "bool_2d":
        assert out[:, :, 3].abs().max().item() == 0.0  # fully masked row -> 0


def test_mask_matches_sdpa(device):
    q, k, v = _qkv(device, 1, 2, 2, 16, 33, 32)
    bias = _rand(device, 1, 2, 16, 33)
    out = kernels.flash_attention(q, k, v, attn_mask=bias)
    _assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), 2e-5, "bias vs SDPA")
    keep = _rand(device, 16, 33) > 0
    out = kernels.flash_attention(q, k, v, attn_mask=keep)
    _assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), 2e-5, "bool vs SDPA")


def test_fully_masked_rows_give_zero(device):
    q, k, v = _qkv(device, 1, 2, 2, 16, 16, 16)
    mask = torch.zeros(16, 16, device=device)
    mask[5:9] = float("-inf")
    out = kernels.flash_attention(q, k, v, attn_mask=mask)
    assert out[:, :, 5:9].abs().max().item() == 0.0
    dq, dk, dv = _grads(out, (q, k, v), torch.ones_like(out))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert dq[:, :, 5:9].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finfo_min_fills_match_eager_on_fully_masked_rows(device, dtype):
    """Hugging Face masks fill with ``finfo(dtype).min``: a row whose every key is filled is uniform in eager
    softmax (and SDPA), not zero. In the kernel's log2 domain the fill once overflowed to -inf and zeroed it."""
    q, k, v = _qkv(device, 1, 2, 2, 16, 24, 16, dtype=dtype)
    visible = _rand(device, 1, 1, 16, 24) > 0
    visible[..., 3, :] = False
    mask = torch.zeros(1, 1, 16, 24, device=device, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    out = kernels.flash_attention(q, k, v, attn_mask=mask)
    want = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / 4.0 + mask.float(), -1) @ v.float()
    _assert_close(out.float(), want, 2e-5 if dtype == torch.float32 else 2e-2, "finfo.min fills vs eager")
    assert out[:, :, 3].abs().max().item() > 0     # the uniform row, not a zeroed one
    dq, dk, dv = _grads(out, (q, k, v), torch.ones_like(out))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


# ----------------------------------------------------------------------------------------------- learned bias

BIAS_CASES = [
    # mask shape (B=2, Hq=4, Nq=33, Nk=20 or Nq=Nk=33 when causal), Hkv, causal
    ((2, 4, 33, 20), 4, False),    # a bias per batch entry and head
    ((1, 4, 33, 33), 2, True),     # T5's relative-position bias: shared over the batch; GQA, causal tiles
    ((33, 20), 1, False),          # one [Nq, Nk] bias for every head (MQA)
    ((2, 1, 1, 20), 4, False),     # a learnable key bias (summed over heads and queries)
]


@pytest.mark.parametrize("mask_shape,Hkv,causal", BIAS_CASES)
def test_learned_bias_gradient(device, mask_shape, Hkv, causal):
    """A float attn_mask that requires grad gets the gradient of the reference (autograd through s + bias),
    summed over the dims it broadcasts along, in its own shape."""
    Nk = mask_shape[-1]
    q, k, v = _qkv(device, 2, 4, Hkv, 33, Nk, 32)
    bias = _rand(device, *mask_shape, seed=3).requires_grad_(True)
    out = kernels.flash_attention(q, k, v, attn_mask=bias, is_causal=causal, enable_gqa=Hkv != 4)
    ref = attention_reference(q, k, v, attn_mask=bias, is_causal=causal)
    _assert_close(out, ref, 2e-5, "out")
    g = torch.randn_like(ref)
    got, want = _grads(out, (q, k, v, bias), g), _grads(ref, (q, k, v, bias), g)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert a.shape == b.shape, name
        _assert_close(a, b, 2e-5, name)
    assert got[3].abs().max().item() > 0
    if causal:   # keys above the diagonal never touch the output
        assert got[3][..., 0, 1:].abs().max().item() == 0.0


def test_learned_bias_gradient_buffer_is_mask_sized(device):
    """The kernel sums dS over shared dims in place: T5's [1, H, N, N] bias never gets a [B, H, N, N] buffer."""
    tk = importlib.import_module("rewrite.kernels.flash_attention.triton")
    q = torch.empty(8, 4, 33, 16, device=device)
    cases = {(1, 4, 33, 20): ((1, 4, 33, 20), 2), (8, 4, 33, 20): ((8, 4, 33, 20), 1),
             (8, 1, 1, 20): ((8, 1, 1, 20), 3), (33, 20): ((1, 1, 33, 20), 2)}
    for mask_shape, (size, mode) in cases.items():
        buf, strides, got_mode = tk._dbias_buffer(torch.empty(mask_shape, device=device), q, 8, 4, 33, 20)
        assert tuple(buf.shape) == size and got_mode == mode, mask_shape
        assert all(st == 0 for st, n in zip(strides, size[:3]) if n == 1)


def test_learned_bias_gradient_with_dropout_and_half(device):
    """dS under dropout uses the replayed keep-mask; a bf16 bias gets a bf16 gradient."""
    q, k, v = _qkv(device, 1, 2, 2, 17, 17, 16)
    bias = _rand(device, 1, 2, 17, 17, seed=4).requires_grad_(True)
    rng = torch.tensor([7, 0], dtype=torch.int64, device=device)
    out, keep = kernels.flash_attention(q, k, v, attn_mask=bias, dropout_p=0.2, rng_state=rng,
                                        return_dropout_mask=True)
    ref = attention_reference(q, k, v, attn_mask=bias, dropout_p=0.2, dropout_mask=keep)
    g = torch.randn_like(ref)
    _assert_close(_grads(out, (bias,), g)[0], _grads(ref, (bias,), g)[0], 2e-5, "dbias under dropout")
    qh, kh, vh = (t.detach().to(torch.bfloat16).requires_grad_(True) for t in (q, k, v))
    bh = bias.detach().to(torch.bfloat16).requires_grad_(True)
    (dbh,) = _grads(kernels.flash_attention(qh, kh, vh, attn_mask=bh), (bh,), g.to(torch.bfloat16))
    (dbf,) = _grads(attention_reference(q, k, v, attn_mask=bias), (bias,), g)
    assert dbh.dtype == torch.bfloat16
    _assert_close(dbh, dbf, 3e-2, "bf16 dbias")


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_learned_bias_trains_like_sdpa(device, monkeypatch, path):
    """One SGD step on a T5-style relative bias table gives the same table through the op as through SDPA
    (on the kernel, and on the CPU reference path that runs without the interpreter)."""
    if path == "reference":
        if ON_GPU:
            pytest.skip("the reference path is the CPU path")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    H, N, buckets = 2, 24, 8
    q, k, v = (t.detach() for t in _qkv(device, 1, H, H, N, N, 16))
    rel = torch.arange(N)[None, :] - torch.arange(N)[:, None]
    bucket = rel.clamp(-(buckets // 2), buckets // 2 - 1) + buckets // 2
    tables = []
    for attend in (kernels.flash_attention, F.scaled_dot_product_attention):
        table = torch.nn.Parameter(_rand(device, buckets, H, seed=5))
        bias = table[bucket.to(device)].permute(2, 0, 1)[None]          # [1, H, N, N]
        attend(q, k, v, attn_mask=bias, is_causal=False).square().sum().backward()
        with torch.no_grad():
            table -= 0.1 * table.grad
        tables.append(table.detach())
    _assert_close(tables[0], tables[1], 1e-4, "table after a step")


# ----------------------------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("causal,Hq,Hkv,Nq,Nk", [(True, 4, 4, 33, 33), (False, 4, 2, 16, 33)])
def test_alibi(device, causal, Hq, Hkv, Nq, Nk):
    q, k, v = _qkv(device, 1, Hq, Hkv, Nq, Nk, 32)
    slopes = alibi_slopes(Hq, device=device)
    _check(device, q, k, v, is_causal=causal, alibi_slopes=slopes)


def test_alibi_convention_matches_materialised_bias(device):
    """In-kernel ALiBi == an explicit bias slope[h] * (j - i); under causal masking it also equals BLOOM's
    per-key bias slope[h] * j (softmax is invariant to the per-row shift)."""
    H, N = 4, 33
    q, k, v = _qkv(device, 1, H, H, N, N, 32)
    slopes = alibi_slopes(H, device=device)
    out = kernels.flash_attention(q, k, v, is_causal=True, alibi_slopes=slopes)
    i = torch.arange(N, device=device)
    explicit = slopes[:, None, None] * (i[None, :] - i[:, None])[None].float()
    _assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=explicit[None] +
                                                       torch.full((N, N), float("-inf"), device=device).triu(1)),
                  2e-5, "explicit bias")
    bloom = (slopes[:, None, None] * i[None, None, :].float()).expand(H, N, N)
    causal_bias = torch.full((N, N), float("-inf"), device=device).triu(1)
    _assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bloom[None] + causal_bias), 2e-5, "BLOOM")


def test_alibi_slopes_standard():
    s = alibi_slopes(8)
    assert torch.allclose(s, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(12).shape == (12,)


# ----------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision(device, dtype, causal):
    q, k, v = _qkv(device, 1, 4, 2, 33, 33, 32, dtype=dtype)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    out = _check(device, q, k, v, tol=tol, is_causal=causal)
    assert out.dtype == dtype


# ----------------------------------------------------------------------------------------------- dropout


def test_dropout_replays_exactly_with_returned_mask(device):
    """The debug path returns the exact keep-mask; the reference fed that mask reproduces the output and the
    gradients (the backward kernels regenerate the same Philox mask)."""
    p = 0.3
    q, k, v = _qkv(device, 1, 4, 2, 33, 16, 32)
    rng = torch.tensor([1234, 77], dtype=torch.int64, device=device)
    out, keep = kernels.flash_attention(q, k, v, dropout_p=p, enable_gqa=True, rng_state=rng,
                                        return_dropout_mask=True)
    assert keep.shape == (1, 4, 33, 16) and keep.dtype == torch.bool
    ref = attention_reference(q, k, v, dropout_p=p, dropout_mask=keep)
    _assert_close(out, ref, 2e-5, "out")
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        _assert_close(a, b, 2e-5, f"d{name}")
    # the same rng_state gives the same output, another seed a different mask
    again = kernels.flash_attention(q, k, v, dropout_p=p, enable_gqa=True, rng_state=rng)
    assert torch.equal(again, out)
    _, keep2 = kernels.flash_attention(q, k, v, dropout_p=p, enable_gqa=True, return_dropout_mask=True,
                                       rng_state=torch.tensor([99, 0], dtype=torch.int64, device=device))
    assert not torch.equal(keep, keep2)


def test_dropout_statistics(device):
    """Kept fraction ~ 1 - p, independent across heads / rows; the mean over many seeds ~ no-dropout output."""
    p = 0.25
    q, k, v = _qkv(device, 1, 2, 2, 64, 64, 16)
    _, keep = kernels.flash_attention(q, k, v, dropout_p=p, return_dropout_mask=True,
                                      rng_state=torch.tensor([5, 0], dtype=torch.int64, device=device))
    frac = keep.float().mean().item()
    n = keep.numel()
    assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)   # 4 sigma
    assert not torch.equal(keep[0, 0], keep[0, 1])                # heads draw different masks
    # unbiased: averaging outputs over seeds approaches the dropout-free output
    with torch.no_grad():
        q1, k1, v1 = (t[:, :, :16].detach() for t in (q, k, v))
        clean = kernels.flash_attention(q1, k1, v1)
        runs = [kernels.flash_attention(q1, k1, v1, dropout_p=p,
                                        rng_state=torch.tensor([s, 0], dtype=torch.int64, device=device))
                for s in range(24)]
        mean = torch.stack(runs).mean(0)
    assert (mean - clean).abs().mean().item() < 0.15 * clean.abs().mean().item() + 0.05


def test_dropout_reference_path_is_deterministic(monkeypatch):
    """The CPU reference path (no interpreter) also replays its mask in the backward."""
    q, k, v = _qkv("cpu", 1, 2, 2, 8, 8, 16)
    rng = torch.tensor([3, 4])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out, keep = kernels.flash_attention(q, k, v, dropout_p=0.5, rng_state=rng, return_dropout_mask=True)
    ref = attention_reference(q, k, v, dropout_p=0.5, dropout_mask=keep)
    _assert_close(out, ref, 1e-6, "out")
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        _assert_close(a, b, 1e-5, "grad")


# ----------------------------------------------------------------------------------------------- registration


def test_ops_registered():
    assert hasattr(torch.ops.rewrite, "flash_attention")
    assert hasattr(torch.ops.rewrite, "flash_attention_fwd")
    assert hasattr(torch.ops.rewrite, "flash_attention_bwd")


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 8, 33, 80, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 40, 80, dtype=torch.bfloat16)
        v = torch.empty(2, 2, 40, 64, dtype=torch.bfloat16)
        out = torch.ops.rewrite.flash_attention(q, k, v, None, 0.0, True, None, True)
        assert out.shape == (2, 8, 33, 64) and out.dtype == torch.bfloat16
        o, lse, m = torch.ops.rewrite.flash_attention_fwd(q, k, v, None, None, None, False, 0.1, 0.0, False)
        assert lse.shape == (2, 8, 33) and lse.dtype == torch.float32 and m.numel() == 0
        dq, dk, dv, dm = torch.ops.rewrite.flash_attention_bwd(o, q, k, v, o, lse, None, None, None, False, 0.1,
                                                               0.0)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dm.numel() == 0
        mask = torch.empty(1, 8, 33, 40)
        *_, dm = torch.ops.rewrite.flash_attention_bwd(o, q, k, v, o, lse, mask, None, None, False, 0.1, 0.0, True)
        assert dm.shape == mask.shape


def test_opcheck(device):
    q, k, v = _qkv(device, 1, 2, 1, 7, 16, 16)
    mask = torch.zeros(7, 16, device=device)
    torch.library.opcheck(torch.ops.rewrite.flash_attention_fwd.default,
                          (q, k, v, mask, None, None, True, 0.25, 0.0, False))


def test_opcheck_learned_bias(device):
    q, k, v = _qkv(device, 1, 2, 1, 7, 16, 16)
    bias = torch.randn(1, 2, 7, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.rewrite.flash_attention_fwd.default,
                          (q, k, v, bias, None, None, False, 0.25, 0.0, False))


def test_torch_compile_fullgraph(device):
    q, k, v = _qkv(device, 1, 2, 2, 16, 16, 16)

    def f(q, k, v):
        return kernels.flash_attention(q, k, v, is_causal=True) * 2

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    _assert_close(out, 2 * attention_reference(q, k, v, is_causal=True), 2e-5, "compiled")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_export_keeps_kernel_op(device):
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return kernels.flash_attention(q, k, v, is_causal=True)

    q, k, v = (t.detach() for t in _qkv(device, 1, 2, 2, 16, 16, 16))
    ep = torch.export.export(M(), (q, k, v))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("rewrite.flash_attention" in t for t in targets), targets


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    """CPU tensors take the PyTorch reference unless TRITON_INTERPRET=1."""
    from rewrite.kernels import _common
    tk = importlib.import_module("rewrite.kernels.flash_attention.triton")  # (the package name is shadowed
    # by the wrapper function in rewrite.kernels, so `import ... as` would find the function)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _common.use_triton(torch.empty(1))

    def boom(*a, **k):
        raise AssertionError("Triton path taken on CPU without TRITON_INTERPRET")

    monkeypatch.setattr(tk, "flash_fwd", boom)
    monkeypatch.setattr(tk, "flash_bwd", boom)
    q, k, v = _qkv("cpu", 1, 2, 2, 9, 9, 16)
    out = kernels.flash_attention(q, k, v, is_causal=True)
    _assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), 1e-5, "reference path")
    out.sum().backward()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.use_triton(torch.empty(1))  # ... and the interpreter flag sends them to Triton


def test_argument_errors(device):
    q, k, v = _qkv(device, 1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        kernels.flash_attention(q, k, v)
    with pytest.raises(ValueError):
        kernels.flash_attention(q, k[:, :, :, :8], v, enable_gqa=True)
    with pytest.raises(ValueError, match="broadcast"):
        kernels.flash_attention(q, k, v, attn_mask=torch.zeros(2, 1, 8, 8, device=device), enable_gqa=True)
    with pytest.raises(ValueError, match="no gradient"):
        kernels.flash_attention(q, k, v, alibi_slopes=torch.ones(4, device=device, requires_grad=True),
                                enable_gqa=True)
    q3, k3, v3 = (t[0].detach() for t in _qkv(device, 1, 2, 2, 8, 8, 16))
    assert kernels.flash_attention(q3, k3, v3).shape == (2, 8, 16)   # unbatched inputs
