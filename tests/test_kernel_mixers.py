"""Mixers on the Triton kernels vs their PyTorch paths (``REWRITE_MIXER_KERNELS=1`` + ``TRITON_INTERPRET=1``).

Without CUDA the kernels run in Triton's interpreter: small shapes only, so the file stays fast.
"""
from kernel_env import DEVICE  # noqa: I001 - first: switches on Triton's interpreter without CUDA

import importlib

import pytest
import torch

import rewrite.kernels  # noqa: F401
from rewrite.kernels import interpret_mode
from rewrite.mixers.block_routing import BlockRoutingAttention
from rewrite.mixers.flow import FlowAttention
from rewrite.mixers.linear import LinearAttention
from rewrite.mixers.scatterbrain import ScatterbrainAttention
from rewrite.mixers.sliding_window import SlidingWindowAttention

_BS = importlib.import_module("rewrite.kernels.block_sparse_attention")
_LA = importlib.import_module("rewrite.kernels.linear_attention")


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the block-sparse and linear-attention kernel wrappers; ``dtypes`` records the dtypes
    of each call's q, k, v."""
    calls = {"block_sparse": 0, "linear": 0, "dtypes": []}
    bs, core = _BS.block_sparse_attention, _LA.linear_attention_core

    def bs_counted(*a, **k):
        calls["block_sparse"] += 1
        calls["dtypes"].append(tuple(t.dtype for t in a[:3]))
        return bs(*a, **k)

    def core_counted(*a, **k):
        calls["linear"] += 1
        calls["dtypes"].append(tuple(t.dtype for t in a[:3]))
        return core(*a, **k)

    monkeypatch.setattr(_BS, "block_sparse_attention", bs_counted)
    monkeypatch.setattr(_LA, "linear_attention_core", core_counted)
    return calls


def _qkv(B, Hq, Hkv, N, D, seed=0, grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def mk(h):
        return torch.randn(B, h, N, D, generator=g).to(DEVICE, dtype).requires_grad_(grad)

    return mk(Hq), mk(Hkv), mk(Hkv)


def _close(a, b, tol, what):
    err = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.2f}"


def both_ways(monkeypatch, module, q, k, v, grads=True, tol=5e-5, gtol=None, **kw):
    """The module's output (and q/k/v gradients) with the kernels off, then on; compared (gradients within
    ``gtol``, default ``4 * tol``)."""
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv("REWRITE_MIXER_KERNELS", mode)
        out = module(q, k, v, **kw)
        gr = None
        if grads:
            gr = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) * 0.5 + out.detach() * 0.1,
                                     allow_unused=True)
        results.append((out.detach(), gr))
    (ref, gref), (got, ggot) = results
    assert torch.isfinite(got).all()
    assert got.dtype == ref.dtype == q.dtype
    _close(got, ref, tol, "out")
    if grads:
        for name, a, b in zip("qkv", ggot, gref):
            assert a is not None and b is not None, f"d{name} missing"
            _close(a, b, tol * 4 if gtol is None else gtol, f"d{name}")
    return got


def _key_padding(B, N, cut, kind):
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool, device=DEVICE)
    keep[-1, ..., cut:] = False
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, torch.finfo(torch.float32).min)


# ------------------------------------------------------------------------------------------ SlidingWindow

SW_CASES = [
    # B, Hq, Hkv, N, window, sinks, causal, mask
    (1, 2, 2, 37, 9, 0, False, None),
    (2, 2, 1, 45, 10, 2, True, None),
    (2, 2, 2, 50, 12, 3, False, "bool"),
    (2, 4, 2, 41, 7, 1, False, "additive"),
    (1, 2, 2, 23, 64, 0, True, "additive"),       # window wider than the sequence
]


@pytest.mark.parametrize("B,Hq,Hkv,N,window,sinks,causal,mask", SW_CASES)
def test_sliding_window(monkeypatch, spy, B, Hq, Hkv, N, window, sinks, causal, mask):
    q, k, v = _qkv(B, Hq, Hkv, N, 16, seed=N)
    am = None if mask is None else _key_padding(B, N, N - 9, mask)
    module = SlidingWindowAttention(window, sinks, causal=causal)
    both_ways(monkeypatch, module, q, k, v, attn_mask=am, enable_gqa=Hq != Hkv)
    assert spy["block_sparse"] == 1


def test_sliding_window_falls_back(monkeypatch, spy):
    q, k, v = _qkv(1, 2, 2, 40, 16)
    module = SlidingWindowAttention(9, 1)
    full = torch.rand(1, 1, 40, 40, device=DEVICE) > 0.2          # a per-query mask: no [N, N] kernel mask
    full |= torch.eye(40, dtype=torch.bool, device=DEVICE)
    both_ways(monkeypatch, module, q, k, v, attn_mask=full)
    monkeypatch.setenv("REWRITE_MIXER_KERNELS", "1")
    module(q, k, v, dropout_p=0.1)                                 # dropout: no kernel
    assert spy["block_sparse"] == 0


# ------------------------------------------------------------------------------------------ BlockRouting

