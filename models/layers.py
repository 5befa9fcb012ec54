"""A small graph builder on top of ``onnx.helper`` and numpy.

:class:`GraphBuilder` accumulates nodes and weights with unique, PyTorch-export-like
names (node ``/layer1/0/conv1/Conv``, output ``/layer1/0/conv1/Conv_output_0``,
weight ``layer1.0.conv1.weight``) and knows the static shape of every tensor it made,
so a layer helper only needs the new layer's hyper-parameters::

    b = GraphBuilder("net", seed=0, opset=17)
    x = b.input("input", [1, 3, 32, 32])
    with b.scope("stem"):
        x = b.relu(b.batchnorm(b.conv(x, 16, k=3, stride=2, bias=False)))
    x = b.gemm(b.flatten(b.global_avgpool(x)), 10, center=True)
    model = b.build(outputs={"logits": x})

Keeping activations O(1) in deep nets with random weights: as layers are added, the
builder also runs them in numpy on a small *probe* batch of standard-normal inputs
(``probe_batch`` samples, drawn from the seed). The probe's activations then set

* the scale of each conv/linear weight, N(0, gain / (fan_in · E[x²])) with E[x²]
  measured on the layer input, so E[y²] ≈ gain: the data-driven init of LSUV
  (Mishkin & Matas 2016) in a single step; gain 2 before a ReLU is He et al. 2015;
* the running mean and variance of BatchNormalization: the per-channel statistics the
  probe really has (with a little jitter, as after training on other data), with random
  scale and bias, so BN normalizes for real and folding it changes weights non-trivially;
* optionally (``gemm(center=True)``) a classifier head that ignores the mean feature
  vector, so the logits respond to the input instead of being dominated by a constant
  (random deep nets otherwise map every input to nearly the same logits).

Everything is a function of the seed: weights come from one ``numpy.random.Generator``
in the order the layers are added, the probe from a second one. The probe runs through
BLAS in float32 on one thread, so the bytes are identical on one machine; another CPU
type may round a BN statistic or weight scale differently in the last bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str  # a static size or a symbolic dimension name such as "N"
Shape = tuple[Dim, ...]

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
_SAME = object()  # "copy the value of input 0" marker for GraphBuilder.node
BN_PRIOR_SAMPLES = 8  # weight of the pooled variance when BN statistics come from few probe values

try:  # installed with scikit-learn, an onnxopt dependency
    from threadpoolctl import ThreadpoolController
    _BLAS = ThreadpoolController()
except ImportError:  # pragma: no cover
    _BLAS = None


# ---------------------------------------------------------------------------- numpy reference ops
# Just enough of the ONNX ops, in float32 NCHW, to run the probe batch while building.

def _pad_hw(x: np.ndarray, pads: Sequence[int], value: float = 0.0) -> np.ndarray:
    top, left, bottom, right = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def _windows(x: np.ndarray, kh: int, kw: int, stride: int, dilation: int, out_h: int, out_w: int, axes=(2, 3)):
    """Yield (i, j, view of x at kernel tap (i, j) for every output position) for a padded x."""
    for i in range(kh):
        for j in range(kw):
            index = [slice(None)] * x.ndim
            index[axes[0]] = slice(i * dilation, i * dilation + stride * (out_h - 1) + 1, stride)
            index[axes[1]] = slice(j * dilation, j * dilation + stride * (out_w - 1) + 1, stride)
            yield i, j, x[tuple(index)]


def _one_blas_thread():
    """Run BLAS on one thread: the same bytes whatever OPENBLAS_NUM_THREADS says (threads split
    dot products, changing the summation order), and on a busy 2-core machine spinning
    OpenBLAS threads cost more than they give to the probe's small GEMMs."""
    if _BLAS is None:
        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")


