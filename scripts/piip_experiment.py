#!/usr/bin/env python
"""The PIIP claim in miniature: a two-branch pyramid against single-branch baselines, trained the same way.

Variants (all trained by the same recipe on the same synthetic data, LLM and tokenizer as the
bundled demo model, see `demo_recipe.pipeline`):
- `piip`: the demo encoder, a wide ResNet at 64 px + a narrow ResNet (half the width) at 256 px,
  with interactions;
- `large_low`: the wide ResNet alone at 64 px (the pyramid's large branch alone);
- `small_high`: the narrow ResNet alone at 256 px (the pyramid's small branch alone);
- `large_high`: the wide ResNet alone at 256 px, the "just use the big model at high resolution"
  baseline.

The branches are ResNets because, trained from random weights on a CPU budget, ConvNeXt and ViT
branches did not learn to tell the shapes apart or to read (see docs/training.md); all four
variants share the branch family, so they differ only in widths, resolutions and interactions.

Each variant is scored by the evaluation harness per question type, on the run's own held-out split and
on a larger one (`--large-check`, 600 images by default), MMBench-format questions both by generation
and by likelihood (`piip-llava eval mmbench --answer-by likelihood`); the encoder GFLOPs come from
`piip_llava.flops`. Writes docs/piip_experiment_table.md, docs/piip_experiment.json and
docs/piip_experiment.png (accuracy against GFLOPs). Hours on 2 cores when run from scratch; run it
in the background, it resumes where it stopped:

    nohup python scripts/piip_experiment.py --work-dir outputs/demo > outputs/piip_experiment.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from demo_recipe.pipeline import (
    Recipe,
    configure_script_logging,
    evaluate,
    evaluate_on_larger_split,
    export_data,
    pretrain_stage_zero,
    pretrain_vision_encoder,
    train_two_stages,
)

from piip_llava.file_writing import atomic_write_text
from piip_llava.flops import count_encoder_cost, load_vision_config

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
QUESTION_TYPES = ("colour", "shape", "count", "position", "text_large", "text_small")

logger = logging.getLogger("piip_experiment")


@dataclass(frozen=True)
class Variant:
    name: str
    vision_config: str
    description: str


VARIANTS = (
    Variant("piip", "demo_piip_vision.json", "PIIP: ResNet-256w @64 + ResNet-128w @256, interactions"),
    Variant("large_low", "experiment_large_branch_low_res.json", "large branch alone: ResNet-256w @64"),
    Variant("small_high", "experiment_small_branch_high_res.json", "small branch alone: ResNet-128w @256"),
    Variant("large_high", "experiment_large_branch_high_res.json", "large branch alone: ResNet-256w @256"),
)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="outputs/demo", type=Path)
    parser.add_argument("--variants", nargs="+", default=[variant.name for variant in VARIANTS])
    parser.add_argument("--large-check", type=int, default=600, metavar="IMAGES",
                        help="also score every variant on a larger held-out split of this many images (0: only the "
                             "run's own split); 600 gives 100 questions per type and format")
    parser.add_argument("--large-check-by-likelihood", action=argparse.BooleanOptionalAction, default=True,
                        help="also answer the larger split's MMBench questions by likelihood (every option of "
                             "every round is scored, the costliest part; the run's own split always is)")
    Recipe.add_arguments(parser)
    return parser.parse_args(argv)


def encoder_cost(config_path: Path) -> dict:
    cost = count_encoder_cost(load_vision_config(str(config_path)))
    return {"gflops": cost.gflops, "parameters_m": cost.parameters / 1e6}


def split_summary(results: dict, images: int) -> dict:
    """One held-out split's scores: TextVQA format per type, MMBench format by generation and by likelihood."""
    by_likelihood = results.get("mmbench_likelihood", {})
    return {
        "images": images,
        "textvqa_accuracy": results["textvqa"]["accuracy"],
        "by_type": {name: results["textvqa_by_type"].get(name, {}).get("accuracy") for name in QUESTION_TYPES},
        "mmbench_vanilla": results["mmbench"].get("vanilla_accuracy"),
        "mmbench_circular": results["mmbench"].get("circular_accuracy"),
        "mmbench_likelihood_vanilla": by_likelihood.get("vanilla_accuracy"),
        "mmbench_likelihood_by_type": {name: by_likelihood.get("per_category", {}).get(name, {}).get("vanilla_accuracy")
                                       for name in QUESTION_TYPES},
    }


def summarise(variant: Variant, cost: dict, splits: list[dict]) -> dict:
    return {"variant": variant.name, "description": variant.description, **cost, "splits": splits}


TEXT_TYPES = ("text_large", "text_small")


