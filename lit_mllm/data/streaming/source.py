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
