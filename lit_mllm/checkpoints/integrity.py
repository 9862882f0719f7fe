"""Checksums that tell a damaged checkpoint from a good one before its weights are used.

Single files: ``torch.save`` writes a zip archive holding a CRC32 of every record (the pickle and
each tensor's bytes), which torch's reader never checks, so flipped bytes in a tensor load as
wrong weights. :func:`file_problem` checks every CRC with :mod:`zipfile`: one sequential read of
the file (CRC32 runs at 2+ GB/s; the read is what costs on a cold disk).

Folders (sharded FSDP checkpoints): their ``.metadata`` is a bare pickle with no checksum, so
:func:`write_manifest` records the size and CRC32 of every file when the folder is saved and
:func:`folder_problem` checks them.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

MANIFEST = "lit_mllm_checksums.json"
ZIP_MAGIC = b"PK\x03\x04"
CHUNK = 8 << 20
_verified: set[tuple[str, int, int, int]] = set()  # files checked in this process, unchanged


def _identity(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _describe_start(head: bytes) -> str:
    if not head:
        return "it is empty"
    if head.startswith(b"\x80"):
        return "it is a bare pickle, not a torch.save archive"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "it starts with unknown binary data"
    return "it is a text file"


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not an intact ``torch.save`` zip archive, or ``None`` when it is.

    The answer is remembered per process for an unchanged file (same size, mtime and inode),
    so the CLI's check and Lightning's load do not both pay for the read.
    """
    path = Path(path)
    key = _identity(path)
    if key in _verified:
        return None
    size = key[1]
    if size == 0:
        return "is empty (0 bytes): its save was interrupted"
    with path.open("rb") as f:
        head = f.read(64)
    if not head.startswith(ZIP_MAGIC):
        return (
            f"is not a PyTorch checkpoint ({_describe_start(head)}; torch.save writes zip archives)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as error:
        return f"is corrupt or truncated ({size} bytes; its zip index cannot be read: {error})"
    if bad is not None:
        return f"is corrupt: its record {bad!r} fails its CRC32 checksum ({size} bytes)"
    _verified.add(key)
    return None


# -- folders ------------------------------------------------------------------------------------
def crc32_of(path: str | Path) -> dict[str, Any]:
    """Size and CRC32 of one file, streamed in 8 MiB chunks."""
    crc = 0
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def files_to_check(folder: str | Path) -> list[str]:
    """Every file of a checkpoint folder (relative, sorted) except the manifest."""
    folder = Path(folder)
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(folder: str | Path, checksums: dict[str, dict[str, Any]]) -> Path:
    """Store ``{relative path: {size, crc32}}`` in the folder (fsync-ed by the caller's commit)."""
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps({"format": 1, "files": checksums}, indent=1, sort_keys=True))
    return path


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def folder_problem(folder: str | Path) -> str | None:
    """Why the folder's files do not match its manifest, or ``None`` when they all do."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        entries = {str(name): (int(v["size"]), str(v["crc32"])) for name, v in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"has an unreadable checksum file {MANIFEST} ({type(error).__name__}: {error})"
    for name, (size, crc) in sorted(entries.items()):
        file = folder / name
        if not file.is_file():
            return f"is incomplete: {name} is missing"
        actual = os.path.getsize(file)
        if actual != size:
            return f"is damaged: {name} has {actual} bytes, {size} when saved"
        if crc32_of(file)["crc32"] != crc:
            return f"is damaged: {name} fails its CRC32 checksum"
    return None


# -- finding a good one -------------------------------------------------------------------------
def is_sharded_folder(path: str | Path) -> bool:
    """Lightning's FSDP layout: a folder with ``meta.pt`` beside the DCP shards."""
    return Path(path).is_dir() and (Path(path) / "meta.pt").is_file()


def checkpoint_problem(path: str | Path) -> str | None:
    """:func:`file_problem` or :func:`folder_problem`, whichever fits; a folder without a
    manifest cannot be checked and counts as intact."""
    path = Path(path)
    if path.is_dir():
        return folder_problem(path) if has_manifest(path) else None
    return file_problem(path)


def last_good_checkpoint(path: str | Path) -> Path | None:
    """The newest other checkpoint next to ``path`` that passes its checksums (newest first, so
    usually one file is read)."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    candidates = [
        p
        for p in path.parent.iterdir()
        if p.resolve() != path.resolve()
        and not p.name.startswith(".")
        and ((p.is_file() and p.suffix == ".ckpt") or is_sharded_folder(p))
    ]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            if checkpoint_problem(candidate) is None:
                return candidate
        except OSError:
            continue
    return None