BR_CASES = [
    # B, Hq, Hkv, N, block, topk, causal, mask
    (1, 2, 2, 61, 16, 2, False, None),           # odd length: partial last block
    (2, 4, 2, 64, 16, 2, True, None),            # GQA, causal
    (2, 2, 2, 50, 16, 3, False, "additive"),     # HF-style finfo.min key padding
    (1, 2, 1, 45, 16, 1, True, "bool"),
    (1, 2, 2, 12, 16, 1, False, None),           # shorter than one block
]


@pytest.mark.parametrize("B,Hq,Hkv,N,block,topk,causal,mask", BR_CASES)
def test_block_routing(monkeypatch, spy, B, Hq, Hkv, N, block, topk, causal, mask):
    q, k, v = _qkv(B, Hq, Hkv, N, 16, seed=N + 1)
    am = None if mask is None else _key_padding(B, N, N - 7, mask)
    module = BlockRoutingAttention(block, topk, causal=causal)
    both_ways(monkeypatch, module, q, k, v, attn_mask=am, enable_gqa=Hq != Hkv)
    assert spy["block_sparse"] == 1


def test_block_routing_per_head(monkeypatch, spy):
    q, k, v = _qkv(1, 4, 2, 64, 16, seed=3)
    module = BlockRoutingAttention(16, 2, per_head=True)
    with torch.no_grad():
        module.fit(q, k, v)
    module.head_topk = torch.tensor([1, 3])          # two different counts
    both_ways(monkeypatch, module, q, k, v, enable_gqa=True)
    assert spy["block_sparse"] == 1


@pytest.mark.parametrize("kw", [dict(summary=True), dict(sinks=2), dict(block=24), dict(grid=(4, 4))])
def test_block_routing_falls_back(monkeypatch, spy, kw):
    kw = dict(kw)
    block = kw.pop("block", 16)
    n = 16 if "grid" in kw else 40
    q, k, v = _qkv(1, 2, 2, n, 16, seed=5)
    module = BlockRoutingAttention(block, 2, **kw)
    both_ways(monkeypatch, module, q, k, v, tol=1e-6)
    assert spy["block_sparse"] == 0


# ------------------------------------------------------------------------------------------ Linear / Flow

LIN_CASES = [
    # feature, B, Hq, Hkv, N, causal, mask
    ("elu", 1, 2, 2, 37, False, None),
    ("elu", 2, 4, 2, 33, True, None),            # GQA expanded in the wrapper, causal
    ("relu", 2, 2, 2, 29, False, "additive"),    # padded keys: features weighted in PyTorch, identity kernel
    ("favor", 1, 2, 2, 40, True, None),
    ("favor", 2, 2, 1, 21, False, "bool"),
]


@pytest.mark.parametrize("feature,B,Hq,Hkv,N,causal,mask", LIN_CASES)
def test_linear(monkeypatch, spy, feature, B, Hq, Hkv, N, causal, mask):
    q, k, v = _qkv(B, Hq, Hkv, N, 16, seed=N + 2)
    am = None if mask is None else _key_padding(B, N, N - 5, mask)
    module = LinearAttention(feature, features=32, head_dim=16, seed=1)
    both_ways(monkeypatch, module, q, k, v, tol=1e-4, attn_mask=am, is_causal=causal, enable_gqa=Hq != Hkv)
    assert spy["linear"] == 1


def test_linear_decoding_falls_back(monkeypatch, spy):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 2, 10, 16, generator=g).to(DEVICE) for _ in range(2))
    i = torch.arange(3, device=DEVICE)[:, None] + 7
    mask = torch.arange(10, device=DEVICE)[None, :] <= i           # bottom-right causal: a KV cache
    both_ways(monkeypatch, LinearAttention("elu"), q, k, v, grads=False, tol=1e-6, attn_mask=mask)
    assert spy["linear"] == 0


@pytest.mark.parametrize("B,H,N,mask", [(1, 2, 37, None), (2, 2, 30, "additive"), (2, 4, 45, "bool")])
def test_flow_causal(monkeypatch, spy, B, H, N, mask):
    q, k, v = _qkv(B, H, H, N, 16, seed=N + 3)
    am = None if mask is None else _key_padding(B, N, N - 6, mask)
    both_ways(monkeypatch, FlowAttention(), q, k, v, tol=1e-4, attn_mask=am, is_causal=True)
    assert spy["linear"] == 1


def test_flow_bidirectional_stays_pytorch(monkeypatch, spy):
    q, k, v = _qkv(1, 2, 2, 20, 16)
    both_ways(monkeypatch, FlowAttention(), q, k, v, tol=1e-6)
    assert spy["linear"] == 0


# ------------------------------------------------------------------------------------------ Scatterbrain

SB_CASES = [
    # B, H, N, window, causal, mask
    (2, 2, 48, 8, False, "bool"),
    (2, 2, 40, 9, True, "additive"),
    (1, 2, 37, 16, False, None),
]


