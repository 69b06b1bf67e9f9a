"""The x-transformers sweep: one row per attention option of ``x_transformers`` (2.31.10), one process each.

Each configuration is a ``TransformerWrapper`` (256 tokens, width 64, 2 layers, 4 heads of 16) around an
``Encoder`` or ``Decoder`` with one attention option set, run on token ids with a right-padded key mask
(two lengths: 16 and 24). The verdict beside each configuration says whether its attention is
``softmax(q kᵀ s + bias/mask) v`` — then every attention call (each ``Attend`` forward, counted by hooks) must be
rewritten: FULL — or why it is not (talking heads mix heads around the softmax, sigmoid is no softmax, top-k
masks depend on the scores…): then nothing may change and the row is NONE with that reason, or WRONG if an
output moved. The second column counts the ``scaled_dot_product_attention`` calls of the same configuration
with ``attn_flash=True`` where x-transformers allows it (a cross-check; ``-`` where it refuses).

Run: ``OMP_NUM_THREADS=1 python bench/bench_xtransformers.py [--configs base,rotary] [--timeout 300]
[--jsonl out.jsonl]``.
"""
from __future__ import annotations

import argparse

from zoo_common import failed, judged, print_row, same, sdpa_calls, sweep

SOFTMAX = "softmax"
#: name -> (layers class, keyword arguments of the layers, verdict: SOFTMAX or why it is not softmax(q kᵀ s + m) v)
CONFIGS = {
    "base": ("Encoder", {}, SOFTMAX),
    "no_mask": ("Encoder", {"_mask": False}, SOFTMAX),
    "causal": ("Decoder", {}, SOFTMAX),
    "causal_no_mask": ("Decoder", {"_mask": False}, SOFTMAX),
    "heads8_dim_head8": ("Encoder", {"heads": 8, "attn_dim_head": 8}, SOFTMAX),
    "rotary_pos_emb": ("Decoder", {"rotary_pos_emb": True}, SOFTMAX),
    "rotary_xpos": ("Decoder", {"rotary_xpos": True}, SOFTMAX),
    "rotary_partial_heads": ("Decoder", {"rotary_pos_emb": True, "rotate_num_heads": 2}, SOFTMAX),
    "alibi_pos_bias": ("Decoder", {"alibi_pos_bias": True}, SOFTMAX),
    "rel_pos_bias_t5": ("Encoder", {"rel_pos_bias": True}, SOFTMAX),
    "dynamic_pos_bias": ("Encoder", {"dynamic_pos_bias": True}, SOFTMAX),
    "dynamic_pos_bias_log": ("Decoder", {"dynamic_pos_bias": True, "dynamic_pos_bias_log_distance": True}, SOFTMAX),
    "rel_proj_pos_bias": ("Encoder", {"attn_use_rel_proj_pos_bias": True}, SOFTMAX),
    "data_dependent_alibi": ("Decoder", {"attn_data_dependent_alibi": True}, SOFTMAX),
    "polar_pos_emb": ("Decoder", {"polar_pos_emb": True}, SOFTMAX),
    "qk_norm": ("Encoder", {"attn_qk_norm": True}, SOFTMAX),
    "qk_norm_dim_scale": ("Encoder", {"attn_qk_norm": True, "attn_qk_norm_dim_scale": True}, SOFTMAX),
    "qk_norm_groups": ("Encoder", {"attn_qk_norm": True, "attn_qk_norm_groups": 2}, SOFTMAX),
    "qk_rmsnorm": ("Encoder", {"attn_qk_rmsnorm": True}, SOFTMAX),
    "num_mem_kv": ("Encoder", {"attn_num_mem_kv": 4}, SOFTMAX),
    "one_kv_head_mqa": ("Decoder", {"attn_one_kv_head": True}, SOFTMAX),
    "kv_heads_gqa": ("Decoder", {"attn_kv_heads": 2}, SOFTMAX),
    "gate_values": ("Encoder", {"attn_gate_values": True}, SOFTMAX),
    "gate_value_heads": ("Encoder", {"attn_gate_value_heads": True}, SOFTMAX),
    "swiglu_values": ("Encoder", {"attn_swiglu_values": True}, SOFTMAX),
    "output_gate": ("Encoder", {"attn_output_gate": True}, SOFTMAX),
    "head_scale": ("Encoder", {"attn_head_scale": True}, SOFTMAX),
    "on_attn": ("Encoder", {"attn_on_attn": True}, SOFTMAX),
    "value_dim_head": ("Encoder", {"attn_value_dim_head": 32}, SOFTMAX),
    "add_zero_kv": ("Encoder", {"attn_add_zero_kv": True}, SOFTMAX),
    "head_learned_sink": ("Decoder", {"attn_head_learned_sink": True}, SOFTMAX),
    "max_attend_past": ("Decoder", {"attn_max_attend_past": 8}, SOFTMAX),
    "value_residual": ("Encoder", {"add_value_residual": True}, SOFTMAX),
    "laser": ("Encoder", {"attn_laser": True}, SOFTMAX),
    "orthog_projected_values": ("Encoder", {"attn_orthog_projected_values": True}, SOFTMAX),
    "latent_q_kv": ("Encoder", {"attn_use_latent_q": True, "attn_dim_latent_q": 32, "attn_use_latent_kv": True,
                                "attn_dim_latent_kv": 32}, SOFTMAX),
    "cross_attend": ("Encoder", {"cross_attend": True}, SOFTMAX),
    "sandwich_norm": ("Encoder", {"sandwich_norm": True}, SOFTMAX),
    "macaron_rmsnorm": ("Encoder", {"macaron": True, "use_rmsnorm": True}, SOFTMAX),
    "post_norm": ("Encoder", {"pre_norm": False}, SOFTMAX),
    "shift_tokens": ("Decoder", {"shift_tokens": 1}, SOFTMAX),
    "hyper_connections": ("Encoder", {"num_residual_streams": 2}, SOFTMAX),
    "flash": ("Encoder", {"attn_flash": True}, SOFTMAX),
    "softclamp_logits": ("Encoder", {"attn_softclamp_logits": True, "attn_logit_softclamp_value": 5.0},
                         "soft-capped logits: softmax(c·tanh(q kᵀ s / c)) v, no additive form"),
    "residual_attn": ("Encoder", {"residual_attn": True},
                      "each layer's pre-softmax scores are an output (the next layer adds them): SDPA returns none"),
    "pre_talking_heads": ("Encoder", {"attn_pre_talking_heads": True}, "talking heads mix the heads' scores before softmax"),
    "post_talking_heads": ("Encoder", {"attn_post_talking_heads": True}, "talking heads mix the heads' probabilities"),
    "sparse_topk": ("Encoder", {"attn_sparse_topk": 4}, "top-k: the mask depends on the scores"),
    "sigmoid": ("Encoder", {"attn_sigmoid": True}, "sigmoid attention, no softmax"),
    "hard": ("Encoder", {"attn_hard": True}, "hard (one-hot straight-through) attention, no softmax"),
    "l2_distance": ("Encoder", {"attn_l2_distance": True}, "scores are -|q-k|², not a product q kᵀ"),
    "cog_signed": ("Encoder", {"attn_cog_signed": True}, "softmax of |scores| times their sign"),
    "selective": ("Decoder", {"attn_selective": True}, "selective attention: the bias is computed from the scores"),
    "cope": ("Decoder", {"attn_use_cope": True}, "contextual positions: the bias is computed from the scores"),
    "inverted": ("Encoder", {"attn_inverted_attention": True}, "softmax over queries, then an l1 norm over keys"),
}
DIM, DEPTH, HEADS, TOKENS = 64, 2, 4, 256


