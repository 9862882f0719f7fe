"""The two scales (real sizes on a GPU, micro sizes for the CPU smoke run) and the rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lit_mllm.data.slicing import ImageSlicing

# the default run: the naive and the best-tuned transformers LLaVA, then lit-mllm's two connectors
# the tuned transformers loop twice: compiled without liger-kernel, and with liger-kernel eager
# (liger's autograd Functions do not trace under torch.compile); the faster one is the bar
BEST_ROWS = ("best-transformers", "best-transformers-liger")
ROWS = ("baseline", *BEST_ROWS, "mlp", "resampler")
BASELINE_ROWS = ("baseline", *BEST_ROWS)
# sliced images (MiniCPM-V adaptive slicing), only when --rows names them: the resampler
# model reading a thumbnail + slices per image, packed, and the same model on right-padded rows
SLICED_ROWS = ("resampler-sliced", "resampler-sliced-padded")
ALL_ROWS = ROWS + SLICED_ROWS


def row_label(row: str) -> str:
    """How a row is named in the report's tables."""
    if row == "baseline":
        return "naive transformers LLaVA"
    if row == "best-transformers":
        return "best transformers LLaVA (compiled)"
    if row == "best-transformers-liger":
        return "best transformers LLaVA (liger)"
    return f"lit-mllm {row}"


def row_connector(row: str) -> str:
    """The connector of a row's model: the baselines' projector is an MLP."""
    return "mlp" if row in BASELINE_ROWS else row.split("-")[0]


def is_sliced(row: str) -> bool:
    return row in SLICED_ROWS


def is_padded(row: str) -> bool:
    """Rows trained on right-padded batches (one row per sample) rather than packed ones."""
    return row == "baseline" or row.endswith("-padded")


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
    # the sliced rows: how images are cut (scale_resolution = the encoder's native side) and
    # the most views (thumbnail + slices) an image of the stream may have
    slicing: ImageSlicing
    max_views: int

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
    slicing=ImageSlicing(max_slices=9, scale_resolution=336, patch_size=14),
    max_views=9,
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
    slicing=ImageSlicing(max_slices=9, scale_resolution=32, patch_size=8),
    max_views=5,
)

DEFAULT_BATCH_SIZES = {
    "baseline": [4, 8, 12, 16],
    "best-transformers": [8, 16, 32, 48],
    "best-transformers-liger": [8, 16, 32, 48],
    "mlp": [16, 32, 48, 64],
    "resampler": [16, 32, 64, 128],
    "resampler-sliced": [8, 16, 32, 64],  # ~5 views of 64 tokens per image: longer samples
    "resampler-sliced-padded": [8, 16, 32, 64],
}
TINY_BATCH_SIZES = {row: [2, 4] for row in ALL_ROWS}
