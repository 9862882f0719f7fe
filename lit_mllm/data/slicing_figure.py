"""A picture of one slice plan: what the encoder sees of an image (for the README and notebooks).

Left, the source image with the slice grid drawn over it; right, the thumbnail and the slices
as the encoder gets them, each labelled with its size. The README's example was made with::

    python -m lit_mllm.data.slicing_figure --out benchmarks/slicing_example.png

(a synthetic 1008x336 scene, ``ImageSlicing(scale_resolution=336, patch_size=14)``: a 3x1 grid
of 336x336 slices plus a 574x196 thumbnail). ``--image PATH`` draws a real image instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lit_mllm.data.slicing import ImageSlicing, SlicePlan, describe, plan_slices, slice_views

_MARGIN = 16
_GAP = 10
_GRID_COLOUR = (230, 30, 30)
_FRAME_COLOUR = (150, 150, 150)
_TEXT_COLOUR = (20, 20, 20)


def draw_slice_plan(
    image: Image.Image, plan: SlicePlan, *, max_side: int = 640, resample: int = Image.BICUBIC
) -> Image.Image:
    """Source with its grid (left), thumbnail and slices (right), on one white RGB canvas.

    Every panel is drawn at the same display scale (at most 1, so that the longest panel side
    is at most ``max_side``), so the sizes of the source and the views compare by eye.
    """
    image = image.convert("RGB")
    views = slice_views(image, plan, resample)
    font = ImageFont.load_default()
    label_h = _text_size(font, "Ag0x")[1] + 4
    cols, rows = plan.grid or (0, 0)
    sw, sh = plan.slice_size or (0, 0)
    longest = max(*image.size, *plan.thumbnail, cols * sw, rows * sh)
    scale = min(1.0, max_side / longest)

    def shown(size: tuple[int, int]) -> tuple[int, int]:
        return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))

    source = image.resize(shown(image.size), Image.LANCZOS)
    thumb = views[0].resize(shown(plan.thumbnail), Image.LANCZOS)
    slices = [view.resize(shown((sw, sh)), Image.LANCZOS) for view in views[1:]]
    slice_labels = [f"slice {i + 1} ({sw}x{sh})" for i in range(len(slices))]
    grid_text = f"grid {cols}x{rows}" if plan.grid else "not sliced"
    source_label = f"source {image.width}x{image.height}, {grid_text}"
    thumb_label = f"thumbnail {plan.thumbnail[0]}x{plan.thumbnail[1]}"

    cell_w = max([shown((sw, sh))[0]] + [_text_size(font, t)[0] for t in slice_labels])
    cell_h = label_h + shown((sw, sh))[1]
    slices_w = cols * cell_w + max(cols - 1, 0) * _GAP
    slices_h = rows * cell_h + max(rows - 1, 0) * _GAP
    left_w = max(source.width, _text_size(font, source_label)[0])
    right_w = max(thumb.width, _text_size(font, thumb_label)[0], slices_w)
    right_h = label_h + thumb.height + (_GAP * 2 + slices_h if slices else 0)
    width = _MARGIN + left_w + 2 * _MARGIN + right_w + _MARGIN
    height = _MARGIN + max(label_h + source.height, right_h) + _MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    x, y = _MARGIN, _MARGIN
    draw.text((x, y), source_label, fill=_TEXT_COLOUR, font=font)
    canvas.paste(source, (x, y + label_h))
    _frame(draw, x, y + label_h, source.size)
    for col in range(1, cols):  # cell edges in source pixels: the slices are crops of a resize
        line_x = x + round(col * source.width / cols)
        bottom = y + label_h + source.height - 1
        draw.line([(line_x, y + label_h), (line_x, bottom)], fill=_GRID_COLOUR, width=3)
    for row in range(1, rows):
        line_y = y + label_h + round(row * source.height / rows)
        draw.line([(x, line_y), (x + source.width - 1, line_y)], fill=_GRID_COLOUR, width=3)

    x = _MARGIN + left_w + 2 * _MARGIN
    draw.text((x, y), thumb_label, fill=_TEXT_COLOUR, font=font)
    canvas.paste(thumb, (x, y + label_h))
    _frame(draw, x, y + label_h, thumb.size)
    top = y + label_h + thumb.height + 2 * _GAP
    for index, (view, label) in enumerate(zip(slices, slice_labels, strict=True)):
        row, col = divmod(index, cols)
        cx, cy = x + col * (cell_w + _GAP), top + row * (cell_h + _GAP)
        draw.text((cx, cy), label, fill=_TEXT_COLOUR, font=font)
        canvas.paste(view, (cx, cy + label_h))
        _frame(draw, cx, cy + label_h, view.size)
    return canvas


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _frame(draw: ImageDraw.ImageDraw, x: int, y: int, size: tuple[int, int]) -> None:
    draw.rectangle([x - 1, y - 1, x + size[0], y + size[1]], outline=_FRAME_COLOUR)


def synthetic_scene(width: int = 1008, height: int = 336) -> Image.Image:
    """A deterministic wide scene (sky, ground, sun, houses, a tree) whose shapes cross cells."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky_top, sky_bottom = np.array([70, 130, 210]), np.array([190, 220, 250])
    pixels = np.broadcast_to(sky_top + (sky_bottom - sky_top) * ys, (height, width, 3))
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * width, y0 * height, x1 * width, y1 * height]

    draw.rectangle(box(0.0, 0.72, 1.0, 1.0), fill=(90, 160, 70))
    draw.ellipse(box(0.06, 0.08, 0.16, 0.38), fill=(250, 210, 60))
    for x0, colour in ((0.22, (200, 80, 60)), (0.45, (240, 170, 60)), (0.74, (120, 90, 170))):
        draw.rectangle(box(x0, 0.45, x0 + 0.12, 0.8), fill=colour)
        eaves, ridge = 0.45 * height, 0.22 * height
        roof = [
            (x0 * width - 8, eaves),
            ((x0 + 0.06) * width, ridge),
            ((x0 + 0.12) * width + 8, eaves),
        ]
        draw.polygon(roof, fill=(110, 50, 40))
        draw.rectangle(box(x0 + 0.045, 0.62, x0 + 0.075, 0.8), fill=(60, 40, 30))
    # a tree whose crown crosses a cell edge
    draw.rectangle(box(0.64, 0.5, 0.655, 0.82), fill=(100, 70, 40))
    draw.ellipse(box(0.6, 0.25, 0.695, 0.58), fill=(40, 120, 50))
    draw.ellipse(box(0.3, 0.05, 0.42, 0.2), fill=(245, 245, 250))  # a cloud across a cell edge
    draw.ellipse(box(0.27, 0.1, 0.36, 0.24), fill=(245, 245, 250))
    return image


def main(argv: list[str] | None = None) -> None:
    """Write the picture of one plan (the README's example by default)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/slicing_example.png"))
    parser.add_argument("--image", type=Path, default=None, help="a real image (default: scene)")
    parser.add_argument("--width", type=int, default=1008, help="synthetic scene width")
    parser.add_argument("--height", type=int, default=336, help="synthetic scene height")
    parser.add_argument("--scale-resolution", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--max-slices", type=int, default=9)
    parser.add_argument("--max-side", type=int, default=640, help="longest panel side drawn")
    args = parser.parse_args(argv)
    slicing = ImageSlicing(
        max_slices=args.max_slices,
        scale_resolution=args.scale_resolution,
        patch_size=args.patch_size,
    )
    slicing.check(prefix="")
    if args.image is not None:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    else:
        image = synthetic_scene(args.width, args.height)
    plan = plan_slices(image.width, image.height, slicing)
    figure = draw_slice_plan(image, plan, max_side=args.max_side)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out, optimize=True)
    print(f"{describe(plan)}; wrote {args.out} ({figure.width}x{figure.height})")


if __name__ == "__main__":
    main()
