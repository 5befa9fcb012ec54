"""Error metrics between a reference output and a candidate output."""

from __future__ import annotations

import math
import re

import numpy as np

# Metrics where larger is better; the others are errors (smaller is better).
HIGHER_IS_BETTER = {"cosine", "top1"}
METRICS = ("max_abs", "mean_abs", "rel_l2", "cosine", "top1")


def compare(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """max/mean abs error, relative L2 and cosine similarity of one output pair."""
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    if ref.shape != cand.shape:
        return {"max_abs": math.inf, "mean_abs": math.inf, "rel_l2": math.inf, "cosine": -1.0, "shape_mismatch": 1.0}
    if ref.dtype.kind not in "fc" or cand.dtype.kind not in "fc":
        equal = float(np.array_equal(ref, cand))
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64)) if ref.dtype.kind in "iub" else np.zeros(1)
        return {"max_abs": float(diff.max(initial=0.0)), "mean_abs": float(diff.mean()) if diff.size else 0.0,
                "rel_l2": 0.0 if equal else 1.0, "cosine": 1.0 if equal else 0.0}
    r = ref.astype(np.float64).ravel()
    c = cand.astype(np.float64).ravel()
    if r.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
    finite = np.isfinite(r) & np.isfinite(c)
    same_nonfinite = np.array_equal(np.isfinite(r), np.isfinite(c)) and np.array_equal(r[~finite], c[~finite])
    if not same_nonfinite:
        return {"max_abs": math.inf, "mean_abs": math.inf, "rel_l2": math.inf, "cosine": -1.0}
    r, c = r[finite], c[finite]
    d = r - c
    nr = np.linalg.norm(r)
    nc = np.linalg.norm(c)
    nd = np.linalg.norm(d)
    rel = float(nd / nr) if nr > 0 else float(nd > 0) * math.inf if nd > 0 else 0.0
    if nr == 0 and nc == 0:
        cos = 1.0
    elif nr == 0 or nc == 0:
        cos = 0.0
    else:
        cos = float(np.dot(r, c) / (nr * nc))
    return {"max_abs": float(np.abs(d).max(initial=0.0)), "mean_abs": float(np.abs(d).mean()) if d.size else 0.0,
            "rel_l2": rel, "cosine": cos}


# Output names that mark regression heads (boxes, landmarks, offsets), not class scores.
_REGRESSION_NAME = re.compile(r"box|bbox|reg|landmark|keypoint|offset|coord|loc(?!al)|delta", re.IGNORECASE)


def looks_like_class_scores(arr: np.ndarray, name: str = "") -> bool:
    """A float output shaped (batch, classes) or (classes,) with at least 2 classes.

    Shape alone cannot tell an MTCNN box head (N, 4) from scores, so outputs whose name
    says box/regression/landmark are not treated as class scores.
    """
    a = np.asarray(arr)
    if a.dtype.kind != "f" or (name and _REGRESSION_NAME.search(name)):
        return False
    shape = [d for d in a.shape]
    if len(shape) == 2 and shape[1] >= 2:
        return True
    if len(shape) == 4 and shape[2] == 1 and shape[3] == 1 and shape[1] >= 2:
        return True
    return len(shape) == 1 and shape[0] >= 2


def class_rows(scores: np.ndarray) -> np.ndarray:
    """Class-score output as (samples, classes) rows (``(N, C, 1, 1)`` and ``(C,)`` included)."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim == 1:
        return a[None, :]
    return a.reshape(a.shape[0], a.shape[1], -1)[:, :, 0] if a.ndim == 4 else a


def top1_matches(ref: np.ndarray, cand: np.ndarray) -> tuple[int, int]:
    """(matching, total) argmax over the class axis (axis 1, or 0 for a vector)."""
    r, c = class_rows(ref), class_rows(cand)
    return int((r.argmax(axis=1) == c.argmax(axis=1)).sum()), int(r.shape[0])


def margin_changes(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the reference's top-1 margin (best minus runner-up score) and how much the
    candidate changed that margin (negative: the runner-up gained on the winner)."""
    r, c = class_rows(ref), class_rows(cand)
    rows = np.arange(r.shape[0])
    order = np.argsort(r, axis=1)
    top, second = order[:, -1], order[:, -2]
    margin = r[rows, top] - r[rows, second]
    change = (c - r)[rows, top] - (c - r)[rows, second]
    return margin, change


def expected_top1(margins: np.ndarray, changes: np.ndarray) -> float:
    """Top-1 agreement to expect on inputs *not* in the sample, from the margins and margin changes
    seen on it.

    A handful of calibration samples can all keep their answer while a new input, whose margin
    happens to be smaller, flips. So every observed change is paired with every observed margin
    (all n² pairings, a bootstrap of "this error on that input"). An error has no preferred sign
    relative to a new input's runner-up, so a pairing flips with probability ½ when
    ``|change| > margin``. On a random-weight ResNet-50 in int8, 16 calibration photos gave an
    estimate of 95.7 % while 16 other photos showed 93.8 %; the plain count on the calibration
    photos said 100 %.
    """
    m = np.asarray(margins, dtype=np.float64)
    d = np.abs(np.asarray(changes, dtype=np.float64))
    if m.size == 0:
        return 1.0
    could_flip = d[:, None] > m[None, :]
    return float(1.0 - 0.5 * could_flip.mean())


