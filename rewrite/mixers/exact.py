"""Exact fused attention: ``F.scaled_dot_product_attention`` on the site's own q, k, v and mask."""
from __future__ import annotations

import torch.nn.functional as F

from ..actions import Decline, Exact, register_handler


@register_handler(Exact)
def exact_handler(action: Exact, call, site):
    if action.kernel == "triton":
        from ..graph import meta_value
        from ..kernels._common import mixer_kernels
        q = meta_value(call.q) if call.q is not None else None
        device = getattr(q, "device", None)
        # CUDA; or CPU in Triton's interpreter with REWRITE_MIXER_KERNELS=1 (how the tests run it end to end).
        # A soft-capped site has no SDPA to fall back to: the flash op serves it on every device (on CPU its
        # PyTorch path, the chunked reference, which is exact)
        if (device is None or not mixer_kernels(q)) and call.softcap is None:
            return Decline(f"the Triton flash kernel runs on CUDA tensors and this site is on {device}; "
                           "used SDPA instead")
        from ..kernels import flash_attention
        return flash_attention
    return F.scaled_dot_product_attention
