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


@pytest.mark.parametrize("family", [pytest.param("XLM", marks=pytest.mark.slow), "Flaubert"])
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


class BlockLocal(nn.Module):
    """LongT5's local attention: blocks of queries against their own and both neighbouring key blocks, by
    ellipsis einsum on ``[b, blocks, n, h, d]`` tensors, a per-block mask and a bias added in place."""

    def __init__(self, block: int = 4):
        super().__init__()
        self.block = block

    def forward(self, q, k, v, keep, bias):
        b, n, h, d = q.shape
        blocks = n // self.block

        def split(t):
            return t.view(b, blocks, self.block, *t.shape[2:])

        def three(t):  # each block with its neighbours: [b, blocks, 3 * block, ...]
            t = nn.functional.pad(t, (0,) * (2 * (t.dim() - 2)) + (1, 1))
            return torch.cat([t[:, i:i + blocks] for i in range(3)], dim=2)
        q, k, v, keep = split(q), three(split(k)), three(split(v)), three(split(keep))
        scores = torch.einsum("...qhd,...khd->...hqk", q, k)
        scores += bias + torch.where(keep[:, :, None, None, :] > 0, 0.0, -1e10)
        probs = scores.float().softmax(-1).type_as(scores)
        return torch.einsum("...hqk,...khd->...qhd", probs, v).reshape(b, n, h, d)


def test_block_local_attention_by_ellipsis_einsum_runs_one_fused_call():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 4, 8) for _ in range(3))
    keep = torch.ones(2, 16)
    keep[1, 11:] = 0
    bias = torch.randn(1, 1, 4, 4, 12)
    model = BlockLocal()
    rewrite.optimize(model, "exact", example_inputs=(q, k, v, keep, bias))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    q, k, v = (torch.randn(3, 24, 4, 8) for _ in range(3))
    keep = (torch.rand(3, 24) > 0.3).float()
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = model(q, k, v, keep, bias)
    torch.testing.assert_close(out, BlockLocal()(q, k, v, keep, bias), rtol=1e-5, atol=1e-5)
    names = {e.name for e in prof.events()}
    assert "aten::scaled_dot_product_attention" in names and "aten::_scaled_dot_product_attention_math" not in names


@pytest.mark.parametrize("mask_rank", [0, 2, 3, 4, 5])
def test_sdpa_over_several_batch_dims_matches_sdpa(mask_rank):
    from rewrite.pipeline import sdpa_leading_dims_flattened
    q, k, v = torch.randn(2, 3, 4, 5, 8), torch.randn(2, 3, 4, 7, 8), torch.randn(2, 3, 4, 7, 6)
    mask = {0: None, 2: torch.randn(5, 7), 3: torch.randn(4, 5, 7), 4: torch.randn(3, 1, 5, 7),
            5: torch.randn(2, 3, 4, 1, 7)}[mask_rank]
    torch.testing.assert_close(sdpa_leading_dims_flattened(q, k, v, attn_mask=mask),
                               nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    gqa = sdpa_leading_dims_flattened(q, k[:, :, :2], v[:, :, :2], attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(gqa, nn.functional.scaled_dot_product_attention(q, k[:, :, :2], v[:, :, :2],
                                                                               attn_mask=mask, enable_gqa=True))


class GlobalLocal(nn.Module):
    """Pegasus-X's attention: each block of queries against the global keys and its own block's keys, one softmax
    over both, the probabilities' column slices multiplied by their own values and summed."""

    def __init__(self, block: int = 4, local_first: bool = False, tile: bool = True):
        super().__init__()
        self.block, self.local_first, self.tile = block, local_first, tile

    def forward(self, q, k, v, gk, gv, keep):
        b, h, n, d = q.shape
        g, blocks = gk.shape[-2], n // self.block
        q, k, v = (t.view(b, h, blocks, self.block, d) for t in (q, k, v))
        to_global = torch.einsum("BHNKF,BHGF->BHNKG", q, gk)
        to_local = torch.einsum("BHNKF,BHNXF->BHNKX", q, k)
        pad = (0, g) if self.local_first else (g, 0)
        mask = nn.functional.pad(torch.where(keep > 0, 0.0, -1e9).view(b, blocks, self.block), pad, value=0.0)
        parts = [to_local, to_global] if self.local_first else [to_global, to_local]
        probs = (torch.cat(parts, dim=-1) / d ** 0.5 + mask[:, None, :, None, :]).softmax(-1)
        first = g if not self.local_first else self.block
        rest = first if self.tile else first + 1
        values = [v, gv.unsqueeze(2)] if self.local_first else [gv.unsqueeze(2), v]
        out = probs[..., :first] @ values[0] + probs[..., rest:] @ values[1][..., rest - first:, :]
        return out.reshape(b, h, n, d)


@pytest.mark.parametrize("local_first", [False, True])
@pytest.mark.parametrize("globals_", [1, 3])
def test_one_query_against_global_and_block_keys_is_one_sdpa(local_first, globals_):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 8) for _ in range(3))
    gk, gv = torch.randn(2, 2, globals_, 8), torch.randn(2, 2, globals_, 8)
    keep = torch.ones(2, 12)
    keep[1, 9:] = 0
    model = GlobalLocal(local_first=local_first)
    rewrite.optimize(model, "exact", example_inputs=(q, k, v, gk, gv, keep))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    q, k, v = (torch.randn(3, 2, 16, 8) for _ in range(3))
    gk, gv = torch.randn(3, 2, globals_, 8), torch.randn(3, 2, globals_, 8)
    keep = (torch.rand(3, 16) > 0.3).float()
    with torch.no_grad():
        out = model(q, k, v, gk, gv, keep)  # a new length: recaptured and checked here
        with torch.profiler.profile() as prof:
            model(q, k, v, gk, gv, keep)
    torch.testing.assert_close(out, GlobalLocal(local_first=local_first)(q, k, v, gk, gv, keep), rtol=1e-5, atol=1e-5)
    softmax = [e for e in prof.events() if e.name in ("aten::_softmax", "aten::softmax")]
    assert softmax == [] and any(e.name == "aten::scaled_dot_product_attention" for e in prof.events())


def test_column_slices_that_skip_a_column_are_not_one_product():
    torch.manual_seed(0)
    args = (*(torch.randn(2, 2, 12, 8) for _ in range(3)), torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8),
            torch.ones(2, 12))
    model = GlobalLocal(tile=False)
    with torch.no_grad():
        ref = model(*args)
    rewrite.optimize(model, "exact", example_inputs=args)
    assert [r.status for r in model.rewrite_report.sites] != ["rewritten"]
    with torch.no_grad():
        torch.testing.assert_close(model(*args), ref)


