"""The real tokenizers of tests/fixtures/tokenizers, unpacked into a pytest temporary folder.

Why: the tests must read only the repository. Large tokenizer files are committed as ``.xz``
(see tests/fixtures/tokenizers/PROVENANCE.md) and decompressed here, each checked against the
sha256 of its original in ``SHA256SUMS`` so a damaged or re-encoded fixture cannot pass silently.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
from pathlib import Path

import pytest

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "tokenizers"
SUMS_FILE = FIXTURE_DIR / "SHA256SUMS"
NAMES = ("qwen3", "mistral-7b-instruct-v0.1", "gpt2")
_DONE = ".unpacked"


def recorded_sha256() -> dict[str, str]:
    """``{"qwen3/tokenizer.json": sha256, ...}`` as recorded in SHA256SUMS."""
    sums: dict[str, str] = {}
    for line in SUMS_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpack(dest: Path) -> Path:
    """Decompress every fixture into ``dest/<name>/`` and verify it; returns ``dest``.

    Idempotent: a folder finished before (marker written last) is reused as it is.
    """
    if (dest / _DONE).is_file():
        return dest
    sums = recorded_sha256()
    written: set[str] = set()
    for source in sorted(FIXTURE_DIR.glob("*/*")):
        relative = source.relative_to(FIXTURE_DIR).as_posix()
        target = dest / relative.removesuffix(".xz")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".xz":
            with lzma.open(source, "rb") as packed, open(target, "wb") as out:
                shutil.copyfileobj(packed, out, 1 << 20)
        else:
            shutil.copyfile(source, target)
        name = target.relative_to(dest).as_posix()
        if name not in sums:
            raise AssertionError(f"{source}: not listed in {SUMS_FILE}; add its sha256 there")
        if sha256_of(target) != sums[name]:
            raise AssertionError(
                f"{source}: decompressed sha256 {sha256_of(target)} != {sums[name]} recorded in "
                f"{SUMS_FILE}"
            )
        written.add(name)
    missing = sorted(set(sums) - written)
    if missing:
        raise AssertionError(f"{FIXTURE_DIR}: files listed in SHA256SUMS are missing: {missing}")
    (dest / _DONE).write_text("ok\n")
    return dest


def unpacked_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked fixture folder of this pytest session (unpacked on first use)."""
    return unpack(tmp_path_factory.getbasetemp() / "tokenizer-fixtures")
