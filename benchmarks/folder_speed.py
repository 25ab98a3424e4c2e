"""Folder throughput from file to detections, and a fair deployment table against YOLOv8n / YOLO11n, in one run.

    python tools/get_data.py kangaroo
    pip install ultralytics        # optional: adds the YOLO peers (random weights from their YAML; nothing downloaded)
    python benchmarks/folder_speed.py --folder datasets/kangaroo/images --twelve-mp 16 --threads 1 2

Folder throughput (issue #27, item 2): images per second over a whole folder, file to detections (predict.py's
predict_images: a large JPEG decoded reduced when nothing is drawn; predict() at score 0.25, at most 100 boxes),
without and with drawing (predict.py's draw_picture and save_image; Ultralytics: save=True), for our sizes in
PyTorch (BatchNorm fused) and ONNX Runtime INT8, against Ultralytics' own predict() on the same folder. Every
variant passes over the folder once per round, the variants round-robin, so load on a shared machine falls on all
alike. --twelve-mp N adds a folder of N 4000x3000 JPEGs (quality 90), upscaled from the folder's photos, written
once under /tmp.

Fair deployment (item 3): YOLOv8n and YOLO11n exported to ONNX fp32 (dynamic height and width, their decoding in
the graph as ours is) and quantised by quantize.quantize_int8, our INT8 path: the same QDQ static quantisation,
7-bit weights, MinMax on the same calibration images, and the same rule for what stays float (the head's last
convolutions and everything after them). Both run through ort_detector.OrtDetector: the same letterbox,
selection and NMS, so only the network differs. Ratios are ours / theirs at the same precision and runtime.
"""
import argparse
import glob
import os
import re
import statistics
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
from speed import exported, machine_info, time_ms_interleaved  # noqa: E402

DEFAULT_OUTPUT = os.path.join(ROOT, "benchmarks", "results", "speed_folder.md")
STARTER = os.path.join(ROOT, "weights", "lite0_coco_starter.pth")
CONF, MAX_DET, IMG_SIZE = 0.25, 100, 320  # Ultralytics' predict defaults for the score; 320 px for every model
PEERS = {"yolov8n": "yolov8n.yaml", "yolo11n": "yolo11n.yaml"}
# Ultralytics' Detect head: the last convolution of each box (cv2) and class (cv3) branch, at every level. These
# and everything after them (DFL, decoding, sigmoid) stay float, as our cls_pred / box_pred do (quantize.py).
YOLO_FLOAT_CONVS = re.compile(r"/cv[23]\.\d+/cv[23]\.\d+\.2/")


# ---------------------------------------------------------------------------------------------- inputs

def image_paths(folder, limit=None):
    from annotations import IMAGE_EXTENSIONS
    paths = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        sys.exit(f"error: no images in --folder {folder}")
    return paths[:limit] if limit else paths


def twelve_mp_folder(paths, count, folder):
    """`count` 4000x3000 JPEGs (quality 90) upscaled from `paths` in turn, written into `folder` once."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        target = os.path.join(folder, f"photo_{index:03d}.jpg")
        if not os.path.isfile(target):
            with Image.open(paths[index % len(paths)]) as image:
                image.convert("RGB").resize((4000, 3000), Image.BICUBIC).save(target, quality=90)
    return [os.path.join(folder, f"photo_{index:03d}.jpg") for index in range(count)]


# ---------------------------------------------------------------------------------------------- our models

def our_model(size, num_classes):
    """lite0 from the shipped COCO starter (real detections to draw), other sizes with random weights."""
    from model_lightweight import create_lightweight_model, load_model
    if size == "lite0" and os.path.isfile(STARTER):
        return load_model(STARTER)
    torch.manual_seed(0)
    return create_lightweight_model(num_classes, size, img_size=IMG_SIZE).eval()


def our_detectors(size, folder, calibration, threads):
    """{"pytorch", "ort_fp32", "ort_int8"} detectors of one size: the fused model, export.py's fp32 and INT8."""
    import copy
    model = our_model(size, 80)
    names = list(getattr(model, "class_names", None) or [f"class{i}" for i in range(model.num_classes)])
    model.class_names = names
    float_ort, int8_ort = exported(model, folder, size, IMG_SIZE, calibration)  # at torch's thread count
    return {"pytorch": copy.deepcopy(model).fuse(), "ort_fp32": float_ort, "ort_int8": int8_ort}


# ---------------------------------------------------------------------------------------------- the YOLO peers

