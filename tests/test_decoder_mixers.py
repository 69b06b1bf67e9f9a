"""Approximate mixers on decoders whose causal mask is built at run time (tiny GPT-2 and Llama, random weights).

With a padded batch, Hugging Face builds the causal and padding mask as one data-dependent tensor, so the
causal prover cannot see that the sites are causal. Every mixer must then either serve the site faithfully (no
later token may change an earlier position's output) or decline it, the report saying why; none may raise, in
``optimize`` or in ``generate()``.
"""
import hf_zoo
import pytest
import torch

import rewrite

# small sizes, so that every approximation really differs from exact attention at these 12-token batches
MIXERS = {
    "pool": rewrite.Pool(),
    "shared_query": rewrite.SharedQuery(),
    "shared_query_calibrated": rewrite.SharedQuery(query="calibrated"),
    "flow": rewrite.Flow(),
    "linear": rewrite.Linear(),
    "linear_favor": rewrite.Linear(feature="favor", features=16),
    "token_merge": rewrite.TokenMerge(r=3),
    "top_k": rewrite.TopK(k=4),
    "decay": rewrite.Decay(),
    "kmeans_routing": rewrite.KMeansRouting(clusters=2, window=4),
    "scatterbrain": rewrite.Scatterbrain(window=4, features=16),
    "block_routing": rewrite.BlockRouting(block=4, topk=1),
    "spectral": rewrite.Spectral(keep=4),
}
# mixers with no causal form: they must decline these sites
DECLINED = {"token_merge", "spectral"}
REL = 1e-4


def later_tokens_changed(batch):
    """The batch with a later token changed in each row: the last one, and (row 1, right-padded) token 5."""
    ids = batch["input_ids"].clone()
    ids[:, -1] = (ids[:, -1] + 7) % 100 + 3
    ids[1, 5] = (ids[1, 5] + 5) % 100 + 3
    return {**batch, "input_ids": ids}


def assert_rows(model, name):
    rows = model.rewrite_report.sites
    assert len(rows) == 2
    for row in rows:
        if name in DECLINED:
            assert row.action.startswith("Exact") and "declined" in row.reason, (row.action, row.reason)
            assert "mask" in row.reason and "example batch" in row.reason
        else:
            assert row.status == "rewritten" and row.action == MIXERS[name].describe(), (row.action, row.reason)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixer_on_a_decoder_with_a_run_time_causal_mask(name):
    z = hf_zoo.build("gpt2_lm")
    batch = z.example_kwargs                      # right-padded second row: the mask is built at run time
    with torch.no_grad():
        ref = z.run()
        rewrite.optimize(z.model, {"_default": MIXERS[name]}, example_kwargs=batch)
        assert_rows(z.model, name)
        out = z.run()
        moved = z.output_of(z.model(**later_tokens_changed(batch)))
    assert not any(row.is_causal for row in z.model.rewrite_report.sites)   # not proven: seen at run time only
    # no position sees a later token: row 0 before its last token, row 1 before token 5
    torch.testing.assert_close(moved[0, :-1], out[0, :-1], rtol=REL, atol=REL)
    torch.testing.assert_close(moved[1, :5], out[1, :5], rtol=REL, atol=REL)
    if name in DECLINED:
        torch.testing.assert_close(out, ref, rtol=REL, atol=REL)
    else:
        assert not torch.allclose(out, ref, atol=1e-3)                    # the approximation really runs


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixer_on_llama_generate(name):
    z = hf_zoo.build("llama_lm")
    with torch.no_grad():
        rewrite.optimize(z.model, {"_default": MIXERS[name]}, example_kwargs=z.example_kwargs)
        assert_rows(z.model, name)
        for inputs in (z.generate_inputs, z.generate_batch):
            ids = z.model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
            assert ids.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 4)
    assert not rewrite.api.model_session(z.model).errors


def test_spectral_declines_the_sites_and_keeps_the_outputs():
    z = hf_zoo.build("gpt2_lm")
    with torch.no_grad():
        ref = z.run()
        rewrite.optimize(z.model, {"_default": rewrite.Spectral()}, example_kwargs=z.example_kwargs)
        torch.testing.assert_close(z.run(), ref, rtol=REL, atol=REL)
    for row in z.model.rewrite_report.sites:
        assert row.exact and "Spectral declined" in row.reason and "causal mask" in row.reason


def test_spectral_on_llama_generate_keeps_the_tokens():
    z, ref = hf_zoo.build("llama_lm"), hf_zoo.build("llama_lm").model
    with torch.no_grad():
        rewrite.optimize(z.model, {"_default": rewrite.Spectral()}, example_kwargs=z.example_kwargs)
        assert_rows(z.model, "spectral")
        inputs = z.generate_batch                              # left-padded prompts: causal and padding mask
        kw = {"max_new_tokens": 4, "do_sample": False, "use_cache": True, "pad_token_id": 0}
        assert torch.equal(z.model.generate(**inputs, **kw), ref.generate(**inputs, **kw))
