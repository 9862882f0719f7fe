"""``canvas``: synthetic images larger or wider than ``image_size`` whose shapes stay small.

The 3x3 grid spans the canvas, shape diameters stay ``SIZE_FRACTION * image_size``; without a
canvas every random number, scene, pixel and manifest key is what it was before the option.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from jsonargparse import ArgumentParser
from PIL import Image, ImageDraw
from synthetic_checks import check_caption_facts

from lit_mllm.data import synthetic as syn
from lit_mllm.data.cli import build_parser
from lit_mllm.data.cli import main as data_cli
from lit_mllm.data.synthetic.scene import SIZE_FRACTION, SUPERSAMPLE, _shape_polygon

CANVASES = [(216, 72), (144, 144)]  # a wide strip (cells 72x24) and a larger square (48x48)
IMAGE_SIZE = 72  # shapes of 12.24 (small) and 20.16 (large) px on both
# The manifest as written before ``canvas`` existed: key for key, in order.
OLD_MANIFEST_KEYS = [
    "name", "version", "num_train", "num_val", "num_test", "seed", "image_size", "max_shapes",
    "jitter", "image_format", "counts", "captions_per_image", "kinds", "colours", "backgrounds",
]  # fmt: skip
OLD_SCENE_KEYS = ["shapes", "background", "noise", "image_size"]
OLD_IMAGE_KEYS = ["id", "file_name", "width", "height", "scene"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("canvas")
    out = {}
    for w, h in CANVASES:
        out[(w, h)] = root / f"{w}x{h}"
        syn.generate_synthetic_dataset(
            out[(w, h)], 6, 3, 2, seed=1, image_size=IMAGE_SIZE, canvas=(w, h), workers=1
        )
    return out


def _check_shapes_in_cells(scene: syn.Scene, width: int, height: int, image_size: int) -> None:
    cell_w, cell_h = width / syn.GRID, height / syn.GRID
    assert (scene.width, scene.height, scene.image_size) == (width, height, image_size)
    for s in scene.shapes:
        assert s.diameter == SIZE_FRACTION[s.size] * image_size, s
        r = s.diameter / 2
        left, right, top, bottom = s.cx - r, s.cx + r, s.cy - r, s.cy + r
        assert s.col * cell_w <= left and right <= (s.col + 1) * cell_w, (s, cell_w)
        assert s.row * cell_h <= top and bottom <= (s.row + 1) * cell_h, (s, cell_h)
        assert left >= 0 and right <= width and top >= 0 and bottom <= height, s
        assert (int(s.cy // cell_h), int(s.cx // cell_w)) == (s.row, s.col), s


@pytest.mark.parametrize("canvas", CANVASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_written_sets_have_the_canvas_size_and_shapes_in_their_cells(
    sets: dict[tuple[int, int], Path], canvas: tuple[int, int]
) -> None:
    out, (width, height) = sets[canvas], canvas
    manifest = syn.read_manifest(out)
    assert manifest is not None and manifest["canvas"] == [width, height]
    settings = syn.SyntheticSettings(str(out), 6, 3, 2, seed=1, image_size=IMAGE_SIZE)
    assert dataclasses.replace(settings, canvas=canvas).matches(manifest)
    assert dataclasses.replace(settings, canvas=[width, height]).matches(manifest)  # YAML list
    assert not settings.matches(manifest)  # no canvas: another set, written again
    assert not dataclasses.replace(settings, canvas=(width, height + 3)).matches(manifest)
    seen = 0
    for split in ("train", "val", "test"):
        coco = json.loads((out / f"captions_{split}.json").read_text())
        captions: dict[int, list[str]] = {img["id"]: [] for img in coco["images"]}
        for ann in coco["annotations"]:
            captions[ann["image_id"]].append(ann["caption"])
        for img in coco["images"]:
            assert (img["width"], img["height"]) == (width, height)
            with Image.open(out / "images" / split / img["file_name"]) as im:
                assert im.size == (width, height) and im.mode == "RGB"
            assert (img["scene"]["width"], img["scene"]["height"]) == (width, height)
            scene = syn.Scene.from_dict(img["scene"])
            assert scene.to_dict() == img["scene"]
            _check_shapes_in_cells(scene, width, height, IMAGE_SIZE)
            for caption in captions[img["id"]]:  # captions only use the grid's rows and cols
                check_caption_facts(caption, scene)
            seen += 1
    assert seen == 11


@pytest.mark.parametrize(
    ("image_size", "canvas"),
    [(72, (216, 72)), (72, (144, 144)), (64, (64, 200)), (100, (300, 85)), (24, (4096, 24))],
)
def test_jitter_keeps_every_shape_in_its_cell(image_size: int, canvas: tuple[int, int]) -> None:
    """Many scenes per canvas, tall and wide ones too; on (300, 85) the large shape fills the
    cell's height (no vertical slack: it sits on the row's centre line) but still moves sideways."""
    settings = syn.SyntheticSettings(image_size=image_size, canvas=canvas)
    settings.check()
    xs, ys = set(), set()
    for i in range(300):
        scene = syn.sample_scene(np.random.default_rng(i), image_size, canvas=canvas)
        _check_shapes_in_cells(scene, *canvas, image_size)
        for s in scene.shapes:
            xs.add(s.cx - (s.col + 0.5) * canvas[0] / 3)
            ys.add((s.size, s.cy - (s.row + 0.5) * canvas[1] / 3))
        fixed = syn.sample_scene(np.random.default_rng(i), image_size, jitter=False, canvas=canvas)
        for s in fixed.shapes:
            assert (s.cx, s.cy) == (
                round((s.col + 0.5) * canvas[0] / 3, 3),
                round((s.row + 0.5) * canvas[1] / 3, 3),
            )
    assert len(xs) > 100  # jitter moves shapes sideways
    if canvas == (300, 85):
        assert {abs(round(dy, 2)) for size, dy in ys if size == "large"} == {0.0}
    assert len({dy for size, dy in ys if size == "small"}) > 50


@pytest.mark.parametrize("canvas", CANVASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_drawing_puts_each_shape_where_its_scene_says(canvas: tuple[int, int]) -> None:
    """x is the width, y the height: each shape's centre pixel has its colour, the canvas
    corners (never inside a cell's shape) keep the background."""
    for i in range(20):
        scene = syn.sample_scene(np.random.default_rng(i), IMAGE_SIZE, canvas=canvas)
        scene = dataclasses.replace(scene, noise=False)
        img = np.asarray(syn.draw_scene(scene, np.random.default_rng(0)))
        assert img.shape == (canvas[1], canvas[0], 3)
        for s in scene.shapes:
            assert tuple(img[int(s.cy), int(s.cx)]) == syn.COLOURS[s.colour], s
        background = syn.BACKGROUNDS[scene.background]
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert tuple(img[y, x]) == background


def test_scene_round_trips_and_reads_old_dicts_as_squares() -> None:
    wide = syn.sample_scene(np.random.default_rng(5), 72, canvas=(216, 72))
    assert syn.Scene.from_dict(wide.to_dict()) == wide
    assert syn.Scene.from_dict(json.loads(json.dumps(wide.to_dict()))) == wide
    assert list(wide.to_dict()) == [*OLD_SCENE_KEYS, "width", "height"]
    square = syn.sample_scene(np.random.default_rng(5), 72)
    assert (square.width, square.height) == (72, 72)
    assert list(square.to_dict()) == OLD_SCENE_KEYS  # written as before
    assert syn.Scene.from_dict(square.to_dict()) == square
    old = {"shapes": [], "background": "gray", "noise": False, "image_size": 40}
    assert syn.Scene.from_dict(old) == syn.Scene((), "gray", False, 40, 40, 40)
    assert syn.Scene((), "gray", False, 40) == syn.Scene((), "gray", False, 40, 40, 40)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"canvas": (216, 50)},
            "data.synthetic.canvas 216x50: its grid cells are 72x16.67 px, too small for a large "
            "shape of 20.16 px (0.28 * image_size 72); make both canvas sides >= 61",
        ),
        ({"canvas": (60, 216)}, "data.synthetic.canvas 60x216: its grid cells are 20x72 px"),
        ({"canvas": (8, 72)}, "data.synthetic.canvas width must be an integer in 24..4096, got 8"),
        ({"canvas": (216, 5000)}, "data.synthetic.canvas height must be an integer in 24..4096"),
        ({"canvas": (216.0, 72)}, "data.synthetic.canvas width must be an integer in 24..4096"),
        ({"canvas": (True, 72)}, "data.synthetic.canvas width must be an integer in 24..4096"),
        ({"canvas": (216,)}, "data.synthetic.canvas must be [width, height] in pixels"),
        ({"canvas": [216, 72, 3]}, "data.synthetic.canvas must be [width, height] in pixels"),
        ({"canvas": "216x72"}, "data.synthetic.canvas must be [width, height] in pixels"),
    ],
)
def test_bad_canvases_are_refused_naming_the_option(change: dict, message: str) -> None:
    settings = syn.SyntheticSettings(image_size=72, **change)
    with pytest.raises(ValueError) as caught:
        settings.check("data.synthetic.")
    assert str(caught.value).startswith(message)
    with pytest.raises(ValueError, match=r"^canvas"):
        settings.check()


