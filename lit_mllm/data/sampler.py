"""A seeded, epoch-aware, distributed-aware sampler that resumes at the exact next batch.

Why not ``DistributedSampler`` alone: after a crash, Lightning restores weights, optimiser and
loop counters, but a plain sampler restarts the epoch from its first sample, so a resumed run
trains on a different sequence of batches than an uninterrupted one. This sampler knows how many
samples of the current epoch were already trained on and skips exactly those.

How many were consumed is *told* to it (see ``MLLMDataModule.state_dict``): with
``num_workers > 0`` the DataLoader prefetches, so the sampler's own iterator position runs ahead
of what the training loop has actually processed.

Order of one epoch (identical to ``DistributedSampler`` when never resumed): a permutation of all
indices seeded by ``seed + epoch`` (or ``0..n-1`` without shuffling), padded by repeating its
head up to a multiple of ``num_replicas`` (or cut down with ``drop_last``); rank ``r`` takes
positions ``r, r + R, r + 2R, ...``. ``consumed`` samples per rank are the first
``consumed * R`` positions of that global order, so a resume with a different number of
replicas skips the same global samples and shares the rest out again.

Length grouping (``lengths`` + ``group_batches``, LLaVA's and HF's ``group_by_length``): the
shuffled order is cut into groups of ``group_batches`` global batches, each group sorted by length
and its batches shuffled again, so a padded batch holds samples of similar length and carries
less padding while batches still come in random order. It is part of the epoch's order, so a
resume skips exactly the same samples.

Subclassing ``DistributedSampler`` keeps Lightning from replacing it under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler

STATE_VERSION = 1


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch order for one rank, resumable mid-epoch.

    Args:
        size: number of samples in the data set (or a sized data set).
        shuffle: permute each epoch with a generator seeded by ``seed + epoch``.
        seed: the data order seed; must be the same on every rank.
        num_replicas, rank: the data-parallel world; default 1 and 0 (no process group needed).
        drop_last: drop the tail instead of padding it with repeated samples.
        lengths: a length (any unit) per sample; with ``group_batches`` > 0, each run of
            ``group_batches`` global batches (``batch_size`` per rank) is sorted by it.
    """

    def __init__(
        self,
        size: int | Any,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        group_batches: int = 0,
    ) -> None:
        # no super().__init__(): it insists on an initialised process group when rank is None
        n = size if isinstance(size, int) else len(size)
        if n < 0:
            raise ValueError(f"ResumableSampler: size must be >= 0, got {n}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"ResumableSampler: invalid rank {rank} for num_replicas {num_replicas}"
            )
        self.dataset = size
        self.size = n
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        if group_batches < 0 or batch_size < 1:
            raise ValueError(
                f"ResumableSampler: group_batches must be >= 0 and batch_size >= 1, got "
                f"{group_batches} and {batch_size}"
            )
        if group_batches and (lengths is None or len(lengths) != n):
            got = "none" if lengths is None else len(lengths)
            raise ValueError(f"ResumableSampler: group_batches needs {n} lengths, got {got}")
        self.lengths = lengths
        self.batch_size = int(batch_size)
        self.group_batches = int(group_batches)
        self.epoch = 0
        self.num_samples = self._per_rank(n)
        self.total_size = self.num_samples * self.num_replicas
        self._resume: tuple[int, int] | None = None  # (epoch, samples consumed per old rank * R)

    def _per_rank(self, n: int) -> int:
        if self.drop_last:
            return n // self.num_replicas
        return math.ceil(n / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch; a pending resume ends with its epoch."""
        self.epoch = int(epoch)
        if self._resume is not None and self._resume[0] != self.epoch:
            self._resume = None

    def global_order(self, epoch: int) -> list[int]:
        """All indices of ``epoch`` in training order, before padding/sharding."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + int(epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.group_batches:
            order = self._group_by_length(order, generator)
        return order

    def _group_by_length(self, order: list[int], generator: torch.Generator) -> list[int]:
        """Sort each group of ``group_batches`` global batches by length, longest first, then
        shuffle the group's batches (a global batch is what all ranks take in one step)."""
        step = self.batch_size * self.num_replicas
        size = step * self.group_batches
        lengths = self.lengths
        grouped: list[int] = []
        for start in range(0, len(order), size):
            group = sorted(order[start : start + size], key=lambda i: -lengths[i])
            full = [group[i : i + step] for i in range(0, len(group) - step + 1, step)]
            for b in torch.randperm(len(full), generator=generator).tolist():
                grouped.extend(full[b])
            grouped.extend(group[len(full) * step :])  # the epoch's partial batch stays last
        return grouped

    def _shard(self, order: list[int], skip: int) -> list[int]:
        """This rank's share of ``order`` after the first ``skip`` global positions."""
        rest = order[skip:]
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % self.num_replicas]
        elif rest and len(rest) % self.num_replicas:
            pad = self.num_replicas - len(rest) % self.num_replicas
            rest += (order * math.ceil(pad / len(order)))[:pad]
        return rest[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        # the skip holds for every iterator of the resumed epoch: Lightning may build one early
        # (to count batches) and keep or rebuild it
        skip = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        order = self.global_order(self.epoch)
        return iter(self._shard(order, min(skip, len(order))))

    def __len__(self) -> int:
        # a full epoch, also right after a resume: Lightning counts batches from the epoch start
        return self.num_samples

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self, consumed: int = 0, epoch: int | None = None) -> dict[str, Any]:
        """State after ``consumed`` samples of ``epoch`` (default: the current one) per rank.

        Only plain ints and bools, so checkpoints stay loadable with ``weights_only=True``.
        """
        consumed = max(0, min(int(consumed), self.num_samples))
        epoch = self.epoch if epoch is None else int(epoch)
        if consumed == self.num_samples:  # a finished epoch: the next one starts from its top
            epoch, consumed = epoch + 1, 0
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "consumed": consumed,
            "consumed_global": consumed * self.num_replicas,
            "size": self.size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "drop_last": self.drop_last,
            "group_batches": self.group_batches,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: set the epoch to ``state["epoch"]``; its iterations skip the consumed samples.

        The saved epoch is authoritative: DataLoader workers draw indices as soon as an iterator
        is built, which Lightning may do before it restores its loops and calls ``set_epoch``.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"sampler state version {state.get('version')!r} != {STATE_VERSION}: the "
                "checkpoint was written by another lit-mllm version; resume from an epoch-end "
                "checkpoint or retrain"
            )
        saved = {"group_batches": 0, "batch_size": self.batch_size, **state}  # older states
        keys = ("size", "seed", "shuffle", "group_batches")
        if self.group_batches and state["consumed_global"]:  # mid-epoch, the global batches
            keys += ("batch_size", "num_replicas")  # (batch size x ranks) shaped the groups
        changed = [
            f"{key}: checkpoint {saved[key]!r}, now {getattr(self, key)!r}"
            for key in keys
            if saved[key] != getattr(self, key)
        ]
        if changed:
            raise ValueError(
                "cannot resume the training data order mid-epoch, the data changed ("
                + "; ".join(changed)
                + "): resume with the same training data, `data.seed`, shuffling and length "
                "grouping (with grouping, also the batch size and number of devices), or load "
                "only the weights (e.g. `MLLMModule.load_from_checkpoint`) "
                "for a new run"
            )
        epoch, consumed = int(state["epoch"]), int(state["consumed_global"])
        replicas = int(state["num_replicas"])
        per_rank = (
            state["size"] // replicas if state["drop_last"] else -(-state["size"] // replicas)
        )
        if consumed >= per_rank * replicas:  # that epoch was finished
            epoch, consumed = epoch + 1, 0
        self.epoch = epoch
        self._resume = (epoch, consumed) if consumed else None