class RoutedBlock(nn.Module):
    """Attention, then a router's softmax over experts (not attention: no score product, no value product)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv, self.router, self.experts = nn.Linear(d, 3 * d), nn.Linear(d, 4), nn.Linear(d, 4 * d)

    def forward(self, x):
        gate = self.router(x).softmax(-1)                                  # [b, n, experts], from the block input
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + (q @ k.transpose(-1, -2) / 4).softmax(-1) @ v
        return (self.experts(x).view(*x.shape[:-1], 4, -1) * gate[..., None]).sum(-2)


def test_other_softmax_ops_are_named_in_the_report_and_left_alone():
    torch.manual_seed(0)
    model, x = RoutedBlock(), torch.randn(2, 6, 16)
    with torch.no_grad():
        ref = model(x)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    report = model.rewrite_report
    assert [r.status for r in report.sites] == ["rewritten"]
    assert report.other_softmax == {"": 1} and "1 other softmax op(s), not attention-like" in report.table()
    assert report.to_json()["other_softmax"] == {"": 1}
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


# --- attention sinks: extra keys whose probabilities are dropped (gpt-oss) -----------------------------------
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: few examples, no shrinking (each one optimizes a model): a failure is reported as drawn
_PROPERTY = settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                     phases=(Phase.explicit, Phase.generate))
DTYPES = (torch.float32, torch.bfloat16)


def _close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


def _padding(b, n, gen, all_visible=False):
    """A [B, N] 0/1 mask with random padding, one sequence that sees no key at all, one that sees every key."""
    if all_visible:
        return torch.ones(b, n, dtype=torch.long)
    mask = (torch.rand(b, n, generator=gen) > 0.4).long()
    mask[0], mask[-1] = 0, 1
    return mask


class Sinks(nn.Module):
    """gpt-oss's spelling, with its variations: learned sink logits per head concatenated to the masked scores
    (after or before them), optionally a row max subtracted, softmax over both, the sink columns dropped."""

    def __init__(self, heads=2, kv_heads=2, d=8, count=1, first=False, stabilise="max", mask="float",
                 causal=False):
        super().__init__()
        self.h, self.kv_h, self.d, self.count, self.first = heads, kv_heads, d, count, first
        self.stabilise, self.mask, self.causal = stabilise, mask, causal
        self.q, self.kv = nn.Linear(16, heads * d), nn.Linear(16, 2 * kv_heads * d)
        self.sinks = nn.Parameter(torch.randn(heads, count))

    def forward(self, x, padding):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_h, self.d).permute(2, 0, 3, 1, 4)
        k, v = k.repeat_interleave(self.h // self.kv_h, 1), v.repeat_interleave(self.h // self.kv_h, 1)
        s = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5
        visible = padding[:, None, None, :].bool()
        if self.causal:
            visible = visible & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if self.mask == "float":
            s = s + torch.zeros(visible.shape, dtype=s.dtype).masked_fill(~visible, torch.finfo(s.dtype).min)
        elif self.mask == "fill_inf":
            s = s.masked_fill(~visible, float("-inf"))
        elif self.mask == "fill_finite":
            s = s.masked_fill(~visible, -1e9)
        cols = self.sinks.reshape(1, -1, 1, self.count).expand(b, -1, n, -1)
        c = torch.cat([cols, s] if self.first else [s, cols], dim=-1)
        if self.stabilise == "max":
            c = c - c.max(dim=-1, keepdim=True).values
        elif self.stabilise == "amax":
            c = c - c.amax(-1, keepdim=True).detach()
        p = torch.softmax(c.float(), dim=-1).to(v.dtype)
        p = p[..., self.count:] if self.first else p[..., :-self.count]
        return (p @ v).transpose(1, 2).reshape(b, n, self.h * self.d)


@st.composite
def sink_spellings(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(heads=heads, kv_heads=draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])),
                count=draw(st.sampled_from([1, 2])), first=draw(st.booleans()),
                stabilise=draw(st.sampled_from(["max", "amax", "none"])),
                mask=draw(st.sampled_from(["none", "float", "fill_inf", "fill_finite"])), causal=draw(st.booleans()))


@_PROPERTY
@given(cfg=sink_spellings(), dtype=st.sampled_from(DTYPES))
def test_sinks_are_an_extra_key_with_zero_value(cfg, dtype):
    """Exact as one more key (score: the sink logit, value: 0) under random padding and rows with no real key
    (the sink takes all the mass: the output is 0, as in the original)."""
    torch.manual_seed(0)
    model = Sinks(**cfg).to(dtype).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16, dtype=dtype),
                                                     _padding(2, 6, gen, all_visible=True)))
    rows = model.rewrite_report.sites
    assert [r.status for r in rows] == ["rewritten"], model.rewrite_report.table()
    assert not rows[0].is_causal  # the sink is seen by every query
    with torch.no_grad():
        for n in (5, 11):
            x, padding = torch.randn(3, n, 16, generator=gen).to(dtype), _padding(3, n, gen)
            out = model(x, padding)
            _close(out, ref(x, padding), dtype)
            if cfg["mask"] != "none" and rows[0].status == "rewritten":
                assert torch.equal(out[0], torch.zeros_like(out[0]))  # no real key: all mass on the sink


def test_rows_with_every_real_key_filled_beside_a_sink_keep_their_share():
    """A finite fill (-1e4) on every real key of a row beside sinks: the original gives the real keys
    ``n e^fill / (n e^fill + e^sink)`` of the mass, spread evenly; with a sink far below the fill (head 0) that is
    all of it, with ``sink = fill + 2`` (head 1) ``sigmoid(log n - 2)``, with a sink far above it (head 2) none. A causal fill
    of the same value after it (x-transformers' decoder) keeps every row's diagonal. The sink column is sized by
    reading the scores' shape (x-transformers' ``repeat(sink, 'h -> b h i 1', b=sim.shape[0], i=sim.shape[2])``):
    a shape read is no product (it is a graph value once sizes are symbolic: bench_xtransformers head_learned_sink)."""
    class FilledBesideSinks(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 36)
            self.sinks = nn.Parameter(torch.tensor([-2e4, -1e4 + 2, 3.0]))

        def forward(self, x, padding):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 3, -1).permute(2, 0, 3, 1, 4)
            s = (q @ k.transpose(-2, -1)).masked_fill(padding[:, None, None, :] == 0, -1e4)
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e4)
            s = torch.cat([self.sinks.view(1, 3, 1, 1).expand(s.shape[0], -1, s.shape[2], 1), s], -1)
            return (s.softmax(-1)[..., 1:] @ v).transpose(1, 2).reshape(b, n, -1)

    torch.manual_seed(0)
    model = FilledBesideSinks().eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16), _padding(2, 6, gen, all_visible=True)))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x, padding = torch.randn(3, 6, 16, generator=gen), _padding(3, 6, gen)
        out, want = model(x, padding), ref(x, padding)
        _close(out, want, torch.float32)
        assert want[0, :, :4].abs().sum() > 0 and want[0, :, 8:].abs().sum() == 0  # heads 0 and 2: all, none
        x, padding = torch.randn(3, 9, 16, generator=gen), _padding(3, 9, gen)  # a recapture, sizes symbolic
        _close(model(x, padding), ref(x, padding), torch.float32)
    assert not model.rewrite_report.rejected, model.rewrite_report.table()
    assert {r.status for r in model.rewrite_report.sites} == {"rewritten"}, model.rewrite_report.table()


class SinkScaling(nn.Module):
    """GraniteSWA's spelling of a sink: plain attention, its output scaled by ``sigmoid(logsumexp(s) - sink)``
    (the share of the mass the sink would leave to the real keys), with its variations: the scaling and the
    log-sum-exp in float32 or not, ``keepdim`` or an ``unsqueeze``, the masks of :class:`Sinks`."""

    def __init__(self, heads=2, mask="float", causal=False, keepdim=False, fp32=True, returned=False):
        super().__init__()
        self.h, self.mask, self.causal, self.keepdim, self.fp32 = heads, mask, causal, keepdim, fp32
        self.returned = returned
        self.qkv = nn.Linear(16, 3 * heads * 8)
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, 8).permute(2, 0, 3, 1, 4)
        s = torch.matmul(q, k.transpose(2, 3)) * 8 ** -0.5
        visible = padding[:, None, None, :].bool()
        if self.causal:
            visible = visible & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if self.mask == "float":
            s = s + torch.zeros(visible.shape, dtype=s.dtype).masked_fill(~visible, torch.finfo(s.dtype).min)
        elif self.mask == "fill_finite":
            s = s.masked_fill(~visible, -1e9)
        lse = torch.logsumexp(s.float() if self.fp32 else s, dim=-1, keepdim=self.keepdim)
        sink = self.sinks.view(1, -1, 1, 1) if self.keepdim else self.sinks.view(1, -1, 1)
        scale = (lse - sink).sigmoid()
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(p, v) * (scale if self.keepdim else scale.unsqueeze(-1)).to(q.dtype)
        out = out.transpose(1, 2).reshape(b, n, self.h * 8)
        return (out, p) if self.returned else out


@_PROPERTY
@given(heads=st.sampled_from([1, 3]), mask=st.sampled_from(["none", "float", "fill_finite"]),
       causal=st.booleans(), keepdim=st.booleans(), fp32=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_a_sink_applied_after_the_value_product_is_an_extra_key(heads, mask, causal, keepdim, fp32, dtype):
    """``(softmax(s) @ v) * sigmoid(logsumexp(s) - t)`` is attention with one more key of score ``t`` and value 0:
    exact under random padding, and a row with no visible key gives 0 (all the mass on the sink) as before."""
    torch.manual_seed(0)
    model = SinkScaling(heads, mask, causal, keepdim, fp32).to(dtype).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16, dtype=dtype),
                                                     _padding(2, 6, gen, all_visible=True)))
    rows = model.rewrite_report.sites
    assert [r.status for r in rows] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        for n in (5, 11):
            x, padding = torch.randn(3, n, 16, generator=gen).to(dtype), _padding(3, n, gen)
            out, want = model(x, padding), ref(x, padding)
            _close(out, want, dtype)
            if mask != "none":
                assert torch.equal(out[0], torch.zeros_like(out[0])) and want[0].abs().max() < 1e-6
    assert {r.status for r in model.rewrite_report.sites} == {"rewritten"}, model.rewrite_report.table()


def test_sink_scaling_whose_probabilities_are_returned_keeps_them():
    """The probabilities a caller reads are the real keys' softmax, without the sink: returned, they are a real
    user, so the site is kept with that reason (as any site whose probabilities are returned) and both outputs are
    unchanged."""
    model = SinkScaling(returned=True).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    x, padding = torch.randn(2, 6, 16), _padding(2, 6, gen)
    rewrite.optimize(model, "exact", example_inputs=(x, padding))
    rows = model.rewrite_report.rejected
    assert len(rows) == 1 and "used elsewhere" in rows[0].reason, model.rewrite_report.table()
    with torch.no_grad():
        for got, want in zip(model(x, padding), ref(x, padding)):
            torch.testing.assert_close(got, want)


class SplitSinks(nn.Module):
    """Sinks in the ``(b·h, n, d)`` bmm layout: the scores split to ``[B, H, N, N]`` for the mask, then either merged
    back before the concatenation and softmax (``where="merged"``) or concatenated and soft-maxed in the split
    layout, the probabilities merged back for ``bmm`` (``where="split"``)."""

    def __init__(self, heads=2, d=8, where="merged", fill="finfo"):
        super().__init__()
        self.h, self.d, self.where, self.fill = heads, d, where, fill
        self.qkv = nn.Linear(16, 3 * heads * d)
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4).reshape(3, b * self.h, n, self.d)
        s = (torch.bmm(q, k.transpose(1, 2)) * self.d ** -0.5).view(b, self.h, n, n)
        hide = padding[:, None, None, :] == 0
        s = s.masked_fill(hide, float("-inf")) if self.fill == "inf" else s + hide.to(s.dtype) * torch.finfo(s.dtype).min
        col = self.sinks.view(1, self.h, 1, 1).expand(b, self.h, n, 1)
        if self.where == "merged":
            p = torch.cat([s.view(b * self.h, n, n), col.reshape(b * self.h, n, 1)], -1).softmax(-1)[..., :-1]
        else:
            p = torch.cat([s, col], -1).softmax(-1)[..., :-1].reshape(b * self.h, n, n)
        return torch.bmm(p, v).view(b, self.h, n, self.d).transpose(1, 2).reshape(b, n, -1)


@_PROPERTY
@given(heads=st.sampled_from([1, 2, 4]), where=st.sampled_from(["merged", "split"]),
       fill=st.sampled_from(["finfo", "inf"]), dtype=st.sampled_from(DTYPES))
def test_sinks_in_the_split_batch_layout(heads, where, fill, dtype):
    torch.manual_seed(0)
    model = SplitSinks(heads=heads, where=where, fill=fill).to(dtype).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16, dtype=dtype), _padding(2, 6, gen)))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        for n in (5, 11):
            x, padding = torch.randn(3, n, 16, generator=gen).to(dtype), _padding(3, n, gen)
            _close(model(x, padding), ref(x, padding), dtype)


def test_probabilities_of_the_extra_columns_reaching_the_values_are_not_sinks():
    class Leaky(nn.Module):
        def forward(self, q, k, v, sink):
            s = torch.cat([q @ k.transpose(-1, -2), sink.expand(*q.shape[:-1], 1)], -1)
            p = s.softmax(-1)
            return p[..., 1:] @ v  # drops the first real key, keeps the sink's probability

    q, sink = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 1, 1)
    model = Leaky()
    rewrite.optimize(model, "exact", example_inputs=(q, q, q, sink))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites)
    assert any("real keys" in r.reason for r in model.rewrite_report.rejected), model.rewrite_report.table()


def _gpt_oss():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GptOssConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                          attn_implementation="eager")
    return tf.GptOssModel(cfg).eval()


@pytest.mark.slow
def test_gpt_oss():
    model = _gpt_oss()
    ref = copy.deepcopy(model)
    ids, mask = torch.randint(0, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    rewrite.optimize(model, "exact", example_kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False})
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"] * 2, model.rewrite_report.table()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (7, 15):  # shorter and longer than the sliding window; left padding makes rows with no key
            ids, mask = torch.randint(0, 100, (3, n), generator=gen), torch.ones(3, n, dtype=torch.long)
            mask[1, :4], mask[2] = 0, (torch.rand(n, generator=gen) > 0.3).long()
            kw = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
            torch.testing.assert_close(model(**kw).last_hidden_state, ref(**kw).last_hidden_state,
                                       rtol=1e-4, atol=1e-4)


# --- probabilities on the right of the value product (channels first: timm CoAtNet, EfficientViT) ----------
class ChannelsFirst(nn.Module):
    """timm's ``Attention2d`` / EfficientViT-M's spelling on ``[B, C, H, W]`` maps: q, k, v are ``[B, h, d, N]``,
    the scores ``qᵀ k``, the output ``v pᵀ`` (``[B, h, d, N]``), with a learned bias over the positions."""

    def __init__(self, dim=16, heads=2, bias=True, spelling="transpose", matmul="op", grid=4):
        super().__init__()
        self.h, self.d, self.spelling, self.matmul = heads, dim // heads, spelling, matmul
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.bias = nn.Parameter(torch.randn(heads, grid * grid, grid * grid)) if bias else None

    def forward(self, x):
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(x).view(b, self.h, self.d * 3, -1).chunk(3, dim=2)
        attn = (q.transpose(-2, -1) @ k) * self.d ** -0.5
        if self.bias is not None:
            attn = attn + self.bias
        attn = attn.softmax(dim=-1)
        pt = {"transpose": lambda p: p.transpose(-2, -1), "mT": lambda p: p.mT,
              "permute": lambda p: p.permute(0, 1, 3, 2), "none": lambda p: p}[self.spelling](attn)
        out = v @ pt if self.matmul == "op" else torch.matmul(v, pt)
        return out.view(b, -1, hh, ww)


@_PROPERTY
@given(heads=st.sampled_from([1, 2, 4]), bias=st.booleans(), spelling=st.sampled_from(["transpose", "mT", "permute"]),
       matmul=st.sampled_from(["op", "fn"]), dtype=st.sampled_from(DTYPES))
def test_values_on_the_left_of_the_transposed_probabilities(heads, bias, spelling, matmul, dtype):
    torch.manual_seed(0)
    model = ChannelsFirst(heads=heads, bias=bias, spelling=spelling, matmul=matmul).to(dtype).eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 16, 4, 4, dtype=dtype),))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x = torch.randn(3, 16, 4, 4, dtype=dtype)
        _close(model(x), ref(x), dtype)


def test_values_on_the_left_count_their_value_width_in_the_flops():
    """``v @ pᵀ`` with v ``[B, h, dv, N]``: the report's FLOPs use dv = v's second-last axis, not its tokens."""
    class WideValues(nn.Module):   # EfficientViT-M: values wider than queries and keys
        def forward(self, q, k, v):
            return v @ (q.transpose(-2, -1) @ k * 0.5).softmax(-1).transpose(-2, -1)

    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 16), torch.randn(2, 3, 12, 16)
    model = WideValues()
    rewrite.optimize(model, "exact", example_inputs=(q, k, v))
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten", model.rewrite_report.table()
    want = rewrite.cost.evaluate(rewrite.cost.exact_flops(), B=6, H=1, N=16, Nk=16, d=4, dv=12)
    assert row.flops_before == pytest.approx(want), (row.flops_before, want)
    torch.testing.assert_close(model(q, k, v), WideValues()(q, k, v))


def test_values_times_untransposed_probabilities_sum_over_queries_and_stay():
    model = ChannelsFirst(spelling="none", bias=False).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 16, 4, 4)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites)
    assert any("sums over queries" in r.reason for r in model.rewrite_report.rejected), model.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


# --- view round trips between the softmax and the value product (GroupViT, (b·h, n, d) bmm code) ----------
class RoundTrips(nn.Module):
    """Probabilities in the ``(b·h, n, n)`` layout pass through reshapes before ``bmm``: round trips that give
    the same shape back are the identity; ``"other"`` regroups them so one value map serves every head."""

    def __init__(self, trips=("split_merge",), heads=2, d=8, masked=False):
        super().__init__()
        self.trips, self.h, self.d, self.masked = trips, heads, d, masked
        self.qkv = nn.Linear(heads * d, 3 * heads * d)

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4).reshape(3, b * self.h, n, self.d)
        s = torch.bmm(q, k.transpose(1, 2)) / self.d ** 0.5
        if self.masked:  # GroupViT's mask: split the batch dims, add, merge back
            hide = torch.zeros(b, 1, n, n, dtype=s.dtype).masked_fill(~padding[:, None, None, :].bool(), torch.finfo(s.dtype).min)
            s = (s.view(b, self.h, n, n) + hide).view(b * self.h, n, n)
        p = s.softmax(-1)
        for trip in self.trips:
            if trip == "split_merge":
                p = p.view(b, self.h, n, n).view(b * self.h, n, n)
            elif trip == "unsqueeze_squeeze":
                p = p.unsqueeze(1).squeeze(1)
            elif trip == "flatten_unflatten":
                p = p.flatten(1).unflatten(1, (n, n))
            elif trip == "reshape":
                p = p.reshape(b * self.h, n * n).reshape(-1, n, n)
        if "other" in self.trips:
            out = torch.bmm(p.reshape(b, self.h * n, n), v.view(b, self.h, n, self.d)[:, 0])
        else:
            out = torch.bmm(p, v)
        return out.view(b, self.h, n, self.d).transpose(1, 2).reshape(b, n, self.h * self.d)


@_PROPERTY
@given(trips=st.lists(st.sampled_from(["split_merge", "unsqueeze_squeeze", "flatten_unflatten", "reshape"]),
                      min_size=1, max_size=3), heads=st.sampled_from([1, 2, 3]), masked=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_reshape_round_trips_of_the_probabilities_are_the_identity(trips, heads, masked, dtype):
    torch.manual_seed(0)
    model = RoundTrips(tuple(trips), heads=heads, masked=masked).to(dtype).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, heads * 8, dtype=dtype),
                                                     _padding(2, 6, gen, all_visible=True)))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x, padding = torch.randn(3, 9, heads * 8, generator=gen).to(dtype), _padding(3, 9, gen)
        _close(model(x, padding), ref(x, padding), dtype)


def test_a_reshape_into_another_layout_is_not_a_round_trip():
    model = RoundTrips(("other",)).eval()
    ref = copy.deepcopy(model)
    x, padding = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.long)
    rewrite.optimize(model, "exact", example_inputs=(x, padding))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites)
    assert any("another layout" in r.reason for r in model.rewrite_report.rejected), model.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(model(x, padding), ref(x, padding))


# --- two score streams, one softmax (LiLT) -------------------------------------------------------------------
class TwoStreams(nn.Module):
    """``softmax(q1 k1ᵀ/√d1 + q2 k2ᵀ/√d2 + mask) @ v``; ``shared``: a second softmax for the other stream's
    values from the same scaled products, as LiLT computes its text and layout streams; ``both``: each stream's
    values read the one softmax (``p @ v1``, ``p @ v2``)."""

    def __init__(self, d1=8, d2=4, heads=2, order="12", outer_scale=False, mask=True, shared=False, combine="add",
                 both=False):
        super().__init__()
        self.both = both
        self.h, self.d1, self.d2, self.order = heads, d1, d2, order
        self.outer, self.mask, self.shared, self.combine = outer_scale, mask, shared, combine
        self.p1, self.p2 = nn.Linear(16, 3 * heads * d1), nn.Linear(16, 3 * heads * d2)

    def _heads(self, t, d):
        b, n, _ = t.shape
        return t.view(b, n, 3, self.h, d).permute(2, 0, 3, 1, 4)

    def forward(self, x, padding):
        q1, k1, v1 = self._heads(self.p1(x), self.d1)
        q2, k2, v2 = self._heads(self.p2(x), self.d2)
        s1 = torch.matmul(q1, k1.transpose(-1, -2)) / self.d1 ** 0.5
        s2 = (q2 @ k2.transpose(-1, -2)) * self.d2 ** -0.5
        hide = torch.zeros(padding.shape[0], 1, 1, padding.shape[1], dtype=x.dtype).masked_fill(
            ~padding[:, None, None, :].bool(), torch.finfo(x.dtype).min)  # HF's: -1e4 is coarse in bf16
        outs = []
        for order in ([self.order, self.order[::-1]] if self.shared else [self.order]):
            if self.combine == "mul":
                s = s1 * s2
            else:
                s = s1 + s2 if order == "12" else s2 + s1
            if self.outer:
                s = s * 0.5
            if self.mask:
                s = s + hide
            p = s.softmax(-1)
            if self.both:  # one softmax, each stream's value product reading it
                outs.extend([p @ v1, torch.matmul(p, v2)])
            else:
                outs.append(p @ (v1 if order == "12" else v2))
        return torch.cat(outs, -1).transpose(1, 2).flatten(2)


@_PROPERTY
@given(d2=st.sampled_from([4, 8]), heads=st.sampled_from([1, 2]), order=st.sampled_from(["12", "21"]),
       outer=st.booleans(), mask=st.booleans(), values=st.sampled_from(["one", "shared", "both"]),
       dtype=st.sampled_from(DTYPES))
def test_two_score_streams_are_one_product_over_concatenated_features(d2, heads, order, outer, mask, values, dtype):
    torch.manual_seed(0)
    model = TwoStreams(d2=d2, heads=heads, order=order, outer_scale=outer, mask=mask, shared=values == "shared",
                       both=values == "both").to(dtype).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16, dtype=dtype),
                                                     _padding(2, 6, gen, all_visible=True)))
    rows = model.rewrite_report.sites
    assert rows and all(r.status == "rewritten" for r in rows), model.rewrite_report.table()
    with torch.no_grad():
        x, padding = torch.randn(3, 9, 16, generator=gen).to(dtype), _padding(3, 9, gen)
        _close(model(x, padding), ref(x, padding), dtype)
        ops = _ops(_Bound(model, padding), x)
    # the score products and softmaxes of the model are gone (SDPA's math kernel runs its own on CPU)
    assert not any(op.startswith(("aten::matmul<Torch", "aten::softmax<Torch", "aten::_softmax<Torch")) for op in ops), ops


def test_one_softmax_read_by_two_value_products_is_one_call():
    model = TwoStreams(both=True, d2=4).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16), _padding(2, 6, gen, all_visible=True)))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x, padding = torch.randn(3, 9, 16, generator=gen), _padding(3, 9, gen)
        torch.testing.assert_close(model(x, padding), ref(x, padding), rtol=1e-5, atol=1e-5)
        ops = _ops(_Bound(model, padding), x)
    assert sum(op.startswith("aten::scaled_dot_product_attention<") for op in ops) == 1, ops


def test_a_product_of_two_score_maps_is_not_a_stream():
    model = TwoStreams(combine="mul").eval()
    ref = copy.deepcopy(model)
    x, padding = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.long)
    rewrite.optimize(model, "exact", example_inputs=(x, padding))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites), model.rewrite_report.table()
    assert model.rewrite_report.rejected
    with torch.no_grad():
        torch.testing.assert_close(model(x, padding), ref(x, padding))


@pytest.mark.slow
def test_groupvit():
    """Every softmax attention of GroupViT rewritten (its grouping ``assign`` softmax is over the groups, dim
    -2: not attention, reported)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GroupViTConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=100, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, depths=[1, 1],
                           num_group_tokens=[8, 0], num_output_groups=[4, 4], image_size=32, patch_size=8,
                           num_hidden_layers=2),
        projection_dim=16, projection_intermediate_dim=32)
    model = tf.GroupViTModel(cfg).eval()
    ref = copy.deepcopy(model)
    kw = {"input_ids": torch.randint(3, 100, (2, 7)), "pixel_values": torch.randn(2, 3, 32, 32)}
    rewrite.optimize(model, "exact", example_kwargs=kw)
    rep = model.rewrite_report
    assert len(rep.sites) == 5 and all(r.status == "rewritten" for r in rep.sites), rep.table()
    assert all("dim -2" in r.reason for r in rep.rejected), rep.table()
    kw = {"input_ids": torch.randint(3, 100, (3, 11)), "pixel_values": torch.randn(3, 3, 32, 32)}
    with torch.no_grad():
        out, want = model(**kw), ref(**kw)
    for key in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(out[key], want[key], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lilt():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LiltConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, channel_shrink_ratio=2, max_2d_position_embeddings=64)
    model = tf.LiltModel(cfg).eval()
    ref = copy.deepcopy(model)

    def batch(b, n, gen):
        bbox = torch.randint(0, 30, (b, n, 4), generator=gen)
        bbox[..., 2:] += 30
        mask = (torch.rand(b, n, generator=gen) > 0.3).long()
        mask[:, 0] = 1
        return {"input_ids": torch.randint(3, 100, (b, n), generator=gen), "bbox": bbox, "attention_mask": mask}

    gen = torch.Generator().manual_seed(0)
    rewrite.optimize(model, "exact", example_kwargs=batch(2, 9, gen))
    rows = model.rewrite_report.sites
    assert len(rows) == 4 and all(r.status == "rewritten" for r in rows), model.rewrite_report.table()
    with torch.no_grad():
        kw = batch(3, 13, gen)
        out, want = model(**kw), ref(**kw)
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.layout_last_hidden_state if hasattr(out, "layout_last_hidden_state") else out[1],
                               want.layout_last_hidden_state if hasattr(want, "layout_last_hidden_state") else want[1],
                               rtol=1e-4, atol=1e-4)


