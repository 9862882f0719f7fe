"""Frozen timm vision encoder that returns patch tokens and their grid.

The encoder is never trained: it is built once, its weights are loaded from a local file
(offline first, so a missing checkpoint fails fast with instructions instead of hanging on
the network), it is cast to the configured dtype and it stays in eval mode even when the
parent LightningModule switches to train mode.

``feature_layer`` convention:

* ``-1`` (default): output of the last block *after* the final norm (``forward_features``),
  the usual choice for CLIP/EVA encoders (OmniLMM/MiniCPM-V).
* any other value ``i``: output of block ``i`` *without* norm, via timm
  ``forward_intermediates``; negative values count from the end like Python indices, so
  ``-2`` is the penultimate block (LLaVA's ``hidden_states[-2]``) and ``depth - 1`` is the
  last block without the final norm.

Prefix tokens (CLS, registers) are always dropped: callers get ``(B, P, D)`` patch tokens and
the ``(gh, gw)`` grid they form, which changes with the input size when the model supports
dynamic image sizes (timm ``dynamic_img_size=True, dynamic_img_pad=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from lit_mllm.models.attention import varlen_available
from lit_mllm.models.packed_vision import PackedViT, can_pack
from lit_mllm.models.weights import (
    load_timm_weights,
    resolve_hub_checkpoint,
    resolve_local_checkpoint,
)

__all__ = ["VisionEncoder", "create_backbone", "image_data_config"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def create_backbone(model_name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A random-init timm model without head, at dynamic input sizes where it accepts them.

    Shared by the frozen encoder and by the tiny encoder's own pretraining, so the weights the
    pretraining writes load into exactly the architecture the multimodal model builds.
    """
    base = {"num_classes": 0}
    dynamic = {"dynamic_img_size": True, "dynamic_img_pad": True}
    kwargs = dict(model_kwargs or {})
    try:
        return timm.create_model(model_name, pretrained=False, **{**base, **dynamic, **kwargs})
    except TypeError as err:
        if "dynamic_img" not in str(err):
            raise ValueError(f"timm.create_model({model_name!r}) failed: {err}") from None
    return timm.create_model(model_name, pretrained=False, **{**base, **kwargs})


def image_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing config of ``model``, with ``input_size`` following the model's own
    ``img_size`` (a custom-sized ViT keeps the pretrained config's 224 otherwise)."""
    cfg = dict(timm.data.resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], int(img_size[0]), int(img_size[1]))
    return cfg


