"""Static INT8 quantisation of an exported detector with ONNX Runtime's tools (export.py --int8).

QDQ format (QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer kernels), per-channel int8
weights, uint8 activations whose ranges are calibrated on N letterboxed training images (MinMax). The stride-2
convolutions' separate zero Pads (TensorFlow-SAME padding) are folded into the convolutions first, so that no Pad
runs in float between a DequantizeLinear and a QuantizeLinear. Left in float,
because they quantise badly or cost nothing:
- the input normalisation (x - mean) / std: one Sub and one Div on the image; quantising the raw [0, 1] input
  to 8 bits is lossless, quantising its normalised copy is not;
- the last classification and box convolutions and everything after them (softplus, the box decoding, the
  sigmoid): their outputs are the scores and pixel distances whose small differences decide NMS and mAP.
"""
import glob
import logging
import os
import tempfile

import numpy as np

logger = logging.getLogger(__name__)

FLOAT_OUTPUT_CONVS = ("cls_pred", "box_pred")  # module names of the head's last convolutions


def float_nodes(onnx_model):
    """Names of the nodes left in float: the input normalisation (the graph's first Sub and Div), the head's
    last convolutions, and every node downstream of those convolutions."""
    graph = onnx_model.graph
    first = [node for node in graph.node if graph.input[0].name in node.input]
    second = [node for node in graph.node if any(o in node.input for f in first for o in f.output)]
    keep = {node.name for node in first + second if node.op_type in ("Sub", "Div")}
    frontier = {output for node in graph.node if any(f"/{name}/" in node.name for name in FLOAT_OUTPUT_CONVS)
                for output in node.output}
    keep |= {node.name for node in graph.node if any(f"/{name}/" in node.name for name in FLOAT_OUTPUT_CONVS)}
    changed = True
    while changed:  # everything fed by a float node stays float
        changed = False
        for node in graph.node:
            if node.name not in keep and any(i in frontier for i in node.input):
                keep.add(node.name)
                frontier.update(node.output)
                changed = True
    return sorted(keep)


def _spatial_zero_pads(pad, initializers):
    """[top, left, bottom, right] of a Pad node that adds zeros on height and width only, else None."""
    from onnx import numpy_helper
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    inputs = list(pad.input) + ["", ""]
    amounts, value, axes = inputs[1], inputs[2], inputs[3]
    if mode != b"constant" or axes or amounts not in initializers:
        return None
    if value and (value not in initializers or numpy_helper.to_array(initializers[value]).any()):
        return None
    amounts = numpy_helper.to_array(initializers[amounts]).tolist()
    if len(amounts) != 8 or any(amounts[i] for i in (0, 1, 4, 5)) or min(amounts) < 0:
        return None
    return [amounts[2], amounts[3], amounts[6], amounts[7]]


def _auto_pad(conv):
    return next((a.s for a in conv.attribute if a.name == "auto_pad"), b"")


def fold_pads_into_convs(onnx_model):
    """Merge every zero Pad whose only consumers are Convs into those Convs' `pads` (the stride-2 convolutions'
    TensorFlow-SAME padding, traced as a separate Pad); returns how many were folded.

    Left apart, the quantiser wraps each Pad in DequantizeLinear / QuantizeLinear and ONNX Runtime pads the
    largest feature maps in float between them; folded, each is one integer convolution."""
    from onnx import helper
    graph = onnx_model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}
    folded = []
    for pad in graph.node:
        extra = _spatial_zero_pads(pad, initializers) if pad.op_type == "Pad" else None
        convs = consumers.get(pad.output[0], [])
        if (extra is None or not convs or pad.output[0] in graph_outputs
                or any(conv.op_type != "Conv" or _auto_pad(conv) not in (b"", b"NOTSET") for conv in convs)):
            continue
        for conv in convs:
            old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
            kept = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend(kept + [helper.make_attribute("pads", [o + e for o, e in zip(old, extra)])])
            conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)  # the folded pad amounts
    return len(folded)


def calibration_images(source, count, root=None):
    """Up to `count` image paths from `source`: a folder of images, or annotations of any format (their images;
    a COCO JSON's under `root`), spread evenly over the sorted list."""
    from annotations import IMAGE_EXTENSIONS, read_annotations
    if os.path.isdir(source) and any(p.lower().endswith(IMAGE_EXTENSIONS) for p in os.listdir(source)):
        paths = sorted(p for p in glob.glob(os.path.join(glob.escape(source), "*"))
                       if p.lower().endswith(IMAGE_EXTENSIONS))
    else:
        data, root, _ = read_annotations(source, root)
        paths = sorted(os.path.join(root, image["file_name"]) for image in data["images"])
        paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise ValueError(f"--calib-images {source}: no images found (a folder of images, or annotations whose "
                         f"images exist)")
    step = max(1, len(paths) // count)
    return paths[::step][:count]


class _Reader:
    """ONNX Runtime's CalibrationDataReader: one letterboxed image per call, as predict() feeds the graph."""

    def __init__(self, paths, img_size, rect):
        self.paths, self.img_size, self.rect = list(paths), img_size, rect

    def get_next(self):
        from dataset_coco import load_image
        from model_lightweight import letterbox
        if not self.paths:
            return None
        image, _ = letterbox(load_image(self.paths.pop(0)), self.img_size, rect=self.rect)
        return {"images": np.ascontiguousarray(image[None].numpy())}

    def rewind(self):  # pragma: no cover - used by newer ONNX Runtime calibrators only
        pass


def quantize_int8(float_path, int8_path, image_paths, img_size, rect=True):
    """Write the INT8 copy of `float_path` to `int8_path`; returns what was done, for the sidecar."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as folder:
        prepared = os.path.join(folder, "prepared.onnx")
        # ONNX shape inference and ONNX Runtime's graph clean-up; the symbolic shape inference cannot follow the dynamic
        # height and width through the grid of points, and the quantiser does not need it
        quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
        graph = onnx.load(prepared)
        folded = fold_pads_into_convs(graph)  # after the pre-processing, which makes the pads constants
        onnx.save(graph, prepared)
        excluded = float_nodes(graph)
        quantize_static(prepared, int8_path, _Reader(image_paths, img_size, rect), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    logger.info("INT8: calibrated on %d images; %d nodes left in float; %d pads folded into convolutions",
                len(image_paths), len(excluded), folded)
    return {"format": "QDQ", "weights": "int8, per channel", "activations": "uint8, per tensor",
            "calibration": {"method": "MinMax", "images": len(image_paths)},
            "float_nodes": "the input normalisation, the head's last classification and box convolutions and "
                           "the decoding after them", "float_node_count": len(excluded),
            "pads_folded_into_convs": folded, "tool": "onnxruntime.quantization.quantize_static"}
