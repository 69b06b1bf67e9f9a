"""Shared helpers of the mixer tests: a SiteCall and an AttentionSite built by hand, padded masks."""
import torch
import torch.fx as fx

from rewrite.passes.lower import SiteCall
from rewrite.sites import AttentionSite


def make_call(q_shape, k_shape, is_causal=False):
    g = fx.Graph()
    nodes = []
    for name, shp in (("q", q_shape), ("k", k_shape), ("v", k_shape)):
        n = g.placeholder(name)
        n.meta["val"] = torch.empty(shp)
        nodes.append(n)
    return SiteCall(q=nodes[0], k=nodes[1], v=nodes[2], is_causal=is_causal)


def make_site(q_shape=(2, 4, 16, 16), k_shape=None, mask="none", is_causal=False, **kw):
    k_shape = k_shape or q_shape
    return AttentionSite(name="layer", q_shape=q_shape, k_shape=k_shape, v_shape=k_shape, heads=q_shape[1],
                         kv_heads=k_shape[1], head_dim=q_shape[-1], mask=mask, is_causal=is_causal,
                         cross=q_shape[-2] != k_shape[-2], **kw)


def padded_mask(b, nq, nk, pad, causal, expanded=True, kind="additive"):
    """HF-style mask: [B, 1, Nq, Nk] (or [B, 1, 1, Nk]); the last ``pad`` keys of the last row are padding."""
    valid = torch.ones(b, nk, dtype=torch.bool)
    if pad:
        valid[-1, nk - pad:] = False
    allowed = valid[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq))
    elif expanded:
        allowed = allowed.expand(b, 1, nq, nk)
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
