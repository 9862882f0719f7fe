"""Float8 GEMMs for the decoder's linear layers: ``model.decoder.float8: tensorwise | rowwise``.

torchao's float8 training (``pip install torchao``) swaps each ``nn.Linear`` for a
``Float8Linear`` that casts its input, weight and output gradient to float8 with a dynamic scale
(one per tensor, or one per row with ``rowwise``) and runs the three GEMMs of forward and
backward on the GPU's float8 tensor cores (Hopper and Blackwell: twice the bf16 peak). Weights,
optimizer states and the checkpoint stay as they are (same names, same dtypes); only the GEMMs'
inputs are rounded, so the loss follows the bf16 loss closely but not bit for bit.

Converted: the linear layers inside the decoder's layers whose sizes are multiples of 16 (the
float8 GEMM's alignment). The weight gradient's GEMM sums over the tokens, whose count a packed
row leaves arbitrary: torchao pads that inner dimension to 16 (``pad_inner_dim``; without it the
first packed row of another length fails in the backward). Left in bf16: the embeddings, the LM head (it runs on the supervised
positions only, a few rows), the connector and the frozen vision tower. With
``mlp_kernel: quack`` the fused MLPs keep quack's bf16 GEMMs and only the attention projections
take float8. Off a GPU torchao computes the same casts in emulation: slow, for tests only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import PreTrainedModel

from lit_mllm.errors import UsageError
from lit_mllm.models.fused_mlp import FusedSwiGLU
from lit_mllm.models.gpu_kernels import module_installed

FLOAT8_RECIPES: tuple[str, ...] = ("tensorwise", "rowwise")
FLOAT8_MODULE = "torchao.float8"
FLOAT8_INSTALL = "`pip install torchao`"
FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: float8 tensor cores
FLOAT8_ALIGNMENT = 16


def float8_problem(device: torch.device) -> str | None:
    """Why float8 GEMMs cannot run fast on ``device``: torchao missing, or a GPU without float8
    tensor cores (None when they can, and off CUDA, where torchao emulates them)."""
    if not module_installed(FLOAT8_MODULE):
        return f"torchao ({FLOAT8_MODULE}) is not installed: {FLOAT8_INSTALL}"
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        major, minor = capability
        return f"float8 GEMMs need an Ada, Hopper or Blackwell GPU; {device} is sm{major}{minor}"
    return None


def decoder_layers(decoder: PreTrainedModel) -> nn.Module:
    layers = getattr(decoder.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(
            f"model.decoder.float8 converts the linear layers of decoder layers; this "
            f"{decoder.config.model_type} decoder has no `layers`"
        )
    return layers


def float8_linear_names(layers: nn.Module) -> list[str]:
    """The linear layers under ``layers`` that take float8 (names relative to ``layers``)."""
    in_fused = {id(m) for f in layers.modules() if isinstance(f, FusedSwiGLU) for m in f.modules()}
    return [
        name
        for name, module in layers.named_modules()
        if type(module) is nn.Linear
        and id(module) not in in_fused
        and module.in_features % FLOAT8_ALIGNMENT == 0
        and module.out_features % FLOAT8_ALIGNMENT == 0
    ]


def convert_to_float8(decoder: PreTrainedModel, recipe: str) -> list[str]:
    """Swap the decoder layers' linear layers for torchao's ``Float8Linear`` in place, with
    ``recipe``'s scaling; returns the converted layers' names (relative to the layers' list)."""
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"model.decoder.float8 {recipe!r} is not one of {list(FLOAT8_RECIPES)}")
    if not module_installed(FLOAT8_MODULE):
        raise UsageError(f"model.decoder.float8 needs torchao ({FLOAT8_MODULE}): {FLOAT8_INSTALL}")
    from torchao.float8 import convert_to_float8_training

    layers = decoder_layers(decoder)
    names = set(float8_linear_names(layers))
    if not names:
        raise ValueError(
            "model.decoder.float8: no linear layer of the decoder's layers has sizes in "
            f"multiples of {FLOAT8_ALIGNMENT}; nothing would run in float8"
        )
    convert_to_float8_training(
        layers,
        config=float8_config(recipe),
        module_filter_fn=lambda _module, name: name in names,
    )
    return sorted(names)


def float8_config(recipe: str):  # -> torchao.float8.Float8LinearConfig (an optional package)
    """torchao's ``recipe`` with the token dimension padded (see the module's docstring)."""
    from torchao.float8 import Float8LinearConfig

    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), pad_inner_dim=True)


def has_float8_linears(model: nn.Module) -> bool:
    if not module_installed(FLOAT8_MODULE):
        return False
    from torchao.float8.float8_linear import Float8Linear

    return any(isinstance(module, Float8Linear) for module in model.modules())
