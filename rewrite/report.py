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
        self.breaks: list[BreakRow] = []
        self.graphs = 0
        self.recompiles = 0
        self._fallbacks: dict[tuple, FallbackRow] = {}
        self.errors: list[str] = []
        self.recaptures: list[str] = []
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
        for attr in ("flops_before", "flops_after", "bytes_before", "bytes_after"):
            if (getattr(old, attr) or 0) > (getattr(row, attr) or 0):
                setattr(row, attr, getattr(old, attr))
        if old.shape and (old.flops_before or 0) >= (row.flops_before or 0):
            row.shape = old.shape
        self._sites[key] = row
        return row

    def record_rejected(self, name: str, reason: str, ordinal: int) -> None:
        self._rejected.setdefault((name, ordinal, reason), RegionRow(name, reason))

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

    def start_over(self) -> None:
        """A copy of the model compiles afresh: its live counts start at zero (the site rows stay, and are
        updated as its own graphs are rewritten and verified)."""
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

    def calibration_table(self) -> str:
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
                         r.choice, _fmt_err(chosen.error) if chosen else "-",
                         f"{chosen.flops / r.exact_flops:.0%}" if chosen and chosen.flops and r.exact_flops else "100%",
                         f"{measured}/{len(r.candidates)}", r.why])
        head = (f"Calibration: policy {cal.policy}, metric {cal.metric}, {cal.batches} batch(es), "
                f"joint error bound {cal.joint_error if cal.joint_error is None else f'{cal.joint_error:.4g}'}"
                f"{'' if cal.budget is None else f' (budget {cal.budget})'}, {cal.seconds:.1f} s")
        out = [head, tabulate(rows, headers=["site", "entropy", "query-indep.", "mass |i-j|<=64", "top-64 mass",
                                             "choice", "error", "FLOPs", "measured", "why"], tablefmt="simple")]
        if cal.backoffs:
            out.append("back-off: " + "; ".join(cal.backoffs))
        if cal.message:
            out.append(cal.message)
        return "\n".join(out)

    def plot(self, path: str) -> str:
        """A PNG of attention FLOPs (before/after) and measured error per site; returns the path."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self.sites
        names = [r.name for r in rows]
        x = list(range(len(rows)))
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
        before = [(r.flops_before or 0) / 1e9 for r in rows]
        after = [(r.flops_after if r.flops_after is not None else r.flops_before or 0) / 1e9 for r in rows]
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="exact GFLOPs", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="after GFLOPs", color="#3b75af")
        ax.set_ylabel("attention GFLOPs")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
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
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def table(self) -> str:
        headers = ["#", "site", "status", "action", "exact", "error", "mask", "causal", "GFLOP before", "after", "reason"]
        rows = []
        for r in self.sites:
            rows.append([r.index, r.name, r.status, r.action, _yn(r.exact), _fmt_err(r.error), r.mask,
                         _yn(r.is_causal), _gflop(r.flops_before), _gflop(r.flops_after), r.reason])
        out = [tabulate(rows, headers=headers, tablefmt="simple")]
        c = self.counts()
        out.append(f"\n{len(self.sites)} attention sites: {c['rewritten']} rewritten, {c['kept']} kept, "
                   f"{c['rejected']} rejected; {self.graphs} captured graph(s) ({self.recompiles} recompile(s)), "
                   f"{sum(b.count for b in self.breaks)} graph break(s), "
                   f"{sum(f.calls for f in self._fallbacks.values())} call(s) that fell back to original code.")
        if self.rejected:
            out.append("\nRejected attention-like regions:")
            out.append(tabulate([[r.name, r.reason] for r in self.rejected], headers=["module", "why"], tablefmt="simple"))
        b, a = self.attention_flops()
        if b and a < b:
            out.append(f"Attention FLOPs: {b / 1e9:.3f} G -> {a / 1e9:.3f} G ({1 - a / b:.1%} cut).")
        if self.calibration is not None:
            out.append("\n" + self.calibration_table())
        if self._fallbacks:
            out.append("\nFallbacks to the original code:")
            out.append(tabulate([[f.calls, f.where, f.why] for f in self.fallbacks], headers=["calls", "where", "why"],
                                tablefmt="simple"))
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
                "recaptures": list(self.recaptures),
                "sites": [r.to_json() for r in self.sites],
                "rejected": [r.to_json() for r in self.rejected], "breaks": [b.to_json() for b in self.breaks],
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


def _gflop(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 1e9:.3f}"