def markdown_table(rows: list[dict], split_index: int, chance: dict | None) -> str:
    """One held-out split: every variant's accuracy per question type, in the TextVQA and MMBench formats."""
    header = ["variant", "encoder", "GFLOPs", "params (M)", "TextVQA-fmt all", *QUESTION_TYPES,
              "MMB-fmt vanilla", "MMB-fmt circular", "MMB by likelihood", *(f"MMB by likelihood: {name}"
                                                                           for name in TEXT_TYPES)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]

    def cell(value):
        return "-" if value is None else f"{value:.1f}"

    for row in rows:
        split = row["splits"][split_index]
        cells = [row["variant"], row["description"], f"{row['gflops']:.3f}", f"{row['parameters_m']:.2f}",
                 cell(split["textvqa_accuracy"]), *(cell(split["by_type"][name]) for name in QUESTION_TYPES),
                 cell(split["mmbench_vanilla"]), cell(split["mmbench_circular"]),
                 cell(split["mmbench_likelihood_vanilla"]),
                 *(cell(split["mmbench_likelihood_by_type"][name]) for name in TEXT_TYPES)]
        lines.append("| " + " | ".join(cells) + " |")
    if chance:
        chance_cells = ["chance", "", "", "", "", *(cell(100 * chance[name]) if name in chance else "-"
                                                    for name in QUESTION_TYPES), "25.0", "0.4", "25.0", "25.0", "25.0"]
        lines.append("| " + " | ".join(chance_cells) + " |")
    return "\n".join(lines) + "\n"


def results_document(rows: list[dict], chance: dict | None) -> str:
    """A table per held-out split, the larger split (more questions per type, smaller error) first."""
    order = sorted(range(len(rows[0]["splits"])), key=lambda index: -rows[0]["splits"][index]["images"])
    parts = []
    for index in order:
        images = rows[0]["splits"][index]["images"]
        parts.append(f"Held-out split of {images} images ({images // len(QUESTION_TYPES)} questions per type and "
                     "format), accuracy in %:\n\n" + markdown_table(rows, index, chance))
    return "\n".join(parts)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against encoder GFLOPs on the largest held-out split: all questions, small text, large text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max(range(len(rows[0]["splits"])), key=lambda index: rows[0]["splits"][index]["images"])
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for series, label, marker in (("textvqa_accuracy", "all questions", "o"), ("text_small", "small text", "s"),
                                  ("text_large", "large text", "^")):
        for row in rows:
            split = row["splits"][largest]
            value = split[series] if series == "textvqa_accuracy" else split["by_type"][series]
            if value is None:
                continue
            axis.scatter(row["gflops"], value, marker=marker, color=f"C{QUESTION_TYPES.index(series) % 10}"
                         if series in QUESTION_TYPES else "C0", label=label)
            axis.annotate(row["variant"], (row["gflops"], value), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=8)
    axis.set_xlabel("vision encoder GFLOPs (multiply-adds) per image")
    axis.set_ylabel(f"TextVQA-format accuracy, {rows[0]['splits'][largest]['images']} held-out images (%)")
    axis.set_title("PIIP vs single-branch baselines (synthetic data, 2-core CPU training)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    configure_script_logging()
    args = parse_arguments(argv)
    recipe = Recipe.from_arguments(args)
    work_dir = args.work_dir.resolve()
    data_dir = export_data(work_dir / "data", recipe)
    chosen = [variant for variant in VARIANTS if variant.name in args.variants]
    # The first variant's encoder trains beside the shared LLM; the others' after it, one by one.
    llm_dir, _ = pretrain_stage_zero(work_dir, data_dir, work_dir / chosen[0].name,
                                     REPO / "configs" / chosen[0].vision_config, recipe)
    rows = []
    for variant in chosen:
        config_path = REPO / "configs" / variant.vision_config
        run_dir = work_dir / variant.name
        encoder_dir = pretrain_vision_encoder(run_dir, config_path, recipe)
        model_dir = train_two_stages(run_dir, encoder_dir, data_dir, llm_dir, recipe)
        results = evaluate(run_dir / "eval", data_dir, model_dir, recipe)
        splits = [split_summary(results, recipe.eval_images)]
        if args.large_check:
            larger, _ = evaluate_on_larger_split(work_dir, run_dir / "large_check" / "eval", model_dir, recipe,
                                                 args.large_check, args.large_check_by_likelihood)
            splits.append(split_summary(larger, args.large_check))
        rows.append(summarise(variant, encoder_cost(config_path), splits))
        logger.info(f"{variant.name}: " + json.dumps(rows[-1]))
        chance = json.loads((data_dir / "stats.json").read_text())["chance_accuracy"]["textvqa"]
        DOCS.mkdir(exist_ok=True)
        atomic_write_text(DOCS / "piip_experiment.json", json.dumps({"recipe": vars(recipe), "rows": rows}, indent=2))
        atomic_write_text(DOCS / "piip_experiment_table.md", results_document(rows, chance))
        plot(rows, DOCS / "piip_experiment.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
