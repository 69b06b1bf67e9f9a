"""Survey of how the zoo's attention looks in Dynamo graphs (helper script, not a test).

    python tests/hf_survey.py [names...]            # prints a per-model summary
    python tests/hf_survey.py --json out.json        # also dumps raw records

Captures each zoo model with a trivial recording backend and, for every softmax node, walks back
to the score matmul and forward to the value product, printing the ops on the way.
"""

from __future__ import annotations

import copy
import json
import operator
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
import hf_zoo  # noqa: E402

MATMULS = {torch.matmul, torch.bmm, torch.baddbmm, torch.einsum, operator.matmul, torch.Tensor.matmul}
MATMUL_METHODS = {"matmul", "bmm", "baddbmm", "__matmul__"}
SOFTMAX_FNS = {"softmax", "_softmax", "log_softmax"}


def tname(n: torch.fx.Node) -> str:
    if n.op == "call_function":
        t = n.target
        mod = getattr(t, "__module__", "") or ""
        nm = getattr(t, "__name__", str(t))
        if mod.startswith("torch.nn.functional"):
            return f"F.{nm}"
        if mod == "_operator":
            return f"op.{nm}"
        if mod.startswith("torch"):
            return f"torch.{nm}"
        return f"{mod}.{nm}"
    if n.op == "call_method":
        return f".{n.target}"
    if n.op == "call_module":
        return f"mod:{n.target}"
    return f"{n.op}:{n.target}"


def is_matmul(n: torch.fx.Node) -> bool:
    if n.op == "call_function" and n.target in MATMULS:
        return True
    return n.op == "call_method" and n.target in MATMUL_METHODS


def is_softmax(n: torch.fx.Node) -> bool:
    if n.op == "call_function":
        return getattr(n.target, "__name__", "") in SOFTMAX_FNS
    return n.op == "call_method" and n.target in SOFTMAX_FNS


def ev(n):
    return n.meta.get("example_value") if isinstance(n, torch.fx.Node) else None


def shape_of(n) -> str:
    v = ev(n)
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    return ""


def fmt_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        s = shape_of(a)
        return f"%{a.name}{'[' + s + ']' if s else ''}"
    if isinstance(a, (list, tuple)):
        return "(" + ",".join(fmt_arg(x) for x in a) + ")"
    if isinstance(a, float):
        return f"{a:.6g}"
    return repr(a)


def desc(n: torch.fx.Node, main=None) -> str:
    args = [fmt_arg(a) if a is not main else "•" for a in n.args]
    kws = [f"{k}={fmt_arg(v)}" for k, v in n.kwargs.items()]
    return f"{tname(n)}({', '.join(args + kws)})"


def reaches_matmul(n, depth=12, seen=None) -> bool:
    if not isinstance(n, torch.fx.Node) or depth < 0:
        return False
    if is_matmul(n):
        return True
    return any(reaches_matmul(a, depth - 1) for a in n.all_input_nodes)


def chain_up(n: torch.fx.Node, limit=15):
    """From the softmax input back to the score matmul (following the arg that leads to a matmul)."""
    out = []
    cur = n
    for _ in range(limit):
        if is_matmul(cur):
            return out, cur
        nxt = None
        for a in cur.all_input_nodes:
            if reaches_matmul(a):
                nxt = a
                break
        out.append(desc(cur, nxt))
        if nxt is None:
            return out, None
        cur = nxt
    return out, None


def chain_down(n: torch.fx.Node, limit=10):
    out = []
    cur = n
    for _ in range(limit):
        users = list(cur.users)
        if not users:
            return out, None
        mm = [u for u in users if is_matmul(u)]
        if mm:
            return out, mm[0]
        u = users[0]
        out.append(desc(u, cur) + (f" (+{len(users) - 1} more users)" if len(users) > 1 else ""))
        cur = u
    return out, None


def _is_proj(n) -> bool:
    t = tname(n)
    return "linear" in t or "addmm" in t or n.op == "call_module" or t.endswith("conv1d")


def reaches_proj(n, depth=10) -> bool:
    if not isinstance(n, torch.fx.Node) or depth < 0:
        return False
    if _is_proj(n):
        return True
    return any(reaches_proj(a, depth - 1) for a in n.all_input_nodes)


