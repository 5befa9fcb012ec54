"""Calibration data: feed dicts for a model from files, images or a seeded generator.

Sources that :func:`load_calibration` understands:

* ``data.npz`` whose keys are the model's input names. Each array has the model
  input's rank with axis 0 = samples, or one dimension less (a single sample
  without its batch axis). Samples are grouped into feeds of the model's batch
  size: a batch fixed to N groups N samples; a dynamic batch takes the
  ``--input-shape`` override, else 1.
  An array that holds exactly one feed while the others hold many is repeated in
  every feed (e.g. a fixed ``scale`` input).
* ``data.npy`` or a folder of ``.npy`` files (single-input models; each file holds
  one sample or several along axis 0, in file-name order).
* a folder of ``.npz`` files: one feed per file.
* a folder of images (jpg/png/bmp/...; subfolders included), decoded with Pillow
  and turned into the model's input with an :class:`ImagePreprocess`.

Every array is checked against the model: input names, rank, static dims, the
``--input-shape`` override for dynamic dims, and dtype (float→float casts are
silent, int↔float is an error). Mistakes raise one :class:`UserInputError`.

:func:`random_calibration` makes seeded data that respects the declared shapes
and dtypes, for when no data is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from .errors import UserInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos")

Feed = dict[str, np.ndarray]


# --------------------------------------------------------------------------- model inputs
def model_inputs(model: onnx.ModelProto) -> list[tuple[str, np.dtype, list[int | str | None] | None]]:
    """The model's real inputs (graph inputs that are not initializers).

    Each entry is ``(name, numpy dtype, dims)``; a dim is an int (static), a str
    (symbolic, e.g. ``"batch"``) or None (unknown). ``dims`` is None when the
    input declares no shape at all (unknown rank).
    """
    initializers = {t.name for t in model.graph.initializer}
    out = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        kind = inp.type.WhichOneof("value")
        if kind != "tensor_type":
            raise UserInputError(
                f"model input '{inp.name}' is a {kind or 'untyped'} value, not a tensor; onnxopt feeds tensors only.",
                "export the model with tensor inputs (e.g. pad sequences into one tensor).")
        tt = inp.type.tensor_type
        if tt.elem_type == onnx.TensorProto.UNDEFINED:
            raise UserInputError(f"model input '{inp.name}' declares no element type.",
                                 "re-export the model with typed inputs.")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims: list[int | str | None] | None = None
        if tt.HasField("shape"):
            dims = []
            for d in tt.shape.dim:
                if d.HasField("dim_value") and d.dim_value >= 0:
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param") and d.dim_param:
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
        out.append((inp.name, dtype, dims))
    return out


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["input:1x3x224x224", "mask:1x128"]`` → ``{"input": (1, 3, 224, 224), ...}``.

    The name ends at the last ``:`` so TensorFlow names like ``input_1:0`` work
    (``input_1:0:1x224x224x3``). An empty shape (``"scale:"``) means a scalar.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        text = spec.strip()
        name, sep, dims_text = text.rpartition(":")
        fix = "write NAME:DIMS with positive integer dims joined by 'x', e.g. --input-shape input:1x3x224x224."
        if not sep or not name:
            raise UserInputError(f"input shape '{spec}' has no input name.", fix)
        dims_text = dims_text.strip().lower()
        try:
            dims = tuple(int(d) for d in dims_text.split("x")) if dims_text else ()
        except ValueError:
            raise UserInputError(f"input shape '{spec}' has a dimension that is not an integer.", fix) from None
        if any(d <= 0 for d in dims):
            raise UserInputError(f"input shape '{spec}' has a dimension below 1.", fix)
        if name in shapes and shapes[name] != dims:
            raise UserInputError(f"input '{name}' is given two shapes: {_fmt(shapes[name])} and {_fmt(dims)}.",
                                 "give each input's shape once.")
        shapes[name] = dims
    return shapes


# --------------------------------------------------------------------------- image preprocessing
@dataclass
class ImagePreprocess:
    """How an image file becomes a model input: resize → color order → scale → (x - mean) / std → layout."""

    size: tuple[int, int] | None = None  # (H, W); None → the model's input shape
    layout: str = "NCHW"  # or "NHWC"
    color: str = "RGB"  # or "BGR" or "GRAY"
    scale: float = 1 / 255  # applied before mean/std
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize: str = "bilinear"  # resize (not crop) to size

    PRESETS: ClassVar[tuple[str, ...]] = ("imagenet", "raw", "unit")
    KEYS: ClassVar[tuple[str, ...]] = ("size", "layout", "color", "scale", "mean", "std", "resize")

    @classmethod
    def preset(cls, name: str) -> "ImagePreprocess":
        """``imagenet`` (RGB, /255, ImageNet mean/std, NCHW), ``raw`` (0..255 floats), ``unit`` (0..1 floats)."""
        name = name.strip().lower()
        if name == "imagenet":
            return cls(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if name == "raw":
            return cls(scale=1.0)
        if name == "unit":
            return cls()
        raise UserInputError(f"unknown preprocessing preset '{name}'.",
                             f"use one of {', '.join(cls.PRESETS)} or key=value pairs ({', '.join(cls.KEYS)}).")

    @classmethod
    def parse(cls, text: str) -> "ImagePreprocess":
        """Parse ``"size=224x224,layout=NCHW,color=BGR,scale=0.00392,mean=0.485+0.456+0.406,std=..."``.

        The first item may be a preset that later keys override: ``"imagenet,size=256x256"``.
        ``scale`` accepts a fraction (``1/255``).
        """
        items = [t.strip() for t in (text or "").split(",") if t.strip()]
        if not items:
            raise UserInputError("empty --preprocess.", "use a preset (imagenet, raw) or key=value pairs, e.g. size=224x224,color=RGB.")
        pp = cls()
        if "=" not in items[0]:
            pp = cls.preset(items[0])
            items = items[1:]
        for item in items:
            key, sep, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep or key not in cls.KEYS:
                raise UserInputError(f"'{item}' in --preprocess is not a known key=value pair.",
                                     f"use keys {', '.join(cls.KEYS)}, e.g. size=224x224,mean=0.485+0.456+0.406.")
            try:
                if key == "size":
                    parts = [int(p) for p in value.lower().split("x")]
                    if len(parts) == 1:
                        parts = parts * 2
                    if len(parts) != 2 or min(parts) <= 0:
                        raise ValueError
                    pp.size = (parts[0], parts[1])
                elif key == "layout":
                    if value.upper() not in ("NCHW", "NHWC"):
                        raise ValueError
                    pp.layout = value.upper()
                elif key == "color":
                    if value.upper() not in ("RGB", "BGR", "GRAY"):
                        raise ValueError
                    pp.color = value.upper()
                elif key == "scale":
                    pp.scale = _parse_number(value)
                elif key in ("mean", "std"):
                    values = tuple(_parse_number(v) for v in value.split("+"))
                    if not values or (key == "std" and any(v == 0 for v in values)):
                        raise ValueError
                    setattr(pp, key, values)
                elif key == "resize":
                    if value.lower() not in RESIZE_METHODS:
                        raise ValueError
                    pp.resize = value.lower()
            except ValueError:
                hints = {"size": "HxW such as 224x224", "layout": "NCHW or NHWC", "color": "RGB, BGR or GRAY",
                         "scale": "a number such as 0.00392 or 1/255", "mean": "numbers joined by '+', e.g. 0.485+0.456+0.406",
                         "std": "non-zero numbers joined by '+', e.g. 0.229+0.224+0.225", "resize": " or ".join(RESIZE_METHODS)}
                raise UserInputError(f"bad value '{value}' for '{key}' in --preprocess.", f"give {hints[key]}.") from None
        return pp

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    def describe(self) -> str:
        size = f"{self.size[0]}x{self.size[1]}" if self.size else "model"
        return (f"size={size},layout={self.layout},color={self.color},scale={self.scale:.6g},"
                f"mean={'+'.join(f'{m:g}' for m in self.mean)},std={'+'.join(f'{s:g}' for s in self.std)},resize={self.resize}")

    def load(self, path: Path, size: tuple[int, int]) -> np.ndarray:
        """One image file → a float32 array (C, H, W) or (H, W, C), without the batch axis."""
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                img = img.convert("L" if self.color == "GRAY" else "RGB")
                resample = getattr(Image.Resampling, self.resize.upper())
                if img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), resample=resample)
                pixels = np.asarray(img, dtype=np.float32)
        except Exception as exc:  # Pillow raises many types for broken files
            raise UserInputError(f"cannot decode image '{path}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.",
                                 "remove or replace the file, or convert it to PNG/JPEG.") from None
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.color == "BGR":
            pixels = pixels[:, :, ::-1]
        c = pixels.shape[2]
        mean = np.asarray(self.mean if len(self.mean) != 1 else self.mean * c, dtype=np.float32)
        std = np.asarray(self.std if len(self.std) != 1 else self.std * c, dtype=np.float32)
        pixels = (pixels * np.float32(self.scale) - mean) / std
        if self.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return _contiguous(pixels.astype(np.float32, copy=False))


def _parse_number(text: str) -> float:
    if "/" in text:
        num, _, den = text.partition("/")
        value = float(num) / float(den)
    else:
        value = float(text)
    if not math.isfinite(value):
        raise ValueError
    return value


# --------------------------------------------------------------------------- the data object
@dataclass
class CalibrationData:
    """Feed dicts for a model, re-iterable; each feed holds one model batch."""

    source: str  # one human line, e.g. "calib.npz: 64 samples"
    is_random: bool
    make_feeds: Callable[[], Iterable[Feed]] = field(default=lambda: iter(()), repr=False)
    num_feeds: int = 0

    @classmethod
    def from_feeds(cls, feeds: list[Feed], source: str = "given feeds", is_random: bool = False) -> "CalibrationData":
        feeds = list(feeds)
        return cls(source, is_random, lambda: iter(feeds), len(feeds))

    def feeds(self, limit: int | None = None) -> Iterator[Feed]:
        """A fresh iterator over at most ``limit`` feeds (every call starts from the first feed)."""
        count = len(self) if limit is None else max(0, min(limit, len(self)))
        if count == 0:
            return
        for index, feed in enumerate(self.make_feeds()):
            yield feed
            if index + 1 >= count:
                return

    def __iter__(self) -> Iterator[Feed]:
        return self.feeds()

    def __len__(self) -> int:
        return self.num_feeds


# --------------------------------------------------------------------------- input specs
@dataclass
class _Input:
    name: str
    dtype: np.dtype
    dims: list[int | str | None] | None  # as declared
    expected: list[int | None] | None  # declared static dims, with the --input-shape override applied
    batch: int  # samples per feed along axis 0

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)

    def shown(self) -> str:
        """The shape the model expects, e.g. 'batchx3x224x224' (sizes set by --input-shape filled in)."""
        if self.dims is None:
            return "(unknown rank)"
        return _fmt([e if e is not None else (d if isinstance(d, str) else "?") for d, e in zip(self.dims, self.expected)])


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _resolve_inputs(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None) -> list[_Input]:
    """Model inputs with the overrides checked and applied, and each input's feed batch size."""
    overrides = dict(overrides or {})
    raw = model_inputs(model)
    names = [name for name, _, _ in raw]
    for name in overrides:
        if name not in names:
            raise UserInputError(f"--input-shape names '{name}', which is not an input of the model.",
                                 f"use one of the model's inputs: {', '.join(names) or '(none)'}.")
    inputs = []
    for name, dtype, dims in raw:
        expected = None
        if dims is not None:
            expected = [d if isinstance(d, int) else None for d in dims]
        if name in overrides:
            shape = overrides[name]
            if dims is not None:
                if len(shape) != len(dims):
                    raise UserInputError(
                        f"--input-shape {name}:{_fmt(shape)} has {len(shape)} dims but the model input has {len(dims)} ({_fmt([d if d is not None else '?' for d in dims])}).",
                        "give one size per dimension of the input.")
                for axis, (d, s) in enumerate(zip(dims, shape)):
                    if isinstance(d, int) and d != s:
                        raise UserInputError(
                            f"--input-shape {name}:{_fmt(shape)} sets axis {axis} to {s} but the model fixes it to {d}.",
                            "only dynamic dimensions can be overridden; keep the static ones.")
            expected = list(shape)
        inputs.append(_Input(name, dtype, dims, expected, 1))
    # ONNX gives one symbolic name one size throughout the model: a size the override sets for
    # 'batch' in one input also fills 'batch' in the others (e.g. an RNN state (layers, batch, hidden)).
    sizes = _symbol_sizes(inputs, lambda inp: inp.name in overrides)
    for inp in inputs:
        _fill_symbols(inp, sizes)
        if inp.expected:
            # Axis 0 is the batch: the override's size, else 1.
            inp.batch = inp.expected[0] if inp.expected[0] is not None else 1
    return inputs


