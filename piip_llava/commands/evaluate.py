"""`piip-llava eval {textvqa,mmbench}` (generate, then score) and `piip-llava score {textvqa,mmbench}`.

Examples:
    piip-llava eval textvqa --model-path ckpt --question-file llava_textvqa_val_v051_ocr.jsonl \\
        --image-folder train_images --annotation-file TextVQA_0.5.1_val.json --answers-file out/textvqa.jsonl
    torchrun --nproc_per_node 8 -m piip_llava eval mmbench --model-path ckpt \\
        --question-file mmbench_dev_20230712.tsv --answers-file out/mmbench.jsonl
    piip-llava score textvqa --annotation-file TextVQA_0.5.1_val.json --result-file out/textvqa.jsonl
    piip-llava eval mmbench --model-path ckpt --dataset lmms-lab/MMBench/en --answers-file out/mmbench.jsonl

Exit status: 0 on success, 1 when some answers match no question (they are listed, and left out of
the accuracy), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from transformers.utils import logging

from ..dtypes import DTYPES
from ..evaluation.answer_request import ANSWERING_METHODS, LIKELIHOOD_TARGETS

logger = logging.get_logger(__name__)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="Folder with the model and its processor.")
    parser.add_argument("--answers-file", required=True, help="JSONL answers; resumed if it exists and the same model, questions and settings wrote it.")
    parser.add_argument("--model-id", default=None, help="model_id written in answers (default: folder name).")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="Questions answered together (default: 8); lower it if memory runs out.")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="Longest answer in tokens (default: 128); part of what the answers file records.")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="Weights dtype (default: auto, the dtype the checkpoint was saved in).")
    parser.add_argument("--device", default=None, help="Default: cuda:LOCAL_RANK if a GPU is visible, else cpu.")
    parser.add_argument("--num-shards", "--num-chunks", type=int, default=None,
                        help="Split the questions over this many processes (default: WORLD_SIZE or 1).")
    parser.add_argument("--shard-index", "--chunk-idx", type=int, default=None, help="Default: RANK or 0.")
    parser.add_argument("--merge-only", action="store_true",
                        help="Skip generation: merge the shard files into --answers-file, then score.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N questions (smoke runs).")
    parser.add_argument("--metrics-file", default=None, help="Write the scores as JSON here.")


def add_textvqa_sources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question-file", default=None, help="LLaVA's llava_textvqa_val_v051_ocr.jsonl.")
    parser.add_argument("--image-folder", default=None, help="TextVQA train_images folder.")
    add_textvqa_dataset_arguments(parser)
    parser.add_argument("--annotation-file", default=None,
                        help="TextVQA_0.5.1_val.json; without it, a --dataset's own answers column, else no score.")


def add_textvqa_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None,
                        help="Local copy of lmms-lab/textvqa (or any dataset with an image, an id and a question "
                        "column): a save_to_disk folder, a parquet file or a folder of parquet files.")
    parser.add_argument("--split", default="validation",
                        help="Split of a save_to_disk DatasetDict, or of hub-named parquet files.")
    parser.add_argument("--id-column", default=None,
                        help="Dataset column written as question_id (default: image_id if the dataset has it, as "
                        "LLaVA's scorer matches by image id, else question_id).")


def add_mmbench_sources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question-file", default=None, help="The MMBench TSV (e.g. mmbench_dev_20230712.tsv).")
    parser.add_argument("--dataset", default=None,
                        help="Local copy of lmms-lab/MMBench instead of a TSV: a save_to_disk folder, a parquet file "
                        "or a folder of parquet files (e.g. the en/ folder).")
    parser.add_argument("--split", default="dev", help="Split of a save_to_disk DatasetDict, or of hub-named files.")
    parser.add_argument("--rounds", default="auto", choices=["auto", "rotate", "rows"],
                        help="rotate: ask every rotation of each row; rows: the TSV already holds the rotated "
                        "copies (index + k*1e6); auto: rows if such indices exist, else rotate.")
    parser.add_argument("--lang", default="en", choices=["en", "cn"],
                        help="Language of the answer instruction: en for MMBench, cn for MMBench-CN (default: en).")
    parser.add_argument("--submission-file", default=None,
                        help="xlsx for the MMBench server (default for a split without answers: answers file "
                        "with .xlsx suffix).")


def reporting_usage_errors(handler):
    """Turn a ValueError (bad input the user can fix) into a one-line message and exit status 2."""

    def run(args) -> int:
        try:
            return handler(args)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    run.__name__ = handler.__name__
    return run


def add_parser(subparsers) -> None:
    """Register `eval` and `score`, each with `textvqa` and `mmbench` sub-commands."""
    eval_parser = subparsers.add_parser("eval", help="Answer a benchmark with a checkpoint, then score it.")
    eval_commands = eval_parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    textvqa = eval_commands.add_parser("textvqa", help="TextVQA val with LLaVA's prompts and the VQA accuracy.")
    add_generation_arguments(textvqa)
    add_textvqa_sources(textvqa)
    textvqa.set_defaults(handler=reporting_usage_errors(run_eval_textvqa))
    mmbench = eval_commands.add_parser("mmbench", help="MMBench with all circular rounds.")
    add_generation_arguments(mmbench)
    add_mmbench_sources(mmbench)
    mmbench.add_argument("--answer-by", default="generation", choices=ANSWERING_METHODS,
                         help="generation: greedy replies matched to options (MMBench's protocol); likelihood: the "
                         "option the model is most likely to reply with, as lm-evaluation-harness scores "
                         "multiple choice (report it beside the generation score, not as it).")
    mmbench.add_argument("--likelihood-target", default="option", choices=LIKELIHOOD_TARGETS,
                         help="With --answer-by likelihood: score each option's text, or its letter, as the reply.")
    mmbench.set_defaults(handler=reporting_usage_errors(run_eval_mmbench))

    score_parser = subparsers.add_parser("score", help="Score an existing answers file.")
    score_commands = score_parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    textvqa = score_commands.add_parser("textvqa", help="LLaVA's eval_textvqa.py protocol.")
    textvqa.add_argument(
        "--annotation-file", default=None, help="TextVQA_0.5.1_val.json (the human answers); or give --dataset."
    )
    add_textvqa_dataset_arguments(textvqa)
    textvqa.add_argument("--result-file", required=True, help="JSONL answers to score (ours or LLaVA's).")
    textvqa.add_argument("--metrics-file", default=None, help="Write the scores as JSON here.")
    textvqa.set_defaults(handler=reporting_usage_errors(run_score_textvqa))
    mmbench = score_commands.add_parser("mmbench", help="Circular and vanilla accuracy, or a submission file.")
    add_mmbench_sources(mmbench)
    mmbench.add_argument("--result-file", required=True, help="JSONL answers to score (ours or LLaVA's).")
    mmbench.add_argument("--metrics-file", default=None, help="Write the scores as JSON here.")
    mmbench.set_defaults(handler=reporting_usage_errors(run_score_mmbench))


def run_provenance(args, benchmark: str, settings: dict) -> dict:
    """What this run's answers depend on: the model, the questions, and `settings` (see `provenance.py`)."""
    from ..evaluation.provenance import model_identity, question_source

    source = args.question_file if args.question_file is not None else args.dataset
    return {
        "benchmark": benchmark,
        "model": model_identity(args.model_path),
        "questions": question_source(source),
        "settings": {"max_new_tokens": args.max_new_tokens, "dtype": args.dtype, **settings},
    }


