"""nn.MultiheadAttention: expanded into in-projection -> SDPA -> out-projection, so every policy reaches it.

Each test checks the rewritten module against an untouched copy (exact policies within float tolerance) or
against the mixer applied by hand to the same projections (approximate policies).
"""
import copy

import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite.mixers.sliding_window import SlidingWindowAttention
from rewrite.passes.expand_mha import mha_merge_heads, mha_project

E, H, T = 32, 4, 24


class Block(nn.Module):
    """One MHA call, spelled the ways models call it."""

    def __init__(self, need_weights=False, return_weights=False, batch_first=True, kdim=None, cross=False,
                 causal=False, dropout=0.0, reshape_weights=False, **mha_kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim, dropout=dropout,
                                          **mha_kw)
        self.need_weights, self.return_weights, self.cross, self.causal = need_weights, return_weights, cross, causal
        self.reshape_weights = reshape_weights  # WavLM: the averaged weights broadcast to every head, then dropped

    def forward(self, x, memory=None, key_padding_mask=None, attn_mask=None):
        kv = memory if self.cross else x
        out, w = self.attn(x, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                           need_weights=self.need_weights, is_causal=self.causal)
        if self.reshape_weights:
            w = w[:, None].broadcast_to(w.shape[:1] + (H,) + w.shape[1:])
        return (out, w) if self.return_weights else out


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _padding(dtype=torch.bool):
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[1, T - 5:] = True                                  # True = ignore (MHA's convention)
    if dtype == torch.bool:
        return kpm
    return torch.zeros(2, T).masked_fill(kpm, float("-inf"))


def _causal_mask():
    return nn.Transformer.generate_square_subsequent_mask(T)


def _run(model, kw):
    with torch.no_grad():
        return model(**kw)


def _optimize(model, policy, kw):
    ref = copy.deepcopy(model)
    assert rewrite.optimize(model, policy, example_kwargs=kw) is model
    return ref


def _row(model):
    (row,) = rewrite.report(model).sites
    return row


def _close(a, b, tol=1e-5):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs error {err:.2e}"