# --- scores returned beside the output (openai-whisper) ----------------------------------------------------
class WhisperAttention(nn.Module):
    """openai-whisper's ``MultiHeadAttention``: q and k each scaled by d^-1/4, a causal buffer sliced to the
    length, softmax in float, and ``qk.detach()`` returned beside the output (its alignment heads read it)."""

    def __init__(self, n_state=32, n_head=4, n_ctx=24, causal=True):
        super().__init__()
        self.n_head = n_head
        self.query, self.key = nn.Linear(n_state, n_state), nn.Linear(n_state, n_state, bias=False)
        self.value, self.out = nn.Linear(n_state, n_state), nn.Linear(n_state, n_state)
        mask = torch.empty(n_ctx, n_ctx).fill_(float("-inf")).triu_(1)
        self.register_buffer("mask", mask if causal else None, persistent=False)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        wv, qk = self.qkv_attention(q, k, v, self.mask)
        return self.out(wv), qk

    def qkv_attention(self, q, k, v, mask=None):
        n_batch, n_ctx, n_state = q.shape
        scale = (n_state // self.n_head) ** -0.25
        q = q.view(*q.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        k = k.view(*k.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        v = v.view(*v.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        qk = (q * scale) @ (k * scale).transpose(-1, -2)
        if mask is not None:
            qk = qk + mask[:n_ctx, :n_ctx]
        qk = qk.float()
        w = torch.nn.functional.softmax(qk, dim=-1).to(q.dtype)
        out = (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)
        return out, qk.detach()


@pytest.mark.parametrize("causal,dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_whisper_returned_scores_are_kept_and_the_attention_fused(causal, dtype):
    torch.manual_seed(0)
    model = WhisperAttention(causal=causal).to(dtype).eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 10, 32, dtype=dtype),))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x = torch.randn(3, 17, 32, dtype=dtype)
        (out, qk), (want, want_qk) = model(x), ref(x)
        _close(out, want, dtype)
        torch.testing.assert_close(qk, want_qk)
        ops = _ops(model, x)
    assert any(op.startswith("aten::scaled_dot_product_attention<") for op in ops)
    assert not any(op.startswith(("aten::softmax<Torch", "aten::_softmax<Torch")) for op in ops), ops


def test_scores_that_feed_more_computation_are_still_used_elsewhere():
    class ScoresMean(WhisperAttention):
        def forward(self, x):
            out, qk = super().forward(x)
            return out, qk.mean()  # the detached copy feeds a computation: a real user

    model = ScoresMean().eval()
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 10, 32),))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites)
    assert any("used elsewhere" in r.reason for r in model.rewrite_report.rejected), model.rewrite_report.table()


