"""Builders of standard architectures and small test nets, with random weights (no torch).

Every builder is ``NAME(seed=0, batch=1, opset=17, **options) -> onnx.ModelProto`` and is
a pure function of its arguments: the same call gives byte-identical models (on one
machine; see :mod:`models.layers` for how weights and BN statistics are drawn). ``batch``
may be a name such as ``"N"`` for a dynamic batch dimension. The graphs
look like un-simplified exports of eval-mode PyTorch models (BatchNormalization not folded
into convs, Dropout kept, Flatten + Gemm classifier heads, ReLU6 as Clip), so a pass that
works on them has real work to do. Weight names follow torchvision's state-dict names.

The big models (resnet18, resnet50, mobilenetv2, vgg16, squeezenet11, inception) take
``image_size`` (default 224) and ``width`` (channel multiplier, default 1.0) so tests can
build small variants quickly, and ``num_classes`` (default 1000). Their input is
``input`` [batch, 3, image_size, image_size] and their output ``logits`` [batch, num_classes].

``tiny_custom_op`` contains a ``com.example::MyOp`` node that no runtime implements: it
is only for tests that a pass leaves unknown ops untouched, and cannot be run.

Command line::

    python -m models.zoo resnet50 -o resnet50.onnx [--seed N] [--opset N] [--image-size N]
    python -m models.zoo --list
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

try:  # run as `python -m models.zoo` or imported as `models.zoo` from the repo root
    from .layers import GraphBuilder
except ImportError:  # pragma: no cover - run as a plain script
    from layers import GraphBuilder

# Range of the random BatchNorm scale on the last BN of a residual branch: small, as in
# trained ResNets (and Goyal et al. 2017's zero-γ init), so that sums of many blocks stay O(1).
RESIDUAL_GAMMA = (0.2, 0.5)


def _scaled(channels: int, width: float, divisor: int = 8) -> int:
    """``channels × width`` rounded to a multiple of ``divisor``, never 10 % below the target.

    The rule of torchvision's ``_make_divisible`` (MobileNetV2 reference code).
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if width == 1.0:
        return channels
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return rounded


def _image_input(b: GraphBuilder, batch, image_size: int) -> str:
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    # small images leave few positions per channel in the last stages: probe more samples
    # (2 at 112 px and above, up to 8), keeping the probe's cost about that of 2 x 112²
    b.probe_batch = max(2, min(8, round(2 * (112 / image_size) ** 2)))
    return b.input("input", [batch, 3, image_size, image_size])


def _doc(name: str, **args) -> str:
    return f"onnxopt models.zoo.{name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


# ---------------------------------------------------------------------------- ResNet
def _basic_block(b: GraphBuilder, x: str, planes: int, stride: int) -> str:
    """torchvision BasicBlock: 3x3-BN-ReLU-3x3-BN (+ 1x1-BN downsample) + identity, ReLU."""
    out = b.relu(b.batchnorm(b.conv(x, planes, 3, stride, 1, bias=False, name="conv1"), name="bn1"), name="relu")
    out = b.batchnorm(b.conv(out, planes, 3, 1, 1, bias=False, name="conv2"), name="bn2", gamma=RESIDUAL_GAMMA)
    identity = x
    if stride != 1 or b.channels(x) != planes:
        with b.scope("downsample"):
            identity = b.batchnorm(b.conv(x, planes, 1, stride, 0, bias=False, gain=1.0, name="0"), name="1")
    return b.relu(b.add(out, identity), name="relu")


def _bottleneck(b: GraphBuilder, x: str, planes: int, stride: int, expansion: int = 4) -> str:
    """torchvision Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv)."""
    out = b.relu(b.batchnorm(b.conv(x, planes, 1, 1, 0, bias=False, name="conv1"), name="bn1"), name="relu")
    out = b.relu(b.batchnorm(b.conv(out, planes, 3, stride, 1, bias=False, name="conv2"), name="bn2"), name="relu")
    out = b.batchnorm(b.conv(out, planes * expansion, 1, 1, 0, bias=False, name="conv3"), name="bn3",
                      gamma=RESIDUAL_GAMMA)
    identity = x
    if stride != 1 or b.channels(x) != planes * expansion:
        with b.scope("downsample"):
            identity = b.batchnorm(b.conv(x, planes * expansion, 1, stride, 0, bias=False, gain=1.0, name="0"),
                                   name="1")
    return b.relu(b.add(out, identity), name="relu")


