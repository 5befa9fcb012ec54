"""The PassManager: runs passes in order, keeps the graph valid, times and verifies them.

* Consecutive lossless passes form a group that is repeated to a fixed point
  (until no pass of the group changes the graph, at most ``max_iterations`` rounds),
  because one rewrite often enables another (fold → dead code → CSE → fold).
* After every pass: ``cleanup`` + ``toposort`` and a structural invariant check
  (every input is produced, a graph input or a constant; names are unique).
* With ``verify_each`` the model is exported after every pass, checked with
  onnx.checker and run in onnxruntime on the verification feeds; the first pass
  whose outputs drift beyond tolerance is named (pass bisection).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G
from .context import PassContext
from .errors import OnnxoptError, PassFailed, UserInputError, VerificationError
from .metrics import compare, within
from .pass_base import Pass

# Lossless passes must keep outputs within this relative L2 of the reference.
LOSSLESS_REL_L2 = 1e-5


@dataclass
class PassRecord:
    name: str
    round: int
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int
    counters: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verify: dict[str, float] | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "round", "seconds", "changed", "nodes_before", "nodes_after", "counters", "notes", "verify")}


@dataclass
class ManagerResult:
    model: onnx.ModelProto
    records: list[PassRecord]
    seconds: float


class InvariantError(OnnxoptError):
    def __init__(self, pass_name: str, detail: str):
        super().__init__(f"internal error: after pass '{pass_name}' the graph is invalid: {detail}")


class PassManager:
    def __init__(self, passes: list[Pass], *, fixed_point: bool = True, max_iterations: int = 8,
                 verify_each: bool = False, verify_feeds: list[dict[str, np.ndarray]] | None = None,
                 check_each: bool = False):
        self.passes = list(passes)
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.verify_each = verify_each
        self.verify_feeds = verify_feeds
        self.check_each = check_each or verify_each

    # ------------------------------------------------------------------ public
    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> ManagerResult:
        ctx = ctx or PassContext()
        if ctx.template is None:
            ctx.template = model
        start = time.perf_counter()
        graph = G.import_model(model)  # never modifies ``model`` (see import_model)
        graph.cleanup().toposort()
        self._reference = None
        self._noise_rel_l2 = 0.0
        if self.verify_each:
            feeds = self.verify_feeds
            if feeds is None:
                feeds = list(ctx.calibration_data().feeds(limit=4))
            self.verify_feeds = feeds
            from .runtime import run_model

            self._reference = run_model(model, feeds, optimization="disable")
            # The float noise floor: how far onnxruntime's own (lossless) graph optimizations
            # move the outputs. Some kernels differ when weights are initializers (prepacked
            # LSTM/GEMM), so a lossless pass may move them as much without being wrong.
            optimized = run_model(model, feeds, optimization="all")
            self._noise_rel_l2 = max((compare(r[k], o[k])["rel_l2"] for r, o in zip(self._reference, optimized)
                                      for k in r), default=0.0)
        records: list[PassRecord] = []
        for group in self._groups():
            repeat = self.fixed_point and group[0].lossless and not group[0].run_once
            rounds = self.max_iterations if repeat else 1
            for rnd in range(1, rounds + 1):
                changed_any = False
                for p in group:
                    rec = self._run_one(p, graph, ctx, rnd)
                    records.append(rec)
                    changed_any |= rec.changed
                if not changed_any:
                    break
        out = G.export_model(graph, ctx.template)
        return ManagerResult(out, records, time.perf_counter() - start)

    # ------------------------------------------------------------------ internals
    def _groups(self) -> list[list[Pass]]:
        groups: list[list[Pass]] = []
        for p in self.passes:
            repeatable = p.lossless and not p.run_once
            if groups and repeatable and groups[-1][0].lossless and not groups[-1][0].run_once:
                groups[-1].append(p)
            else:
                groups.append([p])
        return groups

    def _run_one(self, p: Pass, graph: gs.Graph, ctx: PassContext, rnd: int) -> PassRecord:
        before = G.node_count(graph)
        t0 = time.perf_counter()
        try:
            result = p.run(graph, ctx)
        except OnnxoptError:
            raise
        except Exception as exc:
            raise PassFailed(p.name, exc) from exc
        if result.changed:  # the contract: changed=False means the graph was not touched
            # Name clashes confuse gs.cleanup, so check them before cleaning up.
            self._check_invariants(p.name, graph)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            self._check_invariants(p.name, graph)
        seconds = time.perf_counter() - t0
        rec = PassRecord(p.name, rnd, seconds, bool(result.changed), before, G.node_count(graph),
                         dict(result.counters), list(result.notes))
        if self.check_each or self.verify_each:
            model = G.export_model(graph, ctx.template)
            try:
                from .io import check_model

                check_model(model, what=f"the model after pass '{p.name}'")
            except UserInputError as exc:
                raise InvariantError(p.name, exc.cause) from None
            if self.verify_each and result.changed:
                rec.verify = self._verify(p, model, ctx)
        return rec

    def _check_invariants(self, name: str, graph: gs.Graph) -> None:
        for g in G.iter_graphs(graph):
            seen_outputs: set[str] = set()
            for node in g.nodes:
                for t in node.outputs:
                    if t.name == "":
                        continue  # an omitted optional output
                    if t.name in seen_outputs:
                        raise InvariantError(name, f"tensor '{t.name}' is produced twice")
                    seen_outputs.add(t.name)
                    if len(t.inputs) != 1 or t.inputs[0] is not node:
                        raise InvariantError(name, f"tensor '{t.name}' has an inconsistent producer")
            for t in g.outputs:
                if isinstance(t, gs.Variable) and not t.inputs and not G.is_graph_input(graph, t):
                    raise InvariantError(name, f"graph output '{t.name}' has no producer")

    def _verify(self, p: Pass, model: onnx.ModelProto, ctx: PassContext) -> dict[str, float]:
        from .runtime import run_model

        try:
            outs = run_model(model, self.verify_feeds, optimization="disable")
        except Exception as exc:
            raise VerificationError(p.name, f"onnxruntime cannot run the result: {str(exc).splitlines()[0]}") from None
        worst: dict[str, float] = {}
        for ref, cand in zip(self._reference, outs):
            for k, r in ref.items():
                m = compare(r, cand.get(k, np.zeros(0)))
                for key, val in m.items():
                    if key == "cosine":
                        worst[key] = min(worst.get(key, 1.0), val)
                    else:
                        worst[key] = max(worst.get(key, 0.0), val)
        lossless_bound = max(LOSSLESS_REL_L2, 4 * self._noise_rel_l2)
        bounds = {"rel_l2": lossless_bound} if p.lossless else (dict(ctx.tolerance) or {"rel_l2": lossless_bound})
        for metric, bound in bounds.items():
            if metric in worst and not within(metric, worst[metric], bound):
                raise VerificationError(p.name, f"{metric}={worst[metric]:.3g} (bound {bound:g}) on the verification data")
        return worst
