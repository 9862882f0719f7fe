"""``model.decoder.mlp_kernel: quack``: SwiGLU MLPs on quack's fused GEMMs. CPU tests check the
module swap (same weights, same names, same numbers off CUDA) and the errors a user sees; GPU
tests (``pytest -m gpu``) check the fused kernels against transformers' MLP where quack runs."""

from __future__ import annotations

import pytest
import torch
from test_model import MICRO_DECODER, make_batch, micro_module
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from benchmarks import swiglu_mlp
from lit_mllm.errors import UsageError
from lit_mllm.models import fused_mlp
from lit_mllm.models.fused_mlp import FusedSwiGLU

QUACK_READY = (
    torch.cuda.is_available()
    and torch.cuda.get_device_capability()[0] in fused_mlp.QUACK_CAPABILITIES
    and fused_mlp.quack_installed()
)
FUSED = {**MICRO_DECODER, "mlp_kernel": "quack"}


def _loss_and_grads(module, device: str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = make_batch(module, packing=True)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss, _ = module(batch)
    loss.backward()
    grads = {n: p.grad.float() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads


def test_every_layer_is_fused_over_the_same_weights_under_the_same_names() -> None:
    plain, fused = micro_module(), micro_module(decoder=FUSED)
    layers = fused.model.decoder.get_decoder().layers
    assert all(isinstance(layer.mlp, FusedSwiGLU) for layer in layers)
    assert len(fused_mlp.fused_mlps(fused.model)) == len(layers) == 2
    plain_state, fused_state = plain.state_dict(), fused.state_dict()
    assert list(fused_state) == list(plain_state)
    for name, value in plain_state.items():
        torch.testing.assert_close(fused_state[name], value, rtol=0, atol=0)


def test_off_cuda_it_trains_exactly_like_transformers_mlp() -> None:
    (loss_a, grads_a), (loss_b, grads_b) = map(
        _loss_and_grads, (micro_module(), micro_module(decoder=FUSED))
    )
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_b.keys() == grads_a.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=0, msg=name)


def test_a_decoder_without_swiglu_mlps_is_refused_naming_its_activation() -> None:
    gelu = {"config": {**MICRO_DECODER["config"], "hidden_act": "gelu"}, "mlp_kernel": "quack"}
    with pytest.raises(ValueError, match="this qwen2 decoder has hidden_act 'gelu'"):
        micro_module(decoder=gelu)
    gpt2 = {"config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}}
    with pytest.raises(ValueError, match="this gpt2 decoder has hidden_act 'gelu_new'"):
        micro_module(decoder={**gpt2, "mlp_kernel": "quack"})


def test_mlp_projections_with_a_bias_are_refused_naming_the_layer() -> None:
    config = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    mlp = Qwen2MLP(config)
    mlp.up_proj = torch.nn.Linear(16, 32, bias=True)
    decoder = type("Decoder", (), {})()  # the two accessors fuse_swiglu_mlps uses
    layer = torch.nn.Module()
    layer.mlp = mlp
    decoder.config = config
    decoder.get_decoder = lambda: type("Base", (), {"layers": [layer]})()
    with pytest.raises(ValueError, match="layer 0's MLP \\(Qwen2MLP\\) is not gate_proj"):
        fused_mlp.fuse_swiglu_mlps(decoder)


def test_lora_on_the_mlp_projections_is_refused_and_on_attention_allowed() -> None:
    lora = {**FUSED, "train": "lora", "lora_target_modules": ["q_proj", "up_proj"]}
    with pytest.raises(ValueError, match=r"LoRA adapters on \['up_proj'\] would be skipped"):
        micro_module(decoder=lora)
    attention_only = {**lora, "lora_target_modules": ["q_proj", "v_proj"]}
    module = micro_module(decoder=attention_only)
    assert len(fused_mlp.fused_mlps(module.model)) == 2


def test_an_unknown_kernel_name_is_refused() -> None:
    with pytest.raises(ValueError, match="mlp_kernel 'liger' is not one of"):
        micro_module(decoder={**MICRO_DECODER, "mlp_kernel": "liger"})


def test_a_gpu_without_quack_is_named_before_any_layer_runs(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fused_mlp, "quack_installed", lambda: False)
    module = micro_module(decoder=FUSED)
    with pytest.raises(UsageError, match="mlp_kernel quack: quack \\(quack.mlp\\) is not inst"):
        module.model.check_kernels(torch.device("cuda"))
    micro_module().model.check_kernels(torch.device("cuda"))  # nothing to load


def test_an_older_gpu_is_named_by_its_architecture(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(fused_mlp, "quack_installed", lambda: True)
    problem = fused_mlp.quack_problem(torch.device("cuda"))
    assert problem == "quack needs a Hopper or Blackwell GPU; cuda is sm86"
    assert fused_mlp.quack_problem(torch.device("cpu")).endswith("not on cpu")


def test_the_benchmark_builds_both_layers_over_the_same_weights() -> None:
    args = swiglu_mlp.argparse.Namespace(hidden=16, intermediate=32)
    layers = swiglu_mlp.mlp_layers(args, torch.device("cpu"))
    reference, fused = layers.values()
    assert isinstance(fused, FusedSwiGLU)
    x = torch.randn(1, 5, 16, requires_grad=True)
    grad_out = torch.randn(1, 5, 16)
    results = []
    for layer in (reference, fused):
        outputs = swiglu_mlp.training_call(layer, x, grad_out)()
        results.append([t.detach().clone() for t in outputs])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_the_benchmark_on_a_cpu_only_machine_gets_one_line() -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        swiglu_mlp.main(["--tokens", "8"])


@pytest.mark.gpu
@pytest.mark.skipif(not QUACK_READY, reason="needs a Hopper/Blackwell GPU with quack-kernels")
def test_the_benchmark_prints_both_layers_with_small_errors() -> None:
    text = swiglu_mlp.main(["--tokens", "3000", "--hidden", "512", "--intermediate", "1408"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "layer" not in line]
    assert rows[1].startswith("| quack fused")
    errors = [float(e) for e in rows[1].rsplit("|", 2)[1].split(",")]
    assert max(errors) < 2e-2, errors
    float8_ready = swiglu_mlp.float8_problem(torch.device("cuda")) is None
    assert [r.split(",")[0] for r in rows[2:]] == (
        ["| float8 tensorwise", "| float8 rowwise"] if float8_ready else []
    )
    for row in rows[2:]:  # float8 GEMMs round their inputs: errors of a few percent
        errors = [float(e) for e in row.rsplit("|", 2)[1].split(",")]
        assert max(errors) < 0.15, (row, errors)


@pytest.mark.gpu
@pytest.mark.skipif(not QUACK_READY, reason="needs a Hopper/Blackwell GPU with quack-kernels")
def test_the_fused_layer_compiles_into_one_graph_over_rows_of_two_lengths() -> None:
    config = Qwen2Config(hidden_size=256, intermediate_size=704)
    reference = Qwen2MLP(config).cuda()
    fused = FusedSwiGLU(reference.gate_proj, reference.up_proj, reference.down_proj)
    fused.load_kernel(torch.device("cuda"))
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    for tokens in (1000, 1376):
        x = torch.randn(1, tokens, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        outputs = []
        for layer in (reference, compiled):
            reference.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x)
            out.float().square().mean().backward()
            outputs.append([out.detach(), x.grad, *(p.grad for p in reference.parameters())])
        for a, b in zip(*outputs, strict=True):
            error = float((b.float() - a.float()).norm() / a.float().norm())
            assert error < 2e-2, (tokens, error)


@pytest.mark.gpu
@pytest.mark.skipif(not QUACK_READY, reason="needs a Hopper/Blackwell GPU with quack-kernels")
def test_compiled_layers_with_the_fused_mlp_train_like_transformers_mlp() -> None:
    """The micro model's packed batch through compiled decoder layers in bf16: the same loss and
    gradients with quack's MLP as with transformers'."""
    results = []
    for decoder in (MICRO_DECODER, FUSED):
        module = micro_module(decoder=decoder).cuda()
        module.model.compile_blocks()
        results.append(_loss_and_grads(module, "cuda"))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=1e-2)
    flat_a, flat_b = (torch.cat([g.flatten() for g in grads.values()]) for _, grads in results)
    assert float((flat_b - flat_a).norm() / flat_a.norm()) < 0.05
