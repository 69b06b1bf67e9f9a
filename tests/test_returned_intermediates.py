"""Attention modules that return their probabilities beside the output, with a graph break between the attention
and the caller that drops them: the captured graph returns the probabilities, so on its own it cannot be rewritten.
``optimize`` then captures with nested graph breaks, where the graph after the break goes on into the caller."""
import copy

import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite.capture import NESTS_GRAPH_BREAKS

pytestmark = pytest.mark.skipif(not NESTS_GRAPH_BREAKS, reason="this torch has no nested graph breaks")


class SegmentAttention(nn.Module):
    """Attention within segments whose lengths are read from a tensor (packed images, as Qwen-VL-style vision
    towers write it); returns ``(output, probabilities)``."""

    def __init__(self, dim=32, heads=4, explicit_break=False):
        super().__init__()
        self.heads, self.explicit_break = heads, explicit_break
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens):
        n, dim = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        if self.explicit_break:
            torch._dynamo.graph_break()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        outs, weights = [], []
        for qs, ks, vs in zip(*(torch.split(t, lengths, dim=1) for t in (q, k, v))):
            probs = torch.softmax(qs @ ks.transpose(-1, -2) * (dim // self.heads) ** -0.5, dim=-1)
            outs.append(probs @ vs)
            weights.append(probs)
        out = torch.cat(outs, dim=1).transpose(0, 1).reshape(n, dim)
        return self.out(out), weights


class Layer(nn.Module):
    def __init__(self, dim=32, explicit_break=False, keep_weights=False):
        super().__init__()
        self.attn = SegmentAttention(dim, explicit_break=explicit_break)
        self.norm = nn.LayerNorm(dim)
        self.keep_weights = keep_weights

    def forward(self, x, cu_seqlens):
        h, weights = self.attn(self.norm(x), cu_seqlens)
        return (x + h, weights) if self.keep_weights else (x + h, None)


class Tower(nn.Module):
    def __init__(self, layers=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(Layer(**kw) for _ in range(layers))

    def forward(self, x, cu_seqlens):
        kept = []
        for layer in self.layers:
            x, weights = layer(x, cu_seqlens)
            kept.append(weights)
        return x if kept[0] is None else (x, kept)


def _inputs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(lengths)).cumsum(0)
    return torch.randn(int(cu[-1]), 32, generator=gen), cu


@pytest.mark.parametrize("explicit_break", [True, False])
def test_probabilities_dropped_after_a_graph_break_are_rewritten(explicit_break):
    torch.manual_seed(0)
    model = Tower(explicit_break=explicit_break).eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=_inputs([6, 10]))
    report = model.rewrite_report
    assert report.sites and all(r.status == "rewritten" for r in report.sites), str(report)
    assert not report.rejected
    with torch.no_grad():
        for lengths in ([6, 10], [3, 9, 4], [16], [7, 1, 12]):
            x, cu = _inputs(lengths, seed=len(lengths))
            torch.testing.assert_close(model(x, cu), ref(x, cu), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)   # the copy captures with nested breaks too
    with torch.no_grad():
        x, cu = _inputs([5, 11], seed=9)
        torch.testing.assert_close(twin(x, cu), ref(x, cu), rtol=1e-5, atol=1e-5)
    assert twin.__dict__["_rewrite"].nested_breaks == model.__dict__["_rewrite"].nested_breaks


def test_probabilities_the_model_returns_are_kept():
    """The caller returns the probabilities: nesting rewrites nothing more, so the plain capture stays, the region
    is rejected with the reason, and every output (the probabilities too) equals the original's."""
    torch.manual_seed(0)
    model = Tower(explicit_break=True, keep_weights=True).eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=_inputs([6, 10]))
    report = model.rewrite_report
    assert report.rejected and all("graph returns them" in r.reason for r in report.rejected)
    assert not any(r.status == "rewritten" for r in report.sites)
    assert not model.__dict__["_rewrite"].nested_breaks and not report.capture_notes
    with torch.no_grad():
        x, cu = _inputs([4, 12], seed=3)
        torch.testing.assert_close(model(x, cu), ref(x, cu))


def test_calibration_sees_the_sites_that_need_nested_breaks():
    """``auto`` calibrates on the same capture optimize would make: the sites behind a graph break are measured
    (here every candidate is slower than exact, so the plan stays exact) and rewritten."""
    import policy_timers
    from rewrite.calibrate import candidate_key
    candidates = [rewrite.SlidingWindow(window=4, sinks=1)]
    slow = policy_timers.table_timer({candidate_key(c): 2.0 for c in candidates}, exact_ms=1.0)
    torch.manual_seed(0)
    model = Tower(explicit_break=True).eval()
    rewrite.optimize(model, rewrite.auto(max_error=0.5, candidates=candidates, progress=False, timer=slow),
                     example_inputs=_inputs([6, 10]), calibration=[_inputs([5, 11], seed=1)])
    report = model.rewrite_report
    assert report.calibration.rows and "nothing pays off" in report.calibration.message
    assert report.sites and all(r.status == "rewritten" for r in report.sites), str(report)
