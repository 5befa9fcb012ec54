"""Calibration data: .npz / .npy folders / image folders / random data, and their error messages."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxopt.calibration import (ImagePreprocess, load_calibration, model_inputs, parse_input_shapes,
                                 random_calibration)
from onnxopt.errors import UserInputError

from tests.util import make_model, vi


def image_model(shape=("N", 3, 4, 5), dtype=TensorProto.FLOAT):
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", shape, dtype)], [vi("y", shape, dtype)])


def two_input_model():
    nodes = [helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "idsf"], ["y"])]
    return make_model(nodes, [vi("x", ["B", 6]), vi("ids", ["B", 6], TensorProto.INT64)], [vi("y", ["B", 6])])


# --------------------------------------------------------------------------- model inputs / shapes
def test_model_inputs_skips_initializers_and_reports_dims():
    m = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [vi("x", ["batch", 3]), vi("w", [3])], [vi("y", None)],
                   initializers=[helper.make_tensor("w", TensorProto.FLOAT, [3], [1, 2, 3])])
    m.graph.input[0].type.tensor_type.shape.dim.add()  # a dim with neither value nor param
    [(name, dtype, dims)] = model_inputs(m)
    assert (name, dtype, dims) == ("x", np.dtype(np.float32), ["batch", 3, None])


def test_parse_input_shapes():
    assert parse_input_shapes(["input:1x3x224x224", "input_1:0:2x8", "scale:"]) == {
        "input": (1, 3, 224, 224), "input_1:0": (2, 8), "scale": ()}
    for bad in (["1x3"], ["x:1xa"], ["x:0x3"], ["x:1x2", "x:1x3"]):
        with pytest.raises(UserInputError):
            parse_input_shapes(bad)


def test_preprocess_parse():
    pp = ImagePreprocess.parse("size=224x200,layout=nhwc,color=BGR,scale=1/255,mean=0.485+0.456+0.406,std=0.229+0.224+0.225")
    assert pp.size == (224, 200) and pp.layout == "NHWC" and pp.color == "BGR"
    assert pp.scale == pytest.approx(1 / 255) and pp.mean == (0.485, 0.456, 0.406) and pp.std[2] == 0.225
    assert ImagePreprocess.parse("imagenet").mean == (0.485, 0.456, 0.406)
    assert ImagePreprocess.parse("raw").scale == 1.0
    assert ImagePreprocess.parse("imagenet,size=256").size == (256, 256)
    for bad in ("size=0x3", "layout=NCWH", "colour=RGB", "std=0+1+1", "mean=a", "sepia", ""):
        with pytest.raises(UserInputError):
            ImagePreprocess.parse(bad)


# --------------------------------------------------------------------------- .npz
def test_npz_samples_split_into_batch_one_feeds(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4, 5))  # float64: cast to float32 silently
    np.savez(tmp_path / "calib.npz", x=x)
    data = load_calibration(tmp_path / "calib.npz", image_model())
    feeds = list(data.feeds())
    assert len(data) == 5 and len(feeds) == 5 and not data.is_random
    assert data.source.startswith("calib.npz: 5 samples")
    assert feeds[2]["x"].shape == (1, 3, 4, 5) and feeds[2]["x"].dtype == np.float32
    np.testing.assert_allclose(feeds[2]["x"][0], x[2].astype(np.float32))
    assert len(list(data.feeds(limit=2))) == 2
    assert len(list(data.feeds())) == 5  # re-iterable


def test_npz_fixed_batch_groups_samples(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.ones((7, 3, 4, 5), np.float32))
    data = load_calibration(tmp_path / "c.npz", image_model((2, 3, 4, 5)))
    feeds = list(data)
    assert len(feeds) == 3 and all(f["x"].shape == (2, 3, 4, 5) for f in feeds)
    assert "1 left over" in data.source


def test_npz_dynamic_batch_follows_input_shape_override(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.ones((8, 3, 4, 5), np.float32))
    data = load_calibration(tmp_path / "c.npz", image_model(), input_shapes={"x": (4, 3, 4, 5)}, limit=1)
    assert len(data) == 1 and next(iter(data))["x"].shape == (4, 3, 4, 5)


def test_npz_single_sample_without_batch_axis(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 4, 5), np.float32))
    [feed] = list(load_calibration(tmp_path / "c.npz", image_model()))
    assert feed["x"].shape == (1, 3, 4, 5)


def test_npz_two_inputs_keep_dtypes(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 6), np.float32), ids=np.arange(18, dtype=np.int32).reshape(3, 6))
    feeds = list(load_calibration(tmp_path / "c.npz", two_input_model()))
    assert len(feeds) == 3 and feeds[1]["ids"].dtype == np.int64 and feeds[1]["ids"][0, 0] == 6


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((2, 3, 4, 5), np.float32)}, "misses input(s) 'x'"),
    ({"x": np.zeros((2, 3, 5, 5), np.float32)}, "axis 2 is 5, expected 4"),
    ({"x": np.zeros((2, 1, 3, 4, 5), np.float32)}, "5 dims instead of 4"),
    ({"x": np.zeros((2, 3, 4, 5), np.int64)}, "dtype int64 but the model expects float32"),
])
def test_npz_mistakes_name_input_and_expected_shape(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserInputError) as info:
        load_calibration(tmp_path / "bad.npz", image_model())
    text = str(info.value)
    assert message in text and "Fix:" in text
    if "dims" in message or "axis" in message:
        assert "'x'" in text and "3x4x5" in text


def test_float_data_for_int_input_is_an_error(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 6), np.float32), ids=np.zeros((3, 6), np.float32))
    with pytest.raises(UserInputError, match="'ids'.*float32 but the model expects int64"):
        load_calibration(tmp_path / "c.npz", two_input_model())


def test_samples_disagree_between_inputs(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 6), np.float32), ids=np.zeros((4, 6), np.int64))
    with pytest.raises(UserInputError, match="disagree on the number of samples"):
        load_calibration(tmp_path / "c.npz", two_input_model())


def test_input_shape_override_must_match_static_dims(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 4, 5), np.float32))
    with pytest.raises(UserInputError, match="model fixes it to 3"):
        load_calibration(tmp_path / "c.npz", image_model(), input_shapes={"x": (1, 4, 4, 5)})
    with pytest.raises(UserInputError, match="not an input of the model"):
        load_calibration(tmp_path / "c.npz", image_model(), input_shapes={"y": (1, 3, 4, 5)})


# --------------------------------------------------------------------------- folders
def test_npy_folder_one_sample_per_file(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", np.full((3, 4, 5), i, np.float32))
    data = load_calibration(tmp_path, image_model())
    feeds = list(data)
    assert len(feeds) == 3 and [f["x"][0, 0, 0, 0] for f in feeds] == [0, 1, 2]
    assert feeds[0]["x"].shape == (1, 3, 4, 5)


def test_npy_folder_with_fixed_batch(tmp_path):
    for i in range(4):
        np.save(tmp_path / f"s{i}.npy", np.full((1, 3, 4, 5), i, np.float32))
    feeds = list(load_calibration(tmp_path, image_model((2, 3, 4, 5))))
    assert len(feeds) == 2 and feeds[1]["x"][:, 0, 0, 0].tolist() == [2, 3]


def test_npz_folder_one_feed_per_file(tmp_path):
    for i in range(2):
        np.savez(tmp_path / f"f{i}.npz", x=np.full((1, 6), i, np.float32), ids=np.full((1, 6), i, np.int64))
    (tmp_path / "README.txt").write_text("ignored")
    data = load_calibration(tmp_path, two_input_model())
    feeds = list(data)
    assert len(feeds) == 2 and feeds[1]["ids"].dtype == np.int64 and feeds[1]["x"][0, 0] == 1
    assert "ignored" in data.source


def test_folder_mistakes(tmp_path):
    with pytest.raises(UserInputError, match="is empty"):
        load_calibration(tmp_path, image_model())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserInputError, match="holds no .npy, .npz or image files"):
        load_calibration(tmp_path, image_model())
    with pytest.raises(UserInputError, match="unknown file type"):
        load_calibration(tmp_path / "notes.txt", image_model())
    with pytest.raises(UserInputError, match="does not exist"):
        load_calibration(tmp_path / "missing.npz", image_model())
    np.save(tmp_path / "a.npy", np.zeros((3, 6), np.float32))
    with pytest.raises(UserInputError, match="needs a model with one input"):
        load_calibration(tmp_path, two_input_model())


# --------------------------------------------------------------------------- images
def _write_images(folder, colors, size=(5, 4)):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i, color in enumerate(colors):
        Image.new("RGB", size, color).save(folder / f"img{i}.png")


def test_image_folder_imagenet_preprocess(tmp_path):
    _write_images(tmp_path / "imgs", [(200, 100, 50), (0, 255, 10)])
    data = load_calibration(tmp_path / "imgs", image_model(), preprocess=ImagePreprocess.parse("imagenet"))
    feeds = list(data)
    assert len(feeds) == 2 and feeds[0]["x"].shape == (1, 3, 4, 5) and feeds[0]["x"].dtype == np.float32
    expected = [(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(feeds[0]["x"][0, :, 2, 3], expected, rtol=1e-5)
    assert "2 images" in data.source


def test_image_folder_bgr_nhwc_and_resize(tmp_path):
    _write_images(tmp_path / "imgs", [(200, 100, 50)], size=(16, 12))  # resized to 4x5
    pp = ImagePreprocess.parse("layout=NHWC,color=BGR,scale=1,mean=0,std=2")
    [feed] = list(load_calibration(tmp_path / "imgs", image_model(("N", 4, 5, 3)), preprocess=pp))
    assert feed["x"].shape == (1, 4, 5, 3)
    np.testing.assert_allclose(feed["x"][0, 1, 1], [25.0, 50.0, 100.0])


def test_image_folder_layout_and_size_mistakes(tmp_path):
    _write_images(tmp_path / "imgs", [(1, 2, 3)])
    with pytest.raises(UserInputError, match="layout=NHWC"):
        load_calibration(tmp_path / "imgs", image_model((1, 4, 5, 3)))
    with pytest.raises(UserInputError, match="dynamic height/width.*size="):
        load_calibration(tmp_path / "imgs", image_model(("N", 3, "H", "W")))
    [feed] = list(load_calibration(tmp_path / "imgs", image_model(("N", 3, "H", "W")), preprocess=ImagePreprocess(size=(6, 7))))
    assert feed["x"].shape == (1, 3, 6, 7)


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserInputError, match="not a readable image"):
        load_calibration(tmp_path, image_model())


# --------------------------------------------------------------------------- random
def test_random_data_is_seeded_and_respects_dtypes():
    m = two_input_model()
    a = list(random_calibration(m, seed=3).feeds())
    b = list(random_calibration(m, seed=3).feeds())
    c = list(random_calibration(m, seed=4).feeds(limit=1))
    assert len(a) == 8 and a[0]["x"].shape == (1, 6) and a[0]["ids"].dtype == np.int64
    assert all(np.array_equal(fa[k], fb[k]) for fa, fb in zip(a, b) for k in fa)
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    assert a[0]["ids"].min() >= 0 and max(f["ids"].max() for f in a) <= 3
    data = random_calibration(m)
    assert data.is_random and "seed 0" in data.source
    assert [f["x"].tolist() for f in data.feeds()] == [f["x"].tolist() for f in data.feeds()]


def test_random_data_dynamic_dims():
    m = image_model(("N", 3, "H", "W"))
    with pytest.raises(UserInputError, match="--data-shape x:1x3xNxN"):
        random_calibration(m)
    [feed] = random_calibration(m, input_shapes={"x": (2, 3, 8, 8)}, num_samples=1)
    assert feed["x"].shape == (2, 3, 8, 8)
    bools = make_model([helper.make_node("Not", ["b"], ["c"])], [vi("b", [4], TensorProto.BOOL)], [vi("c", [4], TensorProto.BOOL)])
    assert next(iter(random_calibration(bools)))["b"].dtype == np.bool_


def rnn_like_model():
    """input (batch, 6), state (2, batch, 4), sr scalar int64: like Silero VAD's signature."""
    nodes = [helper.make_node("ReduceSum", ["input"], ["s"], keepdims=1),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["s", "srf"], ["y0"]),
             helper.make_node("Add", ["state", "y0"], ["y"])]
    return make_model(nodes, [vi("input", ["batch", 6]), vi("state", [2, "batch", 4]), vi("sr", [], TensorProto.INT64)],
                      [vi("y", [2, "batch", 4])], opset=13)


