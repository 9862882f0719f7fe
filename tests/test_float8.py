"""``model.decoder.float8``: the decoder layers' linear layers on torchao's float8 GEMMs. CPU tests
check which layers are converted (and which are not), that weights, names and checkpoints stay
as they are, that the loss stays close (torchao emulates float8 off CUDA) and the errors a user
sees; GPU tests (``pytest -m gpu``) train with the real float8 GEMMs."""

from __future__ import annotations

import pytest
import torch
from test_gpu import _on_cuda, bf16_loss_and_grads, check_bf16_mixed_fit_halves_the_loss
from test_model import MICRO_DECODER, _prompt_items, make_batch, micro_module

from benchmarks.train_throughput.best_transformers import BestTransformersTrainee
from benchmarks.train_throughput.sizes import TINY
from lit_mllm.data.collate import MLLMCollator
from lit_mllm.errors import UsageError
from lit_mllm.models import float8
from lit_mllm.models.fused_mlp import FusedSwiGLU

Float8Linear = pytest.importorskip("torchao.float8.float8_linear").Float8Linear
FLOAT8 = {**MICRO_DECODER, "float8": "tensorwise"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FLOAT8_GPU = torch.cuda.is_available() and float8.float8_problem(torch.device("cuda")) is None


def _converted(module: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in module.named_modules() if isinstance(m, Float8Linear))


def test_every_projection_of_every_layer_is_converted_and_nothing_else() -> None:
    """The whole module is searched: the LM head, connector and encoder stay plain."""
    module = micro_module(decoder=FLOAT8)
    layers = module.model.decoder.get_decoder().layers
    parent = {p: "self_attn" if p in PROJECTIONS[:4] else "mlp" for p in PROJECTIONS}
    expected = sorted(
        f"model.decoder.model.layers.{i}.{parent[p]}.{p}"
        for i in range(len(layers))
        for p in PROJECTIONS
    )
    assert _converted(module) == expected
    assert type(module.model.decoder.get_output_embeddings()) is torch.nn.Linear
    layer = module.get_submodule(expected[0])
    assert layer.config.pad_inner_dim  # packed rows of any length: the token dim is padded


def test_weights_names_and_checkpoints_stay_as_they_are() -> None:
    plain, converted = micro_module(), micro_module(decoder=FLOAT8)
    plain_state, converted_state = plain.state_dict(), converted.state_dict()
    assert list(converted_state) == list(plain_state)
    for name, value in plain_state.items():
        assert converted_state[name].dtype == value.dtype, name
        torch.testing.assert_close(converted_state[name], value, rtol=0, atol=0)
    plain.load_state_dict(converted_state, strict=True)  # a float8 run's checkpoint, in bf16


def test_the_loss_follows_the_unconverted_loss_and_every_weight_gets_a_gradient() -> None:
    results = []
    for module in (micro_module(), micro_module(decoder=FLOAT8)):
        loss, _ = module(make_batch(module, packing=True))
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b != loss_a  # the GEMMs' inputs are rounded to float8 ...
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=0)  # ... the loss barely moves
    assert grads_b.keys() == grads_a.keys()
    for name, grad in grads_a.items():
        error = float((grads_b[name] - grad).norm() / grad.norm())
        assert error < 0.2, (name, error)


def test_caption_decoding_runs_through_the_float8_layers() -> None:
    """Validation captions (no gradients, a growing KV cache: one token per step) go through
    the same float8 layers; torchao pads rows of any length, so decoding runs."""
    module = micro_module(decoder=FLOAT8, generation={"max_new_tokens": 6})
    module.eval()
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    with torch.no_grad():
        captions = module.caption(batch)
    assert len(captions) == len(batch["prompt_ids"]) and all(isinstance(c, str) for c in captions)


