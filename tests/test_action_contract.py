"""One contract over every registered action: what eager runs, ``then="inductor"`` runs (issue 13).

Each action type gets a setting that does real work at the test's size (N = 64, 4 heads): a compiled graph
that silently took another path (BlockRouting's per-head counts once fell back to the uniform count while
Inductor traced) differs from the eager one here. A new action must be added to ``SETTINGS``.
"""
import pytest
import torch
from torch import nn

import rewrite
from rewrite.actions import action_types
from test_backend_state import D
from test_backend_state import Attention as BackendAttention

N = 64

SETTINGS = {
    "Exact": rewrite.Exact(),
    "BlockRouting": rewrite.BlockRouting(block=8, topk=3, per_head=True),
    "Decay": rewrite.Decay(gamma=0.9),
    "Linear": rewrite.Linear(feature="favor", features=16),
    "Flow": rewrite.Flow(),
    "KMeansRouting": rewrite.KMeansRouting(clusters=2, window=16),
    "Pool": rewrite.Pool(size=3),
    "Scatterbrain": rewrite.Scatterbrain(window=8, features=16),
    "SharedQuery": rewrite.SharedQuery(query="calibrated"),
    "SlidingWindow": rewrite.SlidingWindow(window=8, sinks=1),
    "Spectral": rewrite.Spectral(keep=8),
    "TokenMerge": rewrite.TokenMerge(r=8),
    "MergeTokens": rewrite.MergeTokens(r=8),
    "TopK": rewrite.TopK(k=8),
}


def Attention(seed: int) -> nn.Module:
    """The hand-written self-attention of the Inductor state tests (D=32, 4 heads), seeded."""
    torch.manual_seed(seed)
    return BackendAttention()


class Residual(nn.Module):
    """Two self-attention layers in residual blocks: a block-level action (MergeTokens) rewrites the block."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.first, self.second = BackendAttention(), BackendAttention()

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


def test_every_registered_action_is_in_the_contract():
    assert set(SETTINGS) == set(action_types())


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_inductor_runs_what_eager_runs(name):
    action = SETTINGS[name]
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(1))
    models = {}
    for then in ("eager", "inductor"):
        model = (Residual(seed=0) if action.block_level else Attention(seed=0)).eval()
        rewrite.optimize(model, {"_default": action}, example_inputs=(x,), then=then)
        row = model.rewrite_report.sites[0]
        assert row.status == "rewritten" and "declined" not in row.reason, row.reason
        models[then] = model
    with torch.no_grad():
        for xb in (x, torch.randn(2, N, D, generator=torch.Generator().manual_seed(2))):
            torch.testing.assert_close(models["inductor"](xb), models["eager"](xb), rtol=2e-4, atol=2e-4)


def test_block_routing_per_head_counts_under_inductor():
    """The issue's toy: per-head counts (say a checkpoint's [1, 2, 3, 6]) are what the compiled graph uses, not
    the uniform count; counts loaded after compiling are used too (the rewrite recompiles when they change)."""
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(3))
    policy = {"_default": rewrite.BlockRouting(block=8, topk=3, per_head=True)}
    uniform = {"_default": rewrite.BlockRouting(block=8, topk=3)}
    models = {}
    for name, pol, then in (("eager", policy, "eager"), ("inductor", policy, "inductor"),
                            ("uniform", uniform, "eager")):
        models[name] = rewrite.optimize(Attention(seed=0).eval(), pol, example_inputs=(x,), then=then)
    key = next(k for k in models["eager"].state_dict() if k.endswith("head_topk"))
    with torch.no_grad():
        for counts in ([1, 2, 3, 6], [6, 3, 2, 1]):
            for name in ("eager", "inductor"):
                models[name].load_state_dict({key: torch.tensor(counts)}, strict=False)
            torch.testing.assert_close(models["inductor"](x), models["eager"](x), rtol=2e-4, atol=2e-4)
            assert (models["inductor"](x) - models["uniform"](x)).abs().max() > 1e-3
    assert len(models["inductor"].rewrite_report.recaptures) == 2
