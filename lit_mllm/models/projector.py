"""LLaVA-1.5 connector: a two-layer MLP applied to every patch token, optionally after a
pixel shuffle that merges each ``merge x merge`` block of patches into one token (InternVL,
nanoVLM, MiniCPM-V 4): sliced images give many patches, and this bounds the token count."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLPProjector"]


class MLPProjector(nn.Module):
    """Linear(in_dim * merge² -> out_dim) - GELU - Linear(out_dim -> out_dim).

    One token per patch (``merge=1``, LLaVA-1.5), or per ``merge x merge`` block of patches,
    whose features are concatenated row-major first (the grid sides must divide by ``merge``).
    """

    def __init__(self, in_dim: int, out_dim: int, merge: int = 1) -> None:
        super().__init__()
        if merge < 1:
            raise ValueError(f"merge must be >= 1, got {merge}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.merge = merge
        self.fc1 = nn.Linear(in_dim * merge * merge, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """x (B, P, in_dim) on ``grid`` -> (B, P / merge², out_dim)."""
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"MLPProjector expects (B, P, {self.in_dim}), got {tuple(x.shape)}")
        if grid is not None and x.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{x.shape[1]} patch tokens do not form the grid {tuple(grid)}")
        if self.merge > 1:
            x = self.pixel_shuffle(x, grid)
        return self.fc2(self.act(self.fc1(x)))

    def pixel_shuffle(self, x: Tensor, grid: tuple[int, int] | None) -> Tensor:
        """(B, gh*gw, D) -> (B, gh/m * gw/m, m*m*D): each m x m block becomes one token."""
        if grid is None:
            raise ValueError("MLPProjector with merge > 1 needs the patch grid")
        (gh, gw), m = grid, self.merge
        if gh % m or gw % m:
            raise ValueError(
                f"patch grid {tuple(grid)} does not divide into {m}x{m} blocks (connector.merge "
                f"{m}): use image sides that are multiples of the patch size times {m}"
            )
        batch, _, dim = x.shape
        x = x.reshape(batch, gh // m, m, gw // m, m, dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, (gh // m) * (gw // m), m * m * dim)

    def forward_groups(
        self, features: Sequence[Tensor], grids: Sequence[tuple[int, int]]
    ) -> list[Tensor]:
        """Views of several sizes (one tensor per size): applied group by group."""
        return [self(x, grid) for x, grid in zip(features, grids, strict=True)]