def check_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Raise UserInputError unless every --input-shape names a real input, has its rank and keeps its static dims."""
    _resolve_inputs(model, input_shapes)


def _symbol_sizes(inputs: list[_Input], chosen: Callable[[_Input], bool]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for inp in inputs:
        if inp.dims is not None and chosen(inp):
            for d, e in zip(inp.dims, inp.expected):
                if isinstance(d, str) and e is not None:
                    sizes.setdefault(d, e)
    return sizes


def _fill_symbols(inp: _Input, sizes: dict[str, int]) -> None:
    if inp.dims is not None:
        for axis, d in enumerate(inp.dims):
            if inp.expected[axis] is None and isinstance(d, str) and d in sizes:
                inp.expected[axis] = sizes[d]


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16/float8 have kind 'V'; their names say what they are.
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def _check_dtype(inp: _Input, data_dtype: np.dtype, where: str) -> None:
    """Raise unless ``data_dtype`` converts safely to the input's dtype."""
    model, data = inp.dtype, np.dtype(data_dtype)
    if model == data:
        return
    if _is_float(model) and _is_float(data):
        return  # e.g. float64 arrays for a float32 input: cast without complaint
    if model.kind in "iu" and data.kind in "iu":
        return  # range-checked when cast
    if model.kind == "O" and data.kind in "USO":
        return
    fix = f"save '{inp.name}' as {model.name} (e.g. array.astype(np.{model.name}))"
    if data.kind in "iub" and _is_float(model):
        fix += ", normalised the way the model expects"
    raise UserInputError(
        f"calibration input '{inp.name}' in {where} has dtype {data.name} but the model expects {model.name}; "
        f"{_kind_name(data)} data cannot be converted safely to {_kind_name(model)}.", fix + ".")


