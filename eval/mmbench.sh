#!/usr/bin/env bash
# MMBench (dev by default) with LLaVA's prompt and every circular round; local scores when the TSV
# has answers, an xlsx for the MMBench server otherwise (and always with SUBMISSION=1).
#
# Usage: eval/mmbench.sh MODEL_DIR [OUTPUT_DIR]
# Env:   DATA_DIR   folder with the TSV (default: playground/data/eval/mmbench)
#        SPLIT      TSV name without .tsv (default: mmbench_dev_20230712)
#        NUM_GPUS   processes to shard over (default: every visible GPU, else 1)
#        BATCH_SIZE (default 8)
set -euo pipefail

MODEL_DIR=${1:?usage: eval/mmbench.sh MODEL_DIR [OUTPUT_DIR]}
OUTPUT_DIR=${2:-outputs/eval/$(basename "$MODEL_DIR")}
DATA_DIR=${DATA_DIR:-playground/data/eval/mmbench}
SPLIT=${SPLIT:-mmbench_dev_20230712}
NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
NUM_GPUS=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
BATCH_SIZE=${BATCH_SIZE:-8}

ARGS=(eval mmbench
  --model-path "$MODEL_DIR"
  --question-file "$DATA_DIR/$SPLIT.tsv"
  --answers-file "$OUTPUT_DIR/mmbench/$SPLIT.jsonl"
  --metrics-file "$OUTPUT_DIR/mmbench/metrics.json"
  --batch-size "$BATCH_SIZE"
  --max-new-tokens 1024)  # LLaVA's model_vqa_mmbench.py cap; answers stop at EOS long before
if [ "${SUBMISSION:-0}" = "1" ]; then
  ARGS+=(--submission-file "$OUTPUT_DIR/mmbench/$SPLIT.xlsx")
fi

if [ "$NUM_GPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$NUM_GPUS" -m piip_llava "${ARGS[@]}"
else
  python -m piip_llava "${ARGS[@]}"
fi
