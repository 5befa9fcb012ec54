"""Benchmark onnxopt's lossless preset against its peers, all in one run.

For every model (ResNet-50, MobileNetV2 and the inception net from models/zoo.py, and
every real pretrained model of tools/realmodels.py) and every tool (onnxopt
``preset="lossless"``, onnxsim.simplify, onnxslim.slim, onnxoptimizer.optimize, each
with its default settings) it reports:

* ``nodes``: nodes after, subgraphs included, Constant nodes left out (a constant kept
  as a node or as an initializer is the same model);
* ``opt s``: wall time of the optimising call alone;
* ``peak MB``: peak resident memory *increase* during that call. Each tool runs in a
  fresh subprocess that first imports the tool and loads the model, then resets the
  kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs, Linux ≥ 4.0) and reads
  VmHWM afterwards. Unlike tracemalloc this sees C++ allocations (onnxsim, onnxoptimizer,
  protobuf) as well as Python's, so it is fair between tools written in either;
* ``rel L2``: worst relative L2 error of any output vs the original model on real photos
  (tools/photos.py; synthetic speech for Silero VAD), onnxruntime optimisations off;
* ``lat all`` / ``lat off``: latency of the optimised model relative to the original's
  under onnxruntime with ALL graph optimisations and with them DISABLED, 1 intra-op
  thread. N rounds run every variant of a model once, round-robin (order rotated each
  round), so drifts in machine speed hit every variant alike; the ratio is the median over
  rounds of (variant time / original time in the same round).
  As a reference for the ``off`` setting the table also has ``ort-basic``: the model that
  onnxruntime itself writes at ORT_ENABLE_BASIC (SessionOptions.optimized_model_filepath).

Then, per model, the ratio of onnxopt to the best peer on each metric
("nodes onnxopt/onnxsim = 0.98"), and their geometric means over all models.

    python -m tools.bench_lossless [--models a,b,c] [--runs N] [--quick] [--json FILE]

A peer that is not installed, crashes, or whose result does not run is reported in its
cell with the reason; the benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/bench_lossless.py` as well as `-m tools.bench_lossless`
    sys.path.insert(0, str(REPO))

from tools.realmodels import (  # noqa: E402
    REAL_MODELS, RealModelUnavailable, count_nodes, real_model_path, unknown_models_error)

BUILDER_MODELS = ("resnet50", "mobilenetv2", "inception")
TOOLS = ("onnxopt", "onnxsim", "onnxslim", "onnxoptimizer")
PEERS = TOOLS[1:]
ORT_BASIC = "ort-basic"


# ---------------------------------------------------------------- the tools
def _import_tool(tool: str):
    """Import a tool; returns the function ModelProto → ModelProto (imports are not timed)."""
    if tool == "onnxopt":
        import onnxopt
        import onnxopt.passes  # noqa: F401  (registers the pass library)

        # --target tensorrt benchmarks the trt preset (standard ops only, opset >= 13)
        target = os.environ.get("ONNXOPT_BENCH_TARGET", "cpu")
        preset = "trt" if target == "tensorrt" else "lossless"
        return lambda m: onnxopt.optimize(m, preset=preset, target=target).model
    if tool == "onnxsim":
        import onnxsim

        def simplify(m):
            out, ok = onnxsim.simplify(m)
            if not ok:
                raise RuntimeError("onnxsim.simplify reported that its check failed")
            return out

        return simplify
    if tool == "onnxslim":
        import onnxslim

        return onnxslim.slim
    if tool == "onnxoptimizer":
        import onnxoptimizer

        return onnxoptimizer.optimize
    raise ValueError(f"unknown tool '{tool}'")


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(tool: str, src: str, dst: str) -> dict:
    """Run one tool on one model file in this (fresh) process; returns timing and memory."""
    try:
        optimize = _import_tool(tool)
    except ImportError as exc:
        return {"error": f"not installed ({exc.name or exc})"}
    model = onnx.load(src)
    baseline_kib = _rss_kib("VmRSS")
    exact_peak = _reset_peak_rss()
    if not exact_peak:  # fall back to the lifetime peak (over-estimates nothing, may under-estimate)
        import resource

        baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        out = optimize(model)
    except Exception as exc:  # a peer failing is a result, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"}
    seconds = time.perf_counter() - t0
    peak_kib = _rss_kib("VmHWM")
    from onnxopt.io import save_model

    save_model(out, dst)
    return {"seconds": seconds, "peak_mb": max(0, peak_kib - baseline_kib) / 1024.0,
            "memory_method": "VmHWM after clear_refs" if exact_peak else "ru_maxrss"}


def run_tool(tool: str, src: Path, dst: Path, timeout: float) -> dict:
    """``worker`` in a fresh Python process (so imports, caches and allocator state of one
    tool cannot help or hurt another)."""
    cmd = [sys.executable, "-m", "tools.bench_lossless", "--worker", tool, str(src), str(dst)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"error": f"worker exit {proc.returncode}: {err[-1][:160] if err else 'no output'}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- measuring
@dataclass
class Row:
    model: str
    tool: str
    nodes_before: int
    nodes: int | None = None
    seconds: float | None = None
    peak_mb: float | None = None
    rel_l2: float | None = None
    latency_all: float | None = None  # ratio optimised / original
    latency_off: float | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


def _session(path: Path, level: str, save_to: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _outputs(session, feeds):
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return [dict(zip(names, session.run(names, {k: v for k, v in f.items() if k in wanted}))) for f in feeds]


def _worst_rel_l2(reference, candidate) -> float:
    from onnxopt.metrics import compare

    worst = 0.0
    for ref, cand in zip(reference, candidate):
        for name, r in ref.items():
            if name not in cand:
                return math.inf
            worst = max(worst, compare(r, cand[name])["rel_l2"])
    return worst


def _interleaved_latencies(sessions: dict[str, object], feed: dict, runs: int) -> dict[str, list[float]]:
    """Seconds of each inference of each session, ``runs`` rounds interleaved round-robin."""
    names = list(sessions)
    inputs = {n: {i.name for i in s.get_inputs()} for n, s in sessions.items()}
    feeds = {n: {k: v for k, v in feed.items() if k in inputs[n]} for n in names}
    for n in names:  # warm-up: first runs allocate and page in weights
        for _ in range(2):
            sessions[n].run(None, feeds[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            sessions[n].run(None, feeds[n])
            times[n].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time in the same round: a slow patch of the
    machine slows both runs of a round, so the per-round ratio cancels it."""
    return statistics.median(t / r for t, r in zip(times, reference))


