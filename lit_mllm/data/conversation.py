"""Conversation -> token ids + labels, supervising only what the assistant says.

How the mask is found: the chat template renders the conversation once to text, the text is
tokenised once with a fast tokenizer's offset mapping, and each assistant reply is located in
that text by *character* position. Positions come from a second rendering in which every
message's content is replaced by a unique placeholder; when the template copies content
verbatim (the usual case) this gives exact spans without any string search. Templates that
transform content (trim it, split off a ``<think>`` block, ...) fall back to an ordered search.
Token ids of template strings are never searched for: BPE merges differ by context.

A reply is supervised together with the end-of-turn token the template writes after it (the
first special token after the reply: ``<|im_end|>``, ``</s>``, ``<|endoftext|>`` ...).
Roles, alternation and ``<image>`` blocks are checked before rendering, in ``turns.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lit_mllm.data.chat_template import DEFAULT_CHAT_TEMPLATE
from lit_mllm.data.turns import ConversationError, expand_image_placeholders, normalize_conversation
from lit_mllm.tokens import IGNORE_INDEX, add_image_tokens

# stands for message i in the skeleton rendering; private-use characters no real text holds
_PLACEHOLDER = "\ue000{}\ue001"


class NoSupervisedTokensError(ConversationError):
    """Nothing left to supervise (e.g. every reply truncated away): an error, or skipped and
    counted under ``on_bad_sample="skip"`` like any other bad sample."""


@dataclass
class TokenizedConversation:
    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX where not supervised
    num_images: int  # image blocks kept (after truncation)
    truncated: bool = False
    reply_spans: list[tuple[int, int]] = field(default_factory=list)  # token [start, end) per reply

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class ConversationTokenizer:
    """Holds a tokenizer and the fixed settings; ``__call__`` tokenises one conversation."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        num_image_tokens: int,
        max_length: int | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        slices: bool = False,
    ) -> None:
        """``slices``: sliced images are written (``data.image_slicing``), so the slice tokens
        are added to the tokenizer (:func:`lit_mllm.tokens.add_image_tokens`)."""
        if not tokenizer.is_fast:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer; label masking "
                "needs character offsets (install `tokenizers` and load with use_fast=True)"
            )
        self.tokenizer = tokenizer
        self.image_ids = add_image_tokens(tokenizer, slices=slices)
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.chat_template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._special_ids = set(tokenizer.all_special_ids)
        self._skeletons: dict[tuple[str, ...], str] = {}  # role sequence -> placeholder rendering

    # -- rendering -----------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self.chat_template_kwargs,
        )

    def _render_checked(
        self, messages: list[dict[str, str]], sample_id: str, *, add_generation_prompt: bool = False
    ) -> tuple[list[dict[str, str]], str]:
        """Render; a template without a system role (Mistral v0.1) gets the system prompt merged
        into the first user turn. Returns the messages actually rendered and the text."""
        try:
            return messages, self.render(messages, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # jinja raise_exception
            if messages[0]["role"] != "system":
                raise ConversationError(
                    f"sample {sample_id}: chat template failed: {error}", "template_error"
                ) from error
        messages = _merge_system_into_first_user(messages)
        return messages, self.render(messages, add_generation_prompt=add_generation_prompt)

    def _content_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        """Character span of each message's content in ``text`` (the real rendering)."""
        placeholders = [_PLACEHOLDER.format(i) for i in range(len(messages))]
        skeleton = self._skeleton(tuple(m["role"] for m in messages))
        spans: list[tuple[int, int]] = []
        rebuilt: list[str] = []
        cursor = shift = 0
        for message, placeholder in zip(messages, placeholders, strict=True):
            at = skeleton.find(placeholder, cursor)
            if at < 0 or skeleton.count(placeholder) != 1:
                return self._search_spans(messages, text)
            rebuilt.append(skeleton[cursor:at] + message["content"])
            start = at + shift
            spans.append((start, start + len(message["content"])))
            shift += len(message["content"]) - len(placeholder)
            cursor = at + len(placeholder)
        rebuilt.append(skeleton[cursor:])
        if "".join(rebuilt) != text:  # the template transformed some content
            return self._search_spans(messages, text)
        return spans

    def _skeleton(self, roles: tuple[str, ...]) -> str:
        """The rendering with placeholder contents: it depends on the roles alone (template and
        its keyword arguments are fixed), so it is rendered once per role sequence."""
        skeleton = self._skeletons.get(roles)
        if skeleton is None:
            skeleton = self.render(
                [{"role": r, "content": _PLACEHOLDER.format(i)} for i, r in enumerate(roles)]
            )
            self._skeletons[roles] = skeleton
        return skeleton

    @staticmethod
    def _search_spans(messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        cursor = 0
        for index, message in enumerate(messages):
            at = -1
            for content in _rendering_variants(message["content"]):
                at = text.find(content, cursor)
                if at >= 0:
                    break
            if at < 0 or not content:
                if message["role"] == "assistant" and content.strip():
                    raise ConversationError(
                        f"turn {index}: the chat template changed the assistant reply so that it "
                        "cannot be located in the rendered text",
                        "template_error",
                    )
                spans.append((cursor, cursor))
                continue
            spans.append((at, at + len(content)))
            cursor = at + len(content)
        return spans

    # -- tokenisation --------------------------------------------------------------------------
    def _messages(
        self,
        conversation: Sequence[Mapping[str, Any]],
        num_images: int,
        sample_id: str,
        drop_last_reply: bool = False,
        image_blocks: Sequence[str] | None = None,
    ) -> list[dict[str, str]]:
        """Normalised, checked messages with the image blocks expanded (``image_blocks``: each
        image's own text, for sliced images; else every image is ``num_image_tokens`` slots)."""
        messages = normalize_conversation(
            conversation, sample_id=sample_id, system_prompt=self.system_prompt
        )
        if drop_last_reply and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return expand_image_placeholders(
            messages,
            num_images=num_images,
            num_image_tokens=self.num_image_tokens,
            sample_id=sample_id,
            blocks=image_blocks,
        )

    def _encode(
        self,
        conversation: Sequence[Mapping[str, Any]],
        num_images: int,
        sample_id: str,
        image_blocks: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Untruncated ids, labels and the token span of each supervised reply."""
        messages = self._messages(conversation, num_images, sample_id, image_blocks=image_blocks)
        messages, text = self._render_checked(messages, sample_id)
        spans = self._content_spans(messages, text)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
        offsets = encoding["offset_mapping"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        starts = torch.tensor([s for s, _ in offsets], dtype=torch.long)
        ends = torch.tensor([e for _, e in offsets], dtype=torch.long)

        reply_spans: list[tuple[int, int]] = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            char_start, char_end = spans[index]
            next_start = spans[index + 1][0] if index + 1 < len(spans) else len(text)
            # tokens overlapping the reply; one that straddles its start (a reply opening with
            # whitespace merged into the header's newline) must be emitted, so it is supervised
            inside = (ends > char_start) & (starts < char_end) & (ends > starts)
            token_ids = torch.nonzero(inside).flatten()
            first = (
                int(token_ids[0]) if len(token_ids) else int(torch.searchsorted(starts, char_end))
            )
            last = int(token_ids[-1]) + 1 if len(token_ids) else first
            # the end-of-turn marker: first special token between the reply and the next turn
            cursor = last
            while cursor < len(input_ids) and starts[cursor] < next_start:
                if int(input_ids[cursor]) in self._special_ids:
                    last = cursor + 1
                    break
                cursor += 1
            labels[first:last] = input_ids[first:last]
            reply_spans.append((first, last))
        return input_ids, labels, reply_spans

    def min_length(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        num_images: int = 1,
        image_blocks: Sequence[str] | None = None,
    ) -> int:
        """Tokens a ``max_length`` must allow for this conversation to keep one supervised token:
        everything before its first reply (system prompt, template, image blocks, question) + 1.
        """
        if image_blocks is not None:
            num_images = len(image_blocks)
        _, labels, _ = self._encode(conversation, num_images, "min_length probe", image_blocks)
        supervised = torch.nonzero(labels != IGNORE_INDEX).flatten()
        if len(supervised) == 0:
            raise ConversationError("min_length probe: the conversation has no reply")
        return int(supervised[0]) + 1

    def __call__(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        num_images: int = 1,
        sample_id: str = "?",
        image_blocks: Sequence[str] | None = None,
    ) -> TokenizedConversation:
        """``image_blocks``: the text of each image (:func:`lit_mllm.data.turns.image_group`)
        when images differ in size; ``num_images`` is then their number."""
        if image_blocks is not None:
            num_images = len(image_blocks)
        input_ids, labels, reply_spans = self._encode(
            conversation, num_images, sample_id, image_blocks
        )
        full_length = len(input_ids)
        supervised = torch.nonzero(labels != IGNORE_INDEX).flatten()
        truncated = False
        num_kept_images = num_images
        if self.max_length is not None and len(input_ids) > self.max_length:
            cut = self._safe_cut(input_ids, self.max_length)
            num_kept_images = int((input_ids[:cut] == self.image_ids.start).sum())
            input_ids, labels = input_ids[:cut], labels[:cut]
            reply_spans = [(s, min(e, cut)) for s, e in reply_spans if s < cut]
            truncated = True
        result = TokenizedConversation(input_ids, labels, num_kept_images, truncated, reply_spans)
        if result.num_supervised == 0:
            if not len(supervised):
                detail = "no assistant reply to supervise"
            else:
                detail = (
                    f"every supervised token lies beyond max_length {self.max_length}: the sample "
                    f"is {full_length} tokens and its first reply starts at token "
                    f"{int(supervised[0])}, so max_length must be at least "
                    f"{int(supervised[0]) + 1} to keep any of it (image blocks are never cut: "
                    "one that does not fit is left out whole)"
                )
            raise NoSupervisedTokensError(
                f"sample {sample_id}: no supervised token: {detail}", "no_supervised_tokens"
            )
        return result

    def _safe_cut(self, input_ids: torch.Tensor, max_length: int) -> int:
        """Largest cut <= max_length that keeps every image group whole.

        A group runs from an image's ``<im_start>`` to the last ``<im_end>``/``<slice_end>``
        before the next image: a thumbnail and its slices are kept or left out together.
        """
        starts = torch.nonzero(input_ids == self.image_ids.start).flatten().tolist()
        closes = torch.isin(input_ids, torch.tensor(self.image_ids.group_ends))
        for index, start in enumerate(starts):
            if start >= max_length:
                break
            stop = starts[index + 1] if index + 1 < len(starts) else len(input_ids)
            group_closes = torch.nonzero(closes[start:stop]).flatten()
            last = start + int(group_closes[-1]) if len(group_closes) else stop - 1
            if max_length <= last:  # the cut falls inside this group
                return start
        return max_length

    def generation_prompt(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        num_images: int = 1,
        sample_id: str = "?",
        image_blocks: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Token ids of the conversation so far + the assistant header, for ``generate``.

        A trailing assistant turn (e.g. the reference caption) is dropped.
        """
        if image_blocks is not None:
            num_images = len(image_blocks)
        messages = self._messages(
            conversation, num_images, sample_id, drop_last_reply=True, image_blocks=image_blocks
        )
        _, text = self._render_checked(messages, sample_id, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)


def _rendering_variants(content: str) -> list[str]:
    """What templates commonly make of a content string: as is, newlines stripped, trimmed."""
    variants = [content, content.lstrip("\n"), content.strip("\n"), content.strip()]
    if "</think>" in content:  # Qwen3 renders reasoning separately (or drops it)
        variants.append(content.split("</think>")[-1].lstrip("\n"))
    return [v for i, v in enumerate(variants) if v and v not in variants[:i]]


def _merge_system_into_first_user(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """For templates without a system role (Mistral v0.1): prepend it to the first user turn."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if system:
        rest[0]["content"] = system + "\n\n" + rest[0]["content"]
    return rest


def tokenize_conversation(
    conversation: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_image_tokens: int,
    max_length: int | None = None,
    system_prompt: str | None = None,
    num_images: int = 1,
    sample_id: str = "?",
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> TokenizedConversation:
    """Tokenise one conversation with labels on assistant replies only (see module docstring)."""
    return ConversationTokenizer(
        tokenizer,
        num_image_tokens=num_image_tokens,
        max_length=max_length,
        system_prompt=system_prompt,
        chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs,
    )(conversation, num_images=num_images, sample_id=sample_id)
