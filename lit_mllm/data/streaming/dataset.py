"""Shard folders -> training items, through LitData's StreamingDataset.

LitData reads the chunks (local folders or object stores), splits them over ranks and DataLoader
workers, shuffles per epoch from the seed, mixes several streams by weight and, through
``StreamingDataLoader.state_dict``, resumes mid-epoch where the checkpoint was taken. This file
only turns LitData's items into training items with the same :class:`SampleProcessor` as
map-style data, so a bad record or image is skipped and counted, or reported, the same way.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset
from litdata.streaming.serializers import Serializer

from lit_mllm.data.dataset import SampleProcessor
from lit_mllm.data.options import OnBadSample
from lit_mllm.data.readers.validation import BadSampleError, InvalidRecord
from lit_mllm.data.streaming.record import from_item
from lit_mllm.data.streaming.shard import MANIFEST
from lit_mllm.data.streaming.source import StreamSource, is_remote

log = logging.getLogger(__name__)


class _RefusedPickle(Serializer):
    """lit-mllm shards never pickle; a chunk that asks for it is refused, not unpickled
    (unpickling data from a folder or an object store runs whatever code it holds)."""

    def serialize(self, item: Any) -> tuple[bytes, str | None]:
        raise ValueError("lit-mllm shards store no pickled fields")

    def deserialize(self, data: bytes) -> Any:
        raise ValueError(
            "this shard declares a pickled field; lit-mllm shards hold only text and bytes, and "
            "unpickling data runs code: refused. Shard the source with lit-mllm-data shard"
        )

    def can_serialize(self, item: Any) -> bool:
        return False


class StreamedSamples(StreamingDataset):
    """One shard folder; ``__getitem__`` gives processed items (or ``{"skipped": reason}``)."""

    def __init__(
        self,
        source: str,
        processor: SampleProcessor,
        *,
        caption_prompt: str,
        on_bad_sample: OnBadSample,
        shuffle: bool,
        seed: int,
        drop_last: bool | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            input_dir=source,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            cache_dir=cache_dir,
            serializers={"pickle": _RefusedPickle()},
        )
        self.source, self.processor = source, processor
        self.caption_prompt, self.on_bad_sample = caption_prompt, on_bad_sample

    def __getitem__(self, index: Any) -> dict[str, Any]:
        item = super().__getitem__(index)
        position = getattr(index, "index", index)
        try:
            sample = from_item(item, self.source, self.caption_prompt)
        except InvalidRecord as error:
            if self.on_bad_sample == "skip":
                return {"skipped": error.reason, "sample_id": None}
            raise BadSampleError(
                self.source, f"item {position}", None, error.reason, error.detail
            ) from error
        return self.processor(sample, self.source)


def build_streams(
    sources: list[StreamSource],
    processor: SampleProcessor,
    *,
    caption_prompt: str,
    on_bad_sample: OnBadSample,
    train: bool,
    seed: int,
    cache_dir: str | None = None,
) -> StreamingDataset | CombinedStreamingDataset:
    """One stream, or several mixed by weight (LitData draws each sample's stream from the seed;
    an epoch ends when one stream runs out, so a small stream with a big weight ends it early).
    Training streams shuffle; evaluation streams are read in order, every sample once."""
    if not sources:
        raise ValueError("no stream given")
    for source in sources:
        if not (isinstance(source.weight, (int, float)) and source.weight > 0):
            raise ValueError(f"stream {source.dir}: weight must be > 0, got {source.weight!r}")
        _check_local(source.dir)
    datasets = [
        StreamedSamples(
            source.dir,
            processor,
            caption_prompt=caption_prompt,
            on_bad_sample=on_bad_sample,
            shuffle=train,
            seed=seed,
            drop_last=None if train else False,
            cache_dir=cache_dir if is_remote(source.dir) else None,  # local: read in place
        )
        for source in sources
    ]
    if len(datasets) == 1:
        return datasets[0]
    weights = [float(source.weight) for source in sources]
    return CombinedStreamingDataset(datasets, seed=seed, weights=weights, iterate_over_all=False)


def _check_local(folder: str) -> None:
    """A clear error for a local folder that is not a shard folder (LitData's own is a
    traceback from deep inside it). URLs are left to LitData."""
    if is_remote(folder):
        return
    path = Path(folder)
    if not (path / "index.json").is_file():
        raise FileNotFoundError(
            f"stream folder {folder!r} has no index.json: write it with "
            "`lit-mllm-data shard --source ... --out DIR` (or point dir at an object-store URL)"
        )


def stream_size(folder: str) -> int | None:
    """Samples in a local shard folder (its index), None for a URL."""
    if is_remote(folder):
        return None
    index = json.loads((Path(folder) / "index.json").read_text())
    return sum(int(chunk["chunk_size"]) for chunk in index["chunks"])


def left_out_for_equal_ranks(dataset: Any, sources: list[StreamSource]) -> int:
    """Samples of one training stream that no rank reads in an epoch: with several ranks LitData
    gives each the same number (so that no rank waits for the others' collectives at the end of
    the epoch) and leaves the rest out, other samples each epoch. 0 for a mixture or a URL."""
    import torch.distributed as dist

    if len(sources) != 1 or not (dist.is_available() and dist.is_initialized()):
        return 0
    total = stream_size(sources[0].dir)
    if total is None:
        return 0
    return total - len(dataset) * dist.get_world_size()


def shard_time_skips(sources: list[StreamSource]) -> dict[str, int]:
    """What ``shard`` left out of local streams, by reason (remote manifests are not fetched)."""
    total: dict[str, int] = {}
    for source in sources:
        manifest = Path(source.dir) / MANIFEST
        if is_remote(source.dir) or not manifest.is_file():
            continue
        for reason, count in json.loads(manifest.read_text()).get("skipped", {}).items():
            total[reason] = total.get(reason, 0) + int(count)
    return total


def stream_split(
    sources: list[StreamSource], processor: SampleProcessor, *, train: bool, **options: Any
) -> tuple[StreamingDataset | CombinedStreamingDataset, Counter[str]]:
    """A split's streamed dataset (``build_streams``, which ``options`` go to) and the samples
    it leaves out, by reason: what ``shard`` skipped, and for training on several ranks what
    LitData drops per epoch for equal shares (also logged)."""
    skipped = Counter(shard_time_skips(sources))
    dataset = build_streams(sources, processor, train=train, **options)
    if train and (left_out := left_out_for_equal_ranks(dataset, sources)):
        skipped["left_out_for_equal_ranks_per_epoch"] = left_out
        log.warning(
            "%s: %d samples per epoch are left out so that every rank reads as many "
            "(LitData's drop_last under distributed training; other ones each epoch)",
            sources[0].dir,
            left_out,
        )
    return dataset, skipped


class StreamLoader(StreamingDataLoader):
    """LitData's loader, restored by the DataModule and applying one saved position only once.

    Lightning restores a stateful train loader only if the loader is built after the checkpoint
    is read; ``trainer.estimated_stepping_batches`` (the LR schedule's length) builds it before,
    and the saved position is then silently dropped (Lightning 2.6). So the DataModule keeps the
    position in its own state as well and hands it over itself; when Lightning does restore it,
    the same state arrives twice, and loading it twice would move the worker cursor twice.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loaded: dict[str, Any] | None = None

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if self._loaded is not None and obj == self._loaded:
            return
        super().load_state_dict(obj)
        self._loaded = copy.deepcopy(obj)

    def __iter__(self) -> Any:
        self._loaded = None  # a position loaded from now on is a new one
        yield from super().__iter__()
