"""Approximate mixers, training-free: accuracy on MiniLM with real text, and speed/memory against exact.

Accuracy: 8 full 512-token passages of standard-library docstrings; each mixer at two settings, on every
layer and on the first half of the layers; the mean embedding cosine (mean-pooled) to the original model.
Speed: an eager-spelled attention module (B=1, H=12, d=64, fp32, CPU) rewritten by ``optimize`` into exact
SDPA and into each mixer; time ratio exact/mixer and extra peak resident memory at N = 1k, 4k and 16k, each
in a process of its own. At 16k a mixer whose run would take over ``LIMIT_S`` seconds or ``LIMIT_MIB`` MiB
(extrapolated from its 1k and 4k runs) gets a row saying so instead of a run, and a run that fails, runs out
of memory or time gets a row saying why. ``--part ratio``: exact and each mixer timed alternately in one process at N = 1k and 4k, the median time
ratio beside the cost model's FLOPs ratio (issue 14's speed rule). ``--part profile``: where each mixer's time goes
(the fused attention kernel against routing, gathers and the rest); ``--part tiles``: the fused kernel's speed
against the query length of its heads. Run:
``python bench/bench_mixers.py [--part accuracy|speed|ratio|profile|tiles] [--mixers BlockRouting,...]``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import rewrite  # noqa: E402

SETTINGS = {
    "SlidingWindow": [dict(window=256, sinks=1), dict(window=64, sinks=1)],
    "TopK": [dict(k=128), dict(k=32)],
    "BlockRouting": [dict(block=64, topk=4), dict(block=64, topk=2), dict(block=64, topk=4, sinks=1, summary=True),
                     dict(block=64, topk=2, sinks=1, summary=True),
                     dict(block=64, topk=2, sinks=1, summary=True, per_head=True)],
    "KMeansRouting": [dict(clusters=2, window=256), dict(clusters=4, window=128)],
    "TokenMerge": [dict(r=128), dict(r=256)],
    "Decay": [dict(gamma=0.99), dict(gamma=0.9)],
    "Linear": [dict(feature="elu"), dict(feature="favor")],
    "Scatterbrain": [dict(window=128, features=64), dict(window=64, features=64)],
    "SharedQuery": [dict(query="mean"), dict(query="calibrated")],
    "Pool": [dict(kind="avg", size=3), dict(kind="max", size=3)],
    "Spectral": [dict(kind="fft", keep=128), dict(kind="dct", keep=64)],
    "Flow": [dict(), dict()],
}


def accuracy(only: str = "") -> None:
    from transformers import AutoModel, AutoTokenizer
    from rewrite.demo import minilm_folder
    from text_passages import passages
    from bench_policy import embedding_error
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = passages(tok, ["docstrings"], 8, length=512, seed=2)
    base = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    names = [f"encoder.layer.{i}.attention.self" for i in range(6)]
    print("| mixer | setting | cosine, all 6 layers | cosine, layers 0-2 |\n|---|---|---|---|")
    rows = [("SlidingWindow", dict(window=1024))] + [(m, s) for m, ss in SETTINGS.items() for s in
                                                     (ss if m != "Flow" else ss[:1])]
    for mixer, setting in rows:
        if only and mixer not in only.split(","):
            continue
        action = rewrite.action_types()[mixer](**setting)
        cells = []
        for scope in (names, names[:3]):
            model = copy.deepcopy(base)
            torch._dynamo.reset()
            try:
                rewrite.optimize(model, {**{n: action for n in scope}, "_default": None}, example_kwargs=texts[0])
                rep = rewrite.report(model)
                declined = [r for r in rep.sites if r.name in scope and "declined" in (r.reason or "")]
                with torch.no_grad():
                    cos = [1 - embedding_error(base(**b), model(**b), b) for b in texts]
                cells.append(f"{sum(cos) / len(cos):.4f}" + (" (declined)" if declined else ""))
            except Exception as err:  # noqa: BLE001 - report, never hide
                cells.append(f"failed: {type(err).__name__}")
        args = ", ".join(f"{k}={v!r}" for k, v in setting.items())
        print(f"| {mixer} | {args} | {cells[0]} | {cells[1]} |", flush=True)


class EagerAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


class Wrap(torch.nn.Module):
    """q, k and v come from one packed tensor, as in a real layer (so they share their length)."""

    def __init__(self):
        super().__init__()
        self.attn = EagerAttention()

    def forward(self, qkv):
        q, k, v = qkv.unbind(0)
        return self.attn(q, k, v)


def _time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


#: a speed run at 16k is skipped (with a row saying why) when it would take longer or hold more than this
LIMIT_S = 120.0
LIMIT_MIB = 20 * 1024


def one_run(n: int, action_json: str) -> None:
    """In a fresh process: time and peak resident memory of one rewritten forward (prints JSON)."""
    import json
    import resource
    cap = int(os.environ.get("BENCH_MAX_AS_MIB", "0"))
    if cap:  # an allocation past this fails in this process (reported) instead of exhausting the machine
        resource.setrlimit(resource.RLIMIT_AS, (cap << 20, cap << 20))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    action = rewrite.action_from_json(json.loads(action_json))
    torch.manual_seed(0)
    qkv = torch.randn(3, 1, 12, n, 64)
    model = Wrap()
    rewrite.optimize(model, {"attn": action}, example_inputs=(qkv[:, :, :, :64].contiguous(),))
    with torch.no_grad():
        model(qkv[:, :, :, :128].contiguous())  # the dynamic recompile happens here, not in the timing
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = _time(lambda: model(qkv), 1 if n >= 16384 else 3)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = model.rewrite_report.sites
    print(json.dumps({"time": t, "peak_mib": max(peak - base, 0) / 1024, "action": rows[0].action,
                      "declined": any("declined" in (r.reason or "") for r in rows)}))


def _flops(action, n: int) -> float:
    from rewrite import cost
    return cost.evaluate(action.flops(), B=1, H=12, N=n, Nk=n, d=64, dv=64)


def _too_big(action, n: int, runs: dict) -> str:
    """Why a run at ``n`` would exceed LIMIT_S / LIMIT_MIB, from the runs at the two smaller lengths (time grows
    as the action's FLOPs do, memory as it grew between them); "" when it fits or cannot be told."""
    (n1, r1), (n0, r0) = sorted(runs.items())[-1], sorted(runs.items())[-2]
    grow = _flops(action, n) / max(_flops(action, n1), 1.0)
    order = "N^2" if grow > 0.6 * (n / n1) ** 2 else "N log N" if grow > 1.2 * n / n1 else "N"
    t = r1["time"] * grow
    ratio = max(r1["peak_mib"], 1.0) / max(r0["peak_mib"], 1.0)
    mib = r1["peak_mib"] * min(max(ratio, 1.0) ** (math.log(n / n1) / math.log(n1 / n0)), (n / n1) ** 2)
    name = type(action).__name__
    if t > LIMIT_S:
        return f"skipped: O({order}) {name} would take ~{t:.0f} s (limit {LIMIT_S:.0f} s)"
    if mib > LIMIT_MIB:
        return f"skipped: {name} would hold ~{mib / 1024:.0f} GiB extra (limit {LIMIT_MIB / 1024:.0f} GiB)"
    return ""


def _run_one(n: int, action) -> tuple:
    """(result dict, None) or (None, why it gave no result)."""
    import json
    import subprocess
    ram_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    env = dict(os.environ, BENCH_MAX_AS_MIB=str(int(min(LIMIT_MIB + 6 * 1024, 0.85 * ram_mib))))
    timeout = 6 * LIMIT_S if n >= 16384 else 1800
    try:
        res = subprocess.run([sys.executable, __file__, "--one", str(n), json.dumps(action.to_json())],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"skipped: did not finish within {timeout:.0f} s"
    line = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if line:
        return json.loads(line[-1]), None
    err = [x.strip() for x in res.stderr.splitlines() if x.strip()]
    why = err[-1] if err else f"exit status {res.returncode}"
    if res.returncode < 0:
        why = f"killed by signal {-res.returncode}"
    elif "memory" in why.lower() or "alloc" in why.lower():
        why = f"out of memory ({why[:80]})"
    return None, f"failed: {why[:120]}"


def speed() -> None:
    print("| N | action | time s | exact / action | extra peak RSS MiB |\n|---|---|---|---|---|")
    actions = [rewrite.Exact()] + [rewrite.action_types()[m](**SETTINGS[m][0]) for m in SETTINGS]
    runs = {a.describe(): {} for a in actions}      # action -> {N: result} of the runs that gave one
    for n in (1024, 4096, 16384):
        exact_t = None
        for action in actions:
            done = runs[action.describe()]
            why = ""
            if n >= 16384:
                if len(done) < 2:
                    missing = [m for m in (1024, 4096) if m not in done]
                    why = f"skipped: no result at N={', '.join(map(str, missing))} to extrapolate from"
                else:
                    why = _too_big(action, n, done)
            r = None
            if not why:
                r, why = _run_one(n, action)
            if r is None:
                print(f"| {n} | {action.describe()} | {why} | - | - |", flush=True)
                continue
            done[n] = r
            if isinstance(action, rewrite.Exact):
                exact_t = r["time"]
            note = " (declined: ran exact)" if r["declined"] else ""
            ratio = f"{exact_t / r['time']:.2f}x" if exact_t else "-"
            print(f"| {n} | {action.describe()}{note} | {r['time']:.3f} | {ratio} | {r['peak_mib']:.0f} |", flush=True)


def _optimized(action, n: int):
    """The bench module rewritten to ``action`` and warmed up at length ``n`` (its first calls compile)."""
    model = Wrap()
    rewrite.optimize(model, {"attn": action}, example_inputs=(torch.randn(3, 1, 12, 64, 64),))
    with torch.no_grad():
        model(torch.randn(3, 1, 12, 128, 64))
        model(torch.randn(3, 1, 12, n, 64))
    return model


def _chosen_actions(only: str) -> list:
    """The first setting of each mixer (``only``: comma-separated mixer names), and with BlockRouting its other
    settings too (the table's sinks/summary/per-head rows)."""
    actions = [rewrite.action_types()[m](**s) for m, ss in SETTINGS.items() for s in ss[:1]]
    if not only:
        return actions
    names = only.split(",")
    return [a for a in actions if type(a).__name__ in names] + \
        [rewrite.action_types()["BlockRouting"](**s) for s in SETTINGS["BlockRouting"][1:] if "BlockRouting" in names]


def ratios(lengths=(1024, 4096), repeats: int = 7, only: str = "", threads: int = 0) -> None:
    """In one process, exact and each mixer timed alternately (exact, mixer, exact, mixer, ...) at each length:
    the median of the per-pair ratios exact/mixer, beside the FLOPs ratio exact/mixer of the cost model. The
    rule of issue 14: a mixer below half of exact's FLOPs must be >= 1.3x faster at 1k and reach half its FLOPs
    ratio at 4k. ``threads``: 0 for every core."""
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=1, H=12, d=64, fp32, CPU")
    print("| N | action | exact ms | action ms | exact / action (median of pairs) | FLOPs exact / action | rule |")
    print("|---|---|---|---|---|---|---|")
    actions = _chosen_actions(only)
    for n in lengths:
        torch.manual_seed(0)
        qkv = torch.randn(3, 1, 12, n, 64)
        exact = _optimized(rewrite.Exact(), n)
        for action in actions:
            try:
                model = _optimized(action, n)
            except Exception as err:  # noqa: BLE001 - report, never hide
                print(f"| {n} | {action.describe()} | failed: {type(err).__name__}: {str(err)[:80]} | | | | |")
                continue
            te, tm = [], []
            with torch.no_grad():
                for _ in range(repeats):
                    for fn, ts in ((exact, te), (model, tm)):
                        t = time.perf_counter()
                        fn(qkv)
                        ts.append(time.perf_counter() - t)
            ratio = statistics.median(a / b for a, b in zip(te, tm))
            fr = _flops(rewrite.Exact(), n) / _flops(action, n)
            need = (1.3 if n <= 1024 else fr / 2) if fr >= 2 else None
            rule = "-" if need is None else ("ok" if ratio >= need else f"MISS (needs {need:.2f}x)")
            print(f"| {n} | {action.describe()} | {statistics.median(te) * 1e3:.1f} | {statistics.median(tm) * 1e3:.1f} "
                  f"| {ratio:.2f}x | {fr:.2f}x | {rule} |", flush=True)


#: the fused CPU attention kernels (torch's, and the C++ ones of rewrite.kernels): the share of a mixer's time
#: in them is the attention, the rest routing, gathers, feature maps and merges
KERNEL_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "rewrite::routed_blocks", "rewrite::cluster_attention")


def profile(lengths=(1024, 4096), only: str = "", threads: int = 1, repeats: int = 3) -> None:
    """Where each mixer's time goes (torch.profiler, wall-clock self time per op, ``repeats`` calls after
    warm-up): the share in the fused attention kernel against the rest, and the three most expensive other ops."""
    from torch.profiler import profile as torch_profile
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=1, H=12, d=64, fp32, CPU")
    print("| N | action | fused kernel | everything else | top other ops (share of the total) |\n|---|---|---|---|---|")
    actions = _chosen_actions(only)
    for n in lengths:
        qkv = torch.randn(3, 1, 12, n, 64)
        for action in actions:
            model = _optimized(action, n)
            with torch.no_grad(), torch_profile() as prof:
                for _ in range(repeats):
                    model(qkv)
            # a compiled region's own time is the Python between its ops (the mixer's code, guards)
            ops = [("between ops (Python)" if e.key.startswith("Torch-Compiled Region") else e.key,
                    e.self_cpu_time_total) for e in prof.key_averages()]
            total = sum(t for _, t in ops) or 1.0
            kernel = sum(t for k, t in ops if k in KERNEL_OPS)
            others = sorted(((t, k) for k, t in ops if k not in KERNEL_OPS), reverse=True)[:3]
            top = ", ".join(f"{k.replace('aten::', '')} {t / total:.0%}" for t, k in others)
            print(f"| {n} | {action.describe()} | {kernel / total:.0%} | {1 - kernel / total:.0%} | {top} |", flush=True)


def kernel_tiles(threads: int = 1, repeats: int = 5) -> None:
    """The fused CPU kernel's speed against the query length of its heads, at a fixed amount of work (49,152
    queries of d = 64 against 256 keys each; thread CPU time, median): why 64-token routed blocks (each block a
    "head" of 64 queries) cannot run as fast per FLOP as exact attention, whose heads are N queries long."""
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; kernel "
          "aten::_scaled_dot_product_flash_attention_for_cpu, 49152 queries x 256 keys, d=64")
    print("| queries per head | heads | CPU ms | relative to 2048 |\n|---|---|---|---|")
    rows = {}
    for nq in (64, 128, 192, 256, 2048):
        q, k, v = (torch.randn(1, 49152 // nq, t, 64) for t in (nq, 256, 256))
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        ts = []
        for _ in range(repeats):
            t0 = time.process_time()
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
            ts.append(time.process_time() - t0)
        rows[nq] = statistics.median(ts)
    for nq, t in rows.items():
        print(f"| {nq} | {49152 // nq} | {t * 1e3:.1f} | {rows[2048] / t:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["accuracy", "speed", "ratio", "profile", "tiles", "all"], default="all")
    ap.add_argument("--mixers", default="", help="accuracy (or ratio) rows of these mixers only, e.g. BlockRouting")
    ap.add_argument("--threads", type=int, default=0, help="--part ratio: CPU threads (0: every core)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one_run(int(args.one[0]), args.one[1])
    if args.part == "ratio":
        return ratios(only=args.mixers, threads=args.threads)
    if args.part == "tiles":
        return kernel_tiles(threads=args.threads or 1)
    if args.part == "profile":
        return profile(only=args.mixers, threads=args.threads or 1)
    if args.part in ("speed", "all"):
        speed()
    if args.part in ("accuracy", "all"):
        accuracy(args.mixers)


if __name__ == "__main__":
    main()
