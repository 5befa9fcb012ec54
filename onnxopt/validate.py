"""Validate a candidate model against its reference on onnxruntime execution providers.

For every requested provider (cpu, cuda, tensorrt) both models run on every
calibration feed; per output the report holds max/mean absolute error, relative
L2, the worst per-sample cosine similarity and, for class-score outputs, top-1
agreement (see :class:`onnxopt.metrics.OutputAccumulator`). Latency is the median
of ``runs`` timed runs after ``warmup``, reference and candidate interleaved in
one loop, with onnxruntime's default (all) graph optimizations. A provider that
cannot run here is reported as skipped with the reason, unless the caller requires
it. Sizes and MACs of both models complete the report.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from .calibration import CalibrationData
from .errors import UserInputError
from .metrics import HIGHER_IS_BETTER, METRICS, OutputAccumulator, within
from .runtime import PROVIDER_NAMES, make_session, measure_latency, parse_providers, provider_status, run_session
from .io import tensor_payload_bytes
from .stats import count_macs

ModelLike = onnx.ModelProto | str | os.PathLike


@dataclass
class ProviderResult:
    provider: str  # short name: cpu, cuda, tensorrt
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    # output name → {max_abs, mean_abs, rel_l2, cosine[, top1]}
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_ms_reference: float | None = None
    latency_ms_candidate: float | None = None
    speedup: float | None = None  # reference latency / candidate latency
    feeds: int = 0  # feeds compared

    def as_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class ValidationReport:
    providers: list[ProviderResult]
    reference_size: int
    candidate_size: int
    reference_macs: int
    candidate_macs: int
    data_source: str
    tolerance: dict
    passed: bool
    failures: list[str]
    notes: list[str] = field(default_factory=list)

    def provider(self, short: str) -> ProviderResult | None:
        return next((p for p in self.providers if p.provider == short), None)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("reference_size", "candidate_size", "reference_macs", "candidate_macs",
                                              "data_source", "tolerance", "passed", "failures", "notes")}
        out["providers"] = [p.as_dict() for p in self.providers]
        return _jsonable(out)


def _jsonable(value):
    """Plain JSON types; non-finite floats become the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --------------------------------------------------------------------------- tolerance
_TOLERANCE_FIX = "write METRIC=VALUE with METRIC one of " + ", ".join(METRICS) + ", e.g. cosine=0.999 or rel_l2=1e-3."


def parse_tolerance(specs: list[str] | None) -> dict[str, float]:
    """``["cosine=0.999", "rel_l2=1e-3"]`` (or ``"cosine=0.999,top1=0.99"`` in one item) → dict."""
    bounds: dict[str, float] = {}
    for spec in specs or []:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            metric, sep, value = item.partition("=")
            metric = metric.strip().lower()
            if not sep or metric not in METRICS:
                raise UserInputError(f"tolerance '{item}' is not METRIC=VALUE with a known metric.", _TOLERANCE_FIX)
            try:
                bound = float(value)
            except ValueError:
                raise UserInputError(f"tolerance '{item}' has a value that is not a number.", _TOLERANCE_FIX) from None
            bounds[metric] = bound
    return check_tolerance(bounds)


def check_tolerance(bounds: dict[str, float] | None) -> dict[str, float]:
    """Validate metric names and ranges: cosine in [-1, 1], top1 in [0, 1], errors ≥ 0."""
    bounds = dict(bounds or {})
    for metric, bound in bounds.items():
        if metric not in METRICS:
            raise UserInputError(f"unknown tolerance metric '{metric}'.", _TOLERANCE_FIX)
        if not isinstance(bound, (int, float)) or math.isnan(bound):
            raise UserInputError(f"tolerance {metric}={bound} is not a number.", _TOLERANCE_FIX)
        low, high = {"cosine": (-1.0, 1.0), "top1": (0.0, 1.0)}.get(metric, (0.0, math.inf))
        if not low <= bound <= high:
            raise UserInputError(f"tolerance {metric}={bound:g} is outside [{low:g}, {high:g}].",
                                 "cosine is a similarity up to 1, top1 a fraction up to 1, errors are ≥ 0.")
    return bounds


