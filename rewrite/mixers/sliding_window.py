"""Sliding-window (local) attention with optional sink / global tokens (Longformer local+global, MASFormer).

``window`` is the total width. At a bidirectional site query ``i`` sees keys with ``|i - j| <= window // 2``;
at a causal site it sees ``i - window < j <= i``. The first ``sinks`` tokens are seen by every query (and,
at bidirectional sites, see every key themselves, like Longformer's global tokens). The site's own mask
still applies. It equals exact attention when ``window >= 2N - 1`` (bidirectional) or ``window >= N``
(causal).

The module works in query blocks: each block of ``Bq`` queries scores only the ``Bq + left + right``
keys its band can reach (an ``unfold`` view of the padded keys), so time and memory are O(N·w), never
an N×N score matrix.

Example::

    model = rewrite.optimize(model, {"_default": rewrite.SlidingWindow(window=128, sinks=1)}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.nn.functional as F

from ..actions import Action, Decline, register_action, register_handler
from ..cost import N, Nk
from . import _util_a as U


def _reach(window: int, causal: bool) -> tuple:
    """(left, right): how many keys before / after query i its band covers."""
    return (window - 1, 0) if causal else (window // 2, window // 2)


def _block(left: int, right: int) -> int:
    """Query block size: about half the band, so a block's key chunk wastes at most ~1.5x the band."""
    return max(16, min(512, (left + right) // 2))


@register_action
@dataclasses.dataclass(frozen=True)
class SlidingWindow(Action):
    """Local attention over a band of ``window`` keys (total width) plus ``sinks`` global first tokens."""

    window: int = 256
    sinks: int = 0
    exact = False

    def __post_init__(self):
        U.check_int(self, "window", self.window, 1, "Give the total band width in tokens, e.g. window=256.")
        U.check_int(self, "sinks", self.sinks, 0, "Give how many first tokens every query sees, e.g. sinks=1.")

    def flops(self) -> sympy.Expr:
        """Bidirectional form (causal sites do about the same work): banded blocks + sink columns + sink rows."""
        left, right = _reach(self.window, False)
        chunk = _block(left, right) + left + right
        s = sympy.Integer(self.sinks)
        return (U.attention_flops(N, sympy.Min(chunk, Nk)) + U.attention_flops(N, sympy.Min(s, Nk))
                + U.attention_flops(sympy.Min(s, N), Nk))


class SlidingWindowAttention(U.SDPAMixer):
    """SDPA-signature sliding-window attention; ``causal`` fixes the causal band (the site was proven causal)."""

    __name__ = "sliding_window_attention"

    def __init__(self, window: int = 256, sinks: int = 0, causal: bool = False):
        super().__init__()
        self.window, self.sinks, self.causal = int(window), int(sinks), bool(causal)

    def _config(self) -> dict:
        return {"window": self.window, "sinks": self.sinks, "causal": self.causal}

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        c = U.canon(q, k, v, attn_mask, scale)
        bf, hkv, g, n, nk, dd, dv = c.dims
        if n != nk:
            raise ValueError(f"SlidingWindowAttention needs as many queries as keys (got {n} and {nk}); "
                             "cross-attention and KV-cache decoding are declined by its handler")
        causal = self.causal or bool(is_causal)
        left, right = _reach(self.window, causal)
        left, right = min(left, n - 1), min(right, n - 1)
        bq = min(_block(left, right), n)
        nb = -(-n // bq)
        npad = nb * bq
        chunk = bq + left + right
        dev = c.q.device

        # queries [Bf, Hkv, nb, G*Bq, D]; keys of each block's band [Bf, Hkv, nb, D, chunk] (an unfold view)
        qb = F.pad(c.q, (0, 0, 0, npad - n)).view(bf, hkv, g, nb, bq, dd).transpose(2, 3).reshape(
            bf, hkv, nb, g * bq, dd)
        kc = F.pad(c.k, (0, 0, left, npad - n + right)).unfold(-2, chunk, bq)
        vc = F.pad(c.v, (0, 0, left, npad - n + right)).unfold(-2, chunk, bq).transpose(-1, -2)
        scores = (qb @ kc).mul_(c.scale).view(bf, hkv, nb, g, bq, chunk)

        # band: block b, row r is query i = b*Bq + r; column col is key j = b*Bq + col - left
        r = torch.arange(bq, device=dev).view(1, bq, 1)
        col = torch.arange(chunk, device=dev).view(1, 1, chunk)
        base = (torch.arange(nb, device=dev) * bq).view(nb, 1, 1)
        j = base + col - left
        keep = (col >= r) & (col <= r + left + right) & (j >= 0) & (j < n)     # [nb, Bq, chunk]
        scores = scores.masked_fill(~keep.view(nb, 1, bq, chunk), U.NEG_INF)
        if c.bias is not None:
            scores = scores + self._band_bias(c.bias, n, nb, bq, left, right, chunk)

        s = min(self.sinks, n)
        if s:
            # sink keys a query's band does not already cover: one extra column each
            i = base + r                                                          # [nb, Bq, 1]
            js = torch.arange(s, device=dev).view(1, 1, s)
            sink_keep = (js < i - left) if causal else (js < i - left) | (js > i + right)
            sink_scores = (qb @ c.k[..., :s, :].transpose(-1, -2).unsqueeze(2)).mul_(c.scale)
            sink_scores = sink_scores.view(bf, hkv, nb, g, bq, s).masked_fill(
                ~sink_keep.view(nb, 1, bq, s), U.NEG_INF)
            if c.bias is not None:
                sink_scores = sink_scores + self._rows_by_block(c.bias[..., :s], n, nb, bq)
            scores = torch.cat([scores, sink_scores], dim=-1)

        p = U.dropout(U.safe_softmax(scores), dropout_p)
        pb = p[..., :chunk].reshape(bf, hkv, nb, g * bq, chunk)
        out = pb @ vc                                                            # [Bf, Hkv, nb, G*Bq, Dv]
        if s:
            ps = p[..., chunk:].reshape(bf, hkv, nb, g * bq, s)
            out = out + ps @ c.v[..., :s, :].unsqueeze(2)
        out = out.view(bf, hkv, nb, g, bq, dv).transpose(2, 3).reshape(bf, hkv, g, npad, dv)[..., :n, :]

        if s and not causal:
            # global sink queries see every key
            sink = U.Canon(c.q[..., :s, :], c.k, c.v, U.bias_rows(c.bias, slice(0, s)), c.scale, (), c.out_dtype,
                           c.mask_floor)
            out = torch.cat([U.sdpa_rows(sink, c.k, c.v, sink.bias, dropout_p=dropout_p), out[..., s:, :]], dim=-2)
        return c.finish(out)

    @staticmethod
    def _rows_by_block(b: torch.Tensor, n: int, nb: int, bq: int) -> torch.Tensor:
        """A bias ``[Bm, Hm, Gm, Nqm, C]`` laid out as ``[Bm, Hm, nb|1, Gm, Bq|1, C]`` for the block scores."""
        bm, hm, gm, nqm, cols = b.shape
        if nqm == 1:
            return b.view(bm, hm, 1, gm, 1, cols)
        b = F.pad(b, (0, 0, 0, nb * bq - n))
        return b.view(bm, hm, gm, nb, bq, cols).transpose(2, 3)

    @staticmethod
    def _band_bias(b: torch.Tensor, n: int, nb: int, bq: int, left: int, right: int, chunk: int) -> torch.Tensor:
        """The mask entries of each block's band: ``[Bm, Hm, nb, Gm, Bq|1, chunk]`` (views, then one copy)."""
        bm, hm, gm, nqm, nk = b.shape
        padded = F.pad(b, (left, nb * bq - n + right), value=0.0)
        if nqm == 1:
            band = padded.unfold(-1, chunk, bq)                       # [Bm, Hm, Gm, 1, nb, chunk]
            return band.permute(0, 1, 4, 2, 3, 5)
        padded = F.pad(padded, (0, 0, 0, nb * bq - n))
        band = padded.unfold(-1, chunk, bq)                            # [Bm, Hm, Gm, Npad, nb, chunk]
        band = band.view(bm, hm, gm, nb, bq, nb, chunk)               # splitting Npad keeps it a view
        band = torch.diagonal(band, dim1=3, dim2=5)                    # [Bm, Hm, Gm, Bq, chunk, nb]
        return band.permute(0, 1, 5, 2, 3, 4)


@register_handler(SlidingWindow)
def sliding_window_handler(action: SlidingWindow, call, site):
    if U.is_cross(site):
        nq, nk = U.site_lengths(site)
        return Decline(f"a sliding window needs as many queries as keys; this site has Nq={nq}, Nk={nk} "
                       "(cross-attention or KV-cache decoding)")
    return SlidingWindowAttention(action.window, action.sinks, causal=U.site_causal(call, site))
