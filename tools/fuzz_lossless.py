"""Differential fuzzer for the lossless presets.

Builds random, valid ONNX CNN-like graphs (random DAGs of Conv, BatchNormalization,
activations, elementwise arithmetic, Concat/Split, Transpose, Reshape, Pad, pooling, heads, ...),
runs ``onnxopt.optimize`` on each and checks that the result

* passes onnx.checker,
* keeps the input/output signature (names, element types, declared shapes),
* has no more nodes than the input,
* computes the same outputs in onnxruntime (optimizations disabled for both) up to
  rel L2 <= max(1e-5, 4 x onnxruntime's own all-vs-disabled difference), the bound
  ``onnxopt.manager`` uses for lossless passes,
* for target tensorrt, contains no com.microsoft contrib ops.

A failing graph is re-run under ``PassManager(verify_each=True)`` to name the pass that broke it.

Usage::

    python -m tools.fuzz_lossless --graphs 200 --seed 0 --target cpu
    python -m tools.fuzz_lossless --graphs 200 --seed 0 --preset trt --save-failures /tmp/fuzz
    python -m tools.fuzz_lossless --seed 0 --index 17          # re-run one graph
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opsets a graph is drawn from; the IR version onnxruntime expects for each.
OPSETS = (11, 13, 17, 21)
IR_FOR_OPSET = {11: 7, 13: 7, 17: 8, 21: 10}
# Keep tensors small so onnxruntime runs every graph in milliseconds.
MAX_ELEMENTS_PER_SAMPLE = 16 * 16 * 16 * 4
MAX_NODES = 30
BATCH_DIM = "N"  # the name of the dynamic batch dimension


# ----------------------------------------------------------------------------- graph builder
@dataclass
class Tensor:
    name: str
    shape: list  # ints, or BATCH_DIM for the dynamic batch dim (always at axis 0)
    uses: int = 0

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return int(np.prod([2 if d == BATCH_DIM else d for d in self.shape], dtype=np.int64))


@dataclass
class GraphBuilder:
    rng: np.random.Generator
    opset: int
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    extra_outputs: list = field(default_factory=list)  # tensors that are outputs and also consumed
    counter: int = 0

    # -- naming, constants
    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def const(self, array: np.ndarray, prefix: str = "w", as_node: bool | None = None) -> str:
        """A constant as an initializer or (sometimes) a Constant node."""
        name = self.fresh(prefix)
        array = np.asarray(array)
        if as_node is None:
            as_node = self.rng.random() < 0.15
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_v"),
                                               name=self.fresh("Constant")))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values, prefix: str = "c") -> str:
        return self.const(np.asarray(values, dtype=np.int64), prefix)

    def node(self, op: str, inputs: list[str], out_shapes: list[list], **attrs) -> list[Tensor]:
        outs = [Tensor(self.fresh(op.lower()), list(s)) for s in out_shapes]
        self.nodes.append(helper.make_node(op, inputs, [t.name for t in outs], name=self.fresh(op), **attrs))
        self.tensors.extend(outs)
        return outs

    def use(self, *ts: Tensor) -> list[str]:
        for t in ts:
            t.uses += 1
        return [t.name for t in ts]

    def randn(self, *shape, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    # -- picking operands
    def pick(self, want=lambda t: True) -> Tensor | None:
        """A tensor satisfying ``want``, biased towards recent ones (chains) but sometimes older (branches)."""
        cands = [t for t in self.tensors if want(t)]
        if not cands:
            return None
        if self.rng.random() < 0.6:
            return cands[-1] if self.rng.random() < 0.6 else cands[max(0, len(cands) - 1 - int(self.rng.integers(0, 3)))]
        return cands[int(self.rng.integers(0, len(cands)))]

    def static(self, t: Tensor, axes) -> bool:
        return all(t.shape[a] != BATCH_DIM for a in axes)


def _conv_out(size: int, k: int, s: int, p_total: int, d: int = 1) -> int:
    return (size + p_total - d * (k - 1) - 1) // s + 1


# Each op builder takes the GraphBuilder and returns True when it added something.
def op_conv(b: GraphBuilder, x: Tensor | None = None, kernel: int | None = None, out_ch: int | None = None) -> bool:
    x = x or b.pick(lambda t: t.rank == 4 and b.static(t, (1, 2, 3)))
    if x is None:
        return False
    rng = b.rng
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    k = kernel or int(rng.choice([1, 3]))
    s = int(rng.choice([1, 1, 2]))
    d = int(rng.choice([1, 1, 2])) if k == 3 else 1
    p = [int(rng.integers(0, k // 2 + 1)) for _ in range(4)] if rng.random() < 0.2 else [d * (k // 2)] * 4
    kind = rng.random()
    if kind < 0.2 and c_in > 1:
        group, c_out = c_in, c_in * int(rng.choice([1, 1, 2]))  # depthwise (with channel multiplier)
    elif kind < 0.3:
        divisors = [g for g in range(2, c_in + 1) if c_in % g == 0]
        group = int(rng.choice(divisors)) if divisors else 1
        c_out = group * int(rng.integers(1, max(2, 16 // group) + 1))
    else:
        group, c_out = 1, out_ch or int(rng.integers(2, 17))
    if out_ch is not None and group == 1:
        c_out = out_ch
    ho, wo = _conv_out(h, k, s, p[0] + p[2], d), _conv_out(w, k, s, p[1] + p[3], d)
    if ho < 1 or wo < 1:
        return False
    inputs = b.use(x) + [b.const(b.randn(c_out, c_in // group, k, k, scale=1 / np.sqrt(c_in * k * k / group)), "W", as_node=False)]
    if rng.random() < 0.6:
        inputs.append(b.const(b.randn(c_out, scale=0.1), "B", as_node=False))
    b.node("Conv", inputs, [[x.shape[0], c_out, ho, wo]], kernel_shape=[k, k], strides=[s, s], pads=p,
           dilations=[d, d], group=group)
    return True


def op_batchnorm(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank == 4 and b.static(t, (1,)))
    if x is None:
        return False
    c = x.shape[1]
    scale, bias = b.randn(c) + 1.0, b.randn(c, scale=0.1)
    mean, var = b.randn(c, scale=0.1), (b.rng.random(c) + 0.5).astype(np.float32)
    ins = b.use(x) + [b.const(a, "bn", as_node=False) for a in (scale, bias, mean, var)]
    b.node("BatchNormalization", ins, [x.shape], epsilon=float(b.rng.choice([1e-5, 1e-3])))
    return True


def op_activation(b: GraphBuilder) -> bool:
    x = b.pick()
    if x is None:
        return False
    rng = b.rng
    choices = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "SiLU"]
    if b.opset >= 14:
        choices.append("HardSwish")
    op = str(rng.choice(choices))
    if op == "SiLU":  # x * Sigmoid(x), the pattern PyTorch exports
        sig = b.node("Sigmoid", b.use(x), [x.shape])[0]
        b.node("Mul", b.use(x, sig) if rng.random() < 0.5 else b.use(sig, x), [x.shape])
    elif op == "LeakyRelu":
        b.node(op, b.use(x), [x.shape], alpha=float(rng.choice([0.01, 0.1, 0.2])))
    elif op == "HardSigmoid":
        b.node(op, b.use(x), [x.shape], alpha=float(rng.choice([0.2, 1 / 6])), beta=0.5)
    elif op == "Clip":  # Clip-11+: min/max are optional inputs; Relu6 is Clip(0, 6)
        lo, hi = (0.0, 6.0) if rng.random() < 0.5 else (float(-rng.random()), float(rng.random() + 0.1))
        ins = b.use(x) + [b.const(np.array(lo, np.float32), "lo")]
        if rng.random() < 0.8:
            ins.append(b.const(np.array(hi, np.float32), "hi"))
        b.node(op, ins, [x.shape])
    else:
        b.node(op, b.use(x), [x.shape])
    return True


def _const_operand_shape(b: GraphBuilder, x: Tensor) -> list[int]:
    """A shape that broadcasts against ``x`` to ``x``'s shape: per-channel, scalar or full."""
    kind = b.rng.random()
    if kind < 0.4 and x.rank == 4 and x.shape[1] != BATCH_DIM:
        return [x.shape[1], 1, 1] if b.rng.random() < 0.5 else [1, x.shape[1], 1, 1]
    if kind < 0.7:
        return [] if b.rng.random() < 0.7 else [1]
    full = [1 if d == BATCH_DIM else d for d in x.shape]
    return full[1:] if b.rng.random() < 0.5 else [1] + full[1:]


def op_binary(b: GraphBuilder) -> bool:
    rng = b.rng
    op = str(rng.choice(["Add", "Mul", "Sub", "Div"]))
    x = b.pick()
    if x is None:
        return False
    if rng.random() < 0.35:  # with another tensor of the same shape (a residual)
        others = [t for t in b.tensors if t is not x and t.shape == x.shape]
        if others:
            y = others[int(rng.integers(0, len(others)))]
            if op == "Div":  # keep the divisor away from zero
                y = b.node("Sigmoid", b.use(y), [y.shape])[0]
                y = b.node("Add", b.use(y) + [b.const(np.array(0.5, np.float32), "one")], [y.shape])[0]
                b.node("Div", b.use(x, y), [x.shape])
            else:
                b.node(op, b.use(x, y) if rng.random() < 0.5 else b.use(y, x), [x.shape])
            return True
    shape = _const_operand_shape(b, x)
    value = b.randn(*shape)
    if op == "Div":
        value = (np.sign(value) + (value == 0)) * (np.abs(value) + 0.5)
    elif op == "Mul":
        value = value + 1.0
    c = b.const(value.astype(np.float32), "k")
    x_first = op in ("Div",) or rng.random() < 0.7
    b.node(op, b.use(x) + [c] if x_first else [c] + b.use(x), [x.shape])
    return True


def op_concat(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank == 4 and b.static(t, (1,)))
    if x is None:
        return False
    same = [t for t in b.tensors if t.rank == 4 and t.shape[0] == x.shape[0] and t.shape[2:] == x.shape[2:]
            and t.shape[1] != BATCH_DIM]
    parts = [x] + [same[int(i)] for i in b.rng.integers(0, len(same), int(b.rng.integers(1, 3)))]
    if sum(p.shape[1] for p in parts) > 48:
        return False
    b.node("Concat", b.use(*parts), [[x.shape[0], sum(p.shape[1] for p in parts)] + x.shape[2:]], axis=1)
    return True