@pytest.mark.parametrize("B,H,N,window,causal,mask", SB_CASES)
def test_scatterbrain(monkeypatch, spy, B, H, N, window, causal, mask):
    """The low-rank sums on the linear-attention kernel (fp32: measured max error ~1.5e-6 of the output scale)."""
    q, k, v = _qkv(B, H, H, N, 16, seed=N + 4)
    am = None if mask is None else _key_padding(B, N, N - 6, mask)
    module = ScatterbrainAttention(window, features=32, head_dim=16, seed=2)
    both_ways(monkeypatch, module, q, k, v, tol=2e-5, attn_mask=am, is_causal=causal)
    assert spy["linear"] == 1


def test_scatterbrain_decode_step(monkeypatch, spy):
    """Nq < Nk with a padding-only mask: the band looks back, the low-rank sums cover every key (kernel)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 3, 16, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(2, 2, 20, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    module = ScatterbrainAttention(6, features=16, head_dim=16)
    both_ways(monkeypatch, module, q, k, v, tol=2e-5, attn_mask=_key_padding(2, 20, 17, "bool"))
    assert spy["linear"] == 1


def test_scatterbrain_falls_back(monkeypatch, spy):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 2, 12, 16, generator=g).to(DEVICE) for _ in range(2))
    module = ScatterbrainAttention(4, features=16, head_dim=16)
    i = torch.arange(3, device=DEVICE)[:, None] + 9
    decode = torch.arange(12, device=DEVICE)[None, :] <= i          # bottom-right causal: a KV cache
    both_ways(monkeypatch, module, q, k, v, grads=False, tol=1e-6, attn_mask=decode)
    assert spy["linear"] == 0


# ------------------------------------------------------------------------------------------ half precision
# bf16 inputs reach the kernels as bf16 (not upcast). Kernel vs PyTorch path (both bf16 in, bf16 out), max abs
# error over the output (or gradient) scale, measured on these cases and on seeds 0..2 of similar ones: outputs
# <= 7e-3, gradients <= 1.2e-2.

BF16 = dict(tol=1.5e-2, gtol=3e-2)


def _all_bf16(spy):
    assert spy["dtypes"] and all(d == (torch.bfloat16,) * 3 for d in spy["dtypes"]), spy["dtypes"]


def test_sliding_window_bf16(monkeypatch, spy):
    q, k, v = _qkv(2, 4, 2, 48, 16, seed=7, dtype=torch.bfloat16)
    am = _key_padding(2, 48, 40, "bool")
    both_ways(monkeypatch, SlidingWindowAttention(9, 1), q, k, v, attn_mask=am, enable_gqa=True, **BF16)
    assert spy["block_sparse"] == 1
    _all_bf16(spy)


def test_block_routing_bf16(monkeypatch, spy):
    q, k, v = _qkv(1, 2, 2, 48, 16, seed=8, dtype=torch.bfloat16)
    am = _key_padding(1, 48, 41, "additive")
    both_ways(monkeypatch, BlockRoutingAttention(16, 2, causal=True), q, k, v, attn_mask=am, **BF16)
    assert spy["block_sparse"] == 1
    _all_bf16(spy)


@pytest.mark.parametrize("causal,mask", [(True, None), (False, "additive")])
def test_linear_bf16(monkeypatch, spy, causal, mask):
    q, k, v = _qkv(2, 2, 2, 40, 16, seed=9, dtype=torch.bfloat16)
    am = None if mask is None else _key_padding(2, 40, 33, mask)
    both_ways(monkeypatch, LinearAttention("elu"), q, k, v, attn_mask=am, is_causal=causal, **BF16)
    assert spy["linear"] == 1
    _all_bf16(spy)


def test_favor_fp16_features_stay_fp32(monkeypatch, spy):
    """fp16 would flush small exponential features to zero: FAVOR+ features reach the kernel in fp32."""
    from rewrite.mixers._layout import kernel_dtype
    assert kernel_dtype(torch.float16) == torch.float16 and kernel_dtype(torch.bfloat16) == torch.bfloat16
    assert kernel_dtype(torch.float16, fp16=False) == torch.float32 == kernel_dtype(torch.float32)
    assert kernel_dtype(torch.float64) == torch.float64
    q, k, v = _qkv(1, 2, 2, 24, 16, seed=10, grad=False, dtype=torch.float16)
    both_ways(monkeypatch, LinearAttention("favor", features=16, head_dim=16), q, k, v, grads=False, tol=1e-3)
    assert spy["dtypes"] == [(torch.float32,) * 3]


def test_switch_off_and_cpu_default(monkeypatch):
    from rewrite.kernels._common import mixer_kernels
    cpu = torch.zeros(1)
    monkeypatch.setenv("REWRITE_MIXER_KERNELS", "0")
    assert not mixer_kernels(cpu)
    monkeypatch.delenv("REWRITE_MIXER_KERNELS", raising=False)
    assert not mixer_kernels(cpu)                      # CPU tensors: PyTorch unless asked for
    monkeypatch.setenv("REWRITE_MIXER_KERNELS", "1")
    assert mixer_kernels(cpu) == interpret_mode()