def _single_blas_thread(fn):
    """Decorator: fn's BLAS calls (GEMMs, dot products) run on one thread, see _one_blas_thread."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _one_blas_thread():
            return fn(*args, **kwargs)
    return wrapper


@_single_blas_thread
def np_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pads: Sequence[int],
              dilation: int, group: int) -> np.ndarray:
    """ONNX Conv: one GEMM per kernel tap and group on NHWC slices (fast enough for 224x224 VGG)."""
    n, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    xp = _pad_hw(x, pads)
    out_h = (xp.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    out_w = (xp.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    og = o // group
    if cg == 1 and og == 1:  # depthwise: multiply-accumulate per tap
        y = np.zeros((n, o, out_h, out_w), np.float32)
        for i, j, tap in _windows(xp, kh, kw, stride, dilation, out_h, out_w):
            y += tap * w[None, :, 0, i, j, None, None]
    else:
        xh = np.ascontiguousarray(xp.transpose(0, 2, 3, 1))  # NHWC: a tap is a strided stack of C-rows
        y = np.zeros((n * out_h * out_w, o), np.float32)
        for i, j, tap in _windows(xh, kh, kw, stride, dilation, out_h, out_w, axes=(1, 2)):
            rows = np.ascontiguousarray(tap).reshape(-1, c)
            for g in range(group):
                y[:, g * og:(g + 1) * og] += rows[:, g * cg:(g + 1) * cg] @ w[g * og:(g + 1) * og, :, i, j].T
        y = np.ascontiguousarray(y.reshape(n, out_h, out_w, o).transpose(0, 3, 1, 2))
    if b is not None:
        y += b[None, :, None, None]
    return y


def np_pool(x: np.ndarray, kind: str, k: int, stride: int, pads: Sequence[int], out_h: int, out_w: int) -> np.ndarray:
    """ONNX MaxPool / AveragePool (count_include_pad=0) with explicit begin/end pads."""
    if kind == "max":
        xp = _pad_hw(x, pads, -np.inf)
        y = np.full((x.shape[0], x.shape[1], out_h, out_w), -np.inf, np.float32)
        for _, _, tap in _windows(xp, k, k, stride, 1, out_h, out_w):
            np.maximum(y, tap, out=y)
        return y
    xp, ones = _pad_hw(x, pads), _pad_hw(np.ones((1, 1) + x.shape[2:], np.float32), pads)
    total = np.zeros((x.shape[0], x.shape[1], out_h, out_w), np.float32)
    count = np.zeros((1, 1, out_h, out_w), np.float32)
    for (_, _, tap), (_, _, one) in zip(_windows(xp, k, k, stride, 1, out_h, out_w),
                                        _windows(ones, k, k, stride, 1, out_h, out_w)):
        total += tap
        count += one
    return total / count


def _conv_out(size: Dim, k: int, stride: int, pad_begin: int, pad_end: int, dilation: int = 1,
              ceil_mode: bool = False) -> Dim:
    """Output size of a conv/pool window along one axis (ONNX Conv/MaxPool spec formula)."""
    if isinstance(size, str):
        return size
    span = size + pad_begin + pad_end - dilation * (k - 1) - 1
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    # ceil_mode never starts a window entirely inside the end padding (PyTorch/ORT rule)
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1
    if out < 1:
        raise ValueError(f"a {k}x{k} window (stride {stride}) does not fit a feature map of size {size}: "
                         "the input is too small for this model")
    return out


def _reshaped(shape: Shape, target: Sequence[int]) -> Shape:
    """Output shape of ONNX Reshape (0 copies the input dim, -1 takes the rest), "?" where unknown."""
    out: list[Dim] = [shape[i] if d == 0 else d for i, d in enumerate(target)]
    if -1 in target:
        rest = [d for i, d in enumerate(shape) if not (i < len(target) and target[i] == 0)]
        known = [d for d in out if isinstance(d, int) and d != -1]
        if all(isinstance(d, int) for d in rest) and math.prod(known) > 0:
            out[target.index(-1)] = math.prod(rest) // math.prod(known)
        else:
            out[target.index(-1)] = "?"
    return tuple(out)


def channel_stats(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) mean and variance over every other axis, in float64."""
    axes = tuple(a for a in range(value.ndim) if a != 1)
    return value.mean(axis=axes, dtype=np.float64), value.var(axis=axes, dtype=np.float64)


