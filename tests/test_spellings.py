"""Every hand-written attention spelling in ``corpus.py`` through ``rewrite.optimize(..., "exact")``.

For each case (float32, and bfloat16 for the cases flagged ``bf16``): the optimized module must produce
the eager outputs (also after a change of sequence length), and the report must say what the case
expects: rewritten, kept, rejected with a reason, or nothing rewritten. Causality claims are checked
separately with ``find_attention``.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

from corpus import CASES, assert_outputs_close  # noqa: E402

import rewrite  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

PARAMS = [pytest.param(c, "fp32", id=f"{c.id}-fp32") for c in CASES] + \
         [pytest.param(c, "bf16", id=f"{c.id}-bf16") for c in CASES if c.bf16]


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(rep) -> str:
    rows = [(getattr(r, "name", None), getattr(r, "status", None), getattr(r, "reason", "")) for r in rep.sites]
    rej = [(getattr(r, "name", None), getattr(r, "reason", "")) for r in rep.rejected]
    return f"sites={rows} rejected={rej}"


def check_report(case, rep) -> None:
    """Assert that the report says what ``case.expect`` asks for."""
    rows = list(rep.sites)
    info = _describe(rep)
    if case.expect == "any":
        return
    if case.expect in ("rewrite", "kept"):
        want = "rewritten" if case.expect == "rewrite" else "kept"
        for name in case.sites:
            mine = [r for r in rows if r.name == name]
            assert mine, f"no site reported for {name!r}; {info}"
            assert all(r.status == want for r in mine), f"{name!r} not {want}; {info}"
        return
    if case.expect == "untouched":
        assert not [r for r in rows if r.status == "rewritten"], f"something was rewritten; {info}"
        return
    if case.expect == "reject":
        assert not [r for r in rows if r.name == case.site and r.status == "rewritten"], \
            f"{case.site!r} was rewritten although its intermediates are used elsewhere; {info}"
        rejected = [r for r in rep.rejected if r.name == case.site] + \
                   [r for r in rows if r.name == case.site and r.status == "rejected"]
        assert rejected, f"no rejection reported for {case.site!r}; {info}"
        reasons = [str(getattr(r, "reason", "") or "") for r in rejected]
        assert any(s.strip() for s in reasons), f"rejection of {case.site!r} without a reason; {info}"
        if case.reason:
            assert any(re.search(case.reason, s, re.IGNORECASE) for s in reasons), \
                f"rejection reason(s) {reasons} do not match /{case.reason}/"
        return
    raise AssertionError(f"unknown expect {case.expect!r}")


@pytest.mark.parametrize("case,dt", PARAMS)
def test_spelling(case, dt):
    dtype = DTYPES[dt]
    module, args = case.build(dtype)
    reference = copy.deepcopy(module)

    with torch.no_grad():
        expected = reference(*args)
    model = rewrite.optimize(module, "exact", example_inputs=args)
    assert model is module, "optimize must return the same module object"
    with torch.no_grad():
        got = model(*args)
    assert_outputs_close(got, expected, dtype, what=f"{case.id} output")
    for path in case.state:
        assert_outputs_close(_get(model, path), _get(reference, path), dtype, what=f"{case.id} {path}")

    if case.resize is not None:
        args2 = case.resize(dtype)
        with torch.no_grad():
            expected2 = reference(*args2)
            got2 = model(*args2)
        assert_outputs_close(got2, expected2, dtype, what=f"{case.id} output at a new length")
        for path in case.state:
            assert_outputs_close(_get(model, path), _get(reference, path), dtype,
                                 what=f"{case.id} {path} at a new length")

    rep = rewrite.report(model)
    assert getattr(model, "rewrite_report", None) is not None, "model.rewrite_report missing"
    check_report(case, rep)


CAUSAL_PARAMS = [pytest.param(c, id=c.id) for c in CASES if c.expect == "rewrite" or c.causal]


@pytest.mark.parametrize("case", CAUSAL_PARAMS)
def test_causal_claims(case):
    """is_causal is True exactly where the mask is provably causal (checked on the rewrite cases)."""
    module, args = case.build(torch.float32)
    sites = rewrite.find_attention(module, example_inputs=args)
    mine = [s for s in sites if s.name == case.site]
    assert mine, f"find_attention found nothing at {case.site!r}: {[(s.name, s.status) for s in sites]}"
    flags = [bool(s.is_causal) for s in mine]
    if case.causal:
        assert all(flags), f"{case.id}: mask is provably causal but is_causal={flags}"
    else:
        assert not any(flags), f"{case.id}: is_causal claimed for a mask that is not (only) causal"


def test_find_attention_does_not_change_outputs():
    """find_attention is analysis only: the module still runs eagerly with identical outputs."""
    case = next(c for c in CASES if c.id == "causal_nanogpt_buffer")
    module, args = case.build(torch.float32)
    with torch.no_grad():
        before = module(*args)
    rewrite.find_attention(module, example_inputs=args)
    with torch.no_grad():
        after = module(*args)
    assert torch.equal(before, after)