def _kind_name(dtype: np.dtype) -> str:
    if _is_float(dtype):
        return "float"
    return {"b": "bool", "i": "int", "u": "int", "U": "string", "S": "string", "O": "string"}.get(dtype.kind, dtype.name)


def _contiguous(array) -> np.ndarray:
    """A C-contiguous ndarray, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else np.array(array, order="C")


def _cast(inp: _Input, array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype == inp.dtype:
        return _contiguous(array)
    if inp.dtype.kind in "iu" and array.dtype.kind in "iu" and array.size:
        info = np.iinfo(inp.dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise UserInputError(
                f"calibration input '{inp.name}' in {where} holds values {low}..{high} that do not fit the model's {inp.dtype.name}.",
                f"save the array as {inp.dtype.name} with values in range.")
    return _contiguous(array.astype(inp.dtype))


def _shape_error(inp: _Input, found: tuple[int, ...], where: str, detail: str, axis: int | None = None) -> UserInputError:
    per_sample = ", ".join(str(e) if e is not None else "?" for e in (inp.expected or [])[1:])
    fix = f"store '{inp.name}' with shape (samples, {per_sample}) or one sample without the batch axis"
    if axis is not None and inp.dims is not None and not isinstance(inp.dims[axis], int):
        fix = (f"axis {axis} is dynamic and was set by --input-shape {inp.name}:{_fmt(inp.expected)}; "
               "change that override to match the data, or reshape the data")
    return UserInputError(f"calibration input '{inp.name}' in {where} has shape {_fmt(found)} but the model expects "
                          f"{inp.shown()}: {detail}.", fix + ".")


def _sample_view(inp: _Input, array: np.ndarray, where: str) -> np.ndarray:
    """An array of samples along axis 0 (adds the axis for a single sample), shape-checked."""
    rank = inp.rank
    assert rank is not None and rank >= 1
    if array.ndim == rank:
        samples = array
    elif array.ndim == rank - 1:
        samples = array[None]
    else:
        raise _shape_error(inp, array.shape, where,
                           f"{array.ndim} dims instead of {rank} (samples along axis 0) or {rank - 1} (one sample)")
    for axis in range(1, rank):
        want = inp.expected[axis]
        if want is not None and samples.shape[axis] != want:
            raise _shape_error(inp, array.shape, where, f"axis {axis} is {samples.shape[axis]}, expected {want}", axis)
    return samples


def _check_feed_shape(inp: _Input, array: np.ndarray, where: str) -> np.ndarray:
    """A whole feed for one input (rank R, or R-1 with the batch axis added), shape-checked."""
    if inp.rank is None:
        return array
    if inp.rank >= 1 and array.ndim == inp.rank - 1:
        array = array[None]
    if array.ndim != inp.rank:
        raise _shape_error(inp, array.shape, where, f"{array.ndim} dims instead of {inp.rank}")
    for axis, want in enumerate(inp.expected):
        if want is not None and array.shape[axis] != want:
            raise _shape_error(inp, array.shape, where, f"axis {axis} is {array.shape[axis]}, expected {want}", axis)
    return array


# --------------------------------------------------------------------------- array sources
def _feeds_from_arrays(inputs: list[_Input], arrays: dict[str, np.ndarray], where: str, limit: int | None
                       ) -> tuple[Callable[[], Iterator[Feed]], int, str]:
    """Group the samples of in-memory arrays (one per input) into feeds of each input's batch."""
    _check_names(inputs, arrays, where)
    per_feed: dict[str, np.ndarray] = {}  # arrays of samples, grouped into feeds on the fly
    fixed: dict[str, np.ndarray] = {}  # the same value in every feed
    feed_counts: dict[str, int] = {}
    samples_seen: dict[str, int] = {}
    for inp in inputs:
        array = np.asarray(arrays[inp.name])
        _check_dtype(inp, array.dtype, where)
        array = _cast(inp, array, where)
        if inp.rank is None:
            fixed[inp.name] = array
            continue
        if inp.rank == 0:
            if array.ndim == 0:
                fixed[inp.name] = array
                continue
            if array.ndim != 1:
                raise _shape_error(inp, array.shape, where, "a scalar input takes a scalar, or one value per sample along axis 0")
            per_feed[inp.name] = array
            feed_counts[inp.name] = array.shape[0]
            samples_seen[inp.name] = array.shape[0]
            continue
        samples = _sample_view(inp, array, where)
        if samples.shape[0] < inp.batch:
            if samples.shape[0] == 0:
                raise UserInputError(f"calibration input '{inp.name}' in {where} holds no samples.", "store at least one sample.")
            raise UserInputError(
                f"calibration input '{inp.name}' in {where} has {samples.shape[0]} samples but one feed of the model needs {inp.batch}.",
                f"store at least {inp.batch} samples along axis 0.")
        per_feed[inp.name] = samples
        feed_counts[inp.name] = samples.shape[0] // inp.batch
        samples_seen[inp.name] = samples.shape[0]
    counts = set(feed_counts.values())
    if len(counts) > 1:
        # An input with exactly one feed's worth of data is repeated in every feed.
        for name in [n for n, c in feed_counts.items() if c == 1]:
            inp = next(i for i in inputs if i.name == name)
            fixed[name] = _contiguous(per_feed.pop(name)[: inp.batch] if inp.rank else per_feed.pop(name)[0])
            del feed_counts[name]
        counts = set(feed_counts.values())
    if len(counts) > 1:
        listing = ", ".join(f"'{n}': {samples_seen[n]} samples" for n in feed_counts)
        raise UserInputError(f"calibration inputs in {where} disagree on the number of samples ({listing}).",
                             "store the same number of samples (axis 0) for every input.")
    total = counts.pop() if counts else 1
    count = total if limit is None else max(0, min(limit, total))
    batches = {i.name: (i.batch if i.rank else 1) for i in inputs}
    scalars = {i.name for i in inputs if i.rank == 0}  # one value per sample, fed without an axis

    def make() -> Iterator[Feed]:
        for index in range(count):
            feed = dict(fixed)
            for name, samples in per_feed.items():
                b = batches[name]
                part = samples[index * b:(index + 1) * b]
                feed[name] = _contiguous(part[0] if name in scalars else part)
            yield feed

    # Describe by the first batched input.
    if per_feed:
        name = next(iter(per_feed))
        n = samples_seen[name]
        return make, count, _feeds_note(f"{n} samples", n, batches[name], total, count)
    return make, count, _feeds_note("1 feed", 1, 1, total, count)


def _feeds_note(head: str, samples: int, batch: int, total: int, count: int) -> str:
    """``head`` plus how the samples were batched into feeds and how many feeds are used."""
    note = head
    if batch != 1:
        note += f" in {total} feed{'s' if total != 1 else ''} of {batch}"
    if samples % batch:
        note += f" ({samples % batch} left over, unused)"
    if count < total:
        note += f", first {count} feeds used"
    return note


def _check_names(inputs: list[_Input], arrays: dict, where: str) -> None:
    want = [i.name for i in inputs]
    missing = [n for n in want if n not in arrays]
    extra = [n for n in arrays if n not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"misses input(s) {', '.join(repr(n) for n in missing)}")
        if extra:
            parts.append(f"holds unknown name(s) {', '.join(repr(n) for n in extra)}")
        raise UserInputError(f"calibration data {where} {' and '.join(parts)}; the model's inputs are {', '.join(repr(n) for n in want)}.",
                             "name each array after a model input (np.savez(path, **{input_name: array})).")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise UserInputError(f"cannot read '{path}' as .npz: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.",
                             "write it with numpy.savez(path, **{input_name: array}).") from None


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except Exception as exc:
        raise UserInputError(f"cannot read '{path}' as .npy: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.",
                             "write it with numpy.save(path, array).") from None


def _single_input(inputs: list[_Input], what: str) -> _Input:
    if len(inputs) != 1:
        raise UserInputError(f"{what} needs a model with one input, but this model has {len(inputs)} ({', '.join(i.name for i in inputs)}).",
                             "give an .npz file (or a folder of .npz files) with one array per input name.")
    return inputs[0]


def _npy_folder(inputs: list[_Input], files: list[Path], where: str, limit: int | None
                ) -> tuple[Callable[[], Iterator[Feed]], int, str]:
    """A folder of .npy files (one or more samples each) for a single-input model."""
    inp = _single_input(inputs, "a folder of .npy files")
    if inp.rank is None or inp.rank == 0:
        # No batch axis to group along: each file is one feed as it is.
        for f in files:
            _check_dtype(inp, _load_npy(f, mmap=True).dtype, f.name)
        chosen = files if limit is None else files[:limit]
        return (lambda: ({inp.name: _cast(inp, np.asarray(_load_npy(f)), f.name)} for f in chosen)), len(chosen), f"{len(files)} files"
    # (file, index along axis 0) for every sample; headers only, the data stays on disk until used.
    samples: list[tuple[Path, int | None, tuple[int, ...]]] = []
    for f in files:
        arr = _load_npy(f, mmap=True)
        _check_dtype(inp, arr.dtype, f.name)
        view = _sample_view(inp, arr, f.name)
        one_sample = arr.ndim == inp.rank - 1
        for k in range(view.shape[0]):
            samples.append((f, None if one_sample else k, tuple(view.shape[1:])))
    b = inp.batch
    total = len(samples) // b
    if total == 0:
        raise UserInputError(f"{where} holds {len(samples)} samples but one feed of the model needs {b}.",
                             f"add samples, at least {b}.")
    for i in range(total):
        shapes = {s[2] for s in samples[i * b:(i + 1) * b]}
        if len(shapes) > 1:
            raise UserInputError(f"{where}: samples {i * b}..{(i + 1) * b - 1} go into one batch but differ in shape ({', '.join(_fmt(s) for s in sorted(shapes))}).",
                                 "give every sample the same shape, or use a model with batch 1 (--input-shape with batch 1).")
    count = total if limit is None else max(0, min(limit, total))

    def make() -> Iterator[Feed]:
        for i in range(count):
            parts = []
            for f, k, _ in samples[i * b:(i + 1) * b]:
                arr = _load_npy(f, mmap=True)
                parts.append(np.asarray(arr if k is None else arr[k]))
            yield {inp.name: _cast(inp, np.stack(parts), where)}

    return make, count, _feeds_note(f"{len(samples)} samples from {len(files)} .npy files", len(samples), b,
                                    total, count)


