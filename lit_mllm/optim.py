"""AdamW parameter groups (decay chosen by what a parameter is) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lit_mllm.config import OptimConfig
from lit_mllm.models.resampler import Resampler

__all__ = ["build_optimizer", "no_decay_parameters", "warmup_cosine"]

# norm layers whose weights are never decayed; other libraries' norms are matched by class name
# (transformers' Qwen2RMSNorm / LlamaRMSNorm ..., timm's LayerNorm2d / RmsNorm ...)
NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
NORM_NAME = re.compile(r"norm(\d+d)?$", re.IGNORECASE)


def no_decay_parameters(root: nn.Module, output_embeddings: nn.Module | None) -> set[int]:
    """``id``s of the parameters AdamW must not decay, chosen by what they are, not by their
    names: weights of any norm module (torch's, timm's and transformers' RMSNorm classes),
    biases, token embeddings and the output embedding (tied or not), and the resampler's
    learned queries."""
    ids: set[int] = set()
    for module in root.modules():
        whole = (
            isinstance(module, NORM_TYPES)
            or NORM_NAME.search(type(module).__name__) is not None
            or isinstance(module, nn.Embedding)
            or module is output_embeddings
        )
        for name, param in module.named_parameters(recurse=False):
            bias = name == "bias" or name.endswith("_bias")
            query = isinstance(module, Resampler) and name == "query"
            if whole or bias or query:
                ids.add(id(param))
    return ids


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    exempt: set[int],
    optim: OptimConfig,
    connector_prefix: str,
) -> list[dict[str, Any]]:
    """Trainable parameters split by (decayed or not, connector or not): the connector may
    have its own learning rate (``optim.connector_lr``)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in named_parameters:
        if param.requires_grad:
            key = (id(param) in exempt, name.startswith(connector_prefix))
            groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else optim.weight_decay,
            "lr": (optim.connector_lr or optim.lr) if is_connector else optim.lr,
        }
        for (no_decay, is_connector), params in groups.items()
    ]


def warmup_cosine(optim: OptimConfig, total_steps: int):
    """LR factor per optimiser step: linear warm-up, then cosine down to ``min_lr_ratio``."""
    total = max(int(total_steps), 1)
    warmup = min(optim.warmup_steps, max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    return factor


def build_optimizer(
    groups: list[dict[str, Any]], optim: OptimConfig, total_steps: int, fused: bool
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: AdamW and its per-step schedule."""
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(optim, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
