"""One entry point for tokenizers: the packaged tiny one, a local folder, or a cached hub id.

Loading never reaches the network unless asked (``local_files_only=False``), and a missing
tokenizer is a ``FileNotFoundError`` that says what was looked for, where, and how to get it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_mllm.data.chat_template import DEFAULT_CHAT_TEMPLATE

TINY = "tiny"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
)
# Files a tokenizer may need; config.json lets AutoTokenizer find the class when needed.
TOKENIZER_PATTERNS = (
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
    "*.tiktoken",
)


def tiny_tokenizer_dir() -> Path:
    """The folder of the tiny tokenizer shipped as package data."""
    return Path(str(resources.files("lit_mllm") / "assets" / "tiny_tokenizer"))


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def load_tokenizer(
    name_or_path: str = TINY,
    *,
    local_files_only: bool = True,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a chat template (the built-in default if none).

    ``"tiny"`` is the packaged tokenizer; an existing folder is loaded from disk; any other name
    is a hub id looked up in the local HF cache (downloaded only if ``local_files_only=False``).
    """
    name = str(name_or_path)
    if name == TINY:
        path: Path | None = tiny_tokenizer_dir()
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"the packaged tiny tokenizer is missing from {path}; rebuild it with "
                f"`lit-mllm-data build-tokenizer --out {path}` or reinstall lit-mllm"
            )
    else:
        local = Path(name).expanduser()
        path = local if local.exists() else None
        if path is None and _looks_like_path(name):
            raise FileNotFoundError(
                f"tokenizer folder {name!r} does not exist (resolved to {local.resolve()}); "
                "pass an existing folder with tokenizer files, a hub id, or 'tiny'"
            )
    if path is not None:
        return _load_local(path, trust_remote_code)
    return _load_hub(name, local_files_only, trust_remote_code)


def _load_local(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} is not a tokenizer folder: expected one of {', '.join(TOKENIZER_FILES)} "
            "in it (save one with `tokenizer.save_pretrained(folder)`)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise FileNotFoundError(
            f"could not load a tokenizer from folder {path}: {type(e).__name__}: {e}. "
            "Check that it holds a complete tokenizer (tokenizer.json is the most portable)"
        ) from e
    return _ensure_chat_template(tok)


def _load_hub(
    repo_id: str, local_files_only: bool, trust_remote_code: bool
) -> PreTrainedTokenizerBase:
    """Resolve the snapshot folder first (cache only unless asked), then load it as a folder.

    Loading the folder avoids per-file cache look-ups, so a cache that holds only the tokenizer
    files (``hf download <id> tokenizer.json tokenizer_config.json``) works too.
    """
    from huggingface_hub import snapshot_download

    patterns = [*TOKENIZER_PATTERNS, *(["*.py"] if trust_remote_code else [])]
    try:
        folder = snapshot_download(
            repo_id, local_files_only=local_files_only, allow_patterns=patterns
        )
    except Exception as e:  # hub errors have many types (validation, offline, HTTP, missing)
        where = f"the Hugging Face cache {_hf_cache_dir()}"
        if not local_files_only:
            where += " or on the Hub"
        reason = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(
            f"tokenizer {repo_id!r} not found: it is not a local folder and not in {where}; "
            f"download it first with `hf download {repo_id}` on a machine with network, "
            f"or pass a local tokenizer folder ({type(e).__name__}: {reason})"
        ) from e
    return _load_local(Path(folder), trust_remote_code)


def _ensure_chat_template(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok
