"""Loading and saving ONNX models safely.

* ``load_model`` turns every way a file can be wrong into one :class:`UserInputError`.
* ``save_model`` writes to a temporary file in the target folder and renames it into
  place, so a crash never leaves a partial output; models whose tensors exceed the
  2 GB protobuf limit are written with ONNX external data automatically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError

from .errors import UserInputError

PROTOBUF_LIMIT = 2**31 - 1
# Initializers larger than this go to the external data file when saving externally.
EXTERNAL_DATA_THRESHOLD = 1024


_FOUR_BIT_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Payload bytes from dims and dtype (reading ``raw_data`` would copy gigabytes)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        for kv in t.external_data:
            if kv.key == "length":
                return int(kv.value)
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return t.ByteSize()
    n = 1
    for d in t.dims:
        n *= d
    try:
        bits = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8
    except Exception:
        bits = 32
    if t.data_type in _FOUR_BIT_TYPES:
        bits = 4
    return (n * bits + 7) // 8


def iter_proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A GraphProto and, recursively, every subgraph in its nodes' GRAPH/GRAPHS attributes."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_proto_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from iter_proto_graphs(sub)


def tensor_payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer and Constant attribute, subgraphs included."""
    return sum(tensor_nbytes(t) for g in iter_proto_graphs(model.graph) for t in _graph_tensors(g))


def _graph_tensors(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserInputError(f"{what} '{path}' does not exist.", "check the path and spelling.")
    if path.is_dir():
        raise UserInputError(f"{what} '{path}' is a directory, not an .onnx file.", "pass the path of the .onnx file inside it.")
    if path.stat().st_size == 0:
        raise UserInputError(f"{what} '{path}' is an empty file.", "re-export or re-download the model.")


def load_model(path: str | os.PathLike, *, check: bool = True, what: str = "model") -> onnx.ModelProto:
    """Load a model (with its external data) or raise one clear UserInputError."""
    path = Path(path)
    _check_readable_file(path, what)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(
            f"{what} '{path}' is not a valid ONNX protobuf ({type(exc).__name__}); the file may be truncated or not ONNX.",
            "re-export the model or re-download it completely.",
        ) from None
    except OSError as exc:
        raise UserInputError(f"cannot read {what} '{path}': {exc.strerror or exc}.", "check the file's permissions.") from None
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise UserInputError(
            f"{what} '{path}' parsed but holds no ONNX graph; it is probably not an ONNX model.",
            "pass an .onnx file exported by a framework converter.",
        )
    if not model.opset_import:
        raise UserInputError(f"{what} '{path}' declares no opset import.", "re-export the model with an explicit opset.")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (FileNotFoundError, OSError) as exc:
        raise UserInputError(
            f"{what} '{path}' uses external data that cannot be read ({exc}).",
            "keep the external data file(s) next to the .onnx file, with the names it was saved with.",
        ) from None
    except Exception as exc:  # onnx raises ValidationError for paths outside the model folder
        raise UserInputError(f"{what} '{path}' has invalid external data references ({exc}).", "re-save the model with onnx.save_model.") from None
    if check:
        check_model(model, what=f"{what} '{path}'")
    return model


def check_model(model: onnx.ModelProto, *, what: str = "model", full: bool = False) -> None:
    """Run onnx.checker; over 2 GB on a payload-free copy whose big tensors point into a sparse file."""
    try:
        if tensor_payload_bytes(model) > PROTOBUF_LIMIT:
            with tempfile.TemporaryDirectory() as tmp:
                p = os.path.join(tmp, "m.onnx")
                with open(os.path.join(tmp, "m.data"), "wb") as data:
                    light = _externalized_copy(model, "m.data", data, write_payload=False)
                    data.truncate(data.tell())  # sparse: the checker only needs the file to be large enough
                onnx.save_model(light, p)
                onnx.checker.check_model(p, full_check=full)
        else:
            onnx.checker.check_model(model, full_check=full)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown reason"
        raise UserInputError(
            f"{what} fails onnx.checker: {first}",
            "repair or re-export the model so that onnx.checker.check_model accepts it.",
        ) from None


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` atomically; external data is used when forced or when the model is over 2 GB.

    The external data file is named ``<output name>.data`` and is written next to the model.
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise UserInputError(f"output '{path}' is a directory.", "give a file name such as out.onnx.")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise UserInputError(f"output folder '{folder}' does not exist.", "create it first or choose another output path.")
    if external_data is None:
        external_data = tensor_payload_bytes(model) > PROTOBUF_LIMIT - 64 * 1024 * 1024
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".onnxopt-") as tmp:
        tmp_model = Path(tmp) / path.name
        if external_data:
            tmp_data = Path(tmp) / data_name
            with open(tmp_data, "wb") as data:
                light = _externalized_copy(model, data_name, data)
            onnx.save_model(light, str(tmp_model))
            os.replace(tmp_data, folder / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, path)
    return path


def copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything in ``model`` except the main graph's initializers (cheap: no weights)."""
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            copy_proto_field(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            copy_proto_field(light.graph, field, value)
    return light


def copy_proto_field(target, field, value) -> None:
    if field.is_repeated:  # protobuf >= 5 (FieldDescriptor.label is gone in 7)
        getattr(target, field.name).extend(value)
    elif field.message_type is not None:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _externalized_copy(model: onnx.ModelProto, location: str, data, *, write_payload: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers over EXTERNAL_DATA_THRESHOLD bytes are
    references into ``data`` (an open binary file named ``location``), per the ONNX external
    data spec (location/offset/length). The caller's model is not modified, and no full copy of
    the weights is made: onnx.save_model(save_as_external_data=True) would rewrite the caller's
    tensors in place. With ``write_payload=False`` only the file's size is reserved (checker use).
    """
    light = copy_without_initializers(model)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor_nbytes(tensor) <= EXTERNAL_DATA_THRESHOLD \
                or tensor.data_type == onnx.TensorProto.STRING:
            light.graph.initializer.append(tensor)
            continue
        payload_len = tensor_nbytes(tensor)
        offset = data.tell()
        if write_payload:
            raw = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
            data.write(raw)
            payload_len = len(raw)
        else:
            data.seek(offset + payload_len)
        ref = light.graph.initializer.add()
        ref.name = tensor.name
        ref.data_type = tensor.data_type
        ref.dims.extend(tensor.dims)
        ref.doc_string = tensor.doc_string
        ref.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(payload_len))):
            entry = ref.external_data.add()
            entry.key, entry.value = key, value
        # keep 4 KiB alignment so the runtime can memory-map tensors
        pad = (-data.tell()) % 4096
        if pad and write_payload:
            data.write(b"\0" * pad)
        elif pad:
            data.seek(data.tell() + pad)
    return light


def file_size(path: str | os.PathLike) -> int:
    """Size of a model on disk including its external data files."""
    path = Path(path)
    total = path.stat().st_size
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    seen = {kv.value for g in iter_proto_graphs(m.graph) for t in g.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL for kv in t.external_data if kv.key == "location"}
    for loc in seen:
        p = path.parent / loc
        if p.exists():
            total += p.stat().st_size
    return total