# --------------------------------------------------------------------------- models
def _structure(model: ModelLike, what: str) -> onnx.ModelProto:
    """The model's graph for names, shapes and MACs; weights on disk stay there."""
    if isinstance(model, onnx.ModelProto):
        return model
    from .io import load_model

    path = Path(model)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:
        return load_model(path, check=False, what=what)  # raises the clear UserInputError


def _size(model: ModelLike) -> int:
    if isinstance(model, onnx.ModelProto):
        from .io import PROTOBUF_LIMIT

        tensors = tensor_payload_bytes(model)
        # ByteSize serializes the model: slow for big ones and impossible over the protobuf limit.
        return tensors if tensors > PROTOBUF_LIMIT else model.ByteSize()
    from .io import file_size

    return file_size(model)


def _declared_shape(vi: onnx.ValueInfoProto) -> tuple | None:
    tt = vi.type.tensor_type
    if vi.type.WhichOneof("value") != "tensor_type" or not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def _output_check(ref: onnx.ModelProto, cand: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Output names the two models share, and failure lines for those they do not."""
    ref_out = {o.name: o for o in ref.graph.output}
    cand_out = {o.name: o for o in cand.graph.output}
    failures = []
    missing = [n for n in ref_out if n not in cand_out]
    extra = [n for n in cand_out if n not in ref_out]
    if missing or extra:
        failures.append("the candidate's outputs differ from the reference's: "
                        + "; ".join(p for p in (f"missing {', '.join(missing)}" if missing else "",
                                                f"extra {', '.join(extra)}" if extra else "") if p))
    common = [n for n in ref_out if n in cand_out]
    for name in common:
        a, b = _declared_shape(ref_out[name]), _declared_shape(cand_out[name])
        if a is not None and b is not None and (len(a) != len(b) or any(x and y and x != y for x, y in zip(a, b))):
            shown = lambda s: "x".join("?" if d is None else str(d) for d in s) or "scalar"  # noqa: E731
            failures.append(f"output '{name}' is declared {shown(b)} in the candidate but {shown(a)} in the reference")
    return common, failures


def _feed_batch(feed: dict[str, np.ndarray]) -> int:
    for value in feed.values():
        if np.ndim(value) >= 1:
            return int(np.shape(value)[0])
    return 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# --------------------------------------------------------------------------- validate
def validate(reference: ModelLike, candidate: ModelLike, data: CalibrationData, *,
             providers: list[str] | str = ("cpu",), tolerance: dict[str, float] | None = None,
             require_providers: bool = False, latency: bool = True, warmup: int = 3, runs: int = 20,
             threads: int | None = 1, progress: Callable[[Iterable, str, int], Iterable] | None = None) -> ValidationReport:
    """Compare ``candidate`` with ``reference`` on every feed of ``data`` and every provider.

    With ``tolerance``, every output on every provider that ran must satisfy every
    bound (cosine/top1 ≥ bound, errors ≤ bound). ``progress`` is a callable
    ``(iterable, description, total) -> iterable`` wrapped around the feed loop.
    """
    shorts = parse_providers(list(providers) if not isinstance(providers, str) else providers)
    tolerance = check_tolerance(tolerance)
    if runs < 1 or warmup < 0:
        raise UserInputError(f"latency runs={runs}, warmup={warmup} are out of range.", "use runs ≥ 1 and warmup ≥ 0.")
    if len(data) == 0:
        raise UserInputError(f"the validation data ({data.source}) holds no feeds.", "give more samples or a higher limit.")

    statuses = [provider_status(s) for s in shorts]
    if require_providers:
        for st in statuses:
            if not st.available:
                raise UserInputError(
                    f"execution provider '{st.short}' is required but cannot run here: {st.reason}.",
                    "install onnxruntime-gpu (pip install onnxruntime-gpu, plus the TensorRT libraries for tensorrt) "
                    "on a machine with an NVIDIA GPU and driver, or drop it from --providers.")

    ref_model = _structure(reference, "reference model")
    cand_model = _structure(candidate, "candidate model")
    common, failures = _output_check(ref_model, cand_model)
    notes: list[str] = []
    results: list[ProviderResult] = []

    for st in statuses:
        if not st.available:
            results.append(ProviderResult(st.short, "skipped", st.reason))
            continue
        result, problems = _run_provider(st.short, reference, candidate, data, common, latency=latency, warmup=warmup,
                                         runs=runs, threads=threads, progress=progress)
        results.append(result)
        if result.status == "failed":
            failures.append(f"{st.short}: {result.reason}")
        failures.extend(f"{st.short}: {p}" for p in problems)

    ran = [r for r in results if r.status == "ok"]
    if not ran and not any(r.status == "failed" for r in results):
        failures.append("no requested execution provider could run here ("
                        + "; ".join(f"{r.provider}: {r.reason}" for r in results) + ")")
    for r in ran:
        for metric, bound in tolerance.items():
            checked = 0
            for output, metrics in r.outputs.items():
                if metric not in metrics:
                    continue
                checked += 1
                value = metrics[metric]
                if not within(metric, value, bound):
                    sign = "<" if metric in HIGHER_IS_BETTER else ">"
                    failures.append(f"{r.provider}: output '{output}': {metric} {value:.6g} {sign} {bound:g}")
            if metric == "top1" and not checked:
                notes.append(f"{r.provider}: no output looks like class scores, so the top1 tolerance was not checked")

    # MACs at the shapes of the data (exact even for models with dynamic inputs).
    first = next(iter(data.feeds(limit=1)), {})
    shapes = {name: tuple(np.shape(value)) for name, value in first.items()}
    ref_macs, _ = count_macs(ref_model, shapes)
    cand_macs, _ = count_macs(cand_model, shapes)
    return ValidationReport(
        providers=results, reference_size=_size(reference), candidate_size=_size(candidate),
        reference_macs=int(ref_macs), candidate_macs=int(cand_macs), data_source=data.source,
        tolerance=dict(tolerance), passed=not failures, failures=failures, notes=notes)


def _run_provider(short: str, reference: ModelLike, candidate: ModelLike, data: CalibrationData, outputs: list[str], *,
                  latency: bool, warmup: int, runs: int, threads: int | None, progress) -> tuple[ProviderResult, list[str]]:
    """Run both models on every feed; the result and failure lines (outputs whose shapes or inf/nan differ)."""
    sessions = []
    for what, model in (("reference", reference), ("candidate", candidate)):
        try:
            sessions.append(make_session(model, short, optimization="all", threads=threads))
        except Exception as exc:
            return ProviderResult(short, "failed", f"onnxruntime cannot load the {what} model on {PROVIDER_NAMES[short]}: {_first_line(exc)}"), []
    ref_sess, cand_sess = sessions
    accumulators = {name: OutputAccumulator(name) for name in outputs}
    feeds: Iterable = data.feeds()
    if progress is not None:
        feeds = progress(feeds, f"validating on {short}", len(data))
    first_feed = None
    count = 0
    for feed in feeds:
        if first_feed is None:
            first_feed = feed
        outs = []
        for what, sess in (("reference", ref_sess), ("candidate", cand_sess)):
            try:
                outs.append(run_session(sess, feed))
            except Exception as exc:
                return ProviderResult(short, "failed", f"the {what} model failed to run on feed {count}: {_first_line(exc)}", feeds=count), []
        ref_out, cand_out = outs
        batch = _feed_batch(feed)
        for name, acc in accumulators.items():
            acc.add(ref_out[name], cand_out[name], batch=batch)
        count += 1
    result = ProviderResult(short, "ok", feeds=count)
    problems = []
    for name, acc in accumulators.items():
        result.outputs[name] = acc.result()
        if acc.broken:
            problems.append(f"output '{name}': {acc.broken}")
    if latency and first_feed is not None:
        ref_ms, cand_ms = measure_latency([ref_sess, cand_sess], first_feed, warmup=warmup, runs=runs)
        result.latency_ms_reference = ref_ms
        result.latency_ms_candidate = cand_ms
        result.speedup = ref_ms / cand_ms if cand_ms > 0 else None
    return result, problems
