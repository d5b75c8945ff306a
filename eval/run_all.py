#!/usr/bin/env python
"""Run TextVQA and MMBench on one checkpoint and print a markdown results table.

Usage:
    python eval/run_all.py MODEL_DIR [--output-dir DIR] [--textvqa-dir DIR] [--mmbench-dir DIR]
                           [--mmbench-split mmbench_dev_20230712] [--num-gpus N] [--skip-generation]

Each benchmark goes through its script in this folder (so sharding over GPUs and resuming behave the
same as when the scripts are run by hand); the table is built from the metrics files they write.
With --skip-generation the existing answer files are only re-scored.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--output-dir", default=None, help="Default: outputs/eval/<model folder name>.")
    parser.add_argument("--textvqa-dir", default="playground/data/eval/textvqa")
    parser.add_argument("--mmbench-dir", default="playground/data/eval/mmbench")
    parser.add_argument("--mmbench-split", default="mmbench_dev_20230712")
    parser.add_argument("--num-gpus", type=int, default=None, help="Default: every visible GPU.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-generation", action="store_true", help="Only score the existing answer files.")
    return parser.parse_args(argv)


def run_script(script: str, args: argparse.Namespace, output_dir: Path, data_dir: str, extra_env: dict) -> int:
    env = dict(os.environ, DATA_DIR=data_dir, BATCH_SIZE=str(args.batch_size), **extra_env)
    if args.num_gpus is not None:
        env["NUM_GPUS"] = str(args.num_gpus)
    return subprocess.call(["bash", str(HERE / script), args.model_dir, str(output_dir)], env=env)


def rescore(output_dir: Path, args: argparse.Namespace) -> None:
    """Score existing answers without loading the model."""
    textvqa = output_dir / "textvqa"
    subprocess.call([sys.executable, "-m", "piip_llava", "score", "textvqa",
                     "--annotation-file", f"{args.textvqa_dir}/TextVQA_0.5.1_val.json",
                     "--result-file", str(textvqa / "answers.jsonl"), "--metrics-file", str(textvqa / "metrics.json")])
    mmbench = output_dir / "mmbench"
    subprocess.call([sys.executable, "-m", "piip_llava", "score", "mmbench",
                     "--question-file", f"{args.mmbench_dir}/{args.mmbench_split}.tsv",
                     "--result-file", str(mmbench / f"{args.mmbench_split}.jsonl"),
                     "--metrics-file", str(mmbench / "metrics.json")])


def read_metrics(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def format_accuracy(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def results_table(model_name: str, textvqa: dict | None, mmbench: dict | None) -> str:
    textvqa = textvqa or {}
    mmbench = mmbench or {}
    lines = [
        "| model | TextVQA | MMBench (circular) | MMBench (vanilla) |",
        "|---|---:|---:|---:|",
        (
            f"| {model_name} | {format_accuracy(textvqa.get('accuracy'))} "
            f"| {format_accuracy(mmbench.get('accuracy'))} | {format_accuracy(mmbench.get('vanilla_accuracy'))} |"
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    model_name = Path(os.path.normpath(args.model_dir)).name
    output_dir = Path(args.output_dir or f"outputs/eval/{model_name}")
    statuses = []
    if args.skip_generation:
        rescore(output_dir, args)
    else:
        statuses.append(run_script("textvqa.sh", args, output_dir, args.textvqa_dir, {}))
        statuses.append(run_script("mmbench.sh", args, output_dir, args.mmbench_dir, {"SPLIT": args.mmbench_split}))
    table = results_table(
        model_name,
        read_metrics(output_dir / "textvqa" / "metrics.json"),
        read_metrics(output_dir / "mmbench" / "metrics.json"),
    )
    print(table)
    (output_dir / "results.md").write_text(table + "\n")
    return max(statuses, default=0)


if __name__ == "__main__":
    sys.exit(main())
