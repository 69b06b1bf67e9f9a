"""Spectral: against explicit DFT / DCT matrices (1-D, 2-D, padded segments), handler, pipeline
(training-needed: the error is reported, never hidden)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rewrite
from rewrite.actions import Decline, RewriteError
from rewrite.mixers.spectral import SpectralMixer
from rewrite.actions import build_target
from mixer_helpers import assert_like_sdpa, bert_end_to_end, make_call, make_site  # noqa: E402

MIN = torch.finfo(torch.float32).min


def dft_filter(n, keep):
    """Explicit complex DFT matrix, keep frequencies min(f, n - f) < keep, explicit inverse: a real [n, n]."""
    f = torch.arange(n, dtype=torch.float64)
    fmat = torch.exp(-2j * math.pi * f[:, None] * f[None, :] / n)
    low = (torch.minimum(f, n - f) < keep).to(torch.complex128)
    return (fmat.conj().T / n @ (low[:, None] * fmat)).real


def dct_filter(n, keep):
    """Explicit orthonormal DCT-II matrix, keep coefficients < keep, inverse by its transpose."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64))
    return d.T @ ((i < keep).double()[:, None] * d)


def filt(kind, n, keep):
    return (dft_filter if kind == "fft" else dct_filter)(n, keep)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 33), st.integers(1, 20),
       st.sampled_from(["fft", "dct"]))
def test_1d_against_explicit_matrices(b, heads, n, keep, kind):
    hq, hkv = heads
    torch.manual_seed(n + keep)
    q, k, v = torch.randn(b, hq, n, 4), torch.randn(b, hkv, n, 4), torch.randn(b, hkv, n, 5)
    out = SpectralMixer(kind, keep)(q, k, v, enable_gqa=True)
    ref = (filt(kind, n, keep) @ v.double().repeat_interleave(hq // hkv, 1)).float()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2), st.integers(1, 4), st.sampled_from(["fft", "dct"]))
def test_2d_against_explicit_matrices(gh, gw, prefix, keep, kind):
    n = prefix + gh * gw
    torch.manual_seed(n + keep)
    v = torch.randn(2, 3, n, 4, dtype=torch.float64)
    out = SpectralMixer(kind, keep, (gh, gw), prefix)(v, v, v)
    img = v[:, :, prefix:].reshape(2, 3, gh, gw, 4)
    mixed = torch.einsum("yY,xX,bhYXc->bhyxc", filt(kind, gh, keep), filt(kind, gw, keep), img)
    # (rfft2 keeps the half spectrum along W; for a real input that is the separable full-DFT filter)
    ref = torch.cat([v.mean(2, keepdim=True).expand(2, 3, prefix, 4), mixed.reshape(2, 3, gh * gw, 4)], 2)
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("kind", ["fft", "dct"])
def test_padding_transforms_only_the_valid_tokens(kind):
    torch.manual_seed(0)
    n, keep = 12, 3
    v = torch.randn(3, 2, n, 4, dtype=torch.float64)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, -4:] = False            # right padding
    valid[2, :5] = False             # left padding
    mask = torch.zeros(3, 1, n, n, dtype=torch.float64).masked_fill(~valid[:, None, None, :], MIN)
    out = SpectralMixer(kind, keep)(v, v, v, attn_mask=mask)
    torch.testing.assert_close(out[0], filt(kind, n, keep) @ v[0])
    torch.testing.assert_close(out[1, :, :8], filt(kind, 8, keep) @ v[1, :, :8])
    torch.testing.assert_close(out[1, :, 8:], v[1, :, :8].mean(1, keepdim=True).expand(2, 4, 4))
    torch.testing.assert_close(out[2, :, 5:], filt(kind, 7, keep) @ v[2, :, 5:])
    gaps = valid.clone()
    gaps[0, 3] = False
    mixer = SpectralMixer(kind, keep)
    with pytest.warns(RuntimeWarning, match="contiguous"):       # served exactly, never an error
        out = mixer(v, v, v, attn_mask=gaps[:, None, None, :])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(v, v, v, attn_mask=gaps[:, None, None, :]))
    assert mixer.exact_calls == 1