def load_yolo(yaml):
    """Ultralytics' model from its YAML (random weights), or None without ultralytics."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads
    try:
        from ultralytics import YOLO
    except ImportError:
        return None
    return YOLO(yaml)


class YoloBoxesScores(torch.nn.Module):
    """A YOLO network with our exported outputs: boxes (B, A, 4) xyxy in input pixels and scores (B, A, C)."""

    def __init__(self, network):
        super().__init__()
        self.network = network
        self.network.model[-1].dynamic = True  # anchors from the input's shape: dynamic height and width

    def forward(self, images):
        decoded = self.network(images)[0].transpose(1, 2)  # (B, A, 4 + C): cx, cy, w, h, class probabilities
        centre, size = decoded[..., :2], decoded[..., 2:4]
        return torch.cat([centre - size / 2, centre + size / 2], dim=-1), decoded[..., 4:]


def export_yolo(model, folder, name, calibration_paths):
    """(fp32, INT8) .onnx paths of a YOLO model, each with the sidecar OrtDetector reads."""
    import json

    import quantize
    from export import sidecar_path
    network = YoloBoxesScores(model.model.fuse().eval())
    float_path, int8_path = (os.path.join(folder, f"{name}{suffix}.onnx") for suffix in ("", "_int8"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.rand(1, 3, IMG_SIZE, IMG_SIZE),), float_path, dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["boxes", "scores"],
                          dynamic_axes={"images": {2: "height", 3: "width"}})
    original = quantize._FLOAT_OUTPUT_CONV_NAME
    quantize._FLOAT_OUTPUT_CONV_NAME = YOLO_FLOAT_CONVS  # our rule for what stays float, on their head's names
    try:
        quantize.quantize_int8(float_path, int8_path, calibration_paths, IMG_SIZE, rect=True)
    finally:
        quantize._FLOAT_OUTPUT_CONV_NAME = original
    sidecar = {"class_names": [model.names[i] for i in range(len(model.names))],
               "input": {"letterbox": {"size": IMG_SIZE}}, "outputs": {"boxes": "xyxy", "scores": "probabilities"}}
    for path in (float_path, int8_path):
        with open(sidecar_path(path), "w") as f:
            json.dump(sidecar, f)
    return float_path, int8_path


# ---------------------------------------------------------------------------------------------- one pass

def our_pass(detector, paths, out_dir=None):
    """predict.py's own path over the files, batch 1: decode (a large JPEG reduced to about the input size when
    nothing is drawn, as `predict.py --no-save` does), predict, and with `out_dir` draw and save; returns the boxes
    kept."""
    from predict import draw_picture, predict_images, save_image
    found = 0
    images = predict_images(detector, paths, [], CONF, None, MAX_DET, batch_size=1, progress=False,
                            min_side=None if out_dir else IMG_SIZE)
    for index, decoded, result in images:
        found += len(result["scores"])
        if out_dir:
            save_image(draw_picture(decoded.image, result, detector.class_names),
                       os.path.join(out_dir, os.path.basename(paths[index])))
    return found


def ultralytics_pass(model, paths, out_dir=None):
    """Ultralytics' predict() over the files (stream=True, so results are not kept); save=True draws."""
    found = 0
    options = {"save": True, "project": out_dir, "name": "run", "exist_ok": True} if out_dir else {"save": False}
    for result in model.predict(source=list(paths), stream=True, imgsz=IMG_SIZE, conf=CONF, max_det=MAX_DET,
                                verbose=False, **options):
        found += len(result.boxes)
    return found


