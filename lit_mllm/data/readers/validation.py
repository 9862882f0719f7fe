"""What every reader shares to check a record: the errors, the skip counter and the checks.

Why one place: a bad record must be reported the same way whichever file it came from (file,
record, sample id, what is wrong) or counted under the same reason keys when skipping.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from lit_mllm.data.options import OnBadSample

_SKIP_HINT = "Fix the record, or pass on_bad_sample='skip' to drop such records (they are counted)."


class BadSampleError(ValueError):
    """A record is malformed. ``reason`` is the key it would be counted under when skipping."""

    def __init__(self, path: str, where: str, sample_id: str | None, reason: str, detail: str):
        self.path, self.where, self.sample_id, self.reason = path, where, sample_id, reason
        ident = f" (id {sample_id!r})" if sample_id is not None else ""
        super().__init__(f"{path}: {where}{ident}: {detail}. {_SKIP_HINT}")


class MissingImageError(FileNotFoundError):
    """A record names an image file that does not exist under ``image_root``."""

    def __init__(self, path: str, where: str, sample_id: str | None, detail: str):
        self.path, self.where, self.sample_id, self.reason = path, where, sample_id, "missing_image"
        super().__init__(f"{path}: {where} (id {sample_id!r}): {detail}. {_SKIP_HINT}")


class InvalidRecord(Exception):
    """One record failed a check for ``reason``; the :class:`Collector` decides what follows.

    Raised inside a reader only: the file and the record's position are added by the collector.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class Collector:
    """Raises on a bad record (``error``) or counts it by reason (``skip``)."""

    def __init__(self, path: str, on_bad_sample: OnBadSample):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.path, self.mode = path, on_bad_sample
        self.skipped: Counter[str] = Counter()

    def bad(self, where: str, sample_id: str | None, err: InvalidRecord) -> None:
        if self.mode == "skip":
            self.skipped[err.reason] += 1
            return
        if err.reason == "missing_image":
            raise MissingImageError(self.path, where, sample_id, err.detail)
        raise BadSampleError(self.path, where, sample_id, err.reason, err.detail)

    def note(self, reason: str) -> None:
        """Count a record left out for a benign reason (e.g. an image without captions)."""
        self.skipped[reason] += 1


def check_file(path: str | Path) -> str:
    """The annotation file as a string path; FileNotFoundError naming it when it is missing."""
    p = str(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"annotation file {p!r} not found")
    return p


def read_json(path: str) -> Any:
    """Parse a whole JSON file; a parse error is a file-level ValueError (nothing to skip)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise ValueError(
            f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def is_id(x: Any) -> bool:
    """An int or str id (``True`` is not an id although it is an int)."""
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def require(obj: dict, key: str, types: type | tuple[type, ...], what: str) -> Any:
    """``obj[key]`` when present and of ``types`` (never a bool), else :class:`InvalidRecord`."""
    if key not in obj:
        raise InvalidRecord("missing_key", f"missing key {key!r} ({what})")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise InvalidRecord("bad_type", f"{key!r} must be {names}, got {type(value).__name__}")
    return value


def require_dict(obj: Any, what: str) -> dict:
    """``obj`` when it is a JSON object, else :class:`InvalidRecord` (``bad_type``)."""
    if not isinstance(obj, dict):
        raise InvalidRecord("bad_type", f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj
