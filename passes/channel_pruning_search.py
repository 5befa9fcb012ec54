"""How ``prune-channels`` picks per-group ratios within the tolerance (passes/channel_pruning.py).

1. **Rungs**: every candidate group offers the ratios of its ``ladder`` (kept counts rounded as
   the pass rounds them, the least important channels first, so each rung removes a superset
   of the one before).
2. **Saving** of a rung: on target cpu (``measure=true``) the group's layers, every node that
   writes or reads its channels, are cut out of the graph and timed before and after the
   removal in onnxruntime, interleaved (onnxopt/layer_timing.py); a rung that is not
   ``min_speedup`` faster saves nothing and is not offered: a removal that does not speed
   the model up is not worth its error. Elsewhere the MACs it saves decide, at the nominal
   rate of passes/lowrank_search.py.
3. **Error** of a rung (``search_error``): ``model`` (default) scores the whole model with only
   that group pruned (bias-corrected) against the tolerance on a few feeds, as a share of the
   budget (tolerance.badness); ``layers`` (one capture, for big models) measures what the
   removal changes in the outputs of the layers that read the channels, on sampled input
   patches, relative to those outputs: ‖(X_R − E[X_R])·W_Rᵀ‖ / ‖X·Wᵀ‖ over the consumers (R:
   the removed channels' columns), like the low-rank search. Layer errors misjudge sensitive
   places: on resnet_tiny the stem's removal looked cheapest per unit of layer error and broke
   the model on its own.
4. **Moves** (passes/lowrank_search.greedy_moves): best saving per unit of error first, in
   small steps; the longest prefix of moves whose pruned model meets the tolerance wins,
   by binary search, the whole model scored by onnxopt/tolerance.py. Models are checked
   bias-corrected and, with ``reconstruct``, refit on three quarters of the feeds and
   scored on all of them (held-out feeds keep the refit honest).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt.channel_deps import ChannelGroup
from onnxopt.channel_prune import prune_groups
from onnxopt.errors import UserInputError
from onnxopt.tolerance import ToleranceCheck, default_budget, describe

from .channel_pruning import (Decision, Setup, _positions_per_weight, apply_plan, channel_importance, columns,
                              group_label, keep_most_important, kept_count, layer_matrix, on_copy, reconstruct)
from .lowrank_search import (NOMINAL_MACS_PER_S, Targets, _with_positions, greedy_moves, longest_prefix_within,
                             refit_feeds)

ERROR_POSITIONS = 64  # sampled positions per feed and layer for the rungs' errors (search_error=layers)
ERROR_FEEDS = 4  # calibration feeds a rung's model is scored on (search_error=model)


@dataclass
class Rung:
    """One step of a group's ladder: keep ``keep`` (group channel ids)."""

    group: ChannelGroup
    ratio: float
    keep: np.ndarray
    saving_s: float = 0.0  # seconds saved per model run (measured, or MACs at the nominal rate)
    error: float = 0.0  # relative error of the consumers' outputs


def search(pass_, graph: gs.Graph, ctx, setup: Setup, candidates: list[ChannelGroup],
           notes: list[str]) -> tuple[list[Decision], dict]:
    """The decisions (and refits, node index → (matrix, bias)) of the longest greedy prefix
    within the tolerance; ``graph`` is not changed."""
    opt = pass_.options
    tolerance = dict(ctx.tolerance) or default_budget(opt.accuracy)
    if not tolerance:
        raise UserInputError(f"{pass_.name}: no ratio given and no accuracy budget to search one by.",
                             "pass --tolerance (e.g. cosine=0.999), or ratio=.")
    feeds = setup.feeds
    fit_feeds = refit_feeds(feeds)
    setup.collect_means(fit_feeds, candidates)
    reference = ToleranceCheck(G.export_model(graph, ctx.template), feeds, tolerance)
    savings = Savings(graph, ctx, setup, notes)
    if opt.search_error == "model":
        errors = ModelErrors(graph, ctx, setup, reference)
    else:
        errors = ConsumerErrors(graph, ctx, setup, candidates, fit_feeds)
    menus: dict[str, list[Rung]] = {}
    for group in ctx.progress(candidates, f"{pass_.name}: speed and error per group", len(candidates)):
        scores = channel_importance(group, opt.importance, setup.stats, notes)
        rungs = ladder_rungs(group, scores, opt)
        if not rungs:
            notes.append(f"{group_label(group)}: no ladder ratio removes a channel after rounding")
            continue
        measured = errors.of(group, rungs)
        if measured is None:
            notes.append(f"{group_label(group)}: its consumers are not observable on the calibration data; "
                         "left as it is")
            continue
        for rung, error in zip(rungs, measured):
            rung.error = error
        if opt.search_error == "model" and not opt.reconstruct:
            # without refits, a rung that alone breaks the budget is in no prefix that meets it
            rungs = [r for r in rungs if r.error <= 1]
        for rung, saving in zip(rungs, savings.of(group, rungs) if rungs else []):
            if saving is not None:
                rung.saving_s = saving
                menus.setdefault(str(group.id), []).append(rung)
    del errors
    moves = greedy_moves(menus)
    if not moves:
        notes.append("no channel removal saves time within the tolerance")
        return [], {}

    def evaluate(prefix: int, reconstructed: bool) -> tuple:
        decisions = [Decision(r.group, r.keep) for r in moves[prefix - 1].values()]
        refit_notes: list[str] = []
        refits = reconstruct(graph, ctx, decisions, setup, fit_feeds, refit_notes) if reconstructed else {}
        if refit_notes:
            refit_notes[-1] += f", {len(feeds) - len(fit_feeds)} held out for the check"
        trial, moved = on_copy(graph, decisions)
        apply_plan(trial, moved, setup.stats, refits)
        trial.cleanup().toposort()
        metrics = reference.evaluate(G.export_model(trial, ctx.template))
        return reference.meets(metrics), metrics, decisions, refits, refit_notes

    prefix, outcome, rejected = longest_prefix_within(len(moves), evaluate, opt.reconstruct, reference.badness)
    if rejected is not None:
        notes.append(f"reconstruction left out: it scored {describe(rejected)} with held-out feeds, "
                     "no better than bias correction alone")
    if not prefix:
        notes.append("no channel removal keeps the model within the tolerance")
        return [], {}
    _, metrics, decisions, refits, refit_notes = outcome
    notes.extend(refit_notes)
    notes.append(f"{prefix} of {len(moves)} greedy moves within the tolerance: {describe(metrics)}")
    return decisions, refits


def ladder_rungs(group: ChannelGroup, scores: np.ndarray, opt) -> list[Rung]:
    """The ladder's ratios as distinct kept counts that remove something (least important first)."""
    rungs, counts = [], set()
    for ratio in sorted(opt.ladder):
        count = kept_count(group.channels, ratio, opt)
        if count < group.channels and count not in counts:
            counts.add(count)
            rungs.append(Rung(group, ratio, keep_most_important(scores, count)))
    return rungs


# ---------------------------------------------------------------------- saving
class Savings:
    """Seconds a rung saves per model run: measured on the group's layers (cpu), else MACs."""

    def __init__(self, graph: gs.Graph, ctx, setup: Setup, notes: list[str]):
        from onnxopt.layer_timing import LatencyProbe

        opt = setup.opt
        self.graph, self.ctx, self.setup, self.opt, self.notes = graph, ctx, setup, opt, notes
        self.index_of = {id(n): i for i, n in enumerate(graph.nodes)}
        self.probe = None
        if opt.measure and ctx.target == "cpu":
            self.probe = LatencyProbe(optimization="all", threads=1, runs=10, budget_s=opt.latency_budget_s)
        elif opt.measure:
            notes.append(f"target {ctx.target}: layers not timed on this machine; MACs decide")

    def of(self, group: ChannelGroup, rungs: list[Rung]) -> list[float | None]:
        from onnxopt.layer_timing import LatencyBudgetExceeded, extract_subgraph

        nominal = [m / NOMINAL_MACS_PER_S if m > 0 else None for m in (self.macs_saved(group, r.keep) for r in rungs)]
        if self.probe is None:
            return nominal
        region = self.region(group)
        shapes, types, template = self.setup.input_shapes, self.setup.types, self.ctx.template
        try:
            baseline = extract_subgraph(self.graph, [self.graph.nodes[i] for i in region], input_shapes=shapes,
                                        types=types, template=template)
            candidates = []
            for rung in rungs:
                trial, [moved] = on_copy(self.graph, [Decision(group, rung.keep)])
                prune_groups(trial, [(moved.group, moved.keep)])
                candidates.append(extract_subgraph(trial, [trial.nodes[i] for i in region], input_shapes=shapes,
                                                   types=types, template=template))
            ratios = self.probe.compare(baseline, candidates)
            layers_s = self.probe.latency(baseline)
        except LatencyBudgetExceeded:
            self.notes.append(f"{group_label(group)}: latency budget spent; left as it is")
            return [None] * len(rungs)
        except ValueError as exc:  # a dimension extract_subgraph cannot make static
            self.notes.append(f"{group_label(group)}: layers not timed ({exc}); MACs decide")
            return nominal
        result = [layers_s * (1 - 1 / ratio) if ratio >= self.opt.min_speedup else None for ratio in ratios]
        if all(r is None for r in result):
            self.notes.append(f"{group_label(group)}: removal not faster in onnxruntime (best {max(ratios):.2f}×, "
                              f"needs {self.opt.min_speedup:.2f}×)")
        return result

    def region(self, group: ChannelGroup) -> list[int]:
        """Positions in graph.nodes of every node that writes or reads the group's channels."""
        nodes = {id(n): n for n in group.roots}
        for slot in group.slots:
            nodes[id(slot.node)] = slot.node
        for ts in group.tensors:
            for node in [G.producer(ts.tensor)] + G.consumers(ts.tensor):
                if node is not None:
                    nodes[id(node)] = node
        return sorted(self.index_of[key] for key in nodes if key in self.index_of)

    def macs_saved(self, group: ChannelGroup, keep: np.ndarray) -> float:
        """Multiply-accumulates of the group's weighted layers that go with the removed channels."""
        removed = np.setdiff1d(np.arange(group.channels), keep)
        total = 0.0
        for slot in group.slots:
            if slot.input_index != 1 or slot.node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            per_element = _positions_per_weight(slot.node, self.setup.shapes)
            if per_element is not None:
                size = np.asarray(G.constant_value(slot.tensor)).size
                total += size * per_element * len(slot.positions(removed)) / slot.width
        return total