def op_split(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank >= 2 and t.shape[1] != BATCH_DIM and t.shape[1] >= 2)
    if x is None:
        return False
    c = x.shape[1]
    n = int(b.rng.integers(2, min(3, c) + 1))
    if b.rng.random() < 0.5 and c % n == 0:
        sizes, explicit = [c // n] * n, False
    else:
        cuts = sorted(b.rng.choice(np.arange(1, c), n - 1, replace=False))
        sizes, explicit = list(np.diff([0, *cuts, c]).astype(int)), True
    shapes = [[x.shape[0], int(s)] + x.shape[2:] for s in sizes]
    if not explicit and b.opset >= 18:
        b.node("Split", b.use(x), shapes, axis=1, num_outputs=n)
    elif not explicit:
        b.node("Split", b.use(x), shapes, axis=1)
    elif b.opset >= 13:
        b.node("Split", b.use(x) + [b.ints(sizes, "split")], shapes, axis=1)
    else:
        b.node("Split", b.use(x), shapes, axis=1, split=[int(s) for s in sizes])
    return True


def op_transpose(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank >= 2)
    if x is None:
        return False
    rng = b.rng
    dynamic = BATCH_DIM in x.shape
    if x.rank == 4 and rng.random() < 0.5:
        # An NHWC round trip around an op that does not care about layout, as TF exports have.
        to_nhwc = b.node("Transpose", b.use(x), [[x.shape[i] for i in (0, 2, 3, 1)]], perm=[0, 2, 3, 1])[0]
        inner = to_nhwc
        if rng.random() < 0.8:  # ops in NHWC that a transpose optimizer must move across correctly
            op = str(rng.choice(["Relu", "Sigmoid", "Add", "Softmax", "Concat", "Mul"]))
            if op in ("Add", "Mul"):
                inner = b.node(op, b.use(inner) + [b.const(b.randn(x.shape[1]), "bias_nhwc")], [inner.shape])[0]
            elif op == "Softmax":
                inner = b.node(op, b.use(inner), [inner.shape], axis=-1)[0]
            elif op == "Concat":  # channels-last concat of the tensor with itself
                shape = inner.shape[:3] + [2 * inner.shape[3]]
                inner = b.node(op, b.use(inner, inner), [shape], axis=3)[0]
            else:
                inner = b.node(op, b.use(inner), [inner.shape])[0]
        if rng.random() < 0.2:  # a channels-last output: one of the transposes cannot be cancelled
            b.extra_outputs.append(inner)
        b.node("Transpose", b.use(inner), [[inner.shape[i] for i in (0, 3, 1, 2)]], perm=[0, 3, 1, 2])
        return True
    rest = list(rng.permutation(np.arange(1, x.rank)))
    perm = [0] + rest if dynamic or rng.random() < 0.7 else list(rng.permutation(x.rank))
    perm = [int(p) for p in perm]
    b.node("Transpose", b.use(x), [[x.shape[p] for p in perm]], perm=perm)
    return True


def op_reshape(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank >= 2 and b.static(t, range(1, t.rank)))
    if x is None:
        return False
    rng = b.rng
    batch, rest = x.shape[0], x.shape[1:]
    inner = int(np.prod(rest))
    kind = rng.random()
    if kind < 0.3:
        axis = 1
        b.node("Flatten", b.use(x), [[batch, inner]], axis=axis)
        return True
    if x.rank == 4 and kind < 0.6:
        target = [batch, rest[0], rest[1] * rest[2]]
    elif x.rank == 3 and kind < 0.6 and rest[1] >= 4:
        w = next((d for d in (4, 2) if rest[1] % d == 0), None)
        if w is None:
            return False
        target = [batch, rest[0], rest[1] // w, w]
    elif x.rank == 4 and rest[0] % 2 == 0:
        target = [batch, rest[0] // 2, rest[1] * 2, rest[2]]  # channels into rows, a pixel-shuffle-like view
    else:
        target = [batch, inner]
    spec = list(target)
    spec[0] = 0 if batch == BATCH_DIM or rng.random() < 0.5 else batch  # 0 copies the input dim
    if rng.random() < 0.5:
        spec[int(rng.integers(1, len(spec)))] = -1
    b.node("Reshape", b.use(x) + [b.ints(spec, "shape")], [target])
    return True


def op_unsqueeze_squeeze(b: GraphBuilder) -> bool:
    rng = b.rng
    ones = [t for t in b.tensors if any(d == 1 for i, d in enumerate(t.shape) if i > 0) and t.rank >= 2]
    if ones and rng.random() < 0.5:  # squeeze size-1 dims (e.g. after a global pool)
        x = ones[-1] if rng.random() < 0.6 else ones[int(rng.integers(0, len(ones)))]
        axes = [i for i, d in enumerate(x.shape) if d == 1 and i > 0]
        out = [d for i, d in enumerate(x.shape) if i not in axes]
    else:
        x = b.pick(lambda t: t.rank <= 4)
        if x is None:
            return False
        a = int(rng.integers(1, x.rank + 1))
        out = x.shape[:a] + [1] + x.shape[a:]
        _axes_op(b, "Unsqueeze", x, [a], out)
        if rng.random() < 0.7:  # and back, as exporters often leave
            x = b.tensors[-1]
            axes, out = [a], x.shape[:a] + x.shape[a + 1:]
        else:
            return True
    _axes_op(b, "Squeeze", x, axes, out)
    return True


def _axes_op(b: GraphBuilder, op: str, x: Tensor, axes: list[int], out: list) -> None:
    """Squeeze/Unsqueeze: ``axes`` is an attribute before opset 13 and an input since."""
    if b.opset >= 13:
        b.node(op, b.use(x) + [b.ints(axes, "axes")], [out])
    else:
        b.node(op, b.use(x), [out], axes=axes)


def op_slice(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: any(d != BATCH_DIM and d >= 2 for d in t.shape[1:]))
    if x is None:
        return False
    rng = b.rng
    axis = int(rng.choice([i for i, d in enumerate(x.shape) if i > 0 and d != BATCH_DIM and d >= 2]))
    n = x.shape[axis]
    step = int(rng.choice([1, 1, 2, -1]))
    if step > 0:
        start = int(rng.integers(0, n - 1))
        end = int(rng.integers(start + 1, n + 1))
        size = len(range(start, end, step))
        end_spec = end if rng.random() < 0.7 else (2**62 if end == n else end - n)
        start_spec = start if rng.random() < 0.7 else start - n
    else:
        start, end = n - 1, 0
        size = len(range(start, -1, -1))
        start_spec, end_spec = -1, -(2**62)
    out = list(x.shape)
    out[axis] = size
    ins = b.use(x) + [b.ints([start_spec], "starts"), b.ints([end_spec], "ends")]
    ins.append(b.ints([axis if rng.random() < 0.5 else axis - x.rank], "axes"))
    if step != 1 or rng.random() < 0.5:
        ins.append(b.ints([step], "steps"))
    b.node("Slice", ins, [out])
    return True


def op_pad(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank == 4 and b.static(t, (2, 3)) and t.shape[2] >= 2 and t.shape[3] >= 2)
    if x is None:
        return False
    rng = b.rng
    mode = "reflect" if rng.random() < 0.35 else "constant"
    limit_h, limit_w = (x.shape[2] - 1, x.shape[3] - 1) if mode == "reflect" else (2, 2)
    ph = [int(rng.integers(0, min(2, limit_h) + 1)) for _ in range(2)]
    pw = [int(rng.integers(0, min(2, limit_w) + 1)) for _ in range(2)]
    pads = [0, 0, ph[0], pw[0], 0, 0, ph[1], pw[1]]
    out = x.shape[:2] + [x.shape[2] + sum(ph), x.shape[3] + sum(pw)]
    ins = b.use(x) + [b.ints(pads, "pads")]
    if mode == "constant" and rng.random() < 0.5:
        ins.append(b.const(np.array(0.0, np.float32), "pad_value"))
    b.node("Pad", ins, [out], mode=mode)
    return True


def op_pool(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank == 4 and b.static(t, (1, 2, 3)))
    if x is None:
        return False
    rng = b.rng
    op = str(rng.choice(["MaxPool", "AveragePool", "GlobalAveragePool"]))
    if op == "GlobalAveragePool":
        b.node(op, b.use(x), [x.shape[:2] + [1, 1]])
        return True
    k = int(rng.choice([2, 3]))
    s = int(rng.choice([1, 2]))
    p = int(rng.integers(0, k // 2 + 1))
    ho, wo = _conv_out(x.shape[2], k, s, 2 * p), _conv_out(x.shape[3], k, s, 2 * p)
    if ho < 1 or wo < 1:
        return False
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    if op == "AveragePool":
        attrs["count_include_pad"] = int(rng.integers(0, 2))
    b.node(op, b.use(x), [x.shape[:2] + [ho, wo]], **attrs)
    return True


def op_reduce_mean(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank == 4)
    if x is None:
        return False
    axes = [2, 3] if b.rng.random() < 0.7 else [1]
    keep = int(b.rng.integers(0, 2))
    out = [1 if i in axes else d for i, d in enumerate(x.shape)] if keep else [d for i, d in enumerate(x.shape) if i not in axes]
    if b.opset >= 18:
        b.node("ReduceMean", b.use(x) + [b.ints(axes, "axes")], [out], keepdims=keep)
    else:
        b.node("ReduceMean", b.use(x), [out], axes=axes, keepdims=keep)
    return True


def op_softmax(b: GraphBuilder) -> bool:
    x = b.pick(lambda t: t.rank >= 2)
    if x is None:
        return False
    # Before opset 13 Softmax flattens from ``axis`` (a softmax over all of C*H*W for axis=1 on
    # NCHW); from 13 on it is per axis. Both forms must survive every pass, including upgrade-opset.
    axis = -1 if b.rng.random() < 0.5 else x.rank - 1
    if x.rank >= 3 and b.rng.random() < 0.3:
        axis = 1
    b.node("Softmax", b.use(x), [x.shape], axis=axis)
    return True


def op_identity_dropout(b: GraphBuilder) -> bool:
    x = b.pick()
    if x is None:
        return False
    b.node("Identity" if b.rng.random() < 0.5 else "Dropout", b.use(x), [x.shape])
    return True


def op_head(b: GraphBuilder) -> bool:
    """A classifier head: Gemm, or MatMul + Add, on a rank-2 tensor (or MatMul on the last axis)."""
    rng = b.rng
    x = b.pick(lambda t: t.rank == 2 and t.shape[1] != BATCH_DIM and t.shape[1] <= 1024)
    if x is None:
        x4 = b.pick(lambda t: t.rank == 4 and b.static(t, (1,)))
        if x4 is None or rng.random() < 0.5:
            x = b.pick(lambda t: t.rank >= 2 and t.shape[-1] != BATCH_DIM)
            if x is None:
                return False
            k, m = x.shape[-1], int(rng.integers(2, 17))
            y = b.node("MatMul", b.use(x) + [b.const(b.randn(k, m, scale=1 / np.sqrt(k)), "fc")], [x.shape[:-1] + [m]])[0]
            if rng.random() < 0.6:
                b.node("Add", b.use(y) + [b.const(b.randn(m), "fcb")], [y.shape])
            return True
        x = b.node("GlobalAveragePool", b.use(x4), [x4.shape[:2] + [1, 1]])[0]
        x = b.node("Flatten", b.use(x), [x.shape[:2]], axis=1)[0]
    k, m = x.shape[1], int(rng.integers(2, 17))
    if rng.random() < 0.5:
        trans_b = int(rng.integers(0, 2))
        w = b.randn(m, k, scale=1 / np.sqrt(k)) if trans_b else b.randn(k, m, scale=1 / np.sqrt(k))
        ins = b.use(x) + [b.const(w, "gemm")]
        if rng.random() < 0.7:
            ins.append(b.const(b.randn(*([m] if rng.random() < 0.7 else [1, m])), "gemmb"))
        alpha, beta = (1.0, 1.0) if rng.random() < 0.7 else (float(rng.choice([0.5, 2.0])), float(rng.choice([0.5, 2.0])))
        b.node("Gemm", ins, [[x.shape[0], m]], transB=trans_b, alpha=alpha, beta=beta)
        if x.shape[0] != BATCH_DIM and rng.random() < 0.2:  # Gemm(A^T, B) on a (K, M) input, transA
            y = b.tensors[-1]
            t = b.node("Transpose", b.use(y), [[y.shape[1], y.shape[0]]], perm=[1, 0])[0]
            b.node("Gemm", b.use(t) + [b.const(b.randn(t.shape[0], 3), "gemm")], [[t.shape[1], 3]], transA=1)
    else:
        y = b.node("MatMul", b.use(x) + [b.const(b.randn(k, m, scale=1 / np.sqrt(k)), "fc")], [[x.shape[0], m]])[0]
        b.node("Add", (b.use(y) + [b.const(b.randn(m), "fcb")]) if rng.random() < 0.7 else
               ([b.const(b.randn(m), "fcb")] + b.use(y)), [y.shape])
    return True


def op_duplicate(b: GraphBuilder) -> bool:
    """The same op on the same input twice (CSE fodder), both results used."""
    x = b.pick()
    if x is None:
        return False
    rng = b.rng
    op = str(rng.choice(["Relu", "Sigmoid", "Add", "Transpose"]))
    if op == "Add":
        k = b.randn(1)
        c1 = b.const(k, "dup")
        c2 = c1 if rng.random() < 0.5 else b.const(k.copy(), "dup")  # equal constants under different names
        y1 = b.node("Add", b.use(x) + [c1], [x.shape])[0]
        y2 = b.node("Add", b.use(x) + [c2], [x.shape])[0]
    elif op == "Transpose" and x.rank >= 2:
        perm = [0] + [int(p) for p in rng.permutation(np.arange(1, x.rank))]
        y1 = b.node("Transpose", b.use(x), [[x.shape[p] for p in perm]], perm=perm)[0]
        y2 = b.node("Transpose", b.use(x), [[x.shape[p] for p in perm]], perm=perm)[0]
    else:
        op = "Relu" if op == "Transpose" else op
        y1 = b.node(op, b.use(x), [x.shape])[0]
        y2 = b.node(op, b.use(x), [x.shape])[0]
    b.node("Mul" if rng.random() < 0.5 else "Add", b.use(y1, y2), [y1.shape])
    return True


def op_siblings(b: GraphBuilder) -> bool:
    """Sibling 1x1 convs reading one tensor (inception/attention style), some feeding a Concat."""
    x = b.pick(lambda t: t.rank == 4 and b.static(t, (1, 2, 3)))
    if x is None:
        return False
    rng = b.rng
    outs = []
    for _ in range(int(rng.integers(2, 4))):
        c_out = int(rng.integers(2, 9))
        ins = b.use(x) + [b.const(b.randn(c_out, x.shape[1], 1, 1, scale=1 / np.sqrt(x.shape[1])), "W", as_node=False)]
        if rng.random() < 0.7:
            ins.append(b.const(b.randn(c_out, scale=0.1), "B", as_node=False))
        outs.append(b.node("Conv", ins, [[x.shape[0], c_out] + x.shape[2:]], kernel_shape=[1, 1])[0])
        if rng.random() < 0.4:
            outs[-1] = b.node("Relu", b.use(outs[-1]), [outs[-1].shape])[0]
    if rng.random() < 0.7:
        chosen = outs if rng.random() < 0.6 else outs[:2]
        b.node("Concat", b.use(*chosen), [[x.shape[0], sum(t.shape[1] for t in chosen)] + x.shape[2:]], axis=1)
    return True


def op_fusion_bait(b: GraphBuilder) -> bool:
    """Adjacent pairs the lossless fusions target, including near misses they must refuse."""
    rng = b.rng
    kind = str(rng.choice(["conv_affine", "pad_reader", "bn_reader", "gemm_affine", "conv_transpose"]))
    if kind == "conv_affine":  # Conv then a per-channel/scalar/full constant op, constant on either side
        if not op_conv(b):
            return False
        y = b.tensors[-1]
        if rng.random() < 0.3:
            b.extra_outputs.append(y)  # the Conv output is also a graph output
        op = str(rng.choice(["Add", "Sub", "Mul", "Div"]))
        value = b.randn(*_const_operand_shape(b, y))
        if op in ("Mul", "Div"):
            value = (np.sign(value) + (value == 0)) * (np.abs(value) + 0.5)
        c = b.const(value.astype(np.float32), "k")
        # Never constant / tensor: 1/x near x = 0 amplifies float rounding beyond any lossless bound.
        tensor_first = op == "Div" or rng.random() < 0.6
        b.node(op, (b.use(y) + [c]) if tensor_first else ([c] + b.use(y)), [y.shape])
        return True
    if kind == "pad_reader":  # Pad (zero, non-zero or reflect) then Conv / MaxPool / AveragePool
        x = b.pick(lambda t: t.rank == 4 and b.static(t, (1, 2, 3)))
        if x is None:
            return False
        if rng.random() < 0.5:
            x = b.node("Relu", b.use(x), [x.shape])[0]
        mode = str(rng.choice(["constant", "constant", "constant", "reflect", "edge"]))
        limit = min(x.shape[2], x.shape[3]) - 1 if mode == "reflect" else 2
        if limit < 1:
            return False
        pads = [0, 0] + [int(rng.integers(0, limit + 1)) for _ in range(2)] + [0, 0] + \
            [int(rng.integers(0, limit + 1)) for _ in range(2)]
        ins = b.use(x) + [b.ints(pads, "pads")]
        if mode == "constant" and rng.random() < 0.6:
            ins.append(b.const(np.array(0.0 if rng.random() < 0.6 else -1.5, np.float32), "pad_value"))
        out = x.shape[:2] + [x.shape[2] + pads[2] + pads[6], x.shape[3] + pads[3] + pads[7]]
        padded = b.node("Pad", ins, [out], mode=mode)[0]
        reader = str(rng.choice(["Conv", "MaxPool", "AveragePool"]))
        if reader == "Conv":
            return op_conv(b, padded)
        k, p = int(rng.choice([2, 3])), int(rng.integers(0, 2))
        ho, wo = _conv_out(out[2], k, 1, 2 * p), _conv_out(out[3], k, 1, 2 * p)
        if ho < 1 or wo < 1:
            return True
        attrs = dict(kernel_shape=[k, k], pads=[p] * 4)
        if reader == "AveragePool":
            attrs["count_include_pad"] = int(rng.integers(0, 2))
        b.node(reader, b.use(padded), [out[:2] + [ho, wo]], **attrs)
        return True
    if kind == "bn_reader":  # BatchNormalization before a Conv (padded or not) or a Gemm head
        if not op_batchnorm(b):
            return False
        y = b.tensors[-1]
        if y.rank == 4 and rng.random() < 0.6:
            return op_conv(b, y) or True
        if y.rank == 4 and b.static(y, (1, 2, 3)):
            y = b.node("Flatten", b.use(y), [[y.shape[0], int(np.prod(y.shape[1:]))]], axis=1)[0]
            return op_head(b) or True
        return True
    if kind == "gemm_affine":  # a head, then BN or a constant op on its output
        if not op_head(b):
            return False
        y = b.tensors[-1]
        if y.rank == 2 and y.shape[1] != BATCH_DIM and rng.random() < 0.5:
            m = y.shape[1]
            ins = b.use(y) + [b.const(a, "bn", as_node=False) for a in (b.randn(m) + 1, b.randn(m), b.randn(m),
                                                                       (b.rng.random(m) + 0.5).astype(np.float32))]
            b.node("BatchNormalization", ins, [y.shape])
        else:
            op = str(rng.choice(["Add", "Mul", "Sub"]))
            b.node(op, b.use(y) + [b.const(b.randn(*_const_operand_shape(b, y)) + (op == "Mul"), "k")], [y.shape])
        return True
    # ConvTranspose, optionally followed by a constant op
    x = b.pick(lambda t: t.rank == 4 and b.static(t, (1, 2, 3)))
    if x is None:
        return False
    c_in, k, s = x.shape[1], int(rng.choice([2, 3])), int(rng.choice([1, 2]))
    group = c_in if rng.random() < 0.3 else 1
    c_out = c_in if group > 1 else int(rng.integers(2, 9))
    ins = b.use(x) + [b.const(b.randn(c_in, c_out // group, k, k, scale=0.3), "WT", as_node=False)]
    if rng.random() < 0.5:
        ins.append(b.const(b.randn(c_out, scale=0.1), "BT", as_node=False))
    ho, wo = (x.shape[2] - 1) * s + k, (x.shape[3] - 1) * s + k
    y = b.node("ConvTranspose", ins, [[x.shape[0], c_out, ho, wo]], kernel_shape=[k, k], strides=[s, s],
               group=group)[0]
    if rng.random() < 0.6:
        b.node("Mul", b.use(y) + [b.const(b.randn(c_out, 1, 1) + 1, "k")], [y.shape])
    return True


def op_chain(b: GraphBuilder) -> bool:
    """Two ops of one kind back to back (fuse-consecutive and fuse-transposes fodder)."""
    rng = b.rng
    kind = str(rng.choice(["slice", "transpose", "reshape", "affine", "activation", "unsqueeze"]))
    builder = {"slice": op_slice, "transpose": op_transpose, "reshape": op_reshape, "affine": op_binary,
               "activation": op_activation, "unsqueeze": op_unsqueeze_squeeze}[kind]
    if not builder(b):
        return False
    last = b.tensors[-1]
    # Make the second op read the tensor just made: hide every other candidate for one call.
    others = b.tensors[:-1]
    b.tensors = [last]
    builder(b)
    b.tensors = others + b.tensors
    return True


def op_shape_flatten(b: GraphBuilder) -> bool:
    """PyTorch's ``x.view(x.size(0), -1)`` export: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    x = b.pick(lambda t: t.rank >= 2 and b.static(t, range(1, t.rank)))
    if x is None:
        return False
    shape = b.node("Shape", b.use(x), [[x.rank]])[0]
    batch = b.node("Gather", b.use(shape) + [b.const(np.array(0, np.int64), "idx")], [[]], axis=0)[0]
    b.tensors = [t for t in b.tensors if t not in (shape, batch)]  # int64 helpers are not data tensors
    unsq = Tensor(b.fresh("unsqueeze"), [1])
    if b.opset >= 13:
        b.nodes.append(helper.make_node("Unsqueeze", b.use(batch) + [b.ints([0], "axes")], [unsq.name], name=b.fresh("Unsqueeze")))
    else:
        b.nodes.append(helper.make_node("Unsqueeze", b.use(batch), [unsq.name], axes=[0], name=b.fresh("Unsqueeze")))
    target = Tensor(b.fresh("concat"), [2])
    b.nodes.append(helper.make_node("Concat", [unsq.name, b.ints([-1], "minus_one")], [target.name], axis=0,
                                    name=b.fresh("Concat")))
    b.node("Reshape", b.use(x) + [target.name], [[x.shape[0], int(np.prod(x.shape[1:]))]])
    return True


def op_constant_expression(b: GraphBuilder) -> bool:
    """An operand computed from constants only (fold-constants fodder), and sometimes a dead node."""
    x = b.pick(lambda t: t.rank == 4 and b.static(t, (1,)))
    if x is None:
        return False
    c = x.shape[1]
    k1 = b.const(b.randn(c, 1, 1), "ce", as_node=True)
    k2 = b.const(b.randn(1) + 2.0, "ce")
    name = b.fresh("const_expr")
    b.nodes.append(helper.make_node("Mul", [k1, k2], [name], name=b.fresh("Mul")))
    if b.rng.random() < 0.5:
        folded = b.fresh("const_expr")
        b.nodes.append(helper.make_node("Exp", [name], [folded], name=b.fresh("Exp")))
        name = folded
    b.node(str(b.rng.choice(["Add", "Mul"])), b.use(x) + [name], [x.shape])
    if b.rng.random() < 0.4:  # a node nobody reads and that is no graph output
        b.nodes.append(helper.make_node("Relu", [x.name], [b.fresh("dead")], name=b.fresh("Relu")))
    return True


OPS = [  # (builder, weight)
    (op_conv, 6), (op_batchnorm, 3), (op_activation, 6), (op_binary, 5), (op_concat, 2), (op_split, 1.5),
    (op_transpose, 2), (op_reshape, 1.5), (op_unsqueeze_squeeze, 1), (op_slice, 1.5), (op_pad, 1.5),
    (op_pool, 2), (op_reduce_mean, 1), (op_softmax, 1), (op_identity_dropout, 1.5), (op_head, 1),
    (op_duplicate, 1.5), (op_siblings, 1.5), (op_fusion_bait, 4), (op_chain, 3),
    (op_shape_flatten, 0.7), (op_constant_expression, 1),
]


def random_model(rng: np.random.Generator) -> onnx.ModelProto:
    """One random graph: 5-30 nodes over NCHW float32 tensors, sometimes with a dynamic batch."""
    opset = int(rng.choice(OPSETS))
    b = GraphBuilder(rng, opset)
    dynamic = rng.random() < 0.3
    batch = BATCH_DIM if dynamic else int(rng.integers(1, 3))
    n_inputs = 1 if rng.random() < 0.8 else 2
    inputs = []
    shape = [batch, int(rng.integers(2, 17)), int(rng.integers(4, 17)), int(rng.integers(4, 17))]
    for i in range(n_inputs):
        t = Tensor(f"input_{i}", list(shape))
        inputs.append(t)
        b.tensors.append(t)
    target = int(rng.integers(5, 31))
    weights = np.array([w for _, w in OPS], dtype=float)
    fails = 0
    while len(b.nodes) < target and fails < 200:
        builder = OPS[int(rng.choice(len(OPS), p=weights / weights.sum()))][0]
        before = (len(b.nodes), len(b.tensors))
        if not builder(b):
            fails += 1
            continue
        new = b.tensors[before[1]:]
        if len(b.nodes) > MAX_NODES or any(t.numel() > MAX_ELEMENTS_PER_SAMPLE for t in new):  # roll the op back
            del b.nodes[before[0]:]
            del b.tensors[before[1]:]
            fails += 1
            for t in b.tensors:  # recount uses from the remaining nodes
                t.uses = sum(list(n.input).count(t.name) for n in b.nodes)
            used = {n for node in b.nodes for n in node.input}
            b.initializers = [i for i in b.initializers if i.name in used]
            continue
    # Outputs: every unconsumed tensor, and sometimes a tensor from the middle of a chain too.
    outputs = [t for t in b.tensors if t.uses == 0 and t not in inputs]
    consumed = [t for t in b.tensors if t.uses > 0 and t not in inputs]
    if consumed and rng.random() < 0.3:
        outputs.append(consumed[int(rng.integers(0, len(consumed)))])
    outputs += [t for t in b.extra_outputs if t not in outputs and any(t is u for u in b.tensors)]
    if not outputs:
        outputs = [b.tensors[-1]]
    used_inputs = [t for t in inputs if t.uses > 0 or t in outputs]
    if not used_inputs:
        used_inputs = inputs[:1]
    vi = lambda t: helper.make_tensor_value_info(t.name, TensorProto.FLOAT, t.shape)
    graph = helper.make_graph(b.nodes, "fuzz", [vi(t) for t in used_inputs], [vi(t) for t in outputs],
                              initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET[opset]
    return model


# ----------------------------------------------------------------------------- checking
def make_feeds(model: onnx.ModelProto, rng: np.random.Generator, n: int = 2) -> list[dict[str, np.ndarray]]:
    """``n`` random feeds; a dynamic batch dim gets a different size in each feed."""
    feeds = []
    for k in range(n):
        feed = {}
        for inp in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else 1 + k for d in inp.type.tensor_type.shape.dim]
            feed[inp.name] = rng.standard_normal(dims).astype(np.float32)
        feeds.append(feed)
    return feeds


def draw_valid_model(seed: int, index: int, max_attempts: int = 50):
    """The first random graph for (seed, index) that passes onnx.checker and runs in onnxruntime.

    Returns (model, feeds, rejected): ``rejected`` counts the draws thrown away.
    """
    from onnxopt.runtime import run_model

    for attempt in range(max_attempts):
        rng = np.random.default_rng([seed, index, attempt])
        try:
            model = random_model(rng)
            onnx.checker.check_model(model, full_check=True)
            feeds = make_feeds(model, rng)
            run_model(model, feeds, optimization="disable")
        except Exception:
            continue
        return model, feeds, attempt
    raise RuntimeError(f"no valid graph for seed={seed} index={index} after {max_attempts} draws")


def _signature(values) -> list:
    out = []
    for v in values:
        tt = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else None
        out.append((v.name, tt.elem_type, dims))
    return out


@dataclass
class Failure:
    seed: int
    index: int
    check: str  # crash / checker / signature / node-count / numerics / contrib-op
    detail: str
    pass_name: str = "?"
    model: onnx.ModelProto | None = None

    def line(self) -> str:
        return f"FAIL seed={self.seed} index={self.index} check={self.check} pass={self.pass_name}: {self.detail}"


def noise_floor(model, feeds) -> tuple[list, float]:
    """Reference outputs (optimizations off) and onnxruntime's own all-vs-disabled rel L2."""
    from onnxopt.metrics import compare
    from onnxopt.runtime import run_model

    ref = run_model(model, feeds, optimization="disable")
    opt = run_model(model, feeds, optimization="all")
    return ref, max((compare(r[k], o[k])["rel_l2"] for r, o in zip(ref, opt) for k in r), default=0.0)


def check_one(seed: int, index: int, preset: str, target: str, pass_factory=None) -> tuple[list[Failure], int, int, int, list[str]]:
    """Optimize graph (seed, index) and check it.

    Returns (failures, rejected draws, nodes before, nodes after, names of the passes that changed the graph).
    """
    import onnxopt
    from onnxopt.manager import LOSSLESS_REL_L2
    from onnxopt.metrics import compare
    from onnxopt.runtime import run_model

    from onnxopt.presets import preset_passes

    pass_factory = pass_factory or preset_passes
    model, feeds, rejected = draw_valid_model(seed, index)
    fails: list[Failure] = []
    fail = lambda check, detail, pass_name="?": fails.append(Failure(seed, index, check, detail, pass_name, model))
    try:
        result = onnxopt.optimize(model, passes=pass_factory(preset, target), target=target)
        out = result.model
        changed_passes = sorted({r.name for r in result.records if r.changed})
    except Exception as exc:
        fail("crash", " ".join(str(exc).split())[:300], getattr(exc, "pass_name", "?"))
        return fails, rejected, len(model.graph.node), -1, []
    try:
        onnx.checker.check_model(out)
    except Exception as exc:
        fail("checker", str(exc).strip().splitlines()[0][:300])
    if _signature(out.graph.input) != _signature(model.graph.input) or \
            _signature(out.graph.output) != _signature(model.graph.output):
        fail("signature", f"inputs {_signature(model.graph.input)} -> {_signature(out.graph.input)}; "
                          f"outputs {_signature(model.graph.output)} -> {_signature(out.graph.output)}")
    # upgrade-opset may have to expand a node to keep its meaning (onnx's version converter turns an
    # opset-11 Softmax over axis 1 into Flatten + Softmax + Reshape); that growth is allowed.
    allowed = len(model.graph.node) + sum(max(0, r.nodes_after - r.nodes_before) for r in result.records
                                          if r.name == "upgrade-opset")
    if len(out.graph.node) > allowed:
        grew = sorted({r.name for r in result.records if r.nodes_after > r.nodes_before})
        fail("node-count", f"{len(model.graph.node)} -> {len(out.graph.node)} nodes", ",".join(grew) or "?")
    if target == "tensorrt":
        contrib = sorted({f"{n.domain}.{n.op_type}" for n in out.graph.node if n.domain == "com.microsoft"})
        if contrib:
            fail("contrib-op", f"com.microsoft ops for tensorrt: {contrib}")
    ref, noise = noise_floor(model, feeds)
    bound = max(LOSSLESS_REL_L2, 4 * noise)
    try:
        got = run_model(out, feeds, optimization="disable")
    except Exception as exc:
        fail("numerics", f"onnxruntime cannot run the result: {str(exc).splitlines()[0][:300]}")
    else:
        worst, worst_name = 0.0, ""
        for r, g in zip(ref, got):
            for k in r:
                rel = compare(r[k], g.get(k, np.zeros(0)))["rel_l2"]
                if rel > worst:
                    worst, worst_name = rel, k
        if not worst <= bound:
            fail("numerics", f"rel_l2={worst:.3g} on output '{worst_name}' (bound {bound:.3g})")
    if fails:
        culprit = bisect(model, feeds, pass_factory(preset, target), target)
        for f in fails:
            if f.pass_name == "?":
                f.pass_name = culprit
    return fails, rejected, len(model.graph.node), len(out.graph.node), changed_passes


def bisect(model, feeds, passes, target: str) -> str:
    """The first of ``passes`` that breaks the model under ``verify_each`` (checker or numerics)."""
    import onnxopt

    try:
        onnxopt.PassManager(passes, verify_each=True, verify_feeds=feeds).run(
            model, onnxopt.PassContext(target=target))
    except Exception as exc:
        name = getattr(exc, "pass_name", None)
        if name:
            return name
        text = " ".join(str(exc).split())
        return text[:120]
    return "(no single pass: verify_each passes)"


# ----------------------------------------------------------------------------- driver
def _work(args):
    seed, index, preset, target, pass_factory = args
    try:
        return index, *check_one(seed, index, preset, target, pass_factory)
    except Exception as exc:  # the fuzzer itself broke: report, do not hide
        return index, [Failure(seed, index, "fuzzer-error", f"{type(exc).__name__}: {exc}")], 0, 0, 0, []


def run_fuzz(graphs: int, seed: int, preset: str = "lossless", target: str | None = None, *, jobs: int = 1,
             save_failures: str | None = None, indices=None, log=print, pass_factory=None) -> dict:
    """Fuzz ``graphs`` random graphs (or the given ``indices``); log one line per failure and return a summary.

    ``pass_factory(preset, target) -> list[Pass]`` picks the passes (default: the preset's);
    tests use it to check that a broken pass is caught. It must be picklable when ``jobs > 1``.
    """
    from onnxopt.presets import resolve_target

    target = resolve_target(preset, target)
    todo = [(seed, i, preset, target, pass_factory) for i in (indices if indices is not None else range(graphs))]
    start = time.perf_counter()
    failures: list[Failure] = []
    rejected = nodes_in = nodes_out = 0
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_work, todo, chunksize=2))
    else:
        results = map(_work, todo)
    coverage: dict[str, int] = {}
    for index, fails, rej, n_in, n_out, changed in results:
        for name in changed:
            coverage[name] = coverage.get(name, 0) + 1
        rejected += rej
        nodes_in += n_in
        nodes_out += max(n_out, 0)
        for f in fails:
            log(f.line())
            failures.append(f)
            if save_failures and f.model is not None:
                os.makedirs(save_failures, exist_ok=True)
                onnx.save_model(f.model, os.path.join(save_failures, f"{preset}_{target}_seed{seed}_index{index}.onnx"))
    summary = {"graphs": len(todo), "rejected_draws": rejected, "failures": len(failures),
               "failing_graphs": len({f.index for f in failures}), "nodes_in": nodes_in, "nodes_out": nodes_out,
               "seconds": round(time.perf_counter() - start, 1), "failure_list": failures, "coverage": coverage}
    by_kind: dict[tuple[str, str], int] = {}
    for f in failures:
        by_kind[(f.check, f.pass_name)] = by_kind.get((f.check, f.pass_name), 0) + 1
    log(f"fuzz {preset}/{target} seed={seed}: {summary['graphs']} graphs ({rejected} invalid draws redrawn), "
        f"{summary['failures']} failures in {summary['failing_graphs']} graphs, nodes {nodes_in} -> {nodes_out}, "
        f"{summary['seconds']} s")
    log("  graphs each pass changed: " + ", ".join(f"{k} {v}" for k, v in sorted(coverage.items(), key=lambda kv: -kv[1])))
    for (check, pass_name), n in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        log(f"  {n:4d} x {check} in {pass_name}")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fuzz_lossless", description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", type=int, default=100, help="number of random graphs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", type=int, action="append", help="re-run only this graph index (repeatable)")
    ap.add_argument("--target", choices=["cpu", "tensorrt", "cuda"], default=None)
    ap.add_argument("--preset", choices=["lossless", "trt"], default="lossless")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--save-failures", metavar="DIR", help="write each failing input model here")
    args = ap.parse_args(argv)
    summary = run_fuzz(args.graphs, args.seed, args.preset, args.target, jobs=args.jobs,
                       save_failures=args.save_failures, indices=args.index)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