# --- an additive update written in place into a slice of the scores (MViTv2) -------------------------------
class SliceUpdate(nn.Module):
    """MViTv2's decomposed relative position, added in place into the patch-patch block of the scores (the
    first ``sp`` tokens are class tokens); ``additive=False`` scales the block instead."""

    def __init__(self, dim=16, heads=2, grid=(3, 3), sp=1, additive=True):
        super().__init__()
        self.h, self.d, self.grid, self.sp, self.additive = heads, dim // heads, grid, sp, additive
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel_h = nn.Parameter(torch.randn(2 * grid[0] - 1, self.d))
        self.rel_w = nn.Parameter(torch.randn(2 * grid[1] - 1, self.d))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        attn = (q * self.d ** -0.5) @ k.transpose(-2, -1)
        (qh, qw), sp = self.grid, self.sp
        rh = self.rel_h[torch.arange(qh)[:, None] - torch.arange(qh)[None, :] + qh - 1]
        rw = self.rel_w[torch.arange(qw)[:, None] - torch.arange(qw)[None, :] + qw - 1]
        r_q = q[:, :, sp:].reshape(b, self.h, qh, qw, self.d)
        rel_h, rel_w = torch.einsum("byhwc,hkc->byhwk", r_q, rh), torch.einsum("byhwc,wkc->byhwk", r_q, rw)
        block = attn[:, :, sp:, sp:]
        if self.additive:
            attn[:, :, sp:, sp:] = (block.view(b, -1, qh, qw, qh, qw) + rel_h[:, :, :, :, :, None]
                                    + rel_w[:, :, :, :, None, :]).view(b, -1, qh * qw, qh * qw)
        else:
            attn[:, :, sp:, sp:] = block * 2
        return (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("sp,grid,dtype", [(1, (3, 3), torch.float32), (0, (2, 3), torch.bfloat16)])
def test_an_additive_slice_update_of_the_scores_is_a_bias(sp, grid, dtype):
    torch.manual_seed(0)
    model = SliceUpdate(grid=grid, sp=sp).to(dtype).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, sp + grid[0] * grid[1], 16, dtype=dtype)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x = torch.randn(3, sp + grid[0] * grid[1], 16, dtype=dtype)
        _close(model(x), ref(x), dtype)