class VisionEncoder(nn.Module):
    """Frozen timm backbone: ``forward(pixels) -> (patch tokens (B, P, D), (gh, gw))``.

    Args:
        model_name: any timm model name, with or without pretrained tag.
        pretrained: load the timm hub weights from the local HF cache (offline).
        checkpoint_path: local weight file or directory holding one; wins over ``pretrained``.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. a tiny ViT for tests).
        feature_layer: -1 = final normed output, other = that block's output (see module doc).
        dtype: dtype of the weights and of the returned features.
        sincos_pos_embed: for random-init ViTs: replace the random learned position table
            (std 0.02, so the features barely say where a patch is) by a fixed 2D sin-cos table
            (as in MAE). Pretrained encoders have learned positions; a random tiny one needs
            this for captions that say where things are.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        feature_layer: int = -1,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        sincos_pos_embed: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if not timm.is_model(model_name):
            raise ValueError(f"Unknown timm model {model_name!r} (see timm.list_models()).")
        self.model_name = model_name
        self.feature_layer = feature_layer

        weights: Path | None = None
        if checkpoint_path is not None:
            weights = resolve_local_checkpoint(checkpoint_path)
        elif pretrained:
            weights = resolve_hub_checkpoint(model_name)

        self.model = create_backbone(model_name, model_kwargs)
        self._check_feature_layer()
        if weights is not None:
            load_timm_weights(self.model, weights, model_name)
        elif sincos_pos_embed:
            self._set_sincos_pos_embed()

        self.model.to(_DTYPES[dtype])
        self.requires_grad_(False)
        self.train(False)
        self.packed: PackedViT | None = None  # views of several sizes in one pass (plain ViTs)
        if can_pack(self.model):
            depth = len(self.model.blocks)
            stop = depth if self.feature_layer == -1 else self.feature_layer % depth + 1
            self.packed = PackedViT(self.model, stop, final_norm=self.feature_layer == -1)

    def _set_sincos_pos_embed(self) -> None:
        from lit_mllm.models.resampler import sincos_pos_embed_2d

        table = getattr(self.model, "pos_embed", None)
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if not isinstance(table, nn.Parameter) or grid is None:
            raise ValueError(
                f"sincos_pos_embed needs a ViT with a learned `pos_embed` table; "
                f"timm model {self.model_name!r} has none"
            )
        patches = int(grid[0]) * int(grid[1])
        prefix = table.shape[1] - patches  # class/register tokens, when they carry positions
        sincos = sincos_pos_embed_2d(table.shape[-1], (int(grid[0]), int(grid[1])))
        with torch.no_grad():
            table[:, prefix:] = sincos.reshape(1, patches, -1).to(table.dtype)
            table[:, :prefix] = 0.0

    def _check_feature_layer(self) -> None:
        if self.feature_layer == -1:
            return
        if not (hasattr(self.model, "forward_intermediates") and hasattr(self.model, "blocks")):
            raise ValueError(
                f"feature_layer={self.feature_layer} needs a transformer with `blocks` and "
                f"forward_intermediates, which timm model {self.model_name!r} lacks; use -1."
            )
        depth = len(self.model.blocks)
        if not -depth <= self.feature_layer < depth:
            raise ValueError(
                f"feature_layer={self.feature_layer} is out of range for {self.model_name!r} "
                f"with {depth} blocks (valid: {-depth}..{depth - 1})."
            )

    def train(self, mode: bool = True) -> VisionEncoder:
        """Always eval: dropout/drop-path of a frozen encoder must never switch on."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.model, "embed_dim", None) or self.model.num_features)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def patch_size(self) -> int | None:
        """Side of a (square) patch in pixels, or None without a patch embedding."""
        size = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        if size is None:
            return None
        height, width = (size, size) if isinstance(size, int) else size
        return int(height) if height == width else None

    @property
    def data_config(self) -> dict[str, Any]:
        return image_data_config(self.model)

    @property
    def default_grid(self) -> tuple[int, int]:
        """Patch grid for the default input size (``data_config['input_size']``)."""
        _, h, w = self.data_config["input_size"]
        return self.grid_for(h, w)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid produced for an ``height x width`` input."""
        pe = getattr(self.model, "patch_embed", None)
        if pe is not None and hasattr(pe, "dynamic_feat_size"):  # ceil when it pads, else floor
            gh, gw = pe.dynamic_feat_size((height, width))
            return int(gh), int(gw)
        if pe is not None and hasattr(pe, "patch_size"):
            ph, pw = pe.patch_size
            return height // ph, width // pw
        with torch.no_grad():  # no patch embed (e.g. a convnet): measure it once
            probe = torch.zeros(1, 3, height, width, dtype=self.dtype, device=self._device())
            return self(probe)[1]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward_groups(
        self, groups: list[Tensor], pack: bool | None = None
    ) -> list[tuple[Tensor, tuple[int, int]]]:
        """Views grouped by size -> per group (patch tokens (n_g, P_g, D), grid).

        ``pack``: all groups in one pass (``PackedViT``); default: where the varlen flash kernel
        can run it (CUDA, bf16/fp16 weights) and the model is a plain ViT. Otherwise (and for one
        group) each group runs on its own, which gives the same tokens."""
        device = self._device()
        if pack is None:
            fast = varlen_available(device) and self.dtype in (torch.bfloat16, torch.float16)
            pack = fast and len(groups) > 1
        if not pack or self.packed is None:
            return [self(pixels) for pixels in groups]
        with torch.no_grad():
            out = self.packed([g.to(device=device, dtype=self.dtype) for g in groups])
        return [(tokens[:, self.num_prefix_tokens :], grid) for tokens, grid in out]

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> patch tokens (B, gh*gw, embed_dim) in the encoder dtype, (gh, gw)."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W), got {tuple(pixel_values.shape)}")
        x = pixel_values.to(device=self._device(), dtype=self.dtype)
        with torch.no_grad():
            if self.feature_layer == -1:
                feats = self.model.forward_features(x)
            else:
                feats = self.model.forward_intermediates(
                    x,
                    indices=[self.feature_layer],
                    norm=False,
                    stop_early=True,
                    output_fmt="NCHW",
                    intermediates_only=True,
                )[0]
        if feats.ndim == 4:  # (B, D, gh, gw): spatial map, nothing to strip
            grid = (int(feats.shape[2]), int(feats.shape[3]))
            return feats.flatten(2).transpose(1, 2), grid
        tokens = feats[:, self.num_prefix_tokens :]
        grid = self.grid_for(int(x.shape[2]), int(x.shape[3]))
        if grid[0] * grid[1] != tokens.shape[1]:
            raise ValueError(
                f"{self.model_name!r} returned {tokens.shape[1]} patch tokens for a "
                f"{tuple(x.shape[2:])} input, expected grid {grid}."
            )
        return tokens, grid
