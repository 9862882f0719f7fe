"""The human baseline: leave-one-out scores of an annotation file's references, cached by content.

Data never imports metrics: the baseline is computed from the annotation file alone, by whoever
prints it (the run report, ``lit-mllm-score --reference``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap")  # caption metrics; not on every GPU image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from lit_mllm.data import synthetic as syn
from lit_mllm.data.cli import main as data_cli
from lit_mllm.metrics import reference
from lit_mllm.metrics.cli import main as score_cli
from lit_mllm.metrics.reference import cache_path, leave_one_out_scores, reference_scores

PACKAGE = Path(reference.__file__).resolve().parents[1]
REFS = {
    1: ["A dog runs on the grass.", "a brown dog running", "dog playing in a field"],
    2: ["A red bus on a street", "a bus parked by the road", "the red bus is parked"],
    3: ["two cats sleeping on a bed", "cats lying on a bed", "a pair of cats asleep"],
}


def _coco(path: Path, refs: dict[int, list[str]]) -> Path:
    annotations = [
        {"id": 10 * i + k, "image_id": i, "caption": c}
        for i, captions in refs.items()
        for k, c in enumerate(captions)
    ]
    path.write_text(json.dumps({"images": [{"id": i} for i in refs], "annotations": annotations}))
    return path


def test_leave_one_out_matches_direct_pycocoevalcap():
    refs = {
        1: ["A dog runs on the grass.", "a brown dog running", "dog playing in a field"],
        2: ["A red bus on a street", "a bus parked by the road", "the red bus is parked"],
        3: ["two cats sleeping on a bed", "cats lying on a bed", "a pair of cats asleep"],
    }
    got = leave_one_out_scores(refs)
    assert list(got) == ["CIDEr", "Bleu_4"]
    with contextlib.redirect_stdout(io.StringIO()):
        tokens = PTBTokenizer().tokenize(
            {i: [{"caption": c} for c in cs] for i, cs in refs.items()}
        )
        cider = bleu = 0.0
        for k in range(3):
            res = {i: [t[k]] for i, t in tokens.items()}
            gts = {i: [r for j, r in enumerate(t) if j != k] for i, t in tokens.items()}
            cider += Cider().compute_score(gts, res)[0] / 3
            bleu += Bleu(4).compute_score(gts, res)[0][3] / 3
    assert got["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert got["Bleu_4"] == pytest.approx(bleu, abs=1e-12)


def test_leave_one_out_hand_checked_and_errors():
    # every reference equals the others: each held-out caption is a perfect match
    same = {1: ["a man rides a red horse"] * 3, "b": ["two dogs play with a ball"] * 2}
    assert leave_one_out_scores(same, ["Bleu_4", "ROUGE_L"]) == pytest.approx(
        {"Bleu_4": 1.0, "ROUGE_L": 1.0}, abs=1e-6
    )
    with pytest.raises(ValueError, match="image 'lonely' has 1 reference"):
        leave_one_out_scores({1: ["a", "b"], "lonely": ["only one"]})


def test_reference_scores_are_cached_next_to_the_file_by_content(tmp_path, monkeypatch) -> None:
    path = _coco(tmp_path / "captions_val.json", REFS)
    first = reference_scores(path, ["CIDEr"])
    assert first == {"CIDEr": round(leave_one_out_scores(REFS, ["CIDEr"])["CIDEr"], 6)}
    assert cache_path(path) == tmp_path / "captions_val.reference_scores.json"
    both = reference_scores(path, ["Bleu_4", "CIDEr"])  # only Bleu_4 is computed
    assert both["CIDEr"] == first["CIDEr"] and list(both) == ["Bleu_4", "CIDEr"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("scored again although the file did not change")

    monkeypatch.setattr(reference, "leave_one_out_scores", must_not_run)
    again = reference_scores(path, ["CIDEr", "Bleu_4"])
    assert again == both and list(again) == ["CIDEr", "Bleu_4"]
    monkeypatch.undo()
    changed = {**REFS, 3: ["two cats sleeping on a bed", "two cats sleeping on a bed"]}
    _coco(path, changed)  # same name, other content: the cache no longer applies
    assert reference_scores(path, ["CIDEr"])["CIDEr"] != first["CIDEr"]
    assert json.loads(cache_path(path).read_text())["scores"].keys() == {"CIDEr"}


def test_a_folder_that_cannot_hold_the_cache_only_costs_time(tmp_path, caplog) -> None:
    path = _coco(tmp_path / "captions.json", REFS)
    cache_path(path).mkdir()  # the cache's name is taken by a folder: writing it fails
    assert reference_scores(path, ["Bleu_4"]) == reference_scores(path, ["Bleu_4"])
    assert "could not cache reference scores" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, cache_path(path).name]


def test_files_without_two_references_per_image_are_refused(tmp_path) -> None:
    path = _coco(tmp_path / "a.json", {1: ["a dog", "the dog"], 7: ["only one"]})
    with pytest.raises(
        ValueError, match=r"a\.json: 1 image\(s\) have a single reference \(e\.g\. 7\)"
    ):
        reference_scores(path)
    with pytest.raises(ValueError, match="annotation file not found"):
        reference_scores(tmp_path / "missing.json")


def test_score_cli_prints_the_reference_alone_or_next_to_the_model(tmp_path, capsys) -> None:
    path = _coco(tmp_path / "ann.json", REFS)
    results = tmp_path / "res.json"
    results.write_text(json.dumps([{"image_id": i, "caption": c[0]} for i, c in REFS.items()]))
    args = ["--annotations", str(path), "--metrics", "CIDEr"]
    assert score_cli([*args, "--reference"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone == reference_scores(path, ["CIDEr"])
    assert score_cli([*args, "--reference", "--results", str(results)]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["reference"] == alone and both["model"]["CIDEr"] > alone["CIDEr"]
    with pytest.raises(SystemExit):
        score_cli(args)  # neither --results nor --reference
    assert "give --results" in capsys.readouterr().err


def test_synth_points_to_the_baseline_the_score_cli_computes(tmp_path, capsys) -> None:
    argv = ["synth", "--out", str(tmp_path), "--train", "2", "--val", "40", "--test", "0"]
    assert data_cli([*argv, "--seed", "0", "--workers", "1"]) == 0
    assert "leave-one-out" in capsys.readouterr().out
    val = tmp_path / "captions_val.json"
    assert (
        score_cli(
            ["--annotations", str(val), "--reference", "--metrics", "Bleu_4", "ROUGE_L", "CIDEr"]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"CIDEr", "Bleu_4", "ROUGE_L"}
    assert 0.5 < scores["CIDEr"] < 8.0 and 0.2 < scores["Bleu_4"] < 0.95
    assert json.loads(cache_path(val).read_text())["scores"] == scores


def test_the_demo_baseline_is_unchanged(tmp_path) -> None:
    """The numbers `make demo` printed as the reference before the baseline left the data
    package (the synthetic manifest's val_reference_scores for configs/tiny.yaml's val set)."""
    syn.generate_synthetic_dataset(tmp_path, 0, 200, image_size=72, workers=1)  # seed 0
    val = tmp_path / "captions_val.json"  # the demo's val captions (other image ids: same scores)
    assert reference_scores(val) == {"Bleu_4": 0.620989, "ROUGE_L": 0.746523, "CIDEr": 1.874758}


def test_data_never_imports_metrics() -> None:
    offenders = []
    for path in sorted((PACKAGE / "data").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("lit_mllm.metrics")]
    assert offenders == []
