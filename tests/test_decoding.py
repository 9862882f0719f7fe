"""Caption decoding owns its setup: no settings leak from a pretrained decoder's
generation_config.json, and every end-of-turn token of the tokenizer, the chat template and the
decoder stops a caption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from micro import MICRO_DECODER_CONFIG
from test_model import _prompt_items, micro_module
from transformers import AutoConfig, AutoModelForCausalLM

from lit_mllm.data.collate import MLLMCollator
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.module import MLLMModule
from lit_mllm.tokens import add_image_tokens

NEW_TOKENS = 10


def _save_decoder(folder: Path, vocab_size: int) -> None:
    """A micro decoder with a wide init (its greedy captions vary), saved like a hub model."""
    torch.manual_seed(3)
    settings = {k: v for k, v in MICRO_DECODER_CONFIG.items() if k != "model_type"}
    config = AutoConfig.for_model("qwen2", **settings, initializer_range=0.1, vocab_size=vocab_size)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def _captions(module: MLLMModule) -> list[str]:
    module.eval()
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    with torch.no_grad():
        return module.caption(batch)


def test_hub_generation_config_does_not_change_greedy_captions(tmp_path: Path) -> None:
    tokenizer = load_tokenizer("tiny")
    add_image_tokens(tokenizer)
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    _save_decoder(plain, len(tokenizer))
    shutil.copytree(plain, tuned)
    settings = json.loads((tuned / "generation_config.json").read_text())
    settings.update(repetition_penalty=1.5, do_sample=True, temperature=0.7, top_k=5)
    (tuned / "generation_config.json").write_text(json.dumps(settings))

    decoding = {"max_new_tokens": NEW_TOKENS}
    captions = {}
    for name, folder in (("plain", plain), ("tuned", tuned)):
        module = micro_module(
            decoder={"name_or_path": str(folder), "config": None}, generation=decoding
        )
        captions[name] = _captions(module)
    assert captions["tuned"] == captions["plain"]
    assert all(captions["plain"])

    # control: the hub setting does change this model's captions when it is applied
    module.generation_cfg.max_new_tokens = NEW_TOKENS
    penalised = module.hf_generation_config()
    penalised.repetition_penalty = 1.5
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    with torch.no_grad():
        ids = module.model.generate(
            batch["pixel_values"],
            batch["prompt_ids"],
            batch["prompt_attention_mask"],
            generation_config=penalised,
        )
    texts = [t.strip() for t in module.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert texts != captions["plain"]


def _tokenizer_with_end_of_turn(folder: Path) -> int:
    """The tiny tokenizer with a chat template that ends assistant turns with ``<|end|>``, a
    special token other than the eos ``<|endoftext|>``; returns the new token's id."""
    tokenizer = load_tokenizer("tiny")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tokenizer.chat_template = (
        "{%- for message in messages -%}{{- '\\n<|' + message['role'] + '|>\\n' + "
        "message['content'] -}}{%- if message['role'] == 'assistant' -%}{{- '<|end|>' -}}"
        "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}"
        "{{- '\\n<|assistant|>\\n' -}}{%- endif -%}"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer.convert_tokens_to_ids("<|end|>")


def test_a_template_with_two_end_of_turn_ids_stops_on_either(tmp_path: Path) -> None:
    end = _tokenizer_with_end_of_turn(tmp_path / "tokenizer")
    module = micro_module(tokenizer=str(tmp_path / "tokenizer"))
    eos = module.tokenizer.eos_token_id
    assert end != eos
    module.eval()
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    embedding = module.model.decoder.get_input_embeddings().weight  # tied with the LM head
    decoded: list[torch.Tensor] = []
    real_decode = module.tokenizer.batch_decode

    def recording_decode(ids, **kwargs):
        decoded.append(ids)
        return real_decode(ids, **kwargs)

    module.tokenizer.batch_decode = recording_decode
    with torch.no_grad():
        module.caption(batch)
        favourite = int(torch.mode(decoded[-1].flatten()).values)  # the token it repeats
        assert favourite not in (eos, end)
        for stop in (end, eos):
            # the stop token's output row becomes twice the favourite's: greedy emits it first
            # (tied embeddings: its input row changes too, but it is in no prompt; eos is the
            # pad token, which the attention mask hides)
            saved = embedding[stop].clone()
            embedding[stop] = 2 * embedding[favourite]
            module.caption(batch)
            embedding[stop] = saved
            generated = decoded[-1]
            assert generated[:, 0].tolist() == [stop] * len(generated), (stop, generated)
            assert generated.shape[1] == 1, (stop, generated)  # stopped at once
    assert module.end_token_ids == [eos, end]
    assert module.hf_generation_config().eos_token_id == [eos, end]


def test_static_cache_captions_are_the_dynamic_caches_tokens(tmp_path: Path) -> None:
    """``model.generation.cache: static`` (CUDA: a compiled, CUDA-graphed decoding step) must
    decode the same tokens as the dynamic cache; float32 on the CPU, where it runs eager."""
    tokenizer = load_tokenizer("tiny")
    add_image_tokens(tokenizer)
    _save_decoder(tmp_path / "dec", len(tokenizer))
    decoder = {"name_or_path": str(tmp_path / "dec"), "config": None}
    captions, tokens = {}, {}
    for cache in ("dynamic", "static"):
        module = micro_module(
            decoder=decoder, generation={"max_new_tokens": NEW_TOKENS, "cache": cache}
        )
        module.eval()
        batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
        with torch.no_grad():
            tokens[cache] = module.model.generate(
                batch["pixel_values"],
                batch["prompt_ids"],
                batch["prompt_attention_mask"],
                generation_config=module.hf_generation_config(),
            )
            captions[cache] = module.caption(batch)
    assert module.hf_generation_config().cache_implementation == "static"
    assert torch.equal(tokens["static"], tokens["dynamic"])
    assert captions["static"] == captions["dynamic"] and len(set(captions["dynamic"])) > 1