# ---------------------------------------------------------------------- error
class ModelErrors:
    """How much of the budget a rung uses alone: the whole model with only that group pruned
    (bias-corrected, not refit) scored by the tolerance check on its first ERROR_FEEDS feeds
    (tolerance.badness: 1.0 at the bound). Sensitive layers (a stem, a classifier's input)
    then rank by what they do to the outputs, not by what they do to their own consumers."""

    def __init__(self, graph: gs.Graph, ctx, setup: Setup, reference: ToleranceCheck):
        self.graph, self.ctx, self.setup, self.reference = graph, ctx, setup, reference

    def of(self, group: ChannelGroup, rungs: list[Rung]) -> list[float]:
        errors = []
        for rung in rungs:
            trial, moved = on_copy(self.graph, [Decision(group, rung.keep)])
            apply_plan(trial, moved, self.setup.stats)
            trial.cleanup().toposort()
            metrics = self.reference.evaluate(G.export_model(trial, self.ctx.template), limit=ERROR_FEEDS)
            errors.append(self.reference.badness(metrics))
        return errors


class ConsumerErrors:
    """Sampled input patches of the candidate groups' consumer layers (original model), for the
    relative error a removal causes in their outputs."""

    def __init__(self, graph: gs.Graph, ctx, setup: Setup, groups: list[ChannelGroup], feeds: list):
        from .lowrank import find_layers

        wanted = {id(s.node) for g in groups for s in g.consumers}
        layers = [layer for layer in find_layers(graph, {})[0] if id(layer.node) in wanted and layer.name]
        counts: dict[str, int] = {}
        for layer in layers:
            counts[layer.name] = counts.get(layer.name, 0) + 1
        layers = [layer for layer in layers if counts[layer.name] == 1]  # Targets keys by name
        samples = Targets(graph, ctx, layers, feeds, _with_positions(setup.opt, ERROR_POSITIONS),
                          with_inputs=True, with_outputs=False)
        self.patches: dict[int, np.ndarray] = {}
        self.matrix: dict[int, np.ndarray] = {}
        self.energy: dict[int, float] = {}
        for layer in layers:
            parts = samples.patches.get(layer.name)
            matrix = layer_matrix(layer.node)
            if not parts or matrix is None:
                continue
            patches = np.concatenate(list(parts.values())).astype(np.float64)
            if patches.shape[1] != matrix.shape[1]:
                continue
            self.patches[id(layer.node)], self.matrix[id(layer.node)] = patches, matrix.astype(np.float64)
            self.energy[id(layer.node)] = float(np.sum((patches @ self.matrix[id(layer.node)].T) ** 2))

    def of(self, group: ChannelGroup, rungs: list[Rung]) -> list[float] | None:
        slots = [s for s in group.consumers if id(s.node) in self.patches]
        if not slots:
            return None
        reference = sum(self.energy[id(s.node)] for s in slots)
        errors = []
        for rung in rungs:
            removed = np.setdiff1d(np.arange(group.channels), rung.keep)
            lost = 0.0
            for slot in slots:
                cols = columns(slot.node, slot.positions(removed))
                part = self.patches[id(slot.node)][:, cols] @ self.matrix[id(slot.node)][:, cols].T
                lost += float(np.sum((part - part.mean(axis=0)) ** 2))  # the mean goes to the bias
            errors.append(float(np.sqrt(lost / max(reference, 1e-30))))
        return errors
