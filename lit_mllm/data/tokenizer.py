"""One entry point for tokenizers: the packaged tiny one, a local folder, or a cached hub id.

Loading never reaches the network, and a missing tokenizer is a ``FileNotFoundError`` that says
what was looked for, where, and how to get it (:mod:`lit_mllm.hub`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_mllm.data.chat_template import DEFAULT_CHAT_TEMPLATE
from lit_mllm.hub import local_or_cached_folder
from lit_mllm.tokens import add_image_tokens

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


def load_tokenizer(
    name_or_path: str = TINY, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """A tokenizer with a chat template (the built-in default if it has none) and the image
    tokens added: the model and the DataModule both load theirs here, so token ids agree.

    ``"tiny"`` is the packaged tokenizer; an existing folder is loaded from disk; any other name
    is a hub id looked up in the local HF cache (never downloaded: :mod:`lit_mllm.hub`).
    """
    name = str(name_or_path)
    if name == TINY:
        path = tiny_tokenizer_dir()
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"the packaged tiny tokenizer is missing from {path}; rebuild it with "
                f"`lit-mllm-data build-tokenizer --out {path}` or reinstall lit-mllm"
            )
    else:
        patterns = [*TOKENIZER_PATTERNS, *(["*.py"] if trust_remote_code else [])]
        path = local_or_cached_folder(name, "tokenizer", patterns)
    tokenizer = _load_local(path, trust_remote_code)
    add_image_tokens(tokenizer)
    return tokenizer


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


def _ensure_chat_template(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok
