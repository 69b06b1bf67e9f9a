"""Calibration: run the model on the user's batches with every attention site switchable, and measure.

While calibrating, each site is lowered to a :class:`SiteSwitch` (SDPA's call signature) that holds the
exact call and every candidate mixer built for that site. Switching is a Python-level setting read at
run time, so one capture serves every measurement and no second copy of the model is made. Three kinds
of passes run on the calibration batches:

* the reference: every site exact (the outputs errors are measured against);
* statistics (one pass): per site, from sampled query rows of the exact attention — normalised entropy,
  probability mass inside windows, top-k mass, sink mass, query-independence (Isomer/PoNet) and
  low-rank energy; mixers with fitted state (centroids, calibrated queries) are fitted here too;
* swap-one damage: for each (site, candidate), only that site uses the candidate; the metric on the
  model's primary output against the reference gives the end-to-end error that selection uses.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .actions import RewriteError

WINDOWS = (32, 64, 128, 256)
TOPKS = (16, 32, 64, 128)
LOWRANK = 8
SAMPLED_ROWS = 64
FIT_CALLS = 4


# --- outputs and metrics --------------------------------------------------------------------------------

def primary_output(out: Any) -> torch.Tensor:
    """The model's primary output tensor: itself, or the first tensor of a ModelOutput/tuple/dict."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            try:
                return primary_output(item)
            except RewriteError:
                continue
    raise RewriteError(f"Cannot find an output tensor in a {type(out).__name__}; pass metric=callable "
                       "(reference_output, new_output, batch) -> error that reads your model's output.")


def _per_example(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)


def cosine_error(ref: Any, new: Any, batch: Any = None) -> float:
    """1 − cosine similarity of the primary output, flattened per example, averaged over examples."""
    a, b = _per_example(primary_output(ref)), _per_example(primary_output(new))
    return max(0.0, float((1 - F.cosine_similarity(a, b, dim=-1)).mean()))


def relative_l2_error(ref: Any, new: Any, batch: Any = None) -> float:
    """‖new − ref‖ / ‖ref‖ of the primary output, per example, averaged."""
    a, b = _per_example(primary_output(ref)), _per_example(primary_output(new))
    return float(((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).mean())


def kl_error(ref: Any, new: Any, batch: Any = None) -> float:
    """Mean KL(softmax(ref) ‖ softmax(new)) over the last dim of the primary output (for logits)."""
    a, b = primary_output(ref).detach().float(), primary_output(new).detach().float()
    return float(F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1).mean())


METRICS: dict[str, Callable] = {"cosine": cosine_error, "relative_l2": relative_l2_error, "kl": kl_error}


def error_bound(errors: Sequence[float]) -> float:
    """What an error budget bounds: the error of an *unseen example* like the calibration examples, their mean
    plus two standard deviations (``errors``: one per example, see :func:`example_errors`).

    Not the mean plus two standard errors: that bounds the mean of more examples drawn like these, and other
    text is not drawn like these. On MiniLM with token merging (BENCHMARKS.md) the mean over 2 calibration
    batches plus two standard errors was 0.0078 where 24 held-out passages of other sources averaged 0.0112;
    the per-passage mean plus two deviations was 0.0130. One example alone: its error."""
    mean = sum(errors) / len(errors)
    std = (sum((e - mean) ** 2 for e in errors) / max(len(errors) - 1, 1)) ** 0.5
    return mean + 2 * std


def example_errors(metric: Callable, ref: Any, new: Any, batch: Any) -> list:
    """``metric`` per example of ``batch`` (outputs and inputs sliced along the batch dim), or once for the
    whole batch where it has one example or cannot be sliced (no tensor batch dim found, or the metric
    refuses a slice)."""
    size = _batch_size(batch)
    if size is None or size < 2:
        return [metric(ref, new, batch)]
    try:
        return [metric(_take(ref, i, size), _take(new, i, size), _take(batch, i, size)) for i in range(size)]
    except (RewriteError, RuntimeError, IndexError, ValueError, TypeError, KeyError):
        return [metric(ref, new, batch)]


