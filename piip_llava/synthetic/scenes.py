"""Synthetic scenes: coloured shapes and one printed text on a light background, and how they are drawn.

A scene is a 3x3 grid of cells. Shapes sit in the five cells of the middle cross (top, left, centre,
right, bottom), at most one per cell, so they never overlap and each has a one-word position. The
text sits in one of the four corner cells, so it never covers a shape. Font sizes are given for a
256-pixel image and scale with the image: "small" text has a cap height of 8-9 px at 256 px, which
is under 3 px once the image is shrunk to 64 px (a low-resolution branch cannot read it), while
"large" text keeps 3.5 px or more there.

Everything random is drawn from the `random.Random` passed in, so one seed gives one scene, and
`render_scene` is a pure function of the scene: the same seed yields byte-identical PNGs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

REFERENCE_IMAGE_SIZE = 256
MIN_IMAGE_SIZE = 64
DEFAULT_IMAGE_SIZE = 256
MAX_SHAPES = 4

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 10),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
SHAPE_SIZES = ("small", "large")
# Half the shape's bounding box, as a fraction of the cell side: (low, high) for each size.
SHAPE_RADIUS_FRACTIONS = {"small": (0.15, 0.2), "large": (0.34, 0.4)}

# (row, column) of each named cell in the 3x3 grid.
SHAPE_POSITIONS = {"top": (0, 1), "left": (1, 0), "centre": (1, 1), "right": (1, 2), "bottom": (2, 1)}
TEXT_POSITIONS = {"top left": (0, 0), "top right": (0, 2), "bottom left": (2, 0), "bottom right": (2, 2)}

TEXT_COLOUR = (0, 0, 0)
# Font sizes (pixels, for a 256-pixel image) of each text size class; cap heights 8-9 and 14-18 px.
TEXT_FONT_SIZES = {"small": (10, 11, 12), "large": (20, 23, 25)}
TEXT_SIZE_CLASSES = tuple(TEXT_FONT_SIZES)
# Short upper-case words; none is a colour, a shape, an article, a number word or "none", so the
# VQA answer normalisation leaves them alone and no answer can be mistaken for another question's.
WORDS = (
    "CAT", "DOG", "SUN", "MAP", "KEY", "BOX", "CUP", "HAT", "PEN", "BUS", "CAR", "EGG",
    "STOP", "OPEN", "BOOK", "FISH", "TREE", "LAMP", "MILK", "ROAD", "SHOP", "GOLD", "BIRD", "DOOR",
    "KITE", "RAIN", "SHIP", "FROG", "CAKE", "SALE",
)
# Two-digit numbers: the demo model's 4-layer LLM read the first digit of numbers up to 999 every time and the
# later ones 27% and 13% of the time, even from perfect stand-in image tokens (docs/training.md).
NUMBER_RANGE = (10, 99)
NUMBERS = tuple(str(number) for number in range(NUMBER_RANGE[0], NUMBER_RANGE[1] + 1))
TEXT_MARGIN_FRACTION = 0.06
WHITE = (255, 255, 255)
TINT_RANGE = (228, 255)


@dataclass(frozen=True)
class Shape:
    """One coloured shape; `centre` and `radius` (half its bounding box) are in pixels."""

    kind: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class SceneText:
    """The printed text: `origin` is the left end of its baseline, `glyph_height` its ink height in pixels."""

    content: str
    size_class: str
    font_size: int
    position: str
    origin: tuple[int, int]
    glyph_height: int

    @property
    def is_number(self) -> bool:
        return self.content.isdigit()


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw an image and to answer any question about it."""

    image_size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    text: SceneText | None

    def shapes_of_kind(self, kind: str) -> list[Shape]:
        return [shape for shape in self.shapes if shape.kind == kind]

    def shapes_of_colour(self, colour: str) -> list[Shape]:
        return [shape for shape in self.shapes if shape.colour == colour]

    def shapes_of(self, colour: str, kind: str) -> list[Shape]:
        return [shape for shape in self.shapes if shape.colour == colour and shape.kind == kind]


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer of at least {MIN_IMAGE_SIZE} pixels, got {image_size!r}.")


