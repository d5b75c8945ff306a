#!/usr/bin/env python
"""Train a tiny PIIP segmenter (UperNet) and a tiny PIIP detector (RT-DETR) from nothing on the synthetic shapes.

Data: `piip_llava.synthetic.detection` scenes at 64 px (one to four shapes of five kinds, a printed
word or number as a distractor); a training split and a held-out split drawn from other seeds,
written in COCO format and as `datasets` datasets under `--work-dir/data`.
Models: transformers' `UperNetForSemanticSegmentation` and `RTDetrForObjectDetection` with a
two-branch PIIP backbone (a 64-wide DeiT branch at 32 px and a 32-wide one at 64 px, patch 8,
two layers and two interactions each), trained with `Trainer` (AdamW, linear warm-up, cosine decay).
Each task model is scored on the held-out split before training (its freshly initialised head:
the chance level) and after: mIoU, pixel accuracy and foreground IoU for segmentation, COCO box mAP
(and class-agnostic mAP) by pycocotools' COCOeval for detection. Results go to `--work-dir/<task>/results.json` and, with
every task done, to docs/perception_tasks_results.{json,md} and docs/perception_tasks_loss.png.

Launched with `deepspeed --num_gpus N scripts/train_perception_tasks.py ... --deepspeed scripts/zero2.json`
(or `accelerate launch`), it trains data-parallel; the main process evaluates and writes.
It resumes from the newest Trainer checkpoint in `--work-dir/<task>/trainer`. With the defaults the
segmenter took 6.8 minutes of CPU time on one thread (9.9 of wall time) and the detector 3.6 (20.7
of wall time: other runs and other people's jobs shared the 2 cores); docs/perception_tasks.md has
the figures:

    OMP_NUM_THREADS=1 nohup python scripts/train_perception_tasks.py --task segmentation > outputs/seg.log 2>&1 &
    OMP_NUM_THREADS=1 nohup python scripts/train_perception_tasks.py --task detection > outputs/det.log 2>&1 &
    python scripts/train_perception_tasks.py --report-only    # the docs tables and plots from the results
    python scripts/train_perception_tasks.py --task detection --backbone large-low   # a branch alone
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import (
    RTDetrForObjectDetection,
    TrainingArguments,
    UperNetForSemanticSegmentation,
    set_seed,
)

import piip_llava  # noqa: F401  (registers the PIIP configs and models with transformers)
from piip_llava.file_writing import atomic_write_text
from piip_llava.models.piip import PIIPPerceptionConfig
from piip_llava.perception_tasks import (
    detection_config,
    detection_image_processor,
    segmentation_config,
    segmentation_image_processor,
)
from piip_llava.perception_tasks.baselines import single_branch_config
from piip_llava.perception_tasks.cost import task_model_cost
from piip_llava.perception_tasks.training import evaluate_detector, evaluate_segmenter, train_task_model
from piip_llava.synthetic.detection import (
    CATEGORY_NAMES,
    SEGMENTATION_LABELS,
    export_shapes_dataset,
    generate_examples,
)

logger = logging.getLogger("train_perception_tasks")
TASKS = ("segmentation", "detection")
REPO = Path(__file__).resolve().parent.parent


def tiny_branch(image_size: int, width: int, heads: int, layers: int = 2, patch_size: int = 8) -> dict:
    return {
        "image_size": image_size, "hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
        "patch_size": patch_size, "position_grid": image_size // patch_size,
        "interaction_groups": [[index, index] for index in range(layers)],
    }  # fmt: skip


def tiny_backbone_config(image_size: int) -> PIIPPerceptionConfig:
    """Large branch (64 wide) at half the image size, small branch (32 wide) at the full size."""
    branches = [tiny_branch(image_size // 2, 64, 2), tiny_branch(image_size, 32, 1)]
    return PIIPPerceptionConfig(branches=branches, deform_num_heads=2, deform_num_points=4)


BACKBONES = {"piip": None, "large-low": 0, "small-high": 1}  # the pyramid, or one of its branches alone


def backbone_config_for(variant: str, image_size: int) -> PIIPPerceptionConfig:
    """The two-branch pyramid, or its large branch alone at its low resolution, or its small branch at the high one."""
    config = tiny_backbone_config(image_size)
    return config if BACKBONES[variant] is None else single_branch_config(config, BACKBONES[variant])


def run_name(task: str, variant: str) -> str:
    return task if variant == "piip" else f"{task}-{variant}"


def build_task_model(task: str, backbone_config: PIIPPerceptionConfig):
    """The tiny task model and its image processor."""
    if task == "segmentation":
        config = segmentation_config(
            backbone_config, dict(enumerate(SEGMENTATION_LABELS)), hidden_size=32, auxiliary_channels=16,
            pool_scales=[1, 2, 3],
        )  # fmt: skip
        return UperNetForSemanticSegmentation(config), segmentation_image_processor(backbone_config)
    config = detection_config(
        backbone_config, dict(enumerate(CATEGORY_NAMES)), d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=2, decoder_attention_heads=2, decoder_layers=2, num_queries=20, num_denoising=20,
    )  # fmt: skip
    return RTDetrForObjectDetection(config), detection_image_processor(backbone_config)


def evaluate(task: str, model, examples, image_processor) -> dict:
    if task == "segmentation":
        return evaluate_segmenter(model, examples, image_processor)
    return evaluate_detector(model, examples, image_processor)


def run_task(task: str, args) -> dict:
    work_dir = Path(args.work_dir) / run_name(task, args.backbone)
    results_path = work_dir / "results.json"
    if results_path.is_file():
        logger.info("%s: already done (%s)", task, results_path)
        return json.loads(results_path.read_text(encoding="utf-8"))
    set_seed(args.seed)
    train_examples = generate_examples(args.num_train_images, "train", seed=args.seed, image_size=args.image_size)
    eval_examples = generate_examples(
        args.num_eval_images, "eval", seed=args.seed, image_size=args.image_size, first_id=args.num_train_images
    )
    backbone_config = backbone_config_for(args.backbone, args.image_size)
    model, image_processor = build_task_model(task, backbone_config)
    cost = task_model_cost(model.config, args.image_size)
    logger.info("%s: %.2fM parameters, %.3f GFLOPs, backbone share %.1f%%", task, cost["parameters"] / 1e6,
                cost["gflops"], 100 * cost["backbone_macs_share"])  # fmt: skip
    untrained = evaluate(task, model, eval_examples, image_processor)
    logger.info("%s untrained: %s", task, {key: value for key, value in untrained.items() if key != "per_class_iou"})
    arguments = TrainingArguments(
        output_dir=str(work_dir / "trainer"),
        max_steps=args.max_steps[task],
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate[task],
        weight_decay=0.05,
        warmup_steps=max(1, args.max_steps[task] // 20),
        lr_scheduler_type="cosine",
        max_grad_norm=1.0 if task == "segmentation" else 0.1,
        logging_steps=10,
        save_steps=100,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        deepspeed=args.deepspeed,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    training = train_task_model(task, model, train_examples, image_processor, arguments)
    # Wall time depends on what else runs on the machine; the process's CPU time less so.
    training["wall_s"] = time.perf_counter() - started
    training["cpu_s"] = time.process_time() - cpu_started
    if not arguments.should_save:  # a DeepSpeed / accelerate worker other than the main process
        return {}
    trained = evaluate(task, model, eval_examples, image_processor)
    logger.info("%s trained: %s", task, {key: value for key, value in trained.items() if key != "per_class_iou"})
    model.save_pretrained(work_dir / "model")
    image_processor.save_pretrained(work_dir / "model")
    results = {
        "task": task,
        "backbone_variant": args.backbone,
        "model": type(model).__name__,
        "backbone": backbone_config.branches,
        "cost": cost,
        "settings": {
            "image_size": args.image_size, "num_train_images": args.num_train_images,
            "num_eval_images": args.num_eval_images, "max_steps": args.max_steps[task],
            "batch_size": args.batch_size, "learning_rate": args.learning_rate[task], "seed": args.seed,
            "threads": torch.get_num_threads(),
        },
        "untrained": untrained,
        "trained": trained,
        "training": training,
        "loss_curve": training.pop("loss_curve"),
    }
    atomic_write_text(results_path, json.dumps(results, indent=2))
    return results


def headline(task: str, scores: dict) -> str:
    if task == "segmentation":
        return (
            f"mIoU {100 * scores['mean_iou']:.1f}, pixel acc. {100 * scores['pixel_accuracy']:.1f}, "
            f"foreground IoU {100 * scores['foreground_iou']:.1f}"
        )
    agnostic = scores["class_agnostic"]
    return (
        f"mAP {100 * scores['map']:.1f}, AP50 {100 * scores['map_50']:.1f}; class-agnostic mAP "
        f"{100 * agnostic['map']:.1f}, AP50 {100 * agnostic['map_50']:.1f}"
    )


def write_report(results: dict[str, dict], docs_dir: Path) -> None:
    """docs/perception_tasks_results.{json,md} and the loss curves' plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs_dir / "perception_tasks_results.json", json.dumps(results, indent=2))
    lines = [
        "| task | model | params (M) | GFLOPs | backbone share of FLOPs | steps | wall (min) | CPU (min) | untrained head | trained |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for task, result in results.items():
        cost = result["cost"]
        lines.append(
            f"| {task} | {result['model']} | {cost['parameters'] / 1e6:.2f} | {cost['gflops']:.3f} "
            f"| {100 * cost['backbone_macs_share']:.1f}% | {result['training']['steps']} "
            f"| {result['training']['wall_s'] / 60:.1f} | {result['training']['cpu_s'] / 60:.1f} | {headline(task, result['untrained'])} "
            f"| **{headline(task, result['trained'])}** |"
        )
    lines.append("")
    lines.append(
        "Held-out split of the synthetic shapes (`scripts/train_perception_tasks.py`, written by it); "
        "GFLOPs = multiply-adds / 1e9 for one image."
    )
    atomic_write_text(docs_dir / "perception_tasks_results.md", "\n".join(lines) + "\n")
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for axis, (task, result) in zip(axes[0], results.items()):
        steps = [point["step"] for point in result["loss_curve"]]
        axis.plot(steps, [point["loss"] for point in result["loss_curve"]])
        axis.set_title(f"{task}: {result['model']}")
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
    figure.tight_layout()
    figure.savefig(docs_dir / "perception_tasks_loss.png", dpi=100)
    plt.close(figure)


def rescore(results_path: Path, args) -> None:
    """Score a finished run again with the current metrics: its saved model, and the same freshly initialised
    one (same seed, same construction) for the untrained figures."""
    from transformers import AutoModelForObjectDetection, AutoModelForSemanticSegmentation

    results = json.loads(results_path.read_text(encoding="utf-8"))
    task = results["task"]
    variant = results.setdefault("backbone_variant", "piip")  # runs from before `--backbone` are the pyramid
    settings = results["settings"]
    set_seed(settings["seed"])
    eval_examples = generate_examples(settings["num_eval_images"], "eval", seed=settings["seed"],
                                      image_size=settings["image_size"], first_id=settings["num_train_images"])  # fmt: skip
    untrained_model, image_processor = build_task_model(task, backbone_config_for(variant, settings["image_size"]))
    auto_class = AutoModelForSemanticSegmentation if task == "segmentation" else AutoModelForObjectDetection
    trained_model = auto_class.from_pretrained(results_path.parent / "model")
    results["untrained"] = evaluate(task, untrained_model, eval_examples, image_processor)
    results["trained"] = evaluate(task, trained_model, eval_examples, image_processor)
    logger.info("%s rescored: %s", results_path.parent.name, headline(task, results["trained"]))
    atomic_write_text(results_path, json.dumps(results, indent=2))


def load_results(work_dir: Path) -> dict[str, dict]:
    """Every finished run's results, by run name (`segmentation`, `segmentation-large-low`, ...)."""
    return {
        path.parent.name: json.loads(path.read_text(encoding="utf-8")) for path in sorted(work_dir.glob("*/results.json"))
    }


def write_comparison(task: str, results: list[dict], docs_dir: Path) -> None:
    """The pyramid against its branches alone: docs/perception_tasks_comparison_<task>.{md,png}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    descriptions = {"piip": "PIIP: both branches + interactions", "large-low": "large branch alone (64 wide, 32 px)",
                    "small-high": "small branch alone (32 wide, 64 px)"}  # fmt: skip
    lines = [
        "| backbone | backbone GFLOPs | task-model GFLOPs | backbone params (M) | held-out scores | final train loss |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for result in results:
        cost = result["cost"]
        lines.append(
            f"| {descriptions[result['backbone_variant']]} | {cost['backbone_gflops']:.4f} | {cost['gflops']:.4f} "
            f"| {cost['backbone_parameters'] / 1e6:.3f} | {headline(task, result['trained'])} "
            f"| {result['loss_curve'][-1]['loss']:.3f} |"
        )
    atomic_write_text(docs_dir / f"perception_tasks_comparison_{task}.md", "\n".join(lines) + "\n")
    metric, label = ("mean_iou", "held-out mIoU (%)") if task == "segmentation" else ("map", "held-out COCO mAP (%)")
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for result in results:
        point = (result["cost"]["backbone_gflops"], 100 * result["trained"][metric])
        axis.scatter(*point)
        axis.annotate(result["backbone_variant"], point)
    axis.set_xlabel("backbone GFLOPs (one 64 px image)")
    axis.set_ylabel(label)
    axis.set_title(f"{results[0]['model'].removesuffix('ForSemanticSegmentation').removesuffix('ForObjectDetection')}, synthetic shapes")
    figure.tight_layout()
    figure.savefig(docs_dir / f"perception_tasks_comparison_{task}.png", dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*TASKS, "both"], default="both")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="piip",
                        help="the PIIP pyramid, or one of its branches alone (the comparison in docs/perception_tasks.md)")
    parser.add_argument("--work-dir", default="outputs/perception_tasks")
    parser.add_argument("--docs-dir", default=str(REPO / "docs"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-train-images", type=int, default=4000)
    parser.add_argument("--num-eval-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--segmentation-steps", type=int, default=3000)
    parser.add_argument("--detection-steps", type=int, default=1000)
    parser.add_argument("--segmentation-lr", type=float, default=3e-3)
    parser.add_argument("--detection-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deepspeed", help="a DeepSpeed config (e.g. scripts/zero2.json), for a `deepspeed` launch")
    parser.add_argument("--export-data", action="store_true", help="also write the splits as COCO files and datasets")
    parser.add_argument("--report-only", action="store_true", help="write the docs from existing results")
    parser.add_argument("--rescore", action="store_true",
                        help="score every finished run again with the current metrics, then write the docs")
    args = parser.parse_args(argv)
    args.max_steps = {"segmentation": args.segmentation_steps, "detection": args.detection_steps}
    args.learning_rate = {"segmentation": args.segmentation_lr, "detection": args.detection_lr}
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    args = parse_args(argv)
    tasks = TASKS if args.task == "both" else (args.task,)
    if args.export_data:
        export_shapes_dataset(Path(args.work_dir) / "data", seed=args.seed, num_train_images=args.num_train_images,
                              num_eval_images=args.num_eval_images, image_size=args.image_size)  # fmt: skip
    if args.rescore:
        for results_path in sorted(Path(args.work_dir).glob("*/results.json")):
            rescore(results_path, args)
    elif not args.report_only:
        finished = [run_task(task, args) for task in tasks]
        if not all(finished):  # a worker process of a distributed launch: the main process evaluates and reports
            return 0
    results = load_results(Path(args.work_dir))
    if set(TASKS) <= set(results):
        write_report({task: results[task] for task in TASKS}, Path(args.docs_dir))
    else:
        logger.info("docs not written: results for %s are missing", sorted(set(TASKS) - set(results)))
    for task in TASKS:
        variants = [run_name(task, variant) for variant in BACKBONES]
        if set(variants) <= set(results):
            write_comparison(task, [results[name] for name in variants], Path(args.docs_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
