"""The safety nets: verification rejects a wrong lowering, declines fall back, breaks are reported."""
import copy

import torch
import torch.nn.functional as F

import rewrite
from rewrite import actions
from rewrite.actions import Decline, Exact


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


class Wrap(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def qkv(n=12):
    torch.manual_seed(0)
    return tuple(torch.randn(2, 3, n, 16) for _ in range(3))


def test_a_wrong_lowering_is_rejected_with_its_measured_error(monkeypatch):
    def wrong(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return F.scaled_dot_product_attention(q, k, v, scale=(scale or 1.0) * 2.0)

    monkeypatch.setitem(actions._HANDLERS, Exact, lambda action, call, site: wrong)
    model = Wrap()
    args = qkv()
    ref = model(*args)
    rewrite.optimize(model, "exact", example_inputs=args)
    row = model.rewrite_report.sites[0]
    assert row.status == "rejected" and row.error > 1e-2 and "differs from the original" in row.reason
    assert torch.equal(model(*args), ref), "a rejected site runs exactly as before"


def test_a_declining_handler_falls_back_to_exact_with_the_reason():
    model = Wrap()
    args = qkv()
    rewrite.optimize(model, {"attn": Exact(kernel="triton")}, example_inputs=args)
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten" and row.action == "Exact(kernel='sdpa')"
    assert "declined" in row.reason and "Triton" in row.reason


def test_handler_returning_decline_object(monkeypatch):
    real = actions._HANDLERS[Exact]
    calls = []

    def picky(action, call, site):
        calls.append(action)
        if action.kernel == "triton":
            return Decline("no GPU here")
        return real(action, call, site)

    monkeypatch.setitem(actions._HANDLERS, Exact, picky)
    model = Wrap()
    rewrite.optimize(model, {"_default": Exact(kernel="triton")}, example_inputs=qkv())
    assert "no GPU here" in model.rewrite_report.sites[0].reason
    assert [a.kernel for a in calls] == ["triton", "sdpa"]


class Broken(torch.nn.Module):
    """Two attention blocks with a graph break (a print) between them."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Attn(), Attn()

    def forward(self, q, k, v):
        x = self.first(q, k, v)
        print("between the blocks")
        return self.second(x, k, v)


def test_graph_breaks_are_reported_and_each_piece_is_rewritten(capsys):
    model = Broken()
    args = qkv()
    ref = model(*args)
    rewrite.optimize(model, "exact", example_inputs=args)
    rep = model.rewrite_report
    assert [(r.name, r.status) for r in rep.sites] == [("first", "rewritten"), ("second", "rewritten")]
    assert rep.graphs >= 2 and rep.breaks and any("print" in b.reason or "builtin" in b.reason.lower()
                                                   for b in rep.breaks), rep.breaks
    assert "Graph breaks" in str(rep)
    assert torch.allclose(model(*args), ref, atol=1e-5)


def test_bf16_bert_within_tolerance():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                                 vocab_size=100, attn_implementation="eager")).eval().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    batch = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    batch["attention_mask"][1, 7:] = 0
    rewrite.optimize(model, "exact", example_kwargs=batch)
    assert all(r.status == "rewritten" and r.error <= 2e-2 for r in model.rewrite_report.sites)
    with torch.no_grad():
        a, b = model(**batch).last_hidden_state.float(), ref(**batch).last_hidden_state.float()
    assert ((a - b).abs().max() / b.abs().max()) < 2e-2


def test_vision_sites_know_their_grid():
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                               image_size=32, patch_size=8, attn_implementation="eager")).eval()
    sites = rewrite.find_attention(model, example_kwargs={"pixel_values": torch.randn(1, 3, 32, 32)})
    assert [(s.grid, s.prefix_tokens) for s in sites] == [((4, 4), 1)]


class DropoutAttn(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
        return F.dropout(probs, self.p, training=self.training) @ v


class DropoutWrap(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.attn = DropoutAttn(p)

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def test_training_dropout_is_unbiased_and_has_the_right_rate():
    """With dropout on, E[out] equals the no-dropout output and the variance matches dropout at rate p."""
    torch.manual_seed(0)
    p = 0.3
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    v = torch.ones(1, 2, 6, 1)  # out = sum of kept, rescaled probabilities of each row
    model = DropoutWrap(p).train()
    rewrite.optimize(model, "exact", example_inputs=(q, k, v))
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten" and row.error < 1e-4  # verified at p = 0
    with torch.no_grad():
        samples = torch.stack([model(q, k, v) for _ in range(3000)])
        probs = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    expected_var = (probs ** 2).sum(-1, keepdim=True) * p / (1 - p)  # Var of sum_j P_ij * m_j / (1-p)
    mean, var = samples.mean(0), samples.var(0)
    assert (mean - 1.0).abs().max() < 5 * (expected_var.max() / 3000) ** 0.5 + 1e-3
    assert torch.allclose(var, expected_var, rtol=0.25, atol=1e-3)