def cell_side(image_size: int) -> float:
    return image_size / 3


def cell_centre(row_column: tuple[int, int], image_size: int) -> tuple[float, float]:
    row, column = row_column
    side = cell_side(image_size)
    return ((column + 0.5) * side, (row + 0.5) * side)


def scaled_font_size(reference_size: int, image_size: int) -> int:
    """A font size given for a 256-pixel image, scaled to `image_size` so the text keeps its proportions."""
    return max(1, round(reference_size * image_size / REFERENCE_IMAGE_SIZE))


@lru_cache(maxsize=64)
def load_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (no font file on disk is needed); cached because loading costs ~1 ms."""
    return ImageFont.load_default(size=size)


def text_extent(content: str, font_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the ink relative to the baseline origin, from the font's metrics."""
    return load_font(font_size).getbbox(content, anchor="ls")


def glyph_height(content: str, font_size: int) -> int:
    """Height of the drawn text in pixels; for upper-case words and digits this is the cap height."""
    _, top, _, bottom = text_extent(content, font_size)
    return bottom - top


def downsampled_glyph_height(text: SceneText, image_size: int, target_size: int) -> float:
    """The text's height after the whole image is resized to `target_size` pixels (e.g. a 64 px branch)."""
    return text.glyph_height * target_size / image_size


def random_text_content(rng: random.Random) -> str:
    """A word or a number, equally likely."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return str(rng.randint(*NUMBER_RANGE))


def fitting_font_sizes(content: str, size_class: str, image_size: int) -> list[int]:
    """The class's font sizes at which `content` fits inside a corner cell with a margin on each side."""
    room = cell_side(image_size) * (1 - 2 * TEXT_MARGIN_FRACTION)
    sizes = [scaled_font_size(size, image_size) for size in TEXT_FONT_SIZES[size_class]]
    return [size for size in sizes if text_extent(content, size)[2] - text_extent(content, size)[0] <= room]


def place_text(
    rng: random.Random, content: str, size_class: str, position: str, image_size: int
) -> SceneText:
    """Pick a font size that fits and a baseline origin that keeps the ink inside the corner cell."""
    if size_class not in TEXT_FONT_SIZES:
        raise ValueError(f"text size class must be one of {TEXT_SIZE_CLASSES}, got {size_class!r}.")
    sizes = fitting_font_sizes(content, size_class, image_size)
    if not sizes:
        raise ValueError(f"Text {content!r} does not fit a {image_size}-pixel image's corner cell at {size_class} size.")
    font_size = rng.choice(sizes)
    left, top, right, bottom = text_extent(content, font_size)
    side = cell_side(image_size)
    margin = side * TEXT_MARGIN_FRACTION
    row, column = TEXT_POSITIONS[position]
    cell_left, cell_top = column * side, row * side
    # Ranges of the origin that keep [origin + left, origin + right] inside the cell's margins.
    x_low, x_high = cell_left + margin - left, cell_left + side - margin - right
    y_low, y_high = cell_top + margin - top, cell_top + side - margin - bottom
    origin = (round(rng.uniform(x_low, x_high)), round(rng.uniform(y_low, y_high)))
    return SceneText(
        content=content,
        size_class=size_class,
        font_size=font_size,
        position=position,
        origin=origin,
        glyph_height=bottom - top,
    )


def place_shape(rng: random.Random, kind: str, colour: str, size: str, position: str, image_size: int) -> Shape:
    """A shape of the given size, jittered inside its cell but never past the cell's edge."""
    side = cell_side(image_size)
    low, high = SHAPE_RADIUS_FRACTIONS[size]
    radius = side * rng.uniform(low, high)
    slack = max(0.0, side / 2 - radius - side * 0.04)
    centre_x, centre_y = cell_centre(SHAPE_POSITIONS[position], image_size)
    centre = (centre_x + rng.uniform(-slack, slack), centre_y + rng.uniform(-slack, slack))
    return Shape(kind=kind, colour=colour, size=size, position=position, centre=centre, radius=radius)


def random_background(rng: random.Random) -> tuple[int, int, int]:
    """White half of the time, otherwise a light tint (every channel at least 228)."""
    if rng.random() < 0.5:
        return WHITE
    return tuple(rng.randint(*TINT_RANGE) for _ in range(3))