def operand_chain(n: torch.fx.Node, limit=10):
    """Ops on an operand back to the projection (linear) — shows transposes / repeat_kv / rope."""
    out = []
    cur = n
    for _ in range(limit):
        if not isinstance(cur, torch.fx.Node) or cur.op in ("placeholder", "get_attr"):
            out.append(f"{cur.op}:{cur.target}" if isinstance(cur, torch.fx.Node) else "")
            break
        t = tname(cur)
        extra = ""
        if t in (".expand", ".repeat_interleave", "torch.repeat_interleave", ".reshape"):
            extra = f"[{shape_of(cur)}]"
        out.append(t + extra + (f"[{shape_of(cur)}]" if _is_proj(cur) else ""))
        if _is_proj(cur):
            break
        ins = cur.all_input_nodes
        if not ins:
            break
        nxt = [a for a in ins if reaches_proj(a)]
        cur = nxt[0] if nxt else ins[0]
    return " <- ".join(out)


def mask_summary(n: torch.fx.Node, limit=60) -> str:
    """Op names in the ancestry of a mask operand (where it comes from)."""
    seen, stack, names, phs = set(), [n], [], []
    while stack and len(seen) < limit:
        c = stack.pop()
        if c in seen:
            continue
        seen.add(c)
        if c.op == "placeholder":
            phs.append(c.target)
            continue
        names.append(tname(c).split(".")[-1])
        stack.extend(c.all_input_nodes)
    uniq = sorted(set(names))
    return f"{len(seen)} nodes{'+' if len(seen) >= limit else ''} ops={uniq} inputs={phs}"


def innermost_module(n: torch.fx.Node) -> str:
    st = n.meta.get("nn_module_stack") or {}
    if not st:
        return "?"
    path, _cls = list(st.values())[-1]
    cls = _cls.__name__ if isinstance(_cls, type) else str(_cls).split(".")[-1].rstrip("'>")
    return f"{clean_path(path)} ({cls})"


def clean_path(path: str) -> str:
    p = path
    for pre in ("L['self'].", "L['self']", "self."):
        if p.startswith(pre):
            p = p[len(pre):]
    # Dynamo spells ModuleList indices as  layer[0]  or  ._modules['0']  depending on version
    import re

    p = re.sub(r"\._modules\['([^']+)'\]", r".\1", p)
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    p = re.sub(r"\['([^']+)'\]", r".\1", p)
    return p.lstrip(".")


