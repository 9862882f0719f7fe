"""Writing the synthetic set: byte-identical output, formats, manifest, and reuse of a folder."""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path

import numpy as np
import PIL
import PIL.features
import pytest
from PIL import Image
from synthetic_checks import check_caption_facts

from lit_mllm.data import synthetic as syn
from lit_mllm.data.cli import main as data_cli

# Hashes of files the generator wrote before it became a package (see its "about" field).
BEFORE_THE_SPLIT = Path(__file__).parent / "fixtures" / "synthetic_sha256.json"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    syn.generate_synthetic_dataset(out, 40, 20, 10, seed=7, workers=1)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pixel_sha256(path: Path) -> str:
    with Image.open(path) as im:
        return _sha256(f"{im.mode} {im.size}".encode() + np.asarray(im).tobytes())


def test_same_seed_is_byte_identical_for_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    syn.generate_synthetic_dataset(tmp_path / "b", 40, 20, 10, seed=7, workers=2)
    a, b = _files(dataset), _files(tmp_path / "b")
    assert len(a) == 40 + 20 + 10 + 6  # images + 3 COCO files + 2 LLaVA files + manifest
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_files_equal_those_written_before_the_split(tmp_path: Path) -> None:
    """Same settings, same bytes as the single-module generator had (images, COCO and LLaVA
    JSON, tokenizer text, consensus captions), so `make demo` prints the same numbers.

    Encoded image bytes also depend on Pillow, zlib and libjpeg: with other versions than the
    recorded ones only the decoded pixels are compared (JSON is always compared byte for byte).
    """
    expected = json.loads(BEFORE_THE_SPLIT.read_text())
    encoders = {
        "pillow": PIL.__version__,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "libjpeg": PIL.features.version("jpg"),
    }
    for name, case in expected["cases"].items():
        out = tmp_path / name
        syn.generate_synthetic_dataset(out, workers=1, **case)
        files = {k: _sha256(v) for k, v in _files(out).items() if k != syn.MANIFEST}
        assert files.keys() == expected["files"][name].keys(), name
        for key, digest in expected["files"][name].items():
            if key.endswith(".json") or encoders == expected["encoders"]:
                assert files[key] == digest, (name, key)
        pixels = {k: _pixel_sha256(out / k) for k in files if not k.endswith(".json")}
        assert pixels == expected["pixels"][name], name
    text = "\n".join(syn.iter_synthetic_texts(1234, 3000))  # the tiny tokenizer's training text
    assert _sha256(text.encode()) == expected["tokenizer_text"]
    consensus = [syn.consensus_caption(syn.make_sample(0, "val", i, 72)[0]) for i in range(200)]
    assert _sha256("\n".join(consensus).encode()) == expected["consensus_val_seed0"]


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    syn.generate_synthetic_dataset(tmp_path / "c", 40, 20, 10, seed=8, workers=1)
    a, c = _files(dataset), _files(tmp_path / "c")
    assert a.keys() == c.keys()
    differing_images = [k for k in a if k.endswith(".png") and a[k] != c[k]]
    assert len(differing_images) >= 60
    assert a["captions_train.json"] != c["captions_train.json"]


