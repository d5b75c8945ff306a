#!/usr/bin/env bash
# TextVQA val with LLaVA's question file, prompts and scorer.
#
# Usage: eval/textvqa.sh MODEL_DIR [OUTPUT_DIR]
# Env:   DATA_DIR   folder with llava_textvqa_val_v051_ocr.jsonl, TextVQA_0.5.1_val.json, train_images/
#                   (default: playground/data/eval/textvqa, LLaVA's layout)
#        NUM_GPUS   processes to shard over (default: every visible GPU, else 1)
#        BATCH_SIZE (default 8)
# A rerun resumes from the answers already on disk. With several GPUs each process writes its own
# shard file; the last one to finish merges them in question order and scores.
set -euo pipefail

MODEL_DIR=${1:?usage: eval/textvqa.sh MODEL_DIR [OUTPUT_DIR]}
OUTPUT_DIR=${2:-outputs/eval/$(basename "$MODEL_DIR")}
DATA_DIR=${DATA_DIR:-playground/data/eval/textvqa}
NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
NUM_GPUS=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
BATCH_SIZE=${BATCH_SIZE:-8}

ARGS=(eval textvqa
  --model-path "$MODEL_DIR"
  --question-file "$DATA_DIR/llava_textvqa_val_v051_ocr.jsonl"
  --image-folder "$DATA_DIR/train_images"
  --annotation-file "$DATA_DIR/TextVQA_0.5.1_val.json"
  --answers-file "$OUTPUT_DIR/textvqa/answers.jsonl"
  --metrics-file "$OUTPUT_DIR/textvqa/metrics.json"
  --batch-size "$BATCH_SIZE"
  --max-new-tokens 128)

if [ "$NUM_GPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$NUM_GPUS" -m piip_llava "${ARGS[@]}"
else
  python -m piip_llava "${ARGS[@]}"
fi
