"""Recognition coverage: rewrite vs Inductor's attention fusion on the hand-written spelling corpus.

For every case of ``tests/corpus.py`` (attention written many ways, plus near misses that are not
attention or must not be fused), this runs ``rewrite.optimize(..., "exact")`` and
``torch.compile(backend="inductor")`` and prints whether each fused the site and whether its outputs
stayed equal to eager. Run: ``python bench/bench_spellings.py [--limit N]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import rewrite  # noqa: E402
from corpus import CASES  # noqa: E402
from tabulate import tabulate  # noqa: E402


def _close(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return all(_close(x, y) for x, y in zip(a, b))
    if not isinstance(a, torch.Tensor):
        return True
    scale = max(b.detach().abs().max().item(), 1e-6)
    return bool(torch.isfinite(a).all() == torch.isfinite(b).all()) and (a - b).abs().max().item() / scale < 1e-3


def run_case(case):
    module, args = case.build(torch.float32)
    with torch.no_grad():
        ref = copy.deepcopy(module)(*args)
    ours_mod = copy.deepcopy(module)
    torch._dynamo.reset()
    rewrite.optimize(ours_mod, "exact", example_inputs=args)
    rows = {r.name: r.status for r in ours_mod.rewrite_report.sites}
    with torch.no_grad():
        ours_ok = _close(ours_mod(*args), ref)
    ours = rows.get(case.site, "rejected" if ours_mod.rewrite_report.rejected else "-")
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    ind_mod = torch.compile(copy.deepcopy(module), backend="inductor")
    try:
        with torch.no_grad():
            ind_out = ind_mod(*args)
        fused = counters["inductor"]["fuse_attention"] > 0
        ind_ok = _close(ind_out, ref)
    except Exception as err:  # noqa: BLE001
        fused, ind_ok = False, f"crash: {type(err).__name__}"
    return ours, ours_ok, fused, ind_ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    cases = CASES[: args.limit] if args.limit else CASES
    table, tally = [], {"pos": 0, "ours": 0, "ind": 0, "neg": 0, "ours_wrong": 0, "ind_wrong": 0, "ind_fused_neg": 0}
    t0 = time.time()
    for case in cases:
        ours, ours_ok, fused, ind_ok = run_case(case)
        positive = case.expect == "rewrite"
        tally["pos" if positive else "neg"] += 1
        if positive:
            tally["ours"] += ours == "rewritten"
            tally["ind"] += bool(fused)
        else:
            tally["ind_fused_neg"] += bool(fused)
        tally["ours_wrong"] += ours_ok is not True
        tally["ind_wrong"] += ind_ok is not True
        table.append([case.id, case.expect, ours, "ok" if ours_ok is True else "WRONG", "yes" if fused else "no",
                      "ok" if ind_ok is True else ("WRONG" if ind_ok is False else ind_ok)])
    print(tabulate(table, headers=["case", "expected", "rewrite", "outputs", "inductor fused", "outputs"],
                   tablefmt="github"))
    print(f"\nattention spellings ({tally['pos']}): rewrite fused {tally['ours']}, Inductor fused {tally['ind']}")
    print(f"near misses / not attention / kept ({tally['neg']}): Inductor fused {tally['ind_fused_neg']} of them")
    print(f"wrong outputs: rewrite {tally['ours_wrong']}, Inductor {tally['ind_wrong']}  "
          f"({len(cases)} cases, {time.time() - t0:.0f} s, torch {torch.__version__})")


if __name__ == "__main__":
    main()
