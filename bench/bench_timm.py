"""The timm sweep: one small model of each timm architecture with attention, fused attention off, one process each.

Which models: every timm model module (``vision_transformer``, ``swin_transformer``, ``maxxvit``…) is built on
the meta device variant by variant; a variant whose modules include an attention class (a class name with
``Attention`` or ``Attn``) joins the group of its module and set of attention classes, and each group sends its
cheapest variant (parameters times input pixels). So a module with two kinds of attention (CoAtNet's
``Attention2d`` and MaxViT's partition attention in ``maxxvit``) gets a row for each, and a new timm
architecture gets its row without a list here.

Each row: the model built with ``pretrained=False`` and timm's fused attention off (``set_fused_attn(False)``,
so attention is written out as ``q @ kᵀ``, softmax, ``@ v``); the oracle is the same model with fused attention
on, counting ``scaled_dot_product_attention`` calls; ``optimize(model, "exact")`` and outputs compared with the
original at the model's input size and, where the model accepts it, a second one (32 pixels larger). Statuses
as in ``bench/zoo_common.py``. timm comes from ``.deps/timm`` (``scripts/setup.sh``), see ``import_timm``.

Run: ``OMP_NUM_THREADS=1 python bench/bench_timm.py [--models vit_tiny_patch16_224,coat_tiny] [--list]
[--timeout 300] [--jsonl out.jsonl] [--one-size]``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

from zoo_common import failed, import_timm, judged, print_row, same, sdpa_calls, sweep

ATTENTION_CLASS = re.compile(r"Attention|Attn")


def attention_classes(model) -> frozenset:
    return frozenset(type(m).__name__ for m in model.modules() if ATTENTION_CLASS.search(type(m).__name__))


def cheapest_per_group() -> list:
    """One model name per (timm module, set of attention classes): the variant with the fewest params x pixels."""
    import torch
    timm = import_timm()
    from timm.models import get_pretrained_cfg
    from timm.models._registry import _model_to_module
    best: dict = {}
    for name in timm.list_models():
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001 - a variant that cannot be built here is not a candidate
            continue
        classes = attention_classes(model)
        if not classes:
            continue
        size = (get_pretrained_cfg(name).input_size if get_pretrained_cfg(name) else None) or (3, 224, 224)
        cost = sum(p.numel() for p in model.parameters()) * size[1] * size[2]
        key = (_model_to_module[name], classes)
        if key not in best or cost < best[key][0]:
            best[key] = (cost, name)
    return sorted(name for _, name in best.values())


def build(timm, name: str, fused: bool):
    import torch
    timm.layers.set_fused_attn(fused, experimental=fused)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def inputs(model) -> list:
    """The model's own input size, and a 32-pixel larger one where the model runs on it."""
    import torch
    _, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    torch.manual_seed(1)
    batches = [torch.randn(2, 3, h, w)]
    if os.environ.get("BENCH_TIMM_ONE_SIZE"):
        return batches
    larger = torch.randn(2, 3, h + 32, w + 32)
    try:
        with torch.no_grad():
            model(larger)
        batches.append(larger)
    except Exception:  # noqa: BLE001 - a fixed-size model (position table, window grid) runs at its own size
        pass
    return batches


def one(name: str) -> dict:
    """The row of one timm model (run in its own process)."""
    import torch
    import rewrite
    timm = import_timm()
    try:
        model = build(timm, name, fused=False)
        batches = inputs(model)
        with torch.no_grad():
            refs = [model(b) for b in batches]
        oracle = sdpa_calls(build(timm, name, fused=True), batches[0])
    except Exception as err:  # noqa: BLE001 - what cannot be built or run here is skipped, with the reason
        return failed(name, "SKIPPED", err)
    try:
        start = time.perf_counter()
        rewrite.optimize(model, "exact", example_inputs=(batches[0],))
        optimize_s = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            equal = all(same(r, model(b)) for r, b in zip(refs, batches))
    except Exception as err:  # noqa: BLE001
        return failed(name, "ERROR", err)
    row = judged(name, equal, rewrite.report(model), oracle)
    row["sizes"] = [list(b.shape[2:]) for b in batches]
    row["optimize_s"] = optimize_s
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="", help="comma-separated timm model names (default: one per group)")
    ap.add_argument("--list", action="store_true", help="print the chosen models and stop")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--jsonl", default="")
    ap.add_argument("--one-size", action="store_true",
                    help="only the model's own input size (no recompile for a second size: Dynamo's symbolic "
                         "shapes are what takes window-partitioning models past the timeout)")
    args = ap.parse_args()
    if args.one:
        print_row(one(args.one))
        return
    try:
        names = args.models.split(",") if args.models else cheapest_per_group()
    except ImportError as err:
        sys.exit(f"timm is not installed ({err}): run scripts/setup.sh, which puts it in .deps/timm")
    if args.list:
        print("\n".join(names))
        return
    sweep(__file__, names, args.timeout, args.jsonl,
          env={"HF_HUB_OFFLINE": "1", **({"BENCH_TIMM_ONE_SIZE": "1"} if args.one_size else {})})


if __name__ == "__main__":
    main()
