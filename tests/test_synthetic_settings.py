"""One settings dataclass for the DataModule, the writer, the manifest and the command line."""

from __future__ import annotations

import dataclasses

import pytest

from lit_mllm.data import synthetic as syn
from lit_mllm.data.cli import build_parser
from lit_mllm.data.datamodule import SyntheticData

FIELDS = [f.name for f in dataclasses.fields(syn.SyntheticSettings)]


def test_the_datamodule_type_is_the_settings_dataclass() -> None:
    assert SyntheticData is syn.SyntheticSettings
    settings = syn.SyntheticSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1  # type: ignore[misc]
    assert FIELDS == [
        "dir", "num_train", "num_val", "num_test", "seed", "image_size", "max_shapes", "jitter",
        "image_format", "task", "canvas",
    ]  # fmt: skip
    # canvas enters the manifest only when set, so a set written before it still matches
    assert set(settings.content()) == set(FIELDS) - {"dir", "task", "canvas"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_train": -1}, "data.synthetic.num_train must be an integer >= 0, got -1"),
        ({"num_train": 0, "num_val": 0}, "data.synthetic needs num_train or num_val >= 1"),
        ({"image_size": 8}, "data.synthetic.image_size must be an integer >= 24, got 8"),
        ({"max_shapes": 4}, "data.synthetic.max_shapes must be an integer in 1..3, got 4"),
        ({"seed": 1.5}, "data.synthetic.seed must be an integer, got 1.5"),
        ({"image_format": "gif"}, "data.synthetic.image_format must be one of ('png', 'jpg')"),
        ({"task": "chat"}, "data.synthetic.task must be one of ('caption', 'instruct')"),
        ({"jitter": "yes"}, "data.synthetic.jitter must be true or false, got 'yes'"),
    ],
)
def test_check_names_the_option(change: dict, message: str) -> None:
    settings = dataclasses.replace(syn.SyntheticSettings(), **change)
    with pytest.raises(ValueError) as caught:
        settings.check("data.synthetic.")
    assert str(caught.value).startswith(message)
    with pytest.raises(ValueError) as caught:
        settings.check()  # the writer's own messages name the bare field
    bare = message.replace("data.synthetic.", "").replace(
        "data.synthetic", "the synthetic data set"
    )
    assert str(caught.value).startswith(bare)


def test_counts_leave_out_an_empty_test_split() -> None:
    assert syn.SyntheticSettings(num_train=3, num_val=2, num_test=0).counts() == {
        "train": 3,
        "val": 2,
    }
    assert syn.SyntheticSettings(num_train=0, num_val=2, num_test=1).counts() == {
        "train": 0,
        "val": 2,
        "test": 1,
    }


def test_matches_compares_every_content_field_and_the_version() -> None:
    settings = syn.SyntheticSettings(num_train=3, num_val=2)
    manifest = {"version": syn.SYNTHETIC_VERSION, **settings.content()}
    assert settings.matches(manifest)
    assert dataclasses.replace(settings, dir="elsewhere", task="instruct").matches(manifest)
    for name, other in (("seed", 1), ("image_format", "jpg"), ("jitter", False), ("num_test", 0)):
        assert not dataclasses.replace(settings, **{name: other}).matches(manifest), name
    assert not settings.matches({**manifest, "version": "1.0"})


def _synth(*argv: str) -> dict:
    args = vars(build_parser().parse_args(["synth", *argv]))
    return {k: v for k, v in args.items() if k not in ("handler", "command", "debug")}


def test_synth_flags_come_from_the_fields() -> None:
    defaults = _synth()
    for f in dataclasses.fields(syn.SyntheticSettings):
        if f.name == "task":
            assert "task" not in defaults  # read by the DataModule only
            continue
        assert defaults.pop(f.name) == f.default, f.name
    assert defaults == {"workers": None}  # how to write, not what: the only other flag
    old = _synth("--out", "d", "--train", "1", "--val", "2", "--test", "3", "--format", "jpg")
    new = _synth("--dir", "d", "--num-train", "1", "--num-val", "2", "--num-test", "3")
    assert old == {**new, "image_format": "jpg"}
    assert _synth("--no-jitter")["jitter"] is False and _synth("--jitter")["jitter"] is True
    with pytest.raises(SystemExit):
        _synth("--image-format", "gif")
