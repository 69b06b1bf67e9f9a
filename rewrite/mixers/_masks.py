"""One mask vocabulary for every mixer.

An ``attn_mask`` (with ``is_causal``) is classified exactly, by tensor equality, into a :class:`MaskPlan`:

- ``"none"``    nothing masked;
- ``"keys"``    one additive bias per *key*, the same for every query (padding masks; Hugging Face builds
                them either as ``[B, 1, 1, Nk]`` or expanded to ``[B, 1, Nq, Nk]``);
- ``"causal"``  query ``i`` sees keys ``j <= i + offset`` (``offset = Nk - Nq`` for masks, bottom-right aligned
                as in KV-cache decoding; ``0`` for SDPA's ``is_causal`` flag, which SDPA aligns top-left), plus
                an optional per-key bias (padding);
- ``"general"`` anything else: the full ``[.., Nq, Nk]`` additive bias is kept and each mixer uses its dense
                (quadratic) form, which honours it but costs O(Nq·Nk), counted and warned once, never hidden.

So a padded causal LM batch, whose mask the causal prover cannot see through because Hugging Face builds it
outside the model, still gets the causal form and never leaks future tokens. A handler classifies the
example batch's mask with :func:`site_mask_plan` (the pipeline evaluates it onto the site; mixers never read
the graph). A value at or below ``MASKED_BELOW`` counts as masked everywhere in rewrite.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..sites import MASKED_BELOW

@dataclasses.dataclass
class MaskPlan:
    """What an ``attn_mask`` (+ ``is_causal``) amounts to; see the module docstring."""
    kind: str                                   # none | keys | causal | general
    nq: int
    nk: int
    key_bias: Optional[torch.Tensor] = None     # [..., 1, Nk] additive, for keys/causal (None: no bias)
    offset: int = 0                             # causal: query i sees keys j <= i + offset
    bias: Optional[torch.Tensor] = None         # general: [..., Nq, Nk] additive (-inf or <= MASKED_BELOW: masked)

    def key_valid(self) -> Optional[torch.Tensor]:
        """Boolean ``[..., 1, Nk]``: keys not masked out by the key bias (None: all keys valid)."""
        if self.key_bias is None:
            return None
        return self.key_bias > MASKED_BELOW

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
        return self.dense_bias(device, torch.float32) > MASKED_BELOW


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
        if bool((upper <= MASKED_BELOW).all()) and torch.equal(b.masked_fill(~allowed, 0.0),
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


def site_mask_plan(site, is_causal: bool) -> Optional[MaskPlan]:
    """:func:`plan_mask` of the site's mask on the example batch (``site.example_mask``, evaluated by the
    pipeline), or None where it is not known."""
    from ._base import site_lengths
    if not getattr(site, "example_mask_known", False):
        return None
    nq, nk = site_lengths(site)
    if nq is None or nk is None:
        return None
    value = site.example_mask
    if value is None:
        return plan_mask(None, bool(is_causal), nq, nk)
    if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[-1] not in (1, nk):
        return None
    try:
        return plan_mask(value.detach(), bool(is_causal), nq, nk)
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
    return bool(future.any()) and bool((plan.bias.masked_select(future.expand_as(plan.bias)) <= MASKED_BELOW).all())


def visibility_varies(plan: MaskPlan | None) -> bool:
    """Whether some key is masked for some queries but visible to others (a causal, windowed or other
    per-query mask, rather than one that only hides keys such as padding)."""
    if plan is None or plan.kind in ("none", "keys"):
        return False
    if plan.kind == "causal":
        return plan.nq > 1
    visible = plan.bias > MASKED_BELOW
    return not torch.equal(visible, visible[..., :1, :].expand_as(visible))
