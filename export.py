"""Export a trained detector to ONNX (and INT8), check it with ONNX Runtime, and write a JSON sidecar beside it.

    python export.py --checkpoint finetune_results/whiteline_*/best_model.pth
    python export.py --checkpoint RUN/best_model.pth --int8     # + best_model_int8.onnx, calibrated on RUN's train part
    python export.py --checkpoint best_model.pth --int8 --calib-images data/train/images
    python export.py --checkpoint best_model.pth --img-size 320 --dynamic-batch --output model.onnx
    python export.py --checkpoint best_model.pth --include-nms --conf 0.4 --check-image street.jpg
    python export.py --checkpoint best_model.pth --static     # (1, 3, S, S), anchors constant: runs in OpenCV DNN

The graph takes float32 (B, 3, H, W) RGB images in [0, 1], letterboxed to S: the longer side resized to S,
padded right/bottom with 114/255 to the next multiple of 32 (H and W are dynamic: a 4:3 photo at 320 runs at
256x320, as predict() runs it; with --static the input is (1, 3, S, S), every image padded to the square, and the
anchor points are constants, for OpenCV's cv2.dnn and other runtimes without dynamic shapes; examples/ has a plain
ONNX Runtime + numpy client). The model's normalisation (model_config mean/std: ImageNet's, or 127/255 and
128/255 for lite0; recorded in the sidecar) is inside it. It returns
  boxes   (B, A, 4) xyxy in network-input pixels (divide by the letterbox ratio for original pixels)
  scores  (B, A, C) per-class sigmoid probabilities
or, with --include-nms, one output
  detections  (N, 7) rows [batch_index, x1, y1, x2, y2, score, class_index], class-aware NMS by the ONNX
              NonMaxSuppression op at the --conf/--iou/--max-det baked into the graph (--max-det is per class).
BatchNorm is folded into the convolutions first (the head's shared conv becomes one conv per pyramid
level, because each level has its own BatchNorm). --int8 also writes NAME_int8.onnx, statically quantised with
ONNX Runtime's tools (quantize.py) on --calib-count images of --calib-images (default, for a checkpoint in its
fine-tuning run folder: the run's training images, per its split.json); the float model stays beside it.
predict.py and evaluate.py run either with --backend onnxruntime (ort_detector.py), the sidecar supplying class
names, input size and the calibrated score thresholds (one per class: postprocess.calibrated_conf_thresholds). The
classic TorchScript-based exporter
(`dynamo=False`) is used: it needs no onnxscript and maps NMS to NonMaxSuppression through a symbolic.
"""
import argparse
import inspect
import logging
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torchvision
from torch import nn

from config import inference_defaults, run_cli, write_json_atomic
from dataset_coco import decode_image
from inference import (LETTERBOX_FILL, STRIDES, detection_settings, letterbox, lowest_threshold, session_options,
                       sidecar_path)
from model_lightweight import decode_boxes, fuse_batchnorm, load_model

logger = logging.getLogger("export")

DEFAULT_OPSET = 17  # ONNX Runtime >= 1.12 runs every op used here at 17; NonMaxSuppression needs >= 11
CHECK_TOLERANCE = 1e-4  # ONNX Runtime vs PyTorch: scores, and boxes as a fraction of the input side


# ---------------------------------------------------------------------------------------------- export graph

