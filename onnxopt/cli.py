"""The ``onnxopt`` command line: optimize, inspect, validate, passes.

Exit codes (see onnxopt.errors): 0 success, 2 bad input or usage, 3 validation
failed the tolerance, 1 internal error, 130 interrupted.

Output rules:
* The input model is never modified, and ``-o`` may not name the input.
* The output is written once, atomically (onnxopt.io.save_model), after every step
  succeeded. With a tolerance, the candidate is validated *in memory before it is
  saved*: a model that fails the tolerance is not written at all (exit 3).
* Tables go to stdout, the progress display and errors to stderr. With
  ``--report -`` stdout carries only the JSON report and the tables go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

from .context import PassContext
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, OnnxoptError, UserInputError, ValidationFailed

EXIT_INTERRUPTED = 130
DEBUG_ENV = "ONNXOPT_DEBUG"
DEFAULT_RANDOM_SAMPLES = 8


@dataclass
class CliContext(PassContext):
    """PassContext whose seeded random data honours --calib-limit (the number of random samples)."""

    random_samples: int = DEFAULT_RANDOM_SAMPLES
    # Sizes of dynamic inputs for data only (--data-shape and --input-shape).
    data_shapes: dict = dataclasses.field(default_factory=dict)

    def calibration_data(self):
        if self.calibration is None:
            from .calibration import random_calibration

            shapes = {**self.data_shapes, **self.input_shapes}
            self.calibration = random_calibration(self.template, seed=self.seed, input_shapes=shapes,
                                                  num_samples=self.random_samples)
        return self.calibration


class _UsageError(Exception):
    """argparse found a usage mistake; main() turns it into one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse calls this for every usage mistake
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# ============================================================================ argument parsing
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration / validation data")
    g.add_argument("--calib", metavar="PATH",
                   help="calibration data: an .npz, a folder of .npy files, or a folder of images "
                        "(with --image-preprocess). Without it, seeded random data is used where needed.")
    g.add_argument("--image-preprocess", metavar="SPEC",
                   help="how to turn images into tensors: 'imagenet' or "
                        "'size=224x224,layout=NCHW,color=RGB,scale=0.0039,mean=a+b+c,std=a+b+c'")
    g.add_argument("--calib-limit", metavar="N", type=_positive_int,
                   help=f"use at most N samples (N random samples without --calib; default {DEFAULT_RANDOM_SAMPLES})")
    g.add_argument("--input-shape", metavar="NAME:DIMS", action="append", default=[],
                   help="fix a dynamic input shape, e.g. input:1x3x224x224 (repeatable); optimize writes it "
                        "into the output model so every shape computation folds")
    g.add_argument("--data-shape", metavar="NAME:DIMS", action="append", default=[],
                   help="size of a dynamic input for the generated or loaded data only; the model keeps "
                        "its dynamic dimensions (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="seed of random data and of randomized passes (default 0)")


def _add_validation_options(p: argparse.ArgumentParser, *, in_optimize: bool) -> None:
    g = p.add_argument_group("validation")
    if in_optimize:
        g.add_argument("--validate", action="store_true",
                       help="compare the result with the input in onnxruntime before saving it")
    g.add_argument("--providers", metavar="LIST",
                   help="execution providers to validate on, comma-separated: cpu,cuda,tensorrt (default cpu)"
                        + ("; implies --validate" if in_optimize else ""))
    g.add_argument("--require-providers", action="store_true",
                   help="fail (exit 2) when a requested provider is not available instead of skipping it")
    g.add_argument("--tolerance", metavar="METRIC=VALUE", action="append", default=[],
                   help="accuracy budget, e.g. cosine=0.999, rel_l2=1e-3, top1=0.99 (repeatable); "
                        "a result that misses it exits with code 3"
                        + ("; implies --validate, and a result that misses it is not written" if in_optimize else ""))
    g.add_argument("--runs", type=_positive_int, default=20, help="timed runs per model for latency (default 20)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .pass_base import TARGETS

    parser = _Parser(prog="onnxopt", description="An ONNX graph-level optimizing compiler.")
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("optimize", help="optimize a model", description="Run a preset or explicit passes on a model.")
    p.add_argument("input", metavar="IN", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="output .onnx path (written atomically)")
    p.add_argument("--preset", default="lossless", help="pass pipeline to run when no --pass is given (default lossless)")
    p.add_argument("--pass", dest="passes", metavar="NAME[:key=value,...]", action="append", default=[],
                   help="run this pass (repeatable, in order); replaces the preset")
    p.add_argument("--target", default=None, choices=TARGETS,
                   help="deployment target (default: the preset's own, else cpu)")
    _add_data_options(p)
    _add_validation_options(p, in_optimize=True)
    p.add_argument("--report", metavar="FILE.json", help="write a JSON report ('-' prints it to stdout)")
    p.add_argument("--verify-each", action="store_true",
                   help="check and run the model after every pass; name the first pass that changes outputs")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="save tensors in OUT.data next to the model (default: only when the model exceeds 2 GB)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display and no tables")
    p.add_argument("-v", "--verbose", action="store_true", help="print the passes' notes and log messages")

    p = sub.add_parser("inspect", help="show a model's statistics", description="Opsets, I/O, operators, parameters, MACs.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--top", type=_positive_int, default=10, help="how many layers to list by MACs (default 10)")
    p.add_argument("--input-shape", metavar="NAME:DIMS", action="append", default=[],
                   help="count MACs at this shape of a dynamic input, e.g. input:1x3x224x224 (repeatable)")

    p = sub.add_parser("validate", help="compare a candidate model with a reference",
                       description="Run both models on the same data and compare outputs and latency.")
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("candidate", metavar="CANDIDATE")
    _add_data_options(p)
    _add_validation_options(p, in_optimize=False)
    p.add_argument("--json", action="store_true", help="print the validation report as JSON")

    p = sub.add_parser("passes", help="list the available passes and presets")
    p.add_argument("--target", default="cpu", choices=TARGETS, help="show the presets for this target (default cpu)")
    p.add_argument("--json", action="store_true")
    return parser


# ============================================================================ entry point
def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except _UsageError as exc:
        _error_line(f"error: {exc}")
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _error_line("interrupted; no output was written")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `onnxopt inspect m.onnx | head`: the reader left, which is fine
        _silence_stdout()
        return EXIT_OK
    except OnnxoptError as exc:
        if exc.exit_code == EXIT_INTERNAL:
            message = exc.one_line()
            if not message.startswith("internal error"):
                message = f"internal error: {message}"
            _error_line(f"{message} (please report; rerun with {DEBUG_ENV}=1 for a traceback)")
            if debug:
                traceback.print_exc()
        else:
            _error_line(f"error: {exc.one_line()}")
        return exc.exit_code
    except Exception as exc:  # an onnxopt bug: one line, traceback on demand
        detail = " ".join(str(exc).split())
        _error_line(f"internal error: {type(exc).__name__}: {detail} "
                    f"(please report; rerun with {DEBUG_ENV}=1 for a traceback)")
        if debug:
            traceback.print_exc()
        return EXIT_INTERNAL


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (e.g. captured in tests)
        pass


def _error_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ============================================================================ shared helpers
def _parse_data_args(args) -> tuple[dict, object | None]:
    """--input-shape and --image-preprocess, parsed before any work."""
    from .calibration import ImagePreprocess, parse_input_shapes

    input_shapes = parse_input_shapes(args.input_shape or [])
    preprocess = None
    if args.image_preprocess:
        if not args.calib:
            raise UserInputError("--image-preprocess was given without --calib.",
                                 "add --calib FOLDER_OF_IMAGES, or drop --image-preprocess.")
        preprocess = ImagePreprocess.parse(args.image_preprocess)
    return input_shapes, preprocess


def _data_shapes(args, input_shapes: dict) -> dict:
    """Shapes for calibration/random data: --data-shape, overridden by --input-shape."""
    from .calibration import parse_input_shapes

    return {**parse_input_shapes(args.data_shape or []), **input_shapes}


def _check_providers(providers: list[str], require: bool) -> None:
    """With --require-providers, fail before any work when a provider cannot run here."""
    if not require:
        return
    from .runtime import provider_status

    for short in providers:
        status = provider_status(short)
        if not status.available:
            raise UserInputError(f"execution provider '{short}' is required but not available: {status.reason}.",
                                 "run on a machine with that provider, or drop --require-providers to skip it.")


def _check_input_shapes(model, input_shapes: dict) -> None:
    """--input-shape must name real inputs and only fix dynamic dims; checked once the model is read.

    Uses the calibration module's resolver so the rules (and messages) are the same everywhere.
    """
    if input_shapes:
        from .calibration import check_input_shapes

        check_input_shapes(model, input_shapes)


def _load_calibration(args, model, input_shapes, preprocess):
    """The user's calibration data (read up front so its errors come before any work), or None."""
    if not args.calib:
        return None
    from .calibration import load_calibration

    return load_calibration(args.calib, model, input_shapes=input_shapes, preprocess=preprocess, limit=args.calib_limit)


def _model_numbers(model, path: Path | None = None, input_shapes: dict | None = None) -> dict:
    """The figures of the before/after table: nodes, params, bytes, MACs, file size (when saved)."""
    from .stats import model_stats

    stats = model_stats(model, path=path, input_shapes=input_shapes or None)
    return {
        "nodes": stats["nodes"],
        "params": stats["parameters"],
        "param_bytes": stats["parameter_bytes"],
        "macs": stats["macs"],
        "size": stats.get("file_size"),
    }


def _calibration_info(data) -> dict | None:
    if data is None:
        return None
    try:
        samples = len(data)
    except TypeError:
        samples = None
    return {"source": data.source, "random": bool(data.is_random), "samples": samples}


def _random_data_note(data, seed: int) -> str | None:
    if data is not None and data.is_random:
        return (f"note: calibration/validation used seeded random data (seed {seed}), "
                "not real inputs; pass --calib PATH for representative data.")
    return None


def _consoles(report_to_stdout: bool):
    from .report import make_console

    tables = make_console(stderr=report_to_stdout)
    errors = make_console(stderr=True)
    return tables, errors


# ============================================================================ optimize
def _check_output_path(src: Path, dst: Path) -> None:
    if dst.exists() and dst.is_dir():
        raise UserInputError(f"output '{dst}' is a directory.", "give a file name such as out.onnx.")
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise UserInputError(f"output folder '{folder}' does not exist.", "create it first or choose another -o path.")
    same = dst.resolve() == src.resolve()
    if not same and dst.exists() and src.exists():
        same = os.path.samefile(dst, src)
    if same:
        raise UserInputError(f"output would overwrite the input '{src}'.",
                             "choose a different -o path; onnxopt never modifies its input.")


def _choose_passes(args):
    from .presets import preset_passes
    from .registry import parse_pass_spec

    if args.passes:
        return [parse_pass_spec(spec) for spec in args.passes]
    return preset_passes(args.preset, args.target)


def _show_pass_progress(passes, display) -> None:
    """Make each pass name itself on the status line while it runs (the PassManager has no hook)."""
    if not display.enabled:
        return
    for p in passes:
        def shown(graph, ctx, _run=p.run, _name=p.name):
            display.status(f"pass {_name}")
            return _run(graph, ctx)

        p.run = shown


def _make_context(args, model, calibration, tolerance, input_shapes, display, log) -> "CliContext":
    return CliContext(target=args.target, calibration=calibration, seed=args.seed, tolerance=tolerance,
                      input_shapes=input_shapes, template=model, progress_factory=display.track, log=log,
                      random_samples=args.calib_limit or DEFAULT_RANDOM_SAMPLES)


def cmd_optimize(args) -> int:
    from . import __version__
    from .io import check_model, load_model, save_model
    from .manager import PassManager
    from .report import ProgressDisplay, check_report_path, pass_table, print_line, print_tables, progress_enabled
    from .report import summarize_records, totals_table, validation_tables, write_json
    from .runtime import parse_providers
    from .validate import parse_tolerance, validate

    # 1. Everything the user typed is checked before the model is even read.
    from .presets import resolve_target

    args.target = resolve_target(None if args.passes else args.preset, args.target)
    passes = _choose_passes(args)
    input_shapes, preprocess = _parse_data_args(args)
    tolerance = parse_tolerance(args.tolerance or [])
    providers = parse_providers(args.providers)
    want_validation = bool(args.validate or tolerance or args.providers or args.require_providers)
    src, dst = Path(args.input), Path(args.output)
    _check_output_path(src, dst)
    if args.report:
        check_report_path(args.report)
        if args.report != "-" and Path(args.report).resolve() in (src.resolve(), dst.resolve()):
            raise UserInputError(f"--report '{args.report}' names a model file.", "give the report its own name, e.g. report.json.")
    if want_validation:
        _check_providers(providers, args.require_providers)

    # 2. Inputs: the model, then the calibration data (its errors come before any work).
    model = load_model(src)
    data_shapes = _data_shapes(args, input_shapes)
    _check_input_shapes(model, data_shapes)
    calibration = _load_calibration(args, model, data_shapes, preprocess)
    tables, errors = _consoles(report_to_stdout=args.report == "-")
    show = not args.quiet
    log_lines: list[str] = []

    def log(message: str) -> None:
        log_lines.append(message)
        if args.verbose:
            print_line(errors, message, "dim")

    with ProgressDisplay(progress_enabled(args.quiet), errors) as display:
        ctx = _make_context(args, model, calibration, tolerance, input_shapes, display, log)
        ctx.data_shapes = data_shapes
        if want_validation:
            ctx.calibration_data()  # random data for validation, generated before the passes run
        _show_pass_progress(passes, display)

        # 3. The passes.
        display.status("optimizing")
        manager = PassManager(passes, verify_each=args.verify_each)
        result = manager.run(model, ctx)
        try:
            check_model(result.model, what="the optimized model")
        except UserInputError as exc:  # the input passed the checker, so this is an onnxopt bug
            raise OnnxoptError(f"internal error: {exc.cause}") from None

        # 4. Validation in memory, before anything is written.
        vreport = None
        if want_validation:
            display.status("validating")
            vreport = validate(model, result.model, ctx.calibration_data(), providers=providers,
                               tolerance=tolerance or None, require_providers=args.require_providers,
                               runs=args.runs, progress=display.track)
    failed = vreport is not None and bool(tolerance) and not vreport.passed

    # 5. Save (atomic), unless the result missed the tolerance.
    if not failed:
        save_model(result.model, dst, external_data=args.external_data)

    before = _model_numbers(model, src, input_shapes)
    after = _model_numbers(result.model, None if failed else dst, input_shapes)

    if show:
        print_tables(tables, [pass_table(result.records), totals_table(before, after, result.seconds)])
        if args.verbose:
            for rec in result.records:
                for note in rec.notes:
                    print_line(errors, f"{rec.name}: {note}", "dim")
        if vreport is not None:
            print_tables(tables, validation_tables(vreport))
        note = _random_data_note(ctx.calibration, args.seed)
        if note:
            _error_line(note)
        if not failed:
            print_line(tables, f"wrote {dst}")

    if args.report:
        report = {
            "onnxopt_version": __version__,
            "command": "optimize",
            "input": {"path": str(src), **before},
            "output": None if failed else {"path": str(dst), **after},
            "written": not failed,
            "target": args.target,
            "preset": None if args.passes else args.preset,
            "pass_specs": list(args.passes),
            "seed": args.seed,
            "total_seconds": result.seconds,
            "passes": [r.as_dict() for r in result.records],
            "pass_summary": summarize_records(result.records),
            "log": log_lines,
            "calibration": _calibration_info(ctx.calibration),
            "validation": vreport.as_dict() if vreport is not None else None,
        }
        write_json(report, args.report)

    if failed:
        raise ValidationFailed("the optimized model failed the tolerance: " + "; ".join(vreport.failures)
                               + f"; '{dst}' was not written.")
    if vreport is not None and not vreport.passed:
        _error_line("warning: validation reported problems: " + "; ".join(vreport.failures))
    return EXIT_OK


# ============================================================================ inspect
def cmd_inspect(args) -> int:
    from .calibration import parse_input_shapes
    from .io import load_model
    from .report import dumps, make_console, print_tables, stats_tables
    from .stats import model_stats

    input_shapes = parse_input_shapes(args.input_shape or [])
    path = Path(args.model)
    model = load_model(path)
    _check_input_shapes(model, input_shapes)
    stats = model_stats(model, path=path, input_shapes=input_shapes or None)
    if args.json:
        sys.stdout.write(dumps(stats) + "\n")
    else:
        print_tables(make_console(), stats_tables(stats, top=args.top))
    return EXIT_OK


# ============================================================================ validate
def cmd_validate(args) -> int:
    from .calibration import random_calibration
    from .io import load_model
    from .report import ProgressDisplay, dumps, make_console, print_tables, progress_enabled, validation_tables
    from .runtime import parse_providers
    from .validate import parse_tolerance, validate

    input_shapes, preprocess = _parse_data_args(args)
    tolerance = parse_tolerance(args.tolerance or [])
    providers = parse_providers(args.providers)
    _check_providers(providers, args.require_providers)
    reference = load_model(args.reference, what="reference model")
    candidate = load_model(args.candidate, what="candidate model")
    input_shapes = _data_shapes(args, input_shapes)  # validate never changes a model: both mean data sizes
    _check_input_shapes(reference, input_shapes)
    data = _load_calibration(args, reference, input_shapes, preprocess)
    if data is None:
        data = random_calibration(reference, seed=args.seed, input_shapes=input_shapes,
                                  num_samples=args.calib_limit or DEFAULT_RANDOM_SAMPLES)
    errors = make_console(stderr=True)
    with ProgressDisplay(progress_enabled(False), errors) as display:
        display.status("validating")
        vreport = validate(reference, candidate, data, providers=providers, tolerance=tolerance or None,
                           require_providers=args.require_providers, runs=args.runs, progress=display.track)
    if args.json:
        sys.stdout.write(dumps(vreport.as_dict()) + "\n")
    else:
        print_tables(make_console(), validation_tables(vreport))
        note = _random_data_note(data, args.seed)
        if note:
            _error_line(note)
    if tolerance and not vreport.passed:
        raise ValidationFailed("the candidate failed the tolerance: " + "; ".join(vreport.failures))
    return EXIT_OK


# ============================================================================ passes
def _type_name(hint) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def pass_info(cls) -> dict:
    """A registered pass described for listings: name, summary, kind, targets, options."""
    hints = typing.get_type_hints(cls.Options)
    options = []
    for f in dataclasses.fields(cls.Options):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        options.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": default})
    return {"name": cls.name, "summary": cls.summary, "lossless": bool(cls.lossless),
            "targets": list(cls.targets), "options": options}


def presets_info(target: str) -> dict[str, dict]:
    """Each preset's passes for ``target``, and the ones left out with the reason."""
    from .presets import PRESET_TARGETS, PRESETS, preset_passes, spec_name
    from .registry import all_passes

    registry = all_passes()
    out = {}
    asked = target
    for name, names in PRESETS.items():
        target = PRESET_TARGETS.get(name, asked)  # a preset made for one target is shown for it
        chosen = [p.name for p in preset_passes(name, target)]
        left_out = {}
        for n in map(spec_name, names):
            if n not in registry:
                left_out[n] = "not installed"
            elif target not in registry[n].targets:
                left_out[n] = f"not for target {target}"
        out[name] = {"passes": chosen, "left_out": left_out}
    return out


def cmd_passes(args) -> int:
    from .registry import all_passes
    from .report import dumps, make_console, passes_tables, print_tables

    passes = [pass_info(cls) for cls in all_passes().values()]
    presets = presets_info(args.target)
    if args.json:
        sys.stdout.write(dumps({"target": args.target, "passes": passes, "presets": presets}) + "\n")
    else:
        print_tables(make_console(), passes_tables(passes, presets, args.target))
    return EXIT_OK


COMMANDS = {"optimize": cmd_optimize, "inspect": cmd_inspect, "validate": cmd_validate, "passes": cmd_passes}
