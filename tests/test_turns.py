"""Role names, alternation and the system turn (lit_mllm/data/turns.py), without a tokenizer.

Through a tokenizer (image blocks, markers, system prompts): tests/test_conversation.py.
"""

from __future__ import annotations

import pytest

from lit_mllm.data.turns import ConversationError, normalize_conversation


@pytest.mark.parametrize(
    "turns, match",
    [
        ([{"from": "gpt", "value": "a"}], "turn 0: expected role 'user'"),
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
            "turn 1: expected role 'assistant'",
        ),
        ([{"from": "alien", "value": "a"}], "turn 0: unknown role 'alien'"),
        ([{"from": "human", "value": 3}], "turn 0: content must be a string"),
        (
            [{"from": "system", "value": "s"}, {"from": "gpt", "value": "b"}],
            "turn 1: expected role 'user'",
        ),
    ],
)
def test_bad_conversations_name_sample_and_turn(turns, match) -> None:
    with pytest.raises(ConversationError, match=f"sample id7, {match}"):
        normalize_conversation(turns, sample_id="id7")
