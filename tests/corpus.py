"""A catalogue of hand-written attention spellings (and near-misses) for testing ``rewrite``.

Every entry is a :class:`Case`. ``case.build(dtype)`` returns ``(module, args)``: a module in eval mode
whose weights are seeded from the case id, and positional example inputs of that dtype (masks stay
bool/long where the spelling wants them). The attention under test always lives in a named submodule,
``case.site`` (``"attn"`` unless stated), so the report row to check is known.

``expect`` says what ``rewrite.optimize(module, "exact", ...)`` must do:

* ``"rewrite"``   the row for ``case.site`` (and every name in ``extra_sites``) has status "rewritten";
* ``"kept"``      the row for ``case.site`` has status "kept" (an existing fused SDPA call);
* ``"reject"``    an attention-like region of ``case.site`` is reported rejected with a non-empty reason
                  (matching ``case.reason`` as a case-insensitive regex when given), nothing rewritten there;
* ``"untouched"`` no row is "rewritten" (a rejected region may be reported, it does not have to be);
* ``"any"``       no status requirement: only the outputs are checked.

In every case the outputs must equal the eager outputs. ``causal=True`` means ``find_attention`` must
prove the mask causal (``is_causal`` True); for a ``"rewrite"`` case with ``causal=False`` it must not
claim causality. ``resize(dtype)`` gives a second input set with another sequence length (None where the
module is tied to one length). ``state`` lists dotted attribute paths (from the top module) holding
tensors the forward stores as a side effect; they must match the eager ones after a call.

Shapes are kept small (B<=2, N<=24, C<=128) so that each Dynamo compile stays cheap.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPECTS = ("rewrite", "kept", "reject", "untouched", "any")

# Regex a rejection reason must match when the rejection is about intermediates escaping the region.
USED_ELSEWHERE = r"used|use[sd]? |escap|elsewhere|other|user|consum|outside|output|stor|return|live"

B, N, C, H = 2, 12, 64, 4
D = C // H


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[torch.dtype], tuple]
    expect: str
    causal: bool = False
    note: str = ""
    site: str = "attn"
    extra_sites: tuple = ()
    resize: Optional[Callable[[torch.dtype], tuple]] = None
    bf16: bool = False
    state: tuple = ()
    reason: str = ""

    def __post_init__(self):
        assert self.expect in EXPECTS, self.expect

    def __repr__(self) -> str:  # short ids in pytest output
        return f"Case({self.id})"

    @property
    def sites(self) -> tuple:
        return (self.site,) + tuple(self.extra_sites)


# ----------------------------------------------------------------------------------------------------
# Deterministic inputs
# ----------------------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed)).to(dtype)


def padding_keep(b: int, n: int) -> torch.Tensor:
    """bool [b, n]: sample i keeps its first n - 3*i positions (never fewer than 1)."""
    lengths = torch.tensor([max(1, n - 3 * i) for i in range(b)])
    return torch.arange(n)[None, :] < lengths[:, None]


def additive_from_keep(keep: torch.Tensor, dtype) -> torch.Tensor:
    """float [b, 1, 1, n] padding mask: 0 where kept, finfo.min where padded."""
    m = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    return m[:, None, None, :]


def random_square_keep(b: int, n: int, seed: int) -> torch.Tensor:
    """bool [b, 1, n, n]: random pattern, the diagonal always kept (no fully masked row)."""
    keep = torch.rand((b, 1, n, n), generator=_gen(seed)) > 0.4
    return keep | torch.eye(n, dtype=torch.bool)


def x_inputs(c: int = C, b: int = B):
    def make(dtype, n):
        return (randn((b, n, c), 1000 + n, dtype),)
    return make


def x_mask_inputs(kind: str, c: int = C, b: int = B):
    """x plus a padding mask: kind 'additive' (float [b,1,1,n]), 'bool4d' ([b,1,1,n]), 'long2d' ([b,n])."""
    def make(dtype, n):
        x = randn((b, n, c), 1000 + n, dtype)
        keep = padding_keep(b, n)
        if kind == "additive":
            return x, additive_from_keep(keep, dtype)
        if kind == "bool4d":
            return x, keep[:, None, None, :]
        if kind == "long2d":
            return x, keep.long()
        raise ValueError(kind)
    return make


def x_memory_inputs(c: int = C, b: int = B, with_mask: bool = False):
    """x [b, n, c] plus a memory [b, m, c] of another length m = n // 2 + 1 (cross-attention)."""
    def make(dtype, n):
        m = n // 2 + 1
        out = (randn((b, n, c), 2000 + n, dtype), randn((b, m, c), 3000 + m, dtype))
        if with_mask:
            out = out + (padding_keep(b, m),)
        return out
    return make


def qkv_inputs(h: int = H, d: int = D, b: int = B, layout: str = "bhnd", kv_heads: Optional[int] = None,
               mask: Optional[str] = None, flat: bool = False):
    """q, k, v (and optionally a mask) in layout 'bhnd' or 'bnhd'; flat=True gives 3-D '(b h) n d'."""
    kvh = kv_heads or h

    def make(dtype, n):
        def t(heads, seed):
            shape = (b, heads, n, d) if layout == "bhnd" else (b, n, heads, d)
            x = randn(shape, seed + n, dtype)
            return x.reshape(b * heads, n, d) if flat else x
        out = (t(h, 100), t(kvh, 200), t(kvh, 300))
        keep = padding_keep(b, n)
        if mask is None:
            return out
        if mask == "additive":
            m = additive_from_keep(keep, dtype)
            if flat:  # (b h) 1 n, the layout baddbmm wants
                m = m.expand(b, h, 1, n).reshape(b * h, 1, n)
            return out + (m,)
        if mask == "bool4d":
            return out + (keep[:, None, None, :],)
        if mask == "square":
            return out + (random_square_keep(b, n, 4000 + n),)
        raise ValueError(mask)
    return make