def test_slice_updates_deep_in_a_stack_are_all_biases():
    """Twelve blocks in one graph: each block's relative-position terms are computed from everything before it
    (a deep cone of earlier layers), yet none of them reads the block's own scores, and every block is a bias."""
    torch.manual_seed(0)
    model = nn.Sequential(*[SliceUpdate() for _ in range(12)]).eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 10, 16),))
    statuses = [r.status for r in model.rewrite_report.sites]
    assert statuses == ["rewritten"] * 12, model.rewrite_report.table()
    with torch.no_grad():
        x = torch.randn(3, 10, 16)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_a_slice_update_that_is_not_additive_stays():
    model = SliceUpdate(additive=False).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 10, 16)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites)
    assert model.rewrite_report.rejected, model.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


# --- a finite fill in the split batch layout (DeBERTa-v2: (b·h, n, n) scores viewed as (b, h, n, n)) --------
class SplitLayoutFill(nn.Module):
    """DeBERTa-v2's spelling: ``bmm`` scores in the ``(b·h, n, n)`` layout, viewed as ``(b, h, n, n)`` for a
    fill with the dtype's finite minimum where the outer product of the padding masks is 0 (so a padded query
    row is filled whole, and the original gives it the mean of the values), then merged back for ``bmm``.
    ``fill_in`` / ``softmax_in``: the layout ("split" or "merged") each step happens in."""

    def __init__(self, fill_in="split", softmax_in="split", heads=2, d=8):
        super().__init__()
        self.fill_in, self.softmax_in, self.h, self.d = fill_in, softmax_in, heads, d
        self.qkv = nn.Linear(heads * d, 3 * heads * d)

    def forward(self, x, padding):
        b, n, _ = x.shape
        h = self.h
        q, k, v = self.qkv(x).view(b, n, 3, h, self.d).permute(2, 0, 3, 1, 4).reshape(3, b * h, n, self.d)
        s = torch.bmm(q, k.transpose(1, 2)) / self.d ** 0.5
        keep = (padding[:, None, :, None] * padding[:, None, None, :]).bool()
        low = torch.finfo(s.dtype).min
        if self.fill_in == "split":
            s = s.view(b, h, n, n).masked_fill(~keep, low)
        else:
            s = s.masked_fill(~keep.expand(b, h, n, n).reshape(b * h, n, n), low).view(b, h, n, n)
        if self.softmax_in == "merged":
            s = s.view(b * h, n, n)
        p = s.softmax(-1)
        out = torch.bmm(p.view(b * h, n, n), v)
        return out.view(b, h, n, self.d).transpose(1, 2).reshape(b, n, h * self.d)


