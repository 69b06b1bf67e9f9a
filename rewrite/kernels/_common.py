"""Shared plumbing for the kernel ops: which path a call takes, and small launch helpers.

Path rule (the same for every op in :mod:`rewrite.kernels`):

* CUDA tensors take the Triton kernels (Triton is imported lazily, on the first such call);
* CPU tensors take the plain-PyTorch reference, **unless** the environment variable ``TRITON_INTERPRET=1``
  is set, in which case they take the Triton kernels too, run by Triton's CPU interpreter (that is how the
  tests exercise the kernels on a machine without a GPU). The variable must be set before Triton is first
  imported, because ``@triton.jit`` decides at decoration time whether it builds an interpreted function.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["mixer_kernels", "interpret_mode", "autotune_enabled", "triton_available", "use_triton", "next_pow2", "new_rng_state"]


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def autotune_enabled() -> bool:
    """Autotuning runs on GPUs unless ``REWRITE_KERNELS_AUTOTUNE=0`` (then each launcher uses a fixed
    heuristic config; the tests set this so that many small shapes do not each trigger a tuning sweep).
    It never runs in the interpreter, where nothing can be timed."""
    return not interpret_mode() and os.environ.get("REWRITE_KERNELS_AUTOTUNE", "1").strip() not in ("0", "false")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on tensor ``t`` takes the Triton path (see the module docstring)."""
    if t.device.type == "cuda":
        return triton_available()
    if t.device.type == "cpu" and interpret_mode():
        return triton_available()
    return False


def mixer_kernels(t: torch.Tensor) -> bool:
    """Whether a mixer (``rewrite.mixers``) should send tensor ``t`` through the Triton kernel ops.

    Read at call time from ``REWRITE_MIXER_KERNELS``: unset (or ``auto``) -> CUDA tensors only; ``0`` -> never
    (every mixer keeps its PyTorch path); ``1`` -> CUDA tensors, and CPU tensors too when ``TRITON_INTERPRET=1``
    (the kernels then run in Triton's interpreter: how the tests compare both paths without a GPU)."""
    mode = os.environ.get("REWRITE_MIXER_KERNELS", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    if t.device.type == "cuda":
        return triton_available()
    if t.device.type == "cpu" and mode in ("1", "true", "yes", "on") and interpret_mode():
        return triton_available()
    return False


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): tile widths (``tl.arange`` and ``tl.dot`` need them)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def new_rng_state(device: torch.device | str) -> torch.Tensor:
    """A fresh (seed, offset) pair for the Philox dropout stream, drawn from torch's RNG on ``device``.

    Kept as a tensor (not Python ints) so ``torch.compile`` can trace a dropout call without a graph break.
    """
    return torch.randint(0, 2 ** 31 - 1, (2,), dtype=torch.int64, device=device)


def max_shared_memory(device: torch.device) -> int:
    """Shared memory per block (bytes) usable by one kernel on ``device``; a conservative default off-GPU."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' ``DOT_PREC`` constexpr. fp32 inputs: ``"ieee"`` in the interpreter, ``"tf32x3"`` on GPUs
    (see below), so fp32 results match the reference to ~1e-6; ``"tf32"`` (ignored for 16-bit operands:
    tensor cores) for fp16 / bf16; and
    ``"upcast"`` for bf16 in the interpreter, whose ``tl.dot`` multiplies bf16 bit patterns as integers
    (Triton 3.x stores bf16 as uint16 there): operands are cast to fp32 first, which gives the same
    products a bf16 tensor-core dot with fp32 accumulation gives."""
    if dtype == torch.float32:
        if interpret_mode():
            return "ieee"
        # GPU: tf32x3 (three TF32 tensor-core products, ~fp32 accuracy) is several times faster than IEEE
        # fp32 on CUDA cores; REWRITE_KERNELS_FP32_PRECISION=ieee (or tf32) overrides it.
        choice = os.environ.get("REWRITE_KERNELS_FP32_PRECISION", "tf32x3").strip().lower()
        return choice if choice in ("ieee", "tf32", "tf32x3") else "tf32x3"
    if dtype == torch.bfloat16 and interpret_mode():
        return "upcast"
    return "tf32"


_FITTING: dict = {}


def launch_first_fitting(kernel, grid_fn, args, kwargs, metas, cache_key=None):
    """Launch ``kernel`` with the first config of ``metas`` (dicts of tile constexprs plus ``num_warps`` /
    ``num_stages``) whose shared memory fits the device: Triton raises ``OutOfResources`` before launching
    one that does not, so the next, smaller config is tried. The winner is remembered per ``cache_key``.
    This is the no-autotuning path (interpreter, or ``REWRITE_KERNELS_AUTOTUNE=0``)."""
    from triton.runtime.errors import OutOfResources

    start = _FITTING.get(cache_key, 0) if cache_key is not None else 0
    last = None
    for i in range(start, len(metas)):
        meta = metas[i]
        try:
            kernel[grid_fn(meta)](*args, **kwargs, **meta)
        except OutOfResources as e:
            last = e
            continue
        if cache_key is not None:
            _FITTING[cache_key] = i
        return meta
    raise last if last is not None else RuntimeError("no launch configuration given")
