"""Pick the vision-to-language connector by name and know its image-token count up front.

The number of ``<im_patch>`` placeholders in the text must be fixed before any image is
encoded, so it comes from the connector config (the one source of truth), not a forward pass.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from lit_mllm.models.projector import MLPProjector
from lit_mllm.models.resampler import Resampler

__all__ = ["ConnectorKind", "build_connector", "num_image_tokens"]

ConnectorKind = Literal["resampler", "mlp"]


def build_connector(
    kind: ConnectorKind,
    *,
    kv_dim: int,
    embed_dim: int,
    kv_grid: tuple[int, int],
    num_queries: int = 64,
    key_pos_grid: Literal["kv_grid", "query_grid"] = "kv_grid",
    num_heads: int | None = None,
    merge: int = 1,
) -> nn.Module:
    """Resampler (``num_queries`` tokens) or LLaVA MLP (one token per ``merge x merge`` patches);
    both take (x, grid), and views of several sizes through ``forward_groups``."""
    if kind == "resampler":
        return Resampler(
            num_queries,
            embed_dim,
            kv_dim,
            tuple(kv_grid),
            num_heads=num_heads,
            key_pos_grid=key_pos_grid,
        )
    if kind == "mlp":
        return MLPProjector(kv_dim, embed_dim, merge=merge)
    raise ValueError(f"Unknown connector kind {kind!r}; expected 'resampler' or 'mlp'.")


def num_image_tokens(
    kind: ConnectorKind, kv_grid: tuple[int, int], num_queries: int = 64, merge: int = 1
) -> int:
    """Tokens one image occupies in the text: ``num_queries``, or (gh / merge) * (gw / merge)
    of the default grid."""
    if kind == "resampler":
        return num_queries
    if kind == "mlp":
        return (int(kv_grid[0]) // merge) * (int(kv_grid[1]) // merge)
    raise ValueError(f"Unknown connector kind {kind!r}; expected 'resampler' or 'mlp'.")
