"""The notebooks: committed without outputs, and each one runs top to bottom without an error.

They are executed with nbclient in one temporary working directory, in order, so notebook 03
reuses the checkpoint notebook 02 writes to ``_artifacts/tiny.ckpt`` (run alone, 03 trains its own).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_data_and_masks", "02_train_tiny", "03_caption_and_score"]
CELL_TIMEOUT_S = 420  # a whole notebook should take < 5 min on 2 CPU cores


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def test_notebook_set_is_complete() -> None:
    found = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert found == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped(name: str) -> None:
    """Outputs and execution counts stay out of git (clean diffs, no stale results)."""
    notebook = _read(name)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in notebook.metadata
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells, f"{name} has no code"
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"{name}: code cell {index} has stored outputs"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


def _outputs(notebook, output_type: str | None = None) -> list[dict]:
    return [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if output_type is None or out.output_type == output_type
    ]


def _text(notebook) -> str:
    parts = []
    for out in _outputs(notebook):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/html", "") + out.data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # the kernel inherits this environment: make the checkout importable even when not installed
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # on shared CI cores, spinning OpenMP workers slow training several-fold; passive waits do not
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    notebook = _read(name)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    seconds = time.perf_counter() - start
    (workdir / f"{name}.seconds.json").write_text(json.dumps({"seconds": seconds}))
    print(f"{name}: {seconds:.0f} s")

    errors = _outputs(notebook, "error")
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    images = [o for o in _outputs(notebook) if "image/png" in o.get("data", {})]
    text = _text(notebook)
    if name == "01_data_and_masks":
        assert len(images) == 2  # the batch grid and the padding/packing strips
        assert "tiny tokenizer (packaged)" in text
        # the real templates, from the repository's tokenizer fixtures (never skipped in a clone)
        assert "<h4>qwen3: " in text and "<h4>mistral-7b-instruct-v0.1: " in text
        assert "&lt;image x16&gt;" in text
        assert "instruction (multi-turn)" in text
    elif name == "02_train_tiny":
        assert len(images) == 1  # the curves
        assert "trained 60 steps" in text
        assert (workdir / "_artifacts" / "tiny.ckpt").is_file()
    else:
        assert len(images) == 1  # the caption grid
        assert "CIDEr" in text and "METEOR" in text
