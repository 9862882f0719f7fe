"""The tiny tokenizer (deterministic build, exact round trip, chat template) and load_tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizer_fixtures import unpacked_tokenizers
from transformers import PreTrainedTokenizerBase

from lit_mllm.data.chat_template import DEFAULT_CHAT_TEMPLATE, ROLE_MARKERS
from lit_mllm.data.cli import main as data_cli
from lit_mllm.data.tokenizer import load_tokenizer, tiny_tokenizer_dir
from lit_mllm.tokens import IMAGE_SPECIAL_TOKENS, add_image_tokens

TEXTS = [
    "a small red circle to the left of a large blue square",
    "\n<|user|>\n<image>\nWhat colour is the star?\n<|assistant|>\nThe star is red.<|endoftext|>",
    "  two  spaces,\ttabs\r\nand CRLF\n\n",
    "unicode: héllo wörld — 日本語 🙂👍🏽 ∑ x² ",
    "<im_start><im_patch><im_patch><im_end> tail",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real tokenizers of tests/fixtures/tokenizers, unpacked and sha256-checked."""
    return unpacked_tokenizers(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerBase:
    return load_tokenizer("tiny")


def test_build_is_deterministic_and_matches_shipped(tmp_path: Path) -> None:
    assert data_cli(["build-tokenizer", "--out", str(tmp_path)]) == 0
    shipped = tiny_tokenizer_dir()
    names = sorted(p.name for p in shipped.iterdir())
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for name in names:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name


def test_vocab_and_special_tokens(tiny: PreTrainedTokenizerBase) -> None:
    assert len(tiny) == 1024
    assert tiny.eos_token == tiny.pad_token == "<|endoftext|>"
    assert tiny.eos_token_id == tiny.pad_token_id == 0
    expected = ["<|endoftext|>", *ROLE_MARKERS, *IMAGE_SPECIAL_TOKENS]
    assert tiny.convert_tokens_to_ids(expected) == list(range(7))
    assert set(expected) <= set(tiny.all_special_tokens)
    for t in expected:  # special tokens are never split
        assert tiny(f"x{t}y", add_special_tokens=False)["input_ids"][
            1
        ] == tiny.convert_tokens_to_ids(t)
    # Frequent synthetic words are single tokens (short sequences for the tiny recipe).
    assert len(tiny(" circle", add_special_tokens=False)["input_ids"]) == 1
    assert tiny.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_offsets(tiny: PreTrainedTokenizerBase, text: str) -> None:
    enc = tiny(text, add_special_tokens=True, return_offsets_mapping=True)
    assert tiny.decode(enc["input_ids"]) == text
    spans = enc["offset_mapping"]
    if text.isascii():  # offsets tile the text exactly, leading spaces included
        assert "".join(text[s:e] for s, e in spans) == text
    else:  # byte pieces of one character all point at that character
        assert set().union(*(range(s, e) for s, e in spans)) == set(range(len(text)))
    starts = [s for s, _ in spans]
    assert starts == sorted(starts)


def test_image_tokens_already_present(tiny: PreTrainedTokenizerBase) -> None:
    n = len(tiny)
    ids = add_image_tokens(tiny)
    assert (ids.start, ids.patch, ids.end) == (4, 5, 6)
    assert len(tiny) == n


def test_chat_template_rendering(tiny: PreTrainedTokenizerBase) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "Colour?"},
    ]
    text = tiny.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "\n<|system|>\nBe brief.\n<|user|>\n<image>\nWhat is this?"
        "\n<|assistant|>\na red circle<|endoftext|>\n<|user|>\nColour?\n<|assistant|>\n"
    )
    ids = tiny.apply_chat_template(msgs[:3], tokenize=True, return_dict=False)
    assert ids == tiny(tiny.apply_chat_template(msgs[:3], tokenize=False))["input_ids"]
    assert ids[-1] == tiny.eos_token_id
    assert (
        tiny.decode(ids)
        == "".join(f"\n<|{m['role']}|>\n{m['content']}" for m in msgs[:3]) + "<|endoftext|>"
    )


@pytest.mark.parametrize(
    ("folder", "cls", "has_own_template"),
    [
        ("gpt2", "GPT2Tokenizer", False),
        ("qwen3", "Qwen2Tokenizer", True),
        ("mistral-7b-instruct-v0.1", "LlamaTokenizer", True),
    ],
)
def test_load_fixture_tokenizers(
    tokenizer_root: Path, folder: str, cls: str, has_own_template: bool
) -> None:
    path = tokenizer_root / folder
    tok = load_tokenizer(str(path))
    assert type(tok).__name__ == cls
    assert (tok.chat_template == DEFAULT_CHAT_TEMPLATE) is not has_own_template
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    if folder == "gpt2":
        assert text == "\n<|user|>\nhi\n<|assistant|>\nok<|endoftext|>"
    else:
        assert "hi" in text and "ok" in text and "<|assistant|>" not in text


def test_hub_id_resolved_from_cache(
    tokenizer_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    src = tokenizer_root / "gpt2"
    repo = tmp_path / "models--acme--tok"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    tok = load_tokenizer("acme/tok")
    # GPT-2's vocabulary + the image tokens load_tokenizer adds (one place, model and data alike)
    assert (
        len(tok) == 50257 + len(IMAGE_SPECIAL_TOKENS) and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    )
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer("acme/missing")
    msg = str(err.value)
    assert "'acme/missing'" in msg and str(tmp_path) in msg and "hf download acme/missing" in msg
    assert err.value.__cause__ is not None


def test_missing_paths_raise_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer.*does not exist"):
        load_tokenizer(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a tokenizer folder"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    with pytest.raises(FileNotFoundError, match="could not load a tokenizer from folder") as err:
        load_tokenizer(str(tmp_path / "broken"))
    assert err.value.__cause__ is not None
