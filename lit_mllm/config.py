"""Typed settings of the multimodal model, and the named presets that fill them.

Every class here is a plain dataclass that LightningCLI reads from YAML (``model.encoder``,
``model.connector`` ...). Defaults are neutral: nothing in a default is sized for the tiny demo.
A *preset* (``model.preset: tiny``, ``MLLMModule(preset="micro")``) names a whole model the way
litgpt names its configs. Fields given beside it override the preset's one at a time:
``--model.preset tiny --model.connector.kind mlp`` is the tiny model with an MLP connector
(the CLI sets the preset as parser defaults; in Python a dict section changes only its fields,
a dataclass section replaces the preset's).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "PRESETS",
    "ConnectorConfig",
    "DecoderConfig",
    "DecodingConfig",
    "EncoderConfig",
    "ModelSettings",
    "OptimConfig",
    "preset_defaults",
    "resolve_model_settings",
]


@dataclass
class EncoderConfig:
    """A frozen timm model: ``pretrained`` reads the timm hub weights from the local HF cache,
    ``checkpoint_path`` a local weight file or folder (``tiny``: the packaged tiny encoder),
    ``model_kwargs`` builds a custom size; ``feature_layer`` -1 is the final normed output,
    -2 the penultimate block (LLaVA)."""

    name: str = "vit_base_patch16_224"
    pretrained: bool = False
    checkpoint_path: str | None = None
    model_kwargs: dict[str, Any] | None = None
    feature_layer: int = -1
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    sincos_pos_embed: bool = False  # random-init ViTs: fixed 2D sin-cos positions


@dataclass
class ConnectorConfig:
    """``resampler`` (MiniCPM-V: ``num_queries`` tokens per image) or ``mlp`` (LLaVA-1.5: one
    token per patch). ``key_pos_grid``: the resampler's key positions as a sin-cos table of the
    patch grid (``kv_grid``), or the query grid's table bicubically resized to the patch grid
    (``query_grid``, OmniLMM's ``get_abs_pos``: query and key positions then agree on where in
    the image they are). ``num_heads``: the resampler's cross-attention heads (default
    ``embed_dim // 128``, MiniCPM-V's rule; small decoders may want more, narrower heads).
    ``merge``: the MLP's pixel shuffle, one token per ``merge x merge`` patches (1: per patch)."""

    kind: Literal["resampler", "mlp"] = "resampler"
    num_queries: int = 64
    key_pos_grid: Literal["kv_grid", "query_grid"] = "kv_grid"
    num_heads: int | None = None
    merge: int = 1


@dataclass
class DecoderConfig:
    """``name_or_path`` (a local folder or a hub id in the HF cache) or ``config`` (a
    transformers config dict with ``model_type``) for random init; ``train`` says what learns.
    ``mlp_kernel: quack``: SwiGLU MLPs on quack's GEMMs with the activation in their epilogues
    (Hopper/Blackwell; ``lit_mllm.models.fused_mlp``). ``float8: tensorwise`` (or ``rowwise``):
    the decoder layers' linear layers run their GEMMs in float8 through torchao, with dynamic
    scales (Ada/Hopper/Blackwell; ``lit_mllm.models.float8``)."""

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
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
    mlp_kernel: Literal["transformers", "quack"] = "transformers"
    float8: Literal["tensorwise", "rowwise"] | None = None


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to ``min_lr_ratio`` (per optimiser step)."""

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
    (``num_beams: 1``) or beam search, never sampling. With the end tokens these fields are the
    whole transformers ``GenerationConfig`` the decoder uses: a pretrained decoder's
    generation_config.json (sampling, repetition penalty ...) does not apply.

    ``cache``: ``dynamic`` (the KV cache grows per token, every step runs eager), ``static``
    (preallocated; on CUDA transformers then compiles the decoding step with CUDA graphs, so a
    step costs one graph launch instead of hundreds of kernel launches: the first batch pays the
    compilation) or ``cuda_graph`` (greedy only: lit-mllm's loop over transformers' static
    cache, each new token one replay of a captured CUDA graph, without ``generate``'s per-token
    Python work; eager off CUDA; FSDP-sharded decoders use ``generate``). The captions are the
    same tokens every way (tested in float32).

    ``compile_step`` (``cuda_graph`` on CUDA): ``torch.compile`` the step before capturing it,
    so each replay runs fused kernels instead of the eager step's many small ones (1.5B on an
    H200: 99 against 94 captions/s with the MLP connector, 181 against 137 with the resampler);
    the first batch of every new shape (batch size, prompt + new tokens rounded up to 64) pays
    the compilation (35-55 s there), and past torch.compile's recompile limit (8 shapes) new
    shapes decode uncompiled, with a warning. Prompts of many lengths (instruction data): set
    ``false``, which captures the eager step."""

    max_new_tokens: int = 32
    num_beams: int = 1
    cache: Literal["dynamic", "static", "cuda_graph"] = "dynamic"
    compile_step: bool = True

    def __post_init__(self) -> None:
        if self.cache == "cuda_graph" and self.num_beams != 1:
            raise ValueError(
                "model.generation: cache 'cuda_graph' decodes greedily; set num_beams: 1 "
                f"(got {self.num_beams}) or use cache 'static' / 'dynamic' for beam search"
            )


