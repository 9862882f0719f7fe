"""SwiGLU MLPs on quack's fused GEMMs: ``model.decoder.mlp_kernel: quack``.

A gated MLP (Llama, Qwen2/3, Mistral: ``down(silu(gate(x)) * up(x))``) is three GEMMs plus two
elementwise passes over the (tokens x intermediate) activations: the SwiGLU after the gate and
up GEMMs, and its derivative after the down GEMM's backward. quack (Tri Dao's CuTe DSL kernels
for Hopper and Blackwell GPUs, ``pip install quack-kernels``) computes both in the GEMMs'
epilogues, so those activations are written and read once less. On the H200 at the 1.5B
benchmark's shape (26,880 tokens, 1536 -> 8960 -> 1536) one MLP's forward + backward takes
10.56 ms against 10.70 ms compiled, and the whole 1.5B step 2.6 % less time and 14.7 GiB less
memory (``python -m benchmarks.swiglu_mlp``; benchmarks/RESULTS.md, round 7).

The layer keeps transformers' ``gate_proj`` / ``up_proj`` / ``down_proj`` weights, so
checkpoints load and save under the same names; the gate and up weights are concatenated per
forward (quack's ``concat_layout``: one copy of ``2 x intermediate x hidden``). quack's GEMMs
run with their default tile configuration: its autotuner keys on shapes and a packed row
changes length every step (tuning took minutes per new length on the H200).

Only training steps take the fused path. Without gradients (validation, caption decoding:
a few rows per step, where the weights' concatenation would cost more than the fusion saves),
off CUDA, and in float32 without autocast (quack's GEMMs take 16-bit inputs), the layer
computes transformers' own formula.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from lit_mllm.errors import UsageError
from lit_mllm.models.gpu_kernels import HOPPER_OR_BLACKWELL, gpu_kernel_problem, module_installed

QUACK_MLP_MODULE = "quack.mlp"
QUACK_INSTALL = "`pip install quack-kernels` (with nvidia-cutlass-dsl for your CUDA)"
QUACK_CAPABILITIES = HOPPER_OR_BLACKWELL
MLP_KERNELS = ("transformers", "quack")
SILU_NAMES = ("silu", "swish")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def quack_installed() -> bool:
    return module_installed(QUACK_MLP_MODULE)


def quack_problem(device: torch.device) -> str | None:
    """Why quack's fused MLP cannot run on ``device``; None when it can."""
    return gpu_kernel_problem(device, "quack", QUACK_MLP_MODULE, QUACK_INSTALL, quack_installed)


class FusedSwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the SwiGLU and its derivative in GEMM epilogues."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.kernel: Callable[..., Tensor] | None = None  # quack's mlp_func, once loaded

    def load_kernel(self, device: torch.device) -> None:
        """Import quack for ``device`` (before compiled layers trace this module): a missing
        package or an older GPU is one clear error, not a failure inside a compiled layer."""
        if self.kernel is not None:
            return
        problem = quack_problem(device)
        if problem is not None:
            raise UsageError(f"model.decoder.mlp_kernel quack: {problem}")
        self.kernel = importlib.import_module(QUACK_MLP_MODULE).mlp_func

    def forward(self, x: Tensor) -> Tensor:
        half = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda")
        if not (x.is_cuda and half and torch.is_grad_enabled()):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.kernel is None:
            self.load_kernel(x.device)
        gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        return self.kernel(
            x, gate_up, self.down_proj.weight, activation="swiglu", concat_layout=True, tuned=False
        )


def fuse_swiglu_mlps(decoder: PreTrainedModel) -> list[FusedSwiGLU]:
    """Replace every decoder layer's gated SiLU MLP by a :class:`FusedSwiGLU` over the same
    weights; a decoder whose MLPs are not of that form is refused, naming the first layer."""
    config = decoder.config.get_text_config()
    activation = getattr(config, "hidden_act", getattr(config, "activation_function", None))
    layers = getattr(decoder.get_decoder(), "layers", None)
    if activation not in SILU_NAMES or layers is None:
        found = f"hidden_act {activation!r}" if activation not in SILU_NAMES else "no `layers`"
        raise ValueError(
            "model.decoder.mlp_kernel quack fuses the SwiGLU MLPs of decoder layers; this "
            f"{config.model_type} decoder has {found}. Use mlp_kernel: transformers."
        )
    fused = []
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        projections = [getattr(mlp, name, None) for name in PROJECTIONS]
        plain = all(type(p) is nn.Linear and p.bias is None for p in projections)
        if not plain:
            raise ValueError(
                f"model.decoder.mlp_kernel quack: layer {index}'s MLP "
                f"({type(mlp).__name__}) is not gate_proj / up_proj / down_proj linear layers "
                "without bias. Use mlp_kernel: transformers."
            )
        hidden, intermediate = projections[0].in_features, projections[0].out_features
        if hidden % 8 or intermediate % 8:
            raise ValueError(
                "model.decoder.mlp_kernel quack needs the hidden and intermediate sizes in "
                f"multiples of 8 (16-byte rows); layer {index}: {hidden} and {intermediate}"
            )
        layer.mlp = FusedSwiGLU(*projections)
        fused.append(layer.mlp)
    return fused


def fused_mlps(model: nn.Module) -> list[FusedSwiGLU]:
    return [module for module in model.modules() if isinstance(module, FusedSwiGLU)]