def _resnet(name: str, block, layers: list[int], seed: int, batch, opset: int, image_size: int,
            width: float, num_classes: int) -> onnx.ModelProto:
    b = GraphBuilder(name, seed, opset)
    x = _image_input(b, batch, image_size)
    x = b.conv(x, _scaled(64, width), 7, 2, 3, bias=False, name="conv1")
    x = b.maxpool(b.relu(b.batchnorm(x, name="bn1"), name="relu"), 3, 2, 1, name="maxpool")
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        with b.scope(f"layer{stage}"):
            for i in range(blocks):
                with b.scope(i):
                    x = block(b, x, _scaled(planes, width), 2 if stage > 1 and i == 0 else 1)
    x = b.flatten(b.global_avgpool(x, name="avgpool"))
    logits = b.gemm(x, num_classes, name="fc", center=True)
    return b.build({"logits": logits}, _doc(name, seed=seed, batch=batch, opset=opset, image_size=image_size,
                                            width=width, num_classes=num_classes))


def resnet18(seed: int = 0, batch=1, opset: int = 17, image_size: int = 224, width: float = 1.0,
             num_classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18 (He et al. 2016), torchvision topology: BasicBlocks [2, 2, 2, 2]."""
    return _resnet("resnet18", _basic_block, [2, 2, 2, 2], seed, batch, opset, image_size, width, num_classes)


def resnet50(seed: int = 0, batch=1, opset: int = 17, image_size: int = 224, width: float = 1.0,
             num_classes: int = 1000) -> onnx.ModelProto:
    """ResNet-50, torchvision topology (v1.5): Bottlenecks [3, 4, 6, 3]."""
    return _resnet("resnet50", _bottleneck, [3, 4, 6, 3], seed, batch, opset, image_size, width, num_classes)


def resnet_tiny(seed: int = 0, batch=1, opset: int = 17, image_size: int = 64,
                num_classes: int = 10) -> onnx.ModelProto:
    """The quick-start model checked in as models/bundled/resnet_tiny.onnx.

    Three BasicBlock stages (16, 32, 64 channels) with BatchNorm, plus the leftovers a
    lossless preset should clean up: an Identity after the stem (an ``nn.Identity``
    placeholder), Dropout before the classifier and an Identity on the logits path.
    """
    b = GraphBuilder("resnet_tiny", seed, opset)
    x = _image_input(b, batch, image_size)
    x = b.relu(b.batchnorm(b.conv(x, 16, 3, 1, 1, bias=False, name="conv1"), name="bn1"), name="relu")
    x = b.identity(x, name="stem_identity")
    for stage, planes in enumerate((16, 32, 64), start=1):
        with b.scope(f"layer{stage}"), b.scope(0):
            x = _basic_block(b, x, planes, 1 if stage == 1 else 2)
    x = b.flatten(b.global_avgpool(x, name="avgpool"))
    x = b.identity(b.dropout(x, 0.2, name="dropout"), name="head_identity")
    logits = b.gemm(x, num_classes, name="fc", center=True)
    return b.build({"logits": logits}, _doc("resnet_tiny", seed=seed, batch=batch, opset=opset,
                                            image_size=image_size, num_classes=num_classes))


# ---------------------------------------------------------------------------- MobileNetV2
# (expansion t, output channels c, repeats n, first stride s): Sandler et al. 2018, Table 2
MOBILENETV2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu6(b: GraphBuilder, x: str, out_ch: int, k: int, stride: int = 1, group: int = 1) -> str:
    """torchvision Conv2dNormActivation: conv (no bias) '0', BN '1', ReLU6 '2'."""
    x = b.conv(x, out_ch, k, stride, (k - 1) // 2, group=group, bias=False, name="0")
    return b.relu6(b.batchnorm(x, name="1"), name="2")


def mobilenetv2(seed: int = 0, batch=1, opset: int = 17, image_size: int = 224, width: float = 1.0,
                num_classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV2 (torchvision topology): inverted residuals with depthwise 3x3 convs, ReLU6 as Clip."""
    b = GraphBuilder("mobilenetv2", seed, opset)
    x = _image_input(b, batch, image_size)
    index = 0
    with b.scope("features"):
        with b.scope(index):
            x = _conv_bn_relu6(b, x, _scaled(32, width), 3, 2)
        for t, c, n, s in MOBILENETV2_SETTING:
            out_ch = _scaled(c, width)
            for i in range(n):
                index += 1
                stride = s if i == 0 else 1
                with b.scope(index), b.scope("conv"):
                    in_ch = b.channels(x)
                    h, layer = x, 0
                    if t != 1:
                        with b.scope(layer):
                            h = _conv_bn_relu6(b, h, in_ch * t, 1)
                        layer += 1
                    with b.scope(layer):
                        h = _conv_bn_relu6(b, h, b.channels(h), 3, stride, group=b.channels(h))
                    # linear bottleneck: 1x1 projection + BN, no activation
                    h = b.conv(h, out_ch, 1, 1, 0, bias=False, gain=1.0, name=str(layer + 1))
                    residual = stride == 1 and in_ch == out_ch
                    h = b.batchnorm(h, name=str(layer + 2), gamma=RESIDUAL_GAMMA if residual else (0.5, 1.5))
                x = b.add(x, h) if residual else h
        index += 1
        with b.scope(index):
            x = _conv_bn_relu6(b, x, _scaled(1280, width) if width > 1.0 else 1280, 1)
    x = b.flatten(b.global_avgpool(x, name="avgpool"))
    with b.scope("classifier"):
        x = b.dropout(x, 0.2, name="0")
        logits = b.gemm(x, num_classes, name="1", center=True)
    return b.build({"logits": logits}, _doc("mobilenetv2", seed=seed, batch=batch, opset=opset,
                                            image_size=image_size, width=width, num_classes=num_classes))


# ---------------------------------------------------------------------------- VGG-16
VGG16_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(seed: int = 0, batch=1, opset: int = 17, image_size: int = 224, width: float = 1.0,
          num_classes: int = 1000) -> onnx.ModelProto:
    """VGG-16 (Simonyan & Zisserman 2015, configuration D) with its Dropout classifier.

    At image_size 224 the last feature map is 7x7, what torchvision's adaptive pool
    expects, so the pool is left out and the classifier reads 512·7·7 features; at other
    sizes it reads 512·s·s with s = image_size // 32. ``width`` also scales the 4096-wide
    hidden layers.
    """
    if image_size < 32:
        raise ValueError(f"vgg16 needs image_size >= 32 (five 2x2 max-pools), got {image_size}")
    b = GraphBuilder("vgg16", seed, opset)
    x = _image_input(b, batch, image_size)
    index = 0  # torchvision's nn.Sequential index: conv, ReLU and pool each take one
    with b.scope("features"):
        for item in VGG16_CONFIG:
            if item == "M":
                x = b.maxpool(x, 2, 2, name=str(index))
                index += 1
            else:
                x = b.relu(b.conv(x, _scaled(item, width), 3, 1, 1, name=str(index)), name=str(index + 1))
                index += 2
    x = b.flatten(x)
    hidden = _scaled(4096, width)
    with b.scope("classifier"):
        x = b.dropout(b.relu(b.gemm(x, hidden, gain=2.0, name="0"), name="1"), 0.5, name="2")
        x = b.dropout(b.relu(b.gemm(x, hidden, gain=2.0, name="3"), name="4"), 0.5, name="5")
        logits = b.gemm(x, num_classes, name="6", center=True)
    return b.build({"logits": logits}, _doc("vgg16", seed=seed, batch=batch, opset=opset,
                                            image_size=image_size, width=width, num_classes=num_classes))


# ---------------------------------------------------------------------------- SqueezeNet 1.1
def _fire(b: GraphBuilder, x: str, squeeze: int, expand1x1: int, expand3x3: int) -> str:
    """Fire module (Iandola et al. 2016): 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""
    s = b.relu(b.conv(x, squeeze, 1, 1, 0, name="squeeze"), name="squeeze_activation")
    e1 = b.relu(b.conv(s, expand1x1, 1, 1, 0, name="expand1x1"), name="expand1x1_activation")
    e3 = b.relu(b.conv(s, expand3x3, 3, 1, 1, name="expand3x3"), name="expand3x3_activation")
    return b.concat([e1, e3], axis=1)


def squeezenet11(seed: int = 0, batch=1, opset: int = 17, image_size: int = 224, width: float = 1.0,
                 num_classes: int = 1000) -> onnx.ModelProto:
    """SqueezeNet 1.1 (torchvision topology): Fire modules, ceil-mode max-pools, conv classifier."""
    b = GraphBuilder("squeezenet11", seed, opset)
    x = _image_input(b, batch, image_size)
    ch = lambda c: _scaled(c, width)  # noqa: E731
    fires = {3: (16, 64), 4: (16, 64), 6: (32, 128), 7: (32, 128), 9: (48, 192), 10: (48, 192),
             11: (64, 256), 12: (64, 256)}
    with b.scope("features"):
        x = b.relu(b.conv(x, ch(64), 3, 2, 0, name="0"), name="1")
        for index in range(2, 13):
            if index in (2, 5, 8):
                x = b.maxpool(x, 3, 2, ceil_mode=True, name=str(index))
            else:
                squeeze, expand = fires[index]
                with b.scope(index):
                    x = _fire(b, x, ch(squeeze), ch(expand), ch(expand))
    with b.scope("classifier"):
        x = b.dropout(x, 0.5, name="0")
        # conv classifier: its outputs are averaged over the h x w map, so a gain of 2·h·w
        # gives class scores that differ by O(1) between inputs
        h, w = b.shape(x)[2:]
        x = b.relu(b.conv(x, num_classes, 1, 1, 0, gain=2.0 * h * w, center=True, name="1"), name="2")
        x = b.global_avgpool(x, name="3")
    logits = b.flatten(x)
    return b.build({"logits": logits}, _doc("squeezenet11", seed=seed, batch=batch, opset=opset,
                                            image_size=image_size, width=width, num_classes=num_classes))


# ---------------------------------------------------------------------------- GoogLeNet-style
# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj): Szegedy et al. 2015, Table 1
INCEPTION_BLOCKS = {
    "inception3a": (64, 96, 128, 16, 32, 32), "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64), "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64), "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128), "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


def _basic_conv(b: GraphBuilder, x: str, out_ch: int, k: int, stride: int = 1, pad: int | None = None) -> str:
    """torchvision GoogLeNet BasicConv2d: conv (no bias), BN (eps 1e-3), ReLU."""
    x = b.conv(x, out_ch, k, stride, pad, bias=False, name="conv")
    return b.relu(b.batchnorm(x, eps=1e-3, name="bn"), name="relu")


def _inception_block(b: GraphBuilder, x: str, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> str:
    """Four branches concatenated; three 1x1 convs read the block input side by side."""
    with b.scope("branch1"):
        b1 = _basic_conv(b, x, c1, 1)
    with b.scope("branch2"):
        with b.scope(0):
            b2 = _basic_conv(b, x, c3r, 1)
        with b.scope(1):
            b2 = _basic_conv(b, b2, c3, 3)
    with b.scope("branch3"):
        with b.scope(0):
            b3 = _basic_conv(b, x, c5r, 1)
        with b.scope(1):
            b3 = _basic_conv(b, b3, c5, 5)
    with b.scope("branch4"):
        b4 = b.maxpool(x, 3, 1, 1, ceil_mode=True, name="0")
        with b.scope(1):
            b4 = _basic_conv(b, b4, pool, 1)
    return b.concat([b1, b2, b3, b4], axis=1)


def inception(seed: int = 0, batch=1, opset: int = 17, image_size: int = 224, width: float = 1.0,
              num_classes: int = 1000) -> onnx.ModelProto:
    """GoogLeNet (Inception v1) without the training-only auxiliary heads, BN after every conv."""
    b = GraphBuilder("inception", seed, opset)
    x = _image_input(b, batch, image_size)
    ch = lambda c: _scaled(c, width)  # noqa: E731
    with b.scope("conv1"):
        x = _basic_conv(b, x, ch(64), 7, 2, 3)
    x = b.maxpool(x, 3, 2, ceil_mode=True, name="maxpool1")
    with b.scope("conv2"):
        x = _basic_conv(b, x, ch(64), 1)
    with b.scope("conv3"):
        x = _basic_conv(b, x, ch(192), 3)
    x = b.maxpool(x, 3, 2, ceil_mode=True, name="maxpool2")
    for block, channels in INCEPTION_BLOCKS.items():
        with b.scope(block):
            x = _inception_block(b, x, *(ch(c) for c in channels))
        if block == "inception3b":
            x = b.maxpool(x, 3, 2, ceil_mode=True, name="maxpool3")
        elif block == "inception4e":
            x = b.maxpool(x, 2, 2, ceil_mode=True, name="maxpool4")
    x = b.flatten(b.global_avgpool(x, name="avgpool"))
    x = b.dropout(x, 0.2, name="dropout")
    logits = b.gemm(x, num_classes, name="fc", center=True)
    return b.build({"logits": logits}, _doc("inception", seed=seed, batch=batch, opset=opset,
                                            image_size=image_size, width=width, num_classes=num_classes))


# ---------------------------------------------------------------------------- tiny test nets
def tiny_cnn(seed: int = 0, batch=1, opset: int = 17) -> onnx.ModelProto:
    """conv-BN-ReLU twice, a residual Add, global average pool, Flatten + Gemm: input 1x3x32x32, 10 logits."""
    b = GraphBuilder("tiny_cnn", seed, opset)
    x = b.input("input", [batch, 3, 32, 32])
    a = b.relu(b.batchnorm(b.conv(x, 8, 3, bias=False, name="conv1"), name="bn1"), name="relu1")
    h = b.relu(b.batchnorm(b.conv(a, 8, 3, bias=True, name="conv2"), name="bn2", gamma=RESIDUAL_GAMMA),
               name="relu2")
    x = b.flatten(b.global_avgpool(b.add(a, h, name="residual")))
    logits = b.gemm(x, 10, name="fc", center=True)
    return b.build({"logits": logits}, _doc("tiny_cnn", seed=seed, batch=batch, opset=opset))


def tiny_mlp(seed: int = 0, batch=1, opset: int = 17) -> onnx.ModelProto:
    """Two MatMul+Add+ReLU layers (as TF/Keras exports write dense layers) and a Gemm: 16 -> 10."""
    b = GraphBuilder("tiny_mlp", seed, opset)
    x = b.input("input", [batch, 16])
    for i in (1, 2):
        x = b.relu(b.bias_add(b.matmul(x, 32, gain=2.0, name=f"dense{i}"), name=f"dense{i}"), name=f"relu{i}")
    logits = b.gemm(x, 10, name="fc", center=True)
    return b.build({"logits": logits}, _doc("tiny_mlp", seed=seed, batch=batch, opset=opset))


def tiny_if(seed: int = 0, batch=1, opset: int = 17) -> onnx.ModelProto:
    """An If whose branches hold Conv(+BN)/Add and read outer-scope tensors: 1x3x8x8, 10 logits.

    ``cond = ReduceMean(input) > 0``, so random inputs take either branch. On the stem
    output ``h`` (Conv + ReLU in the main graph), the then-branch runs a 3x3 conv
    and BN whose weights live in the outer graph, plus Add(h); the else-branch a 1x1 conv
    with its own initializers, plus Add(h). Input 1x3x8x8, 10 logits.
    """
    b = GraphBuilder("tiny_if", seed, opset)
    x = b.input("input", [batch, 3, 8, 8])
    h = b.relu(b.conv(x, 4, 3, name="stem"), name="stem_relu")
    probe = b.values[x]
    mean = b.node("ReduceMean", [x], name="cond", shape=(), keepdims=0,
                  value=np.array(probe.mean(), np.float32))
    cond = b.node("Greater", [mean, b.constant("zero", 0.0)], name="cond", shape=(), dtype=TensorProto.BOOL,
                  value=np.array(probe.mean() > 0))

    then_b = b.subgraph(weights_in_parent=True)
    with then_b.scope("then"):
        t = then_b.batchnorm(then_b.conv(h, 4, 3, bias=False, name="conv"), name="bn")
        t = then_b.add(t, h, name="residual")
    else_b = b.subgraph(weights_in_parent=False)
    with else_b.scope("else"):
        e = else_b.add(else_b.conv(h, 4, 1, name="conv"), h, name="residual")
    y = b.node("If", [cond], name="branch", shape=b.shape(h), dtype=TensorProto.FLOAT,
               value=b.values[t] if b.values[cond] else b.values[e],
               then_branch=then_b.build_graph([t], "then_branch"),
               else_branch=else_b.build_graph([e], "else_branch"))
    x = b.flatten(b.global_avgpool(b.relu(y, name="relu")))
    logits = b.gemm(x, 10, name="fc", center=True)
    return b.build({"logits": logits}, _doc("tiny_if", seed=seed, batch=batch, opset=opset))


def tiny_constant_weights(seed: int = 0, batch=1, opset: int = 17) -> onnx.ModelProto:
    """Every weight is a Constant node, no initializers (as PaddlePaddle exports): 1x3x16x16, 10 logits."""
    b = GraphBuilder("tiny_constant_weights", seed, opset, weights_as_constants=True)
    x = b.input("input", [batch, 3, 16, 16])
    x = b.relu(b.batchnorm(b.conv(x, 8, 3, bias=False, name="conv1"), name="bn1"), name="relu1")
    x = b.maxpool(x, 2, 2, name="pool")
    x = b.relu(b.conv(x, 8, 3, name="conv2"), name="relu2")
    logits = b.gemm(b.flatten(b.global_avgpool(x)), 10, name="fc", center=True)
    return b.build({"logits": logits}, _doc("tiny_constant_weights", seed=seed, batch=batch, opset=opset))


def tiny_dynamic(seed: int = 0, batch="N", opset: int = 17) -> onnx.ModelProto:
    """Dynamic batch ``N`` and PyTorch's Shape-Gather-Unsqueeze-Concat-Reshape flatten: Nx3x16x16, logits Nx10.

    The chain is what ``x.view(x.size(0), -1)`` exports to: Shape -> Gather(0) ->
    Unsqueeze -> Concat([n, -1]) -> Reshape.
    """
    b = GraphBuilder("tiny_dynamic", seed, opset)
    x = b.input("input", [batch, 3, 16, 16])
    x = b.relu(b.batchnorm(b.conv(x, 8, 3, bias=False, name="conv1"), name="bn1"), name="relu1")
    x = b.maxpool(x, 2, 2, name="pool")  # N x 8 x 8 x 8
    n, c, hh, ww = b.shape(x)
    size0 = b.unsqueeze(b.gather(b.shape_of(x), 0), [0])
    target = b.concat([size0, b.constant("minus_one", [-1], np.int64)], axis=0)
    x = b.reshape(x, target, out_shape=(n, c * hh * ww))
    logits = b.gemm(x, 10, name="fc", center=True)
    return b.build({"logits": logits}, _doc("tiny_dynamic", seed=seed, batch=batch, opset=opset))


def tiny_custom_op(seed: int = 0, batch=1, opset: int = 17) -> onnx.ModelProto:
    """MatMul+Add -> com.example::MyOp -> ReLU -> Gemm, for pass-through tests only.

    onnxruntime has no kernel for ``MyOp``, so this model passes onnx.checker but cannot
    run: use it to check that passes keep unknown-domain nodes (and their domain opset
    import) untouched.
    """
    b = GraphBuilder("tiny_custom_op", seed, opset)
    b.extra_opsets["com.example"] = 1
    x = b.input("input", [batch, 8])
    x = b.bias_add(b.matmul(x, 16, name="dense"), name="dense")
    x = b.node("MyOp", [x], name="custom", domain="com.example", alpha=0.5)
    logits = b.gemm(b.relu(x, name="relu"), 4, name="fc", center=True)
    return b.build({"logits": logits}, _doc("tiny_custom_op", seed=seed, batch=batch, opset=opset))


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "vgg16": vgg16,
    "squeezenet11": squeezenet11,
    "inception": inception,
    "resnet_tiny": resnet_tiny,
    "tiny_cnn": tiny_cnn,
    "tiny_mlp": tiny_mlp,
    "tiny_if": tiny_if,
    "tiny_constant_weights": tiny_constant_weights,
    "tiny_dynamic": tiny_dynamic,
    "tiny_custom_op": tiny_custom_op,
}

# Models no runtime can execute (pass-through tests only).
NOT_RUNNABLE = frozenset({"tiny_custom_op"})


def build(name: str, **kwargs) -> onnx.ModelProto:
    """Build model ``name`` from :data:`BUILDERS`; a ``ValueError`` names the known ones."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(BUILDERS)}")
    return BUILDERS[name](**kwargs)


