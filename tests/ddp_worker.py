"""A 2-process training run whose ranks see different data, for tests/test_ddp.py.

``python tests/ddp_worker.py SCENARIO OUT_DIR DEVICES [ddp|fsdp]`` trains the micro model
(plain SGD, so an update is exactly -lr x gradient) for two steps and writes, per rank,
``OUT_DIR/rank{r}.pt`` with the final weights, the gradients each optimiser step used, the
global gradient norms and the skip counters. Lightning launches the other rank by running this
script again. ``ddp``: CPU, gloo, float64. ``fsdp``: CUDA (FSDP needs an accelerator), float32;
gradients are shards there, so only the norms and rank 0's gathered weights are recorded.

Scenarios (per step, the micro-batch of rank 0 | rank 1):
  mixed   step 0: text-only conversations | conversations with images; step 1: the reverse
  nan     step 0: images | an image full of NaN (non-finite loss); step 1: images | text-only
  empty   step 0: every sample dropped (batch_size 0) | images; step 1: images | text-only
``reference_batches`` gives what one process sees for the same scenario (both ranks' samples
in one micro-batch; a step that must be skipped is left out).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro import MICRO_MODEL  # noqa: E402

from lit_mllm.callbacks.throughput import global_grad_norm  # noqa: E402
from lit_mllm.data.collate import MLLMCollator  # noqa: E402
from lit_mllm.data.conversation import ConversationTokenizer  # noqa: E402
from lit_mllm.module import MLLMModule  # noqa: E402

LR = 0.5
STEPS = 2
SCENARIOS = ("mixed", "nan", "empty")
IMAGE_TURNS = [
    [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": "a red circle on the left"},
    ],
    [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "a small green square at the top of a much larger picture"},
    ],
]
TEXT_TURNS = [
    [
        {"from": "human", "value": "What colour is the sky?"},
        {"from": "gpt", "value": "blue"},
    ],
    [
        {"from": "human", "value": "Name a shape."},
        {"from": "gpt", "value": "a star"},
        {"from": "human", "value": "And another one?"},
        {"from": "gpt", "value": "a triangle with three equal sides"},
    ],
]


class SGDModule(MLLMModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


def build_module() -> SGDModule:
    torch.manual_seed(0)
    return SGDModule(**MICRO_MODEL)


def _items(module: MLLMModule, turns: list, images: bool, seed: int) -> list[dict[str, Any]]:
    conv = ConversationTokenizer(module.tokenizer, num_image_tokens=module.num_image_tokens)
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i, conversation in enumerate(turns):
        sample_id = f"{seed}-{i}"
        tokenized = conv(conversation, num_images=int(images), sample_id=sample_id)
        pixels = torch.randn(1, 3, 32, 32, generator=generator) if images else None
        items.append(
            {
                "input_ids": tokenized.input_ids,
                "labels": tokenized.labels,
                "pixel_values": pixels,
                "sample_id": sample_id,
                "image_id": None,
                "references": [],
            }
        )
    return items


def rank_items(module: MLLMModule, scenario: str, step: int, rank: int) -> list[dict] | None:
    """The samples of one rank's micro-batch; None for a micro-batch whose samples were all
    dropped; a NaN image where the scenario poisons one."""
    if scenario == "mixed" or step > 0:
        images = rank == (1 if step % 2 == 0 else 0)  # the other rank is text-only
        turns = IMAGE_TURNS if images else TEXT_TURNS
        return _items(module, turns, images, seed=10 * step + rank)
    if scenario == "nan":
        items = _items(module, IMAGE_TURNS, True, seed=rank)
        if rank == 1:
            items[0]["pixel_values"] = torch.full_like(items[0]["pixel_values"], float("nan"))
        return items
    if scenario == "empty":
        return None if rank == 0 else _items(module, IMAGE_TURNS, True, seed=rank)
    raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")


def rank_batches(module: MLLMModule, scenario: str, rank: int) -> list[dict]:
    # the ranks train with the collator's TokenLayout (the sync-free forward, as `fit` does);
    # the reference below finds the positions on the device: both must agree
    patch = module.model.image_token_ids.patch
    collate = MLLMCollator(module.tokenizer.pad_token_id, image_patch_id=patch)
    batches = []
    for step in range(STEPS):
        items = rank_items(module, scenario, step, rank)
        if items is None:
            batches.append(collate([{"skipped": "bad_image"}, {"skipped": "bad_image"}]))
        else:
            batches.append(collate(items))
    return batches


def reference_batches(module: MLLMModule, scenario: str) -> list[dict]:
    """One process, both ranks' samples per micro-batch; the NaN step (skipped) left out."""
    collate = MLLMCollator(module.tokenizer.pad_token_id)
    batches = []
    for step in range(STEPS):
        if scenario == "nan" and step == 0:
            continue
        items = [i for r in (0, 1) for i in (rank_items(module, scenario, step, r) or [])]
        batches.append(collate(items))
    return batches


class _PerRank(L.LightningDataModule):
    def __init__(self, scenario: str, batches: list[dict] | None = None) -> None:
        super().__init__()
        self.scenario = scenario
        self.batches = batches

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        batches = self.batches
        if batches is None:
            batches = rank_batches(
                self.trainer.lightning_module, self.scenario, self.trainer.global_rank
            )
        return torch.utils.data.DataLoader(batches, batch_size=None)


class _Record(L.Callback):
    """The gradients (after the module has finished them) and their global norm per step."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {
            n: p.grad.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.requires_grad and p.grad is not None
        }
        self.grads[trainer.global_step] = grads
        norm = global_grad_norm(list(grads.values()), trainer.strategy, pl_module.device)
        self.norms[trainer.global_step] = float(norm)


def run(
    scenario: str,
    out: Path,
    devices: int,
    batches: list[dict] | None = None,
    strategy: str = "ddp",
    accelerator: str = "cpu",
) -> dict:
    """Train; with ``batches`` (one process) they replace the per-rank data."""
    module = build_module()
    record = _Record()
    fsdp = strategy == "fsdp"
    if devices > 1 and fsdp:
        from lightning.pytorch.strategies import FSDPStrategy

        strategy_arg: Any = FSDPStrategy(sharding_strategy="FULL_SHARD")
    else:
        strategy_arg = "ddp" if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cuda" if fsdp else accelerator,
        devices=devices,
        strategy=strategy_arg,
        precision="32-true" if fsdp or accelerator == "cuda" else "64-true",
        max_steps=len(batches) if batches is not None else STEPS,
        use_distributed_sampler=False,
        logger=False,
        default_root_dir=out,  # the skip reports go there, not into the working directory
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, datamodule=_PerRank(scenario, batches))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    if fsdp and devices > 1:  # shards: gather the full weights (rank 0 gets them)
        state = trainer.strategy.lightning_module_state_dict()
        weights = {n: v.detach().cpu().clone() for n, v in state.items() if n in trainable}
        grads: dict = {step: {} for step in record.grads}  # shards: not comparable
    else:
        weights = {
            n: p.detach().cpu().clone() for n, p in module.named_parameters() if n in trainable
        }
        grads = {s: {n: g.cpu() for n, g in gs.items()} for s, gs in record.grads.items()}
    result = {
        "weights": weights,
        "grads": grads,
        "trained_steps": sorted(s for s, gs in record.grads.items() if gs),
        "norms": record.norms,
        "skipped_steps": module.skipped_steps,
        "empty_batches": module.empty_batches,
        "global_step": trainer.global_step,
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    return result


if __name__ == "__main__":
    strategy = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    run(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), strategy=strategy)
