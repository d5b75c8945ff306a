#!/usr/bin/env bash
# Stage 2 (instruction tuning, LLaVA-1.5 recipe): projector, LLM and the whole PIIP vision tower
# train on vicuna_v1 conversations with images padded to a square, batches grouped by modality and
# length. DeepSpeed ZeRO-3, bf16, global batch 128, lr 2e-5, 1 epoch, cosine, 3% warmup.
#
#   scripts/finetune.sh STAGE1_DIR DATA_JSON IMAGE_FOLDER OUTPUT_DIR [extra piip-llava train options]
#
# Extra options, e.g.: --freeze-vision-branches, --freeze-llm, --projector-lr 2e-5,
# LoRA: --lora-rank 128 --lora-alpha 256 --learning-rate 2e-4 --projector-lr 2e-5 (then `piip-llava train merge-lora`).
# ZERO_CONFIG=scripts/zero3_offload.json offloads parameters and optimizer state to the CPU.
set -euo pipefail

if [ "$#" -lt 4 ]; then
    echo "usage: $0 STAGE1_DIR DATA_JSON IMAGE_FOLDER OUTPUT_DIR [extra options]" >&2
    exit 2
fi
STAGE1_DIR=$1 DATA=$2 IMAGES=$3 OUTPUT=$4
shift 4
SCRIPTS=$(cd "$(dirname "$0")" && pwd)

if [ -n "${HOSTFILE:-}" ]; then
    LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
else
    LAUNCH=(deepspeed --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}")
fi

"${LAUNCH[@]}" --no_local_rank --module piip_llava train \
    --stage finetune \
    --model "$STAGE1_DIR" \
    --data "$DATA" \
    --image-folder "$IMAGES" \
    --output-dir "$OUTPUT" \
    --deepspeed "${ZERO_CONFIG:-$SCRIPTS/zero3.json}" \
    --bf16 \
    --gradient-checkpointing \
    --per-device-batch-size "${PER_DEVICE_BATCH:-16}" \
    --global-batch-size 128 \
    --learning-rate 2e-5 \
    --warmup-ratio 0.03 \
    --lr-scheduler cosine \
    --epochs 1 \
    --max-length 2048 \
    --group-by-modality-length \
    --save-steps "${SAVE_STEPS:-500}" \
    --save-total-limit 1 \
    --dataloader-workers 4 \
    --resume \
    "$@"
