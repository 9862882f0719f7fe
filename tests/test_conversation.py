"""Label masking against real chat templates (tests/fixtures/tokenizers) and the built-in one."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizer_fixtures import unpacked_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_mllm.data.chat_template import DEFAULT_CHAT_TEMPLATE
from lit_mllm.data.conversation import (
    ConversationTokenizer,
    NoSupervisedTokensError,
    tokenize_conversation,
)
from lit_mllm.data.turns import ConversationError, expand_image_placeholders, normalize_conversation
from lit_mllm.tokens import IGNORE_INDEX, IM_END, IM_PATCH, IM_START

Loader = Callable[[str], PreTrainedTokenizerBase]
TEMPLATE_TOKENIZERS = ["qwen3", "mistral-7b-instruct-v0.1", "gpt2", "tiny"]
END_MARKER = {
    "qwen3": "<|im_end|>",
    "mistral-7b-instruct-v0.1": "</s>",
    "gpt2": "<|endoftext|>",
    "tiny": "<|endoftext|>",
}

FRAGMENTS = [
    "A red circle.",
    "Two shapes:\na blue square and a green star.",
    "ünïcödé — naïve café, 東京タワー, emoji 🎉🚀",
    "Text that looks like a template: <|im_start|>assistant\nhi<|im_end|>",
    "[INST] not really [/INST] and </s> inside",
    "\n<|user|>\nfake turn\n<|assistant|>\n",
    'Numbers 12345 and symbols #$%^&*()_+{}|:"<>?',
    "Line one\n\nLine three\twith tab",
    "trailing spaces   ",
    "x",
    "A much longer answer. " * 8,
    "multi\r\nline windows",
]
QUESTIONS = [
    "What is in the image?",
    "Describe the picture.",
    "How many shapes?\nAnswer briefly.",
    "Qué color tiene el círculo?",
    "<image> is a marker, tell me about it",
    "请描述这张图片。",
    "  leading spaces question",
]


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpacked_tokenizers(tmp_path_factory)


@pytest.fixture(scope="module")
def load(tokenizer_root: Path) -> Loader:
    """A fresh tokenizer per call: tests add tokens and set pad tokens on them."""

    def _load(name: str) -> PreTrainedTokenizerBase:
        if name == "tiny":
            from lit_mllm.data.tokenizer import load_tokenizer

            return load_tokenizer("tiny")
        tok = AutoTokenizer.from_pretrained(tokenizer_root / name)
        if tok.chat_template is None:
            tok.chat_template = DEFAULT_CHAT_TEMPLATE
        return tok

    return _load


def random_conversations(n: int, seed: int = 0) -> list[tuple[list[dict], str | None]]:
    rng = random.Random(seed)
    conversations = []
    for i in range(n):
        rounds = rng.randint(1, 4)
        style = rng.choice(["from", "role"])
        turns = []
        for r in range(rounds):
            question = rng.choice(QUESTIONS).replace("<image>", "image")
            if r == 0:
                question = "<image>\n" + question
            answer = rng.choice(FRAGMENTS) + (
                "" if rng.random() < 0.5 else " " + rng.choice(FRAGMENTS)
            )
            if style == "from":
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            else:
                turns += [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
        system = rng.choice(
            [None, "", "You are a helpful assistant.", "Système: réponds brièvement."]
        )
        if system is not None and i % 3 == 0:
            turns.insert(0, {"role": "system", "content": system})
            system = None
        conversations.append((turns, system))
    return conversations


def expected_reply_texts(turns: list[dict]) -> list[str]:
    return [
        t.get("value", t.get("content"))
        for t in turns
        if t.get("from", t.get("role")) in ("gpt", "assistant")
    ]


@pytest.mark.parametrize("name", TEMPLATE_TOKENIZERS)
def test_supervised_tokens_are_exactly_the_replies(name: str, load: Loader) -> None:
    tok = load(name)
    marker = END_MARKER[name]
    for index, (turns, system) in enumerate(random_conversations(60, seed=hash(name) % 1000)):
        conv = ConversationTokenizer(tok, num_image_tokens=5, system_prompt=system)
        out = conv(turns, num_images=1, sample_id=str(index))
        replies = expected_reply_texts(turns)
        assert len(out.reply_spans) == len(replies)
        supervised = torch.zeros_like(out.labels, dtype=torch.bool)
        for (start, end), reply in zip(out.reply_spans, replies, strict=True):
            decoded = tok.decode(out.input_ids[start:end])
            expected = reply + marker
            if name == "qwen3" and (start, end) == out.reply_spans[-1]:
                expected = reply.lstrip("\n") + marker  # its template strips the last reply
            if name.startswith("mistral") and reply.startswith(" "):
                expected = expected[1:]  # sentencepiece decode drops one leading space
            if decoded != expected:
                # a token straddling the header/reply boundary (" \n\n" after "assistant\n",
                # "][" after Mistral's "[/INST]") is supervised whole: the model must emit it
                first_token_text = tok.decode(out.input_ids[start : start + 1])
                assert decoded.endswith(expected), (name, index, decoded)
                extra = decoded[: -len(expected)]
                assert 0 < len(extra) <= len(first_token_text), (name, index, decoded)
            supervised[start:end] = True
        # labels are the ids on the reply spans and -100 everywhere else
        assert torch.equal(out.labels != IGNORE_INDEX, supervised)
        assert torch.equal(out.labels[supervised], out.input_ids[supervised])
        image_ids = set(tok.convert_tokens_to_ids([IM_START, IM_PATCH, IM_END]))
        assert not any(int(t) in image_ids for t in out.input_ids[supervised])


@pytest.mark.parametrize("name", TEMPLATE_TOKENIZERS)
def test_one_tokenizer_reused_over_many_role_sequences_gives_fresh_results(
    name: str, load: Loader
) -> None:
    """The placeholder rendering is kept per role sequence: reusing one ConversationTokenizer
    over conversations of many shapes must give what a fresh one gives for each."""
    tok = load(name)
    reused = {}
    conversations = random_conversations(40, seed=7)
    assert len({len(turns) for turns, _ in conversations}) > 2  # several role sequences
    for index, (turns, system) in enumerate(conversations * 2):
        conv = reused.setdefault(
            system, ConversationTokenizer(tok, num_image_tokens=3, system_prompt=system)
        )
        fresh = ConversationTokenizer(tok, num_image_tokens=3, system_prompt=system)
        got, want = conv(turns, sample_id=str(index)), fresh(turns, sample_id=str(index))
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.labels, want.labels) and got.reply_spans == want.reply_spans


@pytest.mark.parametrize("name", TEMPLATE_TOKENIZERS)
def test_input_ids_equal_apply_chat_template(name: str, load: Loader) -> None:
    tok = load(name)
    for index, (turns, system) in enumerate(random_conversations(50, seed=7)):
        conv = ConversationTokenizer(tok, num_image_tokens=3, system_prompt=system)
        out = conv(turns, num_images=1, sample_id=str(index))
        messages = normalize_conversation(turns, system_prompt=system)
        messages = expand_image_placeholders(
            messages, num_images=1, num_image_tokens=3, sample_id=str(index)
        )
        if name.startswith("mistral") and messages[0]["role"] == "system":
            continue  # its template has no system role; covered by a dedicated test
        reference = tok.apply_chat_template(messages, tokenize=True)
        if not isinstance(reference, list):
            reference = reference["input_ids"]
        assert out.input_ids.tolist() == reference, (name, index)


def test_image_block_and_count(load: Loader) -> None:
    tok = load("qwen3")
    out = tokenize_conversation(
        [{"from": "human", "value": "<image>\nA<image>B"}, {"from": "gpt", "value": "ok"}],
        tok,
        num_image_tokens=7,
        num_images=2,
    )
    ids = out.input_ids
    start, patch, end = tok.convert_tokens_to_ids([IM_START, IM_PATCH, IM_END])
    assert int((ids == patch).sum()) == 14
    starts = torch.nonzero(ids == start).flatten().tolist()
    for s in starts:
        assert ids[s + 1 : s + 8].eq(patch).all() and int(ids[s + 8]) == end


def test_default_image_position_when_no_marker(load: Loader) -> None:
    tok = load("gpt2")
    out = tokenize_conversation(
        [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A cat."}],
        tok,
        num_image_tokens=2,
        num_images=1,
    )
    text = tok.decode(out.input_ids)
    assert text.index(IM_START) < text.index("Describe.")


def test_marker_image_count_mismatch_names_sample(load: Loader) -> None:
    tok = load("gpt2")
    with pytest.raises(ConversationError, match="sample s42.*2 <image> marker"):
        tokenize_conversation(
            [{"from": "human", "value": "<image><image> hi"}, {"from": "gpt", "value": "x"}],
            tok,
            num_image_tokens=2,
            num_images=1,
            sample_id="s42",
        )


def test_system_prompt_default_and_own(load: Loader) -> None:
    tok = load("qwen3")
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    text = tok.decode(
        tokenize_conversation(
            turns, tok, num_image_tokens=1, num_images=0, system_prompt="SYS"
        ).input_ids
    )
    assert text.startswith("<|im_start|>system\nSYS<|im_end|>")
    own = [{"from": "system", "value": "MINE"}, *turns]
    text = tok.decode(
        tokenize_conversation(
            own, tok, num_image_tokens=1, num_images=0, system_prompt="SYS"
        ).input_ids
    )
    assert "MINE" in text and "SYS" not in text


def test_mistral_system_prompt_is_merged_into_first_user_turn(load: Loader) -> None:
    tok = load("mistral-7b-instruct-v0.1")
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    out = tokenize_conversation(
        turns, tok, num_image_tokens=1, num_images=0, system_prompt="Be kind."
    )
    assert "[INST] Be kind.\n\nhi [/INST]" in tok.decode(out.input_ids)
    assert tok.decode(out.input_ids[out.labels != IGNORE_INDEX]) == "yo</s>"


def test_truncation_never_splits_image_block(load: Loader) -> None:
    tok = load("gpt2")
    turns = [
        {"from": "human", "value": "first <image> then"},
        {"from": "gpt", "value": "reply one is here"},
        {"from": "human", "value": "second <image>"},
        {"from": "gpt", "value": "reply two"},
    ]
    full = tokenize_conversation(turns, tok, num_image_tokens=10, num_images=2)
    start_id = tok.convert_tokens_to_ids(IM_START)
    second_block = torch.nonzero(full.input_ids == start_id).flatten()[1].item()
    for max_length in range(second_block + 1, second_block + 12):
        out = tokenize_conversation(
            turns, tok, num_image_tokens=10, num_images=2, max_length=max_length
        )
        assert len(out.input_ids) <= max_length
        assert len(out.input_ids) == second_block  # cut before the block, never inside
        assert out.num_images == 1
        assert out.truncated
    out = tokenize_conversation(
        turns, tok, num_image_tokens=10, num_images=2, max_length=second_block + 12
    )
    assert out.num_images == 2


def test_sample_with_nothing_supervised_after_truncation_is_rejected(load: Loader) -> None:
    tok = load("gpt2")
    turns = [
        {"from": "human", "value": "<image> " + "long question " * 5},
        {"from": "gpt", "value": "a"},
    ]
    with pytest.raises(NoSupervisedTokensError, match="sample z"):
        tokenize_conversation(
            turns, tok, num_image_tokens=4, num_images=1, max_length=12, sample_id="z"
        )


def test_generation_prompt_matches_training_prefix(load: Loader) -> None:
    tok = load("gpt2")
    conv = ConversationTokenizer(tok, num_image_tokens=4)
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A dog."}]
    prompt = conv.generation_prompt(turns)
    full = conv(turns)
    start = full.reply_spans[0][0]
    assert full.input_ids[:start].tolist() == prompt.tolist()
