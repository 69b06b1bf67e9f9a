"""Mixers with buffers or fitted state handed on to Inductor (``then="inductor"``).

The pipeline inserts such mixers into the Dynamo graph as submodules after capture; AOTAutograd lifts every
parameter and buffer of the graph module into a graph input and looks up where each came from. These tests
check that the rewritten graph compiles, that it computes what the eager rewritten graph computes, that the
state stays in the model's ``state_dict`` and that state loaded later is used by the compiled graph.
"""
import math

import pytest
import torch
from torch import nn

import rewrite
from rewrite.backend import make_compiler
from rewrite.pipeline import Session
from rewrite.policy import Policy
from rewrite.report import RewriteReport

D, HEADS, N = 32, 4, 16


class Attention(nn.Module):
    """Hand-written multi-head self-attention without a mask (every mixer can be traced by Inductor here)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, n, D))


class Stack(nn.Module):
    def __init__(self, layers=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Attention() for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


# random features (a buffer made at build time) and k-means centroids (fitted on the first batch)
POLICY = {
    "layers.0": rewrite.Linear(feature="favor", features=16),
    "layers.1": rewrite.KMeansRouting(clusters=2, window=8),
}
# every stateful mixer, one site each (a single Inductor compile covers them all)
ALL_STATEFUL = {
    **POLICY,
    "layers.2": rewrite.SharedQuery(query="calibrated"),
    "layers.3": rewrite.Scatterbrain(window=4, features=16),
}


def batch(b=2, seed=1):
    return torch.randn(b, N, D, generator=torch.Generator().manual_seed(seed))


def stateful_keys(model):
    return sorted(k for k in model.state_dict() if ".rewrite_" in k)


def check_inductor_matches_eager(policy, batches):
    from torch._dynamo.utils import counters
    x = batches[0]
    layers = len(policy)
    eager = rewrite.optimize(Stack(layers), policy, example_inputs=(x,), then="eager")
    counters["aot_autograd"].clear()
    compiled = rewrite.optimize(Stack(layers), policy, example_inputs=(x,), then="inductor")
    assert counters["aot_autograd"]["total"] >= 1                   # Inductor compiled the rewritten graph
    rows = compiled.rewrite_report.sites
    assert [r.status for r in rows] == ["rewritten"] * layers
    assert not any("runs eagerly" in r.reason for r in rows)

    # the mixers' state lives in the model's state_dict either way (and was fitted on the same batch)
    keys = stateful_keys(eager)
    assert keys and keys == stateful_keys(compiled)
    with torch.no_grad():
        for xb in batches:
            torch.testing.assert_close(compiled(xb), eager(xb), rtol=1e-4, atol=1e-4)

        # state loaded in place after compiling is what the compiled graph uses (it is an input, not a constant)
        state = {k: v for k, v in eager.state_dict().items() if ".rewrite_" in k}
        changed = {k: (v * 0.5 if k.endswith(("projection", "q_sum")) else v.flip(-1)) for k, v in state.items()}
        before = compiled(x)
        eager.load_state_dict(changed, strict=False)
        compiled.load_state_dict(changed, strict=False)
        after = compiled(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, eager(x), rtol=1e-4, atol=1e-4)
    return keys


def test_stateful_mixers_compile_with_inductor_and_match_eager():
    keys = check_inductor_matches_eager(POLICY, [batch()])
    assert sum(k.endswith("projection") for k in keys) == 1 and sum(k.endswith("centroids") for k in keys) == 1


@pytest.mark.slow
def test_every_stateful_mixer_compiles_with_inductor_across_batch_sizes():
    keys = check_inductor_matches_eager(ALL_STATEFUL, [batch(), batch(3, seed=2)])  # batch 3: a recompile
    assert any(k.endswith("q_sum") for k in keys) and sum(k.endswith("projection") for k in keys) == 2


def test_backend_door_with_inductor_matches_eager():
    x = batch()
    with torch.no_grad():
        ref = torch.compile(Stack(2), backend=rewrite.backend(POLICY, then="eager"))(x)
        compiler = rewrite.backend(POLICY, then="inductor")
        out = torch.compile(Stack(2), backend=compiler)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert [r.status for r in compiler.session.report.sites] == ["rewritten"] * 2
    assert not any("runs eagerly" in r.reason for r in compiler.session.report.sites)


def test_a_mixer_inductor_cannot_trace_runs_the_rewritten_graph_eagerly():
    """A padding mask is classified from its values at run time, which Inductor cannot trace: the rewritten
    graph must still run (not the original attention behind the report's back), and the report says so."""
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    base = BertModel(cfg).eval()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    policy = {"_default": rewrite.Linear(feature="favor", features=16)}
    outs = {}
    for then in ("eager", "inductor"):
        model = BertModel(cfg).eval()
        model.load_state_dict(base.state_dict())
        rewrite.optimize(model, policy, example_kwargs=kw, then=then)
        with torch.no_grad():
            outs[then] = model(**kw).last_hidden_state
        rows = model.rewrite_report.sites
        assert [r.status for r in rows] == ["rewritten"]
    assert "runs eagerly" in rows[0].reason
    with torch.no_grad():
        exact = base(**kw).last_hidden_state
    torch.testing.assert_close(outs["inductor"], outs["eager"], rtol=1e-4, atol=1e-4)
    # the approximation really runs (not the original attention)
    assert (outs["inductor"] - exact).abs().max() > 100 * (outs["inductor"] - outs["eager"]).abs().max()


def test_mixer_state_gets_a_source_in_the_dynamo_graph():
    """The inserted submodule's parameters and buffers are listed where AOTAutograd looks them up."""
    seen = {}
    session = Session(Policy({"_default": rewrite.Linear(feature="favor", features=16)}), RewriteReport(""))
    compile_graph = make_compiler(session, "eager")

    def spy(gm, example_inputs):
        out = compile_graph(gm, example_inputs)
        seen.update(names=[n for n, _ in gm.named_buffers()], sources=dict(gm._param_name_to_source))
        return out

    with torch.no_grad():
        torch.compile(Stack(layers=1), backend=spy)(batch())
    assert seen["names"] and all(n in seen["sources"] for n in seen["names"])
