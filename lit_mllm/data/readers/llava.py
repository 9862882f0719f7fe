"""LLaVA instruction data (``llava_v1_5_mix665k.json`` layout, or JSON Lines) -> a SampleStore."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_mllm.data.options import OnBadSample
from lit_mllm.data.readers.cache import load_cached
from lit_mllm.data.readers.image_paths import ImageResolver
from lit_mllm.data.readers.validation import (
    Collector,
    InvalidRecord,
    check_file,
    read_json,
    require,
    require_dict,
)
from lit_mllm.data.records import SampleStore, StoreBuilder


def load_llava(
    path: str | Path,
    image_root: str | Path,
    *,
    on_bad_sample: OnBadSample = "error",
    check_images: bool = True,
    cache_dir: str | Path | None = None,
) -> SampleStore:
    """Read LLaVA-style instruction data: a ``.json`` list or ``.jsonl`` (one object per line).

    Each record: optional ``id``; ``image`` as a string, a list of strings (multi-image) or absent
    (text-only); ``conversations`` (alias ``messages``) as turns with ``from``/``value`` or
    ``role``/``content``, optionally starting with a system turn. Turns are kept as in the source;
    role names and alternation are checked later by the conversation renderer.
    A record without ``id`` gets ``{file name}:{index}`` (``{file name}:L{line}`` for JSONL).
    Sample ids must be unique (``id`` 42 and ``"42"`` are the same): a repeated one is
    ``duplicate_id`` and the first record that uses it is kept.
    """
    path = check_file(path)
    options = {"on_bad": on_bad_sample, "check": check_images}

    def build() -> SampleStore:
        col = Collector(path, on_bad_sample)
        resolve = ImageResolver(image_root, check_images)
        builder = StoreBuilder(resolve.root, source=path)
        kept: dict[str, str] = {}  # sample id -> where its record is
        for where, sid, obj in _iter_llava(path, col):
            try:
                obj = require_dict(obj, "a sample")
                if "id" in obj:
                    sid = str(require(obj, "id", (str, int), "the sample id"))
                if sid in kept:
                    raise InvalidRecord(
                        "duplicate_id", f"sample id {sid!r} is used by both {kept[sid]} and {where}"
                    )
                turns = llava_turns(obj)
                rel = [resolve(name) for name in _llava_images(obj)]
            except InvalidRecord as e:
                col.bad(where, sid, e)
                continue
            kept[sid] = where
            builder.add(sid, rel, turns)
        return builder.build(dict(col.skipped))

    return load_cached("llava", path, image_root, options, cache_dir, build)


def _iter_llava(path: str, col: Collector) -> Iterator[tuple[str, str, Any]]:
    """Yield (where, fallback id, record). JSONL lines that do not parse go to the collector."""
    name = Path(path).name
    if Path(path).suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad = InvalidRecord("malformed_json", f"not valid JSON ({e})")
                    col.bad(f"line {lineno}", None, bad)
                    continue
                yield f"line {lineno}", f"{name}:L{lineno}", obj
        return
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of samples, got {type(data).__name__} "
            "(for one object per line, name the file .jsonl)"
        )
    for i, obj in enumerate(data):
        yield f"record {i}", f"{name}:{i}", obj


def llava_turns(obj: dict) -> list[dict]:
    """The record's turns, each with a string role and text under one of the two spellings."""
    key = "conversations" if "conversations" in obj else "messages"
    turns = require(obj, key, list, "the list of turns") if key in obj else None
    if turns is None:
        raise InvalidRecord("missing_key", "missing key 'conversations' (the list of turns)")
    if not turns:
        raise InvalidRecord("bad_value", f"{key!r} is empty")
    for t, turn in enumerate(turns):
        turn = require_dict(turn, f"{key}[{t}]")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        for k in (role_key, text_key):
            if k not in turn:
                raise InvalidRecord(
                    "missing_key",
                    f"{key}[{t}] has no {k!r} (turns need 'from'/'value' or 'role'/'content')",
                )
            if not isinstance(turn[k], str):
                raise InvalidRecord(
                    "bad_type", f"{key}[{t}][{k!r}] must be str, got {type(turn[k]).__name__}"
                )
    return turns


def _llava_images(obj: dict) -> list[str]:
    """The record's image paths as a list (empty for a text-only record), not yet resolved."""
    if "image" in obj and "images" in obj:
        raise InvalidRecord("bad_value", "both 'image' and 'images' given; use one")
    value = obj.get("image", obj.get("images"))
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise InvalidRecord(
        "bad_type", f"'image' must be a string or a list of strings, got {type(value).__name__}"
    )
