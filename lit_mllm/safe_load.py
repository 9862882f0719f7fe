"""Moved to :mod:`lit_mllm.checkpoints.safe_load`; kept only until ``module.py`` imports it there
(issue #16: the lead's rewrite of module.py). Delete this file then."""

from lit_mllm.checkpoints.safe_load import load_checkpoint_file

__all__ = ["load_checkpoint_file"]
