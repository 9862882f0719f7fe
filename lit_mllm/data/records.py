"""A compact, fork- and pickle-friendly store of training samples.

Why: a Python list of a million dicts is a million refcounted objects; every DataLoader worker
touches their refcounts and so copies the pages they live on (copy-on-write blow-up), and a
spawned worker must unpickle all of them. Here each sample is one JSON record inside a single
``uint8`` buffer addressed by ``int64`` offsets, decoded only when indexed. Caption references,
shared by all samples of one image, are stored once per image in a second buffer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from lit_mllm.tokens import IMAGE_PLACEHOLDER

STORE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One training/eval example as read from its source, before any tokenisation."""

    sample_id: str
    image_paths: tuple[str, ...]
    conversation: tuple[dict, ...]
    image_id: int | str | None = None
    references: tuple[str, ...] = field(default=())
    # the encoded images themselves when a shard carried them (``image_paths`` then only name
    # them in messages); empty: read each image from its path
    image_bytes: tuple[bytes, ...] = field(default=(), repr=False)


def caption_conversation(prompt: str, caption: str) -> tuple[dict, dict]:
    """The single-turn conversation a caption sample trains on."""
    return (
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
        {"role": "assistant", "content": caption},
    )


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def _text_chars(content: Any) -> int:
    """Characters of a message's text (``content``, or LLaVA's ``value``): a string, or the
    text parts of a content list."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return 0


class _Packer:
    """Appends byte records and remembers their offsets."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offsets: list[int] = [0]

    def add(self, payload: bytes) -> int:
        self.chunks.append(payload)
        self.offsets.append(self.offsets[-1] + len(payload))
        return len(self.chunks) - 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        data = np.frombuffer(b"".join(self.chunks), dtype=np.uint8).copy()
        return data, np.asarray(self.offsets, dtype=np.int64)


class StoreBuilder:
    """Collects validated records and freezes them into a :class:`SampleStore`.

    ``image_root`` is stored once; records keep image paths relative to it.
    """

    def __init__(self, image_root: str, source: str = "", prompt: str = "") -> None:
        self.image_root = image_root
        self.source = source
        self.prompt = prompt
        self._records = _Packer()
        self._groups = _Packer()
        self._group_of: list[int] = []

    def add_references(self, references: Sequence[str]) -> int:
        """Store one image's reference captions once; returns the group index to pass to add()."""
        return self._groups.add(_dumps(list(references)))

    def add(
        self,
        sample_id: str,
        rel_image_paths: Sequence[str],
        conversation: Sequence[dict] | int,
        image_id: int | str | None = None,
        group: int = -1,
    ) -> None:
        """Add one sample. An int ``conversation`` k means "caption k of the group's references"."""
        if isinstance(conversation, int) and group < 0:
            raise ValueError(f"sample {sample_id!r}: a caption index needs a references group")
        conv = conversation if isinstance(conversation, int) else list(conversation)
        self._records.add(_dumps([sample_id, list(rel_image_paths), conv, image_id]))
        self._group_of.append(group)

    def __len__(self) -> int:
        return len(self._group_of)

    def build(self, skipped: dict[str, int] | None = None) -> SampleStore:
        data, offsets = self._records.arrays()
        gdata, goffsets = self._groups.arrays()
        meta = {
            "version": STORE_FORMAT_VERSION,
            "image_root": self.image_root,
            "source": self.source,
            "prompt": self.prompt,
            "skipped": dict(skipped or {}),
        }
        return SampleStore(
            data, offsets, gdata, goffsets, np.asarray(self._group_of, np.int32), meta
        )