def survey_model(name: str, attn: str = "eager"):
    rec: dict = {"name": name, "attn": attn}
    z = hf_zoo.build(name, attn)
    ref_model = copy.deepcopy(z.model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    t0 = time.time()
    try:
        with torch.no_grad():
            ref = z.output_of(ref_model(**z.example_kwargs))
        rec["eager_ok"] = True
    except Exception as e:  # noqa: BLE001
        rec["eager_ok"] = False
        rec["eager_error"] = f"{type(e).__name__}: {e}"[:300]
        return rec
    try:
        cm = torch.compile(z.model, backend=backend)
        with torch.no_grad():
            out = z.output_of(cm(**z.example_kwargs))
        rec["capture_ok"] = True
        rec["max_diff"] = float((out - ref).abs().max())
    except Exception as e:  # noqa: BLE001
        rec["capture_ok"] = False
        rec["capture_error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    rec["capture_s"] = round(time.time() - t0, 2)
    rec["graphs"] = len(graphs)
    rec["graph_breaks"] = {str(k): v for k, v in counters["graph_break"].items()}
    rec["graph_nodes"] = [len(g.graph.nodes) for g in graphs]
    sm = []
    for gi, gm in enumerate(graphs):
        for n in gm.graph.nodes:
            if not is_softmax(n):
                continue
            up, mm = chain_up(n.args[0])
            down, vmm = chain_down(n)
            d = {
                "graph": gi,
                "softmax": desc(n),
                "module": innermost_module(n),
                "scores_chain": up,
                "score_matmul": desc(mm) if mm is not None else None,
                "after_softmax": down,
                "value_matmul": desc(vmm) if vmm is not None else None,
            }
            if mm is not None:
                ops = [a for a in list(mm.args) if isinstance(a, torch.fx.Node)]
                d["q_chain"] = operand_chain(ops[0]) if ops else ""
                d["k_chain"] = operand_chain(ops[1]) if len(ops) > 1 else ""
            if vmm is not None:
                ops = [a for a in vmm.args if isinstance(a, torch.fx.Node) and a is not n]
                d["v_chain"] = operand_chain(ops[-1]) if ops else ""
            # side inputs of the pre-softmax chain that are tensors (masks / biases)
            side = []
            cur = n.args[0]
            for _ in range(len(up)):
                if not isinstance(cur, torch.fx.Node) or is_matmul(cur):
                    break
                main = next((a for a in cur.all_input_nodes if reaches_matmul(a)), None)
                for a in cur.all_input_nodes:
                    if a is not main:
                        side.append(f"{tname(cur)}<-%{a.name}: {mask_summary(a)}")
                cur = main
            d["side_inputs"] = side
            sm.append(d)
    rec["softmax"] = sm
    return rec


def survey_generate(name: str):
    z = hf_zoo.build(name)
    ref_model = copy.deepcopy(z.model)
    calls = []

    def backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    ids = z.generate_inputs["input_ids"]
    rec: dict = {"name": name}
    with torch.no_grad():
        ref = ref_model.generate(ids, max_new_tokens=5, do_sample=False)
    try:
        z.model.compile(backend=backend, dynamic=None)
        t0 = time.time()
        with torch.no_grad():
            out = z.model.generate(ids, max_new_tokens=5, do_sample=False)
        rec["ok"] = True
        rec["same_tokens"] = bool(torch.equal(out, ref))
        rec["time_s"] = round(time.time() - t0, 2)
        rec["backend_calls"] = len(calls)
        rec["graph_sizes"] = calls
        rec["graph_breaks"] = {str(k): v for k, v in counters["graph_break"].items()}
        rec["recompiles"] = dict(counters["recompiles"]) if "recompiles" in counters else {}
        # a second generate with a different prompt length
        calls_before = len(calls)
        with torch.no_grad():
            z.model.generate(torch.cat([ids, ids[:, :3]], 1), max_new_tokens=5, do_sample=False)
        rec["backend_calls_second_generate"] = len(calls) - calls_before
    except Exception as e:  # noqa: BLE001
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    return rec


def main(argv):
    dump = None
    if "--json" in argv:
        i = argv.index("--json")
        dump = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    attn = "eager"
    if "--sdpa" in argv:
        attn = "sdpa"
        argv = [a for a in argv if a != "--sdpa"]
    names = argv or list(hf_zoo.ALL)
    recs = []
    for name in names:
        r = survey_model(name, attn)
        recs.append(r)
        print(f"=== {name} [{attn}] eager_ok={r.get('eager_ok')} capture_ok={r.get('capture_ok')} "
              f"graphs={r.get('graphs')} breaks={r.get('graph_breaks')} diff={r.get('max_diff')} "
              f"t={r.get('capture_s')}s nodes={r.get('graph_nodes')}")
        for k in ("eager_error", "capture_error"):
            if k in r:
                print("   ", k, r[k])
        for s in r.get("softmax", []):
            print(f"  - g{s['graph']} {s['module']}: {s['softmax']}")
            print(f"      score mm : {s['score_matmul']}")
            for c in s["scores_chain"][::-1]:
                print(f"      pre  : {c}")
            for c in s["after_softmax"]:
                print(f"      post : {c}")
            print(f"      value mm : {s['value_matmul']}")
            print(f"      q: {s.get('q_chain')}")
            print(f"      k: {s.get('k_chain')}")
            print(f"      v: {s.get('v_chain')}")
            for c in s.get("side_inputs", []):
                print(f"      side: {c}")
    if attn == "eager" and not argv[0:0] and all(n in hf_zoo.LM_ZOO for n in names if n in hf_zoo.LM_ZOO):
        for name in [n for n in names if n in hf_zoo.LM_ZOO]:
            g = survey_generate(name)
            recs.append({"generate": g})
            print(f"=== generate {name}: {g}")
    if dump:
        Path(dump).write_text(json.dumps(recs, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
