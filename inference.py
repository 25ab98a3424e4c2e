"""What surrounds the network at inference: letterbox in, boxes out.

    groups = letterbox_groups(images, img_size)               # any sizes -> batches of equal shape, resize ratios
    settings = detection_settings(detector)                    # None -> the calibrated threshold, the file's NMS
    found = select_detections(scores, boxes, *settings)        # threshold, top-k, class-aware NMS per image
    unletterbox(found, ratios, sizes)                          # back to each image's own pixels

LightweightDetector.predict (model_lightweight.py) and the ONNX Runtime backend (ort_detector.py) share these, so
both backends select and map boxes alike; the data pipeline pads with the same LETTERBOX_FILL. This module never
imports the model.
"""
import collections
import importlib.machinery
import importlib.util
import math
import os
import time

import torch
import torch.nn.functional as F

from config import inference_defaults

# The detector's feature strides. They live here, below the model, because a letterbox pads to a multiple of the
# largest; model_lightweight builds its levels from them.
STRIDES = (8, 16, 32)
LETTERBOX_FILL = 114  # uint8 grey used to pad letterboxed images, as in YOLO


# ---- letterbox in ---------------------------------------------------------------------------------------------
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
    image = resize(image, (new_h, new_w))
    image = F.pad(image, (0, out_w - new_w, 0, out_h - new_h), value=LETTERBOX_FILL if uint8 else LETTERBOX_FILL / 255)
    return (image.to(torch.float32).mul_(1.0 / 255) if uint8 else image), (new_w / width, new_h / height)


def resize(image, size):
    """A (C, H, W) uint8 or float image resized to size (h, w), bilinear with antialiasing: the pixels of
    torchvision.transforms.v2.functional.resize (which the data pipeline uses), without importing torchvision for
    a predict's cold start (tests/test_speed.py checks they are equal)."""
    if tuple(size) == tuple(image.shape[-2:]):
        return image
    return F.interpolate(image[None], size=list(size), mode="bilinear", align_corners=False, antialias=True)[0]


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


# ---- timing of the phases -------------------------------------------------------------------------------------
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


# ---- boxes out ------------------------------------------------------------------------------------------------
def unletterbox(results, ratios, sizes):
    """Map detections from network-input pixels back to each original (H, W) image, clipped to it."""
    for result, (ratio_w, ratio_h), size in zip(results, ratios, sizes):
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], device=result["boxes"].device)
        result["boxes"] = clip_boxes(result["boxes"] / scale, size)
    return results


def clip_boxes(boxes, size):
    """xyxy boxes (N, 4) clipped to an image of size (H, W), as torchvision.ops.clip_boxes_to_image."""
    height, width = (int(side) for side in size)
    x, y = boxes[..., 0::2].clamp(min=0, max=width), boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def detection_settings(detector, conf_threshold=None, iou_threshold=None, max_detections=None):
    """(conf_threshold, iou_threshold, max_detections) with each None filled in: the score threshold from
    `detector.conf_thresholds` (a checkpoint's calibrated thresholds, one per class) or `detector.conf_threshold`
    (one for all: an older checkpoint's calibrated threshold, else the file's), NMS IoU and the per-image cap from
    config_transfer_learning.json's "inference" section (config.inference_defaults), read only when needed."""
    if conf_threshold is None:
        conf_threshold = getattr(detector, "conf_thresholds", None) or detector.conf_threshold
    if iou_threshold is None or max_detections is None:
        defaults = inference_defaults()
        iou_threshold = defaults["iou_threshold"] if iou_threshold is None else iou_threshold
        max_detections = defaults["max_detections"] if max_detections is None else max_detections
    return conf_threshold, iou_threshold, max_detections


def lowest_threshold(conf_threshold):
    """The lowest of per-class score thresholds (a score stays as it is): what one cut for every class keeps."""
    return min(float(t) for t in conf_threshold) if isinstance(conf_threshold, (list, tuple)) else conf_threshold


def select_detections(scores_all, boxes_all, conf_threshold, iou_threshold, max_detections, pre_nms_topk=1000):
    """Detections of a batch: scores (B, A, C) probabilities and boxes (B, A, 4) xyxy -> per image the (class,
    box) pairs scoring at least `conf_threshold` (a score, or a sequence of one per class), the `pre_nms_topk`
    best, class-aware NMS (batched_nms), the `max_detections` best. The PyTorch model and the ONNX Runtime backend
    share it, so both select alike."""
    num_classes = scores_all.shape[-1]
    thresholds = torch.as_tensor(conf_threshold, dtype=scores_all.dtype, device=scores_all.device)
    if thresholds.dim() and thresholds.numel() != num_classes:
        raise ValueError(f"{thresholds.numel()} per-class score thresholds for {num_classes} classes")
    results = []
    for scores, boxes in zip(scores_all, boxes_all):
        scores, above = scores.flatten(), (scores >= thresholds).flatten()  # (A, C) against (C,) or one score
        keep = torch.nonzero(above).squeeze(1)  # "score >= t", as evaluate's P/R
        if keep.numel() > pre_nms_topk:
            keep = keep[scores[keep].topk(pre_nms_topk).indices]
        scores, labels = scores[keep], keep % num_classes
        boxes = boxes[keep // num_classes]
        keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


def batched_nms(boxes, scores, labels, iou_threshold):
    """Class-aware NMS: the indices kept, by score descending. torchvision.ops.batched_nms's result for the at most
    pre_nms_topk boxes select_detections passes (each class's boxes moved apart by an offset, one NMS over all), run
    by torchvision's own compiled kernel."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return _nms_kernel()(boxes + offsets[:, None], scores, iou_threshold)


def _nms_kernel():
    """torch.ops.torchvision.nms, with torchvision's compiled library loaded but not its Python package: `import
    torchvision` imports its models and torch._dynamo, seconds of a predict's cold start (issue #27). Falls back to
    importing torchvision where the library is not found by name."""
    try:
        return torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):  # not registered yet
        pass
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.origin:
        finder = importlib.machinery.FileFinder(os.path.dirname(spec.origin), (
            importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
        for name in ("_C_stable", "_C"):  # the library's name from torchvision 0.29, and before
            library = finder.find_spec(name)
            if library is not None:
                try:
                    torch.ops.load_library(library.origin)
                    return torch.ops.torchvision.nms
                except (OSError, AttributeError, RuntimeError):
                    break
    import torchvision.ops  # noqa: F401  (registers the kernel)
    return torch.ops.torchvision.nms


# ---- exported models -----------------------------------------------------------------------------------------
def sidecar_path(onnx_path):
    """The JSON sidecar beside an exported model: NAME.json for NAME.onnx."""
    return os.path.splitext(str(onnx_path))[0] + ".json"


def session_options(threads=None):
    """CPU session options: `threads` intra-op threads (None: ONNX Runtime's choice), one inter-op thread, and
    no spinning, so that sessions interleaved with each other or with torch threads do not burn the cores. The
    export's check and ort_detector's backend run alike."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


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