def generate_scene(
    rng: random.Random,
    image_size: int = DEFAULT_IMAGE_SIZE,
    text_size_class: str | None = None,
    max_shapes: int = MAX_SHAPES,
) -> Scene:
    """A random scene: 1 to `max_shapes` shapes in distinct cross cells and one text in a corner.

    `text_size_class` forces "small" or "large" text (the evaluation split uses it to balance its
    question types); by default each is equally likely.
    """
    check_image_size(image_size)
    if not 1 <= max_shapes <= len(SHAPE_POSITIONS):
        raise ValueError(f"max_shapes must be between 1 and {len(SHAPE_POSITIONS)}, got {max_shapes}.")
    background = random_background(rng)
    positions = rng.sample(sorted(SHAPE_POSITIONS), rng.randint(1, max_shapes))
    shapes = tuple(
        place_shape(rng, rng.choice(SHAPE_KINDS), rng.choice(sorted(PALETTE)), rng.choice(SHAPE_SIZES), position,
                    image_size)
        for position in sorted(positions, key=list(SHAPE_POSITIONS).index)
    )
    size_class = text_size_class if text_size_class is not None else rng.choice(TEXT_SIZE_CLASSES)
    text = place_text(rng, random_text_content(rng), size_class, rng.choice(sorted(TEXT_POSITIONS)), image_size)
    return Scene(image_size=image_size, background=background, shapes=shapes, text=text)


def regular_polygon(
    centre: tuple[float, float], radius: float, corners: int, rotation: float = -90.0
) -> list[tuple[float, float]]:
    """`corners` points on the circle of `radius`, the first at `rotation` degrees (-90: straight up)."""
    return [
        (
            centre[0] + radius * math.cos(math.radians(rotation + 360.0 * corner / corners)),
            centre[1] + radius * math.sin(math.radians(rotation + 360.0 * corner / corners)),
        )
        for corner in range(corners)
    ]


def star_points(centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """A five-pointed star: outer points alternate with inner ones at 45% of the radius."""
    outer = regular_polygon(centre, radius, 5)
    inner = regular_polygon(centre, radius * 0.45, 5, rotation=-90.0 + 36.0)
    return [point for pair in zip(outer, inner) for point in pair]


def cross_points(centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """A plus sign whose arms are a third of its width."""
    x, y = centre
    arm = radius / 3
    return [
        (x - arm, y - radius), (x + arm, y - radius), (x + arm, y - arm), (x + radius, y - arm),
        (x + radius, y + arm), (x + arm, y + arm), (x + arm, y + radius), (x - arm, y + radius),
        (x - arm, y + arm), (x - radius, y + arm), (x - radius, y - arm), (x - arm, y - arm),
    ]


def shape_outline(shape: Shape) -> list[tuple[float, float]]:
    """The polygon of a non-circular shape, inside the square of side 2 * radius around its centre."""
    x, y = shape.centre
    if shape.kind == "square":
        half = shape.radius * 0.85
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    if shape.kind == "triangle":
        return regular_polygon(shape.centre, shape.radius, 3)  # equilateral, pointing up
    if shape.kind == "star":
        return star_points(shape.centre, shape.radius)
    if shape.kind == "cross":
        return cross_points(shape.centre, shape.radius)
    raise ValueError(f"Unknown shape kind {shape.kind!r}; expected one of {SHAPE_KINDS}.")


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    colour = PALETTE[shape.colour]
    if shape.kind == "circle":
        x, y = shape.centre
        draw.ellipse((x - shape.radius, y - shape.radius, x + shape.radius, y + shape.radius), fill=colour)
        return
    draw.polygon(shape_outline(shape), fill=colour)


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image; a pure function of the scene, so equal scenes give equal pixels."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        draw_shape(draw, shape)
    if scene.text is not None:
        draw_text(draw, scene.text)
    return image


def draw_text(draw: ImageDraw.ImageDraw, text: SceneText) -> None:
    draw.text(text.origin, text.content, fill=TEXT_COLOUR, font=load_font(text.font_size), anchor="ls")
