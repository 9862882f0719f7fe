"""One decoder MLP's training step: transformers' SwiGLU MLP compiled, against quack's fused GEMMs
and torchao's float8 GEMMs (``model.decoder.float8``).

``python -m benchmarks.swiglu_mlp`` (CUDA): the 1.5B benchmark's MLP (Qwen2: 1536 -> 8960 ->
1536) on one packed row of the MLP row's size (26,880 tokens at micro-batch 32), float32 weights
under bf16 autocast and a bf16 input, as in training. Forward and forward+backward time per
call, TFLOP/s, and the fused layer's error against transformers' (output, input and weight
gradients). quack or float8 that cannot run here (not installed, or an older GPU) is listed
with the reason.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from benchmarks.kernel_table import measure, timing_row
from lit_mllm.models.float8 import FLOAT8_RECIPES, float8_config, float8_problem
from lit_mllm.models.fused_mlp import FusedSwiGLU, quack_problem


def mlp_layers(args: argparse.Namespace, device: torch.device) -> dict[str, nn.Module]:
    """transformers' MLP (compiled, as ``compile_blocks`` does), the fused layer and the float8
    layers over copies of the same weights."""
    config = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.intermediate)
    torch.manual_seed(0)
    reference = Qwen2MLP(config).to(device)
    layers: dict[str, nn.Module] = {"transformers, compiled": reference}
    if device.type == "cuda":
        layers["transformers, compiled"] = torch.compile(reference, dynamic=True)
    if device.type != "cuda" or quack_problem(device) is None:
        mine = copy.deepcopy(reference)
        layers["quack fused (mlp_kernel: quack)"] = FusedSwiGLU(
            mine.gate_proj, mine.up_proj, mine.down_proj
        )
    if device.type == "cuda" and float8_problem(device) is None:  # off CUDA: emulated
        from torchao.float8 import convert_to_float8_training

        for recipe in FLOAT8_RECIPES:
            mine = copy.deepcopy(reference)
            convert_to_float8_training(mine, config=float8_config(recipe))
            layers[f"float8 {recipe}, compiled (float8: {recipe})"] = torch.compile(
                mine, dynamic=True
            )
    return layers


def training_call(layer: nn.Module, x: Tensor, grad_out: Tensor) -> Callable[[], list[Tensor]]:
    """One training step of ``layer`` from fresh gradients: output, dx and the weights' grads."""

    def step() -> list[Tensor]:
        for parameter in layer.parameters():
            parameter.grad = None
        x.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = layer(x)
        out.backward(grad_out)
        return [out, x.grad, *(p.grad for p in layer.parameters())]

    return step


def time_layer(layer: nn.Module, x: Tensor, grad_out: Tensor, repeats: int) -> dict:
    def forward() -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(x)

    return measure(forward, training_call(layer, x, grad_out), repeats)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.swiglu_mlp", description=__doc__)
    p.add_argument("--tokens", type=int, default=26880)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=8960)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.tokens, args.hidden)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator)
    x.requires_grad_()
    grad_out = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator)
    flops = 2 * 3 * args.tokens * args.hidden * args.intermediate  # three GEMMs, forward
    lines = [
        f"# SwiGLU MLP, {torch.cuda.get_device_name(device)}, torch {torch.__version__}",
        "",
        f"{args.tokens} tokens, {args.hidden} -> {args.intermediate} -> {args.hidden}, float32 "
        f"weights under bf16 autocast; {args.repeats} timed calls after one warm-up call.",
        "",
        "| layer | first call (s) | forward ms | TFLOP/s | fwd+bwd ms | TFLOP/s "
        "| rel. error out, dx, dW (gate, up, down) |",
        "|---|---|---|---|---|---|---|",
    ]
    reference = None
    for name, layer in mlp_layers(args, device).items():
        result = time_layer(layer, x, grad_out, args.repeats)
        reference = reference or result["outputs"]
        lines.append(timing_row(name, result, reference, flops, 3 * flops))
    for kernel, problem in (
        ("quack", quack_problem(device)),
        ("float8", float8_problem(device)),
    ):
        if problem is not None:
            lines += ["", f"{kernel} not run: {problem}"]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
