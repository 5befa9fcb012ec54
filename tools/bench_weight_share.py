"""Benchmark onnxopt's k-means weight sharing (``weight-share``): file size against fidelity.

The models are VGG-16 and ResNet-50 from models/zoo.py (random weights, fed scene photos) and
every image model of tools/realmodels.py, fed its own kind of real photos; calibration and
evaluation use different photos (tools/bench_qdq.py's cases, worker processes and fidelity
checks). Every variant runs, in a fresh process, ``onnxopt.optimize`` with the lossless passes
first (tools/bench_lowrank.lossless_first: BatchNorm folded into the weights that get shared),
then the variant's ``weight-share`` spec. The rows of each model:

* ``float``: the original model, the reference for size, load time, speed and fidelity;
* ``lossless``: the lossless passes alone;
* ``layer@8``: one codebook per layer, 8 bits, data-free: MEASUREMENTS.md's baseline
  (cosine 0.97–0.99, agreement 96–100 %);
* ``channel@B``: one codebook per output channel, B bits everywhere, data-free;
* ``c6g4``: the issue's goal setting, 6-bit Conv / 4-bit Gemm and MatMul, codebooks per channel
  where they cost little beside the indices (``granularity=auto``), else one codebook × per-channel scales;
* ``+data``: the same with data-aware centroids (each weight's error weighted by its input
  channel's activation energy on the calibration photos);
* ``search@cos0.999``: bits searched per layer within the tolerance cosine=0.999;
* ``dequantize@8``: the linear int8 grid stored with DequantizeLinear (``storage=dequantize``).

The columns:

* ``MB`` / ``×``: the saved file, and its ratio to float's file;
* ``load``: time to open an onnxruntime session (ALL optimizations; the codebook expansion is
  folded back to float weights there) over float's, median of 3;
* ``speed``: float time / variant time, rounds alternating the two (≈ 1.0 expected for the
  codebook storage: inference runs on float weights);
* ``cosine``: the lowest over evaluation feeds and outputs; ``top-1``; ``app``: the
  application's own answer unchanged (bench_qdq's Fidelity);
* ``share s`` / ``peak MB``: the onnxopt call.

The closing summary checks the goal per model: at ``c6g4`` (the better of data-free and
data-aware), file ≤ 0.2× float with top-1 (app agreement) ≥ 99 %; and whether data-aware
centroids beat data-free ones at equal bits.

    python -m tools.bench_weight_share [--models a,b|images] [--variants v1,v2|quick|all]
                                       [--spec "weight-share:opts"] [--tolerance cosine=0.999]
                                       [--runs N] [--quick] [--json FILE] [--timeout S]
"""

from __future__ import annotations

