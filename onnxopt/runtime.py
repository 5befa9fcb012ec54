"""onnxruntime sessions for models held in memory, and execution-provider selection."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import UserInputError

# Short names users type → onnxruntime provider names.
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass
class ProviderStatus:
    short: str
    name: str
    available: bool
    reason: str = ""


def parse_providers(text: str | list[str] | None) -> list[str]:
    if text is None:
        return ["cpu"]
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for it in items:
        it = it.strip().lower()
        if not it:
            continue
        if it not in PROVIDER_NAMES:
            raise UserInputError(f"unknown execution provider '{it}'.", f"use a comma-separated list of: {', '.join(PROVIDER_NAMES)}.")
        if it not in out:
            out.append(it)
    if not out:
        raise UserInputError("no execution provider given.", "use e.g. --providers cpu,cuda.")
    return out


def provider_status(short: str) -> ProviderStatus:
    """Whether a provider can run here, with the reason when it cannot."""
    import onnxruntime as ort

    name = PROVIDER_NAMES[short]
    available = ort.get_available_providers()
    if name not in available:
        pkg = {"cuda": "onnxruntime-gpu", "tensorrt": "onnxruntime-gpu with TensorRT libraries"}.get(short, "onnxruntime")
        return ProviderStatus(short, name, False, f"{name} is not in this onnxruntime build (install {pkg})")
    if short in ("cuda", "tensorrt"):
        # The GPU build lists CUDA even on machines without a GPU or driver; try a tiny session.
        try:
            _tiny_session(name)
        except Exception as exc:  # pragma: no cover - needs a GPU build
            return ProviderStatus(short, name, False, f"{name} is installed but cannot start: {str(exc).splitlines()[0]}")
    return ProviderStatus(short, name, True)


def _tiny_session(provider: str):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=[provider])
    if sess.get_providers()[0] != provider:
        raise RuntimeError("onnxruntime fell back to another provider")
    return sess


def make_session(model: onnx.ModelProto | str | os.PathLike, provider: str = "cpu", *,
                 optimization: str = "all", threads: int | None = None):
    """An InferenceSession for a model in memory or on disk.

    ``optimization`` is one of ``disable``, ``basic``, ``extended``, ``all`` (onnxruntime's levels).
    Models over 2 GB in memory are written to a temporary folder first.
    """
    import onnxruntime as ort

    from .io import PROTOBUF_LIMIT, tensor_payload_bytes

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers = [PROVIDER_NAMES.get(provider, provider)]
    if isinstance(model, onnx.ModelProto):
        if tensor_payload_bytes(model) > PROTOBUF_LIMIT:
            with tempfile.TemporaryDirectory() as tmp:
                p = os.path.join(tmp, "model.onnx")
                from .io import save_model

                save_model(model, p, external_data=True)  # never modifies ``model``
                return ort.InferenceSession(p, so, providers=providers)
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    return ort.InferenceSession(str(model), so, providers=providers)


def run_session(sess, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    feed = {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}}
    return dict(zip(names, sess.run(names, feed)))


def run_model(model, feeds, provider: str = "cpu", optimization: str = "all") -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` for every feed dict."""
    sess = make_session(model, provider, optimization=optimization)
    return [run_session(sess, f) for f in feeds]


def measure_latency(sessions: list, feed: dict[str, np.ndarray], *, warmup: int = 3, runs: int = 20) -> list[float]:
    """Median wall time in milliseconds of each session on ``feed``.

    The sessions run interleaved (see :func:`interleaved_run_times`) so that clock
    boosts, thermal throttling and other load affect all of them alike.
    """
    import statistics

    feeds = []
    for sess in sessions:
        names = {i.name for i in sess.get_inputs()}
        feeds.append({k: v for k, v in feed.items() if k in names})
    times = interleaved_run_times(sessions, feeds, warmup=warmup, runs=runs)
    return [statistics.median(t) * 1000.0 for t in times]


def interleaved_run_times(sessions: list, feeds: list[dict[str, np.ndarray]], *, warmup: int = 3,
                          runs: int = 20) -> list[list[float]]:
    """Wall time in seconds of each run of each session (``times[session][round]``).

    Every round runs each session once on its own feed (A, B, C, then B, C, A, ...): the
    start rotates so no session always runs first, and drift hits all sessions alike.
    """
    import time

    outputs = [[o.name for o in s.get_outputs()] for s in sessions]
    count = len(sessions)
    for _ in range(max(0, warmup)):
        for sess, f, out in zip(sessions, feeds, outputs):
            sess.run(out, f)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(max(1, runs)):
        for k in [(r + j) % count for j in range(count)]:
            start = time.perf_counter()
            sessions[k].run(outputs[k], feeds[k])
            times[k].append(time.perf_counter() - start)
    return times
