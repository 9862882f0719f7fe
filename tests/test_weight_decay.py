"""AdamW groups: every trainable parameter lands in the group an independent rule predicts.

The module chooses by parameter kind (module type, parameter role); the rule here reads the
names of these particular models, listing for each what must not be decayed."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from micro import MICRO_DECODER, MICRO_MODEL

from lit_mllm.module import MLLMModule

NEOX = {
    "config": {
        "model_type": "gpt_neox",  # attention.query_key_value: a weight matrix named "query"
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,  # embed_out: an untied output embedding
    }
}
# no decay: norm weights, biases, token and output embeddings, the resampler's queries
EXEMPT = re.compile(
    r"(\.bias$|_bias$"
    r"|(norm|layernorm|ln_q|ln_kv|ln_post)\.weight$"
    r"|embed_tokens\.weight$|embed_in\.weight$|embed_out\.weight$|lm_head\.weight$"
    r"|connector\.query$)"
)
WEIGHT_DECAY = 0.05


def _decay_by_name(module: MLLMModule) -> dict[str, float]:
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, precision_plugin=None)
    optimizer = module.configure_optimizers()["optimizer"]
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "overrides",
    [
        {"preset": "tiny"},  # the embedded default: 4-layer Qwen2 with tied embeddings
        {"preset": "micro"},  # resampler (learned queries), 2-layer Qwen2
        {**MICRO_MODEL, "decoder": NEOX, "connector": {"kind": "mlp"}},
        {**MICRO_MODEL, "decoder": {**MICRO_DECODER, "train": "lora"}},
    ],
    ids=["tiny", "micro-resampler", "neox-mlp", "lora"],
)
def test_every_parameter_is_in_the_group_its_kind_predicts(overrides: dict) -> None:
    torch.manual_seed(0)
    module = MLLMModule(**overrides, optim={"weight_decay": WEIGHT_DECAY})
    decay = _decay_by_name(module)
    expected = {n: 0.0 if EXEMPT.search(n) else WEIGHT_DECAY for n in decay}
    assert decay == expected
    assert 0 < sum(v == 0.0 for v in decay.values()) < len(decay)  # both groups in use
