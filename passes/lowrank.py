"""Low-rank weight decomposition: one heavy layer becomes a chain of cheaper ones (lossy).

Passes (the math lives in onnxopt/lowrank_math.py):
* ``svd``: Gemm / MatMul with a constant weight, and 1×1 Conv → two products of rank r.
* ``spatial-svd``: k×k Conv → k×1 Conv (C→r), then 1×k Conv (r→T) (Jaderberg et al. 2014).
* ``tucker2``: Conv → 1×1 (C→r_in), k×k (r_in→r_out, original stride/pad/dilation), 1×1
  (r_out→T) (Kim et al. 2016).
* ``cp``: Conv → 1×1 (C→r), depthwise k×1, depthwise 1×k, 1×1 (r→T) (Lebedev et al. 2015).

Ranks, in order of precedence: ``rank`` (an integer, or a fraction of the full rank),
``energy`` (share of the squared singular values kept), ``method=vbmf`` (empirical VBMF, as
Kim et al.); with none of them, the search in passes/lowrank_search.py picks per-layer ranks
for the largest measured latency saving within ``--tolerance`` (else the ``accuracy`` budget).

A decomposition that does not cut the layer's multiply-accumulates by ``max_macs`` or (target
cpu) is not measured ``min_speedup`` faster than the layer in onnxruntime is not applied:
CP and Tucker on small layers are often slower than the dense convolution they replace.

``refine=true`` (default) refits the last factor of every decomposed layer by least squares
on calibration activations (Zhang et al. 2015, asymmetric: inputs from the decomposed model,
targets from the original), which lowers the model's error at the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxopt import graph as G
from onnxopt import lowrank_math as M
from onnxopt.errors import UserInputError
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import register_pass

Ranks = tuple[int, ...]


# ---------------------------------------------------------------------- layers
@dataclass
class Layer:
    """A decomposable layer: ``weight`` is the Conv kernel (T, C, kh, kw), or for Gemm/MatMul the
    matrix W (out, in) with y = W·x (Gemm's alpha folded in)."""

    node: gs.Node
    kind: Literal["conv", "gemm", "matmul"]
    weight: np.ndarray
    bias: np.ndarray | None  # Conv bias, or Gemm's beta·C (broadcast over rows)
    in_shape: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def y(self) -> gs.Tensor:
        return self.node.outputs[0]

    def conv_attrs(self) -> dict:
        n = self.node
        return {"strides": list(G.attr(n, "strides", [1, 1])), "pads": list(G.attr(n, "pads", [0, 0, 0, 0])),
                "dilations": list(G.attr(n, "dilations", [1, 1]))}

    def input_rows(self) -> int:
        """Rows a matrix layer multiplies (the input's leading dims); 1 when unknown."""
        shape = self.in_shape
        return int(np.prod(shape[:-1])) if shape and len(shape) > 1 else 1


def conv_output_hw(hw: tuple[int, int], kernel: tuple[int, int], attrs: dict) -> tuple[int, int]:
    """ONNX Conv output height and width for an input of ``hw`` (explicit pads)."""
    p = attrs["pads"]
    return tuple((size + p[i] + p[i + 2] - attrs["dilations"][i] * (kernel[i] - 1) - 1) // attrs["strides"][i] + 1
                 for i, size in enumerate(hw))


def find_layers(graph: gs.Graph, types: dict) -> tuple[list[Layer], list[str]]:
    """Every Conv / Gemm / MatMul of the main graph with a constant weight, and why others are not."""
    layers, notes = [], []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or not G.is_default_domain(node):
            continue
        layer, reason = _layer_of(node)
        if layer is None:
            if reason:
                notes.append(f"{node.name}: {reason}")
            continue
        layer.in_shape = G.static_shape(layer.x) or _static(types.get(layer.x.name))
        layers.append(layer)
    return layers, notes


def _static(entry) -> tuple[int, ...] | None:
    if not entry or entry[1] is None or not all(isinstance(d, int) and d > 0 for d in entry[1]):
        return None
    return tuple(entry[1])


def _layer_of(node: gs.Node) -> tuple[Layer | None, str]:
    weight = G.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype != np.float32:
        return None, ""  # activation × activation, or not float32: nothing to decompose
    if node.op == "Conv":
        if weight.ndim != 4:
            return None, f"{weight.ndim - 2}-D Conv: only 2-D kernels are decomposed"
        if int(G.attr(node, "group", 1)) != 1:
            return None, (f"grouped Conv (group={G.attr(node, 'group')}): left as is (its groups are already "
                          "small dense layers)")
        if G.attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            return None, "auto_pad SAME_*: pads depend on the input size; export with explicit pads"
        bias = G.constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if len(node.inputs) > 2 and node.inputs[2].name and bias is None:
            return None, "Conv bias is not constant"
        return Layer(node, "conv", weight, bias), ""
    if weight.ndim != 2:
        return None, f"{node.op} weight of rank {weight.ndim}: only matrices are decomposed"
    if node.op == "MatMul":
        return Layer(node, "matmul", np.ascontiguousarray(weight.T), None), ""
    alpha, beta = float(G.attr(node, "alpha", 1.0)), float(G.attr(node, "beta", 1.0))
    matrix = weight if int(G.attr(node, "transB", 0)) else weight.T
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = G.constant_value(node.inputs[2])
        if c is None or c.size != matrix.shape[0]:
            return None, "Gemm C is not a constant vector over the outputs"
        bias = (beta * c.reshape(-1)).astype(np.float32)
    return Layer(node, "gemm", (alpha * matrix).astype(np.float32), bias), ""


# ---------------------------------------------------------------------- chains
@dataclass
class Step:
    """One layer of a decomposed chain: a Conv (4-D weight, attrs) or a matrix product (weight
    (in, out) as MatMul's B), with an optional bias."""

    op: Literal["Conv", "MatMul"]
    weight: np.ndarray
    bias: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)