def within(metric: str, value: float, bound: float) -> bool:
    if metric in HIGHER_IS_BETTER:
        return value >= bound
    return value <= bound


class OutputAccumulator:
    """Metrics of one output over many feeds.

    * ``max_abs``: largest absolute error anywhere;
    * ``mean_abs``: mean absolute error over all elements of all feeds;
    * ``rel_l2``: ||ref - cand|| / ||ref|| over all the data at once (one number
      for the data set, not dominated by a sample whose reference is near zero);
    * ``cosine``: the *smallest* cosine similarity over samples (rows along the
      batch axis when a feed holds several), so one bad sample shows;
    * ``top1``: fraction of samples whose argmax agrees, for class-score outputs.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.elements = 0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.cosine = 1.0
        self.top1_hits = 0
        self.top1_total = 0
        self.class_scores: bool | None = None
        self._margins: list[np.ndarray] = []  # top-1 margins of the reference, per class-score row
        self._margin_changes: list[np.ndarray] = []  # and how the candidate moved them
        self.exact_mismatch = False  # non-float outputs differ
        self.broken: str | None = None  # shape or non-finite mismatch; all metrics at their worst

    def add(self, ref: np.ndarray, cand: np.ndarray, batch: int = 1) -> None:
        ref = np.asarray(ref)
        cand = np.asarray(cand)
        if ref.shape != cand.shape:
            self.broken = self.broken or f"shape {tuple(cand.shape)} differs from the reference's {tuple(ref.shape)}"
            return
        is_scores = looks_like_class_scores(ref, self.name) and looks_like_class_scores(cand, self.name)
        self.class_scores = is_scores if self.class_scores is None else (self.class_scores and is_scores)
        if self.class_scores:
            hits, total = top1_matches(ref, cand)
            self.top1_hits += hits
            self.top1_total += total
            if ref.dtype.kind == "f" and np.isfinite(ref).all() and np.isfinite(cand).all():
                margin, change = margin_changes(ref, cand)
                self._margins.append(margin)
                self._margin_changes.append(change)
        if ref.dtype.kind not in "fc" or cand.dtype.kind not in "fc":
            # Indices, masks, counts: equal or not; errors in the numeric sense where they are numbers.
            if not np.array_equal(ref, cand):
                self.exact_mismatch = True
                self.cosine = 0.0
            if ref.dtype.kind in "iub" and cand.dtype.kind in "iub" and ref.size:
                d = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
                self.max_abs = max(self.max_abs, float(d.max()))
                self.abs_sum += float(d.sum())
            self.elements += ref.size
            return
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        finite_r, finite_c = np.isfinite(r), np.isfinite(c)
        if not (np.array_equal(finite_r, finite_c) and np.array_equal(r[~finite_r], c[~finite_c])):
            self.broken = self.broken or "non-finite values (inf/nan) differ from the reference's"
            return
        rows = r.shape[0] if batch > 1 and r.ndim >= 1 and r.shape[0] == batch else 1
        r = np.where(finite_r, r, 0.0).reshape(rows, -1)
        c = np.where(finite_c, c, 0.0).reshape(rows, -1)
        d = r - c
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        self.abs_sum += float(np.abs(d).sum())
        self.elements += d.size
        self.diff_sq += float((d * d).sum())
        self.ref_sq += float((r * r).sum())
        nr = np.linalg.norm(r, axis=1)
        nc = np.linalg.norm(c, axis=1)
        nd = np.linalg.norm(d, axis=1)
        dots = (r * c).sum(axis=1)
        for a, b, diff, dot in zip(nr, nc, nd, dots):
            if diff == 0:
                cos = 1.0  # identical rows; dot / (a * b) may round to 0.9999999999999999
            elif a == 0 or b == 0:
                cos = 0.0
            else:
                cos = float(dot / (a * b))
            self.cosine = min(self.cosine, cos)

    def expected_top1(self) -> float | None:
        """Top-1 agreement to expect beyond these samples (:func:`expected_top1`), never above the
        agreement observed; None when the output is not class scores."""
        if not (self.class_scores and self.top1_total) or self.broken:
            return None if not self.broken else 0.0
        observed = self.top1_hits / self.top1_total
        if not self._margins:
            return observed
        return min(observed, expected_top1(np.concatenate(self._margins), np.concatenate(self._margin_changes)))

    def result(self) -> dict[str, float]:
        if self.broken:
            out = {"max_abs": math.inf, "mean_abs": math.inf, "rel_l2": math.inf, "cosine": -1.0}
            if self.class_scores:
                out["top1"] = 0.0
            return out
        if self.exact_mismatch and self.ref_sq == 0 and self.diff_sq == 0:
            rel = 1.0
        elif self.ref_sq > 0:
            rel = math.sqrt(self.diff_sq) / math.sqrt(self.ref_sq)
        else:
            rel = 0.0 if self.diff_sq == 0 else math.inf
        out = {"max_abs": self.max_abs, "mean_abs": self.abs_sum / self.elements if self.elements else 0.0,
               "rel_l2": rel, "cosine": min(1.0, self.cosine)}
        if self.class_scores and self.top1_total:
            out["top1"] = self.top1_hits / self.top1_total
        return out
