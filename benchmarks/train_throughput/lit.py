"""The lit-mllm rows: MLLMModule stepped in a plain loop with its optimisations on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.train_throughput.sizes import Sizes
from benchmarks.train_throughput.stream import Sample, batch_stats, render
from benchmarks.train_throughput.trainee import Trainee, autocast
from lit_mllm.data.collate import pack
from lit_mllm.data.slicing import ImageSlicing
from lit_mllm.flops import spec_from_model
from lit_mllm.models.attention import VARLEN_ATTENTION, VARLEN_FA4_ATTENTION
from lit_mllm.models.token_layout import TokenLayout


class LitTrainee(Trainee):
    """MLLMModule with packing, supervised-only loss, bf16 frozen encoder, fused AdamW."""

    row = "lit"

    def __init__(
        self,
        sizes: Sizes,
        decoder: str,
        connector: str,
        device: torch.device,
        image_slicing: ImageSlicing | None = None,
        layout: bool = True,
        mlp_kernel: str = "transformers",
        float8: str | None = None,
    ) -> None:
        super().__init__(sizes, decoder, device)
        from lit_mllm.module import MLLMModule

        self.row = connector
        self.layout = layout
        self.connector = connector
        encoder = {
            "name": sizes.encoder_name,
            "pretrained": False,
            "model_kwargs": dict(sizes.encoder_kwargs),
            "feature_layer": -2,  # LLaVA's choice, as in the baseline
            "dtype": "bfloat16" if device.type == "cuda" else "float32",
        }
        with torch.device(device):
            self.module = MLLMModule(
                tokenizer="tiny",
                encoder=encoder,
                connector={"kind": connector, "num_queries": sizes.resampler_queries},
                decoder={
                    "config": dict(sizes.decoders[decoder]),
                    "train": "full",
                    "attn_implementation": "sdpa",
                    "mlp_kernel": mlp_kernel,
                    "float8": float8,
                },
                image_slicing=image_slicing,
            )
        self.module.train()
        model = self.module.model
        ids = model.image_token_ids
        self.image_tokens = int(self.module.num_image_tokens)
        self.image_block = torch.tensor(
            [ids.start] + [ids.patch] * self.image_tokens + [ids.end], dtype=torch.long
        )
        self.pad_token_id = int(self.module.tokenizer.pad_token_id)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
        self.spec = spec_from_model(model)
        self.vocab_size = int(model.decoder.get_input_embeddings().weight.shape[0])

    def set_attention(self, name: str) -> None:
        """``sdpa`` (transformers' block-diagonal mask), ``varlen``, ``varlen-fa4`` or
        ``flash_attention_2``."""
        impl = {"varlen": VARLEN_ATTENTION, "varlen-fa4": VARLEN_FA4_ATTENTION}.get(name, name)
        self.module.model.decoder.set_attn_implementation(impl)
        self.attention = name

    def set_residual_dtype(self, name: str) -> None:
        """``float32`` (the default) or ``autocast``: ``model.residual_dtype``."""
        self.module.model.autocast_residual = name == "autocast"

    def set_compiled(self, on: bool) -> None:
        """Regional compilation, as `lit-mllm fit` does on CUDA (`model.compile_blocks`, once);
        an eager row after a compiled one runs under ``torch.compiler.set_stance``."""
        if on:
            self.module.model.compile_blocks()
        self.compiled = on

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        sequences = [render(s, self.image_block) for s in samples]
        batch = pack(sequences, self.pad_token_id)
        batch.update(batch_stats(sequences))
        if self.layout:
            patch = self.module.model.image_token_ids.patch
            batch["layout"] = TokenLayout.of(
                batch["input_ids"], batch["labels"], patch, batch["cu_seqlens"]
            )
        return batch

    def step(self, batch: dict[str, Any]) -> None:
        dev = self.device
        model_batch = {
            "input_ids": batch["input_ids"].to(dev, non_blocking=True),
            "labels": batch["labels"].to(dev, non_blocking=True),
            "position_ids": batch["position_ids"].to(dev, non_blocking=True),
            "attention_mask": None,  # packed: one row, position_ids restart per sample
            "pixel_values": self.batch_pixels(batch),
        }
        if batch.get("layout") is not None:
            model_batch["layout"] = batch["layout"].to(dev, non_blocking=True)
        if batch.get("attention_mask") is not None:  # right-padded rows
            model_batch["attention_mask"] = batch["attention_mask"].to(dev, non_blocking=True)
        stance = "default" if self.compiled else "force_eager"
        with autocast(dev), torch.compiler.set_stance(stance):
            loss, _ = self.module(model_batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def batch_pixels(self, batch: dict[str, Any]) -> Any:
        """The images of a collated batch on the device: one random square image per sample."""
        return self.pixels(batch["num_samples"])

    def generate(
        self, samples: Sequence[Sample], new_tokens: int, cache: str = "dynamic"
    ) -> torch.Tensor:
        """Through ``MultimodalLM.generate`` with the cache of ``model.generation.cache``:
        ``static`` (transformers compiles the decoding step on CUDA) or ``cuda_graph``
        (lit-mllm's loop, one graph replay per token, of the compiled step); the label
        ``cuda_graph_eager`` is that loop with ``model.generation.compile_step: false``."""
        graphed = cache.startswith("cuda_graph")
        self.module.model.graphed_decoding.compile_step = cache != "cuda_graph_eager"
        ids = torch.stack([render(s, self.image_block)[0] for s in samples]).to(self.device)
        attention = self.attention
        self.set_attention("sdpa")  # KV-cache decoding: the stock path (generate runs eager)
        self.module.eval()
        try:
            with autocast(self.device):
                return self.module.model.generate(
                    self.pixels(len(samples)),
                    ids,
                    torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    eos_token_id=None,
                    pad_token_id=self.pad_token_id,
                    cache_implementation=None if cache == "dynamic" else "static",
                    cuda_graph=graphed,
                )
        finally:
            self.module.train()
            self.set_attention(attention)
