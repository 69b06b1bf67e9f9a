#!/usr/bin/env bash
# The test command: the default suite (heavier tests are marked slow and left to benchmarks).
set -euo pipefail
PY=${PYTHON:-python3}
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# one worker process per core (at most 4: each holds its own models and Dynamo caches); files stay whole on one
# worker, so a module's fixtures are built once
WORKERS=${REWRITE_TEST_WORKERS:-$($PY -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")}
if [ "$WORKERS" -gt 1 ] && $PY -c "import xdist" 2>/dev/null; then
  exec $PY -m pytest -q -n "$WORKERS" --dist loadfile "$@"
fi
exec $PY -m pytest -q "$@"
