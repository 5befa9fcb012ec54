"""Error metrics between a reference output and a candidate output."""

from __future__ import annotations

import math

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


def looks_like_class_scores(arr: np.ndarray) -> bool:
    """A float output shaped (batch, classes) or (classes,) with at least 2 classes."""
    a = np.asarray(arr)
    if a.dtype.kind != "f":
        return False
    shape = [d for d in a.shape]
    if len(shape) == 2 and shape[1] >= 2:
        return True
    if len(shape) == 4 and shape[2] == 1 and shape[3] == 1 and shape[1] >= 2:
        return True
    return len(shape) == 1 and shape[0] >= 2


def top1_matches(ref: np.ndarray, cand: np.ndarray) -> tuple[int, int]:
    """(matching, total) argmax over the class axis (axis 1, or 0 for a vector)."""
    r = np.asarray(ref)
    c = np.asarray(cand)
    if r.ndim == 1:
        return int(r.argmax() == c.argmax()), 1
    r = r.reshape(r.shape[0], r.shape[1], -1)[:, :, 0] if r.ndim == 4 else r
    c = c.reshape(c.shape[0], c.shape[1], -1)[:, :, 0] if c.ndim == 4 else c
    return int((r.argmax(axis=1) == c.argmax(axis=1)).sum()), int(r.shape[0])


def within(metric: str, value: float, bound: float) -> bool:
    if metric in HIGHER_IS_BETTER:
        return value >= bound
    return value <= bound
