"""Flow attention (Flowformer): linear attention made competitive by flow conservation.

With φ = sigmoid on the (unscaled) q and k, and every sum an average over the keys a query may see
(``A_ij = 1`` when query i may see key j; ``n_i = Σ_j A_ij``)::

    I_i = φq_i · mean_{j∈A_i} φk_j                      incoming flow of sink i
    O_j = φk_j · mean_{i∈A_j} φq_i                      outgoing flow of source j (the queries at the positions
                                                        that position j sees, as Flowformer's causal version)
    Î_i = φq_i · mean_{j∈A_i} φk_j / O_j                conserved incoming flow
    Ô_j = min(φk_j · mean_{i∈A_j} φq_i / I_i, 1)        conserved outgoing flow (clipped for stability)
    a_i = sigmoid(Î_i)                                  allocation
    c_j = exp(Ô_j) / mean_{j'∈A_j} exp(Ô_j')            competition (a softmax scaled to mean 1)
    o_i = a_i · Σ_{j∈A_i} (φq_i·φk_j) c_j v_j / (n_i I_i)

Without a mask this is Flowformer's ``Flow_Attention`` (for Nq = Nk); with a causal mask (``A`` lower
triangular) it is ``Flow_Attention_Causal`` (prefix means, prefix softmax competition). Bidirectionally every
mean is one global vector and causally a prefix sum (``cumsum``), plus one linear-attention product
(chunked when causal): O(N·d·dv) time. The dense form above, with an explicit ``A``, is the quadratic
reference (tested equal) and serves masks that are neither padding nor causal (counted in ``dense_calls``).
Padding masks remove masked keys (and, when Nq = Nk, the same positions as queries) from every sum.

Flow attention needs the queries of every key position (the outgoing flows), so cross-attention and KV-cache
decoding (Nq != Nk) are declined. The sigmoid kernel differs from softmax: the paper trains it (RT/FT);
used training-free the error is large and is reported, not hidden.

On CUDA tensors (or CPU ones with ``REWRITE_MIXER_KERNELS=1`` and ``TRITON_INTERPRET=1``) the causal form's
linear-attention product (the chunked prefix sums) runs on the Triton linear-attention kernel with identity
features (in the inputs' dtype for fp16 / bf16); the kernel normalises, so its output is multiplied back by
the normaliser (a cumsum, O(N·d)).
The bidirectional product is two plain matrix products (nothing for a kernel to fuse) and the dense form has
an explicit ``A``: both stay in PyTorch. Score biases (ALiBi, relative position)
are declined. ``scale`` is unused (flow normalisation replaces the softmax temperature); dropout is not
applied.
"""
from __future__ import annotations

import dataclasses

import sympy
import torch
from torch import nn

from .. import cost
from ..actions import Action, RewriteError, register_action, register_handler
from ._layout import kernel_dtype
from .linear import kernel_linear
from . import _layout
from . import _masks
from . import _linear
from . import _base

EPS = 1e-6


@register_action
@dataclasses.dataclass(frozen=True)
class Flow(Action):
    """Flowformer's flow-conservation linear attention (sigmoid kernel); bidirectional and causal."""

    exact = False
    requires = (_base.NoScoreBias(),
                _base.SelfAttention("Flow needs the queries of every key position (its outgoing flows)"))

    def flops(self, causal: bool = False) -> sympy.Expr:
        """Sigmoid maps, flow reductions, competition softmax, and the linear-attention product."""
        B, H, N, Nk, d, dv = (cost.SYMBOLS[s] for s in ("B", "H", "N", "Nk", "d", "dv"))
        fmap = 4 * (N + Nk) * d                         # sigmoid
        flows = 8 * (N + Nk) * d                        # I, O, Î, Ô: a reduction and a dot product each
        compete = cost.SOFTMAX_FLOPS_PER_SCORE * Nk + Nk * dv + 2 * N
        product = 2 * Nk * d * dv + 2 * N * d * dv + 2 * N * dv
        expr = fmap + flows + compete + product
        if causal:
            expr += 2 * N * sympy.Min(_linear.CHUNK, N) * (d + dv)
        return sympy.expand(B * H * expr)


