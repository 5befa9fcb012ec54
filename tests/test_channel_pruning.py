"""Pass prune-channels (passes/channel_pruning.py, passes/channel_pruning_search.py): how many
channels each group keeps, which ones (every importance finds its planted weak channels), bias
correction (exact for channels that are constant on the data), least-squares reconstruction,
the tolerance search, exclusions, options, and valid runnable models on standard nets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from models.zoo import mobilenetv2, resnet18
from onnxopt import graph as G
from onnxopt.calibration import CalibrationData
from onnxopt.cli import main
from onnxopt.context import PassContext
from onnxopt.errors import UserInputError
from onnxopt.metrics import compare
from onnxopt.registry import make_pass, parse_pass_spec
from onnxopt.runtime import run_model
from onnxopt.stats import model_stats
from onnxopt.passes.channel_pruning import PruneChannels, Setup, kept_count
from onnxopt.passes.channel_pruning_search import Savings, ladder_rungs
from tests.test_channel_deps import Net, check_model, weight_shapes
from tests.util import correlated_feeds

EXACT = "round_to=1,min_channels=1,reconstruct=false"


# ---------------------------------------------------------------------------- helpers
def feeds_for(model, n=6, seed=1, rank=None):
    return correlated_feeds(model, n, seed, rank)


def prune(model: onnx.ModelProto, spec: str, feeds: list[dict], tolerance: dict | None = None):
    ctx = PassContext(target="cpu", template=model, tolerance=tolerance or {},
                      calibration=CalibrationData.from_feeds(feeds, source="test"))
    result = onnxopt.optimize(model, passes=[spec], ctx=ctx)
    check_model(result.model)
    return result.model, result.records[0]


def worst(before: onnx.ModelProto, after: onnx.ModelProto, feeds: list[dict], metric: str = "rel_l2") -> float:
    ref, out = run_model(before, feeds), run_model(after, feeds)
    values = [compare(r[k], o[k])[metric] for r, o in zip(ref, out) for k in r]
    return min(values) if metric == "cosine" else max(values)


def removed_rows(before: onnx.ModelProto, after: onnx.ModelProto, node_name: str) -> set[int]:
    """Which output channels of ``node_name``'s weight are gone (rows matched to the original)."""
    def weight(model):
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        node = next(n for n in model.graph.node if n.name == node_name)
        return inits[node.input[1]].reshape(inits[node.input[1]].shape[0], -1)

    original, pruned = weight(before), weight(after)
    kept = {int(np.argmin(np.abs(original - row).sum(axis=1))) for row in pruned}
    assert len(kept) == len(pruned)
    return set(range(len(original))) - kept


def scale_filters(model: onnx.ModelProto, name: str, rows, factor: float) -> None:
    """Multiply some output channels (rows) of initializer ``name`` by ``factor``, in place."""
    tensor = next(t for t in model.graph.initializer if t.name == name)
    values = onnx.numpy_helper.to_array(tensor).copy()
    values[rows] *= factor
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, name))


def chain(widths: list[int], seed: int = 0) -> tuple[onnx.ModelProto, Net, list[str]]:
    """x → Conv → BN → Relu → ... → 1×1 Conv (4 outputs): one group per inner width."""
    net = Net(seed=seed)
    h = net.input("x", [1, 3, 8, 8])
    convs, cin = [], 3
    for width in widths:
        h = net.conv(h, cin, width, 3)
        convs.append(net.op_name(h))
        h = net.node("Relu", [net.bn(h, width)])
        cin = width
    y = net.conv(h, cin, 4)
    return net.model([y]), net, convs


# ---------------------------------------------------------------------------- how many
def test_kept_counts_round_up_to_multiples_and_respect_min_channels():
    opt = PruneChannels.Options(round_to=8, min_channels=8)
    assert kept_count(64, 0.25, opt) == 48
    assert kept_count(20, 0.5, opt) == 16      # 10 kept → 16: fewer removed, a multiple of 8
    assert kept_count(16, 0.25, opt) == 16     # 12 → 16: nothing removed
    assert kept_count(16, 0.9, opt) == 8       # never below min_channels
    assert kept_count(6, 0.5, opt) == 6        # smaller than min_channels: untouched
    assert kept_count(10, 0.99, PruneChannels.Options(round_to=4, min_channels=1)) == 4  # never 0


