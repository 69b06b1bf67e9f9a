"""Eager-only checks of the attention corpus itself (no rewrite involved): it must be a sound fixture."""
from __future__ import annotations


import pytest
import torch

from corpus import CASES, EXPECTS, flatten  # noqa: E402


def test_catalogue_shape():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 50
    assert all(c.expect in EXPECTS for c in CASES)
    assert any(c.bf16 for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_runs_eagerly(case):
    for dtype in (torch.float32, torch.bfloat16):
        module, args = case.build(dtype)
        assert not module.training
        names = dict(module.named_modules())
        for site in case.sites:
            assert site in names, f"site {site!r} is not a submodule"
        _, args_again = case.build(dtype)
        with torch.no_grad():
            out = flatten(module(*args))
            again = flatten(module(*args_again))
            assert all(torch.isfinite(t.float()).all() for t in out)
            assert all(torch.equal(a, b) for a, b in zip(out, again)), "build is not deterministic"
            if case.resize is not None:
                assert all(torch.isfinite(t.float()).all() for t in flatten(module(*case.resize(dtype))))
        for a in args:
            if isinstance(a, torch.Tensor):
                assert max(a.shape, default=0) <= 128 and a.numel() <= 2 * 24 * 128, tuple(a.shape)


@pytest.mark.parametrize("case", [c for c in CASES if c.causal], ids=lambda c: c.id)
def test_causal_cases_are_causal(case):
    """Changing the last position of every input must leave all earlier output positions unchanged."""
    module, args = case.build(torch.float32)
    perturbed = tuple(a.clone() for a in args)
    for a in perturbed:
        if a.is_floating_point() and a.dim() == 4:
            a[:, :, -1, :] += 1.0  # q/k/v [B,H,N,D]
        elif a.is_floating_point() and a.dim() == 3:
            a[:, -1, :] += 1.0  # x [B,N,C]
    with torch.no_grad():
        o1, o2 = module(*args), module(*perturbed)
    seq_axis = 1 if o1.dim() == 3 else 2
    early1, early2 = o1.narrow(seq_axis, 0, o1.shape[seq_axis] - 1), o2.narrow(seq_axis, 0, o2.shape[seq_axis] - 1)
    assert torch.allclose(early1, early2, atol=1e-6)
    assert not torch.allclose(o1, o2)
