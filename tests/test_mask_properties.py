"""Property: whatever the mask construction, the optimized model equals the original on inputs that were not the
example's — fresh random masks with rows that see no key, and lengths past every window (issue 12).

A draw picks where the mask comes from (a bool, 0/1 integer or additive float input; a registered band buffer
sliced to the length; index arithmetic), whether it is a window, how it is applied (added, ``masked_fill``,
``where``), and the fill (a number or a 0-d buffer, from −∞ to values that take part in the softmax). The model
is optimized on an all-visible batch of one length, then called at other lengths with random masks: each site
is rewritten or rejected, never different.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewrite

SOURCES = ("input_bool", "input_long", "input_float", "buffer", "arange")
APPLY = ("add", "masked_fill", "where")
FILLS = (float("-inf"), torch.finfo(torch.float32).min, -1e9, -1e4, -30.0, -1.0)


class Masked(nn.Module):
    def __init__(self, source, apply, fill, fill_buffer, window, causal, dim=16, size=48):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.source, self.apply, self.window, self.causal = source, apply, window, causal
        self.fill_number = fill
        if fill_buffer:
            self.register_buffer("fill", torch.tensor(fill))
        else:
            self.fill = None
        i = torch.arange(size)
        keep = torch.ones(size, size, dtype=torch.bool)
        if causal:
            keep &= i[:, None] >= i[None, :]
        if window:
            keep &= (i[:, None] - i[None, :]).abs() < window
        self.register_buffer("band", keep)

    def _visible(self, n, mask):
        """True where a query may see a key, [B or 1, 1, n, n] or broadcastable."""
        if self.source == "buffer":
            return self.band[:n, :n]
        if self.source == "arange":
            i = torch.arange(n)
            keep = torch.ones(n, n, dtype=torch.bool)
            if self.causal:
                keep = keep & (i[:, None] >= i[None, :])
            if self.window:
                keep = keep & ((i[:, None] - i[None, :]).abs() < self.window)
            return keep
        if self.source == "input_long":
            return mask[:, None, None, :].bool()
        return mask  # input_bool: [B, 1, n, n]

    def forward(self, x, mask):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) / (d // 2) ** 0.5
        fill = self.fill if self.fill is not None else self.fill_number
        if self.source == "input_float":
            return torch.softmax(s + mask, -1) @ v           # an additive mask from the caller
        visible = self._visible(n, mask)
        if self.apply == "add":
            s = s + visible                                   # a bool *added*: 0 or 1
        elif self.apply == "masked_fill":
            s = s.masked_fill(~visible, fill)
        else:
            s = torch.where(visible, s, fill)
        return torch.softmax(s, -1) @ v


@st.composite
def constructions(draw):
    return dict(source=draw(st.sampled_from(SOURCES)), apply=draw(st.sampled_from(APPLY)),
                fill=draw(st.sampled_from(FILLS)), fill_buffer=draw(st.booleans()),
                window=draw(st.sampled_from([0, 1, 3, 7, 20])), causal=draw(st.booleans()))


def mask_for(cfg, b, n, gen, all_visible=False):
    if cfg["source"] == "input_long":
        m = torch.ones(b, n, dtype=torch.long) if all_visible else (torch.rand(b, n, generator=gen) > 0.3).long()
        if not all_visible:
            m[0] = 0  # a sequence with no key at all
        return m
    keep = torch.ones(b, 1, n, n, dtype=torch.bool) if all_visible else torch.rand(b, 1, n, n, generator=gen) > 0.4
    if not all_visible:
        keep[0, 0, 1] = False  # a query row that sees no key
        keep[-1, 0, 2] = True
    if cfg["source"] == "input_float":
        return torch.zeros(keep.shape).masked_fill(~keep, cfg["fill"])
    return keep


def _same(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=constructions())
def test_every_mask_construction_is_rewritten_or_rejected_never_different(cfg):
    model = Masked(**cfg).eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 16, generator=gen)
    rewrite.optimize(model, "exact", example_inputs=(x, mask_for(cfg, 2, 6, gen, all_visible=True)))
    assert model.rewrite_report.sites or model.rewrite_report.rejected
    with torch.no_grad():
        for n in (6, 9, 25, 40):  # past every window drawn
            for _ in range(2):
                x = torch.randn(2, n, 16, generator=gen)
                mask = mask_for(cfg, 2, n, gen)
                assert _same(model(x, mask), ref(x, mask)), (cfg, n, model.rewrite_report.table())
    assert not model.rewrite_report.fallbacks
