"""Which model settings given on the command line conflict with a checkpoint's own.

LightningCLI puts a checkpoint file's hyper-parameters over the command line and config
(``--ckpt_path``), silently: ``--model.connector.kind mlp`` with a resampler checkpoint
validates a resampler. For a sharded folder it does not, and the weights then do not fit. The
model-defining settings are the module's saved hyper-parameters; every one the user set (that
differs from its default) must equal the checkpoint's. Run settings (optimiser, generation,
metrics, paths, trainer, data) are not hyper-parameters and stay free to change.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from typing import Any


def _dataclass_in(annotation: Any) -> type | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _field_defaults(config_type: type) -> dict[str, Any]:
    """The dataclass's field defaults; a field without one (always given) is left out."""
    out = {}
    for field in dataclasses.fields(config_type):
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
    return out


def model_defaults(model_class: type) -> dict[str, Any]:
    """What each ``__init__`` argument is when left out; a ``SomeConfig | None = None``
    argument as the dataclass's fields (the parser fills unset fields with those)."""
    init = model_class.__init__
    hints = typing.get_type_hints(init)
    defaults: dict[str, Any] = {}
    for name, param in inspect.signature(init).parameters.items():
        if param.default is inspect.Parameter.empty:
            continue
        config_type = _dataclass_in(hints.get(name))
        if config_type is not None and param.default is None:
            defaults[name] = _field_defaults(config_type)
        else:
            defaults[name] = param.default
    return defaults


def with_preset(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with the sections a named preset supplies filled in: naming a preset gives
    every setting of it (a section given beside it replaces the preset's, as when building)."""
    from lit_mllm.config import PRESETS

    preset = given.get("preset")
    if preset not in PRESETS:
        return given
    filled = dict(given)
    for key, value in PRESETS[preset].as_dict().items():
        if filled.get(key) is None:
            filled[key] = value
    return filled


def _plain(value: Any) -> Any:
    """Tuples as lists, so a YAML list equals the tuple a dataclass default holds."""
    return json.loads(json.dumps(value, default=str))


def _differs(given: Any, default: Any, saved: Any) -> bool:
    """Set by the user (not its default) and not what the checkpoint holds."""
    given = _plain(given)
    return given != _plain(default) and given != _plain(saved)


def model_differences(
    given: dict[str, Any], saved: dict[str, Any], defaults: dict[str, Any]
) -> list[str]:
    """``"model.<name>: <given> (checkpoint: <saved>)"`` for every conflicting setting.

    ``given``: the parsed ``model`` section (``None`` = not given); ``saved``: the checkpoint's
    ``hyper_parameters``; ``defaults``: :func:`model_defaults`.
    """
    found = []
    given = with_preset(given)
    for key, saved_value in saved.items():
        if key.startswith("_") or key not in given or given[key] is None:
            continue
        value, default = given[key], defaults.get(key)
        if isinstance(value, dict) and isinstance(saved_value, dict):
            default = default if isinstance(default, dict) else {}
            for field in value:
                if field in saved_value and _differs(
                    value[field], default.get(field), saved_value[field]
                ):
                    found.append(
                        f"model.{key}.{field}: {_plain(value[field])!r} "
                        f"(checkpoint: {_plain(saved_value[field])!r})"
                    )
        elif _differs(value, default, saved_value):
            found.append(f"model.{key}: {_plain(value)!r} (checkpoint: {_plain(saved_value)!r})")
    return found
