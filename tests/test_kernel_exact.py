"""``Exact(kernel="triton")`` end to end: a model rewritten onto ``rewrite::flash_attention``.

Without CUDA the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` + ``REWRITE_MIXER_KERNELS=1``, the
same switch the mixers use), so the whole path (handler, graph call, kernel, verification) is exercised on CPU.
"""
from kernel_env import DEVICE  # noqa: I001 - first: switches on Triton's interpreter without CUDA

import copy
import importlib

import pytest
import torch

import hf_zoo
import rewrite
from rewrite import Exact

_FLASH = importlib.import_module("rewrite.kernels.flash_attention")


@pytest.fixture
def flash_calls(monkeypatch):
    """Records the arguments of every kernel-op call, with the kernels switched on for CPU tensors."""
    monkeypatch.setenv("REWRITE_MIXER_KERNELS", "1")
    calls = []
    real = _FLASH._flash

    def counted(q, k, v, attn_mask, *rest):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "mask": None if attn_mask is None else
                      tuple(attn_mask.shape), "causal": rest[1], "gqa": rest[3]})
        return real(q, k, v, attn_mask, *rest)

    monkeypatch.setattr(_FLASH, "_flash", counted)
    return calls


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom", "t5_encoder"])
def test_hf_model_on_the_flash_kernel(flash_calls, name):
    """Causal + padding (GPT-2), GQA + RoPE (Llama), ALiBi (BLOOM), relative-position bias (T5): every site
    runs on the kernel and the model's output matches the original."""
    zoo = getattr(hf_zoo, name)()
    model = zoo.model.to(DEVICE)
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in zoo.example_kwargs.items()}
    ref = copy.deepcopy(model)
    rewrite.optimize(model, Exact(kernel="triton"), example_kwargs=kw)
    rep = rewrite.report(model)
    assert sorted(r.name for r in rep.sites) == sorted(zoo.expected_sites)
    for row in rep.sites:
        assert row.status == "rewritten" and row.action == "Exact(kernel='triton')", row
        assert row.error is not None and row.error < 1e-4
    flash_calls.clear()
    with torch.no_grad():
        out, want = model(**kw), ref(**kw)
    assert len(flash_calls) == len(zoo.expected_sites)
    if zoo.kv_heads != zoo.heads:
        assert all(c["gqa"] and c["k"][1] < c["q"][1] for c in flash_calls)   # K/V not repeated
    got, exp = zoo.output_of(out), zoo.output_of(want)
    err = (got - exp).abs().max().item()
    assert err <= 1e-4 * max(1.0, exp.abs().max().item()), err


def test_learned_bias_trains_through_the_kernel(flash_calls):
    """T5's relative-position bias is a parameter: after the rewrite its gradient flows through the kernel's
    dS and equals the original model's."""
    zoo = hf_zoo.t5_encoder()
    model = zoo.model.to(DEVICE).train()
    for mod in model.modules():        # keep the comparison deterministic (T5Attention keeps a float p)
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if isinstance(getattr(mod, "dropout", None), float):
            mod.dropout = 0.0
    kw = {k: v.to(DEVICE) for k, v in zoo.example_kwargs.items()}
    ref = copy.deepcopy(model)
    rewrite.optimize(model, Exact(kernel="triton"), example_kwargs=kw)
    assert all(r.status == "rewritten" for r in rewrite.report(model).sites)
    w = torch.randn(model(**kw).last_hidden_state.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    flash_calls.clear()
    (model(**kw).last_hidden_state * w).sum().backward()
    assert flash_calls, "the kernel ran in training"
    (ref(**kw).last_hidden_state * w).sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    rel = [n for n in grads if "relative_attention_bias" in n]
    assert rel, "the T5 encoder has a relative-position bias table"
    for n, p in model.named_parameters():
        if n in grads:
            err = (p.grad - grads[n]).abs().max().item()
            assert err <= 1e-4 * max(1.0, grads[n].abs().max().item()), (n, err)
