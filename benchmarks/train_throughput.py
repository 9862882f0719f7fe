"""Training throughput: a plain transformers LLaVA loop vs lit-mllm, on the same sizes and data.

Rows (one process, one command):

* ``baseline``: ``LlavaForConditionalGeneration`` (CLIP ViT-L/14-336 frozen, MLP projector,
  Qwen2 decoder) trained the way a transformers user would: fp32 weights under bf16 autocast,
  SDPA attention, right-padded batches with ``-100`` labels, full-vocabulary loss, AdamW.
* ``mlp`` / ``resampler``: ``MLLMModule`` with the same sizes, stepped as
  ``module(batch) -> loss; loss.backward(); fused AdamW.step()`` with its optimisations on:
  packing (one row per micro-batch), loss on supervised positions only, frozen encoder in bf16
  under ``no_grad``, a varlen attention kernel for packed rows (or SDPA), regional
  ``torch.compile`` when it wins, and the largest micro-batch that the memory budget allows.

Every row reads the same seeded stream of synthetic conversations (one image each, text lengths
long-tailed, about 30 % supervised tokens); pixels and token ids are random, which changes
nothing in the arithmetic. Also measured: batched greedy captioning speed and the speed of the
project's data loader on JPEG files. ``--tiny`` runs micro sizes on CPU in seconds (smoke test).

Usage: python benchmarks/train_throughput.py --out results.md [--decoders 0.5b,1.5b] ...
"""

from __future__ import annotations

import os

# Variable-length packed batches fragment the caching allocator; expandable segments avoid it
# (applies to every row alike). Must be set before CUDA is initialised.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lit_mllm.data.collate import pack, pad  # noqa: E402
from lit_mllm.data.special_tokens import IGNORE_INDEX  # noqa: E402
from lit_mllm.flops import FlopsSpec, peak_flops, spec_from_model, step_flops  # noqa: E402
from lit_mllm.models.attention import (  # noqa: E402
    VARLEN_ATTENTION,
    _torch_varlen,
    varlen_available,
)

ROWS = ("baseline", "mlp", "resampler")

# ----------------------------------------------------------------------------------- sizes

QWEN2_COMMON = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
TINY_QWEN2_COMMON = {
    "model_type": "qwen2",
    "vocab_size": 1024,  # the tiny tokenizer's size: no resize happens
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}


@dataclass(frozen=True)
class Sizes:
    """Model sizes and the text-length distribution of one benchmark scale."""

    encoder_name: str
    encoder_kwargs: dict[str, Any]
    clip: dict[str, Any]  # HF CLIPVisionConfig with the same shape as the timm encoder
    decoders: dict[str, dict[str, Any]]
    image_size: int
    patch_size: int
    text_min: int
    text_max: int
    text_median: int
    text_sigma: float
    resampler_queries: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


