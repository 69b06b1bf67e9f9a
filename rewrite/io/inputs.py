"""Inputs: example batches generated from a model's config or tokenizer, and calibration files."""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, Optional

import torch

from ..actions import RewriteError
from .files import first_line
from .weights import check_safetensors, torch_load


#: Real sentences of different lengths, so a generated batch has padding (and therefore a mask) in it.
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need, but fused attention is faster on every machine we measured.",
    "Graph rewriting turns many spellings of attention into one kernel call.",
    "A sentence embedding should not change when the model gets faster.",
    "Short text.",
    "Compilers read programs, find patterns, and replace them with cheaper programs that compute the same thing.",
    "Rain is expected tomorrow afternoon.",
    "Every rewrite is checked against the original on sample inputs before it is kept.",
)


CALIBRATION_HELP = (
    "A calibration file is one of: .txt (one text per line, tokenized with the model's tokenizer and padded to "
    "the longest); "
    ".jsonl (one JSON object per line with a \"text\" field); .pt (torch.save of a dict of tensors such as "
    "input_ids and attention_mask sharing the batch dimension, or a list of such dicts; read with "
    "weights_only=True); .safetensors (a dict of tensors sharing the batch dimension). Texts and tensors are "
    "cut into batches of --batch-size.")


def forward_params(model: Any) -> Optional[set]:
    """Names ``model.forward`` accepts by keyword, or ``None`` when it takes ``**kwargs`` / is unknown."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError, AttributeError):
        return None
    params = sig.parameters.values()
    hf = any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params) and not hf:
        return None  # (transformers models take **kwargs for flags; their inputs are all named)
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def max_length(model: Any, tokenizer: Any = None) -> Optional[int]:
    cfg = getattr(model, "config", None)
    limits = []
    # the model's own limit, else its text tower's (a dual encoder's text positions: OWL-ViT's 16)
    for c in (cfg, getattr(cfg, "text_config", None)):
        v = next((v for v in (getattr(c, a, None) for a in ("max_position_embeddings", "n_positions", "max_seq_len",
                                                             "seq_length")) if isinstance(v, int) and v > 0), None)
        if v is not None:
            limits.append(v)
            break
    t = getattr(tokenizer, "model_max_length", None)
    if isinstance(t, int) and 0 < t < 1_000_000:
        limits.append(t)
    return min(limits) if limits else None


def example_kwargs(model: torch.nn.Module, tokenizer: Any = None, batch: int = 2, length: int = 16,
                   seed: int = 0) -> dict:
    """A small batch ``model`` accepts: real sample texts through ``tokenizer``, or random inputs from the config.

    Texts of different lengths are padded, so the batch carries an attention mask like real traffic does.
    """
    params = forward_params(model)
    main = getattr(model, "main_input_name", "input_ids")
    if isinstance(main, (list, tuple)):  # several main inputs (OneFormer's image and task): the first leads
        main = main[0] if main else "input_ids"
    cfg = getattr(model, "config", None)
    limit = max_length(model, tokenizer)
    if limit:
        length = min(length, limit)
    gen = torch.Generator().manual_seed(seed)

    def keep(d: dict) -> dict:
        return {k: v for k, v in d.items() if params is None or k in params}

    if tokenizer is not None and main == "input_ids" and callable(tokenizer):
        texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(batch)]
        try:
            if getattr(tokenizer, "pad_token", None) is not None:
                enc = tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
            else:
                rows = [tokenizer(t, truncation=True, max_length=length)["input_ids"] for t in texts]
                n = min(len(r) for r in rows)
                ids = torch.tensor([r[:n] for r in rows])
                enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            out = keep({k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)})
            out = _add_companion_inputs(out, model, params, batch, length, gen)
            if "input_ids" in out:
                return out
        except Exception:
            pass  # fall back to inputs generated from the config
    if cfg is None:
        raise RewriteError(f"Cannot make example inputs for {type(model).__name__}: it has no Hugging Face config. "
                           "Give a batch with --calibration FILE.pt (a dict of tensors named like forward's arguments).")
    if any(n.endswith("grid_thw") for n in _required_params(model)):
        return _flat_patch_inputs(model, cfg, batch, gen)
    builders = {"input_ids": _token_inputs, "pixel_values": _pixel_inputs, "pixel_values_videos": _pixel_inputs,
                "input_features": _feature_inputs, "input_values": _waveform_inputs, "inputs_embeds": _embedding_inputs,
                "inputs": _embedding_inputs, "past_values": _series_inputs, "states": _trajectory_inputs}
    if main not in builders:
        required = sorted(_required_params(model) - {main})
        needs = f"; forward also requires {', '.join(map(repr, required))}" if required else ""
        raise RewriteError(f"Cannot make example inputs for {type(model).__name__}: its main input {main!r} is not "
                           f"one this tool can generate{needs}. Give a batch with --calibration FILE.pt (a dict of "
                           f"tensors named like forward's arguments: {main!r} and the others it needs).")
    out = keep(builders[main](model, cfg, batch, length, gen))
    return _add_companion_inputs(out, model, params, batch, length, gen)


def _token_inputs(model, cfg, batch: int, length: int, gen) -> dict:
    """Random token ids and a padding mask whose last row is right-padded (decoders: no padding)."""
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        # no vocabulary in the config: a byte- or character-level model (CANINE reads code points); ids below
        # 256 are valid for every such model
        vocab = 256
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and length > 2 and not getattr(cfg, "is_decoder", False) and "CausalLM" not in type(model).__name__:
        mask[-1, length - max(1, length // 4):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _embedding_inputs(model, cfg, batch: int, length: int, gen) -> dict:
    """Embeddings of the config's hidden width, for a model whose main input is already embedded
    (``inputs_embeds``; Perceiver's ``inputs`` of ``d_model`` features)."""
    main = getattr(model, "main_input_name", "inputs_embeds")
    width = next((w for w in (getattr(cfg, "hidden_size", None), getattr(cfg, "d_model", None),
                              getattr(getattr(cfg, "text_config", None), "hidden_size", None)) if isinstance(w, int)), None)
    if width is None:
        raise RewriteError(f"Cannot make example inputs for {type(model).__name__}: its main input is {main} and "
                           "its config names no hidden_size. Give a batch with --calibration.")
    out = _token_inputs(model, cfg, batch, length, gen)
    return {main: torch.randn(batch, length, width, generator=gen), "attention_mask": out["attention_mask"]}


def _sub_config(cfg, *names: str):
    """The first of ``cfg``'s sub-configs called ``names`` (a multimodal model's vision or audio tower), or None."""
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)


def _video_inputs(model, cfg, batch: int, length: int, gen) -> dict:
    """Video clips (``pixel_values_videos``) of a model that reads them beside another input (PE-Video's text)."""
    return _pixel_inputs(model, cfg, batch, length, gen, video=True)


def _pixel_inputs(model, cfg, batch: int, length: int, gen, video: bool = False) -> dict:
    """Images of the size and channel count the (vision) config names; for a video model, clips of
    (batch, frames, channels, height, width) (:func:`_video_frames`)."""
    vc = _sub_config(cfg, "video_config" if video else "vision_config", "vision_config", "backbone_config") or cfg
    size = getattr(vc, "image_size", None) or getattr(cfg, "image_size", None) or _patch_embedding_size(model) or 224
    if isinstance(size, dict):
        size = (size.get("height", 224), size.get("width", 224))
    height, width = (size[0], size[-1]) if isinstance(size, (list, tuple)) else (size, size)
    chans = getattr(vc, "num_channels", None) or getattr(cfg, "num_channels", None) or 3
    if "spatial_shapes" in (forward_params(model) or ()):
        return _patch_sequence_inputs(vc, chans, batch, gen)
    frames = _video_frames(model, cfg, vc, video)
    if frames:
        name = "pixel_values_videos" if video or getattr(model, "main_input_name", None) == "pixel_values_videos" \
            else "pixel_values"
        return {name: torch.randn(batch, frames, chans, height, width, generator=gen)}
    return {"pixel_values": torch.randn(batch, chans, height, width, generator=gen)}


