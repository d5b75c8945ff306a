"""One way to read an image: upright (EXIF), 16-bit greyscale scaled, the same in chat, training and evaluation."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
from PIL import Image

from piip_llava.images import UnreadableImageError, read_image

EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6  # EXIF: the stored pixels must be turned 90 degrees clockwise to be upright


def stored_pixels() -> Image.Image:
    """A wide picture whose halves differ, so a rotation cannot go unnoticed."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (200, 30, 30)
    pixels[:, 20:] = (30, 30, 200)
    pixels[:5] = (30, 200, 30)
    return Image.fromarray(pixels)


def save_rotated_photo(path) -> Image.Image:
    """Save a PNG whose EXIF says "rotate 90 degrees clockwise"; returns the picture as a viewer shows it."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    stored_pixels().save(path, exif=exif)
    return stored_pixels().transpose(Image.Transpose.ROTATE_270)


def save_sixteen_bit_ramp(path) -> np.ndarray:
    """A 16-bit greyscale PNG ramping over the whole range; returns its values."""
    values = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    Image.fromarray(values).save(path)
    return values


def test_an_exif_rotated_photo_is_read_upright(tmp_path):
    upright = save_rotated_photo(tmp_path / "photo.png")
    image = read_image(tmp_path / "photo.png")
    assert image.mode == "RGB" and image.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(upright))


def test_a_sixteen_bit_png_keeps_its_grey_levels(tmp_path):
    values = save_sixteen_bit_ramp(tmp_path / "ramp16.png")
    pixels = np.asarray(read_image(tmp_path / "ramp16.png"))
    assert pixels.shape == (16, 64, 3)
    # Every 16-bit value lands on its nearest 8-bit level (PIL's convert("RGB") clips: 5 levels survive).
    np.testing.assert_array_equal(pixels[..., 0], np.round(values / 257).astype(np.uint8))
    assert len(np.unique(pixels)) == 256


def test_palette_transparency_and_alpha_are_dropped_like_llava(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "alpha.png")), rgba[..., :3])


def test_unreadable_images_raise_one_clear_error(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="PNG")
    (tmp_path / "broken.png").write_bytes(buffer.getvalue()[:40])
    with pytest.raises(UnreadableImageError, match="cannot decode image .*broken.png"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(UnreadableImageError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")


@pytest.fixture
def awkward_images(tmp_path):
    """Files whose reading differs between loaders unless they share one: {file name: expected RGB pixels}."""
    upright = save_rotated_photo(tmp_path / "photo.png")
    values = save_sixteen_bit_ramp(tmp_path / "ramp16.png")
    grey = np.round(values / 257).astype(np.uint8)
    return {"photo.png": np.asarray(upright), "ramp16.png": np.repeat(grey[..., None], 3, axis=-1)}


def test_chat_reads_images_like_everyone_else(awkward_images, tmp_path, tiny_model_dir):
    from piip_llava.commands.chat import build_session

    for name, expected in awkward_images.items():
        args = argparse.Namespace(model=str(tiny_model_dir), image=str(tmp_path / name), device="cpu",
                                  dtype="float32", max_new_tokens=4, temperature=0.0)
        np.testing.assert_array_equal(np.asarray(build_session(args).image), expected, err_msg=name)


def test_training_data_reads_images_like_everyone_else(awkward_images, tmp_path):
    from piip_llava.training.records import load_rgb_image

    for name, expected in awkward_images.items():
        np.testing.assert_array_equal(np.asarray(load_rgb_image(name, tmp_path)), expected, err_msg=name)
        record_bytes = {"bytes": (tmp_path / name).read_bytes()}
        np.testing.assert_array_equal(np.asarray(load_rgb_image(record_bytes, None)), expected, err_msg=name)


def test_evaluation_reads_images_like_everyone_else(awkward_images, tmp_path):
    from piip_llava.evaluation.generation import GenerationSummary, load_batch_images
    from piip_llava.evaluation.textvqa import questions_from_jsonl

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": index, "image": name, "text": "What is it?"}) + "\n"
                                 for index, name in enumerate(awkward_images)))
    requests = questions_from_jsonl(questions, tmp_path).requests
    usable, images = load_batch_images(requests, GenerationSummary())
    assert len(usable) == len(awkward_images)
    for image, (name, expected) in zip(images, awkward_images.items()):
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=name)
