"""Settings and presets: one definition of each model, fields overridden one at a time."""

from __future__ import annotations

import dataclasses

import pytest

from lit_mllm.config import (
    PRESETS,
    ConnectorConfig,
    DecoderConfig,
    EncoderConfig,
    preset_defaults,
    resolve_model_settings,
)


def test_defaults_are_neutral() -> None:
    """Nothing in a default is sized for the demo: real recipes need not clear anything."""
    assert EncoderConfig().model_kwargs is None and EncoderConfig().checkpoint_path is None
    assert DecoderConfig().config is None and DecoderConfig().name_or_path is None
    assert ConnectorConfig().num_queries == 64  # the MiniCPM-V / seed recipe's count
    with pytest.raises(ValueError, match=r"model\.tokenizer, model\.decoder"):
        resolve_model_settings(None, encoder=EncoderConfig())


def test_a_preset_is_the_whole_model_and_unknown_names_are_refused() -> None:
    assert resolve_model_settings("micro") == PRESETS["micro"]
    assert resolve_model_settings("micro") is not PRESETS["micro"]  # a copy: presets never change
    with pytest.raises(ValueError, match=r"'nano' is unknown; choose one of \['micro', 'tiny'\]"):
        resolve_model_settings("nano")


def test_a_dict_section_changes_only_its_fields_and_a_dataclass_replaces() -> None:
    merged = resolve_model_settings("tiny", connector={"kind": "mlp"})
    assert merged.connector.kind == "mlp"
    assert merged.connector.num_queries == PRESETS["tiny"].connector.num_queries
    assert merged.encoder == PRESETS["tiny"].encoder and merged.decoder == PRESETS["tiny"].decoder
    replaced = resolve_model_settings("tiny", connector=ConnectorConfig(kind="mlp"))
    assert replaced.connector == ConnectorConfig(kind="mlp")
    decoder = {"attn_implementation": "eager"}
    changed = resolve_model_settings("tiny", decoder=decoder)
    assert changed.decoder.attn_implementation == "eager"
    assert changed.decoder.config == PRESETS["tiny"].decoder.config


def test_preset_defaults_cover_every_model_section() -> None:
    defaults = preset_defaults("tiny", "fit.model.")
    fields = {f.name for f in dataclasses.fields(PRESETS["tiny"])}
    assert set(defaults) == {f"fit.model.{name}" for name in fields}
    assert defaults["fit.model.encoder"] == PRESETS["tiny"].encoder


def test_the_cli_overrides_one_field_of_a_preset() -> None:
    from lit_mllm.cli import MLLMCLI
    from lit_mllm.data.datamodule import MLLMDataModule
    from lit_mllm.module import MLLMModule

    class ParseOnly(MLLMCLI):
        def instantiate_classes(self) -> None:
            pass

    args = ["--model.preset", "tiny", "--model.decoder.attn_implementation", "eager"]
    args += ["--model.connector.kind", "mlp"]
    config = ParseOnly(MLLMModule, MLLMDataModule, run=False, args=args).config.model
    tiny = PRESETS["tiny"]
    assert config.decoder.attn_implementation == "eager"
    assert config.decoder.config == tiny.decoder.config  # the rest of the section: the preset's
    assert config.connector.kind == "mlp"
    assert config.connector.num_queries == tiny.connector.num_queries
    assert config.encoder.checkpoint_path == tiny.encoder.checkpoint_path
    assert config.tokenizer == tiny.tokenizer


def test_connector_settings_reach_the_resampler() -> None:
    """``num_heads`` and ``key_pos_grid`` change the module that is built, not only the YAML."""
    from lit_mllm.module import MLLMModule

    module = MLLMModule(
        preset="micro", connector={"num_queries": 9, "num_heads": 4, "key_pos_grid": "query_grid"}
    )
    resampler = module.model.connector
    assert (resampler.num_queries, resampler.num_heads) == (9, 4)
    assert resampler.key_pos_grid == "query_grid"
    default = MLLMModule(preset="micro").model.connector
    assert default.num_heads == 1  # embed_dim 64 // 128, at least one
