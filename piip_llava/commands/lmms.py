"""`piip-llava lmms-tasks` (task files for local lmms-lab data) and `piip-llava lmms-answers` (lmms-eval's answers as ours).

Examples:
    piip-llava lmms-tasks --out tasks --textvqa data/textvqa --mmbench data/MMBench/en
    python -m lmms_eval --model piip_llava --model_args pretrained=DIR --include_path tasks \\
        --tasks piip_textvqa_val,piip_mmbench_en_dev --output_path out --log_samples
    piip-llava lmms-answers --samples out/*/*_samples_piip_textvqa_val.jsonl --out textvqa_answers.jsonl
    piip-llava score textvqa --dataset data/textvqa --result-file textvqa_answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

# The per-document result of each of our tasks that holds the answer record (see task_functions.py).
RECORD_METRICS = ("accuracy", "circular_accuracy")
RECORD_FIELDS = ("question_id", "round_id", "prompt", "text")


def add_parser(subparsers) -> None:
    tasks = subparsers.add_parser(
        "lmms-tasks", help="Write lmms-eval task files for local copies of lmms-lab/textvqa and lmms-lab/MMBench.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks.add_argument("--out", required=True, help="Folder for the task files (give it to lmms-eval's --include_path).")
    tasks.add_argument("--textvqa", default=None,
                       help="Local lmms-lab/textvqa: a parquet file or folder, or a save_to_disk folder.")
    tasks.add_argument("--textvqa-split", default=None, help="Default: validation.")
    tasks.add_argument("--mmbench", default=None, help="Local lmms-lab/MMBench (English): parquet or save_to_disk.")
    tasks.add_argument("--mmbench-split", default=None, help="Default: dev.")
    tasks.set_defaults(handler=run_lmms_tasks)

    answers = subparsers.add_parser(
        "lmms-answers", help="Turn lmms-eval's logged samples of our tasks into an answers file `piip-llava score` reads.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    answers.add_argument("--samples", required=True, help="lmms-eval's *_samples_<task>.jsonl (run with --log_samples).")
    answers.add_argument("--out", required=True, help="Answers JSONL in LLaVA's format.")
    answers.set_defaults(handler=run_lmms_answers)


def run_lmms_tasks(args) -> int:
    from ..evaluation.lmms.task_files import MMBENCH_LIKELIHOOD_TASK, MMBENCH_TASK, TEXTVQA_TASK, write_task_file

    if args.textvqa is None and args.mmbench is None:
        print("error: give --textvqa and/or --mmbench.", file=sys.stderr)
        return 2
    try:
        for task, dataset, split in ((TEXTVQA_TASK, args.textvqa, args.textvqa_split),
                                     (MMBENCH_TASK, args.mmbench, args.mmbench_split),
                                     (MMBENCH_LIKELIHOOD_TASK, args.mmbench, args.mmbench_split)):
            if dataset is not None:
                print(f"{task.name}: {write_task_file(args.out, task, dataset, split)}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def answer_records_from_samples(lines: list[str], source: str) -> list[dict]:
    """Our answer records from lmms-eval's sample log of one of our tasks; a line that holds none is an error."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        sample = json.loads(line)
        result = next((sample[name] for name in RECORD_METRICS if isinstance(sample.get(name), dict)), None)
        if result is None:
            raise ValueError(f"{source}, line {number}: no answer record ({' or '.join(RECORD_METRICS)}); is this the "
                             "sample log of piip_textvqa_val or piip_mmbench_en_dev?")
        records.append({name: result[name] for name in RECORD_FIELDS if name in result})
    return records


def run_lmms_answers(args) -> int:
    from ..evaluation.answers_file import atomic_write_text, records_to_jsonl

    with open(args.samples, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    try:
        records = answer_records_from_samples(lines, args.samples)
    except (ValueError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, records_to_jsonl(records))
    print(f"{len(records)} answers written to {args.out}")
    return 0