def _npz_folder(inputs: list[_Input], files: list[Path], limit: int | None) -> tuple[Callable[[], Iterator[Feed]], int, str]:
    """A folder of .npz files, each one feed."""
    chosen = files if limit is None else files[:max(0, limit)]

    def load_feed(f: Path) -> Feed:
        arrays = _load_npz(f)
        _check_names(inputs, arrays, f"'{f.name}'")
        feed = {}
        for inp in inputs:
            array = arrays[inp.name]
            _check_dtype(inp, array.dtype, f"'{f.name}'")
            feed[inp.name] = _cast(inp, _check_feed_shape(inp, array, f"'{f.name}'"), f"'{f.name}'")
        return feed

    for f in chosen:  # validate every file up front so a bad one fails before any work starts
        load_feed(f)
    note = f"{len(files)} .npz files, one feed each"
    if len(chosen) < len(files):
        note += f", first {len(chosen)} used"
    return (lambda: (load_feed(f) for f in chosen)), len(chosen), note


# --------------------------------------------------------------------------- image source
def _image_geometry(inp: _Input, pp: ImagePreprocess) -> tuple[int, int]:
    """(H, W) to resize to, after checking that the input is an image tensor of the right layout."""
    if inp.rank != 4:
        raise UserInputError(
            f"model input '{inp.name}' has shape {inp.shown()}, not an image batch (rank 4), so images cannot feed it.",
            "give the data as an .npz or a folder of .npy files instead.")
    exp = inp.expected
    c_axis, h_axis, w_axis = (1, 2, 3) if pp.layout == "NCHW" else (3, 1, 2)
    other = "NHWC" if pp.layout == "NCHW" else "NCHW"
    other_c = exp[3] if pp.layout == "NCHW" else exp[1]
    if exp[c_axis] is not None and exp[c_axis] != pp.channels:
        if other_c == pp.channels:
            raise UserInputError(f"model input '{inp.name}' has shape {inp.shown()}, which is {other}, but the preprocessing says layout={pp.layout}.",
                                 f"add layout={other} to --preprocess.")
        raise UserInputError(f"model input '{inp.name}' expects {exp[c_axis]} channels but color={pp.color} gives {pp.channels}.",
                             "set color=GRAY for 1 channel or color=RGB/BGR for 3; other channel counts need .npy/.npz data.")
    for name, values in (("mean", pp.mean), ("std", pp.std)):
        if len(values) not in (1, pp.channels):
            raise UserInputError(f"--preprocess {name} has {len(values)} values but color={pp.color} has {pp.channels} channels.",
                                 f"give 1 or {pp.channels} values joined by '+'.")
    model_hw = (exp[h_axis], exp[w_axis])
    if pp.size is not None:
        for axis_name, want, got in (("height", model_hw[0], pp.size[0]), ("width", model_hw[1], pp.size[1])):
            if want is not None and want != got:
                raise UserInputError(f"--preprocess size={pp.size[0]}x{pp.size[1]} does not match the model's input {inp.shown()} ({axis_name} {want}).",
                                     f"drop size= to use the model's size, or set size={model_hw[0] or got}x{model_hw[1] or pp.size[1]}.")
        return pp.size
    if model_hw[0] is None or model_hw[1] is None:
        raise UserInputError(f"model input '{inp.name}' has a dynamic height/width ({inp.shown()}), so the image size is unknown.",
                             "give the size in the preprocessing, e.g. --preprocess size=224x224 (or --input-shape with static H and W).")
    return (model_hw[0], model_hw[1])


