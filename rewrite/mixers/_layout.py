"""Reading SDPA's arguments: the grouped layout the routed and sparse mixers compute in, the repeated layout the
linear-attention family computes in, dtypes, scale, and whether tensors hold data at all.

The grouped layout (``canon``):

* ``q``    ``[Bf, Hkv, G, Nq, D]``   (``G = Hq // Hkv`` query heads share each kv head: GQA without repeats)
* ``k, v`` ``[Bf, Hkv, Nk, D]``
* ``bias`` additive float mask ``[Bm, Hm, Gm, Nqm, Nk]`` with ``Bm ∈ {1, Bf}``, ``Hm ∈ {1, Hkv}``,
  ``Gm ∈ {1, G}``, ``Nqm ∈ {1, Nq}`` (never expanded beyond what the caller gave), or ``None``.

The repeated layout (``prepare``): q, k, v as given, kv heads repeated to the query heads. Inputs in half
precision are computed in float32 and cast back, as SDPA's output has q's dtype; the Triton kernel paths take
them in their own dtype (``kernel_dtype``).
"""
from __future__ import annotations

import dataclasses
import threading
import math
from typing import Any, Optional

import sympy
import torch

from ..actions import RewriteError
from ..cost import SOFTMAX_FLOPS_PER_SCORE, B, H, d, dv

NEG_INF = float("-inf")


def attention_flops(queries, keys) -> sympy.Expr:
    """FLOPs of softmax attention where each of ``queries`` rows (per batch·head) scores ``keys`` keys."""
    return B * H * queries * keys * (2 * d + 2 * dv + SOFTMAX_FLOPS_PER_SCORE)


def has_no_data(t: torch.Tensor) -> bool:
    """True for fake tensors, during shape inference *and* while a compiler traces: their values cannot be
    read (``.tolist()``, ``.item()``), so state that decides a graph's structure must come from elsewhere."""
    from torch._subclasses.fake_tensor import is_fake
    return isinstance(t, torch.Tensor) and bool(is_fake(t))


def is_shape_inference(*tensors: Any) -> bool:
    """True while a graph's shape inference runs the mixer on fake tensors, so an empty output of the right shape
    will do.

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


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Mixers compute in float32 (float64 stays float64) and cast back to the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_dtype(dtype: torch.dtype, fp16: bool = True) -> torch.dtype:
    """The dtype a mixer hands the Triton kernels for inputs of ``dtype``: a half model's own dtype (its
    tensor-core dots read half the bytes; the kernels accumulate in fp32 anyway), else ``work_dtype``.
    ``fp16=False`` for exponential features (FAVOR+): fp16 flushes their small entries to zero, so a key
    whose features are all small would vanish for the queries that see only it; bf16 has fp32's range."""
    if dtype == torch.bfloat16 or (dtype == torch.float16 and fp16):
        return dtype
    return work_dtype(dtype)


@dataclasses.dataclass
class Canon:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float
    out_shape: tuple
    out_dtype: torch.dtype
    mask_floor: float          # additive values at or below this count as "masked" (HF uses finfo.min)

    @property
    def dims(self) -> tuple:
        bf, hkv, g, nq, dd = self.q.shape
        return bf, hkv, g, nq, self.k.shape[-2], dd, self.v.shape[-1]

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """``[Bf, Hkv, G, Nq, Dv]`` back to SDPA's output shape and dtype."""
        return out.reshape(self.out_shape).to(self.out_dtype)

    def kernel_qkv(self) -> tuple:
        """``(q, k, v)`` in ``kernel_dtype``: half inputs go back to their own dtype (exact, ``canon`` only
        widened them)."""
        dt = kernel_dtype(self.out_dtype)
        return tuple(t.to(dt) for t in (self.q, self.k, self.v))


def canon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
          scale: Optional[float]) -> Canon:
    """Bring SDPA arguments (any leading batch dims, GQA, bool or additive mask) to the grouped layout."""
    if min(q.dim(), k.dim(), v.dim()) < 3 or (3 in (q.dim(), k.dim(), v.dim()) and
                                               not q.dim() == k.dim() == v.dim() == 3):
        raise ValueError(f"expected q, k, v as [..., H, N, D] (or all three as [B, N, D]); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    cdt = work_dtype(q.dtype)
    headless = q.dim() == 3
    if headless:  # (b h) n d: one head per batch entry
        q, k, v = q.unsqueeze(-3), k.unsqueeze(-3), v.unsqueeze(-3)
        if attn_mask is not None and attn_mask.dim() >= 3:
            attn_mask = attn_mask.unsqueeze(-3)
    lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    hq, hkv, nq, nk, dd = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1]
    if v.shape[-3] != hkv or v.shape[-2] != nk:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or length")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    g = hq // hkv
    bf = math.prod(lead) if lead else 1
    out_shape = (*lead, nq, v.shape[-1]) if headless else (*lead, hq, nq, v.shape[-1])

    def flat(t, h, n):
        t = t.expand(*lead, h, n, t.shape[-1]) if tuple(t.shape[:-3]) != tuple(lead) else t
        return t.reshape(bf, h, n, t.shape[-1]).to(cdt)

    qf = flat(q, hq, nq).view(bf, hkv, g, nq, dd)
    kf, vf = flat(k, hkv, nk), flat(v, hkv, nk)
    if scale is None:
        scale = 1.0 / math.sqrt(dd)
    bias, floor = None, NEG_INF
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=cdt, device=attn_mask.device).masked_fill_(~attn_mask, NEG_INF)
        else:
            floor = torch.finfo(attn_mask.dtype).min / 2 if attn_mask.dtype.is_floating_point else NEG_INF
            bias = attn_mask.to(cdt)
        nd = len(lead) + 3
        if bias.dim() > nd:
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} has more dims than the attention scores")
        bias = bias.reshape((1,) * (nd - bias.dim()) + tuple(bias.shape))
        mlead, mh, mq, mk = bias.shape[:-3], bias.shape[-3], bias.shape[-2], bias.shape[-1]
        if mk != nk:
            bias = bias.expand(*bias.shape[:-1], nk)
        if all(s == 1 for s in mlead):
            bias = bias.reshape(1, mh, mq, nk)
        else:
            bias = bias.expand(*lead, mh, mq, nk).reshape(bf, mh, mq, nk)
        if mh == 1:
            bias = bias.view(bias.shape[0], 1, 1, mq, nk)
        elif mh == hq:
            bias = bias.reshape(bias.shape[0], hkv, g, mq, nk)
        else:
            raise ValueError(f"attn_mask heads ({mh}) broadcast neither to 1 nor to {hq} query heads")
        if mq not in (1, nq):
            raise ValueError(f"attn_mask query length {mq} is neither 1 nor {nq}")
        if mq > 1 and rows_repeat(bias):
            bias = bias[..., :1, :]
    return Canon(qf, kf, vf, bias, float(scale), out_shape, q.dtype, floor)