class SampleStore(Sequence[Sample]):
    """Read-only sequence of :class:`Sample` backed by a few numpy arrays.

    Attributes: ``source`` (file it was read from), ``image_root``, ``skipped``
    (``{reason: count}`` of records left out while loading), ``nbytes`` (array bytes).
    """

    def __init__(
        self,
        data: np.ndarray,
        offsets: np.ndarray,
        group_data: np.ndarray,
        group_offsets: np.ndarray,
        group: np.ndarray,
        meta: dict[str, Any],
    ) -> None:
        if offsets.ndim != 1 or len(offsets) != len(group) + 1:
            raise ValueError("SampleStore: offsets must have one more entry than samples")
        self._data, self._offsets = data, offsets
        self._gdata, self._goffsets, self._group = group_data, group_offsets, group
        self._meta = meta
        self.image_root: str = meta["image_root"]
        self.source: str = meta["source"]
        self.prompt: str = meta["prompt"]
        self.skipped: dict[str, int] = dict(meta["skipped"])

    def __len__(self) -> int:
        return len(self._group)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...
    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"SampleStore index {i} out of range for {n} samples")
        a, b = self._offsets[i], self._offsets[i + 1]
        sample_id, rel, conv, image_id = json.loads(self._data[a:b].tobytes())
        g = int(self._group[i])
        refs: tuple[str, ...] = ()
        if g >= 0:
            ga, gb = self._goffsets[g], self._goffsets[g + 1]
            refs = tuple(json.loads(self._gdata[ga:gb].tobytes()))
        if isinstance(conv, int):
            conv = caption_conversation(self.prompt, refs[conv])
        paths = tuple(os.path.join(self.image_root, p) for p in rel)
        return Sample(sample_id, paths, tuple(conv), image_id, refs)

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(characters of message text, images) per sample, from the records alone: lengths
        for grouping batches by length, without decoding an image or running a tokenizer."""
        chars = np.zeros(len(self), dtype=np.int64)
        images = np.zeros(len(self), dtype=np.int64)
        ref_chars: dict[int, list[int]] = {}
        for i in range(len(self)):
            a, b = self._offsets[i], self._offsets[i + 1]
            _, rel, conv, _ = json.loads(self._data[a:b].tobytes())
            images[i] = len(rel)
            if isinstance(conv, int):  # a caption sample: the prompt and one reference
                g = int(self._group[i])
                if g not in ref_chars:
                    ga, gb = self._goffsets[g], self._goffsets[g + 1]
                    ref_chars[g] = [len(r) for r in json.loads(self._gdata[ga:gb].tobytes())]
                chars[i] = len(self.prompt) + ref_chars[g][conv]
            else:
                chars[i] = sum(_text_chars(m.get("content", m.get("value"))) for m in conv)
        return chars, images

    @property
    def nbytes(self) -> int:
        arrays = (self._data, self._offsets, self._gdata, self._goffsets, self._group)
        return sum(a.nbytes for a in arrays)

    def __repr__(self) -> str:
        return (
            f"SampleStore({len(self)} samples from {self.source!r}, "
            f"{self.nbytes / 2**20:.1f} MiB, skipped={self.skipped})"
        )

    # Pickling: only numpy arrays and one small dict, so DataLoader workers receive a copy
    # the size of the buffers and never hold per-sample Python objects.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "arrays": (self._data, self._offsets, self._gdata, self._goffsets, self._group),
            "meta": {**self._meta, "skipped": self.skipped},
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["arrays"], state["meta"])

    def save(self, path: str | Path) -> None:
        """Write an uncompressed ``.npz`` atomically (safe when several ranks race)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        meta = np.frombuffer(_dumps({**self._meta, "skipped": self.skipped}), dtype=np.uint8)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                data=self._data,
                offsets=self._offsets,
                group_data=self._gdata,
                group_offsets=self._goffsets,
                group=self._group,
                meta=meta,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> SampleStore:
        """Read a store written by :meth:`save`; ValueError on a different format version."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != STORE_FORMAT_VERSION:
                raise ValueError(
                    f"{path}: sample store format {meta.get('version')} != "
                    f"{STORE_FORMAT_VERSION}; delete the file to rebuild it"
                )
            arrays = [z[k] for k in ("data", "offsets", "group_data", "group_offsets", "group")]
        return cls(*arrays, meta)

    @classmethod
    def from_samples(
        cls, samples: Iterable[Sample], source: str = "", skipped: dict[str, int] | None = None
    ) -> SampleStore:
        """Pack already-built samples (absolute image paths kept as they are)."""
        builder = StoreBuilder(image_root="", source=source)
        for s in samples:
            group = builder.add_references(s.references) if s.references else -1
            builder.add(s.sample_id, s.image_paths, s.conversation, s.image_id, group)
        return builder.build(skipped)
