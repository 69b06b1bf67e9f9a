"""One contract over every registered action (issue 13), one column per test:

* JSON round trip, defaults, bad arguments (a ``RewriteError`` naming the argument) and symbolic FLOPs;
* output shape and dtype as SDPA's in fp32 and bf16, with GQA and a padding mask; shape inference on fake
  tensors (how the pipeline inserts the call); gradients in q, k, v;
* ``(b·h) n d`` 3-D inputs and extra leading batch dims;
* dropout: applied where the mixer forms probabilities, refused loudly (never silently ignored) elsewhere;
* what eager runs, ``then="inductor"`` runs: each action gets a setting that does real work at N = 64, so a
  compiled graph that silently took another path (BlockRouting's per-head counts once fell back to the
  uniform count while Inductor traced) differs from the eager one.

A new action must be added to ``SETTINGS`` (end to end, N = 64) and ``SMALL`` (unit columns, N = 10–17).
"""
import copy

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import rewrite
from rewrite import cost
from rewrite.actions import RewriteError, action_types
from mixer_helpers import build
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


#: a small setting of each action for the unit columns, and one bad argument it must refuse (None: it takes none)
SMALL = {
    "Exact": (rewrite.Exact(), {"kernel": "cuda"}),
    "BlockRouting": (rewrite.BlockRouting(block=4, topk=2), {"layout": "3d"}),
    "Decay": (rewrite.Decay(gamma=0.8), {"gamma": 1.5}),
    "Linear": (rewrite.Linear(feature="favor", features=16), {"feature": "cos"}),
    "Flow": (rewrite.Flow(), None),
    "KMeansRouting": (rewrite.KMeansRouting(clusters=2, window=5), {"clusters": 0}),
    "Pool": (rewrite.Pool(size=3), {"size": 4}),
    "Scatterbrain": (rewrite.Scatterbrain(window=4, features=16), {"window": 0}),
    "SharedQuery": (rewrite.SharedQuery(query="calibrated"), {"query": "max"}),
    "SlidingWindow": (rewrite.SlidingWindow(window=4, sinks=1), {"window": 0}),
    "Spectral": (rewrite.Spectral(keep=4), {"keep": 0}),
    "TokenMerge": (rewrite.TokenMerge(r=3), {"r": -1}),
    "TopK": (rewrite.TopK(k=3), {"k": 0}),
    "MergeTokens": (rewrite.MergeTokens(r=2), {"r": -1}),
}


def test_every_registered_action_is_in_the_contract():
    assert set(SETTINGS) == set(action_types()) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_json_round_trip_defaults_bad_arguments_and_flops(name):
    action, bad = SMALL[name]
    js = action.to_json()
    assert js["action"] == name
    assert rewrite.action_from_json(js) == action
    assert rewrite.action_from_json(name) == getattr(rewrite, name)()   # every argument has a default
    if bad is not None:
        arg = next(iter(bad))
        with pytest.raises(RewriteError, match=arg):
            getattr(rewrite, name)(**bad)
        with pytest.raises(RewriteError, match=arg):
            getattr(rewrite, name)(**{arg: object()})
    with pytest.raises(RewriteError, match="arguments are"):
        rewrite.action_from_json({"action": name, "args": {"no_such_argument": 1}})
    expr = action.flops()
    assert isinstance(expr, sympy.Expr) and expr.free_symbols <= set(cost.SYMBOLS.values())
    assert cost.evaluate(expr, B=1, H=1, N=4096, Nk=4096, d=64, dv=64) > 0


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_fake_tensors_and_gradients(name, dtype):
    n = 17
    target = build(SMALL[name][0], nq=n, heads=4, kv_heads=2, d=8)
    assert callable(target) and not isinstance(target, str), target
    q, k, v = torch.randn(2, 4, n, 8, dtype=dtype), torch.randn(2, 2, n, 8, dtype=dtype), torch.randn(2, 2, n, 8, dtype=dtype)
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., 12:] = False
    out = target(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    assert torch.isfinite(out).all()
    with FakeTensorMode():
        fq, fk = torch.randn(2, 4, n, 8, dtype=dtype), torch.randn(2, 2, n, 8, dtype=dtype)
        fout = target(fq, fk, fk, enable_gqa=True)
    assert fout.shape == (2, 4, n, 8) and fout.dtype == dtype
    if dtype == torch.float32:  # differentiable in q, k, v where it reads them (fine-tuning through the mixer)
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        target(qs, ks, vs, attn_mask=mask, enable_gqa=True).square().sum().backward()
        assert vs.grad is not None and vs.grad.abs().sum() > 0
        for t in (qs, ks, vs):
            assert t.grad is None or torch.isfinite(t.grad).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_layouts_3d_and_5d(name):
    """``(b h) n d`` inputs and extra leading batch dims give SDPA's shapes."""
    target = build(SMALL[name][0], nq=10, heads=4, kv_heads=2, d=8)
    q, k, v = torch.randn(6, 10, 8), torch.randn(6, 10, 8), torch.randn(6, 10, 5)
    assert target(q, k, v, attn_mask=torch.randn(6, 10, 10)).shape == (6, 10, 5)
    q, k, v = torch.randn(2, 3, 4, 10, 8), torch.randn(2, 3, 2, 10, 8), torch.randn(2, 3, 2, 10, 8)
    out = target(q, k, v, attn_mask=torch.ones(3, 1, 1, 10, dtype=torch.bool), enable_gqa=True)
    assert out.shape == (2, 3, 4, 10, 8)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_dropout_is_applied_never_ignored(name):
    target = build(SMALL[name][0], nq=12, heads=2, d=8)
    q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    without = target(q, k, v, dropout_p=0.0)
    assert torch.equal(target(q, k, v), without)
    torch.manual_seed(0)
    try:
        dropped = target(q, k, v, dropout_p=0.5)
    except RewriteError as err:  # a mixer without probabilities says so
        assert "dropout" in str(err)
        return
    assert dropped.shape == without.shape and not torch.allclose(dropped, without)


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


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_sink_keys_are_kept_exact_by_every_approximation(name):
    """A site with attention sinks (gpt-oss: extra keys of learned logits and zero values) is served only by exact
    attention: every other action declines with the reason, before its own requirements, and the site falls
    back to Exact with outputs equal to the original."""
    from test_wild_spellings import Sinks
    torch.manual_seed(0)
    model, x = Sinks(count=2).eval(), torch.randn(2, 12, 16)
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, 9:] = 0
    ref = copy.deepcopy(model)
    action = SETTINGS[name]
    rewrite.optimize(model, {"_default": action}, example_inputs=(x, padding))
    row = model.rewrite_report.sites[0]
    assert row.status == "rewritten", model.rewrite_report.table()
    if action.exact:
        assert "sink" not in (row.reason or "")
        assert [s.sinks for s in rewrite.find_attention(copy.deepcopy(ref), example_inputs=(x, padding))] == [2]
    else:
        assert f"the site has 2 attention sink keys (a learned logit every query sees, value 0), which {name} does " \
               "not model" in row.reason, row.reason
    with torch.no_grad():
        torch.testing.assert_close(model(x, padding), ref(x, padding), rtol=1e-5, atol=1e-5)
