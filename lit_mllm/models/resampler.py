"""MiniCPM-V / OmniLMM perceiver resampler: patch tokens -> a fixed number of query tokens.

One cross-attention layer from ``num_queries`` learned queries to the image patches. Both
sides carry fixed 2D sin-cos position embeddings: the query grid on the queries, the patch
grid on the keys (never on the values). The parameter names mirror the OmniLMM module
(``query``, ``kv_proj``, ``attn.in_proj_weight`` ..., ``ln_q``, ``ln_kv``, ``ln_post``,
``proj``) so its checkpoints load after dropping their ``pos_embed`` entry; here the position
tables are non-persistent buffers rebuilt from the formula, so they never enter checkpoints.

The attention is computed batch-first with ``F.scaled_dot_product_attention``; the tests check
it against the textbook sequence-first ``nn.MultiheadAttention`` formulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_mllm.models.grid_resize import resize_grid

__all__ = ["Resampler", "sincos_pos_embed_1d", "sincos_pos_embed_2d", "resize_pos_embed"]


def _as_grid(grid: tuple[int, int] | int) -> tuple[int, int]:
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be positive, got {(gh, gw)}")
    return int(gh), int(gw)


def sincos_pos_embed_1d(dim: int, pos: Tensor) -> Tensor:
    """Transformer sin-cos code of positions ``pos`` (M,) -> (M, dim): [sin | cos].

    Frequencies ``omega_i = 1 / 10000 ** (2 i / dim)`` for ``i < dim / 2``; computed in float64.
    """
    if dim % 2:
        raise ValueError(f"1D sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) * 2.0 / dim)
    angles = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int] | int) -> Tensor:
    """2D sin-cos table (gh * gw, dim) for a row-major patch grid, float32.

    As in MAE/OmniLMM: the first ``dim/2`` channels encode the column (w) index, the last
    ``dim/2`` the row (h) index, each as a 1D [sin | cos] code.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = _as_grid(grid)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    emb = torch.cat(
        [
            sincos_pos_embed_1d(dim // 2, cols.flatten()),
            sincos_pos_embed_1d(dim // 2, rows.flatten()),
        ],
        dim=1,
    )
    return emb.to(torch.float32)


def resize_pos_embed(table: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Bicubically resize a (src_h * src_w, D) table to (dst_h * dst_w, D) (align_corners=False,
    no antialiasing: OmniLMM's ``get_abs_pos``), as two matrix products (``grid_resize``)."""
    return resize_grid(table, tuple(src), tuple(dst), antialias=False)


class _CrossAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters and state-dict keys."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # nn.MultiheadAttention's own init; OmniLMM's Linear re-init then hits out_proj only.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def _heads(self, x: Tensor) -> Tensor:
        *lead, length, dim = x.shape
        return x.reshape(*lead, length, self.num_heads, dim // self.num_heads).transpose(-3, -2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """query (Q, E) shared by the batch; key/value (B, P, E); mask (B, P) True = attend."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch = key.shape[0]
        q = self._heads(F.linear(query, w_q, b_q)).unsqueeze(0).expand(batch, -1, -1, -1)
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Resampler(nn.Module):
    """Cross-attention resampler (OmniLMM / MiniCPM-V): (B, P, kv_dim) -> (B, Q, embed_dim).

    Args:
        num_queries: number of output tokens; a perfect square (the query grid is its root).
        embed_dim: output width (the decoder hidden size).
        kv_dim: width of the encoder patch tokens; projected without bias when it differs.
        kv_grid: the encoder's default patch grid; other grids get the key position table
            bicubically resized.
        num_heads: attention heads; default ``embed_dim // 128`` (at least 1).
        key_pos_grid: "kv_grid" builds the key table on ``kv_grid`` (default);
            "query_grid" resizes the query-grid table instead, which is literally what
            OmniLMM's ``get_abs_pos`` does (use it to load OmniLMM resampler weights).
    """

    def __init__(
        self,
        num_queries: int,
        embed_dim: int,
        kv_dim: int,
        kv_grid: tuple[int, int] | int,
        num_heads: int | None = None,
        key_pos_grid: Literal["kv_grid", "query_grid"] = "kv_grid",
    ) -> None:
        super().__init__()
        side = math.isqrt(num_queries)
        if num_queries < 1 or side * side != num_queries:
            raise ValueError(f"num_queries must be a perfect square, got {num_queries}")
        if key_pos_grid not in ("kv_grid", "query_grid"):
            raise ValueError(
                f"key_pos_grid must be 'kv_grid' or 'query_grid', got {key_pos_grid!r}"
            )
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.kv_dim = kv_dim
        self.query_grid = (side, side)
        self.kv_grid = _as_grid(kv_grid)
        self.num_heads = num_heads if num_heads is not None else max(1, embed_dim // 128)
        self.key_pos_grid = key_pos_grid
        self._pos_grid = self.kv_grid if key_pos_grid == "kv_grid" else self.query_grid

        # Fixed tables: buffers follow .to()/dtype casts but stay out of state_dict.
        self.register_buffer("query_pos", sincos_pos_embed_2d(embed_dim, side), persistent=False)
        self.register_buffer(
            "key_pos", sincos_pos_embed_2d(embed_dim, self._pos_grid), persistent=False
        )
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        self.kv_proj = (
            nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        )
        self.attn = _CrossAttention(embed_dim, self.num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))

        nn.init.trunc_normal_(self.query, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def key_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Key position table (gh * gw, embed_dim) for an input patch grid."""
        return resize_pos_embed(self.key_pos, self._pos_grid, _as_grid(grid))

    def forward(
        self,
        x: Tensor,
        grid: tuple[int, int] | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, P, kv_dim) patch tokens on ``grid`` (default ``kv_grid``) -> (B, Q, embed_dim).

        ``key_padding_mask`` (B, P) bool, True marks padded patches to ignore (as in
        ``nn.MultiheadAttention``); a row must keep at least one patch.
        """
        grid = self.kv_grid if grid is None else _as_grid(grid)
        if x.ndim != 3 or x.shape[1] != grid[0] * grid[1] or x.shape[2] != self.kv_dim:
            raise ValueError(
                f"Resampler expects (B, {grid[0]}*{grid[1]}, {self.kv_dim}) for grid {grid}, "
                f"got {tuple(x.shape)}"
            )
        mask = None if key_padding_mask is None else ~key_padding_mask.to(torch.bool)
        return self._attend(x, self.key_pos_embed(grid), mask)

    def _attend(self, x: Tensor, key_pos: Tensor, mask: Tensor | None) -> Tensor:
        """The queries' cross-attention to patches ``x`` whose keys carry ``key_pos``
        ((P, E), or (B, P, E) when rows differ); ``mask`` (B, P) True = attend."""
        kv = self.ln_kv(self.kv_proj(x))
        keys = kv + key_pos.to(kv.dtype)
        queries = self.ln_q(self.query)
        queries = queries + self.query_pos.to(queries.dtype)
        out = self.attn(queries, keys, kv, mask)
        return self.ln_post(out) @ self.proj

    def forward_groups(
        self, features: Sequence[Tensor], grids: Sequence[tuple[int, int]]
    ) -> list[Tensor]:
        """Views of several sizes in one attention call: group g is (n_g, gh*gw, kv_dim) on
        ``grids[g]``. Rows are padded to the longest, each row's keys carry the sin-cos
        positions of its own grid, and padded keys are masked, so a view gives what it gives
        alone. Returns one (n_g, num_queries, embed_dim) tensor per group."""
        if len(features) == 1:
            return [self(features[0], grids[0])]
        longest = max(x.shape[1] for x in features)
        rows, positions, masks = [], [], []
        for x, grid in zip(features, grids, strict=True):
            count, patches = x.shape[0], x.shape[1]
            if patches != grid[0] * grid[1]:
                raise ValueError(f"{patches} patch tokens do not form the grid {tuple(grid)}")
            pad = longest - patches
            rows.append(F.pad(x, (0, 0, 0, pad)))
            table = F.pad(self.key_pos_embed(grid), (0, 0, 0, pad))
            positions.append(table.unsqueeze(0).expand(count, -1, -1))
            mask = torch.arange(longest, device=x.device) < patches
            masks.append(mask.unsqueeze(0).expand(count, -1))
        out = self._attend(torch.cat(rows), torch.cat(positions), torch.cat(masks))
        return list(out.split([x.shape[0] for x in features]))