@pytest.mark.parametrize("fill_in,softmax_in,heads,dtype", [
    ("split", "split", 2, torch.float32), ("split", "merged", 3, torch.bfloat16),
    ("merged", "split", 1, torch.float32), ("merged", "merged", 2, torch.bfloat16)])
def test_a_finite_fill_in_a_split_batch_layout_restores_empty_rows(fill_in, softmax_in, heads, dtype):
    torch.manual_seed(0)
    model = SplitLayoutFill(fill_in, softmax_in, heads=heads).to(dtype).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, heads * 8, dtype=dtype), _padding(2, 6, gen)))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x, padding = torch.randn(3, 9, heads * 8, generator=gen).to(dtype), _padding(3, 9, gen)
        _close(model(x, padding), ref(x, padding), dtype)


# --- a finite fill that never empties a row, followed by a padding term (GPT-Neo's local attention) -----------
class BandThenPadding(nn.Module):
    """GPT-Neo: ``where(bias, scores, finfo.min)`` with a causal band buffer (``window`` keys back, the diagonal
    always kept), then the additive padding mask. The band is not the causal mask, but it leaves every row a key,
    so no row is emptied by the fill and the site is SDPA with the band and the padding in one mask."""

    def __init__(self, window=3, heads=2, d=8, max_len=32):
        super().__init__()
        self.h, self.d = heads, d
        self.qkv = nn.Linear(heads * d, 3 * heads * d)
        full = torch.ones(max_len, max_len, dtype=torch.bool).tril()
        self.register_buffer("bias", (full ^ full.tril(-window))[None, None], persistent=False)

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2)
        s = torch.where(self.bias[:, :, :n, :n], s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype))
        s = s + (1.0 - padding[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, self.h * self.d)


@pytest.mark.parametrize("window", [1, 3])
def test_a_fill_that_keeps_every_row_a_key_may_be_followed_by_a_mask_term(window):
    torch.manual_seed(0)
    model = BandThenPadding(window).eval()
    ref = copy.deepcopy(model)
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[1, :2] = 0  # left padding, as generate() pads
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 7, 16), padding))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x, padding = torch.randn(3, 11, 16), torch.ones(3, 11, dtype=torch.long)
        padding[0, :4] = 0
        torch.testing.assert_close(model(x, padding), ref(x, padding), rtol=1e-5, atol=1e-5)


def test_a_fill_that_can_empty_a_row_before_a_mask_term_stays():
    class Emptying(BandThenPadding):
        def __init__(self):
            super().__init__()
            self.bias[..., 0, :] = False  # the first query sees no key: the fill empties its row

    model = Emptying().eval()
    padding = torch.ones(2, 7, dtype=torch.long)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 7, 16), padding))
    assert [r.status for r in model.rewrite_report.sites] != ["rewritten"]

class WindowAttention(nn.Module):
    """Swin's window attention (timm, fused attention off): a relative-position bias gathered from a table, then
    for shifted windows a per-window mask added in a ``[B, nW, H, N, N]`` view of the ``[B·nW, H, N, N]`` scores
    and viewed back. ``bias_rank`` 3 leaves the bias ``[H, N, N]`` (broadcast from the right)."""

    def __init__(self, heads=2, side=3, windows=4, shifted=True, bias_rank=4):
        super().__init__()
        n, self.h, self.bias_rank = side * side, heads, bias_rank
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)
        self.table = nn.Parameter(torch.randn((2 * side - 1) ** 2, heads))
        self.register_buffer("index", torch.randint(0, (2 * side - 1) ** 2, (n, n)))
        hidden = torch.rand(windows, n, n) > 0.7
        self.register_buffer("mask", hidden * -100.0 if shifted else None)

    def forward(self, x):
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * (c // self.h) ** -0.5) @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + (bias.unsqueeze(0) if self.bias_rank == 4 else bias)
        if self.mask is not None:
            windows = self.mask.shape[0]
            attn = attn.view(-1, windows, self.h, n, n) + self.mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.h, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, -1))


@pytest.mark.parametrize("heads,windows,shifted,bias_rank", [(2, 4, True, 4), (2, 2, True, 3), (4, 2, False, 4)])
def test_swin_window_attention_with_a_mask_added_in_a_window_view(heads, windows, shifted, bias_rank):
    torch.manual_seed(0)
    model = WindowAttention(heads=heads, windows=windows, shifted=shifted, bias_rank=bias_rank).eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2 * windows, 9, 16),))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x = torch.randn(3 * windows, 9, 16)
        _close(model(x), ref(x), torch.float32)


class RowFactor(nn.Module):
    """Scores multiplied (or divided) by a factor constant along the keys: XCiT's learned per-head temperature
    ``[H, 1, 1]``, a per-query-row factor computed from q, a per-batch factor, a ``[N, 1]`` table or a one-element
    tensor; ``split`` applies it in a ``[B, H, N, N]`` view of ``[B·H, N, N]`` scores."""

    def __init__(self, factor="head", divide=False, split=False, heads=2, n=6):
        super().__init__()
        self.factor, self.divide, self.split, self.h = factor, divide, split, heads
        self.qkv = nn.Linear(16, 48)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.rows = nn.Parameter(torch.rand(n, 1) + 0.5)
        self.one = nn.Parameter(torch.rand(1) + 0.5)

    def _factor(self, q):
        if self.factor == "head":
            return self.temperature
        if self.factor == "row":
            return q.norm(dim=-1, keepdim=True) + 0.5
        if self.factor == "batch":
            return q.mean(dim=(1, 2, 3), keepdim=True).abs() + 0.5
        return self.rows if self.factor == "table" else self.one

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        t = self._factor(q)
        s = q @ k.transpose(-2, -1)
        if self.split:
            s = s.reshape(b * self.h, n, n).view(b, self.h, n, n)
        s = s / t if self.divide else t * s
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


