"""Dropped samples are counted per stage, summed over ranks and written next to the logs.

The DataModule's collator puts each batch's dropped samples (``batch["skipped"]``, reason ->
count) in the batch, so the counts survive DataLoader worker processes; the module adds them
up here and reports them at each epoch end: nothing is lost silently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["SkippedSamples", "sum_over_ranks"]


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Every rank's counts added up (a collective under torch.distributed: all ranks call it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(counts)
    parts: list[dict[str, int]] = [{} for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(parts, dict(counts))
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(total)


class SkippedSamples:
    """Reason -> count of the samples dropped in each stage since its last report."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, stage: str, batch: dict[str, Any]) -> None:
        self.counts[stage].update(batch.get("skipped", {}))

    def state_dict(self) -> dict[str, dict[str, int]]:
        """Plain ints, so checkpoints load with ``weights_only=True``."""
        return {stage: dict(counts) for stage, counts in self.counts.items()}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        for stage, counts in state.items():
            self.counts[stage] = Counter(counts)

    def report(
        self,
        stage: str,
        epoch: int,
        at_load: dict[str, int],
        run_dir: Path,
        is_global_zero: bool,
    ) -> dict[str, int]:
        """Sum this stage's counts over ranks; rank 0 warns and writes ``skipped_<stage>.json``
        (with the load-time counts of that stage's source). Returns the summed counts."""
        gathered = sum_over_ranks(dict(self.counts[stage]))
        self.counts[stage].clear()
        if (gathered or at_load) and is_global_zero:
            log.warning(
                "skipped samples (%s, epoch %d): %s; at load: %s", stage, epoch, gathered, at_load
            )
            summary = {
                "stage": stage,
                "epoch": epoch,
                "skipped_samples": gathered,
                "skipped_at_load": at_load,
            }
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / f"skipped_{stage}.json").write_text(json.dumps(summary, indent=2))
        return gathered
