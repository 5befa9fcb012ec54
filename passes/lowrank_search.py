"""How the low-rank passes choose, check and refine their decompositions (passes/lowrank.py).

1. **Worth it?** A decomposition must cut the layer's multiply-accumulates to ``max_macs`` and,
   on target cpu, run ``min_speedup`` faster than the layer in onnxruntime, both timed alone
   and interleaved (onnxopt/layer_timing.py). Elsewhere (no GPU here) MACs decide, with a note.
2. **Ranks**: from the options, or searched: every layer offers the rank ladder's decompositions
   that are worth it, each with its measured saving (seconds) and its error on the calibration
   data (relative error of the layer's output on sampled input patches). Moves are taken
   greedily, best saving per unit of error first; the longest prefix of moves whose model is
   within the tolerance wins (binary search, the whole model scored by onnxopt/tolerance.py).
3. **Refinement** (Zhang et al. 2015, "asymmetric" reconstruction): the last factor of every
   decomposed layer is refit by least squares so that, fed with the *decomposed* model's
   activations, it reproduces the *original* layer's outputs (bias included) on sampled
   positions of the calibration data. Streamed: only Gram sums are kept.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import graph as G
from onnxopt import lowrank_math as M
from onnxopt.activations import capture, conv_patches, rows_at, sample_positions
from onnxopt.blas import one_blas_thread
from onnxopt.errors import UserInputError
from onnxopt.pass_base import PassResult
from onnxopt.tolerance import ToleranceCheck, default_budget, describe

from .lowrank import (Layer, LowRankPass, Step, chain_macs, conv_output_hw, find_layers, original_steps, rewrite,
                      standalone)


# One AVX2 core runs dense float convolutions at about 43 GMAC/s (onnxruntime, 1 thread: ResNet-50 has
# 8.2 GFLOP in 94 ms): the saving of layers that are not timed, in seconds like the timed ones.
NOMINAL_MACS_PER_S = 43e9


@dataclass
class Choice:
    layer: Layer
    ranks: tuple[int, ...]
    steps: list[Step]
    saving_s: float = 0.0  # measured latency saving of the layer (0 when not measured)
    error: float = 0.0  # relative error of the layer's output on calibration patches


def decompose(pass_: LowRankPass, graph: gs.Graph, ctx) -> PassResult:
    with one_blas_thread():
        return _decompose(pass_, graph, ctx)


def _decompose(pass_: LowRankPass, graph: gs.Graph, ctx) -> PassResult:
    opt = pass_.options
    notes: list[str] = []
    feeds = list(ctx.calibration_data().feeds(limit=max(1, opt.samples)))
    shapes = {name: tuple(value.shape) for name, value in feeds[0].items()} if feeds else {}
    layers, layer_notes = find_layers(graph, G.inferred_types(graph, ctx.template, input_shapes=shapes))
    notes.extend(layer_notes)
    candidates = []
    for layer in layers:
        excluded = layer.name in opt.exclude or layer.node.op in opt.exclude
        reason = "excluded" if excluded else pass_.reason_to_skip(layer)
        if reason:
            notes.append(f"{layer.name}: {reason}")
        else:
            candidates.append(layer)
    if not candidates:
        return PassResult(False, notes=notes + ["no layer to decompose"])

    judge = Worth(pass_, ctx, notes)
    # With refinement the layers' outputs on the calibration data are sampled once up front: they
    # are the refit's targets and give svd/tucker2 their output subspace (lowrank.response_basis).
    targets = Targets(graph, ctx, candidates, feeds, opt) if opt.refine else None
    if pass_.explicit_ranks(candidates[0]) is not None:
        chosen = []
        for layer in ctx.progress(candidates, f"{pass_.name}: factorizing", len(candidates)):
            ranks = pass_.explicit_ranks(layer)
            steps = pass_.factorize(layer, ranks, _responses(targets, layer))
            [ok] = judge.keep(layer, [steps])
            if ok:
                chosen.append(Choice(layer, ranks, steps))
        if chosen and targets is not None:
            refine(graph, ctx, chosen, targets, feeds, notes, opt.refine_order)
    else:
        tolerance = dict(ctx.tolerance) or default_budget(opt.accuracy)
        if not tolerance:
            raise UserInputError(f"{pass_.name}: no ranks given and no accuracy budget to search them by.",
                                 "pass --tolerance (e.g. cosine=0.999), or rank=, energy= or method=vbmf.")
        chosen = search(pass_, graph, ctx, candidates, judge, feeds, tolerance, targets, notes)  # refined if checked

    if not chosen:
        return PassResult(False, notes=notes + ["no decomposition was worth applying"])
    names = G.NameAllocator(graph)
    macs_before = macs_after = params_before = params_after = 0
    for choice in chosen:
        layer = choice.layer
        macs_before += chain_macs(layer, original_steps(layer))
        macs_after += chain_macs(layer, choice.steps)
        params_before += layer.weight.size
        params_after += sum(s.weight.size for s in choice.steps)
        rewrite(graph, layer, choice.steps, names)
        notes.append(f"{layer.name}: rank {'×'.join(map(str, choice.ranks))}")
    counters = {"layers_decomposed": float(len(chosen)), "macs_saved": float(macs_before - macs_after),
                "params_saved": float(params_before - params_after)}
    return PassResult(True, counters, notes)


# ---------------------------------------------------------------------- worth it?
class Worth:
    """Keeps a decomposition only when it cuts MACs and (cpu) is measured faster."""

    def __init__(self, pass_: LowRankPass, ctx, notes: list[str]):
        from onnxopt.layer_timing import LatencyProbe

        opt = pass_.options
        self.opt, self.notes = opt, notes
        self.probe = None
        if opt.measure and ctx.target == "cpu":
            self.probe = LatencyProbe(optimization="all", threads=1, runs=10, budget_s=opt.latency_budget_s)
        elif opt.measure:
            notes.append(f"target {ctx.target}: layers not timed on this machine; MACs decide")
        self.opset = max(13, ctx.template.opset_import[0].version if ctx.template is not None else 13)

    def keep(self, layer: Layer, options: list[list[Step]]) -> list[bool]:
        return [s is not None for s in self.savings(layer, options)]

    def savings(self, layer: Layer, options: list[list[Step]]) -> list[float | None]:
        """Seconds each option saves on the layer (None: not worth it); where it is not timed,
        the MACs it saves at a nominal rate."""
        from onnxopt.layer_timing import LatencyBudgetExceeded

        original = original_steps(layer)
        base_macs = chain_macs(layer, original)
        result: list[float | None] = []
        for steps in options:
            macs = chain_macs(layer, steps)
            result.append((base_macs - macs) / NOMINAL_MACS_PER_S if macs <= self.opt.max_macs * base_macs else None)
        if result and all(r is None for r in result):
            self.notes.append(f"{layer.name}: no rank cuts its MACs to {self.opt.max_macs:.0%}")
            return result
        if self.probe is None:
            return result
        if layer.in_shape is None:
            self.notes.append(f"{layer.name}: input shape unknown, not timed; MACs decide")
            return result
        timed = [i for i, r in enumerate(result) if r is not None]
        try:
            baseline = standalone(original, layer.in_shape, self.opset)
            ratios = self.probe.compare(baseline, [standalone(options[i], layer.in_shape, self.opset) for i in timed])
            layer_s = self.probe.latency(baseline)
        except LatencyBudgetExceeded:
            self.notes.append(f"{layer.name}: latency budget spent; left as it is")
            return [None] * len(options)
        for i, ratio in zip(timed, ratios):
            result[i] = layer_s * (1 - 1 / ratio) if ratio >= self.opt.min_speedup else None
        if all(r is None for r in result):
            self.notes.append(f"{layer.name}: decomposition not faster in onnxruntime "
                              f"(best {max(ratios):.2f}×, needs {self.opt.min_speedup:.2f}×)")
        return result


# ---------------------------------------------------------------------- calibration samples
class Targets:
    """What refinement and the search need from the original model on the calibration data:
    for each layer, sampled output positions per feed, the layer's outputs there (the
    refit's targets) and, ``with_inputs``, the input patches that produce them (for the error
    of a rank). Positions are a function of (layer, feed number, output shape), so inputs and
    outputs can arrive in any order."""

    def __init__(self, graph: gs.Graph, ctx, layers: list[Layer], feeds: list, opt, with_inputs: bool = False,
                 with_outputs: bool = True):
        self.layers = {layer.name: layer for layer in layers}
        self.count = opt.positions
        self.outputs: dict[str, dict[int, np.ndarray]] = {name: {} for name in self.layers}
        self.output_shapes: dict[str, dict[int, tuple]] = {name: {} for name in self.layers}
        self.patches: dict[str, dict[int, np.ndarray]] = {name: {} for name in self.layers}
        readers: dict[str, list[tuple[str, Layer]]] = {}
        for layer in layers:
            if with_outputs:
                readers.setdefault(layer.y.name, []).append(("output", layer))
            if with_inputs:
                readers.setdefault(layer.x.name, []).append(("input", layer))
        seen: dict[str, int] = {}

        def consume(name: str, value: np.ndarray) -> None:
            feed = seen.get(name, 0)
            seen[name] = feed + 1
            for role, layer in readers[name]:
                if role == "output":
                    self.output_shapes[layer.name][feed] = value.shape
                    self.outputs[layer.name][feed] = rows_at(value, self.positions(layer, feed, value.shape))
                else:
                    self.patches[layer.name][feed] = _input_rows(layer, value, self.positions(
                        layer, feed, _output_shape(layer, value.shape)))

        missing = capture(G.export_model(graph, ctx.template), list(readers), feeds, consume)
        for name in missing:
            for _, layer in readers.get(name, []):
                self.layers.pop(layer.name, None)

    def positions(self, layer: Layer, feed: int, output_shape: tuple) -> tuple:
        seed = [zlib.crc32(layer.name.encode()), feed]
        return sample_positions(output_shape, self.count, np.random.default_rng(seed))


def _output_shape(layer: Layer, input_shape: tuple) -> tuple:
    """The layer's output shape for an input of ``input_shape`` (ONNX Conv output size)."""
    if layer.kind != "conv":
        rows = input_shape[:-1] if not (layer.kind == "gemm" and int(G.attr(layer.node, "transA", 0))) \
            else input_shape[::-1][:-1]
        return (*rows, layer.weight.shape[0])
    n, _, h, w = input_shape
    return (n, layer.weight.shape[0], *conv_output_hw((h, w), layer.weight.shape[2:], layer.conv_attrs()))


