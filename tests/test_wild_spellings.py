"""Spellings from the wild (issue 15): attention whose intermediates are also copied somewhere nobody reads."""
import copy

import pytest
import torch
import torch.nn as nn

import rewrite


class DeadCopies(nn.Module):
    """x-transformers keeps clones of the scores and probabilities in an intermediates record the model's output
    never uses: in the captured graph those clones have no users at all."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.kept = []

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * 8 ** -0.5
        scores_copy = scores.clone()          # noqa: F841 - dead in the graph
        probs = scores.softmax(dim=-1)
        probs_copy = probs.detach().clone()   # noqa: F841 - dead in the graph
        return (probs @ v).transpose(1, 2).reshape(b, n, 32)


def _ops(model, x):
    """The ATen ops a call runs, each named with its caller (``aten::clone<aten::reshape``)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return [f"{e.name}<{e.cpu_parent.name if e.cpu_parent is not None else ''}" for e in prof.events()]


def test_dead_copies_of_scores_and_probabilities_do_not_block_the_rewrite():
    model = DeadCopies().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 16, 32)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten", row.reason
    with torch.no_grad():
        y = torch.randn(3, 20, 32)
        torch.testing.assert_close(model(y), ref(y), rtol=1e-5, atol=1e-5)
    ops = _ops(model, y)
    assert any(op.startswith("aten::scaled_dot_product_attention<") for op in ops)
    dead_copies = [op for op in ops if op.startswith("aten::clone<") and "reshape" not in op]
    assert not dead_copies and not any(op.startswith("aten::_softmax<") for op in ops), ops  # gone with the site


def test_a_copy_that_is_returned_is_a_real_user():
    class Returned(DeadCopies):
        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            probs = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(dim=-1)
            return probs @ v, probs.clone()

    model = Returned().eval()
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 16, 32),))
    assert not model.rewrite_report.sites or model.rewrite_report.sites[0].status != "rewritten"
    assert any("used elsewhere" in r.reason for r in model.rewrite_report.rejected)


@pytest.mark.parametrize("layers", ["Encoder", "Decoder"])
def test_x_transformers(layers):
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    model = xt.TransformerWrapper(num_tokens=100, max_seq_len=64,
                                  attn_layers=getattr(xt, layers)(dim=64, depth=2, heads=4)).eval()
    ref = copy.deepcopy(model)
    x = torch.randint(0, 100, (2, 16))
    rewrite.optimize(model, "exact", example_inputs=(x,))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"] * 2
    with torch.no_grad():
        y = torch.randint(0, 100, (2, 23))
        torch.testing.assert_close(model(y), ref(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [2.0, -3])
def test_a_number_added_to_the_scores_is_softmax_invariant(shift):
    """`scores + 2.0` once raised inside the pipeline and the site vanished from the report."""
    class Shifted(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + shift, -1) @ v

    x = torch.randn(1, 2, 8, 16)
    model = Shifted()
    rewrite.optimize(model, "exact", example_inputs=(x, x, x))
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten" and row.mask == "none" and not model.rewrite_report.errors
    y = torch.randn(2, 2, 11, 16)
    torch.testing.assert_close(model(y, y, y), Shifted()(y, y, y), rtol=1e-5, atol=1e-5)


def test_an_internal_error_keeps_the_site_in_the_report(monkeypatch):
    """Never silent: were the lowering to fail inside rewrite, the site is listed (kept, with the error), the
    graph runs as captured, and the error is in the report."""
    import sys
    pipeline = sys.modules["rewrite.pipeline"]

    def broken(*args, **kwargs):
        raise AttributeError("simulated")

    monkeypatch.setattr(pipeline, "build_call", broken)
    model = DeadCopies().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 16, 32)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    rep = model.rewrite_report
    assert [r.status for r in rep.sites] == ["kept"] and "simulated" in rep.sites[0].reason
    assert rep.errors and "Internal errors" in rep.table()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


class ZeroedAfterSoftmax(nn.Module):
    """CPM-Ant's spelling: the mask comparison written twice, −∞ before the softmax and 0 after it."""

    def __init__(self, same_condition=True):
        super().__init__()
        self.qkv, self.same = nn.Linear(32, 96), same_condition

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(mask.view(b, 1, n, n) == torch.tensor(False),
                                                             float("-inf"))
        p = torch.softmax(s, dim=-1)
        after = mask.view(b, 1, n, n) == torch.tensor(False) if self.same else mask.view(b, 1, n, n).flip(-1) == 0
        p = p.masked_fill(after, 0.0)
        return (p @ v).transpose(1, 2).reshape(b, n, 32)


def test_probabilities_zeroed_after_the_softmax():
    model = ZeroedAfterSoftmax().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 10, 32)
    rewrite.optimize(model, "exact", example_inputs=(x, torch.ones(2, 10, 10, dtype=torch.bool)))
    assert model.rewrite_report.sites[0].status == "rewritten", model.rewrite_report.table()
    mask = torch.rand(2, 10, 10) > 0.4
    mask[0, 3] = False  # a query that sees nothing: 0 in the original (NaN, then zeroed)
    with torch.no_grad():
        out = model(x, mask)
        torch.testing.assert_close(out, ref(x, mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0, 3], torch.zeros(32)) or not torch.isnan(out).any()


