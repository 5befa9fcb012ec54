"""Model statistics: opsets, inputs/outputs, op histogram, parameters and MACs.

MACs (multiply-accumulates) are counted for the ops that dominate compute:
Conv/ConvTranspose (grouped and depthwise included), Gemm, MatMul (batched,
broadcast), their quantized and onnxruntime-fused forms, RNN/GRU/LSTM, and
BatchNormalization (one multiply-add per output element). Shapes come from ONNX
shape inference with data propagation, run on a copy of the model whose large
tensors are stubbed out (dims kept, data dropped), so it is quick and works for
models over 2 GB. Dims that stay unknown are counted as 1 and the layer is marked
``approximate``.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from .graph import DEFAULT_DOMAINS
from .io import iter_proto_graphs, tensor_nbytes

# Tensors larger than this lose their data in the copy used for shape inference.
# Shape-like constants that data propagation reads (Reshape targets, Slice starts) are far smaller.
_STUB_BYTES = 64 * 1024

Dims = list[int | None] | None  # None: unknown rank; a None dim: unknown size


# --------------------------------------------------------------------------- shape inference
def _stub_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_location == onnx.TensorProto.EXTERNAL or tensor_nbytes(t) <= _STUB_BYTES:
        return t
    stub = onnx.TensorProto()
    stub.name = t.name
    stub.data_type = t.data_type
    stub.dims.extend(t.dims)
    return stub


def _stub_graph(src: onnx.GraphProto) -> onnx.GraphProto:
    g = onnx.GraphProto()
    g.name = src.name
    g.doc_string = src.doc_string
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    g.initializer.extend(_stub_tensor(t) for t in src.initializer)
    for node in src.node:
        copy = g.node.add()
        copy.op_type, copy.domain, copy.name = node.op_type, node.domain, node.name
        copy.input.extend(node.input)
        copy.output.extend(node.output)
        if node.overload:
            copy.overload = node.overload
        for a in node.attribute:
            new = copy.attribute.add()
            if a.type == onnx.AttributeProto.GRAPH:
                new.name, new.type = a.name, a.type
                new.g.CopyFrom(_stub_graph(a.g))
            elif a.type == onnx.AttributeProto.GRAPHS:
                new.name, new.type = a.name, a.type
                for sg in a.graphs:
                    new.graphs.add().CopyFrom(_stub_graph(sg))
            elif a.type == onnx.AttributeProto.TENSOR:
                new.name, new.type = a.name, a.type
                new.t.CopyFrom(_stub_tensor(a.t))
            else:
                new.CopyFrom(a)
    return g


def _skeleton(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy of the model without the data of large tensors (dims kept), with ``input_shapes`` set."""
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    sk.graph.CopyFrom(_stub_graph(model.graph))
    for g in iter_proto_graphs(sk.graph):
        for node in g.node:
            _as_standard_twin(node)
    if input_shapes:
        _set_input_shapes(sk.graph, input_shapes)
    return sk


# onnxruntime's fused contrib ops have the output shape of the standard op they extend (the fused
# activation, and FusedConv's optional residual input Z, do not change it), which onnx's shape
# inference knows: (standard op, its attributes, its input count).
_STANDARD_TWINS = {
    "FusedConv": ("Conv", {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}, 3),
    "FusedGemm": ("Gemm", {"alpha", "beta", "transA", "transB"}, 3),
}


def _as_standard_twin(node: onnx.NodeProto) -> None:
    """Rewrite a com.microsoft FusedConv/FusedGemm in the inference skeleton as its standard op,
    so that shapes (and MACs) downstream of onnxruntime's fusions stay known."""
    twin = _STANDARD_TWINS.get(node.op_type) if node.domain == "com.microsoft" else None
    if twin is None:
        return
    op, attributes, inputs = twin
    kept = [a for a in node.attribute if a.name in attributes]
    del node.attribute[:]
    node.attribute.extend(kept)
    del node.input[inputs:]
    node.op_type, node.domain = op, ""


