"""An exported detector run by ONNX Runtime, with LightweightDetector.predict()'s interface and results.

    detector = OrtDetector("best_model.onnx", threads=2)      # reads best_model.json, export.py's sidecar
    detections = detector.predict(image_uint8_chw)           # boxes in original pixels, as model.predict

The same letterbox (rectangular, to multiples of 32, when the graph's height and width are dynamic), the same
selection of detections (inference.select_detections: threshold, top-k, class-aware NMS) and the same
mapping back to original pixels as the PyTorch model, so predict.py and evaluate.py give the same outputs with
either backend. Class names, input size and the calibrated score thresholds (one per class) come from the sidecar. A .pth asked
for on this backend is exported first (export.export_checkpoint); export.py itself never imports this module.
"""
import hashlib
import json
import logging
import os
import tempfile

import numpy as np
import torch

import inference
import model_lightweight
from config import inference_defaults
from inference import (Detections, count_inputs, detection_settings, letterbox_groups, phase_timer, select_detections,
                       session_options, sidecar_path, unletterbox)

logger = logging.getLogger(__name__)

BACKENDS = ("pytorch", "onnxruntime")
EXPORT_CACHE = "onnx_cache"  # folder beside a .pth that holds its exports for the onnxruntime backend


class ModelLoadError(ValueError):
    """A checkpoint or exported model that cannot be loaded: predict.py and evaluate.py print it as one line and
    exit with status 2."""


def load_detector(checkpoint, backend=None, device="cpu", threads=None, cache_dir=None):
    """The detector predict.py and evaluate.py run: a training checkpoint (.pth) in PyTorch, BatchNorm fused, or
    an exported .onnx in ONNX Runtime. `backend` None follows the file; "onnxruntime" with a .pth exports it first,
    into `cache_dir` (default: onnx_cache/ beside the .pth; see exported_copy).

    Raises FileNotFoundError for a missing file and ModelLoadError for one that cannot be loaded (a truncated
    .onnx, a sidecar without class names, a file that is no checkpoint, ...)."""
    backend = backend or ("onnxruntime" if str(checkpoint).endswith(".onnx") else "pytorch")
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        if backend == "pytorch":
            if str(checkpoint).endswith(".onnx"):
                raise ModelLoadError(f"{checkpoint} is an ONNX model: run it with --backend onnxruntime")
            return model_lightweight.load_model(checkpoint, device=device).fuse()
        if not str(checkpoint).endswith(".onnx"):
            checkpoint = exported_copy(checkpoint, threads, cache_dir)
        return OrtDetector(checkpoint, threads)
    except (FileNotFoundError, ModelLoadError):
        raise
    except Exception as error:  # torch.load on a non-checkpoint raises KeyError, UnpicklingError, EOFError, ...
        raise ModelLoadError(f"{type(error).__name__}: {(str(error) or '?').splitlines()[0]}") from None


def exported_copy(checkpoint, threads=None, cache_dir=None):
    """The .onnx export of a .pth for the onnxruntime backend: cache_dir/STEM-KEY.onnx and its sidecar, KEY a hash
    of the checkpoint's bytes, the export options and the code that builds the graph, reused while all match.

    Never NAME.onnx beside the checkpoint: that is where export.py writes by default, perhaps with other options
    (--include-nms, another --img-size), and it is the user's file. A new export is written in a temporary
    folder and moved in when export.py has checked it, so an interrupted or failed export leaves nothing to reuse."""
    import export  # here: exporting needs torchvision and onnx, which running an .onnx or a .pth does not
    options = {"opset": export.DEFAULT_OPSET}
    key = hashlib.sha256(json.dumps({"options": options, "torch": torch.__version__}).encode())
    for path in (checkpoint, export.__file__, model_lightweight.__file__, inference.__file__):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                key.update(block)
    folder = cache_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), EXPORT_CACHE)
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    onnx_path = os.path.join(folder, f"{stem}-{key.hexdigest()[:16]}.onnx")
    if os.path.isfile(onnx_path) and os.path.isfile(sidecar_path(onnx_path)):
        logger.info("reusing %s, the export of %s", onnx_path, checkpoint)
        return onnx_path
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        staged = os.path.join(staging, os.path.basename(onnx_path))
        export.export_checkpoint(checkpoint, output=staged, runs=1, warmup=0, threads=threads, **options)
        os.replace(staged, onnx_path)
        os.replace(sidecar_path(staged), sidecar_path(onnx_path))  # last: a sidecar means a complete export
    return onnx_path


