#!/usr/bin/env bash
# Stage 1 (pretraining, LLaVA-1.5 recipe): only the projector trains, on image-caption pairs in the
# plain format. DeepSpeed ZeRO-2, bf16, global batch 256, lr 1e-3, 1 epoch, cosine, 3% warmup.
#
#   scripts/pretrain.sh INIT_DIR DATA_JSON IMAGE_FOLDER OUTPUT_DIR [extra piip-llava train options]
#
# INIT_DIR comes from `piip-llava train init`. Single node: NUM_GPUS (default 8) processes.
# Several nodes: HOSTFILE=scripts/hostfile (see scripts/hostfile.example and docs/training.md).
# Relaunching the same command after an interruption resumes from the newest checkpoint.
set -euo pipefail

if [ "$#" -lt 4 ]; then
    echo "usage: $0 INIT_DIR DATA_JSON IMAGE_FOLDER OUTPUT_DIR [extra options]" >&2
    exit 2
fi
INIT_DIR=$1 DATA=$2 IMAGES=$3 OUTPUT=$4
shift 4
SCRIPTS=$(cd "$(dirname "$0")" && pwd)

if [ -n "${HOSTFILE:-}" ]; then
    LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
else
    LAUNCH=(deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}")
fi

"${LAUNCH[@]}" --no_local_rank --module piip_llava train \
    --stage pretrain \
    --model "$INIT_DIR" \
    --data "$DATA" \
    --image-folder "$IMAGES" \
    --output-dir "$OUTPUT" \
    --deepspeed "$SCRIPTS/zero2.json" \
    --bf16 \
    --gradient-checkpointing \
    --per-device-batch-size "${PER_DEVICE_BATCH:-32}" \
    --global-batch-size 256 \
    --learning-rate 1e-3 \
    --warmup-ratio 0.03 \
    --lr-scheduler cosine \
    --epochs 1 \
    --max-length 2048 \
    --save-steps "${SAVE_STEPS:-500}" \
    --save-total-limit 1 \
    --dataloader-workers 4 \
    --resume \
    "$@"