def build(layers: str, kwargs: dict, flash: bool = False):
    import torch
    import x_transformers as xt
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    if flash:
        kwargs = {**kwargs, "attn_flash": True}
    torch.manual_seed(0)
    sizes = {"dim": DIM, "depth": DEPTH, "heads": HEADS, "attn_dim_head": DIM // HEADS}
    attn_layers = getattr(xt, layers)(**{**sizes, **kwargs})
    return xt.TransformerWrapper(num_tokens=TOKENS, max_seq_len=64, attn_layers=attn_layers).eval()


def batch(kwargs: dict, length: int) -> dict:
    """Token ids, a right-padded key mask (unless the configuration says none), a context for cross-attention."""
    import torch
    g = torch.Generator().manual_seed(length)
    out = {"x": torch.randint(0, TOKENS, (2, length), generator=g)}
    if kwargs.get("_mask", True):
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1, -4:] = False
        out["mask"] = mask
    if kwargs.get("cross_attend"):
        out["context"] = torch.randn(2, 12, DIM, generator=g)
        out["context_mask"] = torch.ones(2, 12, dtype=torch.bool)
        out["context_mask"][0, -3:] = False
    return out


def attend_calls(model, example: dict) -> int:
    """How many attention computations (``Attend`` forwards) one call makes."""
    import torch
    from x_transformers.attend import Attend
    count = [0]
    hooks = [m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
             for m in model.modules() if isinstance(m, Attend)]
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for h in hooks:
            h.remove()
    return count[0]


def one(name: str) -> dict:
    """The row of one configuration (run in its own process)."""
    import torch
    import rewrite
    layers, kwargs, verdict = CONFIGS[name]
    try:
        model = build(layers, kwargs)
        batches = [batch(kwargs, n) for n in (16, 24)]
        with torch.no_grad():
            refs = [model(**b) for b in batches]
        calls = attend_calls(model, batches[0])
    except Exception as err:  # noqa: BLE001 - what cannot be built or run here is skipped, with the reason
        return failed(name, "SKIPPED", err)
    try:
        flash = sdpa_calls(build(layers, kwargs, flash=True), batches[0])
    except Exception:  # noqa: BLE001 - x-transformers refuses flash for this option
        flash = None
    try:
        rewrite.optimize(model, "exact", example_kwargs=batches[0])
        with torch.no_grad():
            equal = all(same(r, model(**b)) for r, b in zip(refs, batches))
    except Exception as err:  # noqa: BLE001
        return failed(name, "ERROR", err)
    row = judged(name, equal, rewrite.report(model), calls if verdict == SOFTMAX else 0)
    if verdict != SOFTMAX and equal and row["rewritten"] == 0:
        row["status"] = "NONE"
    row.update(verdict=verdict, flash_sdpa=flash)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--configs", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--jsonl", default="")
    args = ap.parse_args()
    if args.one:
        print_row(one(args.one))
        return
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    sweep(__file__, names, args.timeout, args.jsonl)


if __name__ == "__main__":
    main()