def model_source(name: str, folder: Path) -> tuple[Path, list[dict]]:
    """The model file to benchmark and its feeds (two real-data feeds)."""
    from tools.photos import builder_feeds, real_model_feeds

    if name in REAL_MODELS:
        return real_model_path(name), real_model_feeds(name, 2)
    from models.zoo import build

    model = build(name)
    path = folder / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return path, builder_feeds(model, 2)


def bench_model(name: str, runs: int, folder: Path, timeout: float, log) -> list[Row]:
    src, feeds = model_source(name, folder)
    original = onnx.load(str(src))
    before = count_nodes(original)
    rows: dict[str, Row] = {}
    paths: dict[str, Path] = {"original": src}
    for tool in TOOLS:
        row = rows[tool] = Row(name, tool, before)
        dst = folder / f"{name}.{tool}.onnx"
        log(f"  {name}: {tool} ...")
        result = run_tool(tool, src, dst, timeout)
        if "error" in result:
            row.error = result["error"]
            continue
        row.seconds, row.peak_mb = result["seconds"], result["peak_mb"]
        row.nodes = count_nodes(onnx.load(str(dst), load_external_data=False))
        paths[tool] = dst
    # onnxruntime's own basic-level graph, as a reference for the optimisations-off setting.
    basic = rows[ORT_BASIC] = Row(name, ORT_BASIC, before)
    try:
        t0 = time.perf_counter()
        _session(src, "basic", save_to=folder / f"{name}.ort-basic.onnx")
        basic.seconds = time.perf_counter() - t0  # session creation incl. optimisation
        paths[ORT_BASIC] = folder / f"{name}.ort-basic.onnx"
        basic.nodes = count_nodes(onnx.load(str(paths[ORT_BASIC]), load_external_data=False))
        basic.notes.append("opt s = whole session creation")
    except Exception as exc:
        basic.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    # Outputs and latency: every variant that produced a file.
    sessions: dict[str, dict[str, object]] = {"all": {}, "off": {}}
    reference = _outputs(_session(src, "off"), feeds)
    for variant, path in paths.items():
        row = rows.get(variant)
        try:
            for level in ("all", "off"):
                sessions[level][variant] = _session(path, level)
            if row is not None:
                row.rel_l2 = _worst_rel_l2(reference, _outputs(sessions["off"][variant], feeds))
        except Exception as exc:
            for level in ("all", "off"):
                sessions[level].pop(variant, None)
            if row is not None:
                row.error = f"result does not run: {str(exc).splitlines()[0][:140]}"
    log(f"  {name}: latency, {runs} interleaved runs x {len(sessions['off'])} variants x 2 settings ...")
    for level in ("all", "off"):
        chosen = {v: s for v, s in sessions[level].items() if not (level == "all" and v == ORT_BASIC)}
        times = _interleaved_latencies(chosen, feeds[0], runs)
        for variant, variant_times in times.items():
            if variant in rows:
                ratio = paired_ratio(variant_times, times["original"])
                if level == "all":
                    rows[variant].latency_all = ratio
                else:
                    rows[variant].latency_off = ratio
        rows[TOOLS[0]].notes.append(f"original {statistics.median(times['original']) * 1e3:.2f} ms with ORT {level}")
    return list(rows.values())


