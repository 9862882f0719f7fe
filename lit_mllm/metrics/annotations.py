"""Reading COCO caption files: annotations (references per image) and results (one caption per
image), with errors that name the file and the record instead of a KeyError deep in a scorer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_mllm.metrics.scorers import ImageId

EXAMPLES = 5


class InputError(ValueError):
    """A problem with the user's files; reported on stderr with exit code 2."""


def examples(ids: Sequence[ImageId]) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:EXAMPLES])
    return f"e.g. {shown}" + (", ..." if len(ids) > EXAMPLES else "")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} file {path} is not valid JSON: {exc}") from exc


def _image_id(value: Any, path: Path, index: int, what: str) -> ImageId:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InputError(f"{path}: {what} #{index} has image_id {value!r}; expected an int or str")
    return value


def load_annotations(path: str | Path) -> dict[ImageId, list[str]]:
    """{image_id: [reference captions]} from a COCO caption annotation file."""
    path = Path(path)
    data = _read_json(path, "annotation")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(
            f"{path} is not a COCO caption annotation file: expected an object with an "
            "'annotations' list of {'image_id', 'caption'} (and an 'images' list)"
        )
    references: dict[ImageId, list[str]] = {}
    images = data.get("images")
    if images is not None:
        if not isinstance(images, list) or not all(
            isinstance(i, dict) and "id" in i for i in images
        ):
            raise InputError(f"{path}: 'images' must be a list of objects with an 'id'")
        for index, image in enumerate(images):
            references.setdefault(_image_id(image["id"], path, index, "image"), [])
    unknown = []
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise InputError(f"{path}: annotation #{index} needs an 'image_id' and a str 'caption'")
        image_id = _image_id(ann.get("image_id"), path, index, "annotation")
        if images is not None and image_id not in references:
            unknown.append(image_id)
            continue
        references.setdefault(image_id, []).append(ann["caption"])
    if unknown:
        raise InputError(
            f"{path}: {len(unknown)} annotation(s) refer to images missing from 'images' "
            f"({examples(unknown)})"
        )
    empty = [i for i, refs in references.items() if not refs]
    if empty:
        raise InputError(
            f"{path}: {len(empty)} image(s) have no reference caption ({examples(empty)})"
        )
    if not references:
        raise InputError(f"{path} contains no annotations")
    return references


def load_results(path: str | Path) -> dict[ImageId, str]:
    """{image_id: predicted caption} from a COCO results file (one result per image)."""
    path = Path(path)
    data = _read_json(path, "results")
    if not isinstance(data, list):
        raise InputError(
            f"{path} is not a COCO results file: expected a list of {{image_id, caption}}"
        )
    predictions: dict[ImageId, str] = {}
    duplicates = []
    for index, result in enumerate(data):
        if not isinstance(result, dict) or not isinstance(result.get("caption"), str):
            raise InputError(f"{path}: result #{index} needs an 'image_id' and a str 'caption'")
        image_id = _image_id(result.get("image_id"), path, index, "result")
        if image_id in predictions:
            duplicates.append(image_id)
        predictions.setdefault(image_id, result["caption"])
    if duplicates:
        raise InputError(
            f"{path}: {len(duplicates)} image id(s) have more than one result "
            f"({examples(duplicates)}); COCO caption metrics score one caption per image"
        )
    return predictions