def _patch_embedding_size(model) -> Optional[tuple]:
    """The image size a tower's patch embedding was built for, where the config names none (a timm tower, whose
    config names only its architecture: timm's PatchEmbed keeps ``img_size``)."""
    sizes = (getattr(m, "img_size", None) for m in model.modules() if hasattr(m, "proj"))
    return next((tuple(s) for s in sizes if isinstance(s, (tuple, list)) and len(s) == 2
                 and all(isinstance(v, int) and v > 0 for v in s)), None)


def _patch_sequence_inputs(vc, chans: int, batch: int, gen) -> dict:
    """A NaViT-style vision tower's input (SigLIP 2: forward takes ``spatial_shapes``): each image's patches
    flattened to (patches, channels·patch·patch) and padded to one length, with ``pixel_attention_mask`` marking
    the real patches and ``spatial_shapes`` each image's (rows, columns) of patches; here 4 x 4 patches (fewer
    where the config's ``num_patches`` is smaller) and 4 padding patches."""
    patch = _first_int(getattr(vc, "patch_size", None)) or 16
    most = _first_int(getattr(vc, "num_patches", None)) or 16
    side = max(1, min(4, int(most ** 0.5)))
    real = side * side
    total = real + 4
    mask = torch.zeros(batch, total, dtype=torch.long)
    mask[:, :real] = 1
    values = torch.randn(batch, total, chans * patch * patch, generator=gen) * mask[..., None]
    return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor([[side, side]] * batch)}


def _first_int(*values) -> Optional[int]:
    """The first of ``values`` that is a positive int (the first item of a list: a tubelet's (time, h, w))."""
    for v in values:
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _video_frames(model, cfg, vc, video: bool = False) -> Optional[int]:
    """How many frames a video model reads, or None for an image model. A video model names ``num_frames`` (or
    ``frames_per_clip``) in its config, or calls its main input or itself a video (InstructBLIP-Video); the frames
    are the config's count, else two tubelets (the frames a 3-D patch spans), else 4."""
    frames = _first_int(*(getattr(c, n, None) for c in (vc, cfg) for n in ("num_frames", "frames_per_clip")))
    video = video or frames or "video" in str(getattr(model, "main_input_name", "")) or "Video" in type(model).__name__
    if not video:
        return None
    tubelet = _first_int(getattr(vc, "tubelet_size", None), getattr(cfg, "tubelet_size", None))
    return frames or (2 * tubelet if tubelet else 4)


def _flat_patch_inputs(model, cfg, batch: int, gen) -> dict:
    """A Qwen-VL-style vision tower's input: every image's patches flattened into one sequence, with each image's
    (frames, rows, columns) grid in ``grid_thw``; each image here is 2 x 2 merged patches. A patch spans
    ``temporal_patch_size`` (``patch_temporal``) frames; merges join ``spatial_merge_size`` (``merge_size``,
    ``merge_kernel_size``) patches a side. A tower whose patch embedding is a 2-D convolution over one patch
    (Kimi-K2.5) reads each patch as (channels, patch, patch) instead of one flat row."""
    patch = _first_int(getattr(cfg, "patch_size", None)) or 14
    frames = _first_int(getattr(cfg, "temporal_patch_size", None), getattr(cfg, "patch_temporal", None)) or 1
    chans = getattr(cfg, "in_channels", None) or getattr(cfg, "num_channels", None) or 3
    side = 2 * (_first_int(*(getattr(cfg, n, None) for n in ("spatial_merge_size", "merge_size",
                                                               "merge_kernel_size"))) or 1)
    grid = next(n for n in _required_params(model) if n.endswith("grid_thw"))
    name = next(n for n in _required_params(model) if n != grid)
    first_conv = next((m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))), None)
    per_patch = isinstance(first_conv, torch.nn.Conv2d) and tuple(first_conv.kernel_size) == (patch, patch)
    shapes = [(chans, patch, patch), (chans * frames * patch * patch,)]
    grids = torch.tensor([[1, side, side]] * batch)
    layouts = [{name: torch.randn(batch * side * side, *shape, generator=gen), grid: grids}
               for shape in (shapes if per_patch else shapes[::-1])]
    return _first_that_runs(model, layouts)


