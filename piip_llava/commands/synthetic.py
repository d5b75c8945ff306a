"""`piip-llava synthetic`: write the synthetic training and evaluation splits.

Example:
    piip-llava synthetic --out data/synthetic --seed 0 --train-size 400 --eval-size 120
    piip-llava synthetic --out data/small --train-size 0 --eval-size 12 --lmms-lab   # + lmms-lab schemas
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synthetic",
        help="Write the synthetic shapes-and-text dataset (training records and benchmark-format eval splits).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="Output folder (created if needed; files are overwritten).")
    parser.add_argument("--seed", type=int, default=0, help="Dataset seed; the same seed writes identical files.")
    parser.add_argument("--train-size", type=int, default=400, help="Number of training images.")
    parser.add_argument("--eval-size", type=int, default=120, help="Number of evaluation images.")
    parser.add_argument("--image-size", type=int, default=256, help="Side of the square images in pixels.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.add_argument("--lmms-lab", action="store_true",
                        help="Also write the evaluation splits in lmms-lab's dataset schemas (eval/lmms-lab/textvqa and "
                        "eval/lmms-lab/mmbench, parquet), for `piip-llava eval --dataset` and lmms-eval.")
    parser.set_defaults(handler=run_synthetic)
    return parser


def run_synthetic(args: argparse.Namespace) -> int:
    from ..synthetic import export_dataset

    start = time.perf_counter()
    try:
        stats = export_dataset(
            args.out,
            seed=args.seed,
            num_train_images=args.train_size,
            num_eval_images=args.eval_size,
            image_size=args.image_size,
            progress=not args.no_progress,
            lmms_lab=args.lmms_lab,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"Wrote {stats['train']['images']} training and {stats['eval']['images']} evaluation images "
          f"to {args.out} in {seconds:.1f} s.")
    print(json.dumps({"train": stats["train"], "eval": stats["eval"]}, indent=1))
    return 0