def generate_and_merge(args, requests, key_fields, description: str, provenance: dict) -> tuple[bool, list]:
    """Answer this process's shard; returns whether the complete answers file is ready, and skipped inputs.

    Every shard file, and the merged file, carries the run's `provenance`; a file another run wrote is refused.
    """
    from ..evaluation.answers_file import atomic_write_json
    from ..evaluation.generation import generate_answers, load_model_and_processor
    from ..evaluation.provenance import check_or_record_provenance, provenance_path
    from ..evaluation.sharding import (
        Shard,
        all_shards_done,
        clear_shard_done,
        mark_shard_done,
        merge_shards,
        read_done_markers,
        resolve_shard,
        shard_answers_path,
        shard_items,
    )

    shard = resolve_shard(args.num_shards, args.shard_index)
    skipped = []
    if not args.merge_only:
        shard_path = shard_answers_path(args.answers_file, shard)
        check_or_record_provenance(shard_path, provenance)
        clear_shard_done(shard_path)
        model, processor = load_model_and_processor(args.model_path, device=args.device, dtype=args.dtype)
        summary = generate_answers(
            model, processor, shard_items(requests, shard), shard_path,
            key_fields=key_fields,
            model_id=args.model_id or Path(os.path.normpath(args.model_path)).name,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            answer_by=getattr(args, "answer_by", "generation"),
            description=f"{description} (shard {shard.index + 1}/{shard.count})" if shard.count > 1 else description,
        )
        print(f"{description}: {summary.describe()}")
        skipped = [(str(key), reason) for key, reason in summary.skipped]
        if shard.is_whole:
            return True, skipped
        mark_shard_done(shard_path, {"shard": shard.index, "generated": summary.generated, "skipped": skipped})
        if not all_shards_done(args.answers_file, shard.count):
            print(f"Shard {shard.index} of {shard.count} done; the last shard to finish merges and scores.")
            return False, skipped
    elif shard.is_whole:
        return True, skipped
    elif not all_shards_done(args.answers_file, shard.count):
        logger.warning("Not every shard has finished; merging what the shard files hold.")
    skipped = [tuple(entry) for marker in read_done_markers(args.answers_file, shard.count) for entry in marker["skipped"]]
    for index in range(shard.count):
        check_or_record_provenance(shard_answers_path(args.answers_file, Shard(index, shard.count)), provenance)
    merge_shards(args.answers_file, shard.count, [request.key for request in requests], key_fields)
    atomic_write_json(provenance_path(args.answers_file), provenance)
    return True, skipped