def rows_repeat(bias: torch.Tensor) -> bool:
    """Whether every query row of a real mask ``[..., Nq, Nk]`` equals the first: a key-padding mask that a model
    expanded to [B, 1, N, N] (as Hugging Face encoders do), which the mixers then serve as the key mask it is
    (one row instead of N; key-mask fast paths and kernels). One comparison pass; never while tracing."""
    if torch.compiler.is_compiling() or has_no_data(bias):
        return False
    if bias.stride(-2) == 0:
        return True
    return bool((bias == bias[..., :1, :]).all())


def fake_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An output of SDPA's shape and dtype, for shape inference on fake tensors."""
    return q.new_empty(tuple(q.shape[:-1]) + (v.shape[-1],))


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


# ------------------------------------------------------------------------------------------- scratch buffers
#: per-thread reusable buffers for the large gathers of the routed mixers (``index_rows``, ``cat_rows``). A fresh
#: tensor of tens of MiB is new memory from the OS on every call (glibc maps allocations that large): the page
#: faults that zero it cost as much as the attention they feed on a CPU. Buffers are reused only where nothing
#: can keep a reference to them past the call: no autograd graph, no compiler tracing, real CPU tensors.
_SCRATCH = threading.local()

#: a scratch buffer grows to at most this many elements (1 GiB in fp32); a larger gather allocates as usual
SCRATCH_MAX_ELEMENTS = 1 << 28


def _scratch(slot: str, shape: tuple, like: torch.Tensor, needs_grad: bool) -> Optional[torch.Tensor]:
    """A reused per-thread tensor of ``shape`` in ``like``'s dtype (its contents are garbage), or None where
    the caller must allocate (see ``_SCRATCH``)."""
    numel = math.prod(shape)
    if (torch.compiler.is_compiling() or like.device.type != "cpu" or needs_grad or numel > SCRATCH_MAX_ELEMENTS
            or has_no_data(like) or numel < (1 << 16)):
        return None
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get((slot, like.dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):   # usable later outside inference mode too
            buf = pool[(slot, like.dtype)] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(shape)


def _grad_needed(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def index_rows(src: torch.Tensor, index: torch.Tensor, slot: str) -> torch.Tensor:
    """``src.index_select(0, index)``, written into the per-thread scratch buffer ``slot`` where it can be
    (see ``_SCRATCH``): the result is valid until the next call that uses ``slot``."""
    buf = _scratch(slot, (index.shape[0], *src.shape[1:]), src, _grad_needed(src))
    if buf is None:
        return src.index_select(0, index)
    return torch.index_select(src, 0, index, out=buf)


def cat_rows(parts: list, dim: int, slot: str) -> torch.Tensor:
    """``torch.cat(parts, dim)`` into the scratch buffer ``slot`` where it can be (see ``index_rows``)."""
    if len(parts) == 1:
        return parts[0]
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    buf = _scratch(slot, tuple(shape), parts[0], _grad_needed(*parts))
    return torch.cat(parts, dim) if buf is None else torch.cat(parts, dim, out=buf)


def padded_rows(t: torch.Tensor, start: int, rows: int, slot: str) -> torch.Tensor:
    """``t[..., start:, :]`` zero-padded at the end to ``rows`` rows, written into the scratch buffer ``slot``
    where it can be (see ``index_rows``; ``F.pad`` would fill the whole fresh output, then copy into it)."""
    body = t[..., start:, :]
    buf = _scratch(slot, (*t.shape[:-2], rows, t.shape[-1]), t, _grad_needed(t))
    if buf is None:
        return torch.nn.functional.pad(body, (0, 0, 0, rows - body.shape[-2]))
    buf[..., :body.shape[-2], :].copy_(body)
    buf[..., body.shape[-2]:, :].zero_()
    return buf


def scratch_or_empty(slot: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` for a temporary that dies within the call: the scratch buffer ``slot`` where it can
    be (see ``_SCRATCH``), else a fresh one. Its contents are garbage."""
    buf = _scratch(slot, tuple(shape), like, _grad_needed(like))
    return like.new_empty(shape) if buf is None else buf