def _input_rows(layer: Layer, x: np.ndarray, positions: tuple) -> np.ndarray:
    if layer.kind == "conv":
        a = layer.conv_attrs()
        return conv_patches(x, positions, layer.weight.shape[2:], a["strides"], a["pads"], a["dilations"])
    if layer.kind == "gemm" and int(G.attr(layer.node, "transA", 0)):
        x = np.ascontiguousarray(x.T)
    return rows_at(x, positions).astype(np.float32)


def layer_error(layer: Layer, approx_weight: np.ndarray, patches: np.ndarray) -> float:
    """‖X·(W − Ŵ)ᵀ‖ / ‖X·Wᵀ‖ on the sampled input patches X: the relative error the layer's
    output takes (bias aside), measured where the data is, not in weight space."""
    w = layer.weight.reshape(layer.weight.shape[0], -1)
    delta = w - approx_weight.reshape(w.shape)
    exact = patches @ w.T
    return float(np.linalg.norm(patches @ delta.T) / max(np.linalg.norm(exact), 1e-30))


# ---------------------------------------------------------------------- the search
def search(pass_: LowRankPass, graph: gs.Graph, ctx, candidates: list[Layer], judge: Worth, feeds: list,
           tolerance: dict, targets: Targets | None, notes: list[str]) -> list[Choice]:
    opt = pass_.options
    samples = Targets(graph, ctx, candidates, feeds, _with_positions(opt, 64), with_inputs=True, with_outputs=False)
    menus: dict[str, list[Choice]] = {}
    for layer in ctx.progress(candidates, f"{pass_.name}: ranks, speed and error per layer", len(candidates)):
        if layer.name not in samples.layers or not samples.patches[layer.name]:
            notes.append(f"{layer.name}: not observable on the calibration data; left as it is")
            continue
        responses = _responses(targets, layer)
        options = [(ranks, pass_.factorize(layer, ranks, responses)) for ranks in pass_.ladder(layer)]
        savings = judge.savings(layer, [steps for _, steps in options])
        patches = np.concatenate(list(samples.patches[layer.name].values()))
        menu = [Choice(layer, ranks, steps, saving, layer_error(layer, pass_.compose(layer, steps), patches))
                for (ranks, steps), saving in zip(options, savings) if saving is not None]
        if menu:
            menus[layer.name] = menu
    del samples
    moves = greedy_moves(menus)
    if not moves:
        return []
    reference = ToleranceCheck(G.export_model(graph, ctx.template), feeds, tolerance)
    # A refit is checked on feeds it did not see: it fits the first ones and the check scores all,
    # whose worst sample is then often a held-out one. Refits checked only on their own feeds
    # passed the budget on PP-OCR's calibration windows and missed it on others (cosine 0.92).
    fit_feeds = refit_feeds(feeds)

    def evaluate(prefix: int, refined: bool) -> tuple[bool, dict, list[Choice], list[str]]:
        chosen = [Choice(c.layer, c.ranks, [_copy_step(s) for s in c.steps]) for c in moves[prefix - 1].values()]
        refine_notes: list[str] = []
        if refined:
            refine(graph, ctx, chosen, targets, fit_feeds, refine_notes, opt.refine_order)
            refine_notes[-1] += f", {len(feeds) - len(fit_feeds)} held out for the check"
        trial = graph.copy()
        names = G.NameAllocator(trial)
        for choice in chosen:
            rewrite(trial, _same_layer(trial, choice.layer), choice.steps, names)
        trial.cleanup().toposort()
        metrics = reference.evaluate(G.export_model(trial, ctx.template))
        return reference.meets(metrics), metrics, chosen, refine_notes

    prefix, outcome, rejected = longest_prefix_within(len(moves), evaluate, targets is not None, reference.badness)
    if rejected is not None:
        notes.append(f"refinement of the chosen layers left out: it scored {describe(rejected)} "
                     "with held-out feeds, no better than plain truncation")
    if not prefix:
        notes.append("no decomposition keeps the model within the tolerance")
        return []
    _, metrics, chosen, refine_notes = outcome
    notes.extend(refine_notes)
    notes.append(f"{prefix} of {len(moves)} greedy moves within the tolerance: {describe(metrics)}")
    return chosen


