"""Optimized models in a user's process: many models, shapes, dtypes, copies, hooks and threads in one process,
with no Dynamo reset anywhere (issue 16)."""
import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite.actions import RewriteError


class Attn(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v


class Block(nn.Module):
    """A small self-attention block whose width and heads vary, so that each instance is a distinct model."""

    def __init__(self, dim: int = 32, heads: int = 4, seed: int = 0, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.drop(torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1))
        return self.out((p @ v).transpose(1, 2).reshape(b, n, d))


class Net(nn.Module):
    def __init__(self, dim=32, heads=4, layers=2, seed=0, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, heads, seed + i, dropout) for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def sdpa_calls(model, *args):
    """How many scaled_dot_product_attention and softmax calls a forward makes (the rewrite's fingerprint).
    The profiler, not a dispatch mode: Dynamo runs frames uncompiled under a user's TorchDispatchMode."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(*args)

    def inside_sdpa(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name == "aten::scaled_dot_product_attention":
                return True
            parent = parent.cpu_parent
        return False

    events = list(prof.events())
    return (sum(e.name == "aten::scaled_dot_product_attention" for e in events),
            sum(e.name == "aten::_softmax" and not inside_sdpa(e) for e in events))


def test_the_reproducer_optimizes_every_model():
    """The issue's reproducer: a dozen models of one class; the ninth used to find no graph at all."""
    x = torch.randn(1, 2, 8, 16)
    models = [rewrite.optimize(Attn(), "exact", example_inputs=(x, x, x)) for _ in range(12)]
    for m in models:
        assert [r.status for r in m.rewrite_report.sites] == ["rewritten"]
        assert not m.rewrite_report.fallbacks
        assert sdpa_calls(m, x, x, x) == (1, 0)


@pytest.mark.slow
def test_two_hundred_models_in_one_process():
    x = torch.randn(1, 2, 8, 16)
    for i in range(200):
        m = rewrite.optimize(Attn(), "exact", example_inputs=(x, x, x))
        assert m.rewrite_report.counts()["rewritten"] == 1, i
    assert sdpa_calls(m, x, x, x) == (1, 0)


@pytest.mark.slow
def test_find_attention_on_fifty_instances_of_one_class():
    x = torch.randn(2, 6, 32)
    for i in range(50):
        sites = rewrite.find_attention(Net(seed=i), example_inputs=(x,))
        assert [s.name for s in sites] == ["layers.0", "layers.1"], i


def test_fifty_models_then_the_first_at_thirty_lengths_and_two_dtypes():
    dims = [(32, 4), (48, 4), (64, 8), (32, 2), (24, 3)]
    originals, models = [], []
    for i in range(50):
        dim, heads = dims[i % len(dims)]
        m = Net(dim, heads, layers=1 + i % 3, seed=i).eval()
        originals.append(copy.deepcopy(m))
        models.append(rewrite.optimize(m, "exact", example_inputs=(torch.randn(2, 8, dim),)))
    first, ref = models[0], originals[0]
    with torch.no_grad():
        for n in range(9, 39):
            x = torch.randn(1 + n % 3, n, 32)
            torch.testing.assert_close(first(x), ref(x), rtol=1e-5, atol=1e-5)
        for dtype, tol in ((torch.float64, 1e-10), (torch.bfloat16, 3e-2)):
            first.to(dtype), ref.to(dtype)
            x = torch.randn(2, 17, 32, dtype=dtype)
            torch.testing.assert_close(first(x), ref(x), rtol=tol, atol=tol)
            assert sdpa_calls(first, x) == (len(first.layers), 0)
    rep = rewrite.report(first)
    assert not rep.fallbacks
    assert all(r.status == "rewritten" for r in rep.sites)
    assert rep.recompiles <= 4, rep.recompiles  # one for dynamic lengths, one per dtype: bounded by design
    assert "recompile(s)" in rep.table()


def test_each_model_has_its_own_recompile_limit():
    """A tiny limit on one model, hit by new dtypes, falls back visibly; another model is not affected."""
    small = rewrite.optimize(Net().eval(), "exact", example_inputs=(torch.randn(2, 8, 32),), recompile_limit=1)
    other = rewrite.optimize(Net().eval(), "exact", example_inputs=(torch.randn(2, 8, 32),))
    ref = copy.deepcopy(Net().eval())
    small.to(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = small(torch.randn(2, 8, 32, dtype=torch.float64))
    assert out.dtype == torch.float64
    rows = rewrite.report(small).fallbacks
    assert rows and sum(r.calls for r in rows) >= 1, rewrite.report(small).table()
    assert any("rewrite:" in str(w.message) for w in caught)
    with torch.no_grad():
        x = torch.randn(3, 11, 32)
        torch.testing.assert_close(other(x), ref(x), rtol=1e-5, atol=1e-5)
    assert not rewrite.report(other).fallbacks
    with pytest.raises(RewriteError, match="recompile_limit"):
        rewrite.optimize(Net(), "exact", example_inputs=(torch.randn(2, 8, 32),), recompile_limit=0)


def test_untraceable_new_shape_falls_back_with_a_report_entry():
    """UnivNet draws noise with sizes taken from its input: Dynamo cannot trace a second batch size (neither can
    plain torch.compile). The model still runs at every shape, with a warning and a report row."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.UnivNetConfig(model_in_channels=8, model_hidden_channels=8, num_mel_bins=16,
                                     resblock_kernel_sizes=[3], resblock_stride_sizes=[2],
                                     resblock_dilation_sizes=[[1]], kernel_predictor_num_blocks=1,
                                     kernel_predictor_hidden_channels=8)
    model = transformers.UnivNetModel(cfg).eval()
    rewrite.optimize(model, "exact", example_kwargs={"input_features": torch.randn(1, 10, 16)})
    with pytest.warns(RuntimeWarning, match="could not trace"):
        with torch.no_grad():
            out = model(input_features=torch.randn(2, 10, 16))[0]
    assert out.shape[0] == 2
    with torch.no_grad():
        model(input_features=torch.randn(2, 10, 16))  # the same shape again: straight to the original code
    rows = rewrite.report(model).fallbacks
    assert len(rows) == 1 and rows[0].calls == 2 and "could not trace" in rows[0].why
    assert "Fallbacks to the original code" in rewrite.report(model).table()
    assert rewrite.report(model).to_json()["fallbacks"][0]["calls"] == 2


def test_a_call_that_runs_no_rewritten_graph_is_recorded():
    """Whatever makes Dynamo run the whole frame uncompiled, the report counts it and the user is warned."""
    m = rewrite.optimize(Net().eval(), "exact", example_inputs=(torch.randn(2, 8, 32),))
    with torch.compiler.set_stance("force_eager"):
        with pytest.warns(RuntimeWarning, match="without any of its rewritten graphs"):
            with torch.no_grad():
                m(torch.randn(2, 8, 32))
    assert rewrite.report(m).fallbacks[0].calls == 1


# --- what users do after optimize ------------------------------------------------------------------------

WINDOW = {"_default": rewrite.SlidingWindow(window=2)}


def _windowed(seed=0):
    ref = Net(seed=seed).eval()
    model = rewrite.optimize(copy.deepcopy(ref), WINDOW, example_inputs=(torch.randn(2, 16, 32),))
    return ref, model


def test_deepcopy_is_still_rewritten_with_its_own_capture():
    ref, model = _windowed()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        want = model(x)
        assert (want - ref(x)).abs().max() > 1e-3  # the window changes the output: the rewrite is visible
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(x), want)
    assert twin.rewrite_report is not model.rewrite_report
    assert [r.status for r in twin.rewrite_report.sites] == ["rewritten", "rewritten"]
    assert twin.rewrite_report.graphs >= 1  # the copy compiled (and verified) graphs of its own
    # the copy is independent: new weights in the copy change the copy only
    with torch.no_grad():
        twin.layers[0].out.weight.zero_()
        torch.testing.assert_close(model(x), want)
        assert (twin(x) - want).abs().max() > 1e-4


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickling_keeps_the_rewrite(how):
    ref, model = _windowed(seed=3)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        want = model(x)
    if how == "pickle":
        again = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again(x), want)
        assert sdpa_calls(again, x)[1] == 0  # no softmax left: the windowed mixers run
    assert [r.status for r in rewrite.report(again).sites] == ["rewritten", "rewritten"]


def test_pickling_a_model_with_a_callable_policy_stores_its_plan():
    x = torch.randn(2, 8, 32)
    model = rewrite.optimize(Net().eval(), lambda sites: {s.name: rewrite.Exact() for s in sites[:1]},
                             example_inputs=(x,))
    again = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        again(x)
        assert sdpa_calls(again, x) == (1, 1)
    assert [r.status for r in rewrite.report(again).sites] == ["rewritten", "kept"]


def test_state_dict_round_trip_with_a_plain_model():
    ref, model = Net(seed=5).eval(), rewrite.optimize(Net(seed=6).eval(), "exact",
                                                         example_inputs=(torch.randn(2, 8, 32),))
    x = torch.randn(2, 9, 32)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        fresh = Net(seed=7).eval()
        model.load_state_dict(fresh.state_dict())
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-5, atol=1e-5)


def test_forward_hooks_registered_after_optimize_fire():
    ref = Net().eval()
    model = rewrite.optimize(Net().eval(), "exact", example_inputs=(torch.randn(2, 8, 32),))
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        before = model(x)
        seen = []
        handle = model.layers[1].register_forward_hook(lambda mod, inp, out: seen.append(1) or out * 0)
        torch.testing.assert_close(model(x), x + ref.layers[0](x), rtol=1e-5, atol=1e-5)  # layer 1 silenced
        assert seen, "the hook fired"
        handle.remove()
        torch.testing.assert_close(model(x), before)
        pre = model.layers[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
        h = 2 * x
        torch.testing.assert_close(model(x), x + ref.layers[0](h) + ref.layers[1](x + ref.layers[0](h)),
                                   rtol=1e-5, atol=1e-5)
        pre.remove()
    assert sdpa_calls(model, x) == (2, 0)


def test_torch_compile_on_top_keeps_the_rewrite():
    ref, model = _windowed(seed=1)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(compiled(x), want)


def test_torch_export_of_an_optimized_model_is_a_clear_error():
    model = rewrite.optimize(Net().eval(), "exact", example_inputs=(torch.randn(2, 8, 32),))
    with pytest.raises(Exception, match="rewrite apply|capture='export'"):
        torch.export.export(model, (torch.randn(2, 8, 32),))


def test_optimize_twice_replaces_the_first():
    ref, model = _windowed(seed=2)
    x = torch.randn(2, 16, 32)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert [r.action.split("(")[0] for r in model.rewrite_report.sites] == ["Exact", "Exact"]


def test_train_eval_switching_with_dropout():
    model = rewrite.optimize(Net(dropout=0.5).eval(), "exact", example_inputs=(torch.randn(2, 8, 32),))
    ref = Net(dropout=0.5).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        model.train()
        a, b = model(x), model(x)
        assert (a - b).abs().max() > 1e-4, "dropout is live in training"
        model.eval()
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert not rewrite.report(model).fallbacks


def test_inference_mode():
    ref, model = Net().eval(), rewrite.optimize(Net().eval(), "exact", example_inputs=(torch.randn(2, 8, 32),))
    x = torch.randn(2, 8, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_two_threads_call_one_model():
    ref, model = _windowed(seed=4)
    inputs = [torch.randn(2, 16, 32) for _ in range(8)]
    with torch.no_grad():
        single = [model(x) for x in inputs]
    results: dict = {}

    def work(tid):
        with torch.no_grad():
            results[tid] = [model(x) for x in inputs]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tid in range(2):
        for got, want in zip(results[tid], single):
            torch.testing.assert_close(got, want)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is back


def test_after_the_users_own_dynamo_reset():
    """A user's own ``torch._dynamo.reset()``: the model recompiles through the pipeline and is right. Run in a
    process of its own, so the reset does not empty the caches the rest of this suite runs against."""
    code = textwrap.dedent("""
        import copy, torch, rewrite
        from test_process import WINDOW, Net
        ref = Net(seed=8).eval()
        model = rewrite.optimize(copy.deepcopy(ref), WINDOW, example_inputs=(torch.randn(2, 16, 32),))
        x = torch.randn(2, 16, 32)
        with torch.no_grad():
            want = model(x)
            torch._dynamo.reset()
            torch.testing.assert_close(model(x), want)
        assert not rewrite.report(model).fallbacks
        print("ok")
    """)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_policy_callable_that_raises_is_an_error_and_leaves_the_model():
    def bad(sites):
        raise ValueError("no plan today")

    model = Net().eval()
    with pytest.raises(RewriteError, match="raised ValueError: no plan today"):
        rewrite.optimize(model, bad, example_inputs=(torch.randn(2, 8, 32),))
    assert model._compiled_call_impl is None and not hasattr(model, "rewrite_report")


# --- every entry point runs the rewrite --------------------------------------------------------------------

def _seq2seq(kind):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    if kind == "whisper":
        cfg = tf.WhisperConfig(num_mel_bins=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                               decoder_attention_heads=4, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               max_source_positions=16, max_target_positions=32, init_std=0.1, **common)
        model = tf.WhisperForConditionalGeneration(cfg)
        inputs = {"input_features": torch.randn(2, 8, 32)}
    elif kind == "bart":
        cfg = tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_position_embeddings=64, init_std=0.1, forced_eos_token_id=None, **common)
        model = tf.BartForConditionalGeneration(cfg)
        inputs = {"input_ids": torch.randint(3, 96, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
        inputs["attention_mask"][1, -3:] = 0
    else:
        cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                          initializer_factor=2.0)
        model = tf.T5ForConditionalGeneration(cfg)
        inputs = {"input_ids": torch.randint(3, 96, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    model.config._attn_implementation = "eager"
    return model.eval(), inputs


@pytest.mark.parametrize("kind", [pytest.param("whisper", marks=pytest.mark.slow), "bart",
                                  pytest.param("t5", marks=pytest.mark.slow)])
def test_generate_runs_the_rewritten_encoder(kind):
    """generate() calls model.get_encoder()(...) directly, outside the model's forward: that call is rewritten
    too (the encoder has an entry point of its own), and the report's claim holds for what generate ran."""
    model, inputs = _seq2seq(kind)
    ref = copy.deepcopy(model)
    decoder_ids = torch.full((2, 3), model.config.decoder_start_token_id, dtype=torch.long)
    policy = {r"re:(model\.)?encoder\..*": rewrite.SlidingWindow(window=2), "_default": rewrite.Exact()}
    rewrite.optimize(model, policy, example_kwargs={**inputs, "decoder_input_ids": decoder_ids})
    rows = {r.name: r for r in model.rewrite_report.sites}
    encoder = [r for name, r in rows.items() if "encoder." in name and "EncDec" not in name]
    assert encoder and all(r.status == "rewritten" for r in encoder), model.rewrite_report.table()
    assert all(r.status in ("rewritten", "kept") for r in rows.values()), model.rewrite_report.table()
    with torch.no_grad():
        direct = model.get_encoder()(**inputs).last_hidden_state
        via_forward = model(**inputs, decoder_input_ids=decoder_ids).encoder_last_hidden_state
        original = ref.get_encoder()(**inputs).last_hidden_state
        torch.testing.assert_close(direct, via_forward, rtol=1e-5, atol=1e-5)
        assert (direct - original).abs().max() > 1e-3, "the window changed the encoder"
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_hidden_states=True)
        torch.testing.assert_close(out.encoder_hidden_states[-1], direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [pytest.param("whisper", marks=pytest.mark.slow),
                                  pytest.param("bart", marks=pytest.mark.slow), "t5"])
def test_generate_exact_gives_the_same_tokens(kind):
    model, inputs = _seq2seq(kind)
    ref = copy.deepcopy(model)
    decoder_ids = torch.full((2, 3), model.config.decoder_start_token_id, dtype=torch.long)
    rewrite.optimize(model, "exact", example_kwargs={**inputs, "decoder_input_ids": decoder_ids})
    with torch.no_grad():
        want = ref.generate(**inputs, max_new_tokens=5, do_sample=False)
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    assert not model.rewrite_report.fallbacks


def test_a_data_dependent_shape_after_attention_does_not_break_the_graph():
    """A mixture of experts picks tokens with ``nonzero`` after the attention, whose layer returns its
    probabilities to a caller that drops them. Broken there, the probabilities would cross into the next graph
    as an output and the site would have to stay; traced, the layer is one graph and the site is rewritten. The
    user's own Dynamo settings are back afterwards."""
    import torch._dynamo.config as dynamo_config

    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.expert = nn.Linear(32, 96), nn.Linear(32, 32)

        def attention(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            p = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
            return (p @ v).transpose(1, 2).reshape(b, n, 32), p

        def forward(self, x):
            h, _ = self.attention(x)
            rows = (h.sum(-1) > 0).nonzero()
            routed = torch.zeros_like(h)
            routed[rows[:, 0], rows[:, 1]] = self.expert(h[rows[:, 0], rows[:, 1]])
            return h + routed

    before = dynamo_config.capture_dynamic_output_shape_ops
    model = Routed().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 7, 32)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    rep = model.rewrite_report
    assert [r.status for r in rep.sites] == ["rewritten"] and not rep.breaks, rep.table()
    with torch.no_grad():
        for n in (7, 12):
            y = torch.randn(3, n, 32)
            torch.testing.assert_close(model(y), ref(y), rtol=1e-5, atol=1e-5)
    assert dynamo_config.capture_dynamic_output_shape_ops == before


def test_code_that_branches_on_a_data_dependent_size_is_still_captured():
    """Python that branches on the size of a ``nonzero`` cannot be traced with data-dependent shapes; the
    capture then breaks the graph there (as Dynamo does by default), and the attention is still rewritten."""
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(32, 96)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            out = ((q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v).transpose(1, 2).reshape(b, n, 32)
            picked = (out.sum(-1) > 0).nonzero()
            if picked.shape[0] == 0:
                return out
            return out * (1 + picked.shape[0] / out.numel())

    model = Branching().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 7, 32)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        for n in (7, 12):
            y = torch.randn(3, n, 32)
            torch.testing.assert_close(model(y), ref(y), rtol=1e-5, atol=1e-5)
    assert not model.rewrite_report.fallbacks


def test_a_capture_that_fails_with_data_dependent_tracing_retries_without_it(monkeypatch):
    """Some models' code cannot be traced with data-dependent shapes at all (HF's Mimi: an internal Dynamo
    error; LFM's vision tower: a guard on an unbacked size): the capture retries the call with that tracing off,
    for good, instead of failing ``optimize``."""
    import contextlib

    from rewrite import capture as capture_module
    seen = []

    def failing_when_on(on):
        seen.append(on)
        if on:
            raise torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode("Eq(u0, 0)")
        return contextlib.nullcontext()

    monkeypatch.setattr(capture_module, "data_dependent_tracing", failing_when_on)
    model = Block().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 7, 32)
    rewrite.optimize(model, "exact", example_inputs=(x,))
    assert seen[:2] == [True, False] and set(seen[2:]) <= {False}, seen
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"], model.rewrite_report.table()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)



