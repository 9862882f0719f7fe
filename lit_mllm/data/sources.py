"""Readers: COCO caption JSON, Karpathy split JSON and LLaVA JSON/JSONL -> :class:`SampleStore`.

Why here: every structural problem (bad JSON, missing keys, wrong types, image paths escaping
``image_root``, missing image files) is found once at load time and reported with the file,
the record and what is wrong — instead of crashing a DataLoader worker hours into training.
With ``on_bad_sample="skip"`` bad records are dropped, counted by reason in ``store.skipped``
and summarised in one log line. Images are never opened here (decoding is the dataset's job).

Common keyword arguments of every reader:
- ``on_bad_sample``: ``"error"`` raises :class:`BadSampleError` (a ValueError) or
  :class:`MissingImageError` (a FileNotFoundError); ``"skip"`` counts by reason.
- ``check_images``: ``os.path.isfile`` per image (one stat; images are not opened).
  Path-escape checks (``..``, absolute paths, symlinks) run either way.
- ``cache_dir``: save the parsed store there as ``.npz`` keyed on the source's real path, size,
  mtime, the real image_root and all options, so big JSON is parsed once (build it in
  ``prepare_data``). Image existence is checked when the cache is built, not on cache hits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from lit_mllm.data.records import (
    STORE_FORMAT_VERSION,
    Sample,
    SampleStore,
    StoreBuilder,
    caption_conversation,
)

__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "BadSampleError",
    "MissingImageError",
    "Sample",
    "SampleStore",
    "caption_conversation",
    "load_coco_captions",
    "load_karpathy",
    "load_llava",
    "load_source",
]

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_PROMPT = "Describe the image briefly."
OnBadSample = Literal["error", "skip"]
KARPATHY_SPLITS = ("train", "restval", "val", "test")
# Part of the cache key: bump it when a reader's rules change what is kept or left out, so a
# store cached under the old rules is not reused (2: duplicate ids are refused).
_READER_RULES = 2
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


class _Bad(Exception):
    """Internal: one record failed validation for ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Collector:
    """Raises on a bad record (``error``) or counts it by reason (``skip``)."""

    def __init__(self, path: str, on_bad_sample: OnBadSample):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.path, self.mode = path, on_bad_sample
        self.skipped: Counter[str] = Counter()

    def bad(self, where: str, sample_id: str | None, err: _Bad) -> None:
        if self.mode == "skip":
            self.skipped[err.reason] += 1
            return
        if err.reason == "missing_image":
            raise MissingImageError(self.path, where, sample_id, err.detail)
        raise BadSampleError(self.path, where, sample_id, err.reason, err.detail)

    def note(self, reason: str) -> None:
        """Count a record left out for a benign reason (e.g. an image without captions)."""
        self.skipped[reason] += 1


def _log_skipped(path: str, kept: int, skipped: dict[str, int]) -> None:
    if skipped:
        total = sum(skipped.values())
        logger.warning("%s: kept %d samples, left out %d records: %s", path, kept, total, skipped)


class _ImageResolver:
    """Maps a record's image path to a path inside ``image_root``, refusing any escape.

    Symlinks are resolved (directories once each, cached; the file itself when it is a link),
    so ``../``, absolute paths and links pointing outside the root are all refused.
    """

    def __init__(self, image_root: str | Path, check_images: bool):
        self.root = os.path.realpath(image_root)
        self.prefix = self.root if self.root.endswith(os.sep) else self.root + os.sep
        self.check_images = check_images
        self._dirs: dict[str, str] = {}
        if check_images and not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"image_root {str(image_root)!r} is not a directory; fix the path "
                "(or pass check_images=False to build the store without the images)"
            )

    def __call__(self, name: Any) -> str:
        """Return the resolved path relative to the real root."""
        if not isinstance(name, str):
            raise _Bad("bad_type", f"image path must be a string, got {type(name).__name__}")
        if not name or "\x00" in name:
            raise _Bad("bad_value", f"image path {name!r} is empty or contains a NUL byte")
        head, tail = os.path.split(os.path.join(self.root, name))
        if tail in ("", ".", ".."):
            raise _Bad("bad_value", f"image path {name!r} names a directory, not a file")
        real_dir = self._dirs.get(head)
        if real_dir is None:
            real_dir = self._dirs[head] = os.path.realpath(head)
        real = os.path.join(real_dir, tail)
        try:
            st: os.stat_result | None = os.lstat(real)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(real)
        if not real.startswith(self.prefix):
            raise _Bad(
                "path_escape",
                f"image path {name!r} resolves to {real!r}, outside image_root {self.root!r} "
                "(symlinks are resolved; point image_root at the real directory)",
            )
        if self.check_images and (st is None or not os.path.isfile(real)):
            raise _Bad("missing_image", f"image file {real!r} does not exist")
        return real[len(self.prefix) :]


