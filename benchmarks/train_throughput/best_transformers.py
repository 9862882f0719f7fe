"""The best-transformers row: LLaVA as a skilled transformers user would tune it without lit-mllm.

- padding-free batches: ``DataCollatorWithFlattening`` packs a micro-batch into one row whose
  position ids restart per sample; transformers derives the block-diagonal mask from them
  (SDPA: a dense mask; ``flex_attention``: a block-sparse one). Only with ``use_cache=False``:
  the config's default ``use_cache=True`` makes a cache, and with a cache transformers does not
  look for packed sequences, so every sample would attend to the ones before it (found by the
  parity test). flash-attn (the only backend that reads the collator's ``cu_seq_lens``
  directly) is not installed on the device;
- liger-kernel's LLaVA patch: fused linear cross-entropy (no full-vocabulary logits) and, through
  it, the Qwen2 patch (RMSNorm, SwiGLU, RoPE);
- regional ``torch.compile`` of the decoder layers (dynamic shapes: packed rows change length),
  tried against eager like every other choice;
- fused AdamW, the frozen vision tower in bf16 (a skilled user would not keep it in fp32).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.train_throughput.baseline import BaselineTrainee
from benchmarks.train_throughput.sizes import Sizes
from benchmarks.train_throughput.stream import Sample, batch_stats, render
from benchmarks.train_throughput.trainee import autocast


def liger_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


class BestTransformersTrainee(BaselineTrainee):
    """transformers LLaVA with packing, liger-kernel, regional compile and fused AdamW."""

    row = "best-transformers"
    attention_candidates = ("sdpa", "flex_attention")

    def __init__(self, sizes: Sizes, decoder: str, device: torch.device, liger: bool) -> None:
        super().__init__(sizes, decoder, device)
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True)
        self.liger = liger and liger_available(device)
        if self.liger:
            from liger_kernel.transformers import apply_liger_kernel_to_llava

            apply_liger_kernel_to_llava(fused_linear_cross_entropy=True, model=self.model)
        if device.type == "cuda":
            self.model.model.vision_tower.to(torch.bfloat16)
        self.layers_compiled = False

    def make_optimizer(self, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable, lr=1e-5, fused=self.device.type == "cuda")

    def set_attention(self, name: str) -> None:
        self.model.set_attn_implementation(name)
        self.attention = name

    def set_compiled(self, on: bool) -> None:
        """Regional compilation of the decoder layers, as torch's recipe recommends; an eager
        row after a compiled one runs under ``torch.compiler.set_stance``."""
        if on and not self.layers_compiled:
            for layer in self.model.model.language_model.layers:
                layer.compile(dynamic=True)
            self.layers_compiled = True
        self.compiled = on

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        sequences = [render(s, self.image_block) for s in samples]
        batch = self.flatten([{"input_ids": ids, "labels": labels} for ids, labels in sequences])
        batch.update(batch_stats(sequences))
        batch["num_tokens"] = batch["num_padded_tokens"] = int(batch["input_ids"].shape[1])
        return batch

    def step(self, batch: dict[str, Any]) -> None:
        dev = self.device
        stance = "default" if self.compiled else "force_eager"
        with autocast(dev), torch.compiler.set_stance(stance):
            out = self.model(
                input_ids=batch["input_ids"].to(dev, non_blocking=True),
                pixel_values=self.pixels(batch["num_samples"]),
                position_ids=batch["position_ids"].to(dev, non_blocking=True),
                labels=batch["labels"].to(dev, non_blocking=True),
                use_cache=False,  # with a KV cache transformers ignores the packing (see above)
            )
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
