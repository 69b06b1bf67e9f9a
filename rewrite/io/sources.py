"""Model sources the CLI and ``rewrite.load`` open: a Hugging Face folder, a ``.pt2`` exported program (read
weights-only unless code is allowed), or ``module:factory``."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import os
import re
from typing import Any, Iterator, Optional

import torch

from ..actions import RewriteError
from .checkpoint import META_FILE, PLAN_FILE, load
from .files import first_line, read_json
from .models import FACTORY_RE, build_factory, from_pretrained, load_into, load_tokenizer
from .weights import read_state_dict


@dataclasses.dataclass
class Source:
    """A model the CLI was pointed at, loaded, with what is known about making inputs for it."""
    spec: str                       # as the user gave it
    kind: str                       # "hf" | "pt2" | "factory"
    model: Any = None               # nn.Module (for "pt2": the exported program's module)
    path: str = ""                  # the folder / file on disk ("" for a factory without --state-dict)
    tokenizer: Any = None
    program: Any = None             # torch.export.ExportedProgram (kind "pt2")
    plan: Optional[dict] = None     # rewrite_plan.json, if the folder is a rewritten checkpoint
    meta: Optional[dict] = None
    example: Optional[dict] = None  # a stored example batch (rewritten folder, .pt2 example inputs, factory hook)
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def inputs(self) -> list[str]:
        """Paths that must never be written to."""
        return [p for p in (self.path, self.meta.get("_state_dict") if self.meta else None) if p]


def describe_sources() -> str:
    return ("a Hugging Face model folder (config.json + model.safetensors, or pytorch_model.bin read with "
            "weights_only=True), a .pt2 file written by torch.export.save, or module:factory with --allow-code "
            "(and --state-dict FILE for its weights)")


def open_source(spec: str, *, state_dict: Optional[str] = None, allow_code: bool = False,
                attn_implementation: str = "eager", rewritten: bool = False) -> Source:
    """Load what ``spec`` names. ``rewritten=True`` loads a rewritten folder with its plan applied."""
    if not spec:
        raise RewriteError(f"No model given. Give {describe_sources()}.")
    if os.path.isdir(spec):
        if rewritten and os.path.isfile(os.path.join(spec, PLAN_FILE)):
            model = load(spec, allow_code=allow_code)
            src = Source(spec=spec, kind="hf", model=model, path=spec, plan=model.__dict__.get("_rewrite_plan"),
                         meta=model.__dict__.get("_rewrite_meta"), example=model.__dict__.get("_rewrite_example"))
            src.tokenizer = load_tokenizer(spec, allow_code, src.warnings)
            return src
        return _open_folder(spec, allow_code, attn_implementation)
    if os.path.isfile(spec):
        if spec.endswith(".pt2"):
            return _open_pt2(spec, allow_code)
        if spec.endswith((".safetensors", ".bin", ".pt", ".pth")):
            raise RewriteError(f"{spec!r} is a weights file, not a model: give the folder that holds it with its "
                               "config.json, or module:factory --allow-code --state-dict " + repr(spec) + ".")
        raise RewriteError(f"{spec!r} is a file rewrite cannot read as a model. Give {describe_sources()}.")
    if FACTORY_RE.match(spec) and not os.path.lexists(spec):
        return _open_factory(spec, state_dict, allow_code)
    raise RewriteError(f"Model path {spec!r} does not exist. Check the path, or give {describe_sources()}.")


def _open_folder(folder: str, allow_code: bool, attn_implementation: str) -> Source:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise RewriteError(f"{folder!r} is not a model folder: it has no config.json. Give a Hugging Face model "
                           "folder (as written by model.save_pretrained, with config.json and model.safetensors), "
                           "a .pt2 file, or module:factory.")
    meta = read_json(os.path.join(folder, META_FILE), "Rewrite metadata") if os.path.isfile(
        os.path.join(folder, META_FILE)) else None
    if meta and meta.get("kind") == "factory":
        raise RewriteError(f"{folder!r} holds a rewritten model built by the factory {meta.get('factory')!r}; "
                           "load it with rewrite.load(folder, allow_code=True) or give that factory as the source.")
    src = Source(spec=folder, kind="hf", path=folder, meta=meta)
    model, info = from_pretrained(folder, allow_code, (meta or {}).get("attn_implementation", attn_implementation),
                                   (meta or {}).get("architecture"))
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        src.warnings.append(f"{len(missing)} weight(s) were not in the checkpoint and are freshly initialised: "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    src.model = model
    src.tokenizer = load_tokenizer(folder, allow_code, src.warnings)
    return src


class _Grab(logging.Handler):
    def __init__(self):
        super().__init__()
        self.text: list[str] = []

    def emit(self, record):
        self.text.append(logging.Formatter().format(record))


class _PickledCode(Exception):
    pass


@contextlib.contextmanager
def _weights_only_everywhere() -> Iterator[None]:
    """``torch.export.load`` reads an archive's weights, constants and sample inputs with ``torch.load``, falling
    back to ``weights_only=False``, and some parts with ``pickle.loads``: either runs code planted in the file.
    For the duration, both only accept tensors and plain containers."""
    import pickle
    real_load, real_loads = torch.load, pickle.loads

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return real_load(f, *args, **kwargs)
        except Exception as err:
            if "weights_only" in str(err) or "Unsupported global" in str(err) or "unpickl" in str(err).lower():
                raise _PickledCode(str(err).splitlines()[0]) from None
            raise

    def loads(data, *args, **kwargs):
        from torch._weights_only_unpickler import Unpickler
        try:
            return Unpickler(io.BytesIO(data)).load()
        except Exception as err:
            raise _PickledCode(str(err).splitlines()[0] if str(err) else type(err).__name__) from None

    torch.load, pickle.loads = load, loads
    try:
        yield
    finally:
        torch.load, pickle.loads = real_load, real_loads


def load_program(path: str, allow_code: bool = False):
    """``torch.export.load`` with clear errors; imports the ``transformers`` output types a program names.
    Without ``allow_code`` nothing pickled in the archive can run code (``_weights_only_everywhere``)."""
    logger = logging.getLogger("torch.export")
    tried: set = set()
    while True:
        grab = _Grab()
        handlers, propagate = list(logger.handlers), logger.propagate
        logger.handlers, logger.propagate = [grab], False
        try:
            with (contextlib.nullcontext() if allow_code else _weights_only_everywhere()):
                return torch.export.load(path)
        except _PickledCode as err:
            raise RewriteError(f"{path!r} holds pickled Python objects that would run code when read ({err}). "
                               "Pass --allow-code (allow_code=True) only if you trust this file.") from None
        except Exception as err:
            if isinstance(err.__cause__, _PickledCode) or isinstance(err.__context__, _PickledCode):
                raise RewriteError(f"{path!r} holds pickled Python objects that would run code when read. Pass "
                                   "--allow-code (allow_code=True) only if you trust this file.") from None
            text = "\n".join(grab.text) + "\n" + str(err)
            m = re.search(r"Deserializing ([\w.]+) in pytree is not registered", text)
            module = m.group(1).rsplit(".", 1)[0] if m else None
            if module and module not in tried and (module.startswith("transformers.") or allow_code):
                tried.add(module)
                try:
                    importlib.import_module(module)
                    continue
                except Exception:
                    pass
            if m:
                raise RewriteError(f"{path!r} returns outputs of type {m.group(1)!r}, which must be imported to read "
                                   f"it. Pass --allow-code (allow_code=True) to import {module!r}.") from None
            raise RewriteError(f"{path!r} could not be read as a torch.export program ({first_line(err)}); it may be "
                               "truncated or written by another torch version. Re-export it with torch.export.save.") from None
        finally:
            logger.handlers, logger.propagate = handlers, propagate


def _open_pt2(path: str, allow_code: bool = False) -> Source:
    program = load_program(path, allow_code)
    example = None
    ex = getattr(program, "example_inputs", None)
    if ex is not None:
        args, kwargs = ex
        example = dict(kwargs)
        if args:
            example["__args__"] = tuple(args)
    return Source(spec=path, kind="pt2", model=program.module(), path=path, program=program, example=example)


def _open_factory(spec: str, state_dict: Optional[str], allow_code: bool) -> Source:
    model, example = build_factory(spec, allow_code)
    src = Source(spec=spec, kind="factory", model=model, path="", example=example, meta={})
    if state_dict:
        extra = load_into(model, read_state_dict(state_dict), state_dict)
        if extra:
            src.warnings.append(f"{len(extra)} tensor(s) in {state_dict!r} are not in the model and were ignored")
        src.meta["_state_dict"] = state_dict
    return src
