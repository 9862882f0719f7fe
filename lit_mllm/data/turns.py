"""Raw conversation turns -> checked chat messages, with the image blocks written in.

Why apart from tokenisation: these are the rules of the data (role names, user/assistant
alternation, where ``<image>`` may stand and how many) and hold whatever tokenizer and chat
template render the messages afterwards (``conversation.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lit_mllm.tokens import IM_END, IM_PATCH, IM_START, IMAGE_PLACEHOLDER, SLICE_END, SLICE_START

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "system": "system",
}


class ConversationError(ValueError):
    """A conversation that cannot be trained on; the message names the sample and the turn.

    ``reason`` is a short key (``unknown_role``, ``non_alternating`` ...) used in skip counts.
    """

    def __init__(self, message: str, reason: str = "bad_conversation") -> None:
        super().__init__(message)
        self.reason = reason


def normalize_conversation(
    conversation: Sequence[Mapping[str, Any]],
    *,
    sample_id: str = "?",
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """Accept ``{"from","value"}`` or ``{"role","content"}`` turns; check roles and alternation."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, str):
        raise ConversationError(
            f"sample {sample_id}: conversation must be a list of turns", "bad_type"
        )
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, Mapping):
            raise ConversationError(
                f"sample {sample_id}, turn {index}: a turn must be an object", "bad_type"
            )
        raw_role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ConversationError(
                f"sample {sample_id}, turn {index}: unknown role {raw_role!r} "
                f"(expected one of {sorted(ROLE_ALIASES)})",
                "unknown_role",
            )
        if not isinstance(content, str):
            raise ConversationError(
                f"sample {sample_id}, turn {index}: content must be a string, "
                f"got {type(content).__name__}",
                "bad_type",
            )
        if role == "assistant" and not content.strip():
            raise ConversationError(
                f"sample {sample_id}, turn {index}: empty assistant reply", "empty_reply"
            )
        messages.append({"role": role, "content": content})

    body_start = 1 if messages and messages[0]["role"] == "system" else 0
    for index in range(body_start, len(messages)):
        expected = "user" if (index - body_start) % 2 == 0 else "assistant"
        if messages[index]["role"] != expected:
            raise ConversationError(
                f"sample {sample_id}, turn {index}: expected role {expected!r}, got "
                f"{messages[index]['role']!r} (turns must alternate user/assistant after an "
                "optional system turn)",
                "non_alternating",
            )
    if len(messages) == body_start:
        raise ConversationError(
            f"sample {sample_id}: conversation has no user turn", "non_alternating"
        )
    if body_start == 0 and system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def image_block(num_image_tokens: int) -> str:
    """One image as text: its start token, ``num_image_tokens`` patch slots, its end token."""
    return IM_START + IM_PATCH * num_image_tokens + IM_END


def image_group(view_tokens: Sequence[int], grid: tuple[int, int] | None) -> str:
    """One sliced image as text (MiniCPM-V 2.5's layout): the thumbnail as an image block, then
    each slice as ``<slice_start>`` + patch slots + ``<slice_end>``, a newline after each row.

    ``view_tokens``: tokens of each view, thumbnail first, slices row-major; ``grid``: the
    slices' (columns, rows), or None for an image that was not sliced.
    """
    text = image_block(view_tokens[0])
    if grid is None:
        return text
    columns, rows = grid
    if len(view_tokens) != 1 + columns * rows:
        raise ValueError(f"{len(view_tokens)} views for a thumbnail + {columns}x{rows} slices")
    for row in range(rows):
        for column in range(columns):
            text += SLICE_START + IM_PATCH * view_tokens[1 + row * columns + column] + SLICE_END
        text += "\n"
    return text


def expand_image_placeholders(
    messages: list[dict[str, str]],
    *,
    num_images: int,
    num_image_tokens: int,
    sample_id: str,
    blocks: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """Replace each ``<image>`` with its token block; add one before the first user text if none.

    ``blocks``: the text of each image in order (sliced images differ in size); without it every
    image is one block of ``num_image_tokens`` patch slots.
    """
    if blocks is not None and len(blocks) != num_images:
        raise ValueError(f"{len(blocks)} image blocks for {num_images} images")
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    for index, message in enumerate(messages):
        if message["role"] != "user" and IMAGE_PLACEHOLDER in message["content"]:
            raise ConversationError(
                f"sample {sample_id}, turn {index}: {IMAGE_PLACEHOLDER} is only allowed in user turns",
                "image_count_mismatch",
            )
    if count == 0 and num_images > 0:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [dict(m) for m in messages]
        messages[first_user]["content"] = IMAGE_PLACEHOLDER + "\n" + messages[first_user]["content"]
        count = num_images
    if count != num_images:
        raise ConversationError(
            f"sample {sample_id}: {count} {IMAGE_PLACEHOLDER} marker(s) but {num_images} image(s)",
            "image_count_mismatch",
        )
    texts = iter(blocks if blocks is not None else [image_block(num_image_tokens)] * num_images)
    expanded = []
    for message in messages:
        parts = message["content"].split(IMAGE_PLACEHOLDER)
        content = parts[0] + "".join(next(texts) + part for part in parts[1:])
        expanded.append({"role": message["role"], "content": content})
    return expanded