def test_npz_scalar_and_repeated_inputs(tmp_path):
    np.savez(tmp_path / "c.npz", input=np.ones((5, 6), np.float32), state=np.zeros((2, 1, 4), np.float32), sr=np.array(16000))
    data = load_calibration(tmp_path / "c.npz", rnn_like_model())
    feeds = list(data)
    assert len(feeds) == 5 and data.source.startswith("c.npz: 5 samples")
    assert feeds[4]["state"].shape == (2, 1, 4) and feeds[4]["input"].shape == (1, 6)
    assert isinstance(feeds[0]["sr"], np.ndarray) and feeds[0]["sr"].shape == () and feeds[0]["sr"] == 16000


def test_random_data_fills_a_shared_symbolic_dim():
    [feed] = random_calibration(rnn_like_model(), num_samples=1)
    assert feed["input"].shape == (1, 6) and feed["state"].shape == (2, 1, 4) and feed["sr"].shape == ()
    [feed] = random_calibration(rnn_like_model(), input_shapes={"input": (3, 6)}, num_samples=1)
    assert feed["state"].shape == (2, 3, 4)


def test_check_input_shapes():
    from onnxopt.calibration import check_input_shapes

    check_input_shapes(image_model(), {"x": (2, 3, 4, 5)})
    with pytest.raises(UserInputError, match="has 3 dims but the model input has 4"):
        check_input_shapes(image_model(), {"x": (3, 4, 5)})