def conv_step(weight, bias=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1) -> Step:
    attrs = {"kernel_shape": list(weight.shape[2:]), "strides": list(strides), "pads": list(pads),
             "dilations": list(dilations)}
    if group != 1:
        attrs["group"] = int(group)
    return Step("Conv", np.ascontiguousarray(weight, dtype=np.float32),
                None if bias is None else np.asarray(bias, np.float32), attrs)


def matrix_step(matrix_out_in: np.ndarray, bias=None) -> Step:
    """A product y = W·x as MatMul(x, Wᵀ)."""
    return Step("MatMul", np.ascontiguousarray(matrix_out_in.T, dtype=np.float32),
                None if bias is None else np.asarray(bias, np.float32))


def original_steps(layer: Layer) -> list[Step]:
    """The layer itself as a one-step chain (timed against its decompositions)."""
    if layer.kind == "conv":
        a = layer.conv_attrs()
        return [conv_step(layer.weight, layer.bias, a["strides"], a["pads"], a["dilations"])]
    return [matrix_step(layer.weight, layer.bias)]


def rewrite(graph: gs.Graph, layer: Layer, steps: list[Step], names: G.NameAllocator,
            beside: bool = False) -> list[gs.Node]:
    """Replace ``layer``'s node by ``steps``; the last step writes the layer's output tensor.
    ``beside``: keep the node and add the chain next to it, on the same input, writing a new
    tensor (refinement observes both from one run)."""
    node = layer.node
    x = layer.x
    y = gs.Variable(names(f"{node.name}_lowrank"), dtype=np.float32) if beside else layer.y
    if layer.kind == "gemm" and int(G.attr(node, "transA", 0)):
        xt = gs.Variable(names(f"{node.name}_xT"), dtype=x.dtype)
        graph.nodes.append(gs.Node("Transpose", names(f"{node.name}_transpose"), {"perm": [1, 0]}, [x], [xt]))
        x = xt
    if not beside:
        G.remove_nodes(graph, [node])
    current, new_nodes = x, []
    for index, step in enumerate(steps):
        last = index == len(steps) - 1
        hint = f"{node.name}_lr{index}"
        out = y if last and (step.op == "Conv" or step.bias is None) else gs.Variable(names(hint + "_out"),
                                                                                       dtype=np.float32)
        inputs = [current, names.constant(hint + "_w", step.weight)]
        if step.op == "Conv" and step.bias is not None:
            inputs.append(names.constant(hint + "_b", step.bias))
        new_nodes.append(gs.Node(step.op, names(hint), dict(step.attrs), inputs, [out]))
        if step.op == "MatMul" and step.bias is not None:
            added = y if last else gs.Variable(names(hint + "_biased"), dtype=np.float32)
            new_nodes.append(gs.Node("Add", names(hint + "_bias"), {}, [out, names.constant(hint + "_b", step.bias)],
                                     [added]))
            out = added
        current = out
    graph.nodes.extend(new_nodes)
    return new_nodes


