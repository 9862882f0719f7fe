"""lit-mllm's benchmarks, one package each, run from the repository root as
``python -m benchmarks.<name>`` (importable, so the tests import them like any other code)."""
