"""Real English passages from text already on the machine (no network), for accuracy benchmarks.

Sources differ on purpose, so calibration and evaluation do not share text:

* ``reference``: the Python language reference topics shipped with the interpreter (``pydoc_data``);
* ``docstrings``: module docstrings of the standard library;
* ``licenses``: license texts under ``/usr/share/common-licenses`` (where present);
* ``packages``: long descriptions of installed packages (``importlib.metadata``).

Each passage is exactly ``length`` tokens of contiguous text (no padding), tokenized with the model's
tokenizer, with [CLS]/[SEP] as the tokenizer adds them.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import re
import sys


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def source_texts(source: str) -> list[str]:
    if source == "reference":
        from pydoc_data.topics import topics
        return [_clean(topics[k]) for k in sorted(topics)]
    if source == "docstrings":
        out = []
        for info in sorted(pkgutil.iter_modules(), key=lambda i: i.name):
            if info.name.startswith("_") or info.name in sys.builtin_module_names or info.name in ("this", "antigravity"):
                continue
            if not str(getattr(info.module_finder, "path", "")).startswith(sys.base_prefix):
                continue
            try:
                mod = importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - some stdlib modules need extras; skip them
                continue
            if mod.__doc__ and len(mod.__doc__) > 400:
                out.append(_clean(mod.__doc__))
        return out
    if source == "licenses":
        folder = "/usr/share/common-licenses"
        if not os.path.isdir(folder):
            return []
        return [_clean(open(os.path.join(folder, f), errors="ignore").read()) for f in sorted(os.listdir(folder))
                if os.path.isfile(os.path.join(folder, f))]
    if source == "packages":
        out = []
        for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata.get("Name", "")):
            body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else ""
            body = body or dist.metadata.get("Description", "") or ""
            if len(body) > 2000:
                out.append(_clean(re.sub(r"[`#*=\-_|<>\[\]()]{2,}", " ", body)))
        return out
    raise ValueError(source)


def passages(tokenizer, sources: list[str], count: int, length: int = 512, seed: int = 0) -> list[dict]:
    """``count`` batches of one passage each: ``{"input_ids", "attention_mask"}`` of exactly ``length`` tokens."""
    out = []
    for source in sources:
        text = " ".join(source_texts(source))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        step = length - 2
        for start in range(0, len(ids) - step, step * 3):  # spread passages over the source
            chunk = [tokenizer.cls_token_id] + ids[start:start + step] + [tokenizer.sep_token_id]
            out.append(chunk)
    import random
    import torch
    rng = random.Random(seed)
    by_source = out
    if len(by_source) < count:
        raise RuntimeError(f"only {len(by_source)} passages of {length} tokens in {sources}; need {count}")
    chosen = rng.sample(by_source, count)
    return [{"input_ids": torch.tensor([c]), "attention_mask": torch.ones(1, len(c), dtype=torch.long)}
            for c in chosen]
