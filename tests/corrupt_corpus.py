"""A LLaVA JSONL corpus with known injected faults, to prove that bad data is counted, not lost.

A test fixture (``test_bad_data.py``), not part of the package: users never need a broken set.

``write_corrupt_corpus(src, out, seed)`` takes a synthetic data set (``src/images/train/*.png``
and ``src/llava_train.json``) and writes::

    out/llava_corrupt.jsonl     good and faulty records, shuffled (seeded)
    out/images/                 the image root: good images, broken files, links
    out/outside/                files outside the root (targets of escaping links)
    out/faults.json             the ground truth (see below)

Every fault kind is mapped to the reason key under which the loader (``data/readers/``, counted in
``MLLMDataModule.skipped_at_load``) or the dataset (``conversation.py`` / ``transforms.py``,
counted per batch in ``batch["skipped"]`` and ``skipped_train.json``) reports it.
Unusual but valid images (grayscale, 16-bit, RGBA, palette with transparency, CMYK JPEG), a
text-only record and a symlink that stays inside the root are *good* samples: they must be
converted and trained on.

``faults.json``: ``faults`` ({kind: count}), ``expected_skipped_at_load`` and
``expected_skipped_train`` ({reason: count}), ``kinds`` ({kind: {reason, stage}}), ``good``
(count) and ``good_ids``, and ``records`` (per JSONL line: id, kind, reason, stage).
Counts hold for ``max_length`` up to ``OVER_LONG_TOKENS`` (over-long records are longer).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CORPUS_NAME = "llava_corrupt.jsonl"
OVER_LONG_TOKENS = 2048  # over-long prompts are longer than this many tokens


@dataclass(frozen=True)
class FaultKind:
    reason: str  # the skip-count key the code reports
    stage: str  # "load" (data/readers/) or "train" (dataset: conversation / image decoding)
    what: str


FAULT_KINDS: dict[str, FaultKind] = {
    # found while reading the annotation file
    "malformed_json": FaultKind("malformed_json", "load", "a JSONL line that does not parse"),
    "conversations_not_list": FaultKind("bad_type", "load", "'conversations' is not a list"),
    "value_not_string": FaultKind("bad_type", "load", "a turn's 'value' is not a string"),
    "missing_image_file": FaultKind("missing_image", "load", "the image file does not exist"),
    "path_dotdot": FaultKind("path_escape", "load", "image path '../../etc/passwd'"),
    "path_absolute": FaultKind("path_escape", "load", "absolute image path '/etc/passwd'"),
    "symlink_file_out": FaultKind("path_escape", "load", "an image that links out of the root"),
    "symlink_dir_out": FaultKind("path_escape", "load", "a folder that links out of the root"),
    # found when the sample is built (tokenising, decoding the image)
    "truncated_image": FaultKind("undecodable_image", "train", "a PNG cut in half"),
    "zero_byte_image": FaultKind("undecodable_image", "train", "an empty .png file"),
    "not_an_image": FaultKind("undecodable_image", "train", "a text file named .png"),
    "image_1x1": FaultKind("image_too_small", "train", "a 1x1 px image"),
    "image_10000x50": FaultKind("extreme_aspect_ratio", "train", "a 10000x50 px image"),
    "unknown_role": FaultKind("unknown_role", "train", "a turn from 'robot'"),
    "non_alternating": FaultKind("non_alternating", "train", "two user turns in a row"),
    "empty_reply": FaultKind("empty_reply", "train", "an assistant reply of only spaces"),
    "extra_image_marker": FaultKind("image_count_mismatch", "train", "2 <image> for 1 image"),
    "missing_image_marker": FaultKind("image_count_mismatch", "train", "1 <image> for 2 images"),
    "over_long": FaultKind("no_supervised_tokens", "train", "reply lost to truncation"),
}
GOOD_VARIANTS = ("gray", "gray16", "rgba", "palette_alpha", "cmyk_jpeg", "symlink_inside", "text")


def _solid(size: tuple[int, int], colour: tuple[int, int, int] = (200, 60, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


class _Writer:
    """Builds records and the files they point to under ``out``."""

    def __init__(self, src: Path, out: Path, rng: random.Random) -> None:
        self.src, self.out, self.rng = src, out, rng
        self.root = out / "images"
        self.train = [json.loads(json.dumps(r)) for r in _read_llava(src / "llava_train.json")]
        if not self.train:
            raise ValueError(f"{src / 'llava_train.json'} holds no records to build from")
        self.lines: list[tuple[str, dict[str, Any]]] = []  # (raw JSON line, record info)

    def base(self) -> dict[str, Any]:
        """A random good record of the source, as a template."""
        return json.loads(json.dumps(self.rng.choice(self.train)))

    def add(self, record: dict[str, Any] | str, sample_id: str | None, kind: str) -> None:
        raw = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
        fault = FAULT_KINDS.get(kind)
        info = {
            "id": sample_id,
            "kind": kind,
            "reason": fault.reason if fault else None,
            "stage": fault.stage if fault else "good",
        }
        self.lines.append((raw, info))

    def copy_image(self, rel: str, name: str) -> str:
        """Copy a source image into ``images/good/`` and return its path relative to the root."""
        target = self.root / "good" / name
        shutil.copyfile(self.src / "images" / rel, target)
        return f"good/{name}"

    def record(self, sample_id: str, image: str | list[str] | None, conversations: Any) -> dict:
        rec: dict[str, Any] = {"id": sample_id}
        if image is not None:
            rec["image"] = image
        rec["conversations"] = conversations
        return rec


def _read_llava(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: src must be a synthetic data set folder "
            "(make one with `lit-mllm-data synth --dir DIR --num-train 32 --num-val 8`)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records")
    return data


def _good_samples(w: _Writer) -> None:
    for rec in w.train:
        rel = w.copy_image(rec["image"], Path(rec["image"]).name)
        w.add(w.record(f"good-{rec['id']}", rel, rec["conversations"]), f"good-{rec['id']}", "good")
    convs = [w.base()["conversations"] for _ in GOOD_VARIANTS]
    good = w.root / "good"
    rgb = Image.open(w.src / "images" / w.train[0]["image"]).convert("RGB")
    rgb.convert("L").save(good / "gray.png")
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(good / "gray16.png")  # mode I;16: a 16-bit grayscale PNG
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(good / "rgba.png")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(good / "palette_alpha.png", transparency=0)
    rgb.convert("CMYK").save(good / "cmyk.jpg", quality=95)
    os.symlink("gray.png", good / "link_to_gray.png")  # a link that stays inside the root
    files = {
        "gray": "good/gray.png",
        "gray16": "good/gray16.png",
        "rgba": "good/rgba.png",
        "palette_alpha": "good/palette_alpha.png",
        "cmyk_jpeg": "good/cmyk.jpg",
        "symlink_inside": "good/link_to_gray.png",
    }
    for variant, conv in zip(GOOD_VARIANTS, convs, strict=True):
        sid = f"good-{variant}"
        if variant == "text":  # text-only: no image, no marker
            conv = [{**t, "value": t["value"].replace("<image>\n", "")} for t in conv]
            w.add(w.record(sid, None, conv), sid, "good")
        else:
            w.add(w.record(sid, files[variant], conv), sid, "good")


def _fault(w: _Writer, kind: str, n: int) -> None:
    """Write ``n`` records (and their files) with fault ``kind``."""
    bad, outside = w.root / "bad", w.out / "outside"
    good_rel = "good/" + Path(w.train[0]["image"]).name
    for i in range(n):
        sid = f"{kind}-{i}"
        rec = w.base()
        conv, image = rec["conversations"], rec["image"]
        image = "good/" + Path(image).name
        if kind == "malformed_json":
            raw = json.dumps(w.record(sid, image, conv))
            w.add(raw[: len(raw) // 2] if i % 2 == 0 else "{not json at all]", None, kind)
            continue
        if kind == "conversations_not_list":
            conv = {"from": "human", "value": conv[0]["value"]}
        elif kind == "value_not_string":
            conv[1] = {**conv[1], "value": ["a", "list"] if i % 2 else 42}
        elif kind == "missing_image_file":
            image = f"bad/does_not_exist_{i}.png"
        elif kind == "path_dotdot":
            image = "../../etc/passwd" if i % 2 == 0 else "good/../../outside/secret.png"
        elif kind == "path_absolute":
            image = "/etc/passwd" if i % 2 == 0 else str((outside / "secret.png").resolve())
        elif kind == "symlink_file_out":
            os.symlink(outside / "secret.png", bad / f"link_out_{i}.png")
            image = f"bad/link_out_{i}.png"
        elif kind == "symlink_dir_out":
            image = "linked_outside/secret.png"
        elif kind == "truncated_image":
            data = (w.root / good_rel).read_bytes()
            (bad / f"truncated_{i}.png").write_bytes(data[: len(data) // 2])
            image = f"bad/truncated_{i}.png"
        elif kind == "zero_byte_image":
            (bad / f"empty_{i}.png").write_bytes(b"")
            image = f"bad/empty_{i}.png"
        elif kind == "not_an_image":
            (bad / f"text_{i}.png").write_text("this is not a PNG file\n" * 10)
            image = f"bad/text_{i}.png"
        elif kind == "image_1x1":
            _solid((1, 1)).save(bad / f"one_pixel_{i}.png")
            image = f"bad/one_pixel_{i}.png"
        elif kind == "image_10000x50":
            _solid((10000, 50)).save(bad / f"strip_{i}.png")
            image = f"bad/strip_{i}.png"
        elif kind == "unknown_role":
            conv[1] = {"from": "robot", "value": conv[1]["value"]}
        elif kind == "non_alternating":
            conv = [conv[0], {"from": "human", "value": "And?"}, *conv[1:]]
        elif kind == "empty_reply":
            conv[1] = {**conv[1], "value": "   "}
        elif kind == "extra_image_marker":
            conv[0] = {**conv[0], "value": "<image>\n" + conv[0]["value"]}
        elif kind == "missing_image_marker":
            image = [image, good_rel]
        elif kind == "over_long":
            words = " ".join(["shape"] * (OVER_LONG_TOKENS + 500))
            conv = [{"from": "human", "value": f"<image>\nRead this: {words}"}, conv[1]]
        else:
            raise ValueError(f"unknown fault kind {kind!r}; known: {sorted(FAULT_KINDS)}")
        w.add(w.record(sid, image, conv), sid, kind)


def write_corrupt_corpus(
    src: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    kinds: list[str] | None = None,
    max_per_kind: int = 2,
) -> dict[str, Any]:
    """Write the corrupt corpus (see module docstring) and return the ``faults.json`` content.

    Each fault kind gets 1..``max_per_kind`` records (seeded); ``kinds`` limits the kinds.
    """
    src, out = Path(src), Path(out)
    kinds = list(FAULT_KINDS) if kinds is None else kinds
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {sorted(FAULT_KINDS)}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new folder for the corrupt corpus")
    rng = random.Random(seed)
    for sub in ("images/good", "images/bad", "outside"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    w = _Writer(src, out, rng)
    _solid((32, 32), (10, 200, 10)).save(out / "outside" / "secret.png")
    os.symlink(out.resolve() / "outside", out / "images" / "linked_outside")

    _good_samples(w)
    counts = {kind: rng.randint(1, max_per_kind) for kind in kinds}
    for kind, n in counts.items():
        _fault(w, kind, n)
    rng.shuffle(w.lines)

    records = []
    with open(out / CORPUS_NAME, "w", encoding="utf-8") as f:
        for line, (raw, info) in enumerate(w.lines, start=1):
            f.write(raw + "\n")
            records.append({"line": line, **info})
    at_load: Counter[str] = Counter()
    at_train: Counter[str] = Counter()
    for r in records:
        if r["stage"] == "load":
            at_load[r["reason"]] += 1
        elif r["stage"] == "train":
            at_train[r["reason"]] += 1
    good_ids = [r["id"] for r in records if r["stage"] == "good"]
    summary = {
        "seed": seed,
        "source": str(src),
        "corpus": CORPUS_NAME,
        "image_root": "images",
        "max_length_at_most": OVER_LONG_TOKENS,
        "num_records": len(records),
        "good": len(good_ids),
        "faults": counts,
        "expected_skipped_at_load": dict(sorted(at_load.items())),
        "expected_skipped_train": dict(sorted(at_train.items())),
        "kinds": {
            k: {"reason": v.reason, "stage": v.stage, "what": v.what}
            for k, v in FAULT_KINDS.items()
            if k in counts
        },  # fmt: skip
        "good_ids": sorted(good_ids),
        "records": records,
    }
    (out / "faults.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary
