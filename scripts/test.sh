#!/usr/bin/env bash
# The test command: the default suite (heavier tests are marked slow and left to benchmarks).
set -euo pipefail
PY=${PYTHON:-python3}
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec $PY -m pytest -q "$@"
