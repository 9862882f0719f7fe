"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) as a torchmetrics Metric.

The scores are :mod:`lit_mllm.metrics.scorers`' (pycocoevalcap's numbers). Across processes,
samples are gathered as strings, de-duplicated by image id (a padded DistributedSampler repeats
images), scored once on rank 0 and the result broadcast. :func:`check_caption_metrics` says
before training starts whether validation will be able to compute them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric

from lit_mllm.metrics import java
from lit_mllm.metrics.scorers import (
    DEFAULT_METRICS,
    CaptionScorer,
    ImageId,
    as_image_id,
    resolve_metrics,
    sorted_image_ids,
)

log = logging.getLogger(__name__)

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
        self.last_predictions: dict[ImageId, str] = {}  # of the last compute(), all ranks

    def update(
        self,
        image_ids: Sequence[ImageId] | torch.Tensor,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
    ) -> None:
        ids = [as_image_id(i) for i in image_ids]
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

    @property
    def has_samples(self) -> bool:
        return bool(self._samples)

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
        self.last_predictions = {i: unique[i][1] for i in ids}
        return self.scorer.score(ids, [unique[i][2] for i in ids], [unique[i][1] for i in ids])


def check_caption_metrics(requested: Sequence[str] | None) -> tuple[str, ...]:
    """The scorers validation will run, checked now rather than thousands of steps in: Java
    present (the PTB tokenizer every metric uses, METEOR, SPICE), SPICE's jars present when
    SPICE was asked for by name; the default list (``requested`` None) drops SPICE with one
    warning instead."""
    names = list(resolve_metrics(requested or DEFAULT_METRICS))
    missing = java.missing_spice_jars() if "SPICE" in names else []
    if missing and requested is None:
        log.warning(java.spice_install_hint(missing))
        names.remove("SPICE")
    elif missing:
        raise FileNotFoundError(
            f"model.metrics asks for SPICE, but the Stanford CoreNLP jars it needs are "
            f"missing: {', '.join(str(p) for p in missing)}. Run `python -m "
            "pycocoevalcap.spice.get_stanford_models` once with network access (or copy "
            "the two jars there), or remove SPICE from model.metrics."
        )
    try:
        java.find_java()
    except java.JavaNotFoundError as error:
        raise java.JavaNotFoundError(
            f"model.metrics {names} need Java for validation: {error} Or set "
            "trainer.limit_val_batches: 0 to train without validation."
        ) from None
    return tuple(names)