def test_layout_and_unique_ids(dataset: Path) -> None:
    manifest = json.loads((dataset / "synthetic_manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["image_size"] == 64
    assert manifest["counts"] == {"train": 40, "val": 20, "test": 10}
    assert manifest["version"] == syn.SYNTHETIC_VERSION
    ids: list[int] = []
    for split in ("train", "val", "test"):
        coco = json.loads((dataset / f"captions_{split}.json").read_text())
        assert set(coco) >= {"info", "licenses", "images", "annotations"}
        for img in coco["images"]:
            path = dataset / "images" / split / img["file_name"]
            assert img["file_name"] == f"{img['id']:06d}.png"
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"]) == (64, 64)
                assert im.mode == "RGB"
        ids += [img["id"] for img in coco["images"]]
    assert sorted(ids) == list(range(1, 71))  # train 1..40, val 41..60, test 61..70
    assert not (dataset / "llava_test.json").exists()


def test_manifest_holds_the_content_settings(dataset: Path, tmp_path: Path) -> None:
    manifest = syn.read_manifest(dataset)
    settings = syn.SyntheticSettings(str(dataset), 40, 20, 10, seed=7)
    assert manifest is not None and settings.matches(manifest)
    assert {k: manifest[k] for k in settings.content()} == settings.content()
    assert "dir" not in manifest and "task" not in manifest  # where and how it is read: not content
    assert manifest["kinds"] == list(syn.KINDS) and manifest["captions_per_image"] == 5
    syn.generate_synthetic_dataset(tmp_path, 4, 2, seed=0, workers=1, max_shapes=2, jitter=False)
    manifest = json.loads((tmp_path / "synthetic_manifest.json").read_text())
    assert manifest["max_shapes"] == 2 and manifest["jitter"] is False
    assert syn.read_manifest(tmp_path / "nowhere") is None


def test_ensure_written_writes_only_when_the_content_changes(tmp_path: Path) -> None:
    settings = syn.SyntheticSettings(str(tmp_path), num_train=3, num_val=2, num_test=0)
    assert syn.ensure_written(settings) is True
    stamp = (tmp_path / syn.MANIFEST).stat().st_mtime_ns
    assert syn.ensure_written(settings) is False
    instruct = syn.SyntheticSettings(str(tmp_path), 3, 2, 0, task="instruct")
    assert syn.ensure_written(instruct) is False  # task decides what is read, not what is written
    assert (tmp_path / syn.MANIFEST).stat().st_mtime_ns == stamp
    assert syn.ensure_written(syn.SyntheticSettings(str(tmp_path), 3, 2, 0, seed=1)) is True
    assert json.loads((tmp_path / syn.MANIFEST).read_text())["seed"] == 1
    old = {**json.loads((tmp_path / syn.MANIFEST).read_text()), "version": "1.0"}
    (tmp_path / syn.MANIFEST).write_text(json.dumps(old))
    assert syn.ensure_written(syn.SyntheticSettings(str(tmp_path), 3, 2, 0, seed=1)) is True


def test_pycocotools_loads_five_distinct_captions(dataset: Path) -> None:
    from pycocotools.coco import COCO

    for split, n in (("train", 40), ("val", 20), ("test", 10)):
        coco = COCO(str(dataset / f"captions_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert len(coco.getAnnIds()) == 5 * n
        for img_id in coco.getImgIds():
            caps = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
            assert len(caps) == 5 and len(set(caps)) == 5, caps


def test_load_references_reads_back_each_image_s_captions(dataset: Path) -> None:
    refs = syn.load_references(dataset, "val")
    assert sorted(refs) == list(range(41, 61))
    coco = json.loads((dataset / "captions_val.json").read_text())
    assert sum(len(r) for r in refs.values()) == len(coco["annotations"]) == 100
    assert refs[41] == [a["caption"] for a in coco["annotations"] if a["image_id"] == 41]


def test_captions_state_the_drawn_facts(dataset: Path) -> None:
    coco = json.loads((dataset / "captions_train.json").read_text())
    caps: dict[int, list[str]] = {}
    for ann in coco["annotations"]:
        caps.setdefault(ann["image_id"], []).append(ann["caption"])
    for img in coco["images"]:
        scene = syn.Scene.from_dict(img["scene"])
        for cap in caps[img["id"]]:
            check_caption_facts(cap, scene)
        # The pixel at each shape's centre has that shape's colour (noise: within 3.5 sigma).
        arr = np.asarray(Image.open(dataset / "images" / "train" / img["file_name"]), dtype=int)
        tol = 3.5 * syn.NOISE_SIGMA if scene.noise else 1
        for s in scene.shapes:
            px = arr[int(s.cy), int(s.cx)]
            assert np.abs(px - np.array(syn.COLOURS[s.colour])).max() <= tol, (img["id"], s)
        # A corner is background (no shape reaches the image border corner).
        bg = np.array(syn.BACKGROUNDS[scene.background])
        assert np.abs(arr[0, 0] - bg).max() <= (3.5 * syn.NOISE_SIGMA if scene.noise else 0)


def test_llava_conversations_are_valid(dataset: Path) -> None:
    for split in ("train", "val"):
        llava = json.loads((dataset / f"llava_{split}.json").read_text())
        coco = json.loads((dataset / f"captions_{split}.json").read_text())
        refs = {a["caption"] for a in coco["annotations"]}
        assert [r["id"] for r in llava] == [f"{img['id']:06d}" for img in coco["images"]]
        for rec in llava:
            assert (dataset / "images" / rec["image"]).is_file()
            conv = rec["conversations"]
            assert 6 <= len(conv) <= 10 and len(conv) % 2 == 0
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert all(t["value"].strip() for t in conv)
            answers = [t["value"] for t in conv[1::2]]
            assert sum(a in refs for a in answers) == 1  # exactly one caption request


def test_generation_speed(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    syn.generate_synthetic_dataset(tmp_path, 300, 0, seed=1, workers=1)
    per_image = (time.perf_counter() - t0) / 300
    assert per_image < 0.02, f"{per_image * 1e3:.1f} ms per image"  # ~1.5 ms measured


def test_rerun_removes_stale_images_and_refuses_foreign_folders(tmp_path: Path) -> None:
    syn.generate_synthetic_dataset(tmp_path / "d", 12, 3, 2, seed=0, workers=1)
    syn.generate_synthetic_dataset(tmp_path / "d", 5, 2, seed=0, workers=1)
    assert sorted(p.name for p in (tmp_path / "d" / "images" / "val").iterdir()) == [
        "000006.png",
        "000007.png",
    ]
    assert not any((tmp_path / "d" / "images" / "test").iterdir())
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="synthetic_manifest.json"):
        syn.generate_synthetic_dataset(tmp_path / "e", 2, 2)
    with pytest.raises(ValueError, match="image_format"):
        syn.generate_synthetic_dataset(tmp_path / "f", 2, 2, image_format="gif")


def test_cli_synth_jpg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", "--out", str(tmp_path), "--train", "6", "--val", "3", "--seed", "2"]
    assert data_cli([*argv, "--test", "0", "--format", "jpg", "--image-size", "48"]) == 0
    assert "wrote 9 images" in capsys.readouterr().out
    with Image.open(tmp_path / "images" / "val" / "000007.jpg") as im:
        assert im.format == "JPEG" and im.size == (48, 48)


def test_cli_flags_are_the_settings_fields(tmp_path: Path, capsys) -> None:
    """The field names as flags write what the same settings write from Python."""
    settings = syn.SyntheticSettings(
        str(tmp_path / "py"), 4, 2, 1, seed=5, image_size=40, max_shapes=2, jitter=False
    )
    syn.write_synthetic(settings, workers=1)
    argv = ["synth", "--dir", str(tmp_path / "cli"), "--num-train", "4", "--num-val", "2"]
    argv += ["--num-test", "1", "--seed", "5", "--image-size", "40", "--max-shapes", "2"]
    assert data_cli([*argv, "--no-jitter", "--image-format", "png", "--workers", "1"]) == 0
    assert "lit-mllm-score --annotations" in capsys.readouterr().out  # where the baseline is
    assert _files(tmp_path / "py") == _files(tmp_path / "cli")
