"""Spectral token mixing (FNet / SVT / DSM family): a low-pass filter over the tokens of ``v``.

The values are transformed along the token axis, every frequency at or above ``keep`` is zeroed, and the
result is transformed back; queries and keys are not used.

* ``kind="fft"``: the real DFT (``rfft``); bins ``0 .. keep-1`` are kept (for the full DFT: frequencies
  ``min(f, N - f) < keep``). ``keep >= N // 2 + 1`` keeps everything (the identity).
* ``kind="dct"``: the orthonormal DCT-II; coefficients ``0 .. keep-1`` are kept (the DCT has no wrap-around,
  so the sequence ends are not mixed). Computed through an ``rfft`` of the even extension ``[x, flip(x)]``,
  whose low-pass equals the truncated DCT.

Both cost O(N log N) per channel. 1-D for text; 2-D (``rfft2`` / separable DCT over the site's ``grid``)
for vision where the grid is known, with the site's prefix tokens (CLS) given the global mean (the DC term).

**Training needed.** FNet, SVT and DSM learn their spectral filters and train the whole model; swapped into
a pretrained model this mixer discards the attention pattern and the error (measured and reported by the
pipeline) is large.

It mixes the whole sequence at once, so it has no causal form: causal sites are declined, including sites
whose causal mask is built at run time (a decoder's causal-and-padding mask: the handler reads the mask on the
example batch). Padding masks are honoured when each sequence's unpadded tokens are contiguous (right or left
padding): the transform runs over exactly those tokens (per distinct length), and padded positions get the
mean of the valid values. Cross-attention and KV-cache decoding (Nq != Nk) and sites with score biases are
declined. A call that still brings a mask it cannot honour runs exact attention instead, with a warning
(counted in ``exact_calls``): never an error, never a silently wrong result.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import sympy
import torch
from torch import nn

from .. import cost
from ..actions import Action, Decline, RewriteError, register_action, register_handler
from . import _layout
from . import _dense
from . import _masks
from . import _base

KINDS = ("fft", "dct")


@register_action
@dataclasses.dataclass(frozen=True)
class Spectral(Action):
    """Low-pass token mixing: keep the lowest ``keep`` frequencies of ``v`` (``kind="fft"`` or ``"dct"``).

    ``layout``: ``"auto"`` (2-D where the site's image grid is known, else 1-D), ``"1d"`` or ``"2d"``;
    ``dims=1``/``dims=2`` is a deprecated alias.
    Training needed: the error of a training-free swap is large (measured and reported).
    """

    reads_example_mask = True

    kind: str = "fft"
    keep: int = 16
    layout: str = "auto"
    dims: Optional[int] = None  # deprecated alias of layout (1 -> "1d", 2 -> "2d")
    exact = False
    requires = (_base.NoScoreBias(), _base.NonCausal("Spectral mixing is global over the sequence and has no causal form"),
                _base.SelfAttention("Spectral mixes the values of one sequence"), _base.LayoutResolves())

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RewriteError(f"Spectral(kind={self.kind!r}) is not known; use 'fft' or 'dct'.")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise RewriteError(f"Spectral(keep={self.keep!r}) must be a positive integer: the number of lowest "
                               "frequencies kept, e.g. Spectral(keep=16).")
        _base.check_layout(self)

    def flops(self, causal: bool = False) -> sympy.Expr:
        """A forward and an inverse real FFT per value channel (~2.5·L·log2 L each) plus the zeroing."""
        B, H, N, dv = (cost.SYMBOLS[s] for s in ("B", "H", "N", "dv"))
        length = N if self.kind == "fft" else 2 * N                        # the DCT transforms the even extension
        expr = dv * (5 * length * sympy.log(length, 2) + length)
        return B * H * expr


def lowpass_fft(x: torch.Tensor, keep: int, dim: int = -2) -> torch.Tensor:
    n = x.shape[dim]
    spec = torch.fft.rfft(x, dim=dim)
    if keep < spec.shape[dim]:
        spec = spec.narrow(dim, 0, keep)                                    # irfft zero-fills the rest
    return torch.fft.irfft(spec, n=n, dim=dim)


def lowpass_dct(x: torch.Tensor, keep: int, dim: int = -2) -> torch.Tensor:
    n = x.shape[dim]
    ext = torch.cat([x, x.flip(dim)], dim=dim)                              # half-sample symmetric extension
    spec = torch.fft.rfft(ext, dim=dim)
    if keep < spec.shape[dim]:
        spec = spec.narrow(dim, 0, keep)
    return torch.fft.irfft(spec, n=2 * n, dim=dim).narrow(dim, 0, n)


def lowpass_fft2(img: torch.Tensor, keep: int) -> torch.Tensor:
    """``img`` ``[..., H, W]``: keep ``min(f_h, H - f_h) < keep`` and ``f_w < keep``."""
    h, w = img.shape[-2:]
    spec = torch.fft.rfft2(img)
    fh = torch.arange(h, device=img.device)
    keep_h = torch.minimum(fh, h - fh) < keep
    keep_w = torch.arange(spec.shape[-1], device=img.device) < keep
    spec = spec * (keep_h[:, None] & keep_w[None, :])
    return torch.fft.irfft2(spec, s=(h, w))


class SpectralMixer(nn.Module, _base.ExactFallback):
    """Spectral low-pass mixer with SDPA's call signature (see the module docstring). ``grid`` None: 1-D."""

    def __init__(self, kind: str = "fft", keep: int = 16, grid: Optional[tuple] = None, prefix_tokens: int = 0):
        super().__init__()
        self.__name__ = f"spectral_{kind}"
        self.kind, self.keep, self.grid, self.prefix = kind, keep, (tuple(grid) if grid else None), prefix_tokens

    def lowpass(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        return (lowpass_fft if self.kind == "fft" else lowpass_dct)(x, self.keep, dim)

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        _base.refuse_dropout(self, dropout_p)
        if _layout.is_shape_inference(q, k, v, attn_mask):
            return _layout.fake_output(q, v)
        why = self.refusal(q, k, attn_mask, is_causal)
        if why:
            self._exact_note(why)
            return _dense.exact_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        dtype = q.dtype
        q, k, v, _ = _layout.prepare(q, k, v, scale)
        nk = k.shape[-2]
        plan = _masks.plan_mask(attn_mask, is_causal, q.shape[-2], nk, v.dtype)
        lead = torch.broadcast_shapes(q.shape[:-2], v.shape[:-2])
        v = v.expand(*lead, nk, v.shape[-1])
        valid = _valid_keys(plan, lead, nk)
        if self.grid is not None:
            out = self._mix2d(v)
        elif valid is None:
            out = self.lowpass(v)
        else:
            out = self._mix_segments(v, valid)
        return out.to(dtype)

    def refusal(self, q, k, attn_mask=None, is_causal=False) -> str:
        """Why this call cannot be served faithfully ("" when it can): Spectral then runs exact attention."""
        nq, nk = q.shape[-2], k.shape[-2]
        if nq != nk:
            return (f"Spectral mixes one sequence; Nq={nq} != Nk={nk} (cross-attention or KV-cache decoding) "
                    "is not supported")
        plan = _masks.plan_mask(attn_mask, is_causal, nq, nk)
        if plan.kind not in ("none", "keys"):
            return ("Spectral has no causal form and honours only padding masks (found a "
                    f"{plan.kind} mask at run time)")
        if self.grid is not None:
            gh, gw = self.grid
            if nk != self.prefix + gh * gw:
                return f"Spectral 2-D: {nk} tokens do not match the grid {gh}x{gw} with {self.prefix} prefix token(s)"
        return _padding_refusal(plan, self.grid is not None)

    def _mix_segments(self, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per row, transform only its contiguous run of valid tokens; padded positions get their mean."""
        n, dv = v.shape[-2:]
        flat_v, flat_ok = v.reshape(-1, n, dv), valid.reshape(-1, n)
        count = flat_ok.sum(-1)
        first = torch.where(count > 0, flat_ok.to(torch.int64).argmax(-1), torch.zeros_like(count))
        okf = flat_ok.unsqueeze(-1).to(v.dtype)
        mean = (flat_v * okf).sum(-2, keepdim=True) / count.clamp_min(1)[:, None, None].to(v.dtype)
        out = mean.expand_as(flat_v).clone()
        segments = torch.stack([first, count], -1)
        for start, length in torch.unique(segments, dim=0).tolist():
            if length == 0:
                continue
            rows = ((first == start) & (count == length)).nonzero().squeeze(-1)
            out[rows, start:start + length] = self.lowpass(flat_v[rows, start:start + length])
        return out.reshape(v.shape)

    def _mix2d(self, v: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        p = self.prefix
        n, dv = v.shape[-2:]
        flat = v.reshape(-1, n, dv)
        img = flat[:, p:, :].transpose(1, 2).reshape(-1, dv, gh, gw)
        if self.kind == "fft":
            mixed = lowpass_fft2(img, self.keep)
        else:
            mixed = lowpass_dct(lowpass_dct(img, self.keep, dim=-2), self.keep, dim=-1)
        parts = []
        if p:
            parts.append(flat.mean(1, keepdim=True).expand(-1, p, dv))
        parts.append(mixed.reshape(-1, dv, gh * gw).transpose(1, 2))
        return torch.cat(parts, 1).reshape(v.shape)


def _valid_keys(plan: _masks.MaskPlan, lead: tuple, nk: int) -> Optional[torch.Tensor]:
    """Boolean ``[*lead, Nk]`` valid (unpadded) keys of a padding plan; None when every key is valid."""
    valid = plan.key_valid()
    if valid is None:
        return None
    valid = valid[..., 0, :].expand(*lead, nk)
    return None if bool(valid.all()) else valid


def _padding_refusal(plan: _masks.MaskPlan, two_d: bool) -> str:
    """Why a padding plan cannot be served ("" when it can)."""
    valid = plan.key_valid()
    if valid is None or bool(valid.all()):
        return ""
    if two_d:
        return "Spectral 2-D cannot honour a padding mask over image patches"
    if not _contiguous(valid[..., 0, :]):
        return "Spectral honours padding masks only when each sequence's valid tokens are contiguous"
    return ""


def _contiguous(valid: torch.Tensor) -> bool:
    """Whether every row's valid tokens form one run (right or left padding), as the transform needs."""
    n = valid.shape[-1]
    flat = valid.reshape(-1, n)
    count = flat.sum(-1)
    first = flat.to(torch.int64).argmax(-1)
    last = n - 1 - flat.flip(-1).to(torch.int64).argmax(-1)
    return bool(((count == 0) | (last - first + 1 == count)).all())


@register_handler(Spectral)
def spectral_handler(action: Spectral, call, site):
    grid, prefix, _ = _base.resolve_grid_layout("Spectral", action.layout, call, site)
    if grid is not None and "none" not in _base.mask_kinds(site):
        return Decline("Spectral 2-D cannot honour a padding mask over image patches")
    mixer = SpectralMixer(action.kind, action.keep, grid, prefix)
    plan = _masks.site_mask_plan(site, call.is_causal)  # a mask built at run time, as the example batch has it
    if plan is not None and plan.kind not in ("none", "keys"):
        what = "a causal mask" if plan.kind == "causal" else "a mask that differs between queries"
        return Decline(f"Spectral mixing is global over the sequence and honours only padding masks; this site's "
                       f"mask (built at run time) is {what} on the example batch")
    why = _padding_refusal(plan, grid is not None) if plan is not None else ""
    if why:
        return Decline(f"{why} (the example batch's mask is not)")
    return mixer