def write_metrics(path: str | None, metrics: dict) -> None:
    from ..evaluation.answers_file import atomic_write_json

    if path:
        atomic_write_json(path, metrics)
        print(f"Metrics written to {path}")


def add_input_problems(metrics: dict, problems: list) -> dict:
    metrics["skipped_inputs"] = len(problems)
    metrics["skipped_examples"] = [{"where": where, "reason": reason} for where, reason in problems[:20]]
    return metrics


def read_result_file(result_file: str):
    """The answers of a result file to score; a missing file or one without a single answer is an error.

    Lines that are not JSON objects are left out, and said so: they are answers that will not count.
    """
    from ..evaluation.answers_file import read_answers

    if not Path(result_file).is_file():
        raise ValueError(f"Result file {result_file} does not exist.")
    content = read_answers(result_file)
    unreadable = len(content.corrupt_lines) + int(content.truncated_tail)
    if unreadable:
        where = content.corrupt_lines[:5] + (["the last"] if content.truncated_tail else [])
        logger.warning(f"{result_file}: {unreadable} line(s) are not JSON answer records and are left out "
                       f"(lines {', '.join(map(str, where))}).")
    if not content.records:
        raise ValueError(f"Result file {result_file} holds no answers"
                         + (f" ({unreadable} unreadable line(s))." if unreadable else " (it is empty)."))
    return content


def textvqa_annotations(args) -> dict | None:
    """The human answers to score with: the annotation file, else the --dataset's answers column, else None."""
    from ..evaluation.textvqa import annotations_from_dataset, load_annotations

    if args.annotation_file is not None:
        return load_annotations(args.annotation_file)
    if args.dataset is not None:
        return annotations_from_dataset(args.dataset, args.split, args.id_column)
    return None


def textvqa_result(annotations: dict, result_file: str, metrics_file: str | None, problems: list) -> int:
    from ..evaluation.textvqa import score_textvqa

    content = read_result_file(result_file)
    score = score_textvqa(content.records, annotations)
    print(Path(result_file).stem)
    print(score.report())
    metrics = add_input_problems(score.to_metrics(), problems)
    metrics["unreadable_lines"] = len(content.corrupt_lines) + int(content.truncated_tail)
    write_metrics(metrics_file, metrics)
    return 1 if score.unmatched else 0


