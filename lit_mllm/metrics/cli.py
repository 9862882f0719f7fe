"""`lit-mllm-score`: COCO caption metrics for a results file, printed as JSON.

    lit-mllm-score --annotations captions_val.json --results results.json [--metrics BLEU CIDEr]

The annotation file is COCO caption format ({"images": [{"id"}], "annotations":
[{"image_id", "caption"}]}), the results file COCO results format ([{"image_id", "caption"}]).
Numbers equal pycocoevalcap's COCOEvalCap; unlike it, mismatched image sets are reported
(exit code 2) instead of failing with an assertion deep inside a scorer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_mllm.errors import add_debug_flag, run_reporting_errors
from lit_mllm.metrics.caption import DEFAULT_METRICS, ImageId, score_captions
from lit_mllm.metrics.java import JavaNotFoundError

EXAMPLES = 5


class InputError(ValueError):
    """A problem with the user's files; reported on stderr with exit code 2."""


def _examples(ids: Sequence[ImageId]) -> str:
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
            f"({_examples(unknown)})"
        )
    empty = [i for i, refs in references.items() if not refs]
    if empty:
        raise InputError(
            f"{path}: {len(empty)} image(s) have no reference caption ({_examples(empty)})"
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
            f"({_examples(duplicates)}); COCO caption metrics score one caption per image"
        )
    return predictions


def check_coverage(
    references: dict[ImageId, list[str]],
    predictions: dict[ImageId, str],
    annotations_path: str | Path,
    results_path: str | Path,
) -> None:
    unknown = [i for i in predictions if i not in references]
    missing = [i for i in references if i not in predictions]
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} result(s) in {results_path} have image ids not in "
            f"{annotations_path} ({_examples(unknown)})"
        )
    if missing:
        problems.append(
            f"{len(missing)} annotated image(s) in {annotations_path} have no result in "
            f"{results_path} ({_examples(missing)})"
        )
    if problems:
        raise InputError("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-mllm-score",
        description="COCO caption metrics (pycocoevalcap numbers) for a results file, as JSON.",
    )
    parser.add_argument("--annotations", required=True, help="COCO caption annotation json")
    parser.add_argument("--results", required=True, help="COCO results json [{image_id, caption}]")
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS),
        help=f"scorers to run (default: {' '.join(DEFAULT_METRICS)})",
    )  # fmt: skip
    parser.add_argument("--spice-cache-dir", default=None, help="SPICE parse cache directory")
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def score() -> None:
        references = load_annotations(args.annotations)
        predictions = load_results(args.results)
        check_coverage(references, predictions, args.annotations, args.results)
        scores = score_captions(
            references, predictions, args.metrics, spice_cache_dir=args.spice_cache_dir
        )
        print(json.dumps(scores, indent=2))

    # bad files, unknown --metrics, no java: exit code 2
    return run_reporting_errors(
        "lit-mllm-score",
        score,
        debug=args.debug,
        user_errors=(ValueError, JavaNotFoundError),
        ours_only=False,
        code=2,
    )


if __name__ == "__main__":
    sys.exit(main())
