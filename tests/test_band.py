"""Banded (local) attention computed without an N x N product (issue 15): Longformer's sliding chunks, and other
spellings of the same band, are read from their index structure (passes/band.py) and run as one exact site on
the banded kernel; spellings that look alike but are not a band are left as they were."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import rewrite
from rewrite.capture import stop_enclosing_traces
from rewrite.mixers.sliding_window import banded_attention
from rewrite.passes.lower import with_band


class UnfoldBand(nn.Module):
    """Local attention by ``unfold``: keys and values padded by ``w`` each side and unfolded into a window per
    query, the padded slots masked with −∞ from a pattern of positions, probabilities times the unfolded values."""

    def __init__(self, w: int = 3, heads: int = 2, width: int = 16, circular: bool = False, scale_after=False):
        super().__init__()
        self.w, self.h, self.circular, self.scale_after = w, heads, circular, scale_after
        self.qkv = nn.Linear(width, 3 * width)

    def windows(self, t):                                        # [b, h, n, d] -> [b, h, n, d, 2w+1]
        if self.circular:   # keys wrap around the ends: a ring, not a band
            t = torch.cat([t[:, :, -self.w:], t, t[:, :, :self.w]], dim=2)
        else:
            t = F.pad(t, (0, 0, self.w, self.w))
        return t.unfold(2, 2 * self.w + 1, 1)

    def forward(self, x, key_bias):
        b, n, e = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, e // self.h).permute(2, 0, 3, 1, 4)
        if self.scale_after:   # the scale on the scores, after the window product
            scores = torch.einsum("bhnd,bhndw->bhnw", q, self.windows(k)) * (e // self.h) ** -0.5
        else:
            scores = torch.einsum("bhnd,bhndw->bhnw", q * (e // self.h) ** -0.5, self.windows(k))
        scores = scores + self.windows(key_bias[:, None, :, None]).squeeze(3)   # the keys' padding bias
        if not self.circular:
            pos = torch.arange(n, device=x.device)[:, None] + torch.arange(2 * self.w + 1, device=x.device) - self.w
            scores = scores.masked_fill((pos < 0) | (pos >= n), float("-inf"))
        probs = scores.softmax(-1)
        out = torch.einsum("bhnw,bhndw->bhnd", probs, self.windows(v))
        return out.transpose(1, 2).reshape(b, n, e)


def _bias(b, n, gen):
    bias = torch.zeros(b, n)
    bias[0, n // 2:] = torch.finfo(torch.float32).min   # a padded row
    bias[-1] = torch.where(torch.rand(n, generator=gen) < 0.3, torch.finfo(torch.float32).min, 0.0)
    return bias


@pytest.mark.parametrize("scale_after", [False, True])
def test_local_attention_by_unfold_is_one_banded_site(scale_after):
    gen = torch.Generator().manual_seed(0)
    model = UnfoldBand(scale_after=scale_after).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 12, 16, generator=gen)
    rewrite.optimize(model, "exact", example_inputs=(x, _bias(2, 12, gen)))
    row = model.rewrite_report.sites[0]
    assert (row.status, row.action) == ("rewritten", "Exact(kernel='sdpa')"), row.reason
    assert row.flops_before == 2 * (2 * 2 * 2 * 12 * 7 * 8)   # what the model computed: q·k and p·v over 7 slots
    with torch.no_grad():
        y = torch.randn(2, 12, 16, generator=gen)
        for bias in (_bias(2, 12, gen), torch.zeros(2, 12)):
            torch.testing.assert_close(model(y, bias), ref(y, bias), rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(w=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]), n=st.integers(2, 20), batch=st.integers(1, 3),
       circular=st.booleans(), scale_after=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 99))
def test_unfold_windows_of_any_size_are_read_exactly(w, heads, n, batch, circular, scale_after, dtype, seed):
    """Windows wider than the sequence, one head or several, the scale before or after the window product, a ring
    instead of a band: a band is rewritten and equal to the original on other inputs; a ring is left as it was."""
    gen = torch.Generator().manual_seed(seed)
    model = UnfoldBand(w=w, heads=heads, width=8 * heads, circular=circular and n > w,
                       scale_after=scale_after).to(dtype).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(batch, n, 8 * heads, generator=gen, dtype=dtype)
    rewrite.optimize(model, "exact", example_inputs=(x, _bias(batch, n, gen).to(dtype)))
    statuses = {r.status for r in model.rewrite_report.sites}
    assert statuses == ({"kept", "rejected"} & statuses if model.circular else {"rewritten"}), \
        [r.reason for r in model.rewrite_report.sites]
    with torch.no_grad():
        y, bias = torch.randn(batch, n, 8 * heads, generator=gen, dtype=dtype), _bias(batch, n, gen).to(dtype)
        torch.testing.assert_close(model(y, bias), ref(y, bias), rtol=1e-5, atol=1e-5)


def test_a_ring_of_keys_is_not_a_band():
    model = UnfoldBand(circular=True).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 12, 16)
    rewrite.optimize(model, "exact", example_inputs=(x, torch.zeros(2, 12)))
    assert all(r.status != "rewritten" for r in model.rewrite_report.sites)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.zeros(2, 12)), ref(x, torch.zeros(2, 12)))


def _longformer(layers=2, window=8):
    from transformers import LongformerConfig, LongformerModel
    cfg = LongformerConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
                           attention_window=window, vocab_size=99, max_position_embeddings=120)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return LongformerModel(cfg).eval()


def _batch(b, n, gen):
    ids = torch.randint(0, 99, (b, n), generator=gen)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, n // 3:] = 0
    if b > 2:
        mask[2] = (torch.rand(n, generator=gen) < 0.6).long()
        mask[2, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("policy", ["exact", {"_default": rewrite.SlidingWindow(window=17)}, {"_default": None}])
def test_longformer_local_attention_is_rewritten_and_exact(policy):
    """Every layer's sliding-chunk attention becomes one site. Exact runs the banded kernel; another action gets
    the band in its mask (a sliding window as wide as the band then computes the same attention); a policy that
    leaves the site gets the exact band too (the chunks are gone from the graph), and the report says so."""
    gen = torch.Generator().manual_seed(1)
    model = _longformer()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, policy, example_kwargs=_batch(2, 16, gen))
    rows = model.rewrite_report.sites     # the layers share one captured graph: one site serves them all
    assert rows and all(r.status == "rewritten" for r in rows), [r.reason for r in rows]
    assert all(("banded kernel" in r.reason) == (policy == {"_default": None}) for r in rows)
    with torch.no_grad():
        for n in (16, 40):
            batch = _batch(2, n, gen)
            torch.testing.assert_close(model(**batch).last_hidden_state, ref(**batch).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
        if policy != {"_default": rewrite.SlidingWindow(window=17)}:   # (the mixer's SDPA takes its math path)
            assert not _softmax_ops(model, batch) and _softmax_ops(ref, batch)   # the chunks are gone


def test_longformer_stays_exact_and_banded_at_every_batch_and_length():
    """Dynamo would make the next shape's graph symbolic, where the chunk arithmetic breaks the graph inside the
    attention: the band's module gets static entries of its own, and enclosing symbolic graphs stop at its call
    (Dynamo inlines a module's ``forward`` past its entry unless the module has a hook). At every shape the output
    equals the original's and no chunk product runs; a copy keeps that; each band module holds one such hook."""
    gen = torch.Generator().manual_seed(2)
    model = _longformer()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_kwargs=_batch(2, 16, gen))
    with torch.no_grad():
        for b, n in [(2, 40), (3, 16), (1, 64), (4, 24), (5, 100), (2, 16)]:
            batch = _batch(b, n, gen)
            torch.testing.assert_close(model(**batch).last_hidden_state, ref(**batch).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
            assert not _softmax_ops(model, batch), (b, n)
    report = model.rewrite_report
    assert [note.split(":")[0] for note in report.capture_notes] == ["encoder.layer.0.attention.self",
                                                                     "encoder.layer.1.attention.self"]
    assert not report.fallbacks
    twin = copy.deepcopy(model)
    with torch.no_grad():
        batch = _batch(2, 48, gen)
        torch.testing.assert_close(twin(**batch).last_hidden_state, ref(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        assert not _softmax_ops(twin, batch)     # (its first call compiled no graph through the band's module)
    assert twin.rewrite_report.capture_notes == report.capture_notes
    rewrite.optimize(model, "exact", example_kwargs=_batch(2, 16, gen))   # undoes the first capture, captures anew
    for m in (model, twin):
        assert sorted(name for name, module in m.named_modules() for hook in module._forward_pre_hooks.values()
                      if hook is stop_enclosing_traces) == ["encoder.layer.0.attention.self",
                                                            "encoder.layer.1.attention.self"]


def test_led_generates_without_a_graph_per_token():
    """Only the band's module compiles static shapes: the decoder keeps Dynamo's dynamic shapes while it
    generates (a static graph per step would recompile at every token)."""
    from transformers import LEDConfig, LEDForConditionalGeneration
    cfg = LEDConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, attention_window=8,
                    vocab_size=99, max_encoder_position_embeddings=128, max_decoder_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LEDForConditionalGeneration(cfg).eval()
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 99, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    rewrite.optimize(model, "exact", example_kwargs={"input_ids": ids, "attention_mask": mask,
                                                     "decoder_input_ids": torch.ones(2, 3, dtype=torch.long)})
    report = model.rewrite_report
    with torch.no_grad():
        for tokens in (8, 24):   # the second call decodes 16 lengths the first did not
            graphs = report.graphs
            kw = dict(attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    assert any(r.status == "rewritten" and "longformer_self_attn" in r.name for r in report.sites)
    assert report.graphs - graphs <= 2, report.graphs - graphs   # not one per new length


def test_finding_a_band_leaves_the_model_as_it_was():
    """``find_attention`` runs a capture it never installs: reading a band there gives no module an entry."""
    model = _longformer()
    rows = rewrite.find_attention(model, example_kwargs=_batch(2, 16, torch.Generator().manual_seed(0)))
    assert rows and all(r.status == "matched" for r in rows)
    assert not [name for name, m in model.named_modules() if m.__dict__.get("_compiled_call_impl") is not None]
    assert not [name for name, m in model.named_modules() if m._forward_pre_hooks]


def test_longformer_in_bfloat16():
    gen = torch.Generator().manual_seed(3)
    model = _longformer().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_kwargs=_batch(2, 16, gen))
    assert all(r.status == "rewritten" for r in model.rewrite_report.sites)
    with torch.no_grad():
        batch = _batch(3, 40, gen)
        torch.testing.assert_close(model(**batch).last_hidden_state, ref(**batch).last_hidden_state,
                                   rtol=2e-2, atol=2e-2)
        assert not _softmax_ops(model, batch)


def _softmax_ops(model, batch) -> list:
    """The original's chunk products (``einsum``) a call runs: none once every band runs on the banded kernel (whose
    SDPA calls may take the math path, so softmax ops are no sign)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**batch)
    return [e.name for e in prof.events() if e.name == "aten::einsum"]


def _softmax_reference(q, k, v, mask, left, right):
    n = q.shape[-2]
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    s = s.masked_fill((j < i - left) | (j > i + right), float("-inf"))
    return s.softmax(-1) @ v


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 90), left=st.integers(0, 40), right=st.integers(0, 40),
       mask=st.sampled_from(["none", "keys", "keys_bool", "per_query", "dead_rows"]), seed=st.integers(0, 2 ** 16))
def test_banded_attention_matches_the_softmax_over_the_band(n, left, right, mask, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for _ in range(3))
    m = None
    if mask == "keys":
        m = torch.where(torch.rand(2, 1, 1, n, generator=gen) < 0.3, float("-inf"), 0.0)
    elif mask == "keys_bool":
        m = torch.rand(2, 1, 1, n, generator=gen) < 0.7
    elif mask == "per_query":
        m = torch.randn(2, 3, n, n, generator=gen)
    elif mask == "dead_rows":   # every key of some queries' bands removed: the softmax is NaN there
        m = torch.zeros(2, 1, n, n)
        m[:, :, : n // 2] = float("-inf")
    want = _softmax_reference(q, k, v, m, left, right)
    got = banded_attention(q, k, v, attn_mask=m, band=(left, right))
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)
    folded = with_band(m, q, k, left, right)                 # the band in the mask, for every other target
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=folded)
    alive = ~torch.isnan(want)
    torch.testing.assert_close(dense[alive], want[alive], rtol=1e-5, atol=1e-5)


def test_a_band_too_large_to_read_is_left_as_it_was(monkeypatch):
    from rewrite.passes import band
    monkeypatch.setattr(band, "MAX_READ", 100)     # the example's scores have 2 x 2 x 12 x 7 = 336 elements
    model = UnfoldBand().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 12, 16)
    rewrite.optimize(model, "exact", example_inputs=(x, torch.zeros(2, 12)))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.zeros(2, 12)), ref(x, torch.zeros(2, 12)))


class ScatteredBias(nn.Module):
    """A bias scattered into zeros in place (``scatter_add_``, as GLM-5's next-token text model builds an index
    bias) and added to the scores: the in-place write is no assembly op, so this is no band. Reading it once looped
    for ever."""

    def forward(self, q, k, v, idx, weight):
        bias = torch.zeros(*q.shape[:-1], k.shape[-2])
        bias.scatter_add_(-1, idx, weight)
        return (q @ k.transpose(-1, -2) + bias).softmax(-1) @ v


def test_scores_with_a_bias_scattered_in_place_are_read_and_left():
    import signal

    def too_slow(*_):
        raise TimeoutError("reading the scores' assembly did not finish")
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(120)
    try:
        q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
        idx, weight = torch.randint(0, 10, (2, 3, 10, 4)), torch.randn(2, 3, 10, 4)
        model = ScatteredBias()
        rewrite.optimize(model, "exact", example_inputs=(q, k, v, idx, weight))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"]   # an additive bias, as any other
    with torch.no_grad():
        torch.testing.assert_close(model(q, k, v, idx, weight), ScatteredBias()(q, k, v, idx, weight))
