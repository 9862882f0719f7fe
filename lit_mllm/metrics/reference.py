"""Human baseline for caption metrics: score each reference against the other references.

A model's CIDEr means little on its own (synthetic data, a new domain); the score a held-out
human caption gets against the remaining ones puts it in context. For k in range(n_refs),
every image's k-th reference is the candidate and its other references are the ground truth;
the corpus scores of these n_refs rounds are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lit_mllm.metrics.caption import SCORER_KEYS, CaptionScorer, ImageId, sorted_image_ids
from lit_mllm.metrics.java import ptb_tokenize

DEFAULT_KEYS: tuple[str, ...] = ("CIDEr", "Bleu_4")


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


def score_synthetic_references(
    out_dir: str | Path,
    split: str = "val",
    metrics: Sequence[str] = ("Bleu_4", "ROUGE_L", "CIDEr"),
) -> dict[str, float]:
    """Leave-one-out scores of a synthetic split, stored in its manifest for the run report."""
    from lit_mllm.data.synthetic import load_references, update_manifest

    scores = leave_one_out_scores(load_references(out_dir, split), metrics=metrics)
    scores = {k: round(float(v), 6) for k, v in scores.items()}
    update_manifest(out_dir, **{f"{split}_reference_scores": scores})
    return scores
