"""Benchmark onnxopt's int8 quantization against onnxruntime's ``quantize_static``, in one run.

Both tools get the SAME calibration feeds, and they are judged on other photos. The
models are ResNet-50 and MobileNetV2 from models/zoo.py (random weights, fed scene photos)
and every image model of tools/realmodels.py, fed its own kind of real photos. The Silero
VAD models can be added with ``--models`` (they use the synthetic speech of tools/photos.py).

The variants (rows) of each model:

* ``float``: the original model, which is the reference for every column;
* ``lossless``: onnxopt's lossless preset, showing how much of the speed comes from fusions alone;
* ``quantize_static``: ``onnxruntime.quantization.quantize_static`` with QDQ format,
  ``per_channel=True``, QUInt8 activations, QInt8 weights and CalibrationMethod.MinMax, run
  after its recommended ``shape_inference.quant_pre_process``. If pre-processing fails, that is
  noted and the raw model is quantized, as a user would do;
* ``onnxopt``: preset ``int8`` (lossless cleanup and fusions, then ``qdq-int8``) with default options;
* ``onnxopt:minmax`` / ``:entropy`` / ``:percentile`` / ``:mse``: the preset's ``qdq-int8`` with that method;
* ``onnxopt:cos0.999``: default options plus the tolerance {"cosine": 0.999}, which turns on
  the automatic exclusion of sensitive layers.

The columns:

* ``speed``: float_time / variant_time under onnxruntime (ALL graph optimizations, 1 intra-op
  thread). N rounds run every variant of a model once, round-robin with the order rotated each
  round. The figure is the median over rounds of the per-round ratio, so a slow patch of the
  machine cancels out. Above 1 means faster than float;
* ``cosine``: the lowest, over eval feeds and outputs, of the cosine between the flattened
  outputs and the float model's;
* ``top-1``: the share of samples whose argmax matches float's (classifiers only: the ImageNet
  builders, the PP-OCR direction classifier, and MTCNN's face/non-face softmax);
* ``app``: fidelity in the answers the application gives. For the PP-OCR recogniser, the share
  of text lines whose CTC greedy decoding (the same index sequence) equals float's. For the
  PP-OCR direction classifier, the same direction. For the PP-OCR detector, the share of pages
  whose DB box count equals float's, with the lowest IoU of the binarised probability maps
  (threshold 0.3, as in PaddleOCR's DBPostProcess), lowest and mean over pages. For MTCNN, the face/non-face decision per
  candidate (per location for P-Net), with the IoU of the face sets. For the builders, top-1.
  For Silero, the speech decision (p > 0.5) per chunk;
* ``file MB``: the model file;
* ``quant s``: the wall time of the quantizing call(s). For quantize_static this includes its
  pre-processing; for onnxopt, the whole preset;
* ``peak MB``: the peak resident-memory increase during that call (VmHWM after clear_refs,
  as in tools/bench_lossless.py). Every tool runs in a fresh process.

Then comes one summary line per model: onnxopt's defaults against quantize_static (speed
ratio, agreement difference), and whether issue 7's goal holds on that model. The goal is to
be at least as fast as quantize_static (faster than float where quantize_static gives no valid
model), with app agreement at or above 99 % and never below quantize_static's.

    python -m tools.bench_qdq [--models a,b|images|silero] [--variants v1,v2] [--runs N]
                              [--quick] [--json FILE] [--timeout S]

A variant that fails is reported in its cell with the reason, and the benchmark goes on.
This covers a pass that is not registered, a crash, a timeout, and a result that onnxruntime
refuses to load or run ("invalid model: ...").
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/bench_qdq.py` as well as `-m tools.bench_qdq`
    sys.path.insert(0, str(REPO))

from tools.bench_lossless import (  # noqa: E402  (same timing and memory method as the lossless bench)
    _fmt,
    _interleaved_latencies,
    _outputs,
    _reset_peak_rss,
    _rss_kib,
    _session,
    paired_ratio,
    print_results,
)
from tools.realmodels import (  # noqa: E402
    REAL_MODELS, RealModel, RealModelUnavailable, real_model_path, unknown_models_error)

Feed = dict[str, np.ndarray]

BUILDER_MODELS = ("resnet50", "mobilenetv2")
IMAGE_MODELS = tuple(n for n, m in REAL_MODELS.items() if m.data == "image")
AUDIO_MODELS = tuple(n for n, m in REAL_MODELS.items() if m.data != "image")
DEFAULT_MODELS = BUILDER_MODELS + IMAGE_MODELS

QDQ_PASS = "qdq-int8"
# onnxopt variant → (the spec that replaces qdq-int8 in preset "int8", tolerance)
ONNXOPT_VARIANTS: dict[str, tuple[str, dict[str, float]]] = {
    "onnxopt": (QDQ_PASS, {}),
    "onnxopt:minmax": (f"{QDQ_PASS}:method=minmax", {}),
    "onnxopt:entropy": (f"{QDQ_PASS}:method=entropy", {}),
    "onnxopt:percentile": (f"{QDQ_PASS}:method=percentile", {}),
    "onnxopt:mse": (f"{QDQ_PASS}:method=mse", {}),
    "onnxopt:cos0.999": (QDQ_PASS, {"cosine": 0.999}),
}
QS = "quantize_static"
VARIANTS = ("lossless", QS, *ONNXOPT_VARIANTS)
GOAL_AGREEMENT = 0.99

CALIB_FEEDS = 32  # calibration feeds per model (--quick: 16)
QUICK_FEEDS = 16  # --quick: at most this many calibration and evaluation feeds


class VariantUnavailable(RuntimeError):
    """A variant that cannot run in this checkout (e.g. its pass is not registered yet)."""


# ============================================================ photos: views and the split
# Photo sets are small (11 scenes, 21 text lines, one document page), so each photo gives
# several *views*: crops, mirror images and exposure changes, as data augmentation does.
# The calibration photos and the evaluation photos are always different photos (or, for the
# single document page, disjoint halves of it). Views only multiply the samples within each side.

def _crop(img: np.ndarray, frac: float, where: str) -> np.ndarray:
    """The ``frac`` × ``frac`` crop at ``where``: c (centre) or tl/tr/bl/br (corners)."""
    h, w = img.shape[:2]
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    y = {"t": 0, "b": h - ch}.get(where[0], (h - ch) // 2)
    x = {"l": 0, "r": w - cw}.get(where[-1], (w - cw) // 2)
    return img[y:y + ch, x:x + cw]


def _gamma(img: np.ndarray, g: float) -> np.ndarray:
    """An exposure change: 255 * (x/255)^g (g > 1 darkens, g < 1 brightens)."""
    return np.clip(255.0 * (img / 255.0) ** g + 0.5, 0, 255).astype(np.uint8)


def _trim(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """A tighter text box: ``dy`` rows and ``dx`` columns off each side (text pieces carry 4 px of margin)."""
    h, w = img.shape[:2]
    dy, dx = min(dy, (h - 1) // 2), min(dx, (w - 1) // 2)
    return img[dy:h - dy, dx:w - dx]


VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda im: im,
    "flip": lambda im: im[:, ::-1],
    "rot180": lambda im: im[::-1, ::-1],
    "crop_c": lambda im: _crop(im, 0.85, "c"),
    "crop_tl": lambda im: _crop(im, 0.85, "tl"),
    "crop_tr": lambda im: _crop(im, 0.85, "tr"),
    "crop_bl": lambda im: _crop(im, 0.85, "bl"),
    "crop_br": lambda im: _crop(im, 0.85, "br"),
    "flip_crop_c": lambda im: _crop(im, 0.85, "c")[:, ::-1],
    "dark": lambda im: _gamma(im, 1.4),
    "light": lambda im: _gamma(im, 0.7),
    "trim_x": lambda im: _trim(im, 0, 3),
    "trim_y": lambda im: _trim(im, 2, 0),
}

# (calibration views, evaluation views) per photo kind
PHOTO_VIEWS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "scenes": (("id", "flip", "crop_tl", "crop_tr", "crop_bl", "crop_br", "crop_c", "flip_crop_c"),
               ("id", "flip", "crop_c")),
    "text": (("id", "trim_x", "trim_y", "dark", "light"), ("id", "dark")),
    "faces": (("id", "flip"), ("id",)),
}
# The direction classifier exists to catch lines that are upside down, so half of its
# samples are (its two classes are 0 and 180 degrees).
MODEL_VIEWS = {"ppocr4_cls": (("id", "rot180", "trim_x", "trim_y", "dark", "light"), ("id", "rot180"))}


def split_photos(photos: list) -> tuple[list, list]:
    """(calibration, evaluation): every third photo calibrates, the other two thirds evaluate."""
    return photos[::3], [p for i, p in enumerate(photos) if i % 3]


def evenly(items: list, n: int | None) -> list:
    """At most ``n`` items, spread evenly over the list (every photo keeps a chance to appear)."""
    if n is None or len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _with_views(photos: list[np.ndarray], views: tuple[str, ...]) -> list[np.ndarray]:
    """Every view of every photo, view-major: first every photo as is, then every photo
    flipped, and so on (so ``evenly`` picks a mix of photos and views)."""
    return [np.ascontiguousarray(VIEWS[v](p)) for v in views for p in photos]


def _non_faces() -> list[np.ndarray]:
    """The 100 non-face crops of ``skimage.data.lfw_subset()`` (its second half).

    MTCNN's R-Net and O-Net see candidate windows that are mostly *not* faces, and deciding
    face or not is their job. A set of faces only would not test that.
    """
    import skimage.data

    from tools.photos import _rgb

    return [_rgb(f) for f in skimage.data.lfw_subset()[100:]]


def _document_windows(region: np.ndarray) -> list[np.ndarray]:
    """Windows of one page region with the detector input's 1:2 aspect ratio (no distortion
    when resized to 192x384), at three scales and at offsets spread over the width."""
    h, w = region.shape[:2]
    windows = []
    for scale in (1.0, 0.85, 0.7):
        wh = max(8, int(h * scale))
        ww = min(w, 2 * wh)
        for x in np.linspace(0, w - ww, 5 if scale < 1 else 6).round().astype(int):
            y = (h - wh) // 2
            windows.append(region[y:y + wh, x:x + ww])
    return windows


# ============================================================ application-level fidelity
@dataclass
class AppResult:
    value: float  # a share in [0, 1]: how often the application's answer is unchanged
    text: str  # how the table shows it


class Fidelity:
    """How the application reads a model's outputs. ``measure`` compares float with a variant."""

    output: str
    classifier = False  # the top-1 column applies

    def measure(self, reference: list[Feed], candidate: list[Feed]) -> AppResult:
        raise NotImplementedError


