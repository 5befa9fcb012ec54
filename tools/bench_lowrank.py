"""Benchmark onnxopt's low-rank decompositions (svd, spatial-svd, tucker2, cp) with and without refinement.

The models are VGG-16, ResNet-50 and MobileNetV2 from models/zoo.py (random weights, fed scene
photos), and every image model of tools/realmodels.py, fed its own kind of real photos. The
cases (calibration and evaluation photos, and the application-level fidelity check) are the ones
of tools/bench_qdq.py: calibration and evaluation use different photos.

Every variant runs, in a fresh process (bench_qdq's worker), ``onnxopt.optimize`` with the
lossless preset first (minus fuse-conv-activation, whose com.microsoft FusedConv the low-rank
passes do not take; BatchNorm is folded into the weights that get decomposed), then the
variant's low-rank pass specs. Calibration feeds and the tolerance go through a PassContext,
as a user's ``--calib`` and ``--tolerance`` do. The variants (rows) of each model:

* ``float``: the original model, the reference for speed and fidelity;
* ``lossless``: the lossless passes alone, the base of the ``×`` columns (see below);
* ``tucker2@e0.995`` / ``@e0.98`` / ``@e0.95``: data-free Tucker-2 (HOSVD), ranks keeping that
  share of the singular-value energy, no refinement. This is the baseline that MEASUREMENTS.md
  gives for VGG-16. The builders' random weights have flat spectra, so on them these ranks stay
  close to full rank and rarely pay off;
* ``METHOD@rF``, F = 0.5 and 0.25: every layer that the pass takes, at rank F × its full rank,
  plain truncation (``refine=false``);
* ``METHOD@rF+refine``: the same ranks, then the last factor of every decomposed layer refit
  by least squares on calibration activations (Zhang et al. 2015, ``refine=true``);
* ``search@cos0.999`` (``+refine``): ``tucker2`` then ``svd`` with no ranks given and the
  tolerance {"cosine": 0.999}, so per-layer ranks are searched for the largest measured latency
  saving that stays within it;
* ``search@default+refine``: the same search under the passes' default budget
  (cosine=0.99+top1=0.99);
* ``--spec "PASS:opts PASS:opts"``: a custom row (its tolerance from ``--tolerance``).

Every pass keeps its default ``measure=true``. On target cpu a layer's decomposition is applied
only when onnxruntime runs it faster than the layer, so a rank does not always mean every layer.
The ``layers`` column says how many were decomposed.

The columns:

* ``layers``: how many of the model's layers were decomposed;
* ``GMACs`` / ``Mparams`` with ``×``: multiply-accumulates and parameters (onnxopt.stats), and
  their ratio to the ``lossless`` row's. That is the model just before decomposition, with
  BatchNorm folded as onnxruntime folds it in float too. So ``×`` is what the decomposition
  alone removed;
* ``speed``: float time / variant time under onnxruntime (ALL optimizations, 1 intra-op thread).
  Each variant is timed in rounds that alternate it with float, in rotating order. The figure
  is the median over rounds of the per-round ratio. Only two sessions are open at a time,
  because fifteen copies of VGG-16 do not fit in memory. Above 1 means faster than float;
* ``cosine``: the lowest, over evaluation feeds and outputs, of the cosine with float's outputs;
* ``top-1``: argmax agreement with float (classifiers only);
* ``app``: the application's answer unchanged (bench_qdq's Fidelity: CTC text, DB boxes, face
  decisions; top-1 for the builders);
* ``lowrank s`` / ``peak MB``: wall time and peak resident-memory increase of the onnxopt call.

The closing summary gives, per model, the fastest variant whose top-1 (or app agreement)
stays at or above 99 %. It also says whether refinement beat plain truncation: cosine at equal
rank, and speed for the searches, where refinement lets the search go to lower ranks.

    python -m tools.bench_lowrank [--models a,b|images] [--variants v1,v2|quick|all|METHOD@*]
                                  [--spec "PASS:opts ..."] [--tolerance cosine=0.999] [--runs N]
                                  [--quick] [--json FILE] [--timeout S]

A variant that fails is reported in its cell with the reason, and the benchmark goes on. This
covers a pass that is not registered, a crash, a timeout, and a model that onnxruntime refuses.
"""