def _first_that_runs(model, candidates: list) -> dict:
    """The first of ``candidates`` (input dicts, most likely first) that ``model`` runs on; the first if none
    does (its error is then the user's to see). The layout of flat patches is not in the config: a per-patch
    convolution reads rows of (channels, patch, patch) in one tower (Kimi-K2.5) and flat rows in another
    (HunYuan-VL)."""
    for inputs in candidates[:-1]:
        try:
            with torch.no_grad():
                model(**inputs)
            return inputs
        except Exception:  # noqa: BLE001 - the next layout is tried
            continue
    return candidates[-1]


def _feature_inputs(model, cfg, batch: int, length: int, gen) -> dict:
    """Log-mel features: encoders whose first 1-D convolution reads the mel bins as channels (Whisper) get
    (batch, mels, frames), 2·``max_source_positions`` frames where the config fixes them; other speech encoders
    (batch, frames, features)."""
    ac = _sub_config(cfg, "audio_config", "encoder_config") or cfg
    # (a feature projection's input width comes first: Wav2Vec2-BERT stacks two 80-bin frames into 160 features;
    # a codec that reads features through a sub-model names them in that sub-config: NeuCodec's semantic model)
    names = ("feature_projection_input_dim", "num_mel_bins", "feature_size", "input_feat_per_channel", "n_mels")
    subs = [v for v in vars(cfg).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    mels = next((v for c in (ac, *subs) for v in (getattr(c, n, None) for n in names)
                 if isinstance(v, int) and v > 0), 80)
    positions = getattr(ac, "max_source_positions", None)
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv1d)), None)
    if first_conv is not None and first_conv.in_channels == mels:  # the mel bins are its channels (Whisper)
        frames = 2 * positions if isinstance(positions, int) and positions > 0 else 8 * length
        features = torch.randn(batch, mels, frames, generator=gen)
    else:  # frames first (a 2-D subsampling convolution, a conformer)
        features = torch.randn(batch, 8 * length, mels, generator=gen)
    frames = features.shape[2] if features.shape[1] == mels else features.shape[1]
    # (the caller keeps the mask only where forward takes one)
    return {"input_features": features, "input_features_mask": torch.ones(batch, frames, dtype=torch.long)}


def _waveform_inputs(model, cfg, batch: int, length: int, gen) -> dict:
    """One second of 16 kHz audio (with a channel axis for codecs that name ``audio_channels``), or a spectrogram
    for models that read ``input_values`` as mel frames."""
    channels = getattr(cfg, "audio_channels", None)
    if isinstance(channels, int) and channels > 0:
        return {"input_values": torch.randn(batch, channels, 16000, generator=gen)}
    mels = getattr(cfg, "num_mel_bins", None)
    frames = getattr(cfg, "max_length", None)
    if isinstance(mels, int) and isinstance(frames, int):
        return {"input_values": torch.randn(batch, frames, mels, generator=gen)}
    return {"input_values": torch.randn(batch, 16000, generator=gen)}


