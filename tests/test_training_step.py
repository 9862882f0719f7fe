"""The optimiser step: token-weighted loss under gradient accumulation, skipped steps, clipping.

References are computed independently of the module's loss path: full-vocabulary logits from
the decoder and ``F.cross_entropy`` over all supervised tokens, in float64.
"""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from micro import MICRO_MODEL
from test_model import CONVERSATIONS

from lit_mllm.data.collate import MLLMCollator
from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.module import MLLMModule
from lit_mllm.tokens import IGNORE_INDEX

LR = 0.5


class _SGDModule(MLLMModule):
    """Plain SGD (no momentum, no decay): a weight delta is exactly -lr x gradient."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


def _module(cls: type[MLLMModule] = _SGDModule, **overrides) -> MLLMModule:
    torch.manual_seed(0)
    return cls(**{**MICRO_MODEL, **overrides})


def _batch(module: MLLMModule, conversations: list, seed: int) -> dict:
    conv = ConversationTokenizer(module.tokenizer, num_image_tokens=module.num_image_tokens)
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i, turns in enumerate(conversations):
        tokenized = conv(turns, sample_id=f"{seed}-{i}")
        items.append(
            {
                "input_ids": tokenized.input_ids,
                "labels": tokenized.labels,
                "pixel_values": torch.randn(1, 3, 32, 32, generator=generator),
                "sample_id": f"{seed}-{i}",
                "image_id": i,
                "references": [],
            }
        )
    return items


def _collate(module: MLLMModule, items: list) -> dict:
    return MLLMCollator(module.tokenizer.pad_token_id)(items)


def _quiet_trainer(**settings) -> L.Trainer:
    """A Trainer that writes nothing: no logger, checkpoints, progress bar or summary; and no
    validation (so no caption-metric check: these tests need no pycocoevalcap)."""
    return L.Trainer(
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def _fit(module: MLLMModule, batches: list[dict], accumulate: int, steps: int = 1, **kw) -> None:
    trainer = _quiet_trainer(
        max_steps=steps,
        accelerator="cpu",
        precision="64-true",
        accumulate_grad_batches=accumulate,
        **kw,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)


def _trainable(module: MLLMModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _reference_grads(batches: list[dict], per_batch_mean: bool = False) -> dict[str, torch.Tensor]:
    """Gradient of the mean CE over every supervised token of ``batches`` (negative control:
    the mean over batches of each batch's own token mean), in float64.

    Each batch's summed CE is differentiated on its own and the gradients are weighted
    afterwards: the decoder's RMSNorm computes in float32 even for float64 weights, so
    weighting the loss before backward would change float32 roundings (~1e-8), not the maths.
    """
    summed = []
    for batch in batches:
        module = _module().double()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # as Lightning's "64-true" runs the forward
        try:
            embeds = module.model.embed(batch["input_ids"], batch["pixel_values"].double())
            logits = module.model.decoder(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"]
            ).logits
        finally:
            torch.set_default_dtype(previous)
        targets = batch["labels"][:, 1:]
        F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        summed.append((grads, int((targets != IGNORE_INDEX).sum())))
    total = sum(count for _, count in summed)
    if per_batch_mean:
        weights = [1 / (count * len(summed)) for _, count in summed]
    else:
        weights = [1 / total] * len(summed)
    names = summed[0][0]
    return {n: sum(w * g[n] for w, (g, _) in zip(weights, summed, strict=True)) for n in names}


def _deltas(before: dict, after: dict) -> dict[str, torch.Tensor]:
    return {n: after[n] - before[n] for n in before}


def test_accumulated_micro_batches_weight_every_token_equally() -> None:
    """accumulate_grad_batches=2 over micro-batches of 5 and 32 supervised tokens gives the
    update of one batch holding both: the mean over all tokens (SGD, float64, 1e-10)."""
    probe = _module()
    short = _batch(probe, CONVERSATIONS[1:2], seed=1)[:1]  # "two" / "the star is blue"
    short[0]["labels"][: len(short[0]["labels"]) - 6] = IGNORE_INDEX  # keep the last reply
    long = _batch(probe, [CONVERSATIONS[0], CONVERSATIONS[2]] * 2, seed=2)
    micro = [_collate(probe, short), _collate(probe, long)]
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    assert counts[1] > 4 * counts[0] > 0, counts

    reference = _reference_grads(micro)
    control = _reference_grads(micro, per_batch_mean=True)

    accumulated = _module()
    start = _trainable(accumulated)
    _fit(accumulated, micro, accumulate=2)
    together = _module()
    _fit(together, [_collate(probe, short + long)], accumulate=1)

    for module in (accumulated, together):
        deltas = _deltas(start, _trainable(module))
        for name, grad in reference.items():
            torch.testing.assert_close(deltas[name], -LR * grad, rtol=0, atol=1e-10, msg=name)
    # negative control: Lightning's plain averaging of per-micro-batch means is another update
    apart = max(float((control[n] - reference[n]).abs().max()) for n in reference)
    assert apart > 1e-4, apart


# -- skipping and the gradient norm under FSDP: global, not per shard ----------------------------
def _fsdp_rank(rank: int, port: int, results: dict) -> None:
    """One of two gloo ranks holding *shards* of the gradients, as under FSDP (which itself
    needs CUDA): rank 0 holds [3, 4], rank 1 holds [12] (or a NaN)."""
    import os
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lit_mllm.callbacks.throughput import global_grad_norm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        module = _module(MLLMModule)
        strategy = FSDPStrategy(sharding_strategy="FULL_SHARD")
        module.trainer = SimpleNamespace(
            world_size=2,
            accumulate_grad_batches=1,
            strategy=strategy,
            precision_plugin=SimpleNamespace(scaler=None),
            global_step=0,
        )
        module.log = lambda *args, **kwargs: None  # no logger connector without a Trainer
        shard = torch.nn.Parameter(torch.zeros(2 if rank == 0 else 1, dtype=torch.float64))
        optimizer = torch.optim.SGD([shard], lr=1.0)
        out = {}
        # step 1: a NaN in rank 1's shard only -> both ranks drop their gradients
        shard.grad = torch.tensor([3.0, 4.0] if rank == 0 else [float("nan")], dtype=torch.float64)
        module.window.tokens = 4.0
        module.finish_gradients(optimizer)
        out["skipped"] = (shard.grad is None, module.skipped_steps)
        # step 2: finite shards, 4 + 6 supervised tokens -> rescaled to the mean over 10
        shard.grad = torch.tensor([3.0, 4.0] if rank == 0 else [12.0], dtype=torch.float64)
        module.window.tokens = 4.0 if rank == 0 else 6.0
        module.finish_gradients(optimizer)
        out["grad"] = shard.grad.tolist()
        out["norm"] = float(global_grad_norm([shard.grad * 1.0], strategy))
        strategy.sharding_strategy = type(strategy.sharding_strategy)["NO_SHARD"]
        out["replicated_norm"] = float(global_grad_norm([shard.grad * 1.0], strategy))
        results[rank] = out
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_gradients_skip_together_and_log_the_global_norm() -> None:
    """FSDP holds one shard of each gradient per rank: a NaN in one rank's shard must skip the
    step on every rank, and train/grad_norm must be the norm of the whole gradient."""
    import socket

    import torch.multiprocessing as mp

    from lit_mllm.gradients import LOSS_SUM_SCALE

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_fsdp_rank, args=(port, results), nprocs=2, join=True)
    assert results[0]["skipped"] == results[1]["skipped"] == (True, 1)
    factor = 2 / (LOSS_SUM_SCALE * 10)  # world / (scale x all tokens)
    assert results[0]["grad"] == pytest.approx([3.0 * factor, 4.0 * factor], rel=1e-12)
    assert results[1]["grad"] == pytest.approx([12.0 * factor], rel=1e-12)
    assert results[0]["norm"] == results[1]["norm"] == pytest.approx(13.0 * factor, rel=1e-12)
    assert results[0]["replicated_norm"] == pytest.approx(5.0 * factor, rel=1e-12)
    assert results[1]["replicated_norm"] == pytest.approx(12.0 * factor, rel=1e-12)


# -- FSDP gradient clipping (FSDP needs CUDA: run by the lead on a GPU machine) ----------------
class _PreClipNorm(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        from lit_mllm.callbacks.throughput import global_grad_norm

        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norm = float(global_grad_norm(grads, trainer.strategy, pl_module.device))


def _gpu_step(batch: dict, fsdp: bool, clip: float | None) -> tuple[dict, float]:
    """One SGD step on one GPU (float32, no TF32): the weight deltas and the pre-clip norm."""
    from lightning.pytorch.strategies import FSDPStrategy

    module = _module()
    start = _trainable(module)
    record = _PreClipNorm()
    trainer = _quiet_trainer(
        accelerator="cuda",
        devices=1,
        strategy=FSDPStrategy(sharding_strategy="FULL_SHARD") if fsdp else "auto",
        precision="32-true",
        gradient_clip_val=clip,
        max_steps=1,
        callbacks=[record],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    state = trainer.strategy.lightning_module_state_dict()  # FSDP: gathered full weights
    return {n: state[n].detach().cpu() - start[n] for n in start}, record.norm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA")
def test_fsdp_clips_by_the_global_norm_like_a_single_device() -> None:
    """The FSDP presets clip (gradient_clip_val 1.0): the module clips through FSDP's own
    clip_grad_norm_, never Lightning's FSDP precision plugin (which refuses norm clipping).
    Clipping at a quarter of the norm scales the whole SGD update by exactly 1/4."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    probe = _module()
    batch = _collate(probe, _batch(probe, CONVERSATIONS, seed=3))
    free, norm = _gpu_step(batch, fsdp=False, clip=None)
    assert norm > 0
    for fsdp in (False, True):
        clipped, fsdp_norm = _gpu_step(batch, fsdp=fsdp, clip=norm / 4)
        assert fsdp_norm == pytest.approx(norm, rel=1e-5)  # global norm, not one shard's
        for name, delta in free.items():
            torch.testing.assert_close(clipped[name], delta / 4, rtol=1e-4, atol=1e-7, msg=name)


def test_fsdp_clipping_goes_through_fsdps_clip_grad_norm() -> None:
    """Why the FSDP presets could not clip: Lightning's FSDP precision plugin raises for norm
    clipping. The module's configure_gradient_clipping never reaches it under FSDP: it calls
    the root FSDP module's clip_grad_norm_ (a collective over all shards), on every rank
    unless the step's gradients were dropped on every rank."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    module = _module(MLLMModule)
    strategy = FSDPStrategy()
    calls: list[float] = []
    strategy.model = SimpleNamespace(clip_grad_norm_=calls.append)
    plugin = FSDPPrecision("32-true")
    module.trainer = SimpleNamespace(strategy=strategy, precision_plugin=plugin)
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    optimizer = torch.optim.SGD([param], lr=1.0)
    with pytest.raises(MisconfigurationException, match="not supported"):
        plugin.clip_gradients(optimizer, 1.0, "norm")  # Lightning's own route
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert calls == [1.0]
    module.configure_gradient_clipping(optimizer, 1.0, "value")  # elementwise: per shard
    assert calls == [1.0] and param.grad.tolist() == [1.0, 1.0]
    module.step_dropped = True
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert calls == [1.0]


class _OverflowOnce(_SGDModule):
    """The second micro-batch's loss is pushed past fp16's range: its scaled gradients overflow."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e30 if batch_idx == 1 else loss


class _AfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({n: t.cpu() for n, t in _trainable(pl_module).items()})
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a grad scaler needs CUDA")
def test_fp16_overflow_skips_the_step_and_training_goes_on() -> None:
    """``16-mixed``: the grad scaler finds the overflow, skips that optimiser step (weights
    unchanged), halves its scale, and the following steps train again with finite weights."""
    module = _module(_OverflowOnce)
    batch = _collate(module, _batch(module, CONVERSATIONS, seed=3))
    start = _trainable(module)
    record = _AfterEachStep()
    trainer = _quiet_trainer(
        accelerator="cuda",
        devices=1,
        precision="16-mixed",
        max_steps=4,
        callbacks=[record],
    )
    loader = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    before = [start, *record.weights[:-1]]
    changed = [
        any(not torch.equal(old[n], new[n]) for n in old)
        for old, new in zip(before, record.weights, strict=True)
    ]
    assert changed[1:] == [False, True, True]  # (step 0 may overflow too at the first scale)
    assert record.scales[1] == record.scales[0] / 2
    assert all(torch.isfinite(t).all() for t in record.weights[-1].values())


def test_training_needs_no_caption_metrics_package() -> None:
    """The module, the trainer-side callbacks and a fit without validation import without
    pycocoevalcap (a GPU image may lack it); only validation's metrics need it."""
    code = (
        "import sys; sys.modules['pycocoevalcap'] = None\n"
        "import lit_mllm.module, lit_mllm.gradients\n"
        "from lit_mllm.callbacks import ThroughputMonitor\n"
        "from lit_mllm.callbacks.throughput import global_grad_norm\n"
        "try:\n"
        "    from lit_mllm.callbacks import CaptionReport\n"
        "except ImportError:\n"
        "    print('report needs it')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "report needs it"