REFINED_PROBES = 3


HOLD_OUT_SHARE = 4  # one feed in four is held out of the search's refits (none when there is one feed)


def refit_feeds(feeds: list) -> list:
    """The feeds a search's refits may fit: all but the last ``1/HOLD_OUT_SHARE``, at least one."""
    return feeds[:max(1, len(feeds) - len(feeds) // HOLD_OUT_SHARE)]


def longest_prefix_within(count: int, evaluate, refit: bool, badness) -> tuple[int, tuple | None, dict | None]:
    """The longest prefix of ``count`` greedy moves whose model meets the tolerance, for the searches
    of the lossy passes: ``evaluate(k, refit)`` → (ok, metrics, ...) checks the first k moves.

    By binary search (error grows with the prefix), first without refits. Refits lower the error
    at the same moves, so with ``refit`` they then try to go further in at most REFINED_PROBES
    probes; failing that, the plain prefix is refit too and kept refit only if that checks out no
    worse (``badness`` of the metrics). Returns (prefix, its outcome, the metrics of a refit of the
    plain prefix that was left out, else None)."""
    best, refined = _longest_prefix(1, count, lambda k: evaluate(k, False)), False
    if refit and best[0] < count:
        further = _longest_prefix(best[0] + 1, count, lambda k: evaluate(k, True), max_probes=REFINED_PROBES)
        if further[0]:
            best, refined = further, True
    rejected = None
    if refit and best[0] and not refined:
        trial = evaluate(best[0], True)
        if trial[0] and badness(trial[1]) <= badness(best[1][1]):
            best = (best[0], trial)
        else:
            rejected = trial[1]
    return best[0], best[1], rejected


def _longest_prefix(low: int, high: int, evaluate, max_probes: int | None = None) -> tuple[int, tuple | None]:
    """The longest prefix in [low, high] whose ``evaluate(k)`` (ok, ...) is ok, with that outcome; 0 if none."""
    best, best_outcome, probes = 0, None, 0
    while low <= high and (max_probes is None or probes < max_probes):
        middle = (low + high) // 2
        outcome = evaluate(middle)
        probes += 1
        if outcome[0]:
            best, best_outcome, low = middle, outcome, middle + 1
        else:
            high = middle - 1
    return best, best_outcome


def _copy_step(step: Step) -> Step:
    return Step(step.op, step.weight, step.bias, dict(step.attrs))


def _responses(targets: Targets | None, layer: Layer) -> np.ndarray | None:
    if targets is None or not targets.outputs.get(layer.name):
        return None
    return np.concatenate(list(targets.outputs[layer.name].values()))


def _with_positions(opt, positions: int):
    from dataclasses import replace

    return replace(opt, positions=min(opt.positions, positions))


def greedy_moves(menus: dict[str, list[Choice]]) -> list[dict[str, Choice]]:
    """Configurations (layer → choice) in the order a greedy allocator reaches them, in small
    steps: a layer's next step is its next option by error that saves more than its current
    one (options with more error and no more saving are dominated and skipped); each move takes,
    over all layers, the step with the most saving per unit of added error. Small steps keep
    the prefixes fine-grained for the tolerance search: jumping straight to the option with the
    best ratio from the start would often be the most aggressive rank."""
    menus = {name: sorted(menu, key=lambda c: (c.error, -c.saving_s)) for name, menu in menus.items()}
    current: dict[str, Choice] = {}
    sequence: list[dict[str, Choice]] = []
    while True:
        best_name, best_option, best_value = None, None, -np.inf
        for name, menu in menus.items():
            here = current.get(name)
            saving0, error0 = (here.saving_s, here.error) if here else (0.0, 0.0)
            step = next((c for c in menu if c.error >= error0 and c.saving_s > saving0 and c is not here), None)
            if step is None:
                continue
            value = (step.saving_s - saving0) / max(step.error - error0, 1e-9)
            if value > best_value:
                best_name, best_option, best_value = name, step, value
        if best_name is None:
            return sequence
        current = {**current, best_name: best_option}
        sequence.append(current)


def _same_layer(graph: gs.Graph, layer: Layer) -> Layer:
    """``layer`` re-pointed at the node of the same name in ``graph`` (a copy)."""
    node = next(n for n in graph.nodes if n.name == layer.name)
    return Layer(node, layer.kind, layer.weight, layer.bias, layer.in_shape)


# ---------------------------------------------------------------------- refinement
def refine(graph: gs.Graph, ctx, chosen: list[Choice], targets: Targets, feeds: list, notes: list[str],
           order: str = "joint") -> list[Choice]:
    """Refit each chosen layer's last factor (and bias) on the calibration data so it reproduces
    the original layer's outputs (Zhang et al. 2015). The choices are updated in place and
    returned; ``graph`` is not changed. A refit that does not lower the layer's residual on the
    samples is dropped.

    * ``joint``: one run of the original model with every chain added *beside* its layer, so
      each refit sees the exact inputs; the layers' remaining errors add up as in plain
      truncation, each smaller.
    * ``sequential``: one layer at a time in graph order, each fed by the decomposed model with
      the layers before it already refit, so later layers also absorb earlier errors (Zhang et
      al.'s asymmetric reconstruction, §3.3): better, one capture sweep per layer. Refitting
      all layers from one sweep of the *decomposed* model instead let the changes compound
      (VGG-16's logits grew to 1e10), hence the two honest choices."""
    by_order = {node.name: index for index, node in enumerate(graph.nodes)}
    refinable = sorted((c for c in chosen if c.layer.name in targets.layers and targets.outputs[c.layer.name]),
                       key=lambda c: by_order.get(c.layer.name, 0))
    rounds = [refinable] if order == "joint" else [[c] for c in refinable]
    refit = 0
    for group in rounds:
        trial = graph.copy()
        names = G.NameAllocator(trial)
        observed: dict[str, Choice] = {}  # input tensor of a chain's last step → its layer
        for other in (group if order == "joint" else chosen):
            new_nodes = rewrite(trial, _same_layer(trial, other.layer), other.steps, names, beside=order == "joint")
            if other in group:
                observed[next(n for n in reversed(new_nodes) if n.op in ("Conv", "MatMul")).inputs[0].name] = other
            if order == "joint":
                trial.outputs.append(new_nodes[-1].outputs[0])  # or cleanup drops the chain beside the layer
        trial.cleanup().toposort()
        sums = {name: _GramSums() for name in observed}
        seen: dict[str, int] = {}

        def consume(name: str, value: np.ndarray) -> None:
            feed = seen.get(name, 0)
            seen[name] = feed + 1
            layer = observed[name].layer
            target = targets.outputs[layer.name].get(feed)
            if target is not None:
                positions = targets.positions(layer, feed, targets.output_shapes[layer.name][feed])
                sums[name].add(_last_step_rows(observed[name].steps[-1], value, positions), target)

        capture(G.export_model(trial, ctx.template), list(observed), feeds, consume)
        for name, choice in observed.items():
            last = choice.steps[-1]
            current = last.weight.reshape(last.weight.shape[0], -1) if last.op == "Conv" else last.weight.T
            solved = sums[name].refit(current, last.bias)
            if solved is None:
                continue
            weight, bias = solved
            last.weight = np.ascontiguousarray((weight.reshape(last.weight.shape) if last.op == "Conv" else weight.T),
                                               dtype=np.float32)
            last.bias = bias.astype(np.float32)
            refit += 1
    notes.append(f"refined {refit} of {len(refinable)} layer(s) ({order}) on {len(feeds)} calibration feed(s)")
    return chosen


def _last_step_rows(step: Step, z: np.ndarray, positions: tuple) -> np.ndarray:
    if step.op == "Conv":
        a = step.attrs
        return conv_patches(z, positions, step.weight.shape[2:], a["strides"], a["pads"], a["dilations"])
    return rows_at(z, positions)


class _GramSums:
    """Σ z zᵀ, Σ z yᵀ, Σ z, Σ y, Σ‖y‖² and the count in float64: the refit's normal equations
    (lowrank_math.gram_refit), streamed one calibration feed at a time."""

    # Ridge relative to the mean diagonal of the Gram matrix: sampled positions of one image are
    # correlated, and a near-singular fit would amplify the next layers' input shift.
    RIDGE = 1e-3

    def __init__(self):
        self.count = 0
        self.gram = self.cross = self.sum_z = self.sum_y = None
        self.y_energy = 0.0

    def add(self, z: np.ndarray, y: np.ndarray) -> None:
        z, y = z.astype(np.float64), y.astype(np.float64)
        if self.gram is None:
            self.gram, self.cross = np.zeros((z.shape[1], z.shape[1])), np.zeros((z.shape[1], y.shape[1]))
            self.sum_z, self.sum_y = np.zeros(z.shape[1]), np.zeros(y.shape[1])
        self.gram += z.T @ z
        self.cross += z.T @ y
        self.sum_z += z.sum(0)
        self.sum_y += y.sum(0)
        self.y_energy += float((y * y).sum())
        self.count += z.shape[0]

    def residual(self, weight: np.ndarray, bias: np.ndarray) -> float:
        """Σ‖y − W·z − b‖² from the sums alone."""
        return (self.y_energy - 2 * float(np.sum(weight.T * self.cross)) - 2 * float(bias @ self.sum_y)
                + float(np.sum((weight @ self.gram) * weight)) + 2 * float(bias @ (weight @ self.sum_z))
                + self.count * float(bias @ bias))

    def refit(self, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The least-squares (weight (T, r), bias (T,)), or None when it is not better than the
        given ones on the samples (or there are fewer samples than unknowns)."""
        if self.gram is None or self.count <= self.gram.shape[0] + 1:
            return None
        new_weight, new_bias = M.gram_refit(self.gram, self.cross, self.sum_z / self.count, self.sum_y / self.count,
                                            self.count, ridge=self.RIDGE)
        new_weight, new_bias = new_weight.astype(np.float64), new_bias.astype(np.float64)
        old_bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        if not (np.isfinite(new_weight).all() and np.isfinite(new_bias).all()) or \
                self.residual(new_weight, new_bias) >= self.residual(weight.astype(np.float64), old_bias):
            return None
        return new_weight, new_bias
