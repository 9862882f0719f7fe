"""Image loading and the transform derived from the vision encoder's timm data config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform

Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs beyond this, not typical photos


class BadImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short key used in skip counts."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason = path, reason


def load_rgb_image(path: str, *, min_side: int = 2, max_aspect_ratio: float = 50.0) -> Image.Image:
    """Open and fully decode an image as RGB (grayscale, CMYK, RGBA, 16-bit all converted)."""
    try:
        with Image.open(path) as image:
            image.load()
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
    except FileNotFoundError as error:
        raise BadImageError(path, "missing_image", "file not found") from error
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise BadImageError(
            path, "undecodable_image", str(error) or type(error).__name__
        ) from error
    width, height = rgb.size
    if min(width, height) < min_side:
        raise BadImageError(path, "image_too_small", f"{width}x{height} px")
    if max(width, height) / min(width, height) > max_aspect_ratio:
        raise BadImageError(path, "extreme_aspect_ratio", f"{width}x{height} px")
    return rgb


def build_image_transform(
    data_config: Mapping[str, Any],
    *,
    train: bool = False,
    augment: bool = False,
    crop_pct: float | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's own transform for the encoder (size, interpolation, mean/std).

    Augmentation is off by default: random crops and flips change facts that captions state
    ("left of", "top"), so turn it on only for data where that is harmless.
    """
    config = dict(data_config)
    if crop_pct is not None:
        config["crop_pct"] = crop_pct
    return create_transform(**config, is_training=train and augment)
