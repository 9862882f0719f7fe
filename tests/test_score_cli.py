"""`lit-mllm-score`: scores equal pycocoevalcap's; bad inputs give exit code 2 and a clear message."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

pytest.importorskip("pycocoevalcap")  # caption metrics; not on every GPU image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from lit_mllm.metrics.cli import main

REFS = {
    1: ["A dog runs on the grass.", "a brown dog running", "dog playing in a field"],
    2: ["A red bus on a street", "a bus parked by the road"],
    3: ["Two cats sleeping on a bed", "cats lying on a bed!", "a pair of cats, asleep"],
    4: ["A man riding a wave on a surfboard", "surfer on a big wave"],
}
PREDS = {1: "a dog running on grass", 2: "a red bus", 3: "two cats on a bed", 4: "a man surfing"}
METRICS = ["BLEU", "ROUGE_L", "CIDEr"]


def _write(tmp_path, refs=REFS, preds=PREDS, images=None):
    ann = {
        "images": [{"id": i} for i in (images if images is not None else refs)],
        "annotations": [
            {"id": 10 * i + k, "image_id": i, "caption": c}
            for i, caps in refs.items()
            for k, c in enumerate(caps)
        ],
    }
    res = [{"image_id": i, "caption": c} for i, c in preds.items()]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps(res))
    return ["--annotations", str(tmp_path / "ann.json"), "--results", str(tmp_path / "res.json")]


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_scores_match_pycocoevalcap(tmp_path, capsys):
    code, out, err = _run([*_write(tmp_path), "--metrics", *METRICS], capsys)
    assert code == 0, err
    got = json.loads(out)
    with contextlib.redirect_stdout(io.StringIO()):
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in cs] for i, cs in REFS.items()})
        res = tok.tokenize({i: [{"caption": c}] for i, c in PREDS.items()})
        bleu = Bleu(4).compute_score(gts, res)[0]
    expected = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], bleu, strict=True))
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    assert list(got) == list(expected)
    assert got == pytest.approx(expected, abs=1e-12, rel=0)


def test_unknown_result_ids(tmp_path, capsys):
    preds = {**PREDS, 77: "extra", 78: "extra", 79: "extra", 80: "x", 81: "y", 82: "z"}
    code, out, err = _run(_write(tmp_path, preds=preds), capsys)
    assert code == 2 and out == ""
    assert "6 result(s)" in err and "e.g. 77, 78, 79, 80, 81, ..." in err
    assert "res.json" in err and "ann.json" in err


def test_annotated_images_without_result(tmp_path, capsys):
    preds = {1: PREDS[1], 3: PREDS[3]}
    code, _, err = _run(_write(tmp_path, preds=preds), capsys)
    assert code == 2
    assert "2 annotated image(s)" in err and "no result" in err and "e.g. 2, 4" in err


def test_malformed_files(tmp_path, capsys):
    argv = _write(tmp_path)
    (tmp_path / "res.json").write_text("[{'image_id': 1")  # not JSON
    code, _, err = _run(argv, capsys)
    assert code == 2 and f"{tmp_path / 'res.json'} is not valid JSON" in err

    (tmp_path / "res.json").write_text(json.dumps({"image_id": 1, "caption": "a"}))
    code, _, err = _run(argv, capsys)
    assert code == 2 and "is not a COCO results file" in err

    (tmp_path / "res.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}] * 2))
    code, _, err = _run(argv, capsys)
    assert code == 2 and "more than one result" in err

    (tmp_path / "ann.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}]))
    code, _, err = _run(argv, capsys)
    assert code == 2 and f"{tmp_path / 'ann.json'} is not a COCO caption annotation file" in err

    code, _, err = _run(["--annotations", str(tmp_path / "nope.json"), *argv[2:]], capsys)
    assert code == 2 and "annotation file not found" in err and "nope.json" in err


def test_image_without_reference_and_bad_metric(tmp_path, capsys):
    code, _, err = _run(_write(tmp_path, images=[1, 2, 3, 4, 5]), capsys)
    assert code == 2 and "1 image(s) have no reference caption (e.g. 5)" in err
    code, _, err = _run([*_write(tmp_path), "--metrics", "BLEURT"], capsys)
    assert code == 2 and "unknown caption metric" in err
