"""CLIP-style pretraining of a small timm ViT against captions: the tiny default's encoder.

Why the image embedding is the mean of the patch tokens (after the final norm), not a class
token: the multimodal model reads the frozen *patch tokens*, so every one of them should carry
what the captions say; with mean pooling each patch token is trained directly.

The text tower only serves the loss and is dropped afterwards; ``export_encoder`` writes the
ViT's own timm state dict, which ``model.encoder.checkpoint_path`` then loads strictly.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from lit_mllm.clip.text_tower import TextTower
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.models.vision import create_backbone, image_data_config

WEIGHTS_FILE = "model.safetensors"
FACT_NAMES = ("kind", "colour", "size")
PROVENANCE_FILE = "provenance.json"


def _fact_classes() -> tuple[tuple[str, ...], ...]:
    from lit_mllm.data.synthetic import COLOURS, KINDS, SIZES

    return KINDS, tuple(COLOURS), SIZES


class ContrastivePretraining(L.LightningModule):
    """Image tower (any timm ViT) + text tower, trained with the symmetric InfoNCE loss.

    Args:
        encoder_name / encoder_kwargs: the timm architecture, exactly as the multimodal
            model's ``encoder.name`` / ``encoder.model_kwargs`` will name it.
        tokenizer: captions are tokenised with this (``tiny`` = the packaged tokenizer).
        embed_dim: width of the joint embedding space.
        text_width / text_depth / text_heads / text_max_length: the text tower.
        lr / weight_decay / warmup_steps: AdamW with warm-up and cosine decay per step.
        init_temperature: initial softmax temperature (learned, as in CLIP).
        contrastive_weight: weight of the image-caption InfoNCE loss.
        fact_loss_weight: weight of per-cell fact heads (kind, colour, size or "empty" of each
            grid cell, read from the synthetic scenes) on the pooled patch tokens of that cell;
            0 = pure CLIP. The heads are dropped with the text tower after pretraining.
        export_dir: where ``export_encoder`` writes the encoder after ``fit``.
    """

    def __init__(
        self,
        encoder_name: str = "vit_base_patch16_224",
        encoder_kwargs: dict[str, Any] | None = None,
        tokenizer: str = "tiny",
        embed_dim: int = 128,
        text_width: int = 128,
        text_depth: int = 2,
        text_heads: int = 4,
        text_max_length: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        init_temperature: float = 0.07,
        contrastive_weight: float = 1.0,
        fact_loss_weight: float = 0.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = create_backbone(encoder_name, encoder_kwargs)
        width = int(getattr(self.encoder, "embed_dim", None) or self.encoder.num_features)
        self.image_proj = nn.Linear(width, embed_dim, bias=False)
        vocab = len(load_tokenizer(tokenizer))
        self.text = TextTower(vocab, text_width, text_depth, text_heads, text_max_length, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        if contrastive_weight <= 0 and fact_loss_weight <= 0:
            raise ValueError("model.contrastive_weight or model.fact_loss_weight must be > 0")
        self.fact_heads = nn.ModuleList(
            nn.Linear(width, len(classes) + 1) for classes in _fact_classes()
        )
        self.export_dir = export_dir
        self._val_image: list[Tensor] = []
        self._val_text: list[Tensor] = []

    @property
    def image_data_config(self) -> dict[str, Any]:
        """The encoder's timm preprocessing at its own ``img_size`` (linked to the data)."""
        return image_data_config(self.encoder)

    def patch_tokens(self, pixel_values: Tensor) -> Tensor:
        features = self.encoder.forward_features(pixel_values)
        return features[:, int(getattr(self.encoder, "num_prefix_tokens", 0)) :]

    def embed(
        self, batch: dict[str, Tensor], tokens: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        tokens = self.patch_tokens(batch["pixel_values"]) if tokens is None else tokens
        image = self.image_proj(tokens.mean(dim=1))
        text = self.text(batch["input_ids"], batch["attention_mask"])
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def fact_loss(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy of each cell's [kind, colour, size] from its pooled patch tokens, and
        the accuracy of each fact over the cells that hold a shape."""
        cells = math.isqrt(labels.shape[1])
        grid = self.encoder.patch_embed.grid_size
        maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        pooled = F.adaptive_avg_pool2d(maps.float(), cells).flatten(2).transpose(1, 2)
        occupied = labels[..., 0] > 0
        losses, accuracy = [], {}
        for index, (name, head) in enumerate(zip(FACT_NAMES, self.fact_heads, strict=True)):
            logits = head(pooled.to(head.weight.dtype)).float()
            target = labels[..., index]
            losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten()))
            right = (logits.argmax(-1) == target)[occupied]
            accuracy[name] = right.float().mean()
        return torch.stack(losses).sum(), accuracy

    def contrastive_loss(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """Symmetric cross-entropy over the batch's image-caption similarities, and top-1."""
        logits = self.logit_scale.exp().clamp(max=100.0) * image @ text.t()
        target = torch.arange(len(image), device=image.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        size = len(batch["input_ids"])
        tokens = self.patch_tokens(batch["pixel_values"])
        loss = tokens.new_zeros((), dtype=torch.float32)
        if self.hparams.contrastive_weight > 0:
            contrastive, accuracy = self.contrastive_loss(*self.embed(batch, tokens))
            loss = loss + self.hparams.contrastive_weight * contrastive
            self.log("train/contrastive_loss", contrastive, batch_size=size)
            self.log("train/batch_top1", accuracy, batch_size=size)
            self.log("train/temperature", 1.0 / self.logit_scale.exp().detach(), batch_size=size)
        if self.hparams.fact_loss_weight > 0:
            facts, accuracy = self.fact_loss(tokens, batch["cell_labels"])
            loss = loss + self.hparams.fact_loss_weight * facts
            self.log("train/fact_loss", facts, batch_size=size)
            for name, value in accuracy.items():
                self.log(f"train/{name}_accuracy", value, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        tokens = self.patch_tokens(batch["pixel_values"])
        image, text = self.embed(batch, tokens)
        self._val_image.append(image)
        self._val_text.append(text)
        if self.hparams.fact_loss_weight > 0:
            _, accuracy = self.fact_loss(tokens, batch["cell_labels"])
            for name, value in accuracy.items():
                self.log(f"val/{name}_accuracy", value, batch_size=len(tokens))

    def on_validation_epoch_end(self) -> None:
        """Retrieval over the whole validation set: each image must find its own caption."""
        if not self._val_image:
            return
        image = self.all_gather(torch.cat(self._val_image)).reshape(-1, self._val_image[0].shape[1])
        text = self.all_gather(torch.cat(self._val_text)).reshape(-1, self._val_text[0].shape[1])
        self._val_image.clear()
        self._val_text.clear()
        loss, _ = self.contrastive_loss(image, text)
        similarity = image @ text.t()
        target = torch.arange(len(image), device=image.device)
        self.log("val/loss", loss, rank_zero_only=True)
        self.log("val/image_to_text_top1", (similarity.argmax(1) == target).float().mean())
        self.log("val/text_to_image_top1", (similarity.argmax(0) == target).float().mean())

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                is_matrix = param.ndim >= 2 and not isinstance(module, nn.Embedding)
                (decay if is_matrix and name != "position_embedding" else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.98))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total - 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.export_encoder(self.export_dir)

    def export_encoder(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the ViT's timm state dict and a provenance record (command, settings, sha256)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = out / WEIGHTS_FILE
        state = {
            k: v.detach().float().cpu().contiguous() for k, v in self.encoder.state_dict().items()
        }
        save_file(state, str(weights), metadata={"format": "pt"})
        record = {
            "weights": WEIGHTS_FILE,
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "encoder_name": self.hparams.encoder_name,
            "encoder_kwargs": self.hparams.encoder_kwargs,
            "parameters": sum(v.numel() for v in state.values()),
            "command": " ".join(["lit-mllm-clip", *sys.argv[1:]]),
            "global_step": int(self.global_step),
            "hyper_parameters": dict(self.hparams),
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
            **(extra or {}),
        }
        try:
            trainer = self.trainer
        except RuntimeError:  # exported outside a Trainer (tests, notebooks)
            trainer = None
        if trainer is not None:
            data = getattr(trainer, "datamodule", None)
            if data is not None and getattr(data, "synthetic", None) is not None:
                record["data"] = dict(vars(data.synthetic))
            record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        return weights
