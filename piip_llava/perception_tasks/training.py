"""Training and evaluating the task models on the synthetic shapes data with transformers' `Trainer`.

The training split is a `datasets.Dataset` (`synthetic.detection.to_hf_dataset`) whose transform runs
the task model's own image processor, so what the model learns from is exactly what
`pipeline(...)` feeds it later. `Trainer` runs through accelerate (and DeepSpeed when
`TrainingArguments.deepspeed` names a config), as the PIIP-LLaVA training does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..synthetic.detection import SEGMENTATION_LABELS, ShapesExample, coco_annotations, to_hf_dataset
from .metrics import coco_box_map, confusion_matrix, foreground_iou, mean_iou


def segmentation_transform(image_processor) -> Callable[[dict], dict]:
    """A `datasets` transform: images and semantic maps to `pixel_values` and `labels` (class per pixel)."""

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch["image"]]
        encoded = image_processor(images, segmentation_maps=batch["semantic_map"], return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "labels": encoded["labels"].long()}

    return transform


def coco_targets(batch: dict) -> list[dict]:
    """One COCO-detection target per image (`image_id`, `annotations`) from a `to_hf_dataset` batch."""
    targets = []
    for image_id, objects in zip(batch["image_id"], batch["objects"]):
        annotations = [
            {"bbox": list(bbox), "category_id": category, "area": area, "iscrowd": 0}
            for bbox, category, area in zip(objects["bbox"], objects["category"], objects["area"])
        ]
        targets.append({"image_id": image_id, "annotations": annotations})
    return targets


def detection_transform(image_processor) -> Callable[[dict], dict]:
    """A `datasets` transform: images and objects to `pixel_values` and per-image `labels`
    (`class_labels`, `boxes` as normalised centre-x, centre-y, width, height)."""

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch["image"]]
        encoded = image_processor(images, annotations=coco_targets(batch), return_tensors="pt")
        labels = [{"class_labels": label["class_labels"], "boxes": label["boxes"]} for label in encoded["labels"]]
        return {"pixel_values": list(encoded["pixel_values"]), "labels": labels}

    return transform


def collate_segmentation(features: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([feature["pixel_values"] for feature in features]),
        "labels": torch.stack([feature["labels"] for feature in features]),
    }


def collate_detection(features: list[dict]) -> dict:
    """Images stacked; labels stay a list of per-image dicts (images hold different numbers of objects)."""
    return {
        "pixel_values": torch.stack([feature["pixel_values"] for feature in features]),
        "labels": [feature["labels"] for feature in features],
    }


def training_dataset(task: str, examples: list[ShapesExample], image_processor):
    """The examples as a `datasets.Dataset` whose rows are the task model's inputs."""
    transforms = {"segmentation": segmentation_transform, "detection": detection_transform}
    if task not in transforms:
        raise ValueError(f"task must be one of {sorted(transforms)}, got {task!r}.")
    return to_hf_dataset(examples).with_transform(transforms[task](image_processor))


def train_task_model(
    task: str, model, examples: list[ShapesExample], image_processor, arguments: TrainingArguments
) -> dict:
    """Train with `Trainer`, resuming from the newest checkpoint in `arguments.output_dir` if there is one;
    returns the mean training loss, the steps, the number of processes and the logged losses."""
    collators = {"segmentation": collate_segmentation, "detection": collate_detection}
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=training_dataset(task, examples, image_processor),
        data_collator=collators[task],
    )
    checkpoint = get_last_checkpoint(arguments.output_dir) if Path(arguments.output_dir).is_dir() else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    return {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "world_size": arguments.world_size,
        "loss_curve": [
            {"step": entry["step"], "loss": entry["loss"]} for entry in trainer.state.log_history if "loss" in entry
        ],
    }


@torch.no_grad()
def evaluate_segmenter(model, examples: list[ShapesExample], image_processor, batch_size: int = 16) -> dict:
    """mIoU, per-class IoU and pixel accuracy on the examples' full-resolution semantic maps, and the
    class-agnostic foreground IoU: a pixel is predicted to be on a shape when the shape classes'
    probabilities together exceed the background's, whichever shape class leads (it separates "finds
    the shapes" from "names them")."""
    model.eval()
    num_labels = model.config.num_labels
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    foreground = np.zeros((2, 2), dtype=np.int64)  # reference (background, shape) x predicted
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = image_processor([example.image for example in batch], return_tensors="pt")
        outputs = model(pixel_values=inputs["pixel_values"])
        sizes = [example.semantic_map.shape for example in batch]
        predictions = image_processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        for logits, prediction, example in zip(outputs.logits, predictions, batch):
            confusion += confusion_matrix(prediction.numpy(), example.semantic_map, num_labels)
            # the same resize as the post-processing, then P(any shape) > P(background) = 1/2
            resized = F.interpolate(logits[None], size=example.semantic_map.shape, mode="bilinear", align_corners=False)
            on_shape = (resized[0].softmax(dim=0)[0] < 0.5).numpy()
            foreground += confusion_matrix(on_shape, example.semantic_map > 0, 2)
    scores = mean_iou(confusion)
    scores["per_class_iou"] = dict(zip(SEGMENTATION_LABELS, scores["per_class_iou"]))
    scores["foreground_iou"] = foreground_iou(foreground)
    return scores


@torch.no_grad()
def predict_detections(
    model, examples: list[ShapesExample], image_processor, batch_size: int = 16
) -> list[dict]:
    """COCO result records (`image_id`, `category_id`, `bbox` xywh in pixels, `score`): RT-DETR's top
    `num_queries` (query, class) pairs per image at any score, as COCO's protocol counts them (up to 100)."""
    model.eval()
    detections = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = image_processor([example.image for example in batch], return_tensors="pt")
        outputs = model(pixel_values=inputs["pixel_values"])
        sizes = [(example.image.height, example.image.width) for example in batch]
        results = image_processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        for example, result in zip(batch, results):
            for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):
                x0, y0, x1, y1 = box.tolist()
                detections.append(
                    {
                        "image_id": example.image_id,
                        "category_id": int(label),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(score),
                    }
                )
    return detections


def evaluate_detector(model, examples: list[ShapesExample], image_processor, batch_size: int = 16) -> dict:
    """COCO box mAP (pycocotools) of the model's detections on the examples, and the class-agnostic one
    (under `class_agnostic`: boxes matched whatever their class)."""
    detections = predict_detections(model, examples, image_processor, batch_size=batch_size)
    ground_truth = coco_annotations(examples)
    scores = coco_box_map(ground_truth, detections)
    scores["class_agnostic"] = coco_box_map(ground_truth, detections, class_agnostic=True)
    return scores


__all__ = [
    "collate_detection",
    "collate_segmentation",
    "detection_transform",
    "evaluate_detector",
    "evaluate_segmenter",
    "predict_detections",
    "segmentation_transform",
    "train_task_model",
    "training_dataset",
]