@dataclass
class ArgmaxDecision(Fidelity):
    """A softmax or logits classifier, argmax over the last axis per sample (or per location).

    With ``positive`` (e.g. MTCNN's face class 1) the text adds the IoU of the sets of samples
    that float and the variant put in that class. That is where a detector loses or gains
    faces, which the plain agreement over mostly-background locations can hide.
    """

    output: str
    label: str = "top-1"
    positive: int | None = None
    classifier = True

    def measure(self, reference, candidate):
        same = total = both = either = 0
        for ref, cand in zip(reference, candidate):
            r = ref[self.output].argmax(axis=-1).ravel()
            c = cand[self.output].argmax(axis=-1).ravel()
            same += int((r == c).sum())
            total += r.size
            if self.positive is not None:
                both += int(((r == self.positive) & (c == self.positive)).sum())
                either += int(((r == self.positive) | (c == self.positive)).sum())
        share = same / max(total, 1)
        text = f"{self.label} {100 * share:.1f}%"
        if self.positive is not None:
            text += f" IoU {both / either:.2f}" if either else " (no positives)"
        return AppResult(share, text)


def ctc_greedy(probs: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """CTC greedy decoding of (batch, time, classes) scores: argmax per step, repeats
    collapsed, blanks dropped (Graves et al. 2006; PaddleOCR's CTCLabelDecode, blank = 0)."""
    best = np.asarray(probs).argmax(axis=-1)
    out = []
    for row in best.reshape(-1, best.shape[-1]):
        keep = np.ones(row.size, bool)
        keep[1:] = row[1:] != row[:-1]
        out.append(tuple(int(i) for i in row[keep & (row != blank)]))
    return out


@dataclass
class CtcSequence(Fidelity):
    """A CTC text recogniser: is the decoded index sequence of each line the same?"""

    output: str

    def measure(self, reference, candidate):
        same = total = 0
        for ref, cand in zip(reference, candidate):
            for a, b in zip(ctc_greedy(ref[self.output]), ctc_greedy(cand[self.output])):
                same += a == b
                total += 1
        share = same / max(total, 1)
        return AppResult(share, f"text {100 * share:.1f}%")


def db_boxes(prob: np.ndarray, threshold: float = 0.3, box_threshold: float = 0.6, min_size: int = 3) -> int:
    """How many text boxes PaddleOCR's DBPostProcess finds in one probability map (H, W).

    The bitmap is prob > ``threshold``. Each 8-connected region is a candidate, dropped when
    its short side is under ``min_size`` or its mean probability is under ``box_threshold``
    (PaddleOCR's defaults: thresh 0.3, box_thresh 0.6, min_size 3). PaddleOCR fits a rotated
    rectangle to each contour with cv2 and scores the probability inside it. Here the
    region's bounding box and its own pixels stand in, which gives the same count for the
    axis-aligned text lines of a page.
    """
    from scipy import ndimage

    labels, count = ndimage.label(prob > threshold, structure=np.ones((3, 3), bool))
    if count == 0:
        return 0
    boxes = 0
    means = ndimage.mean(prob, labels, index=np.arange(1, count + 1))
    for slices, score in zip(ndimage.find_objects(labels), means):
        short_side = min(s.stop - s.start for s in slices)
        if short_side >= min_size and score >= box_threshold:
            boxes += 1
    return boxes


@dataclass
class DbDetection(Fidelity):
    """A DB text detector (probability map N x 1 x H x W): the share of pages with the same box
    count, and the IoU of the binarised maps (lowest and mean over pages)."""

    output: str
    threshold: float = 0.3

    def measure(self, reference, candidate):
        same = total = 0
        ious = []
        for ref, cand in zip(reference, candidate):
            for r, c in zip(ref[self.output].reshape(-1, *ref[self.output].shape[-2:]),
                            cand[self.output].reshape(-1, *cand[self.output].shape[-2:])):
                rb, cb = r > self.threshold, c > self.threshold
                union = int((rb | cb).sum())
                ious.append(int((rb & cb).sum()) / union if union else 1.0)
                same += db_boxes(r, self.threshold) == db_boxes(c, self.threshold)
                total += 1
        share = same / max(total, 1)
        return AppResult(share, f"boxes {100 * share:.0f}% IoU {min(ious):.2f} (avg {np.mean(ious):.2f})")


@dataclass
class SpeechDecision(Fidelity):
    """A voice-activity detector: speech (p > 0.5) or not, per chunk (Silero's default threshold)."""

    output: str
    threshold: float = 0.5

    def measure(self, reference, candidate):
        same = total = 0
        for ref, cand in zip(reference, candidate):
            r = np.asarray(ref[self.output]).ravel() > self.threshold
            c = np.asarray(cand[self.output]).ravel() > self.threshold
            same += int((r == c).sum())
            total += r.size
        share = same / max(total, 1)
        return AppResult(share, f"speech {100 * share:.1f}%")


def fidelity_of(name: str, model: onnx.ModelProto | None = None) -> Fidelity:
    """The application-level check of a model: real models by name, builders by their output."""
    if name == "ppocr5_rec":
        return CtcSequence("fetch_name_0")
    if name == "ppocr5_det":
        return DbDetection("fetch_name_0")
    if name == "ppocr4_cls":
        return ArgmaxDecision("softmax_0.tmp_0", label="direction")
    if name in ("mtcnn_p", "mtcnn_r", "mtcnn_o"):
        return ArgmaxDecision(REAL_MODELS[name].outputs[-1], label="face", positive=1)
    if name in REAL_MODELS and REAL_MODELS[name].data != "image":
        return SpeechDecision(REAL_MODELS[name].outputs[0])
    if model is None:
        raise ValueError(f"no fidelity check known for '{name}'")
    return ArgmaxDecision(model.graph.output[0].name)


# ============================================================ models and their data
@dataclass
class Case:
    """One model to benchmark: its float file, calibration and evaluation feeds, and its app check."""

    name: str
    path: Path
    calibration: list[Feed]
    evaluation: list[Feed]
    data: str  # one line for the header: what the feeds are
    fidelity: Fidelity


@dataclass(frozen=True)
class ImageInput:
    """How a photo becomes one sample of a model's image input (see tools.photos.image_tensor)."""

    name: str
    batch: int
    height: int
    width: int
    normalize: str
    layout: str = "NCHW"
    channel_order: str = "RGB"
    keep_ratio: bool = False  # PP-OCR rec/cls: one text line, padded on the right

    def feeds(self, photos: list[np.ndarray]) -> list[Feed]:
        from tools.photos import image_tensor

        samples = [image_tensor(p, self.height, self.width, normalization=self.normalize, layout=self.layout,
                                channel_order=self.channel_order, keep_ratio=self.keep_ratio) for p in photos]
        return [{self.name: np.stack(samples[i:i + self.batch]).astype(np.float32)}
                for i in range(0, len(samples) - self.batch + 1, self.batch)]


def _real_input(spec: RealModel) -> ImageInput:
    inp = spec.inputs[0]
    return ImageInput(inp.name, inp.shape[0], spec.size[0], spec.size[1], spec.normalize, spec.layout,
                      spec.channel_order, keep_ratio=spec.photos == "text" and spec.size[0] == 48)


def _builder_input(model: onnx.ModelProto) -> ImageInput:
    """NCHW, RGB, ImageNet-normalised, as tools.photos.builder_feeds (224 where H/W are dynamic)."""
    init_names = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in init_names)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    return ImageInput(inp.name, dims[0] or 1, dims[2] or 224, dims[3] or 224, "imagenet")