class _MultiClassNMS(torch.autograd.Function):
    """Per-image, per-class NMS with ONNX NonMaxSuppression semantics.

    PyTorch runs torchvision's batched_nms; the exporter emits one NonMaxSuppression op (symbolic below).
    Returns int64 (N, 3) rows [batch, class, box], ordered by batch, class, then score descending, with at
    most `max_per_class` rows per (batch, class) and only scores > `score_threshold`, as ONNX Runtime does.
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class, iou_threshold, score_threshold):
        selected = []
        for b in range(boxes.shape[0]):
            classes, anchors = torch.nonzero(scores[b] > score_threshold, as_tuple=True)  # scores (B, C, A)
            class_scores = scores[b, classes, anchors]
            keep = torchvision.ops.batched_nms(boxes[b, anchors], class_scores, classes, iou_threshold)
            keep = keep[torch.sort(classes[keep], stable=True).indices]  # by class, score order kept
            counts = torch.zeros_like(keep)
            for c in classes[keep].unique():
                in_class = classes[keep] == c
                counts[in_class] = torch.arange(int(in_class.sum()))
            keep = keep[counts < max_per_class]
            selected.append(torch.stack([torch.full_like(keep, b), classes[keep], anchors[keep]], dim=1))
        return torch.cat(selected) if selected else torch.zeros(0, 3, dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
        def constant(value, dtype):
            return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))
        # center_point_box=0 reads corners as [y1, x1, y2, x2]; IoU is the same for xyxy corners.
        return g.op("NonMaxSuppression", boxes, scores, constant(max_per_class, torch.int64),
                    constant(iou_threshold, torch.float32), constant(score_threshold, torch.float32))


class ExportModel(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> (boxes (B, A, 4) xyxy input pixels, scores (B, A, C) sigmoid),
    or with include_nms -> detections (N, 7) [batch_index, x1, y1, x2, y2, score, class_index].

    With `static_size` S the input is (1, 3, S, S) and the anchor points are a buffer, so the traced graph holds
    them as a constant: OpenCV's DNN module cannot run the Range/Expand ops that build them from the input shape
    (issue #26).
    """

    def __init__(self, model, include_nms=False, conf_threshold=None, iou_threshold=None, max_detections=None,
                 static_size=None):
        """The in-graph NMS settings (include_nms) as model.predict's: None is the model's calibrated threshold
        and the "inference" section's IoU and cap (inference.detection_settings)."""
        super().__init__()
        self.model = model
        self.include_nms = include_nms
        conf_threshold, iou_threshold, max_detections = detection_settings(model, conf_threshold, iou_threshold,
                                                                           max_detections)
        # ONNX NonMaxSuppression has one score threshold: per-class thresholds keep the lowest in the graph, and
        # the sidecar's calibrated_conf_thresholds filter the rows of each class
        self.nms_args = (int(max_detections), float(iou_threshold), float(lowest_threshold(conf_threshold)))
        self.static = static_size is not None
        if self.static:
            training = model.training
            with torch.no_grad():  # the model's own grid for this input: no second copy of its stride arithmetic
                points = model.eval()(torch.zeros(1, 3, static_size, static_size))["points"]  # (A, 2)
            model.train(training)
            self.register_buffer("points", points, persistent=False)

    def forward(self, images):
        outputs = self.model(images)
        points = self.points if self.static else outputs["points"]  # the unused grid ops are dropped on export
        boxes = decode_boxes(points, outputs["box_ltrb"])  # (B, A, 4)
        scores = outputs["cls_logits"].sigmoid()  # (B, A, C)
        if not self.include_nms:
            return boxes, scores
        scores_by_class = scores.transpose(1, 2)  # (B, C, A), the layout NonMaxSuppression reads
        selected = _MultiClassNMS.apply(boxes, scores_by_class, *self.nms_args)  # (N, 3)
        batch, cls, anchor = selected[:, 0], selected[:, 1], selected[:, 2]
        num_anchors, num_classes = scores.shape[1], scores.shape[2]
        # Flat gathers instead of advanced indexing: each becomes one ONNX Gather.
        kept_boxes = boxes.reshape(-1, 4)[batch * num_anchors + anchor]
        kept_scores = scores_by_class.reshape(-1)[(batch * num_classes + cls) * num_anchors + anchor]
        return torch.cat([batch[:, None].float(), kept_boxes, kept_scores[:, None], cls[:, None].float()], 1)


