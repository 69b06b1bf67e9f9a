"""Fused attention kernels of ``rewrite``, registered with ``torch.library`` in the ``rewrite`` namespace.

After ``import rewrite.kernels``:

* ``torch.ops.rewrite.flash_attention`` -- exact attention, FlashAttention-2 style (``flash_attention/``);
* ``torch.ops.rewrite.block_sparse_attention`` -- attention over the kept blocks of a block mask
  (``block_sparse_attention/``; mask builders in ``block_sparse_attention.masks``);
* ``torch.ops.rewrite.linear_attention`` -- chunked linear attention with elu / relu / FAVOR+ feature maps
  (``linear_attention/``);

plus the Python wrappers ``flash_attention``, ``block_sparse_attention`` and ``linear_attention`` below.
Each op folder holds ``reference.py`` (plain PyTorch: the CPU path and the test oracle), ``triton.py``
(the kernels; imported lazily) and ``__init__.py`` (registration, fake implementations, autograd).

Path rule: CUDA tensors run Triton; CPU tensors run the reference, unless ``TRITON_INTERPRET=1`` is set (then
CPU tensors run the Triton kernels in Triton's interpreter). See ``_common.py``.

Note: the wrapper functions share their names with the op subpackages, so ``rewrite.kernels.flash_attention``
is the function; reach the package's modules with ``from rewrite.kernels.flash_attention import reference``.
"""
from __future__ import annotations

from ._common import interpret_mode, triton_available, use_triton
from .block_sparse_attention import block_sparse_attention
from .flash_attention import alibi_slopes, flash_attention
from .linear_attention import linear_attention

__all__ = ["flash_attention", "block_sparse_attention", "linear_attention", "alibi_slopes", "use_triton",
           "interpret_mode", "triton_available"]
