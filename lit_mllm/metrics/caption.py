"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) as a torchmetrics Metric.

Numbers are pycocoevalcap's: its PTB tokenizer and jars, its BLEU/ROUGE/CIDEr scorer code.
Only the orchestration differs, because validation runs every epoch on the same references:
- tokenized references and the BLEU/CIDEr reference statistics (cooked n-grams, CIDEr
  document frequencies) are cached per reference set;
- METEOR JVMs live as long as the metric (see `java.MeteorPool`), started on the first
  `update()` so their start-up overlaps the validation loop;
- METEOR and SPICE (subprocesses) run in threads while BLEU, ROUGE and CIDEr run in Python.
Across processes, samples are gathered as strings, de-duplicated by image id (a padded
DistributedSampler repeats images), scored once on rank 0 and the result broadcast.
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
import torch.distributed as dist
from pycocoevalcap.bleu import bleu_scorer
from pycocoevalcap.cider import cider_scorer
from pycocoevalcap.rouge.rouge import Rouge
from torchmetrics import Metric

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


def _as_image_id(value: Any) -> ImageId:
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


Sample = tuple[ImageId, str, tuple[str, ...]]


class CaptionMetrics(Metric):
    """COCO caption metrics, identical to pycocoevalcap's COCOEvalCap, usable under DDP.

    Call `update(image_ids, predictions, references)` per batch and `compute()` per epoch;
    `compute()` returns e.g. {"Bleu_1": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ...,
    "CIDEr": ..., "SPICE": ...}. SPICE is left out, with one warning, when the Stanford CoreNLP
    jars it needs are not installed. `reset()` clears the samples and keeps the caches/JVMs.
    Samples are plain Python objects, not metric states: `forward` only updates.

    Args:
        metrics: scorers to run: BLEU (Bleu_1..Bleu_4), METEOR, ROUGE_L, CIDEr, SPICE; output
            key names and lower case are accepted too ("Bleu_4", "cider").
        spice_cache_dir: SPICE's parse cache (default: $XDG_CACHE_HOME or ~/.cache, lit_mllm/spice).
        meteor_processes: METEOR JVMs sharing the work (None: cpu_count // 4, clamped to 1..4).
        **kwargs: torchmetrics `Metric` options (process_group, sync_on_compute, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_METRICS,
        spice_cache_dir: str | None = None,
        meteor_processes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.scorer = CaptionScorer(metrics, spice_cache_dir, meteor_processes)
        self._samples: list[Sample] = []

    def update(
        self,
        image_ids: Sequence[ImageId] | torch.Tensor,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
    ) -> None:
        ids = [_as_image_id(i) for i in image_ids]
        predictions, references = list(predictions), list(references)
        if not len(ids) == len(predictions) == len(references):
            raise ValueError(
                f"update got {len(ids)} image ids, {len(predictions)} predictions and "
                f"{len(references)} reference lists; they must have the same length"
            )
        for image_id, prediction, refs in zip(ids, predictions, references, strict=True):
            if not isinstance(prediction, str):
                raise ValueError(
                    f"image {image_id!r}: prediction must be a str, got {prediction!r}"
                )
            if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(
                    f"image {image_id!r}: references must be a non-empty list of str, got {refs!r}"
                )
            self._samples.append((image_id, prediction, tuple(refs)))
        if self._computes_here():
            self.scorer.start()  # JVM start-up overlaps the rest of the validation loop

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Batch-level caption scores are meaningless (CIDEr's IDF is corpus-wide): update only."""
        self.update(*args, **kwargs)

    def compute(self) -> dict[str, float]:
        if not (self._to_sync and self.distributed_available_fn()):
            return self._score(self._samples)
        group = self.process_group
        gathered: list[list[Sample] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, self._samples, group=group)
        payload: list[Any] = [None]
        error: Exception | None = None
        if dist.get_rank(group) == 0:
            try:
                payload[0] = ("ok", self._score([s for part in gathered for s in part or []]))
            except Exception as exc:  # other ranks must not hang in broadcast
                error = exc
                payload[0] = ("error", f"{type(exc).__name__}: {exc}")
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(payload, src=src, group=group)
        if error is not None:
            raise error
        status, value = payload[0]
        if status != "ok":
            raise RuntimeError(f"caption metrics failed on rank 0: {value}")
        return value

    def reset(self) -> None:
        super().reset()
        self._samples = []

    def close(self) -> None:
        """Stop the METEOR JVMs now (they also stop when the metric is garbage collected)."""
        self.scorer.close()

    def _computes_here(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return True
        return dist.get_rank(self.process_group) == 0

    def _score(self, samples: Sequence[Sample]) -> dict[str, float]:
        unique: dict[ImageId, Sample] = {}
        for sample in samples:
            first = unique.setdefault(sample[0], sample)
            if first[2] != sample[2]:
                raise ValueError(
                    f"image {sample[0]!r} was updated twice with different references: "
                    f"{list(first[2])} vs {list(sample[2])}"
                )
        if not unique:
            raise ValueError("CaptionMetrics.compute() has no samples: call update() first")
        ids = sorted_image_ids(unique)
        return self.scorer.score(ids, [unique[i][2] for i in ids], [unique[i][1] for i in ids])


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