def standalone(steps: list[Step], in_shape: tuple[int, ...], opset: int = 13) -> onnx.ModelProto:
    """``steps`` as a model of their own, for timing in onnxruntime."""
    nodes, inits, current = [], [], "x"
    for index, step in enumerate(steps):
        w = f"w{index}"
        inits.append(numpy_helper.from_array(step.weight, w))
        inputs = [current, w]
        out = f"t{index}"
        if step.op == "Conv" and step.bias is not None:
            inits.append(numpy_helper.from_array(step.bias, f"b{index}"))
            inputs.append(f"b{index}")
        nodes.append(helper.make_node(step.op, inputs, [out], **step.attrs))
        if step.op == "MatMul" and step.bias is not None:
            inits.append(numpy_helper.from_array(step.bias, f"b{index}"))
            nodes.append(helper.make_node("Add", [out, f"b{index}"], [out + "b"]))
            out += "b"
        current = out
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def chain_macs(layer: Layer, steps: list[Step]) -> int:
    """Multiply-accumulates of ``steps`` on the layer's input (per model run)."""
    if layer.kind != "conv":
        rows = layer.input_rows()
        return int(sum(rows * s.weight.shape[0] * s.weight.shape[1] for s in steps))
    known = layer.in_shape and len(layer.in_shape) == 4
    hw = (layer.in_shape[2], layer.in_shape[3]) if known else (1, 1)
    n = layer.in_shape[0] if layer.in_shape else 1
    total = 0
    for s in steps:
        hw = conv_output_hw(hw, s.weight.shape[2:], s.attrs)
        total += M.conv_flops(s.weight.shape, hw, s.attrs.get("group", 1)) * n
    return int(total)


# ---------------------------------------------------------------------- the passes
_LADDER = (0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75)  # rank fractions tried by the search


class LowRankPass(Pass):
    """What the four decompositions share; each subclass says which layers it takes, how it
    factorizes a weight at given ranks, and how the factors become a chain."""

    lossless = False
    run_once = True

    @dataclass
    class Options:
        rank: float = 0.0  # ≥ 1: a rank; in (0, 1): a fraction of the full rank; 0: not set
        energy: float = 0.0  # share of squared singular values kept, in (0, 1]; 0: not set
        method: Literal["search", "vbmf"] = "search"  # with neither rank nor energy
        refine: bool = True  # refit the last factor on calibration activations (Zhang et al. 2015)
        # joint: one capture run; sequential: one per layer, later layers absorb earlier errors
        refine_order: Literal["joint", "sequential"] = "joint"
        max_macs: float = 0.8  # a decomposition must cut the layer's MACs at least to this share
        measure: bool = True  # cpu: time each layer against its decomposition in onnxruntime
        min_speedup: float = 1.1  # ... and keep it only when at least this much faster
        min_channels: int = 16  # smaller layers are left alone
        exclude: list[str] = field(default_factory=list)  # node names kept as they are
        samples: int = 16  # calibration feeds for refinement and the search
        positions: int = 256  # sampled output positions per feed and layer (Zhang et al.)
        accuracy: str = "cosine=0.99+top1=0.99"  # the search's budget without --tolerance
        latency_budget_s: float = 300.0  # seconds of layer timing at most

    # -------------------------------------------------------------- per decomposition
    def reason_to_skip(self, layer: Layer) -> str | None:
        raise NotImplementedError

    def full_ranks(self, layer: Layer) -> Ranks:
        raise NotImplementedError

    def ranks_by_energy(self, layer: Layer, energy: float) -> Ranks:
        raise NotImplementedError

    def ranks_by_vbmf(self, layer: Layer) -> Ranks:
        raise NotImplementedError

    def factorize(self, layer: Layer, ranks: Ranks, responses: np.ndarray | None = None) -> list[Step]:
        """The chain for ``ranks``. ``responses``: the layer's outputs on calibration data (N, T);
        decompositions with an output-channel factor take its subspace from them."""
        raise NotImplementedError

    def compose(self, layer: Layer, steps: list[Step]) -> np.ndarray:
        """The weight (in ``layer.weight``'s layout) that ``steps`` compute, bias aside."""
        raise NotImplementedError

    def ladder(self, layer: Layer) -> list[Ranks]:
        full = self.full_ranks(layer)
        out = []
        for fraction in _LADDER:
            ranks = tuple(M.resolve_rank(fraction, f) for f in full)
            if ranks not in out:
                out.append(ranks)
        return out

    # -------------------------------------------------------------- run
    def run(self, graph: gs.Graph, ctx) -> PassResult:
        from .lowrank_search import decompose

        opt = self.options
        if opt.rank < 0 or not 0 <= opt.energy <= 1:
            raise UserInputError(f"{self.name}: rank={opt.rank}, energy={opt.energy} out of range.",
                                 "give rank ≥ 1 (a rank) or in (0, 1) (a fraction), energy in (0, 1].")
        return decompose(self, graph, ctx)

    def explicit_ranks(self, layer: Layer) -> Ranks | None:
        """Ranks from the options, or None when the search decides."""
        opt = self.options
        if opt.rank:
            return tuple(M.resolve_rank(opt.rank, f) for f in self.full_ranks(layer))
        if opt.energy:
            return self.ranks_by_energy(layer, opt.energy)
        if opt.method == "vbmf":
            return self.ranks_by_vbmf(layer)
        return None