def test_probabilities_zeroed_under_another_condition_are_not_attention():
    model = ZeroedAfterSoftmax(same_condition=False).eval()
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 10, 32), torch.ones(2, 10, 10, dtype=torch.bool)))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites)
    assert any("zeroed after the softmax" in r.reason for r in model.rewrite_report.rejected)


def test_cpmant():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.CpmAntConfig(vocab_size=200, hidden_size=32, num_attention_heads=4, dim_head=8, dim_ff=64,
                          num_hidden_layers=2, prompt_length=4, segment_types=4, position_bias_num_buckets=32,
                          position_bias_max_distance=64)
    model = tf.CpmAntModel(cfg).eval()
    ref = copy.deepcopy(model)
    ids = torch.randint(10, 200, (2, 12))
    rewrite.optimize(model, "exact", example_kwargs={"input_ids": ids})
    rows = model.rewrite_report.sites
    assert rows and all(r.status == "rewritten" for r in rows), model.rewrite_report.table()
    with torch.no_grad():
        ids = torch.randint(10, 200, (3, 9))
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_export_graphs_spell_masked_softmax_as_safe_softmax():
    """``torch.export`` writes a masked softmax as ``aten._safe_softmax`` (0 for a row of −∞): found, and exact
    for rows that see no key."""
    class Masked(nn.Module):
        def forward(self, q, k, v, mask):
            s = (q @ k.transpose(-2, -1) / 4).masked_fill(~mask, float("-inf"))
            return torch.ops.aten._safe_softmax(s, -1) @ v

    q = torch.randn(2, 2, 8, 16)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    sites = rewrite.find_attention(Masked(), example_inputs=(q, q, q, mask), capture="export")
    assert [s.status for s in sites] == ["matched"]
    model = Masked()
    rewrite.optimize(model, "exact", example_inputs=(q, q, q, mask))
    assert model.rewrite_report.sites[0].status == "rewritten", model.rewrite_report.table()
    mask = torch.rand(2, 1, 8, 8) > 0.4
    mask[0, 0, 2] = False
    out = model(q, q, q, mask)
    torch.testing.assert_close(out, Masked()(q, q, q, mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))


class ShapeReader(nn.Module):
    """XLM's spelling: the padding mask is shaped like the scores with ``expand_as(scores)``, then the scores
    are filled in place."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5
        hide = (mask == 0).view(b, 1, 1, n).expand_as(scores)
        scores.masked_fill_(hide, torch.finfo(scores.dtype).min)
        return (scores.float().softmax(-1).type_as(scores) @ v).transpose(1, 2).reshape(b, n, 32)


def test_a_user_of_the_scores_shape_is_not_a_user_of_their_values():
    model = ShapeReader().eval()
    ref = copy.deepcopy(model)
    x, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    rewrite.optimize(model, "exact", example_inputs=(x, mask))
    assert model.rewrite_report.sites[0].status == "rewritten", model.rewrite_report.table()
    mask = torch.randint(0, 2, (3, 13))
    y = torch.randn(3, 13, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(y, mask), ref(y, mask), rtol=1e-5, atol=1e-5)
        ops = _ops(_Bound(model, mask), y)
    # the scores product is gone: the only matmul-like ops left are the projection and SDPA
    assert not any(op.startswith(("aten::matmul<Torch", "aten::bmm<aten::matmul")) for op in ops), ops


class _Bound(nn.Module):
    def __init__(self, model, mask):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, x):
        return self.model(x, self.mask)


@pytest.mark.parametrize("family", ["XLM", "Flaubert"])
def test_xlm_and_flaubert(family):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(tf, f"{family}Config")(vocab_size=100, emb_dim=64, n_layers=2, n_heads=4)
    model = getattr(tf, f"{family}Model")(cfg).eval()
    ref = copy.deepcopy(model)
    ids, mask = torch.randint(5, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    rewrite.optimize(model, "exact", example_kwargs={"input_ids": ids, "attention_mask": mask})
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"] * 2, model.rewrite_report.table()
    ids, mask = torch.randint(5, 100, (3, 15)), torch.randint(0, 2, (3, 15))
    mask[:, 0] = 1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   ref(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=1e-4, atol=1e-4)


class EinsumMQA(nn.Module):
    """Multi-query attention by einsum with a head-less key and value."""

    def forward(self, q, k, v):
        s = torch.einsum("bhid,bjd->bhij", q, k) * 0.25
        return torch.einsum("bhij,bjd->bhid", s.softmax(-1), v)


def test_multi_query_einsum_with_a_head_less_key():
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    model = EinsumMQA()
    rewrite.optimize(model, "exact", example_inputs=(q, k, v))
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten" and row.heads == 4 and row.kv_heads == 1, model.rewrite_report.table()
    q, k, v = torch.randn(3, 4, 11, 16), torch.randn(3, 11, 16), torch.randn(3, 11, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(q, k, v), EinsumMQA()(q, k, v), rtol=1e-5, atol=1e-5)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(q, k, v)
    ops = [f"{e.name}<{e.cpu_parent.name if e.cpu_parent is not None else ''}" for e in prof.events()]
    assert any(op.startswith("aten::scaled_dot_product_attention<") for op in ops)
    assert not any(op.startswith("aten::_softmax<Torch") or op.startswith("aten::softmax<Torch") for op in ops), ops