def folder_throughput(variants, paths, rounds):
    """{name: {"images_per_s": median, "min", "max", "boxes_per_image"}}, each variant a whole pass per round,
    round-robin, after a warm-up pass over the first image."""
    for run in variants.values():
        run(paths[:1])
    times, boxes = {name: [] for name in variants}, {}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            boxes[name] = run(paths)
            times[name].append(time.perf_counter() - start)
    return {name: {"images_per_s": len(paths) / statistics.median(t), "min": len(paths) / max(t),
                   "max": len(paths) / min(t), "boxes_per_image": boxes[name] / len(paths)}
            for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- the run

def build(args, folder, calibration_paths, threads):
    """{row: {"pytorch", "ort_fp32", "ort_int8"}} for our sizes and the peers; a peer's "pytorch" is the
    Ultralytics model (its own predict()); the peers are absent without ultralytics."""
    from export import session_options  # noqa: F401  (fails early without onnxruntime)
    from ort_detector import OrtDetector
    calibration = os.path.join(folder, "calibration")
    os.makedirs(calibration, exist_ok=True)
    for index, path in enumerate(calibration_paths):
        os.symlink(os.path.abspath(path), os.path.join(calibration, f"{index:03d}{os.path.splitext(path)[1]}"))
    rows = {size: our_detectors(size, folder, calibration, threads) for size in args.sizes}
    for name, yaml in PEERS.items():
        model = load_yolo(yaml)
        if model is None:
            print("ultralytics is not installed: no YOLO peers (pip install ultralytics to add them)", flush=True)
            break
        float_path, int8_path = export_yolo(load_yolo(yaml), folder, name, calibration_paths)
        rows[name] = {"pytorch": model, "ort_fp32": OrtDetector(float_path, threads),
                      "ort_int8": OrtDetector(int8_path, threads)}
    return rows


def deployment(rows, image, args):
    """{(row, column): time_ms} end to end (letterbox, network, selection, NMS of a decoded photo) and network only
    (its letterboxed batch), ONNX Runtime fp32 and INT8, all round-robin."""
    from inference import letterbox
    batch = letterbox(image, IMG_SIZE, rect=True)[0][None]
    fns = {}
    for row, detectors in rows.items():
        for precision in ("ort_fp32", "ort_int8"):
            detector = detectors[precision]
            fns[(row, precision)] = lambda d=detector: d.predict([image], CONF, None, MAX_DET)
            fns[(row, precision + "_network")] = lambda d=detector: d(batch)
    return time_ms_interleaved(fns, args.repeats, args.warmup)


def throughput_variants(rows, draw_dir):
    variants = {}
    for row, detectors in rows.items():
        if row in PEERS:
            variants[f"{row} Ultralytics predict()"] = lambda paths, m=detectors["pytorch"]: ultralytics_pass(
                m, paths, draw_dir)
        else:
            variants[f"{row} PyTorch"] = lambda paths, d=detectors["pytorch"]: our_pass(d, paths, draw_dir)
        variants[f"{row} ORT INT8"] = lambda paths, d=detectors["ort_int8"]: our_pass(d, paths, draw_dir)
    return variants


def measure(args, folders, threads):
    """All measurements at `threads` threads (torch and ONNX Runtime alike)."""
    torch.set_num_threads(threads)
    from dataset_coco import load_image
    results = {"threads": threads, "folders": {}}
    with tempfile.TemporaryDirectory(prefix="folder_speed_") as work, torch.no_grad():
        calibration = folders[list(folders)[0]][::max(1, len(folders[list(folders)[0]]) // 8)][:8]
        rows = build(args, work, calibration, threads)
        results["deployment"] = deployment(rows, load_image(calibration[0]), args)
        for label, paths in folders.items():
            for drawn in (False, True):
                draw_dir = os.path.join(work, "drawn") if drawn else None
                variants = throughput_variants(rows, draw_dir)
                results["folders"][(label, drawn)] = folder_throughput(variants, paths, args.rounds)
                print(f"{threads} threads, {label}, drawing {drawn}: {results['folders'][(label, drawn)]}",
                      flush=True)
    return results


# ---------------------------------------------------------------------------------------------- report

def _ratio(a, b):
    return a / b if b else float("nan")


def folder_lines(result, folders):
    lines = [f"### {result['threads']} thread{'s' if result['threads'] > 1 else ''}", "",
             "| folder | drawing | variant | images/s (min-max) | boxes/image | vs YOLOv8n predict() |",
             "|---|---|---|---|---|---|"]
    for (label, drawn), variants in result["folders"].items():
        peer = variants.get("yolov8n Ultralytics predict()", {}).get("images_per_s")
        for name, value in variants.items():
            ratio = f"{_ratio(value['images_per_s'], peer):.2f}x" if peer else "-"
            lines.append(f"| {label} ({len(folders[label])}) | {'yes' if drawn else 'no'} | {name} | "
                         f"{value['images_per_s']:.2f} ({value['min']:.2f}-{value['max']:.2f}) | "
                         f"{value['boxes_per_image']:.1f} | {ratio} |")
    return lines + [""]


def deployment_lines(result):
    timed, lines = result["deployment"], []
    rows = list(dict.fromkeys(row for row, _ in timed))
    columns = (("ort_fp32", "fp32 end to end"), ("ort_int8", "INT8 end to end"),
               ("ort_fp32_network", "fp32 network"), ("ort_int8_network", "INT8 network"))
    lines += [f"### {result['threads']} thread{'s' if result['threads'] > 1 else ''}", "",
              "| model | " + " | ".join(f"{title} ms" for _, title in columns) + " | "
              + " | ".join(f"{title} / YOLOv8n" for _, title in columns) + " |",
              "|---|" + "---|" * 2 * len(columns)]
    for row in rows:
        cells = [f"{timed[(row, key)]['median']:.1f}" for key, _ in columns]
        ratios = [f"{_ratio(timed[(row, key)]['median'], timed[('yolov8n', key)]['median']):.2f}"
                  if ("yolov8n", key) in timed else "-" for key, _ in columns]
        lines.append(f"| {row} | " + " | ".join(cells + ratios) + " |")
    return lines + [""]


def targets(results):
    """(text, value, target, met) of issue #27's ratios, per thread count."""
    found = []
    for result in results:
        suffix = f" ({result['threads']} threads)"
        for (label, drawn), variants in result["folders"].items():
            peer = variants.get("yolov8n Ultralytics predict()")
            if not peer or not label.startswith("12-MP"):
                continue
            for variant, limit in (("lite0 PyTorch", 2), ("lite0 ORT INT8", 4)):
                if variant in variants:
                    value = variants[variant]["images_per_s"] / peer["images_per_s"]
                    found.append((f"{variant} images/s / YOLOv8n predict(), 12-MP, drawing {'on' if drawn else 'off'}"
                                  + suffix, value, f">= {limit}", value >= limit))
        timed = result["deployment"]
        for size, limit in (("lite0", 0.8), ("tiny", 0.5)):
            for key, what in (("ort_int8_network", "network"), ("ort_int8", "end to end")):
                if (size, key) in timed and ("yolov8n", key) in timed:
                    value = timed[(size, key)]["median"] / timed[("yolov8n", key)]["median"]
                    found.append((f"{size} INT8 / YOLOv8n INT8, {what}" + suffix, value, f"<= {limit}",
                                  value <= limit))
    return found


def report(args, info, folders, results):
    lines = ["# Folder throughput and fair deployment", "",
             f"Machine: {info['cpu']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs; torch "
             f"{info['torch']}, Python {info['python']}; {info['platform']}.", "",
             f"`python benchmarks/folder_speed.py {' '.join(args.argv)}`", "",
             f"Input {IMG_SIZE} px, rectangular letterbox; score >= {CONF}, at most {MAX_DET} boxes. lite0: the shipped "
             f"COCO starter (80 classes); tiny and nano: random weights, 80 classes; YOLO: random weights from "
             f"their YAML (80 classes), so they find few boxes (compare boxes/image before reading the drawing rows).",
             "", "## Folder throughput (file to detections)", "",
             f"Each variant passes over the whole folder once per round, {args.rounds} rounds round-robin, median "
             f"(min-max). Ours: predict.predict_images (a JPEG decoded reduced when nothing is drawn), batch 1 (PyTorch: BatchNorm fused; ORT: "
             f"export.py --int8), drawing with predict.py's draw_picture and save_image (JPEG quality 95). Ultralytics: "
             f"predict(source=the folder's files, stream=True), save=True for drawing.", ""]
    for result in results:
        lines += folder_lines(result, folders)
    lines += ["## Fair deployment: the same runtime, quantisation, letterbox and NMS", "",
              f"ONNX Runtime, batch 1, a decoded photo: end to end = letterbox + network + selection + NMS "
              f"(OrtDetector.predict), network = the session on its letterboxed batch; median of {args.repeats} "
              f"runs after {args.warmup}, all round-robin. YOLO graphs: fp32 from torch.onnx.export of the fused "
              f"model (dynamic height and width), INT8 by quantize.quantize_int8 with the same calibration images.",
              ""]
    for result in results:
        lines += deployment_lines(result)
    lines += ["## Targets (ratios within this run)", ""]
    lines += [f"- {text}: **{value:.2f}** (target {target}) {'met' if ok else 'NOT met'}"
              for text, value, target, ok in targets(results)]
    return "\n".join(lines) + "\n"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=os.path.join("datasets", "kangaroo", "images"), help="photos")
    parser.add_argument("--limit", type=int, default=None, help="first N photos of --folder only")
    parser.add_argument("--twelve-mp", type=int, default=0, help="also a folder of N generated 4000x3000 JPEGs")
    parser.add_argument("--twelve-mp-dir", default=os.path.join(tempfile.gettempdir(), "folder_speed_12mp"),
                        help="where the 12-MP JPEGs are written (once)")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "lite0"], help="our model sizes")
    parser.add_argument("--threads", nargs="+", type=int, default=[2], help="thread counts, measured in turn")
    parser.add_argument("--rounds", type=int, default=3, help="passes over each folder per variant")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per deployment latency")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before the deployment latencies")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="markdown file to write")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    args.argv = argv
    photos = image_paths(args.folder, args.limit)
    folders = {"photos": photos}
    if args.twelve_mp:
        folders["12-MP"] = twelve_mp_folder(photos, args.twelve_mp, args.twelve_mp_dir)
    info = machine_info()
    results = [measure(args, folders, threads) for threads in args.threads]
    markdown = report(args, info, folders, results)
    print(markdown)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(markdown)
    return results


if __name__ == "__main__":
    main()