# ---------------------------------------------------------------------------------------------
# File reading and caching


def _check_file(path: str | Path) -> str:
    p = str(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"annotation file {p!r} not found")
    return p


def _read_json(path: str) -> Any:
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


def _cache_path(
    cache_dir: str | Path, kind: str, path: str, image_root: str | Path, options: dict
) -> Path:
    """Cache file keyed on the reader's rules, the source's real path, size, mtime, the root and
    all options."""
    st = os.stat(path)
    key = json.dumps(
        [
            STORE_FORMAT_VERSION,
            _READER_RULES,
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


def _load_cached(
    kind: str,
    path: str,
    image_root: str | Path,
    options: dict,
    cache_dir: str | Path | None,
    build: Any,
) -> SampleStore:
    cache = _cache_path(cache_dir, kind, path, image_root, options) if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            store = SampleStore.load(cache)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: unreadable sample cache (%s); rebuilding", cache, e)
        else:
            logger.info("%s: %d samples from cache %s", path, len(store), cache)
            _log_skipped(path, len(store), store.skipped)
            return store
    store = build()
    _log_skipped(path, len(store), store.skipped)
    if cache is not None:
        try:
            store.save(cache)
        except OSError as e:
            logger.warning("%s: could not write sample cache %s (%s)", path, cache, e)
    return store


# ---------------------------------------------------------------------------------------------
# Small validators


def _is_id(x: Any) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def _require(obj: dict, key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise _Bad("missing_key", f"missing key {key!r} ({what})")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise _Bad("bad_type", f"{key!r} must be {names}, got {type(value).__name__}")
    return value


def _require_dict(obj: Any, what: str) -> dict:
    if not isinstance(obj, dict):
        raise _Bad("bad_type", f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _add_caption_image(
    builder: StoreBuilder,
    sample_prefix: str,
    image_id: int | str,
    rel_path: str,
    captions: list[tuple[Any, str]],
    one_sample_per_caption: bool,
) -> None:
    """One image -> one sample (first caption as reply) or one sample per caption."""
    group = builder.add_references([c for _, c in captions])
    if not one_sample_per_caption:
        builder.add(f"{sample_prefix}:{image_id}", [rel_path], 0, image_id, group)
        return
    for k, (cap_id, _) in enumerate(captions):
        builder.add(f"{sample_prefix}:{image_id}:{cap_id}", [rel_path], k, image_id, group)


# ---------------------------------------------------------------------------------------------
# COCO captions (captions_train2017.json layout)


def load_coco_captions(
    annotation_file: str | Path,
    image_root: str | Path,
    *,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    one_sample_per_caption: bool = False,
    on_bad_sample: OnBadSample = "error",
    check_images: bool = True,
    cache_dir: str | Path | None = None,
) -> SampleStore:
    """Read a COCO caption file: ``images[]{id,file_name}`` + ``annotations[]{id,image_id,caption}``.

    Sample ids: ``coco:{image_id}`` (one per image) or ``coco:{image_id}:{ann_id}`` (per caption).
    Images with no caption are left out and counted under ``skipped["no_captions"]``.

    Duplicate ids (``duplicate_id``): an image id used by two entries is ambiguous, since captions
    join images by id; every entry of it and every caption pointing at it are left out, never
    attached to one of the images. A repeated annotation id keeps its first annotation.
    """
    path = _check_file(annotation_file)
    options = {"prompt": prompt, "per_caption": one_sample_per_caption}
    options |= {"on_bad": on_bad_sample, "check": check_images}

    def build() -> SampleStore:
        col = _Collector(path, on_bad_sample)
        resolve = _ImageResolver(image_root, check_images)
        top = _read_json(path)
        if not isinstance(top, dict) or not all(k in top for k in ("images", "annotations")):
            raise ValueError(
                f"{path}: not a COCO caption file (expected an object with 'images' and "
                "'annotations' lists, e.g. captions_val2017.json)"
            )
        for key in ("images", "annotations"):
            if not isinstance(top[key], list):
                raise ValueError(f"{path}: {key!r} must be a list, got {type(top[key]).__name__}")

        images: dict[Any, tuple[str, str]] = {}  # image id -> (where, file name)
        first_use: dict[Any, str] = {}  # image id -> where it first appeared
        ambiguous: set[Any] = set()  # image ids of two or more entries: dropped with captions
        for i, im in enumerate(top["images"]):
            where, sid = f"images[{i}]", None
            try:
                im = _require_dict(im, "an image entry")
                if _is_id(im.get("id")):
                    sid = f"coco:{im['id']}"
                image_id = _require(im, "id", (int, str), "the image id")
                if image_id in first_use:
                    ambiguous.add(image_id)
                    duplicate = _Bad(
                        "duplicate_id",
                        f"image id {image_id!r} is used by both {first_use[image_id]} and {where}",
                    )
                    col.bad(where, sid, duplicate)  # raises unless skipping
                    if images.pop(image_id, None) is not None:  # the first entry goes too
                        col.bad(first_use[image_id], sid, duplicate)
                    continue
                first_use[image_id] = where
                file_name = _require(im, "file_name", str, "the image file, relative to image_root")
                images[image_id] = (where, file_name)
            except _Bad as e:
                col.bad(where, sid, e)

        captions: dict[Any, list[tuple[Any, str]]] = {}
        ann_seen: dict[Any, str] = {}  # annotation id -> where it was first kept
        for i, ann in enumerate(top["annotations"]):
            where, sid = f"annotations[{i}]", None
            try:
                ann = _require_dict(ann, "an annotation")
                if _is_id(ann.get("image_id")) and _is_id(ann.get("id")):
                    sid = f"coco:{ann['image_id']}:{ann['id']}"
                image_id = _require(ann, "image_id", (int, str), "the captioned image")
                ann_id = _require(ann, "id", (int, str), "the annotation id")
                caption = _require(ann, "caption", str, "the caption text").strip()
                if not caption:
                    raise _Bad("empty_caption", "caption is empty")
                if ann_id in ann_seen:
                    raise _Bad(
                        "duplicate_id",
                        f"annotation id {ann_id!r} is used by both {ann_seen[ann_id]} and {where}",
                    )
                if image_id in ambiguous:
                    raise _Bad(
                        "duplicate_id",
                        f"image_id {image_id!r} names several entries of 'images' "
                        "(the caption cannot be attributed to one of them)",
                    )
                if image_id not in images:
                    raise _Bad("unknown_image", f"image_id {image_id!r} is not in 'images'")
                ann_seen[ann_id] = where
                captions.setdefault(image_id, []).append((ann_id, caption))
            except _Bad as e:
                col.bad(where, sid, e)

        builder = StoreBuilder(resolve.root, source=path, prompt=prompt)
        for image_id, (where, file_name) in images.items():
            caps = captions.get(image_id)
            if not caps:
                col.note("no_captions")
                continue
            try:
                rel = resolve(file_name)
            except _Bad as e:
                col.bad(where, f"coco:{image_id}", e)
                continue
            _add_caption_image(builder, "coco", image_id, rel, caps, one_sample_per_caption)
        return builder.build(dict(col.skipped))

    return _load_cached("coco", path, image_root, options, cache_dir, build)


# ---------------------------------------------------------------------------------------------
# Karpathy splits (dataset_coco.json / dataset_flickr30k.json layout)


def load_karpathy(
    split_file: str | Path,
    image_root: str | Path,
    split: str,
    *,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    one_sample_per_caption: bool = False,
    restval_in_train: bool = True,
    on_bad_sample: OnBadSample = "error",
    check_images: bool = True,
    cache_dir: str | Path | None = None,
) -> SampleStore:
    """Read one split of a Karpathy file: ``images[]{split, filepath?, filename, sentences[].raw,
    cocoid|imgid}``. ``split="train"`` also takes ``"restval"`` images when ``restval_in_train``
    (the usual 113k-image COCO train split). Image paths are ``filepath/filename`` under
    image_root. Sample ids: ``{dataset}:{image_id}`` or ``{dataset}:{image_id}:{sentid}``.
    An image id or ``sentid`` used twice among the read splits is ``duplicate_id``; the first
    image entry that uses it is kept.
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
    path = _check_file(split_file)
    wanted = {split, "restval"} if split == "train" and restval_in_train else {split}
    options = {"split": sorted(wanted), "prompt": prompt, "per_caption": one_sample_per_caption}
    options |= {"on_bad": on_bad_sample, "check": check_images}

    def build() -> SampleStore:
        col = _Collector(path, on_bad_sample)
        resolve = _ImageResolver(image_root, check_images)
        top = _read_json(path)
        if not isinstance(top, dict) or not isinstance(top.get("images"), list):
            raise ValueError(
                f"{path}: not a Karpathy split file (expected an object with an 'images' list, "
                "e.g. dataset_coco.json)"
            )
        dataset = top.get("dataset") if isinstance(top.get("dataset"), str) else "coco"
        builder = StoreBuilder(resolve.root, source=path, prompt=prompt)
        seen: dict[Any, int] = {}
        sentences_seen: dict[Any, str] = {}  # sentid -> where it was first used
        for i, im in enumerate(top["images"]):
            where, sid = f"images[{i}]", None
            try:
                im = _require_dict(im, "an image entry")
                image_id = im.get("cocoid", im.get("imgid"))
                if _is_id(image_id):
                    sid = f"{dataset}:{image_id}"
                im_split = _require(im, "split", str, "one of " + "/".join(KARPATHY_SPLITS))
                if im_split not in KARPATHY_SPLITS:
                    raise _Bad("bad_value", f"unknown split {im_split!r}")
                if im_split not in wanted:
                    continue
                if image_id is None:
                    raise _Bad("missing_key", "missing key 'cocoid' or 'imgid' (the image id)")
                if not _is_id(image_id):
                    raise _Bad(
                        "bad_type", f"image id must be int/str, got {type(image_id).__name__}"
                    )
                if image_id in seen:
                    raise _Bad(
                        "duplicate_id",
                        f"image id {image_id!r} is used by both images[{seen[image_id]}] and "
                        f"{where}",
                    )
                seen[image_id] = i
                filename = _require(im, "filename", str, "the image file name")
                filepath = im.get("filepath", "")
                if not isinstance(filepath, str):
                    raise _Bad("bad_type", f"'filepath' must be str, got {type(filepath).__name__}")
                sentences = _require(im, "sentences", list, "the reference captions")
                caps = []
                here: dict[Any, str] = {}  # this image's caption ids -> where
                explicit: dict[Any, str] = {}  # its own sentids: unique across the whole file
                for k, sent in enumerate(sentences):
                    sent = _require_dict(sent, f"sentences[{k}]")
                    raw = _require(sent, "raw", str, f"text of sentences[{k}]").strip()
                    if not raw:
                        raise _Bad("empty_caption", f"sentences[{k}] is empty")
                    at = f"{where}.sentences[{k}]"
                    sent_id = sent.get("sentid")
                    own = _is_id(sent_id)
                    if not own:  # no usable sentid: the position names the caption
                        sent_id = k
                    first = here.get(sent_id) or (sentences_seen.get(sent_id) if own else None)
                    if first is not None:
                        raise _Bad(
                            "duplicate_id", f"sentid {sent_id!r} is used by both {first} and {at}"
                        )
                    here[sent_id] = at
                    if own:
                        explicit[sent_id] = at
                    caps.append((sent_id, raw))
                sentences_seen.update(explicit)
                if not caps:
                    col.note("no_captions")
                    continue
                rel = resolve(os.path.join(filepath, filename))
            except _Bad as e:
                col.bad(where, sid, e)
                continue
            _add_caption_image(builder, dataset, image_id, rel, caps, one_sample_per_caption)
        return builder.build(dict(col.skipped))

    return _load_cached("karpathy", path, image_root, options, cache_dir, build)


# ---------------------------------------------------------------------------------------------
# LLaVA instruction data (llava_v1_5_mix665k.json layout, or JSON Lines)


def _iter_llava(path: str, col: _Collector) -> Iterator[tuple[str, str, Any]]:
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
                    col.bad(f"line {lineno}", None, _Bad("malformed_json", f"not valid JSON ({e})"))
                    continue
                yield f"line {lineno}", f"{name}:L{lineno}", obj
        return
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of samples, got {type(data).__name__} "
            "(for one object per line, name the file .jsonl)"
        )
    for i, obj in enumerate(data):
        yield f"record {i}", f"{name}:{i}", obj


def _llava_turns(obj: dict) -> list[dict]:
    key = "conversations" if "conversations" in obj else "messages"
    turns = _require(obj, key, list, "the list of turns") if key in obj else None
    if turns is None:
        raise _Bad("missing_key", "missing key 'conversations' (the list of turns)")
    if not turns:
        raise _Bad("bad_value", f"{key!r} is empty")
    for t, turn in enumerate(turns):
        turn = _require_dict(turn, f"{key}[{t}]")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        for k in (role_key, text_key):
            if k not in turn:
                raise _Bad(
                    "missing_key",
                    f"{key}[{t}] has no {k!r} (turns need 'from'/'value' or 'role'/'content')",
                )
            if not isinstance(turn[k], str):
                raise _Bad(
                    "bad_type", f"{key}[{t}][{k!r}] must be str, got {type(turn[k]).__name__}"
                )
    return turns


def _llava_images(obj: dict) -> list[str]:
    if "image" in obj and "images" in obj:
        raise _Bad("bad_value", "both 'image' and 'images' given; use one")
    value = obj.get("image", obj.get("images"))
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise _Bad(
        "bad_type", f"'image' must be a string or a list of strings, got {type(value).__name__}"
    )


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
    path = _check_file(path)
    options = {"on_bad": on_bad_sample, "check": check_images}

    def build() -> SampleStore:
        col = _Collector(path, on_bad_sample)
        resolve = _ImageResolver(image_root, check_images)
        builder = StoreBuilder(resolve.root, source=path)
        kept: dict[str, str] = {}  # sample id -> where its record is
        for where, sid, obj in _iter_llava(path, col):
            try:
                obj = _require_dict(obj, "a sample")
                if "id" in obj:
                    sid = str(_require(obj, "id", (str, int), "the sample id"))
                if sid in kept:
                    raise _Bad(
                        "duplicate_id", f"sample id {sid!r} is used by both {kept[sid]} and {where}"
                    )
                turns = _llava_turns(obj)
                rel = [resolve(name) for name in _llava_images(obj)]
            except _Bad as e:
                col.bad(where, sid, e)
                continue
            kept[sid] = where
            builder.add(sid, rel, turns)
        return builder.build(dict(col.skipped))

    return _load_cached("llava", path, image_root, options, cache_dir, build)


def load_source(
    kind: Literal["coco", "karpathy", "llava"],
    path: str | Path,
    image_root: str | Path,
    **kwargs: Any,
) -> SampleStore:
    """Dispatch to the reader for ``kind``; ``kwargs`` go to it (Karpathy needs ``split=``)."""
    readers = {"coco": load_coco_captions, "karpathy": load_karpathy, "llava": load_llava}
    if kind not in readers:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {sorted(readers)}")
    return readers[kind](path, image_root, **kwargs)
