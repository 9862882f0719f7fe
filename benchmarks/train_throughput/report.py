"""The markdown report (four tables and the notes) and, beside it, the raw numbers as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.train_throughput.generation import GenResult
from benchmarks.train_throughput.loader import LoaderResult
from benchmarks.train_throughput.measure import STALL_FACTOR, Measurement
from benchmarks.train_throughput.rows import RowReport
from benchmarks.train_throughput.sizes import (
    BASELINE_ROWS,
    BEST_ROWS,
    SLICED_ROWS,
    is_sliced,
    row_label,
)

TRAIN_COLUMNS = (
    "row",
    "decoder",
    "connector",
    "image tok",
    "micro-batch",
    "attention",
    "compile",
    "step (ms)",
    "samples/s",
    "sup tok/s",
    "real tok/s",
    "peak mem (GiB)",
    "padding %",
    "TFLOP/step",
    "MFU %",
    "MFU % (PaLM)",
    "real tok/s vs naive",
    "vs best transformers",
    "status",
)
SLICED_COLUMNS = (
    "row",
    "decoder",
    "micro-batch",
    "attention",
    "compile",
    "step (ms)",
    "samples/s",
    "real tok/s",
    "MFU %",
    "padding %",
    "views/image",
    "image tok/sample",
    "view sizes/step",
    "TFLOP/step",
    "peak mem (GiB)",
    "status",
)
SLICED_TARGETS = (1.5, 0.9)  # packed/padded real tok/s; MFU sliced packed / unsliced resampler
GEN_COLUMNS = (
    "row",
    "decoder",
    "batch",
    "new tokens",
    "cache",
    "captions/s",
    "vs baseline",
    "tokens as dynamic cache",
    "status",
)
LOADER_COLUMNS = ("workers", "batch", "image px", "samples/s", "best lit train samples/s", "ratio")
PROBE_COLUMNS = (
    "row",
    "decoder",
    "stage",
    "micro-batch",
    "attention",
    "compile",
    "samples/s",
    "peak mem (GiB)",
    "status",
)


def _fmt(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float) -> str:
    return f"{_fmt(value, 2)}x" if math.isfinite(value) else "-"


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _speedup(m: Measurement, ref: Measurement | None) -> float:
    """Real tokens/s against a baseline row of the same decoder (sliced rows: other images)."""
    if ref is None or not m.ok or is_sliced(m.row):
        return float("nan")
    return m.real_per_s / ref.real_per_s


def _train_table(finals: Sequence[Measurement], peak: float) -> list[str]:
    naive = {m.decoder: m for m in finals if m.row == "baseline" and m.ok}
    best: dict[str, Measurement] = {}  # the faster of the tuned transformers rows
    for m in finals:
        faster = m.decoder not in best or m.real_per_s > best[m.decoder].real_per_s
        if m.row in BEST_ROWS and m.ok and faster:
            best[m.decoder] = m
    rows = []
    for m in finals:
        rows.append(
            [
                row_label(m.row),
                m.decoder,
                m.connector,
                f"{m.image_tokens}/view" if is_sliced(m.row) else str(m.image_tokens),
                str(m.batch_size),
                m.attention,
                "yes" if m.compiled else "no",
                _fmt(m.step_ms),
                _fmt(m.samples_per_s, 2),
                _fmt(m.supervised_per_s, 0),
                _fmt(m.real_per_s, 0),
                _fmt(m.peak_gib, 2),
                _fmt(m.padding_pct),
                _fmt(m.tflop_per_step(), 2),
                _fmt(m.mfu(peak)),
                _fmt(m.palm_mfu(peak)),
                _ratio(_speedup(m, naive.get(m.decoder))),
                _ratio(_speedup(m, best.get(m.decoder))),
                m.status,
            ]
        )
    return _table(TRAIN_COLUMNS, rows)


def _step_time_lines(finals: Sequence[Measurement]) -> list[str]:
    """Each row's timed steps, and its rate without one-off stalls: a launch-bound row varies
    between runs, and this shows how and by how much."""
    naive = {m.decoder: m.steady()[0] for m in finals if m.row == "baseline" and m.ok}
    lines = []
    for m in finals:
        if m.step_times_ms:
            times = sorted(m.step_times_ms)
            steady, stalls = m.steady()
            versus = naive.get(m.decoder, float("nan"))
            lines.append(
                f"- {m.decoder} {m.row}: min {times[0]:.0f}, median {m.median_step_ms:.0f}, "
                f"max {times[-1]:.0f}; allocator retries {m.alloc_retries}; without the "
                f"{stalls} step(s) over {STALL_FACTOR:g}x the median: {_fmt(steady, 0)} real tok/s"
                f" ({_ratio(steady / versus)} the naive row's); in order: "
                + ", ".join(f"{t:.0f}" for t in m.step_times_ms)
                + "; host: "
                + ", ".join(f"{t:.0f}" for t in m.step_host_ms)
                + f"; {_gc_summary(m.gc_pauses)}"
            )
    return lines


def _gc_summary(pauses: Sequence[tuple[int, int, float]]) -> str:
    """Python GC passes while timed: how many, and the full (generation 2) ones by step."""
    full = [f"step {step + 1} {ms:.0f} ms" for step, generation, ms in pauses if generation == 2]
    total = sum(ms for _, _, ms in pauses)
    return f"GC passes {len(pauses)} ({total:.0f} ms; full: {', '.join(full) or 'none'})"


def _sliced_table(finals: Sequence[Measurement], peak: float) -> list[str]:
    """The sliced rows next to the unsliced resampler row, then the two ratios per decoder."""
    shown = [m for m in finals if m.row == "resampler" or is_sliced(m.row)]
    rows = [
        [
            row_label(m.row),
            m.decoder,
            str(m.batch_size),
            m.attention,
            "yes" if m.compiled else "no",
            _fmt(m.step_ms),
            _fmt(m.samples_per_s, 2),
            _fmt(m.real_per_s, 0),
            _fmt(m.mfu(peak)),
            _fmt(m.padding_pct),
            _fmt(m.views_per_image, 2),
            _fmt(m.image_tokens_per_sample),
            _fmt(m.view_sizes_per_step),
            _fmt(m.tflop_per_step(), 2),
            _fmt(m.peak_gib, 2),
            m.status,
        ]
        for m in shown
    ]
    lines = _table(SLICED_COLUMNS, rows) + [""]
    by_row = {(m.decoder, m.row): m for m in finals if m.ok}
    speed_target, mfu_target = SLICED_TARGETS
    for decoder in dict.fromkeys(m.decoder for m in shown):
        packed = by_row.get((decoder, "resampler-sliced"))
        padded = by_row.get((decoder, "resampler-sliced-padded"))
        plain = by_row.get((decoder, "resampler"))
        if packed and padded:
            ratio = packed.real_per_s / padded.real_per_s
            verdict = "met" if ratio >= speed_target else "NOT met"
            lines.append(
                f"- {decoder}: packed / padded = {_fmt(packed.real_per_s, 0)} / "
                f"{_fmt(padded.real_per_s, 0)} real tok/s = **{ratio:.2f}x** (target >= "
                f"{speed_target}x: {verdict}); padding {_fmt(packed.padding_pct)} % vs "
                f"{_fmt(padded.padding_pct)} %"
            )
        if packed and plain:
            ratio = packed.mfu(peak) / plain.mfu(peak)
            verdict = "met" if ratio >= mfu_target else "NOT met"
            lines.append(
                f"- {decoder}: MFU sliced packed / unsliced resampler = {_fmt(packed.mfu(peak))} % "
                f"/ {_fmt(plain.mfu(peak))} % = **{ratio:.2f}** (target >= {mfu_target}, within "
                f"{100 * (1 - mfu_target):.0f} %: {verdict})"
            )
        for m in shown:
            if m.decoder == decoder and is_sliced(m.row) and m.view_hist:
                hist = ", ".join(f"{views}: {count}" for views, count in m.view_hist.items())
                lines.append(
                    f"- {decoder} {m.row}: views per image over its {m.images} timed images "
                    f"(views: images): {hist}"
                )
    return lines


def _generation_table(gens: Sequence[GenResult]) -> list[str]:
    base = {g.decoder: g for g in gens if g.row == "baseline" and g.status == "ok"}
    rows = []
    for g in gens:
        ref = base.get(g.decoder)
        ratio = g.captions_per_s / ref.captions_per_s if ref else float("nan")
        rows.append(
            [
                row_label(g.row),
                g.decoder,
                str(g.batch_size),
                str(g.new_tokens),
                g.cache,
                _fmt(g.captions_per_s, 2),
                _ratio(ratio),
                f"{100 * g.agreement:.1f} %" if math.isfinite(g.agreement) else "-",
                g.status,
            ]
        )
    return _table(GEN_COLUMNS, rows)


def _loader_table(loader: Sequence[LoaderResult], finals: Sequence[Measurement]) -> list[str]:
    """Loader samples/s next to the fastest lit-mllm row's: the loader must keep up with it."""
    lit = [m.samples_per_s for m in finals if m.row not in BASELINE_ROWS and m.ok]
    best_train = max(lit) if lit else float("nan")
    rows = []
    for r in loader:
        ratio = r.samples_per_s / best_train if math.isfinite(best_train) else float("nan")
        speed = _fmt(r.samples_per_s) if r.status == "ok" else r.status
        rows.append(
            [
                str(r.workers),
                str(r.batch_size),
                str(r.image_size),
                speed,
                _fmt(best_train, 2),
                _ratio(ratio),
            ]
        )
    return _table(LOADER_COLUMNS, rows)


