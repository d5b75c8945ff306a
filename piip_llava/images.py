"""Reading an image the one way every loader of ours does: chat, the training data and evaluation.

`read_image` decodes the whole file at once (so a truncated file is reported where it is read,
not later inside the processor), turns the picture upright as its EXIF orientation tag says (a
phone photo looks the same to the model as on screen, and the same as transformers' `load_image`
and pipelines show it), and converts it to 8-bit RGB:

- 16-bit greyscale (PNG, TIFF) is scaled to 8 bits; PIL's own `convert("RGB")` clips it, which
  leaves all but the darkest 1/257 of the range white;
- palette images go through RGBA, so PIL applies their transparency instead of warning;
- an alpha channel is dropped, as LLaVA's `convert("RGB")` does (no compositing onto white).

LLaVA's loaders apply no EXIF orientation; an image carrying an orientation tag other than
"upright" therefore reaches our models rotated the way the viewer shows it, not as stored.
"""

from __future__ import annotations

import os
from typing import IO

import numpy as np
from PIL import Image, ImageOps

# Modes PIL opens 16-bit greyscale files in (`I` is what older Pillow versions and some TIFFs give).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535


class UnreadableImageError(ValueError):
    """An image that does not exist or cannot be decoded; the message names it and says why."""


def read_image(source: str | os.PathLike | IO[bytes] | Image.Image, name: str | None = None) -> Image.Image:
    """The image at `source` (a path, a binary file object or an opened PIL image), upright, as 8-bit RGB.

    `name` is how error messages refer to the image (default: the path, or "<image bytes>").
    Raises `UnreadableImageError` when the file is missing or cannot be decoded.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>"
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise UnreadableImageError(f"image file {name} does not exist")
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"cannot decode image {name}: {error}") from error
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`: 16-bit greyscale scaled, palettes through RGBA, alpha dropped."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        grey = np.round(np.clip(values, 0, SIXTEEN_BIT_MAX) * (255 / SIXTEEN_BIT_MAX)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")


__all__ = ["UnreadableImageError", "read_image", "to_rgb"]
