"""Synthetic detection and segmentation data: the shapes scenes with each shape's box, mask and class.

The scenes are the PIIP-LLaVA dataset's own (`scenes.py`): one to four coloured shapes in the cells
of a 3x3 grid's middle cross, and a printed word or number in a corner, which is background here
(a distractor the models must learn to ignore). Each shape is an object of its kind (`circle`,
`square`, `triangle`, `star`, `cross`); its mask is drawn by the very function that draws it in the
image, so masks, boxes and pixels agree exactly, and shapes never overlap (one per cell).

Label ids are the models' 0-based class ids (`CATEGORY_NAMES`) in every format, the COCO files
included; the semantic maps use 0 for background and 1 + the class id for a shape's pixels
(`SEGMENTATION_LABELS`).

    examples = generate_examples(200, split="train", seed=0)
    coco = coco_annotations(examples)           # COCO detection format, masks as RLE
    dataset = to_hf_dataset(examples)           # a `datasets.Dataset` with boxes and semantic maps
    export_shapes_dataset("data/shapes", seed=0, num_train_images=800, num_eval_images=200)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scenes import SHAPE_KINDS, Scene, Shape, draw_shape, generate_scene, render_scene

CATEGORY_NAMES = SHAPE_KINDS
SEGMENTATION_LABELS = ("background", *SHAPE_KINDS)
DEFAULT_DETECTION_IMAGE_SIZE = 96
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class ShapeObject:
    """One shape as an object: its class id, its COCO box `(x, y, width, height)` around its mask's
    pixels (a pixel (i, j) covers [j, j+1) x [i, i+1)), and the mask itself (height x width, bool)."""

    category_id: int
    bbox: tuple[float, float, float, float]
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class ShapesExample:
    """One image with its objects and its semantic map (0 background, 1 + class id on a shape)."""

    image_id: int
    image: Image.Image
    objects: tuple[ShapeObject, ...]
    semantic_map: np.ndarray


def shape_mask(shape: Shape, image_size: int) -> np.ndarray:
    """The pixels `draw_shape` paints for `shape`, drawn alone on a black canvas (every palette colour
    has a non-zero channel)."""
    canvas = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw_shape(ImageDraw.Draw(canvas), shape)
    return np.asarray(canvas).any(axis=-1)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The COCO box `(x, y, width, height)` enclosing a non-empty mask's pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("An empty mask has no box.")
    return (float(columns[0]), float(rows[0]), float(columns[-1] + 1 - columns[0]), float(rows[-1] + 1 - rows[0]))


def scene_objects(scene: Scene) -> tuple[ShapeObject, ...]:
    """Every shape of the scene as an object (shapes too small to paint a pixel are left out)."""
    objects = []
    for shape in scene.shapes:
        mask = shape_mask(shape, scene.image_size)
        if mask.any():
            objects.append(ShapeObject(CATEGORY_NAMES.index(shape.kind), mask_box(mask), mask))
    return tuple(objects)


def semantic_map(objects: tuple[ShapeObject, ...], image_size: int) -> np.ndarray:
    """(height, width) uint8: 0 for background (the text included), 1 + class id on each shape."""
    labels = np.zeros((image_size, image_size), dtype=np.uint8)
    for shape_object in objects:
        labels[shape_object.mask] = shape_object.category_id + 1
    return labels


def generate_examples(
    num_images: int, split: str, seed: int = 0, image_size: int = DEFAULT_DETECTION_IMAGE_SIZE, first_id: int = 0
) -> list[ShapesExample]:
    """`num_images` examples of `split`; each is drawn from its own seed (dataset seed, split, index),
    so the splits never share a random stream and any image can be rebuilt alone."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    examples = []
    for index in range(num_images):
        scene = generate_scene(random.Random(f"shapes-{seed}-{split}-{index}"), image_size=image_size)
        objects = scene_objects(scene)
        examples.append(
            ShapesExample(
                image_id=first_id + index,
                image=render_scene(scene),
                objects=objects,
                semantic_map=semantic_map(objects, image_size),
            )
        )
    return examples


def coco_annotations(examples: list[ShapesExample], file_names: list[str] | None = None) -> dict:
    """The examples in COCO's detection format (`images`, `annotations` with RLE masks, `categories`)."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for position, example in enumerate(examples):
        width, height = example.image.size
        file_name = file_names[position] if file_names else f"{example.image_id:06d}.png"
        images.append({"id": example.image_id, "width": width, "height": height, "file_name": file_name})
        for shape_object in example.objects:
            rle = mask_utils.encode(np.asfortranarray(shape_object.mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": example.image_id,
                    "category_id": shape_object.category_id,
                    "bbox": list(shape_object.bbox),
                    "area": shape_object.area,
                    "iscrowd": 0,
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                }
            )
    categories = [{"id": index, "name": name, "supercategory": "shape"} for index, name in enumerate(CATEGORY_NAMES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def to_hf_dataset(examples: list[ShapesExample]):
    """A `datasets.Dataset`: `image`, `image_id`, `objects` (`bbox` in COCO xywh, `category`, `area`)
    and `semantic_map` (an 8-bit image of the class ids, 0 background)."""
    import datasets

    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=list(CATEGORY_NAMES)),
                    "area": datasets.Value("int64"),
                }
            ),
            "semantic_map": datasets.Image(),
        }
    )
    records = {
        "image_id": [example.image_id for example in examples],
        "image": [example.image for example in examples],
        "objects": [
            {
                "bbox": [list(shape_object.bbox) for shape_object in example.objects],
                "category": [shape_object.category_id for shape_object in example.objects],
                "area": [shape_object.area for shape_object in example.objects],
            }
            for example in examples
        ],
        "semantic_map": [Image.fromarray(example.semantic_map, mode="L") for example in examples],
    }
    return datasets.Dataset.from_dict(records, features=features)


def export_shapes_dataset(
    out_dir: str | Path,
    seed: int = 0,
    num_train_images: int = 800,
    num_eval_images: int = 200,
    image_size: int = DEFAULT_DETECTION_IMAGE_SIZE,
) -> dict[str, list[ShapesExample]]:
    """Write `images/{split}_NNNNNN.png`, `annotations/{split}.json` (COCO) and `hf/{split}` (a
    `datasets` dataset saved with `save_to_disk`); return the examples of each split."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(exist_ok=True)
    splits = {}
    counts = {"train": num_train_images, "eval": num_eval_images}
    for split, count in counts.items():
        first_id = 0 if split == "train" else num_train_images
        examples = generate_examples(count, split, seed=seed, image_size=image_size, first_id=first_id)
        file_names = [f"{split}_{example.image_id:06d}.png" for example in examples]
        for example, file_name in zip(examples, file_names):
            example.image.save(out_dir / "images" / file_name)
        coco = coco_annotations(examples, file_names)
        (out_dir / "annotations" / f"{split}.json").write_text(json.dumps(coco), encoding="utf-8")
        to_hf_dataset(examples).save_to_disk(str(out_dir / "hf" / split))
        splits[split] = examples
    return splits


__all__ = [
    "CATEGORY_NAMES",
    "SEGMENTATION_LABELS",
    "ShapeObject",
    "ShapesExample",
    "coco_annotations",
    "export_shapes_dataset",
    "generate_examples",
    "mask_box",
    "scene_objects",
    "semantic_map",
    "shape_mask",
    "to_hf_dataset",
]