def _photo_split(kind: str, views: tuple[tuple[str, ...], tuple[str, ...]], calib_samples: int,
                 eval_samples: int | None) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Calibration and evaluation photos (views included) of one kind, and the header line."""
    from tools.photos import document_photos, face_photos, scene_photos, text_photos

    if kind == "documents":
        # One photographed page: calibrate on its top half, evaluate on its bottom half.
        pages = dict(document_photos())
        calib_views = ("id", "dark")
        eval_views = ("id", "rot180")  # pages upside down are part of a text detector's life
        calib = _with_views(_document_windows(pages["page_top"]), calib_views)
        evaluation = _with_views(_document_windows(pages["page_bottom"]), eval_views)
        calib, evaluation = evenly(calib, calib_samples), evenly(evaluation, eval_samples)
        return calib, evaluation, (f"{len(calib)} windows of the page's top half ({'+'.join(calib_views)}) | "
                                   f"{len(evaluation)} of its bottom half ({'+'.join(eval_views)})")
    if kind == "faces":
        faces_c, faces_e = split_photos([p for _, p in face_photos()])
        other_c, other_e = split_photos(_non_faces())
        # Faces and non-faces alternate, so every batch of candidates holds both.
        mix = lambda a, b: [x for pair in zip(a, b) for x in pair] + a[len(b):] + b[len(a):]  # noqa: E731
        calib = evenly(_with_views(mix(faces_c, other_c), views[0]), calib_samples)
        evaluation = evenly(_with_views(mix(faces_e, other_e), views[1]), eval_samples)
        return calib, evaluation, (
            f"{len(calib)} candidates from {len(faces_c)} faces + {len(other_c)} non-faces ({'+'.join(views[0])}) | "
            f"{len(evaluation)} from {len(faces_e)} other faces + {len(other_e)} other non-faces ({'+'.join(views[1])})")
    photos = [p for _, p in {"scenes": scene_photos, "text": text_photos}[kind]()]
    calib_photos, eval_photos = split_photos(photos)
    calib = evenly(_with_views(calib_photos, views[0]), calib_samples)
    evaluation = evenly(_with_views(eval_photos, views[1]), eval_samples)
    noun = {"scenes": "scene photos", "text": "text lines"}[kind]
    return calib, evaluation, (f"{len(calib)} samples of {len(calib_photos)} {noun} ({'+'.join(views[0])}) | "
                               f"{len(evaluation)} of {len(eval_photos)} other {noun} ({'+'.join(views[1])})")


def _image_case(name: str, path: Path, image_input: ImageInput, kind: str, views, fidelity: Fidelity,
                quick: bool) -> Case:
    calib_feeds = QUICK_FEEDS if quick else CALIB_FEEDS
    eval_feeds = QUICK_FEEDS if quick else None
    b = image_input.batch
    calib, evaluation, text = _photo_split(kind, views, calib_feeds * b, None if eval_feeds is None else eval_feeds * b)
    cal, ev = image_input.feeds(calib), image_input.feeds(evaluation)
    return Case(name, path, cal, ev, f"calibration {len(cal)} feeds, evaluation {len(ev)} feeds (batch {b}): {text}",
                fidelity)


def _audio_case(name: str, path: Path, quick: bool) -> Case:
    """Silero: consecutive chunks of the synthetic speech signal, state carried by the float
    model. The first chunks calibrate, and the later ones evaluate. The 3 s signal holds 93
    chunks, so the two sets never overlap."""
    from tools.photos import audio_feeds

    spec = REAL_MODELS[name]
    per_feed = spec.inputs[0].shape[0] if spec.data == "audio_sequence" else 1
    n_cal = max(1, (16 if quick else 32) // per_feed)
    n_eval = max(1, (16 if quick else 32) // per_feed)
    while (n_cal + n_eval) * per_feed > 93:
        n_eval -= 1
        n_cal = max(1, n_cal - 1)
    feeds = audio_feeds(spec, n_cal + n_eval, model=path)
    return Case(name, path, feeds[:n_cal], feeds[n_cal:],
                f"calibration {n_cal} feeds, evaluation {n_eval} feeds: consecutive {per_feed}-chunk blocks of "
                f"synthetic speech (first {n_cal * per_feed} chunks | next {n_eval * per_feed})",
                fidelity_of(name))


def make_case(name: str, folder: Path, quick: bool = False, **builder_options) -> Case:
    """The Case of a real model (by name) or of a models/zoo.py builder (saved into ``folder``)."""
    if name in REAL_MODELS:
        spec = REAL_MODELS[name]
        path = real_model_path(name)
        if spec.data != "image":
            return _audio_case(name, path, quick)
        views = MODEL_VIEWS.get(name, PHOTO_VIEWS.get(spec.photos, ((), ())))
        return _image_case(name, path, _real_input(spec), spec.photos, views, fidelity_of(name), quick)
    from models.zoo import build

    model = build(name, **builder_options)
    path = folder / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return _image_case(name, path, _builder_input(model), "scenes", PHOTO_VIEWS["scenes"], fidelity_of(name, model),
                       quick)


# ============================================================ the quantizers (in worker processes)
class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol (``get_next`` returns a feed, then None)."""

    def __init__(self, feeds: list[Feed]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def _describe(exc: BaseException, limit: int = 160) -> str:
    """'Type: first line of the message' (just 'Type' for a bare assert)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__


def _quantize_static(src: str, dst: str, calibration: list[Feed], notes: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    CalibrationDataReader.register(_FeedReader)
    pre = str(Path(dst).with_suffix(".pre.onnx"))
    model_in = src
    try:
        quant_pre_process(src, pre)
        model_in = pre
    except Exception as exc:  # the documented advice is to go on with the raw model
        notes.append(f"pre-process failed ({_describe(exc, 120)}); raw model quantized")
    quantize_static(model_in, dst, _FeedReader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def _onnxopt(src: str, dst: str, calibration: list[Feed], specs: list[str] | None, tolerance: dict) -> None:
    import onnxopt
    from onnxopt.calibration import CalibrationData
    from onnxopt.context import PassContext
    from onnxopt.io import save_model

    model = onnx.load(src)
    if specs is None:  # the lossless preset
        result = onnxopt.optimize(model, preset="lossless", target="cpu")
    else:
        ctx = PassContext(target="cpu", calibration=CalibrationData.from_feeds(calibration, source="bench calibration"),
                          tolerance=dict(tolerance), template=model)
        result = onnxopt.optimize(model, passes=specs, target="cpu", ctx=ctx)
    save_model(result.model, dst)


def worker(job: dict) -> dict:
    """Run one quantizer on one model in this (fresh) process: seconds, peak memory, notes."""
    with open(job["calibration"], "rb") as f:
        calibration = pickle.load(f)
    if job["tool"] == QS:
        import onnxruntime.quantization  # noqa: F401  (imports are not timed)
    else:
        import onnxopt.passes  # noqa: F401
    notes: list[str] = []
    baseline_kib = _rss_kib("VmRSS")
    exact_peak = _reset_peak_rss()
    if not exact_peak:
        import resource

        baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        if job["tool"] == QS:
            _quantize_static(job["src"], job["dst"], calibration, notes)
        else:
            _onnxopt(job["src"], job["dst"], calibration, job.get("specs"), job.get("tolerance") or {})
    except Exception as exc:  # a tool failing is a result, not a crash
        return {"error": _describe(exc), "notes": notes}
    seconds = time.perf_counter() - t0
    peak_kib = _rss_kib("VmHWM")
    return {"seconds": seconds, "peak_mb": max(0, peak_kib - baseline_kib) / 1024.0, "notes": notes}


def run_job(job: dict, folder: Path, timeout: float) -> dict:
    """``worker`` in a fresh Python process: a crash, a hang or a memory blow-up of one tool
    cannot take the benchmark down, and the tools' imports and caches stay apart. The worker
    runs in ``folder`` with TMPDIR pointing there: quant_pre_process leaves
    ``sym_shape_infer_temp.onnx`` and ``<uuid>.data`` files in the working directory when
    its symbolic shape inference fails, and quantize_static writes its augmented model to TMPDIR."""
    job_path = folder / f"job.{os.getpid()}.{time.monotonic_ns()}.json"
    job_path.write_text(json.dumps(job))
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(folder), PYTHONPATH=python_path)
    cmd = [sys.executable, "-m", "tools.bench_qdq", "--worker", str(job_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=folder, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        job_path.unlink(missing_ok=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"error": f"worker exit {proc.returncode}: {err[-1][:160] if err else 'no output'}"}
    return json.loads(lines[-1])


def int8_specs(qdq_spec: str) -> list[str]:
    """Preset ``int8`` with its qdq-int8 spec replaced by ``qdq_spec``. As with presets,
    passes that are not registered or not meant for target cpu are left out, except
    qdq-int8 itself: VariantUnavailable("qdq-int8 not registered") until it lands."""
    from onnxopt.presets import PRESETS, spec_name
    from onnxopt.registry import all_passes

    registry = all_passes()
    if QDQ_PASS not in registry:
        raise VariantUnavailable(f"{QDQ_PASS} not registered")
    base = PRESETS.get("int8") or [*PRESETS["lossless"], QDQ_PASS]
    specs = []
    for spec in base:
        name = spec_name(spec)
        if name == QDQ_PASS:
            specs.append(qdq_spec)
        elif name in registry and "cpu" in registry[name].targets:
            specs.append(spec)
    if QDQ_PASS not in {spec_name(s) for s in specs}:
        specs.append(qdq_spec)
    return specs


def job_for(variant: str, src: Path, dst: Path, calibration: Path) -> dict:
    job = {"src": str(src), "dst": str(dst), "calibration": str(calibration)}
    if variant == QS:
        return {**job, "tool": QS}
    if variant == "lossless":
        return {**job, "tool": "onnxopt", "specs": None}
    if variant in ONNXOPT_VARIANTS:
        qdq_spec, tolerance = ONNXOPT_VARIANTS[variant]
        return {**job, "tool": "onnxopt", "specs": int8_specs(qdq_spec), "tolerance": tolerance}
    raise ValueError(f"unknown variant '{variant}'")


# ============================================================ measuring
@dataclass
class Row:
    model: str
    variant: str
    speed: float | None = None  # float time / variant time (> 1: faster than float)
    ms: float | None = None  # median latency
    cosine: float | None = None
    top1: float | None = None
    app: float | None = None
    app_text: str = ""
    file_mb: float | None = None
    quant_s: float | None = None
    peak_mb: float | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


def worst_cosine(reference: list[Feed], candidate: list[Feed]) -> float:
    """The lowest cosine, over feeds and outputs, between flattened float and variant outputs."""
    from onnxopt.metrics import compare

    worst = 1.0
    for ref, cand in zip(reference, candidate):
        for name, r in ref.items():
            worst = min(worst, compare(r, cand[name])["cosine"] if name in cand else -1.0)
    return worst


def _model_error(exc: BaseException, folder: Path) -> str:
    """'invalid model: <first line>', without onnxruntime's boilerplate ("[ONNXRuntimeError] :
    10 : INVALID_GRAPH : Load model from PATH failed:This is an invalid model.")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ", r"\1: ", text)
    text = re.sub(r"Load model from \S+ failed: ?", "", text).replace("This is an invalid model. ", "")
    # 'In Node, ("n", Op, "", -1) : (inputs) -> (outputs) , Error X' → 'node n (Op): X'
    text = re.sub(r'In Node, \("([^"]*)", (\w+), "[^"]*", -?\d+\) : \(.*?\) -> \(.*?\) , Error ', r"node \1 (\2): ", text)
    return "invalid model: " + text.replace(str(folder) + os.sep, "")[:200]