# ---------------------------------------------------------------- reporting
METRICS = (  # (attribute, short label, lower is better)
    ("nodes", "nodes"),
    ("seconds", "time"),
    ("peak_mb", "mem"),
    ("latency_all", "lat(all)"),
    ("latency_off", "lat(off)"),
)


def _fmt(value, spec: str) -> str:
    """``format(value, spec)``, with '-' for a missing value padded to the spec's width."""
    width = int(spec.split(".")[0]) if spec[:1].isdigit() else 0
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float) and math.isinf(value):
        return "inf".rjust(width)
    return format(value, spec)


def format_table(rows: list[Row]) -> str:
    head = f"{'model':16s} {'tool':14s} {'nodes':>11s} {'opt s':>7s} {'peak MB':>8s} {'rel L2':>8s} {'lat all':>8s} {'lat off':>8s}"
    lines = [head, "-" * len(head)]
    last_model = None
    for r in rows:
        if last_model is not None and r.model != last_model:
            lines.append("")
        last_model = r.model
        if r.error and r.nodes is None:
            lines.append(f"{r.model:16s} {r.tool:14s} {'':>11s} FAILED: {r.error}")
            continue
        nodes = f"{r.nodes_before}→{_fmt(r.nodes, 'd')}"
        line = (f"{r.model:16s} {r.tool:14s} {nodes:>11s} {_fmt(r.seconds, '7.2f')} {_fmt(r.peak_mb, '8.1f')} "
                f"{_fmt(r.rel_l2, '8.1e')} {_fmt(r.latency_all, '8.3f')} {_fmt(r.latency_off, '8.3f')}")
        if r.error:
            line += f"  ({r.error})"
        lines.append(line)
    return "\n".join(lines)


