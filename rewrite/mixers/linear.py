"""Kernelised (linear) attention: ``o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)``.

Feature maps φ:

* ``"elu"``   — ``elu(x) + 1`` (Katharopoulos et al., "Transformers are RNNs"); m = d features;
* ``"relu"``  — ``relu(x)`` (ScatterFormer's scattered linear attention); m = d features;
* ``"favor"`` — Performer FAVOR+ positive orthogonal random features, ``φ(x)_r = exp(ω_r·x - |x|²/2)/√m``,
  an unbiased estimator of ``exp(q·k)`` (``features`` = m random features, fixed by ``seed``).

q and k are multiplied by ``√scale`` before φ, so the kernel sees the same logits softmax would.

Cost O(N·m·dv): bidirectionally one ``m × dv`` state; causally prefix sums computed in chunks of 64
(exact inside a chunk, a running state across chunks), which equals the quadratic masked form
``((φ(Q)φ(K)ᵀ) ⊙ tril) V`` (tested). KV-cache decoding (Nq < Nk, bottom-right causal mask or a key mask)
and cross-attention are supported: the cached keys form the starting state.

Masks: a padding mask (a bias per key, also when Hugging Face expands it to ``[B, 1, Nq, Nk]``) multiplies
each key's features by ``exp(bias)`` (0 for masked keys), which is exact for the kernel; a causal mask, with
or without padding, uses the causal form. Any other mask falls back to the dense O(Nq·Nk) form of the same
kernel (counted in ``dense_calls``, warned once). Sites with learned or ALiBi score biases are declined.

On CUDA tensors (or CPU ones with ``REWRITE_MIXER_KERNELS=1`` and ``TRITON_INTERPRET=1``, see
``rewrite/kernels/README.md``) the fast form runs on the Triton linear-attention kernel
(``rewrite::linear_attention_core``): elu / relu without a padding mask apply φ in-kernel; FAVOR+ and padded
keys pass this module's own features (``identity``), so the math is the module's. GQA kv heads are expanded
before the call (the kernel has no GQA). fp16 / bf16 inputs reach the kernel in their own dtype, except
FAVOR+ features of fp16 inputs, which go in fp32 (fp16 would flush their small entries to zero). The PyTorch
path stays for KV-cache decoding (a causal mask with Nk > Nq: the cached keys form a starting state the kernel
does not take), masks that are neither padding nor causal (the dense form), and float64.

Training-free use is lossy (elu/relu are not softmax; FAVOR+ is noisy with few features); the error is
measured by the pipeline on the example inputs. Dropout is not applied (these mixers are for inference).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import sympy
import torch
import torch.nn.functional as F

from .. import cost
from ..actions import Action, RewriteError, register_action, register_handler
from ._layout import kernel_dtype
from . import _masks
from . import _linear
from . import _base

FEATURES = ("elu", "relu", "favor")


@register_action
@dataclasses.dataclass(frozen=True)
class Linear(Action):
    """Linear attention with feature map ``feature`` (``"elu"``, ``"relu"`` or ``"favor"``).

    ``features`` is the number of FAVOR+ random features (elu/relu use the head dimension and ignore it);
    ``seed`` fixes the random features.
    """

    feature: str = "elu"
    features: int = 64
    seed: int = 0
    exact = False
    requires = (_base.NoScoreBias(),)

    def __post_init__(self):
        if self.feature not in FEATURES:
            raise RewriteError(f"Linear(feature={self.feature!r}) is not a known feature map; use one of "
                               f"{', '.join(repr(f) for f in FEATURES)}.")
        if isinstance(self.features, bool) or not isinstance(self.features, int) or self.features < 1:
            raise RewriteError(f"Linear(features={self.features!r}) must be a positive integer "
                               "(the number of FAVOR+ random features, e.g. 64).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RewriteError(f"Linear(seed={self.seed!r}) must be an integer.")

    def flops(self, causal: bool = False) -> sympy.Expr:
        """Attention-core FLOPs: feature maps, key state, query readout (+ in-chunk products when causal)."""
        B, H, N, Nk, d, dv = (cost.SYMBOLS[s] for s in ("B", "H", "N", "Nk", "d", "dv"))
        if self.feature == "favor":
            m = self.features
            fmap = (N + Nk) * (2 * d * m + 2 * d + 3 * m)      # projection, |x|², exp and shift
        else:
            m = d
            fmap = (N + Nk) * 3 * d                             # scale, elu/relu, +1
        state = 2 * Nk * m * (dv + 1)                           # Σ φ(k) [v, 1]ᵀ
        readout = 2 * N * m * (dv + 1) + N * dv                 # φ(q) · state, divide
        expr = fmap + state + readout
        if causal:
            c = sympy.Min(_linear.CHUNK, N)
            expr += 2 * N * c * m + 2 * N * c * (dv + 1)        # exact products inside each chunk
        return sympy.expand(B * H * expr)


def kernel_linear(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, feature: str, causal: bool,
                  eps: float, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``Σ_j (φq_i·φk_j) v_j / (Σ_j φq_i·φk_j + eps)`` (over ``j <= i`` when ``causal``, Nq == Nk) on the Triton
    linear-attention kernel, for ``[..., N, m]`` inputs whose leading dims broadcast (heads already matched), or
    None when the kernels are off for these tensors (see ``rewrite.kernels._common.mixer_kernels``). ``dtype``:
    the one the kernel reads its inputs in (``kernel_dtype`` of the model's; None: as given); the output
    comes in it too."""
    from ..kernels._common import mixer_kernels
    if not mixer_kernels(fq) or fq.dtype == torch.float64:
        return None
    if dtype is not None:
        fq, fk, v = fq.to(dtype), fk.to(dtype), v.to(dtype)
    import importlib
    core = importlib.import_module("rewrite.kernels.linear_attention").linear_attention_core
    lead = torch.broadcast_shapes(fq.shape[:-2], fk.shape[:-2], v.shape[:-2])
    nq, nk = fq.shape[-2], fk.shape[-2]
    heads = lead[-1] if lead and lead[-1] > 0 else 1

    def flat(t: torch.Tensor, n: int) -> torch.Tensor:          # [B', H', N, m] for the kernel's (H, B) grid
        return t.expand(*lead, n, t.shape[-1]).reshape(-1, heads, n, t.shape[-1])

    out, _ = core(flat(fq, nq), flat(fk, nk), flat(v, nk), feature, bool(causal), float(eps))
    return out.reshape(*lead, nq, v.shape[-1])