def _series_inputs(model, cfg, batch: int, length: int, gen) -> dict:
    """A time-series model's history (``past_values``) and what its forward reads beside it.

    The history spans the config's ``context_length`` (plus the largest lag of a lagged forecaster: Autoformer,
    Informer), else ``length`` rounded up to whole patches (TimesFM); one value per step, or ``num_input_channels``
    (``input_size``) values. The last row's first quarter is padding: unobserved in an observed mask, 1 in a
    padding indicator. Time features, static features, the frequency and, for an encoder-decoder forecaster (one
    that reads ``future_time_features``), the ``prediction_length`` future window come where forward takes them."""
    params = forward_params(model) or set()
    patch = _first_int(getattr(cfg, "patch_length", None)) or 1
    context = _first_int(getattr(cfg, "context_length", None))
    if context is None or context > 1024:  # no fixed window (TimesFM's is a maximum): whole patches
        context = patch * max(2, -(-length // patch))
    lags = getattr(cfg, "lags_sequence", None)
    steps = context + (max(lags) if isinstance(lags, (list, tuple)) and lags else 0)
    chans = _first_int(getattr(cfg, "num_input_channels", None), getattr(cfg, "input_size", None)) or 1
    shape = (batch, steps) if chans == 1 and "num_input_channels" not in vars(cfg) else (batch, steps, chans)
    observed = torch.ones(shape)
    if batch > 1:
        observed[-1, : max(1, steps // 4)] = 0
    out = {"past_values": torch.randn(shape, generator=gen) * observed}
    for name in ("past_observed_mask", "observed_mask"):
        out[name] = observed
    out["past_values_padding"] = (1 - observed).long() if len(shape) == 2 else (1 - observed[..., 0]).long()
    times = _first_int(getattr(cfg, "num_time_features", None)) or 0
    out["past_time_features"] = torch.randn(batch, steps, times, generator=gen)
    out["freq"] = torch.zeros(batch, 1, dtype=torch.long)
    horizon = _first_int(getattr(cfg, "prediction_length", None))
    if horizon and "future_time_features" in params:
        out["future_values"] = torch.randn((batch, horizon, *shape[2:]), generator=gen)
        out["future_time_features"] = torch.randn(batch, horizon, times, generator=gen)
    cards = [c for c in (getattr(cfg, "cardinality", None) or []) if isinstance(c, int) and c > 0]
    if cards and _first_int(getattr(cfg, "num_static_categorical_features", None)):
        out["static_categorical_features"] = torch.stack([torch.randint(0, c, (batch,), generator=gen) for c in cards], 1)
    reals = _first_int(getattr(cfg, "num_static_real_features", None))
    if reals:
        out["static_real_features"] = torch.randn(batch, reals, generator=gen)
    return {k: v for k, v in out.items() if k == "past_values" or k in params}


def _trajectory_inputs(model, cfg, batch: int, length: int, gen) -> dict:
    """An offline-RL model's trajectory (Decision Transformer): per step a state and an action of the widths the
    config names (``state_dim``, ``act_dim``), a reward and a return-to-go, the step's index below the episode
    length, and a mask whose last row is left-padded (trajectories are padded at the start)."""
    def width(name: str) -> int:
        stem = name[:-1] if name.endswith("s") else name
        return next((v for k, v in vars(cfg).items() if k.endswith("_dim") and isinstance(v, int) and v > 0
                     and stem.startswith(k[:-4])), 1)
    params = forward_params(model) or {"states"}
    out = {name: torch.randn(batch, length, width(name), generator=gen)
           for name in ("states", "actions", "rewards", "returns_to_go") if name in params}
    episode = _first_int(getattr(cfg, "max_ep_len", None)) or length
    out["timesteps"] = torch.randint(0, max(1, episode - length), (batch, 1), generator=gen) + torch.arange(length)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and length > 2:
        mask[-1, : length // 4] = 0
    out["attention_mask"] = mask
    return out


def _has_placeholder_token(cfg, modality: str) -> bool:
    """Whether the text carries a placeholder token for ``modality`` (LLaVA-style models run on text alone)."""
    return any(modality + "_token" in name and value is not None for name, value in vars(cfg).items())


def _required_params(model) -> set:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return set()
    return {p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _add_companion_inputs(out: dict, model, params, batch: int, length: int, gen) -> dict:
    """The inputs a model reads beside its main one: the other modality of a dual encoder (CLIP's pixels, CLAP's
    audio: a config with that tower and no placeholder token for it in the text), layout boxes, query embeddings
    and token ids when forward requires them, and decoder ids of an encoder-decoder."""
    cfg = getattr(model, "config", None)
    if cfg is None or params is None:
        return out
    required = _required_params(model)
    towers = {"pixel_values": (_pixel_inputs, "vision_config", "image"),
              "input_features": (_feature_inputs, "audio_config", "audio"),
              "input_ids": (_token_inputs, "text_config", "text"),
              "pixel_values_videos": (_video_inputs, "video_config", "video")}
    for name, (build, tower, modality) in towers.items():
        # a model with that tower, or a one-tower image-text model whose config sizes its images (ViLT)
        has_tower = getattr(cfg, tower, None) is not None or (name == "pixel_values" and "input_ids" in out
                                                              and isinstance(getattr(cfg, "image_size", None), int))
        wanted = name in required or (has_tower and not _has_placeholder_token(cfg, modality))
        if name in params and name not in out and wanted:
            out.update({k: v for k, v in build(model, cfg, batch, length, gen).items() if k in params})
    out.update(_region_inputs(cfg, params, out, batch, gen))
    if "lang_ids" in params and getattr(cfg, "languages", None) and "input_ids" in out:
        out["lang_ids"] = torch.zeros(batch, dtype=torch.long)  # (X-MOD's adapters: the first language)
    ids = out.get("input_ids")
    for name in required - set(out):  # another tower's token ids (InstructBLIP's qformer_input_ids)
        if name.endswith("input_ids") and ids is not None:
            out[name] = ids.clone()
        elif name.endswith("_inputs") and isinstance(getattr(cfg, name[: -len("inputs")] + "seq_len", None), int):
            # a fixed-length token prompt the config sizes (OneFormer's task_inputs: task_seq_len tokens)
            vocab = next((v for k, v in vars(cfg).items() if k.endswith("vocab_size") and isinstance(v, int)
                          and v > 1), 256)
            out[name] = torch.randint(0, vocab, (batch, getattr(cfg, name[: -len("inputs")] + "seq_len")),
                                      generator=gen)
    if "bbox" in params and ids is not None:
        out["bbox"] = _layout_boxes(ids.shape, gen)
    if "query_embeds" in required:  # a query transformer (BLIP-2's Q-Former): one query per token of the mask
        out["query_embeds"] = torch.randn(batch, length, getattr(cfg, "hidden_size", 64), generator=gen)
        width = getattr(cfg, "encoder_hidden_size", None)
        if isinstance(width, int) and "encoder_hidden_states" in params:  # it cross-attends to an image encoder
            out["encoder_hidden_states"] = torch.randn(batch, length, width, generator=gen)
    return _add_decoder_inputs(out, model, params, batch, max(2, length // 2), gen)


def _region_inputs(cfg, params: set, out: dict, batch: int, gen) -> dict:
    """Image regions a vision-and-language model reads as features (LXMERT's ``visual_feats`` of
    ``visual_feat_dim`` features, and their ``visual_pos`` boxes of ``visual_pos_dim`` normalized coordinates
    x0 <= x1, y0 <= y1): 4 regions per image, where forward takes them and the config sizes them."""
    regions, made = 4, {}
    feats, pos = getattr(cfg, "visual_feat_dim", None), getattr(cfg, "visual_pos_dim", None)
    if "visual_feats" in params and "visual_feats" not in out and isinstance(feats, int):
        made["visual_feats"] = torch.randn(batch, regions, feats, generator=gen)
    if "visual_pos" in params and "visual_pos" not in out and isinstance(pos, int):
        corner = torch.rand(batch, regions, 2, generator=gen) / 2
        boxes = torch.cat([corner, corner + torch.rand(batch, regions, 2, generator=gen) / 2], dim=-1)
        made["visual_pos"] = boxes[..., :pos] if pos <= 4 else torch.cat(
            [boxes, torch.rand(batch, regions, pos - 4, generator=gen)], dim=-1)
    return made


def _layout_boxes(shape, gen) -> torch.Tensor:
    """One box per token in the 0..1000 page coordinates layout models use, each with x0 <= x1 and y0 <= y1."""
    corner = torch.randint(0, 500, (*shape, 2), generator=gen)
    extent = torch.randint(0, 500, (*shape, 2), generator=gen)
    return torch.cat([corner, corner + extent], dim=-1)


def _add_decoder_inputs(out: dict, model, params, batch: int, length: int, gen) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False) and (params is None or "decoder_input_ids" in params):
        vocab = getattr(cfg, "vocab_size", 2)
        start = getattr(cfg, "decoder_start_token_id", None)
        ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=gen)
        if isinstance(start, int):
            ids[:, 0] = start
        out["decoder_input_ids"] = ids
    return out


def read_calibration(path: str, model: Any, tokenizer: Any = None, batch_size: int = 8,
                     length: Optional[int] = None) -> list[dict]:
    """Batches (dicts of tensors) from a calibration file; see :data:`CALIBRATION_HELP` for the formats."""
    if not os.path.exists(path):
        raise RewriteError(f"Calibration file {path!r} does not exist. {CALIBRATION_HELP}")
    if os.path.isdir(path):
        raise RewriteError(f"Calibration {path!r} is a folder; give a file. {CALIBRATION_HELP}")
    if batch_size < 1:
        raise RewriteError(f"--batch-size must be at least 1 (got {batch_size}).")
    low = path.lower()
    if low.endswith((".txt", ".jsonl")):
        texts = _read_texts(path)
        if tokenizer is None:
            raise RewriteError(f"Calibration file {path!r} holds texts, but the model has no tokenizer to turn them "
                               "into tokens. Put the tokenizer files next to the model, or give tensors in a .pt or "
                               ".safetensors file instead.")
        limit = length or max_length(model, tokenizer) or 512
        if getattr(tokenizer, "pad_token", None) is None:  # no pad token: one text per batch
            return [_tok(tokenizer, [t], limit, model) for t in texts]
        # every batch padded to one length (the longest text, within the model's limit): the same shapes
        # compile once, and measured policies can pool statistics across batches
        longest = max(len(ids) for ids in tokenizer(texts, truncation=True, max_length=limit)["input_ids"])
        return [_tok(tokenizer, texts[i:i + batch_size], longest, model, fixed=True)
                for i in range(0, len(texts), batch_size)]
    if low.endswith(".safetensors"):
        check_safetensors(path, "calibration")
        from safetensors.torch import load_file
        data: Any = load_file(path)
    elif low.endswith((".pt", ".pth")):
        data = torch_load(path, "calibration file of tensors")
    else:
        raise RewriteError(f"Calibration file {path!r} has an unknown type. {CALIBRATION_HELP}")
    groups = data if isinstance(data, (list, tuple)) else [data]
    batches = []
    params = forward_params(model)
    for g in groups:
        if not isinstance(g, dict) or not g or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in g.items()):
            raise RewriteError(f"Calibration file {path!r} must hold a dict of named tensors (or a list of such "
                               f"dicts). {CALIBRATION_HELP}")
        unknown = sorted(k for k in g if params is not None and k not in params)
        if unknown:
            raise RewriteError(f"Calibration file {path!r} has tensor(s) {', '.join(map(repr, unknown))} that "
                               f"{type(model).__name__}.forward does not take. Its inputs are: "
                               f"{', '.join(sorted(params or []))}. Rename or drop them.")
        sizes = {v.shape[0] if v.dim() else None for v in g.values()}
        if len(sizes) != 1 or None in sizes:
            raise RewriteError(f"The tensors in calibration file {path!r} do not share a batch (first) dimension: "
                               f"{ {k: tuple(v.shape) for k, v in g.items()} }.")
        n = sizes.pop()
        for i in range(0, n, batch_size):
            batches.append({k: v[i:i + batch_size] for k, v in g.items()})
    if not batches:
        raise RewriteError(f"Calibration file {path!r} holds no examples.")
    return batches


def _tok(tokenizer, texts: list, limit: int, model, fixed: bool = False) -> dict:
    enc = tokenizer(texts, padding="max_length" if fixed else True, truncation=True, max_length=limit,
                    return_tensors="pt")
    params = forward_params(model)
    out = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor) and (params is None or k in params)}
    return _add_decoder_inputs(out, model, params, len(texts), 4, torch.Generator().manual_seed(0))


def _read_texts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RewriteError(f"Calibration file {path!r} could not be read as UTF-8 text ({first_line(err)}).") from None
    texts = []
    if path.lower().endswith(".jsonl"):
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise RewriteError(f"Line {no} of calibration file {path!r} is not valid JSON ({err.msg}). Each line "
                                   "must be an object like {\"text\": \"...\"}.") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise RewriteError(f"Line {no} of calibration file {path!r} has no \"text\" string. Each line must be "
                                   "an object like {\"text\": \"...\"}.")
            texts.append(obj["text"])
    else:
        texts = [t for t in (line.strip() for line in lines) if t]
    if not texts:
        raise RewriteError(f"Calibration file {path!r} holds no texts. {CALIBRATION_HELP}")
    return texts
