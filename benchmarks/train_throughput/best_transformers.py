"""The best-transformers row: LLaVA as a skilled transformers user would tune it without lit-mllm.

- padding-free batches: ``DataCollatorWithFlattening`` packs a micro-batch into one row whose
  position ids restart per sample; transformers derives the block-diagonal mask from them
  (SDPA: a dense mask; ``flex_attention``: a block-sparse one). Only with ``use_cache=False``:
  the config's default ``use_cache=True`` makes a cache, and with a cache transformers does not
  look for packed sequences, so every sample would attend to the ones before it (found by the
  parity test). Where flash-attn-4 is installed (Hopper/Blackwell), transformers' own
  ``flash_attention_4`` is a third candidate: it turns the restarting position ids into varlen
  segments, so no mask is built (flash-attn 2/3 are not installed on the device);
- liger-kernel: its LLaVA patch fails with transformers 5.24 (liger 0.8.5's output class
  lacks ``image_hidden_states``), so the row applies liger's Qwen2 patch to the language model
  (RMSNorm, SwiGLU) and calls liger's fused linear cross-entropy on the hidden states itself
  (no full-vocabulary logits). Liger's RoPE patch is left off: it replaces transformers'
  module-level function for every Qwen2 model of the process (the lit-mllm rows measured
  later would run it too); its class replacements are undone for the same reason;
- regional ``torch.compile`` of the decoder layers (dynamic shapes: packed rows change length),
  tried against eager like every other choice;
- fused AdamW, the frozen vision tower in bf16 (a skilled user would not keep it in fp32);
- with ``--float8``: torchao's ``convert_to_float8_training`` on the language model's decoder
  layers, the same layers lit-mllm converts (torchao is open to a transformers user too).
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
from lit_mllm.models.float8 import convert_to_float8

FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def keep_flash_attention_4_out_of_graphs() -> None:
    """Register transformers' ``flash_attention_4`` again behind ``torch.compiler.disable``.

    Traced by dynamo, flash-attn-4's Python interface breaks the graph inside
    ``_flash_attn_fwd`` (H200, torch 2.11); the compiled layers call the kernel eagerly
    instead, as lit-mllm's own FA4 custom ops are called. The first compiled runs also hit an
    illegal memory access, which came with the vision tower reading the text's segments (see
    ``set_attention``); the two fixes went in together. Only this process's
    ``flash_attention_4`` changes; other backends stay as they are.
    """
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward

    AttentionInterface.register(
        "flash_attention_4", torch.compiler.disable(flash_attention_forward, recursive=True)
    )


def liger_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


class BestTransformersTrainee(BaselineTrainee):
    """transformers LLaVA with packing, liger-kernel, regional compile and fused AdamW."""

    row = "best-transformers"
    attention_candidates = ("sdpa", "flex_attention")

    def __init__(
        self,
        sizes: Sizes,
        decoder: str,
        device: torch.device,
        liger: bool,
        float8: str | None = None,
    ) -> None:
        super().__init__(sizes, decoder, device)
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True)
        # FlashAttention reads the segments from these, computed on the CPU (no host sync)
        self.flatten_for_flash = DataCollatorWithFlattening(
            return_position_ids=True, return_flash_attn_kwargs=True
        )
        self.liger = liger and liger_available(device)
        self.fused_loss = None
        if liger:
            self.row = "best-transformers-liger"
            # dynamo fails on liger's RMSNorm autograd Function (AssertionError in
            # overwrite_tensor_vt_proxy, torch 2.11): this variant stays eager
            self.can_compile = False
        if self.liger:  # CUDA with liger-kernel installed; elsewhere the stock modules
            self.fused_loss = self._apply_liger()
        if float8 is not None:  # the same Parameters: the optimizer made above keeps them
            convert_to_float8(self.model.model.language_model, float8)
        if device.type == "cuda":
            self.model.model.vision_tower.to(torch.bfloat16)
        self.layers_compiled = False

    def _apply_liger(self) -> torch.nn.Module:
        """Liger's RMSNorm and SwiGLU on this model's language model only; its fused linear
        cross-entropy as the loss."""
        from liger_kernel.transformers import (
            LigerFusedLinearCrossEntropyLoss,
            apply_liger_kernel_to_qwen2,
        )
        from transformers.models.qwen2 import modeling_qwen2

        names = ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP", "Qwen2ForCausalLM")
        before = {name: getattr(modeling_qwen2, name) for name in names}
        forward = modeling_qwen2.Qwen2ForCausalLM.forward
        apply_liger_kernel_to_qwen2(
            rope=False,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
            rms_norm=True,
            swiglu=True,
            model=self.model.model.language_model,
        )
        for name, value in before.items():  # other models of this process stay stock
            setattr(modeling_qwen2, name, value)
        modeling_qwen2.Qwen2ForCausalLM.forward = forward
        return LigerFusedLinearCrossEntropyLoss()

    def make_optimizer(self, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable, lr=1e-5, fused=self.device.type == "cuda")

    def set_attention(self, name: str) -> None:
        if name == "flash_attention_4":
            keep_flash_attention_4_out_of_graphs()
        if name.startswith("flash_attention"):
            # LLaVA hands its keyword arguments (the text's cu_seq_lens) to the vision tower
            # too, where FA4 read the image rows through the text's segments (an illegal
            # memory access on the H200): the frozen CLIP keeps SDPA
            self.model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})
        else:
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
        flash = self.attention.startswith("flash_attention")
        flatten = self.flatten_for_flash if flash else self.flatten
        batch = flatten([{"input_ids": ids, "labels": labels} for ids, labels in sequences])
        batch.update(batch_stats(sequences))
        batch["num_tokens"] = batch["num_padded_tokens"] = int(batch["input_ids"].shape[1])
        return batch

    def step(self, batch: dict[str, Any]) -> None:
        self.loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean next-token loss of a packed batch (liger's fused loss when it is on)."""
        dev = self.device
        stance = "default" if self.compiled else "force_eager"
        inputs = {
            "input_ids": batch["input_ids"].to(dev, non_blocking=True),
            "pixel_values": self.pixels(batch["num_samples"]),
            "position_ids": batch["position_ids"].to(dev, non_blocking=True),
            "use_cache": False,  # with a KV cache transformers ignores the packing (see above)
        }
        for key in FLASH_KWARGS:
            if key in batch:
                value = batch[key]
                inputs[key] = value.to(dev, non_blocking=True) if torch.is_tensor(value) else value
        labels = batch["labels"].to(dev, non_blocking=True)
        with autocast(dev), torch.compiler.set_stance(stance):
            if self.fused_loss is None:
                loss = self.model(**inputs, labels=labels).loss
            else:  # hidden states -> liger's fused head + cross-entropy, shifted by one
                hidden = self.model.model(**inputs).last_hidden_state
                head = self.model.get_output_embeddings().weight
                loss = self.fused_loss(head, hidden[0, :-1], labels[0, 1:])
        return loss