import pickle
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/bench_weight_share.py` as well as `-m tools.bench_weight_share`
    sys.path.insert(0, str(REPO))

from tools.bench_lossless import _fmt, _interleaved_latencies, _outputs, _session, paired_ratio  # noqa: E402
from tools.bench_lowrank import lossless_first, parse_variant_args, run_variant, run_variant_bench  # noqa: E402
from tools.bench_qdq import (  # noqa: E402
    IMAGE_MODELS, Case, _model_error, _pct, format_rows, score_fidelity)

DEFAULT_MODELS = ("vgg16", "resnet50") + IMAGE_MODELS
GOAL_SIZE = 0.2  # "at 4-bit Gemm / 6-bit Conv, file <= 0.2x with top-1 agreement >= 99 %"
GOAL_AGREEMENT = 0.99
GOAL_VARIANTS = ("c6g4", "c6g4+data")
FIXED = "accuracy=none,min_size=4096"  # no search: the given bits for every weight


@dataclass(frozen=True)
class Variant:
    key: str
    spec: str | None  # the weight-share spec; None: the lossless passes alone
    tolerance: tuple[tuple[str, float], ...] = ()
    data_free: str | None = None  # the key of the same variant without data-aware centroids

    @property
    def description(self) -> str:
        text = self.spec or "the lossless passes only"
        if self.tolerance:
            text += " with tolerance " + ",".join(f"{m}={x:g}" for m, x in self.tolerance)
        return text


def _catalogue() -> dict[str, Variant]:
    out: dict[str, Variant] = {}

    def add(key: str, options: str, data_aware: bool | None = False, tolerance=()) -> None:
        spec = f"weight-share:{options}" + ("" if data_aware is None else f",data_aware={str(data_aware).lower()}")
        twin = key[: -len("+data")] if data_aware and key.endswith("+data") else None
        out[key] = Variant(key, spec, tuple(tolerance), twin)

    add("layer@8", f"bits=8,granularity=layer,{FIXED}")
    for bits in (8, 6, 5, 4):
        add(f"channel@{bits}", f"bits={bits},granularity=channel,{FIXED}")
        add(f"channel@{bits}+data", f"bits={bits},granularity=channel,{FIXED}", True)
    # granularity auto (the default): per channel unless its codebooks outweigh the indices, else scaled
    add("c6g4", f"conv_bits=6,matrix_bits=4,{FIXED}")
    add("c6g4+data", f"conv_bits=6,matrix_bits=4,{FIXED}", True)
    add("search@cos0.999", "min_size=4096", True, (("cosine", 0.999),))
    add("dequantize@8", f"bits=8,storage=dequantize,granularity=channel,{FIXED}", None)
    return out


VARIANTS = _catalogue()
LOSSLESS = Variant("lossless", None)
QUICK_VARIANTS = ("layer@8", "channel@6", "channel@6+data", "c6g4", "c6g4+data", "search@cos0.999")
VARIANT_ALIASES = {"all": tuple(VARIANTS), "quick": QUICK_VARIANTS}


def custom_variants(specs: list[str], tolerance: dict[str, float]) -> list[Variant]:
    return [Variant(" ".join(s.split()), " ".join(s.split()), tuple(sorted(tolerance.items()))) for s in specs]


def job_for(variant: Variant, src: Path, dst: Path, calibration: Path) -> dict:
    """bench_qdq's worker job; ValueError when weight-share is not registered."""
    from onnxopt.registry import all_passes

    if variant.spec is not None and "weight-share" not in all_passes():
        raise ValueError("weight-share not registered")
    return {"src": str(src), "dst": str(dst), "calibration": str(calibration), "tool": "onnxopt",
            "specs": lossless_first() + ([variant.spec] if variant.spec else []), "tolerance": dict(variant.tolerance)}


# ============================================================ measuring
@dataclass
class Row:
    model: str
    variant: str
    mb: float | None = None
    size_ratio: float | None = None
    load_ratio: float | None = None
    load_ms: float | None = None
    speed: float | None = None
    ms: float | None = None
    cosine: float | None = None
    top1: float | None = None
    app: float | None = None
    app_text: str = ""
    seconds: float | None = None
    peak_mb: float | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


def load_ms(path: Path, repeats: int = 3) -> float:
    """Median time to open an onnxruntime session on ``path`` (ALL optimizations), in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session = _session(path, "all")
        times.append(time.perf_counter() - start)
        del session
    return statistics.median(times) * 1e3


def bench_case(case: Case, variants: list[Variant], runs: int, folder: Path, timeout: float, log) -> list[Row]:
    calibration = folder / f"{case.name}.calibration.pkl"
    with open(calibration, "wb") as f:
        pickle.dump(case.calibration, f)
    ref = Row(case.name, "float", mb=case.path.stat().st_size / 1e6, size_ratio=1.0, load_ratio=1.0)
    ref.load_ms = load_ms(case.path)
    log(f"  {case.name}: float outputs on {len(case.evaluation)} evaluation feeds ...")
    float_session = _session(case.path, "all")
    reference = _outputs(float_session, case.evaluation)
    score_fidelity(ref, case, reference, reference)
    float_times: list[float] = []
    rows = [ref]
    for variant in [LOSSLESS, *variants]:
        row = Row(case.name, variant.key)
        rows.append(row)
        dst = run_variant(case, variant, row, job_for, folder, calibration, timeout, log)
        if dst is None:
            continue
        row.mb = dst.stat().st_size / 1e6
        row.size_ratio = row.mb / ref.mb
        try:
            row.load_ms = load_ms(dst)
            session = _session(dst, "all")
            outputs = _outputs(session, case.evaluation)
        except Exception as exc:
            row.error = _model_error(exc, folder)
            continue
        row.load_ratio = row.load_ms / ref.load_ms
        score_fidelity(row, case, reference, outputs)
        times = _interleaved_latencies({"float": float_session, variant.key: session}, case.evaluation[0], runs)
        row.speed = paired_ratio(times["float"], times[variant.key])
        row.ms = statistics.median(times[variant.key]) * 1e3
        float_times += times["float"]
        del session
        dst.unlink(missing_ok=True)
    if not float_times:
        float_times = _interleaved_latencies({"float": float_session}, case.evaluation[0], runs)["float"]
    ref.speed, ref.ms = 1.0, statistics.median(float_times) * 1e3
    return rows


# ============================================================ reporting
def format_table(rows: list[Row]) -> str:
    head = (f"{'MB':>8s} {'×':>6s} {'load':>5s} {'speed':>6s} {'ms':>8s} {'cosine':>7s} {'top-1':>6s}  "
            f"{'app':30s} {'share s':>7s} {'peak MB':>8s}")
    return format_rows(rows, max([18] + [len(r.variant) for r in rows]), head, lambda r: (
        f"{_fmt(r.mb, '8.2f')} {_fmt(r.size_ratio, '6.3f')} {_fmt(r.load_ratio, '5.2f')} {_fmt(r.speed, '6.2f')} "
        f"{_fmt(r.ms, '8.2f')} {_fmt(r.cosine, '7.4f')} {_pct(r.top1):>6s}  {(r.app_text or '-')[:30]:30s} "
        f"{_fmt(r.seconds, '7.1f')} {_fmt(r.peak_mb, '8.0f')}"))


def goal_verdict(rows: list[Row]) -> str:
    """The goal row (the better of c6g4 / c6g4+data by agreement, then size) against the goal."""
    by = {r.variant: r for r in rows}
    runs = [by[k] for k in GOAL_VARIANTS if k in by and by[k].size_ratio is not None and by[k].app is not None]
    if not runs:
        return "goal: c6g4 not run"
    best = max(runs, key=lambda r: (r.app, -r.size_ratio))
    met = best.size_ratio <= GOAL_SIZE and best.app >= GOAL_AGREEMENT
    return (f"goal {'met' if met else 'NOT met'} by {best.variant}: file {best.size_ratio:.3f}x "
            f"(goal <= {GOAL_SIZE}), agreement {_pct(best.app)} (goal >= {100 * GOAL_AGREEMENT:.0f}%), "
            f"cosine {best.cosine:.4f}")


def data_aware_verdict(rows: list[Row], variants: dict[str, Variant]) -> str:
    by = {r.variant: r for r in rows}
    pairs = [(by[v.data_free], r) for r in rows if (v := variants.get(r.variant)) is not None and v.data_free
             and v.data_free in by and r.cosine is not None and by[v.data_free].cosine is not None]
    if not pairs:
        return "data-aware: no pair of data-free and data-aware rows"
    wins = sum(r.cosine > p.cosine for p, r in pairs)
    return (f"data-aware centroids raised cosine in {wins} of {len(pairs)}: "
            + ", ".join(f"{p.variant} {p.cosine:.4f}→{r.cosine:.4f} ({_pct(p.app)}→{_pct(r.app)})" for p, r in pairs))


def format_summary(rows: list[Row], variants: dict[str, Variant]) -> str:
    lines = ["Per model: the goal (6-bit Conv / 4-bit Gemm: file <= 0.2x, agreement >= 99%) and "
             "data-aware against data-free centroids:"]
    for model in dict.fromkeys(r.model for r in rows):
        model_rows = [r for r in rows if r.model == model]
        lines.append(f"  {model}: {goal_verdict(model_rows)}")
        lines.append(f"    {data_aware_verdict(model_rows, variants)}")
    return "\n".join(lines)


# ============================================================ command line
def main(argv: list[str] | None = None) -> int:
    parsed = parse_variant_args(argv, "python -m tools.bench_weight_share", __doc__.splitlines()[0], DEFAULT_MODELS,
                                VARIANTS, QUICK_VARIANTS, VARIANT_ALIASES,
                                "a custom row running this weight-share spec (repeatable)", custom_variants)
    if isinstance(parsed, int):
        return parsed
    import onnxruntime as ort

    return run_variant_bench(
        parsed, "bench_weight_share_", bench_case, Row,
        f"weight sharing: onnxopt weight-share after the lossless passes; onnxruntime {ort.__version__} CPU, ALL "
        "optimizations", "data-aware centroids, the search",
        "MB / ×: file size and its ratio to float's; load: session-open time / float's; speed: float time / "
        "variant time (>1 faster); cosine: lowest over eval feeds and outputs; top-1: argmax agreement; app: the "
        "application's answer unchanged (tools/bench_qdq.py); share s / peak MB: the onnxopt call.",
        format_table, format_summary)


if __name__ == "__main__":
    raise SystemExit(main())