def _batch_size(batch: Any) -> Optional[int]:
    """The leading dim of the batch's first tensor (a tensor, a dict or a tuple/list of inputs)."""
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    first = next((t for t in items if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def _take(value: Any, i: int, size: int) -> Any:
    """Example ``i`` of ``value``: every tensor whose leading dim is the batch size, sliced (kept 1 long), in
    the same structure (model outputs, dicts, tuples); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value[i:i + 1] if value.dim() > 0 and value.shape[0] == size else value
    if isinstance(value, dict):  # dicts and ModelOutputs (whose constructor takes the fields by name)
        taken = {k: _take(v, i, size) for k, v in value.items()}
        return taken if type(value) is dict else type(value)(**taken)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_take(v, i, size) for v in value)
    return value


def metric_fn(metric: Any) -> Callable:
    if callable(metric):
        return metric
    if metric in METRICS:
        return METRICS[metric]
    raise RewriteError(f"Unknown metric {metric!r}: use one of {', '.join(METRICS)} or a callable "
                       "(reference_output, new_output, batch) -> error (lower is better).")


def run_batch(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


# --- attention statistics ------------------------------------------------------------------------------

@dataclasses.dataclass
class SiteStats:
    """Running means of the statistics that predict which mixer a site tolerates."""
    calls: int = 0
    entropy: float = 0.0                 # normalised to [0, 1] by log(#visible keys)
    window_mass: dict = dataclasses.field(default_factory=dict)   # window -> mass within it
    topk_mass: dict = dataclasses.field(default_factory=dict)     # k -> mass of the k largest
    sink_mass: float = 0.0               # mass on the first key
    query_independence: float = 0.0      # mean cosine of each row with the mean row
    lowrank_energy: float = 0.0          # energy of the top singular values of the sampled rows
    length: int = 0

    def update(self, s: dict) -> None:
        n = self.calls
        w = 1 / (n + 1)
        for f in ("entropy", "sink_mass", "query_independence", "lowrank_energy"):
            setattr(self, f, getattr(self, f) * (1 - w) + s[f] * w)
        for name in ("window_mass", "topk_mass"):
            d = getattr(self, name)
            for key, val in s[name].items():
                d[key] = d.get(key, 0.0) * (1 - w) + val * w
        self.length = max(self.length, s["length"])
        self.calls = n + 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def attention_stats(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                    rows: int = SAMPLED_ROWS, groups: int = 8) -> dict:
    """Statistics of exact attention from sampled query rows (fp32, no N×N matrix beyond the sample)."""
    n, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
    lead = q.shape[:-2]
    k = k.expand(*lead, nk, d)
    q2, k2 = q.reshape(-1, n, d).float(), k.reshape(-1, nk, d).float()
    g = q2.shape[0]
    gi = torch.linspace(0, g - 1, min(groups, g)).round().long()
    ri = torch.linspace(0, n - 1, min(rows, n)).round().long().unique()
    scores = q2[gi][:, ri] @ k2[gi].transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(d))
    if attn_mask is not None:
        m = attn_mask.expand(*lead, n, nk).reshape(-1, n, nk)[gi][:, ri]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    qpos = ri[:, None] + (nk - n)  # bottom-right alignment covers decoding with a cache; equal for Nq == Nk
    kpos = torch.arange(nk)[None, :]
    if is_causal:
        scores = scores.masked_fill(kpos > ri[:, None], float("-inf"))
        qpos = ri[:, None]
    a = torch.softmax(scores, dim=-1).nan_to_num(0.0)                     # [G, R, Nk]
    visible = torch.isfinite(scores).sum(-1).clamp_min(2).float()
    ent = -(a * torch.log(a.clamp_min(1e-30))).sum(-1) / torch.log(visible)
    dist = (kpos - qpos).abs()
    window = {w: float(a.masked_fill(dist > w // 2, 0).sum(-1).mean()) for w in WINDOWS}
    srt = a.sort(dim=-1, descending=True).values
    topk = {kk: float(srt[..., :kk].sum(-1).mean()) for kk in TOPKS}
    mean_row = a.mean(dim=1, keepdim=True)
    qi = float(F.cosine_similarity(a, mean_row.expand_as(a), dim=-1).mean())
    sv = torch.linalg.svdvals(a)
    energy = float(((sv[..., :LOWRANK] ** 2).sum(-1) / (sv ** 2).sum(-1).clamp_min(1e-30)).mean())
    return {"entropy": float(ent.mean()), "window_mass": window, "topk_mass": topk, "sink_mass": float(a[..., 0].mean()),
            "query_independence": qi, "lowrank_energy": energy, "length": int(nk)}


# --- the switch ----------------------------------------------------------------------------------------

class CalibrationState:
    """What every switch reads at run time: which site runs which candidate, and what to record."""

    def __init__(self):
        self.use: dict = {}          # site key -> candidate key
        self.collect_stats = False
        self.switches: dict = {}     # site key -> [SiteSwitch, ...] (one per captured graph)
        self.stats: dict = {}        # site key -> SiteStats
        self.declined: dict = {}     # (site key, candidate key) -> reason
        self.sites: dict = {}        # site key -> AttentionSite
        self.sizes: dict = {}        # site key -> cost sizes (B, H, N, Nk, d, dv) seen on calibration data
        self.calls: dict = {}        # site key -> calls during the statistics pass (one pass over the batches)
        self.timing_calls: dict = {} # site key -> (switch, q, k, v, kwargs): the largest call, to time mixers on

    def switch_for(self, site, exact: Callable, candidates: dict) -> "SiteSwitch":
        """The pipeline's lowering while calibrating: a switch for ``site`` holding the exact call and every
        candidate that serves it (by candidate key), registered here."""
        switch = SiteSwitch(site.key, exact, candidates, self)
        self.switches.setdefault(site.key, []).append(switch)
        self.sites[site.key] = site
        return switch


class SiteSwitch(torch.nn.Module):
    """A site's replacement while calibrating: exact by default, any candidate when asked."""

    def __init__(self, key: tuple, exact: Callable, candidates: dict, state: CalibrationState):
        super().__init__()
        # plain attributes, not submodules: the switch must not add the candidates' state to anything
        self.__dict__.update(key=key, exact=exact, candidates=candidates, state=state, fit_inputs=[])

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        kw = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
        if enable_gqa:
            kw["enable_gqa"] = True
        choice = self.state.use.get(self.key)
        if choice is not None and choice in self.candidates:
            return self.candidates[choice](q, k, v, **kw)
        if self.state.collect_stats:
            with torch.no_grad():
                self.state.stats.setdefault(self.key, SiteStats()).update(
                    attention_stats(q, k, attn_mask, is_causal, scale, enable_gqa))
                self.state.sizes[self.key] = {"B": math.prod(q.shape[:-2]), "H": 1, "N": q.shape[-2],
                                              "Nk": k.shape[-2], "d": q.shape[-1], "dv": v.shape[-1]}
                if len(self.fit_inputs) < FIT_CALLS:
                    self.fit_inputs.append((q.detach(), k.detach(), v.detach()))
                self._record_call(q, k, v, kw)
        return self.exact(q, k, v, **kw)


    def _record_call(self, q, k, v, kw: dict) -> None:
        """Count the call, and keep the largest one seen (its q/k/v/mask and settings) for timing."""
        calls = self.state.calls
        calls[self.key] = calls.get(self.key, 0) + 1
        kept = self.state.timing_calls.get(self.key)
        if kept is None or q.numel() * k.shape[-2] > kept[1].numel() * kept[2].shape[-2]:
            detached = {n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
            self.state.timing_calls[self.key] = (self, q.detach(), k.detach(), v.detach(), detached)


def fit_candidates(state: CalibrationState, only: Optional[set] = None) -> dict:
    """Fit every candidate that has fitted state on the q/k/v its site saw (only the ``(site key, candidate
    key)`` pairs in ``only``, when given); returns their state dicts."""
    fitted = {}
    for key, switches in state.switches.items():
        inputs = [x for sw in switches for x in sw.fit_inputs]
        if not inputs:
            continue
        groups = _fit_groups(inputs)
        for sw in switches:
            for cand_key, mod in sw.candidates.items():
                fit = getattr(mod, "fit", None)
                if fit is None or (only is not None and (key, cand_key) not in only):
                    continue
                _fit_pooled(fit, groups)
                if isinstance(mod, torch.nn.Module):
                    fitted[(key, cand_key)] = {n: t.detach().clone() for n, t in mod.state_dict().items()}
    return fitted


def _fit_layout(x: torch.Tensor) -> torch.Tensor:
    """A recorded q, k or v in the layout its mixer sees at run time, batch dims merged into one.

    ``[..., H, N, D]`` becomes ``[B, H, N, D]``: per-head state is fitted per head. A 3-D ``[(b·h), N, D]``
    (batch and heads merged, as BLOOM-style or hand-written code spells it) stays as it is: the mixer sees
    one head per row there, so its fitted state is one set shared by every row, whatever the batch size; it
    must not be read as ``b·h`` heads (that state would change shape with the batch size)."""
    return x.reshape(-1, *x.shape[-3:]) if x.dim() >= 4 else x


def _fit_groups(inputs: list) -> list:
    """The recorded (q, k, v) calls joined along the batch dim, one group per distinct per-row shape
    (calibration batches of different lengths cannot be joined), largest group first."""
    groups: dict = {}
    for call in inputs:
        if any(t.dim() < 3 for t in call):
            continue
        call = tuple(_fit_layout(t) for t in call)
        groups.setdefault(tuple(tuple(t.shape[1:]) for t in call), []).append(call)
    joined = [tuple(torch.cat(parts) for parts in zip(*calls)) for calls in groups.values()]
    return sorted(joined, key=lambda g: -g[0].shape[0] * g[0].shape[-2])


def _fit_pooled(fit, groups: list) -> None:
    """Fit on every group at once (lists of tensors) where the mixer's ``fit`` pools lists, else on the largest."""
    if not groups:
        return
    if len(groups) > 1:
        try:
            _call_fit(fit, *(list(parts) for parts in zip(*groups)))
            return
        except (TypeError, AttributeError, RuntimeError, ValueError):
            pass  # this fit takes one tensor per argument
    _call_fit(fit, *groups[0])


def _call_fit(fit, q, k, v):
    import inspect
    params = inspect.signature(fit).parameters
    return fit(q, k, v) if len(params) >= 3 else fit(q, k)


def candidate_key(action) -> str:
    return action.describe()


def progress(iterable, desc: str, total: Optional[int] = None, enabled: bool = True):
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not enabled)