def test_ratio_removes_the_right_counts():
    model, net, convs = chain([32, 20, 6])
    pruned, record = prune(model, "prune-channels:ratio=0.25,reconstruct=false", feeds_for(model, 2))
    shapes = weight_shapes(pruned)
    assert [shapes[c][0] for c in convs] == [24, 16, 6]
    assert shapes[net.op_name(net.nodes[-1].output[0])][1] == 6
    assert any("6 channels, too few to prune" in n for n in record.notes)
    assert any(n.endswith("32→24 channels") for n in record.notes)
    assert record.counters["groups_pruned"] == 2 and record.counters["channels_removed"] == 12
    assert record.counters["macs_saved"] > 0 and record.counters["params_saved"] > 0


def test_global_ranking_prunes_the_least_important_group_more():
    model, net, convs = chain([16, 16])
    scale_filters(model, net.inits[0].name, slice(0, None, 2), 1e-3)  # half of the first conv's filters are tiny
    feeds = feeds_for(model, 2)
    pruned, _ = prune(model, f"prune-channels:ratio=0.25,global=true,{EXACT}", feeds)
    shapes = weight_shapes(pruned)
    assert [shapes[c][0] for c in convs] == [8, 16]
    assert removed_rows(model, pruned, convs[0]) == set(range(0, 16, 2))
    per_group, _ = prune(model, f"prune-channels:ratio=0.25,{EXACT}", feeds)
    assert [weight_shapes(per_group)[c][0] for c in convs] == [12, 12]


# ---------------------------------------------------------------------------- which
WEAK_FILTERS, WEAK_GAMMA, DEAD = [1, 4, 9, 14], [2, 5, 10, 13], [3, 6, 11, 15]


