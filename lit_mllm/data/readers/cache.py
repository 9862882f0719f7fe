"""The parsed store of an annotation file, saved as ``.npz`` so big JSON is parsed once.

Why a key on everything that shapes the result: a cache that outlives a change of the file, the
image root, an option or the readers' rules would silently train on stale samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from lit_mllm.data.records import STORE_FORMAT_VERSION, SampleStore

logger = logging.getLogger(__name__)

# Part of the cache key: bump it when a reader's rules change what is kept or left out, so a
# store cached under the old rules is not reused (2: duplicate ids are refused).
READER_RULES = 2


def log_skipped(path: str, kept: int, skipped: dict[str, int]) -> None:
    """One warning per file that lost records, with the counts by reason."""
    if skipped:
        total = sum(skipped.values())
        logger.warning("%s: kept %d samples, left out %d records: %s", path, kept, total, skipped)


def cache_path(
    cache_dir: str | Path, kind: str, path: str, image_root: str | Path, options: dict
) -> Path:
    """Cache file keyed on the reader's rules, the source's real path, size, mtime, the root and
    all options."""
    st = os.stat(path)
    key = json.dumps(
        [
            STORE_FORMAT_VERSION,
            READER_RULES,
            kind,
            os.path.realpath(path),
            st.st_size,
            st.st_mtime_ns,
            os.path.realpath(image_root),
            options,
        ],
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(path).name}.{kind}.{digest}.npz"


def load_cached(
    kind: str,
    path: str,
    image_root: str | Path,
    options: dict,
    cache_dir: str | Path | None,
    build: Callable[[], SampleStore],
) -> SampleStore:
    """The cached store when there is a readable one, else ``build()`` (then cached if asked).

    An unreadable or unwritable cache is logged and worked around, never fatal.
    """
    cache = cache_path(cache_dir, kind, path, image_root, options) if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            store = SampleStore.load(cache)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: unreadable sample cache (%s); rebuilding", cache, e)
        else:
            logger.info("%s: %d samples from cache %s", path, len(store), cache)
            log_skipped(path, len(store), store.skipped)
            return store
    store = build()
    log_skipped(path, len(store), store.skipped)
    if cache is not None:
        try:
            store.save(cache)
        except OSError as e:
            logger.warning("%s: could not write sample cache %s (%s)", path, cache, e)
    return store
