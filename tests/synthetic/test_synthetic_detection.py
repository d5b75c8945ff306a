"""The synthetic detection / segmentation data: masks are the drawn pixels, boxes enclose them, COCO and
`datasets` exports carry the same objects, and the splits are deterministic and disjoint."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from piip_llava.synthetic.detection import (
    CATEGORY_NAMES,
    coco_annotations,
    export_shapes_dataset,
    generate_examples,
    mask_box,
    scene_objects,
    to_hf_dataset,
)
from piip_llava.synthetic.scenes import PALETTE, generate_scene, render_scene


@pytest.fixture(scope="module")
def examples():
    return generate_examples(12, "train", seed=5)


def test_masks_are_exactly_the_pixels_painted_in_each_shapes_colour():
    scene = generate_scene(random.Random("masks"), image_size=96)
    pixels = np.asarray(render_scene(scene))
    objects = scene_objects(scene)
    assert len(objects) == len(scene.shapes)
    for shape, shape_object in zip(scene.shapes, objects):
        assert CATEGORY_NAMES[shape_object.category_id] == shape.kind
        painted = np.all(pixels == PALETTE[shape.colour], axis=-1)
        # inside the shape's cell (shapes never leave their cell), the painted pixels are the mask
        x, y, width, height = (int(value) for value in shape_object.bbox)
        window = (slice(y, y + height), slice(x, x + width))
        assert np.array_equal(painted[window], shape_object.mask[window])
        assert not shape_object.mask[: y].any() and not shape_object.mask[y + height :].any()


def test_boxes_are_the_tightest_around_their_masks():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == (3.0, 2.0, 6.0, 3.0)
    with pytest.raises(ValueError, match="empty mask"):
        mask_box(np.zeros((4, 4), dtype=bool))


def test_semantic_maps_hold_one_plus_the_class_on_each_mask_and_zero_elsewhere(examples):
    for example in examples:
        expected = np.zeros_like(example.semantic_map)
        for shape_object in example.objects:
            expected[shape_object.mask] = shape_object.category_id + 1
        assert np.array_equal(example.semantic_map, expected)
        assert example.semantic_map.shape == (example.image.height, example.image.width)


def test_coco_export_has_the_standard_fields_and_rle_masks_decode_to_the_masks(examples):
    coco = coco_annotations(examples)
    assert [category["id"] for category in coco["categories"]] == list(range(len(CATEGORY_NAMES)))
    assert [image["id"] for image in coco["images"]] == [example.image_id for example in examples]
    objects = [shape_object for example in examples for shape_object in example.objects]
    assert len(coco["annotations"]) == len(objects)
    assert len({annotation["id"] for annotation in coco["annotations"]}) == len(objects)
    for annotation, shape_object in zip(coco["annotations"], objects):
        assert set(annotation) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
        decoded = mask_utils.decode({**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), shape_object.mask)
        assert annotation["area"] == int(mask_utils.area(mask_utils.encode(np.asfortranarray(decoded))))
        assert annotation["bbox"] == list(shape_object.bbox)
    json.dumps(coco)  # plain JSON types only


def test_hf_dataset_rows_carry_the_same_objects(examples):
    dataset = to_hf_dataset(examples)
    assert dataset.features["objects"]["category"].feature.names == list(CATEGORY_NAMES)
    row = dataset[3]
    assert row["objects"]["category"] == [shape_object.category_id for shape_object in examples[3].objects]
    assert row["objects"]["bbox"] == [list(shape_object.bbox) for shape_object in examples[3].objects]
    assert np.array_equal(np.asarray(row["semantic_map"]), examples[3].semantic_map)


def test_splits_are_deterministic_and_differ(tmp_path):
    first = generate_examples(3, "eval", seed=2)
    again = generate_examples(3, "eval", seed=2)
    train = generate_examples(3, "train", seed=2)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again))
    assert not any(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, train))
    with pytest.raises(ValueError, match="split must be one of"):
        generate_examples(1, "test")
    splits = export_shapes_dataset(tmp_path, seed=2, num_train_images=3, num_eval_images=2, image_size=64)
    coco = json.loads((tmp_path / "annotations" / "eval.json").read_text())
    assert [image["id"] for image in coco["images"]] == [3, 4]  # evaluation ids follow the training ones
    assert all((tmp_path / "images" / image["file_name"]).is_file() for image in coco["images"])
    assert len(splits["train"]) == 3
