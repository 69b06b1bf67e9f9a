"""A fast subset of the library sweeps (bench/bench_xtransformers.py, bench/bench_timm.py): a few configurations,
each rewritten and compared with the original at a second input size. Skipped with the reason when the library
is missing (scripts/setup.sh installs x-transformers with the test extra and timm into .deps/timm)."""
import copy
import os
import sys

import pytest
import torch

import rewrite

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import zoo_common  # noqa: E402 - the sweeps' shared helpers live in bench/

# each slow case captures and verifies a whole model twice: 20-80 s on this loaded 2-core machine
slow = pytest.mark.slow


def _timm():
    try:
        return zoo_common.import_timm()
    except ImportError as err:
        pytest.skip(f"timm is not installed ({err}); scripts/setup.sh puts it in .deps/timm")


def _tokens(n: int, padded: bool = True) -> dict:
    g = torch.Generator().manual_seed(n)
    batch = {"x": torch.randint(0, 50, (2, n), generator=g)}
    if padded:
        batch["mask"] = torch.ones(2, n, dtype=torch.bool)
        batch["mask"][1, -3:] = False
    return batch


def _xt(layers: str, **options):
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    attn_layers = getattr(xt, layers)(dim=32, depth=1, heads=4, attn_dim_head=8, **options)
    return xt.TransformerWrapper(num_tokens=50, max_seq_len=32, attn_layers=attn_layers).eval()


def _optimized_and_equal(model, first: dict, second: dict):
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_kwargs=first)
    with torch.no_grad():
        for batch in (first, second):
            assert zoo_common.same(ref(**batch), model(**batch))
    return rewrite.report(model)


@slow
def test_x_transformers_mqa_with_memory_and_zero_key_values():
    """One key/value head (``einsum('b h i d, b j d')``), learned memory key/values and a zero key/value
    concatenated to the keys, rotary positions: softmax(q kᵀ s + mask) v, so rewritten."""
    model = _xt("Encoder", attn_one_kv_head=True, attn_num_mem_kv=2, attn_add_zero_kv=True, rotary_pos_emb=True)
    rep = _optimized_and_equal(model, _tokens(12), _tokens(17))
    assert [r.status for r in rep.sites] == ["rewritten"], [r.reason for r in rep.sites]


@slow
def test_x_transformers_decoder_with_learned_sinks():
    """gpt-oss-style learned sinks (``repeat(sink, 'h -> b h i 1', b=sim.shape[0], ...)`` concatenated before the
    softmax) beside a padding and a causal fill of ``-finfo.max``: extra keys with zero values, rewritten also
    after the recapture with symbolic sizes (where the column reads the scores' shape)."""
    model = _xt("Decoder", attn_head_learned_sink=True)
    rep = _optimized_and_equal(model, _tokens(12), _tokens(17))
    assert not rep.rejected, [r.reason for r in rep.rejected]
    assert rep.sites and all(r.status == "rewritten" for r in rep.sites), [r.reason for r in rep.sites]


@slow
def test_x_transformers_talking_heads_are_not_attention_and_stay():
    model = _xt("Encoder", attn_pre_talking_heads=True)
    rep = _optimized_and_equal(model, _tokens(12), _tokens(17))
    assert not any(r.status == "rewritten" for r in rep.sites)


@slow
def test_timm_vision_transformer_with_fused_attention_off():
    timm = _timm()
    fused = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)   # read when the model is built: attention written out as q kᵀ, softmax, @ v
    try:
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False).eval()
    finally:
        timm.layers.set_fused_attn(fused)
    _, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(1, 3, h, w)
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    with torch.no_grad():
        assert zoo_common.same(ref(x), model(x))
    rows = rewrite.report(model).sites
    assert rows and all(r.status == "rewritten" for r in rows), [r.reason for r in rows]


def test_a_tiny_timm_vision_transformer():
    """The default suite's timm case (issue 15): one block of width 16 on a 32-pixel image (~1 s CPU here)."""
    timm = _timm()
    fused = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)
    try:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                                  embed_dim=16, num_heads=2).eval()
    finally:
        timm.layers.set_fused_attn(fused)
    x = torch.randn(1, 3, 32, 32)
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    assert [r.status for r in rewrite.report(model).sites] == ["rewritten"], rewrite.report(model).table()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_the_zoo_judge_calls_a_rewrite_held_at_the_example_shape_only_partial():
    """A site rewritten in the example's graph but not in the graph of the next shape leaves softmax ops at that
    shape: the row is PARTIAL with the counts, however FULL the report looks."""
    from types import SimpleNamespace
    report = SimpleNamespace(sites=[SimpleNamespace(status="rewritten", reason="")], rejected=[], graphs=2)
    held = zoo_common.judged("m", True, report, 1, left_by_shape=lambda: (0, 0))
    lost = zoo_common.judged("m", True, report, 1, left_by_shape=lambda: (0, 2))
    assert held["status"] == "FULL" and lost["status"] == "PARTIAL"
    assert "example's shape only: 2 softmax op(s)" in lost["why"]
