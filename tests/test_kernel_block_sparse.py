"""rewrite::block_sparse_attention: Triton kernels vs the PyTorch reference, and the block-mask builders.

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
from rewrite.kernels.block_sparse_attention import (block_mask_from_dense, block_sparse_reference,  # noqa: E402
                                                    causal_block_mask, expand_block_mask, fixed_block_mask,
                                                    kept_fraction, num_blocks, sliding_window_block_mask,
                                                    topk_block_mask)
from rewrite.kernels.flash_attention import attention_reference  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(device, B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    return mk(B, Hq, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, D)


def _random_block_mask(device, b, h, nqb, nkb, density=0.5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, h, nqb, nkb, generator=g) < density).to(device)


def _assert_close(a, b, tol, what=""):
    err = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.2f}"


def _check(q, k, v, block_mask, bs, tol=2e-5, **kw):
    bq, bk = (bs, bs) if isinstance(bs, int) else bs
    out = kernels.block_sparse_attention(q, k, v, block_mask, bs, **kw)
    ref = block_sparse_reference(q, k, v, block_mask, bq, bk, **kw)
    _assert_close(out, ref, tol, "out")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        _assert_close(a, b, tol if q.dtype == torch.float32 else tol * 10, f"d{name}")
    return out


CASES = [
    # B, Hq, Hkv, Nq, Nk, D, block, mask batch/head dims, causal
    (1, 2, 2, 33, 33, 32, 16, (1, 1), False),    # odd length: partial last block
    (2, 2, 2, 64, 64, 16, 16, (2, 2), True),     # per-(batch, head) masks, causal inside blocks
    (1, 4, 2, 64, 33, 80, 16, (1, 4), False),    # GQA, Nq != Nk, head dim 80, per-head masks
    (1, 2, 2, 64, 64, 32, (32, 16), (1, 1), True),  # rectangular blocks (2 query tiles of 16 per block)
    (1, 2, 1, 57, 64, 16, 32, (1, 2), True),        # blocks of 32 processed as 2 x 2 tiles of 16, causal
]


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,bs,mdims,causal", CASES)
def test_matches_reference(device, B, Hq, Hkv, Nq, Nk, D, bs, mdims, causal):
    q, k, v = _qkv(device, B, Hq, Hkv, Nq, Nk, D)
    bq, bk = (bs, bs) if isinstance(bs, int) else bs
    bm = _random_block_mask(device, *mdims, num_blocks(Nq, bq), num_blocks(Nk, bk))
    _check(q, k, v, bm, bs, is_causal=causal)


@pytest.mark.parametrize("kind", ["additive", "bool"])
def test_with_attn_mask(device, kind):
    B, H, N = 2, 2, 33
    q, k, v = _qkv(device, B, H, H, N, N, 32)
    bm = sliding_window_block_mask(num_blocks(N, 16), num_blocks(N, 16), 2, causal=False, device=device)
    gen = torch.Generator().manual_seed(5)
    if kind == "additive":
        mask = torch.randn(B, 1, N, N, generator=gen).to(device)
    else:
        mask = (torch.rand(1, 1, N, N, generator=gen) > 0.3).to(device)
    _check(q, k, v, bm, 16, attn_mask=mask)


def test_full_mask_equals_flash(device):
    q, k, v = _qkv(device, 1, 2, 2, 33, 33, 32)
    full = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=device)
    out = kernels.block_sparse_attention(q, k, v, full, 16, is_causal=True)
    _assert_close(out, attention_reference(q, k, v, is_causal=True), 2e-5, "vs dense")


def test_dense_mask_roundtrip(device):
    """block_mask_from_dense + the dense mask as attn_mask == dense masked attention."""
    N = 48
    q, k, v = _qkv(device, 1, 2, 2, N, N, 16)
    i = torch.arange(N, device=device)
    dense = (i[:, None] - i[None, :]).abs() < 10     # a band
    bm = block_mask_from_dense(dense, 16, 16)
    assert bm.shape == (1, 1, 3, 3) and kept_fraction(bm) < 1.0
    out = kernels.block_sparse_attention(q, k, v, bm, 16, attn_mask=dense)
    _assert_close(out, attention_reference(q, k, v, attn_mask=dense), 2e-5, "band")


def test_empty_query_blocks_give_zero(device):
    q, k, v = _qkv(device, 1, 2, 2, 32, 32, 16)
    bm = torch.zeros(1, 1, 2, 2, dtype=torch.bool, device=device)
    bm[..., 1, 0] = True                              # query block 0 attends to nothing
    out = _check(q, k, v, bm, 16)
    assert out[:, :, :16].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    q, k, v = _qkv(device, 1, 2, 2, 33, 33, 32, dtype=dtype)
    bm = _random_block_mask(device, 1, 2, 3, 3, density=0.6)
    out = _check(q, k, v, bm, 16, tol=1e-2 if dtype == torch.float16 else 3e-2, is_causal=True)
    assert out.dtype == dtype


# ------------------------------------------------------------------------------------------ mask builders


def test_sliding_window_mask():
    m = sliding_window_block_mask(4, 4, 2, causal=True)
    assert m.shape == (1, 1, 4, 4)
    assert m[0, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                [False, True, True, False], [False, False, True, True]]
    m = sliding_window_block_mask(3, 3, 2, causal=False)
    assert m[0, 0].tolist() == [[True, True, False], [True, True, True], [False, True, True]]


def test_fixed_mask():
    m = fixed_block_mask(6, 6, local_blocks=1, global_blocks=1, stride=3, causal=True)[0, 0]
    assert m.diagonal().all() and m[:, 0].all()            # local + sink column
    assert m[5, 2] and not m[5, 3]                         # summary column every 3rd block
    assert not m.triu(1).any()                             # causal


def test_topk_mask(device):
    q, k, _ = _qkv(device, 2, 4, 2, 64, 64, 16)
    m = topk_block_mask(q, k, 16, topk=2, causal=True)
    assert m.shape == (2, 4, 4, 4)
    assert not m.triu(1).any()                             # never above the diagonal
    assert m.diagonal(dim1=-2, dim2=-1).all()             # the diagonal block is always kept
    counts = m.sum(-1)
    assert (counts == torch.tensor([1, 2, 2, 2], device=device)).all()


def test_causal_block_mask_partial_blocks():
    m = causal_block_mask(20, 40, 16, 16)[0, 0]            # 2 x 3 blocks; rows 0..19
    assert m.tolist() == [[True, False, False], [True, True, False]]


def test_expand_block_mask():
    bm = torch.tensor([[True, False], [False, True]])[None, None]
    e = expand_block_mask(bm, 3, 3, 2, 2)[0, 0]
    assert e.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_compressed_lists_skip_empty_blocks():
    """The kernels iterate over compressed lists: counts = kept blocks per row, indices ascending first."""
    tk = importlib.import_module("rewrite.kernels.block_sparse_attention.triton")
    bm = torch.tensor([[False, True, False, True], [False, False, False, False]])[None, None]
    cnt, idx = tk.compress(bm, 2, 3)
    assert cnt.shape == (2, 3, 2) and cnt.stride()[:2] == (0, 0)     # broadcast, not copied
    assert cnt[0, 0].tolist() == [2, 0]
    assert idx[0, 0, 0, :2].tolist() == [1, 3]
    causal = tk.prepare_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 1, 1, 64, 64, 16, 16, True)
    assert causal.sum().item() == 10                                   # blocks above the diagonal dropped


# ------------------------------------------------------------------------------------------ registration


def test_ops_registered_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert hasattr(torch.ops.rewrite, "block_sparse_attention")
    with FakeTensorMode():
        q = torch.empty(2, 4, 100, 64, dtype=torch.float16)
        k = torch.empty(2, 2, 70, 64, dtype=torch.float16)
        bm = torch.empty(1, 4, 2, 2, dtype=torch.bool)
        out = torch.ops.rewrite.block_sparse_attention(q, k, k, bm, 64, 64)
        assert out.shape == (2, 4, 100, 64) and out.dtype == torch.float16


def test_opcheck(device):
    q, k, v = _qkv(device, 1, 2, 1, 20, 20, 16)
    bm = torch.tensor([[True, False], [True, True]], device=device)[None, None]
    torch.library.opcheck(torch.ops.rewrite.block_sparse_attention_fwd.default,
                          (q, k, v, bm, None, 16, 16, True, 0.25))


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    tk = importlib.import_module("rewrite.kernels.block_sparse_attention.triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def boom(*a, **k):
        raise AssertionError("Triton path taken on CPU without TRITON_INTERPRET")

    monkeypatch.setattr(tk, "bs_fwd", boom)
    monkeypatch.setattr(tk, "bs_bwd", boom)
    q, k, v = _qkv("cpu", 1, 2, 2, 20, 20, 16)
    bm = torch.tensor([[True, False, True], [True, True, False]])[None, None]  # block 8 on the reference path
    out = kernels.block_sparse_attention(q, k, v, bm, (16, 8))
    ref = block_sparse_reference(q, k, v, bm, 16, 8)
    _assert_close(out, ref, 1e-6, "reference path")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        _assert_close(a, b, 1e-5, "grad")


def test_bad_block_mask_shape(device):
    q, k, v = _qkv(device, 1, 2, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="block_mask"):
        kernels.block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 2, dtype=torch.bool, device=device), 16)


# ------------------------------------------------------------------------------------------ in-kernel band

BAND_CASES = [
    # B, Hq, Hkv, N, D, block, (left, right), sinks, causal
    (1, 2, 2, 37, 16, 16, (5, 5), 0, False),      # odd length, symmetric band
    (1, 2, 1, 45, 16, 16, (9, 0), 2, True),       # causal band with sinks, GQA
    (2, 2, 2, 50, 32, 16, (3, 20), 3, False),     # asymmetric band, sinks, bidirectional
    (1, 4, 2, 70, 16, 32, (17, 17), 1, False),    # blocks of 32 as 2 x 2 tiles, GQA
    (1, 2, 2, 33, 16, 16, (4, None), 0, False),   # one side unbounded
]


@pytest.mark.parametrize("B,Hq,Hkv,N,D,bs,window,sinks,causal", BAND_CASES)
def test_band_matches_reference(device, B, Hq, Hkv, N, D, bs, window, sinks, causal):
    from rewrite.kernels.block_sparse_attention import band_block_mask
    from rewrite.kernels.block_sparse_attention.reference import band_keep
    q, k, v = _qkv(device, B, Hq, Hkv, N, N, D, seed=7)
    left, right = (-1 if w is None else w for w in window)
    bm = band_block_mask(N, N, bs, bs, left, right, sinks, device=device)
    assert kept_fraction(bm) < 1.0 or N <= 2 * bs
    out = _check(q, k, v, bm, bs, is_causal=causal, window=window, sinks=sinks)
    # the band alone equals dense attention with the band as a mask
    keep = band_keep(N, N, window, sinks, device)
    dense = attention_reference(q, k, v, attn_mask=keep, is_causal=causal)
    _assert_close(out, dense, 2e-5, "band vs dense")


def test_band_with_key_padding_mask(device):
    from rewrite.kernels.block_sparse_attention import band_block_mask
    B, H, N = 2, 2, 41
    q, k, v = _qkv(device, B, H, H, N, N, 16, seed=9)
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool, device=device)
    pad[1, ..., 30:] = False
    bm = band_block_mask(N, N, 16, 16, 6, 6, 1, device=device)
    _check(q, k, v, bm, 16, attn_mask=pad, window=(6, 6), sinks=1)


def test_band_op_schema_backward_compatible():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(1, 2, 40, 16)
        bm = torch.empty(1, 1, 3, 3, dtype=torch.bool)
        out = torch.ops.rewrite.block_sparse_attention(q, q, q, bm, 16, 16, None, False, None, 4, 4, 1)
        assert out.shape == (1, 2, 40, 16)
        out, lse = torch.ops.rewrite.block_sparse_attention_fwd(q, q, q, bm, None, 16, 16, False, 0.25)
        assert lse.shape == (1, 2, 40)


def test_opcheck_band(device):
    q, k, v = _qkv(device, 1, 2, 1, 20, 20, 16)
    bm = torch.tensor([[True, False], [True, True]], device=device)[None, None]
    torch.library.opcheck(torch.ops.rewrite.block_sparse_attention_fwd.default,
                          (q, k, v, bm, None, 16, 16, True, 0.25, 3, 0, 1))
