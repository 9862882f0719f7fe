"""MLLMModule: optimisation, precision, logging, validation captions and checkpoints."""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.models.connector import build_connector, num_image_tokens
from lit_mllm.models.decoder import build_decoder, resize_embeddings_for
from lit_mllm.models.mllm import MultimodalLM
from lit_mllm.models.vision import VisionEncoder
from lit_mllm.safe_load import load_checkpoint_file
from lit_mllm.tokens import IGNORE_INDEX, add_image_tokens

log = logging.getLogger(__name__)

TINY_ENCODER_KWARGS = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 192,
    "depth": 4,
    "num_heads": 3,
}
TINY_DECODER_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


@dataclass
class EncoderConfig:
    """A timm model; ``model_kwargs`` builds a custom size, ``checkpoint_path`` loads local weights."""

    name: str = "vit_base_patch16_224"
    pretrained: bool = False
    checkpoint_path: str | None = None
    model_kwargs: dict[str, Any] | None = field(default_factory=lambda: dict(TINY_ENCODER_KWARGS))
    feature_layer: int = -1
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    sincos_pos_embed: bool = False  # random-init ViTs: fixed 2D sin-cos positions


@dataclass
class ConnectorConfig:
    kind: Literal["resampler", "mlp"] = "resampler"
    num_queries: int = 16


@dataclass
class DecoderConfig:
    """``name_or_path`` (local folder or hub id in the cache) or ``config`` for random init."""

    name_or_path: str | None = None
    config: dict[str, Any] | None = field(default_factory=lambda: dict(TINY_DECODER_CONFIG))
    train: Literal["frozen", "lora", "full"] = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    gradient_checkpointing: bool = False
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3
    connector_lr: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    fused: bool | None = None  # None: fused AdamW on CUDA


@dataclass
class DecodingConfig:
    """Caption decoding in validation / test / predict (YAML key ``model.generation``): greedy
    (``num_beams: 1``) or beam search, never sampling. With the end tokens (``end_token_ids``)
    these fields are the whole transformers ``GenerationConfig`` the decoder uses: a pretrained
    decoder's generation_config.json (sampling, repetition penalty ...) does not apply."""

    max_new_tokens: int = 32
    num_beams: int = 1


