"""An exported detector run by ONNX Runtime, with LightweightDetector.predict()'s interface and results.

    detector = OrtDetector("best_model.onnx", threads=2)      # reads best_model.json, export.py's sidecar
    detections = detector.predict(image_uint8_chw)           # boxes in original pixels, as model.predict

The same letterbox (rectangular, to multiples of 32, when the graph's height and width are dynamic), the same
selection of detections (model_lightweight.select_detections: threshold, top-k, class-aware NMS) and the same
mapping back to original pixels as the PyTorch model, so predict.py and evaluate.py give the same outputs with
either backend. Class names, input size and the calibrated score threshold come from the sidecar.
"""
import json
import os

import numpy as np
import torch

from model_lightweight import DEFAULT_CONF_THRESHOLD, letterbox_groups, select_detections, unletterbox


def session_options(threads=None):
    """CPU session options: `threads` intra-op threads (None: ONNX Runtime's choice), one inter-op thread, and
    no spinning, so that sessions interleaved with each other or with torch threads do not burn the cores."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


BACKENDS = ("pytorch", "onnxruntime")


def load_detector(checkpoint, backend=None, device="cpu", threads=None, export_dir=None):
    """The detector predict.py and evaluate.py run: a training checkpoint (.pth) in PyTorch, BatchNorm fused, or
    an exported .onnx in ONNX Runtime. `backend` None follows the file; "onnxruntime" with a .pth exports it first,
    into `export_dir` (the run's folder)."""
    from model_lightweight import load_model
    backend = backend or ("onnxruntime" if str(checkpoint).endswith(".onnx") else "pytorch")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "pytorch":
        if str(checkpoint).endswith(".onnx"):
            raise ValueError(f"{checkpoint} is an ONNX model: run it with --backend onnxruntime")
        return load_model(checkpoint, device=device).fuse()
    if not str(checkpoint).endswith(".onnx"):
        import export
        onnx_path = os.path.join(export_dir or os.path.dirname(os.path.abspath(checkpoint)),
                                 os.path.splitext(os.path.basename(checkpoint))[0] + ".onnx")
        export.main(["--checkpoint", str(checkpoint), "--output", onnx_path, "--runs", "1", "--warmup", "0"]
                    + (["--threads", str(threads)] if threads else []))
        checkpoint = onnx_path
    return OrtDetector(checkpoint, threads)


def sidecar_path(onnx_path):
    return os.path.splitext(str(onnx_path))[0] + ".json"


class OrtDetector:
    """An exported .onnx (boxes and scores outputs, no in-graph NMS) and its sidecar JSON, run on the CPU."""

    training = False  # evaluate() asks, as of a torch module

    def __init__(self, onnx_path, threads=None):
        import onnxruntime
        onnx_path = str(onnx_path)
        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
        if not os.path.isfile(sidecar_path(onnx_path)):
            raise FileNotFoundError(f"{onnx_path} has no sidecar {sidecar_path(onnx_path)} (class names, input size, "
                                    f"threshold); export it with export.py")
        with open(sidecar_path(onnx_path)) as f:
            self.sidecar = json.load(f)
        if "boxes" not in self.sidecar.get("outputs", {}):
            raise ValueError(f"{onnx_path} was exported with --include-nms; the backend needs the boxes and scores "
                             f"outputs: export it again without --include-nms")
        self.path = onnx_path
        self.session = onnxruntime.InferenceSession(onnx_path, session_options(threads),
                                                    providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.rect = not isinstance(shape[2], int)  # dynamic height and width: rectangular letterbox
        self.class_names = list(self.sidecar["class_names"])
        self.num_classes = len(self.class_names)
        self.img_size = int(self.sidecar["input"]["letterbox"]["size"])
        self.conf_threshold = float(self.sidecar.get("postprocess", {}).get("calibrated_conf_threshold")
                                    or DEFAULT_CONF_THRESHOLD)

    def predict(self, images, conf_threshold=None, iou_threshold=0.6, max_detections=100):
        """As LightweightDetector.predict: per image, boxes (N, 4) xyxy in original pixels, scores, labels."""
        if isinstance(images, torch.Tensor):
            images = [images] if images.dim() == 3 else list(images)
        if conf_threshold is None:
            conf_threshold = self.conf_threshold
        results = [None] * len(images)
        for indices, batch, ratios in letterbox_groups(images, self.img_size, rect=self.rect):
            for start in range(0, len(indices), self.fixed_batch or len(indices)):
                rows = slice(start, start + (self.fixed_batch or len(indices)))
                boxes, scores = self(batch[rows])
                found = select_detections(torch.from_numpy(scores), torch.from_numpy(boxes), conf_threshold,
                                          iou_threshold, max_detections)
                sizes = [images[i].shape[-2:] for i in indices[rows]]
                for index, result in zip(indices[rows], unletterbox(found, ratios[rows], sizes)):
                    results[index] = result
        return results

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