REAL = Sizes(
    encoder_name="vit_large_patch14_clip_336.openai",
    encoder_kwargs={},
    clip={
        "image_size": 336,
        "patch_size": 14,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    decoders={
        "0.5b": {
            **QWEN2_COMMON,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
        },
        "1.5b": {
            **QWEN2_COMMON,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
        },
    },
    image_size=336,
    patch_size=14,
    text_min=64,
    text_max=1024,
    text_median=200,
    text_sigma=0.8,
    resampler_queries=64,
)

TINY = Sizes(
    encoder_name="vit_base_patch16_224",
    encoder_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2},
    clip={
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 48,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 48,
    },
    decoders={
        "0.5b": {
            **TINY_QWEN2_COMMON,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "1.5b": {
            **TINY_QWEN2_COMMON,
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
    image_size=32,
    patch_size=8,
    text_min=8,
    text_max=64,
    text_median=20,
    text_sigma=0.8,
    resampler_queries=4,
)

DEFAULT_BATCH_SIZES = {
    "baseline": [2, 4, 8, 16],
    "mlp": [8, 16, 32, 64],
    "resampler": [16, 32, 64, 128],
}
TINY_BATCH_SIZES = {"baseline": [2, 4], "mlp": [2, 4], "resampler": [2, 4]}

# ------------------------------------------------------------------------ synthetic stream


@dataclass
class Sample:
    """One conversation: text ids, which of them are assistant replies, where the image goes."""

    text: torch.Tensor  # (T,) int64
    supervised: torch.Tensor  # (T,) bool
    image_at: int


def _split(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """``parts`` positive integers summing to ``total`` (uniform random cut points)."""
    if parts <= 1:
        return [total]
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()


def make_sample(index: int, sizes: Sizes, seed: int, vocab: tuple[int, int]) -> Sample:
    """Sample ``index`` of the stream; depends only on (seed, index), so every row sees it."""
    rng = np.random.default_rng([seed, index])
    length = round(rng.lognormal(math.log(sizes.text_median), sizes.text_sigma))
    length = int(min(max(length, sizes.text_min), sizes.text_max))
    turns = max(1, min(int(rng.integers(1, 5)), length // 8))
    share = float(np.clip(rng.beta(3.0, 7.0), 0.05, 0.9))  # mean 0.3
    supervised = min(max(turns, round(share * length)), length - turns)
    user = _split(length - supervised, turns, rng)
    assistant = _split(supervised, turns, rng)
    mask = torch.cat(
        [
            torch.cat([torch.zeros(u, dtype=torch.bool), torch.ones(a, dtype=torch.bool)])
            for u, a in zip(user, assistant, strict=True)
        ]
    )
    text = torch.from_numpy(rng.integers(vocab[0], vocab[1], size=length)).long()
    return Sample(text, mask, image_at=min(3, user[0]))


class SampleStream:
    """Timed steps read samples 0, 1, 2, ... in order; warm-up steps read a disjoint range."""

    WARMUP_OFFSET = 1_000_000

    def __init__(self, sizes: Sizes, seed: int, vocab: tuple[int, int]) -> None:
        self.sizes, self.seed, self.vocab = sizes, seed, vocab
        self._cache: dict[int, Sample] = {}

    def get(self, index: int) -> Sample:
        if index not in self._cache:
            self._cache[index] = make_sample(index, self.sizes, self.seed, self.vocab)
        return self._cache[index]

    def batch(self, step: int, size: int, warmup: bool) -> list[Sample]:
        start = (self.WARMUP_OFFSET if warmup else 0) + step * size
        return [self.get(start + j) for j in range(size)]


def make_prompt(stream: SampleStream, index: int, length: int = 12) -> Sample:
    """A caption prompt: ``length`` random text tokens with the image after the third."""
    rng = np.random.default_rng([stream.seed, 7, index])
    text = torch.from_numpy(rng.integers(stream.vocab[0], stream.vocab[1], size=length)).long()
    return Sample(text, torch.zeros(length, dtype=torch.bool), image_at=3)


def render(sample: Sample, image_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids with the image block inserted, labels = ids on assistant tokens else -100."""
    a = sample.image_at
    text_labels = torch.where(sample.supervised, sample.text, IGNORE_INDEX)
    ids = torch.cat([sample.text[:a], image_block, sample.text[a:]])
    ignore = torch.full((len(image_block),), IGNORE_INDEX, dtype=torch.long)
    labels = torch.cat([text_labels[:a], ignore, text_labels[a:]])
    return ids, labels


def batch_stats(sequences: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    lengths = [len(ids) for ids, _ in sequences]
    supervised = sum(int((labels[1:] != IGNORE_INDEX).sum()) for _, labels in sequences)
    return {"lengths": lengths, "supervised": supervised, "num_samples": len(sequences)}


# varlen attention for packed rows lives in lit_mllm.models.attention


# --------------------------------------------------------------------------------- trainees


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _numel(params: Any) -> int:
    return sum(p.numel() for p in params)


class Trainee:
    """What the measuring code needs from a row: batches, a training step, FLOPs, captions."""

    row: str
    connector: str
    attention: str = "sdpa"
    compiled: bool = False
    image_tokens: int
    spec: FlopsSpec
    optimizer: torch.optim.Optimizer

    def __init__(self, sizes: Sizes, decoder: str, device: torch.device) -> None:
        self.sizes, self.decoder_key, self.device = sizes, decoder, device

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        raise NotImplementedError

    def step(self, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def generate(self, samples: Sequence[Sample], new_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def pixels(self, n: int) -> torch.Tensor:
        size = self.sizes.image_size
        return torch.randn(n, 3, size, size, device=self.device)

    def flops(self, batch: dict[str, Any]) -> float:
        return step_flops(
            self.spec,
            num_images=batch["num_samples"],
            patches_per_image=self.sizes.patches,
            sample_lengths=batch["lengths"],
            supervised_tokens=batch["supervised"],
        )

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Drop every reference to the model, its layers and the optimizer state."""
        self.__dict__.clear()


class BaselineTrainee(Trainee):
    """transformers LLaVA as a plain user trains it: fp32 weights, bf16 autocast, padding."""

    row = "baseline"
    connector = "mlp"

    def __init__(self, sizes: Sizes, decoder: str, device: torch.device) -> None:
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
            self.model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
        for name, param in self.model.named_parameters():
            if "vision_tower" in name:
                param.requires_grad_(False)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)  # torch default: foreach
        self.image_tokens = sizes.patches
        self.image_block = torch.full((sizes.patches,), self.image_token_id, dtype=torch.long)
        self.spec = self._flops_spec()

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
        with _autocast(dev):
            out = self.model(
                input_ids=batch["input_ids"].to(dev, non_blocking=True),
                pixel_values=self.pixels(batch["num_samples"]),
                attention_mask=batch["attention_mask"].to(dev, non_blocking=True),
                labels=batch["labels"].to(dev, non_blocking=True),
            )
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(self, samples: Sequence[Sample], new_tokens: int) -> torch.Tensor:
        ids = torch.stack([render(s, self.image_block)[0] for s in samples]).to(self.device)
        self.model.eval()
        try:
            with torch.no_grad(), _autocast(self.device):
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


class LitTrainee(Trainee):
    """MLLMModule with packing, supervised-only loss, bf16 frozen encoder, fused AdamW."""

    row = "lit"

    def __init__(self, sizes: Sizes, decoder: str, connector: str, device: torch.device) -> None:
        super().__init__(sizes, decoder, device)
        from lit_mllm.module import MLLMModule

        self.row = connector
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
                },
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
        """``sdpa`` (transformers' block-diagonal mask), ``varlen`` or ``flash_attention_2``."""
        impl = VARLEN_ATTENTION if name == "varlen" else name
        self.module.model.decoder.config._attn_implementation = impl
        self.attention = name

    def set_compiled(self, on: bool) -> None:
        """Regional compilation, as `lit-mllm fit` does on CUDA (`model.compile_blocks`)."""
        self.module.model.compile_blocks(on)
        self.compiled = on

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        sequences = [render(s, self.image_block) for s in samples]
        batch = pack(sequences, self.pad_token_id)
        batch.update(batch_stats(sequences))
        return batch

    def step(self, batch: dict[str, Any]) -> None:
        dev = self.device
        model_batch = {
            "input_ids": batch["input_ids"].to(dev, non_blocking=True),
            "labels": batch["labels"].to(dev, non_blocking=True),
            "position_ids": batch["position_ids"].to(dev, non_blocking=True),
            "attention_mask": None,
            "pixel_values": self.pixels(batch["num_samples"]),
        }
        with _autocast(dev):
            loss, _ = self.module(model_batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(self, samples: Sequence[Sample], new_tokens: int) -> torch.Tensor:
        ids = torch.stack([render(s, self.image_block)[0] for s in samples]).to(self.device)
        attention, compiled = self.attention, self.compiled
        self.set_attention("sdpa")  # KV-cache decoding: the stock path
        self.set_compiled(False)
        self.module.eval()
        try:
            with _autocast(self.device):
                return self.module.model.generate(
                    self.pixels(len(samples)),
                    ids,
                    torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    eos_token_id=None,
                    pad_token_id=self.pad_token_id,
                )
        finally:
            self.module.train()
            self.set_attention(attention)
            self.set_compiled(compiled)


# ------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory; on CPU the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


@dataclass
class Measurement:
    """One timed run of one row at one micro-batch size."""

    row: str
    decoder: str
    connector: str
    image_tokens: int
    batch_size: int
    attention: str
    compiled: bool
    stage: str = "final"
    status: str = "ok"
    steps: int = 0
    seconds: float = float("nan")
    samples: int = 0
    supervised: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    flops: float = 0.0
    peak_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def step_ms(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.ok else float("nan")

    @property
    def supervised_per_s(self) -> float:
        return self.supervised / self.seconds if self.ok else float("nan")

    @property
    def real_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.ok else float("nan")

    @property
    def padding_pct(self) -> float:
        return 100.0 * (self.padded_tokens - self.real_tokens) / max(self.padded_tokens, 1)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def tflop_per_step(self) -> float:
        return self.flops / max(self.steps, 1) / 1e12

    def mfu(self, peak: float) -> float:
        return 100.0 * self.flops / self.seconds / peak if self.ok else float("nan")


def measure(
    trainee: Trainee,
    stream: SampleStream,
    batch_size: int,
    warmup: int,
    steps: int,
    *,
    stage: str = "final",
    budget_bytes: int | None = None,
) -> Measurement:
    """Warm up (excluded), then time ``steps`` steps; OOM and errors become a status."""
    result = Measurement(
        row=trainee.row,
        decoder=trainee.decoder_key,
        connector=trainee.connector,
        image_tokens=trainee.image_tokens,
        batch_size=batch_size,
        attention=trainee.attention,
        compiled=trainee.compiled,
        stage=stage,
    )
    device = trainee.device
    warm = [trainee.collate(stream.batch(i, batch_size, warmup=True)) for i in range(warmup)]
    timed = [trainee.collate(stream.batch(i, batch_size, warmup=False)) for i in range(steps)]
    failure = None
    try:
        for batch in warm:
            trainee.step(batch)
        _sync(device)
        free_memory(device)
        _reset_peak(device)
        start = time.perf_counter()
        for batch in timed:
            trainee.step(batch)
        _sync(device)
        result.seconds = time.perf_counter() - start
    except Exception as error:  # OOM or a failing kernel/compile: recorded, run continues
        failure = "OOM" if _is_oom(error) else f"error: {type(error).__name__}: {error}"
    if failure is not None:
        result.status = failure.splitlines()[0][:160]
        trainee.zero_grad()
        free_memory(device)
        return result
    result.steps = steps
    result.samples = sum(b["num_samples"] for b in timed)
    result.supervised = sum(b["supervised"] for b in timed)
    result.real_tokens = sum(b["num_tokens"] for b in timed)
    result.padded_tokens = sum(b["num_padded_tokens"] for b in timed)
    result.flops = sum(trainee.flops(b) for b in timed)
    result.peak_bytes = _peak_bytes(device)
    if budget_bytes is not None and result.peak_bytes > budget_bytes:
        result.status = "over budget"
    return result


@dataclass
class GenResult:
    row: str
    decoder: str
    batch_size: int
    new_tokens: int
    status: str = "ok"
    seconds: float = float("nan")
    captions: int = 0

    @property
    def captions_per_s(self) -> float:
        return self.captions / self.seconds if self.status == "ok" else float("nan")


def measure_generation(
    trainee: Trainee, stream: SampleStream, batch_size: int, batches: int, new_tokens: int
) -> GenResult:
    """Batched greedy captions of exactly ``new_tokens`` tokens; the first batch is warm-up."""
    result = GenResult(trainee.row, trainee.decoder_key, batch_size, new_tokens)
    prompts = [make_prompt(stream, i) for i in range(batch_size)]
    failure = None
    try:
        out = trainee.generate(prompts, new_tokens)
        if out.shape != (batch_size, new_tokens):
            raise RuntimeError(f"generated shape {tuple(out.shape)}")
        _sync(trainee.device)
        start = time.perf_counter()
        for _ in range(batches):
            trainee.generate(prompts, new_tokens)
        _sync(trainee.device)
        result.seconds = time.perf_counter() - start
        result.captions = batches * batch_size
    except Exception as error:
        failure = "OOM" if _is_oom(error) else f"error: {type(error).__name__}: {error}"
    if failure is not None:
        result.status = failure.splitlines()[0][:160]
        free_memory(trainee.device)
    return result


# ------------------------------------------------------------------------- row procedure


@dataclass
class Choices:
    """Attention backend and compile choice made on the first lit-mllm row, reused after."""

    attention: str | None = None
    compiled: bool | None = None


@dataclass
class RowReport:
    final: Measurement | None
    probes: list[Measurement] = field(default_factory=list)
    generation: GenResult | None = None
    profile: str | None = None
    seconds: float = 0.0


KERNEL_GROUPS = (  # (group, name fragments), first match wins; lower-case
    ("attention (flash / SDPA)", ("flash", "fmha", "attention")),
    ("matmul (GEMM)", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "wgmma")),
    ("optimizer (AdamW)", ("adam", "multi_tensor")),
    ("compiled fused elementwise (triton)", ("triton",)),
    ("cross-entropy / softmax", ("softmax", "cross_entropy", "nll", "log_softmax")),
    ("copies / casts", ("copy", "memcpy", "memset", "cat", "fill")),
)


def profile_training(trainee: Trainee, stream: SampleStream, final: Measurement, steps: int) -> str:
    """torch.profiler over ``steps`` training steps at the row's final micro-batch: GPU busy
    share of wall time, kernel time by group and the top kernels, to say what holds MFU back."""
    batch_size = final.batch_size
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    batches = [trainee.collate(stream.batch(i, batch_size, warmup=False)) for i in range(steps)]
    trainee.step(batches[0])  # warm: no compile or allocator growth inside the window
    _sync(trainee.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for batch in batches:
            trainee.step(batch)
        _sync(trainee.device)
        wall_us = (time.perf_counter() - start) * 1e6
    # GPU-side user annotations ("Optimizer.step#AdamW.step", "ProfilerStep#3") span kernels
    # that are listed on their own: leave them out so no time is counted twice
    kernels = [
        e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and "#" not in e.key
    ]

    def self_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", 0.0) or 0.0)

    total = sum(self_us(e) for e in kernels)
    groups: dict[str, float] = {}
    for event in kernels:
        name = event.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + self_us(event)
    lines = [
        f"{_row_label(final)}, {final.decoder}, micro-batch {batch_size}, {steps} "
        f"profiled steps: wall {wall_us / 1e3 / steps:.1f} ms/step, GPU kernels "
        f"{total / 1e3 / steps:.1f} ms/step (**GPU busy {100 * total / wall_us:.1f} %** of wall)",
        "",
        "| kernel group | ms/step | share of kernel time |",
        "|---|---|---|",
    ]
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {us / 1e3 / steps:.1f} | {100 * us / max(total, 1):.1f} % |")
    lines += ["", "| top kernels | ms/step | calls/step |", "|---|---|---|"]
    for event in sorted(kernels, key=self_us, reverse=True)[:12]:
        name = event.key if len(event.key) <= 90 else event.key[:87] + "..."
        name = name.replace("|", "/")
        lines.append(
            f"| `{name}` | {self_us(event) / 1e3 / steps:.2f} | {event.count / steps:.0f} |"
        )
    return "\n".join(lines)


def _best(results: Sequence[Measurement]) -> Measurement | None:
    ok = [m for m in results if m.ok]
    return max(ok, key=lambda m: m.samples_per_s) if ok else None


def probe(
    trainee: Trainee,
    stream: SampleStream,
    batch_size: int,
    args: argparse.Namespace,
    stage: str,
    budget: int | None,
    extra_warmup: int = 0,
) -> Measurement:
    """A short run that only has to rank configurations."""
    warmup = args.probe_warmup + extra_warmup
    return measure(
        trainee, stream, batch_size, warmup, args.probe_steps, stage=stage, budget_bytes=budget
    )


def choose_lit_config(
    trainee: LitTrainee,
    stream: SampleStream,
    args: argparse.Namespace,
    choices: Choices,
    batch_size: int,
    budget: int | None,
) -> list[Measurement]:
    """Try the attention backends, then compile, at ``batch_size``; keep what is fastest."""
    probes: list[Measurement] = []
    device = trainee.device
    if choices.attention is None:
        candidates = ["sdpa"]
        if varlen_available(device):
            candidates.append("varlen")
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            candidates.append("flash_attention_2")
        if args.lit_attn != "auto":
            candidates = [args.lit_attn]
        if len(candidates) == 1:
            choices.attention = candidates[0]
        else:
            for name in candidates:
                trainee.set_attention(name)
                probes.append(probe(trainee, stream, batch_size, args, "attention", budget))
            best = _best(probes)
            choices.attention = best.attention if best else "sdpa"
    trainee.set_attention(choices.attention)
    if choices.compiled is None:
        if args.compile == "auto" and device.type == "cuda":
            eager = [m for m in probes if m.attention == choices.attention and m.ok]
            if not eager:
                eager = [probe(trainee, stream, batch_size, args, "compile", budget)]
                probes.extend(eager)
            trainee.set_compiled(True)
            # two more warm-up steps: the first compiled step compiles, the next may recompile
            compiled = probe(trainee, stream, batch_size, args, "compile", budget, extra_warmup=2)
            probes.append(compiled)
            wins = compiled.ok and (
                not eager[0].ok or compiled.samples_per_s > 1.02 * eager[0].samples_per_s
            )
            choices.compiled = bool(wins)
        else:
            choices.compiled = args.compile == "on"
    trainee.set_compiled(choices.compiled)
    return probes


def _same_config(m: Measurement, trainee: Trainee) -> bool:
    return m.attention == trainee.attention and m.compiled == trainee.compiled


def sweep(
    trainee: Trainee,
    stream: SampleStream,
    sizes: Sequence[int],
    args: argparse.Namespace,
    budget: int | None,
    done: Sequence[Measurement] = (),
) -> list[Measurement]:
    """Probe micro-batch sizes in ascending order; stop at the first that does not fit."""
    probes: list[Measurement] = []
    for size in sorted(sizes):
        reuse = [m for m in done if m.batch_size == size and _same_config(m, trainee)]
        result = reuse[-1] if reuse else None
        if result is None:
            result = probe(trainee, stream, size, args, "batch", budget)
            probes.append(result)
        if not result.ok:
            break
    return probes


def placeholder_row(row: str, decoder: str, status: str) -> Measurement:
    """The table line of a row that could not be measured (build failure, time limit)."""
    return Measurement(
        row=row,
        decoder=decoder,
        connector="mlp" if row == "baseline" else row,
        image_tokens=0,
        batch_size=0,
        attention="-",
        compiled=False,
        status=status.splitlines()[0][:160],
    )


def run_row(
    row: str,
    decoder: str,
    sizes: Sizes,
    device: torch.device,
    stream: SampleStream,
    args: argparse.Namespace,
    choices: Choices,
    budget: int | None,
) -> RowReport:
    start = time.perf_counter()
    trainee: Trainee | None = None
    report = RowReport(final=None)
    try:
        trainee = (
            BaselineTrainee(sizes, decoder, device)
            if row == "baseline"
            else LitTrainee(sizes, decoder, row, device)
        )
        batch_sizes = args.batch_sizes[row]
        if isinstance(trainee, LitTrainee):
            report.probes += choose_lit_config(
                trainee, stream, args, choices, min(batch_sizes), budget
            )
        if len(batch_sizes) > 1:
            report.probes += sweep(trainee, stream, batch_sizes, args, budget, report.probes)
        fitting = [m for m in report.probes if m.ok and _same_config(m, trainee)]
        order = sorted(fitting, key=lambda m: -m.samples_per_s)
        candidates = [m.batch_size for m in order] or [min(batch_sizes)]
        for size in dict.fromkeys(candidates):  # best first; fall back if the long run fails
            final = measure(trainee, stream, size, args.warmup, args.steps, budget_bytes=budget)
            report.final = final
            if final.ok:
                break
        final = report.final
        if args.profile_steps > 0 and final is not None and final.ok and device.type == "cuda":
            report.profile = profile_training(trainee, stream, final, args.profile_steps)
        if args.gen_batches > 0:
            report.generation = measure_generation(
                trainee, stream, args.gen_batch_size, args.gen_batches, args.gen_tokens
            )
    except Exception as error:  # building the row failed: report it, go on with the others
        status = "OOM" if _is_oom(error) else f"error: {type(error).__name__}: {error}"
        report.final = placeholder_row(row, decoder, status)
    finally:
        if trainee is not None:
            trainee.close()
        del trainee
        free_memory(device)
        torch._dynamo.reset()
    report.seconds = time.perf_counter() - start
    return report


# --------------------------------------------------------------------------- data loader


@dataclass
class LoaderResult:
    workers: int
    batch_size: int
    image_size: int
    batches: int
    status: str = "ok"
    seconds: float = float("nan")
    samples: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.status == "ok" else float("nan")


def image_data_config(sizes: Sizes) -> dict[str, Any]:
    """The encoder's timm preprocessing config, from a weightless (meta) copy of it."""
    from lit_mllm.models.vision import VisionEncoder

    with torch.device("meta"):
        encoder = VisionEncoder(sizes.encoder_name, model_kwargs=dict(sizes.encoder_kwargs))
    return encoder.data_config


def loader_benchmark(args: argparse.Namespace, sizes: Sizes) -> list[LoaderResult]:
    """MLLMDataModule on the synthetic set written as JPEG: decode + transform + tokenise."""
    from lit_mllm.data.datamodule import MLLMDataModule, SyntheticData
    from lit_mllm.data.synthetic import generate_synthetic_dataset

    bs, batches = args.loader_batch_size, args.loader_batches
    num_train = bs * (batches + 1)
    root = Path(args.loader_dir or tempfile.mkdtemp(prefix="lit_mllm_loader_"))
    manifest = root / "synthetic_manifest.json"
    wanted = {"train": num_train, "val": 4}
    fresh = manifest.exists() and json.loads(manifest.read_text()).get("counts") == wanted
    fresh = fresh and json.loads(manifest.read_text()).get("image_format") == "jpg"
    if not fresh:
        generate_synthetic_dataset(
            root, num_train, 4, 0, seed=0, image_size=args.loader_image_size, image_format="jpg"
        )
    data_config = image_data_config(sizes)
    results = []
    for workers in args.loader_workers:
        result = LoaderResult(workers, bs, args.loader_image_size, batches)
        try:
            dm = MLLMDataModule(
                synthetic=SyntheticData(
                    dir=str(root),
                    num_train=num_train,
                    num_val=4,
                    num_test=0,
                    image_size=args.loader_image_size,
                    task="instruct",
                ),
                tokenizer="tiny",
                num_image_tokens=sizes.patches,
                image_data_config=data_config,
                batch_size=bs,
                num_workers=workers,
                packing=True,
                max_length=8192,
            )
            dm.setup("fit")
            iterator = iter(dm.train_dataloader())
            next(iterator)  # worker start-up excluded
            start = time.perf_counter()
            for _ in range(batches):
                result.samples += int(next(iterator)["batch_size"])
            result.seconds = time.perf_counter() - start
            del iterator
        except Exception as error:
            result.status = f"error: {type(error).__name__}: {error}".splitlines()[0][:160]
        results.append(result)
    return results


# ------------------------------------------------------------------------------- output


def _fmt(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


TRAIN_COLUMNS = (
    "row",
    "decoder",
    "connector",
    "image tok",
    "micro-batch",
    "attention",
    "compile",
    "step (ms)",
    "samples/s",
    "sup tok/s",
    "real tok/s",
    "peak mem (GiB)",
    "padding %",
    "TFLOP/step",
    "MFU %",
    "vs baseline",
    "status",
)
GEN_COLUMNS = ("row", "decoder", "batch", "new tokens", "captions/s", "vs baseline", "status")
LOADER_COLUMNS = ("workers", "batch", "image px", "samples/s", "best lit train samples/s", "ratio")
PROBE_COLUMNS = (
    "row",
    "decoder",
    "stage",
    "micro-batch",
    "attention",
    "compile",
    "samples/s",
    "peak mem (GiB)",
    "status",
)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _row_label(m: Measurement) -> str:
    return "baseline (HF LLaVA)" if m.row == "baseline" else f"lit-mllm {m.row}"


def render_report(
    header: list[str],
    reports: list[RowReport],
    loader: list[LoaderResult],
    peak: float,
    notes: list[str],
) -> str:
    finals = [r.final for r in reports if r.final is not None]
    base = {m.decoder: m for m in finals if m.row == "baseline" and m.ok}
    lines = list(header) + ["", "## Training throughput (best micro-batch per row)", ""]
    rows = []
    for m in finals:
        ref = base.get(m.decoder)
        speedup = m.samples_per_s / ref.samples_per_s if ref and m.ok else float("nan")
        rows.append(
            [
                _row_label(m),
                m.decoder,
                m.connector,
                str(m.image_tokens),
                str(m.batch_size),
                m.attention,
                "yes" if m.compiled else "no",
                _fmt(m.step_ms),
                _fmt(m.samples_per_s, 2),
                _fmt(m.supervised_per_s, 0),
                _fmt(m.real_per_s, 0),
                _fmt(m.peak_gib, 2),
                _fmt(m.padding_pct),
                _fmt(m.tflop_per_step(), 2),
                _fmt(m.mfu(peak)),
                f"{_fmt(speedup, 2)}x" if math.isfinite(speedup) else "-",
                m.status,
            ]
        )
    lines += _table(TRAIN_COLUMNS, rows)

    profiles = [r.profile for r in reports if r.profile]
    if profiles:
        lines += ["", "## Where the step time goes (torch.profiler)", ""]
        for text in profiles:
            lines += [text, ""]

    gens = [r.generation for r in reports if r.generation is not None]
    if gens:
        gen_base = {g.decoder: g for g in gens if g.row == "baseline" and g.status == "ok"}
        lines += ["", "## Validation captioning speed (batched greedy decoding)", ""]
        rows = []
        for g in gens:
            ref = gen_base.get(g.decoder)
            ratio = g.captions_per_s / ref.captions_per_s if ref else float("nan")
            label = "baseline (HF LLaVA)" if g.row == "baseline" else f"lit-mllm {g.row}"
            rows.append(
                [
                    label,
                    g.decoder,
                    str(g.batch_size),
                    str(g.new_tokens),
                    _fmt(g.captions_per_s, 2),
                    f"{_fmt(ratio, 2)}x" if math.isfinite(ratio) else "-",
                    g.status,
                ]
            )
        lines += _table(GEN_COLUMNS, rows)

    if loader:
        lit = [m.samples_per_s for m in finals if m.row != "baseline" and m.ok]
        best_train = max(lit) if lit else float("nan")
        lines += ["", "## Data loader (MLLMDataModule, JPEG decode + transform + tokenise)", ""]
        rows = []
        for r in loader:
            ratio = r.samples_per_s / best_train if math.isfinite(best_train) else float("nan")
            rows.append(
                [
                    str(r.workers),
                    str(r.batch_size),
                    str(r.image_size),
                    _fmt(r.samples_per_s),
                    _fmt(best_train, 2),
                    f"{_fmt(ratio, 2)}x" if math.isfinite(ratio) else "-",
                ]
            )
            if r.status != "ok":
                rows[-1][3] = r.status
        lines += _table(LOADER_COLUMNS, rows)

    probes = [p for r in reports for p in r.probes]
    if probes:
        lines += ["", "## Probes (short runs that chose attention, compile and micro-batch)", ""]
        rows = [
            [
                _row_label(p),
                p.decoder,
                p.stage,
                str(p.batch_size),
                p.attention,
                "yes" if p.compiled else "no",
                _fmt(p.samples_per_s, 2),
                _fmt(p.peak_gib, 2),
                p.status,
            ]
            for p in probes
        ]
        lines += _table(PROBE_COLUMNS, rows)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import timm
    import transformers

    flash = importlib.util.find_spec("flash_attn") is not None
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, timm {timm.__version__}, flash-attn "
        f"{'installed' if flash else 'not installed'}, torch varlen_attn "
        f"{'available' if _torch_varlen() is not None else 'absent'}"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def build_notes(args: argparse.Namespace, sizes: Sizes, device: torch.device) -> list[str]:
    cuda = device.type == "cuda"
    precision = "bf16 autocast" if cuda else "float32 (CPU, tiny sizes)"
    vision = "CLIP ViT-L/14-336" if sizes is REAL else f"a micro CLIP ({sizes.clip})"
    vocab = sorted({int(d["vocab_size"]) for d in sizes.decoders.values()})
    memory = (
        "peak allocated GPU memory over the timed steps, weights and optimizer included"
        if cuda
        else "on CPU: the process's peak resident set, not comparable between rows"
    )
    return [
        f"Timing: {args.warmup} warm-up steps excluded, then {args.steps} timed steps per row at "
        f"its best micro-batch; probes use {args.probe_warmup} warm-up + {args.probe_steps} "
        "timed steps. Batches are collated before the clock starts (the loader is measured on "
        "its own below). A micro-batch fits when it neither runs out of memory nor exceeds the "
        f"memory budget. Peak mem: {memory}.",
        f"Data: the same seeded stream for every row: text lengths lognormal(median "
        f"{sizes.text_median}, sigma {sizes.text_sigma}) clipped to [{sizes.text_min}, "
        f"{sizes.text_max}] tokens, 1-4 user/assistant turns, assistant share ~Beta(3,7) (mean "
        f"30 %), one {sizes.image_size}px image per sample ({sizes.patches} patches); random "
        "token ids and pixels.",
        f"Baseline: transformers LlavaForConditionalGeneration(LlavaConfig({vision}, "
        f"Qwen2 text config, MLP projector, vision_feature_layer -2)), fp32 weights, {precision}, "
        "attn_implementation='sdpa', vision tower requires_grad False, right-padded batches with "
        "attention_mask and -100 labels, loss from model(labels=...) (full-vocabulary logits), "
        "torch.optim.AdamW (default foreach), plain loop.",
        f"lit-mllm: MLLMModule (timm {sizes.encoder_name}, pretrained false, feature_layer -2; "
        f"decoder from a Qwen2 `config:` dict, vocab {vocab[0]}, train full) stepped "
        f"as module(batch) -> loss; loss.backward(); AdamW(fused={cuda}).step(): packing (one row "
        "per micro-batch, position_ids restarting per sample, attention_mask None), chunked "
        f"loss on supervised positions only, frozen encoder in {'bf16' if cuda else 'fp32'} "
        f"weights under no_grad, trainable weights fp32 under {precision}.",
        "Attention for packed rows: 'sdpa' = transformers' block-diagonal mask from position_ids "
        "(dense SDPA over the whole packed row); 'varlen' = PyTorch's built-in flash-attention "
        "varlen kernel (torch.nn.attention.varlen.varlen_attn) registered as a transformers "
        "attention function by this script; 'flash_attention_2' only when flash-attn is "
        "installed. Compile = torch.compile of every decoder layer (dynamic shapes) and encoder "
        "block; kept only when it wins the probe by more than 2 %.",
        "MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s of the device "
        "(lit_mllm.flops): per image encoder forward only 2*N_enc*T + 4*L_enc*D_enc*T^2 "
        "(T = patches + CLS); connector 6*N_conn*P (+ 12*Q*P*D for the resampler); decoder "
        "6*N_body*sum(S_i) + 12*L*D_attn*sum(S_i^2) with S_i the real sample lengths (padding "
        "not counted), plus the LM head 6*V*D per supervised token. Same formula for every row.",
        f"Captioning: batched greedy decoding of exactly {args.gen_tokens} new tokens "
        "(min_new_tokens = max_new_tokens) from a 12-token prompt with one image, training "
        "weights under the same autocast, KV cache on; lit-mllm via MultimodalLM.generate "
        "(SDPA, uncompiled), baseline via LlavaForConditionalGeneration.generate; first batch "
        "is warm-up.",
        "Data loader: MLLMDataModule (task instruct, packing, tiny tokenizer, the encoder's timm "
        "transform) over the synthetic set written as JPEG; the first batch (worker start-up) is "
        "excluded. It must exceed the training samples/s to keep the GPU fed.",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for all rows (set by the script).",
    ]


# ----------------------------------------------------------------------------------- CLI


def parse_batch_sizes(text: str | None, tiny: bool) -> dict[str, list[int]]:
    """``8,16,32`` for every row, or ``baseline=2,4;mlp=8,16;resampler=16,32`` per row."""
    sizes = {k: list(v) for k, v in (TINY_BATCH_SIZES if tiny else DEFAULT_BATCH_SIZES).items()}
    if not text:
        return sizes
    if "=" not in text:
        values = [int(v) for v in text.split(",") if v.strip()]
        return {row: list(values) for row in ROWS}
    for part in text.split(";"):
        if not part.strip():
            continue
        row, _, values = part.partition("=")
        row = row.strip()
        if row not in ROWS:
            raise ValueError(f"--batch-sizes: unknown row {row!r}; expected one of {ROWS}")
        sizes[row] = [int(v) for v in values.split(",") if v.strip()]
    return sizes


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoders", default="0.5b,1.5b", help="comma list of 0.5b, 1.5b")
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of baseline,mlp,resampler")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10; tiny 1)")
    p.add_argument("--batch-sizes", default=None, help="'8,16,32' or 'baseline=2,4;mlp=8,16;...'")
    p.add_argument("--mem-budget-gb", type=float, default=None, help="default: the whole GPU")
    p.add_argument("--probe-steps", type=int, default=None, help="timed steps per probe (3)")
    p.add_argument("--probe-warmup", type=int, default=None, help="warm-up steps per probe (2)")
    p.add_argument("--lit-attn", default="auto", choices=["auto", "sdpa", "varlen"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak")
    p.add_argument("--gen-batch-size", type=int, default=None, help="captions per batch (32)")
    p.add_argument("--gen-batches", type=int, default=None, help="timed batches (3; 0 = skip)")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--loader-workers", default=None, help="comma list (default: min(8, cores))")
    p.add_argument("--loader-batch-size", type=int, default=None)
    p.add_argument("--loader-batches", type=int, default=None, help="timed batches (0 = skip)")
    p.add_argument("--loader-image-size", type=int, default=None, help="JPEG side (512)")
    p.add_argument("--loader-dir", default=None, help="where to write the JPEG set (temp dir)")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="skip rows that would end after this many seconds (GPU default 540; 0 = none)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after each row's final run, profile this many steps (CUDA; 0 = off)",
    )
    p.add_argument(
        "--text-tokens",
        default=None,
        help="text length distribution as MIN,MEDIAN,MAX (default 64,200,1024; tiny 8,20,64), "
        "e.g. 20,34,71 to match the synthetic captions of `lit-mllm fit`",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="micro sizes, CPU-friendly smoke run")
    p.add_argument("--out", default=None, help="write the markdown here (and a .json beside)")
    return p


def resolve_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    tiny = args.tiny
    defaults = {
        "steps": 2 if tiny else 20,
        "warmup": 1 if tiny else 10,
        "probe_steps": 1 if tiny else 3,
        "probe_warmup": 1 if tiny else 2,
        "gen_batch_size": 2 if tiny else 32,
        "gen_batches": 1 if tiny else 3,
        "loader_batch_size": 4 if tiny else 32,
        "loader_batches": 2 if tiny else 20,
        "loader_image_size": 64 if tiny else 512,
        "time_limit_s": 0 if tiny else 540,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.loader_workers is None:
        args.loader_workers = "0" if tiny else str(min(8, os.cpu_count() or 1))
    args.loader_workers = [int(w) for w in _csv(args.loader_workers)]
    args.decoders = _csv(args.decoders)
    args.rows = _csv(args.rows)
    for row in args.rows:
        if row not in ROWS:
            raise ValueError(f"--rows: unknown row {row!r}; expected some of {ROWS}")
    for dec in args.decoders:
        if dec not in REAL.decoders:
            raise ValueError(f"--decoders: unknown decoder {dec!r}; expected {list(REAL.decoders)}")
    args.batch_sizes = parse_batch_sizes(args.batch_sizes, tiny)
    if args.text_tokens:
        lengths = tuple(int(v) for v in _csv(args.text_tokens))
        if len(lengths) != 3 or not 0 < lengths[0] <= lengths[1] <= lengths[2]:
            raise ValueError(
                f"--text-tokens: need MIN,MEDIAN,MAX with 0 < MIN <= MEDIAN <= MAX, got {args.text_tokens}"
            )
        args.text_tokens = lengths
    if args.steps < 1 or args.probe_steps < 1:
        raise ValueError("--steps and --probe-steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; return the markdown report (also printed and written to --out)."""
    args = resolve_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit(
            "No CUDA device: the real sizes need a GPU. Use --tiny for a CPU smoke run."
        )
    threads = torch.get_num_threads()
    if not cuda:  # micro models gain nothing from threads, and lose a lot on a busy machine
        torch.set_num_threads(1)
    try:
        return _run(args, cuda, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, cuda: bool, argv: Sequence[str] | None) -> str:
    device = torch.device("cuda" if cuda else "cpu")
    sizes = TINY if args.tiny else REAL
    if args.text_tokens:
        low, median, high = args.text_tokens
        sizes = replace(sizes, text_min=low, text_median=median, text_max=high)
    torch.manual_seed(args.seed)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    peak = (args.peak_tflops * 1e12) if args.peak_tflops else None
    peak = peak or (peak_flops(torch.cuda.get_device_name(device), "bf16-mixed") if cuda else None)
    peak_note = "from --peak-tflops" if args.peak_tflops else "device table (lit_mllm.flops)"
    if peak is None:
        peak, peak_note = 1e12, "unknown device: nominal 1 TFLOP/s, MFU not meaningful"
    budget = None
    if args.mem_budget_gb is not None:
        budget = int(args.mem_budget_gb * 2**30)
    elif cuda:
        budget = int(torch.cuda.get_device_properties(device).total_memory)

    vocab = min(int(sizes.decoders[d]["vocab_size"]) for d in args.decoders)
    stream = SampleStream(sizes, args.seed, (16, vocab - 16))
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__), *given])
    header = [
        "# lit-mllm training throughput vs a transformers LLaVA baseline",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {_device_name(device)}; peak dense bf16 {peak / 1e12:.0f} TFLOP/s "
        f"({peak_note})",
        f"- versions: {_versions()}",
        f"- command: `{command}`",
        f"- memory budget per row: {'whole device' if budget is None else f'{budget / 2**30:.1f} GiB'}",
    ]
    started = time.perf_counter()
    reports: list[RowReport] = []
    loader: list[LoaderResult] = []
    timeline: list[str] = []

    def publish(final: bool) -> str:
        """Render and write what is measured so far: a run cut short still leaves a report."""
        notes = build_notes(args, sizes, device)
        elapsed = time.perf_counter() - started
        state = "" if final else " (run in progress: partial report)"
        notes.append(f"Wall time {elapsed:.0f}s{state}: " + ", ".join(timeline) + ".")
        text = render_report(header, reports, loader, peak, notes)
        if args.out:
            write_outputs(Path(args.out), text, header, reports, loader, peak)
        return text

    if args.loader_batches > 0:  # CPU only and short: first, so a time limit never skips it
        t0 = time.perf_counter()
        loader = loader_benchmark(args, sizes)
        timeline.append(f"loader {time.perf_counter() - t0:.0f}s")
    choices = Choices()
    for decoder in args.decoders:
        for row in [r for r in ROWS if r in args.rows]:
            elapsed = time.perf_counter() - started
            done = [r.seconds for r in reports]
            expected = max(done) if done else 0.0
            if args.time_limit_s and elapsed + expected > args.time_limit_s:
                reason = f"skipped: --time-limit-s {args.time_limit_s:.0f} would be exceeded"
                reports.append(RowReport(final=placeholder_row(row, decoder, reason)))
                timeline.append(f"{decoder}/{row} skipped")
                continue
            report = run_row(row, decoder, sizes, device, stream, args, choices, budget)
            reports.append(report)
            timeline.append(f"{decoder}/{row} {report.seconds:.0f}s")
            status = report.final.status if report.final else "-"
            clock = f"[{time.perf_counter() - started:6.0f}s]"
            print(f"{clock} {decoder} {row}: {status}", file=sys.stderr)
            publish(final=False)
    text = publish(final=True)
    print(text)
    return text


def write_outputs(
    out: Path,
    text: str,
    header: list[str],
    reports: list[RowReport],
    loader: list[LoaderResult],
    peak: float,
) -> None:
    """The markdown report and, beside it, the raw numbers as JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {
        "header": header,
        "rows": [asdict(r.final) for r in reports if r.final is not None],
        "probes": [asdict(p) for r in reports for p in r.probes],
        "generation": [asdict(r.generation) for r in reports if r.generation is not None],
        "loader": [asdict(r) for r in loader],
        "peak_flops": peak,
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
