"""Tiny Hugging Face models with random weights for attention-rewrite tests.

Every builder returns a :class:`ZooModel`: the model (eval mode, seeded random weights,
``attn_implementation="eager"`` unless ``attn="sdpa"`` is asked for), a deterministic keyword
batch, and the exact list of attention sites we expect the optimizer to find.

A *site* is named by the dotted ``named_modules()`` path of the innermost module that owns the
attention computation, i.e. the innermost entry of the ``nn_module_stack`` of the softmax node in
a Dynamo graph (for models that call ``eager_attention_forward`` this is the module that calls it).

Conventions
-----------
* batch 2; the second row of every ``attention_mask`` is right-padded (last ``PAD`` positions are 0),
  so no query row is ever fully masked (a fully masked row is NaN-vs-uniform territory).
* ``causal_sites``: sites whose mask has a causal structure with Nq == Nk in a full-sequence forward
  (decoder self-attention). They may *also* carry a padding mask (the example batch is padded).
* Nothing here touches the network: every model is built from a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import transformers as tf

BATCH = 2
SEQ = 12  # text sequence length
DEC_SEQ = 8  # decoder sequence length for encoder-decoder models
PAD = 3  # number of padded (masked) positions at the end of the second row
VOCAB = 128
IMAGE = 32


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    example_kwargs: dict[str, Any]
    expected_sites: list[str]
    is_decoder: bool = False
    causal_sites: list[str] = field(default_factory=list)
    output_key: str = "last_hidden_state"
    # query heads / key-value heads of every site (None: varies per site, e.g. Swin stages)
    heads: int | None = 4
    kv_heads: int | None = 4
    # for LM heads: a single prompt, and a left-padded batch of two prompts, for generate() tests
    generate_inputs: dict[str, Any] | None = None
    generate_batch: dict[str, Any] | None = None

    def output_of(self, outputs: Any) -> torch.Tensor:
        """The primary output tensor (``last_hidden_state`` / ``logits`` / ...)."""
        if isinstance(outputs, torch.Tensor):
            return outputs
        if isinstance(outputs, dict) or hasattr(outputs, "keys"):
            return outputs[self.output_key]
        return getattr(outputs, self.output_key)

    def unpadded_kwargs(self) -> dict[str, Any]:
        """``example_kwargs`` without any attention mask: every row full length. In a decoder the
        self-attention mask is then purely causal (built from sizes alone); with the padded batch it
        is causal AND padding, one data-dependent tensor."""
        return {k: v for k, v in self.example_kwargs.items() if not k.endswith("attention_mask")}

    def run(self, model: nn.Module | None = None) -> torch.Tensor:
        m = self.model if model is None else model
        return self.output_of(m(**self.example_kwargs))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _ids(seq: int = SEQ, vocab: int = VOCAB, seed: int = 1, low: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (BATCH, seq), generator=g)


def _mask(seq: int = SEQ, pad: int = PAD) -> torch.Tensor:
    m = torch.ones(BATCH, seq, dtype=torch.long)
    m[1, seq - pad :] = 0
    return m


def _pixels(image: int = IMAGE, channels: int = 3, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, channels, image, image, generator=g)


def _build(cls: type, config: Any, attn: str, seed: int) -> nn.Module:
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config)
    model.eval()
    # make sure the requested implementation stuck (some models resolve it in __init__)
    impl = getattr(model.config, "_attn_implementation", attn)
    assert impl == attn, f"{cls.__name__}: asked for {attn!r}, got {impl!r}"
    return model


def _sites(fmt: str, n: int) -> list[str]:
    return [fmt.format(i) for i in range(n)]


LAYERS = 2
HID = 64
HEADS = 4
FFN = 128
INIT = 0.1  # larger than HF's 0.02 so attention is far from uniform and mask/scale bugs show


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------


def bert(attn: str = "eager", seed: int = 0, **config_overrides: Any) -> ZooModel:
    """``config_overrides`` go to BertConfig, e.g. ``hidden_dropout_prob=0.0`` for training tests."""
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, initializer_range=INIT,
        **config_overrides,
    )
    m = _build(tf.BertModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask(), token_type_ids=torch.zeros(BATCH, SEQ, dtype=torch.long))
    return ZooModel("bert", m, kw, _sites("encoder.layer.{}.attention.self", LAYERS))


def roberta(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, initializer_range=INIT, pad_token_id=1,
    )
    m = _build(tf.RobertaModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    return ZooModel("roberta", m, kw, _sites("encoder.layer.{}.attention.self", LAYERS))


def distilbert(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.DistilBertConfig(
        vocab_size=VOCAB, dim=HID, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
        max_position_embeddings=64, initializer_range=INIT,
    )
    m = _build(tf.DistilBertModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    return ZooModel("distilbert", m, kw, _sites("transformer.layer.{}.attention", LAYERS))


def electra(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.ElectraConfig(
        vocab_size=VOCAB, embedding_size=32, hidden_size=HID, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=64,
        initializer_range=INIT,
    )
    m = _build(tf.ElectraModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    return ZooModel("electra", m, kw, _sites("encoder.layer.{}.attention.self", LAYERS))


def t5_encoder(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.T5Config(
        vocab_size=VOCAB, d_model=HID, d_kv=16, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        initializer_factor=1.0, dropout_rate=0.1,
    )
    m = _build(tf.T5EncoderModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    return ZooModel("t5_encoder", m, kw, _sites("encoder.block.{}.layer.0.SelfAttention", LAYERS))


def longt5_encoder(attn: str = "eager", seed: int = 0) -> ZooModel:
    """Block-local attention: blocks of 4 queries against their own and both neighbouring blocks' keys."""
    cfg = tf.LongT5Config(
        vocab_size=VOCAB, d_model=HID, d_kv=16, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS, local_radius=3,
        encoder_attention_type="local", relative_attention_num_buckets=8, relative_attention_max_distance=16,
        initializer_factor=1.0, dropout_rate=0.1,
    )
    m = _build(tf.LongT5EncoderModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    return ZooModel("longt5_encoder", m, kw, _sites("encoder.block.{}.layer.0.LocalSelfAttention", LAYERS))


# --------------------------------------------------------------------------------------------
# decoders
# --------------------------------------------------------------------------------------------


def _gpt2_config() -> Any:
    return tf.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=HID, n_layer=LAYERS, n_head=HEADS,
        n_inner=FFN, initializer_range=INIT, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def gpt2(attn: str = "eager", seed: int = 0) -> ZooModel:
    m = _build(tf.GPT2Model, _gpt2_config(), attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    sites = _sites("h.{}.attn", LAYERS)
    return ZooModel("gpt2", m, kw, sites, is_decoder=True, causal_sites=list(sites))


def gpt_neox(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, rotary_pct=0.5, initializer_range=INIT,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    m = _build(tf.GPTNeoXModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    sites = _sites("layers.{}.attention", LAYERS)
    return ZooModel("gpt_neox", m, kw, sites, is_decoder=True, causal_sites=list(sites))


def opt(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        ffn_dim=FFN, max_position_embeddings=64, word_embed_proj_dim=HID, init_std=INIT,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    m = _build(tf.OPTModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    sites = _sites("decoder.layers.{}.self_attn", LAYERS)
    return ZooModel("opt", m, kw, sites, is_decoder=True, causal_sites=list(sites))


def bloom(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.BloomConfig(
        vocab_size=VOCAB, hidden_size=HID, n_layer=LAYERS, n_head=HEADS, initializer_range=INIT,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    m = _build(tf.BloomModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    sites = _sites("h.{}.self_attention", LAYERS)
    return ZooModel("bloom", m, kw, sites, is_decoder=True, causal_sites=list(sites))


def _llama_like_config(cfg_cls: type, **extra: Any) -> Any:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=64,
        initializer_range=INIT, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    kw.update(extra)
    return cfg_cls(**kw)


def _llama_like(name: str, model_cls: type, cfg: Any, attn: str, seed: int) -> ZooModel:
    m = _build(model_cls, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    sites = _sites("layers.{}.self_attn", LAYERS)
    return ZooModel(name, m, kw, sites, is_decoder=True, causal_sites=list(sites), kv_heads=2)


def llama(attn: str = "eager", seed: int = 0) -> ZooModel:
    return _llama_like("llama", tf.LlamaModel, _llama_like_config(tf.LlamaConfig), attn, seed)


def mistral(attn: str = "eager", seed: int = 0) -> ZooModel:
    # sliding_window larger than the sequence: plain causal in a full-sequence forward
    cfg = _llama_like_config(tf.MistralConfig, sliding_window=64)
    return _llama_like("mistral", tf.MistralModel, cfg, attn, seed)


def qwen2(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = _llama_like_config(tf.Qwen2Config, use_sliding_window=False)
    return _llama_like("qwen2", tf.Qwen2Model, cfg, attn, seed)


def gemma(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = _llama_like_config(tf.GemmaConfig, head_dim=16)
    return _llama_like("gemma", tf.GemmaModel, cfg, attn, seed)


def phi(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.PhiConfig(
        vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, partial_rotary_factor=0.5,
        initializer_range=INIT, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    m = _build(tf.PhiModel, cfg, attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    sites = _sites("layers.{}.self_attn", LAYERS)
    return ZooModel("phi", m, kw, sites, is_decoder=True, causal_sites=list(sites))


# --------------------------------------------------------------------------------------------
# encoder-decoder
# --------------------------------------------------------------------------------------------


def bart(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.BartConfig(
        vocab_size=VOCAB, d_model=HID, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, max_position_embeddings=64, init_std=INIT,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    m = _build(tf.BartModel, cfg, attn, seed)
    kw = dict(
        input_ids=_ids(), attention_mask=_mask(),
        decoder_input_ids=_ids(DEC_SEQ, seed=3), decoder_attention_mask=_mask(DEC_SEQ, 2),
    )
    enc = _sites("encoder.layers.{}.self_attn", LAYERS)
    dec = _sites("decoder.layers.{}.self_attn", LAYERS)
    cross = _sites("decoder.layers.{}.encoder_attn", LAYERS)
    sites = enc + [s for pair in zip(dec, cross) for s in pair]
    return ZooModel("bart", m, kw, sites, is_decoder=True, causal_sites=dec)


def whisper(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, d_model=HID,
        encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_source_positions=8, max_target_positions=32,
        init_std=INIT, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    m = _build(tf.WhisperModel, cfg, attn, seed)
    g = torch.Generator().manual_seed(4)
    kw = dict(
        input_features=torch.randn(BATCH, 8, 16, generator=g),  # (B, mel, 2 * max_source_positions)
        decoder_input_ids=_ids(DEC_SEQ, seed=5),
        decoder_attention_mask=_mask(DEC_SEQ, 2),
    )
    enc = _sites("encoder.layers.{}.self_attn", LAYERS)
    dec = _sites("decoder.layers.{}.self_attn", LAYERS)
    cross = _sites("decoder.layers.{}.encoder_attn", LAYERS)
    sites = enc + [s for pair in zip(dec, cross) for s in pair]
    return ZooModel("whisper", m, kw, sites, is_decoder=True, causal_sites=dec)


# --------------------------------------------------------------------------------------------
# vision
# --------------------------------------------------------------------------------------------


def vit(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.ViTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=HID, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, initializer_range=INIT,
    )
    m = _build(tf.ViTModel, cfg, attn, seed)
    kw = dict(pixel_values=_pixels())
    return ZooModel("vit", m, kw, _sites("layers.{}.attention", LAYERS))


def deit(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.DeiTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=HID, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, initializer_range=INIT,
    )
    m = _build(tf.DeiTModel, cfg, attn, seed)
    kw = dict(pixel_values=_pixels())
    return ZooModel("deit", m, kw, _sites("layers.{}.attention", LAYERS))


def swin(attn: str = "eager", seed: int = 0) -> ZooModel:
    # 32x32 image, patch 4 -> 8x8 tokens, window 4: stage 0 has a regular and a shifted block
    # (shifted windows => an additive window mask), stage 1 (4x4 tokens) has one window, no shift.
    cfg = tf.SwinConfig(
        image_size=IMAGE, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
        window_size=4, mlp_ratio=2.0, initializer_range=INIT,
    )
    m = _build(tf.SwinModel, cfg, attn, seed)
    kw = dict(pixel_values=_pixels())
    sites = [f"encoder.layers.{i}.blocks.{j}.attention" for i in range(2) for j in range(2)]
    return ZooModel("swin", m, kw, sites, heads=None, kv_heads=None)


def clip_vision(attn: str = "eager", seed: int = 0) -> ZooModel:
    cfg = tf.CLIPVisionConfig(
        image_size=IMAGE, patch_size=8, hidden_size=HID, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, projection_dim=32,
        initializer_range=INIT,
    )
    m = _build(tf.CLIPVisionModel, cfg, attn, seed)
    kw = dict(pixel_values=_pixels())
    return ZooModel("clip_vision", m, kw, _sites("encoder.layers.{}.self_attn", LAYERS))


# --------------------------------------------------------------------------------------------
# LM heads (for generate() tests)
# --------------------------------------------------------------------------------------------


def _prompt() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return dict(input_ids=torch.randint(3, VOCAB, (1, 6), generator=g))


def _padded_prompts() -> dict[str, Any]:
    """Two prompts of 6 tokens, the second left-padded by 2 (pad id 0): generate() pads on the left,
    so the pad query rows of the prefill are fully masked."""
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    return dict(input_ids=ids, attention_mask=mask)


def gpt2_lm(attn: str = "eager", seed: int = 0) -> ZooModel:
    m = _build(tf.GPT2LMHeadModel, _gpt2_config(), attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    sites = _sites("transformer.h.{}.attn", LAYERS)
    return ZooModel("gpt2_lm", m, kw, sites, is_decoder=True, causal_sites=list(sites),
                    output_key="logits", generate_inputs=_prompt(),
                    generate_batch=_padded_prompts())


def llama_lm(attn: str = "eager", seed: int = 0) -> ZooModel:
    m = _build(tf.LlamaForCausalLM, _llama_like_config(tf.LlamaConfig), attn, seed)
    kw = dict(input_ids=_ids(), attention_mask=_mask())
    sites = _sites("model.layers.{}.self_attn", LAYERS)
    return ZooModel("llama_lm", m, kw, sites, is_decoder=True, causal_sites=list(sites),
                    output_key="logits", generate_inputs=_prompt(),
                    generate_batch=_padded_prompts(), kv_heads=2)


# --------------------------------------------------------------------------------------------

ZOO: dict[str, Callable[..., ZooModel]] = {
    "bert": bert,
    "roberta": roberta,
    "distilbert": distilbert,
    "electra": electra,
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,
    "opt": opt,
    "bloom": bloom,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "gemma": gemma,
    "phi": phi,
    "t5_encoder": t5_encoder,
    "longt5_encoder": longt5_encoder,
    "bart": bart,
    "whisper": whisper,
    "vit": vit,
    "deit": deit,
    "swin": swin,
    "clip_vision": clip_vision,
}

LM_ZOO: dict[str, Callable[..., ZooModel]] = {
    "gpt2_lm": gpt2_lm,
    "llama_lm": llama_lm,
}

ALL: dict[str, Callable[..., ZooModel]] = {**ZOO, **LM_ZOO}

# transformers raises for attn_implementation="sdpa" on these
SDPA_UNSUPPORTED = {"bloom", "longt5_encoder"}


def build(name: str, attn: str = "eager", seed: int = 0) -> ZooModel:
    return ALL[name](attn=attn, seed=seed)
