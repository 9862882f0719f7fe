"""`lit-mllm-score`: COCO caption metrics for a results file, printed as JSON.

    lit-mllm-score --annotations captions_val.json --results results.json [--metrics BLEU CIDEr]
    lit-mllm-score --annotations captions_val.json --reference [--results results.json]

The annotation file is COCO caption format ({"images": [{"id"}], "annotations":
[{"image_id", "caption"}]}), the results file COCO results format ([{"image_id", "caption"}]).
Numbers equal pycocoevalcap's COCOEvalCap; unlike it, mismatched image sets are reported
(exit code 2) instead of failing with an assertion deep inside a scorer. ``--reference`` adds the
human baseline: each reference scored against the others (``metrics/reference.py``, cached next to
the annotation file); with ``--results`` too, the JSON holds ``{"model": ..., "reference": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lit_mllm.errors import add_debug_flag, run_reporting_errors
from lit_mllm.metrics.annotations import (
    InputError,
    examples,
    load_annotations,
    load_results,
)
from lit_mllm.metrics.java import JavaNotFoundError
from lit_mllm.metrics.reference import reference_scores
from lit_mllm.metrics.scorers import DEFAULT_METRICS, ImageId, score_captions


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
            f"{annotations_path} ({examples(unknown)})"
        )
    if missing:
        problems.append(
            f"{len(missing)} annotated image(s) in {annotations_path} have no result in "
            f"{results_path} ({examples(missing)})"
        )
    if problems:
        raise InputError("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-mllm-score",
        description="COCO caption metrics (pycocoevalcap numbers) for a results file, as JSON.",
    )
    parser.add_argument("--annotations", required=True, help="COCO caption annotation json")
    parser.add_argument("--results", help="COCO results json [{image_id, caption}]")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also score every reference against the other references of its image (leave-one-out)",
    )
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS),
        help=f"scorers to run (default: {' '.join(DEFAULT_METRICS)})",
    )  # fmt: skip
    parser.add_argument("--spice-cache-dir", default=None, help="SPICE parse cache directory")
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.results is None and not args.reference:
        parser.error(
            "give --results (a model's captions), --reference (the human baseline), or both"
        )

    def score() -> None:
        out: dict[str, dict[str, float]] = {}
        if args.results is not None:
            references = load_annotations(args.annotations)
            predictions = load_results(args.results)
            check_coverage(references, predictions, args.annotations, args.results)
            out["model"] = score_captions(
                references, predictions, args.metrics, spice_cache_dir=args.spice_cache_dir
            )
        if args.reference:
            out["reference"] = reference_scores(
                args.annotations, args.metrics, spice_cache_dir=args.spice_cache_dir
            )
        print(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=2))

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
