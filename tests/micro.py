"""The micro model of the tests: the library's ``micro`` preset (lit_mllm/config.py), as the
dicts tests combine with their own settings. Seconds on a CPU, every code path real."""

import importlib.util
from dataclasses import asdict

import pytest

from lit_mllm.config import PRESETS

# a fit (Lightning or the CLI) checks its caption metrics before training: pycocoevalcap, which
# a GPU image may lack (the device's); CPU CI installs it, so there these tests always run
needs_caption_metrics = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None,
    reason="a fit checks its caption metrics first: needs pycocoevalcap",
)

_MICRO = PRESETS["micro"]
MICRO_VIT_KWARGS = dict(_MICRO.encoder.model_kwargs)
MICRO_DECODER_CONFIG = dict(_MICRO.decoder.config)
MICRO_ENCODER = {"name": _MICRO.encoder.name, "model_kwargs": dict(MICRO_VIT_KWARGS)}
MICRO_DECODER = {"config": dict(MICRO_DECODER_CONFIG)}
MICRO_MODEL = {
    "preset": "micro",
    "tokenizer": _MICRO.tokenizer,
    "encoder": MICRO_ENCODER,
    "connector": asdict(_MICRO.connector),
    "decoder": MICRO_DECODER,
}