def mmbench_result(args, table, items, result_file: str, problems: list) -> int:
    from ..evaluation.mmbench import score_mmbench, submission_frame, write_submission

    content = read_result_file(result_file)
    records = content.records
    submission_file = args.submission_file
    if submission_file is None and not table.has_answers:
        submission_file = str(Path(result_file).with_suffix(".xlsx"))
    if submission_file:
        write_submission(submission_frame(table, records, items), submission_file)
        print(f"Submission file written to {submission_file}")
    if not table.has_answers:
        absent = "no 'answer' column" if "answer" not in table.frame.columns else "an empty 'answer' column"
        logger.warning(f"{args.question_file} has {absent} (a test split?): no accuracy can be computed; "
                       f"score the submission file {submission_file} on the MMBench server.")
        metrics = {"benchmark": "mmbench", "accuracy": None, "samples": len({item.group_id for item in items}),
                   "submission_file": submission_file}
        write_metrics(args.metrics_file, add_input_problems(metrics, problems))
        return 0
    score = score_mmbench(records, items)
    print(Path(result_file).stem)
    print(score.report())
    metrics = add_input_problems(score.to_metrics(), problems)
    metrics["unreadable_lines"] = len(content.corrupt_lines) + int(content.truncated_tail)
    write_metrics(args.metrics_file, metrics)
    return 1 if score.unmatched else 0


def run_eval_textvqa(args) -> int:
    from ..evaluation.textvqa import KEY_FIELDS, load_textvqa_questions

    loaded = load_textvqa_questions(args.question_file, args.image_folder, args.dataset, args.split, args.id_column)
    requests = loaded.requests[: args.limit] if args.limit is not None else loaded.requests
    settings = {"image_folder": str(Path(args.image_folder).resolve()) if args.image_folder else None}
    if args.dataset is not None:
        settings.update(split=args.split, id_column=args.id_column)
    provenance = run_provenance(args, "textvqa", settings)
    ready, skipped = generate_and_merge(args, requests, KEY_FIELDS, "TextVQA", provenance)
    if not ready:
        return 0
    if args.annotation_file is None and (args.dataset is None or not dataset_has_answers(args)):
        print(f"Answers in {args.answers_file}; no --annotation-file and no answers column, so no score.")
        return 0
    return textvqa_result(textvqa_annotations(args), args.answers_file, args.metrics_file, loaded.skipped + skipped)


def dataset_has_answers(args) -> bool:
    from ..evaluation.local_datasets import load_local_dataset

    return "answers" in load_local_dataset(args.dataset, args.split).column_names


def mmbench_inputs(args):
    from ..evaluation.mmbench import load_mmbench_items, read_mmbench_dataset, read_mmbench_table

    if (args.question_file is None) == (args.dataset is None):
        raise ValueError("Give exactly one question source: --question-file (an MMBench TSV) or --dataset "
                         "(a local copy of lmms-lab/MMBench).")
    table = read_mmbench_table(args.question_file) if args.dataset is None else read_mmbench_dataset(args.dataset,
                                                                                                    args.split)
    items, skipped = load_mmbench_items(table, rounds=args.rounds)
    if getattr(args, "limit", None) is not None:
        kept_groups = set(list(dict.fromkeys(item.group_id for item in items))[: args.limit])
        items = [item for item in items if item.group_id in kept_groups]
    return table, items, skipped


def run_eval_mmbench(args) -> int:
    from ..evaluation.mmbench import KEY_FIELDS, mmbench_requests

    table, items, skipped = mmbench_inputs(args)
    requests = mmbench_requests(table, items, lang=args.lang, likelihood_target=args.likelihood_target)
    settings = {"lang": args.lang, "rounds": args.rounds, "answer_by": args.answer_by,
                "likelihood_target": args.likelihood_target}
    provenance = run_provenance(args, "mmbench", settings)
    ready, generation_skipped = generate_and_merge(args, requests, KEY_FIELDS, "MMBench", provenance)
    if not ready:
        return 0
    return mmbench_result(args, table, items, args.answers_file, skipped + generation_skipped)


def run_score_textvqa(args) -> int:
    if (args.annotation_file is None) == (args.dataset is None):
        raise ValueError("Give exactly one source of human answers: --annotation-file or --dataset.")
    return textvqa_result(textvqa_annotations(args), args.result_file, args.metrics_file, [])


def run_score_mmbench(args) -> int:
    table, items, skipped = mmbench_inputs(args)
    return mmbench_result(args, table, items, args.result_file, skipped)