def test_the_fused_mlps_keep_quacks_gemms_and_attention_takes_float8() -> None:
    module = micro_module(decoder={**FLOAT8, "mlp_kernel": "quack"})
    converted = _converted(module)
    assert converted and all(n.split(".")[-1] in PROJECTIONS[:4] for n in converted)
    layers = module.model.decoder.get_decoder().layers
    assert all(isinstance(layer.mlp, FusedSwiGLU) for layer in layers)
    assert type(layers[0].mlp.gate_proj) is torch.nn.Linear


def test_layers_off_the_16_alignment_stay_and_a_decoder_without_any_is_refused() -> None:
    narrow = {"config": {**MICRO_DECODER["config"], "intermediate_size": 120}, "float8": "rowwise"}
    converted = _converted(micro_module(decoder=narrow))
    assert converted and not any("mlp" in name for name in converted)
    tiny = {**MICRO_DECODER["config"], "hidden_size": 40, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="no linear layer .* multiples of 16"):
        micro_module(decoder={"config": {**tiny, "intermediate_size": 72}, "float8": "rowwise"})


def test_lora_and_unknown_recipes_are_refused() -> None:
    with pytest.raises(ValueError, match="float8 'tensorwise' .* not combined with train: lora"):
        micro_module(decoder={**FLOAT8, "train": "lora"})
    with pytest.raises(ValueError, match="float8 'per-block' is not one of"):
        float8.convert_to_float8(micro_module().model.decoder, "per-block")


def test_without_torchao_the_error_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setattr(float8, "module_installed", lambda module: False)
    with pytest.raises(UsageError, match=r"needs torchao \(torchao.float8\): `pip install torch"):
        micro_module(decoder=FLOAT8)
    problem = "torchao (torchao.float8) is not installed: `pip install torchao`"
    assert float8.float8_problem(torch.device("cpu")) == problem  # what the benchmark prints


def test_a_gpu_without_float8_tensor_cores_is_named_before_any_layer_runs(monkeypatch) -> None:
    module = micro_module(decoder=FLOAT8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(UsageError, match="float8: float8 GEMMs need an Ada.* cuda is sm80"):
        module.model.check_kernels(torch.device("cuda"))
    micro_module().model.check_kernels(torch.device("cuda"))  # no float8 layer: nothing to say
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert float8.float8_problem(torch.device("cuda")) is None
    assert float8.float8_problem(torch.device("cpu")) is None  # emulated


def test_the_tuned_transformers_row_converts_the_same_layers_keeping_its_parameters() -> None:
    trainee = BestTransformersTrainee(TINY, "0.5b", torch.device("cpu"), False, "tensorwise")
    language_model = trainee.model.model.language_model
    layers = len(language_model.layers)
    assert len(_converted(language_model)) == layers * len(PROJECTIONS)
    optimized = {id(p) for group in trainee.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in trainee.model.parameters() if p.requires_grad} == optimized
    assert not _converted(trainee.model.model.vision_tower)


@pytest.mark.gpu
@pytest.mark.skipif(not FLOAT8_GPU, reason="needs a GPU with float8 tensor cores")
def test_float8_training_step_on_the_gpu_follows_bf16() -> None:
    """The real float8 GEMMs (H100/H200) against bf16 autocast, from the same weights."""
    plain, converted = micro_module().cuda(), micro_module(decoder=FLOAT8).cuda()
    batch = _on_cuda(make_batch(plain, packing=True))
    assert batch["input_ids"].shape[1] % 16  # a row float8's GEMMs must pad
    (loss_a, grads_a), (loss_b, grads_b) = (
        bf16_loss_and_grads(m, batch) for m in (plain, converted)
    )
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=0)
    assert float((grads_b - grads_a).norm() / grads_a.norm()) < 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not FLOAT8_GPU, reason="needs a GPU with float8 tensor cores")
def test_bf16_mixed_fit_with_float8_lowers_the_loss() -> None:
    module = micro_module(decoder=FLOAT8, optim={"lr": 3e-3, "warmup_steps": 3})
    check_bf16_mixed_fit_halves_the_loss(module)
