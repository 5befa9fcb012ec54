"""What the CLI shows: summary tables (rich), JSON reports, and the progress display.

* Tables go to stdout (or stderr when stdout carries JSON); progress goes to stderr.
* JSON reports are written atomically (temp file + rename), with non-finite floats
  spelled as strings ("inf", "nan") so every JSON parser accepts them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sized
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .errors import UserInputError

# Width of tables when the output is not a terminal (a pipe or a file): wide enough that
# the columns are not folded, narrow enough to read in a terminal afterwards.
PIPE_WIDTH = 120


# ---------------------------------------------------------------------------- consoles
def make_console(stream: IO[str] | None = None, *, stderr: bool = False) -> Console:
    """A rich Console on ``stream`` (default stdout/stderr, looked up now so capturing works)."""
    stream = stream or (sys.stderr if stderr else sys.stdout)
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(file=stream, width=None if is_tty else PIPE_WIDTH, highlight=False, soft_wrap=False)


# ---------------------------------------------------------------------------- formatting
def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"  # pragma: no cover - loop always returns


def human_count(n: float | None) -> str:
    """1234567 → '1.23M' (parameters, MACs)."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if n == int(n) else f"{n:.3g}"


def fmt_number(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def fmt_metric(metric: str, value: Any) -> str:
    """Metric values at the precision that matters: cosine close to 1 needs many digits."""
    if value is None:
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if metric == "cosine":
        return f"{v:.6f}"
    if metric == "top1":
        return f"{v:.3f}"
    return f"{v:.3g}"


def fmt_change(before: float | None, after: float | None, fmt=fmt_number) -> str:
    if before is None or after is None:
        return f"{fmt(before)} → {fmt(after)}"
    text = f"{fmt(before)} → {fmt(after)}"
    if before:
        pct = 100.0 * (after - before) / before
        text += f" ({pct:+.1f}%)"
    return text


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _row(table: Table, *cells) -> None:
    """Add a row of plain text: tensor and node names like 'x[0]' must not be read as rich markup."""
    table.add_row(*(c if isinstance(c, Text) else Text("" if c is None else str(c)) for c in cells))


# ---------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays → Python, Paths → str, inf/nan → strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "as_dict"):
        return to_jsonable(obj.as_dict())
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def dumps(data: Any) -> str:
    return json.dumps(to_jsonable(data), indent=2, allow_nan=False)


def check_report_path(path: str) -> None:
    """Fail before any work if the report cannot be written ('-' means stdout)."""
    if path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise UserInputError(f"report path '{p}' is a directory.", "give a file name such as report.json.")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UserInputError(f"report folder '{folder}' does not exist.", "create it first or choose another --report path.")


def write_json(data: Any, path: str, stdout: IO[str] | None = None) -> None:
    """Write ``data`` as JSON to ``path`` atomically, or to stdout when ``path`` is '-'."""
    text = dumps(data) + "\n"
    if path == "-":
        (stdout or sys.stdout).write(text)
        return
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    # A file in a private temp folder (created with the usual permissions, unlike mkstemp's 0600),
    # renamed over the target: readers never see half a report.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".onnxopt-") as tmp:
        tmp_file = Path(tmp) / p.name
        tmp_file.write_text(text, encoding="utf-8")
        os.replace(tmp_file, p)


# ---------------------------------------------------------------------------- progress
class _LoopBar(BarColumn):
    """A bar for loops only; the status line (a task with ``status=True``) shows just its text."""

    def render(self, task):
        return Text("") if task.fields.get("status") else super().render(task)


class _LoopCount(MofNCompleteColumn):
    def render(self, task):
        if task.fields.get("status"):
            return Text("")
        if task.total is None:
            return Text(f"{int(task.completed)}", style="progress.download")
        return super().render(task)


class ProgressDisplay(AbstractContextManager):
    """A live display on stderr: one status line (the running pass) and a bar per loop.

    ``track`` has the signature of ``PassContext.progress_factory``. When disabled
    (``--quiet`` or stderr is not a terminal) every method is a no-op.
    """

    def __init__(self, enabled: bool, console: Console | None = None):
        self.enabled = enabled
        self.console = console or make_console(stderr=True)
        self._progress: Progress | None = None
        self._status_task = None

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), _LoopBar(), _LoopCount(),
                TimeElapsedColumn(), console=self.console, transient=True,
            )
            self._progress.start()
            self._status_task = self._progress.add_task("starting", total=None, status=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        return None

    def status(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._status_task, description=text)

    def track(self, items: Iterable, description: str, total: int | None = None) -> Iterator:
        if self._progress is None:
            yield from items
            return
        if total is None and isinstance(items, Sized):
            total = len(items)
        task = self._progress.add_task(f"  {description}", total=total)
        try:
            for item in items:
                yield item
                self._progress.advance(task)
        finally:
            if self._progress is not None:
                self._progress.remove_task(task)


def progress_enabled(quiet: bool, stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stderr
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


# ---------------------------------------------------------------------------- pass summary
def summarize_records(records: list) -> list[dict]:
    """One row per pass name (in first-run order), summed over the fixed-point rounds.

    ``nodes_delta`` is the change in node count caused by this pass itself (the
    sum over its runs), not the difference between two points of the pipeline.
    """
    rows: dict[str, dict] = {}
    for r in records:
        row = rows.setdefault(r.name, {"name": r.name, "runs": 0, "rounds": 0, "seconds": 0.0, "changed": False,
                                       "nodes_delta": 0, "counters": {}, "notes": 0, "verify": None})
        row["runs"] += 1
        row["rounds"] = max(row["rounds"], r.round)
        row["seconds"] += r.seconds
        row["changed"] |= r.changed
        row["nodes_delta"] += r.nodes_after - r.nodes_before
        for k, v in r.counters.items():
            row["counters"][k] = row["counters"].get(k, 0) + v
        row["notes"] += len(r.notes)
        if r.verify:
            row["verify"] = r.verify
    return list(rows.values())


def _counters_text(counters: dict) -> str:
    shown = [(k, v) for k, v in counters.items() if v]
    return ", ".join(f"{k}={fmt_number(v)}" for k, v in shown) or "-"


def pass_table(records: list, *, title: str = "Passes") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("pass")
    table.add_column("rounds", justify="right")
    table.add_column("time", justify="right")
    table.add_column("nodes ±", justify="right")
    table.add_column("counters", overflow="fold")
    for row in summarize_records(records):
        delta = row["nodes_delta"]
        _row(table, row["name"], str(row["rounds"]), fmt_seconds(row["seconds"]),
                      f"{delta:+d}" if delta else "0", _counters_text(row["counters"]))
    if not records:
        _row(table, "(no passes ran)", "", "", "", "")
    return table


def totals_table(before: dict, after: dict | None, seconds: float) -> Table:
    """``before``/``after``: {"nodes", "params", "param_bytes", "size", "macs"} (missing keys shown as '-')."""
    after = after or {}
    table = Table(title="Model", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")

    def row(label, key, fmt):
        b, a = before.get(key), after.get(key)
        change = "-"
        if isinstance(b, (int, float)) and isinstance(a, (int, float)) and b:
            change = f"{100.0 * (a - b) / b:+.1f}%"
        _row(table, label, fmt(b), fmt(a), change)

    row("nodes", "nodes", fmt_number)
    row("parameters", "params", human_count)
    row("parameter bytes", "param_bytes", human_bytes)
    row("MACs", "macs", human_count)
    row("file size", "size", human_bytes)
    _row(table, "total time", "", fmt_seconds(seconds), "")
    return table


# ---------------------------------------------------------------------------- validation
def _get(obj: Any, key: str, default=None):
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def validation_tables(report: Any) -> list[Table]:
    """Accuracy per provider and output, latency per provider, and the overall verdict."""
    metrics = ("max_abs", "mean_abs", "rel_l2", "cosine", "top1")
    acc = Table(title="Validation: accuracy (candidate vs reference)", title_justify="left")
    acc.add_column("provider")
    acc.add_column("output", overflow="fold")
    for m in metrics:
        acc.add_column(m, justify="right")
    speed = Table(title="Validation: latency (median)", title_justify="left")
    for col, just in (("provider", "left"), ("status", "left"), ("reference", "right"), ("candidate", "right"),
                      ("speedup", "right"), ("reason", "left")):
        speed.add_column(col, justify=just, overflow="fold")

    for pr in _get(report, "providers", []) or []:
        provider = _get(pr, "provider")
        status = _get(pr, "status")
        outputs = _get(pr, "outputs") or {}
        for out_name, values in outputs.items():
            _row(acc, provider, out_name, *(fmt_metric(m, (values or {}).get(m)) for m in metrics))
        ref_ms, cand_ms = _get(pr, "latency_ms_reference"), _get(pr, "latency_ms_candidate")
        speedup = _get(pr, "speedup")
        _row(speed, provider, status,
                      f"{ref_ms:.3f} ms" if isinstance(ref_ms, (int, float)) else "-",
                      f"{cand_ms:.3f} ms" if isinstance(cand_ms, (int, float)) else "-",
                      f"{speedup:.2f}x" if isinstance(speedup, (int, float)) else "-",
                      _get(pr, "reason") or "")

    summary = Table(title="Validation: summary", title_justify="left", show_header=False)
    summary.add_column("")
    summary.add_column("", overflow="fold")
    _row(summary, "model size", fmt_change(_get(report, "reference_size"), _get(report, "candidate_size"), human_bytes))
    _row(summary, "MACs", fmt_change(_get(report, "reference_macs"), _get(report, "candidate_macs"), human_count))
    _row(summary, "data", str(_get(report, "data_source") or "-"))
    tol = _get(report, "tolerance") or {}
    _row(summary, "tolerance", ", ".join(f"{k}={v:g}" for k, v in tol.items()) or "none")
    failures = _get(report, "failures") or []
    verdict = "PASS" if _get(report, "passed", True) else "FAIL"
    _row(summary, "result", verdict + (": " + "; ".join(failures) if failures else ""))
    for note in _get(report, "notes") or []:
        _row(summary, "note", str(note))
    return [acc, speed, summary]


# ---------------------------------------------------------------------------- inspect
def stats_tables(stats: dict, *, top: int = 10) -> list[Table]:
    """Tables for ``onnxopt.stats.model_stats``: overview, inputs/outputs, op histogram, top layers by MACs.

    Keys used: opsets, ir_version, producer, nodes, subgraphs, parameters, parameter_bytes, macs,
    file_size, macs_notes, inputs/outputs ({name, dtype, shape}), ops, macs_per_layer ({node, op, macs}).
    """
    tables = []
    overview = Table(title="Model", title_justify="left", show_header=False)
    overview.add_column("")
    overview.add_column("", overflow="fold")
    opsets = stats.get("opsets") or {}
    _row(overview, "opsets", ", ".join(f"{d}:{v}" for d, v in opsets.items()) or "-")
    for key, label, fmt in (("ir_version", "IR version", fmt_number), ("producer", "producer", str),
                            ("nodes", "nodes", fmt_number), ("subgraphs", "subgraphs", fmt_number),
                            ("parameters", "parameters", human_count), ("parameter_bytes", "parameter bytes", human_bytes),
                            ("macs", "MACs", human_count), ("file_size", "file size", human_bytes)):
        if stats.get(key) not in (None, ""):
            _row(overview, label, fmt(stats[key]))
    for note in stats.get("macs_notes") or []:
        _row(overview, "note", str(note))
    tables.append(overview)

    io_table = Table(title="Inputs and outputs", title_justify="left")
    for col in ("kind", "name", "dtype", "shape"):
        io_table.add_column(col, overflow="fold")
    for kind in ("inputs", "outputs"):
        for t in stats.get(kind) or []:
            shape = t.get("shape")
            shape_text = "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
            _row(io_table, kind[:-1], str(t.get("name")), str(t.get("dtype")), shape_text)
    tables.append(io_table)

    hist = stats.get("ops") or {}
    if hist:
        ops = Table(title="Operators", title_justify="left")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        for op, n in sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])):
            _row(ops, op, str(n))
        tables.append(ops)

    layers = [layer for layer in stats.get("macs_per_layer") or [] if layer.get("macs")]
    if layers:
        total = stats.get("macs") or sum(layer["macs"] for layer in layers)
        t = Table(title=f"Top {min(top, len(layers))} layers by MACs (of {len(layers)})", title_justify="left")
        t.add_column("node", overflow="fold")
        t.add_column("op")
        t.add_column("MACs", justify="right")
        t.add_column("share", justify="right")
        for layer in sorted(layers, key=lambda la: -la["macs"])[:top]:
            share = f"{100.0 * layer['macs'] / total:.1f}%" if total else "-"
            approx = " (approx.)" if layer.get("approximate") else ""
            _row(t, str(layer.get("node")), str(layer.get("op")), human_count(layer["macs"]) + approx, share)
        tables.append(t)
    return tables


