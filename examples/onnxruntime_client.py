"""Detect objects with an exported model using only ONNX Runtime, numpy and Pillow (no torch, no repo code).

    python examples/onnxruntime_client.py best_model.onnx photo.jpg    # reads best_model.json, export.py's sidecar

Prints one line per detection: class name, score, and the box xyxy in the photo's pixels, as predict.py finds them.
"""
import json
import sys

import numpy as np
import onnxruntime
from PIL import Image, ImageOps


def letterbox(image, spec, static):
    """Longer side to spec["size"] (the sidecar's rounding), pad right/bottom: to the square, or to multiples of 32."""
    scale = spec["size"] / max(image.size)
    new_w, new_h = round(image.width * scale), round(image.height * scale)
    out_w, out_h = (spec["size"],) * 2 if static else (-(-new_w // 32) * 32, -(-new_h // 32) * 32)
    canvas = np.full((out_h, out_w, 3), spec["pad_value_uint8"], dtype=np.uint8)
    canvas[:new_h, :new_w] = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
    return canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255, (new_w / image.width, new_h / image.height)


def nms(boxes, scores, iou_threshold):
    """Greedy NMS: indices of the kept boxes, best score first."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        top_left = np.maximum(boxes[best, :2], boxes[order, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[order, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        order = order[inter / (areas[best] + areas[order] - inter) <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def detect(session, sidecar, image, conf=None):
    """PIL RGB image -> boxes (N, 4) xyxy in its pixels, scores (N,), class indices (N,)."""
    post = sidecar["postprocess"]
    if conf is None:  # the calibrated threshold of each class (older sidecars: one for all)
        conf = post.get("calibrated_conf_thresholds") or post["calibrated_conf_threshold"]
    conf = np.asarray(conf, dtype=np.float32)  # one score, or (C,) against the (A, C) scores
    x, (ratio_w, ratio_h) = letterbox(image, sidecar["input"]["letterbox"], sidecar["input"].get("static", False))
    boxes, scores = (output[0] for output in session.run(["boxes", "scores"], {"images": x}))  # (A, 4), (A, C)
    anchor, label = np.nonzero(scores >= conf)  # every (box, class) pair above the threshold
    boxes, scores = boxes[anchor], scores[anchor, label]
    offsets = label[:, None] * (np.max(boxes, initial=0) + 1)  # boxes of different classes never overlap
    keep = nms(boxes + offsets, scores, post["iou_threshold"])
    keep = keep[:post["max_detections"]]
    boxes = boxes[keep] / np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32)
    return np.clip(boxes, 0, [image.width, image.height] * 2), scores[keep], label[keep]


if __name__ == "__main__":
    onnx_path, image_path = sys.argv[1:3]
    with open(onnx_path.rsplit(".", 1)[0] + ".json") as f:
        sidecar = json.load(f)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    image = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
    for box, score, label in zip(*detect(session, sidecar, image)):
        print(sidecar["class_names"][label], f"{score:.3f}", " ".join(f"{v:.1f}" for v in box))
