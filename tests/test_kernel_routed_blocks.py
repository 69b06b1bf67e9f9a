"""rewrite.kernels.routed_blocks: the C++ CPU kernel of BlockRouting against its plain-PyTorch reference, and
BlockRouting with the kernel against BlockRouting without it."""
from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_helpers import attention_case, draw_qkv, needs_cpu_kernel, run_case

from rewrite.kernels import routed_blocks
from rewrite.mixers.block_routing import BlockRoutingAttention


def test_kernel_builds_where_a_compiler_is():
    if not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("ninja"):
        pytest.skip("no C++ compiler or ninja here: the kernel cannot be built (callers keep their PyTorch path)")
    assert routed_blocks.available(), routed_blocks.why_unavailable()


needs_kernel = needs_cpu_kernel(routed_blocks)


@st.composite
def routed_case(draw):
    a, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
    hq = hkv * g
    block = draw(st.integers(1, 9))
    prefix = draw(st.integers(0, 3))
    n = prefix + draw(st.integers(1, 40))
    nb = -(-(n - prefix) // block)
    t = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8, 16, 64]))
    dv = draw(st.sampled_from([d, d + 3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    q, k, v = draw_qkv(draw, a, hq, hkv, n, d, dv, gen)
    blocks = torch.randint(0, nb, (a, hq, nb, t), generator=gen)
    if draw(st.booleans()):          # -1: no block (per-head counts below the call's t)
        blocks = blocks.masked_fill(torch.rand(blocks.shape, generator=gen) < 0.3, -1)
    e = draw(st.integers(0, 5))
    per = draw(st.sampled_from([1, nb, nb * g]))
    rows = -(-(a * hq * nb) // per)
    extra_k = torch.randn(rows, e, d, generator=gen) if e else None
    extra_v = torch.randn(rows, e, dv, generator=gen) if e else None
    width = t * block + e
    kind = draw(st.sampled_from(["none", "full", "per_block", "per_key", "hiding"]))
    mask = None
    if kind == "full":
        mask = torch.randn(a * hq, nb, block, width, generator=gen)
    elif kind == "per_block":        # broadcast over sequences and rows: stride-0 dims
        mask = torch.randn(1, nb, 1, width, generator=gen).expand(a * hq, nb, block, width)
    elif kind == "per_key":
        mask = torch.randn(1, 1, 1, width, generator=gen)
    elif kind == "hiding":           # whole rows and whole query blocks see nothing: they output 0
        mask = torch.zeros(a * hq, nb, block, width).masked_fill_(torch.rand(a * hq, nb, block, width, generator=gen) < 0.4,
                                                                float("-inf"))
        mask[0, 0] = float("-inf")
    return q, k, v, blocks, block, prefix, extra_k, extra_v, per, mask, draw(st.sampled_from([0.125, 0.7]))


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(case=routed_case())
def test_kernel_matches_reference(case):
    q, k, v, blocks, block, prefix, ek, ev, per, mask, scale = case
    out = routed_blocks.routed_blocks_forward(q, k, v, blocks, block, prefix, ek, ev, per, mask, scale)
    ref = routed_blocks.routed_blocks_reference(q, k, v, blocks, block, prefix, ek, ev, per, mask, scale)
    assert out.shape == ref.shape
    torch.testing.assert_close(out[:, :, prefix:], ref[:, :, prefix:], atol=2e-5, rtol=2e-5)
    if mask is not None and mask.shape[0] > 1 and torch.isinf(mask[0, 0]).all():   # a query block that sees nothing
        assert (out[0, 0, prefix:prefix + min(block, q.shape[2] - prefix)] == 0).all()


@needs_kernel
def test_kernel_zeroes_the_prefix_rows_and_torch_counts_its_flops():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    blocks = torch.zeros(1, 2, 3, 2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        out = routed_blocks.routed_blocks_forward(q, k, v, blocks, 6, 2, scale=0.3)
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:] != 0).all()
    assert counter.get_total_flops() == 2 * 2 * 18 * 12 * (8 + 8)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("REWRITE_CPU_KERNELS", "0")
    assert not routed_blocks.available() and routed_blocks.why_unavailable() == "REWRITE_CPU_KERNELS=0"
    q, k, v = (torch.randn(1, 1, 16, 4) for _ in range(3))
    blocks = torch.tensor([[[[0], [1], [1], [0]]]])
    out = routed_blocks.routed_blocks_forward(q, k, v, blocks, 4, scale=0.5)
    torch.testing.assert_close(out, routed_blocks.routed_blocks_reference(q, k, v, blocks, 4, scale=0.5))


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(case=attention_case(max_len=48), block=st.integers(1, 9), topk=st.integers(1, 4), sinks=st.integers(0, 3),
       summary=st.booleans(), grid=st.booleans(), per_head=st.booleans(), seed=st.integers(0, 99))
def test_block_routing_is_the_same_with_and_without_the_kernel(case, block, topk, sinks, summary, grid, per_head,
                                                               seed):
    """Every BlockRouting form (1-D with sinks and pooled blocks, causal, 2-D regions with a CLS token, per-head
    counts), every site-mask kind, GQA: the kernel path (one call for all counts) and the fused-SDPA path (one
    pass per count) agree."""
    n = case["q"].shape[-2]
    if grid and not case["causal"] and n >= 5:
        side = int((n - 1) ** 0.5)
        n_used = 1 + side * side
        case = {**case, "q": case["q"][..., :n_used, :], "k": case["k"][..., :n_used, :],
                "v": case["v"][..., :n_used, :], "mask": None}
        module = BlockRoutingAttention(block, topk, grid=(side, side), prefix_tokens=1, summary=summary,
                                       per_head=per_head)
    else:
        module = BlockRoutingAttention(block, topk, causal=case["causal"], sinks=sinks, summary=summary,
                                       per_head=per_head)
    if per_head:
        hkv = case["k"].shape[1]
        module.head_topk = torch.randint(1, 5, (hkv,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        with_kernel = run_case(module, case)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REWRITE_CPU_KERNELS", "0")
            without = run_case(module, case)
    torch.testing.assert_close(with_kernel, without, atol=3e-5, rtol=3e-5)


def test_an_expanded_key_padding_mask_is_served_as_a_key_mask():
    """Hugging Face encoders expand a padding mask to [B, 1, N, N]: its rows repeat, so the mixers take it as the
    key mask it is (one row; the kernels' key-mask paths) with the same output; a mask whose rows differ (causal,
    or one changed row) keeps its rows."""
    from rewrite.mixers import _layout
    from rewrite.mixers.kmeans_routing import KMeansRoutingAttention
    gen = torch.Generator().manual_seed(3)
    b, h, n, d = 2, 4, 70, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 50:] = False
    key_mask = torch.zeros(b, 1, 1, n).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    expanded = key_mask.expand(b, 1, n, n).clone()                       # materialized, as HF's 1 - mask gives
    assert _layout.canon(q, k, v, expanded, None).bias.shape[-2] == 1
    causal = expanded.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    assert _layout.canon(q, k, v, causal, None).bias.shape[-2] == n
    one_row = expanded.clone()
    one_row[0, 0, 7, 3] = 0.5
    assert _layout.canon(q, k, v, one_row, None).bias.shape[-2] == n
    for module in (BlockRoutingAttention(16, 2, sinks=1, summary=True), KMeansRoutingAttention(2, 24)):
        with torch.no_grad():
            torch.testing.assert_close(module(q, k, v, attn_mask=expanded), module(q, k, v, attn_mask=key_mask))


def test_a_kernel_that_cannot_build_says_why_and_is_unavailable(tmp_path, caplog):
    from rewrite.kernels._cpu_build import CpuKernel
    source = tmp_path / "cpu.cpp"
    source.write_text("#include \"cpu_common.h\"\nthis is not C++;\n")
    kernel = CpuKernel("broken_for_a_test", source, "a test mixer")
    assert not kernel.available()
    assert kernel.why_unavailable() and "error" in kernel.why_unavailable().lower()
    assert "a test mixer keeps its PyTorch path" in caplog.text


@needs_kernel
@pytest.mark.parametrize("kind", ["plain", "summary_sinks", "kmeans"])
def test_compiled_mixers_keep_the_kernel_ops_and_train_without_them(kind):
    """Under torch.compile an inference call keeps the C++ kernel as one op node with the eager output (BlockRouting
    in one graph; KMeansRouting breaks its graph where it asks whether its centroids are fitted); a call that needs
    gradients traces the differentiable path instead (no kernel op) and trains."""
    from rewrite.kernels import cluster_attention
    from rewrite.mixers.kmeans_routing import KMeansRoutingAttention
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    if kind == "kmeans":
        module, op = KMeansRoutingAttention(2, 24), "rewrite.cluster_attention"
        assert cluster_attention.available()
    else:
        module, op = BlockRoutingAttention(16, 3, sinks=int(kind != "plain"), summary=kind != "plain"), \
            "rewrite.routed_blocks"
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 100, 16, generator=gen) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 100)
    mask[1, ..., 70:] = float("-inf")
    compiled = torch.compile(module, backend=recording_backend, fullgraph=kind != "kmeans")
    with torch.no_grad():
        eager = module(q, k, v, attn_mask=mask)
        torch.testing.assert_close(compiled(q, k, v, attn_mask=mask), eager)
    assert any(op in g for g in graphs)
    before = len(graphs)
    qg = q.clone().requires_grad_(True)
    out = compiled(qg, k, v, attn_mask=mask)
    assert len(graphs) > before and not any(op in g for g in graphs[before:])
    torch.testing.assert_close(out, eager, atol=2e-5, rtol=2e-5)
    out.square().sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0
