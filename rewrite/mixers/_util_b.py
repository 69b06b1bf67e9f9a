"""Shared plumbing for the approximate mixers Linear, Scatterbrain, SharedQuery, Pool, Spectral and Flow.

Every mixer module takes SDPA's call signature. This file holds what they have in common:

* reading SDPA's arguments (scale, GQA head expansion, working dtype, fake tensors during shape inference);
* **mask planning** (:func:`plan_mask`): an ``attn_mask`` is inspected at run time and classified as

  - ``"none"``    nothing masked;
  - ``"keys"``    one additive bias per *key*, the same for every query (padding masks; HF builds them
                  either as ``[B, 1, 1, Nk]`` or expanded to ``[B, 1, Nq, Nk]``);
  - ``"causal"``  query ``i`` sees keys ``j <= i + offset`` (``offset = Nk - Nq`` for masks, bottom-right
                  aligned as in KV-cache decoding; ``0`` for SDPA's ``is_causal`` flag, which SDPA aligns
                  top-left), plus an optional per-key bias (padding);
  - ``"general"`` anything else: the full ``[.., Nq, Nk]`` additive bias is kept and each mixer uses its
                  dense (quadratic) form, which honours it but costs O(Nq·Nk). This is counted on the
                  module (``dense_calls``) and warned once, never hidden.

  The classification is exact (tensor equality), so a padded causal LM batch, whose mask the causal
  prover cannot see through because Hugging Face builds it outside the model, still gets the causal
  form and never leaks future tokens.
* causal and bidirectional linear-attention kernels (prefix sums in chunks) and FAVOR+ features.
* handler-side checks that produce :class:`~rewrite.actions.Decline` with a reason in words.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..actions import Decline, RewriteError

#: additive mask values at or below this count as "masked" when a mask's structure is read
#: (Hugging Face uses ``finfo.min``, older code ``-10000``; exp(-1e4) is 0 in every float type)
MASKED = -1e4

#: chunk length of the causal prefix-sum kernels
CHUNK = 64


# ----------------------------------------------------------------------------------------------- inputs

def is_fake(*tensors: Any) -> bool:
    """True while a graph's shape inference runs the mixer on fake tensors (no data to look at).

    Only plain fake-tensor shape inference counts: while a compiler *traces* the mixer (a proxy or
    functionalization mode is active, e.g. Inductor's AOT tracing), the real computation must be traced, so
    this is False there (data-dependent mask checks then fail loudly instead of tracing a placeholder)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake
    if not any(isinstance(t, torch.Tensor) and _is_fake(t) for t in tensors):
        return False
    try:
        from torch._C import _get_dispatch_mode, _TorchDispatchModeKey
        for key in ("PROXY", "FUNCTIONAL"):
            mode_key = getattr(_TorchDispatchModeKey, key, None)
            if mode_key is not None and _get_dispatch_mode(mode_key) is not None:
                return False
    except Exception:  # noqa: BLE001 - an older torch without the query: be conservative, trace for real
        return False
    return True


def fake_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An output of SDPA's shape and dtype, for shape inference on fake tensors."""
    return q.new_empty(tuple(q.shape[:-1]) + (v.shape[-1],))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Mixers compute in float32 (float64 stays float64) and cast back to the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        return float(scale.item())
    return float(scale)


def expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat key/value heads for grouped-query attention: query head ``h`` uses kv head ``h // (Hq // Hkv)``."""
    if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        hq, hkv = q.shape[-3], k.shape[-3]
        if hkv == 0 or hq % hkv:
            raise RewriteError(f"query heads ({hq}) are not a multiple of key/value heads ({hkv}); "
                               "grouped-query attention needs Hq % Hkv == 0.")
        rep = hq // hkv
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    return k, v


def prepare(q, k, v, scale):
    """Upcast q, k, v to the working dtype, expand GQA heads, and read the scale."""
    wd = work_dtype(q.dtype)
    k, v = expand_kv(q, k, v)
    return q.to(wd), k.to(wd), v.to(wd), resolve_scale(scale, q.shape[-1])


class WarnOnce:
    """Mixin state: count dense-path calls and warn about them once per module."""

    def _dense_note(self, what: str) -> None:
        self.dense_calls = getattr(self, "dense_calls", 0) + 1
        if not getattr(self, "_warned_dense", False):
            self._warned_dense = True
            warnings.warn(f"{type(self).__name__}: {what}; used the dense O(Nq*Nk) form for this call "
                          "(counted in .dense_calls)", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------ masks

@dataclasses.dataclass
class MaskPlan:
    """What an ``attn_mask`` (+ ``is_causal``) amounts to; see the module docstring."""
    kind: str                                   # none | keys | causal | general
    nq: int
    nk: int
    key_bias: Optional[torch.Tensor] = None     # [..., 1, Nk] additive, for keys/causal (None: no bias)
    offset: int = 0                             # causal: query i sees keys j <= i + offset
    bias: Optional[torch.Tensor] = None         # general: [..., Nq, Nk] additive (-inf or <= MASKED: masked)

    def key_valid(self) -> Optional[torch.Tensor]:
        """Boolean ``[..., 1, Nk]``: keys not masked out by the key bias (None: all keys valid)."""
        if self.key_bias is None:
            return None
        return self.key_bias > MASKED

    def dense_bias(self, device, dtype) -> torch.Tensor:
        """The additive ``[..., Nq, Nk]`` bias this plan stands for (for dense forms and references)."""
        if self.kind == "general":
            return self.bias
        b = torch.zeros(self.nq, self.nk, device=device, dtype=dtype)
        if self.kind == "causal":
            b = b.masked_fill(~causal_allowed(self.nq, self.nk, self.offset, device), float("-inf"))
        if self.key_bias is not None:
            b = b + self.key_bias
        return b

    def allowed(self, device) -> torch.Tensor:
        """Boolean ``[..., Nq, Nk]``: which key each query may see."""
        return self.dense_bias(device, torch.float32) > MASKED


def causal_allowed(nq: int, nk: int, offset: int, device=None) -> torch.Tensor:
    """``[Nq, Nk]`` boolean: ``j <= i + offset``."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + offset


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def plan_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, nq: int, nk: int,
              dtype: torch.dtype = torch.float32) -> MaskPlan:
    """Classify ``attn_mask`` / ``is_causal`` exactly (see the module docstring)."""
    if attn_mask is None:
        return MaskPlan("causal" if is_causal else "none", nq, nk)
    b = to_additive(attn_mask, dtype)
    while b.dim() < 2:
        b = b.unsqueeze(0)
    if is_causal:  # SDPA refuses both; honour both anyway
        b = b.masked_fill(~causal_allowed(nq, nk, 0, b.device), float("-inf"))
    if b.shape[-2] == 1:
        return MaskPlan("keys", nq, nk, key_bias=b)
    row = b[..., -1:, :]
    if torch.equal(b, row.expand_as(b)):
        return MaskPlan("keys", nq, nk, key_bias=row)
    offset = nk - nq
    if offset >= 0:
        allowed = causal_allowed(nq, nk, offset, b.device)
        upper = b.masked_select(~allowed.expand_as(b))
        if bool((upper <= MASKED).all()) and torch.equal(b.masked_fill(~allowed, 0.0),
                                                        row.expand_as(b).masked_fill(~allowed, 0.0)):
            return MaskPlan("causal", nq, nk, key_bias=row, offset=offset)
    return MaskPlan("general", nq, nk, bias=b)


def shift_exp(x: torch.Tensor, dims) -> torch.Tensor:
    """``exp(x - max(x))`` over ``dims`` with an all ``-inf`` slice giving zeros (never NaN)."""
    m = x.amax(dim=dims, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(x - m)


def key_weights(key_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[..., Nk, 1]`` multiplicative key weights ``exp(b_j - max b)`` from a ``[..., 1, Nk]`` key bias."""
    if key_bias is None:
        return None
    return shift_exp(key_bias, -1).transpose(-1, -2)


def row_weights(bias: torch.Tensor) -> torch.Tensor:
    """``exp(B_ij - max_j B_ij)`` for a dense ``[..., Nq, Nk]`` bias (rows all masked give zeros)."""
    return shift_exp(bias, -1)


# ------------------------------------------------------------------------------------ linear attention

def linear_bidirectional(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``fq (fkᵀ v1)``: every query over every key, O(N·m·dv)."""
    return fq @ (fk.transpose(-1, -2) @ v1)


def linear_causal(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor, offset: int = 0,
                  chunk: int = CHUNK) -> torch.Tensor:
    """``out_i = fq_i · Σ_{j <= i + offset} fk_j v1_jᵀ`` in chunks: O(N·(C·m + C·dv + m·dv)).

    Keys before ``offset`` (a KV cache) form the starting state; the remaining ``Nq`` keys are aligned
    with the queries and processed chunk by chunk (exact inside a chunk, a prefix state across chunks).
    """
    nq, nk = fq.shape[-2], fk.shape[-2]
    if offset < 0 or nk - offset != nq:
        raise RewriteError(f"linear_causal needs 0 <= offset == Nk - Nq (got offset {offset}, Nq {nq}, Nk {nk})")
    lead = torch.broadcast_shapes(fq.shape[:-2], fk.shape[:-2], v1.shape[:-2])
    m, dv = fq.shape[-1], v1.shape[-1]
    fq, fk, v1 = fq.expand(*lead, nq, m), fk.expand(*lead, nk, m), v1.expand(*lead, nk, dv)
    state0 = None
    if offset > 0:
        state0 = fk[..., :offset, :].transpose(-1, -2) @ v1[..., :offset, :]
        fk, v1 = fk[..., offset:, :], v1[..., offset:, :]
    n = nq
    if n == 0:
        return fq.new_zeros(*lead, 0, dv)
    c = max(1, min(chunk, n))
    nc = -(-n // c)
    pad = nc * c - n
    if pad:
        fq = F.pad(fq, (0, 0, 0, pad))
        fk = F.pad(fk, (0, 0, 0, pad))
        v1 = F.pad(v1, (0, 0, 0, pad))
    fq = fq.reshape(*lead, nc, c, m)
    fk = fk.reshape(*lead, nc, c, m)
    v1 = v1.reshape(*lead, nc, c, dv)
    tri = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    scores = (fq @ fk.transpose(-1, -2)).masked_fill(~tri, 0.0)
    intra = scores @ v1
    states = fk.transpose(-1, -2) @ v1                      # [..., nc, m, dv]
    before = states.cumsum(dim=-3) - states                 # exclusive prefix over chunks
    if state0 is not None:
        before = before + state0.unsqueeze(-3)
    out = intra + fq @ before
    out = out.reshape(*lead, nc * c, dv)
    return out[..., :n, :]


def linear_dense(fq: torch.Tensor, fk: torch.Tensor, v1: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Quadratic reference: ``((fq fkᵀ) ⊙ W) v1`` with an explicit ``[..., Nq, Nk]`` weight matrix."""
    a = fq @ fk.transpose(-1, -2)
    if weights is not None:
        a = a * weights
    return a @ v1


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """``[v, 1]``: one matrix product then gives numerator and normaliser together."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def normalise(num1: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Split ``[num, den]`` (from :func:`with_ones`) and divide; an empty row gives zeros."""
    return num1[..., :-1] / num1[..., -1:].clamp_min(eps)


# ----------------------------------------------------------------------------------------------- FAVOR+

def orthogonal_gaussian(rows: int, dim: int, seed: int) -> torch.Tensor:
    """``[rows, dim]`` block-orthogonal Gaussian directions with chi-distributed norms (Performer's ORF)."""
    g = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(-(-rows // dim)):
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        qmat, r = torch.linalg.qr(a)
        qmat = qmat * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(qmat.T)
    w = torch.cat(blocks, dim=0)[:rows]
    norms = torch.randn(rows, dim, generator=g, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (w * norms).to(torch.float32)


def favor_log(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Log of FAVOR+ positive features: ``φ(x)_r = exp(ω_r·x - |x|²/2) / √m``, so E[φ(q)·φ(k)] = exp(q·k)."""
    m = proj.shape[0]
    return x @ proj.to(x.dtype).T - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(m)


def favor_query(q: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query features shifted by their own row maximum: ``(features, shift)``; the shift cancels per row."""
    lq = favor_log(q, proj)
    c = lq.amax(-1, keepdim=True)
    return torch.exp(lq - c), c


def favor_key(k: torch.Tensor, proj: torch.Tensor, key_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key features times ``exp(key bias)``, shifted by one maximum over all keys: ``(features, shift)``."""
    lk = favor_log(k, proj)
    if key_bias is not None:
        lk = lk + key_bias.transpose(-1, -2)
    c = lk.amax(dim=(-2, -1), keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    return torch.exp(lk - c), c


# ---------------------------------------------------------------------------------------------- handlers

#: the largest mask computation (graph nodes) a handler evaluates on the example batch
EXAMPLE_CONE_LIMIT = 400


def example_value(node: Any) -> Any:
    """The value a graph node had on the captured example batch, or None where that cannot be known.

    Only the node's cone of inputs is evaluated, from the inputs Dynamo recorded for the graph's placeholders
    (``meta["grapharg"]``); a cone that is large, calls a submodule or has side effects is not evaluated.
    Handlers use it to see a mask that is built at run time (e.g. a decoder's causal mask combined with
    padding in one data-dependent tensor, which the causal prover cannot see through)."""
    from torch import fx
    if not isinstance(node, fx.Node):
        return node
    from ..graph import is_mutating
    cone, work = set(), [node]
    while work:
        n = work.pop()
        if n in cone:
            continue
        cone.add(n)
        if len(cone) > EXAMPLE_CONE_LIMIT or n.op == "call_module" or _mutates(n, is_mutating):
            return None
        work.extend(n.all_input_nodes)
    gm = node.graph.owning_module
    if gm is None:
        return None
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad():
            for n in node.graph.nodes:
                if n not in cone:
                    continue
                if n.op == "placeholder":
                    value = _placeholder_example(n)
                    if value is None:
                        return None
                    interp.env[n] = value
                else:
                    interp.env[n] = interp.run_node(n)
                if n is node:
                    break
    except Exception:  # noqa: BLE001 - a mask that cannot be evaluated here is simply not known
        return None
    return interp.env.get(node)


def _mutates(n: Any, is_mutating) -> bool:
    import operator
    if n.op == "placeholder":
        return False
    if n.op == "call_function" and getattr(operator, getattr(n.target, "__name__", ""), None) is n.target:
        # the operator module: only its in-place forms (iand, setitem, ...) mutate; and_/or_ do not
        name = n.target.__name__
        return name in ("setitem", "delitem") or (name.startswith("i") and (hasattr(operator, name[1:]) or hasattr(operator, name[1:] + "_")))
    return is_mutating(n)


def _placeholder_example(n: Any) -> Any:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
    arg = n.meta.get("grapharg")
    try:
        value = arg.example if arg is not None else None
    except Exception:  # noqa: BLE001 - a freed example
        return None
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        value = value.node.hint
    if isinstance(value, torch.Tensor) and _is_fake(value):
        return None
    if value is not None and getattr(arg, "pass_arg_as_tensor", False) and not isinstance(value, torch.Tensor):
        value = torch.tensor(value)
    return value


def example_mask_plan(call) -> MaskPlan | None:
    """:func:`plan_mask` of the site's ``attn_mask`` (and ``is_causal``) on the example batch; None if unknown."""
    from ..graph import hint_int
    mask = getattr(call, "attn_mask", None)
    nq, nk = hint_int(static_len(call.q, -2)), hint_int(static_len(call.k, -2))
    if nq is None or nk is None:
        return None
    if mask is None:
        return plan_mask(None, bool(getattr(call, "is_causal", False)), nq, nk)
    value = example_value(mask)
    if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[-1] not in (1, nk):
        return None
    try:
        return plan_mask(value.detach(), bool(getattr(call, "is_causal", False)), nq, nk)
    except Exception:  # noqa: BLE001 - a mask of a shape this classification does not cover: unknown
        return None


def hides_future(plan: MaskPlan | None) -> bool:
    """Whether the plan masks every key after each query's own position (a causal mask, maybe with more)."""
    if plan is None:
        return False
    if plan.kind == "causal":
        return True
    if plan.kind != "general":
        return False
    future = ~causal_allowed(plan.nq, plan.nk, plan.nk - plan.nq, plan.bias.device)
    return bool(future.any()) and bool((plan.bias.masked_select(future.expand_as(plan.bias)) <= MASKED).all())


def visibility_varies(plan: MaskPlan | None) -> bool:
    """Whether some key is masked for some queries but visible to others (a causal, windowed or other
    per-query mask, rather than one that only hides keys such as padding)."""
    if plan is None or plan.kind in ("none", "keys"):
        return False
    if plan.kind == "causal":
        return plan.nq > 1
    visible = plan.bias > MASKED
    return not torch.equal(visible, visible[..., :1, :].expand_as(visible))


def exact_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Exact SDPA, for a call a mixer cannot serve faithfully (``attn_mask`` and ``is_causal`` both honoured)."""
    if attn_mask is not None and is_causal:
        nq, nk = q.shape[-2], k.shape[-2]
        attn_mask = to_additive(attn_mask, q.dtype).masked_fill(~causal_allowed(nq, nk, 0, q.device), float("-inf"))
        is_causal = False
    if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k, v = expand_kv(q, k, v)
    scale = None if scale is None else resolve_scale(scale, q.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=float(dropout_p or 0.0),
                                          is_causal=bool(is_causal), scale=scale)


class ExactFallback:
    """Mixin state: count calls served by exact attention instead (a mask the mixer cannot honour), warn once."""

    def _exact_note(self, why: str) -> None:
        self.exact_calls = getattr(self, "exact_calls", 0) + 1
        if not getattr(self, "_warned_exact", False):
            self._warned_exact = True
            warnings.warn(f"{type(self).__name__}: {why}; this call ran exact attention instead (counted in "
                          ".exact_calls)", RuntimeWarning, stacklevel=3)


def static_len(node: Any, dim: int) -> Any:
    from ..graph import shape
    s = shape(node)
    if s is None or len(s) < abs(dim):
        return None
    return s[dim]


def head_dim(call, site) -> Optional[int]:
    hd = getattr(site, "head_dim", None) or static_len(call.q, -1)
    try:
        return int(hd) if hd is not None else None
    except Exception:
        return None


def lengths_differ(call, site) -> bool:
    """Whether queries and keys may differ in length at this site (cross-attention or KV-cache decoding)."""
    nq, nk = static_len(call.q, -2), static_len(call.k, -2)
    if nq is not None and nk is not None:
        try:
            return str(nq) != str(nk) and int(nq) != int(nk)
        except Exception:
            return str(nq) != str(nk)
    return bool(getattr(site, "cross", False))


def site_causal(call, site) -> bool:
    return bool(getattr(site, "is_causal", False) or getattr(call, "is_causal", False))


def mask_kinds(site) -> set:
    return set(str(getattr(site, "mask", "none") or "none").split("+"))


def decline_bias(name: str, site) -> Optional[Decline]:
    """Score biases (learned relative position, ALiBi) cannot be honoured by a mixer that never forms scores."""
    bad = mask_kinds(site) & {"bias", "alibi"}
    if bad:
        return Decline(f"{name} cannot honour the site's {'/'.join(sorted(bad))} score bias (only padding masks "
                       "and causal masks); keep this site Exact or use a mixer that keeps softmax scores")
    return None


def grid_of(site) -> tuple[Optional[tuple], int]:
    grid = getattr(site, "grid", None)
    prefix = getattr(site, "prefix_tokens", None) or 0
    if grid is None:
        return None, int(prefix)
    try:
        gh, gw = (int(g) for g in grid)
    except Exception:
        return None, int(prefix)
    return (gh, gw), int(prefix)


def check_grid(name: str, call, site, dims: Optional[int]) -> tuple[Optional[Decline], Optional[tuple], int]:
    """Pick 1-D or 2-D token layout: ``(decline, grid, prefix_tokens)``; grid None means 1-D."""
    grid, prefix = grid_of(site)
    if dims == 1:
        return None, None, 0
    if grid is None:
        if dims == 2:
            return (Decline(f"{name}(dims=2) needs the site's image grid, which is not known here; "
                            "use dims=1 or a site with a known grid"), None, 0)
        return None, None, 0
    n = static_len(call.q, -2)
    try:
        if n is not None and int(n) != prefix + grid[0] * grid[1]:
            return (Decline(f"{name}: the site's grid {grid} with {prefix} prefix token(s) does not match its "
                            f"{n} tokens"), None, 0)
    except Exception:
        pass
    return None, grid, prefix


class FavorProjection:
    """Mixin for mixers with a FAVOR+ projection buffer ``projection [features, D]`` (from ``self.features``
    and ``self.seed``): drawn lazily for the inputs' head dim, and following the inputs' device."""

    def _proj(self, d: int, device) -> torch.Tensor:
        if self.projection.numel() == 0 or self.projection.shape[1] != d:
            self.projection = orthogonal_gaussian(self.features, d, self.seed).to(device)
        elif self.projection.device != device:      # the mixer need not move with the model: follow the inputs
            self.projection = self.projection.to(device)
        return self.projection


class FastAndDense(torch.nn.Module):
    """A mixer whose ``_run(..., dense)`` computes either its fast form or its quadratic reference.

    ``forward`` is the fast form (SDPA's signature); ``dense`` the reference with an explicit ``[Nq, Nk]``
    weight matrix, which the tests compare it with and which serves masks the fast form cannot.
    """

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if is_fake(q, k, v, attn_mask):
            return fake_output(q, v)
        return self._run(q, k, v, attn_mask, is_causal, scale, dense=False)

    def dense(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return self._run(q, k, v, attn_mask, is_causal, scale, dense=True)
