"""Static INT8 quantisation of an exported detector with ONNX Runtime's tools (export.py --int8).

QDQ format (QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer kernels), per-channel
7-bit int8 weights (8-bit ones saturate on x86-64 CPUs without VNNI: see quantize_int8), uint8 activations whose
ranges are calibrated on N letterboxed training images (MinMax). The stride-2 convolutions' separate zero Pads
(TensorFlow-SAME padding) are folded into the convolutions first, so that no Pad runs in float between a
DequantizeLinear and a QuantizeLinear. Left in float, because they quantise badly or cost nothing:
- the input normalisation (x - mean) / std: one Sub and one Div on the image; quantising the raw [0, 1] input
  to 8 bits is lossless, quantising its normalised copy is not;
- the last classification and box convolutions (at every pyramid level) and everything after them (softplus,
  the box decoding, the sigmoid): their outputs are the scores and pixel distances whose small differences
  decide NMS and mAP.
ONNX Runtime's own INFO lines (a line per tensor) are dropped unless asked for (export.py -v).
"""
import contextlib
import glob
import logging
import os
import re
import tempfile

import numpy as np

logger = logging.getLogger(__name__)

FLOAT_OUTPUT_CONVS = ("cls_pred", "box_pred")  # module names of the head's last convolutions
# The head runs each of them once per pyramid level, and the exporter names those calls cls_pred, cls_pred_1, ...
_FLOAT_OUTPUT_CONV_NAME = re.compile(r"/(?:%s)(?:_\d+)?/" % "|".join(FLOAT_OUTPUT_CONVS))


def float_nodes(onnx_model):
    """Names of the nodes left in float: the input normalisation (the graph's first Sub and Div), the head's
    last convolutions at every pyramid level, and every node downstream of those convolutions.

    All calls of a shared convolution stay float together: one quantised call would quantise the weights
    they share."""
    graph = onnx_model.graph
    first = [node for node in graph.node if graph.input[0].name in node.input]
    second = [node for node in graph.node if any(o in node.input for f in first for o in f.output)]
    keep = {node.name for node in first + second if node.op_type in ("Sub", "Div")}
    outputs = [node for node in graph.node if _FLOAT_OUTPUT_CONV_NAME.search(node.name)]
    frontier = {output for node in outputs for output in node.output}
    keep |= {node.name for node in outputs}
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
    """ONNX Runtime's CalibrationDataReader: one letterboxed image per call, as predict() feeds the graph.

    An unreadable image is skipped with a warning, as training skips it; none readable is a ValueError."""

    def __init__(self, paths, img_size, rect):
        self.paths, self.img_size, self.rect = list(paths), img_size, rect
        self.read, self.skipped = 0, []

    def get_next(self):
        from PIL import Image

        from dataset_coco import decode_image
        from inference import letterbox
        while self.paths:
            path = self.paths.pop(0)
            try:
                image = decode_image(path, self.img_size).image  # a large JPEG at about the input size (#27)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # not an image, ...
                logger.warning("INT8 calibration: skipping unreadable image %s: %s", path, error)
                self.skipped.append(path)
                continue
            self.read += 1
            image, _ = letterbox(image, self.img_size, rect=self.rect)
            return {"images": np.ascontiguousarray(image[None].numpy())}
        if not self.read:
            raise ValueError(f"none of the {len(self.skipped)} calibration images could be read (e.g. "
                             f"{self.skipped[0] if self.skipped else 'none given'})")
        return None

    def rewind(self):  # pragma: no cover - used by newer ONNX Runtime calibrators only
        pass


class _WarningsAndAbove(logging.Filter):
    def filter(self, record):
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def onnxruntime_logs(verbose=False):
    """Around ONNX Runtime's quantisation tools: unless `verbose`, their INFO lines are dropped and their warnings
    kept. The quantiser logs a line per tensor it adjusts ("Increased scale[...]", "Created a copy of bias
    input ...") with logging.info, on the root logger itself, which a script's INFO level prints. A logger's filter
    sees only the records logged on that logger, so one on the root drops those and lets every named logger's
    lines through; the onnxruntime loggers are raised to WARNING. Both are restored after."""
    if verbose:
        yield
        return
    root, package, only_warnings = logging.getLogger(), logging.getLogger("onnxruntime"), _WarningsAndAbove()
    level = package.level
    root.addFilter(only_warnings)
    package.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.removeFilter(only_warnings)
        package.setLevel(level)


def quantize_int8(float_path, int8_path, image_paths, img_size, rect=True, verbose=False):
    """Write the INT8 copy of `float_path` to `int8_path`; returns what was done, for the sidecar. `verbose`: let
    ONNX Runtime's INFO lines through (onnxruntime_logs)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as folder, onnxruntime_logs(verbose):
        prepared = os.path.join(folder, "prepared.onnx")
        # ONNX shape inference and ONNX Runtime's graph clean-up; the symbolic shape inference cannot follow the dynamic
        # height and width through the grid of points, and the quantiser does not need it
        quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
        graph = onnx.load(prepared)
        folded = fold_pads_into_convs(graph)  # after the pre-processing, which makes the pads constants
        onnx.save(graph, prepared)
        excluded = float_nodes(graph)
        reader = _Reader(image_paths, img_size, rect)
        # 7-bit weights (reduce_range: int8 in [-64, 64]), so that the integers are the same on every x86-64 CPU.
        # Without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime's uint8 x int8 kernels add pairs of products in
        # saturating 16 bits (VPMADDUBSW): with 8-bit weights a pair reaches 2 * 255 * 127 > 32767 and those CPUs
        # compute another model (issue #24); with 7-bit ones it stays within 2 * 255 * 64 = 32640. ONNX Runtime's
        # quantisation docs offer this or uint8 weights (U8U8 kernels); those run slower than the float model
        # on depthwise-heavy backbones (lite0), so they would defeat INT8.
        quantize_static(prepared, int8_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    logger.info("INT8: calibrated on %d images (%d unreadable, skipped); %d nodes left in float; %d pads folded "
                "into convolutions", reader.read, len(reader.skipped), len(excluded), folded)
    return {"format": "QDQ", "weights": "int8, symmetric per output channel, reduce_range: 7 bits, [-64, 64]",
            "activations": "uint8, per tensor",
            "quantized_for": "every x86-64 CPU alike, with or without VNNI: 7-bit weights keep a pair of uint8 x "
                             "int8 products within int16 (2 * 255 * 64 = 32640), so ONNX Runtime's 16-bit "
                             "kernels on AVX2 and AVX-512 without VNNI cannot saturate",
            "calibration": {"method": "MinMax", "images": reader.read, "skipped_unreadable": reader.skipped},
            "float_nodes": "the input normalisation, the head's last classification and box convolutions (every "
                           "pyramid level) and the decoding after them", "float_node_count": len(excluded),
            "pads_folded_into_convs": folded, "tool": "onnxruntime.quantization.quantize_static"}