def _summary(fn: Callable) -> str:
    return (inspect.getdoc(fn) or "").splitlines()[0]


class _OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes end in one line and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}. Fix: see python -m models.zoo --help.\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineErrorParser(prog="python -m models.zoo",
                                 description="Write a model with random weights built by models.zoo.")
    parser.add_argument("name", nargs="?", help="model name (see --list)")
    parser.add_argument("-o", "--output", help="path of the .onnx file to write")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--batch", default=None, help="batch size, or a name such as N for a dynamic batch")
    parser.add_argument("--image-size", type=int, default=None, help="input height and width (big models)")
    parser.add_argument("--width", type=float, default=None, help="channel multiplier (big models)")
    args = parser.parse_args(argv)

    if args.list:
        for name, fn in BUILDERS.items():
            print(f"{name:24s} {_summary(fn)}")
        return 0
    if not args.name or not args.output:
        print("error: give a model name and -o PATH (or --list).", file=sys.stderr)
        return 2
    if args.name not in BUILDERS:
        print(f"error: unknown model '{args.name}'. Fix: use one of: {', '.join(BUILDERS)}.", file=sys.stderr)
        return 2
    fn = BUILDERS[args.name]
    kwargs = {"seed": args.seed, "opset": args.opset}
    if args.batch is not None:
        if args.batch.isdigit() and int(args.batch) > 0:
            kwargs["batch"] = int(args.batch)
        elif args.batch.isidentifier():
            kwargs["batch"] = args.batch
        else:
            print(f"error: bad --batch '{args.batch}'. Fix: give a positive integer or a name such as N.",
                  file=sys.stderr)
            return 2
    accepted = inspect.signature(fn).parameters
    for option, key in (("--image-size", "image_size"), ("--width", "width")):
        value = getattr(args, key)
        if value is None:
            continue
        if key not in accepted:
            print(f"error: model '{args.name}' has no {option} option. Fix: leave it out.", file=sys.stderr)
            return 2
        kwargs[key] = value
    try:
        model = fn(**kwargs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # write to a temporary file and rename, so a failed write leaves no partial model
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=os.path.dirname(os.path.abspath(args.output)))
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, args.output)
    except OSError as exc:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        print(f"error: cannot write {args.output}: {exc.strerror or exc}. Fix: choose a writable path.",
              file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {args.name}, {len(model.graph.node)} nodes, opset {args.opset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