def _image_folder(inputs: list[_Input], files: list[Path], pp: ImagePreprocess, limit: int | None, where: str
                  ) -> tuple[Callable[[], Iterator[Feed]], int, str]:
    from PIL import Image

    inp = _single_input(inputs, "a folder of images")
    size = _image_geometry(inp, pp)
    if not (_is_float(inp.dtype) or (inp.dtype.kind in "iu" and pp.scale == 1.0 and not any(pp.mean) and all(s == 1 for s in pp.std))):
        raise UserInputError(f"model input '{inp.name}' takes {inp.dtype.name}, but the preprocessing produces normalised floats.",
                             "use --preprocess raw (0..255 pixels) for integer image inputs.")
    b = inp.batch
    total = len(files) // b
    if total == 0:
        raise UserInputError(f"{where} holds {len(files)} images but one feed of the model needs {b}.", f"add at least {b} images.")
    count = total if limit is None else max(0, min(limit, total))
    # Check every file is an image now (header only); decoding happens per feed.
    for f in files[:count * b]:
        try:
            with Image.open(f) as img:
                img.size  # noqa: B018 - reading the header is the check
        except Exception as exc:
            raise UserInputError(f"'{f}' is not a readable image ({type(exc).__name__}).",
                                 "remove or replace the file, or convert it to PNG/JPEG.") from None

    def to_dtype(pixels: np.ndarray) -> np.ndarray:
        if inp.dtype.kind in "iu":
            info = np.iinfo(inp.dtype)
            return np.clip(np.rint(pixels), info.min, info.max).astype(inp.dtype)
        return pixels.astype(inp.dtype)

    def make() -> Iterator[Feed]:
        for i in range(count):
            batch = np.stack([pp.load(f, size) for f in files[i * b:(i + 1) * b]])
            yield {inp.name: _contiguous(to_dtype(batch))}

    head = f"{len(files)} images ({pp.describe().replace('size=model', f'size={size[0]}x{size[1]}')})"
    return make, count, _feeds_note(head, len(files), b, total, count)