def best_peer_ratios(rows: list[Row]) -> dict[str, tuple[str, float]]:
    """metric label → (best peer, onnxopt value / best peer value) for one model's rows."""
    by_tool = {r.tool: r for r in rows}
    ours = by_tool.get("onnxopt")
    out: dict[str, tuple[str, float]] = {}
    if ours is None:
        return out
    for attr, label in METRICS:
        mine = getattr(ours, attr)
        peers = [(getattr(by_tool[p], attr), p) for p in PEERS
                 if p in by_tool and getattr(by_tool[p], attr) is not None and not by_tool[p].error]
        if mine is None or not peers:
            continue
        best_value, best_peer = min(peers)
        if best_value > 0:
            out[label] = (best_peer, mine / best_value)
        elif mine == 0:
            out[label] = (best_peer, 1.0)
    return out


def format_ratios(all_rows: list[Row]) -> str:
    models = list(dict.fromkeys(r.model for r in all_rows))
    lines = ["onnxopt vs the best peer on each metric (< 1 is better for onnxopt):"]
    collected: dict[str, list[float]] = {label: [] for _, label in METRICS}
    for m in models:
        ratios = best_peer_ratios([r for r in all_rows if r.model == m])
        parts = []
        for _, label in METRICS:
            if label in ratios:
                peer, value = ratios[label]
                parts.append(f"{label} onnxopt/{peer} = {value:.2f}")
                collected[label].append(value)
        lines.append(f"  {m:16s} " + ", ".join(parts) if parts else f"  {m:16s} (no comparable results)")
    geo = [f"{label} {math.exp(statistics.fmean(math.log(max(v, 1e-12)) for v in vals)):.2f}"
           for label, vals in collected.items() if vals]
    lines.append("  geometric mean: " + ", ".join(geo))
    return "\n".join(lines)


# ---------------------------------------------------------------- command line
def print_results(table: str, summary: str, rows: list, started: float, json_path: str | None) -> None:
    """The end of every bench: the table, its summary, the total time, and the rows as JSON on request."""
    print()
    print(table)
    print()
    print(summary)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if json_path:
        Path(json_path).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=float))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        tool, src, dst = argv[1:4]
        try:
            print(json.dumps(worker(tool, src, dst)))
        except Exception as exc:
            traceback.print_exc()
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:200]}))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tools.bench_lossless", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated; default: {','.join(BUILDER_MODELS)} and every real model "
                                         f"({','.join(REAL_MODELS)})")
    parser.add_argument("--runs", type=int, default=None, help="timed inferences per variant and setting (default 30)")
    parser.add_argument("--quick", action="store_true", help="few runs (10) for a fast, noisier look")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to one tool on one model")
    parser.add_argument("--target", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                        help="onnxopt's target (tensorrt runs the trt preset); latency is still onnxruntime CPU")
    args = parser.parse_args(argv)
    os.environ["ONNXOPT_BENCH_TARGET"] = args.target  # read by the onnxopt worker processes
    runs = args.runs or (10 if args.quick else 30)
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else \
        list(BUILDER_MODELS) + list(REAL_MODELS)
    error = unknown_models_error(names)
    if error:
        print(error, file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    all_rows: list[Row] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_lossless_") as tmp:
        for name in names:
            log(f"{name}:")
            try:
                all_rows += bench_model(name, runs, Path(tmp), args.timeout, log)
            except RealModelUnavailable as exc:
                all_rows.append(Row(name, "(all)", 0, error=f"model unavailable: {exc}"))
            except Exception as exc:
                all_rows.append(Row(name, "(all)", 0, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
            for f in Path(tmp).glob(f"{name}.*"):
                f.unlink()
    preset = "trt preset (target tensorrt)" if args.target == "tensorrt" else f"lossless preset (target {args.target})"
    print(f"onnxopt {preset} vs peers; onnxruntime CPU, 1 thread, median of {runs} interleaved rounds.")
    print("nodes: before→after incl. subgraphs, without Constant nodes; peak MB: peak RSS increase during the "
          "call (fresh process per tool); rel L2: worst output vs original on real photos; lat: latency "
          "optimised/original with ORT optimisations all / off; ort-basic: ORT's own basic-level model.")
    print_results(format_table(all_rows), format_ratios(all_rows), all_rows, t_start, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
