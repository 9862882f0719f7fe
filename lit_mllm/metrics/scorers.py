"""pycocoevalcap's caption scorers, run the way validation needs them: every epoch, same references.

Numbers are pycocoevalcap's: its PTB tokenizer and jars, its BLEU/ROUGE/CIDEr scorer code.
Only the orchestration differs:
- tokenized references and the BLEU/CIDEr reference statistics (cooked n-grams, CIDEr
  document frequencies) are cached per reference set;
- METEOR JVMs live as long as the scorer (see `java.MeteorPool`), started early so their
  start-up overlaps the validation loop;
- METEOR and SPICE (subprocesses) run in threads while BLEU, ROUGE and CIDEr run in Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocoevalcap.bleu import bleu_scorer
from pycocoevalcap.cider import cider_scorer
from pycocoevalcap.rouge.rouge import Rouge

from lit_mllm.metrics import java

log = logging.getLogger(__name__)

ImageId = int | str

# Scorer name -> the keys it writes, in pycocoevalcap's COCOEvalCap.eval order.
SCORER_KEYS: dict[str, tuple[str, ...]] = {
    "BLEU": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
DEFAULT_METRICS: tuple[str, ...] = tuple(SCORER_KEYS)
_ALIASES = {
    name.lower(): scorer for scorer, keys in SCORER_KEYS.items() for name in (scorer, *keys)
} | {"rouge": "ROUGE_L", "rouge-l": "ROUGE_L"}
CIDER_N, CIDER_SIGMA, BLEU_N = 4, 6.0, 4  # pycocoevalcap's Cider() and Bleu(4) defaults

_spice_warned = False  # one warning per process about missing SPICE jars


def resolve_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """Map user names ("BLEU", "Bleu_4", "cider", ...) to scorer names, in COCOEvalCap order."""
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m.lower() not in _ALIASES]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {list(SCORER_KEYS)}")
    if not metrics:
        raise ValueError(f"no caption metric requested; choose from {list(SCORER_KEYS)}")
    wanted = {_ALIASES[m.lower()] for m in metrics}
    return tuple(scorer for scorer in SCORER_KEYS if scorer in wanted)


def default_spice_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lit_mllm" / "spice"


class _ReferenceSet:
    """Tokenized references of one evaluation set plus the statistics derived from them."""

    def __init__(self, tokens: list[list[str]]) -> None:
        self.tokens = tokens
        self._cooked: tuple[list, CiderReferences] | None = None
        self._lock = threading.Lock()

    def cooked(self) -> tuple[list, CiderReferences]:
        """(BLEU cooked refs, CIDEr reference vectors), built once."""
        with self._lock:
            if self._cooked is None:
                bleu = [bleu_scorer.cook_refs(refs) for refs in self.tokens]
                self._cooked = (bleu, CiderReferences(self.tokens))
            return self._cooked


_Vector = tuple[list[dict[tuple[str, ...], float]], list[float], int]


class CiderReferences:
    """The reference side of pycocoevalcap's CiderScorer, computed once per reference set.

    `CiderScorer.compute_cider` rebuilds every reference's tf-idf vector (its `counts2vec`)
    on each call although they depend only on the references. Here they are built once with
    the same floating-point operations in the same order, and `score` replays `sim` and the
    averaging, so results are bit-identical (tests compare with `==`).
    """

    def __init__(self, tokens: list[list[str]]) -> None:
        scorer = cider_scorer.CiderScorer(n=CIDER_N, sigma=CIDER_SIGMA)
        scorer.crefs = [cider_scorer.cook_refs(refs) for refs in tokens]
        scorer.compute_doc_freq()  # pycocoevalcap's own document frequencies
        ref_len = np.log(float(len(scorer.crefs)))
        # counts2vec's `ref_len - log(max(1, df))`, once per n-gram instead of per occurrence;
        # an n-gram absent from the references has df 0, i.e. weight ref_len - 0.0
        self.idf = {
            ngram: float(ref_len - np.log(max(1.0, df)))
            for ngram, df in scorer.document_frequency.items()
        }
        self.unseen_idf = float(ref_len - np.log(1.0))
        self.refs = [[self._vector(ref) for ref in refs] for refs in scorer.crefs]

    def _vector(self, counts: Mapping[tuple[str, ...], int]) -> _Vector:
        """CiderScorer.compute_cider.counts2vec (Python floats: the same IEEE operations)."""
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(CIDER_N)]
        norm = [0.0] * CIDER_N
        length = 0
        idf, unseen = self.idf, self.unseen_idf
        for ngram, term_freq in counts.items():
            n = len(ngram) - 1
            value = float(term_freq) * idf.get(ngram, unseen)
            vec[n][ngram] = value
            norm[n] += pow(value, 2)
            if n == 1:
                length += term_freq
        return vec, [float(np.sqrt(x)) for x in norm], length

    def score(self, hyps: Sequence[str]) -> float:
        """Corpus CIDEr (pycocoevalcap Cider().compute_score) of tokenized `hyps`."""
        penalty_scale = 2 * CIDER_SIGMA**2
        scores = []
        for hyp, refs in zip(hyps, self.refs, strict=True):
            vec, norm, length = self._vector(cider_scorer.cook_test(hyp))
            score = [0.0] * CIDER_N
            for vec_ref, norm_ref, length_ref in refs:  # CiderScorer.compute_cider.sim
                delta = float(length - length_ref)
                penalty = np.e ** (-(delta**2) / penalty_scale)
                for n in range(CIDER_N):
                    ref_n = vec_ref[n]
                    val = 0.0
                    for ngram, weight in vec[n].items():
                        ref_weight = ref_n.get(ngram, 0.0)
                        val += min(weight, ref_weight) * ref_weight
                    if norm[n] != 0 and norm_ref[n] != 0:
                        val /= norm[n] * norm_ref[n]
                    score[n] += val * penalty
            score_avg = np.mean(np.array(score))
            score_avg /= len(refs)
            score_avg *= 10.0
            scores.append(score_avg)
        return float(np.mean(np.array(scores)))


class CaptionScorer:
    """Scores captions like pycocoevalcap's COCOEvalCap, keeping caches and JVMs between calls.

    Independent of torch; used by `CaptionMetrics`, `lit-mllm-score` and `leave_one_out_scores`.
    """

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_METRICS,
        spice_cache_dir: str | os.PathLike | None = None,
        meteor_processes: int | None = None,
        max_reference_sets: int = 4,
    ) -> None:
        self.metrics = resolve_metrics(metrics)
        self.spice_cache_dir = Path(spice_cache_dir or default_spice_cache_dir())
        self.max_reference_sets = max_reference_sets
        self.java = java.find_java()  # fail at construction, not after an epoch of training
        self.meteor = java.MeteorPool(self.java, processes=meteor_processes)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._references: OrderedDict[str, _ReferenceSet] = OrderedDict()
        self.last_timings: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Caches and locks are per process; a copy (deepcopy, pickling to workers) starts empty.
        skip = {"_lock", "_references", "last_timings"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def start(self) -> None:
        """Start METEOR JVMs in the background (no-op when METEOR is not requested)."""
        if "METEOR" in self.metrics:
            self.meteor.start()

    def close(self) -> None:
        """Stop the METEOR JVMs; they restart on the next `score`."""
        self.meteor.close()

    def score(
        self,
        image_ids: Sequence[ImageId],
        references: Sequence[Sequence[str]],
        predictions: Sequence[str],
    ) -> dict[str, float]:
        """Corpus scores keyed like COCOEvalCap.eval (one prediction per image)."""
        _check_aligned(image_ids, references, predictions)
        with self._lock:
            return self._score(list(image_ids), references, predictions)

    def score_tokenized(
        self,
        image_ids: Sequence[ImageId],
        references: Sequence[Sequence[str]],
        predictions: Sequence[str],
    ) -> dict[str, float]:
        """Like `score` for captions already PTB-tokenized (see `java.ptb_tokenize`)."""
        _check_aligned(image_ids, references, predictions)
        with self._lock:
            refs = _ReferenceSet([list(r) for r in references])
            return self._score_tokens(list(image_ids), refs, list(predictions), {})

    def _score(
        self,
        image_ids: list[ImageId],
        references: Sequence[Sequence[str]],
        predictions: Sequence[str],
    ) -> dict[str, float]:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-refs") as pool:
            ref_future = pool.submit(self._reference_set, image_ids, references)
            hyps = java.ptb_tokenize(self.java, predictions)
            refs = ref_future.result()
        return self._score_tokens(image_ids, refs, hyps, {"tokenize": time.perf_counter() - start})

    def _score_tokens(
        self,
        image_ids: list[ImageId],
        refs: _ReferenceSet,
        hyps: list[str],
        timings: dict[str, float],
    ) -> dict[str, float]:
        values: dict[str, float] = {}
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="caption-metrics") as pool:
            futures = {}
            if "METEOR" in self.metrics:
                futures["METEOR"] = pool.submit(_timed, self.meteor.score, refs.tokens, hyps)
            if "SPICE" in self.metrics and self._spice_available():
                futures["SPICE"] = pool.submit(
                    _timed, java.run_spice, self.java, image_ids, refs.tokens, hyps,
                    self.spice_cache_dir,
                )  # fmt: skip
            t0 = time.perf_counter()
            bleu_refs, cider_refs = refs.cooked()
            timings["cook_references"] = time.perf_counter() - t0
            if "BLEU" in self.metrics:
                t0 = time.perf_counter()
                bleu = _bleu(bleu_refs, hyps)
                values.update(zip(SCORER_KEYS["BLEU"], bleu, strict=True))
                timings["BLEU"] = time.perf_counter() - t0
            if "ROUGE_L" in self.metrics:
                t0 = time.perf_counter()
                values["ROUGE_L"] = _rouge(refs.tokens, hyps)
                timings["ROUGE_L"] = time.perf_counter() - t0
            if "CIDEr" in self.metrics:
                t0 = time.perf_counter()
                values["CIDEr"] = cider_refs.score(hyps)
                timings["CIDEr"] = time.perf_counter() - t0
            for name, future in futures.items():
                (values[name], _), timings[name] = future.result()
        timings["total"] = timings.get("tokenize", 0.0) + time.perf_counter() - start
        self.last_timings = timings
        keys = [key for scorer in self.metrics for key in SCORER_KEYS[scorer]]
        return {key: float(values[key]) for key in keys if key in values}

    def _reference_set(
        self, image_ids: list[ImageId], references: Sequence[Sequence[str]]
    ) -> _ReferenceSet:
        payload = json.dumps([image_ids, [list(r) for r in references]], ensure_ascii=False)
        key = hashlib.sha1(payload.encode()).hexdigest()
        cached = self._references.get(key)
        if cached is not None:
            self._references.move_to_end(key)
            return cached
        flat = [caption for refs in references for caption in refs]
        tokens = iter(java.ptb_tokenize(self.java, flat))
        entry = _ReferenceSet([[next(tokens) for _ in refs] for refs in references])
        self._references[key] = entry
        while len(self._references) > self.max_reference_sets:
            self._references.popitem(last=False)
        return entry

    def _spice_available(self) -> bool:
        global _spice_warned
        missing = java.missing_spice_jars()
        if missing and not _spice_warned:
            log.warning(java.spice_install_hint(missing))
            _spice_warned = True
        return not missing


def _check_aligned(
    image_ids: Sequence[ImageId], references: Sequence[Sequence[str]], predictions: Sequence[str]
) -> None:
    if not image_ids:
        raise ValueError("no captions to score")
    if not len(image_ids) == len(references) == len(predictions):
        raise ValueError(
            f"got {len(image_ids)} image ids, {len(references)} reference lists and "
            f"{len(predictions)} predictions; they must be aligned"
        )
    for image_id, refs in zip(image_ids, references, strict=True):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {image_id!r}: references must be a non-empty list of str")


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def _bleu(cooked_refs: list, hyps: list[str]) -> list[float]:
    """pycocoevalcap Bleu(4).compute_score with the references cooked once."""
    scorer = bleu_scorer.BleuScorer(n=BLEU_N)
    scorer.crefs = list(cooked_refs)
    scorer.ctest = [bleu_scorer.cook_test(h, r) for h, r in zip(hyps, cooked_refs, strict=True)]
    score, _ = scorer.compute_score(option="closest", verbose=0)
    return score


def _rouge(refs: list[list[str]], hyps: list[str]) -> float:
    """pycocoevalcap Rouge().compute_score."""
    rouge = Rouge()
    scores = [rouge.calc_score([h], r) for h, r in zip(hyps, refs, strict=True)]
    return float(np.mean(np.array(scores)))


def as_image_id(value: Any) -> ImageId:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, str):
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"image ids must be int or str, got {value!r} ({type(value).__name__})")


def sorted_image_ids(image_ids: Iterable[ImageId]) -> list[ImageId]:
    """Canonical order (ints ascending, then strs): results must not depend on gather order."""
    return sorted(image_ids, key=lambda i: (0, i) if isinstance(i, int) else (1, i))


def score_captions(
    references: Mapping[ImageId, Sequence[str]],
    predictions: Mapping[ImageId, str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    **scorer_kwargs: Any,
) -> dict[str, float]:
    """One-off scoring of {image_id: prediction} against {image_id: references}."""
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    if missing or extra:
        raise ValueError(
            f"predictions and references cover different images: {len(missing)} without a "
            f"prediction (e.g. {missing[:5]}), {len(extra)} unknown (e.g. {extra[:5]})"
        )
    scorer = CaptionScorer(metrics, **scorer_kwargs)
    try:
        ids = sorted_image_ids(references)
        return scorer.score(ids, [references[i] for i in ids], [predictions[i] for i in ids])
    finally:
        scorer.close()