class GraphBuilder:
    """Accumulates an ONNX graph: nodes, weights, inputs, outputs, shapes, probe values, names.

    ``seed`` feeds the weight generator and the probe batch; ``opset`` selects the op
    versions the helpers emit (ReLU6 as Clip with attributes below opset 11 and with
    inputs from 11, Dropout ratio as attribute below 12, Unsqueeze axes as input from
    13, HardSwish from 14); ``weights_as_constants`` stores every weight as a
    ``Constant`` node instead of an initializer, as PaddlePaddle exports and un-folded
    PyTorch exports do; ``probe_batch`` is the number of probe samples (see the module doc).
    """

    def __init__(self, name: str = "model", seed: int = 0, opset: int = 17,
                 weights_as_constants: bool = False, probe_batch: int = 2):
        if not 7 <= opset <= onnx.defs.onnx_opset_version():
            raise ValueError(f"opset {opset} is not supported: use 7 to {onnx.defs.onnx_opset_version()}")
        self.name = name
        self.opset = opset
        self.weights_as_constants = weights_as_constants
        self.probe_batch = probe_batch
        self.rng = np.random.default_rng(seed)
        self._probe_rng = np.random.default_rng([seed, 1])
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.extra_opsets: dict[str, int] = {}
        self.shapes: dict[str, Shape] = {}
        self.dtypes: dict[str, int] = {}
        self.values: dict[str, np.ndarray | None] = {}  # the probe batch's value of each tensor
        self._taken: set[str] = set()
        self._scope: list[str] = []
        self._parent: GraphBuilder | None = None
        self._weights_in_parent = False

    # ------------------------------------------------------------------ names
    @contextlib.contextmanager
    def scope(self, name: str | int):
        """Prefix node and weight names made inside, like a PyTorch submodule."""
        self._scope.append(str(name))
        try:
            yield self
        finally:
            self._scope.pop()

    def _maybe_scope(self, name: str | None):
        return self.scope(name) if name else contextlib.nullcontext()

    def unique(self, hint: str) -> str:
        """``hint`` itself when unused in the whole model (subgraphs included), else ``hint_1``, ``hint_2``…"""
        name, i = hint, 0
        while name in self._taken:
            i += 1
            name = f"{hint}_{i}"
        self._taken.add(name)
        return name

    def _node_name(self, hint: str | None, op: str) -> str:
        parts = self._scope + ([hint] if hint else [])
        return self.unique("/" + "/".join(parts + [op]))

    def _weight_name(self, layer: str | None, what: str) -> str:
        return self.unique(".".join(self._scope + ([layer] if layer else []) + [what]))

    @contextlib.contextmanager
    def _borrowed_scope(self, scope: list[str]):
        saved, self._scope = self._scope, list(scope)
        try:
            yield
        finally:
            self._scope = saved

    # ------------------------------------------------------------------ tensors
    def _record(self, name: str, shape: Sequence[Dim], value: np.ndarray | None, dtype: int = FLOAT) -> str:
        self.shapes[name] = tuple(shape)
        self.dtypes[name] = dtype
        self.values[name] = value
        return name

    def shape(self, x: str) -> Shape:
        return self.shapes[x]

    def channels(self, x: str) -> int:
        c = self.shapes[x][1]
        if not isinstance(c, int):
            raise ValueError(f"tensor {x} has no static channel count: {self.shapes[x]}")
        return c

    @_single_blas_thread
    def second_moment(self, x: str) -> float:
        """E[x²] of ``x`` on the probe batch (1 when unknown)."""
        value = self.values.get(x)
        if value is None or value.dtype.kind != "f":
            return 1.0
        flat = value.ravel()
        return max(float(flat @ flat) / flat.size, 1e-6)

    def input(self, name: str, shape: Sequence[Dim], dtype: int = FLOAT) -> str:
        """Declare a graph input; the probe feeds it standard-normal data (dim 0 = probe batch)."""
        self._taken.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        probe_shape = [self.probe_batch] + [d if isinstance(d, int) else 1 for d in shape[1:]]
        value = None
        if dtype == FLOAT:
            value = self._probe_rng.standard_normal(probe_shape, dtype=np.float32)
        return self._record(name, shape, value, dtype)

    def weight(self, layer: str | None, what: str, array: np.ndarray) -> str:
        """Store ``array`` as ``<scope>.<layer>.<what>`` (initializer or Constant node), raw data."""
        if self._weights_in_parent:
            with self._parent._borrowed_scope(self._scope):
                return self._parent.weight(layer, what, array)
        name = self._weight_name(layer, what)
        array = np.array(array, order="C")  # (ascontiguousarray would turn a scalar into 1-D)
        if self.weights_as_constants:
            node_name = self.unique(f"/{name.replace('.', '/')}/Constant")
            self.nodes.append(helper.make_node("Constant", [], [name], name=node_name,
                                               value=numpy_helper.from_array(array, name)))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return self._record(name, array.shape, array, helper.np_dtype_to_tensor_dtype(array.dtype))

    def constant(self, what: str, array, dtype=np.float32) -> str:
        """A small non-learned constant (shape, axes, clip bounds) named after the scope."""
        return self.weight(None, what, np.asarray(array, dtype=dtype))

    def _rand_normal(self, shape, std: float) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def _rand_uniform(self, shape, low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, shape).astype(np.float32)

    def _fan_in_std(self, x: str, fan_in: int, gain: float) -> float:
        """Std of N(0, gain / (fan_in · E[x²])) weights, so E[y²] ≈ gain (He init when E[x²] = 1, gain 2)."""
        return math.sqrt(gain / (fan_in * self.second_moment(x)))

    # ------------------------------------------------------------------ generic node
    def node(self, op: str, inputs: Sequence[str], *, name: str | None = None, n_outputs: int = 1,
             shape: Sequence[Dim] | None = None, value=_SAME, dtype: int | None = None,
             domain: str = "", **attrs) -> str | list[str]:
        """Append one node and record its first output's shape, probe value and dtype.

        Defaults are those of input 0 (right for elementwise ops, Identity, Dropout).
        Attributes whose value is None are left out. Returns the output name, or the
        list of names when ``n_outputs > 1``.
        """
        node_name = self._node_name(name, op)
        outputs = [self.unique(f"{node_name}_output_{i}") for i in range(n_outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=node_name, domain=domain or None, **attrs))
        first = inputs[0] if inputs and inputs[0] in self.shapes else None
        self._record(outputs[0],
                     shape if shape is not None else (self.shapes[first] if first else ()),
                     (self.values[first] if first else None) if value is _SAME else value,
                     dtype if dtype is not None else (self.dtypes[first] if first else FLOAT))
        return outputs if n_outputs > 1 else outputs[0]

    def _apply(self, x: str, fn) -> np.ndarray | None:
        """fn(probe value of x), or None when x has no probe value."""
        value = self.values.get(x)
        return None if value is None else np.asarray(fn(value), dtype=value.dtype)

    # ------------------------------------------------------------------ layers
    @_single_blas_thread
    def conv(self, x: str, out_ch: int, k: int | tuple[int, int] = 3, stride: int = 1, pad: int | None = None,
             group: int = 1, dilation: int = 1, bias: bool = True, *, gain: float = 2.0, center: bool = False,
             name: str | None = "conv") -> str:
        """2-D Conv (NCHW, weight [out_ch, in_ch/group, kh, kw]); ``pad`` defaults to 'same' for odd k.

        Weights ~ N(0, gain / (fan_in · E[x²])) so that E[y²] ≈ gain; the bias (when
        present) is small but non-zero so that fusions that move it are exercised.
        ``center`` (group 1 only) makes a conv classifier's outputs follow the input, as
        :meth:`gemm` does for a linear one.
        """
        n, c, h, w = self.shapes[x]
        kh, kw = (k, k) if isinstance(k, int) else k
        if c % group or out_ch % group:
            raise ValueError(f"conv: channels {c}->{out_ch} are not divisible by group {group}")
        ph, pw = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2) if pad is None else (pad, pad)
        weight = self._rand_normal((out_ch, c // group, kh, kw), self._fan_in_std(x, (c // group) * kh * kw, gain))
        x_value = self.values.get(x)
        run = lambda wt, bs: np_conv2d(x_value, wt, bs, stride, [ph, pw, ph, pw], dilation, group)  # noqa: E731
        if center and x_value is not None and group == 1:
            # filters orthogonal to the mean input patch, then each output channel scaled to
            # variance `gain` on the probe: outputs follow the input, not a per-channel constant
            mean_patch = np.broadcast_to(x_value.mean(axis=(0, 2, 3), dtype=np.float64)[:, None, None], weight.shape[1:])
            direction = (mean_patch / max(np.linalg.norm(mean_patch), 1e-12)).ravel()
            flat = weight.reshape(out_ch, -1).astype(np.float64)
            flat -= np.outer(flat @ direction, direction)
            weight = flat.reshape(weight.shape).astype(np.float32)
            spread = channel_stats(run(weight, None))[1]
            weight *= (math.sqrt(gain) / np.sqrt(np.maximum(spread, 1e-12))).astype(np.float32)[:, None, None, None]
        inputs = [x, self.weight(name, "weight", weight)]
        b = None
        if bias:
            b = self._rand_normal((out_ch,), (0.01 if center else 0.1) * math.sqrt(gain))
            inputs.append(self.weight(name, "bias", b))
        out_shape = (n, out_ch, _conv_out(h, kh, stride, ph, ph, dilation), _conv_out(w, kw, stride, pw, pw, dilation))
        value = None if x_value is None else run(weight, b)
        return self.node("Conv", inputs, name=name, shape=out_shape, value=value,
                         dilations=[dilation, dilation], group=group, kernel_shape=[kh, kw],
                         pads=[ph, pw, ph, pw], strides=[stride, stride])

    def batchnorm(self, x: str, eps: float = 1e-5, *, gamma: tuple[float, float] = (0.5, 1.5),
                  name: str | None = "bn") -> str:
        """Inference-mode BatchNormalization, weights named like torch's.

        Scale ~ U(gamma), bias ~ N(0, 0.2²); running mean and variance are the probe's
        per-channel statistics with some jitter. A residual branch's last BN gets a
        smaller ``gamma`` range (trained ResNets have small ones there) so that sums of
        many blocks stay O(1).
        """
        c = self.channels(x)
        value = self.values.get(x)
        mean, var = channel_stats(value) if value is not None else (np.zeros(c), np.ones(c))
        if value is not None:
            # few probe values per channel (deep 1x1 maps) make a variance unreliable: shrink it
            # toward the all-channel average, weighing that like BN_PRIOR_SAMPLES extra samples
            samples = value.size // c
            var = ((samples - 1) * var + BN_PRIOR_SAMPLES * var.mean()) / (samples - 1 + BN_PRIOR_SAMPLES)
        scale = self._rand_uniform((c,), *gamma)
        bias = self._rand_normal((c,), 0.2)
        running_mean = (mean + 0.1 * np.sqrt(var) * self.rng.standard_normal(c)).astype(np.float32)
        running_var = (np.maximum(var, 1e-4) * self.rng.uniform(0.8, 1.25, c)).astype(np.float32)
        inputs = [x, self.weight(name, "weight", scale), self.weight(name, "bias", bias),
                  self.weight(name, "running_mean", running_mean), self.weight(name, "running_var", running_var)]
        per_channel = lambda a: a[None, :, None, None] if len(self.shapes[x]) == 4 else a[None, :]  # noqa: E731
        out = self._apply(x, lambda v: (v - per_channel(running_mean)) / np.sqrt(per_channel(running_var) + eps)
                          * per_channel(scale) + per_channel(bias))
        attrs = {"epsilon": eps, "momentum": 0.9}
        if self.opset < 9:
            attrs["spatial"] = 1  # opset 7-8 attribute; per-channel statistics
        return self.node("BatchNormalization", inputs, name=name, value=out, **attrs)

    def relu(self, x: str, name: str | None = "relu") -> str:
        return self.node("Relu", [x], name=name, value=self._apply(x, lambda v: np.maximum(v, 0)))

    def relu6(self, x: str, name: str | None = "relu6") -> str:
        """ReLU6 as PyTorch exports it: Clip(0, 6), bounds as attributes below opset 11 and inputs from 11."""
        value = self._apply(x, lambda v: np.clip(v, 0, 6))
        if self.opset < 11:
            return self.node("Clip", [x], name=name, value=value, min=0.0, max=6.0)
        with self._maybe_scope(name):
            bounds = [self.constant("min", 0.0), self.constant("max", 6.0)]
        return self.node("Clip", [x, *bounds], name=name, value=value)

    def hardswish(self, x: str, name: str | None = "hardswish") -> str:
        """x·ReLU6(x+3)/6: the HardSwish op from opset 14, else HardSigmoid(α=1/6, β=½)·x (same function)."""
        if self.opset >= 14:
            return self.node("HardSwish", [x], name=name, value=self._apply(x, lambda v: v * np.clip(v + 3, 0, 6) / 6))
        gate = self.node("HardSigmoid", [x], name=name, alpha=1.0 / 6.0, beta=0.5,
                         value=self._apply(x, lambda v: np.clip(v / 6 + 0.5, 0, 1)))
        return self.mul(x, gate, name=name)

    def sigmoid(self, x: str, name: str | None = None) -> str:
        return self.node("Sigmoid", [x], name=name, value=self._apply(x, lambda v: 1 / (1 + np.exp(-v))))

    def _pool(self, kind: str, x: str, k: int, stride: int | None, pad: int, ceil_mode: bool,
              name: str | None, **extra) -> str:
        n, c, h, w = self.shapes[x]
        stride = stride or k
        pads = [pad, pad, pad, pad]
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], **extra)
        out_h = _conv_out(h, k, stride, pad, pad, ceil_mode=ceil_mode)
        out_w = _conv_out(w, k, stride, pad, pad, ceil_mode=ceil_mode)
        # windows that run past the end (ceil_mode) read end padding, which max and
        # count_include_pad=0 averages ignore
        run_pads = list(pads)
        for axis, (size, out) in enumerate(((h, out_h), (w, out_w))):
            run_pads[2 + axis] += max(0, (out - 1) * stride + k - (size + 2 * pad))
        if ceil_mode and self.opset < 10:
            pads = run_pads  # ceil_mode is an opset-10 attribute; below it, extra end padding does the same
        elif ceil_mode:
            attrs["ceil_mode"] = 1
        if any(pads):
            attrs["pads"] = pads
        value = self._apply(x, lambda v: np_pool(v, kind, k, stride, run_pads, out_h, out_w))
        op = "MaxPool" if kind == "max" else "AveragePool"
        return self.node(op, [x], name=name, shape=(n, c, out_h, out_w), value=value, **attrs)

    def maxpool(self, x: str, k: int = 3, stride: int | None = None, pad: int = 0, ceil_mode: bool = False,
                name: str | None = "maxpool") -> str:
        return self._pool("max", x, k, stride, pad, ceil_mode, name)

    def avgpool(self, x: str, k: int = 2, stride: int | None = None, pad: int = 0, ceil_mode: bool = False,
                name: str | None = "avgpool") -> str:
        """AveragePool with count_include_pad = 0 (the ONNX default, and PyTorch's for ceil-mode windows)."""
        return self._pool("avg", x, k, stride, pad, ceil_mode, name)

    def global_avgpool(self, x: str, name: str | None = "avgpool") -> str:
        n, c = self.shapes[x][:2]
        return self.node("GlobalAveragePool", [x], name=name, shape=(n, c, 1, 1),
                         value=self._apply(x, lambda v: v.mean(axis=(2, 3), keepdims=True)))

    def _binary(self, op: str, a: str, b: str, fn, name: str | None) -> str:
        va, vb = self.values.get(a), self.values.get(b)
        value = None if va is None or vb is None else fn(va, vb)
        return self.node(op, [a, b], name=name, value=value)

    def add(self, a: str, b: str, name: str | None = None) -> str:
        return self._binary("Add", a, b, np.add, name)

    def mul(self, a: str, b: str, name: str | None = None) -> str:
        return self._binary("Mul", a, b, np.multiply, name)

    def concat(self, xs: Sequence[str], axis: int = 1, name: str | None = None) -> str:
        shapes = [self.shapes[x] for x in xs]
        rank = len(shapes[0])
        ax = axis % rank
        sizes = [s[ax] for s in shapes]
        total = sum(sizes) if all(isinstance(s, int) for s in sizes) else "?"
        out_shape = tuple(total if i == ax else shapes[0][i] for i in range(rank))
        values = [self.values.get(x) for x in xs]
        value = None if any(v is None for v in values) else np.concatenate(values, axis=axis)
        return self.node("Concat", list(xs), name=name, shape=out_shape, value=value, axis=axis)

    def flatten(self, x: str, axis: int = 1, name: str | None = None) -> str:
        """Flatten to 2-D: dims before ``axis`` into the first, the rest into the second."""
        shape = self.shapes[x]

        def prod(dims):
            if len(dims) == 1:
                return dims[0]  # keeps a symbolic batch name such as "N"
            return math.prod(dims) if all(isinstance(d, int) for d in dims) else "?"

        out = (prod(shape[:axis]), prod(shape[axis:]))
        value = self._apply(x, lambda v: v.reshape(math.prod(v.shape[:axis]), -1))
        return self.node("Flatten", [x], name=name, shape=out, value=value, axis=axis)

    def reshape(self, x: str, shape: str | Sequence[int], out_shape: Sequence[Dim] | None = None,
                name: str | None = None) -> str:
        """Reshape by a constant target (list) or a computed shape tensor (name of an int64 tensor)."""
        if not isinstance(shape, str):
            target = [int(d) for d in shape]
            with self._maybe_scope(name):
                shape = self.constant("shape", target, np.int64)
            if out_shape is None:
                out_shape = _reshaped(self.shapes[x], target)
        target_value = self.values.get(shape)
        value = None
        if target_value is not None:
            # ONNX Reshape: 0 copies the input dim (allowzero=0), -1 is inferred
            value = self._apply(x, lambda v: v.reshape([v.shape[i] if d == 0 else d for i, d in enumerate(target_value)]))
        return self.node("Reshape", [x, shape], name=name, value=value,
                         shape=tuple(out_shape) if out_shape is not None else ("?",))

    def shape_of(self, x: str, name: str | None = None) -> str:
        """The Shape op (int64 1-D)."""
        value = self.values.get(x)
        return self.node("Shape", [x], name=name, shape=(len(self.shapes[x]),), dtype=INT64,
                         value=None if value is None else np.array(value.shape, np.int64))

    def gather(self, x: str, index: int, axis: int = 0, name: str | None = None) -> str:
        """Gather one scalar index along ``axis`` (the index is an int64 scalar constant)."""
        with self._maybe_scope(name):
            idx = self.constant("index", index, np.int64)
        shape = self.shapes[x][:axis] + self.shapes[x][axis + 1:]
        return self.node("Gather", [x, idx], name=name, shape=shape, axis=axis,
                         value=self._apply(x, lambda v: np.take(v, index, axis=axis)))

    @_single_blas_thread
    def gemm(self, x: str, out_features: int, bias: bool = True, *, gain: float = 1.0, center: bool = False,
             name: str | None = "fc") -> str:
        """nn.Linear as PyTorch exports it: Gemm(x, W[out, in], b, transB=1).

        With ``center``, each weight row is made orthogonal to the probe's mean input
        vector and scaled to the input's variance across samples, so the outputs follow
        the input (E[(y - b)²] ≈ gain over inputs) rather than being a near-constant
        vector: use it for classifier heads.
        """
        n, in_features = self.shapes[x]
        value = self.values.get(x)
        if center and value is not None and value.shape[0] > 1:
            mean = value.mean(axis=0, dtype=np.float64)
            spread = max(float(value.var(axis=0, ddof=1, dtype=np.float64).mean()), 1e-12)
            raw = self.rng.standard_normal((out_features, in_features), dtype=np.float32).astype(np.float64)
            direction = mean / max(np.linalg.norm(mean), 1e-12)
            raw -= np.outer(raw @ direction, direction)
            weight = (raw * math.sqrt(gain / (in_features * spread))).astype(np.float32)
        else:
            weight = self._rand_normal((out_features, in_features), self._fan_in_std(x, in_features, gain))
        inputs = [x, self.weight(name, "weight", weight)]
        b = None
        if bias:
            b = self._rand_normal((out_features,), 0.1 * math.sqrt(gain))
            inputs.append(self.weight(name, "bias", b))
        out = self._apply(x, lambda v: v @ weight.T + (b if b is not None else 0))
        return self.node("Gemm", inputs, name=name, shape=(n, out_features), value=out,
                         alpha=1.0, beta=1.0, transB=1)

    @_single_blas_thread
    def matmul(self, x: str, out_features: int, *, gain: float = 1.0, name: str | None = "linear") -> str:
        """x @ W with W [in, out] (a MatMul node; add the bias with :meth:`bias_add`)."""
        shape = self.shapes[x]
        in_features = shape[-1]
        weight = self._rand_normal((in_features, out_features), self._fan_in_std(x, in_features, gain))
        w = self.weight(name, "weight", weight)
        return self.node("MatMul", [x, w], name=name, shape=(*shape[:-1], out_features),
                         value=self._apply(x, lambda v: v @ weight))

    def bias_add(self, x: str, name: str | None = "linear") -> str:
        """Add a random per-feature bias along the last axis (the Add of a MatMul+Add linear layer)."""
        features = self.shapes[x][-1]
        b = self._rand_normal((features,), 0.1 * math.sqrt(self.second_moment(x)))
        return self.node("Add", [x, self.weight(name, "bias", b)], name=name, value=self._apply(x, lambda v: v + b))

    def softmax(self, x: str, axis: int = -1, name: str | None = None) -> str:
        def softmax(v):
            e = np.exp(v - v.max(axis=axis, keepdims=True))
            return e / e.sum(axis=axis, keepdims=True)
        return self.node("Softmax", [x], name=name, axis=axis, value=self._apply(x, softmax))

    def dropout(self, x: str, ratio: float = 0.5, name: str | None = "dropout") -> str:
        """Inference Dropout (an identity in ONNX runtimes): the ratio is an attribute below opset 12, an input from 12."""
        if self.opset < 12:
            return self.node("Dropout", [x], name=name, ratio=ratio)
        with self._maybe_scope(name):
            r = self.constant("ratio", ratio)
        return self.node("Dropout", [x, r], name=name)

    def identity(self, x: str, name: str | None = None) -> str:
        return self.node("Identity", [x], name=name)

    def unsqueeze(self, x: str, axes: Sequence[int], name: str | None = None) -> str:
        """Unsqueeze with axes as attribute below opset 13 and as an int64 input from 13."""
        shape = list(self.shapes[x])
        out_rank = len(shape) + len(axes)
        for a in sorted(a % out_rank for a in axes):
            shape.insert(a, 1)
        value = self._apply(x, lambda v: np.expand_dims(v, tuple(a % out_rank for a in axes)))
        if self.opset < 13:
            return self.node("Unsqueeze", [x], name=name, shape=shape, value=value, axes=list(axes))
        with self._maybe_scope(name):
            ax = self.constant("axes", list(axes), np.int64)
        return self.node("Unsqueeze", [x, ax], name=name, shape=shape, value=value)

    # ------------------------------------------------------------------ subgraphs and output
    def subgraph(self, weights_in_parent: bool = False) -> GraphBuilder:
        """A builder for an If/Loop body: shares names, shapes, probe values and the weight generator.

        With ``weights_in_parent`` its layers store their weights in this (outer) graph, so
        the body reads outer-scope tensors, as exporters often produce.
        """
        child = GraphBuilder.__new__(GraphBuilder)
        child.__dict__.update(self.__dict__)
        child.nodes, child.initializers, child.inputs = [], [], []
        child._scope = list(self._scope)
        child._parent = self
        child._weights_in_parent = weights_in_parent
        return child

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        shape = [d if d != "?" else None for d in self.shapes[name]]
        return helper.make_tensor_value_info(name, self.dtypes[name], shape)

    def build_graph(self, outputs: dict[str, str] | Iterable[str], graph_name: str | None = None) -> onnx.GraphProto:
        """The GraphProto; ``outputs`` maps wanted output names to tensors (renamed in place)."""
        pairs = outputs.items() if isinstance(outputs, dict) else ((o, o) for o in outputs)
        names = []
        for wanted, tensor in pairs:
            if wanted != tensor:
                self._rename(tensor, wanted)
            names.append(wanted)
        return helper.make_graph(self.nodes, graph_name or self.name, self.inputs,
                                 [self._value_info(n) for n in names], initializer=self.initializers)

    def _rename(self, old: str, new: str) -> None:
        if new in self._taken:
            raise ValueError(f"cannot name an output '{new}': the name is taken")
        self._taken.add(new)
        for node in self.nodes:
            for seq in (node.input, node.output):
                for i, v in enumerate(seq):
                    if v == old:
                        seq[i] = new
        for table in (self.shapes, self.dtypes, self.values):
            table[new] = table[old]

    def build(self, outputs: dict[str, str] | Iterable[str], doc: str = "") -> onnx.ModelProto:
        """The ModelProto at ``self.opset`` with the lowest IR version that opset needs."""
        graph = self.build_graph(outputs)
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in sorted(self.extra_opsets.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxopt.models",
                                  producer_version="1", doc_string=doc)
        model.ir_version = helper.find_min_ir_version_for(opsets[:1])
        if model.ir_version < 4:
            # IR 3 (opsets 7-8) requires every initializer to be a graph input too, as old exports show
            for g in _all_graphs(model.graph):
                g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer)
        return model


def _all_graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """The graph and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_graphs(sub)
