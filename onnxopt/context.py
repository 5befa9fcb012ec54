"""What every pass may use besides the graph: target, calibration data, seed, tolerance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import onnx

from .errors import UserInputError
from .pass_base import TARGETS

if TYPE_CHECKING:  # pragma: no cover
    from .calibration import CalibrationData

T = TypeVar("T")


@dataclass
class PassContext:
    target: str = "cpu"
    # Calibration data (feed dicts); None until needed: use ``calibration_data()``.
    calibration: "CalibrationData | None" = None
    seed: int = 0
    # Accuracy budget, e.g. {"cosine": 0.999} or {"rel_l2": 1e-3}.
    tolerance: dict[str, float] = field(default_factory=dict)
    # User-declared input shapes, e.g. {"input": (1, 3, 224, 224)}.
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # The model as loaded, for model-level metadata when a pass exports a graph.
    template: onnx.ModelProto | None = None
    # A callable(iterable, description, total) → iterable that shows progress; identity by default.
    progress_factory: Callable[..., Iterable] | None = None
    # Where passes log human-readable notes.
    log: Callable[[str], None] = field(default=lambda msg: None)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise UserInputError(f"unknown target '{self.target}'.", f"use one of: {', '.join(TARGETS)}.")

    def progress(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if self.progress_factory is None:
            return iter(items)
        return iter(self.progress_factory(items, description, total))

    def calibration_data(self) -> "CalibrationData":
        """The calibration data, generating seeded random data from the template when none was given."""
        if self.calibration is None:
            from .calibration import random_calibration

            if self.template is None:
                raise UserInputError("this pass needs calibration data.", "pass --calib PATH.")
            self.calibration = random_calibration(self.template, seed=self.seed, input_shapes=self.input_shapes)
        return self.calibration
