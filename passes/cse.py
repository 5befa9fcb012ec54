"""Common-subexpression elimination (``cse``).

Two nodes with the same op, domain and attributes that read the same tensors compute
the same values, so one of them goes. The walk is hash-consing in topological order:
each node's key is built from its *canonical* inputs (inputs already rewired to the
surviving duplicate), so a whole duplicated chain collapses in one run.

Identical initializers (same dtype, shape and bytes) are shared first, so weights
stored twice become one tensor and the nodes reading them become mergeable.

Never merged: nodes with subgraph attributes (If/Loop/Scan), nondeterministic ops
(Random*, Multinomial, Bernoulli, training-mode Dropout) and, by default, custom-domain
ops, whose purity onnxopt cannot know. Graph outputs keep their names: when both
merged outputs are graph outputs, the second is passed on through an Identity.
"""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.pass_base import Pass, PassResult
from onnxopt.registry import register_pass

from .cleanup import dropout_is_inference

# Domains whose ops onnxopt knows to be pure functions of their inputs and attributes.
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
# Ops that draw random numbers: two of them with equal inputs still differ.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})
# Binary ops whose result does not depend on operand order (bitwise, also in floating point).
COMMUTATIVE_BINARY_OPS = frozenset({"Add", "Mul", "And", "Or", "Xor", "Equal", "BitwiseAnd", "BitwiseOr", "BitwiseXor"})


class _Unmergeable(Exception):
    """An attribute value that cannot be compared safely (subgraphs, attribute references)."""


@register_pass
class CommonSubexpressionElimination(Pass):
    name = "cse"
    summary = "Merge nodes that compute the same thing from the same inputs, and share identical initializers."
    lossless = True

    @dataclass
    class Options:
        # Also merge custom-domain nodes (only safe when those ops are pure functions).
        custom_ops: bool = False
        # Share initializers with identical dtype, shape and bytes.
        initializers: bool = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        counters: dict[str, float] = {}
        if self.options.initializers:
            merged, saved = share_identical_constants(graph)
            if merged:
                counters["initializers_merged"] = merged
                counters["bytes_saved"] = saved
        graph.toposort()
        merged_nodes = 0
        for g in list(G.iter_graphs(graph)):
            merged_nodes += self._merge_in_graph(graph, g)
        if merged_nodes:
            counters["nodes_merged"] = merged_nodes
        return PassResult(bool(counters), counters)

    def _merge_in_graph(self, root: gs.Graph, g: gs.Graph) -> int:
        # key -> (surviving node, its inputs). Holding the inputs keeps their ids from being
        # reused by tensors created while the walk goes on.
        table: dict[tuple, tuple[gs.Node, list]] = {}
        dead: set[int] = set()
        for node in list(g.nodes):
            key = node_key(node, root.opset, self.options.custom_ops)
            if key is None:
                continue
            if key not in table:
                table[key] = (node, list(node.inputs))
                continue
            keep = table[key][0]
            for dup_out, keep_out in zip(list(node.outputs), list(keep.outputs)):
                if not dup_out.is_empty():
                    # Keeps a graph output's name (adds an Identity when both are outputs).
                    G.replace_tensor(root, dup_out, keep_out)
            node.inputs.clear()
            node.outputs.clear()
            dead.add(id(node))
        if dead:
            g.nodes = [n for n in g.nodes if id(n) not in dead]
        return len(dead)


def node_key(node: gs.Node, opset: int, custom_ops: bool = False) -> tuple | None:
    """A hashable key equal for nodes that compute the same outputs; None if never mergeable."""
    domain = node.domain or ""
    if domain not in STANDARD_DOMAINS and not custom_ops:
        return None
    if not node.outputs or G.has_subgraph(node):
        return None
    if domain in STANDARD_DOMAINS:
        if node.op in NONDETERMINISTIC_OPS:
            return None
        if node.op == "Dropout" and not dropout_is_inference(node, opset):
            return None
    try:
        attrs = tuple(sorted((name, attr_key(value)) for name, value in node.attrs.items()))
    except _Unmergeable:
        return None
    inputs = [None if t.is_empty() else id(t) for t in node.inputs]
    if node.op in COMMUTATIVE_BINARY_OPS and domain in STANDARD_DOMAINS and len(inputs) == 2 and None not in inputs:
        inputs.sort()
    # Which outputs are present matters: a node without a mask output cannot stand in for one with it.
    output_layout = tuple(t.is_empty() for t in node.outputs)
    return (domain, node.op, tuple(inputs), attrs, output_layout)


