#!/usr/bin/env bash
# Set up (as scripts/setup.sh) and run the demo: MiniLM optimized with the exact policy.
set -euo pipefail
bash "$(dirname "$0")/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec ${PYTHON:-python3} -m rewrite.demo "$@"