@_PROPERTY
@given(factor=st.sampled_from(["head", "row", "batch", "table", "one"]), divide=st.booleans(),
       split=st.booleans())
def test_a_factor_constant_along_the_keys_is_folded_into_q(factor, divide, split):
    torch.manual_seed(0)
    model = RowFactor(factor=factor, divide=divide, split=split).eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16),))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        x = torch.randn(3, 6, 16)
        _close(model(x), ref(x), torch.float32)


@pytest.mark.parametrize("spelling", ["per_key", "from_scores"])
def test_a_factor_that_varies_along_the_keys_stays(spelling):
    class KeyFactor(nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1)
            t = k.norm(dim=-1)[:, :, None, :] if spelling == "per_key" else s.amax(-1, keepdim=True).abs() + 1
            return (s * t).softmax(-1) @ v

    model = KeyFactor()
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    rewrite.optimize(model, "exact", example_inputs=(q, k, v))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites), model.rewrite_report.table()
    torch.testing.assert_close(model(q, k, v), KeyFactor()(q, k, v))


def test_bool_and_integer_graph_outputs_are_compared_by_equality():
    """A graph that also returns a bool or integer tensor (higgs_audio_v2 returns masks beside its states) is
    verified: such outputs are equal or not; taking |a - b| of them raised inside the pipeline."""
    from rewrite.passes.verify import relative_error

    class WithMasks(nn.Module):
        def forward(self, q, k, v):
            out = (q @ k.transpose(-1, -2) * 0.5).softmax(-1) @ v
            return out, out > 0, (out > 0).sum(-1)

    q = torch.randn(2, 2, 5, 4)
    model = WithMasks()
    rewrite.optimize(model, "exact", example_inputs=(q, q, q))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    assert not model.rewrite_report.errors
    mask = torch.tensor([True, False])
    assert relative_error(mask, mask.clone()) == 0.0 and relative_error(mask, ~mask) == float("inf")
    assert relative_error(torch.tensor([1, 2]), torch.tensor([1, 3])) == float("inf")


# --- a 0/1 gate on the scores: s * b + c * (1 - b) (GPT-1) ----------------------------------------------------

class GatedScores(nn.Module):
    """GPT-1's causal mask: the scores times a registered 0/1 buffer sliced to the length, plus ``c`` where it is
    0; ``pattern`` picks the buffer (``tril``, a fixed random 0/1 pattern, one with a 0.5 in it) and ``mask``
    whether a padding mask is added after the gate."""

    def __init__(self, pattern="tril", c=-1e4, mask=True, subtract=False, size=32):
        super().__init__()
        self.c, self.mask, self.subtract = c, mask, subtract
        self.qkv = nn.Linear(16, 48)
        gen = torch.Generator().manual_seed(3)
        gate = {"tril": torch.ones(size, size).tril(),
                "random": (torch.rand(size, size, generator=gen) > 0.3).float(),
                "half": torch.ones(size, size).tril() * 0.5 + torch.ones(size, size).tril(-1) * 0.5}[pattern]
        self.register_buffer("gate", gate.view(1, 1, size, size))

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        w = q @ k.transpose(-1, -2) / 8 ** 0.5
        g = self.gate[:, :, : w.size(-2), : w.size(-1)]
        w = w * g - abs(self.c) * (1 - g) if self.subtract else w * g + self.c * (1 - g)
        if self.mask:
            w = w + (1.0 - padding[:, None, None, :].float()) * -1e4
        return (w.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 16)


@pytest.mark.parametrize("subtract", [False, True])
def test_a_causal_gate_buffer_is_a_causal_fill_at_every_length(subtract):
    """``s * b + c * (1 - b)`` with ``b`` a registered ``tril`` of ones: a causal fill, proven for every length
    (the recompile for a new length makes the sizes symbolic; the buffer is checked whole)."""
    torch.manual_seed(0)
    model = GatedScores(subtract=subtract).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(4)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16), _padding(2, 6, gen, all_visible=True)))
    with torch.no_grad():
        for n in (9, 13, 32):
            x, padding = torch.randn(3, n, 16, generator=gen), _padding(3, n, gen)
            torch.testing.assert_close(model(x, padding), ref(x, padding), rtol=1e-5, atol=1e-5)
    rows = model.rewrite_report.sites
    assert {r.status for r in rows} == {"rewritten"} and all(r.is_causal for r in rows), model.rewrite_report.table()


def test_a_gate_that_is_not_zero_one_is_kept_and_a_changed_buffer_is_seen():
    """A gate holding 0.5 is no mask: the site is kept with the reason. A 0/1 gate that is not causal (a fixed
    pattern, rows with no key included) is a fill; overwriting its buffer afterwards with 0.5 makes the model
    recapture, and the outputs follow the new buffer."""
    gen = torch.Generator().manual_seed(5)
    half = GatedScores(pattern="half", mask=False).eval()
    ref = copy.deepcopy(half)
    x, padding = torch.randn(2, 7, 16, generator=gen), _padding(2, 7, gen)
    rewrite.optimize(half, "exact", example_inputs=(x, padding))
    rows = half.rewrite_report.rejected
    assert not half.rewrite_report.sites and "multiplied" in rows[0].reason, half.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(half(x, padding), ref(x, padding))

    fixed = GatedScores(pattern="random", mask=False).eval()
    ref = copy.deepcopy(fixed)
    rewrite.optimize(fixed, "exact", example_inputs=(x, padding))
    assert [r.status for r in fixed.rewrite_report.sites] == ["rewritten"], fixed.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(fixed(x, padding), ref(x, padding), rtol=1e-5, atol=1e-5)
        for m in (fixed, ref):
            m.gate[..., 1::3] = 0.5
        torch.testing.assert_close(fixed(x, padding), ref(x, padding), rtol=1e-5, atol=1e-5)


def test_a_gate_from_the_inputs_is_not_proven():
    """A 0/1 gate the caller passes could hold anything on another call: never taken as a mask."""
    class InputGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x, g):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            w = q @ k.transpose(-1, -2)
            w = w * g + -1e4 * (1 - g)
            return w.softmax(-1) @ v

    model = InputGate().eval()
    ref = copy.deepcopy(model)
    x, g = torch.randn(2, 5, 16), torch.ones(5, 5).tril()
    rewrite.optimize(model, "exact", example_inputs=(x, g))
    assert [r.status for r in model.rewrite_report.sites] != ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        g2 = torch.full((5, 5), 0.5)
        torch.testing.assert_close(model(x, g2), ref(x, g2))


class MergedScoresSplitValues(nn.Module):
    """GPT-NeoX-Japanese: q and k flattened to ``(b·h, n, d)`` for ``baddbmm``, the scores viewed back to
    ``(b, h, n, n)`` for the mask, the probabilities multiplied with values that never left ``(b, h, n, d)``."""

    def __init__(self, heads=2, mask="float", causal=False):
        super().__init__()
        self.h, self.mask, self.causal = heads, mask, causal
        self.qkv = nn.Linear(16, 3 * heads * 8)

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, 8).permute(2, 0, 3, 1, 4)
        q3, k3 = q.reshape(b * self.h, n, 8), k.reshape(b * self.h, n, 8)
        s = torch.baddbmm(torch.zeros(b * self.h, n, n, dtype=q.dtype), q3, k3.transpose(1, 2), beta=1.0,
                          alpha=8 ** -0.5)
        s = s.view(b, self.h, n, -1)
        visible = padding[:, None, None, :].bool()
        if self.causal:
            visible = visible & torch.ones(n, n, dtype=torch.bool).tril()
        if self.mask == "float":
            s = s + torch.zeros(visible.shape, dtype=s.dtype).masked_fill(~visible, torch.finfo(s.dtype).min)
        elif self.mask == "fill":
            s = s.masked_fill(~visible, -1e9)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        return (p @ v).transpose(1, 2).reshape(b, n, self.h * 8)


