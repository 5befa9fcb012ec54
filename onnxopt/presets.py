"""Named pass pipelines. A preset lists pass names in order; passes that are not
registered (a family not installed) or not valid for the target are left out."""

from __future__ import annotations

from .errors import UserInputError
from .pass_base import Pass
from .registry import all_passes, make_pass

# Order matters: cheap structural cleanups first, then folding, then fusions that
# the folded graph exposes, then CSE and dead-code removal. The lossless group is
# repeated to a fixed point by the PassManager.
PRESETS: dict[str, list[str]] = {
    "lossless": [
        "eliminate-identity",
        "fold-constants",
        "simplify-shapes",
        "fuse-consecutive",
        "fold-batchnorm",
        "fuse-conv-add",
        "fuse-matmul-add",
        "cse",
        "eliminate-dead",
    ],
    "cleanup": [
        "eliminate-identity",
        "fold-constants",
        "simplify-shapes",
        "fuse-consecutive",
        "cse",
        "eliminate-dead",
    ],
}


def preset_passes(name: str, target: str = "cpu") -> list[Pass]:
    if name not in PRESETS:
        raise UserInputError(f"unknown preset '{name}'.", f"use one of: {', '.join(PRESETS)}.")
    registry = all_passes()
    out = []
    for pass_name in PRESETS[name]:
        cls = registry.get(pass_name)
        if cls is None or target not in cls.targets:
            continue
        out.append(make_pass(cls))
    return out