def planted_net() -> tuple[onnx.ModelProto, str]:
    """Conv → BN → Relu → 1×1 Conv with three planted sets of weak channels, each weak by one
    measure only: tiny filters (their BN shift keeps them active), tiny BN γ (same), and dead
    channels (strong filters and γ, but a BN shift that keeps them below zero)."""
    net = Net(seed=3)
    x = net.input("x", [1, 3, 8, 8])
    w = net.rand(16, 3, 3, 3)
    w[WEAK_FILTERS] *= 0.01
    gamma = net.rng.uniform(0.5, 1.5, 16).astype(np.float32)
    gamma[WEAK_GAMMA] = 0.01
    beta = np.zeros(16, np.float32)
    beta[WEAK_FILTERS + WEAK_GAMMA] = 20.0
    beta[DEAD] = -100.0
    conv = net.node("Conv", [x, net.const("w", w), net.const("b", np.zeros(16, np.float32))],
                    kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    bn = net.node("BatchNormalization", [conv] + [net.const(n, v) for n, v in (
        ("gamma", gamma), ("beta", beta), ("mean", np.zeros(16, np.float32)), ("var", np.ones(16, np.float32)))])
    y = net.conv(net.node("Relu", [bn]), 16, 8)
    return net.model([y]), net.op_name(conv)


@pytest.mark.parametrize("importance, expected", [
    ("l1", WEAK_FILTERS), ("l2", WEAK_FILTERS), ("bn", WEAK_GAMMA), ("activation", DEAD)])
def test_every_importance_finds_its_planted_weak_channels(importance, expected):
    model, conv = planted_net()
    pruned, _ = prune(model, f"prune-channels:ratio=0.25,importance={importance},{EXACT}", feeds_for(model, 3))
    assert removed_rows(model, pruned, conv) == set(expected)


def test_bn_importance_falls_back_to_l1_without_batchnorm():
    net = Net()
    h = net.conv(net.input("x", [1, 3, 6, 6]), 3, 8)
    model = net.model([net.conv(net.node("Relu", [h]), 8, 2)])
    _, record = prune(model, f"prune-channels:ratio=0.5,importance=bn,{EXACT}", feeds_for(model, 2))
    assert any("importance l1 instead of bn" in n for n in record.notes)


# ---------------------------------------------------------------------------- bias correction
def constant_channel_net() -> tuple[onnx.ModelProto, str]:
    """Half of a Conv's filters are zero with a non-zero bias: after the Relu those channels are
    constant. Four consumers read them: a 1×1 Conv without bias, a Gemm after global pooling,
    and two MatMuls over the channels-last tensor, one without bias (an Add must be created),
    one followed by a bias Add (as PyTorch exports Linear) that takes the correction."""
    net = Net(seed=4)
    x = net.input("x", [1, 3, 6, 6])
    w = net.rand(16, 3, 3, 3)
    w[:8] = 0
    bias = net.rng.uniform(-2, 2, 16).astype(np.float32)
    conv = net.node("Conv", [x, net.const("w", w), net.const("b", bias)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = net.node("Relu", [conv])
    pointwise = net.conv(h, 16, 5, bias=False)
    pooled = net.node("Flatten", [net.node("GlobalAveragePool", [h])])
    fc = net.node("Gemm", [pooled, net.const("fc", net.rand(4, 16)), net.const("fc_b", net.rand(4))], transB=1)
    nhwc = net.node("Transpose", [h], perm=[0, 2, 3, 1])
    dense = net.node("MatMul", [nhwc, net.const("wm", net.rand(16, 3))])
    linear = net.node("Add", [net.node("MatMul", [nhwc, net.const("wl", net.rand(16, 2))]),
                              net.const("bl", net.rand(2))])
    return net.model([pointwise, fc, dense, linear]), net.op_name(conv)


def test_bias_correction_makes_constant_channels_free():
    model, conv = constant_channel_net()
    feeds = feeds_for(model, 3)
    pruned, record = prune(model, f"prune-channels:ratio=0.5,{EXACT}", feeds)
    assert removed_rows(model, pruned, conv) == set(range(8))
    assert worst(model, pruned, feeds_for(model, 3, seed=7)) < 1e-5
    assert [n.op_type for n in pruned.graph.node].count("Add") == 2  # the bare MatMul got one
    assert record.counters["params_saved"] == 8 * 27 + 8 + 8 * (5 + 4 + 3 + 2) - (5 + 3)  # minus new biases


def test_without_bias_correction_the_constant_channels_are_missed():
    """The same removal with the means zeroed: what the correction is worth."""
    model, _ = constant_channel_net()
    feeds = feeds_for(model, 3)
    graph = G.import_model(model)
    ctx = PassContext(template=model, calibration=CalibrationData.from_feeds(feeds, source="test"))
    from passes.channel_pruning import Decision, apply_plan, channel_importance, keep_most_important

    setup = Setup(graph, ctx, PruneChannels.Options(round_to=1, min_channels=1))
    [group] = setup.analysis.prunable[:1]
    keep = keep_most_important(channel_importance(group, "l1", {}, []), 8)
    apply_plan(graph, [Decision(group, keep)], stats={})
    graph.cleanup().toposort()
    assert worst(model, G.export_model(graph, model), feeds) > 0.05


# ---------------------------------------------------------------------------- reconstruction
def correlated_net() -> onnx.ModelProto:
    net = Net(seed=5)
    x = net.input("x", [1, 8, 10, 10])
    h = net.bn(net.conv(x, 8, 32), 32)
    y = net.conv(net.node("LeakyRelu", [h], alpha=0.5), 32, 12)
    return net.model([y])


@pytest.mark.parametrize("order", ["sequential", "joint"])
def test_reconstruction_lowers_the_error_when_channels_are_correlated(order):
    model = correlated_net()
    calib, held_out = feeds_for(model, 6, rank=4), feeds_for(model, 3, seed=2, rank=4)
    plain, _ = prune(model, f"prune-channels:ratio=0.5,{EXACT}", calib)
    refit, record = prune(model, f"prune-channels:ratio=0.5,round_to=1,min_channels=1,reconstruct_order={order}",
                          calib)
    assert record.counters["layers_reconstructed"] == 1
    assert worst(model, refit, held_out) < 0.5 * worst(model, plain, held_out)


def mlp(consumer: str) -> onnx.ModelProto:
    """x (64 rows) → MatMul → LeakyRelu → Gemm or MatMul + Add: the consumer is a matrix layer."""
    net = Net(seed=6)
    x = net.input("x", [64, 16])
    h = net.node("LeakyRelu", [net.node("MatMul", [x, net.const("w1", net.rand(16, 32))])], alpha=0.5)
    if consumer == "gemm":
        y = net.node("Gemm", [h, net.const("w2", net.rand(8, 32)), net.const("c2", net.rand(8))],
                     transB=1, alpha=0.5, beta=2.0)
    else:
        y = net.node("Add", [net.node("MatMul", [h, net.const("w2", net.rand(32, 8))]), net.const("c2", net.rand(8))])
    return net.model([y])


@pytest.mark.parametrize("consumer", ["gemm", "matmul"])
def test_reconstruction_of_matrix_consumers(consumer):
    model = mlp(consumer)
    calib, held_out = feeds_for(model, 6, rank=5), feeds_for(model, 3, seed=2, rank=5)
    plain, _ = prune(model, f"prune-channels:ratio=0.5,{EXACT}", calib)
    refit, record = prune(model, "prune-channels:ratio=0.5,round_to=1,min_channels=1", calib)
    assert record.counters["layers_reconstructed"] == 1
    assert weight_shapes(refit) != weight_shapes(model)
    assert worst(model, refit, held_out) < 0.5 * worst(model, plain, held_out)


def test_reconstruction_through_a_chain_of_pruned_layers():
    """Three groups in a row (1×1 Convs on inputs spanning 4 of 16 channels): every consumer is
    refit, the later ones on the activations of the already refit ones (sequential)."""
    net = Net(seed=9)
    h, cin = net.input("x", [1, 16, 8, 8]), 16
    for _ in range(3):
        h, cin = net.node("LeakyRelu", [net.bn(net.conv(h, cin, 32), 32)], alpha=0.3), 32
    model = net.model([net.conv(h, cin, 8)])
    calib, held_out = feeds_for(model, 8, rank=4), feeds_for(model, 3, seed=2, rank=4)
    plain, _ = prune(model, f"prune-channels:ratio=0.25,{EXACT}", calib)
    refit, record = prune(model, "prune-channels:ratio=0.25,round_to=1,min_channels=1", calib)
    assert record.counters["layers_reconstructed"] == 3
    assert worst(model, refit, held_out) < 0.3 * worst(model, plain, held_out)


def test_refit_is_kept_only_when_it_carries_over_to_held_out_feeds():
    from passes.channel_pruning import RefitSums

    rng = np.random.default_rng(0)
    true_w, true_b = rng.normal(size=(3, 40)), rng.normal(size=3)
    start_w, start_b = true_w + 0.3 * rng.normal(size=(3, 40)), np.zeros(3)
    related, noise = RefitSums(), RefitSums()
    for feed in range(8):  # 8 feeds of 10 rows: fewer rows per fit than the 40 unknowns
        z = rng.normal(size=(10, 40))
        related.add(z, z @ true_w.T + true_b, feed)
        noise.add(z, z @ start_w.T + start_b + rng.normal(size=(10, 3)), feed)  # start_w is already the best
    weight, bias = related.solve(start_w, start_b)
    assert np.linalg.norm(weight - true_w) < 0.8 * np.linalg.norm(start_w - true_w)
    assert noise.solve(start_w, start_b) is None  # a refit would only fit the noise of its own rows


# ---------------------------------------------------------------------------- the search
def redundant_net() -> onnx.ModelProto:
    """Two groups of 32 channels; half of the first group's filters are nearly zero."""
    model, net, _ = chain([32, 32], seed=6)
    scale_filters(model, net.inits[0].name, slice(16, None), 1e-3)
    return model


@pytest.mark.parametrize("search_error", ["model", "layers"])
def test_search_meets_the_tolerance(search_error):
    model = redundant_net()
    calib = feeds_for(model, 8)
    pruned, record = prune(model, f"prune-channels:measure=false,search_error={search_error}", calib,
                           tolerance={"cosine": 0.999})
    assert record.counters.get("channels_removed", 0) >= 8
    assert any("greedy moves within the tolerance" in n for n in record.notes)
    assert worst(model, pruned, calib, "cosine") >= 0.999


def test_search_removes_nothing_when_nothing_fits():
    model, _, _ = chain([16, 16], seed=8)
    pruned, record = prune(model, "prune-channels:measure=false,round_to=4,min_channels=4", feeds_for(model, 4),
                           tolerance={"cosine": 0.999999})
    assert not record.changed and any("within the tolerance" in n for n in record.notes)


def test_ladder_rungs_are_distinct_after_rounding():
    model, _, _ = chain([32])
    graph = G.import_model(model)
    [group] = [g for g in analyze(graph) if g.channels == 32]
    opt = PruneChannels.Options()
    rungs = ladder_rungs(group, np.arange(32.0), opt)
    assert [len(r.keep) for r in rungs] == [24, 16]  # 0.125 → 28 → 32 removes nothing; 0.375 → 20 → 24
    assert set(rungs[1].keep) <= set(rungs[0].keep) and set(rungs[1].keep) == set(range(16, 32))


def analyze(graph):
    from onnxopt.channel_deps import analyze_channels

    return analyze_channels(graph).prunable


def test_measured_saving_of_a_halved_conv():
    net = Net()
    h = net.conv(net.input("x", [1, 32, 24, 24]), 32, 64, 3)
    model = net.model([net.conv(net.node("Relu", [h]), 64, 64, 3)])
    graph = G.import_model(model)
    ctx = PassContext(template=model, calibration=CalibrationData.from_feeds(feeds_for(model, 1), source="test"))
    setup = Setup(graph, ctx, PruneChannels.Options(latency_budget_s=20))
    group = next(g for g in setup.analysis.prunable if g.channels == 64)
    notes: list[str] = []
    rungs = ladder_rungs(group, np.arange(64.0), setup.opt)
    savings = Savings(graph, ctx, setup, notes).of(group, rungs)
    assert savings[-1] is not None and savings[-1] > 0, notes  # 64 → 32 channels halves both convs' MACs


# ---------------------------------------------------------------------------- exclusions, notes, options
def test_exclude_by_name_and_by_op():
    model, net, convs = chain([16, 16])
    feeds = feeds_for(model, 2)
    pruned, record = prune(model, f"prune-channels:ratio=0.5,exclude={convs[0]},{EXACT}", feeds)
    assert [weight_shapes(pruned)[c][0] for c in convs] == [16, 8]
    assert any("excluded" in n and convs[0] in n for n in record.notes)
    # the second group is read by the last Conv as well: excluding Conv leaves everything alone
    _, record = prune(model, f"prune-channels:ratio=0.5,exclude=Conv+nothing_*,{EXACT}", feeds)
    assert not record.changed
    assert any("exclude 'nothing_*' matches no node" in n for n in record.notes)


def test_refused_groups_are_reported():
    model, _, _ = chain([16])
    _, record = prune(model, f"prune-channels:ratio=0.5,{EXACT}", feeds_for(model, 2))
    assert any("channels reach graph output" in n for n in record.notes)


def test_global_option_alias_parses():
    p = parse_pass_spec("prune-channels:ratio=0.25,global=true")
    assert p.options.global_ranking is True and p.options.ratio == 0.25
    assert make_pass(type(p), {"global": "false"}).options.global_ranking is False
    with pytest.raises(UserInputError, match="no option 'globl'"):
        parse_pass_spec("prune-channels:globl=true")


@pytest.mark.parametrize("spec, message", [
    ("ratio=1.5", "ratio"), ("ratio=-0.1", "ratio"), ("ratio=0.2,round_to=0", "round_to"),
    ("ratio=0.2,min_channels=0", "min_channels"), ("global=true", "global=true needs a ratio"),
    ("ladder=0.5+1.5", "ladder"), ("accuracy=none,measure=false", "tolerance"),
])
def test_bad_options_raise_user_input_errors(spec, message):
    model, _, _ = chain([16])
    with pytest.raises(UserInputError, match=message):
        prune(model, f"prune-channels:{spec}", feeds_for(model, 1))


def test_unknown_importance_is_rejected_when_parsed():
    with pytest.raises(UserInputError, match="importance"):
        parse_pass_spec("prune-channels:importance=taylor")


# ---------------------------------------------------------------------------- standard nets
@pytest.mark.parametrize("builder, spec", [
    (resnet18, "ratio=0.25"),
    (mobilenetv2, "ratio=0.3,round_to=4,min_channels=4,importance=bn,reconstruct_order=joint"),
])
def test_standard_nets_stay_valid_and_runnable(builder, spec):
    model = builder(image_size=32, width=0.25 if builder is resnet18 else 0.5, num_classes=10)
    feeds = feeds_for(model, 4)
    pruned, record = prune(model, f"prune-channels:{spec}", feeds)  # checker and strict shape inference
    assert record.counters["groups_pruned"] >= 4 and record.counters["layers_reconstructed"] >= 4
    assert model_stats(pruned)["parameters"] < model_stats(model)["parameters"]
    out = run_model(pruned, feeds[:1])[0]
    assert out["logits"].shape == (1, 10) and np.all(np.isfinite(out["logits"]))


def test_cli_prunes_and_validates(tmp_path):
    model, _, _ = chain([32, 32])
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    code = main(["optimize", str(src), "-o", str(dst), "-q", "--pass", "prune-channels:ratio=0.25,global=true",
                 "--validate"])
    assert code == 0
    assert weight_shapes(onnx.load(dst)) != weight_shapes(model)
