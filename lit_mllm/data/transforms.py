"""Image loading and the transform derived from the vision encoder's timm data config."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform

# PIL's own default limit (1024**3 // 4 // 3, about 89 MP), written out rather than read from or
# written to ``Image.MAX_IMAGE_PIXELS``: that is process-wide state that belongs to whoever runs us.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class BadImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short key used in skip counts."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def load_rgb_image(
    path: str,
    *,
    data: bytes | None = None,
    min_side: int = 2,
    max_aspect_ratio: float = 50.0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Open and fully decode an image as RGB (grayscale, CMYK, RGBA, 16-bit all converted).

    Decompression bombs: the size in the header (``Image.open`` reads only the header) is checked
    against ``max_pixels`` *before* anything is decoded, so a 50 kB file claiming 20000x20000 px
    costs nothing. PIL's own bomb check (an error at twice its process-wide limit, a warning
    above it that ``-W error`` turns into an exception) is reported under the same reason, and
    the decoded size is checked again for formats whose pixels differ from their header.

    ``data``: the encoded file itself (from a shard); ``path`` then only names it.
    """
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            _check_pixels(path, image.size, max_pixels)
            image.load()
            _check_pixels(path, image.size, max_pixels)
            if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(background, rgba).convert("RGB")
            elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = torch.from_numpy(__import__("numpy").asarray(image, dtype="float32"))
                scale = 255.0 / max(float(array.max()), 1.0)
                rgb = Image.fromarray((array * scale).clamp(0, 255).byte().numpy()).convert("RGB")
            else:
                rgb = image.convert("RGB")
    except BadImageError:
        raise
    except FileNotFoundError as error:
        raise BadImageError(path, "missing_image", "file not found") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # PIL's own check: an error over twice its limit, or its warning where warnings are
        # errors (``-W error``); neither is an OSError, so each would otherwise escape uncounted
        raise BadImageError(
            path, "image_too_large", f"PIL refused it as a decompression bomb: {error}"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImageError(
            path, "undecodable_image", str(error) or type(error).__name__
        ) from error
    width, height = rgb.size
    if min(width, height) < min_side:
        raise BadImageError(path, "image_too_small", f"{width}x{height} px")
    if max(width, height) / min(width, height) > max_aspect_ratio:
        raise BadImageError(path, "extreme_aspect_ratio", f"{width}x{height} px")
    return rgb


def _check_pixels(path: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise BadImageError(
            path,
            "image_too_large",
            f"{width}x{height} = {width * height:,} px is over data.max_image_pixels "
            f"({max_pixels:,}); not decoded (a possible decompression bomb). Raise the limit "
            "only for data you trust",
        )


def build_image_transform(
    data_config: Mapping[str, Any],
    *,
    train: bool = False,
    augment: bool = False,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's own transform for the encoder (size, interpolation, mean/std).

    Augmentation is off by default: random crops and flips change facts that captions state
    ("left of", "top"), so turn it on only for data where that is harmless. ``crop_mode`` is
    timm's: ``center`` (resize the short side, crop the middle: a wide image loses its ends),
    ``squash`` (resize to the input size, aspect not kept: nothing lost) or ``border``.
    """
    config = dict(data_config)
    if crop_pct is not None:
        config["crop_pct"] = crop_pct
    if crop_mode is not None:
        config["crop_mode"] = crop_mode
    return create_transform(**config, is_training=train and augment)
