"""Exact fused attention: ``F.scaled_dot_product_attention`` on the site's own q, k, v and mask."""
from __future__ import annotations

import torch.nn.functional as F

from ..actions import Decline, Exact, register_handler


@register_handler(Exact)
def exact_handler(action: Exact, call, site):
    if action.kernel == "triton":
        return Decline("the Triton flash kernel is not available in this build; used SDPA instead")
    return F.scaled_dot_product_attention