def attr_key(value) -> tuple:
    """A hashable, exact representation of an attribute value (floats bit-exact, tensors by content)."""
    if isinstance(value, gs.Graph):
        raise _Unmergeable
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, np.integer)):
        return ("i", int(value))
    if isinstance(value, (float, np.floating)):
        return ("f", struct.pack("<d", float(value)))
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, bytes):
        return ("y", value)
    if value is None:
        return ("none",)
    if isinstance(value, (list, tuple)):
        return ("list", tuple(attr_key(v) for v in value))
    if isinstance(value, gs.Constant):
        return ("tensor",) + array_key(value.values)
    if isinstance(value, np.ndarray):
        return ("tensor",) + array_key(value)
    if isinstance(value, onnx.TensorProto):
        return ("tensor",) + array_key(onnx.numpy_helper.to_array(value))
    if hasattr(value, "SerializeToString") and not isinstance(value, onnx.GraphProto):
        # TypeProto (Cast-like 'type' attributes), SparseTensorProto, ...
        return ("proto", type(value).__name__, value.SerializeToString(deterministic=True))
    raise _Unmergeable


def array_key(array: np.ndarray) -> tuple:
    """dtype, shape and a content hash of an array (BLAKE2b; strings by value)."""
    array = np.asarray(array)
    if array.dtype.kind == "O":
        return (array.dtype.str, array.shape, tuple(str(v) for v in array.reshape(-1)))
    digest = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=32).digest()
    return (array.dtype.str, array.shape, digest)


def _sample_bytes(array: np.ndarray, samples: int = 64) -> bytes:
    flat = array.reshape(-1)
    if array.dtype.kind == "O":
        return repr(flat[:samples].tolist()).encode()
    return flat[:: max(1, flat.size // samples)].tobytes()


def share_identical_constants(graph: gs.Graph) -> tuple[int, int]:
    """Make nodes read one gs.Constant per distinct (dtype, shape, bytes); returns (merged, bytes saved).

    gs writes every Constant a graph's nodes read as that graph's initializer, so a shared
    Constant is valid in any scope. Constants that are graph inputs or outputs keep their
    identity (their names are part of a signature).
    """
    constants: list[gs.Constant] = []
    seen: set[int] = set()
    for g in G.iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    constants.append(t)
    protected = {id(t) for g in G.iter_graphs(graph) for t in list(g.inputs) + list(g.outputs)}

    by_layout: dict[tuple, list[gs.Constant]] = defaultdict(list)
    for t in constants:
        if id(t) in protected:
            continue
        try:  # dtype and shape are known without loading lazy values (a full load of VGG-16 costs ~1 s)
            layout = (np.dtype(t.dtype).str, tuple(int(d) for d in t.shape))
        except (TypeError, ValueError):
            continue
        by_layout[layout].append(t)

    merged = saved = 0
    for group in by_layout.values():
        if len(group) < 2:
            continue  # unique layout: no need to hash the bytes
        # A cheap fingerprint first (every k-th element): full hashes only where fingerprints collide.
        by_sample: dict[bytes, list[gs.Constant]] = defaultdict(list)
        for t in group:
            by_sample[_sample_bytes(np.asarray(t.values))].append(t)
        candidates = [t for same in by_sample.values() if len(same) > 1 for t in same]
        canonical: dict[tuple, gs.Constant] = {}
        for t in candidates:
            value = np.asarray(t.values)
            key = array_key(value)
            keep = canonical.setdefault(key, t)
            if keep is t:
                continue
            G.replace_uses(t, keep)  # not a graph output: protected above
            merged += 1
            saved += value.nbytes
    return merged, saved
