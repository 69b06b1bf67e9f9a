"""Token-merged attention: ToMe's bipartite soft matching on the keys, with proportional attention.

Per kv head, keys are split alternately into sets A and B; each A key finds its most similar B key
(cosine), and the ``r`` most similar pairs merge (keys and values averaged). Attention then runs over the
``Nk - r`` remaining keys with proportional attention: a merged key's logit gets ``+ log(size)``. With a
mask, the added term is the log-sum-exp of the members' mask values (it reduces to ``log(size)`` where
nothing is masked), and keys that no query may see are never averaged into a visible one. Queries keep
their count, so the output shape is SDPA's. It equals exact attention when ``r = 0``.

Merging is done inside the attention call only (this layer's later tokens are untouched), so it is a
pure swap of one attention site. Time: matching O(Nk²·d/4) (the similarities a block of rows at a time,
memory O(rows·Nk)) plus attention O(N·(Nk - r)·d), one fused call when the bias is a per-key one. Merging
would mix past and future keys, so causal sites are declined, including sites whose mask is causal (or
otherwise hides keys from some queries only) at run time, as the example batch shows; cross-attention is fine.

Example::

    vit = rewrite.optimize(vit, {"_default": rewrite.TokenMerge(r=64)}, example_kwargs=batch)
"""
from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.nn.functional as F

from ..actions import Action, Decline, register_action, register_handler
from ..cost import B, H, N, Nk, d, dv
from . import _layout
from . import _dense
from . import _masks
from . import _base


@register_action
@dataclasses.dataclass(frozen=True)
class TokenMerge(Action):
    """Merge the ``r`` most similar key/value pairs (bipartite soft matching), proportional attention."""

    reads_example_mask = True

    r: int = 16
    exact = False
    requires = (_base.NonCausal("token merging averages keys across positions, which would let a query see "
                                "future tokens; causal sites are not supported"),)

    def __post_init__(self):
        _base.check_int(self, "r", self.r, 0, "Give how many keys to merge away, e.g. r=16 (0 is exact).")

    def flops(self) -> sympy.Expr:
        """Key normalisation and A·Bᵀ matching, the merge averages, then attention over Nk - r keys."""
        kept = sympy.Max(Nk - self.r, Nk / 2)
        matching = 3 * B * H * Nk * d + 2 * B * H * (Nk / 2) ** 2 * d
        merge = 2 * B * H * sympy.Min(self.r, Nk / 2) * (d + dv)
        return _layout.attention_flops(N, kept) + matching + merge


