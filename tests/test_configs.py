"""Every YAML recipe parses with the `lit-mllm` parser; real-size ones build on the meta device.

Real recipes name pretrained weights that are not on a CI machine, so their model is built with
``torch.device("meta")`` (shapes only, no memory, no file reads): encoder weights off, decoder
built from a config dict of the same size as the named checkpoint. The parameter counts must
equal the numbers written in each recipe's header, which the README quotes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

from lit_mllm.cli import MLLMCLI
from lit_mllm.data.datamodule import MLLMDataModule
from lit_mllm.module import MLLMModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = CONFIGS / "tiny.yaml"
REAL = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "tiny.yaml")
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

# Published configs of the decoders the recipes name (hub access is not available in tests).
QWEN25 = {
    "model_type": "qwen2",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
REAL_DECODERS = {
    "Qwen/Qwen2.5-7B-Instruct": {
        **QWEN25,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen2.5-1.5B-Instruct": {
        **QWEN25,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}


# Parameter counts of those decoders, worked out by hand from the configs above (independent of
# this code): embeddings 151936 x 1536 (tied) + 28 layers x (q, k, v with biases, o, 3 MLP
# matrices, 2 norms) + final norm = 1,543,714,304; the 7B: 2 x 152064 x 3584 (untied) + 28 x
# 233,057,792 + 3584 = 7,615,616,512. Both are the counts the model cards round to 1.54B / 7.61B.
PUBLISHED_DECODER_PARAMS = {
    "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
}


class _ParseOnly(MLLMCLI):
    """The real CLI parser (same links and types) without building anything."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str):
    cli = _ParseOnly(
        MLLMModule, MLLMDataModule, run=False, args=list(args), save_config_callback=None
    )
    return cli.config


@pytest.mark.parametrize("path", [TINY, *REAL], ids=lambda p: p.name)
def test_every_recipe_parses(path: Path) -> None:
    config = parse("--config", str(path))
    # the data side's model settings are linked from the built model, never set in a recipe
    for linked in ("tokenizer", "num_image_tokens", "image_data_config"):
        assert linked not in config.data
    if path == TINY:
        assert config.model.preset == "tiny"
    else:  # a real recipe spells its model out; neutral defaults leave nothing to clear
        assert config.model.preset is None
        assert config.model.decoder.name_or_path in REAL_DECODERS
        assert config.model.encoder.name and config.model.tokenizer


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_recipe_header_documents_memory_data_run_and_paths(path: Path) -> None:
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    for needed in ("GPU memory", "Data:", "Run", "override", "Parameters"):
        assert needed in header, f"{path.name}: header lacks {needed!r}"


def _count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_recipe_builds_on_meta_with_the_stated_parameter_count(path: Path) -> None:
    kwargs = parse("--config", str(path)).model.as_dict()
    kwargs["tokenizer"] = "tiny"  # smaller than every real vocabulary: no embedding resize
    kwargs["encoder"].update(pretrained=False, checkpoint_path=None)
    decoder = kwargs["decoder"]
    name = decoder.pop("name_or_path")
    decoder["config"] = REAL_DECODERS[name]
    kwargs.pop("init_from", None)
    with torch.device("meta"):
        module = MLLMModule(**kwargs)
    base = module.model.decoder.named_parameters()  # without LoRA adapters
    assert sum(p.numel() for n, p in base if "lora_" not in n) == PUBLISHED_DECODER_PARAMS[name]
    parts = {part_name: _count(part) for part_name, part in module.model.named_children()}
    total, trained = _count(module), _count(module, trainable=True)
    print(f"\n{path.name}: {parts} total={total:,} trained={trained:,}")

    stated = re.search(r"total ([\d,]+); trained ([\d,]+)", path.read_text())
    assert stated, f"{path.name}: header must state 'total N; trained M'"
    assert (total, trained) == tuple(int(s.replace(",", "")) for s in stated.groups())
    assert module.num_image_tokens == kwargs["connector"]["num_queries"]
    assert all(not p.requires_grad for p in module.model.encoder.parameters())


