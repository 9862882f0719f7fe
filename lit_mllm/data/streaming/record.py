"""One sample as a LitData item: ``meta`` (JSON text) and ``images`` (the files, end to end).

Why this layout: two fields of fixed types (``str``, ``bytes``) give every item the same LitData
format whatever its number of images, and no field is ever unpickled (a shard from an object
store is data, not code). Images are the files as stored, never re-encoded. Caption samples keep
the caption, not the prompt, so ``data.caption_prompt`` still applies when the shard is read.
The record is checked again when read, with the readers' checks and reason keys: a corrupted
chunk is counted (or reported) like a bad line of a JSON file.
"""

from __future__ import annotations

import json
from typing import Any

from lit_mllm.data.readers.llava import llava_turns
from lit_mllm.data.readers.validation import InvalidRecord, is_id, require, require_dict
from lit_mllm.data.records import Sample, caption_conversation

RECORD_VERSION = 1
FIELDS = ("meta", "images")


def to_item(
    sample: Sample, image_names: list[str], image_bytes: list[bytes], caption: str | None
) -> dict[str, Any]:
    """``caption``: the reply of a caption sample (the prompt is added when read); None keeps
    the conversation as it is."""
    meta: dict[str, Any] = {
        "v": RECORD_VERSION,
        "id": sample.sample_id,
        "image_id": sample.image_id,
        "images": [
            {"name": name, "bytes": len(data)}
            for name, data in zip(image_names, image_bytes, strict=True)
        ],
        "references": list(sample.references),
    }
    if caption is not None:
        meta["caption"] = caption
    else:
        meta["conversations"] = list(sample.conversation)
    return {"meta": json.dumps(meta, ensure_ascii=False), "images": b"".join(image_bytes)}


def from_item(item: Any, where: str, caption_prompt: str) -> Sample:
    """A checked :class:`Sample` (its images as bytes, named ``{where}/{name}``), or
    :class:`InvalidRecord` with the readers' reason keys."""
    if not isinstance(item, dict) or set(item) != set(FIELDS):
        found = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise InvalidRecord(
            "bad_type", f"not a lit-mllm shard item (fields {found}, expected {list(FIELDS)})"
        )
    try:
        meta = json.loads(item["meta"])
    except (json.JSONDecodeError, TypeError) as error:
        raise InvalidRecord("malformed_json", f"meta is not valid JSON ({error})") from error
    meta = require_dict(meta, "the record's meta")
    if meta.get("v") != RECORD_VERSION:
        raise InvalidRecord(
            "bad_value",
            f"record version {meta.get('v')!r}, this lit-mllm reads {RECORD_VERSION}: shard the "
            "source again with this version",
        )
    sample_id = str(require(meta, "id", (str, int), "the sample id"))
    image_id = meta.get("image_id")
    if image_id is not None and not is_id(image_id):
        raise InvalidRecord(
            "bad_type", f"'image_id' must be int/str, got {type(image_id).__name__}"
        )
    images = require(meta, "images", list, "the images' names and sizes")
    blob = item["images"]
    names, pieces, start = [], [], 0
    for k, entry in enumerate(images):
        entry = require_dict(entry, f"images[{k}]")
        name = require(entry, "name", str, "the image's name")
        size = require(entry, "bytes", int, "the image's byte count")
        if size < 0 or start + size > len(blob):
            raise InvalidRecord(
                "bad_value", f"images[{k}] claims {size} bytes; the item carries {len(blob)}"
            )
        names.append(f"{where}/{name}")
        pieces.append(bytes(blob[start : start + size]))
        start += size
    if start != len(blob):
        raise InvalidRecord(
            "bad_value", f"the images' sizes add up to {start} bytes; the item carries {len(blob)}"
        )
    references = meta.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise InvalidRecord("bad_type", "'references' must be a list of strings")
    if "caption" in meta:
        caption = require(meta, "caption", str, "the caption")
        conversation: Any = caption_conversation(caption_prompt, caption)
    else:
        conversation = llava_turns(meta)
    return Sample(
        sample_id,
        tuple(names),
        tuple(conversation),
        image_id,
        tuple(references),
        image_bytes=tuple(pieces),
    )