# ---------------------------------------------------------------------------- passes listing
def passes_tables(passes: list[dict], presets: dict[str, dict], target: str) -> list[Table]:
    t = Table(title="Passes", title_justify="left")
    t.add_column("name")
    t.add_column("kind")
    t.add_column("targets")
    t.add_column("summary", overflow="fold")
    t.add_column("options", overflow="fold")
    for p in passes:
        opts = ", ".join(f"{o['name']}: {o['type']} = {o['default']!r}" if o["default"] is not None
                         else f"{o['name']}: {o['type']} = None" for o in p["options"]) or "-"
        _row(t, p["name"], "lossless" if p["lossless"] else "lossy", ",".join(p["targets"]), p["summary"], opts)
    if not passes:
        _row(t, "(no passes registered)", "", "", "", "")
    pt = Table(title=f"Presets (target {target})", title_justify="left")
    pt.add_column("preset")
    pt.add_column("passes, in order", overflow="fold")
    pt.add_column("left out", overflow="fold")
    for name, info in presets.items():
        _row(pt, name, " → ".join(info["passes"]) or "-",
                   ", ".join(f"{n} ({why})" for n, why in info["left_out"].items()) or "-")
    return [t, pt]


def print_tables(console: Console, tables: list[Table]) -> None:
    for table in tables:
        console.print(table)


def print_line(console: Console, text: str, style: str | None = None) -> None:
    """One line of plain text (never parsed as markup)."""
    console.print(Text(text, style=style or ""))
