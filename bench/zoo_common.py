"""What every zoo sweep shares: one process per case, an SDPA-call oracle, output comparison, the row's status.

A sweep script defines ``one(name) -> dict`` (the row of one case, run in its own process) and calls
:func:`sweep` with the case names; :func:`sweep` runs ``script --one NAME`` per case under a timeout, prints a
line per row, appends rows to a JSONL file and prints the counts. Statuses (every sweep uses the same):

* FULL — every attention the oracle counts is rewritten (as many fused calls per forward), every site the report
  lists is rewritten, outputs equal (a rejected attention-like region beside them is listed in the reasons);
* PARTIAL — outputs equal, fewer sites rewritten than the oracle counts (the report's reasons are listed); where
  there is no oracle (no SDPA path), also when softmax ops still run in the optimized forward (how many: a reader
  checks whether they are attention);
* WRONG — an output differs from the original (a bug: this must never happen);
* ERROR — ``optimize`` raised; SKIPPED — the case cannot be built or run here (the reason);
* NONE — no attention found (no site, no rejected attention-like region) and the oracle counts none;
* TIMEOUT — the process did not finish within the timeout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = ("FULL", "PARTIAL", "WRONG", "ERROR", "SKIPPED", "NONE", "TIMEOUT")


def call(model, batch):
    """``model`` applied to ``batch``: keywords for a dict, positional arguments for a tuple or list, else one input."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def sdpa_calls(model, batch) -> int:
    """How many ``scaled_dot_product_attention`` calls one forward makes (the oracle)."""
    import torch
    import torch.nn.functional as F
    count = [0]
    original = F.scaled_dot_product_attention

    def counting(*a, **k):
        count[0] += 1
        return original(*a, **k)
    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            call(model, batch)
    finally:
        F.scaled_dot_product_attention = original
    return count[0]


def same(a, b) -> bool:
    """Whether two outputs (tensors, tuples, dicts, model-output records) agree to a relative 1e-3."""
    import torch
    if isinstance(a, (tuple, list)):
        return all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return all(same(a[k], b[k]) for k in a if k in b)
    if hasattr(a, "to_tuple"):
        return same(a.to_tuple(), b.to_tuple())
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        return True
    scale = max(a.detach().abs().nan_to_num().max().item(), 1e-6)
    finite = torch.isfinite(a) == torch.isfinite(b)
    return bool(finite.all()) and (a - b).nan_to_num().abs().max().item() / scale < 1e-3


def judged(name: str, equal: bool, report, oracle, calls=None, softmax_left=None, left_by_shape=None) -> dict:
    """The row of one optimized case: its status from the outputs, the report's sites and the oracle's count.

    ``calls``: a function giving how many fused calls one forward of the optimized model makes, asked when every
    site is rewritten but there are fewer sites than the oracle counts calls (one site of a graph that runs once
    per image is several calls). ``softmax_left``: a function giving how many softmax ops one forward of the
    optimized model still runs, asked where there is no oracle: a FULL row without an oracle says how many are
    left (attention written without an N x N score product, such as a chunked band, or a softmax that is not
    attention). ``left_by_shape``: a function giving the softmax ops left per forward at the example's shape and at
    another shape (compiled after it): more at the other shape means a rewrite held at the example's shape only
    (the row is PARTIAL, whatever the rest says)."""
    rows = report.sites
    # a site the model already computes with SDPA is already fused: covered
    done = sum(r.status == "rewritten" or "already scaled_dot_product_attention" in (r.reason or "") for r in rows)
    kept = Counter(r.reason[:90] for r in rows if r.status != "rewritten" and r.reason)
    kept.update(f"region: {r.reason[:90]}" for r in report.rejected)
    reasons = sorted(f"{n}x {why}" for why, n in kept.items())
    expected = oracle if oracle is not None else len(rows)  # no SDPA path: every site the report lists
    fused = calls() if calls is not None and rows and done == len(rows) and done < expected else done
    status = "WRONG" if not equal else ("FULL" if rows and max(done, fused) >= expected and done == len(rows) else
                                        "PARTIAL" if rows or report.rejected or expected else "NONE")
    if status == "NONE":
        reasons = [f"no softmax over a score product in the {report.graphs} captured graph(s): no attention site"]
    row = {"type": name, "status": status, "rewritten": done, "oracle": oracle, "calls": fused}
    if oracle is None and softmax_left is not None and status in ("FULL", "PARTIAL"):
        row["softmax_left"] = left = softmax_left()
        if left and status == "FULL":  # not proven FULL: the reader checks what the softmax ops left are
            row["status"] = "PARTIAL"
            reasons.append(f"no SDPA oracle: {left} softmax op(s) still run per forward outside the rewritten sites")
    if left_by_shape is not None and row["status"] == "FULL":
        at_example, elsewhere = left_by_shape()
        if elsewhere > at_example:
            row["status"] = "PARTIAL"
            reasons.append(f"rewritten at the example's shape only: {elsewhere} softmax op(s) outside SDPA at the "
                           f"second shape, {at_example} at the example's")
    row["why"] = "; ".join(reasons)
    return row