def qkv_mask2d_inputs(dtype, n, b=B):
    q, k, v = qkv_inputs()(dtype, n)
    keep = random_square_keep(1, n, 6000 + n)[0, 0]
    return q, k, v, torch.zeros(n, n, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def qkv_bias_inputs(dtype, n, b=B):
    q, k, v = qkv_inputs()(dtype, n)
    return q, k, v, randn((1, H, n, n), 7000 + n, dtype)


# ----------------------------------------------------------------------------------------------------
# Wrappers: the attention is always the child called ``attn``
# ----------------------------------------------------------------------------------------------------

class XBlock(nn.Module):
    """Pre-norm residual block around an attention module taking x [B, N, C] (plus extra inputs)."""

    def __init__(self, attn: nn.Module, dim: int = C):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attn

    def forward(self, x, *extra):
        out = self.attn(self.norm(x), *extra)
        if isinstance(out, tuple):
            return (x + out[0],) + tuple(out[1:])
        return x + out


class Wrap(nn.Module):
    """Plain wrapper for attention modules that take q, k, v (and a mask) directly."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, *args):
        return self.attn(*args)


class Proj(nn.Module):
    """Shared q/k/v/o projections; subclasses write the attention core by hand."""

    def __init__(self, dim: int = C, heads: int = H, head_dim: Optional[int] = None,
                 kv_heads: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or dim // heads
        self.kv_heads = kv_heads or heads
        self.n_rep = self.heads // self.kv_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, heads * self.head_dim)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, dim)

    def split(self, t, n_heads):
        b, n, _ = t.shape
        return t.view(b, n, n_heads, self.head_dim).transpose(1, 2)

    def qkv(self, x, mem=None):
        src = x if mem is None else mem
        return (self.split(self.q_proj(x), self.heads), self.split(self.k_proj(src), self.kv_heads),
                self.split(self.v_proj(src), self.kv_heads))

    def merge(self, o):
        b, h, n, d = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, n, h * d))


# ----------------------------------------------------------------------------------------------------
# Positive spellings: products
# ----------------------------------------------------------------------------------------------------

class MatmulBasic(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        p = F.softmax(s, dim=-1)
        return self.merge(torch.matmul(p, v))


class AtOperatorDiv(nn.Module):
    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        return s.softmax(-1) @ v


class MatmulMethodSoftmaxDim3(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, q, k, v):
        s = q.matmul(k.transpose(2, 3)) * self.scale
        p = torch.softmax(s, 3)
        return p.matmul(v)


class FSoftmaxDim3(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        return torch.matmul(F.softmax(s, dim=3), v)


class Bmm3D(Proj):
    def forward(self, x):
        b, n, _ = x.shape
        h, d = self.heads, self.head_dim

        def flat(t):
            return t.view(b, n, h, d).permute(0, 2, 1, 3).reshape(b * h, n, d)
        q, k, v = flat(self.q_proj(x)), flat(self.k_proj(x)), flat(self.v_proj(x))
        s = torch.bmm(q, k.transpose(1, 2)) * self.scaling
        p = s.softmax(dim=-1)
        o = torch.bmm(p, v).view(b, h, n, d)
        return self.merge(o)


class BmmView4DMaskOPT(Proj):
    """OPT/old-Bart style: bmm on '(b h)', viewed to 4-D to add the mask, viewed back, softmax, bmm."""

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        h, d = self.heads, self.head_dim
        q = (self.q_proj(x) * self.scaling).view(b, n, h, d).transpose(1, 2).reshape(b * h, n, d)
        k = self.k_proj(x).view(b, n, h, d).transpose(1, 2).reshape(b * h, n, d)
        v = self.v_proj(x).view(b, n, h, d).transpose(1, 2).reshape(b * h, n, d)
        w = torch.bmm(q, k.transpose(1, 2))
        w = w.view(b, h, n, n) + attention_mask
        w = w.view(b * h, n, n)
        w = nn.functional.softmax(w, dim=-1)
        o = torch.bmm(w, v).view(b, h, n, d)
        return self.merge(o)


class BaddbmmAlpha(Proj):
    def forward(self, x):
        b, n, _ = x.shape
        h, d = self.heads, self.head_dim
        q, k, v = self.qkv(x)
        q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
        zeros = torch.zeros(b * h, n, n, dtype=q.dtype, device=q.device)
        s = torch.baddbmm(zeros, q, k.transpose(1, 2), beta=0.0, alpha=self.scaling)
        p = F.softmax(s, dim=-1)
        return self.merge(torch.bmm(p, v).view(b, h, n, d))


class BaddbmmBiasInput(nn.Module):
    """3-D q, k, v '(b h) n d' plus an additive padding bias '(b h) 1 n' folded in by baddbmm(beta=1)."""

    def forward(self, q, k, v, bias):
        s = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=1.0, alpha=q.size(-1) ** -0.5)
        return torch.bmm(torch.softmax(s, dim=-1), v)


class BaddbmmAlibiBloom(nn.Module):
    """Bloom-style: fused qkv, ALiBi over key positions '(b h) 1 n' added through baddbmm."""

    def __init__(self, dim=C, heads=H):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.dense = nn.Linear(dim, dim)
        self.register_buffer("slopes", torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)]))
        self.inv_norm = 1.0 / math.sqrt(self.head_dim)

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.heads, self.head_dim
        fused = self.qkv(x).view(b, n, h, 3, d)
        q, k, v = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
        q = q.transpose(1, 2).reshape(b * h, n, d)
        k = k.permute(0, 2, 3, 1).reshape(b * h, d, n)
        v = v.transpose(1, 2).reshape(b * h, n, d)
        pos = torch.arange(n, device=x.device, dtype=x.dtype)
        alibi = (self.slopes.view(1, h, 1) * pos.view(1, 1, n)).expand(b, h, n).reshape(b * h, 1, n)
        s = alibi.baddbmm(batch1=q, batch2=k, beta=1.0, alpha=self.inv_norm)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.bmm(p, v).view(b, h, n, d).permute(0, 2, 1, 3).reshape(b, n, c)
        return self.dense(o)


class EinsumBHQD(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * (q.shape[-1] ** -0.5)
        p = s.softmax(dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)


class EinsumBQHD(Proj):
    """b n h d layout throughout, einsum for both products."""

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scaling
        p = F.softmax(s, dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", p, v)
        return self.o_proj(o.reshape(b, n, -1))


class EinsumValueOnly(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        p = torch.softmax(s, dim=-1)
        return self.merge(torch.einsum("bhij,bhjd->bhid", p, v))


class EinsumChannelsFirst(nn.Module):
    """guided-diffusion style: '(b h) d n' channels-first tensors, sqrt scale on both q and k, fp32 softmax."""

    def __init__(self, dim=C, heads=H):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        d = c // self.heads
        qkv = self.qkv(x).transpose(1, 2).reshape(b * self.heads, 3 * d, n)
        q, k, v = qkv.split(d, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(d))
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        a = torch.einsum("bts,bcs->bct", w, v)
        return self.proj(a.reshape(b, c, n).transpose(1, 2))


# ----------------------------------------------------------------------------------------------------
# Positive spellings: how k gets transposed
# ----------------------------------------------------------------------------------------------------

class KPermute0132(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(k.shape[-1])
        return torch.matmul(F.softmax(s, dim=-1), v)


class KmT(nn.Module):
    def forward(self, q, k, v):
        s = (q @ k.mT) * q.size(-1) ** -0.5
        return F.softmax(s, -1) @ v


class KDirectBHDN(Proj):
    """k projected straight into 'b h d n' by permute(0, 2, 3, 1) of 'b n h d'."""

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim).permute(0, 2, 3, 1)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)
        s = (q @ k) * self.scaling
        return self.merge(s.softmax(dim=-1) @ v)


class WhisperSplitScale(Proj):
    """Whisper style: d**-0.25 on q and on k, k permuted straight to 'b h d n'."""

    def forward(self, x):
        b, n, _ = x.shape
        scale = self.head_dim ** -0.25
        q = self.q_proj(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3) * scale
        k = self.k_proj(x).view(b, n, self.heads, -1).permute(0, 2, 3, 1) * scale
        v = self.v_proj(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3)
        w = F.softmax((q @ k).float(), dim=-1).to(q.dtype)
        return self.merge(w @ v)


class LayoutBNHD(nn.Module):
    """Inputs in 'b n h d'; transposed inside, output back to 'b n h d'."""

    def forward(self, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        s = torch.matmul(q, k.transpose(2, 3)) * (q.size(-1) ** -0.5)
        o = torch.matmul(F.softmax(s, dim=-1), v)
        return o.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# Positive spellings: scale
# ----------------------------------------------------------------------------------------------------

class ScaleBuffer(Proj):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_buffer("scale_t", torch.tensor(self.head_dim ** -0.5))

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scale_t
        return self.merge(F.softmax(s, dim=-1) @ v)


class ScaleFoldedIntoQ(Proj):
    """Bart style: the projection output is scaled before the heads are split."""

    def forward(self, x):
        q = self.split(self.q_proj(x) * self.scaling, self.heads)
        k = self.split(self.k_proj(x), self.heads)
        v = self.split(self.v_proj(x), self.heads)
        p = F.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)
        return self.merge(torch.matmul(p, v))


class ScaleSqrtSplit(nn.Module):
    def forward(self, q, k, v):
        r = q.shape[-1] ** -0.25
        s = torch.matmul(q * r, (k * r).transpose(-2, -1))
        return torch.matmul(s.softmax(-1), v)


class NoScale(nn.Module):
    def forward(self, q, k, v):
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)), dim=-1), v)


class InplaceDivScale(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1)
        s.div_(math.sqrt(q.shape[-1]))
        return F.softmax(s, dim=-1) @ v


# ----------------------------------------------------------------------------------------------------
# Positive spellings: softmax
# ----------------------------------------------------------------------------------------------------

class SoftmaxFp32Upcast(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        p = F.softmax(s.float(), -1).type_as(q)
        return self.merge(torch.matmul(p, v))


class SoftmaxDtypeArg(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


# ----------------------------------------------------------------------------------------------------
# Positive spellings: masks and biases
# ----------------------------------------------------------------------------------------------------

class AdditivePadding(Proj):
    def forward(self, x, mask):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        s = s + mask
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class InplaceMaskAdd(nn.Module):
    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        scores += mask
        return torch.matmul(scores.softmax(dim=-1), v)


class BoolMaskFillInf(nn.Module):
    def forward(self, q, k, v, mask):
        s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        s = s.masked_fill(~mask, float("-inf"))
        return F.softmax(s, dim=-1) @ v


class LongMaskEq0FinfoMin(Proj):
    """HF-style 2-D long attention_mask, masked_fill(mask == 0, finfo.min)."""

    def forward(self, x, attention_mask):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        s = s.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(s.dtype).min)
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class WhereMaskInf(nn.Module):
    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        s = torch.where(mask, s, float("-inf"))
        return torch.matmul(F.softmax(s, dim=-1), v)


class CausalTrilForward(Proj):
    def forward(self, x):
        n = x.size(1)
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        tri = torch.tril(torch.ones(n, n, device=x.device))
        s = s.masked_fill(tri == 0, float("-inf"))
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class NanoGPTAttention(nn.Module):
    """nanoGPT's slow path: fused c_attn split, registered tril buffer sliced to the length."""

    def __init__(self, n_embd=C, n_head=H, block_size=32, dropout=0.1):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class CausalTriuAdditive(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        s = s + torch.triu(torch.full((n, n), float("-inf"), device=q.device, dtype=s.dtype), 1)
        return torch.matmul(torch.softmax(s, dim=-1), v)


class CausalArange(Proj):
    def forward(self, x):
        n = x.shape[1]
        q, k, v = self.qkv(x)
        s = (q @ k.transpose(-2, -1)) * self.scaling
        i = torch.arange(n, device=x.device)[:, None]
        j = torch.arange(n, device=x.device)[None, :]
        s = s.masked_fill(~(i >= j), float("-inf"))
        return self.merge(F.softmax(s, dim=-1) @ v)


class CausalWhereFinfo(nn.Module):
    def forward(self, q, k, v):
        n = q.size(2)
        keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
        s = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
        s = torch.where(keep, s, torch.finfo(s.dtype).min)
        return F.softmax(s, dim=-1) @ v


class CausalPlusPadding(Proj):
    """Causal AND a padding mask: not purely causal, so is_causal must stay False."""

    def forward(self, x, attention_mask):
        n = x.shape[1]
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class TrilDiagonal1(nn.Module):
    """tril with diagonal=1 lets each query see one future key: a mask, but not a causal one."""

    def forward(self, q, k, v):
        n = q.shape[2]
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        m = torch.tril(torch.ones(n, n, device=q.device), diagonal=1)
        s = s.masked_fill(m == 0, float("-inf"))
        return torch.matmul(F.softmax(s, dim=-1), v)


class AlibiSymmetric(nn.Module):
    def __init__(self, heads=H):
        super().__init__()
        self.register_buffer("slopes", torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)]))

    def forward(self, q, k, v):
        nq, nk = q.shape[-2], k.shape[-2]
        pos_q = torch.arange(nq, device=q.device)
        pos_k = torch.arange(nk, device=q.device)
        dist = -(pos_q[:, None] - pos_k[None, :]).abs().to(q.dtype)
        bias = self.slopes.view(1, -1, 1, 1) * dist
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5) + bias
        return torch.matmul(F.softmax(s, dim=-1), v)


