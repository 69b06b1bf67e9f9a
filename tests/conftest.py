import os

import torch

# Without CUDA the Triton kernels run in Triton's interpreter, which must be switched on before Triton is first
# imported: set here, before any test module is collected (importing transformers imports Triton)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one thread per pytest-xdist worker (scripts/test.sh runs one worker per core): threads beyond the cores would
# only contend; alone, up to two
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# Property tests draw the same examples on every run (a red CI is then a bug, not a draw); set
# REWRITE_HYPOTHESIS_RANDOM=1 to explore new examples locally.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile("explore" if os.environ.get("REWRITE_HYPOTHESIS_RANDOM") else "repeatable")
