"""Where a streamed split comes from (light: the CLI parses it without importing LitData)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class StreamSource:
    """A folder written by ``lit-mllm-data shard``: a local path or any URL LitData reads
    (``s3://bucket/prefix``, ``gs://``, ``azure://``, ...). ``weight``: its share of a mixture
    of several streams (normalised over the list)."""

    dir: str
    weight: float = 1.0
    kind: Literal["stream"] = "stream"


def is_remote(folder: str) -> bool:
    """A URL LitData fetches from (``s3://``, ``gs://``, ...), not a local folder."""
    return "://" in folder


def as_streams(source: object) -> list[StreamSource] | None:
    """The stream list of a streamed split; None for an annotation file or no source."""
    if isinstance(source, StreamSource):
        return [source]
    if isinstance(source, list):
        if not source or not all(isinstance(s, StreamSource) for s in source):
            raise ValueError(
                f"a list source must hold streams ({{kind: stream, dir: ...}}), got {source!r}"
            )
        return source
    return None
