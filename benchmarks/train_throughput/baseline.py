"""The naive baseline row: transformers' LLaVA trained the way a plain transformers user would."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.train_throughput.sizes import Sizes
from benchmarks.train_throughput.stream import Sample, batch_stats, render
from benchmarks.train_throughput.trainee import Trainee, autocast
from lit_mllm.data.collate import pad
from lit_mllm.flops import FlopsSpec


def _numel(params: Any) -> int:
    """Parameter count, as the FLOPs formula reads it."""
    return sum(p.numel() for p in params)


class BaselineTrainee(Trainee):
    """transformers LLaVA as a plain user trains it: fp32 weights, bf16 autocast, padding."""

    row = "baseline"
    connector = "mlp"

    def __init__(
        self, sizes: Sizes, decoder: str, device: torch.device, attn_implementation: str = "sdpa"
    ) -> None:
        super().__init__(sizes, decoder, device)
        from transformers import (
            AutoModelForImageTextToText,
            CLIPVisionConfig,
            LlavaConfig,
            Qwen2Config,
        )

        text = {k: v for k, v in sizes.decoders[decoder].items() if k != "model_type"}
        self.vocab_size = int(text["vocab_size"])
        self.image_token_id = self.vocab_size - 1
        self.pad_token_id = 0
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(**sizes.clip),
            text_config=Qwen2Config(**text),
            image_token_id=self.image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=sizes.patches,
            tie_word_embeddings=True,
        )
        with torch.device(device):
            self.model = AutoModelForImageTextToText.from_config(
                config, attn_implementation=attn_implementation
            )
        for name, param in self.model.named_parameters():
            if "vision_tower" in name:
                param.requires_grad_(False)
        self.model.train()
        self.optimizer = self.make_optimizer(
            [p for p in self.model.parameters() if p.requires_grad]
        )
        self.image_tokens = sizes.patches
        self.image_block = torch.full((sizes.patches,), self.image_token_id, dtype=torch.long)
        self.spec = self._flops_spec()

    def make_optimizer(self, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable, lr=1e-5)  # torch default: foreach

    def _flops_spec(self) -> FlopsSpec:
        inner = self.model.model
        vision_cfg = self.model.config.vision_config
        text_cfg = self.model.config.text_config
        embed = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings().weight
        skip = {id(embed), id(head)}
        body = [p for p in inner.language_model.parameters() if id(p) not in skip]
        heads = int(text_cfg.num_attention_heads)
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        return FlopsSpec(
            encoder_params=_numel(inner.vision_tower.parameters()),
            encoder_layers=int(vision_cfg.num_hidden_layers),
            encoder_width=int(vision_cfg.hidden_size),
            encoder_prefix_tokens=1,
            connector_params=_numel(inner.multi_modal_projector.parameters()),
            connector_queries=0,
            connector_width=0,  # only used with cross-attention queries (resampler)
            decoder_body_params=_numel(body),
            decoder_head_params=head.numel(),
            decoder_layers=int(text_cfg.num_hidden_layers),
            decoder_attn_dim=heads * int(head_dim),
            decoder_body_trainable_params=_numel(p for p in body if p.requires_grad),
            decoder_head_trainable_params=head.numel() if head.requires_grad else 0,
        )

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        sequences = [render(s, self.image_block) for s in samples]
        batch = pad(sequences, self.pad_token_id)
        batch.update(batch_stats(sequences))
        return batch

    def step(self, batch: dict[str, Any]) -> None:
        dev = self.device
        with autocast(dev):
            out = self.model(
                input_ids=batch["input_ids"].to(dev, non_blocking=True),
                pixel_values=self.pixels(batch["num_samples"]),
                attention_mask=batch["attention_mask"].to(dev, non_blocking=True),
                labels=batch["labels"].to(dev, non_blocking=True),
            )
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(
        self, samples: Sequence[Sample], new_tokens: int, cache: str = "dynamic"
    ) -> torch.Tensor:
        if cache != "dynamic":
            raise ValueError("the naive baseline decodes with transformers' default cache")
        ids = torch.stack([render(s, self.image_block)[0] for s in samples]).to(self.device)
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device):
                out = self.model.generate(
                    input_ids=ids,
                    pixel_values=self.pixels(len(samples)),
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=self.pad_token_id,
                )
        finally:
            self.model.train()
        return out[:, ids.shape[1] :]