def score_fidelity(row, case: Case, reference: list, outputs: list) -> None:
    """Fill ``row``'s cosine, app (the application's answer unchanged) and, for classifiers, top1,
    comparing ``outputs`` with float's ``reference``; an error in the row if they differ in kind."""
    row.cosine = worst_cosine(reference, outputs)
    try:
        app = case.fidelity.measure(reference, outputs)
    except Exception as exc:  # e.g. an output missing or reshaped in the variant
        row.error = f"outputs differ in kind from float's: {_first_line(exc, 120)}"
        return
    row.app, row.app_text = app.value, app.text
    if case.fidelity.classifier:
        row.top1 = app.value


def bench_case(case: Case, variants: list[str], runs: int, folder: Path, timeout: float, log) -> list[Row]:
    """Quantize ``case`` with every variant, then measure each against the float model."""
    from onnxopt.io import file_size

    calibration = folder / f"{case.name}.calibration.pkl"
    with open(calibration, "wb") as f:
        pickle.dump(case.calibration, f)
    rows = {"float": Row(case.name, "float", file_mb=file_size(case.path) / 1e6)}
    paths = {"float": case.path}
    for variant in variants:
        row = rows[variant] = Row(case.name, variant)
        dst = folder / f"{case.name}.{variant.replace(':', '_')}.onnx"
        try:
            job = job_for(variant, case.path, dst, calibration)
        except VariantUnavailable as exc:
            row.error = str(exc)
            continue
        log(f"  {case.name}: {variant} ...")
        result = run_job(job, folder, timeout)
        row.notes += result.get("notes", [])
        if "error" in result:
            row.error = result["error"]
            continue
        row.quant_s, row.peak_mb = result["seconds"], result["peak_mb"]
        row.file_mb = file_size(dst) / 1e6
        paths[variant] = dst

    log(f"  {case.name}: outputs on {len(case.evaluation)} evaluation feeds ...")
    sessions, outputs = {}, {}
    for variant, path in paths.items():
        try:
            sessions[variant] = _session(path, "all")
            outputs[variant] = _outputs(sessions[variant], case.evaluation)
        except Exception as exc:
            if variant == "float":
                raise
            sessions.pop(variant, None)
            rows[variant].error = _model_error(exc, folder)
    for variant, outs in outputs.items():
        score_fidelity(rows[variant], case, outputs["float"], outs)

    log(f"  {case.name}: latency, {runs} interleaved rounds x {len(sessions)} variants ...")
    times = _interleaved_latencies(sessions, case.evaluation[0], runs)
    for variant, variant_times in times.items():
        rows[variant].speed = paired_ratio(times["float"], variant_times)
        rows[variant].ms = statistics.median(variant_times) * 1e3
    return list(rows.values())


