"""``model.residual_dtype: autocast``: the decoder's residual stream in bf16 under autocast
(less memory traffic on a GPU), float32 otherwise; the loss stays that of the float32 stream to
bf16 accuracy and training still runs backward through it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_model import make_batch, micro_module

from lit_mllm.errors import UsageError


def _layer_input_dtypes(module, batch: dict, autocast: bool) -> tuple[torch.Tensor, set]:
    """The loss, and the dtypes of the hidden states entering each decoder layer."""
    seen: set[torch.dtype] = set()
    layers = module.model.decoder.get_decoder().layers
    hooks = [
        layer.register_forward_pre_hook(
            lambda _, args, kwargs: seen.add((args[0] if args else kwargs["hidden_states"]).dtype),
            with_kwargs=True,
        )
        for layer in layers
    ]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = module(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return loss, seen


def test_autocast_residual_runs_the_layers_in_bf16_with_the_float32_loss() -> None:
    reference = micro_module()
    batch = make_batch(reference, packing=True)
    loss_fp32, dtypes_fp32 = _layer_input_dtypes(reference, batch, autocast=True)
    assert dtypes_fp32 == {torch.float32}

    module = micro_module(residual_dtype="autocast")
    assert module.model.autocast_residual
    loss_bf16, dtypes_bf16 = _layer_input_dtypes(module, batch, autocast=True)
    assert dtypes_bf16 == {torch.bfloat16}
    torch.testing.assert_close(loss_bf16.float(), loss_fp32.float(), rtol=2e-2, atol=2e-2)

    loss_bf16.backward()  # gradients reach the connector through the bf16 stream
    grads = [p.grad for p in module.model.connector.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_without_autocast_the_stream_stays_float32_and_the_loss_is_unchanged() -> None:
    reference, module = micro_module(), micro_module(residual_dtype="autocast")
    batch = make_batch(reference)
    loss_a, _ = _layer_input_dtypes(reference, batch, autocast=False)
    loss_b, dtypes = _layer_input_dtypes(module, batch, autocast=False)
    assert dtypes == {torch.float32}
    assert torch.equal(loss_a, loss_b)


def test_a_wrong_value_is_refused() -> None:
    with pytest.raises(UsageError, match="model.residual_dtype: 'bf16' is neither"):
        micro_module(residual_dtype="bf16")


def test_float16_precision_is_refused_in_setup() -> None:
    module = micro_module(residual_dtype="autocast")
    module.trainer = SimpleNamespace(
        datamodule=None,
        limit_val_batches=0,
        precision="16-mixed",
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    with pytest.raises(UsageError, match="overflows: use bf16-mixed"):
        module.setup("fit")
