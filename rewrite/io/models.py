"""Building models: a ``transformers`` class from a folder's config (no code from the folder runs unless
allowed), or a ``module:factory`` function (only with ``allow_code``), and loading weights into it."""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Optional

import torch

from ..actions import RewriteError
from .files import first_line, quiet_transformers, read_json
from .weights import check_weights


#: Files a Hugging Face tokenizer / processor is made of (copied from the source folder by ``save``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json", "feature_extractor_config.json", "image_processor_config.json")


FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise RewriteError("Loading Hugging Face folders needs transformers: pip install 'rewrite[hf]'.") from None
    return transformers


def from_pretrained(folder: str, allow_code: bool, attn: Optional[str], architecture: Optional[str] = None):
    transformers = transformers_module()
    cfg_path = os.path.join(folder, "config.json")
    raw = read_json(cfg_path, "Model config")
    if not isinstance(raw, dict):
        raise RewriteError(f"Model config {cfg_path!r} is not a JSON object; it is corrupt. Re-save the model.")
    remote = bool(raw.get("auto_map"))
    if remote and not allow_code:
        raise RewriteError(f"{cfg_path!r} asks for custom model code from the folder (auto_map), which would run "
                           "Python code from the checkpoint. Pass --allow-code (allow_code=True) only if you trust it.")
    if "model_type" not in raw and not remote:
        raise RewriteError(f"Model config {cfg_path!r} has no \"model_type\", so its architecture is unknown. "
                           "Re-save the model with transformers (model.save_pretrained(folder)).")
    with quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=allow_code)
        except Exception as err:
            raise RewriteError(
                f"Model config {cfg_path!r} names model_type {raw.get('model_type')!r}, which transformers "
                f"{transformers.__version__} does not know ({first_line(err)}). Upgrade transformers, or pass "
                "--allow-code if the folder ships its own model code you trust.") from None
    arch = architecture or (config.architectures[0] if getattr(config, "architectures", None) else None)
    if arch is not None and not remote:
        cls = getattr(transformers, arch, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise RewriteError(f"Model config {cfg_path!r} names the architecture {arch!r}, which transformers "
                               f"{transformers.__version__} does not have. Fix \"architectures\" in config.json "
                               "(e.g. \"BertModel\"), or upgrade transformers.")
    else:
        cls = transformers.AutoModel
    files = check_weights(folder)
    kwargs: dict = {"config": config, "output_loading_info": True}
    if cls is transformers.AutoModel:
        kwargs["trust_remote_code"] = allow_code
    if any(f.endswith(".safetensors") for f in files):
        kwargs["use_safetensors"] = True
    with quiet_transformers():
        try:
            try:
                model, info = cls.from_pretrained(folder, attn_implementation=attn, **kwargs)
            except (ValueError, TypeError) as err:
                if "attn_implementation" not in str(err) and "attention" not in str(err).lower():
                    raise
                model, info = cls.from_pretrained(folder, **kwargs)
        except RewriteError:
            raise
        except Exception as err:
            raise RewriteError(f"The weights in {folder!r} do not load into {cls.__name__} ({first_line(err)}). "
                               "Check that config.json matches the weights, or re-save the model.") from None
    model.eval()
    return model, info


def load_tokenizer(folder: str, allow_code: bool, notes: list):
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES[:11]):
        return None
    transformers = transformers_module()
    with quiet_transformers():
        try:
            return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=allow_code)
        except Exception as err:
            notes.append(f"the tokenizer in {folder!r} could not be loaded ({first_line(err)}); inputs are "
                         "generated from the config instead")
            return None


def import_factory(spec: str, allow_code: bool):
    if not allow_code:
        raise RewriteError(f"{spec!r} is a module:factory source: building it imports and runs Python code. "
                           "Pass --allow-code (allow_code=True) to allow that.")
    mod_name, fn_name = spec.split(":")
    added = False
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
        added = True
    try:
        module = importlib.import_module(mod_name)
    except Exception as err:
        raise RewriteError(f"Cannot import module {mod_name!r} for factory {spec!r} ({type(err).__name__}: "
                           f"{first_line(err)}). Check the name, and that it is importable from here.") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewriteError(f"Module {mod_name!r} has no callable {fn_name!r} (from {spec!r}). Name a function that "
                           "returns the torch.nn.Module.")
    return module, fn


def build_factory(spec: str, allow_code: bool) -> tuple[torch.nn.Module, Optional[dict]]:
    module, fn = import_factory(spec, allow_code)
    try:
        model = fn()
    except Exception as err:
        raise RewriteError(f"Factory {spec!r} failed ({type(err).__name__}: {first_line(err)}).") from None
    if not isinstance(model, torch.nn.Module):
        raise RewriteError(f"Factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module.")
    example = None
    hook = getattr(module, "example_inputs", None)
    if callable(hook):
        example = hook()
        if not isinstance(example, dict):
            raise RewriteError(f"{spec.split(':')[0]}.example_inputs() must return a dict of keyword tensors.")
    model.eval()
    model.__dict__["_rewrite_factory"] = spec
    return model, example


def load_into(model: torch.nn.Module, state: dict, where: str) -> list[str]:
    """Load ``state`` into ``model``; returns the keys the model does not have (yet). Missing keys are an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise RewriteError(f"The weights in {where!r} lack {len(missing)} tensor(s) the model has "
                           f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}). Give the matching weights.")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise RewriteError(f"The weights in {where!r} do not fit the model: {k!r} has shape {tuple(state[k].shape)} "
                           f"but the model expects {tuple(own[k].shape)}. Give the matching weights.")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return [k for k in state if k not in own]