# ============================================================ reporting
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_rows(rows: list, variant_width: int, head: str, cells) -> str:
    """The benches' table: model and variant columns, then ``head`` and ``cells(row)`` for the
    measured columns; a blank line between models, FAILED rows, the error in brackets and the
    rows' notes below them."""
    w = max([12] + [len(r.model) for r in rows])  # model column
    header = f"{'model':{w}s} {'variant':{variant_width}s} {head}"
    lines = [header, "-" * len(header)]
    last_model = None
    for r in rows:
        if last_model is not None and r.model != last_model:
            lines.append("")
        last_model = r.model
        if r.error and r.speed is None and r.cosine is None:
            line = f"{r.model:{w}s} {r.variant:{variant_width}s} FAILED: {r.error}"
        else:
            line = f"{r.model:{w}s} {r.variant:{variant_width}s} {cells(r)}"
            if r.error:
                line += f"  ({r.error})"
        lines.append(line)
        lines += [f"{'':{w + variant_width + 2}s}note: {n}" for n in r.notes]
    return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    head = (f"{'speed':>6s} {'ms':>8s} {'cosine':>7s} {'top-1':>6s}  {'app':30s} "
            f"{'file MB':>8s} {'quant s':>8s} {'peak MB':>8s}")
    return format_rows(rows, 19, head, lambda r: (
        f"{_fmt(r.speed, '6.2f')} {_fmt(r.ms, '8.2f')} {_fmt(r.cosine, '7.4f')} {_pct(r.top1):>6s}  "
        f"{(r.app_text or '-')[:30]:30s} {_fmt(r.file_mb, '8.2f')} {_fmt(r.quant_s, '8.1f')} "
        f"{_fmt(r.peak_mb, '8.0f')}"))


