#!/usr/bin/env python
"""Train the bundled demo PIIP-LLaVA from nothing, on the CPU, with the recipe in scripts/demo_recipe.

No pretrained weights can be downloaded here, so the default model of `piip-llava chat` is one we
train ourselves on the synthetic shapes-and-text dataset (`piip_llava.synthetic`): a two-branch
PIIP encoder (a wide ResNet at 64 px and a narrow one at 256 px, `configs/demo_piip_vision.json`),
a small LLaMA-style LLM and a tokenizer trained on the dataset's texts. Stage 0 gives the encoder
and the LLM the pretraining real backbones have (`demo_recipe.pretraining`); then
`piip-llava train` runs stage 1 (projector only, `plain` captions) and stage 2 (`vicuna_v1`
conversations, backbones fixed), and `piip-llava eval` scores held-out TextVQA-format and
MMBench-format splits. Stage 0's encoder trains in a child process beside the LLM unless
`--no-stage-zero-side-by-side`; bf16 is on where the CPU has it in hardware (`Recipe.bf16`), and
`--no-language-pretraining-bf16` keeps the stage-0 LLM in float32. How long each step takes on 2
cores is in docs/training.md; the log gives each step's time.
Every step resumes or is skipped when run again.

    python scripts/train_demo_model.py --work-dir outputs/demo --install --large-check 600

`--install` copies the model and processor into piip_llava/assets/demo_model (the package's
default model), the evaluation results into docs/demo_model_results.json and a table of them beside
chance and the majority answer into docs/demo_model_results.md. `--large-check 600` also scores the
model, after training, on a 600-image held-out split (100 questions per type) and adds it to both.
Run on a finished work directory, every step is skipped and only the checks and the install happen.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from demo_recipe.pipeline import (
    TEXT_KINDS,
    Recipe,
    configure_script_logging,
    evaluate,
    evaluate_on_larger_split,
    export_data,
    pretrain_stage_zero,
    train_two_stages,
)

from piip_llava.synthetic.questions import QUESTION_TYPES

REPO = Path(__file__).resolve().parent.parent
DEMO_VISION_CONFIG = REPO / "configs" / "demo_piip_vision.json"
INSTALL_DIR = REPO / "piip_llava" / "assets" / "demo_model"
RESULTS_FILE = REPO / "docs" / "demo_model_results.json"
RESULTS_TABLE = REPO / "docs" / "demo_model_results.md"
SIZE_BUDGET_BYTES = 30 * 10**6
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
)

logger = logging.getLogger("train_demo_model")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="outputs/demo", type=Path)
    parser.add_argument("--install", action="store_true", help="copy the trained model into the package")
    parser.add_argument("--large-check", type=int, default=0, metavar="IMAGES",
                        help="also score the model on a larger held-out split of this many images (after training, "
                             "outside its time budget; 600 gives 100 questions per type)")
    Recipe.add_arguments(parser)
    return parser.parse_args(argv)


def results_markdown(results: dict, stats: dict) -> str:
    """The held-out scores per question type beside uniform chance and the majority-answer baseline, as markdown."""
    chance, majority = stats["chance_accuracy"], stats["majority_answer_accuracy"]
    by_type, mmbench, by_likelihood = results["textvqa_by_type"], results["mmbench"], results["mmbench_likelihood"]
    lines = [
        ("| question type | TextVQA format | chance | majority answer | MMBench format (vanilla) | chance "
         "| majority answer | MMBench circular | chance | MMBench replies naming no option "
         "| MMBench by likelihood (vanilla) | MMBench by likelihood (circular) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for question_type in QUESTION_TYPES:
        category = mmbench["per_category"][question_type]
        likely = by_likelihood["per_category"][question_type]
        lines.append(
            f"| {question_type} ({by_type[question_type]['samples']} + {category['questions']} questions) "
            f"| {by_type[question_type]['accuracy']:.0f} | {100 * chance['textvqa'][question_type]:.1f} "
            f"| {100 * majority['textvqa'][question_type]:.0f} | {category['vanilla_accuracy']:.0f} "
            f"| {100 * chance['mmbench'][question_type]['vanilla']:.0f} "
            f"| {100 * majority['mmbench_vanilla'][question_type]:.0f} "
            f"| {category['circular_accuracy']:.0f} | {100 * chance['mmbench'][question_type]['circular']:.1f} "
            f"| {category['vanilla_no_option_percent']:.0f} "
            f"| {likely['vanilla_accuracy']:.0f} | {likely['circular_accuracy']:.0f} |"
        )
    # Every MMBench-format question has the same number of options, so one type's chance is the split's.
    split_chance = chance["mmbench"][QUESTION_TYPES[0]]
    lines.append(
        f"| all | {results['textvqa']['accuracy']:.1f} | | | {mmbench['vanilla_accuracy']:.1f} "
        f"| {100 * split_chance['vanilla']:.0f} | | {mmbench['circular_accuracy']:.1f} "
        f"| {100 * split_chance['circular']:.1f} | | {by_likelihood['vanilla_accuracy']:.1f} "
        f"| {by_likelihood['circular_accuracy']:.1f} |"
    )
    return "\n".join(lines) + "\n"


TEXT_TYPE_NAMES = {"text_large": "large text", "text_small": "small text"}


def text_kinds_markdown(results: dict) -> str:
    """The text questions' scores split by what is written (a word or a number), as markdown."""
    by_kind = results["text_by_kind"]
    lines = [
        ("| text questions | TextVQA format | MMBench format (vanilla) | MMBench circular "
         "| MMBench replies naming no option | MMBench by likelihood (vanilla) | MMBench by likelihood (circular) "
         "| questions (TextVQA + MMBench) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for question_type, name in TEXT_TYPE_NAMES.items():
        for kind in TEXT_KINDS:
            open_format = by_kind["textvqa"][question_type][kind]
            choice = by_kind["mmbench"][question_type][kind]
            likely = by_kind["mmbench_likelihood"][question_type][kind]
            lines.append(
                f"| {name}: {kind} | {open_format['accuracy']:.0f} | {choice['vanilla_accuracy']:.0f} "
                f"| {choice['circular_accuracy']:.0f} | {choice['vanilla_no_option_percent']:.0f} "
                f"| {likely['vanilla_accuracy']:.0f} | {likely['circular_accuracy']:.0f} "
                f"| {open_format['samples']} + {choice['questions']} |"
            )
    return "\n".join(lines) + "\n"


def split_section(title: str, results: dict, stats: dict) -> list[str]:
    """One held-out split's tables: every question type, then the text questions by what is written."""
    parts = [title, results_markdown(results, stats)]
    if "text_by_kind" in results:
        parts += ["\nThe text questions by what is written (chance as above):\n\n", text_kinds_markdown(results)]
    return parts


def results_document(results: dict, stats: dict, check: dict | None = None, check_stats: dict | None = None) -> str:
    """The results page: the training run's own held-out split and, when scored, the larger one."""
    images = stats["eval"]["images"]
    parts = [
        "# Bundled demo model: held-out accuracy (%)\n\n",
        ("Written by `scripts/train_demo_model.py --install`. Chance is a uniform guess among the possible answers; "
         "\"majority answer\" always gives the split's most frequent answer (for MMBench, letter). Circular: a "
         "question counts only when every rotation of its options is answered right. \"Naming no option\": the "
         "share of the MMBench-format replies (original order of the options) that the answer matching could not "
         "map to any option, such as a misread word; each of them scores as a wrong answer. \"By likelihood\": the "
         "same MMBench-format questions answered by the option the model is most likely to reply with "
         "(`piip-llava eval mmbench --answer-by likelihood`, lm-evaluation-harness's way of scoring multiple "
         "choice), which every reply names; it shows what the model knows about the options, beside MMBench's "
         "own generation protocol, not in its place.\n\n"),
        *split_section(f"## The training run's held-out split ({images} images)\n\n", results, stats),
    ]
    if check is not None:
        parts += split_section(f"\n## A larger held-out split from the same generator "
                               f"({check_stats['eval']['images']} images)\n\n", check, check_stats)
    return "".join(parts)


def install(model_dir: Path, results: dict, stats: dict, check: dict | None = None,
            check_stats: dict | None = None) -> None:
    """Copy the trained model and processor files (no checkpoints) into the package, and the scores into docs/."""
    size = sum((model_dir / name).stat().st_size for name in MODEL_FILES)
    if size > SIZE_BUDGET_BYTES:
        raise SystemExit(f"error: the model's files take {size / 1e6:.1f} MB, over the package's "
                         f"{SIZE_BUDGET_BYTES / 1e6:.0f} MB budget; not installed.")
    INSTALL_DIR.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(model_dir / name, INSTALL_DIR / name)
    size = sum(path.stat().st_size for path in INSTALL_DIR.iterdir()) / 2**20
    RESULTS_FILE.write_text(json.dumps({**results, **({"large_check": check} if check else {})}, indent=2) + "\n")
    RESULTS_TABLE.write_text(results_document(results, stats, check, check_stats))
    logger.info(f"installed the demo model into {INSTALL_DIR} ({size:.1f} MiB); scores in {RESULTS_FILE} and {RESULTS_TABLE}")


def main(argv=None) -> int:
    configure_script_logging()
    args = parse_arguments(argv)
    recipe = Recipe.from_arguments(args)
    work_dir = args.work_dir.resolve()
    data_dir = export_data(work_dir / "data", recipe)
    llm_dir, encoder_dir = pretrain_stage_zero(work_dir, data_dir, work_dir / "piip", DEMO_VISION_CONFIG, recipe)
    model_dir = train_two_stages(work_dir / "piip", encoder_dir, data_dir, llm_dir, recipe)
    results = evaluate(work_dir / "piip" / "eval", data_dir, model_dir, recipe)
    logger.info("TextVQA-format accuracy per question type: " + json.dumps(results["textvqa_by_type"]))
    check, check_stats = None, None
    if args.large_check:
        # The same place as scripts/piip_experiment.py scores its `piip` variant, so either script reuses the other's.
        check, check_stats = evaluate_on_larger_split(work_dir, work_dir / "piip" / "large_check" / "eval",
                                                      model_dir, recipe, args.large_check)
    if args.install:
        install(model_dir, results, json.loads((data_dir / "stats.json").read_text()), check, check_stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