class TokenMergeAttention(_base.SDPAMixer):
    """SDPA-signature attention over ``Nk - r`` merged keys (per kv head)."""

    __name__ = "token_merge_attention"

    def __init__(self, r: int = 16):
        super().__init__()
        self.r = int(r)

    def _config(self) -> dict:
        return {"r": self.r}

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if is_causal:
            raise ValueError("TokenMergeAttention has no causal form (merging mixes past and future keys)")
        c = _layout.canon(q, k, v, attn_mask, scale)
        bf, hkv, g, nq, nk, dd, dv = c.dims
        r = min(self.r, nk // 2)
        keys, values, bias = c.k, c.v, c.bias
        if r > 0:
            keys, values, bias = self.merge(c, r)
        if bias is not None and bias.shape[-2] == 1:
            # one bias row for every query (padding and the merged keys' sizes): a broadcast SDPA mask, one
            # fused call (no [Nq, Nk] mask is built)
            out = F.scaled_dot_product_attention(c.q.view(bf, hkv * g, nq, dd), keys, values,
                                                 attn_mask=_dense.heads_mask(bias, hkv, g),
                                                 dropout_p=float(dropout_p or 0.0), scale=c.scale,
                                                 enable_gqa=g > 1)
            return c.finish(out.view(bf, hkv, g, nq, dv))
        return c.finish(_dense.sdpa_rows(c, keys, values, bias, dropout_p=dropout_p))

    @staticmethod
    def merge(c: _layout.Canon, r: int) -> tuple:
        """Keys ``[Bf, Hkv, Nk-r, D]``, values and the bias ``[Bm', Hm', Gm, Nqm, Nk-r]`` after merging r pairs."""
        bf, hkv, g, nq, nk, dd, dv = c.dims
        k, v, bias = c.k, c.v, c.bias
        if bias is None:
            visible = torch.ones(bf, hkv, nk, dtype=torch.bool, device=k.device)
        else:  # a key no query may see (e.g. padding) is never merged into a visible one
            visible = (bias.amax(dim=(2, 3)) > c.mask_floor).expand(bf, hkv, nk)
        with torch.no_grad():
            m = F.normalize(k, dim=-1)
            bh = bf * hkv
            ma, mb = m[..., ::2, :].reshape(bh, -1, dd), m[..., 1::2, :].reshape(bh, -1, dd).transpose(1, 2)
            va, vb = (~visible[..., ::2]).reshape(bh, -1, 1), (~visible[..., 1::2]).reshape(bh, 1, -1)
            # best B partner of each A key: the similarities [Bf·Hkv, Na, Nb] a block of A rows at a time, in
            # one buffer reused by every block (fresh blocks between the kept results would fragment the heap)
            na, nb = ma.shape[-2], mb.shape[-1]
            step = min(na, max(1, _dense.ROW_CHUNK_ELEMENTS // max(1, bh * nb)))
            buf = m.new_empty(bh * step * nb)
            node_max, node_idx = m.new_empty(bh, na), torch.empty(bh, na, dtype=torch.long, device=m.device)
            for a0 in range(0, na, step):
                a1 = min(na, a0 + step)
                sim = torch.bmm(ma[:, a0:a1], mb, out=buf[:bh * (a1 - a0) * nb].view(bh, a1 - a0, nb))
                if bias is not None:
                    sim.masked_fill_(va[:, a0:a1], _layout.NEG_INF).masked_fill_(vb, _layout.NEG_INF)
                torch.max(sim, dim=-1, out=(node_max[:, a0:a1], node_idx[:, a0:a1]))
            del buf
            node_max, node_idx = node_max.view(bf, hkv, na), node_idx.view(bf, hkv, na)
            order = node_max.argsort(dim=-1, descending=True, stable=True)
            src = order[..., :r]                                               # A keys merged away
            unm = order[..., r:].sort(dim=-1).values                           # A keys kept (in order)
            dst = node_idx.gather(-1, src)                                     # their B partners

        wa = visible[..., ::2].to(k.dtype).unsqueeze(-1)                      # averaging weights: visible = 1
        wb = visible[..., 1::2].to(k.dtype).unsqueeze(-1)
        src1, dst1 = src.unsqueeze(-1), dst.unsqueeze(-1)
        weight = wb.scatter_add(-2, dst1, wa.gather(-2, src1))                 # visible members per B key
        count = torch.ones_like(wb).scatter_add(-2, dst1, torch.ones_like(src1, dtype=k.dtype))

        def merged(x):
            xa, xb = x[..., ::2, :], x[..., 1::2, :]
            width = x.shape[-1]
            s_idx, d_idx = src1.expand(-1, -1, -1, width), dst1.expand(-1, -1, -1, width)
            xs = xa.gather(-2, s_idx)
            total = (xb * wb).scatter_add(-2, d_idx, xs * wa.gather(-2, src1))
            plain = xb.scatter_add(-2, d_idx, xs)                              # all members masked: plain mean
            xb_new = torch.where(weight > 0, total / weight.clamp(min=1e-30), plain / count)
            return torch.cat([xa.gather(-2, unm.unsqueeze(-1).expand(-1, -1, -1, width)), xb_new], dim=-2)

        keys, values = merged(k), merged(v)
        if bias is None:
            bias = torch.zeros(1, 1, 1, 1, nk, dtype=k.dtype, device=k.device)
        # proportional attention: each merged column gets the log-sum-exp of its members' bias
        bm, hm, gm, nqm, _ = bias.shape
        bias = bias.expand(bf, hkv, gm, nqm, nk)
        ba, bb = bias[..., ::2], bias[..., 1::2]
        lead = (bf, hkv, gm, nqm)
        s_idx = src.view(bf, hkv, 1, 1, r).expand(*lead, r)
        d_idx = dst.view(bf, hkv, 1, 1, r).expand(*lead, r)
        u_idx = unm.view(bf, hkv, 1, 1, -1).expand(*lead, unm.shape[-1])
        bs = ba.gather(-1, s_idx)
        top = bb.scatter_reduce(-1, d_idx, bs, reduce="amax", include_self=True)
        top_safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = torch.exp(bb - top_safe).scatter_add(-1, d_idx, torch.exp(bs - top_safe.gather(-1, d_idx)))
        bb_new = torch.where(torch.isfinite(top), top_safe + torch.log(total), top)
        return keys, values, torch.cat([ba.gather(-1, u_idx), bb_new], dim=-1)


@register_handler(TokenMerge)
def token_merge_handler(action: TokenMerge, call, site):
    plan = _masks.site_mask_plan(site, call.is_causal)  # a mask built at run time, as the example batch has it
    if _masks.visibility_varies(plan):
        what = "a causal mask" if plan.kind == "causal" else "a mask that hides keys from some queries only"
        return Decline(f"token merging averages keys across positions, which would let a query see keys its mask "
                       f"hides; this site's mask (built at run time) is {what} on the example batch")
    return TokenMergeAttention(action.r)
