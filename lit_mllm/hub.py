"""Where weights and tokenizers come from: a local path, or a hub id already in the HF cache.

One rule for the tokenizer, the decoder and the timm encoder's weights. Nothing is downloaded
at run time: a miss is a ``FileNotFoundError`` that names what was looked for, where, and the
``hf download`` command that fetches it on a machine with network access.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def hf_cache_dir() -> str:
    """The hub cache, read at call time (huggingface_hub reads its variables at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def local_or_cached_folder(
    name: str, what: str, patterns: Sequence[str], revision: str | None = None
) -> Path:
    """``name`` as an existing local folder, else the snapshot folder of hub id ``name`` in the
    HF cache holding files that match ``patterns`` (``what`` names the thing in errors)."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"{what} {name!r} is a file; expected a folder")
        return local
    if looks_like_path(name):
        raise FileNotFoundError(
            f"{what} folder {name!r} does not exist (resolved to {local.resolve()})"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            name,
            revision=revision,
            allow_patterns=list(patterns),
            local_files_only=True,
            cache_dir=hf_cache_dir(),
        )
    except Exception as error:  # offline, missing repo, partial cache: many types
        raise FileNotFoundError(missing_message(what, name, type(error).__name__)) from error
    return Path(folder)


def cached_file(
    repo_id: str, filenames: Sequence[str], what: str, revision: str | None = None
) -> Path:
    """The first of ``filenames`` of hub repo ``repo_id`` present in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir(), revision=revision)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    raise FileNotFoundError(missing_message(what, repo_id, f"none of {list(filenames)} is cached"))


def missing_message(what: str, repo_id: str, reason: str) -> str:
    """The library's own text is left out: it suggests going online, which lit-mllm never does."""
    return (
        f"{what} {repo_id!r} not found: it is not a local folder and not in the Hugging Face "
        f"cache {hf_cache_dir()}. Fetch it on a machine with network access with "
        f"`hf download {repo_id}` and copy the cache here (or set HF_HUB_CACHE), or pass a "
        f"local folder. ({reason})"
    )
