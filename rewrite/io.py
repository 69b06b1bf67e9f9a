"""Checkpoint I/O: ``rewrite.save`` / ``rewrite.load``, and reading what the CLI is given.

A rewritten checkpoint is a Hugging Face model folder plus a few small files::

    OUT/
      config.json, model.safetensors, tokenizer files ...   # what save_pretrained writes (+ the tokenizer)
      rewrite_plan.json             # report.to_json()["plan"]: {"version": 1, "sites": {name: {action, args}}}
      rewrite_model.json            # how to rebuild: architecture class, attention implementation, example recipe
      rewrite_example.safetensors   # the example batch the plan is re-applied with
      rewrite_state.safetensors     # state mixers fitted on calibration data (only when there is some)

``rewrite.load(OUT)`` rebuilds the architecture from its config (a ``transformers`` class by name: no code
from the folder runs), loads the weights from safetensors, and re-applies the plan with
:func:`rewrite.optimize` on the stored example batch, so the loaded model computes what the saved one did.

Example::

    model = rewrite.optimize(model, "exact", example_kwargs=batch)
    rewrite.save(model, "minilm-rewritten", tokenizer=tokenizer)
    again = rewrite.load("minilm-rewritten")

Everything that reads user input raises :class:`rewrite.RewriteError` with a message that quotes the
offending path or value and names the fix. Weights are read with safetensors or ``torch.load(weights_only=True)``;
anything that would run code from a checkpoint (a ``module:factory`` source, ``trust_remote_code``) needs
``allow_code=True`` (``--allow-code`` on the command line).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from typing import Any, Iterator, Optional

import torch

from .actions import RewriteError
from .policy import PRESETS, Policy

PLAN_FILE = "rewrite_plan.json"
META_FILE = "rewrite_model.json"
EXAMPLE_FILE = "rewrite_example.safetensors"
STATE_FILE = "rewrite_state.safetensors"
FORMAT = "rewrite-checkpoint"
FORMAT_VERSION = 1

#: Files a Hugging Face tokenizer / processor is made of (copied from the source folder by ``save``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json", "feature_extractor_config.json", "image_processor_config.json")

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


# ------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------
def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def same_or_inside(path: str, container: str) -> bool:
    """Whether ``path`` is ``container`` or lies inside it (after resolving links)."""
    p, c = _real(path), _real(container)
    return p == c or p.startswith(c.rstrip(os.sep) + os.sep)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while we load (we report problems ourselves)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is optional for non-HF sources
        yield
        return
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise RewriteError(f"{what} {path!r} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
                           "Fix or re-create the file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RewriteError(f"{what} {path!r} could not be read ({_first_line(err)}).") from None


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


# ------------------------------------------------------------------------------------------------------
# writing safely: a temporary sibling renamed into place when complete
# ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(target: str, overwrite: bool = False, is_dir: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on failure it is removed.

    An interrupted or failed write leaves ``target`` as it was (absent, or the old version).
    """
    target = os.path.abspath(target)
    if os.path.lexists(target) and not overwrite:
        raise RewriteError(f"Output {target!r} already exists. Pass --overwrite (overwrite=True) to replace it, "
                           "or choose another path.")
    parent = os.path.dirname(target) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise RewriteError(f"Cannot create the folder {parent!r} for output {target!r} ({_first_line(err)}).") from None
    base = os.path.basename(target.rstrip(os.sep))
    _remove_stale(parent, base)
    prefix = f".{base}.tmp-{os.getpid()}-"
    try:
        if is_dir:
            tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(base)[1], dir=parent)
            os.close(fd)
    except OSError as err:
        raise RewriteError(f"Cannot write into {parent!r} ({_first_line(err)}); choose a writable output path.") from None
    old = None
    try:
        try:
            yield tmp
        except OSError as err:  # a full disk, a quota, a folder made read-only meanwhile: the user's to fix
            raise RewriteError(f"Writing {target!r} failed ({_first_line(err)}); nothing was written. Free some "
                               "space or choose another output path.") from None
        _default_permissions(tmp)
        if os.path.lexists(target):
            old = tempfile.mkdtemp(prefix=f".{base}.old-{os.getpid()}-", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
        tmp = None
    except BaseException:
        if old is not None and not os.path.lexists(target):
            os.rename(old, target)
            old = None
        raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.lexists(leftover):
                if os.path.isdir(leftover) and not os.path.islink(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    os.remove(leftover)


def _remove_stale(parent: str, base: str) -> None:
    """Remove what a killed run left beside ``base``: temporary siblings whose writing process is gone."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(re.escape(f".{base}.") + r"(?:tmp|old)-(\d+)-.*", name)
        if m is None or _alive(int(m.group(1))):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, owned by someone else
    return True


def check_space(path: str, need_bytes: int) -> None:
    """Refuse up front an output whose folder is not writable or lacks room for about ``need_bytes``."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.isdir(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RewriteError(f"Cannot write {path!r}: {parent!r} is not writable. Choose another output path.")
    free = shutil.disk_usage(parent).free
    if free < need_bytes * 1.05 + (1 << 20):
        raise RewriteError(f"Not enough free space for {path!r}: about {need_bytes / 2**20:.0f} MiB needed, "
                           f"{free / 2**20:.0f} MiB free in {parent!r}. Free some space or choose another path.")


def model_bytes(model: Any) -> int:
    """The bytes of a model's parameters and buffers (what a saved copy needs, roughly)."""
    if not isinstance(model, torch.nn.Module):
        return 0
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _default_permissions(path: str) -> None:
    """Temporary files are private (0600/0700); give the finished output the usual permissions (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~umask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


def check_output(out: str, inputs: list[str], overwrite: bool, what: str = "Output") -> str:
    """Refuse an output that is an input, lies inside one, or contains one; or exists without ``overwrite``."""
    for src in inputs:
        if not src or not os.path.lexists(src):
            continue
        if same_or_inside(out, src):
            raise RewriteError(f"{what} {out!r} is the input {src!r} or lies inside it; rewrite never writes into its "
                               "input. Choose an output path outside the input (e.g. a sibling folder).")
        if os.path.lexists(out) and same_or_inside(src, out):
            raise RewriteError(f"{what} {out!r} contains the input {src!r}; replacing it would delete the input. "
                               "Choose another output path.")
    if os.path.lexists(out) and not overwrite:
        raise RewriteError(f"{what} {out!r} already exists. Pass --overwrite to replace it, or choose another path.")
    return out


# ------------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------------
def _check_safetensors(path: str, what: str = "weights") -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as fh:
            return list(fh.keys())
    except Exception as err:
        fix = ("Re-download or re-save the model (model.save_pretrained(folder))" if what == "weights" else
               "Re-create the file")
        raise RewriteError(f"The {what} file {path!r} is truncated or corrupt ({_first_line(err)}). {fix} and try "
                           "again.") from None


def _torch_load(path: str, what: str = "PyTorch file") -> Any:
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
                           f"({_first_line(err)}). Re-create it and try again.") from None


def check_weights(folder: str) -> list[str]:
    """The weight files of a Hugging Face folder, each validated (headers read; no code executed)."""
    idx = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(idx):
        index = _read_json(idx, "Weights index")
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise RewriteError(f"Weights index {idx!r} lists no shards; it is corrupt. Re-save the model.")
        files = []
        for shard in shards:
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise RewriteError(f"Weights shard {path!r} named by {idx!r} is missing. Re-download the model.")
            _check_safetensors(path)
            files.append(path)
        return files
    if os.path.isfile(single):
        _check_safetensors(single)
        return [single]
    bidx = os.path.join(folder, "pytorch_model.bin.index.json")
    bin_ = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(bidx):
        index = _read_json(bidx, "Weights index")
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        files = [os.path.join(folder, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise RewriteError(f"Weights shard {f!r} named by {bidx!r} is missing. Re-download the model.")
            _check_state_dict(_torch_load(f), f)
        return files
    if os.path.isfile(bin_):
        _check_state_dict(_torch_load(bin_), bin_)
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
        _check_safetensors(path)
        from safetensors.torch import load_file
        return load_file(path)
    return _check_state_dict(_torch_load(path), path)


# ------------------------------------------------------------------------------------------------------
# sources: a Hugging Face folder, a .pt2 exported program, or module:factory
# ------------------------------------------------------------------------------------------------------
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


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
            src.tokenizer = _load_tokenizer(spec, allow_code, src.warnings)
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
    meta = _read_json(os.path.join(folder, META_FILE), "Rewrite metadata") if os.path.isfile(
        os.path.join(folder, META_FILE)) else None
    if meta and meta.get("kind") == "factory":
        raise RewriteError(f"{folder!r} holds a rewritten model built by the factory {meta.get('factory')!r}; "
                           "load it with rewrite.load(folder, allow_code=True) or give that factory as the source.")
    src = Source(spec=folder, kind="hf", path=folder, meta=meta)
    model, info = _from_pretrained(folder, allow_code, (meta or {}).get("attn_implementation", attn_implementation),
                                   (meta or {}).get("architecture"))
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        src.warnings.append(f"{len(missing)} weight(s) were not in the checkpoint and are freshly initialised: "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    src.model = model
    src.tokenizer = _load_tokenizer(folder, allow_code, src.warnings)
    return src


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RewriteError("Loading Hugging Face folders needs transformers: pip install 'rewrite[hf]'.") from None
    return transformers


def _from_pretrained(folder: str, allow_code: bool, attn: Optional[str], architecture: Optional[str] = None):
    transformers = _transformers()
    cfg_path = os.path.join(folder, "config.json")
    raw = _read_json(cfg_path, "Model config")
    if not isinstance(raw, dict):
        raise RewriteError(f"Model config {cfg_path!r} is not a JSON object; it is corrupt. Re-save the model.")
    remote = bool(raw.get("auto_map"))
    if remote and not allow_code:
        raise RewriteError(f"{cfg_path!r} asks for custom model code from the folder (auto_map), which would run "
                           "Python code from the checkpoint. Pass --allow-code (allow_code=True) only if you trust it.")
    if "model_type" not in raw and not remote:
        raise RewriteError(f"Model config {cfg_path!r} has no \"model_type\", so its architecture is unknown. "
                           "Re-save the model with transformers (model.save_pretrained(folder)).")
    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=allow_code)
        except Exception as err:
            raise RewriteError(
                f"Model config {cfg_path!r} names model_type {raw.get('model_type')!r}, which transformers "
                f"{transformers.__version__} does not know ({_first_line(err)}). Upgrade transformers, or pass "
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
    with _quiet_transformers():
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
            raise RewriteError(f"The weights in {folder!r} do not load into {cls.__name__} ({_first_line(err)}). "
                               "Check that config.json matches the weights, or re-save the model.") from None
    model.eval()
    return model, info


def _load_tokenizer(folder: str, allow_code: bool, notes: list):
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES[:11]):
        return None
    transformers = _transformers()
    with _quiet_transformers():
        try:
            return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=allow_code)
        except Exception as err:
            notes.append(f"the tokenizer in {folder!r} could not be loaded ({_first_line(err)}); inputs are "
                         "generated from the config instead")
            return None


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
            raise RewriteError(f"{path!r} could not be read as a torch.export program ({_first_line(err)}); it may be "
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


def _import_factory(spec: str, allow_code: bool):
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
                           f"{_first_line(err)}). Check the name, and that it is importable from here.") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewriteError(f"Module {mod_name!r} has no callable {fn_name!r} (from {spec!r}). Name a function that "
                           "returns the torch.nn.Module.")
    return module, fn


def build_factory(spec: str, allow_code: bool) -> tuple[torch.nn.Module, Optional[dict]]:
    module, fn = _import_factory(spec, allow_code)
    try:
        model = fn()
    except Exception as err:
        raise RewriteError(f"Factory {spec!r} failed ({type(err).__name__}: {_first_line(err)}).") from None
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


def _load_into(model: torch.nn.Module, state: dict, where: str) -> list[str]:
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


def _open_factory(spec: str, state_dict: Optional[str], allow_code: bool) -> Source:
    model, example = build_factory(spec, allow_code)
    src = Source(spec=spec, kind="factory", model=model, path="", example=example, meta={})
    if state_dict:
        extra = _load_into(model, read_state_dict(state_dict), state_dict)
        if extra:
            src.warnings.append(f"{len(extra)} tensor(s) in {state_dict!r} are not in the model and were ignored")
        src.meta["_state_dict"] = state_dict
    return src


# ------------------------------------------------------------------------------------------------------
# example inputs
# ------------------------------------------------------------------------------------------------------
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
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
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
            out = _add_decoder_inputs(out, model, params, batch, max(2, length // 2), gen)
            if "input_ids" in out:
                return out
        except Exception:
            pass  # fall back to inputs generated from the config
    if cfg is None:
        raise RewriteError(f"Cannot make example inputs for {type(model).__name__}: it has no Hugging Face config. "
                           "Give a batch with --calibration FILE.pt (a dict of tensors named like forward's arguments).")
    if main == "input_ids":
        vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 2:
            raise RewriteError(f"Cannot make example inputs for {type(model).__name__}: its config has no vocab_size. "
                               "Give a batch with --calibration.")
        low = min(5, vocab - 1)
        ids = torch.randint(low, vocab, (batch, length), generator=gen)
        out = {"input_ids": ids}
        if params is None or "attention_mask" in params:
            mask = torch.ones(batch, length, dtype=torch.long)
            if batch > 1 and length > 2 and not getattr(cfg, "is_decoder", False) and "CausalLM" not in type(model).__name__:
                mask[-1, length - max(1, length // 4):] = 0
            out["attention_mask"] = mask
        return _add_decoder_inputs(keep(out), model, params, batch, max(2, length // 2), gen)
    if main == "pixel_values":
        vc = getattr(cfg, "vision_config", None) or cfg
        size = getattr(vc, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        chans = getattr(vc, "num_channels", 3)
        return keep({"pixel_values": torch.randn(batch, chans, size, size, generator=gen)})
    if main == "input_features":
        mels = getattr(cfg, "num_mel_bins", 80)
        frames = 2 * getattr(cfg, "max_source_positions", 1500)
        out = {"input_features": torch.randn(batch, mels, frames, generator=gen)}
        return _add_decoder_inputs(keep(out), model, params, batch, 4, gen)
    if main == "input_values":
        return keep({"input_values": torch.randn(batch, 16000, generator=gen)})
    raise RewriteError(f"Cannot make example inputs for {type(model).__name__} (its main input is {main!r}). "
                       "Give a batch with --calibration FILE.pt (a dict of tensors named like forward's arguments).")


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


# ------------------------------------------------------------------------------------------------------
# calibration files
# ------------------------------------------------------------------------------------------------------
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
        _check_safetensors(path, "calibration")
        from safetensors.torch import load_file
        data: Any = load_file(path)
    elif low.endswith((".pt", ".pth")):
        data = _torch_load(path, "calibration file of tensors")
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
        raise RewriteError(f"Calibration file {path!r} could not be read as UTF-8 text ({_first_line(err)}).") from None
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


# ------------------------------------------------------------------------------------------------------
# policies given on the command line
# ------------------------------------------------------------------------------------------------------
POLICY_HELP = ("A policy is a preset name (" + ", ".join(PRESETS) + "; and auto, which measures candidate mixers on "
               "--calibration data within an error budget, where this rewrite has it), a JSON plan file "
               "({\"version\": 1, \"sites\": {\"<module>\": {\"action\": \"Exact\", \"args\": {}}}}, as written to "
               "rewrite_plan.json), or a JSON policy-map file ({\"<module name>\" | \"re:<regex>\" | \"_default\": "
               "\"<Action>\" | {\"action\": \"<Action>\", \"args\": {...}} | null}).")


def cli_presets() -> tuple:
    """Preset policy names: ``exact``, ``none``, and ``auto`` (measured on calibration data) where it exists."""
    extra = ("auto",) if callable(getattr(sys.modules.get("rewrite"), "auto", None)) else ()
    return tuple(PRESETS) + extra


def read_policy(spec: str) -> Any:
    """A policy from the command line: a preset name, a JSON plan / policy-map file, or inline JSON."""
    if spec in cli_presets():
        return spec
    text, where = None, None
    if os.path.isfile(spec):
        where = f"policy file {spec!r}"
        try:
            with open(spec, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as err:
            raise RewriteError(f"Policy file {spec!r} could not be read ({_first_line(err)}).") from None
    elif spec.lstrip().startswith("{"):
        where, text = "the inline policy", spec
    elif os.path.isdir(spec):
        raise RewriteError(f"Policy {spec!r} is a folder. {POLICY_HELP}")
    elif spec.endswith(".json") or os.sep in spec:
        raise RewriteError(f"Policy file {spec!r} does not exist. Check the path. {POLICY_HELP}")
    else:
        raise RewriteError(f"Unknown policy {spec!r}: it is not a preset and there is no file by that name. "
                           f"{POLICY_HELP}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RewriteError(f"The {where} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
                           f"Fix it. {POLICY_HELP}") from None
    if not isinstance(obj, dict):
        raise RewriteError(f"The {where} holds a JSON {type(obj).__name__}, not an object. {POLICY_HELP}")
    if "sites" in obj and not isinstance(obj["sites"], dict):
        raise RewriteError(f"The {where} is a plan whose \"sites\" is not an object mapping module names to actions. "
                           f"{POLICY_HELP}")
    if "sites" in obj:
        for name, act in obj["sites"].items():
            if act is not None and not (isinstance(act, dict) and isinstance(act.get("action"), str)):
                raise RewriteError(f"The {where} gives site {name!r} the value {act!r}; a plan entry must be "
                                   "{\"action\": \"<Action>\", \"args\": {...}}.")
    try:
        Policy(obj)
    except RewriteError as err:
        raise RewriteError(f"In the {where}: {err}") from None
    return obj


def plan_is_exact(plan: Optional[dict]) -> bool:
    """Whether every action of a resolved plan is lossless."""
    from .actions import action_from_json
    if not plan:
        return True
    for value in (plan.get("sites") or {}).values():
        try:
            act = action_from_json(value)
        except RewriteError:
            return False
        if act is not None and not act.exact:
            return False
    return True


# ------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------
def _source_folder(model) -> Optional[str]:
    folder = model.__dict__.get("_rewrite_folder")
    if folder is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        folder = name if isinstance(name, str) and name and os.path.isdir(name) else None
    return folder


def _tensor_example(example: dict) -> tuple[dict, dict]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in example.items() if isinstance(v, torch.Tensor)}
    other = {k: v for k, v in example.items() if not isinstance(v, torch.Tensor)}
    try:
        json.dumps(other)
    except TypeError:
        raise RewriteError(f"The example inputs {sorted(other)} are not tensors or JSON values, so they cannot be "
                           "stored with the checkpoint. Pass tensors (and plain numbers / booleans).") from None
    return tensors, other


def save(model: torch.nn.Module, folder: str, *, tokenizer: Any = None, example_kwargs: Optional[dict] = None,
         overwrite: bool = False, factory: Optional[str] = None) -> str:
    """Write a model returned by :func:`rewrite.optimize` to ``folder``; :func:`rewrite.load` rebuilds it.

    The folder is a Hugging Face model folder (config, safetensors weights including any buffers the rewrite
    added, the tokenizer when given or found beside the source) plus ``rewrite_plan.json`` (the resolved plan),
    ``rewrite_model.json`` (architecture and example recipe) and ``rewrite_example.safetensors`` (the example
    batch the plan is re-applied with: ``example_kwargs`` if given, else generated from the tokenizer or config).
    It is written to a temporary folder beside ``folder`` and renamed into place when complete. A model that
    is not a ``transformers`` model needs ``factory="module:function"`` (remembered when the CLI built it).

    Example::

        rewrite.save(model, "out/minilm-exact", tokenizer=tokenizer)
    """
    from . import __version__
    report = getattr(model, "rewrite_report", None) if isinstance(model, torch.nn.Module) else None
    if report is None:
        raise RewriteError("rewrite.save writes a model returned by rewrite.optimize (it stores the rewrite plan); "
                           "this model has no rewrite report. Run rewrite.optimize(model, policy, ...) first, "
                           "or use model.save_pretrained for an unchanged model.")
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise RewriteError(f"rewrite.save needs a folder path; got {folder!r}.")
    folder = os.fspath(folder)
    plan = report.to_json()["plan"]
    src_folder = _source_folder(model)
    check_output(folder, [src_folder] if src_folder else [], overwrite)
    transformers = None
    try:
        import transformers  # noqa: F811
    except ImportError:
        pass
    is_hf = transformers is not None and isinstance(model, transformers.PreTrainedModel)
    factory = factory or model.__dict__.get("_rewrite_factory")
    if not is_hf and not factory:
        raise RewriteError(f"rewrite.save cannot record how to rebuild {type(model).__name__}: it is not a "
                           "transformers model. Pass factory='module:function' (a function that returns the "
                           "unrewritten model), or save a transformers model.")
    example = example_kwargs if example_kwargs is not None else model.__dict__.get("_rewrite_example")
    recipe: dict
    if example is None:
        tok = tokenizer if tokenizer is not None else (
            _load_tokenizer(src_folder, False, []) if src_folder and is_hf else None)
        example = example_kwargs_for_save(model, tok)
        recipe = {"from": "tokenizer" if tok is not None and "input_ids" in example else "config",
                  "batch": 2, "length": 16, "seed": 0}
    else:
        recipe = {"from": "given"}
    if not isinstance(example, dict):
        raise RewriteError("example_kwargs must be a dict of keyword inputs (name -> tensor).")
    tensors, other = _tensor_example(example)
    fitted_tensors, fitted_index = _fitted_state(model, plan)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rewrite_version": __version__,
            "torch_version": torch.__version__, "kind": "transformers" if is_hf else "factory",
            "architecture": type(model).__name__ if is_hf else None,
            "factory": None if is_hf else factory,
            "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None) if is_hf else None,
            "policy": report.policy,
            "example": {"file": EXAMPLE_FILE, "keys": sorted(tensors), "other": other, "recipe": recipe},
            "sites": {r.name: r.status for r in report.sites},
            "fitted": fitted_index}
    if is_hf:
        meta["transformers_version"] = transformers.__version__
    check_space(folder, model_bytes(model))
    with atomic_path(folder, overwrite=overwrite) as tmp:
        _write_weights(model, tmp, is_hf, tokenizer, src_folder)
        from safetensors.torch import save_file
        save_file(tensors, os.path.join(tmp, EXAMPLE_FILE))
        if fitted_tensors:
            save_file(fitted_tensors, os.path.join(tmp, STATE_FILE))
        _write_json(os.path.join(tmp, PLAN_FILE), plan)
        _write_json(os.path.join(tmp, META_FILE), meta)
    return folder


def _write_weights(model: torch.nn.Module, tmp: str, is_hf: bool, tokenizer: Any, src_folder: Optional[str]) -> None:
    """The model's config and weights into ``tmp`` (``save_pretrained``, or safetensors for a factory model), with
    the tokenizer given or found beside the source."""
    if not is_hf:
        from safetensors.torch import save_model
        save_model(model, os.path.join(tmp, "model.safetensors"))
        return
    with _quiet_transformers():
        model.save_pretrained(tmp)
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "save_pretrained", None)):
            raise RewriteError(f"tokenizer= must be a Hugging Face tokenizer or processor (with save_pretrained); "
                               f"got {type(tokenizer).__name__}.")
        tokenizer.save_pretrained(tmp)
    elif src_folder:
        for name in TOKENIZER_FILES:
            path = os.path.join(src_folder, name)
            if os.path.isfile(path) and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy2(path, os.path.join(tmp, name))


def _fitted_state(model, plan: dict) -> tuple[dict, list]:
    """State that mixers fitted on calibration data (kept by the policy, not the model), for the planned actions."""
    from .actions import action_from_json
    from .api import model_session
    policy = getattr(model_session(model), "policy", None)
    fitted = getattr(policy, "fitted", None) or {}
    tensors, index = {}, []
    for (site_key, cand), state in fitted.items():
        name, ordinal = site_key
        planned = plan["sites"].get(name)
        try:
            if planned is None or action_from_json(planned).describe() != cand:
                continue  # a candidate the policy measured but did not choose
        except RewriteError:
            continue
        prefix = f"{len(index)}."
        index.append({"site": name, "ordinal": ordinal, "candidate": cand, "prefix": prefix,
                      "keys": sorted(state)})
        for k, v in state.items():
            tensors[prefix + k] = v.detach().cpu().contiguous()
    return tensors, index


def _read_fitted(folder: str, meta: dict) -> dict:
    index = meta.get("fitted") or []
    if not index:
        return {}
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise RewriteError(f"{folder!r} lists fitted mixer state but {STATE_FILE} is missing. Re-save the model.")
    state = read_state_dict(path)
    fitted = {}
    for entry in index:
        prefix = entry["prefix"]
        fitted[((entry["site"], int(entry["ordinal"])), entry["candidate"])] = {
            k: state[prefix + k] for k in entry["keys"] if prefix + k in state}
    return fitted


def example_kwargs_for_save(model, tokenizer) -> dict:
    return example_kwargs(model, tokenizer, batch=2, length=16, seed=0)


def read_plan(folder: str) -> dict:
    path = os.path.join(folder, PLAN_FILE)
    plan = _read_json(path, "Rewrite plan")
    if not isinstance(plan, dict) or not isinstance(plan.get("sites"), dict):
        raise RewriteError(f"Rewrite plan {path!r} is malformed: it must be {{\"version\": 1, \"sites\": {{...}}}}. "
                           "Re-create it with rewrite apply or rewrite.save.")
    try:
        Policy(plan)
    except RewriteError as err:
        raise RewriteError(f"In rewrite plan {path!r}: {err}") from None
    return plan


def load(folder: str, *, allow_code: bool = False, example_kwargs: Optional[dict] = None) -> torch.nn.Module:
    """Rebuild a rewritten model written by :func:`rewrite.save` or ``rewrite apply``.

    The architecture is built from the folder's config (a ``transformers`` class by name), the weights are read
    from safetensors, and the stored plan is re-applied with :func:`rewrite.optimize` on the stored example
    batch (or ``example_kwargs``). Models built by a ``module:factory`` need ``allow_code=True``.

    Example::

        model = rewrite.load("out/minilm-exact")
        print(model.rewrite_report)
    """
    from .api import optimize
    if not isinstance(folder, (str, os.PathLike)):
        raise RewriteError(f"rewrite.load needs a folder path; got {type(folder).__name__}.")
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise RewriteError(f"Rewritten model folder {folder!r} does not exist. Check the path.")
    if not os.path.isdir(folder):
        raise RewriteError(f"{folder!r} is a file; rewrite.load reads the folder written by rewrite.save / rewrite apply.")
    if not os.path.isfile(os.path.join(folder, PLAN_FILE)):
        raise RewriteError(f"{folder!r} is not a rewritten model folder: it has no {PLAN_FILE}. Write one with "
                           "rewrite.save(model, folder) or `rewrite apply SRC -o OUT`; load a plain Hugging Face "
                           "folder with AutoModel.from_pretrained.")
    plan = read_plan(folder)
    meta_path = os.path.join(folder, META_FILE)
    meta = _read_json(meta_path, "Rewrite metadata") if os.path.isfile(meta_path) else {"kind": "transformers"}
    if not isinstance(meta, dict):
        raise RewriteError(f"Rewrite metadata {meta_path!r} is malformed (not a JSON object). Re-save the model.")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise RewriteError(f"{folder!r} was written by a newer rewrite (format {meta.get('format_version')}); "
                           "upgrade rewrite to load it.")
    if meta.get("kind") == "factory":
        model, _ = build_factory(str(meta.get("factory")), allow_code)
        weights = os.path.join(folder, "model.safetensors")
        state = read_state_dict(weights)
        extra = _load_into(model, state, weights)
        saved_extra = {k: state[k] for k in extra}
    else:
        model, info = _from_pretrained(folder, allow_code, meta.get("attn_implementation") or "eager",
                                       meta.get("architecture"))
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise RewriteError(f"The weights in {folder!r} lack {', '.join(missing[:4])}"
                               f"{' ...' if len(missing) > 4 else ''}; the checkpoint is incomplete. Re-save it.")
        saved_extra = _saved_tensors(folder, set(info.get("unexpected_keys") or ()))
    example = example_kwargs
    if example is None:
        ex_path = os.path.join(folder, EXAMPLE_FILE)
        if os.path.isfile(ex_path):
            example = dict(read_state_dict(ex_path))
            example.update((meta.get("example") or {}).get("other") or {})
        else:
            tok = _load_tokenizer(folder, allow_code, [])
            example = example_kwargs_for_save(model, tok)
    fitted = _read_fitted(folder, meta)
    optimize(model, plan, example_kwargs=example, fitted=fitted)
    from .api import model_session
    restored = getattr(getattr(model_session(model), "policy", None), "fitted", None) or {}
    if fitted and set(restored) != set(fitted):
        raise RewriteError(f"The fitted mixer state in {folder!r} could not be handed to this rewrite version; "
                           "re-run `rewrite apply` with the calibration data to rebuild it.")
    if saved_extra:
        own = model.state_dict()
        usable = {k: v for k, v in saved_extra.items() if k in own}
        if usable:
            model.load_state_dict(usable, strict=False)
        unused = sorted(set(saved_extra) - set(usable))
        if unused:
            warnings.warn(f"rewrite.load: {len(unused)} saved tensor(s) in {folder!r} belong to no module of the "
                          f"rebuilt model and were ignored: {', '.join(unused[:4])}", stacklevel=2)
    model.__dict__["_rewrite_folder"] = folder
    model.__dict__["_rewrite_example"] = example
    model.__dict__["_rewrite_plan"] = plan
    model.__dict__["_rewrite_meta"] = meta
    return model


def _saved_tensors(folder: str, keys: set) -> dict:
    """The tensors named ``keys`` from a folder's safetensors weights (buffers the rewrite added)."""
    if not keys:
        return {}
    from safetensors import safe_open
    out = {}
    for path in check_weights(folder):
        if not path.endswith(".safetensors"):
            continue
        with safe_open(path, framework="pt") as fh:
            for k in fh.keys():
                if k in keys:
                    out[k] = fh.get_tensor(k)
    return out


# ------------------------------------------------------------------------------------------------------
# torch.export artifacts
# ------------------------------------------------------------------------------------------------------
def _by_name(fn, args: tuple, kwargs: dict, specs: list) -> Optional[dict]:
    """Per-input dynamic-shape specs keyed by ``fn``'s parameter names (the form ``torch.export`` matches best)."""
    if len(specs) != len(args) + len(kwargs):
        return None
    names = list(kwargs)
    if args:
        try:
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            return None
        if len(params) < len(args):
            return None
        names = [p.name for p in params[:len(args)]] + names
    return dict(zip(names, specs))


def _dynamic_shapes(model, args: tuple, kwargs: dict, limit: Optional[int]):
    """Batch (dim 0) dynamic for every tensor input; length (dim 1) for 2-d integer inputs (tokens, masks)."""
    from torch.export import Dim
    batch = Dim("batch", min=1, max=65536)
    length = Dim("length", min=1, max=limit or 65536)

    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        d = {0: batch}
        if t.dim() == 2 and not t.is_floating_point():
            d[1] = length
        return d

    values = list(args) + list(kwargs.values())
    if any(not isinstance(v, (torch.Tensor, int, float, bool, type(None))) for v in values):
        return None
    return _by_name(model.forward, args, kwargs, [spec(v) for v in values])


def export_model(model: torch.nn.Module, args: tuple, kwargs: dict):
    """``torch.export`` (non-strict) with dynamic batch and length where the model allows; static otherwise."""
    limit = max_length(model)
    errors = []
    for dyn in (True, False):
        try:
            ds = _dynamic_shapes(model, args, kwargs, limit) if dyn else None
            if dyn and ds is None:
                continue
            from .capture import mha_fastpath_off
            with torch.no_grad(), mha_fastpath_off():
                return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=ds), dyn
        except Exception as err:
            errors.append(f"{type(err).__name__}: {_first_line(err)}")
    raise RewriteError(f"torch.export could not capture {type(model).__name__} ({errors[-1]}). Drop --export: the "
                       "rewritten folder works through Dynamo, which handles graph breaks and KV caches.")


def rewrite_program(program, policy: Any, args: tuple, kwargs: dict, mode: str = "rewrite"):
    """Rewrite the graph of an exported program by ``policy``; returns ``(graph_module, session)``.

    ``mode="find"`` only finds the sites. The graph module runs with the program's calling convention;
    ``session.dynamic_shapes`` holds the program's dynamic input dims, for exporting the graph module again.
    """
    from .pipeline import Session, rewrite_graph
    from .report import RewriteReport
    pol = Policy(policy)
    dynamic = program_dynamic_shapes(program, args, kwargs)  # before rewriting: the graph's metadata is shared
    gm = program.module()
    session = Session(pol, RewriteReport(pol.describe()), gm, mode=mode)
    session.dynamic_shapes = dynamic
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    try:
        with torch.no_grad():
            rewrite_graph(gm, flat, session)
    except RewriteError:
        raise
    except Exception as err:
        raise RewriteError(f"The exported graph could not be rewritten ({type(err).__name__}: {_first_line(err)}).") from None
    unused = pol.unused_keys()
    if unused and mode == "rewrite":
        names = ", ".join(s.name for s in session.sites) or "(none)"
        raise RewriteError(f"Policy key(s) {', '.join(map(repr, unused))} match no attention site of the exported "
                           f"graph. The sites found are: {names}. Fix the names or patterns.")
    return gm, session


def program_dynamic_shapes(program, args: tuple, kwargs: dict):
    """The dynamic dims of an exported program's user inputs, as ``Dim`` specs for re-exporting it."""
    from torch.export import Dim
    user = list(program.graph_signature.user_inputs)
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    dims: dict = {}
    specs = []
    for name in user:
        val = vals.get(name)
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        d = {}
        for i, s in enumerate(val.shape):
            if isinstance(s, torch.SymInt):
                expr = s.node.expr
                if expr not in dims:
                    rng = program.range_constraints.get(expr)
                    lo = int(rng.lower) if rng is not None and rng.lower.is_finite else 1
                    hi = int(rng.upper) if rng is not None and rng.upper.is_finite else None
                    dims[expr] = Dim(f"d{len(dims)}", min=max(lo, 1), max=hi) if hi else Dim(f"d{len(dims)}", min=max(lo, 1))
                d[i] = dims[expr]
        specs.append(d or None)
    if any(not isinstance(v, (torch.Tensor, int, float, bool, type(None))) for v in list(args) + list(kwargs.values())):
        return None
    if not any(specs):
        return None
    return _by_name(program.module().forward, args, kwargs, specs)


def reexport(gm: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes=None):
    """Export a rewritten graph module again; returns ``(program, dynamic)``.

    Tries the given dynamic dims, then the batch dim alone (some mixers specialise on the length), then
    static shapes; ``dynamic`` is ``"all"``, ``"batch"`` or ``""``.
    """
    attempts = []
    if dynamic_shapes is not None:
        attempts.append(("all", dynamic_shapes))
        batch_only = {k: ({0: v[0]} if isinstance(v, dict) and 0 in v else None) for k, v in dynamic_shapes.items()}
        if batch_only != dynamic_shapes and any(batch_only.values()):
            attempts.append(("batch", batch_only))
    attempts.append(("", None))
    last = None
    for kind, ds in attempts:
        try:
            with torch.no_grad():
                return torch.export.export(gm, args, kwargs, strict=False, dynamic_shapes=ds), kind
        except Exception as err:
            last = err
    raise RewriteError(f"The rewritten graph could not be exported again ({type(last).__name__}: "
                       f"{_first_line(last)}). Drop --export; the rewritten folder still works.") from None


def program_bytes(program) -> bytes:
    """A program serialised in memory: torch.export.save writing straight to a full disk aborts the process
    (the C++ writer's destructor fails); writing these bytes ourselves fails with an error instead."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def save_program(program, path: str, overwrite: bool = False, data: Optional[bytes] = None) -> str:
    data = program_bytes(program) if data is None else data
    check_space(path, len(data))
    with atomic_path(path, overwrite=overwrite, is_dir=False) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def split_example(example: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a stored example (positional inputs of .pt2 programs sit under ``__args__``)."""
    example = dict(example)
    args = tuple(example.pop("__args__", ()))
    return args, example


__all__ = ["save", "load", "open_source", "read_policy", "read_calibration", "example_kwargs", "Source",
           "PLAN_FILE", "META_FILE", "EXAMPLE_FILE", "STATE_FILE", "CALIBRATION_HELP", "POLICY_HELP"]