def goal_check(rows: list[Row]) -> tuple[bool | None, str]:
    """Issue 7's goal on one model for onnxopt's defaults: (holds, one line of explanation);
    holds is None when onnxopt did not run (nothing to judge)."""
    by = {r.variant: r for r in rows}
    ours, qs = by.get("onnxopt"), by.get(QS)
    if ours is None:
        return None, "onnxopt not run"
    if ours.speed is None or ours.app is None:
        return None, f"onnxopt failed: {ours.error or 'no result'}"
    qs_ok = qs is not None and qs.speed is not None and qs.app is not None and not qs.error
    parts, failures = [], []
    if qs_ok:
        parts.append(f"speed onnxopt/qs = {ours.speed / qs.speed:.2f}")
        parts.append(f"agreement {100 * (ours.app - qs.app):+.1f} pp (onnxopt {_pct(ours.app)}, qs {_pct(qs.app)})")
        if ours.speed < qs.speed:
            failures.append("slower than quantize_static")
        if ours.app < qs.app:
            failures.append("agreement below quantize_static's")
    else:
        why = "not run" if qs is None else (qs.error or "no result")
        why = "invalid model" if why.startswith("invalid model") else why[:60]
        parts.append(f"quantize_static: {why}; onnxopt speed {ours.speed:.2f}x float, agreement {_pct(ours.app)}")
        if ours.speed <= 1.0:  # the issue: "the model stays valid, it runs faster"
            failures.append("not faster than float")
    if ours.app < GOAL_AGREEMENT:
        failures.append(f"agreement below {100 * GOAL_AGREEMENT:.0f}%")
    verdict = "goal HOLDS" if not failures else "goal NOT MET (" + "; ".join(failures) + ")"
    reference = by.get("float")
    if reference is not None and reference.file_mb and ours.file_mb and ours.file_mb > 0.9 * reference.file_mb:
        verdict += f" [file {ours.file_mb:.2f} of {reference.file_mb:.2f} MB: little was quantized]"
    return not failures, ", ".join(parts) + f": {verdict}"