def test_a_few_image_sizes_compile_static_graphs_then_dynamic():
    """Window attention over an image: each of the first image sizes gets a static graph (Dynamo's symbolic
    height and width make window partitioning take minutes to trace); past ``STATIC_IMAGE_SIZES`` sizes the
    model gets one dynamic graph instead of a recompile per size. Outputs equal the original's at every size."""
    from rewrite.capture import STATIC_IMAGE_SIZES

    class Windows(nn.Module):
        def __init__(self, window=4):
            super().__init__()
            self.window, self.embed, self.qkv = window, nn.Conv2d(3, 16, 2, 2), nn.Linear(16, 48)

        def forward(self, image):
            x = self.embed(image).permute(0, 2, 3, 1)                       # [B, H, W, C]
            b, h, w, c = x.shape
            s = self.window
            x = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
            q, k, v = self.qkv(x).view(x.shape[0], s * s, 3, 2, 8).permute(2, 0, 3, 1, 4)
            out = ((q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v).transpose(1, 2).reshape(-1, s * s, c)
            return out.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)

    model = Windows().eval()
    ref = copy.deepcopy(model)
    rewrite.optimize(model, "exact", example_inputs=(torch.randn(1, 3, 16, 16),))
    sizes = [16, 24, 32, 40, 48, 56, 64][: STATIC_IMAGE_SIZES + 3]
    with torch.no_grad():
        for side in sizes:
            image = torch.randn(2, 3, side, side)
            torch.testing.assert_close(model(image), ref(image), rtol=1e-5, atol=1e-5)
    rep = model.rewrite_report
    assert not rep.fallbacks and {r.status for r in rep.sites} == {"rewritten"}, rep.table()
    # a static graph for each of the first sizes (the batch of 2 after the example's 1 is one more), then one
    # dynamic graph covers the rest
    assert STATIC_IMAGE_SIZES <= rep.recompiles <= STATIC_IMAGE_SIZES + 2, rep.recompiles


