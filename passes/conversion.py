"""Conversion passes: opset upgrade and shape annotation.

They change how the model is written down, not what it computes, so both are lossless.
The ``trt`` preset uses them: TensorRT's parser wants opset ≥ 13 (Q/DQ with per-channel
axes, Squeeze/Unsqueeze/Slice axes as inputs) and benefits from every intermediate shape
being declared.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxopt import graph as G
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import register_pass

# Lowest IR version each opset needs (onnx.helper.VERSION_TABLE, IR 7 for opset 13-14 ...).
_MIN_IR_FOR_OPSET = {op: ir for _, ir, op, *_ in onnx.helper.VERSION_TABLE}


def _min_ir(opset: int) -> int:
    known = [ir for op, ir in _MIN_IR_FOR_OPSET.items() if op <= opset]
    return max(known) if known else 3


@register_pass
class UpgradeOpset(Pass):
    name = "upgrade-opset"
    summary = "Convert the default-domain opset up to `min_opset` with onnx.version_converter (TensorRT wants ≥ 13)."
    lossless = True
    run_once = True

    @dataclass
    class Options:
        min_opset: int = 13

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        target = int(self.options.min_opset)
        if graph.opset >= target:
            return PassResult(False)
        before = graph.opset
        # Convert a weight-free copy: big constants travel as typed inputs and are put back.
        constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        skeleton = G.export_skeleton(graph, ctx.template)
        try:
            converted = version_converter.convert_version(skeleton, target)
            onnx.checker.check_model(converted)
        except Exception as exc:  # an op without an adapter, custom ops, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return PassResult(False, notes=[f"opset {before} kept: onnx.version_converter cannot reach {target}: {first}"])
        new = G.import_model(converted)
        real_inputs = {t.name for t in graph.inputs}
        for stand_in in [t for t in new.inputs if t.name not in real_inputs and t.name in constants]:
            G.replace_uses(stand_in, constants[stand_in.name])
            new.inputs.remove(stand_in)
        graph.nodes = list(new.nodes)
        graph.inputs = list(new.inputs)
        graph.outputs = list(new.outputs)
        graph.opset = target
        graph.ir_version = max(graph.ir_version or 3, _min_ir(target))
        return PassResult(True, {"opset_from": before, "opset_to": target})


@register_pass
class InferShapes(Pass):
    name = "infer-shapes"
    summary = "Declare every intermediate tensor's dtype and shape found by ONNX shape inference."
    lossless = True
    run_once = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        skeleton = G.export_skeleton(graph, ctx.template)
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
        except Exception as exc:
            return PassResult(False, notes=[f"shape inference failed: {str(exc).splitlines()[0]}"])
        infos = {vi.name: vi for vi in inferred.graph.value_info}
        annotated = 0
        for tensor in graph.tensors().values():
            info = infos.get(tensor.name)
            if not isinstance(tensor, gs.Variable) or info is None or not info.type.HasField("tensor_type"):
                continue
            tt = info.type.tensor_type
            if tensor.dtype is None and tt.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                annotated += 1
            if tensor.shape is None and tt.HasField("shape"):
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
                annotated += 1
        return PassResult(annotated > 0, {"annotations": annotated})