def profiled_ops(model, batch) -> list:
    """The profiler's CPU events of one forward without gradients, compiled graphs included (a graph that runs
    once per image counts once per image)."""
    import torch
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(model, batch)
    return prof.events()


def fused_calls(model, batch) -> int:
    """How many SDPA ops one forward of an optimized model runs."""
    return sum(e.name == "aten::scaled_dot_product_attention" for e in profiled_ops(model, batch))


def softmax_calls(model, batch) -> int:
    """How many softmax ops one forward runs (compiled graphs included). On an optimized model of a type with no
    SDPA path (no oracle), a softmax left is attention the rewrite may have missed, or a softmax that is not
    attention (a router, a pooling): the row says how many, for a reader to check."""
    softmax = ("aten::_softmax", "aten::_safe_softmax")

    def inside(event) -> bool:  # SDPA's math path and _safe_softmax run a softmax of their own
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in softmax or "scaled_dot_product" in parent.name:
                return True
            parent = parent.cpu_parent
        return False
    return sum(e.name in softmax and not inside(e) for e in profiled_ops(model, batch))


def failed(name: str, status: str, err: BaseException) -> dict:
    return {"type": name, "status": status, "why": f"{type(err).__name__}: {str(err)[:160]}"}


def print_row(row: dict) -> None:
    """The line a ``--one`` process prints for :func:`sweep` to read."""
    print("ZOO " + json.dumps(row), flush=True)


def sweep(script: str, names: list, timeout: int, jsonl: str = "", env: dict | None = None) -> list:
    """Run ``script --one NAME`` for each name in its own process; print and return the rows, then the counts."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for name in names:
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, os.path.abspath(script), "--one", name], capture_output=True,
                                  text=True, timeout=timeout, env=env)
            line = next((x for x in done.stdout.splitlines() if x.startswith("ZOO ")), None)
            row = json.loads(line[4:]) if line else {"type": name, "status": "ERROR",
                                                     "why": (done.stderr.strip().splitlines() or ["no output"])[-1][:160]}
        except subprocess.TimeoutExpired:
            row = {"type": name, "status": "TIMEOUT", "why": f"over {timeout} s"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{row['status']:8s} {name:28s} {row.get('rewritten', '')!s:>3}/{row.get('oracle', '')!s:<3} "
              f"{row['seconds']:6.1f}s  {row.get('why', '')}", flush=True)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    print("\n" + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" of {len(rows)}")
    return rows


#: where scripts/setup.sh installs timm and its torchvision, apart from site-packages: the torchvision wheel
#: a CPU-only machine can get links its C++ operators against CUDA, and on the default path its failing import
#: would break transformers' model imports for every other test
TIMM_SITE = os.path.join(ROOT, ".deps", "timm")


def import_timm():
    """``timm`` (from :data:`TIMM_SITE` or site-packages), importable beside a CPU torch.

    torchvision's import fails when its CUDA-built operators do not load: it registers fake kernels for
    ``torchvision::nms`` and ``qnms`` unconditionally. Declaring those two schemas (no kernels: nothing here calls
    them) lets its Python parts, all that timm uses, load. Raises ImportError when timm is not installed.
    """
    import torch
    if os.path.isdir(TIMM_SITE) and TIMM_SITE not in sys.path:
        sys.path.append(TIMM_SITE)
    try:
        import timm
        return timm
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]   # the half-imported modules, so the second import runs them again
    schemas = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_timm.schemas = schemas   # a library object's definitions live as long as it does
    import timm
    return timm
