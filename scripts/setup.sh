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
