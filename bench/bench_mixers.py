"""Approximate mixers, training-free: accuracy on MiniLM with real text, and speed/memory against exact.

Accuracy: 8 full 512-token passages of standard-library docstrings; each mixer at two settings, on every
layer and on the first half of the layers; the mean embedding cosine (mean-pooled) to the original model.
Speed: an eager-spelled attention module (B=1, H=12, d=64, fp32, CPU) rewritten by ``optimize`` into exact
SDPA and into each mixer; time ratio exact/mixer and peak live tensor memory at N = 1k, 4k (and 16k for
exact, SlidingWindow and Linear). Run: ``python bench/bench_mixers.py [--part accuracy|speed]``.
"""
from __future__ import annotations

import argparse
import copy
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


def one_run(n: int, action_json: str) -> None:
    """In a fresh process: time and peak resident memory of one rewritten forward (prints JSON)."""
    import json
    import resource
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


def speed() -> None:
    import json
    import subprocess
    print("| N | action | time s | exact / action | extra peak RSS MiB |\n|---|---|---|---|---|")
    for n in (1024, 4096, 16384):
        actions = [rewrite.Exact()] + [rewrite.action_types()[m](**SETTINGS[m][0]) for m in SETTINGS]
        if n == 16384:
            actions = [rewrite.Exact(), rewrite.SlidingWindow(window=256, sinks=1), rewrite.Linear()]
        exact_t = None
        for action in actions:
            res = subprocess.run([sys.executable, __file__, "--one", str(n), json.dumps(action.to_json())],
                                 capture_output=True, text=True, timeout=1800)
            line = [x for x in res.stdout.splitlines() if x.startswith("{")]
            if not line:
                print(f"| {n} | {action.describe()} | failed | - | - |", flush=True)
                continue
            r = json.loads(line[-1])
            exact_t = exact_t or r["time"]
            note = " (declined: ran exact)" if r["declined"] else ""
            print(f"| {n} | {action.describe()}{note} | {r['time']:.3f} | {exact_t / r['time']:.2f}x | "
                  f"{r['peak_mib']:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["accuracy", "speed", "all"], default="all")
    ap.add_argument("--mixers", default="", help="accuracy rows of these mixers only, e.g. BlockRouting")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one_run(int(args.one[0]), args.one[1])
    if args.part in ("speed", "all"):
        speed()
    if args.part in ("accuracy", "all"):
        accuracy(args.mixers)


if __name__ == "__main__":
    main()
