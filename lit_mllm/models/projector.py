"""LLaVA-1.5 connector: a two-layer MLP applied to every patch token (no token reduction)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLPProjector"]


class MLPProjector(nn.Module):
    """Linear(in_dim -> out_dim) - GELU - Linear(out_dim -> out_dim), one token per patch.

    The ``grid`` argument of ``forward`` only validates the token count, so the projector
    and the resampler are interchangeable behind the same call.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """x (B, P, in_dim) -> (B, P, out_dim); P must equal gh * gw when ``grid`` is given."""
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"MLPProjector expects (B, P, {self.in_dim}), got {tuple(x.shape)}")
        if grid is not None and x.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{x.shape[1]} patch tokens do not form the grid {tuple(grid)}")
        return self.fc2(self.act(self.fc1(x)))
