"""Scores: mean IoU for semantic segmentation, COCO box mAP (pycocotools' COCOeval) for detection."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np


def confusion_matrix(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) pixel counts, rows the reference class, columns the predicted one."""
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape.")
    index = references.astype(np.int64).ravel() * num_labels + predictions.astype(np.int64).ravel()
    return np.bincount(index, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def mean_iou(confusion: np.ndarray) -> dict:
    """mIoU over the classes present in the references or the predictions (as mmseg's and `evaluate`'s
    mean_iou: a class absent from both has no IoU), per-class IoU and pixel accuracy."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(union > 0, intersection / union, np.nan)
    return {
        "mean_iou": float(np.nanmean(per_class)),
        "per_class_iou": [None if np.isnan(value) else float(value) for value in per_class],
        "pixel_accuracy": float(intersection.sum() / confusion.sum()),
    }


def foreground_iou(confusion: np.ndarray) -> float:
    """IoU of "any object class" (every class but 0, the background) against the background: whether the
    objects are found at all, whichever class they are given."""
    reference_foreground = confusion[1:].sum()
    predicted_foreground = confusion[:, 1:].sum()
    both = confusion[1:, 1:].sum()
    union = reference_foreground + predicted_foreground - both
    return float(both / union) if union else float("nan")


def coco_box_map(ground_truth: dict, detections: list[dict], class_agnostic: bool = False) -> dict:
    """COCO box AP / AR of `detections` (`image_id`, `category_id`, `bbox` xywh, `score`) against a COCO
    annotation dict, by pycocotools' COCOeval: `map` (AP@[.5:.95]), `map_50`, `map_75`, `map_small`...
    `class_agnostic` sets COCOeval's `useCats = 0`: boxes match whatever their class."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100"]
    if not detections:
        return dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
        coco = COCO()
        coco.dataset = copy.deepcopy(ground_truth)
        coco.createIndex()
        results = coco.loadRes(copy.deepcopy(detections))
        evaluation = COCOeval(coco, results, iouType="bbox")
        evaluation.params.useCats = 0 if class_agnostic else 1
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(names, evaluation.stats)}


__all__ = ["coco_box_map", "confusion_matrix", "foreground_iou", "mean_iou"]
