"""The multimodal model and the LightningModule on a micro configuration (CPU, seconds)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from micro import MICRO_DECODER, MICRO_ENCODER, MICRO_MODEL

from lit_mllm.data.collate import MLLMCollator
from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.models.mllm import ImageTokenMismatchError
from lit_mllm.module import MLLMModule
from lit_mllm.tokens import IGNORE_INDEX


def micro_module(**overrides) -> MLLMModule:
    torch.manual_seed(0)
    kwargs = {
        "tokenizer": "tiny",
        "encoder": MICRO_ENCODER,
        "connector": {"kind": "resampler", "num_queries": 4},
        "decoder": MICRO_DECODER,
    }
    kwargs.update(overrides)
    return MLLMModule(**kwargs)


CONVERSATIONS = [
    [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": "a red circle on the left"},
    ],
    [
        {"from": "human", "value": "<image>\nHow many shapes?"},
        {"from": "gpt", "value": "two"},
        {"from": "human", "value": "Which colour is the star?"},
        {"from": "gpt", "value": "the star is blue"},
    ],
    [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "a small green square at the top"},
    ],
]


def make_batch(
    module: MLLMModule, packing: bool = False, with_prompts: bool = False, layout: bool = False
) -> dict:
    """The three conversations collated; ``layout``: with the collator's ``TokenLayout``."""
    conv = ConversationTokenizer(module.tokenizer, num_image_tokens=module.num_image_tokens)
    items = []
    torch.manual_seed(1)
    for i, turns in enumerate(CONVERSATIONS):
        tokenized = conv(turns, sample_id=str(i))
        item = {
            "input_ids": tokenized.input_ids,
            "labels": tokenized.labels,
            "pixel_values": torch.randn(1, 3, 32, 32),
            "sample_id": str(i),
            "image_id": i,
            "references": [turns[1]["value"]],
        }
        if with_prompts:
            item["prompt_ids"] = conv.generation_prompt(turns[:1])
        items.append(item)
    patch = module.model.image_token_ids.patch if layout else None
    return MLLMCollator(module.tokenizer.pad_token_id, packing=packing, image_patch_id=patch)(items)


def test_features_are_spliced_exactly_at_image_positions() -> None:
    module = micro_module().eval()
    batch = make_batch(module)
    seen = {}

    def hook(_module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = module.model.decoder.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    module(batch)
    handle.remove()
    features = module.model.encode_images(batch["pixel_values"])
    token_embeds = module.model.decoder.get_input_embeddings()(batch["input_ids"])
    is_patch = batch["input_ids"] == module.model.image_token_ids.patch
    assert int(is_patch.sum()) == features.numel() // features.shape[-1]
    torch.testing.assert_close(seen["embeds"][is_patch], features.reshape(-1, features.shape[-1]))
    torch.testing.assert_close(seen["embeds"][~is_patch], token_embeds[~is_patch])


def test_loss_equals_manual_cross_entropy() -> None:
    module = micro_module().eval()
    batch = make_batch(module)
    loss, count = module(batch)
    embeds = module.model.embed(batch["input_ids"], batch["pixel_values"])
    logits = module.model.decoder(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"]
    ).logits
    manual = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-5)
    assert int(count) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_packed_batch_gives_the_same_loss_as_padded() -> None:
    module = micro_module().eval()
    padded, _ = module(make_batch(module, packing=False))
    packed, _ = module(make_batch(module, packing=True))
    torch.testing.assert_close(padded, packed, rtol=1e-5, atol=1e-5)


def test_image_token_count_mismatch_names_samples() -> None:
    module = micro_module()
    batch = make_batch(module)
    batch["pixel_values"] = batch["pixel_values"][:2]
    with pytest.raises(ImageTokenMismatchError, match="samples"):
        module(batch)


def test_zero_supervised_tokens_give_zero_loss_not_nan() -> None:
    module = micro_module()
    batch = make_batch(module)
    batch["labels"][:] = IGNORE_INDEX
    loss, count = module(batch)
    assert int(count) == 0 and float(loss) == 0.0
    loss.backward()  # graph still valid


def test_only_trainable_parameters_change_and_encoder_stays_frozen() -> None:
    module = micro_module(decoder={**MICRO_DECODER, "train": "frozen"})
    module.train()
    assert not module.model.encoder.training
    before = copy.deepcopy(module.state_dict())
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = module(make_batch(module))
    loss.backward()
    optimizer.step()
    after = module.state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.connector.") for n in trainable)
    for name, value in after.items():
        if name in trainable:
            continue
        assert torch.equal(before[name], value), name
    assert any(not torch.equal(before[n], after[n]) for n in trainable)


