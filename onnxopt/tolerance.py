"""Is a lossy candidate within the user's accuracy budget? One answer for every lossy pass.

A lossy pass that searches (which layers stay float, which rank, which ratio) scores many
candidate models against the float model on the calibration feeds. :class:`ToleranceCheck`
runs the reference once, then scores each candidate as the *worst* output:

* ``cosine`` the lowest per sample, the error metrics the largest;
* ``top1`` the lower of the agreement observed and the agreement to expect on inputs that
  are not in the calibration set (:func:`onnxopt.metrics.expected_top1`). With 16 feeds the
  observed count can only say 100 % or ≤ 94 %; a budget of 99 % needs the estimate.

:func:`default_budget` turns a pass's ``accuracy`` option (metrics joined by ``+``, since
commas separate pass options) into a tolerance, for passes that check one by default.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx

from .metrics import HIGHER_IS_BETTER, OutputAccumulator, within
from .runtime import make_session, run_session

Feed = dict[str, np.ndarray]

# The value of each higher-is-better metric on a perfect candidate; error metrics are perfect at 0.
_PERFECT = {"cosine": 1.0, "top1": 1.0}


def default_budget(spec: str) -> dict[str, float]:
    """``"cosine=0.99+top1=0.99"`` → ``{"cosine": 0.99, "top1": 0.99}``; ``""``/``"none"`` → no check."""
    from .validate import parse_tolerance

    return {} if spec.strip().lower() in ("", "none") else parse_tolerance([spec.replace("+", ",")])


class ToleranceCheck:
    """Scores candidate models against ``reference`` on ``feeds`` (run once, on the CPU,
    onnxruntime's full optimizations, as users run the result)."""

    def __init__(self, reference: onnx.ModelProto, feeds: Sequence[Feed], tolerance: dict[str, float]):
        self.feeds = list(feeds)
        self.tolerance = dict(tolerance)
        session = make_session(reference, optimization="all")
        self.references = [run_session(session, feed) for feed in self.feeds]

    def evaluate(self, candidate: onnx.ModelProto, limit: int | None = None) -> dict[str, float]:
        """Worst metrics over the outputs, on the first ``limit`` feeds (all by default)."""
        session = make_session(candidate, optimization="all")
        accumulators: dict[str, OutputAccumulator] = {}
        for feed, reference in list(zip(self.feeds, self.references))[:limit]:
            out = run_session(session, feed)
            for name, value in reference.items():
                accumulators.setdefault(name, OutputAccumulator(name)).add(value, out[name])
        return worst_metrics(accumulators.values())

    def meets(self, metrics: dict[str, float]) -> bool:
        return all(within(m, metrics[m], bound) for m, bound in self.tolerance.items() if m in metrics)

    def badness(self, metrics: dict[str, float]) -> float:
        """How much of the budget a result uses: 1.0 at the bound, above 1 beyond it (for ranking)."""
        return badness(metrics, self.tolerance)


def worst_metrics(accumulators: Iterable[OutputAccumulator]) -> dict[str, float]:
    worst: dict[str, float] = {}
    for acc in accumulators:
        result = acc.result()
        expected = acc.expected_top1()
        if expected is not None:
            result["top1"] = expected
        for metric, value in result.items():
            pick = min if metric in HIGHER_IS_BETTER else max
            worst[metric] = pick(worst.get(metric, value), value)
    return worst


def badness(metrics: dict[str, float], tolerance: dict[str, float]) -> float:
    worst = 0.0
    for metric, bound in tolerance.items():
        if metric not in metrics:
            continue
        perfect = _PERFECT.get(metric, 0.0)
        allowed = abs(perfect - bound) or 1e-12
        worst = max(worst, abs(perfect - metrics[metric]) / allowed)
    return worst


def describe(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()) if k in ("cosine", "top1", "rel_l2"))
