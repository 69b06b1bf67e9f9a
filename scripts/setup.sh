#!/usr/bin/env bash
# Install rewrite with its test extras without ever pulling a CUDA build of torch onto a CPU-only machine:
# on a machine without a GPU, the CPU wheel of torch is installed first (pinned), and the project's own
# range (torch>=2.5) is then already satisfied. On a machine with a GPU, an existing torch is kept.
set -euo pipefail
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install "torch>=2.5"
  else
    $PY -m pip install "torch==2.13.0"
  fi
fi
$PY -m pip install -e ".[test]"
# timm (test-only) needs torchvision, whose PyPI wheel would pull a CUDA torch and whose C++ operators are built
# against CUDA: both go, without dependencies, into .deps/timm apart from site-packages (a torchvision that fails
# to import on the default path breaks transformers), with the torchvision release that matches this torch.
# bench/zoo_common.import_timm() loads them from there; without them the timm tests skip, so a failure is no error.
TORCHVISION=$($PY -c "import torch; major, minor = map(int, torch.__version__.split('+')[0].split('.')[:2]); print(f'0.{minor + 15}.*' if major == 2 else '')")
if [ -n "$TORCHVISION" ]; then
  $PY -m pip install --no-deps --upgrade --target .deps/timm "timm==1.0.31" "torchvision==$TORCHVISION" \
    || echo "setup: timm not installed (its tests and bench/bench_timm.py will skip)" >&2
fi
