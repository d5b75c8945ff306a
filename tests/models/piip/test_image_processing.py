"""PIIPImageProcessor against an independent re-implementation of LLaVA-1.5's PIL pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from piip_llava.models.piip import PIIPVisionConfig
from piip_llava.models.piip.image_processing_piip import PIIPImageProcessor

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
LLAVA_PAD_COLOUR = (123, 116, 103)  # tuple(int(x * 255) for x in IMAGENET_MEAN)


# ----- the reference: what LLaVA-1.5 does, written with PIL and NumPy only ------------------------
def llava_expand2square(image: Image.Image, background: tuple) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def llava_reference(image: Image.Image, size: int, pad_to_square: bool) -> np.ndarray:
    """(3, size, size) float64: convert, [pad], shortest-edge bicubic resize, centre crop, rescale, normalise."""
    image = image.convert("RGB")
    if pad_to_square:
        image = llava_expand2square(image, LLAVA_PAD_COLOUR)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    image = image.resize((new_width, new_height), resample=Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float64)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    pixels = pixels[top : top + size, left : left + size]
    pixels = (pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return pixels.transpose(2, 0, 1)


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_in_mode(mode: str, width: int = 70, height: int = 45) -> Image.Image:
    rng = np.random.default_rng(1)
    if mode == "RGBA":
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        pixels[..., 3] = 0  # fully transparent: LLaVA keeps the colours, transformers' default would paint white
        return Image.fromarray(pixels, mode="RGBA")
    if mode == "P":
        palette_image = random_rgb(width, height).quantize(colors=16)
        palette_image.info["transparency"] = 0
        return palette_image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 400, (height, width), dtype=np.uint16))
    return random_rgb(width, height).convert(mode)


def as_numpy(pixel_values: torch.Tensor) -> np.ndarray:
    return pixel_values.numpy().astype(np.float64)


# ----- pipeline parity ---------------------------------------------------------------------------
@pytest.mark.parametrize("pad_to_square", [False, True])
@pytest.mark.parametrize("width, height", [(90, 50), (50, 90), (64, 64), (33, 101), (200, 199)])
def test_matches_llava_pipeline(width, height, pad_to_square):
    image = random_rgb(width, height, seed=width * 1000 + height)
    processor = PIIPImageProcessor(size=64, pad_to_square=pad_to_square)
    pixel_values = processor(image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    assert pixel_values.dtype == torch.float32
    np.testing.assert_allclose(as_numpy(pixel_values[0]), llava_reference(image, 64, pad_to_square), rtol=0, atol=1e-6)


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640), (1001, 333), (333, 1001), (337, 100), (100, 337)])
def test_padded_images_shrink_exactly_as_llava_does(width, height, monkeypatch):
    """Padding no longer builds the full-size square, and the pixels are still LLaVA's, to the bit."""
    from piip_llava.models.piip import image_processing_piip

    monkeypatch.setattr(image_processing_piip, "PADDED_BAND_PIXELS", 50_000)  # tall images in several bands
    image = random_rgb(width, height, seed=width + height)
    pixel_values = PIIPImageProcessor(size=96, pad_to_square=True)(image)["pixel_values"]
    np.testing.assert_allclose(as_numpy(pixel_values[0]), llava_reference(image, 96, True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("width, height", [(8000, 40), (40, 8000)])
def test_a_long_thin_image_is_padded_without_a_full_size_canvas(width, height):
    import tracemalloc

    image = random_rgb(width, height)
    processor = PIIPImageProcessor(size=336, pad_to_square=True)
    tracemalloc.start()
    pixel_values = processor(image)["pixel_values"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pixel_values.shape == (1, 3, 336, 336)
    assert peak < 64 * 2**20  # the 8000x8000 RGB square alone would take 192 MB


def test_an_absurdly_tall_image_stays_within_a_rounding_step_of_llava():
    image = random_rgb(20, 5000, seed=3)
    pixel_values = PIIPImageProcessor(size=64, pad_to_square=True, do_normalize=False)(image)["pixel_values"]
    reference = llava_reference(image, 64, True) * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]
    assert np.abs(as_numpy(pixel_values[0]) * 255 - reference * 255).max() <= 1.01


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
@pytest.mark.parametrize("pad_to_square", [False, True])
def test_other_modes_convert_like_llava(mode, pad_to_square):
    """Any PIL mode goes through a plain convert("RGB"): alpha is dropped, not composited on white."""
    image = image_in_mode(mode)
    processor = PIIPImageProcessor(size=48)
    pixel_values = processor(images=image, pad_to_square=pad_to_square)["pixel_values"]
    np.testing.assert_allclose(as_numpy(pixel_values[0]), llava_reference(image, 48, pad_to_square), rtol=0, atol=1e-6)


def test_padding_uses_llava_mean_colour():
    """A wide image padded to a square has its top rows in the truncated mean colour, normalised."""
    image = random_rgb(100, 40)
    pixel_values = PIIPImageProcessor(size=100, pad_to_square=True)(image)["pixel_values"][0]
    expected = (np.array(LLAVA_PAD_COLOUR) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    # The image occupies rows 30..69 of the 100x100 canvas; rows 0..25 are far enough from it for bicubic.
    np.testing.assert_allclose(as_numpy(pixel_values[:, :25, :]).mean(axis=(1, 2)), expected, atol=1e-6)


def test_pad_to_square_call_time_override():
    image = random_rgb(90, 50)
    padding = PIIPImageProcessor(size=32, pad_to_square=True)
    cropping = PIIPImageProcessor(size=32)
    np.testing.assert_array_equal(padding(image, pad_to_square=False)["pixel_values"], cropping(image)["pixel_values"])
    np.testing.assert_array_equal(cropping(image, pad_to_square=True)["pixel_values"], padding(image)["pixel_values"])
    assert not torch.equal(padding(image)["pixel_values"], cropping(image)["pixel_values"])


# ----- input kinds -------------------------------------------------------------------------------
def test_numpy_inputs_match_pil():
    image = random_rgb(77, 52)
    processor = PIIPImageProcessor(size=40, pad_to_square=True)
    from_pil = processor(image)["pixel_values"]
    np.testing.assert_array_equal(processor(np.asarray(image))["pixel_values"], from_pil)
    gray = image.convert("L")
    np.testing.assert_array_equal(processor(np.asarray(gray))["pixel_values"], processor(gray)["pixel_values"])
    rgba = np.concatenate([np.asarray(image), np.zeros((52, 77, 1), dtype=np.uint8)], axis=-1)
    np.testing.assert_array_equal(processor(rgba)["pixel_values"], from_pil)


def test_batch_of_mixed_inputs():
    images = [random_rgb(90, 50, seed=1), random_rgb(30, 60, seed=2).convert("L"), np.asarray(random_rgb(40, 40))]
    pixel_values = PIIPImageProcessor(size=32)(images)["pixel_values"]
    assert pixel_values.shape == (3, 3, 32, 32)
    for index, image in enumerate(images):
        pil_image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        np.testing.assert_allclose(as_numpy(pixel_values[index]), llava_reference(pil_image, 32, False), atol=1e-6)


def test_image_path_input(tmp_path):
    image = random_rgb(60, 45)
    image.save(tmp_path / "image.png")
    pixel_values = PIIPImageProcessor(size=32)(str(tmp_path / "image.png"))["pixel_values"]
    np.testing.assert_allclose(as_numpy(pixel_values[0]), llava_reference(image, 32, False), atol=1e-6)


@pytest.mark.parametrize(
    "bad_input, message",
    [
        (None, "got NoneType"),
        (3, "got int"),
        ({"image": 1}, "got dict"),
        ([], "empty list"),
        (np.zeros(5), "got shape (5,)"),
        ([Image.new("RGB", (4, 4)), 7.5], "got float"),
    ],
)
def test_non_image_input_raises_clear_error(bad_input, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PIIPImageProcessor(size=32)(bad_input)


# ----- configuration and persistence -----------------------------------------------------------
def test_size_sets_square_crop_and_vision_config():
    processor = PIIPImageProcessor(size=80)
    assert processor.size.shortest_edge == 80
    assert (processor.crop_size.height, processor.crop_size.width) == (80, 80)
    config = PIIPVisionConfig.from_json_file(str(CONFIG_DIR / "tiny_convnext_clip.json"))
    from_config = PIIPImageProcessor.from_vision_config(config)
    assert from_config(random_rgb(50, 70))["pixel_values"].shape == (1, 3, config.image_size, config.image_size)


def test_defaults_are_imagenet_bicubic():
    processor = PIIPImageProcessor()
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(processor.image_std) == (0.229, 0.224, 0.225)
    assert int(processor.resample) == Image.BICUBIC
    assert processor.pad_to_square is False


def test_save_and_load_round_trip(tmp_path):
    processor = PIIPImageProcessor(size=48, pad_to_square=True)
    processor.save_pretrained(tmp_path)
    image = random_rgb(70, 40)
    for loaded in (PIIPImageProcessor.from_pretrained(tmp_path), _auto_load(tmp_path)):
        assert isinstance(loaded, PIIPImageProcessor)
        assert loaded.pad_to_square is True
        assert loaded.size.shortest_edge == 48
        np.testing.assert_array_equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def _auto_load(path):
    AutoImageProcessor.register(PIIPVisionConfig, image_processor_classes={"pil": PIIPImageProcessor}, exist_ok=True)
    return AutoImageProcessor.from_pretrained(path)
