"""Encoder -> connector -> decoder: image features spliced into the token embeddings."""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from transformers import GenerationConfig, PreTrainedModel
from transformers.integrations.fsdp import is_fsdp_managed_module

from lit_mllm.errors import UsageError
from lit_mllm.models.attention import VARLEN_ATTENTIONS, VARLEN_FA4_ATTENTION
from lit_mllm.models.fa4_varlen import fa4_problem
from lit_mllm.models.float8 import float8_problem, has_float8_linears
from lit_mllm.models.fused_mlp import fused_mlps
from lit_mllm.models.graphed_decoding import GraphedGreedyDecoding
from lit_mllm.models.token_layout import TokenLayout, image_slot_positions
from lit_mllm.models.views import ImageViews
from lit_mllm.models.vision import VisionEncoder
from lit_mllm.tokens import IGNORE_INDEX, ImageTokenIds


class ImageTokenMismatchError(ValueError):
    pass


def has_images(pixel_values: Tensor | ImageViews | None) -> bool:
    if isinstance(pixel_values, ImageViews):
        return pixel_values.num_views > 0
    return pixel_values is not None and len(pixel_values) > 0


def ranks_must_match() -> bool:
    """Whether other processes run this model in lockstep (torch.distributed, world > 1).

    Then every rank must run the same modules in every step, whatever its data: FSDP gathers a
    unit's weights in that unit's forward (a collective) and DDP waits for a gradient of every
    trainable parameter.
    """
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def in_autocast_dtype(hidden: Tensor) -> Tensor:
    """``hidden`` in the autocast dtype when autocast is on for its device, else unchanged.

    The decoder layers' residual adds then run in that dtype (bf16 + bf16, as in bf16-true
    training); the norms still compute in float32 and feed linear layers that autocast casts
    anyway. RoPE's cos/sin tables follow the hidden dtype too."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden
    return hidden.to(torch.get_autocast_dtype(device))


class MultimodalLM(nn.Module):
    """The model proper; the LightningModule adds optimisation, logging and metrics."""

    def __init__(
        self,
        encoder: VisionEncoder,
        connector: nn.Module,
        decoder: PreTrainedModel,
        image_token_ids: ImageTokenIds,
        num_image_tokens: int,
        loss_chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.decoder = decoder
        self.image_token_ids = image_token_ids
        self.num_image_tokens = num_image_tokens
        self.loss_chunk_size = loss_chunk_size
        self.blocks_compiled = False
        # the decoder's residual stream in the autocast dtype (bf16) instead of the embeddings'
        # float32: half the bytes for the norms, residual adds and their gradients
        self.autocast_residual = False
        self._kernels_checked: set[tuple[torch.device, str | None]] = set()
        self.graphed_decoding = GraphedGreedyDecoding()  # captured decoding steps, per shape

    def compile_blocks(self) -> None:
        """Regional ``torch.compile`` (once): every decoder layer (dynamic shapes, since packed
        rows change length each step) and encoder block. Compiling whole blocks instead of the
        model keeps compile time short and graph breaks (generation, hooks, LoRA) outside.
        ``generate`` runs them eager (``torch.compiler.set_stance``): KV-cache decoding would
        otherwise compile again at every new length."""
        if self.blocks_compiled:
            return
        for layer in self.decoder.get_decoder().layers:
            layer.compile(dynamic=True)
        for block in getattr(self.encoder.model, "blocks", []):
            block.compile(dynamic=False)
        self.blocks_compiled = True

    @property
    def image_data_config(self) -> dict:
        """The encoder's timm preprocessing: what the DataModule's image transform must do."""
        return self.encoder.data_config

    def placeholder_batch(self, device: torch.device) -> dict[str, Tensor]:
        """One black image and no supervised token: an empty micro-batch still runs every
        module, which DDP/FSDP need from every rank in every step."""
        ids = self.image_token_ids
        tokens = [ids.start] + [ids.patch] * self.num_image_tokens + [ids.end]
        input_ids = torch.tensor([tokens], device=device)
        channels, height, width = self.image_data_config["input_size"]
        return {
            "input_ids": input_ids,
            "labels": torch.full_like(input_ids, IGNORE_INDEX),
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": torch.arange(len(tokens), device=device)[None],
            "pixel_values": torch.zeros((1, channels, height, width), device=device),
        }

    def _connector_dtype(self, device: torch.device) -> torch.dtype:
        # meta (shape-only runs) has no autocast state to ask about
        if device.type != "meta" and torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.decoder.get_input_embeddings().weight.dtype

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, tokens, D_lm) in the decoder's embedding dtype."""
        features, grid = self.encoder(pixel_values)
        return self.connector(features.to(self._connector_dtype(features.device)), grid)

    def encode_views(self, views: ImageViews) -> list[Tensor]:
        """Sliced images: each size group at its own patch grid, then the connector over all
        groups at once. One (tokens, D_lm) tensor per view, in text order."""
        features, grids = [], []
        for group, grid in self.encoder.forward_groups(list(views.groups)):
            features.append(group.to(self._connector_dtype(group.device)))
            grids.append(grid)
        return views.in_text_order(self.connector.forward_groups(features, grids))

    def image_features(self, pixel_values: Tensor | ImageViews) -> Tensor:
        """The features of every ``<im_patch>`` slot of a batch, in text order: (slots, D_lm).
        ``pixel_values``: images of one size (N, 3, H, W), or the views of sliced images."""
        if isinstance(pixel_values, ImageViews):
            return torch.cat(self.encode_views(pixel_values))
        return self.encode_images(pixel_values).flatten(0, 1)

    def embed(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | ImageViews | None,
        sample_ids: list | None = None,
        image_features: Tensor | None = None,
        image_slots: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings with image features written at the ``<im_patch>`` positions.

        ``image_features`` (from ``image_features``: (slots, D)) replace ``pixel_values`` when
        one batch's images serve several passes (validation: loss, then captions).
        ``image_slots``: those positions, flat, found on the CPU (``TokenLayout``); without
        them they are found here, at the cost of a host sync.
        """
        embeds = self.decoder.get_input_embeddings()(input_ids)
        if image_slots is None:
            image_slots = image_slot_positions(input_ids, self.image_token_ids.patch)
        num_slots = len(image_slots)
        features = image_features
        if features is None and has_images(pixel_values):
            features = self.image_features(pixel_values)
        if features is None or len(features) == 0:
            if num_slots:
                raise ImageTokenMismatchError(
                    f"{num_slots} <im_patch> tokens but no images in the batch"
                    + (f" (samples {sample_ids})" if sample_ids else "")
                )
            if ranks_must_match():  # text-only here, images on another rank
                return embeds + self.placeholder_image_anchor(embeds)
            return embeds
        if num_slots != features.shape[0]:
            per_row = (input_ids == self.image_token_ids.patch).sum(dim=1).tolist()
            raise ImageTokenMismatchError(
                f"the batch has {num_slots} <im_patch> tokens (per row {per_row}) but its images "
                f"give {features.shape[0]} image features"
                + (f"; samples {sample_ids}" if sample_ids else "")
                + ". Check that the DataModule's num_image_tokens (and image_slicing, "
                "tokens_per_view) equal the model's."
            )
        features = features.to(embeds.dtype)
        return embeds.flatten(0, 1).index_copy(0, image_slots, features).view_as(embeds)

    def placeholder_image_anchor(self, embeds: Tensor) -> Tensor:
        """A zero that depends on the encoder and connector, for a batch without images.

        Under DDP/FSDP a text-only rank still runs the encoder (FSDP gathers its units'
        weights, as on the ranks with images) and gives the connector a zero gradient (DDP
        waits for one from every rank); adding exactly zero changes no embedding.
        """
        channels, height, width = self.image_data_config["input_size"]
        pixels = embeds.new_zeros((1, channels, height, width), dtype=torch.float32)
        return (self.encode_images(pixels).sum() * 0.0).to(embeds.dtype)

    def hidden_states(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        layout: TokenLayout | None = None,
    ) -> Tensor:
        base = self.decoder.get_decoder()
        self.check_kernels(inputs_embeds.device)
        if self.autocast_residual:
            inputs_embeds = in_autocast_dtype(inputs_embeds)
        segments = {}
        packed = layout is not None and layout.cu_seqlens is not None
        if attention_mask is None and packed and self._segments_skip_the_mask():
            # the varlen kernel reads the packed row's segments from the layout, and the
            # (all full-attention) layers need no mask: transformers' mask builder would
            # otherwise look for packed sequences in the position ids with a host sync
            segments = {
                "cu_seq_lens_q": layout.cu_seqlens,
                "cu_seq_lens_k": layout.cu_seqlens,
                "max_length_q": layout.max_seqlen,
                "max_length_k": layout.max_seqlen,
            }
            attention_mask = dict.fromkeys(self._layer_types())
        out = base(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **segments,
        )
        return out.last_hidden_state

    def _layer_types(self) -> set[str]:
        config = self.decoder.get_decoder().config
        return set(getattr(config, "layer_types", None) or ["full_attention"])

    def _segments_skip_the_mask(self) -> bool:
        """A packed row can skip mask building when every layer is plain causal attention
        through the ``lit_varlen`` kernel (no sliding window, no model-specific overlay)."""
        config = self.decoder.get_decoder().config
        return getattr(
            config, "_attn_implementation", None
        ) in VARLEN_ATTENTIONS and self._layer_types() == {"full_attention"}

    def check_kernels(self, device: torch.device) -> None:
        """The optional kernels on a GPU, once per device: ``lit_varlen_fa4`` needs
        FlashAttention-4, ``mlp_kernel: quack`` loads quack, ``float8`` needs float8 tensor
        cores. A missing package or an older GPU is one clear error at the first forward, not a
        failure inside a compiled layer."""
        name = getattr(self.decoder.get_decoder().config, "_attn_implementation", None)
        if device.type != "cuda" or (device, name) in self._kernels_checked:
            return
        if name == VARLEN_FA4_ATTENTION:
            problem = fa4_problem(device)
            if problem is not None:
                raise UsageError(f"decoder.attn_implementation {VARLEN_FA4_ATTENTION}: {problem}")
        for mlp in fused_mlps(self.decoder):
            mlp.load_kernel(device)
        problem = float8_problem(device) if has_float8_linears(self.decoder) else None
        if problem is not None:
            raise UsageError(f"model.decoder.float8: {problem}")
        self._kernels_checked.add((device, name))

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        pixel_values: Tensor | ImageViews | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        sample_ids: list | None = None,
        image_features: Tensor | None = None,
        reduction: Literal["mean", "sum"] = "mean",
        layout: TokenLayout | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Next-token loss over supervised positions (their mean, or their sum for training,
        which normalises over a whole optimiser step), and their count.

        Hidden states are gathered at supervised positions *before* the LM head, so full-vocab
        logits are never built for prompts, images or padding. ``layout`` (the collator's,
        on the same device) makes the forward free of host syncs; without it the model finds
        the same positions itself.
        """
        if layout is None:  # found on the device: host syncs (a packed row's segments are
            # then found by the attention kernel from the position ids)
            layout = TokenLayout.of(input_ids, labels, self.image_token_ids.patch)
        embeds = self.embed(input_ids, pixel_values, sample_ids, image_features, layout.image_slots)
        hidden = self.hidden_states(embeds, attention_mask, position_ids, layout)
        count = torch.full((), layout.num_supervised, device=hidden.device, dtype=torch.long)
        if layout.num_supervised == 0:
            # a zero that keeps the graph through every trainable weight, the LM head included
            # (untied heads are used only by the loss), so every rank still runs backward
            head = self.decoder.get_output_embeddings()
            return head(hidden[:, -1:]).float().sum() * 0.0, count
        selected = hidden.flatten(0, 1).index_select(0, layout.supervised)
        total = self.supervised_loss_sum(selected, layout.targets)
        return (total if reduction == "sum" else total / selected.shape[0]), count

    def supervised_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of ``hidden`` (tokens, D) against ``targets`` (tokens,)."""
        return self.supervised_loss_sum(hidden, targets) / hidden.shape[0]

    def supervised_loss_sum(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy in chunks so the (tokens x vocab) logits never exist at once."""
        head = self.decoder.get_output_embeddings()
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 weights
        total = hidden.new_zeros((), dtype=dtype)
        for start in range(0, hidden.shape[0], self.loss_chunk_size):
            logits = head(hidden[start : start + self.loss_chunk_size]).to(dtype)
            chunk_targets = targets[start : start + self.loss_chunk_size]
            total = total + F.cross_entropy(logits, chunk_targets, reduction="sum")
        return total

    def language_model(self) -> PreTrainedModel:
        """The transformers model under any PEFT wrapper (it owns ``generation_config``)."""
        get_base_model = getattr(self.decoder, "get_base_model", None)
        return get_base_model() if callable(get_base_model) else self.decoder

    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor | ImageViews | None,
        prompt_ids: Tensor,
        prompt_attention_mask: Tensor,
        *,
        generation_config: GenerationConfig | None = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        image_features: Tensor | None = None,
        cuda_graph: bool = False,
        **generate_kwargs,
    ) -> Tensor:
        """Batched, KV-cached decoding from left-padded prompts; returns only the new tokens.

        ``generation_config`` is the whole decoding setup (without it, one is built from the
        other arguments: greedy or beam search, no sampling). It also becomes the decoder's
        ``generation_config``: ``generate()`` fills every field left unset from that attribute,
        so a pretrained decoder's generation_config.json (sampling, repetition penalty, its
        own end tokens) would otherwise leak into the captions.

        ``cuda_graph``: greedy decoding by ``GraphedGreedyDecoding`` (one CUDA-graph replay per
        token) instead of ``generate``; an FSDP-sharded decoder keeps ``generate``, whose
        synced loop keeps the ranks' weight gathers in step.
        """
        if generation_config is None:
            generation_config = GenerationConfig(
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                **generate_kwargs,
            )
        elif generate_kwargs:
            generation_config = copy.deepcopy(generation_config)
            generation_config.update(**generate_kwargs)
        self.language_model().generation_config = generation_config
        if cuda_graph and not is_fsdp_managed_module(self.language_model()):
            # every block eager (captured into the graph), compiled for training or not
            with torch.compiler.set_stance("force_eager"):
                with record_function("lit_mllm/embed"):
                    embeds = self.embed(prompt_ids, pixel_values, image_features=image_features)
                return self.graphed_decoding(
                    self.decoder, embeds, prompt_attention_mask, generation_config
                )
        # eager, except with a static cache: transformers then compiles the decoding step
        # (shapes fixed by the cache). Blocks compiled for training recompile for no-grad
        # decoding; "eager_on_recompile" runs them eager instead (1.5B on an H200: 29.7
        # captions/s, 15.0 with the default stance, 63.7 when no block was compiled)
        static = generation_config.cache_implementation == "static"
        with torch.compiler.set_stance("eager_on_recompile" if static else "force_eager"):
            with record_function("lit_mllm/embed"):
                embeds = self.embed(prompt_ids, pixel_values, image_features=image_features)
            return self.decoder.generate(
                inputs_embeds=embeds,
                attention_mask=prompt_attention_mask,
                generation_config=generation_config,
            )