from __future__ import annotations

import argparse
import pickle
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/bench_lowrank.py` as well as `-m tools.bench_lowrank`
    sys.path.insert(0, str(REPO))

from tools.bench_lossless import (  # noqa: E402
    _fmt, _interleaved_latencies, _outputs, _session, paired_ratio, print_results)
from tools.bench_qdq import (  # noqa: E402  (cases, worker processes and fidelity checks are bench_qdq's)
    IMAGE_MODELS,
    Case,
    _model_error,
    _parse_list,
    _pct,
    format_rows,
    run_cases,
    run_job,
    score_fidelity,
)
from tools.realmodels import unknown_models_error  # noqa: E402

BUILDER_MODELS = ("vgg16", "resnet50", "mobilenetv2")
DEFAULT_MODELS = BUILDER_MODELS + IMAGE_MODELS
GOAL_AGREEMENT = 0.99  # "best speed at top-1 >= 99 %"
LOWRANK_PASSES = ("svd", "spatial-svd", "tucker2", "cp")


# ============================================================ variants
@dataclass(frozen=True)
class Variant:
    """One row: low-rank pass specs run after the lossless passes, with a tolerance (may be empty)."""

    key: str
    specs: tuple[str, ...]
    tolerance: tuple[tuple[str, float], ...] = ()
    refine: bool = True
    plain: str | None = None  # the key of the same variant without refinement
    searched: bool = False  # ranks searched (refinement changes the ranks, not only the fit)

    @property
    def description(self) -> str:
        text = " then ".join(self.specs) or "the lossless passes only"
        if self.tolerance:
            text += " with tolerance " + ",".join(f"{m}={v:g}" for m, v in self.tolerance)
        elif self.searched:
            text += " (default budget cosine=0.99+top1=0.99)"
        return text


def _catalogue() -> dict[str, Variant]:
    variants: dict[str, Variant] = {}

    def add(v: Variant) -> None:
        variants[v.key] = v

    for energy in (0.995, 0.98, 0.95):  # MEASUREMENTS.md's data-free baseline
        add(Variant(f"tucker2@e{energy:g}", (f"tucker2:energy={energy:g},refine=false",), refine=False))
    for method, rank in ((m, r) for m in ("tucker2", "cp", "spatial-svd", "svd") for r in (0.5, 0.25)):
        plain = f"{method}@r{rank:g}"
        add(Variant(plain, (f"{method}:rank={rank:g},refine=false",), refine=False))
        add(Variant(plain + "+refine", (f"{method}:rank={rank:g},refine=true",), plain=plain))
    cos = (("cosine", 0.999),)
    add(Variant("search@cos0.999", ("tucker2:refine=false", "svd:refine=false"), cos, refine=False, searched=True))
    add(Variant("search@cos0.999+refine", ("tucker2:refine=true", "svd:refine=true"), cos, plain="search@cos0.999",
                searched=True))
    add(Variant("search@default+refine", ("tucker2:refine=true", "svd:refine=true"), searched=True))
    return variants


VARIANTS = _catalogue()
# Always run second: the same lossless passes without a decomposition, the base of the × columns.
LOSSLESS = Variant("lossless", (), refine=False)
# --quick: the data-free baseline and one rank with and without refinement: about two minutes
# for ResNet-50 on 2 cores. svd over ResNet-50's 1x1 convs takes 1.5 minutes more, and the
# searches time many candidate layers (ten minutes and more), so they are left to full runs.
QUICK_VARIANTS = ("tucker2@e0.98", "tucker2@r0.5", "tucker2@r0.5+refine")
VARIANT_ALIASES = {"all": tuple(VARIANTS), "quick": QUICK_VARIANTS,
                   **{f"{m}@*": tuple(k for k in VARIANTS if k.startswith(m + "@"))
                      for m in (*LOWRANK_PASSES, "search")}}


def custom_variants(spec_texts: list[str], tolerance: dict[str, float]) -> list[Variant]:
    """The ``--spec`` rows: pass specs separated by spaces, e.g. "tucker2:rank=0.3 svd:energy=0.9".
    A row whose text says refine=true where another row's says refine=false is paired with that
    row, as ``METHOD@rF+refine`` is with ``METHOD@rF``."""
    tol = tuple(sorted(tolerance.items()))
    texts = [" ".join(t.split()) for t in spec_texts]
    out = []
    for text in texts:
        specs = tuple(text.split())
        refine = not all("refine=false" in s for s in specs)  # refine=true is the passes' default
        twin = text.replace("refine=true", "refine=false")
        out.append(Variant(text, specs, tol, refine=refine,
                           plain=twin if refine and twin != text and twin in texts else None,
                           searched=not all(re.search(r"[:,](rank|energy|method)=", s) for s in specs)))
    return out


def lossless_first() -> list[str]:
    """The lossless preset for target cpu without fuse-conv-activation (as preset int8 does):
    a com.microsoft FusedConv is not a Conv the low-rank passes would decompose."""
    from onnxopt.presets import PRESETS, spec_name
    from onnxopt.registry import all_passes

    registry = all_passes()
    return [s for s in PRESETS["lossless"] if spec_name(s) != "fuse-conv-activation"
            and spec_name(s) in registry and "cpu" in registry[spec_name(s)].targets]


def job_for(variant: Variant, src: Path, dst: Path, calibration: Path) -> dict:
    """bench_qdq's worker job for ``variant``; ValueError names a pass that is not registered."""
    from onnxopt.presets import spec_name
    from onnxopt.registry import all_passes

    missing = [spec_name(s) for s in variant.specs if spec_name(s) not in all_passes()]
    if missing:
        raise ValueError(f"{', '.join(missing)} not registered")
    return {"src": str(src), "dst": str(dst), "calibration": str(calibration), "tool": "onnxopt",
            "specs": lossless_first() + list(variant.specs), "tolerance": dict(variant.tolerance)}


# ============================================================ what a variant did
# passes/lowrank.py's ``rewrite`` names the chain that replaces node N "N_lr0", "N_lr1", ...
# (onnxopt.graph.NameAllocator appends "_1", "_2" to a name already taken, as for unnamed
# nodes). So every decomposed layer has one chain start "N_lr0[_k]". A factor decomposed again
# by a later pass ("N_lr0_lr0") belongs to a layer already counted: its prefix holds "_lr<digit>".
_CHAIN_START = re.compile(r"^(?:(?!_lr\d).)*_lr0(?:_\d+)?$")


def decomposed_layers(model: onnx.ModelProto) -> int:
    """How many of ``model``'s main-graph nodes start a decomposition chain."""
    return sum(bool(_CHAIN_START.match(node.name)) for node in model.graph.node)


def macs_and_params(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, list[str]]:
    """MACs and parameters (onnxopt.stats), with its notes on what the MAC count may miss."""
    from onnxopt.stats import model_stats

    stats = model_stats(model, input_shapes=input_shapes)
    return stats["macs"], stats["parameters"], [f"MACs: {n}" for n in stats["macs_notes"]]


# ============================================================ measuring
@dataclass
class Row:
    model: str
    variant: str
    refine: bool | None = None
    layers: int | None = None  # layers decomposed
    macs: int | None = None
    params: int | None = None
    macs_ratio: float | None = None  # of the lossless row's (the model before decomposition)
    params_ratio: float | None = None
    speed: float | None = None  # float time / variant time (> 1: faster than float)
    ms: float | None = None  # median latency
    cosine: float | None = None
    top1: float | None = None
    app: float | None = None
    app_text: str = ""
    seconds: float | None = None  # the onnxopt call
    peak_mb: float | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


def run_variant(case: Case, variant, row, make_job, folder: Path, calibration: Path, timeout: float, log) -> Path | None:
    """Run ``variant`` on ``case`` in a worker process (``make_job(variant, src, dst, calibration)``):
    the output model's path, or None with ``row.error`` set. Fills ``row``'s notes, seconds, peak_mb."""
    dst = folder / f"{case.name}.{re.sub(r'[^A-Za-z0-9_.@+-]', '_', variant.key)}.onnx"
    try:
        job = make_job(variant, case.path, dst, calibration)
    except ValueError as exc:
        row.error = str(exc)
        return None
    log(f"  {case.name}: {variant.key} ...")
    result = run_job(job, folder, timeout)
    row.notes += result.get("notes", [])
    if "error" in result:
        row.error = result["error"]
        return None
    row.seconds, row.peak_mb = result["seconds"], result["peak_mb"]
    return dst


def bench_case(case: Case, variants: list[Variant], runs: int, folder: Path, timeout: float, log) -> list[Row]:
    """Decompose ``case`` with every variant, then measure each against the float model."""
    calibration = folder / f"{case.name}.calibration.pkl"
    with open(calibration, "wb") as f:
        pickle.dump(case.calibration, f)
    shapes = {name: tuple(value.shape) for name, value in case.evaluation[0].items()}
    float_model = onnx.load(str(case.path))
    ref = Row(case.name, "float", layers=0)
    ref.macs, ref.params, ref.notes = macs_and_params(float_model, shapes)
    before = decomposed_layers(float_model)  # names that merely look like chain starts
    del float_model

    log(f"  {case.name}: float outputs on {len(case.evaluation)} evaluation feeds ...")
    float_session = _session(case.path, "all")
    reference = _outputs(float_session, case.evaluation)
    score_fidelity(ref, case, reference, reference)
    float_times: list[float] = []
    notes_shown = set(ref.notes)  # a note on the MAC count is shown once per model
    rows = [ref]
    for variant in [LOSSLESS, *variants]:
        row = Row(case.name, variant.key, refine=variant.refine if variant.specs else None)
        rows.append(row)
        dst = run_variant(case, variant, row, job_for, folder, calibration, timeout, log)
        if dst is None:
            continue
        model = onnx.load(str(dst))
        row.layers = decomposed_layers(model) - before
        row.macs, row.params, macs_notes = macs_and_params(model, shapes)
        row.notes += [n for n in macs_notes if n not in notes_shown]
        notes_shown.update(macs_notes)
        del model
        try:
            session = _session(dst, "all")
            outputs = _outputs(session, case.evaluation)
        except Exception as exc:
            row.error = _model_error(exc, folder)
            continue
        score_fidelity(row, case, reference, outputs)
        # Float and this variant alternate, round by round: only two sessions are ever open.
        times = _interleaved_latencies({"float": float_session, variant.key: session}, case.evaluation[0], runs)
        row.speed = paired_ratio(times["float"], times[variant.key])
        row.ms = statistics.median(times[variant.key]) * 1e3
        float_times += times["float"]
        del session
        dst.unlink(missing_ok=True)
    if not float_times:  # no variant ran: time float alone
        float_times = _interleaved_latencies({"float": float_session}, case.evaluation[0], runs)["float"]
    ref.speed, ref.ms = 1.0, statistics.median(float_times) * 1e3
    # The ratios are to the model before decomposition: the lossless row when it ran (BatchNorm
    # folded, as onnxruntime runs float too), so they show what the decomposition alone removed.
    base = rows[1] if rows[1].macs else ref
    for row in rows:
        if row.macs is not None and base.macs:
            row.macs_ratio = row.macs / base.macs
        if row.params is not None and base.params:
            row.params_ratio = row.params / base.params
    return rows


# ============================================================ reporting
def _scaled(value: int | None, unit: float, spec: str) -> str:
    return _fmt(None if value is None else value / unit, spec)


def format_table(rows: list[Row]) -> str:
    head = (f"{'layers':>6s} {'GMACs':>7s} {'×':>5s} {'Mparams':>8s} {'×':>5s} {'speed':>6s} {'ms':>8s} "
            f"{'cosine':>7s} {'top-1':>6s}  {'app':30s} {'lowrank s':>9s} {'peak MB':>8s}")
    return format_rows(rows, max([22] + [len(r.variant) for r in rows]), head, lambda r: (
        f"{_fmt(r.layers, '6.0f')} {_scaled(r.macs, 1e9, '7.3f')} {_fmt(r.macs_ratio, '5.2f')} "
        f"{_scaled(r.params, 1e6, '8.2f')} {_fmt(r.params_ratio, '5.2f')} {_fmt(r.speed, '6.2f')} "
        f"{_fmt(r.ms, '8.2f')} {_fmt(r.cosine, '7.4f')} {_pct(r.top1):>6s}  {(r.app_text or '-')[:30]:30s} "
        f"{_fmt(r.seconds, '9.1f')} {_fmt(r.peak_mb, '8.0f')}"))


# MEASUREMENTS.md, "Data-free Tucker-2": VGG-16, HOSVD ranks by energy, no refinement
# (energy → speed, top-1 agreement, cosine), shown next to this run's tucker2@e rows.
VGG16_DATA_FREE_BASELINE = {0.995: (1.08, 0.96, 0.88), 0.98: (1.34, 0.92, 0.44), 0.95: (1.91, 0.88, 0.23)}


def decomposed(row: Row) -> bool:
    """Did the variant decompose anything? (Chains found, or fewer MACs than before decomposition.)"""
    if row.variant in ("float", LOSSLESS.key):
        return False
    return bool(row.layers) or (row.macs_ratio is not None and row.macs_ratio < 0.995)


def best_within(rows: list[Row], goal: float = GOAL_AGREEMENT) -> Row | None:
    """The fastest decomposed variant whose top-1 (app agreement where there is no top-1) is ≥ ``goal``."""
    fine = [r for r in rows if decomposed(r) and r.speed is not None and r.app is not None and r.app >= goal]
    return max(fine, key=lambda r: r.speed, default=None)


def refinement_pairs(rows: list[Row], variants: dict[str, Variant]) -> list[tuple[Variant, Row, Row]]:
    """(variant, plain row, refined row) for every refined variant whose plain twin also gave results."""
    by = {r.variant: r for r in rows}
    pairs = []
    for r in rows:
        v = variants.get(r.variant)
        plain = by.get(v.plain) if v is not None and v.plain else None
        if plain is None or plain.cosine is None or r.cosine is None:
            continue
        if decomposed(plain) or decomposed(r):
            pairs.append((v, plain, r))
    return pairs


def refinement_verdict(rows: list[Row], variants: dict[str, Variant]) -> str:
    """Did refinement beat plain truncation? Cosine at equal rank; for searches, the speed at the same tolerance."""
    pairs = refinement_pairs(rows, variants)
    if not pairs:
        return "refinement: no pair of plain and refined variants that decomposed something"
    parts = []
    fixed = [(v, p, r) for v, p, r in pairs if not v.searched]
    if fixed:
        wins = sum(r.cosine > p.cosine for _, p, r in fixed)
        details = []
        for _, p, r in fixed:
            text = f"{p.variant} {p.cosine:.4f}→{r.cosine:.4f}"
            if p.layers != r.layers:  # measure=true keeps the layers that time faster: the sets may differ
                text += f" (layers {_fmt(p.layers, 'd')} vs {_fmt(r.layers, 'd')})"
            details.append(text)
        parts.append(f"refinement raised cosine at equal rank in {wins} of {len(fixed)}: " + ", ".join(details))
    for v, p, r in pairs:
        if v.searched:
            parts.append(f"{p.variant}: refined {_fmt(r.speed, '.2f')}x vs plain {_fmt(p.speed, '.2f')}x, cosine "
                         f"{r.cosine:.4f} vs {p.cosine:.4f}, layers {_fmt(r.layers, 'd')} vs {_fmt(p.layers, 'd')}")
    return "; ".join(parts)


def format_summary(rows: list[Row], variants: dict[str, Variant]) -> str:
    lines = [f"Per model: the fastest variant with top-1 (app agreement where no top-1) >= "
             f"{100 * GOAL_AGREEMENT:.0f}%, and refinement against plain truncation:"]
    for model in dict.fromkeys(r.model for r in rows):
        model_rows = [r for r in rows if r.model == model]
        best = best_within(model_rows)
        has_top1 = any(r.top1 is not None for r in model_rows)
        if best is not None:
            what = "top-1" if has_top1 else "app"
            text = (f"best {best.variant} {best.speed:.2f}x float (MACs {_fmt(best.macs_ratio, '.2f')}, "
                    f"{what} {_pct(best.app)}, cosine {best.cosine:.4f})")
        elif any(decomposed(r) and r.speed is not None for r in model_rows):
            text = f"no decomposed variant keeps {100 * GOAL_AGREEMENT:.0f}% agreement"
        elif any(r.variant not in ("float", LOSSLESS.key) and r.speed is not None for r in model_rows):
            text = "no variant decomposed any layer"
        else:
            text = "no decomposed variant ran: " + next((r.error for r in model_rows if r.error), "none selected")
        lines.append(f"  {model}: {text}")
        lines.append(f"    {refinement_verdict(model_rows, variants)}")
        if model == "vgg16":
            by = {r.variant: r for r in model_rows}
            for energy, (speed, agreement, cosine) in VGG16_DATA_FREE_BASELINE.items():
                here = by.get(f"tucker2@e{energy:g}")
                ours = ("not run" if here is None or here.speed is None else
                        f"here {here.speed:.2f}x, {_pct(here.top1)}, cosine {here.cosine:.2f}, "
                        f"{_fmt(here.layers, 'd')} layers")
                lines.append(f"    MEASUREMENTS.md data-free Tucker-2 energy {energy:g}: {speed:.2f}x, "
                             f"{100 * agreement:.0f}%, cosine {cosine:.2f}; {ours}")
    return "\n".join(lines)


# ============================================================ command line
@dataclass
class VariantArgs:
    """A lossy benchmark's parsed command line (``parse_variant_args``)."""

    args: argparse.Namespace
    runs: int
    models: list[str]
    variants: list  # the rows to run: catalogue variants in order, then the --spec rows
    known: dict  # key → variant, the catalogue's and the --spec rows'


def parse_variant_args(argv: list[str] | None, prog: str, description: str, default_models: tuple[str, ...],
                       catalogue: dict, quick: tuple[str, ...], aliases: dict[str, tuple[str, ...]],
                       spec_help: str, spec_variants) -> VariantArgs | int:
    """The command line the lossy benchmarks share (models, catalogue variants, --spec rows made by
    ``spec_variants(specs, tolerance)``, rounds, --quick, --json, --timeout); exit code 2 with one
    line on bad input."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--models", help=f"comma-separated (default {','.join(default_models)}); 'images' = the real "
                                         "image models; any models/zoo.py builder works too")
    parser.add_argument("--variants", help="comma-separated rows besides float (default all, --quick: "
                                           f"{','.join(quick)}); {', '.join(repr(a) for a in aliases)} select groups. "
                                           f"Known: {', '.join(catalogue)}")
    parser.add_argument("--spec", action="append", default=[], metavar="'PASS:opts [PASS:opts ...]'", help=spec_help)
    parser.add_argument("--tolerance", action="append", default=[], metavar="METRIC=VALUE",
                        help="the tolerance of the --spec rows, e.g. cosine=0.999 (repeatable)")
    parser.add_argument("--runs", type=int, default=None, help="latency rounds per variant (default 30, --quick 10)")
    parser.add_argument("--quick", action="store_true",
                        help="16 calibration and 16 evaluation feeds, 10 rounds, the quick variant list")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to one variant on one model")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    names = _parse_list(args.models, default_models, {"images": IMAGE_MODELS})
    default_variants = quick if args.quick else tuple(catalogue)
    if args.spec and not args.variants:
        default_variants = ()  # --spec alone: just float and the custom rows
    keys = _parse_list(args.variants, default_variants, aliases)
    error = unknown_models_error(names)
    if error:
        print(error, file=sys.stderr)
        return 2
    bad = [k for k in keys if k not in catalogue]
    if bad:
        print(f"error: unknown variant(s) {', '.join(bad)}. Fix: use {', '.join(catalogue)}, a group "
              f"({', '.join(aliases)}) or --spec.", file=sys.stderr)
        return 2
    from onnxopt.errors import UserInputError
    from onnxopt.validate import parse_tolerance

    try:
        tolerance = parse_tolerance(args.tolerance)
    except UserInputError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    variants = [catalogue[k] for k in keys] + spec_variants(args.spec, tolerance)
    return VariantArgs(args, args.runs or (10 if args.quick else 30), names, variants,
                       {**catalogue, **{v.key: v for v in variants}})


def run_variant_bench(parsed: VariantArgs, prefix: str, bench_case_fn, row_type, headline: str,
                      calibration_use: str, columns: str, format_table_fn, format_summary_fn) -> int:
    """Run ``bench_case_fn(case, variants, runs, folder, timeout, log)`` on every model, then print the
    headline, the photos, the variants' legend (``key``, ``description``), the columns and the results
    (``format_summary_fn(rows, known)``)."""
    variants = parsed.variants

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    args, runs = parsed.args, parsed.runs
    t_start = time.perf_counter()
    all_rows, data_lines = run_cases(parsed.models, args.quick, prefix, log,
                                     lambda case, folder: bench_case_fn(case, variants, runs, folder, args.timeout,
                                                                        log),
                                     lambda name, text: row_type(name, "(all)", error=text))
    print(f"{headline}, 1 thread, median of {runs} rounds alternating float and the variant.")
    print(f"Calibration feeds ({calibration_use}) and evaluation feeds are different photos (calibration | evaluation):")
    print("\n".join(data_lines))
    print("Variants:")
    width = max([20] + [len(v.key) for v in variants])
    for v in variants:
        print(f"  {v.key:{width}s} {v.description}")
    print(columns)
    print_results(format_table_fn(all_rows), format_summary_fn(all_rows, parsed.known), all_rows, t_start,
                  args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parsed = parse_variant_args(argv, "python -m tools.bench_lowrank", __doc__.splitlines()[0], DEFAULT_MODELS,
                                VARIANTS, QUICK_VARIANTS, VARIANT_ALIASES,
                                "a custom row running these low-rank pass specs (repeatable)", custom_variants)
    if isinstance(parsed, int):
        return parsed
    import onnxruntime as ort

    return run_variant_bench(
        parsed, "bench_lowrank_", bench_case, Row,
        f"low rank: onnxopt svd / spatial-svd / tucker2 / cp after the lossless passes ({len(lossless_first())} "
        f"passes, no fuse-conv-activation); onnxruntime {ort.__version__} CPU, ALL optimizations",
        "refinement, searches",
        "layers: layers decomposed; ×: of the lossless row (before decomposition); speed: float time / variant "
        "time (>1 faster); cosine: lowest over eval feeds and outputs; top-1: argmax agreement (classifiers); "
        "app: the application's answer unchanged (see tools/bench_qdq.py); lowrank s / peak MB: the onnxopt call "
        "(fresh process).",
        format_table, format_summary)


if __name__ == "__main__":
    raise SystemExit(main())