# norm layers whose weights are never decayed; other libraries' norms are matched by class name
# (transformers' Qwen2RMSNorm / LlamaRMSNorm ..., timm's LayerNorm2d / RmsNorm ...)
_NORM_TYPES = (
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
_NORM_NAME = re.compile(r"norm(\d+d)?$", re.IGNORECASE)

# Each micro-batch's backward runs on its summed token loss times this constant; the step's
# gradients are rescaled to the token mean afterwards. A power of two, so the scaling is exact;
# it keeps per-micro-batch gradients near those of a mean over ~1k tokens (fp16 headroom).
LOSS_SUM_SCALE = 2.0**-10


def _empty_window() -> dict[str, Any]:
    """What an accumulation window has seen so far on this rank."""
    return {"tokens": 0.0, "loss_sum": 0.0, "nonfinite_loss": 0.0}


def template_end_token_ids(
    tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None
) -> list[int]:
    """The special token(s) the chat template writes after an assistant reply (``<|im_end|>``,
    ``<|eot_id|>`` ...), read from a rendered two-turn probe conversation: training supervises
    them, so they are what the model emits when it has finished."""
    from lit_mllm.data.conversation import ConversationTokenizer

    probe = [
        {"from": "human", "value": "Hello."},
        {"from": "gpt", "value": "Hi."},
        {"from": "human", "value": "Bye."},
        {"from": "gpt", "value": "Goodbye."},
    ]
    try:
        conv = ConversationTokenizer(
            tokenizer, num_image_tokens=1, chat_template_kwargs=chat_template_kwargs
        )
        with torch.device("cpu"):  # also when the model is built under torch.device("meta")
            tokenized = conv(probe, num_images=0, sample_id="end-token probe")
    except ValueError as error:  # not a fast tokenizer, a template that rejects the probe
        log.warning("could not read the chat template's end-of-turn token: %s", error)
        return []
    special = set(tokenizer.all_special_ids)
    ends: list[int] = []
    for _, end in tokenized.reply_spans:
        last = int(tokenized.input_ids[end - 1])
        if last in special and last not in ends:
            ends.append(last)
    return ends


def end_token_ids(
    tokenizer: Any,
    decoder_eos: int | list[int] | None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Every id that ends a caption: the tokenizer's eos, the chat template's end-of-turn
    token(s) and the pretrained decoder's own eos list (e.g. Llama-3's ``<|eot_id|>`` beside
    ``<|end_of_text|>``, Qwen's ``<|im_end|>`` beside ``<|endoftext|>``)."""
    ids: list[int] = []
    decoder_ids = [decoder_eos] if isinstance(decoder_eos, int) else list(decoder_eos or [])
    for token in [tokenizer.eos_token_id, *template_end_token_ids(tokenizer, chat_template_kwargs)]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    for token in decoder_ids:
        if int(token) not in ids:
            ids.append(int(token))
    return ids


def _check_vocabulary(
    decoder: Any, tokenizer: Any, decoder_name: str | None, tokenizer_name: str
) -> None:
    """A decoder with fewer embedding rows than the tokenizer's base vocabulary belongs to
    another model family: the embeddings would be grown silently and most token ids would
    mean something else. (More rows than the tokenizer is normal: padded vocabularies.)"""
    rows = decoder.get_input_embeddings().weight.shape[0]
    base = tokenizer.vocab_size
    if rows < base:
        name = decoder_name or "built from model.decoder.config"
        raise ValueError(
            f"decoder {name!r} has {rows} token embeddings but tokenizer {tokenizer_name!r} "
            f"has a base vocabulary of {base}: they come from different models. Set "
            "model.tokenizer to the decoder's own tokenizer (usually the same name or folder "
            "as model.decoder.name_or_path)."
        )


def _coerce(kind: type, value: Any) -> Any:
    if value is None:
        return kind()
    return kind(**value) if isinstance(value, dict) else value


class MLLMModule(L.LightningModule):
    """Frozen timm encoder + trainable connector + causal LM decoder.

    Checkpoints hold the trainable weights and the hyper-parameters. Frozen weights are saved
    only when they cannot be rebuilt from their source (``save_frozen: auto`` saves a
    random-init encoder, as in the tiny default, but never a pretrained 7B decoder).
    """

    def __init__(
        self,
        tokenizer: str = "tiny",
        encoder: EncoderConfig | None = None,
        connector: ConnectorConfig | None = None,
        decoder: DecoderConfig | None = None,
        optim: OptimConfig | None = None,
        generation: DecodingConfig | None = None,
        metrics: list[str] | None = None,
        val_caption_limit: int | None = None,
        save_frozen: Literal["auto", "always", "never"] = "auto",
        predictions_path: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_consecutive_skips: int = 10,
        init_from: str | None = None,
        init_from_strict: bool = True,
        compile_blocks: Literal["auto", "on", "off"] = "auto",
    ) -> None:
        super().__init__()
        self.encoder_cfg: EncoderConfig = _coerce(EncoderConfig, encoder)
        self.connector_cfg: ConnectorConfig = _coerce(ConnectorConfig, connector)
        self.decoder_cfg: DecoderConfig = _coerce(DecoderConfig, decoder)
        self.optim_cfg: OptimConfig = _coerce(OptimConfig, optim)
        self.generation_cfg: DecodingConfig = _coerce(DecodingConfig, generation)
        # only what defines the model: LightningCLI puts a checkpoint's hyper-parameters over
        # the command line (`--ckpt_path`), so run settings (optimiser, generation, metrics,
        # output paths) stay out and can be changed when validating or resuming
        self.save_hyperparameters(
            {
                "tokenizer": tokenizer,
                "encoder": asdict(self.encoder_cfg),
                "connector": asdict(self.connector_cfg),
                "decoder": asdict(self.decoder_cfg),
                "save_frozen": save_frozen,
                "chat_template_kwargs": chat_template_kwargs,
            }
        )
        self.tokenizer_name = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        image_token_ids = add_image_tokens(self.tokenizer)
        self.val_caption_limit = val_caption_limit
        self.save_frozen = save_frozen
        self.predictions_path = predictions_path
        self.metric_names = metrics
        if metrics is not None:  # a typo must not wait for the first validation
            from lit_mllm.metrics.caption import resolve_metrics

            try:
                resolve_metrics(metrics)
            except ValueError as error:
                raise ValueError(f"model.metrics: {error}") from None
        self._checked_metrics: tuple[str, ...] | None = None  # set in setup()
        self.chat_template_kwargs = chat_template_kwargs
        self.compile_blocks_mode = compile_blocks
        self._recompile_after_validation = False

        enc = self.encoder_cfg
        vision = VisionEncoder(
            enc.name,
            pretrained=enc.pretrained,
            checkpoint_path=enc.checkpoint_path,
            model_kwargs=enc.model_kwargs,
            feature_layer=enc.feature_layer,
            dtype=enc.dtype,
            sincos_pos_embed=enc.sincos_pos_embed,
        )
        dec = self.decoder_cfg
        decoder_model = build_decoder(
            dec.name_or_path,
            config=dec.config,
            vocab_size=len(self.tokenizer),
            attn_implementation=dec.attn_implementation,
            trust_remote_code=dec.trust_remote_code,
        )
        _check_vocabulary(decoder_model, self.tokenizer, dec.name_or_path, tokenizer)
        resize_embeddings_for(decoder_model, len(self.tokenizer))
        # read before the module's own decoding config replaces the decoder's
        self.end_token_ids = end_token_ids(
            self.tokenizer, decoder_model.generation_config.eos_token_id, chat_template_kwargs
        )
        grid = vision.default_grid
        conn = self.connector_cfg
        connector_module = build_connector(
            conn.kind,
            kv_dim=vision.embed_dim,
            embed_dim=decoder_model.config.get_text_config().hidden_size,
            kv_grid=grid,
            num_queries=conn.num_queries,
        )
        self.num_image_tokens = num_image_tokens(conn.kind, grid, conn.num_queries)
        self.image_data_config = vision.data_config
        self.model = MultimodalLM(
            vision, connector_module, decoder_model, image_token_ids, self.num_image_tokens
        )
        self._apply_decoder_training_mode()
        self.caption_metrics = None  # built lazily: Java is only needed when validating
        self.skipped: dict[str, Counter[str]] = defaultdict(Counter)  # per stage
        self._predictions: list[dict[str, Any]] = []
        self.last_val_examples: dict[str, Any] | None = None
        self.last_caption_scores: dict[str, float] = {}
        self.strict_loading = False  # frozen pretrained weights are not in checkpoints
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self.empty_batches = 0
        self._window = _empty_window()
        self._step_dropped = False  # this optimiser step's gradients were dropped (all ranks)
        self.init_from_strict = init_from_strict
        if init_from:
            self.load_trainable_weights(init_from)

    def load_trainable_weights(self, path: str) -> None:
        """Start from another run's weights (e.g. stage 2 from stage 1): matching names only.

        A tensor present in both with another shape (a checkpoint of another width, another
        number of queries) is an error listing them, since the run would silently start half
        from scratch; with ``init_from_strict: false`` they are skipped with a WARNING."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"init_from: checkpoint {path!r} does not exist")
        try:
            checkpoint = load_checkpoint_file(path, require_state_dict=False)  # checksums first
        except Exception as error:
            raise ValueError(f"init_from: {path!r} is not a readable checkpoint: {error}") from None
        state = checkpoint.get("state_dict", checkpoint)
        own = self.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        mismatched = [
            f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and own[k].shape != v.shape
        ]
        if mismatched and self.init_from_strict:
            raise ValueError(
                f"init_from: {len(mismatched)} tensors of {path!r} have another shape in this "
                f"model (checkpoint -> model): {mismatched}. Use a checkpoint of the same "
                "configuration, or set `model.init_from_strict: false` to start those from "
                "their fresh initialisation."
            )
        if not usable:
            raise ValueError(f"init_from: {path!r} shares no weights with this model")
        if mismatched:
            log.warning(
                "init_from %s: skipped %d tensors of another shape (checkpoint -> model), "
                "they keep their fresh initialisation: %s",
                path,
                len(mismatched),
                mismatched,
            )
        self.load_state_dict(usable, strict=False)
        log.info("init_from %s: loaded %d of %d tensors", path, len(usable), len(state))

    # -- parts and freezing ----------------------------------------------------------------------
    def _apply_decoder_training_mode(self) -> None:
        dec = self.decoder_cfg
        decoder = self.model.decoder
        if dec.train == "frozen":
            decoder.requires_grad_(False)
        elif dec.train == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=dec.lora_r,
                lora_alpha=dec.lora_alpha,
                lora_dropout=dec.lora_dropout,
                target_modules=list(dec.lora_target_modules),
                task_type="CAUSAL_LM",
            )
            self.model.decoder = get_peft_model(decoder, lora)
        if dec.gradient_checkpointing:
            self.model.decoder.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            if dec.train != "full":
                self.model.decoder.enable_input_require_grads()

    def _frozen_parts_to_save(self) -> set[str]:
        if self.save_frozen == "always":
            return {"model.encoder.", "model.decoder."}
        if self.save_frozen == "never":
            return set()
        parts = set()
        if not (self.encoder_cfg.pretrained or self.encoder_cfg.checkpoint_path):
            parts.add("model.encoder.")
        if not self.decoder_cfg.name_or_path:
            parts.add("model.decoder.")
        return parts

    def _trainable_names(self) -> set[str]:
        """State-dict names of trainable parameters (FSDP / checkpoint wrappers stripped)."""
        return {_state_dict_name(name) for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_mllm_counters"] = {  # plain ints: loads with weights_only=True
            "skipped": {stage: dict(counts) for stage, counts in self.skipped.items()},
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self._consecutive_skips,
            "empty_batches": self.empty_batches,
        }
        trainable = self._trainable_names()
        keep = tuple(self._frozen_parts_to_save())
        state = checkpoint["state_dict"]
        for key in list(state):
            frozen = key not in trainable and key.startswith(("model.encoder.", "model.decoder."))
            if frozen and not (keep and key.startswith(keep)):
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("lit_mllm_counters", {})
        for stage, counts in counters.get("skipped", {}).items():
            self.skipped[stage] = Counter(counts)
        self.skipped_steps = counters.get("skipped_steps", 0)
        self._consecutive_skips = counters.get("consecutive_skips", 0)
        self.empty_batches = counters.get("empty_batches", 0)
        if "state_dict" not in checkpoint:  # FSDP sharded checkpoints load the weights themselves
            return
        missing = set(self.state_dict()) - set(checkpoint["state_dict"])
        trainable_missing = sorted(self._trainable_names() & missing)
        if trainable_missing:
            raise ValueError(
                f"checkpoint lacks {len(trainable_missing)} trainable weights, e.g. "
                f"{trainable_missing[:3]}: it was written for a different model configuration"
            )

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str = "cpu") -> MLLMModule:
        """Load a folder written by ``lit-mllm-export --format native``."""
        from lit_mllm.export import load_pretrained

        return load_pretrained(directory, map_location=map_location)

    def setup(self, stage: str) -> None:
        """Checks what would otherwise fail at the first validation, thousands of steps in
        (recipes skip the sanity check): the caption metrics' Java and SPICE jars.

        FSDP flattens each unit's parameters into one buffer of one dtype, so a bf16 encoder
        beside fp32 connector weights cannot be wrapped: keep it in float32 there (the compute
        still runs in bf16 under the ``bf16-mixed`` precision)."""
        from lightning.pytorch.strategies import FSDPStrategy

        validates = stage in ("validate", "test") or (
            stage == "fit" and bool(self.trainer.limit_val_batches)
        )
        if validates:
            self._checked_metrics = self._check_caption_metrics()

        encoder = self.model.encoder
        if isinstance(self.trainer.strategy, FSDPStrategy) and encoder.dtype != torch.float32:
            log.warning(
                "FSDP needs one dtype per wrapped unit: casting the frozen encoder from %s to "
                "float32 (set `model.encoder.dtype: float32` to silence this)",
                encoder.dtype,
            )
            encoder.model.float()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """FSDP shards gradients: clip by the global norm through its own ``clip_grad_norm_``
        (Lightning's FSDP precision plugin refuses norm clipping, so ``self.clip_gradients``
        must not be reached there)."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        if not gradient_clip_val or self._step_dropped:  # the same decision on every rank
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if isinstance(strategy, FSDPStrategy):
            if gradient_clip_algorithm == "value":  # elementwise: shards clip like the whole
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False) and not self._grad_scaler():
            # fused AdamW: Lightning refuses to clip it, but with no scaler there is nothing
            # to unscale first, so clip directly
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _grad_scaler(self) -> bool:
        """Whether the precision plugin scales gradients (and so skips non-finite steps)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    # -- optimisation ----------------------------------------------------------------------------
    def no_decay_parameters(self) -> set[int]:
        """``id``s of the parameters AdamW must not decay, chosen by what they are, not by
        their names: weights of any norm module (torch's, timm's and transformers' RMSNorm
        classes), biases, token embeddings and the output embedding (tied or not), and the
        resampler's learned queries."""
        from lit_mllm.models.resampler import Resampler

        output_embeddings = self.model.language_model().get_output_embeddings()
        ids: set[int] = set()
        for module in self.modules():
            whole = (
                isinstance(module, _NORM_TYPES)
                or _NORM_NAME.search(type(module).__name__) is not None
                or isinstance(module, nn.Embedding)
                or module is output_embeddings
            )
            for name, param in module.named_parameters(recurse=False):
                bias = name == "bias" or name.endswith("_bias")
                query = isinstance(module, Resampler) and name == "query"
                if whole or bias or query:
                    ids.add(id(param))
        return ids

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.optim_cfg
        exempt = self.no_decay_parameters()
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = id(param) in exempt
            is_connector = name.startswith("model.connector.")
            groups.setdefault((no_decay, is_connector), []).append(param)
        param_groups = [
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else opt.weight_decay,
                "lr": (opt.connector_lr or opt.lr) if is_connector else opt.lr,
            }
            for (no_decay, is_connector), params in groups.items()
        ]
        fused = opt.fused
        if fused is None:  # a grad scaler must unscale before clipping: not fused then
            fused = torch.cuda.is_available() and not self._grad_scaler()
        optimizer = torch.optim.AdamW(param_groups, lr=opt.lr, betas=opt.betas, fused=fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(opt.warmup_steps, max(total - 1, 0))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- steps -----------------------------------------------------------------------------------
    def forward(
        self,
        batch: dict[str, Any],
        image_features: Tensor | None = None,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> tuple[Tensor, Tensor]:
        return self.model(
            batch["input_ids"],
            batch["labels"],
            pixel_values=batch.get("pixel_values"),
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            sample_ids=batch.get("sample_id"),
            image_features=image_features,
            reduction=reduction,
        )

    def _count_skipped(self, batch: dict[str, Any], stage: str) -> None:
        self.skipped[stage].update(batch.get("skipped", {}))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The micro-batch's *summed* token loss times ``LOSS_SUM_SCALE``; ``_finish_gradients``
        turns the accumulated gradient into that of the mean over every supervised token of the
        optimiser step (all micro-batches of the accumulation window, all ranks).

        Never ``None``: under DDP/FSDP every rank must run forward and backward in every step
        (collectives). An empty micro-batch runs a placeholder sample; a non-finite loss returns
        a zero loss and flags the step, which every rank then skips together.
        """
        self._count_skipped(batch, "train")
        if batch.get("batch_size", 1) == 0:  # every sample of the micro-batch was dropped
            batch = self._placeholder_batch()
        loss_sum, count = self(batch, reduction="sum")
        if int(count) == 0:
            self.empty_batches += 1
            self.log("train/empty_batches", float(self.empty_batches), batch_size=1)
        if not torch.isfinite(loss_sum):
            self._window["nonfinite_loss"] = 1.0
            log.warning(
                "non-finite training loss in micro-batch %d: %s", batch_idx, loss_sum.item()
            )
            return self._zero_loss(loss_sum)
        self._window["tokens"] += count.detach().double()
        self._window["loss_sum"] += loss_sum.detach().double()
        return loss_sum * LOSS_SUM_SCALE

    def _placeholder_batch(self) -> dict[str, Any]:
        """One image and no supervised token: an empty micro-batch still runs every module."""
        ids = self.model.image_token_ids
        tokens = [ids.start] + [ids.patch] * self.num_image_tokens + [ids.end]
        input_ids = torch.tensor([tokens], device=self.device)
        channels, height, width = self.image_data_config["input_size"]
        return {
            "input_ids": input_ids,
            "labels": torch.full_like(input_ids, IGNORE_INDEX),
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": torch.arange(len(tokens), device=self.device)[None],
            "pixel_values": torch.zeros((1, channels, height, width), device=self.device),
        }

    def _zero_loss(self, loss: Tensor) -> Tensor:
        """A zero loss whose backward reaches every trainable parameter (``loss * 0`` is NaN
        for a NaN loss). Under FSDP the backward must run through the forward graph instead
        (each unit reduce-scatters from its backward hook), so the gradients are NaN there;
        either way the step is skipped on every rank."""
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            return loss * 0.0
        params = [p for p in self.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1].sum() * 0.0 for p in params), loss.new_zeros(()))

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Any = None,
    ) -> None:
        """Lightning calls this once per optimiser step, and the closure runs the window's last
        micro-batch (forward, backward, DDP/FSDP gradient reduction). The gradients are
        finished right after it, before any ``on_before_optimizer_step`` hook (callbacks run
        theirs first: the logged grad norm must be the final one), clipping and the step."""
        if optimizer_closure is None:
            optimizer.step()
            return

        def closure() -> Any:
            result = optimizer_closure()
            self._finish_gradients(optimizer)
            return result

        optimizer.step(closure=closure)

    def _finish_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """One all-reduce of [tokens, loss sum, non-finite flags] over the window, then either
        every rank drops all gradients (AdamW then leaves parameters and moments untouched)
        or every rank rescales them to the global token mean.

        After the reduction each parameter holds ``LOSS_SUM_SCALE / (accumulate * world)``
        times the gradient of the summed loss (Lightning divides each micro-batch by
        ``accumulate_grad_batches``, DDP/FSDP average over ranks): multiplying by
        ``accumulate * world / (LOSS_SUM_SCALE * tokens)`` gives the mean over every token.
        Where a grad scaler runs (fp16-mixed) it skips non-finite gradients itself.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        device = self.device
        bad_grads = 0.0
        if grads and not self._grad_scaler():  # non-finite iff some gradient is (one kernel)
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            bad_grads = (~torch.isfinite(norm)).to(device, torch.float64)
        window = self._window
        stats = torch.stack(
            [
                torch.as_tensor(window["tokens"], dtype=torch.float64, device=device),
                torch.as_tensor(window["loss_sum"], dtype=torch.float64, device=device),
                torch.as_tensor(window["nonfinite_loss"], dtype=torch.float64, device=device),
                torch.as_tensor(bad_grads, dtype=torch.float64, device=device),
            ]
        )
        self._window = _empty_window()
        world = self.trainer.world_size
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        tokens, loss_sum, bad_loss, bad_grad = stats.tolist()
        self._step_dropped = bool(bad_loss or bad_grad or tokens == 0)
        if self._step_dropped:
            for param in params:
                param.grad = None
            if bad_loss or bad_grad:
                why = "non-finite loss" if bad_loss else "non-finite gradients"
                self._skip_step(why + (f" on {int(bad_loss)} rank(s)" if bad_loss else ""))
            else:
                log.warning("optimiser step %d saw no supervised token: skipped", self.global_step)
            return
        self._consecutive_skips = 0
        factor = self.trainer.accumulate_grad_batches * world / (LOSS_SUM_SCALE * tokens)
        for grad in grads:
            grad.mul_(factor)
        self.log("train/loss", loss_sum / tokens, prog_bar=True, batch_size=1)
        self.log("train/supervised_tokens", tokens, batch_size=1)
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)

    def _skip_step(self, why: str) -> None:
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        log.warning("skipping optimiser step %d: %s", self.global_step, why)
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(
                f"{self._consecutive_skips} consecutive optimiser steps skipped ({why}); "
                "lower the learning rate, check the data, or use bf16 instead of fp16"
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        self._count_skipped(batch, prefix)
        if batch.get("batch_size", 1) == 0:
            return
        pixel_values = batch.get("pixel_values")
        # the images are encoded once and serve both the loss and the captions
        features = None
        if pixel_values is not None and len(pixel_values):
            features = self.model.encode_images(pixel_values)
        loss, count = self(batch, image_features=features)
        if int(count) > 0:
            self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=int(count), sync_dist=True)
        seen = batch_idx * len(batch["sample_id"])
        limit = self.val_caption_limit if prefix == "val" else None
        if "prompt_ids" in batch and (limit is None or seen < limit):
            keep = (
                len(batch["sample_id"])
                if limit is None
                else min(len(batch["sample_id"]), limit - seen)
            )
            captions = self.caption(batch, limit=keep, image_features=features)
            ids, refs = batch["image_id"][:keep], batch["references"][:keep]
            with_refs = [i for i, r in enumerate(refs) if r]
            if with_refs:
                self._metrics().update(
                    [ids[i] for i in with_refs],
                    [captions[i] for i in with_refs],
                    [refs[i] for i in with_refs],
                )
            if batch_idx == 0:  # for the caption gallery: first images of the epoch
                images = (
                    batch["pixel_values"][: len(captions)]
                    if batch.get("pixel_values") is not None
                    else None
                )
                self.last_val_examples = {
                    "pixel_values": None if images is None else images.detach().float().cpu(),
                    "predictions": captions,
                    "references": [list(r) for r in refs],
                    "image_ids": list(ids),
                }

    def caption(
        self,
        batch: dict[str, Any],
        limit: int | None = None,
        image_features: Tensor | None = None,
    ) -> list[str]:
        """Greedy/beam captions for the batch's generation prompts (the first ``limit`` rows).

        ``image_features``: the batch's images already encoded (``model.encode_images``).
        """
        rows = slice(0, limit)
        pixel_values = batch.get("pixel_values")
        if limit is not None:
            # prompts hold one image block per image, in row order
            prompt_patch = batch["prompt_ids"][rows] == self.model.image_token_ids.patch
            num_images = int(prompt_patch.sum()) // self.num_image_tokens
            if pixel_values is not None:
                pixel_values = pixel_values[:num_images]
            if image_features is not None:
                image_features = image_features[:num_images]
        generated = self.model.generate(
            pixel_values,
            batch["prompt_ids"][rows],
            batch["prompt_attention_mask"][rows],
            generation_config=self.hf_generation_config(),
            image_features=image_features,
        )
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def hf_generation_config(self) -> GenerationConfig:
        """The complete transformers decoding setup, built from ``model.generation`` (read at
        each call, so changing ``generation_cfg`` takes effect)."""
        decoding = self.generation_cfg
        return GenerationConfig(
            max_new_tokens=decoding.max_new_tokens,
            num_beams=decoding.num_beams,
            do_sample=False,
            eos_token_id=list(self.end_token_ids),
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _check_caption_metrics(self) -> tuple[str, ...]:
        """The metrics validation will compute: Java present (the PTB tokenizer every metric
        uses, METEOR, SPICE), SPICE's jars present when SPICE was asked for; the default list
        drops SPICE with one warning instead."""
        from lit_mllm.metrics import java
        from lit_mllm.metrics.caption import DEFAULT_METRICS, resolve_metrics

        names = list(resolve_metrics(self.metric_names or DEFAULT_METRICS))
        missing = java.missing_spice_jars() if "SPICE" in names else []
        if missing and self.metric_names is None:
            log.warning(java.spice_install_hint(missing))
            names.remove("SPICE")
        elif missing:
            raise FileNotFoundError(
                f"model.metrics asks for SPICE, but the Stanford CoreNLP jars it needs are "
                f"missing: {', '.join(str(p) for p in missing)}. Run `python -m "
                "pycocoevalcap.spice.get_stanford_models` once with network access (or copy "
                "the two jars there), or remove SPICE from model.metrics."
            )
        try:
            java.find_java()
        except java.JavaNotFoundError as error:
            raise java.JavaNotFoundError(
                f"model.metrics {names} need Java for validation: {error} Or set "
                "trainer.limit_val_batches: 0 to train without validation."
            ) from None
        return tuple(names)

    def _metrics(self):
        if self.caption_metrics is None:
            from lit_mllm.metrics.caption import CaptionMetrics

            names = self._checked_metrics or self.metric_names
            kwargs = {"metrics": list(names)} if names else {}
            self.caption_metrics = CaptionMetrics(**kwargs).to(self.device)
        return self.caption_metrics

    # -- regional compilation (training only) ---------------------------------------------------
    def _wants_compiled_blocks(self) -> bool:
        """``auto``: on CUDA, except under FSDP (its flat parameters and per-layer wrapping do
        not mix with compiling the layers in place); never on CPU, where compile time would
        outweigh the gain of a short run."""
        from lightning.pytorch.strategies import FSDPStrategy

        if self.compile_blocks_mode != "auto":
            return self.compile_blocks_mode == "on"
        fsdp = isinstance(self.trainer.strategy, FSDPStrategy)
        return self.device.type == "cuda" and not fsdp

    def on_train_start(self) -> None:
        if self._wants_compiled_blocks():
            self.model.compile_blocks(True)

    def on_validation_start(self) -> None:
        # generation with a KV cache would recompile the layers at every new length: eager
        self._recompile_after_validation = self.model.blocks_compiled
        if self._recompile_after_validation:
            self.model.compile_blocks(False)

    def on_validation_end(self) -> None:
        if self._recompile_after_validation:
            self.model.compile_blocks(True)

    def on_train_end(self) -> None:
        if self.model.blocks_compiled:
            self.model.compile_blocks(False)

    def on_validation_epoch_start(self) -> None:
        self._metrics()  # every rank builds it: compute() is a collective under DDP

    def on_test_epoch_start(self) -> None:
        self._metrics()

    def on_validation_epoch_end(self) -> None:
        self._log_caption_metrics("val")
        self._report_skipped("val")

    def on_test_epoch_end(self) -> None:
        self._log_caption_metrics("test")
        self._report_skipped("test")

    def on_train_epoch_end(self) -> None:
        self._report_skipped("train")

    def _log_caption_metrics(self, prefix: str) -> None:
        metric = self.caption_metrics
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if metric is None or (not distributed and not metric._samples):
            return
        scores = self.caption_metrics.compute()
        self.caption_metrics.reset()
        self.last_caption_scores = {f"{prefix}/{k}": float(v) for k, v in scores.items()}
        for name, value in self.last_caption_scores.items():
            self.log(name, value, sync_dist=False, rank_zero_only=False)

    def _report_skipped(self, stage: str) -> None:
        """Dropped samples are counted, logged and written next to the logs: none vanish."""
        skipped = dict(self.skipped[stage])
        dm = getattr(self.trainer, "datamodule", None)
        # only this stage's file: {stage: {reason: count}} (the val report once showed train's)
        at_load = dict((getattr(dm, "skipped_at_load", None) or {}).get(stage) or {})
        gathered = self.all_gather_counts(skipped)  # a collective: every rank calls it
        if not gathered and not at_load:
            return
        summary = {"stage": stage, "epoch": self.current_epoch, "skipped_samples": gathered}
        summary["skipped_at_load"] = at_load
        for reason, count in gathered.items():
            self.log(f"data/skipped_{reason}", float(count), rank_zero_only=True)
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective
        if self.trainer.is_global_zero:
            log.warning(
                "skipped samples (%s, epoch %d): %s; at load: %s",
                stage,
                self.current_epoch,
                gathered,
                at_load,
            )
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / f"skipped_{stage}.json").write_text(json.dumps(summary, indent=2))
        self.skipped[stage].clear()

    def all_gather_counts(self, counts: dict[str, int]) -> dict[str, int]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return counts
        gathered: list[dict[str, int]] = [{} for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, counts)
        total: Counter[str] = Counter()
        for part in gathered:
            total.update(part)
        return dict(total)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One row per sample: its ``sample_id``, the source's ``image_id`` where it has one
        (COCO / Karpathy; LLaVA records have none) and the caption."""
        self._count_skipped(batch, "predict")
        if batch.get("batch_size", 1) == 0:
            return []
        captions = self.caption(batch)
        results = []
        for sample_id, image_id, caption in zip(
            batch["sample_id"], batch["image_id"], captions, strict=True
        ):
            row: dict[str, Any] = {"sample_id": sample_id}
            if image_id is not None:
                row["image_id"] = image_id
            row["caption"] = caption
            results.append(row)
        self._predictions.extend(results)
        return results

    def on_predict_epoch_end(self) -> None:
        results = self._predictions
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[list] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(parts, results)
            # a padded sampler repeats samples; several samples may share an image (one per
            # caption, or LLaVA conversations about one picture): the sample id is the key
            unique = {r["sample_id"]: r for part in parts for r in part}
            results = list(unique.values())
        if self.predictions_path and self.trainer.is_global_zero:
            path = Path(self.predictions_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, ensure_ascii=False, indent=1))
            log.info("wrote %d captions to %s", len(results), path)
        self._predictions = []

    # -- modes -----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> MLLMModule:
        super().train(mode)
        self.model.encoder.train(False)  # frozen: never dropout / batch-norm updates
        return self


def _state_dict_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name