def format_summary(rows: list[Row]) -> str:
    lines = ["onnxopt (preset int8, qdq-int8 defaults) vs quantize_static; goal: speed >= qs's (> float where qs "
             f"has no valid model), app agreement >= {100 * GOAL_AGREEMENT:.0f}% and >= qs's:"]
    verdicts = []
    w = max([12] + [len(r.model) for r in rows])
    for model in dict.fromkeys(r.model for r in rows):
        holds, text = goal_check([r for r in rows if r.model == model])
        verdicts.append(holds)
        lines.append(f"  {model:{w}s} {text}")
    judged = [v for v in verdicts if v is not None]
    if judged:
        lines.append(f"  goal holds on {sum(judged)} of {len(judged)} models")
    return "\n".join(lines)


# ============================================================ command line
def _parse_list(text: str | None, default: tuple[str, ...], aliases: dict[str, tuple[str, ...]]) -> list[str]:
    if not text:
        return list(default)
    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        for name in aliases.get(item, (item,)):
            if name and name not in out:
                out.append(name)
    return out


def run_cases(names: list[str], quick: bool, prefix: str, log, bench_one, error_row) -> tuple[list, list[str]]:
    """For each model: its Case (in a temp folder emptied between models), then
    ``bench_one(case, folder) -> rows``; a model that cannot be had or fails becomes
    ``error_row(name, text)``. Returns the rows and one data line per model."""
    rows: list = []
    data_lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = Path(tmp)
        for name in names:
            log(f"{name}:")
            try:
                case = make_case(name, folder, quick=quick)
                data_lines.append(f"  {name:{max(12, *map(len, names))}s} {case.data}")
                rows += bench_one(case, folder)
            except RealModelUnavailable as exc:
                rows.append(error_row(name, f"model unavailable: {exc}"))
            except Exception as exc:
                traceback.print_exc()
                rows.append(error_row(name, _describe(exc)))
            for f in folder.iterdir():  # keep the temp folder small between models
                if f.is_file():
                    f.unlink()
    return rows, data_lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        try:
            print(json.dumps(worker(json.loads(Path(argv[1]).read_text()))))
        except Exception as exc:
            traceback.print_exc()
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:200]}))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tools.bench_qdq", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated; 'images' = the default ({','.join(DEFAULT_MODELS)}), "
                                         f"'silero' = {','.join(AUDIO_MODELS)}; any models/zoo.py builder works too")
    parser.add_argument("--variants", help=f"comma-separated rows to run besides float (default all: {','.join(VARIANTS)}); "
                                           "'onnxopt:*' = every onnxopt variant")
    parser.add_argument("--runs", type=int, default=None, help="interleaved latency rounds (default 30, --quick 10)")
    parser.add_argument("--quick", action="store_true",
                        help=f"10 rounds, at most {QUICK_FEEDS} calibration and {QUICK_FEEDS} evaluation feeds")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one quantizer on one model")
    args = parser.parse_args(argv)
    runs = args.runs or (10 if args.quick else 30)
    names = _parse_list(args.models, DEFAULT_MODELS, {"images": DEFAULT_MODELS, "silero": AUDIO_MODELS})
    variants = _parse_list(args.variants, VARIANTS, {"onnxopt:*": tuple(ONNXOPT_VARIANTS)})
    error = unknown_models_error(names)
    if error:
        print(error, file=sys.stderr)
        return 2
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"error: unknown variant(s) {', '.join(bad)}. Fix: use {', '.join(VARIANTS)} or onnxopt:*.",
              file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import onnxruntime as ort

    t_start = time.perf_counter()
    all_rows, data_lines = run_cases(names, args.quick, "bench_qdq_", log,
                                     lambda case, folder: bench_case(case, variants, runs, folder, args.timeout, log),
                                     lambda name, text: Row(name, "(all)", error=text))
    print(f"int8: onnxopt vs onnxruntime quantize_static (QDQ, per-channel, U8 act / S8 weights, MinMax, after "
          f"quant_pre_process); onnxruntime {ort.__version__} CPU, ALL optimizations, 1 thread, "
          f"median of {runs} interleaved rounds.")
    print("Same calibration feeds for every tool; evaluation on other photos (calibration | evaluation):")
    print("\n".join(data_lines))
    print("speed: float time / variant time (>1 faster); ms: median latency; cosine: lowest over eval feeds and "
          "outputs; top-1: argmax agreement (classifiers); app: the application's answer unchanged (see "
          "tools/bench_qdq.py); quant s / peak MB: the quantizing call (fresh process).")
    print_results(format_table(all_rows), format_summary(all_rows), all_rows, t_start, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
