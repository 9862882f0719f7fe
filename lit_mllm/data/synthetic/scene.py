"""Scenes of the synthetic set: which shapes an image holds, where, and how they are drawn.

Each image shows 1-3 non-overlapping coloured shapes on a 3x3 grid. The image is an
``image_size`` square, or a ``canvas`` of any (width, height): the grid then spans the canvas
while shape diameters stay fractions of ``image_size`` (large images whose shapes stay small).
All randomness of an image comes from one generator seeded by ``(seed, split, index)``, so the
output is byte-identical whatever the number of worker processes. A :class:`Scene` is stored with every COCO ``images``
entry (pycocotools ignores it), so captions can be checked against the drawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from lit_mllm.data.synthetic.settings import MAX_SHAPES

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "text": 3}
GRID = 3
SUPERSAMPLE = 4

KINDS = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
}
SIZES = ("small", "large")
# diameter as a fraction of image_size (the image side, or the shape scale of a larger canvas)
SIZE_FRACTION = {"small": 0.17, "large": 0.28}
NOISE_SIGMA = 12.0

T = TypeVar("T")


@dataclass(frozen=True)
class Shape:
    """One drawn shape; ``cx``, ``cy`` and ``diameter`` are in pixels of the final image."""

    kind: str
    colour: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    diameter: float


@dataclass(frozen=True)
class Scene:
    """The facts of one image, kept so captions and tests can be checked against the drawing.

    ``width`` and ``height`` are those of the drawn image (``None``: ``image_size``, a square);
    ``image_size`` is the scale of the shapes.
    """

    shapes: tuple[Shape, ...]
    background: str
    noise: bool
    image_size: int
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        for side in ("width", "height"):
            if getattr(self, side) is None:
                object.__setattr__(self, side, self.image_size)

    @property
    def square(self) -> bool:
        """Whether this is the ``image_size`` square (the only drawing before ``canvas``)."""
        return self.width == self.height == self.image_size

    def to_dict(self) -> dict[str, Any]:
        d = {
            "shapes": [asdict(s) for s in self.shapes],
            "background": self.background,
            "noise": self.noise,
            "image_size": self.image_size,
        }
        if not self.square:  # a square scene is written as before canvas existed
            d.update(width=self.width, height=self.height)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        shapes = tuple(Shape(**s) for s in d["shapes"])
        size = int(d["image_size"])
        return Scene(
            shapes,
            d["background"],
            bool(d["noise"]),
            size,
            int(d.get("width", size)),
            int(d.get("height", size)),
        )


def pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    """One item, drawn the way every table of the set is drawn (one integer per pick)."""
    return seq[int(rng.integers(len(seq)))]


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def relation_key(a: Shape, b: Shape) -> tuple[int, int]:
    """Where ``a`` lies relative to ``b`` as (vertical, horizontal) signs; -1 = above/left."""
    return _sign(a.row - b.row), _sign(a.col - b.col)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: depends only on (seed, split, index), not on worker layout."""
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def _check_max_shapes(max_shapes: int) -> None:
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be in 1..{MAX_SHAPES}, got {max_shapes}")


def canvas_problem(image_size: int, width: int, height: int) -> str | None:
    """Why a ``width`` x ``height`` canvas cannot hold shapes scaled by ``image_size`` (the
    large shape must fit into the smaller side of a grid cell), or None when it can."""
    large = SIZE_FRACTION["large"] * image_size
    cell = min(width, height) / GRID
    if large <= cell:
        return None
    need = math.ceil(GRID * large)
    return (
        f"its grid cells are {width / GRID:.4g}x{height / GRID:.4g} px, too small for a large "
        f"shape of {large:.4g} px ({SIZE_FRACTION['large']} * image_size {image_size}); "
        f"make both canvas sides >= {need} or image_size smaller"
    )


def sample_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    max_shapes: int = MAX_SHAPES,
    jitter: bool = True,
    canvas: tuple[int, int] | None = None,
) -> Scene:
    """Draw 1..max_shapes shapes of distinct kinds into distinct grid cells (never overlapping).

    ``jitter`` moves each shape randomly inside its cell; without it every shape sits at its
    cell's centre, so a kind always looks the same (an easier task for tiny random encoders).
    ``canvas`` (width, height) spreads the grid over a drawing of that size; shape diameters
    stay ``SIZE_FRACTION * image_size``. ``None`` draws the ``image_size`` square (the same
    random numbers, the same scene as ``canvas=(image_size, image_size)``).
    """
    _check_max_shapes(max_shapes)
    width, height = (image_size, image_size) if canvas is None else canvas
    if canvas is not None:
        problem = canvas_problem(image_size, width, height)
        if problem:
            raise ValueError(f"canvas {width}x{height}: {problem}")
    n = 1 + int(rng.integers(max_shapes))
    kinds = [KINDS[i] for i in rng.permutation(len(KINDS))[:n]]
    cells = [divmod(int(c), GRID) for c in rng.permutation(GRID * GRID)[:n]]
    colour_names = list(COLOURS)
    cell_w, cell_h = width / GRID, height / GRID
    shapes = []
    for kind, (row, col) in zip(kinds, cells, strict=True):
        colour = pick(rng, colour_names)
        size = pick(rng, SIZES)
        diameter = SIZE_FRACTION[size] * image_size
        # the shape's box stays inside its cell, with a margin of 4 % of the cell per axis
        slack_x = max(0.0, (cell_w - diameter) / 2 - 0.04 * cell_w) if jitter else 0.0
        slack_y = max(0.0, (cell_h - diameter) / 2 - 0.04 * cell_h) if jitter else 0.0
        cx = (col + 0.5) * cell_w + float(rng.uniform(-slack_x, slack_x))
        cy = (row + 0.5) * cell_h + float(rng.uniform(-slack_y, slack_y))
        shapes.append(Shape(kind, colour, size, row, col, round(cx, 3), round(cy, 3), diameter))
    shapes.sort(key=lambda s: (s.row, s.col))  # reading order: the canonical caption order
    background = "white" if rng.random() < 0.5 else pick(rng, ("black", "gray"))
    noise = bool(rng.random() < 0.3)
    return Scene(tuple(shapes), background, noise, image_size, width, height)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        cy += 0.15 * r  # centre the triangle's bounding box on the cell point
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return [(cx + 1.1 * r * np.cos(a), cy + 1.1 * r * np.sin(a)) for a in angles]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = np.deg2rad(-90.0 + 36.0 * i)
            pts.append((cx + rad * np.cos(a), cy + 0.08 * r + rad * np.sin(a)))
        return pts
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if kind == "cross":
        t = 0.32 * r
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def draw_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render at 4x and box-downsample (anti-aliased edges), then add optional Gaussian noise."""
    big = (scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE)
    img = Image.new("RGB", big, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, r = s.cx * SUPERSAMPLE, s.cy * SUPERSAMPLE, s.diameter * SUPERSAMPLE / 2
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(s.kind, cx, cy, r), fill=fill)
    img = img.reduce(SUPERSAMPLE)
    if scene.noise:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, NOISE_SIGMA, size=arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img
