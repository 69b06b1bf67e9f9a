"""Import first in a test module that runs the Triton kernels through ``rewrite``'s mixers or handlers.

Without CUDA the kernels run in Triton's interpreter, which must be switched on before Triton is first
imported; a module that imports this is skipped when Triton is missing, or when the interpreter was not
switched on in time (Triton already imported by an earlier module without it).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("REWRITE_KERNELS_AUTOTUNE", "0")   # one config per launch: no tuning sweep per shape

pytest.importorskip("triton")

from rewrite.kernels import interpret_mode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpret_mode():  # pragma: no cover - TRITON_INTERPRET set too late
    pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)
