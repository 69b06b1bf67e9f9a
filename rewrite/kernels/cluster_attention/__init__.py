"""Cluster attention on CPU: each query attends to its cluster's window of keys plus its own key.

``cluster_attention_forward(q, k, v, cluster, window, scale, key_bias=None)`` computes what
``reference.cluster_attention_reference`` defines (see there) with the C++ kernel of ``cpu.cpp`` when it can be
built (``rewrite/kernels/_cpu_build.py``), else with the reference. The kernel is the CPU path of
``KMeansRouting``'s bidirectional form without gradients: per (head, cluster) the window is gathered once into a
cache-resident tile and the cluster's queries run through it in long row tiles, their outputs written where their
tokens are (no sort, gathers, merge or unsort passes; BENCHMARKS.md, "Cheap mixers on the clock").
``REWRITE_CPU_KERNELS=0`` turns it off.

Example::

    from rewrite.kernels import cluster_attention
    out = cluster_attention.cluster_attention_forward(q, k, v, cluster, window, scale=q.shape[-1] ** -0.5)
"""
from __future__ import annotations

import pathlib
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .._cpu_build import CpuKernel
from .reference import cluster_attention_reference

__all__ = ["available", "why_unavailable", "cluster_attention_forward", "cluster_attention_reference"]

_KERNEL = CpuKernel("cluster_attention", pathlib.Path(__file__).with_name("cpu.cpp"), "KMeansRouting")


#: whether the C++ kernel is on and built (builds it on the first call); and None when it is, else why not
available, why_unavailable = _KERNEL.available, _KERNEL.why_unavailable


@torch.library.custom_op("rewrite::cluster_attention", mutates_args=())
def _cluster_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cluster: torch.Tensor,
                          window: torch.Tensor, scale: float, key_bias: Optional[torch.Tensor]) -> torch.Tensor:
    if not (q.device.type == "cpu" and all(t.dtype == torch.float32 for t in (q, k, v)) and available()):
        return cluster_attention_reference(q, k, v, cluster, window, scale, key_bias)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _KERNEL.module().cluster_attention_forward(
        q, k, v, cluster.to(torch.int64).contiguous(), window.to(torch.int64).contiguous(),
        None if key_bias is None else key_bias.to(torch.float32), float(scale))


@_cluster_attention_op.register_fake
def _(q, k, v, cluster, window, scale, key_bias):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@register_flop_formula(torch.ops.rewrite.cluster_attention)
def _cluster_attention_flops(q_shape, k_shape, v_shape, cluster_shape, window_shape, scale, key_bias_shape,
                             *args, out_shape=None, **kwargs) -> int:
    """The two products of every query with its ``w + 1`` keys (as torch counts a matmul: 2·m·n·k)."""
    a, hq, n, d = q_shape
    return 2 * a * hq * n * (window_shape[-1] + 1) * (d + v_shape[-1])


def cluster_attention_forward(q, k, v, cluster, window, scale: float, key_bias=None) -> torch.Tensor:
    """Cluster attention ``[A, Hq, N, Dv]`` (semantics: ``reference.cluster_attention_reference``): the C++ kernel
    for float32 CPU tensors when ``available()``, the reference otherwise; one op,
    ``torch.ops.rewrite.cluster_attention``, so profilers and torch's FLOP counter see it."""
    return torch.ops.rewrite.cluster_attention(q, k, v, cluster, window, float(scale), key_bias)