@dataclass
class ModelSettings:
    """Everything that defines the model's weights: what a checkpoint must agree with."""

    tokenizer: str
    encoder: EncoderConfig
    connector: ConnectorConfig
    decoder: DecoderConfig

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ModelSettings] = {
    # the embedded default (configs/tiny.yaml, notebooks): the seed recipe's architecture in
    # miniature, trained on 2 CPU cores in minutes: a frozen ViT pretrained by lit-mllm-clip on
    # the synthetic set (the packaged asset, lit_mllm/assets/tiny_encoder/NOTE.md), a 9-query
    # resampler and a 4-layer decoder
    "tiny": ModelSettings(
        tokenizer="tiny",
        encoder=EncoderConfig(
            name="vit_base_patch16_224",
            checkpoint_path="tiny",
            model_kwargs={
                "img_size": 72,
                "patch_size": 6,
                "embed_dim": 128,
                "depth": 4,
                "num_heads": 2,
            },
        ),
        connector=ConnectorConfig(kind="resampler", num_queries=9),
        decoder=DecoderConfig(
            config={
                "model_type": "qwen2",
                "hidden_size": 256,
                "intermediate_size": 768,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 1024,
                "tie_word_embeddings": True,
            }
        ),
    ),
    # the smallest model that runs every code path: tests and CPU smoke runs, seconds each
    "micro": ModelSettings(
        tokenizer="tiny",
        encoder=EncoderConfig(
            name="vit_base_patch16_224",
            model_kwargs={
                "img_size": 32,
                "patch_size": 8,
                "embed_dim": 48,
                "depth": 2,
                "num_heads": 2,
            },
        ),
        connector=ConnectorConfig(kind="resampler", num_queries=4),
        decoder=DecoderConfig(
            config={
                "model_type": "qwen2",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 512,
                "tie_word_embeddings": True,
            }
        ),
    ),
}


def section(kind: type, value: Any, base: Any = None) -> Any:
    """A settings section from a dataclass (used as is), a dict (its fields over ``base``, the
    preset's section, when there is one) or None (not given)."""
    if value is None or isinstance(value, kind):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        fields = {**(asdict(base) if base is not None else {}), **value}
        return kind(**fields)
    raise TypeError(f"expected {kind.__name__} or a dict, got {type(value).__name__}")


def preset_defaults(preset: str, prefix: str = "model.") -> dict[str, Any]:
    """A preset as parser defaults (``{"model.encoder": EncoderConfig(...), ...}``): the CLI
    sets them before parsing, so a YAML or command-line field overrides only that field."""
    return {f"{prefix}{key}": copy.deepcopy(value) for key, value in vars(_preset(preset)).items()}


def _preset(name: str) -> ModelSettings:
    if name not in PRESETS:
        raise ValueError(f"model.preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def resolve_model_settings(
    preset: str | None,
    tokenizer: str | None = None,
    encoder: EncoderConfig | dict | None = None,
    connector: ConnectorConfig | dict | None = None,
    decoder: DecoderConfig | dict | None = None,
) -> ModelSettings:
    """The preset's settings with what is given here over them: a dataclass section replaces
    the preset's, a dict section changes only the fields it names."""
    base = copy.deepcopy(_preset(preset)) if preset is not None else None
    given = {
        "tokenizer": tokenizer,
        "encoder": section(EncoderConfig, encoder, base and base.encoder),
        "connector": section(ConnectorConfig, connector, base and base.connector),
        "decoder": section(DecoderConfig, decoder, base and base.decoder),
    }
    missing = [k for k in ("tokenizer", "encoder", "decoder") if given[k] is None and base is None]
    if missing:
        raise ValueError(
            f"the model needs {', '.join(f'model.{k}' for k in missing)}: give them, or name a "
            f"preset (model.preset: one of {sorted(PRESETS)})"
        )
    settings = {
        key: value if value is not None else (getattr(base, key) if base else None)
        for key, value in given.items()
    }
    if settings["connector"] is None:
        settings["connector"] = ConnectorConfig()
    return ModelSettings(**settings)
