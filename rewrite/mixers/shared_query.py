"""Shared-query attention (Isomer's context-sharing block, PoNet's global aggregation).

Every token gets the same output ``o = softmax(q̄ Kᵀ · scale + b) V``, computed once: O(N·d). The shared
query ``q̄`` is

* ``query="mean"``: the mean of the queries over the valid (unpadded) tokens of each sequence and head.
  Exact wherever all queries are equal; a good approximation where attention is nearly query-independent.
  At a causal site the mean would mix future tokens into every output, so proven-causal sites are declined.
  If a mask turns out to be causal (or otherwise not a padding mask) at run time, each query ``i`` uses the
  mean over the positions it may see instead, which needs the dense O(Nq·Nk) form (counted in
  ``dense_calls``) but never leaks a masked token. With Nq != Nk (cross-attention, or a KV-cache decoding
  step, whose earlier queries are not cached) it is the mean of the queries at hand — for a one-token
  decoding step that is exact attention, so cached generation does not reproduce a full forward.
* ``query="calibrated"``: a fixed vector per head, the mean query over calibration data (``fit(q, k, v)``,
  no gradients). It is data-independent at inference, so causal sites get a prefix softmax
  (``o_i = Σ_{j<=i} e^{s_j} v_j / Σ_{j<=i} e^{s_j}``, stable through ``logcumsumexp``) and KV-cache
  decoding is exact for it. If ``fit`` was never called, the first real forward call fits on its own
  queries (in the pipeline that is the verification run on the example inputs) and then stays fixed.

Padding masks (a bias per key) add to the single score row; other masks use the dense form. Sites with
learned or ALiBi score biases are declined. Training-free only where attention is nearly query-independent;
the error is measured and reported. Dropout is not applied.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import sympy
import torch

from .. import cost
from ..actions import Action, Decline, RewriteError, register_action, register_handler
from . import _layout
from . import _masks
from . import _base

QUERIES = ("mean", "calibrated")


@register_action
@dataclasses.dataclass(frozen=True)
class SharedQuery(Action):
    """One query shared by all tokens: the mean query (``"mean"``) or a calibrated vector (``"calibrated"``)."""

    query: str = "mean"
    exact = False
    requires = (_base.NoScoreBias(),)

    def __post_init__(self):
        if self.query not in QUERIES:
            raise RewriteError(f"SharedQuery(query={self.query!r}) is not known; use 'mean' (the mean query of "
                               "each sequence) or 'calibrated' (a vector fitted on calibration data).")

    def flops(self, causal: bool = False) -> sympy.Expr:
        """Query mean (for "mean"), one score row, its softmax, one value average; causal: prefix sums."""
        B, H, N, Nk, d, dv = (cost.SYMBOLS[s] for s in ("B", "H", "N", "Nk", "d", "dv"))
        mean = N * d + d if self.query == "mean" else 0
        if causal:
            expr = mean + 2 * Nk * d + cost.SOFTMAX_FLOPS_PER_SCORE * Nk + 6 * Nk * dv
        else:
            expr = mean + 2 * Nk * d + cost.SOFTMAX_FLOPS_PER_SCORE * Nk + 2 * Nk * dv
        return sympy.expand(B * H * expr)


class SharedQueryAttention(_base.FastAndDense, _base.WarnOnce):
    """Shared-query attention with SDPA's call signature (see the module docstring)."""

    def __init__(self, query: str = "mean"):
        super().__init__()
        self.__name__ = f"shared_query_{query}"
        self.query = query
        self.register_buffer("q_sum", torch.zeros(0, dtype=torch.float64))      # [H, 1, D] once fitted
        self.register_buffer("q_count", torch.zeros((), dtype=torch.float64))
        self.dense_calls = 0

    # ---------------------------------------------------------------------------------- calibration
    @property
    def fitted(self) -> bool:
        """Whether a mean query is there; read from the buffer's size, never its values, so a compiler tracing
        the mixer (``then="inductor"``) can decide it without data."""
        return self.q_sum.numel() > 0

    @torch.no_grad()
    def fit(self, q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None) -> "SharedQueryAttention":
        """Accumulate the mean query per head (dim -3 when q has 4+ dims, else one vector) over ``q``
        (a list of tensors: over each of them)."""
        if isinstance(q, (list, tuple)):
            for part in q:
                self.fit(part)
            return self
        qd = q.detach().to(torch.float64)
        if qd.dim() >= 4:
            dims = tuple(i for i in range(qd.dim()) if i not in (qd.dim() - 3, qd.dim() - 1))
            total = qd.sum(dim=dims).unsqueeze(-2)                      # [H, 1, D]
            count = qd.numel() / (qd.shape[-3] * qd.shape[-1])
        else:
            total = qd.reshape(-1, qd.shape[-1]).sum(0).reshape(1, 1, -1)
            count = qd.numel() / qd.shape[-1]
        if count == 0:  # no queries: nothing to accumulate (an empty fit must not count as fitted)
            return self
        if self.q_sum.shape != total.shape:
            if self.fitted and self.q_sum.numel():
                raise RewriteError(f"SharedQuery was calibrated on queries shaped {tuple(self.q_sum.shape)} per "
                                   f"head, now given {tuple(total.shape)}; calibrate each site on its own queries.")
            self.q_sum = torch.zeros_like(total)
        self.q_sum += total.to(self.q_sum.device)
        self.q_count += count
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "q_sum")
        if isinstance(saved, torch.Tensor) and saved.shape != self.q_sum.shape:
            self.q_sum = torch.zeros_like(saved, device=self.q_sum.device)   # sized by the fit that saved it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def calibrated_query(self) -> torch.Tensor:
        if not self.fitted:
            raise RewriteError("SharedQuery(query='calibrated') has not been fitted: call fit(q, k, v) on "
                               "calibration queries first.")
        return (self.q_sum / self.q_count)

    # ---------------------------------------------------------------------------------------- forward
    def _run(self, q, k, v, attn_mask, is_causal, scale, dense: bool):
        dtype = q.dtype
        if self.query == "calibrated" and not self.fitted:
            self.fit(q)
        q, k, v, s = _layout.prepare(q, k, v, scale)
        nq, nk = q.shape[-2], k.shape[-2]
        plan = _masks.plan_mask(attn_mask, is_causal, nq, nk, q.dtype)
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        if self.query == "calibrated":
            qbar = self.calibrated_query().to(device=q.device, dtype=q.dtype)
            if qbar.shape[0] not in (1, q.shape[-3] if q.dim() >= 3 else 1):
                raise RewriteError(f"SharedQuery was calibrated for {qbar.shape[0]} heads but the site has "
                                   f"{q.shape[-3]}.")
        if not dense and plan.kind in ("none", "keys"):
            if self.query == "mean":
                qbar = self._mean_query(q, plan)
            scores = (qbar @ k.transpose(-1, -2)) * s                 # [..., 1, Nk]
            if plan.key_bias is not None:
                scores = scores + plan.key_bias
            out = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v    # [..., 1, dv]
            out = out.expand(*lead, nq, v.shape[-1])
        elif not dense and plan.kind == "causal" and self.query == "calibrated" and plan.offset >= 0:
            scores = (qbar @ k.transpose(-1, -2)) * s
            if plan.key_bias is not None:
                scores = scores + plan.key_bias
            out = self._prefix_softmax(scores.expand(*lead, 1, nk), v.expand(*lead, nk, v.shape[-1]), plan.offset)
        else:
            if not dense:
                self._dense_note("the attention mask is not a padding mask (or is causal for the mean query)")
            bias = plan.dense_bias(q.device, q.dtype)                 # [..., Nq, Nk]
            if self.query == "mean":
                qbar = self._row_mean_query(q, plan)                  # [..., Nq, D]
            scores = (qbar @ k.transpose(-1, -2)) * s + bias
            out = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v
            out = out.expand(*lead, nq, v.shape[-1])
        return out.contiguous().to(dtype)

    @staticmethod
    def _mean_query(q: torch.Tensor, plan: _masks.MaskPlan) -> torch.Tensor:
        """Mean query over valid tokens: the unpadded positions when Nq == Nk, else all queries."""
        valid = plan.key_valid()
        if valid is None or plan.nq != plan.nk:
            return q.mean(-2, keepdim=True)
        w = valid.transpose(-1, -2).to(q.dtype)                        # [..., Nk, 1]
        return (w * q).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1.0)

    @staticmethod
    def _row_mean_query(q: torch.Tensor, plan: _masks.MaskPlan) -> torch.Tensor:
        """Per query row, the mean of the queries at the positions it may see (queries sit at the last Nq
        key positions); with Nq > Nk, the mean of all queries."""
        off = plan.nk - plan.nq
        if off < 0:
            return q.mean(-2, keepdim=True)
        allowed = plan.allowed(q.device)[..., off:].to(q.dtype)        # [..., Nq, Nq]: may i see query i'?
        return (allowed @ q) / allowed.sum(-1, keepdim=True).clamp_min(1.0)

    @staticmethod
    def _prefix_softmax(scores: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
        """``o_i = Σ_{j <= i+offset} e^{s_j} v_j / Σ_{j <= i+offset} e^{s_j}`` in O(Nk·dv), log-domain.

        ``scores`` ``[..., 1, Nk]``; ``v`` ``[..., Nk, dv]``. The positive and negative parts of v are
        accumulated separately with ``logcumsumexp``, so no prefix underflows or overflows.
        """
        nk = v.shape[-2]
        nq = nk - offset
        s = scores.transpose(-1, -2)                                    # [..., Nk, 1]
        neg_inf = torch.tensor(float("-inf"), dtype=v.dtype, device=v.device)
        log_den = torch.logcumsumexp(s, dim=-2)                         # [..., Nk, 1]
        log_pos = torch.logcumsumexp(s + torch.where(v > 0, v.abs().log(), neg_inf), dim=-2)
        log_neg = torch.logcumsumexp(s + torch.where(v < 0, v.abs().log(), neg_inf), dim=-2)
        out = torch.exp(log_pos - log_den) - torch.exp(log_neg - log_den)
        out = torch.where(torch.isfinite(log_den), out, torch.zeros_like(out))
        return out[..., offset:, :] if nq != nk else out


@register_handler(SharedQuery)
def shared_query_handler(action: SharedQuery, call, site):
    if action.query == "mean" and _base.site_causal(call, site):
        return Decline("SharedQuery(query='mean') at a causal site would mix future tokens into every output; "
                       "use SharedQuery(query='calibrated'), which has a causal prefix form")
    return SharedQueryAttention(action.query)