def _set_input_shapes(graph: onnx.GraphProto, input_shapes: dict[str, tuple[int, ...]]) -> None:
    """Make the given inputs static; a symbolic dim they fix (e.g. 'batch') gets that size in every input."""
    symbols: dict[str, int] = {}
    by_name = {vi.name: vi for vi in graph.input}
    for name, shape in input_shapes.items():
        vi = by_name.get(name)
        if vi is None or vi.type.WhichOneof("value") != "tensor_type":
            continue
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and len(dims) == len(shape):
            for d, size in zip(dims, shape):
                if d.HasField("dim_param"):
                    symbols.setdefault(d.dim_param, int(size))
        vi.type.tensor_type.shape.Clear()
        for size in shape:
            vi.type.tensor_type.shape.dim.add().dim_value = int(size)
    for vi in graph.input:
        if vi.name not in input_shapes and vi.type.WhichOneof("value") == "tensor_type":
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in symbols:
                    d.dim_value = symbols[d.dim_param]


def _dims_of(type_proto: onnx.TypeProto) -> Dims:
    if type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else None
            for d in type_proto.tensor_type.shape.dim]


def _shape_table(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
                 ) -> tuple[dict[str, Dims], list[str]]:
    """Every known tensor shape (all graphs), and notes on what limited inference."""
    notes = []
    inferred = _skeleton(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(inferred, data_prop=True)
    except Exception as exc:  # inference is best effort; declared shapes remain
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        notes.append(f"shape inference failed ({first[:160]}); only declared shapes were used")
    shapes: dict[str, Dims] = {}
    for g in iter_proto_graphs(inferred.graph):
        for t in g.initializer:
            shapes.setdefault(t.name, list(t.dims))
        for node in g.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        shapes.setdefault(node.output[0], list(a.t.dims))
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            dims = _dims_of(vi.type)
            if dims is not None or vi.name not in shapes:
                shapes.setdefault(vi.name, dims)
    return shapes, notes


# --------------------------------------------------------------------------- MAC formulas
def _numel(dims) -> tuple[int, bool]:
    """Product of dims with unknown ones as 1, and whether any was unknown."""
    total, unknown = 1, False
    for d in dims:
        if d is None:
            unknown = True
        else:
            total *= int(d)
    return total, unknown


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _conv_output_spatial(node, x: list, w: list) -> list | None:
    """Conv output spatial dims from the attributes (ONNX Conv spec), when inference gave none."""
    if x is None or w is None or len(x) < 3:
        return None
    spatial = x[2:]
    k = w[2:]
    n = len(spatial)
    strides = list(_attr(node, "strides", [1] * n))
    dilations = list(_attr(node, "dilations", [1] * n))
    pads = list(_attr(node, "pads", [0] * 2 * n))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    out = []
    for i in range(n):
        if spatial[i] is None or k[i] is None:
            out.append(None)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-spatial[i] // strides[i]))
        else:
            pad = 0 if auto_pad == "VALID" else pads[i] + pads[i + n]
            out.append((spatial[i] + pad - dilations[i] * (k[i] - 1) - 1) // strides[i] + 1)
    return out


def _conv_macs(node, shape_of, x_index: int, w_index: int) -> tuple[int, bool] | None:
    # Each output element of Conv sums C/group * prod(kernel) products: W is (M, C/group, k1, k2, ...).
    x, w, y = shape_of(node.input[x_index]), shape_of(node.input[w_index]), shape_of(node.output[0])
    if w is None:
        return None
    if y is None:
        spatial = _conv_output_spatial(node, x, w)
        if spatial is None:
            return None
        y = [x[0], w[0], *spatial]
    per_output, u1 = _numel(w[1:])
    outputs, u2 = _numel(y)
    return outputs * per_output, u1 or u2


def _conv_transpose_macs(node, shape_of) -> tuple[int, bool] | None:
    # ConvTranspose scatters every input element onto M/group * prod(kernel) outputs: W is (C, M/group, k...).
    x, w = shape_of(node.input[0]), shape_of(node.input[1])
    if x is None or w is None:
        return None
    inputs, u1 = _numel(x)
    per_input, u2 = _numel(w[1:])
    return inputs * per_input, u1 or u2


def _gemm_macs(node, shape_of, a_index: int = 0, b_index: int = 1) -> tuple[int, bool] | None:
    a, b = shape_of(node.input[a_index]), shape_of(node.input[b_index])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
    n = b[0] if _attr(node, "transB", 0) else b[1]
    return _numel([m, k, n])


def _matmul_macs(node, shape_of, a_index: int = 0, b_index: int = 1, trans_a: bool = False, trans_b: bool = False
                 ) -> tuple[int, bool] | None:
    # numpy matmul semantics: 1-D operands are promoted, leading dims broadcast; each output element sums K products.
    a, b = shape_of(node.input[a_index]), shape_of(node.input[b_index])
    if a is None or b is None or not a or not b:
        return None
    a, b = list(a), list(b)
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    if trans_a:
        a[-2], a[-1] = a[-1], a[-2]
    if trans_b:
        b[-2], b[-1] = b[-1], b[-2]
    batch_a, batch_b = a[:-2], b[:-2]
    rank = max(len(batch_a), len(batch_b))
    batch_a = [1] * (rank - len(batch_a)) + batch_a
    batch_b = [1] * (rank - len(batch_b)) + batch_b
    batch = []
    for da, db in zip(batch_a, batch_b):
        if da is None or db is None:
            batch.append(da if db == 1 else db if da == 1 else None)
        else:
            batch.append(max(da, db))
    k = a[-1] if a[-1] is not None else b[-2]
    return _numel(batch + [a[-2], k, b[-1]])


def _matmul_nbits_macs(node, shape_of) -> tuple[int, bool] | None:
    # com.microsoft MatMulNBits: A (..., K) times a packed (N, K) weight; K and N are attributes.
    a = shape_of(node.input[0])
    k, n = _attr(node, "K"), _attr(node, "N")
    if a is None or k is None or n is None:
        return None
    rows, unknown = _numel(a[:-1])
    return rows * int(k) * int(n), unknown


def _rnn_macs(node, shape_of) -> tuple[int, bool] | None:
    # Per time step and batch row: W (D, G*H, I) @ x and R (D, G*H, H) @ h, G = 1 (RNN), 3 (GRU), 4 (LSTM).
    x, w, r = shape_of(node.input[0]), shape_of(node.input[1]), shape_of(node.input[2])
    if x is None or w is None or r is None or len(x) != 3:
        return None
    seq, batch = (x[1], x[0]) if _attr(node, "layout", 0) == 1 else (x[0], x[1])
    steps, u1 = _numel([seq, batch])
    weights, u2 = _numel(w)
    recurrent, u3 = _numel(r)
    return steps * (weights + recurrent), u1 or u2 or u3


def _elementwise_macs(node, shape_of) -> tuple[int, bool] | None:
    # BatchNormalization at inference is y = x * scale' + shift': one multiply-add per element.
    y = shape_of(node.output[0]) or shape_of(node.input[0])
    return None if y is None else _numel(y)


_FORMULAS: dict[tuple[str, str], Callable] = {
    ("", "Conv"): lambda n, s: _conv_macs(n, s, 0, 1),
    ("", "ConvInteger"): lambda n, s: _conv_macs(n, s, 0, 1),
    ("", "QLinearConv"): lambda n, s: _conv_macs(n, s, 0, 3),
    ("com.microsoft", "FusedConv"): lambda n, s: _conv_macs(n, s, 0, 1),
    ("com.microsoft", "NhwcConv"): lambda n, s: _conv_macs(n, s, 0, 1),
    ("", "ConvTranspose"): _conv_transpose_macs,
    ("", "Gemm"): _gemm_macs,
    ("com.microsoft", "FusedGemm"): _gemm_macs,
    ("com.microsoft", "QGemm"): lambda n, s: _gemm_macs(n, s, 0, 3),
    ("", "MatMul"): _matmul_macs,
    ("", "MatMulInteger"): _matmul_macs,
    ("", "QLinearMatMul"): lambda n, s: _matmul_macs(n, s, 0, 3),
    ("com.microsoft", "FusedMatMul"): lambda n, s: _matmul_macs(n, s, trans_a=bool(_attr(n, "transA", 0)),
                                                                  trans_b=bool(_attr(n, "transB", 0))),
    ("com.microsoft", "MatMulNBits"): _matmul_nbits_macs,
    ("", "RNN"): _rnn_macs,
    ("", "GRU"): _rnn_macs,
    ("", "LSTM"): _rnn_macs,
    ("", "BatchNormalization"): _elementwise_macs,
}


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _count(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[int, list[dict], list[str]]:
    shapes, notes = _shape_table(model, input_shapes)

    def shape_of(name: str) -> Dims:
        return shapes.get(name) if name else None

    layers = []
    unknown_shape_ops = Counter()
    approximate = 0
    loop_bodies = 0

    def visit(g: onnx.GraphProto, prefix: str, in_loop: bool):
        nonlocal approximate, loop_bodies
        for index, node in enumerate(g.node):
            name = prefix + (node.name or (node.output[0] if node.output else f"{node.op_type}_{index}"))
            domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
            formula = _FORMULAS.get((domain, node.op_type))
            if formula is not None:
                counted = formula(node, shape_of)
                if counted is None:
                    unknown_shape_ops[node.op_type] += 1
                else:
                    macs, unknown = counted
                    layer = {"node": name, "op": _op_label(node), "macs": int(macs)}
                    if unknown:
                        layer["approximate"] = True
                        approximate += 1
                    layers.append(layer)
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
                for sg in subs:
                    looped = node.op_type in ("Loop", "Scan")
                    if looped:
                        loop_bodies += 1
                    visit(sg, f"{name}/{a.name}/", in_loop or looped)

    visit(model.graph, "", False)
    if approximate:
        notes.append(f"{approximate} layer(s) have unknown (dynamic) dims that were counted as 1; "
                     "give static shapes (e.g. --input-shape) for exact MACs")
    if unknown_shape_ops:
        notes.append("no shape known for " + ", ".join(f"{n} {op}" for op, n in unknown_shape_ops.most_common())
                     + " node(s); their MACs are not counted")
    if loop_bodies:
        notes.append(f"{loop_bodies} Loop/Scan bodies are counted for one iteration")
    return sum(layer["macs"] for layer in layers), layers, notes


def count_macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[int, list[dict]]:
    """Total MACs and per-layer ``{"node", "op", "macs"[, "approximate"]}`` entries.

    ``input_shapes`` (e.g. ``{"x": (1, 3, 224, 224)}``) makes dynamic inputs static first.
    """
    total, layers, _ = _count(model, input_shapes)
    return total, layers


# --------------------------------------------------------------------------- parameters and I/O
# Element types packed two per byte.


def _dtype_name(elem_type: int) -> str:
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        return "string" if dtype.kind == "O" else dtype.name
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _describe_type(t: onnx.TypeProto) -> str:
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        return _dtype_name(t.tensor_type.elem_type)
    if kind == "sequence_type":
        return f"sequence<{_describe_type(t.sequence_type.elem_type)}>"
    if kind == "optional_type":
        return f"optional<{_describe_type(t.optional_type.elem_type)}>"
    if kind == "map_type":
        return f"map<{_dtype_name(t.map_type.key_type)},{_describe_type(t.map_type.value_type)}>"
    return kind or "unknown"


def _describe_value(vi: onnx.ValueInfoProto) -> dict:
    shape = None
    if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.HasField("shape"):
        shape = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]
    return {"name": vi.name, "dtype": _describe_type(vi.type), "shape": shape}


def model_stats(model: onnx.ModelProto, path: str | os.PathLike | None = None,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """A JSON-ready summary of the model (see the module doc for how MACs are counted).

    ``input_shapes`` makes dynamic inputs static for the MAC count; the listed inputs keep their declared shapes.
    """
    initializer_names = {t.name for t in model.graph.initializer}
    ops: Counter = Counter()
    params = 0
    param_bytes = 0
    graphs = 0
    for g in iter_proto_graphs(model.graph):
        graphs += 1
        for t in g.initializer:
            params += _numel(t.dims)[0]
            param_bytes += tensor_nbytes(t)
        for st in g.sparse_initializer:
            params += _numel(st.values.dims)[0]
            param_bytes += tensor_nbytes(st.values) + tensor_nbytes(st.indices)
        for node in g.node:
            ops[_op_label(node)] += 1
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        params += _numel(a.t.dims)[0]
                        param_bytes += tensor_nbytes(a.t)
    total_macs, layers, notes = _count(model, input_shapes)
    stats = {
        "ir_version": int(model.ir_version),
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "inputs": [_describe_value(vi) for vi in model.graph.input if vi.name not in initializer_names],
        "outputs": [_describe_value(vi) for vi in model.graph.output],
        "nodes": sum(ops.values()),
        "subgraphs": graphs - 1,
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": int(params),
        "parameter_bytes": int(param_bytes),
        "macs": int(total_macs),
        "macs_per_layer": layers,
        "macs_notes": notes,
    }
    if path is not None:
        from .io import file_size

        stats["file_size"] = int(file_size(path))
    return stats