@pytest.mark.parametrize("mask, words", [
    (torch.ones(6, 6, dtype=torch.bool).tril(), "no causal form"),
    (torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.3, "general"),
])
def test_a_mask_it_cannot_honour_at_run_time_runs_exact_attention_with_a_warning(mask, words):
    v = torch.randn(1, 1, 6, 2)
    mixer = SpectralMixer("fft", 2)
    with pytest.warns(RuntimeWarning, match=words):
        out = mixer(v, v, v, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(v, v, v, attn_mask=mask))
    q = torch.randn(1, 1, 2, 2)                                   # Nq != Nk (a decoding step): exact too
    torch.testing.assert_close(mixer(q, v, v), F.scaled_dot_product_attention(q, v, v))
    assert mixer.exact_calls == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", [None, (3, 4)])
def test_output_shape_and_dtype_match_sdpa(dtype, grid):
    for kind in ("fft", "dct"):
        assert_like_sdpa(SpectralMixer(kind, 3, grid), dtype, dv=8)


def test_keep_everything_is_identity():
    v = torch.randn(1, 2, 9, 3, dtype=torch.float64)
    for kind in ("fft", "dct"):
        torch.testing.assert_close(SpectralMixer(kind, 9)(v, v, v), v)


def test_json_validation_flops_and_docs():
    import sympy
    from rewrite import cost
    from rewrite.mixers import spectral
    for act in (rewrite.Spectral(), rewrite.Spectral(kind="dct", keep=4, layout="1d")):
        assert rewrite.action_from_json(act.to_json()) == act
    assert rewrite.Spectral.exact is False
    for bad, word in (({"kind": "wavelet"}, "'wavelet'"), ({"keep": 0}, "0"), ({"dims": 0}, "0")):
        with pytest.raises(RewriteError, match=word):
            rewrite.Spectral(**bad)
    assert "raining needed" in spectral.__doc__ and "raining needed" in rewrite.Spectral.__doc__
    f = rewrite.Spectral().flops()
    assert isinstance(f, sympy.Expr) and f.free_symbols <= set(cost.SYMBOLS.values())
    sizes = dict(B=1, H=12, N=4096, Nk=4096, d=64, dv=64)
    assert cost.evaluate(f, **sizes) < cost.evaluate(cost.exact_flops(), **sizes) / 10


def test_handler():
    act = rewrite.Spectral()
    out = build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16), True), make_site(mask="causal", is_causal=True))
    assert isinstance(out, Decline) and "causal" in out
    out = build_target(act, make_call((2, 4, 1, 16), (2, 4, 9, 16)), make_site((2, 4, 1, 16), (2, 4, 9, 16)))
    assert isinstance(out, Decline) and "Nq != Nk" in out
    assert isinstance(build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16)), make_site(mask="alibi")), Decline)
    assert isinstance(build_target(rewrite.Spectral(layout="2d"), make_call((2, 4, 8, 16), (2, 4, 8, 16)), make_site()),
                      Decline)
    mod = build_target(act, make_call((2, 4, 8, 16), (2, 4, 8, 16)), make_site(mask="additive"))
    assert isinstance(mod, SpectralMixer) and mod.grid is None
    grid_site = make_site((2, 4, 17, 16), grid=(4, 4), prefix_tokens=1)
    mod = build_target(act, make_call((2, 4, 17, 16), (2, 4, 17, 16)), grid_site)
    assert isinstance(mod, SpectralMixer) and mod.grid == (4, 4)


def test_pipeline_tiny_bert_reports_the_error():
    report = bert_end_to_end(rewrite.Spectral(keep=4), exact_expected=False)
    assert all(row.error > 0.05 for row in report.sites)          # training-needed: large, and reported