class FlowAttention(nn.Module, _base.WarnOnce):
    """Flow attention with SDPA's call signature (see the module docstring)."""

    def __init__(self, chunk: int = _linear.CHUNK):
        super().__init__()
        self.__name__ = "flow_attention"
        self.chunk = chunk
        self.dense_calls = 0

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        _base.refuse_dropout(self, dropout_p)
        if _layout.is_shape_inference(q, k, v, attn_mask):
            return _layout.fake_output(q, v)
        return self._run(q, k, v, attn_mask, is_causal, dense=False)

    def dense(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """The quadratic reference (explicit ``A``) for any mask."""
        return self._run(q, k, v, attn_mask, is_causal, dense=True)

    def _run(self, q, k, v, attn_mask, is_causal, dense: bool):
        dtype = q.dtype
        q, k, v, _ = _layout.prepare(q, k, v, None)
        nq, nk = q.shape[-2], k.shape[-2]
        plan = _masks.plan_mask(attn_mask, is_causal, nq, nk, q.dtype)
        fq, fk = torch.sigmoid(q), torch.sigmoid(k)
        if plan.kind in ("causal", "general") and nq != nk:
            raise RewriteError(f"Flow needs the queries of every key position; with Nq={nq} != Nk={nk} and a causal "
                               "or general mask (KV-cache decoding) it cannot run. Keep this site Exact.")
        if not dense and plan.kind in ("none", "keys"):
            out = self._bidirectional(fq, fk, v, plan)
        elif not dense and plan.kind == "causal":
            out = self._causal(fq, fk, v, plan, dtype)
        else:
            if not dense:
                self._dense_note("the attention mask is neither a padding nor a causal mask")
            out = self._dense(fq, fk, v, plan)
        return out.to(dtype)

    @staticmethod
    def _valid(plan: _masks.MaskPlan, like: torch.Tensor) -> torch.Tensor:
        """``[..., Nk, 1]`` key validity as 0/1 weights."""
        kv = plan.key_valid()
        if kv is None:
            return torch.ones(plan.nk, 1, dtype=like.dtype, device=like.device)
        return kv.transpose(-1, -2).to(like.dtype)

    def _bidirectional(self, fq, fk, v, plan: _masks.MaskPlan):
        w = self._valid(plan, fk)                                  # keys
        u = w if plan.nq == plan.nk else torch.ones(plan.nq, 1, dtype=fq.dtype, device=fq.device)
        n = w.sum(-2, keepdim=True).clamp_min(1.0)                 # [..., 1, 1]
        nu = u.sum(-2, keepdim=True).clamp_min(1.0)
        k_mean = (w * fk).sum(-2, keepdim=True) / n                # [..., 1, d]
        q_mean = (u * fq).sum(-2, keepdim=True) / nu
        inc = (fq * k_mean).sum(-1, keepdim=True) + EPS            # I_i  [..., Nq, 1]
        out_f = (fk * q_mean).sum(-1, keepdim=True) + EPS          # O_j  [..., Nk, 1]
        inc_c = (fq * ((w * fk / out_f).sum(-2, keepdim=True) / n)).sum(-1, keepdim=True)
        out_c = (fk * ((u * fq / inc).sum(-2, keepdim=True) / nu)).sum(-1, keepdim=True).clamp(max=1.0)
        alloc = torch.sigmoid(inc_c)
        e = torch.exp(out_c) * w
        comp = e / (e.sum(-2, keepdim=True) / n).clamp_min(1e-30)   # mean over the valid keys is 1
        state = (fk * w).transpose(-1, -2) @ (comp * v)            # [..., d, dv]
        return alloc * (fq @ state) / (n * inc)

    def _causal(self, fq, fk, v, plan: _masks.MaskPlan, dtype: torch.dtype):
        off = plan.offset
        assert off == 0
        w = self._valid(plan, fk)                                  # [..., N, 1]
        lead = torch.broadcast_shapes(fq.shape[:-2], fk.shape[:-2], w.shape[:-2])
        w = w.expand(*lead, plan.nk, 1)
        n = w.cumsum(-2).clamp_min(1.0)                            # visible keys per position
        k_mean = (w * fk).cumsum(-2) / n
        q_mean = (w * fq).cumsum(-2) / n                           # queries at the positions j sees
        inc = (fq * k_mean).sum(-1, keepdim=True) + EPS
        out_f = (fk * q_mean).sum(-1, keepdim=True) + EPS
        inc_c = (fq * ((w * fk / out_f).cumsum(-2) / n)).sum(-1, keepdim=True)
        out_c = (fk * ((w * fq / inc).cumsum(-2) / n)).sum(-1, keepdim=True).clamp(max=1.0)
        alloc = torch.sigmoid(inc_c)
        e = torch.exp(out_c) * w
        comp = e / (e.cumsum(-2) / n).clamp_min(1e-30)
        fkw, cv = fk * w, comp * v
        prod = kernel_linear(fq, fkw, cv, "identity", True, EPS, kernel_dtype(dtype))
        if prod is None:
            prod = _linear.linear_causal(fq, fkw, cv, 0, self.chunk)
        else:   # the kernel divides by Σ_{j<=i} φq_i·φk_j + EPS: multiply it back
            prod = prod * ((fq * fkw.cumsum(-2)).sum(-1, keepdim=True) + EPS)
        return alloc * prod / (n * inc)

    def _dense(self, fq, fk, v, plan: _masks.MaskPlan):
        a = plan.allowed(fq.device).to(fq.dtype)                  # [..., Nq, Nk]
        lead = torch.broadcast_shapes(fq.shape[:-2], fk.shape[:-2], a.shape[:-2])
        a = a.expand(*lead, plan.nq, plan.nk)
        if plan.nq == plan.nk:
            a_src = a                                              # row j of A: what position j sees
        else:                                                      # cross-attention: every query, every valid key
            a_src = None
        n = a.sum(-1, keepdim=True).clamp_min(1.0)                 # [..., Nq, 1]
        k_mean = (a @ fk) / n
        if a_src is not None:
            n_src = a_src.sum(-1, keepdim=True).clamp_min(1.0)     # [..., Nk, 1] (Nk == Nq)
            q_mean = (a_src @ fq) / n_src
        else:
            n_src = torch.full((plan.nk, 1), float(plan.nq), dtype=fq.dtype, device=fq.device)
            q_mean = fq.mean(-2, keepdim=True).expand(*lead, plan.nk, fq.shape[-1])
        inc = (fq * k_mean).sum(-1, keepdim=True) + EPS
        out_f = (fk * q_mean).sum(-1, keepdim=True) + EPS
        inc_c = (fq * ((a @ (fk / out_f)) / n)).sum(-1, keepdim=True)
        if a_src is not None:
            qs = (a_src @ (fq / inc)) / n_src
        else:
            qs = (fq / inc).mean(-2, keepdim=True)
        out_c = (fk * qs).sum(-1, keepdim=True).clamp(max=1.0)
        alloc = torch.sigmoid(inc_c)
        e = torch.exp(out_c)                                       # [..., Nk, 1]
        if a_src is not None:
            comp = e / ((a_src @ e) / n_src).clamp_min(1e-30)
        else:
            valid = (a.amax(-2, keepdim=True) > 0).transpose(-1, -2).to(e.dtype)   # keys any query sees
            comp = e / ((valid * e).sum(-2, keepdim=True) / valid.sum(-2, keepdim=True).clamp_min(1.0))
        scores = (fq @ fk.transpose(-1, -2)) * a
        return alloc * (scores @ (comp * v)) / (n * inc)


@register_handler(Flow)
def flow_handler(action: Flow, call, site):
    return FlowAttention()