@pytest.mark.parametrize("mask,causal", [("none", False), ("float", True), ("fill", False)])
def test_scores_split_for_the_mask_beside_values_already_split(mask, causal):
    torch.manual_seed(0)
    model = MergedScoresSplitValues(mask=mask, causal=causal).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(6)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16), _padding(2, 6, gen, all_visible=True)))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        for n in (5, 11):
            x, padding = torch.randn(3, n, 16, generator=gen), _padding(3, n, gen)
            torch.testing.assert_close(model(x, padding), ref(x, padding), rtol=1e-5, atol=1e-5)
    assert {r.status for r in model.rewrite_report.sites} == {"rewritten"}, model.rewrite_report.table()


# --- differential attention: head slices of one softmax combined before the value product -------------------
class Differential(nn.Module):
    """timm's DiffAttention: ``2h`` heads of scores, the probabilities viewed as ``(b, h, 2, n, n)`` and combined
    as ``p[:, :, 0] - λ p[:, :, 1]`` (``λ`` a learned scalar, or one per head and query with ``per_row``) before
    one product with ``h`` heads of values; ``mask`` adds a padding mask."""

    def __init__(self, heads=2, per_row=False, mask=True):
        super().__init__()
        self.h, self.per_row, self.mask = heads, per_row, mask
        self.qk, self.v = nn.Linear(16, 2 * 2 * heads * 4), nn.Linear(16, heads * 8)
        self.lam = nn.Parameter(torch.tensor(0.3))
        self.row = nn.Linear(16, heads)

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k = self.qk(x).view(b, n, 2, 2 * self.h, 4).permute(2, 0, 3, 1, 4)
        v = self.v(x).view(b, n, self.h, 8).transpose(1, 2)
        s = q @ k.transpose(-1, -2) * 0.5
        if self.mask:
            s = s.masked_fill(padding[:, None, None, :] == 0, float("-inf"))
        p = s.softmax(dim=-1).view(b, self.h, 2, n, n)
        lam = self.row(x).transpose(1, 2)[..., None] if self.per_row else torch.exp(self.lam)
        out = (p[:, :, 0] - lam * p[:, :, 1]) @ v
        return out.transpose(1, 2).reshape(b, n, self.h * 8)


@pytest.mark.parametrize("per_row,mask", [(False, True), (True, False), (True, True)])
def test_differential_attention_is_one_value_product(per_row, mask):
    torch.manual_seed(0)
    model = Differential(per_row=per_row, mask=mask).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    x, padding = torch.randn(2, 6, 16), _padding(2, 6, gen, all_visible=True)
    rewrite.optimize(model, "exact", example_inputs=(x, padding))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        for n in (6, 9):
            x, padding = torch.randn(3, n, 16, generator=gen), _padding(3, n, gen)
            padding[0] = 1  # -inf fills: a row with no key is NaN in the original
            torch.testing.assert_close(model(x, padding), ref(x, padding), rtol=1e-5, atol=1e-5)


def test_a_combination_weighted_along_the_keys_is_not_distributed():
    """A weight that varies along the keys does not commute with the value product: left as it was."""
    class KeyWeighted(Differential):
        def forward(self, x, padding):
            b, n, _ = x.shape
            q, k = self.qk(x).view(b, n, 2, 2 * self.h, 4).permute(2, 0, 3, 1, 4)
            v = self.v(x).view(b, n, self.h, 8).transpose(1, 2)
            p = (q @ k.transpose(-1, -2)).softmax(dim=-1).view(b, self.h, 2, n, n)
            keys = torch.linspace(0, 1, n)
            return ((p[:, :, 0] - keys * p[:, :, 1]) @ v).transpose(1, 2).reshape(b, n, self.h * 8)

    model = KeyWeighted().eval()
    ref = copy.deepcopy(model)
    x, padding = torch.randn(2, 6, 16), torch.ones(2, 6)
    rewrite.optimize(model, "exact", example_inputs=(x, padding))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites), model.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(model(x, padding), ref(x, padding))


@pytest.mark.parametrize("how", ["reshape_as", "view_as", "expand_as"])
def test_a_bias_shaped_like_the_scores_reads_only_their_shape(how):
    """SAM's decomposed relative position: a bias computed apart, ``reshape_as(scores)`` (or ``view_as``,
    ``expand_as``), then added to the scores. Taking the scores' shape is not using them: the site is rewritten
    and the bias is shaped from q and k, so the N x N scores are not computed for it."""
    class ShapedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.rel = nn.Linear(16, 48), nn.Linear(16, 2)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) * 8 ** -0.5
            rel = self.rel(x).transpose(1, 2)[..., None]                    # [B, H, N, 1]
            rel = rel * torch.ones(1, 1, 1, n) if how != "expand_as" else rel
            scores = scores + getattr(rel.contiguous(), how)(scores)
            return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 16)

    model = ShapedBias().eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16),))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        for n in (6, 9):
            x = torch.randn(3, n, 16)
            torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    ops = _ops(model, torch.randn(3, 9, 16))
    assert not any(op.startswith(("aten::bmm<", "aten::matmul<")) and "linear" not in op for op in ops), ops


# --- a floor under the masked scores: max(s, finfo.min) (XGLM) -------------------------------------------------
class FlooredScores(nn.Module):
    """XGLM: the masked scores floored at the dtype's minimum, ``torch.max(s, torch.full((), finfo.min))``, so a
    row with every key masked by −∞ is uniform rather than NaN; ``mask`` picks how the padding is applied, ``how``
    the floor's spelling, ``split`` XGLM's ``(b·h)`` layout around it."""

    def __init__(self, mask="finite", how="max", split=True):
        super().__init__()
        self.mask, self.how, self.split = mask, how, split
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, padding):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) * 8 ** -0.5
        hidden = padding[:, None, None, :] == 0
        lowest = torch.finfo(s.dtype).min
        if self.mask == "finite":
            s = s + torch.zeros(hidden.shape, dtype=s.dtype).masked_fill(hidden, lowest)
        elif self.mask == "inf":
            s = s + torch.zeros(hidden.shape, dtype=s.dtype).masked_fill(hidden, float("-inf"))
        elif self.mask == "fill":
            s = s.masked_fill(hidden, float("-inf"))
        if self.split:
            s = s.reshape(b * 2, n, n).view(b, 2, n, n)
        s = torch.max(s, torch.full((), lowest)) if self.how == "max" else s.clamp(min=lowest)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 16)


@pytest.mark.parametrize("mask,how,dtype", [("finite", "max", torch.float32), ("inf", "max", torch.float32),
                                            ("fill", "clamp", torch.float32), ("finite", "max", torch.bfloat16)])
def test_a_floor_under_the_masked_scores_is_a_floored_mask(mask, how, dtype):
    """Exact under random padding, a sequence with no visible key included (uniform there, as the original)."""
    torch.manual_seed(0)
    model = FlooredScores(mask, how).to(dtype).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(8)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(2, 6, 16, dtype=dtype),
                                                     _padding(2, 6, gen, all_visible=True)))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        for n in (5, 11):
            x, padding = torch.randn(3, n, 16, generator=gen).to(dtype), _padding(3, n, gen)
            out, want = model(x, padding), ref(x, padding)
            assert not want.isnan().any()
            _close(out, want, dtype)
    assert {r.status for r in model.rewrite_report.sites} == {"rewritten"}, model.rewrite_report.table()


def test_a_floor_above_the_masks_is_not_a_mask():
    """``max(s, -5)`` changes unmasked scores too: left as it was."""
    class Clipped(FlooredScores):
        def forward(self, x, padding):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            s = torch.max(q @ k.transpose(-1, -2), torch.full((), -5.0))
            return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 16)

    model = Clipped().eval()
    x, padding = torch.randn(2, 6, 16) * 4, torch.ones(2, 6)
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(x, padding))
    assert not any(r.status == "rewritten" for r in model.rewrite_report.sites), model.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(model(x, padding), ref(x, padding))
