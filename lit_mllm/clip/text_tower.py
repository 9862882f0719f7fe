"""The caption side of CLIP-style pretraining: a small bidirectional transformer over token ids.

It exists only to teach the image encoder; after pretraining it is thrown away (the multimodal
model uses its own decoder), so it stays deliberately plain.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TextTower(nn.Module):
    """Token ids (B, T) + mask (B, T) -> one embedding per caption (B, embed_dim), mean-pooled."""

    def __init__(
        self,
        vocab_size: int,
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        max_length: int = 64,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.position_embedding, std=0.01)
        layer = nn.TransformerEncoderLayer(
            width,
            num_heads,
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"caption of {input_ids.shape[1]} tokens is longer than the text tower's "
                f"max_length {self.max_length}; raise `text.max_length`"
            )
        keep = attention_mask.bool()
        hidden = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        hidden = self.norm(self.blocks(hidden, src_key_padding_mask=~keep))
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.proj(pooled)
