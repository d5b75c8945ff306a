"""Image processor of PIIP encoders: the LLaVA-1.5 preprocessing the released PIIP-LLaVA checkpoints were trained with.

The encoder receives one square image at its highest branch resolution (it resizes it for the
other branches itself). The released checkpoints were trained and evaluated with LLaVA's
pipeline, which this processor reproduces pixel for pixel:

1. `PIL.Image.convert("RGB")` (no alpha compositing: LLaVA drops the alpha channel);
2. optionally (`pad_to_square`, LLaVA's `image_aspect_ratio="pad"`, used for instruction tuning
   and evaluation) LLaVA's `expand2square`: paste the image centred on a square canvas filled
   with the mean colour `int(mean * 255)` per channel;
3. resize the shorter side to `size` with PIL's bicubic filter, then centre-crop a square
   (transformers' `CLIPImageProcessor` steps, as LLaVA used them);
4. rescale by 1/255 and normalise with the ImageNet mean and std (not CLIP's).

It is a PIL/NumPy processor (transformers' `PilBackend`): it needs neither torchvision nor a GPU.
"""

from __future__ import annotations

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import is_torch_available, logging
from transformers.utils.import_utils import is_vision_available

if is_vision_available():
    import PIL.Image

if is_torch_available():
    import torch

logger = logging.get_logger(__name__)

DEFAULT_IMAGE_SIZE = 336
# Pixels of one band of the padded square that `shrink_padded_to_square` builds for a tall image (48 MB in RGB).
PADDED_BAND_PIXELS = 16 * 2**20
# Tall images up to this height/width ratio, or this height, are shrunk exactly as the full-size padded square would be.
EXACT_TALL_RATIO = 4
EXACT_TALL_SIDE = 4096


class PIIPImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    pad_to_square (`bool`, *optional*, defaults to `self.pad_to_square`):
        Pad the image to a square with the mean colour before resizing (LLaVA's `image_aspect_ratio="pad"`),
        instead of centre-cropping away the borders of a non-square image.
    """

    pad_to_square: bool


def mean_padding_colour(image_mean, pixel_scale_is_255: bool) -> tuple:
    """The colour LLaVA pads with: `tuple(int(x * 255) for x in image_mean)`.

    The truncation to integers is LLaVA's; it is kept so padded pixels normalise to exactly the
    values the released checkpoints saw. Images already in [0, 1] get the same colour in that scale.
    """
    colour = tuple(int(channel_mean * 255) for channel_mean in image_mean)
    return colour if pixel_scale_is_255 else tuple(value / 255 for value in colour)


def expand_to_square(image: np.ndarray, fill_colour: tuple) -> np.ndarray:
    """LLaVA's `expand2square` on a (channels, height, width) array: the image centred on a filled square.

    The offset is `(long - short) // 2`, as PIL's `paste` at that position in LLaVA.
    """
    channels, height, width = image.shape
    if height == width:
        return image
    if len(fill_colour) != channels:
        raise ValueError(
            f"pad_to_square fills with one value per channel ({len(fill_colour)} from image_mean) but the image has "
            f"{channels} channels; keep do_convert_rgb=True so images are RGB."
        )
    side = max(height, width)
    canvas = np.empty((channels, side, side), dtype=image.dtype)
    canvas[:] = np.asarray(fill_colour, dtype=image.dtype).reshape(channels, 1, 1)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top : top + height, left : left + width] = image
    return canvas


def shrink_padded_to_square(image: np.ndarray, side: int, fill_colour: tuple, resample) -> np.ndarray:
    """`expand_to_square` then a PIL resize to `side` x `side`, without building the full-size square.

    For a (3, H, W) uint8 image. PIL resizes in two passes, horizontal then vertical, rounding to 8
    bits in between, and the padding rows of the square come out of the horizontal pass as the fill
    colour itself. So a wide image is resized horizontally alone, padded to W rows of `side` pixels,
    and resized vertically: pixel for pixel the full-size result, in memory of the order of
    `side` x W (a 20000x100 image would otherwise need a 20000x20000 canvas).

    A tall image is padded and resized horizontally a band of rows at a time: exact, and as slow as the
    full-size path, since every padded row is resampled. An absurdly tall one (more than
    `EXACT_TALL_RATIO` times taller than wide and `EXACT_TALL_SIDE` pixels high) is instead transposed,
    shrunk as a wide image and transposed back: the two passes then run in the other order, so pixels
    may differ from the full-size path by a rounding step.
    """
    channels, height, width = image.shape
    if height > width * EXACT_TALL_RATIO and height > EXACT_TALL_SIDE:
        transposed = np.ascontiguousarray(np.swapaxes(image, 1, 2))
        return np.swapaxes(shrink_padded_to_square(transposed, side, fill_colour, resample), 1, 2)
    long_side = max(height, width)
    if width >= height:
        pixels = PIL.Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
        narrow = np.asarray(pixels.resize((side, height), resample=resample))  # (H, side, 3)
        rows = np.empty((long_side, side, channels), dtype=np.uint8)  # (W, side, 3): the square's rows, narrowed
        rows[:] = np.asarray(fill_colour, dtype=np.uint8)
        top = (long_side - height) // 2
        rows[top : top + height] = narrow
    else:
        left = (long_side - width) // 2
        band_height = max(1, PADDED_BAND_PIXELS // long_side)
        rows = np.empty((height, side, channels), dtype=np.uint8)
        for start in range(0, height, band_height):
            band = image[:, start : start + band_height]
            padded = np.empty((band.shape[1], long_side, channels), dtype=np.uint8)  # (band rows, H, 3)
            padded[:] = np.asarray(fill_colour, dtype=np.uint8)
            padded[:, left : left + width] = np.moveaxis(band, 0, -1)
            resized = PIL.Image.fromarray(padded).resize((side, band.shape[1]), resample=resample)
            rows[start : start + band.shape[1]] = np.asarray(resized)
    square = PIL.Image.fromarray(rows).resize((side, side), resample=resample)
    return np.moveaxis(np.asarray(square), -1, 0)


def _array_channel_axis(array: np.ndarray, input_data_format: str | ChannelDimension | None) -> int | None:
    """Channel axis of an image array: the given layout, else channels-last (PIL/NumPy's) when it fits."""
    if array.ndim == 2:
        return None
    if array.ndim != 3:
        raise ValueError(
            f"An image array must be (height, width) or (height, width, channels); got shape {tuple(array.shape)}."
        )
    if input_data_format is not None:
        return -1 if ChannelDimension(input_data_format) == ChannelDimension.LAST else 0
    if array.shape[-1] in (1, 3, 4):
        return -1
    if array.shape[0] in (1, 3, 4):
        return 0
    raise ValueError(
        f"Cannot tell the channels of an image array of shape {tuple(array.shape)}: expected 1, 3 or 4 channels in "
        "the last (or first) dimension."
    )


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """(channels, H, W) with 1, 3 or 4 channels -> 3 channels, as PIL's `convert("RGB")` would (alpha dropped)."""
    channels = array.shape[0]
    if channels == 1:
        return np.repeat(array, 3, axis=0)
    if channels == 4:
        return array[:3]
    if channels == 3:
        return array
    raise ValueError(f"Cannot convert an image with {channels} channels to RGB; expected 1, 3 or 4.")


def _is_supported_image(candidate) -> bool:
    if is_vision_available() and isinstance(candidate, PIL.Image.Image):
        return True
    if isinstance(candidate, (np.ndarray, str)):
        return True
    return is_torch_available() and isinstance(candidate, torch.Tensor)


def check_image_input(images) -> None:
    """Raise a ValueError naming what was passed when `images` is not an image or a (nested) list of images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("PIIPImageProcessor got an empty list of images.")
        for item in images:
            check_image_input(item)
        return
    if not _is_supported_image(images):
        raise ValueError(
            "PIIPImageProcessor takes PIL images, (height, width[, channels]) NumPy arrays or tensors, image paths, "
            f"or lists of them; got {type(images).__name__}."
        )
    if hasattr(images, "ndim") and images.ndim not in (2, 3, 4):
        raise ValueError(
            "An image array must be (height, width), (height, width, channels) or a 4-D batch of those; "
            f"got shape {tuple(images.shape)}."
        )


def _with_channel_axis(images):
    """Give 2-D (grayscale) arrays a trailing channel axis: transformers only batches 3-D arrays."""
    if isinstance(images, (list, tuple)):
        return [_with_channel_axis(image) for image in images]
    if hasattr(images, "ndim") and images.ndim == 2:
        return images[..., None]
    return images


def _default_crop_to_size(kwargs: dict) -> None:
    """When only `size` is given, crop a square of that side: the encoder wants square inputs of that size."""
    size = kwargs.get("size")
    if size is None or kwargs.get("crop_size") is not None:
        return
    if isinstance(size, int):
        side = size
    elif isinstance(size, dict) and "shortest_edge" in size:
        side = size["shortest_edge"]
    elif isinstance(size, dict) and size.get("height") == size.get("width"):
        side = size.get("height")
    else:
        return
    if side is not None:
        kwargs["crop_size"] = {"height": side, "width": side}


class PIIPImageProcessor(PilBackend):
    r"""
    Image processor of PIIP vision encoders and PIIP-LLaVA (LLaVA-1.5 preprocessing with ImageNet statistics).

    Args:
        size (`int` or `dict[str, int]`, *optional*, defaults to `{"shortest_edge": 336}`):
            The shorter side after resizing: the encoder's input size (its highest branch resolution, see
            `PIIPVisionConfig.image_size`). An int means `{"shortest_edge": size}`.
        crop_size (`int` or `dict[str, int]`, *optional*):
            Size of the centre crop; defaults to a square of side `size`.
        pad_to_square (`bool`, *optional*, defaults to `False`):
            Pad to a square with the mean colour before resizing (LLaVA's `image_aspect_ratio="pad"`, used by
            the released checkpoints for instruction tuning and evaluation) instead of cropping the borders.
        return_tensors (`str`, *optional*, defaults to `"pt"`):
            All outputs have the same size, so a (batch, 3, S, S) float32 tensor is returned by default.

    The other options (`do_resize`, `resample`, `do_center_crop`, `do_rescale`, `rescale_factor`,
    `do_normalize`, `image_mean`, `image_std`, `do_convert_rgb`) are transformers' usual ones, with
    bicubic resampling and the ImageNet mean and std as defaults.

    Arrays are read as (height, width, channels) like PIL gives them unless `input_data_format` says
    otherwise (or only the first dimension can hold the channels).
    """

    valid_kwargs = PIIPImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": DEFAULT_IMAGE_SIZE}
    default_to_square = False
    crop_size = {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    pad_to_square = False
    return_tensors = "pt"

    def __init__(self, **kwargs: Unpack[PIIPImageProcessorKwargs]):
        _default_crop_to_size(kwargs)
        super().__init__(**kwargs)

    @classmethod
    def from_vision_config(cls, config, **kwargs) -> PIIPImageProcessor:
        """The processor for a `PIIPVisionConfig`: images come out at the encoder's input size."""
        kwargs.setdefault("size", config.image_size)
        return cls(**kwargs)

    def preprocess(self, images, *args, **kwargs: Unpack[PIIPImageProcessorKwargs]) -> BatchFeature:
        """Preprocess an image or a batch of images into `pixel_values` of shape (batch, 3, S, S)."""
        check_image_input(images)
        images = _with_channel_axis(images)
        _default_crop_to_size(kwargs)
        return super().preprocess(images, *args, **kwargs)

    def process_image(
        self,
        image,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One input image as a (channels, height, width) array, converted to RGB the way LLaVA does.

        transformers' default conversion composites transparent images onto white; LLaVA (and so the
        released checkpoints) uses a plain `convert("RGB")`, which drops the alpha channel.
        """
        if is_vision_available() and isinstance(image, PIL.Image.Image):
            if do_convert_rgb:
                image = image.convert("RGB")
            array = np.array(image)
            return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        if is_torch_available() and isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise ValueError(  # noqa: TRY004 (a non-image input is a bad value, as everywhere in this processor)
                f"PIIPImageProcessor cannot read an image of type {type(image).__name__}."
            )
        channel_axis = _array_channel_axis(image, input_data_format)
        array = image[None] if channel_axis is None else np.moveaxis(image, channel_axis, 0)
        return _array_to_rgb(array) if do_convert_rgb else array

    def _preprocess(
        self,
        images: list[np.ndarray],
        pad_to_square: bool | None = None,
        image_mean=None,
        do_rescale: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Pad to a square when asked, then the standard resize / crop / rescale / normalise steps."""
        if pad_to_square:
            # Pixels are in 0..255 unless the caller gave [0, 1] floats and turned rescaling off.
            fill_colour = mean_padding_colour(image_mean, pixel_scale_is_255=bool(do_rescale))
            images = [self._pad_to_square(image, fill_colour, kwargs) for image in images]
        return super()._preprocess(images, image_mean=image_mean, do_rescale=do_rescale, **kwargs)

    @staticmethod
    def _pad_to_square(image: np.ndarray, fill_colour: tuple, options: dict) -> np.ndarray:
        """The image padded to a square; already shrunk to the output size when that is what resizing does next."""
        size, resample = options.get("size"), options.get("resample")
        side = getattr(size, "shortest_edge", None)
        shrinks_8bit_rgb = (
            options.get("do_resize") and side and getattr(size, "longest_edge", None) is None
            and isinstance(resample, int) and image.dtype == np.uint8 and image.shape[0] == len(fill_colour) == 3
            and max(image.shape[1:]) > side and image.shape[1] != image.shape[2]
        )
        if shrinks_8bit_rgb:
            return shrink_padded_to_square(image, side, fill_colour, resample)
        return expand_to_square(image, fill_colour)


__all__ = ["PIIPImageProcessor", "PIIPImageProcessorKwargs"]