CASES = {
    "plain": (dict(), lambda: dict(x=_x(2, T, E))),
    "seq_first": (dict(batch_first=False), lambda: dict(x=_x(T, 2, E))),
    "padding_bool": (dict(), lambda: dict(x=_x(2, T, E), key_padding_mask=_padding())),
    "padding_float": (dict(), lambda: dict(x=_x(2, T, E), key_padding_mask=_padding(torch.float32))),
    "mask_2d_bool": (dict(), lambda: dict(x=_x(2, T, E), attn_mask=_x(T, T, seed=3) > 1.0)),
    "mask_3d_float": (dict(), lambda: dict(x=_x(2, T, E), attn_mask=_x(2 * H, T, T, seed=3))),
    "causal_hint": (dict(causal=True), lambda: dict(x=_x(2, T, E), attn_mask=_causal_mask())),
    "causal_and_padding": (dict(causal=True), lambda: dict(x=_x(2, T, E), attn_mask=_causal_mask(),
                                                            key_padding_mask=_padding(torch.float32))),
    "unbatched": (dict(), lambda: dict(x=_x(T, E))),
    "cross_separate_weights": (dict(cross=True, kdim=16), lambda: dict(x=_x(2, T, E), memory=_x(2, 9, 16, seed=2))),
    "no_bias": (dict(bias=False), lambda: dict(x=_x(2, T, E))),
    "weights_unused": (dict(need_weights=True), lambda: dict(x=_x(2, T, E), key_padding_mask=_padding())),
    "weights_reshaped_unused": (dict(need_weights=True, reshape_weights=True), lambda: dict(x=_x(2, T, E))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_policy_keeps_values(case):
    """Expanded to an SDPA site: same values as nn.MultiheadAttention, nothing opaque left."""
    cfg, make = CASES[case]
    torch.manual_seed(0)
    model = Block(**cfg).eval()
    kw = make()
    ref = _optimize(model, "exact", kw)
    _close(_run(model, kw), _run(ref, kw))
    row = _row(model)
    assert row.name == "attn" and row.status == "kept" and "scaled_dot_product_attention" in row.reason
    assert row.heads == H and row.head_dim == E // H
    assert row.is_causal == (case == "causal_hint")
    if case == "weights_unused":
        assert "never read" in row.reason


def test_mixer_replaces_the_attention():
    """A mixer policy now rewrites the MHA site: the output is the mixer applied to MHA's own projections."""
    torch.manual_seed(0)
    model = Block().eval()
    kw = dict(x=_x(2, T, E), key_padding_mask=_padding())
    ref = _optimize(model, {"attn": rewrite.SlidingWindow(4)}, kw)
    row = _row(model)
    assert row.status == "rewritten" and row.action.startswith("SlidingWindow")
    a = ref.attn
    x = kw["x"].transpose(0, 1)
    with torch.no_grad():
        q, k, v, mask = mha_project(x, x, x, H, a.in_proj_weight, a.in_proj_bias, None, None, None,
                                    kw["key_padding_mask"], None, False, False)
        want = mha_merge_heads(SlidingWindowAttention(4)(q, k, v, attn_mask=mask), a.out_proj.weight,
                               a.out_proj.bias, True).transpose(0, 1)
    got = _run(model, kw)
    _close(got, want)
    assert (got - _run(ref, kw)).abs().max() > 1e-3      # it really is a different (banded) attention


def test_causal_hint_reaches_causal_mixers():
    torch.manual_seed(0)
    model = Block(causal=True).eval()
    kw = dict(x=_x(2, T, E), attn_mask=_causal_mask())
    _optimize(model, {"attn": rewrite.SlidingWindow(T)}, kw)   # a window spanning the sequence: exact
    row = _row(model)
    assert row.status == "rewritten" and row.is_causal
    ref = Block(causal=True).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    _close(_run(model, kw), _run(ref, kw))


@pytest.mark.parametrize("cfg,why", [
    (dict(need_weights=True, return_weights=True), "weights are read"),
    (dict(add_bias_kv=True), "bias_k"),
    (dict(add_zero_attn=True), "zero-attention"),
])
def test_left_opaque_with_a_reason(cfg, why):
    torch.manual_seed(0)
    model = Block(**cfg).eval()
    kw = dict(x=_x(2, T, E))
    ref = _optimize(model, {"attn": rewrite.SlidingWindow(4)}, kw)
    row = _row(model)
    assert row.status == "kept" and why in row.reason
    got, want = _run(model, kw), _run(ref, kw)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        _close(a, b)


def test_training_gradients_match():
    """Training mode (dropout 0): the expanded graph gives the same parameter gradients."""
    torch.manual_seed(0)
    model = Block(kdim=16, cross=True).train()
    kw = dict(x=_x(2, T, E), memory=_x(2, 9, 16, seed=2), key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    ref = _optimize(model, "exact", kw)
    w = _x(2, T, E, seed=5)
    (model(**kw) * w).sum().backward()
    (ref(**kw) * w).sum().backward()
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        _close(p.grad, r.grad)


def test_dropout_in_training_is_kept():
    """MHA's attention dropout becomes SDPA's dropout_p in training (and 0 in eval)."""
    model = Block(dropout=0.5).train()
    kw = dict(x=_x(2, T, E))
    _optimize(model, "exact", kw)
    torch.manual_seed(1)
    a = model(**kw)
    torch.manual_seed(2)
    b = model(**kw)
    assert (a - b).abs().max() > 1e-3                     # dropout draws differ
    model.eval()
    _close(_run(model, kw), _run(model, kw))


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2).eval()


def test_bare_transformer_encoder_in_eval_is_reached():
    """A bare nn.TransformerEncoder (its forward lives in torch.nn) in eval: without grad PyTorch would take the
    fused fast path (one opaque op per layer); the rewritten model runs the Python path, so both layers are
    sites, the exact policy keeps the values, a mixer applies, and the global fast-path flag is left as it was."""
    kw = dict(src=_x(2, T, E), src_key_padding_mask=_padding())
    model = _encoder()
    before = torch.backends.mha.get_fastpath_enabled()
    ref = _optimize(model, "exact", kw)
    assert [r.name for r in rewrite.report(model).sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    got, want = _run(model, kw), _run(ref, kw)
    _close(got[0], want[0])
    _close(got[1, :T - 5], want[1, :T - 5])            # the fast path leaves padded rows at 0; ours computes them
    assert torch.backends.mha.get_fastpath_enabled() == before

    model = _encoder()
    ref = _optimize(model, {"_default": rewrite.SlidingWindow(4)}, kw)
    assert all(r.status == "rewritten" for r in rewrite.report(model).sites)
    x2 = dict(src=_x(2, 40, E, seed=4), src_key_padding_mask=torch.zeros(2, 40, dtype=torch.bool))
    for batch in (kw, x2):                              # a new length recompiles, and still sees the sites
        assert (_run(model, batch)[0] - _run(ref, batch)[0]).abs().max() > 1e-3
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_a_model_dynamo_cannot_see_is_an_error():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        @torch._dynamo.disable
        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Hidden().eval()
    with pytest.raises(rewrite.RewriteError, match="captured no graph"):
        rewrite.optimize(model, "exact", example_kwargs=dict(x=_x(2, T, E)))
    assert model(_x(2, T, E)).shape == (2, T, E)          # left as it was


def test_backend_door_reports_the_fused_fast_path():
    """Through torch.compile(backend=...) the caller's eval/no-grad call takes the fused fast path: each layer is
    listed as a rejected region that says how to expose its attention, and the model runs as before."""
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False).eval()
    compiler = rewrite.backend("exact")
    x = _x(2, T, E)
    with torch.no_grad():
        _close(torch.compile(model, backend=compiler)(x), model(x))
    rejected = compiler.session.report.rejected
    assert [r.name for r in rejected] == ["layers.0", "layers.1"]
    assert all("set_fastpath_enabled(False)" in r.reason for r in rejected)


def test_export_capture_sees_the_same_sites():
    """torch.export runs the model too: with the fast path off it records the Python path, so both front ends
    name the same sites."""
    model = _encoder()
    x = _x(2, T, E)
    with torch.no_grad():
        names = {capture: [s.name for s in rewrite.find_attention(model, example_inputs=(x,), capture=capture)]
                 for capture in ("dynamo", "export")}
    assert names["dynamo"] == names["export"] == ["layers.0.self_attn", "layers.1.self_attn"]