def test_tiny_with_cpu_preset_instantiates_and_keeps_the_recipe_callbacks(tmp_path) -> None:
    cli = MLLMCLI(
        MLLMModule,
        MLLMDataModule,
        run=False,
        save_config_callback=None,
        args=[
            "--config",
            str(TINY),
            "--config",
            str(CONFIGS / "trainer" / "cpu.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
        ],
    )
    assert isinstance(cli.trainer.strategy, SingleDeviceStrategy)
    assert cli.trainer.strategy.root_device.type == "cpu"
    assert cli.trainer.precision == "32-true"
    assert cli.trainer.max_steps == 640  # from tiny.yaml: the preset only sets what it names
    assert cli.trainer.gradient_clip_val == 1.0
    assert cli.trainer.checkpoint_callback.monitor == "val/CIDEr"
    assert isinstance(cli.model, MLLMModule)
    assert cli.model.num_image_tokens == 9  # the resampler's 9 learned queries
    reference = MLLMModule(preset="tiny")  # the recipe is the preset, nothing more
    assert _count(cli.model) == _count(reference)
    assert _count(cli.model, trainable=True) == _count(reference, trainable=True)
    assert type(cli.model.model.connector).__name__ == "Resampler"
    assert not any(p.requires_grad for p in cli.model.model.encoder.parameters())


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_trainer_preset_overrides_only_the_trainer(preset: Path) -> None:
    base = parse("--config", str(TINY))
    both = parse("--config", str(TINY), "--config", str(preset))
    assert both.model == base.model and both.data == base.data
    assert both.trainer.max_epochs == base.trainer.max_epochs
    assert both.trainer.callbacks == base.trainer.callbacks


def test_gpu_presets_build_their_strategies() -> None:
    """The strategy objects the presets describe can be built (the FSDP one outside a Trainer)."""
    ddp = parse(
        "--config", str(TINY), "--config", str(CONFIGS / "trainer" / "ddp.yaml")
    ).trainer.strategy
    assert ddp.class_path.endswith("DDPStrategy") and not ddp.init_args.find_unused_parameters

    config = parse("--config", str(TINY), "--config", str(CONFIGS / "trainer" / "fsdp.yaml"))
    spec = config.trainer.strategy
    assert spec.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    strategy = FSDPStrategy(**spec.init_args.as_dict())  # the Trainer refuses FSDP on CPU
    assert strategy._state_dict_type == "sharded"
    wrapped = strategy.kwargs["auto_wrap_policy"]._module_classes
    names = {cls.__name__ for cls in wrapped}
    assert {"Qwen2DecoderLayer", "Block", "EvaBlockPostNorm"} <= names
    assert strategy.kwargs["use_orig_params"]  # frozen and trained weights share FSDP units
    assert config.trainer.gradient_clip_val == 1.0  # FSDP's clip_grad_norm_, via the module
    assert config.trainer.precision == "bf16-mixed"


def test_seed_recipe_wraps_the_classes_its_model_contains() -> None:
    config = parse("--config", str(CONFIGS / "seed_eva02e_7b.yaml"))
    assert config.trainer.gradient_clip_val == 1.0  # clipped under FSDP like every recipe
    policy = config.trainer.strategy.init_args
    assert policy.state_dict_type == "sharded"
    assert config.model.encoder.dtype == "float32"  # one dtype per FSDP unit
    kwargs = config.model.as_dict()
    kwargs["tokenizer"] = "tiny"
    kwargs["encoder"].update(pretrained=False)
    kwargs["decoder"]["config"] = REAL_DECODERS[kwargs["decoder"].pop("name_or_path")]
    with torch.device("meta"):
        module = MLLMModule(**kwargs)
    present = {type(m) for m in module.modules()}
    for cls in policy.auto_wrap_policy | policy.activation_checkpointing_policy:
        assert cls in present, f"{cls.__name__} is not in the seed model"


def test_fsdp_keeps_a_bf16_encoder_in_float32() -> None:
    """A bf16 encoder beside fp32 trainable weights cannot be flattened into FSDP units (one
    dtype each): under FSDP the module casts it back before the strategy wraps the model."""
    from types import SimpleNamespace

    from micro import MICRO_MODEL

    kwargs = {**MICRO_MODEL, "encoder": {**MICRO_MODEL["encoder"], "dtype": "bfloat16"}}
    module = MLLMModule(**kwargs)
    module.trainer = SimpleNamespace(strategy=SingleDeviceStrategy(), limit_val_batches=0)
    module.setup("fit")
    assert module.model.encoder.dtype == torch.bfloat16  # other strategies keep the setting
    module.trainer = SimpleNamespace(strategy=FSDPStrategy(), limit_val_batches=0)
    module.setup("fit")
    assert module.model.encoder.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_sliced_recipe_reaches_the_model_and_gives_64_tokens_per_view() -> None:
    """The CLIP-L/336 + resampler + slicing recipe: ``data.image_slicing`` is linked into the
    model, it fits the encoder's patch, and on the meta device a 640x480 image (thumbnail + 2x2
    slices) gives 5 x 64 feature rows, as many as its text block has patch slots."""
    from lit_mllm.data.slicing import ImageSlicing, plan_slices
    from lit_mllm.data.turns import image_group
    from lit_mllm.models.views import group_views
    from lit_mllm.tokens import IM_PATCH

    path = CONFIGS / "clip_l336_qwen2.5_1.5b_sliced.yaml"
    config = parse("--config", str(path))
    slicing = ImageSlicing(**config.data.image_slicing.init_args.as_dict())
    assert slicing == ImageSlicing(max_slices=9, scale_resolution=336, patch_size=14)
    kwargs = config.model.as_dict()
    linked = kwargs["image_slicing"]  # the CLI link
    assert ImageSlicing(**linked.get("init_args", linked)) == slicing
    kwargs.update(tokenizer="tiny", init_from=None)
    kwargs["encoder"].update(pretrained=False, checkpoint_path=None)
    kwargs["decoder"]["config"] = REAL_DECODERS[kwargs["decoder"].pop("name_or_path")]
    with torch.device("meta"):
        module = MLLMModule(**kwargs)
        plan = plan_slices(640, 480, slicing)
        assert plan.grid == (2, 2) and len(plan.view_sizes) == 5
        views = [torch.empty(3, h, w) for w, h in plan.view_sizes]
        features = module.model.image_features(group_views(views))
    assert module.image_slicing == slicing and module.tokens_per_view == 64
    text = image_group([module.tokens_per_view] * len(views), plan.grid)
    assert tuple(features.shape) == (text.count(IM_PATCH), 1536) == (5 * 64, 1536)
    largest = image_group([64] * 10, (3, 3))  # a thumbnail + 3x3 slices
    length = len(module.tokenizer(largest, add_special_tokens=False)["input_ids"])
    assert length == 640 + 2 + 9 * 2 + 3 <= config.data.max_length - 64  # room for the caption