class T5RelPosBias(Proj):
    """T5 style: no scaling, a learned nn.Embedding relative-position bias added to the scores."""

    def __init__(self, max_distance=8, **kw):
        super().__init__(**kw)
        self.max_distance = max_distance
        self.rel_bias = nn.Embedding(2 * max_distance + 1, self.heads)

    def forward(self, x):
        n = x.shape[1]
        q, k, v = self.qkv(x)
        ctx = torch.arange(n, device=x.device)[:, None]
        mem = torch.arange(n, device=x.device)[None, :]
        rel = (mem - ctx).clamp(-self.max_distance, self.max_distance) + self.max_distance
        bias = self.rel_bias(rel).permute(2, 0, 1).unsqueeze(0)
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += bias
        w = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.merge(torch.matmul(w, v))


class RelPosTable(nn.Module):
    """A learned nn.Parameter table [H, 2M-1] indexed by relative distance and added."""

    def __init__(self, heads=H, max_len=32):
        super().__init__()
        self.max_len = max_len
        self.table = nn.Parameter(torch.randn(heads, 2 * max_len - 1) * 0.5)

    def forward(self, q, k, v):
        n = q.shape[2]
        pos = torch.arange(n, device=q.device)
        idx = pos[None, :] - pos[:, None] + self.max_len - 1
        bias = self.table[:, idx].unsqueeze(0)
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        return (s + bias).softmax(-1) @ v


# ----------------------------------------------------------------------------------------------------
# Positive spellings: dropout, GQA/MQA, cross-attention, head dims, whole-model styles
# ----------------------------------------------------------------------------------------------------

class DropoutFunctional(nn.Module):
    def __init__(self, p=0.1):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        w = F.dropout(F.softmax(s, dim=-1), p=self.p, training=self.training)
        return torch.matmul(w, v)


class DropoutModule(Proj):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.attn_drop = nn.Dropout(0.1)

    def forward(self, x):
        q, k, v = self.qkv(x)
        w = self.attn_drop((q @ k.transpose(-2, -1) * self.scaling).softmax(dim=-1))
        return self.merge(w @ v)


def repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, kvh, n, d = t.shape
    if n_rep == 1:
        return t
    return t[:, :, None, :, :].expand(b, kvh, n_rep, n, d).reshape(b, kvh * n_rep, n, d)


class GQARepeatKV(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class GQARepeatInterleave(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        k = k.repeat_interleave(self.n_rep, dim=1)
        v = v.repeat_interleave(self.n_rep, dim=1)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        return self.merge(torch.matmul(s.softmax(-1), v))


class MQABroadcast(nn.Module):
    """One k/v head [B, 1, N, D] broadcast against H query heads by matmul itself."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(F.softmax(s, dim=-1), v)


class CrossAttention(Proj):
    def forward(self, x, memory):
        q, k, v = self.qkv(x, memory)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class CrossAttentionMasked(Proj):
    def forward(self, x, memory, memory_keep):
        q, k, v = self.qkv(x, memory)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        s = s.masked_fill(~memory_keep[:, None, None, :], float("-inf"))
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class LearnedQueryPooling(nn.Module):
    """Perceiver-style pooling: queries are a parameter, keys/values come from x (Nq != Nk)."""

    def __init__(self, dim=C, heads=H, n_queries=3):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Parameter(torch.randn(1, heads, n_queries, dim // heads))
        self.kv = nn.Linear(dim, 2 * dim)

    def forward(self, x):
        b, n, c = x.shape
        k, v = self.kv(x).view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.query.expand(b, -1, -1, -1)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim ** -0.5
        o = torch.matmul(s.softmax(dim=-1), v)
        return o.transpose(1, 2).reshape(b, -1, c)


class TimmFusedQKV(nn.Module):
    """timm ViT: one qkv Linear, reshape/permute/unbind, scale folded into q."""

    def __init__(self, dim=C, num_heads=H):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


def rotate_half(t):
    a, b_ = t.chunk(2, dim=-1)
    return torch.cat((-b_, a), dim=-1)


class LlamaEagerStyle(Proj):
    """RoPE, GQA via repeat_kv, 4-D additive mask input sliced to the key length, fp32 softmax, dropout."""

    def __init__(self):
        super().__init__(dim=C, heads=4, kv_heads=2)

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x)
        d = self.head_dim
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
        freqs = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        key_states, value_states = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        attn_weights = torch.matmul(q, key_states.transpose(2, 3)) * self.scaling
        causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_weights = F.dropout(attn_weights, p=0.0, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous().reshape(b, n, -1)
        return self.o_proj(attn_output)


def llama_inputs(dtype, n, b=B):
    x = randn((b, n, C), 5000 + n, dtype)
    keep = padding_keep(b, n)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & keep[:, None, None, :]
    mask = torch.zeros(b, 1, n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return x, mask


class BertSelfAttention(nn.Module):
    def __init__(self, hidden=C, heads=H):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, hidden // heads
        self.all_head_size = hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def transpose_for_scores(self, x):
        new_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states, extended_mask):
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(self.attention_head_size)
        scores = scores + extended_mask
        probs = nn.functional.softmax(scores, dim=-1)
        probs = self.dropout(probs)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (self.all_head_size,))


class BertLayerish(nn.Module):
    """Builds the extended additive mask from a 2-D long mask in the parent, then calls ``attn``."""

    def __init__(self):
        super().__init__()
        self.attn = BertSelfAttention()
        self.out = nn.Linear(C, C)
        self.norm = nn.LayerNorm(C)

    def forward(self, x, attention_mask):
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return self.norm(x + self.out(self.attn(x, ext)))


class GPT2Style(nn.Module):
    """GPT-2 eager: bool tril buffer sliced [nk - nq : nk, :nk], torch.where with a 0-d finfo.min tensor."""

    def __init__(self, embed=C, heads=H, max_positions=32):
        super().__init__()
        self.num_heads, self.head_dim, self.embed = heads, embed // heads, embed
        self.register_buffer("bias", torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool))
                             .view(1, 1, max_positions, max_positions), persistent=False)
        self.c_attn = nn.Linear(embed, 3 * embed)
        self.c_proj = nn.Linear(embed, embed)
        self.attn_dropout = nn.Dropout(0.1)

    def _split(self, t):
        return t.view(t.size()[:-1] + (self.num_heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(self.embed, dim=2)
        q, k, v = self._split(q), self._split(k), self._split(v)
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        query_length, key_length = q.size(-2), k.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal_mask, w.to(w.dtype), mask_value)
        w = nn.functional.softmax(w, dim=-1).type(v.dtype)
        w = self.attn_dropout(w)
        o = torch.matmul(w, v).permute(0, 2, 1, 3).contiguous()
        return self.c_proj(o.view(o.size()[:-2] + (self.embed,)))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([XBlock(MatmulBasic()), XBlock(CausalTrilForward())])

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


class Additive2DMask(nn.Module):
    """A plain 2-D [N, N] additive mask input broadcast over batch and heads."""

    def forward(self, q, k, v, mask2d):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(F.softmax(s + mask2d, dim=-1), v)


class PerHeadBiasInput(nn.Module):
    """A per-head float bias [1, H, N, N] passed in as an input (e.g. precomputed position bias)."""

    def forward(self, q, k, v, bias):
        s = torch.matmul(q, k.transpose(-2, -1))
        s = s * (q.shape[-1] ** -0.5) + bias
        return torch.matmul(F.softmax(s, dim=-1), v)


class SelfThenCross(Proj):
    """Two attention computations in one module's forward: self-attention, then cross-attention."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.q2 = nn.Linear(C, C)

    def forward(self, x, memory):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        h = self.merge(torch.matmul(F.softmax(s, dim=-1), v))
        q2 = self.split(self.q2(h), self.heads)
        _, k2, v2 = self.qkv(x, memory)
        s2 = torch.matmul(q2, k2.transpose(-2, -1)) * self.scaling
        return self.merge(torch.matmul(F.softmax(s2, dim=-1), v2))


class SharedTwice(nn.Module):
    """ALBERT-like weight sharing: the same attention module is applied twice."""

    def __init__(self):
        super().__init__()
        self.attn = MatmulBasic()
        self.norm = nn.LayerNorm(C)

    def forward(self, x):
        for _ in range(2):
            x = x + self.attn(self.norm(x))
        return x


class SDPACall(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


# ----------------------------------------------------------------------------------------------------
# Negative cases: not attention, or attention whose intermediates escape
# ----------------------------------------------------------------------------------------------------

class SoftmaxDimMinus2(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        return self.merge(torch.matmul(F.softmax(s, dim=-2), v))


class SoftmaxHeadDim(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(F.softmax(s, dim=1), v)


class SigmoidScores(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        return self.merge(torch.matmul(torch.sigmoid(s), v))


class ReluScores(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(F.relu(s) / k.shape[-2], v)


class TokenMixing(nn.Module):
    """MLP-Mixer-ish: softmax of a learned [N, N] weight times values (no q·kᵀ)."""

    def __init__(self, n=N, dim=C):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(n, n))
        self.value = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.matmul(F.softmax(self.logits, dim=-1), self.value(x))


class MoEGate(nn.Module):
    """A gating softmax fed by a Linear and feeding a matmul over experts."""

    def __init__(self, dim=C, experts=4):
        super().__init__()
        self.n_exp = experts
        self.router = nn.Linear(dim, experts)
        self.experts = nn.Linear(dim, experts * dim)

    def forward(self, x):
        b, n, c = x.shape
        g = F.softmax(self.router(x), dim=-1)
        e = self.experts(x).view(b, n, self.n_exp, c)
        return torch.matmul(g.unsqueeze(-2), e).squeeze(-2)


class LinearAttentionSoftmaxK(Proj):
    """Efficient-attention: softmax over q features and over k positions, kᵀv first."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        q = q.softmax(dim=-1)
        k = k.softmax(dim=-2)
        ctx = torch.matmul(k.transpose(-2, -1), v)
        return self.merge(torch.matmul(q, ctx))


class ProbsTransposedValue(nn.Module):
    """Normalized over keys but contracted over queries: not expressible by SDPA."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(F.softmax(s, dim=-1).transpose(-2, -1), v)


class SoftmaxNoValue(nn.Module):
    """Attention probabilities pooled into a saliency map, no value product."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return F.softmax(s, dim=-1).mean(dim=-2)


class PostSoftmaxKeyMask(nn.Module):
    """Keys zeroed after the softmax without renormalizing."""

    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        p = F.softmax(s, dim=-1) * mask.to(q.dtype)
        return torch.matmul(p, v)


class MultiplicativeMask(nn.Module):
    """Scores multiplied by a 0/1 mask before the softmax (exp(0) = 1, not a masked-out key)."""

    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        s = s * mask.to(s.dtype)
        return torch.matmul(F.softmax(s, dim=-1), v)


class SoftmaxRenormEps(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        p = F.softmax(s, dim=-1)
        p = p / (p.sum(dim=-1, keepdim=True) + 1e-3)
        return torch.matmul(p, v)


class ScoresClamp(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1))
        s = s.clamp(min=-0.5, max=0.5)
        return torch.matmul(F.softmax(s, dim=-1), v)


class TanhSoftcap(Proj):
    """gemma2-style soft-capping of the logits before the softmax."""

    def __init__(self, cap=0.5, **kw):
        super().__init__(**kw)
        self.cap = cap

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        s = s / self.cap
        s = torch.tanh(s)
        s = s * self.cap
        return self.merge(torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v))


class ProbsReturned(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        p = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scaling, dim=-1)
        return self.merge(torch.matmul(p, v)), p


class ProbsStored(nn.Module):
    def __init__(self):
        super().__init__()
        self.last_attn = None

    def forward(self, q, k, v):
        p = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5), dim=-1)
        self.last_attn = p
        return torch.matmul(p, v)


class ProbsEntropyLoss(Proj):
    def forward(self, x):
        q, k, v = self.qkv(x)
        p = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scaling, dim=-1)
        entropy = -(p * torch.log(p + 1e-9)).sum(dim=-1).mean()
        return self.merge(torch.matmul(p, v)), entropy


class ScoresReturned(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(F.softmax(s, dim=-1), v), s.mean()


class ScoresFeedResidual(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        o = torch.matmul(F.softmax(s, dim=-1), v)
        return o + s.amax(dim=-1, keepdim=True)


class PermutedKTEqH(Proj):
    """K = view(B, T, H, D).permute(0, 2, 3, 1) with T == H: legal attention whatever the sizes."""

    def forward(self, x):
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, d).permute(0, 2, 1, 3)
        k = self.k_proj(x).view(b, t, h, d).permute(0, 2, 3, 1)
        v = self.v_proj(x).view(b, t, h, d).permute(0, 2, 1, 3)
        s = torch.matmul(q, k) * self.scaling
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class WrongPermuteTEqH(Proj):
    """permute(0, 1, 3, 2) instead of (0, 2, 3, 1): with T == H the product is shape-compatible but the
    batch axis of k is the token axis. Still softmax(q·M)·v for some M; outputs must simply match."""

    def forward(self, x):
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, d).permute(0, 2, 1, 3)
        k = self.k_proj(x).view(b, t, h, d).permute(0, 1, 3, 2)
        v = self.v_proj(x).view(b, t, h, d).permute(0, 2, 1, 3)
        s = torch.matmul(q, k) * self.scaling
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class WrongViewK(nn.Module):
    """k.reshape(B, H, D, N) instead of a transpose: scrambles k, shape-compatible for any N."""

    def forward(self, q, k, v):
        b, h, n, d = k.shape
        s = torch.matmul(q, k.reshape(b, h, d, n)) * (d ** -0.5)
        return torch.matmul(F.softmax(s, dim=-1), v)


# ----------------------------------------------------------------------------------------------------
# Traps: legal attention in unusual clothes, and masks that look causal but are not
# ----------------------------------------------------------------------------------------------------

class BufferTriuAntiCausal(nn.Module):
    """A registered buffer named like nanoGPT's, but upper-triangular: each query sees itself and the future."""

    def __init__(self, block_size=32):
        super().__init__()
        self.register_buffer("bias", torch.triu(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v):
        t = q.size(-2)
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        s = s.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(s, dim=-1) @ v


class TrilTransposed(nn.Module):
    """tril(...).T is upper-triangular: anti-causal."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        keep = torch.tril(torch.ones(n, n, device=q.device)).T
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        s = s.masked_fill(keep == 0, float("-inf"))
        return torch.matmul(F.softmax(s, dim=-1), v)


class CausalSoftFill(nn.Module):
    """A tril pattern filled with -1.0: the masked scores are *replaced* by -1 (exp(-1) is far from 0), which
    is neither a mask nor an additive bias independent of the scores."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        tri = torch.tril(torch.ones(n, n, device=q.device))
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        s = s.masked_fill(tri == 0, -1.0)
        return torch.matmul(F.softmax(s, dim=-1), v)


class RuntimeTemperature(nn.Module):
    """The scale is a 0-d *input* tensor: it may change between calls, so it cannot be baked in."""

    def forward(self, q, k, v, temperature):
        s = torch.matmul(q, k.transpose(-2, -1)) * temperature
        return torch.matmul(F.softmax(s, dim=-1), v)


def qkv_temperature_inputs(dtype, n):
    q, k, v = qkv_inputs()(dtype, n)
    return q, k, v, torch.tensor(0.1 + 0.03 * n, dtype=dtype)


class SwinV2Cosine(Proj):
    """Swin-v2 cosine attention: normalized q and k, a clamped learned per-head logit scale [H, 1, 1]."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.logit_scale = nn.Parameter(torch.log(torch.linspace(2.0, 10.0, self.heads)).view(self.heads, 1, 1))

    def forward(self, x):
        q, k, v = self.qkv(x)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
        return self.merge(attn.softmax(dim=-1) @ v)


class TransposedScores(nn.Module):
    """Scores computed as k·qᵀ [.., Nk, Nq], normalized over dim -2 (keys), transposed back: attention."""

    def forward(self, q, k, v):
        st = torch.matmul(k, q.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        p = F.softmax(st, dim=-2)
        return torch.matmul(p.transpose(-2, -1), v)


class SharedKV(nn.Module):
    """Keys double as values (one tensor used for both products)."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return torch.matmul(F.softmax(s, dim=-1), k) + v


class SharedQK(Proj):
    """Reformer-style shared query/key projection: scores are q·qᵀ."""

    def forward(self, x):
        q, _, v = self.qkv(x)
        s = torch.matmul(q, q.transpose(-2, -1)) * self.scaling
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class QueryPaddingAdditive(nn.Module):
    """An additive [B, 1, N, 1] term (constant along each row): legal, and a no-op after the softmax."""

    def forward(self, q, k, v, row_bias):
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5) + row_bias
        return torch.matmul(F.softmax(s, dim=-1), v)


def qkv_row_bias_inputs(dtype, n, b=B):
    q, k, v = qkv_inputs()(dtype, n)
    return q, k, v, randn((b, 1, n, 1), 8000 + n, dtype)


class KVCacheConcat(Proj):
    """Decoding with a past: keys = cat(past, new), bottom-right causal mask j <= P + i, so Nq != Nk."""

    def forward(self, x, past_k, past_v):
        n, p = x.shape[1], past_k.shape[2]
        q, k, v = self.qkv(x)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        i = torch.arange(n, device=x.device)[:, None] + p
        j = torch.arange(n + p, device=x.device)[None, :]
        s = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        s = s.masked_fill(j > i, float("-inf"))
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


def kv_cache_inputs(dtype, n, b=B, past=5):
    return (randn((b, n, C), 9000 + n, dtype), randn((b, H, past, D), 9100, dtype), randn((b, H, past, D), 9200, dtype))


# ----------------------------------------------------------------------------------------------------
# The catalogue
# ----------------------------------------------------------------------------------------------------

CASES: list[Case] = []


def _add(id, factory, inputs, expect, *, n=N, n2="auto", **kw):
    """Register a case. ``factory()`` makes the top module; ``inputs(dtype, n)`` the positional args."""
    seed = zlib.crc32(id.encode())
    if n2 == "auto":
        n2 = n + 5

    def build(dtype=torch.float32):
        torch.manual_seed(seed)
        module = factory().eval().to(dtype)
        return module, inputs(dtype, n)

    resize = None if n2 is None else (lambda dtype=torch.float32: inputs(dtype, n2))
    assert all(c.id != id for c in CASES), id
    CASES.append(Case(id=id, build=build, expect=expect, resize=resize, **kw))


def _x(attn_cls, dim=None, **kw):
    if dim is None:
        return lambda: XBlock(attn_cls(**kw))
    return lambda: XBlock(attn_cls(dim=dim, **kw), dim)


def _w(attn_cls, **kw):
    return lambda: Wrap(attn_cls(**kw))


# --- products -----------------------------------------------------------------------------------------
_add("matmul_basic", _x(MatmulBasic), x_inputs(), "rewrite", bf16=True,
     note="torch.matmul, transpose(-2,-1), * scale, F.softmax(dim=-1)")
_add("at_operator_div_sqrt", _w(AtOperatorDiv), qkv_inputs(), "rewrite",
     note="@ operator, / math.sqrt(q.size(-1)), x.softmax(-1)")
_add("tensor_matmul_method", _w(MatmulMethodSoftmaxDim3), qkv_inputs(), "rewrite",
     note="Tensor.matmul, transpose(2,3), torch.softmax(x, 3)")
_add("f_softmax_dim3", _w(FSoftmaxDim3), qkv_inputs(), "rewrite", note="F.softmax(s, dim=3)")
_add("bmm_3d", _x(Bmm3D), x_inputs(), "rewrite", bf16=True, note="torch.bmm on '(b h) n d'")
_add("bmm_view4d_mask_opt", _x(BmmView4DMaskOPT), x_mask_inputs("additive"), "rewrite",
     note="bmm scores viewed to 4-D for the mask and back to 3-D for softmax and bmm (OPT)")
_add("baddbmm_alpha_beta0", _x(BaddbmmAlpha), x_inputs(), "rewrite",
     note="baddbmm(zeros, q, kᵀ, beta=0, alpha=scale)")
_add("baddbmm_bias_input", _w(BaddbmmBiasInput), qkv_inputs(flat=True, mask="additive"), "rewrite",
     note="baddbmm(bias, q, kᵀ, beta=1, alpha=scale) with an additive '(b h) 1 n' bias input")
_add("baddbmm_alibi_bloom", _x(BaddbmmAlibiBloom), x_inputs(), "rewrite", bf16=True,
     note="Bloom-style: alibi.baddbmm(q, k in '(b h) d n'), fp32 softmax")
_add("einsum_bhqd", _w(EinsumBHQD), qkv_inputs(), "rewrite", bf16=True,
     note="einsum bhqd,bhkd->bhqk and bhqk,bhkd->bhqd")
_add("einsum_bqhd", _x(EinsumBQHD), x_inputs(), "rewrite", note="einsum bqhd,bkhd->bhqk, b n h d layout")
_add("einsum_value_only", _x(EinsumValueOnly), x_inputs(), "rewrite", note="matmul scores, einsum value product")
_add("einsum_channels_first", _x(EinsumChannelsFirst), x_inputs(), "rewrite",
     note="'(b h) d n' tensors, d**-0.25 on q and k, einsum bct,bcs->bts, fp32 softmax")

# --- k transposes ---------------------------------------------------------------------------------------
_add("k_permute_0132", _w(KPermute0132), qkv_inputs(), "rewrite", note="k.permute(0,1,3,2)")
_add("k_mT", _w(KmT), qkv_inputs(), "rewrite", note="k.mT")
_add("k_direct_bhdn", _x(KDirectBHDN), x_inputs(), "rewrite",
     note="k produced in 'b h d n' by permute(0,2,3,1) of 'b n h d'")
_add("whisper_split_scale", _x(WhisperSplitScale), x_inputs(), "rewrite", bf16=True,
     note="d**-0.25 on q and k, k permuted to 'b h d n', fp32 softmax .to(q.dtype)")
_add("layout_bnhd", _w(LayoutBNHD), qkv_inputs(layout="bnhd"), "rewrite", note="'b n h d' inputs")

# --- scale -----------------------------------------------------------------------------------------------
_add("scale_buffer_0d", _x(ScaleBuffer), x_inputs(), "rewrite", note="* registered 0-d buffer")
_add("scale_folded_into_q", _x(ScaleFoldedIntoQ), x_inputs(), "rewrite",
     note="q_proj(x) * scaling before split (Bart)")
_add("scale_sqrt_split", _w(ScaleSqrtSplit), qkv_inputs(), "rewrite", note="d**-0.25 on q and on k")
_add("scale_absent", _w(NoScale), qkv_inputs(), "rewrite", note="no scaling (scale=1)")
_add("scale_inplace_div", _w(InplaceDivScale), qkv_inputs(), "rewrite", note="scores.div_(sqrt(d))")

# --- softmax ---------------------------------------------------------------------------------------------
_add("softmax_fp32_upcast", _x(SoftmaxFp32Upcast), x_inputs(), "rewrite", bf16=True,
     note="F.softmax(s.float(), -1).type_as(q)")
_add("softmax_dtype_arg", _w(SoftmaxDtypeArg), qkv_inputs(), "rewrite", bf16=True,
     note="F.softmax(s, dim=-1, dtype=float32).to(q.dtype)")

# --- masks -----------------------------------------------------------------------------------------------
_add("mask_additive_padding", _x(AdditivePadding), x_mask_inputs("additive"), "rewrite", bf16=True,
     note="float [B,1,1,N] additive padding mask input")
_add("mask_inplace_add", _w(InplaceMaskAdd), qkv_inputs(mask="additive"), "rewrite", note="scores += mask")
_add("mask_bool_fill_neg_inf", _w(BoolMaskFillInf), qkv_inputs(mask="bool4d"), "rewrite",
     note="masked_fill(~mask, -inf)")
_add("mask_long_eq0_finfo_min", _x(LongMaskEq0FinfoMin), x_mask_inputs("long2d"), "rewrite", bf16=True,
     note="masked_fill(mask[:,None,None,:] == 0, finfo.min)")
_add("mask_where_neg_inf", _w(WhereMaskInf), qkv_inputs(mask="square"), "rewrite",
     note="torch.where(mask [B,1,N,N], s, -inf)")
_add("causal_tril_forward", _x(CausalTrilForward), x_inputs(), "rewrite", causal=True, bf16=True,
     note="torch.tril(torch.ones(N, N)) built in forward, masked_fill(== 0, -inf)")
_add("causal_nanogpt_buffer", _x(NanoGPTAttention), x_inputs(), "rewrite", causal=True, bf16=True,
     note="registered tril buffer self.bias[:, :, :T, :T], dropout modules")
_add("causal_triu_additive", _w(CausalTriuAdditive), qkv_inputs(), "rewrite", causal=True,
     note="s + torch.triu(full(-inf), 1)")
_add("causal_arange_compare", _x(CausalArange), x_inputs(), "rewrite", causal=True,
     note="arange(N)[:, None] >= arange(N)[None, :]")
_add("causal_where_finfo", _w(CausalWhereFinfo), qkv_inputs(), "rewrite", causal=True,
     note="torch.where(tril(bool), s, finfo.min)")
_add("causal_gpt2_style", _x(GPT2Style), x_inputs(), "rewrite", causal=True,
     note="bool tril buffer sliced [nk-nq:nk, :nk], torch.where with 0-d finfo.min tensor, / full([], sqrt d)")
_add("causal_and_padding_not_causal", _x(CausalPlusPadding), x_mask_inputs("long2d"), "rewrite",
     note="tril & padding: a mask, but is_causal must be False")
_add("tril_diagonal1_not_causal", _w(TrilDiagonal1), qkv_inputs(), "rewrite",
     note="tril(diagonal=1): sees one future key, is_causal must be False")
_add("alibi_symmetric", _w(AlibiSymmetric), qkv_inputs(), "rewrite", note="slopes * -|i-j| added")
_add("t5_relpos_embedding", _x(T5RelPosBias), x_inputs(), "rewrite",
     note="no scale, nn.Embedding relative bias, scores += bias, fp32 softmax type_as")
_add("relpos_param_table", _w(RelPosTable), qkv_inputs(), "rewrite",
     note="nn.Parameter table indexed by relative distance, added")

# --- dropout, GQA, cross, head dims, model styles --------------------------------------------------------
_add("dropout_functional_eval", _w(DropoutFunctional), qkv_inputs(), "rewrite",
     note="F.dropout(p, 0.1, training=self.training) in eval")
_add("dropout_module_eval", _x(DropoutModule), x_inputs(), "rewrite", note="nn.Dropout(0.1) in eval")
_add("gqa_repeat_kv_expand", _x(GQARepeatKV, kv_heads=2), x_inputs(), "rewrite", bf16=True,
     note="repeat_kv: x[:, :, None].expand(...).reshape(...), 4 heads / 2 kv heads")
_add("gqa_repeat_interleave", _x(GQARepeatInterleave, kv_heads=1), x_inputs(), "rewrite",
     note="repeat_interleave(4, dim=1): 4 heads / 1 kv head")
_add("mqa_matmul_broadcast", _w(MQABroadcast), qkv_inputs(kv_heads=1), "rewrite",
     note="k, v with one head broadcast by matmul")
_add("cross_attention", _x(CrossAttention), x_memory_inputs(), "rewrite", bf16=True,
     note="q from x, k/v from memory, Nq != Nk")
_add("cross_attention_masked", _x(CrossAttentionMasked), x_memory_inputs(with_mask=True), "rewrite",
     note="cross-attention with a memory padding mask")
_add("learned_query_pooling", _w(LearnedQueryPooling), x_inputs(), "rewrite",
     note="queries are an nn.Parameter (Nq=3), keys/values from x")
_add("head_dim_40", _x(MatmulBasic, dim=80, heads=2), x_inputs(c=80), "rewrite", n=10, note="H=2, D=40")
_add("head_dim_64", _x(SoftmaxFp32Upcast, dim=128, heads=2), x_inputs(c=128), "rewrite", n=8,
     bf16=True, note="H=2, D=64")
_add("head_dim_80", _w(AtOperatorDiv), qkv_inputs(h=2, d=80), "rewrite", note="q/k/v direct, H=2, D=80")
_add("timm_fused_qkv", _x(TimmFusedQKV), x_inputs(), "rewrite",
     note="qkv reshape/permute(2,0,3,1,4)/unbind, q * scale")
_add("llama_eager_style", _x(LlamaEagerStyle), llama_inputs, "rewrite", bf16=True,
     note="RoPE, repeat_kv GQA, 4-D additive mask input sliced to key length (not provably causal)")
_add("bert_eager_style", BertLayerish, x_mask_inputs("long2d"), "rewrite", bf16=True,
     note="transpose_for_scores, / sqrt, extended mask built in the parent module, dropout")
_add("two_layers", TwoLayers, x_inputs(), "rewrite", site="blocks.0.attn", extra_sites=("blocks.1.attn",),
     note="two sites in a ModuleList; blocks.1 is causal (not checked here)")
_add("permuted_k_T_eq_H", _x(PermutedKTEqH), x_inputs(), "rewrite", n=H,
     note="trap: k = view(B,T,H,D).permute(0,2,3,1) with T == H is legal attention")
_add("mask_2d_square_additive", _w(Additive2DMask), qkv_mask2d_inputs, "rewrite",
     note="2-D [N, N] additive mask input, broadcast")
_add("bias_per_head_input", _w(PerHeadBiasInput), qkv_bias_inputs, "rewrite",
     note="float [1, H, N, N] bias input added after the scale")
_add("two_sites_one_module", _x(SelfThenCross), x_memory_inputs(), "rewrite",
     note="self- then cross-attention in one forward: two rows named 'attn'")
_add("shared_module_called_twice", SharedTwice, x_inputs(), "rewrite",
     note="the same attention module applied twice (weight sharing)")
_add("sdpa_direct", _w(SDPACall), qkv_inputs(), "kept", note="already F.scaled_dot_product_attention")
_add("sdpa_direct_causal", _w(SDPACall, causal=True), qkv_inputs(), "kept",
     note="existing SDPA with is_causal=True")

# --- negatives -------------------------------------------------------------------------------------------
_add("neg_softmax_dim_minus2", _x(SoftmaxDimMinus2), x_inputs(), "untouched", bf16=True,
     note="softmax over the query axis")
_add("neg_softmax_head_dim", _w(SoftmaxHeadDim), qkv_inputs(), "untouched", note="softmax over the head axis")
_add("neg_sigmoid_scores", _x(SigmoidScores), x_inputs(), "untouched", note="sigmoid instead of softmax")
_add("neg_relu_scores", _w(ReluScores), qkv_inputs(), "untouched", note="relu(s) / N")
_add("neg_token_mixing", _x(TokenMixing), x_inputs(), "untouched", n2=None,
     note="softmax of a learned [N, N] weight times v")
_add("neg_moe_gate", _x(MoEGate), x_inputs(), "untouched", note="gating softmax over experts")
_add("neg_linear_attention", _x(LinearAttentionSoftmaxK), x_inputs(), "untouched",
     note="softmax(q, -1) · (softmax(k, -2)ᵀ v)")
_add("neg_probs_transposed", _w(ProbsTransposedValue), qkv_inputs(), "untouched",
     note="softmax over keys, contracted over queries")
_add("neg_softmax_no_value", _w(SoftmaxNoValue), qkv_inputs(), "untouched", note="probs pooled, no value product")
_add("neg_post_softmax_key_mask", _w(PostSoftmaxKeyMask), qkv_inputs(mask="bool4d"), "untouched",
     note="keys zeroed after softmax, no renormalization")
_add("neg_multiplicative_mask", _w(MultiplicativeMask), qkv_inputs(mask="bool4d"), "untouched",
     note="scores * 0/1 mask before softmax")
_add("neg_softmax_renorm_eps", _w(SoftmaxRenormEps), qkv_inputs(), "untouched", note="p / (p.sum + eps)")
_add("neg_scores_clamp", _w(ScoresClamp), qkv_inputs(), "untouched", note="s.clamp(-0.5, 0.5) before softmax")
_add("neg_tanh_softcap", _x(TanhSoftcap), x_inputs(), "untouched", bf16=True,
     note="gemma2 tanh soft-capping: must not be rewritten as plain attention")
_add("reject_probs_returned", _x(ProbsReturned), x_inputs(), "reject", reason=USED_ELSEWHERE, bf16=True,
     note="probabilities returned as a second output")
_add("reject_probs_stored", _w(ProbsStored), qkv_inputs(), "reject", reason=USED_ELSEWHERE,
     state=("attn.last_attn",), note="probabilities stored on self.last_attn")
_add("reject_probs_entropy_loss", _x(ProbsEntropyLoss), x_inputs(), "reject", reason=USED_ELSEWHERE,
     note="probabilities summed into an entropy loss output")
_add("reject_scores_returned", _w(ScoresReturned), qkv_inputs(), "reject", reason=USED_ELSEWHERE,
     note="raw scores also feed another output")
_add("reject_scores_feed_residual", _w(ScoresFeedResidual), qkv_inputs(), "reject", reason=USED_ELSEWHERE,
     note="scores.amax added to the attention output")
_add("any_wrong_permute_T_eq_H", _x(WrongPermuteTEqH), x_inputs(), "any", n=H, n2=None,
     note="permute(0,1,3,2) with T == H: shape-compatible, not the usual q·kᵀ; outputs must match")
_add("any_wrong_view_k", _w(WrongViewK), qkv_inputs(), "any",
     note="k.reshape(B,H,D,N) instead of transpose; outputs must match")


# --- traps ----------------------------------------------------------------------------------------------
_add("buffer_triu_anticausal", _w(BufferTriuAntiCausal), qkv_inputs(), "rewrite",
     note="nanoGPT-shaped buffer holding triu: anti-causal, is_causal must be False")
_add("tril_transposed_anticausal", _w(TrilTransposed), qkv_inputs(), "rewrite",
     note="tril(ones).T: anti-causal, is_causal must be False")
_add("causal_soft_fill_minus1", _w(CausalSoftFill), qkv_inputs(), "untouched",
     note="masked_fill(tril == 0, -1.0) replaces scores by -1 (not a bias, not a mask): SDPA cannot express it")
_add("scale_runtime_tensor_input", _w(RuntimeTemperature), qkv_temperature_inputs, "any",
     note="scale is a 0-d input that differs at the second length: must not be baked in")
_add("swinv2_cosine_per_head_scale", _x(SwinV2Cosine), x_inputs(), "any",
     note="normalized q/k, clamped learned per-head logit scale [H,1,1] (not a scalar scale)")
_add("transposed_scores_softmax_dim_minus2", _w(TransposedScores), qkv_inputs(), "any",
     note="k·qᵀ normalized over dim -2 then transposed: still attention; outputs must match")
_add("shared_kv", _w(SharedKV), qkv_inputs(), "rewrite", note="k used as the value too (and v added after)")
_add("shared_qk", _x(SharedQK), x_inputs(), "rewrite", note="q·qᵀ scores (Reformer shared QK)")
_add("query_row_bias", _w(QueryPaddingAdditive), qkv_row_bias_inputs, "rewrite",
     note="additive [B,1,N,1] term, constant along rows")
_add("kv_cache_concat", _x(KVCacheConcat), kv_cache_inputs, "rewrite",
     note="cat(past, new) keys, bottom-right causal via arange: Nq != Nk, is_causal must be False")

def by_id(case_id: str) -> Case:
    for c in CASES:
        if c.id == case_id:
            return c
    raise KeyError(case_id)


# ----------------------------------------------------------------------------------------------------
# Output comparison shared by the tests
# ----------------------------------------------------------------------------------------------------

def tolerance(dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten(out[k])]
    return [out]


def assert_outputs_close(got, ref, dtype, what: str = "output") -> None:
    """Every tensor within tol * max(1, |ref|max) of the reference, same shapes/dtypes, same finiteness."""
    g, r = flatten(got), flatten(ref)
    assert len(g) == len(r), f"{what}: {len(g)} outputs, expected {len(r)}"
    tol = tolerance(dtype)
    for i, (a, b) in enumerate(zip(g, r)):
        if not isinstance(b, torch.Tensor):
            assert a == b, f"{what}[{i}]: {a!r} != {b!r}"
            continue
        assert isinstance(a, torch.Tensor), f"{what}[{i}]: got {type(a)}"
        assert a.shape == b.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{what}[{i}]: dtype {a.dtype} != {b.dtype}"
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{what}[{i}]: integer/bool tensors differ"
            continue
        a32, b32 = a.detach().float(), b.detach().float()
        assert torch.equal(torch.isfinite(a32), torch.isfinite(b32)), f"{what}[{i}]: finiteness differs"
        fin = torch.isfinite(b32)
        if not fin.any():
            continue
        scale = max(1.0, b32[fin].abs().max().item())
        err = (a32[fin] - b32[fin]).abs().max().item()
        assert err <= tol * scale, f"{what}[{i}]: max abs err {err:.3g} > {tol:g} * {scale:.3g}"
