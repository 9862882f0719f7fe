# The two Quick-start commands of the README. PYTHON may point at a venv's interpreter.
PYTHON ?= python3

.PHONY: install demo test lint

install:
	$(PYTHON) -m pip install -q -e ".[dev]"

# main job: synthetic data + fit + validation of the tiny default, caption metrics printed at the end
demo: install
	$(PYTHON) -m lit_mllm.cli fit --config configs/tiny.yaml

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q -n 2  # two test processes (pytest-xdist): CI has 2 cores

lint:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
