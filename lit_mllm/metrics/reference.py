"""Human baseline for caption metrics: score each reference against the other references.

A model's CIDEr means little on its own (synthetic data, a new domain); the score a held-out
human caption gets against the remaining ones puts it in context. For k in range(n_refs),
every image's k-th reference is the candidate and its other references are the ground truth;
the corpus scores of these n_refs rounds are averaged. Only the annotation file is needed, so any
COCO-style caption set has a baseline, and nothing here knows how a data set was made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lit_mllm.metrics.annotations import InputError, examples, load_annotations
from lit_mllm.metrics.java import ptb_tokenize
from lit_mllm.metrics.scorers import SCORER_KEYS, CaptionScorer, ImageId, sorted_image_ids

log = logging.getLogger(__name__)
DEFAULT_KEYS: tuple[str, ...] = ("CIDEr", "Bleu_4")
# the baseline run reports print (callbacks/report.py): cheap, no METEOR/SPICE subprocess rounds
REPORT_KEYS: tuple[str, ...] = ("Bleu_4", "ROUGE_L", "CIDEr")


def _output_keys(metrics: Sequence[str]) -> list[str]:
    """Requested output keys; a scorer name ("BLEU") stands for all its keys."""
    by_lower = {key.lower(): key for keys in SCORER_KEYS.values() for key in keys}
    out: list[str] = []
    for name in metrics:
        scorer = next((s for s in SCORER_KEYS if s.lower() == name.lower()), None)
        keys = SCORER_KEYS[scorer] if scorer else (by_lower.get(name.lower()),)
        if None in keys:
            raise ValueError(
                f"unknown metric {name!r}; choose from {list(SCORER_KEYS)} or their keys "
                f"{[k for ks in SCORER_KEYS.values() for k in ks]}"
            )
        out += [k for k in keys if k not in out]
    return out


def leave_one_out_scores(
    references: Mapping[ImageId, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_KEYS,
    **scorer_kwargs: object,
) -> dict[str, float]:
    """Mean over k of the corpus score of every image's k-th reference vs its other references.

    k runs over range(min number of references per image), so every round scores all images.
    Images with fewer than 2 references are an error (nothing to compare against).
    """
    if not references:
        raise ValueError("leave_one_out_scores needs at least one image")
    for image_id, refs in references.items():
        if isinstance(refs, str) or len(refs) < 2:
            raise ValueError(
                f"image {image_id!r} has {1 if isinstance(refs, str) else len(refs)} reference(s); "
                "leave-one-out scoring needs at least 2 per image"
            )
    keys = _output_keys(metrics)
    ids = sorted_image_ids(references)
    n_refs = min(len(references[i]) for i in ids)
    scorer = CaptionScorer(keys, **scorer_kwargs)  # type: ignore[arg-type]
    flat = [caption for i in ids for caption in references[i]]
    tokens = iter(ptb_tokenize(scorer.java, flat))  # one JVM call for all rounds
    tokenized = {i: [next(tokens) for _ in references[i]] for i in ids}
    totals: dict[str, float] = {}
    try:
        for k in range(n_refs):
            candidates = [tokenized[i][k] for i in ids]
            others = [[r for j, r in enumerate(tokenized[i]) if j != k] for i in ids]
            for key, value in scorer.score_tokenized(ids, others, candidates).items():
                totals[key] = totals.get(key, 0.0) + value
    finally:
        scorer.close()
    # keys missing from every round (SPICE without its jars) are left out
    return {key: totals[key] / n_refs for key in keys if key in totals}


def cache_path(annotation_file: str | Path) -> Path:
    """Where the scores of ``captions_val.json`` are kept: ``captions_val.reference_scores.json``."""
    path = Path(annotation_file)
    return path.with_name(f"{path.stem}.reference_scores.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cache(path: Path, sha256: str) -> dict[str, float]:
    """Cached scores of the file with this content; none when the file changed since."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cached, dict) or cached.get("sha256") != sha256:
        return {}
    return {str(k): float(v) for k, v in (cached.get("scores") or {}).items()}


def reference_scores(
    annotation_file: str | Path,
    metrics: Sequence[str] = REPORT_KEYS,
    **scorer_kwargs: object,
) -> dict[str, float]:
    """Leave-one-out scores of a COCO caption file's references (rounded to 6 digits), the human
    baseline that run reports print next to a model's scores.

    Any COCO-style annotation file with >= 2 references per image works. Scores are cached
    next to the file, keyed on its SHA-256, so they are computed once per content (about 10 s
    for 1,000 captions on 2 CPU cores); a folder that cannot be written is only slower.
    """
    path = Path(annotation_file)
    keys = _output_keys(metrics)
    if not path.is_file():
        raise InputError(f"annotation file not found: {path}")
    sha256 = _sha256(path)
    cache = cache_path(path)
    scores = _read_cache(cache, sha256)
    missing = [key for key in keys if key not in scores]
    if missing:
        references = load_annotations(path)
        single = [image_id for image_id, refs in references.items() if len(refs) < 2]
        if single:
            raise InputError(
                f"{path}: {len(single)} image(s) have a single reference ({examples(single)}); "
                "a leave-one-out baseline needs at least 2 per image"
            )
        computed = leave_one_out_scores(references, missing, **scorer_kwargs)
        scores.update({k: round(float(v), 6) for k, v in computed.items()})
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"sha256": sha256, "scores": scores}, indent=2) + "\n")
            os.replace(tmp, cache)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            log.warning("could not cache reference scores next to %s: %s", path, error)
    # keys missing from every round (SPICE without its jars) are left out
    return {key: scores[key] for key in keys if key in scores}