# --------------------------------------------------------------------------- entry points
def load_calibration(path, model: onnx.ModelProto, *, input_shapes: dict[str, tuple[int, ...]] | None = None,
                     preprocess: ImagePreprocess | None = None, limit: int | None = None) -> CalibrationData:
    """Calibration data from an .npz/.npy file or a folder of .npy/.npz/image files (see the module doc).

    ``limit`` caps the number of feeds. ``preprocess`` applies to images only
    (default: RGB scaled to 0..1, NCHW, at the model's input size).
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise UserInputError(f"calibration limit {limit} is below 1.", "use a positive number of feeds.")
    if not path.exists():
        raise UserInputError(f"calibration data '{path}' does not exist.", "check the path of --calib.")
    inputs = _resolve_inputs(model, input_shapes)
    if not inputs:
        raise UserInputError("the model has no inputs, so it needs no calibration data.", "drop --calib.")
    pp = preprocess or ImagePreprocess()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            make, count, note = _feeds_from_arrays(inputs, _load_npz(path), f"'{path.name}'", limit)
        elif suffix == ".npy":
            inp = _single_input(inputs, "an .npy file")
            make, count, note = _feeds_from_arrays(inputs, {inp.name: _load_npy(path)}, f"'{path.name}'", limit)
        elif suffix in IMAGE_SUFFIXES:
            make, count, note = _image_folder(inputs, [path], pp, limit, f"'{path.name}'")
        else:
            raise UserInputError(f"calibration data '{path}' has an unknown file type '{path.suffix or '(none)'}'.",
                                 "give an .npz, an .npy, or a folder of .npy/.npz/image files.")
        return CalibrationData(f"{path.name}: {note}", False, make, count)
    files = sorted((p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)), key=lambda p: str(p.relative_to(path)))
    kinds = {
        "npy": [p for p in files if p.suffix.lower() == ".npy"],
        "npz": [p for p in files if p.suffix.lower() == ".npz"],
        "image": [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
    }
    present = [k for k, v in kinds.items() if v]
    where = f"folder '{path}'"
    if not present:
        if not files:
            raise UserInputError(f"calibration {where} is empty.", "put .npy, .npz or image files in it.")
        seen = sorted({p.suffix.lower() or p.name for p in files})
        raise UserInputError(f"calibration {where} holds no .npy, .npz or image files (found: {', '.join(seen[:8])}).",
                             "convert the data to .npy/.npz or to common image formats (png, jpg, bmp).")
    if len(present) > 1:
        raise UserInputError(f"calibration {where} mixes {' and '.join(present)} files.",
                             "keep one kind of file per calibration folder.")
    chosen = kinds[present[0]]
    if present[0] == "npy":
        make, count, note = _npy_folder(inputs, chosen, where, limit)
    elif present[0] == "npz":
        make, count, note = _npz_folder(inputs, chosen, limit)
    else:
        make, count, note = _image_folder(inputs, chosen, pp, limit, where)
    ignored = len(files) - len(chosen)
    if ignored:
        note += f"; {ignored} other file(s) ignored"
    return CalibrationData(f"{path.name}/: {note}", False, make, count)


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def random_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every input for generated data: the override, else the declared
    static dims, with 1 for a dynamic axis 0 (and for the same symbolic dim elsewhere)."""
    inputs = _resolve_inputs(model, input_shapes)
    batch_symbols: dict[str, int] = {}
    for inp in inputs:
        if inp.expected and inp.expected[0] is None:
            inp.expected[0] = 1
            if isinstance(inp.dims[0], str):
                batch_symbols.setdefault(inp.dims[0], 1)
    for inp in inputs:
        _fill_symbols(inp, batch_symbols)
    shapes = {}
    for inp in inputs:
        if inp.expected is None:
            raise UserInputError(f"model input '{inp.name}' declares no shape, so random data cannot be generated for it.",
                                 f"pass --input-shape {inp.name}:DIMS (e.g. {inp.name}:1x3x224x224) or give --calib data.")
        unknown = [axis for axis, e in enumerate(inp.expected) if e is None]
        if unknown:
            axis = unknown[0]
            label = f"'{inp.dims[axis]}'" if isinstance(inp.dims[axis], str) else "(unnamed)"
            raise UserInputError(
                f"model input '{inp.name}' has a dynamic dimension {label} at axis {axis} ({inp.shown()}), so random data needs its size.",
                f"pass --data-shape {inp.name}:{_fmt([e if e is not None else 'N' for e in inp.expected])} "
                "with each N replaced by a size (--input-shape also fixes it in the optimized model), "
                "or give --calib data.")
        shapes[inp.name] = tuple(inp.expected)
    return shapes


def random_calibration(model: onnx.ModelProto, *, seed: int = 0, input_shapes: dict[str, tuple[int, ...]] | None = None,
                       num_samples: int = 8) -> CalibrationData:
    """Seeded random feeds (``num_samples`` feeds, each one model batch).

    Floats are N(0, 1), integers 0..3 (safe as indices and small counts), bools random.
    Dynamic dims take ``input_shapes``, else 1 on axis 0; other dynamic dims need an override
    (see :func:`random_shapes`).
    """
    if num_samples < 1:
        raise UserInputError(f"number of random samples {num_samples} is below 1.", "use at least 1.")
    shapes = random_shapes(model, input_shapes)
    dtypes = {name: dtype for name, dtype, _ in model_inputs(model)}
    for name, dtype in dtypes.items():
        if not (_is_float(dtype) or dtype.kind in "iub"):
            raise UserInputError(f"model input '{name}' has dtype {dtype.name}, for which onnxopt cannot make random data.",
                                 "give calibration data with --calib.")

    def make() -> Iterator[Feed]:
        rng = np.random.default_rng(seed)
        for _ in range(num_samples):
            feed = {}
            for name, shape in shapes.items():
                dtype = dtypes[name]
                if _is_float(dtype):
                    feed[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
                elif dtype.kind == "b":
                    feed[name] = rng.integers(0, 2, shape).astype(np.bool_)
                else:
                    feed[name] = rng.integers(0, 4, shape).astype(dtype)
            yield feed

    return CalibrationData(f"seeded random data (seed {seed}): no --calib given", True, make, num_samples)