def _probe_table(probes: Sequence[Measurement]) -> list[str]:
    rows = [
        [
            row_label(p.row),
            p.decoder,
            p.stage,
            str(p.batch_size),
            p.attention,
            "yes" if p.compiled else "no",
            _fmt(p.samples_per_s, 2),
            _fmt(p.peak_gib, 2),
            p.status,
        ]
        for p in probes
    ]
    return _table(PROBE_COLUMNS, rows)


def render_report(
    header: list[str],
    reports: list[RowReport],
    loader: list[LoaderResult],
    peak: float,
    notes: list[str],
) -> str:
    """The whole markdown report; sections without measurements are left out."""
    finals = [r.final for r in reports if r.final is not None]
    lines = list(header) + ["", "## Training throughput (best micro-batch per row)", ""]
    lines += _train_table(finals, peak)
    step_times = _step_time_lines(finals)
    if step_times:
        lines += ["", "## Step times (ms, timed steps of each row)", ""] + step_times
    if any(m.row in SLICED_ROWS for m in finals):
        lines += ["", "## Sliced images (thumbnail + slices per image, packed vs padded)", ""]
        lines += _sliced_table(finals, peak)
    profiles = [r.profile for r in reports if r.profile]
    if profiles:
        lines += ["", "## Where the step time goes (torch.profiler)", ""]
        for text in profiles:
            lines += [text, ""]
    gens = [g for r in reports for g in r.generation]
    if gens:
        lines += ["", "## Validation captioning speed (batched greedy decoding)", ""]
        lines += _generation_table(gens)
    if loader:
        lines += ["", "## Data loader (MLLMDataModule, JPEG decode + transform + tokenise)", ""]
        lines += _loader_table(loader, finals)
    probes = [p for r in reports for p in r.probes]
    if probes:
        lines += ["", "## Probes (short runs that chose attention, compile and micro-batch)", ""]
        lines += _probe_table(probes)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_outputs(
    out: Path,
    text: str,
    header: list[str],
    reports: list[RowReport],
    loader: list[LoaderResult],
    peak: float,
) -> None:
    """The markdown report and, beside it, the raw numbers as JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {
        "header": header,
        "rows": [asdict(r.final) for r in reports if r.final is not None],
        "probes": [asdict(p) for r in reports for p in r.probes],
        "generation": [asdict(g) for r in reports for g in r.generation],
        "loader": [asdict(r) for r in loader],
        "peak_flops": peak,
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
