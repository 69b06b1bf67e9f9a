"""Fitting mixers on calibration data at a site whose q, k, v merge batch and heads (``[(b·h), N, D]``).

There the mixer sees one head per row, so its fitted state must be one set shared by every row: read as
``b·h`` heads, the state would change shape with the calibration batch size, be thrown away (re-fitted on
whatever batch comes first) or break on a batch of another size.
"""
import math

import pytest
import torch
from torch import nn

import rewrite
from rewrite.calibrate import CalibrationState, SiteSwitch, fit_candidates
from rewrite.mixers.kmeans_routing import KMeansRoutingAttention
from rewrite.mixers.shared_query import SharedQueryAttention

D, HEADS, N = 32, 4, 16


class Merged(nn.Module):
    """Self-attention written with batch and heads merged: torch.bmm on ``[(b·h), N, D/H]``, no mask."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def qkv_heads(self, x):
        b, n, _ = x.shape
        return [t.reshape(b, n, HEADS, D // HEADS).transpose(1, 2).reshape(b * HEADS, n, D // HEADS)
                for t in self.qkv(x).chunk(3, -1)]

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv_heads(x)
        a = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(D // HEADS), dim=-1)
        return x + self.out(torch.bmm(a, v).reshape(b, HEADS, n, D // HEADS).transpose(1, 2).reshape(b, n, D))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Merged() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def batch(b, seed):
    return torch.randn(b, N, D, generator=torch.Generator().manual_seed(seed))


def state_of(model, suffix):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(suffix)}


def test_kmeans_routing_calibrated_at_a_merged_heads_site_pools_every_batch():
    calibration = [batch(1, 1), batch(3, 2)]                    # different batch sizes
    model = Model().eval()
    # fitting is tested, not speed: chosen by FLOPs, so a mixer slower than SDPA at this tiny size is kept
    policy = rewrite.auto(max_error=10.0, candidates=[rewrite.KMeansRouting(clusters=2, window=4)], progress=False,
                          objective="flops")
    with torch.no_grad():
        rewrite.optimize(model, policy, example_inputs=(batch(2, 0),), calibration=calibration)
    rows = model.rewrite_report.sites
    assert [r.status for r in rows] == ["rewritten"] * 2 and rows[0].action.startswith("KMeansRouting")
    assert rows[0].heads is None and rows[0].shape.startswith("q(8, 16, 8)")   # a 3-D site, heads unknown

    # one set of centroids shared by every (batch, head) row, fitted on all calibration batches together
    centroids = state_of(model, "centroids")
    assert len(centroids) == 2 and all(c.shape == (1, 2, D // HEADS) for c in centroids.values())
    with torch.no_grad():
        qk = [model.layers[0].qkv_heads(x)[:2] for x in calibration]
        ref = KMeansRoutingAttention(2, 4).fit([q for q, _ in qk], [k for _, k in qk])
    torch.testing.assert_close(centroids["layers.0.rewrite_kmeansrouting_0.centroids"], ref.centroids)

    # batches of other sizes use them as they are (never re-fitted on the batch at hand)
    with torch.no_grad():
        for b in (5, 1):
            model(batch(b, 10 + b))
    for name, c in state_of(model, "centroids").items():
        assert torch.equal(c, centroids[name])


def test_shared_query_calibrated_at_a_merged_heads_site_serves_other_batch_sizes():
    model = Model().eval()
    # fitting is tested, not speed: chosen by FLOPs, so a mixer slower than SDPA at this tiny size is kept
    policy = rewrite.auto(max_error=10.0, candidates=[rewrite.SharedQuery(query="calibrated")], progress=False,
                          objective="flops")
    with torch.no_grad():
        rewrite.optimize(model, policy, example_inputs=(batch(2, 0),), calibration=[batch(2, 1), batch(2, 2)])
        assert all(r.action.startswith("SharedQuery") for r in model.rewrite_report.sites)
        sums = state_of(model, "q_sum")
        assert sums and all(s.shape == (1, 1, D // HEADS) for s in sums.values())
        assert model(batch(3, 3)).shape == (3, N, D)                 # not 2·4 "heads": any batch size serves


@pytest.mark.parametrize("sizes", [(1, 3), (2, 2)])
def test_fit_candidates_keeps_merged_rows_as_rows_and_per_head_inputs_per_head(sizes):
    state = CalibrationState()
    merged = SiteSwitch(("merged", 0), None, {"km": KMeansRoutingAttention(2, 4), "sq": SharedQueryAttention("calibrated")},
                        state)
    per_head = SiteSwitch(("heads", 0), None, {"km": KMeansRoutingAttention(2, 4)}, state)
    state.switches = {("merged", 0): [merged], ("heads", 0): [per_head]}
    gen = torch.Generator().manual_seed(0)
    for b in sizes:
        merged.fit_inputs.append(tuple(torch.randn(b * HEADS, N, 8, generator=gen) for _ in range(3)))
        per_head.fit_inputs.append(tuple(torch.randn(b, HEADS, N, 8, generator=gen) for _ in range(3)))
    merged.fit_inputs.append(tuple(torch.randn(HEADS, N // 2, 8, generator=gen) for _ in range(3)))  # shorter
    fitted = fit_candidates(state)
    assert fitted[(("merged", 0), "km")]["centroids"].shape == (1, 2, 8)
    assert fitted[(("merged", 0), "sq")]["q_sum"].shape == (1, 1, 8)
    # every recorded query counts, whatever its batch size or length
    count = sum(x[0].shape[0] * x[0].shape[1] for x in merged.fit_inputs)
    assert fitted[(("merged", 0), "sq")]["q_count"].item() == count
    assert fitted[(("heads", 0), "km")]["centroids"].shape == (HEADS, 2, 8)


# --- BlockRouting(per_head=True): every count's error from one pass of statistics ---------------------------

def _routed_errors(module, q, k, v, mask, causal):
    """The brute-force errors the one-pass fit stands for: the routed output at every count vs exact, on the
    body rows (sink rows attend to every key at any count)."""
    from rewrite.mixers import _dense, _layout
    c = _layout.canon(q, k, v, mask, None)
    body = slice(module.sinks, None)
    exact = _dense.sdpa_rows(c, c.k, c.v, c.bias, causal=causal)[..., body, :]
    nb = len(module._layout(q.shape[-2])[0])
    norm = exact.double().pow(2).sum((0, 2, 3, 4))
    return torch.stack([(module._attend(c, t, causal, 0.0)[..., body, :] - exact).double().pow(2).sum((0, 2, 3, 4))
                        / norm
                        for t in range(1, nb + 1)]).float()


@pytest.mark.parametrize("causal,sinks,summary,masked,n", [
    (False, 0, False, False, 48), (True, 0, False, False, 45), (False, 1, False, True, 43),
    (True, 2, True, False, 50), (False, 1, True, False, 40), (True, 0, False, True, 37)])
def test_block_routing_fit_statistics_equal_every_counts_routed_error(monkeypatch, causal, sinks, summary, masked, n):
    """With every query row sampled, the one-pass statistics give exactly the routed attention's error at every
    count (padding slots, sinks, causal sites, key-padding masks, pooled summaries)."""
    from rewrite.mixers import _layout, block_routing
    monkeypatch.setattr(block_routing, "FIT_ROWS_PER_BLOCK", 64)          # every row of every 8-token block
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) * 1.5 for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
        mask[0, ..., n - 7:] = False
    module = block_routing.BlockRoutingAttention(8, 2, causal=causal, sinks=sinks, summary=summary, per_head=True)
    c = _layout.canon(q, k, v, mask, None)
    fitted = block_routing.fit_errors(module, c, causal)
    torch.testing.assert_close(fitted, _routed_errors(module, q, k, v, mask, causal), rtol=1e-3, atol=1e-5)


def test_block_routing_fit_never_runs_the_routed_attention(monkeypatch):
    """The fit's cost does not grow with the number of counts: no routed pass per count."""
    from rewrite.mixers import block_routing
    module = block_routing.BlockRoutingAttention(16, 3, per_head=True)
    monkeypatch.setattr(module, "_attend", lambda *a, **kw: pytest.fail("fit ran the routed attention"))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 16, generator=gen) for _ in range(3))
    module.fit(q, k, v)
    assert module.head_topk.shape == (4,) and int(module.head_topk.sum()) == 12