def output_spec(model, img_size, include_nms, dynamic_batch, static=False):
    """Output names and shapes (strings for dynamic dimensions) of the exported graph."""
    batch = "batch" if dynamic_batch else 1
    num_anchors = "anchors (H/8 * W/8 + H/16 * W/16 + H/32 * W/32)"
    if static:
        num_anchors = sum((img_size // stride) ** 2 for stride in STRIDES)
    if include_nms:
        return {"detections": {"shape": ["num_detections", 7],
                               "columns": ["batch_index", "x1", "y1", "x2", "y2", "score", "class_index"],
                               "format": "xyxy, network-input pixels; class_index into class_names"}}
    return {"boxes": {"shape": [batch, num_anchors, 4],
                      "format": "xyxy, pixels of the letterboxed input, not clipped: divide by the resize ratios, "
                                "then clip to the original image (0..width, 0..height), as predict.py does"},
            "scores": {"shape": [batch, num_anchors, model.num_classes], "format": "per-class sigmoid"}}


def export_onnx(module, path, img_size, output_names, opset, dynamic_batch, static=False):
    """torch.onnx.export with the TorchScript-based exporter (dynamo=False), then onnx.checker. With `static`, every
    input and output dimension is fixed (batch 1, img_size x img_size)."""
    import onnx
    dynamic_axes = {} if static else {"images": {2: "height", 3: "width"}}
    if not static:
        dynamic_axes.update({name: {1: "anchors"} for name in output_names if name != "detections"})
    if dynamic_batch:
        dynamic_axes["images"][0] = "batch"
        for name in output_names:
            if name != "detections":
                dynamic_axes[name][0] = "batch"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of the TorchScript exporter, tracer notes
        # torch < 2.5 has no `dynamo` argument and only the TorchScript exporter.
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(module, (torch.rand(1, 3, img_size, img_size),), path, **legacy,
                          opset_version=opset, input_names=["images"], output_names=list(output_names),
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(path))


# ---------------------------------------------------------------------------------------------- checks

def _sorted_rows(detections):
    """NMS rows in a canonical order (batch, class, -score, box), so tie order cannot fail a comparison."""
    d = np.asarray(detections, dtype=np.float64).reshape(-1, 7)
    return d[np.lexsort((d[:, 1], d[:, 2], d[:, 3], d[:, 4], -d[:, 5], d[:, 6], d[:, 0]))]


def run_pytorch(module, images):
    with torch.no_grad():
        outputs = module(images)
    return [o.numpy() for o in ((outputs,) if isinstance(outputs, torch.Tensor) else outputs)]


def max_abs_diffs(expected, got, output_names):
    """{name: max abs difference} between two lists of output arrays; box coordinates are in input pixels.

    NMS detections are compared in a canonical row order and split into their box columns
    ("detections: boxes") and the rest ("detections: batch, score, class")."""
    diffs = {}
    for name, want, have in zip(output_names, expected, got):
        if name == "detections":
            want, have = _sorted_rows(want), _sorted_rows(have)
        if want.shape != have.shape:
            logger.warning("%s: shapes differ, %s vs %s", name, want.shape, have.shape)
            diffs[name] = float("inf")
        elif name == "detections":
            diff = np.abs(want - have) if want.size else np.zeros((1, 7))
            diffs["detections: boxes"] = float(diff[:, 1:5].max())
            diffs["detections: batch, score, class"] = float(diff[:, [0, 5, 6]].max())
        else:
            diffs[name] = float(np.abs(want - have).max()) if want.size else 0.0
    return diffs


def _is_box(name):
    return name.endswith("boxes")


def within_tolerance(diffs, img_size, tolerance=CHECK_TOLERANCE):
    """Scores must agree to `tolerance`; box coordinates to `tolerance` of the input side.

    Box coordinates are pixels up to S: float32 rounding alone moves a trained model's boxes by ~1e-4 px
    at S=320 (BN folding in PyTorch does too), so an absolute 1e-4 px would fail correct exports.
    """
    return all(diff <= tolerance * (img_size if _is_box(name) else 1) for name, diff in diffs.items())


def check_inputs(img_size, dynamic_batch, check_image=None, seed=0, static=False):
    """{description: float (B, 3, H, W) in [0, 1]}: a square and (unless `static`) a wide random batch, and the
    letterboxed check image (square with `static`, the graph's only input shape)."""
    generator = torch.Generator().manual_seed(seed)
    rect = max(max(STRIDES), img_size * 3 // 4 // max(STRIDES) * max(STRIDES))
    inputs = {f"random {img_size}x{img_size}": torch.rand(1, 3, img_size, img_size, generator=generator)}
    if not static:
        inputs[f"random {rect}x{img_size}"] = torch.rand(1, 3, rect, img_size, generator=generator)
    if dynamic_batch:
        inputs["random batch 2"] = torch.rand(2, 3, img_size, img_size, generator=generator)
    if check_image is not None:
        image, _ = letterbox(decode_image(check_image, img_size).image, img_size, rect=not static)
        inputs[f"letterboxed {os.path.basename(check_image)}"] = image[None]
    return inputs


def median_latency_ms(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure_latency(modules, sessions, img_size, runs, warmup):
    """Median batch-1 CPU latency in ms of each PyTorch module (eager, no_grad) and ONNX session, network only."""
    image = torch.rand(1, 3, img_size, img_size)
    latencies = {}
    with torch.inference_mode():
        for name, module in modules.items():
            latencies[name] = median_latency_ms(lambda: module(image), runs, warmup)
    feed = {"images": image.numpy()}
    for name, session in sessions.items():
        latencies[name] = median_latency_ms(lambda: session.run(None, feed), runs, warmup)
    return latencies


# ---------------------------------------------------------------------------------------------- sidecar

def sidecar(model, args, onnx_path, outputs):
    """Everything a deployment needs besides the .onnx file: classes, input contract, outputs, opset."""
    config = model.model_config
    size = args.img_size
    pad = (f"right and bottom, to {size}x{size} (the static input)" if args.static else
           f"right and bottom, to the next multiple of {max(STRIDES)} (height and width are dynamic; any multiple "
           f"of {max(STRIDES)} runs)")
    return {
        "format": "onnx", "model_file": os.path.basename(onnx_path), "opset": args.opset,
        "model_size": model.model_size, "num_classes": model.num_classes, "class_names": list(model.class_names),
        "input": {
            "name": "images", "static": args.static,
            "shape": [1, 3, size, size] if args.static
            else ["batch" if args.dynamic_batch else 1, 3, "height", "width"],
            "dtype": "float32", "layout": "NCHW", "color": "RGB", "value_range": [0.0, 1.0],
            # inference.letterbox's rounding: a client that rounds otherwise is off by a pixel row.
            "letterbox": {"size": size,
                          "resize": "longer side to size, aspect kept: scale = size / max(height, width), new_height "
                                    "= round(height * scale), new_width = round(width * scale) (round half to even, "
                                    "as Python's round), bilinear with antialias (PIL's BILINEAR) on 8-bit RGB",
                          "pad": pad, "pad_value": LETTERBOX_FILL / 255,
                          "pad_value_uint8": LETTERBOX_FILL,
                          "to_original_pixels": "divide x by new_width / width and y by new_height / height"},
            "normalization": {"mean": list(config["mean"]), "std": list(config["std"]),
                              "applied_inside_model": True}},
        "outputs": outputs,
        "postprocess": {"calibrated_conf_threshold": model.conf_threshold,
                        "calibrated_conf_thresholds": model.conf_thresholds,
                        "conf_threshold": args.conf, "iou_threshold": args.iou, "max_detections": args.max_det,
                        "max_detections_per": "image and class" if args.include_nms else "image",
                        "clip": "boxes mapped to original pixels are clipped to the image: x to [0, width], y to "
                                "[0, height]",
                        "per_class_thresholds": "calibrated_conf_thresholds (null: calibrated_conf_threshold for "
                                                "every class) is the score threshold of each class, in class_names' "
                                                "order; keep a (box, class) pair scoring at least its class's" +
                                                (", a filter on the rows of the in-graph NMS, which keeps the "
                                                 "lowest" if args.include_nms else ""),
                        "nms": "in graph (ONNX NonMaxSuppression, per class)" if args.include_nms
                        else "not in graph: class-aware NMS over boxes/scores (torchvision.ops.batched_nms)"},
        "batchnorm_fused": True, "torch_version": torch.__version__,
        "checkpoint": os.path.basename(args.checkpoint),
    }


def get_args_parser():
    defaults = inference_defaults()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by training (best_model.pth)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    parser.add_argument("--img-size", type=int, default=None,
                        help="letterbox size (the longer side), a multiple of 32 (default: the checkpoint's img_size)")
    parser.add_argument("--int8", action="store_true", help="also write NAME_int8.onnx, statically quantised")
    parser.add_argument("--calib-images", help="with --int8: a folder of images or annotations (any format) whose "
                                               "images calibrate the quantisation (training images; never the "
                                               "images the checkpoint's run validated on). Default for a checkpoint "
                                               "in its fine-tuning run folder: the run's training images (the train "
                                               "part of its --train-ann per RUN/split.json)")
    parser.add_argument("--calib-root", help="with --int8 and a COCO JSON as --calib-images: its images folder")
    parser.add_argument("--calib-count", type=int, default=100, help="with --int8: images used to calibrate")
    parser.add_argument("--dynamic-batch", action="store_true", help="batch dimension dynamic (default: 1)")
    parser.add_argument("--static", action="store_true",
                        help="fixed input (1, 3, S, S), S = --img-size, square letterbox, anchors as constants: "
                             "for runtimes without dynamic shapes, such as OpenCV's DNN module")
    parser.add_argument("--include-nms", action="store_true", help="NMS inside the graph; output detections (N, 7)")
    parser.add_argument("--conf", type=float, default=None,
                        help=f"score threshold of the in-graph NMS (default: the lowest of the checkpoint's "
                             f"calibrated thresholds, one per class, stored by fine-tuning; else "
                             f"{defaults['conf_threshold']})")
    parser.add_argument("--iou", type=float, default=defaults["iou_threshold"],
                        help="IoU threshold of the in-graph NMS (default: %(default)s)")
    parser.add_argument("--max-det", type=int, default=defaults["max_detections"],
                        help="in-graph NMS: detections kept per image and class (default: %(default)s)")
    parser.add_argument("--output", default=None, help="ONNX path (default: next to the checkpoint, same stem)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version (>= 11)")
    parser.add_argument("--check-image", default=None, help="also compare outputs on this image, letterboxed")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before the latency measurement")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch and ONNX Runtime alike (default: torch.get_num_threads())")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print ONNX Runtime's INFO lines (the INT8 quantiser's, one per tensor)")
    return parser


def _load(args):
    try:
        model = load_model(args.checkpoint, device="cpu")
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load on a non-checkpoint raises KeyError, UnpicklingError, EOFError, ...
        raise ValueError(f"cannot load --checkpoint {args.checkpoint}: {type(error).__name__}: "
                         f"{(str(error) or '?').splitlines()[0]}") from None
    args.img_size = args.img_size or model.img_size
    if args.img_size % max(STRIDES) or args.img_size <= 0:
        raise ValueError(f"--img-size {args.img_size} is not a positive multiple of {max(STRIDES)}")
    if args.opset < 11:
        raise ValueError(f"--opset {args.opset}: NonMaxSuppression and the ops used here need opset >= 11")
    if args.check_image is not None and not os.path.isfile(args.check_image):
        raise FileNotFoundError(f"--check-image not found: {args.check_image}")
    if args.int8 and not args.calib_images:
        import runs  # lazy, as in _calibration_paths
        if runs.checkpoint_run(args.checkpoint) is None:
            raise ValueError("--int8 needs --calib-images (a folder of training images, or their annotations) for a "
                             "checkpoint outside its fine-tuning run folder")
    if args.int8 and args.include_nms:
        raise ValueError("--int8 quantises the boxes/scores graph: drop --include-nms")
    if args.static and args.dynamic_batch:
        raise ValueError("--static fixes the batch at 1: drop --dynamic-batch")
    if args.calib_count < 1:
        raise ValueError(f"--calib-count must be >= 1, got {args.calib_count}")
    return model


def main(argv=None):
    """The command line: export_checkpoint with the flags, its log lines on stderr."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _export(args)


def export_checkpoint(checkpoint, **options):
    """Export from Python (ort_detector's onnxruntime backend does): keyword arguments are export.py's flags by
    their names in Python (output, img_size, int8, include_nms, conf, iou, max_det, opset, runs, warmup, threads,
    ...), the flags' defaults otherwise. Logging is left as the caller configured it. Returns what main returns."""
    args = get_args_parser().parse_args(["--checkpoint", str(checkpoint)])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"export_checkpoint() got unknown options: {', '.join(unknown)}")
    vars(args).update(options)
    return _export(args)


def _export(args):
    """Fuse, export, check against PyTorch, quantise (--int8), time, write the sidecars; returns paths and figures."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args)
    args.conf, args.iou, args.max_det = detection_settings(model, args.conf, args.iou, args.max_det)
    onnx_path = args.output or os.path.splitext(args.checkpoint)[0] + ".onnx"
    nms_args = dict(include_nms=args.include_nms, conf_threshold=args.conf, iou_threshold=args.iou,
                    max_detections=args.max_det, static_size=args.img_size if args.static else None)
    reference = ExportModel(model, **nms_args).eval()
    exported = ExportModel(fuse_batchnorm(model), **nms_args).eval()
    outputs = output_spec(model, args.img_size, args.include_nms, args.dynamic_batch, args.static)

    export_onnx(exported, onnx_path, args.img_size, outputs, args.opset, args.dynamic_batch, args.static)
    print(f"exported {onnx_path} (opset {args.opset}, letterbox {args.img_size}, "
          f"{'static input' if args.static else 'height and width dynamic'}, "
          f"batch {'dynamic' if args.dynamic_batch else 1}, outputs {', '.join(outputs)})")
    import onnxruntime
    sessions = {"onnxruntime": onnxruntime.InferenceSession(onnx_path, session_options(torch.get_num_threads()),
                                                            providers=["CPUExecutionProvider"])}
    checks, passed = check_session(sessions["onnxruntime"], reference, exported, outputs, args)
    write_json_atomic(sidecar(model, args, onnx_path, outputs), sidecar_path(onnx_path))
    result = {"onnx_path": onnx_path, "sidecar_path": sidecar_path(onnx_path), "opset": args.opset,
              "img_size": args.img_size, "checks": checks, "passed": passed, "threads": torch.get_num_threads()}
    if args.int8:
        result.update(write_int8(model, args, onnx_path, outputs))
        sessions["onnxruntime_int8"] = onnxruntime.InferenceSession(
            result["int8_path"], session_options(torch.get_num_threads()), providers=["CPUExecutionProvider"])

    result["latency_ms"] = latency = measure_latency({"pytorch": reference, "pytorch_fused": exported}, sessions,
                                                     args.img_size, args.runs, args.warmup)
    print(f"CPU latency, network only, batch 1, {args.img_size}x{args.img_size}, {torch.get_num_threads()} threads, "
          f"median of {args.runs} runs after {args.warmup} warm-up: " +
          ", ".join(f"{name} {ms:.2f} ms" for name, ms in latency.items()) + f" (onnxruntime {onnxruntime.__version__})")
    print(f"wrote {sidecar_path(onnx_path)}")
    if not passed:
        raise ValueError(f"ONNX Runtime outputs differ from PyTorch's by more than {CHECK_TOLERANCE:g} (boxes: of "
                         f"the input side; see the check lines above); {onnx_path} was written but should not "
                         f"be trusted")
    return result


def check_session(session, reference, exported, outputs, args):
    """Compare ONNX Runtime with PyTorch (and the fused with the unfused model) on the check inputs."""
    checks, passed = {}, True
    for description, images in check_inputs(args.img_size, args.dynamic_batch, args.check_image,
                                             static=args.static).items():
        expected = run_pytorch(reference, images)
        diffs = max_abs_diffs(expected, session.run(list(outputs), {"images": images.numpy()}), outputs)
        fused_diff = max_abs_diffs(expected, run_pytorch(exported, images), outputs)
        checks[description] = {"onnxruntime_vs_pytorch": diffs, "fused_vs_unfused": fused_diff}
        passed &= within_tolerance(diffs, args.img_size)
        print(f"check {description}: max abs diff ONNX Runtime vs PyTorch {_describe(diffs, args.img_size)}; "
              f"BN-fused vs unfused PyTorch {_describe(fused_diff, args.img_size)}")
    return checks, passed


def write_int8(model, args, onnx_path, outputs):
    """NAME_int8.onnx beside the float model, and its sidecar (the float one's, plus the quantisation)."""
    from quantize import quantize_int8
    int8_path = os.path.splitext(onnx_path)[0] + "_int8.onnx"
    images, source = _calibration_paths(args)
    quantization = quantize_int8(onnx_path, int8_path, images, args.img_size, rect=not args.static,
                                 verbose=args.verbose)
    quantization["calibration"].update(source=source, files=images)
    write_json_atomic({**sidecar(model, args, int8_path, outputs), "quantization": quantization,
                       "float_model": os.path.basename(onnx_path)}, sidecar_path(int8_path))
    print(f"quantised {int8_path} (QDQ, 7-bit int8 weights per channel, calibrated on "
          f"{quantization['calibration']['images']} images: {source}); the float model stays at "
          f"{onnx_path}")
    return {"int8_path": int8_path, "int8_sidecar_path": sidecar_path(int8_path), "quantization": quantization}


def _calibration_paths(args):
    """The INT8 calibration images, never those the checkpoint's run validated on (issue #26). Without
    --calib-images, a checkpoint in its run folder calibrates on the run's training images (the train part of its
    one-folder --train-ann per split.json, or all of it beside a separate val set); --calib-images loses the images
    a one-folder run held out that it holds (its --train-ann, the image folder), with a line that says so. At most
    --calib-count of them, spread evenly over the sorted paths.

    Returns:
        (image paths, what they are in words: the sidecar's calibration source).
    """
    import runs  # lazy: only --int8 reads the run's records
    from quantize import calibration_images
    run_dir, data = runs.checkpoint_run(args.checkpoint), None
    if run_dir is not None and (not args.calib_images or os.path.isfile(os.path.join(run_dir, runs.SPLIT_FILE))):
        try:
            data = runs.run_data(run_dir)
        except ValueError as error:
            if not args.calib_images:
                raise ValueError(f"--int8 without --calib-images calibrates on the training images of the "
                                 f"checkpoint's run, but {error}; pass --calib-images") from None
            logger.warning("%s; calibrating on all of --calib-images, which may hold images it validated on", error)
    if not args.calib_images:
        paths, source = data["train"]["images"], data["train"]["source"]
    else:
        paths, source = calibration_images(args.calib_images, sys.maxsize, args.calib_root), args.calib_images
        validated = {os.path.realpath(path) for path in data["val"]["images"]} if data else set()
        kept = [path for path in paths if os.path.realpath(path) not in validated]
        if len(kept) < len(paths):
            source = f"{args.calib_images} without the {data['val']['source']}"
            print(f"--calib-images {args.calib_images} holds {len(paths) - len(kept)} images that {run_dir} validated "
                  f"on ({data['val']['source']}); calibrating on the other {len(kept)}")
            paths = kept
    if not paths:
        raise ValueError(f"no calibration images left in {source}; pass --calib-images with training images")
    return paths[::max(1, len(paths) // args.calib_count)][:args.calib_count], source


def _describe(diffs, img_size):
    return ", ".join(f"{name} {diff:.2e}" + (f" px ({diff / img_size:.1e} of the side)" if _is_box(name) else "")
                     for name, diff in diffs.items())


def run():
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    run_cli(main, None, bad_input=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    run()
