"""Weights: safetensors and ``torch.load(weights_only=True)`` files, checked before use."""
from __future__ import annotations

import os
from typing import Any

import torch

from ..actions import RewriteError
from .files import first_line, read_json


def check_safetensors(path: str, what: str = "weights") -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as fh:
            return list(fh.keys())
    except Exception as err:
        fix = ("Re-download or re-save the model (model.save_pretrained(folder))" if what == "weights" else
               "Re-create the file")
        raise RewriteError(f"The {what} file {path!r} is truncated or corrupt ({first_line(err)}). {fix} and try "
                           "again.") from None


def torch_load(path: str, what: str = "PyTorch file") -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        if "weights_only" in text.lower() or "Unsupported global" in text or "unpickl" in text.lower():
            raise RewriteError(
                f"{path!r} holds pickled Python objects, not just tensors, and is read with weights_only=True, "
                "which refuses code. Convert it to safetensors (or save only the state_dict) and try again.") from None
        raise RewriteError(f"{path!r} is truncated or corrupt and could not be read as a {what} "
                           f"({first_line(err)}). Re-create it and try again.") from None


def check_weights(folder: str) -> list[str]:
    """The weight files of a Hugging Face folder, each validated (headers read; no code executed)."""
    idx = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(idx):
        index = read_json(idx, "Weights index")
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise RewriteError(f"Weights index {idx!r} lists no shards; it is corrupt. Re-save the model.")
        files = []
        for shard in shards:
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise RewriteError(f"Weights shard {path!r} named by {idx!r} is missing. Re-download the model.")
            check_safetensors(path)
            files.append(path)
        return files
    if os.path.isfile(single):
        check_safetensors(single)
        return [single]
    bidx = os.path.join(folder, "pytorch_model.bin.index.json")
    bin_ = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(bidx):
        index = read_json(bidx, "Weights index")
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        files = [os.path.join(folder, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise RewriteError(f"Weights shard {f!r} named by {bidx!r} is missing. Re-download the model.")
            _check_state_dict(torch_load(f), f)
        return files
    if os.path.isfile(bin_):
        _check_state_dict(torch_load(bin_), bin_)
        return [bin_]
    raise RewriteError(f"{folder!r} has a config.json but no weights (model.safetensors or pytorch_model.bin). "
                       "Save the model with model.save_pretrained(folder), or copy its weights there.")


def _check_state_dict(obj: Any, path: str) -> dict:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise RewriteError(f"{path!r} is not a state dict (a mapping from parameter names to tensors). "
                           "Save model.state_dict() (or use safetensors) and try again.")
    return obj


def read_state_dict(path: str) -> dict:
    """Tensors from a ``.safetensors`` file, or a ``torch.save``d state dict read with ``weights_only=True``."""
    if not os.path.exists(path):
        raise RewriteError(f"State-dict file {path!r} does not exist. Check the path given to --state-dict.")
    if path.endswith(".safetensors"):
        check_safetensors(path)
        from safetensors.torch import load_file
        return load_file(path)
    return _check_state_dict(torch_load(path), path)
