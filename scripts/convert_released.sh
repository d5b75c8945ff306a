#!/usr/bin/env bash
# Convert a downloaded released PIIP-LLaVA checkpoint into our format.
# Usage: scripts/convert_released.sh SRC_DIR DST_DIR [extra `piip-llava convert` options]
# Example: scripts/convert_released.sh checkpoints/PIIP-LLaVA_CLIP-BL_512-256_7B converted/clip-bl_512-256_7B
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 SRC_DIR DST_DIR [--dtype float16] [--branch-override BRANCH:KEY=VALUE] ..." >&2
  exit 2
fi
src="$1"
dst="$2"
shift 2
exec python -m piip_llava convert --src "$src" --dst "$dst" "$@"