# --- a root Dynamo cannot trace: its encoder and decoder are captured on their own ---------------------------

def _untraceable_mask(ids, rows, cols):
    """UDOP's pattern: a bool mask set at tuples of 0-d index tensors, which Dynamo's fake tensors cannot run."""
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[(tuple(rows.unbind()), tuple(cols.unbind()))] = True
    return mask[..., None].float()


class _UntraceableStack(nn.Module):
    """UDOP's encoder: the untraceable mask inside, its blocks in a module list."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.blocks = nn.ModuleList([Block(16, seed=1), Block(16, seed=2)])

    def forward(self, ids, rows, cols):
        x = self.embed(ids) * (1 + _untraceable_mask(ids, rows, cols))
        for block in self.blocks:
            x = block(x)
        return x


class _UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _UntraceableStack()
        self.decoder = nn.Sequential(Block(16, seed=3))

    def forward(self, ids, rows, cols):
        return self.decoder(self.encoder(ids, rows, cols) * (1 + _untraceable_mask(ids, rows, cols)))


def test_a_root_dynamo_cannot_trace_has_its_children_captured():
    """The root and its encoder cannot be traced: the decoder and the encoder's blocks are captured on their own."""
    torch.manual_seed(0)
    model = _UntraceableRoot().eval()
    inputs = (torch.randint(0, 10, (2, 6)), torch.tensor([0, 1, 1]), torch.tensor([2, 3, 0]))
    with torch.no_grad():
        ref = model(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rewrite.optimize(model, "exact", example_inputs=inputs)
        report = model.rewrite_report
        assert [r.status for r in report.sites] == ["rewritten"] * 3, report.table()
        whys = {f.where: f.why for f in report.fallbacks}
        assert "submodules encoder, decoder captured on their own" in whys["(model)"], whys
        assert "submodules encoder.blocks.0, encoder.blocks.1 captured on their own" in whys["encoder"], whys
        other = (torch.randint(0, 10, (3, 9)), torch.tensor([2, 0]), torch.tensor([8, 1]))
        with torch.no_grad():
            out = model(*other)  # a new length: captured and verified again
            with torch.profiler.profile() as prof:
                model(*other)
    assert sum(e.name == "aten::scaled_dot_product_attention" for e in prof.events()) == 3
    model2 = _UntraceableRoot().eval()
    model2.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), ref)
        torch.testing.assert_close(out, model2(*other))