def test_the_limits_are_inclusive_and_the_writer_refuses_first(tmp_path: Path) -> None:
    syn.SyntheticSettings(image_size=72, canvas=(61, 61)).check()  # cells 20.33 >= 20.16
    syn.SyntheticSettings(image_size=24, canvas=(24, 4096)).check()
    with pytest.raises(ValueError, match=r"^canvas 60x60: .* sides >= 61"):
        syn.sample_scene(np.random.default_rng(0), 72, canvas=(60, 60))
    with pytest.raises(ValueError, match=r"^canvas 216x60"):
        syn.generate_synthetic_dataset(tmp_path / "d", 2, 2, image_size=72, canvas=(216, 60))
    assert not (tmp_path / "d").exists()


def test_cli_canvas_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def synth(*argv: str) -> dict:
        return vars(build_parser().parse_args(["synth", *argv]))

    assert synth()["canvas"] is None
    assert synth("--canvas", "216x72")["canvas"] == (216, 72)
    assert synth("--canvas", "144,144")["canvas"] == (144, 144)
    assert synth("--canvas", "216X72", "--canvas", "none")["canvas"] is None
    capsys.readouterr()
    with pytest.raises(SystemExit):
        synth("--canvas", "216")
    assert "canvas must be WIDTHxHEIGHT in pixels (e.g. 216x72)" in capsys.readouterr().err

    argv = ["synth", "--dir", str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2"]
    argv += ["--num-test", "0", "--seed", "4", "--image-size", "72", "--workers", "1"]
    assert data_cli([*argv, "--canvas", "216x72"]) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    syn.generate_synthetic_dataset(
        tmp_path / "py", 3, 2, seed=4, image_size=72, canvas=(216, 72), workers=1
    )
    cli_files = sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*.*"))
    assert len(cli_files) == 5 + 5  # images + 2 COCO + 2 LLaVA + manifest
    for rel in cli_files:
        assert (tmp_path / "cli" / rel).read_bytes() == (tmp_path / "py" / rel).read_bytes(), rel
    with Image.open(tmp_path / "cli" / "images" / "val" / "000004.png") as im:
        assert im.size == (216, 72)
    assert data_cli([*argv, "--canvas", "216x60"]) == 2  # refused, naming the option
    assert "canvas 216x60" in capsys.readouterr().err


def test_config_files_give_the_canvas_as_a_yaml_list() -> None:
    """``data.synthetic.canvas: [216, 72]``, as LightningCLI (jsonargparse) reads the type."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--synthetic", type=syn.SyntheticSettings | None)
    config = parser.parse_string("synthetic:\n  image_size: 72\n  canvas: [216, 72]\n")
    settings = parser.instantiate(config).synthetic
    assert settings.canvas == (216, 72) and settings.canvas_size() == (216, 72)
    settings.check("data.synthetic.")
    plain = parser.instantiate(parser.parse_string("synthetic:\n  num_val: 3\n")).synthetic
    assert plain.canvas is None and plain.canvas_size() == (64, 64)


# -- without a canvas: what was there before the option, number for number ------------------


def _old_sample_scene(
    rng: np.random.Generator, image_size: int, max_shapes: int, jitter: bool
) -> syn.Scene:
    """``sample_scene`` as it was before ``canvas``, copied."""
    n = 1 + int(rng.integers(max_shapes))
    kinds = [syn.KINDS[i] for i in rng.permutation(len(syn.KINDS))[:n]]
    cells = [divmod(int(c), 3) for c in rng.permutation(9)[:n]]
    colour_names = list(syn.COLOURS)
    cell = image_size / 3
    shapes = []
    for kind, (row, col) in zip(kinds, cells, strict=True):
        colour = colour_names[int(rng.integers(len(colour_names)))]
        size = syn.SIZES[int(rng.integers(len(syn.SIZES)))]
        diameter = SIZE_FRACTION[size] * image_size
        slack = max(0.0, (cell - diameter) / 2 - 0.04 * cell) if jitter else 0.0
        cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack))
        shapes.append(syn.Shape(kind, colour, size, row, col, round(cx, 3), round(cy, 3), diameter))
    shapes.sort(key=lambda s: (s.row, s.col))
    background = "white" if rng.random() < 0.5 else ("black", "gray")[int(rng.integers(2))]
    noise = bool(rng.random() < 0.3)
    return syn.Scene(tuple(shapes), background, noise, image_size)


def _old_draw_scene(scene: syn.Scene, rng: np.random.Generator) -> Image.Image:
    """``draw_scene`` as it was before ``canvas``, copied."""
    big = scene.image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), syn.BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, r = s.cx * SUPERSAMPLE, s.cy * SUPERSAMPLE, s.diameter * SUPERSAMPLE / 2
        fill = syn.COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(s.kind, cx, cy, r), fill=fill)
    img = img.reduce(SUPERSAMPLE)
    if scene.noise:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, syn.NOISE_SIGMA, size=arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


@pytest.mark.parametrize(
    ("image_size", "max_shapes", "jitter"), [(64, 3, True), (72, 2, False), (32, 3, True)]
)
def test_no_canvas_draws_the_same_numbers_scenes_and_pixels(
    image_size: int, max_shapes: int, jitter: bool
) -> None:
    for i in range(60):
        old_rng, new_rng = np.random.default_rng(i), np.random.default_rng(i)
        old = _old_sample_scene(old_rng, image_size, max_shapes, jitter)
        new = syn.sample_scene(new_rng, image_size, max_shapes, jitter)
        assert new == old and new.to_dict() == old.to_dict()
        assert list(new.to_dict()) == OLD_SCENE_KEYS
        same = syn.sample_scene(np.random.default_rng(i), image_size, max_shapes, jitter, None)
        assert same == new
        explicit = syn.sample_scene(
            np.random.default_rng(i), image_size, max_shapes, jitter, (image_size,) * 2
        )
        assert explicit == new  # the image_size square as a canvas: the same scene
        if i < 8:  # drawing (with its noise draws) from the same generator state
            a, b = _old_draw_scene(old, old_rng), syn.draw_scene(new, new_rng)
            assert a.size == b.size and a.tobytes() == b.tobytes()
        assert old_rng.integers(1 << 62) == new_rng.integers(1 << 62)  # same numbers consumed


def test_no_canvas_writes_what_was_written_before(tmp_path: Path) -> None:
    """The manifest has the old keys and no more, a manifest written before ``canvas`` (no such
    key) still matches, and the writer's scenes, captions and conversations are make_sample's."""
    settings = syn.SyntheticSettings(str(tmp_path), 6, 3, 0, seed=2, image_size=32)
    assert settings.canvas is None and settings.canvas_size() == (32, 32)
    assert "canvas" not in settings.content()
    syn.write_synthetic(settings, workers=1)
    manifest = syn.read_manifest(tmp_path)
    assert manifest is not None and list(manifest) == OLD_MANIFEST_KEYS
    assert settings.matches(manifest)
    assert not dataclasses.replace(settings, canvas=(96, 32)).matches(manifest)
    assert not settings.matches({**manifest, "canvas": [96, 32]})
    assert settings.matches({**manifest, "canvas": None})
    assert syn.ensure_written(settings) is False  # a folder of before the option: kept
    llava = json.loads((tmp_path / "llava_train.json").read_text())
    coco = json.loads((tmp_path / "captions_train.json").read_text())
    assert len(coco["images"]) == len(llava) == 6
    for index, (img, conv) in enumerate(zip(coco["images"], llava, strict=True)):
        scene, captions, conversation, _ = syn.make_sample(2, "train", index, 32)
        assert list(img) == OLD_IMAGE_KEYS and (img["width"], img["height"]) == (32, 32)
        assert img["scene"] == scene.to_dict() and list(img["scene"]) == OLD_SCENE_KEYS
        refs = [a["caption"] for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert refs == captions and conv["conversations"] == conversation
        with Image.open(tmp_path / "images" / "train" / img["file_name"]) as im:
            assert im.size == (32, 32)


@pytest.mark.parametrize(("crop_mode", "left_third_red"), [(None, False), ("squash", True)])
def test_crop_mode_squash_keeps_the_ends_of_a_wide_canvas(
    crop_mode: str | None, left_third_red: bool
) -> None:
    """timm's default (center) crop of a 216x72 strip keeps only its middle 72x72 cell column;
    ``data.crop_mode: squash`` keeps all of it: the fair one-view baseline for slicing."""
    from lit_mllm.data.transforms import build_image_transform

    config = {"input_size": (3, 72, 72), "interpolation": "bilinear", "crop_pct": 1.0,
              "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # fmt: skip
    image = Image.new("RGB", (216, 72), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((0, 0, 71, 71), fill=(255, 0, 0))
    pixels = build_image_transform(config, crop_mode=crop_mode)(image)
    assert pixels.shape == (3, 72, 72)
    red = (pixels[1] < 0.5) & (pixels[0] > 0.5)  # green gone, red kept
    assert bool(red[:, :20].all()) is left_third_red
    assert not bool(red[:, 28:].any())