class LinearAttention(_base.FastAndDense, _linear.FavorProjection, _base.WarnOnce):
    """Linear attention with SDPA's call signature (see the module docstring)."""

    def __init__(self, feature: str = "elu", features: int = 64, head_dim: Optional[int] = None, seed: int = 0,
                 chunk: int = _linear.CHUNK):
        super().__init__()
        self.__name__ = f"linear_attention_{feature}"
        self.feature, self.features, self.seed, self.chunk = feature, features, seed, chunk
        proj = _linear.orthogonal_gaussian(features, head_dim, seed) if feature == "favor" and head_dim else torch.empty(0)
        self.register_buffer("projection", proj, persistent=True)
        self.dense_calls = 0

    def feature_maps(self, q: torch.Tensor, k: torch.Tensor, key_bias: Optional[torch.Tensor]):
        """``(φ(q), φ(k) · exp(key bias))`` for already scaled q, k (key bias None: no weighting)."""
        if self.feature == "favor":
            proj = self._proj(q.shape[-1], q.device)
            fq, _ = _linear.favor_query(q, proj)
            fk, _ = _linear.favor_key(k, proj, key_bias)
            return fq, fk
        if self.feature == "elu":
            fq, fk = F.elu(q) + 1.0, F.elu(k) + 1.0
        else:
            fq, fk = F.relu(q), F.relu(k)
        w = _masks.key_weights(key_bias)
        return fq, (fk if w is None else fk * w)

    def _run(self, q, k, v, attn_mask, is_causal, scale, dense: bool):
        dtype = q.dtype
        q, k, v, plan = _linear.scaled_inputs(q, k, v, attn_mask, is_causal, scale)
        v1 = _linear.with_ones(v)
        fast = not dense and (plan.kind in ("none", "keys") or (plan.kind == "causal" and plan.offset >= 0))
        if fast and (plan.kind != "causal" or plan.offset == 0):
            # the kernel; eps 1e-12 matches ``normalise``'s clamp (an empty row gives 0 either way)
            kdt = kernel_dtype(dtype, fp16=self.feature != "favor")
            if plan.key_bias is None and self.feature in ("elu", "relu"):
                out = kernel_linear(q, k, v, self.feature, plan.kind == "causal", 1e-12, kdt)   # φ in-kernel
            else:
                fq, fk = self.feature_maps(q, k, plan.key_bias)
                out = kernel_linear(fq, fk, v, "identity", plan.kind == "causal", 1e-12, kdt)
            if out is not None:
                return out.to(dtype)
        if fast:
            fq, fk = self.feature_maps(q, k, plan.key_bias)
            if plan.kind == "causal":
                num = _linear.linear_causal(fq, fk, v1, plan.offset, self.chunk)
            else:
                num = _linear.linear_bidirectional(fq, fk, v1)
        else:
            if not dense:
                self._dense_note("the attention mask is neither a padding nor a causal mask")
            fq, fk = self.feature_maps(q, k, None)
            weights = _masks.row_weights(plan.dense_bias(q.device, q.dtype)) if plan.kind != "none" else None
            num = _linear.linear_dense(fq, fk, v1, weights)
        return _linear.normalise(num).to(dtype)


@register_handler(Linear)
def linear_handler(action: Linear, call, site):
    return LinearAttention(action.feature, action.features, _base.head_dim(site), action.seed)