def test_generation_with_cache_equals_argmax_loop_without_cache() -> None:
    module = micro_module().eval()
    batch = make_batch(module, with_prompts=True)
    generated = module.model.generate(
        batch["pixel_values"],
        batch["prompt_ids"],
        batch["prompt_attention_mask"],
        max_new_tokens=6,
        eos_token_id=None,
        pad_token_id=module.tokenizer.pad_token_id,
        min_new_tokens=6,
    )
    embeds = module.model.embed(batch["prompt_ids"], batch["pixel_values"])
    mask = batch["prompt_attention_mask"]
    tokens = []
    for _ in range(6):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = module.model.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).logits[:, -1]
        next_token = logits.argmax(-1)
        tokens.append(next_token)
        next_embed = module.model.decoder.get_input_embeddings()(next_token)[:, None]
        embeds = torch.cat([embeds, next_embed], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, torch.stack(tokens, dim=1))


def test_checkpoint_holds_no_frozen_pretrained_weights_and_round_trips(tmp_path) -> None:
    import lightning as L

    module = micro_module()
    # pretend the encoder came from a weight file: then it must not be saved
    module.hparams["encoder"]["checkpoint_path"] = "weights.safetensors"
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("model.encoder.") for k in state)
    assert any(k.startswith("model.connector.") for k in state)
    assert any(k.startswith("model.decoder.") for k in state)

    module.hparams["encoder"]["checkpoint_path"] = None  # random encoder: must be saved
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    restored = MLLMModule.load_from_checkpoint(tmp_path / "b.ckpt", weights_only=True)
    for name, value in module.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name


class _PoisonedGrads(MLLMModule):
    """Makes gradients non-finite on chosen steps."""

    poison_steps: set[int] = set()

    def on_after_backward(self) -> None:
        if self.global_step in self.poison_steps:
            next(p for p in self.parameters() if p.requires_grad).grad.fill_(float("nan"))


def _fit(module: MLLMModule, steps: int, accelerator: str = "cpu", precision: str = "32") -> None:
    import lightning as L

    batches = [make_batch(module) for _ in range(steps)]
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        precision=precision,
        limit_val_batches=0,  # no validation, so no caption-metric check (no pycocoevalcap)
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def test_non_finite_gradients_skip_the_step_and_leave_weights_untouched() -> None:
    torch.manual_seed(0)
    module = _PoisonedGrads(**MICRO_MODEL)
    module.poison_steps = {0, 1, 2}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _fit(module, 3)
    assert module.skipped_steps == 3
    for name, param in module.named_parameters():
        assert torch.equal(before[name], param.detach()), name


def test_too_many_consecutive_skips_stop_with_a_clear_error() -> None:
    torch.manual_seed(0)
    module = _PoisonedGrads(**MICRO_MODEL, max_consecutive_skips=2)
    module.poison_steps = {0, 1, 2, 3}
    with pytest.raises(RuntimeError, match="2 consecutive optimiser steps skipped"):
        _fit(module, 4)


def test_thirty_step_fit_reduces_loss() -> None:
    module = micro_module(optim={"lr": 3e-3, "warmup_steps": 3})
    batch = make_batch(module)
    module.eval()
    with torch.no_grad():
        first = float(module(batch)[0])
    _fit(module, 30)
    module.eval()
    with torch.no_grad():
        last = float(module(batch)[0])
    assert last < 0.5 * first, (first, last)


def test_validation_encodes_each_batch_of_images_once() -> None:
    module = micro_module().eval()
    batch = make_batch(module, with_prompts=True)
    calls = []
    handle = module.model.encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        module._evaluate(batch, 0, "test")
    handle.remove()
    assert len(calls) == 1
    features = module.model.image_features(batch["pixel_values"])
    assert module.caption(batch, limit=2) == module.caption(batch, 2, image_features=features)