def read_sidecar(onnx_path):
    """export.py's sidecar of `onnx_path`, checked for what OrtDetector reads; ModelLoadError names what is wrong."""
    path = sidecar_path(onnx_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{onnx_path} has no sidecar {path} (class names, input size, threshold); export it "
                                f"with export.py")
    try:
        with open(path) as f:
            sidecar = json.load(f)
        class_names, size = sidecar["class_names"], sidecar["input"]["letterbox"]["size"]
        outputs = sidecar.get("outputs", {})
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, a key missing, ...
        what = f"no {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise ModelLoadError(f"sidecar {path} is not export.py's ({what}): export {onnx_path} again with "
                             f"export.py") from None
    if not isinstance(class_names, list) or not class_names or not isinstance(size, int) or size <= 0:
        raise ModelLoadError(f"sidecar {path}: class_names must be a non-empty list and input.letterbox.size a "
                             f"positive integer, got {class_names!r} and {size!r}")
    thresholds = (sidecar.get("postprocess") or {}).get("calibrated_conf_thresholds")
    if thresholds is not None and (not isinstance(thresholds, list) or len(thresholds) != len(class_names)):
        raise ModelLoadError(f"sidecar {path}: postprocess.calibrated_conf_thresholds must be a list of one score per "
                             f"class ({len(class_names)}), got {thresholds!r}")
    if "boxes" not in outputs:
        raise ModelLoadError(f"{onnx_path} was exported with --include-nms; the backend needs the boxes and scores "
                             f"outputs: export it again without --include-nms")
    return sidecar


class OrtDetector:
    """An exported .onnx (boxes and scores outputs, no in-graph NMS) and its sidecar JSON, run on the CPU."""

    training = False  # evaluate() asks, as of a torch module

    def __init__(self, onnx_path, threads=None):
        import onnxruntime
        onnx_path = str(onnx_path)
        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
        self.sidecar = read_sidecar(onnx_path)
        self.path = onnx_path
        try:
            self.session = onnxruntime.InferenceSession(onnx_path, session_options(threads),
                                                        providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's InvalidProtobuf, Fail, ... derive from Exception only
            raise ModelLoadError(f"{onnx_path} is not a model ONNX Runtime can load ({type(error).__name__}: "
                                 f"{(str(error) or '?').splitlines()[0]})") from None
        shape = self.session.get_inputs()[0].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.rect = not isinstance(shape[2], int)  # dynamic height and width: rectangular letterbox
        self.class_names = list(self.sidecar["class_names"])
        self.num_classes = len(self.class_names)
        self.img_size = int(self.sidecar["input"]["letterbox"]["size"])
        postprocess = self.sidecar.get("postprocess", {})
        self.conf_threshold = float(postprocess.get("calibrated_conf_threshold")
                                    or inference_defaults()["conf_threshold"])
        thresholds = postprocess.get("calibrated_conf_thresholds")  # per class (#28); older sidecars: null
        self.conf_thresholds = [float(t) for t in thresholds] if thresholds else None

    def predict(self, images, conf_threshold=None, iou_threshold=None, max_detections=None, timings=None):
        """As LightweightDetector.predict: per image a Detections, boxes (N, 4) xyxy in original pixels, scores,
        labels, and the sidecar's class names; None settings and `timings` alike."""
        if isinstance(images, torch.Tensor):
            images = [images] if images.dim() == 3 else list(images)
        settings = detection_settings(self, conf_threshold, iou_threshold, max_detections)
        tick = phase_timer(timings)
        groups = tick("preprocess", letterbox_groups(images, self.img_size, rect=self.rect))
        count_inputs(timings, groups)
        results = [None] * len(images)
        for indices, batch, ratios in groups:
            for start in range(0, len(indices), self.fixed_batch or len(indices)):
                rows = slice(start, start + (self.fixed_batch or len(indices)))
                boxes, scores = tick("network", self(batch[rows]))
                found = select_detections(torch.from_numpy(scores), torch.from_numpy(boxes), *settings)
                sizes = [images[i].shape[-2:] for i in indices[rows]]
                for index, result in zip(indices[rows], unletterbox(found, ratios[rows], sizes)):
                    results[index] = result
                tick("postprocess")
        return [Detections(**result, class_names=self.class_names) for result in results]

    # what evaluate() calls on a torch model
    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def parameters(self):
        return iter(())

    def __call__(self, batch):
        """The raw outputs of a letterboxed float (B, 3, H, W) batch: (boxes, scores) numpy arrays."""
        return self.session.run(["boxes", "scores"], {"images": np.ascontiguousarray(batch.numpy())})