def _conv_reason(layer: Layer, min_channels: int) -> str | None:
    if layer.kind != "conv":
        return "not a Conv"
    t, c = layer.weight.shape[:2]
    if min(t, c) < min_channels:
        return f"{t}×{c} channels: below min_channels"
    return None


def _split_kernel_reason(layer: Layer, min_channels: int, hint: str) -> str | None:
    """Why a decomposition that splits the kernel's height from its width cannot take ``layer``."""
    if layer.kind != "conv":
        return "not a Conv: use svd"
    if min(layer.weight.shape[2:]) < 2:
        return f"1×k or k×1 kernel: {hint}"
    return _conv_reason(layer, min_channels)


def _channel_unfoldings(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """The kernel unfolded along its input channels (C, T·kh·kw) and output channels (T, C·kh·kw):
    the two modes Tucker-2 compresses (Kim et al. 2016 choose their ranks by VBMF on these)."""
    t, c = layer.weight.shape[:2]
    return np.moveaxis(layer.weight, 1, 0).reshape(c, -1), layer.weight.reshape(t, -1)


def _channel_ranks_by_energy(layer: Layer, energy: float) -> Ranks:
    return (M.energy_rank(M.singular_values(layer.weight, "in"), energy),
            M.energy_rank(M.singular_values(layer.weight, "out"), energy))


def _split_conv_attrs(layer: Layer) -> tuple[dict, dict]:
    """Attributes of a k×1 Conv then a 1×k Conv that together act as the k×k one."""
    a = layer.conv_attrs()
    (sh, sw), (dh, dw), p = a["strides"], a["dilations"], a["pads"]
    vertical = {"strides": (sh, 1), "pads": (p[0], 0, p[2], 0), "dilations": (dh, 1)}
    horizontal = {"strides": (1, sw), "pads": (0, p[1], 0, p[3]), "dilations": (1, dw)}
    return vertical, horizontal


@register_pass
class Svd(LowRankPass):
    name = "svd"
    summary = "Factor Gemm / MatMul / 1×1 Conv weights into two products of rank r (truncated SVD)."

    def reason_to_skip(self, layer):
        if layer.kind == "conv" and layer.weight.shape[2:] != (1, 1):
            return "k×k Conv: use tucker2, cp or spatial-svd"
        out, inp = self._matrix(layer).shape
        if min(out, inp) < self.options.min_channels:
            return f"{out}×{inp} weight: below min_channels"
        return None

    @staticmethod
    def _matrix(layer):
        return layer.weight.reshape(layer.weight.shape[0], -1) if layer.kind == "conv" else layer.weight

    def full_ranks(self, layer):
        return (min(self._matrix(layer).shape),)

    def ranks_by_energy(self, layer, energy):
        return (M.energy_rank(M.singular_values(self._matrix(layer), "matrix"), energy),)

    def ranks_by_vbmf(self, layer):
        return (M.vbmf_rank(self._matrix(layer)),)

    def factorize(self, layer, ranks, responses=None):
        matrix = self._matrix(layer)
        if enough_responses(responses, ranks[0]):
            basis = response_basis(responses, ranks[0])
            second, first = basis, basis.T @ matrix
        else:
            second, first = M.svd_factors(matrix, ranks[0])
        if layer.kind != "conv":
            return [matrix_step(first), matrix_step(second, layer.bias)]
        a = layer.conv_attrs()
        return [conv_step(first[:, :, None, None], None, a["strides"], a["pads"], a["dilations"]),
                conv_step(second[:, :, None, None], layer.bias)]

    def compose(self, layer, steps):
        first, second = (s.weight.reshape(s.weight.shape[0], -1) if s.op == "Conv" else s.weight.T for s in steps)
        return (second @ first).reshape(layer.weight.shape)


@register_pass
class SpatialSvd(LowRankPass):
    name = "spatial-svd"
    summary = "Split k×k Conv kernels into a k×1 then a 1×k Conv of rank r (Jaderberg et al. 2014)."

    def reason_to_skip(self, layer):
        return _split_kernel_reason(layer, self.options.min_channels, "nothing to split (use svd for 1×1)")

    def full_ranks(self, layer):
        t, c, kh, kw = layer.weight.shape
        return (min(c * kh, t * kw),)

    def ranks_by_energy(self, layer, energy):
        return (M.energy_rank(M.singular_values(layer.weight, "spatial"), energy),)

    def ranks_by_vbmf(self, layer):
        t, c, kh, kw = layer.weight.shape
        return (M.vbmf_rank(layer.weight.transpose(1, 2, 0, 3).reshape(c * kh, t * kw)),)

    def factorize(self, layer, ranks, responses=None):
        vertical, horizontal = M.spatial_svd(layer.weight, ranks[0])
        v_attrs, h_attrs = _split_conv_attrs(layer)
        return [conv_step(vertical, None, **v_attrs), conv_step(horizontal, layer.bias, **h_attrs)]

    def compose(self, layer, steps):
        vertical, horizontal = steps[0].weight, steps[1].weight  # (r, C, kh, 1), (T, r, 1, kw)
        # W[t,c,y,x] = Σ_r H[t,r,x]·V[r,c,y], as one GEMM (tensordot; a plain einsum loops in C)
        return np.tensordot(horizontal[:, :, 0, :], vertical[..., 0], axes=(1, 0)).transpose(0, 2, 3, 1).astype(
            np.float32)


@register_pass
class Tucker2(LowRankPass):
    name = "tucker2"
    summary = "Conv → 1×1, k×k core, 1×1 by Tucker-2 on the channel modes (Kim et al. 2016)."

    def reason_to_skip(self, layer):
        if layer.kind != "conv":
            return "not a Conv: use svd"
        if layer.weight.shape[2:] == (1, 1):
            return "1×1 Conv: use svd"
        return _conv_reason(layer, self.options.min_channels)

    def full_ranks(self, layer):
        t, c = layer.weight.shape[:2]
        return (c, t)  # (r_in, r_out)

    def ranks_by_energy(self, layer, energy):
        return _channel_ranks_by_energy(layer, energy)

    def ranks_by_vbmf(self, layer):
        return tuple(M.vbmf_rank(unfolding) for unfolding in _channel_unfoldings(layer))

    def factorize(self, layer, ranks, responses=None):
        if enough_responses(responses, ranks[1]):
            # Output mode from the data (response_basis), input mode from the projected kernel:
            # the leading left singular vectors of its (C, r_out·kh·kw) unfolding.
            basis = response_basis(responses, ranks[1])  # (T, r_out)
            projected = np.tensordot(basis.T, layer.weight.astype(np.float64), axes=(1, 0))  # (r_out, C, kh, kw)
            c = projected.shape[1]
            u, _, _ = np.linalg.svd(np.moveaxis(projected, 1, 0).reshape(c, -1), full_matrices=False)
            u_in = u[:, :ranks[0]]  # (C, r_in)
            core = np.tensordot(projected, u_in, axes=(1, 0)).transpose(0, 3, 1, 2)  # (r_out, r_in, kh, kw)
            first, last = u_in.T[:, :, None, None], basis[:, :, None, None]
        else:
            first, core, last = M.tucker2(layer.weight, ranks[0], ranks[1])
        a = layer.conv_attrs()
        return [conv_step(first), conv_step(core, None, a["strides"], a["pads"], a["dilations"]),
                conv_step(last, layer.bias)]

    def compose(self, layer, steps):
        first, core, last = (s.weight for s in steps)
        by_input = np.tensordot(core, first[:, :, 0, 0], axes=(1, 0))  # (r_out, kh, kw, C)
        return np.tensordot(last[:, :, 0, 0], by_input, axes=(1, 0)).transpose(0, 3, 1, 2).astype(np.float32)


@register_pass
class Cp(LowRankPass):
    name = "cp"
    summary = "Conv → 1×1, depthwise k×1, depthwise 1×k, 1×1 by CP decomposition (Lebedev et al. 2015)."

    def reason_to_skip(self, layer):
        return _split_kernel_reason(layer, self.options.min_channels, "use svd or spatial-svd")

    def full_ranks(self, layer):
        t, c, kh, kw = layer.weight.shape
        return (min(t, c) * kh * kw,)  # the rank of the exact factorization (_exact_cp)

    def ladder(self, layer):
        # Useful CP ranks are of the order of the channel count (Lebedev et al. 2015), far below
        # the exact rank; the search tries fractions of the smaller channel count.
        t, c = layer.weight.shape[:2]
        return list(dict.fromkeys((M.resolve_rank(f, min(t, c)),) for f in _LADDER))

    def ranks_by_energy(self, layer, energy):  # one CP rank: the larger of the two channel modes'
        return (max(_channel_ranks_by_energy(layer, energy)),)

    def ranks_by_vbmf(self, layer):
        return (max(M.vbmf_rank(unfolding) for unfolding in _channel_unfoldings(layer)),)

    def factorize(self, layer, ranks, responses=None):
        if ranks[0] >= self.full_ranks(layer)[0]:
            first, vertical, horizontal, last = _exact_cp(layer.weight)
        else:
            first, vertical, horizontal, last = M.cp(layer.weight, ranks[0])
        r = first.shape[0]
        v_attrs, h_attrs = _split_conv_attrs(layer)
        return [conv_step(first), conv_step(vertical, None, group=r, **v_attrs),
                conv_step(horizontal, None, group=r, **h_attrs), conv_step(last, layer.bias)]

    def compose(self, layer, steps):
        first, vertical, horizontal, last = (s.weight for s in steps)
        taps = vertical[:, 0, :, 0][:, :, None] * horizontal[:, 0, 0, :][:, None, :]  # (r, kh, kw)
        terms = first[:, :, 0, 0][:, :, None, None] * taps[:, None]  # (r, C, kh, kw)
        return np.tensordot(last[:, :, 0, 0], terms, axes=(1, 0)).astype(np.float32)


def enough_responses(responses: np.ndarray | None, rank: int) -> bool:
    """Enough output samples to estimate ``rank`` principal directions (4 per direction): a
    classifier head sees one row per image, too few to replace its weights' own SVD."""
    return responses is not None and len(responses) >= 4 * rank


def response_basis(responses: np.ndarray, rank: int) -> np.ndarray:
    """Orthonormal (T, r) basis of the r leading principal directions of a layer's outputs.

    Zhang et al. 2015 (§3.1, linear case): the rank-r W' minimizing E‖W·x − W'·x‖² over the
    data is U·Uᵀ·W, U the leading eigenvectors of the (centered) response covariance: outputs
    are approximated where they vary, not where the weights are large. The mean goes to the
    bias through the refit."""
    y = responses.astype(np.float64)
    return np.ascontiguousarray(M.leading_right_vectors(y - y.mean(axis=0), rank))


def _exact_cp(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CP factors that reproduce ``kernel`` exactly, one rank-1 term per (smaller channel, y, x):
    rank min(T, C)·kh·kw (ALS need not find an exact fit even at that rank)."""
    t, c, kh, kw = kernel.shape
    channels = min(t, c)
    r = channels * kh * kw
    j, y, x = np.unravel_index(np.arange(r), (channels, kh, kw))
    vertical = np.zeros((r, 1, kh, 1), np.float32)
    horizontal = np.zeros((r, 1, 1, kw), np.float32)
    vertical[np.arange(r), 0, y, 0] = 1.0
    horizontal[np.arange(r), 0, 0, x] = 1.0
    if c <= t:  # term (c, y, x): pick input channel c, tap (y, x), weight the outputs by W[:, c, y, x]
        first = np.zeros((r, c, 1, 1), np.float32)
        first[np.arange(r), j, 0, 0] = 1.0
        last = kernel[:, j, y, x][:, :, None, None]
    else:  # term (t, y, x): input mix W[t, :, y, x], written to output t
        first = kernel[j, :, y, x][:, :, None, None]
        last = np.zeros((t, r, 1, 1), np.float32)
        last[j, np.arange(r), 0, 0] = 1.0
    return first, vertical, horizontal, np.ascontiguousarray(last, dtype=np.float32)