def test_regional_compile_is_off_on_cpu_by_default_and_generation_stays_eager() -> None:
    """`compile_blocks: auto` leaves CPU runs eager; when on, every decoder layer and encoder
    block is compiled once, and captioning (KV-cache decoding, a new length at every token)
    runs them eager: same captions as a never-compiled model, without compiling."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    module = micro_module()
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy())
    module.on_train_start()
    assert not module.model.blocks_compiled
    batch = make_batch(module, with_prompts=True)
    module.eval()
    eager_captions = module.caption(batch)

    compiled = micro_module(compile_blocks="on")
    compiled._trainer = SimpleNamespace(strategy=SingleDeviceStrategy())
    compiled.on_train_start()
    layers = list(compiled.model.decoder.get_decoder().layers)
    layers += list(compiled.model.encoder.model.blocks)
    assert compiled.model.blocks_compiled
    assert all(m._compiled_call_impl is not None for m in layers)  # nn.Module.compile's own
    compiled.eval()
    start = time.perf_counter()
    assert compiled.caption(batch) == eager_captions
    assert time.perf_counter() - start < 5  # a compilation would take far longer on a CPU


# -- batched generation: padding masks for every attention implementation -------------------------
UNEQUAL_PROMPTS = [
    "Describe the image.",
    "What colour is the large shape in the upper left corner of this picture, and how many "
    "other shapes are next to it?",
    "Count.",
]
NEW_TOKENS = 12


def _prompt_items(module: MLLMModule) -> list[dict]:
    """Prompts of very unequal length (left padding of up to 25 tokens in a batch)."""
    conv = ConversationTokenizer(module.tokenizer, num_image_tokens=module.num_image_tokens)
    torch.manual_seed(1)
    items = []
    for i, prompt in enumerate(UNEQUAL_PROMPTS):
        turns = [{"from": "human", "value": "<image>\n" + prompt}]
        items.append(
            {
                "input_ids": torch.tensor([1]),
                "labels": torch.tensor([1]),
                "pixel_values": torch.randn(1, 3, 32, 32),
                "sample_id": str(i),
                "image_id": i,
                "references": [],
                "prompt_ids": conv.generation_prompt(turns),
            }
        )
    return items


def _greedy(module: MLLMModule, items: list[dict]) -> list[list[int]]:
    batch = MLLMCollator(module.tokenizer.pad_token_id)(items)
    device = next(module.parameters()).device
    generated = module.model.generate(
        batch["pixel_values"].to(device),
        batch["prompt_ids"].to(device),
        batch["prompt_attention_mask"].to(device),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=module.tokenizer.pad_token_id,
    )
    return generated.tolist()


def _varied_micro_module(attn_implementation: str) -> MLLMModule:
    """A random decoder with a wide init, so greedy tokens depend on the context: with the
    default init the micro decoder repeats one token whatever it attends to."""
    config = {**MICRO_DECODER["config"], "initializer_range": 0.2}
    decoder = {**MICRO_DECODER, "config": config, "attn_implementation": attn_implementation}
    return micro_module(decoder=decoder).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "lit_varlen"])
def test_left_padded_batch_decodes_like_one_prompt_at_a_time(attn_implementation: str) -> None:
    module = _varied_micro_module(attn_implementation)
    items = _prompt_items(module)
    batch = MLLMCollator(module.tokenizer.pad_token_id)(items)
    lengths = batch["prompt_attention_mask"].sum(1).tolist()
    assert max(lengths) - min(lengths) >= 20  # real left padding in the batch
    with torch.no_grad():
        one_by_one = [_greedy(module, [item])[0] for item in items]
        batched = _greedy(module, items)
    assert len({tuple(t) for t in one_by_one}) == len(items)  # the prompts steer the output
    assert batched == one_by_one


def test_packed_rows_take_the_varlen_path_and_match_padded_sdpa(monkeypatch) -> None:
    """The lit_varlen mask function returns no mask for a packed row, so every layer runs the
    per-segment kernel (CPU: reference_varlen) and the loss equals padded SDPA's."""
    from lit_mllm.models import attention

    calls = []
    real = attention.reference_varlen

    def counting(*args, **kwargs):
        calls.append(args[3].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "reference_varlen", counting)
    varlen = micro_module(decoder={**MICRO_DECODER, "attn_implementation": "lit_varlen"}).eval()
    sdpa = micro_module().eval()
    packed_batch = make_batch(varlen, packing=True)
    with torch.no_grad():
        packed, _ = varlen(packed_batch)
        padded, _ = sdpa(make_batch(sdpa, packing=False))
    layers = MICRO_DECODER["config"]["num_hidden_layers"]
    assert calls == [packed_batch["cu_seqlens"].tolist()] * layers
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_varlen_batched_decoding_matches_one_by_one(monkeypatch) -> None:
    """bf16 on CUDA: one prompt at a time, prefill runs PyTorch's flash varlen kernel; in a
    left-padded batch it runs SDPA with the padding mask. The kernels round differently, so
    tokens may only differ where the fp32 model's two candidates are within bf16 noise: at
    each row's first differing token the fp32 logits of both candidates must be that close."""
    from lit_mllm.models import attention

    flash_calls = []
    real = attention.flash_varlen

    def counting(*args, **kwargs):
        flash_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_varlen", counting)
    module = _varied_micro_module("lit_varlen").cuda()
    items = _prompt_items(module)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        one_by_one = [_greedy(module, [item])[0] for item in items]
        assert flash_calls, "one unpadded prompt must prefill through the flash varlen kernel"
        batched = _greedy(module, items)
    agree = sum(
        a == b for s, t in zip(one_by_one, batched, strict=True) for a, b in zip(s, t, strict=True)
    )
    print(f"bf16 lit_varlen batched vs one-by-one: {agree}/{len(items) * NEW_TOKENS} tokens")
    for item, single, together in zip(items, one_by_one, batched, strict=True):
        if single == together:
            continue
        first = next(i for i, (a, b) in enumerate(zip(single, together, strict=True)) if a != b)
        prompt = item["prompt_ids"].cuda()
        ids = torch.cat([prompt, torch.tensor(single[:first], device="cuda")]).unsqueeze(0)
        with torch.no_grad():
            embeds = module.model.embed(ids, item["pixel_values"].cuda())
            logits = module.model.decoder(inputs_embeds=embeds).logits[0, -1].float()
        gap = float(logits[single[first]] - logits[together[first]]).__abs__()
        assert gap < 0.25, (first, gap, single, together)
