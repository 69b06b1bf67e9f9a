"""The rewrite report: one row per attention site, plus graph breaks and rejected regions.

Example::

    model = rewrite.optimize(model, "exact", example_kwargs=batch)
    print(model.rewrite_report)            # a table
    rewrite.report(model).to_json()        # for tools
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from tabulate import tabulate


@dataclasses.dataclass
class SiteRow:
    """What happened to one attention site of the model."""
    name: str
    index: int
    status: str                    # "rewritten" | "kept" | "rejected"
    action: str = "-"
    exact: Optional[bool] = None
    error: Optional[float] = None
    reason: str = ""
    flops_before: Optional[float] = None
    flops_after: Optional[float] = None
    flops_before_expr: str = ""
    flops_after_expr: str = ""
    bytes_before: Optional[float] = None
    bytes_after: Optional[float] = None
    is_causal: bool = False
    mask: str = "none"
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    shape: str = ""
    graphs: int = 1
    ordinal: int = 0
    ms_before: Optional[float] = None      # measured while calibrating: the exact call alone, ms per call
    ms_after: Optional[float] = None       # ... and the chosen action alone

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RegionRow:
    """An attention-like region that is not a site (softmax between products that failed a check)."""
    name: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FallbackRow:
    """Calls where (part of) the model ran its original code instead of the rewritten graphs, and why."""
    where: str
    why: str
    calls: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BreakRow:
    """A Dynamo graph break: the model was captured in pieces, each rewritten on its own."""
    reason: str
    count: int = 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RewriteReport:
    """Rows per site (``.sites``), graph breaks (``.breaks``) and rejected regions (``.rejected``)."""

    def __init__(self, policy: str = ""):
        self.policy = policy
        self._sites: dict[tuple, SiteRow] = {}
        self._rejected: dict[tuple, RegionRow] = {}
        #: modules holding softmax ops that are not attention-like (most per captured graph seen)
        self.other_softmax: dict[str, int] = {}
        self.breaks: list[BreakRow] = []
        self.graphs = 0
        self.recompiles = 0
        self._fallbacks: dict[tuple, FallbackRow] = {}
        self.errors: list[str] = []
        self.recaptures: list[str] = []
        #: how the capture compiles this model, where the rewrite needed a change (static shapes for a band)
        self.capture_notes: list[str] = []
        self.plan: dict[str, dict] = {}
        self.optimize_seconds: Optional[float] = None
        self.calibration = None   # a measured.CalibrationReport when a measured policy chose the plan

    # -- recording (called by the pipeline for every captured graph) --------------------------------
    def record_site(self, row: SiteRow) -> SiteRow:
        key = (row.name, row.ordinal)
        old = self._sites.get(key)
        if old is None:
            row.index = len(self._sites)
            self._sites[key] = row
            return row
        row.index, row.graphs = old.index, old.graphs + 1
        if old.status == "rejected" and row.status != "rejected":
            old.graphs = row.graphs
            return old  # a site rejected in any captured graph stays reported as rejected
        # one row per site across graphs (prefill and decode, train and eval): merge what each saw
        if old.status == "rewritten" and row.status == "rewritten" and old.action != row.action:
            row.reason = "; ".join(x for x in (old.reason, f"another captured graph used {row.action}"
                                               + (f" ({row.reason})" if row.reason else "")) if x)
            row.action, row.exact = old.action, old.exact
        elif row.reason != old.reason and old.reason:
            row.reason = "; ".join(x for x in (old.reason, row.reason) if x)
        row.is_causal = row.is_causal or old.is_causal
        kinds = [k for k in (old.mask + "+" + row.mask).split("+") if k and k != "none"]
        row.mask = "+".join(dict.fromkeys(kinds)) or "none"
        if old.error is not None and row.error is not None:
            row.error = max(old.error, row.error)
        for attr in ("flops_before", "flops_after", "bytes_before", "bytes_after", "ms_before", "ms_after"):
            if (getattr(old, attr) or 0) > (getattr(row, attr) or 0):
                setattr(row, attr, getattr(old, attr))
        if old.shape and (old.flops_before or 0) >= (row.flops_before or 0):
            row.shape = old.shape
        self._sites[key] = row
        return row

    def attach_calibration(self, calibration) -> None:
        """Keep a measured policy's :class:`~rewrite.measured.CalibrationReport`; its measured times per site
        go onto the site rows."""
        self.calibration = calibration
        if calibration is None:
            return
        by_key = {(r.name, r.ordinal): r for r in calibration.rows}
        for key, row in self._sites.items():
            cal = by_key.get(key)
            if cal is not None:
                row.ms_before, row.ms_after = cal.exact_ms, cal.chosen_ms

    def record_rejected(self, name: str, reason: str, ordinal: int) -> None:
        self._rejected.setdefault((name, ordinal, reason), RegionRow(name, reason))

    def record_other_softmax(self, owners: list) -> None:
        """The modules of one captured graph's softmax ops that are not attention-like; a module keeps the most any
        graph had (recompiles and recaptures see the same ops again)."""
        for name in set(owners):
            self.other_softmax[name] = max(self.other_softmax.get(name, 0), owners.count(name))

    def record_unrewritten(self, name: str, ordinal: int, reason: str) -> None:
        """A site whose graph could not be rewritten at all: listed as kept, with the reason, unless a row for it
        exists already (from another graph)."""
        if (name, ordinal) not in self._sites:
            self.record_site(SiteRow(name=name, index=0, status="kept", ordinal=ordinal, reason=reason))

    def record_fallback(self, where: str, why: str, calls: int = 1) -> None:
        row = self._fallbacks.setdefault((where, why), FallbackRow(where, why))
        row.calls += calls

    def record_recapture(self, why: str) -> None:
        self.recaptures.append(why)

    def record_capture_note(self, note: str) -> None:
        if note not in self.capture_notes:
            self.capture_notes.append(note)

    def start_over(self) -> None:
        """A copy of the model compiles afresh: its live counts start at zero (the site rows stay, and are
        updated as its own graphs are rewritten and verified; the capture notes stay: the copy's capture keeps
        the same modules of static shapes)."""
        self.graphs = self.recompiles = 0
        self._fallbacks = {}
        self.recaptures = []

    # -- reading --------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[SiteRow]:
        return sorted(self._sites.values(), key=lambda r: r.index)

    @property
    def rejected(self) -> list[RegionRow]:
        return list(self._rejected.values())

    @property
    def fallbacks(self) -> list[FallbackRow]:
        """Live: every way a call of the model ran original code, with how many calls."""
        return list(self._fallbacks.values())

    def site_count(self) -> int:
        return len(self._sites)

    def counts(self) -> dict[str, int]:
        out = {"rewritten": 0, "kept": 0, "rejected": 0}
        for r in self.sites:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def attention_flops(self) -> tuple[float, float]:
        """Total attention-core FLOPs before and after, at the captured shapes (sites with known cost)."""
        before = sum(r.flops_before or 0.0 for r in self.sites if r.flops_before and r.flops_after is not None)
        after = sum(r.flops_after or 0.0 for r in self.sites if r.flops_before and r.flops_after is not None)
        return before, after

    def calibration_table(self, with_time: bool = True) -> str:
        """The measured policy's table: per site, statistics, choice, error, measured ms and FLOPs; then the
        model's measured time (unless ``with_time`` is False), back-offs and the policy's message."""
        cal = self.calibration
        if cal is None:
            return ""
        rows = []
        for r in cal.rows:
            st = r.stats or {}
            chosen = next((c for c in r.candidates if c.action == r.choice), None)
            measured = sum(c.error is not None for c in r.candidates)
            rows.append([r.name, _f2(st.get("entropy")), _f2(st.get("query_independence")),
                         _f2((st.get("window_mass") or {}).get(128)), _f2((st.get("topk_mass") or {}).get(64)),
                         r.choice, _fmt_err(chosen.error) if chosen else "-", _ms(getattr(r, "exact_ms", None)),
                         _ms(getattr(r, "chosen_ms", None)),
                         _flop_pair(r.exact_flops, chosen.flops if chosen else r.exact_flops),
                         f"{measured}/{len(r.candidates)}", r.why])
        head = (f"Calibration: policy {cal.policy}, metric {cal.metric}, {cal.batches} batch(es), "
                f"joint error bound {cal.joint_error if cal.joint_error is None else f'{cal.joint_error:.4g}'}"
                f"{'' if cal.budget is None else f' (budget {cal.budget})'}, {cal.seconds:.1f} s")
        out = [head, tabulate(rows, headers=["site", "entropy", "query-indep.", "mass |i-j|<=64", "top-64 mass",
                                             "choice", "error", "exact ms", "chosen ms", "FLOPs exact -> chosen",
                                             "measured", "why"], tablefmt="simple")]
        timing = self.time_summary() if with_time else ""
        if timing:
            out.append(timing)
        merging = getattr(cal, "token_merging", None) or []
        if merging:
            out.append("Token merging (whole models; ms vs the same model without merging, interleaved):")
            out.append(tabulate([[m.action, getattr(m, "base", ""), _fmt_err(m.error), _ms(m.ms), _ms(m.plan_ms),
                                  m.outcome] for m in merging],
                                headers=["setting", "added to", "error bound", "ms", "without ms", "outcome"],
                                tablefmt="simple"))
        if cal.backoffs:
            out.append("back-off: " + "; ".join(cal.backoffs))
        if cal.message:
            out.append(cal.message)
        return "\n".join(out)

    def time_summary(self) -> str:
        """The whole model's measured time with the plan against exact, and attention's share of it."""
        cal = self.calibration
        plan_ms, exact_ms = getattr(cal, "model_ms", None), getattr(cal, "exact_model_ms", None)
        if cal is None or not plan_ms or not exact_ms:
            return ""
        ratio = exact_ms / plan_ms
        how = f"{ratio:.2f}x faster" if ratio > 1 else ("the same plan" if ratio == 1 else f"{1 / ratio:.2f}x slower")
        text = (f"Measured time per forward (median of interleaved runs on the calibration batches, this device): "
                f"{plan_ms:.4g} ms with the plan vs {exact_ms:.4g} ms exact ({how})")
        if cal.attention_ms:
            text += (f"; exact attention ~{cal.attention_ms:.4g} ms of it ({cal.attention_share:.0%}, its sites "
                     "timed alone)")
        return text + f"; timing took {cal.timing_seconds:.1f} s."

    def plot(self, path: str) -> str:
        """A PNG of attention FLOPs (before/after) and measured error per site, and, after a measured policy,
        the measured time per site (exact and chosen) and of the whole model; returns the path."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self.sites
        timed = any(r.ms_before is not None for r in rows)
        width = max(6, 0.6 * len(rows) + 2)
        fig, axes = plt.subplots(2 if timed else 1, 1, figsize=(width, 8 if timed else 4.5), squeeze=False)
        self._plot_flops(axes[0][0], rows)
        if timed:
            self._plot_time(axes[1][0], rows)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def _plot_flops(self, ax, rows) -> None:
        x = list(range(len(rows)))
        before = [(r.flops_before or 0) / 1e9 for r in rows]
        after = [(r.flops_after if r.flops_after is not None else r.flops_before or 0) / 1e9 for r in rows]
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="exact GFLOPs", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="after GFLOPs", color="#3b75af")
        ax.set_ylabel("attention GFLOPs")
        _site_ticks(ax, rows)
        ax2 = ax.twinx()
        errs = [r.error if r.error is not None else 0.0 for r in rows]
        if self.calibration is not None:
            by = {(c.name, c.ordinal): c for c in self.calibration.rows}
            errs = []
            for r in rows:
                c = by.get((r.name, r.ordinal))
                e = next((cand.error for cand in c.candidates if c and cand.action == c.choice), 0.0) if c else 0.0
                errs.append(e or 0.0)
            if self.calibration.budget is not None:
                ax2.axhline(self.calibration.budget, color="#c0392b", linestyle="--", linewidth=1, label="error budget")
        ax2.plot(x, errs, "o-", color="#e67e22", label="measured error")
        ax2.set_ylabel("error (swap-one, on calibration data)")
        b, a = self.attention_flops()
        ax.set_title(f"rewrite plan: attention FLOPs {b / 1e9:.2f} -> {a / 1e9:.2f} G "
                     f"({(1 - a / b) if b else 0:.0%} cut)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)

    def _plot_time(self, ax, rows) -> None:
        x = list(range(len(rows)))
        before = [r.ms_before or 0.0 for r in rows]
        after = [r.ms_after if r.ms_after is not None else r.ms_before or 0.0 for r in rows]
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="exact ms", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="chosen ms", color="#2e8b57")
        ax.set_ylabel("ms per call (site alone, measured)")
        _site_ticks(ax, rows)
        cal = self.calibration
        title = "measured time per site"
        if cal is not None and getattr(cal, "model_ms", None) and getattr(cal, "exact_model_ms", None):
            title = (f"measured model time: {cal.model_ms:.4g} ms with the plan, {cal.exact_model_ms:.4g} ms exact "
                     f"({cal.exact_model_ms / cal.model_ms:.2f}x)")
            if cal.attention_share is not None:
                title += f"\nexact attention ~{cal.attention_share:.0%} of the exact forward"
        ax.set_title(title, fontsize=10)
        ax.legend(loc="upper right", fontsize=8)

    def table(self) -> str:
        headers = ["#", "site", "status", "action", "exact", "error", "mask", "causal", "GFLOP before", "after", "reason"]
        timed = any(r.ms_before is not None for r in self.sites)
        if timed:
            headers[-1:-1] = ["ms before", "after"]
        rows = []
        for r in self.sites:
            rows.append([r.index, r.name, r.status, r.action, _yn(r.exact), _fmt_err(r.error), r.mask,
                         _yn(r.is_causal), _gflop(r.flops_before), _gflop(r.flops_after)]
                        + ([_ms(r.ms_before), _ms(r.ms_after)] if timed else []) + [r.reason])
        out = [tabulate(rows, headers=headers, tablefmt="simple")]
        c = self.counts()
        out.append(f"\n{len(self.sites)} attention sites: {c['rewritten']} rewritten, {c['kept']} kept, "
                   f"{c['rejected']} rejected; {self.graphs} captured graph(s) ({self.recompiles} recompile(s)), "
                   f"{sum(b.count for b in self.breaks)} graph break(s), "
                   f"{sum(f.calls for f in self._fallbacks.values())} call(s) that fell back to original code.")
        if self.rejected:
            out.append("\nRejected attention-like regions:")
            out.append(tabulate([[r.name, r.reason] for r in self.rejected], headers=["module", "why"], tablefmt="simple"))
        if self.other_softmax:
            names = sorted(self.other_softmax)
            shown = ", ".join(f"{n or '(model)'}" + (f" x{self.other_softmax[n]}" if self.other_softmax[n] > 1 else "")
                              for n in names[:6]) + (f", ... ({len(names) - 6} more modules)" if len(names) > 6 else "")
            out.append(f"\n{sum(self.other_softmax.values())} other softmax op(s), not attention-like (no score product "
                       f"before or value product after; routers, gates, pooling, or attention written in a form not "
                       f"read here), left as they are: {shown}.")
        b, a = self.attention_flops()
        if b and a < b:
            out.append(f"Attention FLOPs: {b / 1e9:.3f} G -> {a / 1e9:.3f} G ({1 - a / b:.1%} cut).")
        if self.time_summary():
            out.append(self.time_summary())
        if self.calibration is not None:
            out.append("\n" + self.calibration_table(with_time=False))
        if self._fallbacks:
            out.append("\nFallbacks to the original code:")
            out.append(tabulate([[f.calls, f.where, f.why] for f in self.fallbacks], headers=["calls", "where", "why"],
                                tablefmt="simple"))
        if self.capture_notes:
            out.append("\nCapture:")
            out.extend(f"  {note}" for note in self.capture_notes)
        if self.recaptures:
            out.append("\nRecompiled from scratch (rewritten and verified again):")
            out.extend(f"  {why}" for why in self.recaptures)
        if self.errors:
            out.append("\nInternal errors (those graphs run unchanged):")
            out.extend(f"  {e}" for e in self.errors)
        if self.breaks:
            out.append("\nGraph breaks:")
            out.append(tabulate([[b.count, b.reason] for b in self.breaks], headers=["count", "reason"], tablefmt="simple"))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    __repr__ = __str__

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "graphs": self.graphs, "recompiles": self.recompiles,
                "fallbacks": [f.to_json() for f in self.fallbacks], "errors": list(self.errors),
                "recaptures": list(self.recaptures), "capture_notes": list(self.capture_notes),
                "sites": [r.to_json() for r in self.sites],
                "rejected": [r.to_json() for r in self.rejected], "breaks": [b.to_json() for b in self.breaks],
                "other_softmax": dict(self.other_softmax),
                "plan": {"version": 1, "sites": self.plan}, "optimize_seconds": self.optimize_seconds,
                "calibration": self.calibration.to_json() if self.calibration is not None else None}

    def to_json_str(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _yn(v: Optional[bool]) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _fmt_err(e: Optional[float]) -> str:
    return "-" if e is None else f"{e:.1e}"


def _f2(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"


def _flop_pair(before: Optional[float], after: Optional[float]) -> str:
    """``"5.2M -> 2.7M (52%)"``: FLOPs of exact and of the choice at a site."""
    if not before:
        return "-"
    after = before if after is None else after
    return f"{_si(before)} -> {_si(after)} ({after / before:.0%})"


def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _site_ticks(ax, rows) -> None:
    ax.set_xticks(list(range(len(rows))))
    ax.set_xticklabels([r.name for r in rows], rotation=60, ha="right", fontsize=7)


def _gflop(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 1e9:.3f}"
