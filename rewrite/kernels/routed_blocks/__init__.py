"""Routed block attention on CPU: each query block attends to its own chosen key blocks, in one tile.

``routed_blocks_forward(q, k, v, blocks, block, prefix=0, extra_k=None, extra_v=None, extra_per=1, mask=None,
scale=1.0)`` computes what ``reference.routed_blocks_reference`` defines (see there) with the C++ kernel of
``cpu.cpp`` when it can be built, else with the reference. The kernel is the CPU path of ``BlockRouting`` without
gradients: it reads the chosen key and value blocks in place (no gather) and runs each query block's scores
over all of its keys as one tile, where torch's fused SDPA runs a 64-query block on 32-row tiles
(BENCHMARKS.md, "Cheap mixers on the clock").

The kernel is compiled on first use (``rewrite/kernels/_cpu_build.py``: a C++ compiler and ninja, about 20 s
once); where it cannot be, ``available()`` is False, ``why_unavailable()`` says why, and BlockRouting keeps its
PyTorch path. ``REWRITE_CPU_KERNELS=0`` turns it off.

Example::

    from rewrite.kernels import routed_blocks
    out = routed_blocks.routed_blocks_forward(q, k, v, blocks, block=64, scale=q.shape[-1] ** -0.5)
"""
from __future__ import annotations

import pathlib
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .._cpu_build import CpuKernel
from .reference import routed_blocks_reference

__all__ = ["available", "why_unavailable", "routed_blocks_forward", "routed_blocks_reference"]

_KERNEL = CpuKernel("routed_blocks", pathlib.Path(__file__).with_name("cpu.cpp"), "BlockRouting")


#: whether the C++ kernel is on and built (builds it on the first call); and None when it is, else why not
available, why_unavailable = _KERNEL.available, _KERNEL.why_unavailable


@torch.library.custom_op("rewrite::routed_blocks", mutates_args=())
def _routed_blocks_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, block: int,
                      prefix: int, extra_k: Optional[torch.Tensor], extra_v: Optional[torch.Tensor], extra_per: int,
                      mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    fits = (q.device.type == "cpu" and all(t.dtype == torch.float32 for t in (q, k, v))
            and (extra_k is None or extra_k.dtype == torch.float32))
    if not (fits and available()):
        return routed_blocks_reference(q, k, v, blocks, block, prefix, extra_k, extra_v, extra_per, mask, scale)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    out[:, :, :prefix].zero_()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    _KERNEL.module().routed_blocks_forward(
        q, k, v, blocks.to(torch.int64).contiguous(), int(block), int(prefix),
        None if extra_k is None else extra_k.contiguous(), None if extra_v is None else extra_v.contiguous(),
        int(extra_per), None if mask is None else mask.to(torch.float32), float(scale), out)
    return out


@_routed_blocks_op.register_fake
def _(q, k, v, blocks, block, prefix, extra_k, extra_v, extra_per, mask, scale):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@register_flop_formula(torch.ops.rewrite.routed_blocks)
def _routed_blocks_flops(q_shape, k_shape, v_shape, blocks_shape, block, prefix, extra_k_shape, extra_v_shape,
                         extra_per, mask_shape, scale, *args, out_shape=None, **kwargs) -> int:
    """The two products of every query row with its ``t·block + E`` keys (as torch counts a matmul: 2·m·n·k)."""
    a, hq, n, d = q_shape
    width = blocks_shape[-1] * block + (extra_k_shape[1] if extra_k_shape is not None else 0)
    return 2 * a * hq * (n - prefix) * width * (d + v_shape[-1])


def routed_blocks_forward(q, k, v, blocks, block: int, prefix: int = 0, extra_k=None, extra_v=None,
                          extra_per: int = 1, mask=None, scale: float = 1.0) -> torch.Tensor:
    """Routed block attention ``[A, Hq, N, Dv]`` (semantics: ``reference.routed_blocks_reference``; the first
    ``prefix`` rows are 0): the C++ kernel for float32 CPU tensors when ``available()``, the reference otherwise.
    One op, ``torch.ops.rewrite.routed_blocks``, so profilers and torch's FLOP counter see it."""
    return torch.ops.rewrite.routed_blocks(q, k, v, blocks, int(block), int(prefix), extra_k, extra_v,
                                           int(extra_per), mask, float(scale))
