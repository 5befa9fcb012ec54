"""Named pass pipelines.

A preset lists pass specs (``name`` or ``name:key=value,...``) in order; passes that are
not registered (a family not installed) or not valid for the target are left out. A preset
may also fix the target (``trt`` is for TensorRT).
"""

from __future__ import annotations

from .errors import UserInputError
from .pass_base import Pass
from .registry import all_passes, parse_pass_spec

# Order matters: cheap structural cleanups first, then folding, then fusions that
# the folded graph exposes, then CSE and dead-code removal. The lossless group is
# repeated to a fixed point by the PassManager.
# The lossless pipeline. Order matters: cheap structural cleanups first, then folding,
# then the fusions the folded graph exposes (vertical before horizontal, runtime-specific
# contrib ops last), then CSE and dead-code removal. The PassManager repeats the whole
# lossless group to a fixed point.
_LOSSLESS = [
    "eliminate-identity",
    "fold-constants",
    "simplify-shapes",
    "fuse-consecutive",
    "fuse-transposes",
    "fold-batchnorm",
    "fuse-conv-add",
    "fuse-pad",
    "fuse-matmul-add",
    "fuse-horizontal",
    "cse",
    "eliminate-dead",
    # runs once after the fixed point: its com.microsoft FusedConv hides Convs from the
    # fusions above (only for target cpu: TensorRT cannot parse contrib ops)
    "fuse-conv-activation",
]

PRESETS: dict[str, list[str]] = {
    "lossless": _LOSSLESS,
    "cleanup": [
        "eliminate-identity",
        "fold-constants",
        "simplify-shapes",
        "fuse-consecutive",
        "cse",
        "eliminate-dead",
    ],
    # What a TensorRT user should hand to the builder: opset >= 13, standard ops only (no
    # com.microsoft contrib ops: the target filter drops them), constants folded up to 16 MiB
    # per result, and every intermediate shape declared.
    # int8 for the target's runtime: the lossless fusions first (BatchNorm folded into the convs
    # is what gets quantized), but not fuse-conv-activation: onnxruntime's QDQ fusion
    # (DQ→Conv→Q into QLinearConv) does not match a com.microsoft FusedConv.
    "int8": [n for n in _LOSSLESS if n != "fuse-conv-activation"] + ["qdq-int8"],
    "trt": ["upgrade-opset:min_opset=13"]
    + [("fold-constants:size_threshold=16777216" if n == "fold-constants" else n) for n in _LOSSLESS]
    + ["infer-shapes"],
}

# Presets that only make sense for one target.
PRESET_TARGETS: dict[str, str] = {"trt": "tensorrt"}


def spec_name(spec: str) -> str:
    return spec.partition(":")[0].strip()


def resolve_target(preset: str | None, target: str | None) -> str:
    """The target to use: the user's, else the preset's own, else cpu."""
    forced = PRESET_TARGETS.get(preset or "")
    if forced and target and target != forced:
        raise UserInputError(f"preset '{preset}' is for target {forced}, not {target}.",
                             f"drop --target or use --target {forced}.")
    return target or forced or "cpu"


def preset_passes(name: str, target: str | None = None) -> list[Pass]:
    if name not in PRESETS:
        raise UserInputError(f"unknown preset '{name}'.", f"use one of: {', '.join(PRESETS)}.")
    target = resolve_target(name, target)
    registry = all_passes()
    out = []
    for spec in PRESETS[name]:
        cls = registry.get(spec_name(spec))
        if cls is None or target not in cls.targets:
            continue
        out.append(parse_pass_spec(spec))
    return out
