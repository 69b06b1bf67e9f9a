import os

import torch

# Without CUDA the Triton kernels run in Triton's interpreter, which must be switched on before Triton is first
# imported: set here, before any test module is collected (importing transformers imports Triton)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
