#!/usr/bin/env python
"""Train the bundled demo PIIP-LLaVA from nothing, on the CPU, with the project's own pipeline.

No pretrained weights can be downloaded here, so the default model of `piip-llava chat` is one we
train ourselves on the synthetic shapes-and-text dataset (`piip_llava.synthetic`): a two-branch
PIIP encoder (a wide ResNet at 64 px and a narrow one at 256 px, `configs/demo_piip_vision.json`),
a small LLaMA-style LLM and a tokenizer trained on the dataset's texts. Stage 0 gives the encoder
and the LLM the pretraining real backbones have (`piip_llava.synthetic.pretraining`); then
`piip-llava train` runs stage 1 (projector only, `plain` captions) and stage 2 (`vicuna_v1`
conversations, backbones fixed), and `piip-llava eval` scores held-out TextVQA-format and
MMBench-format splits. 27 minutes from scratch on 2 cores (stage-0 LLM 8.7, stage-0 encoder 6.9,
stage 1 1.7, stage 2 9.1, evaluation 0.4); the log gives each step's time.
Every step resumes or is skipped when run again.

    python scripts/train_demo_model.py --work-dir outputs/demo --install

`--install` copies the model and processor into piip_llava/assets/demo_model (the package's
default model), the evaluation results into docs/demo_model_results.json and a table of them beside
chance and the majority answer into docs/demo_model_results.md. Run on a finished work directory,
every step is skipped and only the install happens.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from piip_llava.synthetic.pipeline import (
    Recipe,
    evaluate,
    export_data,
    pretrain_llm,
    pretrain_vision_encoder,
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
    Recipe.add_arguments(parser)
    return parser.parse_args(argv)


def results_markdown(results: dict, stats: dict) -> str:
    """The held-out scores per question type beside uniform chance and the majority-answer baseline, as markdown."""
    chance, majority = stats["chance_accuracy"], stats["majority_answer_accuracy"]
    by_type, mmbench = results["textvqa_by_type"], results["mmbench"]
    lines = [
        "| question type | TextVQA format | chance | majority answer | MMBench format (vanilla) | chance | majority answer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for question_type in QUESTION_TYPES:
        category = mmbench["per_category"][question_type]
        lines.append(
            f"| {question_type} ({by_type[question_type]['samples']} + {category['questions']} questions) "
            f"| {by_type[question_type]['accuracy']:.0f} | {100 * chance['textvqa'][question_type]:.1f} "
            f"| {100 * majority['textvqa'][question_type]:.0f} | {category['vanilla_accuracy']:.0f} "
            f"| {100 * chance['mmbench'][question_type]['vanilla']:.0f} "
            f"| {100 * majority['mmbench_vanilla'][question_type]:.0f} |"
        )
    # Every MMBench-format question has the same number of options, so one type's chance is the split's.
    split_chance = chance["mmbench"][QUESTION_TYPES[0]]
    lines.append(
        f"| all | {results['textvqa']['accuracy']:.1f} | | | {mmbench['vanilla_accuracy']:.1f} "
        f"(circular {mmbench['circular_accuracy']:.1f}, chance {100 * split_chance['circular']:.1f}) "
        f"| {100 * split_chance['vanilla']:.0f} | |"
    )
    return "\n".join(lines) + "\n"


def install(model_dir: Path, results: dict, stats: dict) -> None:
    """Copy the trained model and processor files (no checkpoints) into the package, and the scores into docs/."""
    size = sum((model_dir / name).stat().st_size for name in MODEL_FILES)
    if size > SIZE_BUDGET_BYTES:
        raise SystemExit(f"error: the model's files take {size / 1e6:.1f} MB, over the package's "
                         f"{SIZE_BUDGET_BYTES / 1e6:.0f} MB budget; not installed.")
    INSTALL_DIR.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(model_dir / name, INSTALL_DIR / name)
    size = sum(path.stat().st_size for path in INSTALL_DIR.iterdir()) / 2**20
    RESULTS_FILE.write_text(json.dumps(results, indent=2) + "\n")
    RESULTS_TABLE.write_text(results_markdown(results, stats))
    logger.info(f"installed the demo model into {INSTALL_DIR} ({size:.1f} MiB); scores in {RESULTS_FILE} and {RESULTS_TABLE}")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_arguments(argv)
    recipe = Recipe.from_arguments(args)
    work_dir = args.work_dir.resolve()
    data_dir = export_data(work_dir / "data", recipe)
    llm_dir = pretrain_llm(work_dir, data_dir, recipe)
    encoder_dir = pretrain_vision_encoder(work_dir / "piip", DEMO_VISION_CONFIG, recipe)
    model_dir = train_two_stages(work_dir / "piip", encoder_dir, data_dir, llm_dir, recipe)
    results = evaluate(work_dir / "piip" / "eval", data_dir, model_dir, recipe)
    logger.info("TextVQA-format accuracy per question type: " + json.dumps(results["textvqa_by_type"]))
    if args.install:
        install(model_dir, results, json.loads((data_dir / "stats.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
