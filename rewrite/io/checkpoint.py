"""The rewritten checkpoint format: ``rewrite.save`` / ``rewrite.load``.

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

import json
import os
import shutil
import warnings
from typing import Any, Optional

import torch

from ..actions import RewriteError
from ..policy import check_policy
from .files import atomic_path, check_output, check_space, model_bytes, quiet_transformers, read_json, write_json
from .inputs import example_kwargs
from .models import TOKENIZER_FILES, build_factory, from_pretrained, load_into, load_tokenizer
from .weights import check_weights, read_state_dict


PLAN_FILE = "rewrite_plan.json"
META_FILE = "rewrite_model.json"
EXAMPLE_FILE = "rewrite_example.safetensors"
STATE_FILE = "rewrite_state.safetensors"
FORMAT = "rewrite-checkpoint"
FORMAT_VERSION = 1


def source_folder(model) -> Optional[str]:
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
    from .. import __version__
    report = getattr(model, "rewrite_report", None) if isinstance(model, torch.nn.Module) else None
    if report is None:
        raise RewriteError("rewrite.save writes a model returned by rewrite.optimize (it stores the rewrite plan); "
                           "this model has no rewrite report. Run rewrite.optimize(model, policy, ...) first, "
                           "or use model.save_pretrained for an unchanged model.")
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise RewriteError(f"rewrite.save needs a folder path; got {folder!r}.")
    folder = os.fspath(folder)
    plan = report.to_json()["plan"]
    src_folder = source_folder(model)
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
            load_tokenizer(src_folder, False, []) if src_folder and is_hf else None)
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
        write_json(os.path.join(tmp, PLAN_FILE), plan)
        write_json(os.path.join(tmp, META_FILE), meta)
    return folder


def _write_weights(model: torch.nn.Module, tmp: str, is_hf: bool, tokenizer: Any, src_folder: Optional[str]) -> None:
    """The model's config and weights into ``tmp`` (``save_pretrained``, or safetensors for a factory model), with
    the tokenizer given or found beside the source."""
    if not is_hf:
        from safetensors.torch import save_model
        save_model(model, os.path.join(tmp, "model.safetensors"))
        return
    with quiet_transformers():
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
    from ..actions import action_from_json
    from ..api import model_session
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
    plan = read_json(path, "Rewrite plan")
    if not isinstance(plan, dict) or not isinstance(plan.get("sites"), dict):
        raise RewriteError(f"Rewrite plan {path!r} is malformed: it must be {{\"version\": 1, \"sites\": {{...}}}}. "
                           "Re-create it with rewrite apply or rewrite.save.")
    check_policy(plan, f"rewrite plan {path!r}")
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
    from ..api import optimize
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
    meta = read_json(meta_path, "Rewrite metadata") if os.path.isfile(meta_path) else {"kind": "transformers"}
    if not isinstance(meta, dict):
        raise RewriteError(f"Rewrite metadata {meta_path!r} is malformed (not a JSON object). Re-save the model.")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise RewriteError(f"{folder!r} was written by a newer rewrite (format {meta.get('format_version')}); "
                           "upgrade rewrite to load it.")
    if meta.get("kind") == "factory":
        model, _ = build_factory(str(meta.get("factory")), allow_code)
        weights = os.path.join(folder, "model.safetensors")
        state = read_state_dict(weights)
        extra = load_into(model, state, weights)
        saved_extra = {k: state[k] for k in extra}
    else:
        model, info = from_pretrained(folder, allow_code, meta.get("attn_implementation") or "eager",
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
            tok = load_tokenizer(folder, allow_code, [])
            example = example_kwargs_for_save(model, tok)
    fitted = _read_fitted(folder, meta)
    optimize(model, plan, example_kwargs=example, fitted=fitted)
    from ..api import model_session
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
