"""Building the C++ CPU kernels (``*/cpu.cpp``) on first use, with one switch and one failure rule for all.

Each kernel is compiled by ``torch.utils.cpp_extension`` (a C++ compiler and ninja are needed; about 20 s, then
cached by torch under ``TORCH_EXTENSIONS_DIR``) for the instruction set torch reports for this CPU, so a cache
shared by machines of different CPUs keeps one build per instruction set. The kernels call the BLAS ``sgemm_``
that torch's x86 wheels carry (MKL) and share ``cpu_common.h``. Where a build or a load fails, the kernel is
unavailable, says why, and its callers keep their PyTorch path. ``REWRITE_CPU_KERNELS=0`` turns every C++ kernel
off (read at every call).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib

import torch

__all__ = ["CpuKernel", "cpu_kernels_enabled"]

log = logging.getLogger(__name__)

#: compiler flags per instruction set torch reports (``torch.backends.cpu.get_cpu_capability()``)
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}

_HERE = pathlib.Path(__file__).parent


def cpu_kernels_enabled() -> bool:
    """False when ``REWRITE_CPU_KERNELS`` says 0 / false / off."""
    return os.environ.get("REWRITE_CPU_KERNELS", "auto").strip().lower() not in ("0", "false", "no", "off")


class CpuKernel:
    """One C++ kernel: ``source`` (a path) compiled as ``rewrite_<name>_<isa>_<hash>`` on the first ``module()``
    call; ``user`` names the mixer that falls back without it."""

    def __init__(self, name: str, source: pathlib.Path, user: str):
        self.name, self.source, self.user = name, pathlib.Path(source), user

    @functools.cached_property
    def _built(self) -> tuple:
        """(the compiled module, None) or (None, why not)."""
        try:
            from torch.utils.cpp_extension import load
            log.info("rewrite: building the CPU kernel %s for %s (once per machine, about 20 s)", self.name, self.user)
            isa = torch.backends.cpu.get_cpu_capability()
            # the sources' hash in the name: an edit of the shared header rebuilds too (torch hashes sources only)
            digest = hashlib.sha1(self.source.read_bytes() + (_HERE / "cpu_common.h").read_bytes()).hexdigest()[:10]
            module = load(name=f"rewrite_{self.name}_{isa.lower()}_{digest}", sources=[str(self.source)],
                          extra_include_paths=[str(_HERE)],
                          extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, [])], extra_ldflags=["-fopenmp"],
                          verbose=False)
            return module, None
        except Exception as err:  # no compiler, no ninja, no BLAS symbol: the callers keep their PyTorch path
            lines = str(err).strip().splitlines() or [""]
            line = next((x for x in lines if "error:" in x), None) or next(
                (x for x in lines if "error" in x.lower()), lines[-1])    # the compiler's own message first
            line = line.strip()[:300]
            reason = f"{type(err).__name__}: {line}"
            log.warning("rewrite: the CPU kernel %s is unavailable (%s); %s keeps its PyTorch path", self.name,
                        reason, self.user)
            return None, reason

    def available(self) -> bool:
        """Whether the kernel is on and built (builds it on the first call)."""
        return cpu_kernels_enabled() and self._built[0] is not None

    def why_unavailable(self) -> str | None:
        """None when ``available()``, else the reason."""
        if not cpu_kernels_enabled():
            return "REWRITE_CPU_KERNELS=0"
        return self._built[1]

    def module(self):
        """The compiled module (``available()`` must be True)."""
        return self._built[0]
