"""What a synthetic data set is made of: one frozen dataclass for every place that needs it.

The DataModule's ``data.synthetic`` option, the writer, the manifest, the "is this folder
already the set I want" check and the ``lit-mllm-data synth`` flags all read these fields, so a
new setting is added once. Field metadata says how each field is used:

- ``content``: the field decides the bytes of the written files (it goes into the manifest,
  and a folder written with another value is written again); ``dir`` and ``task`` only say where
  the set lives and which of its files the DataModule reads.
- ``flag``, ``help`` and ``aliases``: whether ``lit-mllm-data synth`` has a flag for the field
  (``--image-size`` for ``image_size``), its help, and older spellings that still work;
  ``parse`` and ``metavar``: how the flag reads its text when the field's type does not say
  (``--canvas 216x72``).
- ``omit_none``: a content field added after ``SYNTHETIC_VERSION`` 2.0 whose ``None`` means
  "as before it existed": left out of the manifest when ``None``, and a manifest without it
  reads as ``None``, so folders written before the field still match and nothing is rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from lit_mllm.data.options import check_int

SYNTHETIC_VERSION = "2.0"
MAX_SHAPES = 3
MIN_IMAGE_SIZE = 24
MAX_CANVAS_SIZE = 4096
IMAGE_FORMATS = ("png", "jpg")
TASKS = ("caption", "instruct")


def _meta(
    help: str,
    *aliases: str,
    content: bool = True,
    flag: bool = True,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    omit_none: bool = False,
) -> dict[str, Any]:
    return {
        "help": help,
        "aliases": aliases,
        "content": content,
        "flag": flag,
        "parse": parse,
        "metavar": metavar,
        "omit_none": omit_none,
    }


def parse_canvas(text: str) -> tuple[int, int] | None:
    """``--canvas`` text: ``WIDTHxHEIGHT`` (or ``WIDTH,HEIGHT``) in pixels; ``none`` for none."""
    if text.strip().lower() in ("none", "null"):
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"canvas must be WIDTHxHEIGHT in pixels (e.g. 216x72) or none, got {text!r}"
        ) from None
    return width, height


@dataclass(frozen=True)
class SyntheticSettings:
    """The embedded default data set: a procedurally drawn captioning set, written once to
    ``dir``. Same content settings, same bytes, whatever the machine or number of workers."""

    dir: str = field(
        default="data/synthetic",
        metadata=_meta("output folder (new, or one this command wrote)", "--out", content=False),
    )
    num_train: int = field(default=4000, metadata=_meta("number of training images", "--train"))
    num_val: int = field(default=200, metadata=_meta("number of validation images", "--val"))
    num_test: int = field(default=200, metadata=_meta("number of test images", "--test"))
    seed: int = field(default=0, metadata=_meta("seed: same settings, same bytes"))
    image_size: int = field(
        default=64, metadata=_meta("image side in pixels (with a canvas: the shapes' scale)")
    )
    max_shapes: int = field(
        default=MAX_SHAPES,
        metadata=_meta(f"shapes per image: 1 to this many (at most {MAX_SHAPES})"),
    )
    jitter: bool = field(
        default=True, metadata=_meta("move shapes inside their grid cell (off: always centred)")
    )
    image_format: Literal["png", "jpg"] = field(
        default="png", metadata=_meta("image file format", "--format")
    )
    task: Literal["caption", "instruct"] = field(
        default="caption",
        metadata=_meta(
            "what the DataModule trains on: captions or conversations", content=False, flag=False
        ),
    )
    canvas: tuple[int, int] | None = field(
        default=None,
        metadata=_meta(
            "drawn image (width, height) in pixels, the 3x3 grid spread over it while shapes keep "
            "their size relative to image_size (larger or wider images with small shapes); "
            "none: the image_size square",
            parse=parse_canvas,
            metavar="WxH",
            omit_none=True,
        ),
    )

    def __post_init__(self) -> None:
        if isinstance(self.canvas, list):  # from JSON or YAML: one value, one spelling
            object.__setattr__(self, "canvas", tuple(self.canvas))

    def canvas_size(self) -> tuple[int, int]:
        """(width, height) of the written images."""
        if self.canvas is None:
            return self.image_size, self.image_size
        width, height = self.canvas
        return width, height

    def check(self, prefix: str = "") -> None:
        """Fail before anything is written, naming the option (``prefix`` + field name)."""
        for name in ("num_train", "num_val", "num_test"):
            check_int(f"{prefix}{name}", getattr(self, name), 0)
        if self.num_train + self.num_val == 0:
            where = prefix.rstrip(".") or "the synthetic data set"
            raise ValueError(f"{where} needs num_train or num_val >= 1, got 0 and 0")
        check_int(f"{prefix}seed", self.seed, None)
        check_int(f"{prefix}image_size", self.image_size, MIN_IMAGE_SIZE)
        check_int(f"{prefix}max_shapes", self.max_shapes, 1, MAX_SHAPES)
        for name, allowed in (("image_format", IMAGE_FORMATS), ("task", TASKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{prefix}{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if not isinstance(self.jitter, bool):
            raise ValueError(f"{prefix}jitter must be true or false, got {self.jitter!r}")
        if self.canvas is not None:
            self._check_canvas(f"{prefix}canvas")

    def _check_canvas(self, name: str) -> None:
        from lit_mllm.data.synthetic.scene import canvas_problem

        canvas = self.canvas
        if not isinstance(canvas, tuple) or len(canvas) != 2:
            raise ValueError(f"{name} must be [width, height] in pixels (or null), got {canvas!r}")
        for side, value in zip(("width", "height"), canvas, strict=True):
            check_int(f"{name} {side}", value, MIN_IMAGE_SIZE, MAX_CANVAS_SIZE)
        problem = canvas_problem(self.image_size, *canvas)
        if problem:
            raise ValueError(f"{name} {canvas[0]}x{canvas[1]}: {problem}")

    def _content_values(self) -> dict[str, Any]:
        """Every content field as JSON writes it (a tuple as a list)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["content"]}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def content(self) -> dict[str, Any]:
        """The fields that decide the files' bytes, as the manifest stores them (without the
        ``omit_none`` fields that are ``None``: a manifest written before them reads the same)."""
        omit = {f.name for f in fields(self) if f.metadata["omit_none"]}
        return {k: v for k, v in self._content_values().items() if not (k in omit and v is None)}

    def counts(self) -> dict[str, int]:
        """Images per written split (a test split only when it has images)."""
        counts = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        return {split: n for split, n in counts.items() if n or split != "test"}

    def matches(self, manifest: dict[str, Any]) -> bool:
        """Whether a written set (its manifest) holds what these settings would write."""
        if manifest.get("version") != SYNTHETIC_VERSION:
            return False
        return all(manifest.get(key) == value for key, value in self._content_values().items())
