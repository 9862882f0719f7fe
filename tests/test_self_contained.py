"""A fresh clone passes its own tests: fixtures live in the repository, no machine paths (#14.1).

Why: the tokenizer tests once read a folder beside the checkout and an absolute path of one
machine, so a user's clone failed them. These tests keep it from coming back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizer_fixtures import FIXTURE_DIR, NAMES, recorded_sha256, sha256_of, unpack

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("lit_mllm", "tests")
# What makes a file depend on this machine: a "shared" folder beside the checkout (reached by
# a relative path up or a parents[N] walk from __file__), or an absolute path under a home-like
# root. The character classes keep this file's own source from matching itself.
MACHINE_PATH = re.compile(
    r"\.\./+[s]hared\b"
    r"|(?:parents\[\d+\]|\.parent)\s*/\s*[\"'][s]hared[\"']"
    r"|(?<![\w.~\-/])/(?:[w]ork|[r]oot|[h]ome|[U]sers|[m]nt)/"
)


def _text_files(top: Path) -> list[Path]:
    files = []
    for path in sorted(top.rglob("*")):
        parts = path.relative_to(REPO).parts
        if not path.is_file() or "__pycache__" in parts or any(p.startswith(".") for p in parts):
            continue
        files.append(path)
    return files


def _offending_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    if b"\x00" in data:
        return []  # binary (compressed fixtures, images)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return []
    return [
        f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}"
        for number, line in enumerate(text.splitlines(), start=1)
        if MACHINE_PATH.search(line)
    ]


# "§" stands for the "/" that makes each line an offender, so this file passes its own scan
OFFENDERS = [
    'SHARED = Path(__file__).resolve().parents[2] § "shared" / "tokenizers"',
    "root = Path(__file__).parent.parent § 'shared'",
    '"""Templates in ..§shared/tokenizers."""',
    'load("../..§shared/tokenizers/qwen3")',
    'SHARED = Path("§work/shared/tokenizers")',
    "cache = '§root/.cache/huggingface'",
    "open('§home/alice/data.json')",
    "see `§Users/bob/coco`",
    "DATA=§mnt/data/coco",
]


@pytest.mark.parametrize("line", [line.replace("§", "/") for line in OFFENDERS])
def test_machine_path_pattern_flags_offenders(line: str) -> None:
    assert MACHINE_PATH.search(line), line


@pytest.mark.parametrize(
    "line",
    [
        'image = "/etc/passwd"',  # the path-escape tests need it
        'StoreBuilder("/data/images")',  # an example root that is never read
        "https://github.com/acme/work/blob/main/x.py",
        "data/shared_cache/x.npz",
        "tokenizers shared by several tests",
        "~/work/notes.txt",
        "runs/root/last.ckpt",
    ],
)
def test_machine_path_pattern_passes_legit_strings(line: str) -> None:
    assert not MACHINE_PATH.search(line), line


def test_no_machine_specific_paths_in_package_or_tests() -> None:
    files = [f for top in SCANNED for f in _text_files(REPO / top)]
    assert len(files) > 20  # the scan really ran over the sources
    offenders = [hit for f in files for hit in _offending_lines(f)]
    assert not offenders, "machine-specific paths (tests must read only the repository):\n" + (
        "\n".join(offenders)
    )


def test_fixture_tokenizers_decompress_to_the_recorded_sha256(tmp_path: Path) -> None:
    sums = recorded_sha256()
    assert {name.split("/")[0] for name in sums} == set(NAMES)
    unpack(tmp_path)
    for name, digest in sums.items():
        assert sha256_of(tmp_path / name) == digest, name
    provenance = (FIXTURE_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    for name, digest in sums.items():
        assert digest in provenance, f"PROVENANCE.md does not list the sha256 of {name}"
    stored = sum(p.stat().st_size for p in FIXTURE_DIR.rglob("*") if p.is_file())
    assert stored < 3_000_000  # compressed: the repository stays small


def test_a_damaged_fixture_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenizer_fixtures

    sums = recorded_sha256()
    sums["gpt2/special_tokens_map.json"] = "0" * 64
    monkeypatch.setattr(tokenizer_fixtures, "recorded_sha256", lambda: sums)
    with pytest.raises(AssertionError, match="special_tokens_map.json: decompressed sha256"):
        unpack(tmp_path)


def test_fresh_clone_passes_its_tokenizer_tests(tmp_path: Path) -> None:
    """Clone HEAD where no ``shared/`` folder exists above it and run the tokenizer tests there.

    Only two modules run (the whole suite would recurse into this test and double CI time).
    Uncommitted changes are not in the clone: this checks what a user would get.
    """
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    if not (REPO / ".git").exists():  # a folder in a clone, a file in a worktree
        pytest.skip(f"{REPO} is not a git checkout")
    clone = tmp_path / "clone"
    above = [p for p in (clone, *clone.parents) if (p / "shared").exists()]
    if above:
        pytest.skip(f"a shared/ folder exists above the temporary clone: {above[0]}")
    subprocess.run(
        [git, "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(clone), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    where = subprocess.run(
        [sys.executable, "-c", "import lit_mllm; print(lit_mllm.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(clone.resolve()), where  # the clone's code runs
    tests = ["tests/test_tokenizer.py", "tests/test_conversation.py"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
