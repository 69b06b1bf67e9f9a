"""Spellings found by the timm and x-transformers sweeps (bench/bench_timm.py, bench/bench_xtransformers.py)."""
import copy

import pytest
import torch

import rewrite


def _ids_and_mask(n: int):
    g = torch.Generator().manual_seed(n)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, -3:] = False
    return {"x": torch.randint(0, 50, (2, n), generator=g), "mask": mask}


@pytest.mark.slow   # ~10-30 s here: a real x-transformers capture twice (a hand-written module keeps its sizes
#                     as placeholders and does not reproduce the size() read)
def test_a_causal_mask_built_from_the_size_of_the_scores_is_proven_at_every_length():
    """x-transformers builds its causal mask as ``ones(i, j).triu(j - i + 1)`` with ``i, j = sim.shape[-2:]``
    after a key-padding fill with the dtype's lowest value. In the dynamic graph of a second length the sizes
    come from one ``size()`` read of the scores (an intermediate, not an input): the proof must evaluate that
    read at the captured sizes and at each probed length, or the mask counts as a second finite fill."""
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    model = xt.TransformerWrapper(num_tokens=50, max_seq_len=32,
                                  attn_layers=xt.Decoder(dim=32, depth=1, heads=2, attn_dim_head=16)).eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_kwargs=_ids_and_mask(12))
    with torch.no_grad():
        batch = _ids_and_mask(17)   # a new length: the dynamic graph
        torch.testing.assert_close(model(**batch), ref(**batch), rtol=1e-5, atol=1e-5)
    rep = rewrite.report(model)
    assert [r.status for r in rep.sites] == ["rewritten"], [r.reason for r in rep.sites]


def test_a_tiny_x_transformers_encoder_is_rewritten():
    """The default suite's x-transformers case (issue 15): one layer, two heads of 8, a padded key mask, one
    capture at one length (the sweeps in bench/ and the slow tests cover lengths, options and timm)."""
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    model = xt.TransformerWrapper(num_tokens=50, max_seq_len=16,
                                  attn_layers=xt.Encoder(dim=16, depth=1, heads=2, attn_dim_head=8)).eval()
    ref = copy.deepcopy(model)
    batch = _ids_and_mask(8)
    rewrite.optimize(model, "exact", example_kwargs=batch)
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), ref(**batch), rtol=1e-5, atol=1e-5)
