"""CPU speed of every model size against torchvision's ssdlite320 and Ultralytics' YOLOv8n / YOLO11n, in one run.

    python benchmarks/speed.py                                  # writes benchmarks/results/speed.md
    pip install ultralytics                                     # optional: adds the YOLO peers (random weights
                                                                # from their YAML; nothing is downloaded)
    python benchmarks/speed.py --sizes nano tiny --repeats 10 --skip-loader
    python benchmarks/speed.py --threads 2 --skip-train --output /tmp/speed.md

Measures, on this machine: batch-1 fp32 latency of the model forward and of the full predict()
(letterbox, forward, decoding, NMS); training throughput (forward, loss, backward, optimizer step) and
its peak RSS, each in a fresh subprocess; data-loader throughput with the `strong` and `moderate`
augmentations on a generated COCO folder; params and MACs; deployment latency end to end and network only in
PyTorch (unfused, fused), ONNX Runtime fp32 and INT8, against the YOLO peers when ultralytics is installed (no
other module of the project imports it); and the gain of each CPU optimisation
(BatchNorm fusion, channels_last, uint8 letterbox, predict() without mode switches), each before/after in
this run, the two run alternately.
Times are the median of --repeats runs after --warmup, with the min-max range; latencies of all models
are taken round-robin, so load on a shared machine shifts them alike. Compare ratios, not
absolute numbers, across machines.
"""
import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dataset_coco import CocoDetectionDataset, build_dataloader, build_transforms  # noqa: E402
from inference import letterbox  # noqa: E402
from losses import DetectionLoss  # noqa: E402
from model_lightweight import MODEL_SIZES, count_macs, create_lightweight_model  # noqa: E402
from synthetic_data import write_shapes_split  # noqa: E402

BASELINE = "ssdlite320"
DEFAULT_OUTPUT = os.path.join(ROOT, "benchmarks", "results", "speed.md")
# Both detectors keep every box above ssdlite's default score threshold, so with random weights NMS
# runs at full load (ours: its 1000 pre-NMS candidates; ssdlite: 300 per class), the worst case.
SCORE_THRESHOLD = 0.001


# ---------------------------------------------------------------------------------------------- timing

def time_ms(fn, repeats, warmup):
    """{"median", "min", "max"} wall-clock milliseconds of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times}


def time_ms_interleaved(fns, repeats, warmup):
    """time_ms of each function in the dict `fns`, run round-robin, so load on a shared machine disturbs
    them alike and their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in times.items()}


def time_ms_pair(fn_a, fn_b, repeats, warmup):
    """time_ms of two functions, run alternately (see time_ms_interleaved)."""
    result = time_ms_interleaved({"a": fn_a, "b": fn_b}, repeats, warmup)
    return result["a"], result["b"]


def machine_info():
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


# ---------------------------------------------------------------------------------------------- models

def build_model(name, num_classes, img_size):
    """Ours by size name, or torchvision's ssdlite320 (random weights; +1 for its background class)."""
    if name == BASELINE:
        return torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes + 1)
    return create_lightweight_model(num_classes, name, img_size=img_size)


def ssdlite_forward(model, images):
    """ssdlite's backbone + head on already resized, normalised images (no transform, no NMS)."""
    features = list(model.backbone(images).values())
    return model.head(features)


def params_and_macs(name, model, img_size):
    params = sum(p.numel() for p in model.parameters())
    if name != BASELINE:
        return params, count_macs(model, img_size)
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ssdlite_forward(model, torch.zeros(1, 3, 320, 320))
    return params, counter.get_total_flops() // 2


def camera_frame(img_size, generator):
    """A uint8 4:3 frame whose longer side is 2x the input side, so predict() resizes as in real use."""
    return (torch.rand(3, img_size * 3 // 2, img_size * 2, generator=generator) * 255).to(torch.uint8)


def latency_fns(name, model, img_size, compile_models=True):
    """Closures timed for the latency columns: batch-1 forward and full predict(); for ours also predict()
    of a model.fuse()d copy; with ``compile_models``, predict() of a torch.compile()d copy (ours: fused
    first), whose first warm-up call compiles."""
    generator = torch.Generator().manual_seed(0)
    model.eval()
    frame = camera_frame(img_size, generator)
    if name == BASELINE:
        tensor = model.transform([torch.rand(3, 320, 320, generator=generator)])[0].tensors
        float_frame = frame.float() / 255  # torchvision detectors take float images
        fns = {"forward_ms": lambda: ssdlite_forward(model, tensor), "predict_ms": lambda: model([float_frame])}
        if compile_models:
            compiled_ssd = copy.deepcopy(model)
            compiled_ssd.compile()
            fns["predict_compiled_ms"] = lambda: compiled_ssd([float_frame])
        return fns
    tensor = torch.rand(1, 3, img_size, img_size, generator=generator)
    fused = copy.deepcopy(model).fuse()
    fns = {"forward_ms": lambda: model(tensor),
           "predict_ms": lambda: unfused_predict(model, frame, SCORE_THRESHOLD),
           "predict_fused_ms": lambda: fused.predict(frame, conf_threshold=SCORE_THRESHOLD)}
    if compile_models:
        compiled = copy.deepcopy(model).fuse()
        compiled.compile()  # nn.Module.compile: predict()'s self(...) runs the compiled forward
        fns["predict_compiled_ms"] = lambda: compiled.predict(frame, conf_threshold=SCORE_THRESHOLD)
    return fns


def latencies(models, img_size, args):
    """{name: {column: time_ms}}, every model's forward timed round-robin, then every predict()."""
    fns = {name: latency_fns(name, model, img_size, args.compile) for name, model in models.items()}
    results = {name: {} for name in models}
    with torch.no_grad():
        for column in ("forward_ms", "predict_ms", "predict_fused_ms", "predict_compiled_ms"):
            timed = time_ms_interleaved({name: f[column] for name, f in fns.items() if column in f},
                                        args.repeats, args.warmup)
            for name, value in timed.items():
                results[name][column] = value
    return results


# ---------------------------------------------------------------------------------------------- deployment

PEERS = {"yolov8n": "yolov8n.yaml", "yolo11n": "yolo11n.yaml"}  # Ultralytics models, built from their YAML
DEPLOY_CONF = 0.25  # every detector keeps what scores at least this (Ultralytics' predict default)


def unfused_predict(model, frame, conf_threshold=DEPLOY_CONF):
    """model.predict() without its BatchNorm-fused copy: the BatchNorm passes run."""
    from inference import letterbox_groups, unletterbox
    results = []
    for _, batch, ratios in letterbox_groups([frame], model.img_size):
        results += unletterbox(model.postprocess(model(batch), conf_threshold), ratios, [frame.shape[-2:]])
    return results


def exported(model, folder, name, img_size, calibration):
    """(float, INT8) OrtDetectors of `model`, exported and quantised in `folder` with export.py's own code."""
    import export
    from checkpoints import model_checkpoint, save_checkpoint
    from ort_detector import OrtDetector
    checkpoint = os.path.join(folder, f"{name}.pth")
    save_checkpoint(model_checkpoint(model, [f"class{i}" for i in range(model.num_classes)]), checkpoint)
    export.main(["--checkpoint", checkpoint, "--int8", "--calib-images", calibration, "--calib-count", "8",
                 "--runs", "1", "--warmup", "0", "--img-size", str(img_size)])
    threads = torch.get_num_threads()
    return (OrtDetector(os.path.join(folder, f"{name}.onnx"), threads),
            OrtDetector(os.path.join(folder, f"{name}_int8.onnx"), threads))


def ultralytics_peers(img_size, folder):
    """{name: (YOLO model, its fused network exported to an ONNX Runtime session)}, or {} without ultralytics.
    Random weights built from the YAML: nothing is downloaded. `pip install ultralytics` to include them."""
    try:
        from ultralytics import YOLO
    except ImportError:
        print("ultralytics is not installed: no YOLO peers (pip install ultralytics to add them)", flush=True)
        return {}
    import onnxruntime
    import warnings
    from export import session_options
    peers = {}
    for name, yaml in PEERS.items():
        model = YOLO(yaml)
        network = model.model.fuse().eval()

        class Outputs(torch.nn.Module):  # the raw (1, 4 + classes, anchors) predictions, as Ultralytics exports
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net(x)[0]
        path = os.path.join(folder, f"{name}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Outputs(network), (torch.rand(1, 3, img_size, img_size),), path, dynamo=False,
                              opset_version=17, input_names=["images"], output_names=["output0"])
        session = onnxruntime.InferenceSession(path, session_options(torch.get_num_threads()),
                                               providers=["CPUExecutionProvider"])
        peers[name] = (model, session)
    return peers


def deployment_fns(sizes, args, folder):
    """{(row, column): closure}: end to end on a 640x480 photo (letterbox, network, selection and NMS at
    DEPLOY_CONF) and network only at img_size x img_size, for our sizes, ssdlite and the YOLO peers."""
    from model_lightweight import fuse_batchnorm
    generator = torch.Generator().manual_seed(0)
    frame = camera_frame(args.img_size, generator)
    calibration = os.path.join(folder, "calibration")
    os.makedirs(calibration)
    for index in range(8):
        torchvision.io.write_jpeg(camera_frame(args.img_size, generator), os.path.join(calibration, f"{index}.jpg"))
    square = torch.rand(1, 3, args.img_size, args.img_size, generator=generator)
    fns = {}
    for size in sizes:
        torch.manual_seed(0)
        model = build_model(size, args.num_classes, args.img_size).eval()
        fused = fuse_batchnorm(model)
        float_ort, int8_ort = exported(model, folder, size, args.img_size, calibration)
        fns.update({(size, "pytorch"): lambda m=model: unfused_predict(m, frame),
                    (size, "pytorch_fused"): lambda m=fused: m.predict(frame, DEPLOY_CONF),
                    (size, "ort_fp32"): lambda d=float_ort: d.predict(frame, DEPLOY_CONF),
                    (size, "ort_int8"): lambda d=int8_ort: d.predict(frame, DEPLOY_CONF),
                    (size, "ort_fp32_network"): lambda d=float_ort: d(square),
                    (size, "ort_int8_network"): lambda d=int8_ort: d(square)})
    ssd = build_model(BASELINE, args.num_classes, args.img_size).eval()
    float_frame = frame.float() / 255
    fns[(BASELINE, "pytorch")] = lambda: ssd([float_frame])
    image_bgr = frame.permute(1, 2, 0).flip(-1).contiguous().numpy()  # Ultralytics reads OpenCV's BGR arrays
    for name, (model, session) in ultralytics_peers(args.img_size, folder).items():
        fns[(name, "pytorch")] = lambda m=model: m.predict(image_bgr, imgsz=args.img_size, conf=DEPLOY_CONF,
                                                           verbose=False)
        fns[(name, "ort_fp32_network")] = lambda s=session: s.run(None, {"images": square.numpy()})
    return fns


def deployment(sizes, args):
    """{row: {column: time_ms}}, every closure of deployment_fns timed round-robin in this process."""
    with tempfile.TemporaryDirectory(prefix="speed_deploy_") as folder, torch.no_grad():
        fns = deployment_fns(sizes, args, folder)
        timed = time_ms_interleaved(fns, args.repeats, args.warmup)
    rows = {}
    for (row, column), value in timed.items():
        rows.setdefault(row, {})[column] = value
    return rows


DEPLOY_COLUMNS = (("pytorch", "PyTorch predict() ms"), ("pytorch_fused", "PyTorch predict() fused ms"),
                  ("ort_fp32", "ONNX Runtime fp32 ms"), ("ort_int8", "ONNX Runtime INT8 ms"),
                  ("ort_fp32_network", "ORT fp32 network only ms"), ("ort_int8_network", "ORT INT8 network only ms"))


def deployment_report(rows, args):
    """The table against the peers and the ratios to YOLOv8n (same backend; its predict() for end to end)."""
    lines = ["", "## Deployment against the detectors people pick", "",
             f"A {args.img_size * 2}x{args.img_size * 3 // 2} uint8 photo, end to end (letterbox, network, "
             f"selection and NMS at score {DEPLOY_CONF}; decoding the file excluded): our predict() letterboxes to "
             f"the next multiple of 32 ({args.img_size}x{-(-args.img_size * 3 // 4 // 32) * 32} here), as "
             f"Ultralytics' predict() does; ONNX Runtime runs export.py's graphs (INT8: --int8, "
             f"calibrated on 8 frames) with the same letterbox and selection (ort_detector.py). Network only: "
             f"a {args.img_size}x{args.img_size} input through the session. Random weights, {args.num_classes} "
             f"classes for ours and ssdlite (YOLO: their YAML's 80); batch 1, median (min-max) of {args.repeats} "
             f"runs after {args.warmup} warm-up, all round-robin in one process.", "",
             "| model | " + " | ".join(title for _, title in DEPLOY_COLUMNS) + " |",
             "|---|" + "---|" * len(DEPLOY_COLUMNS)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_ms(row[key]) if key in row else "-" for key, _ in DEPLOY_COLUMNS)
                     + " |")
    peer = rows.get("yolov8n")
    if not peer:
        return lines
    base, network = peer["pytorch"]["median"], peer["ort_fp32_network"]["median"]
    lines += ["", "Ratios to YOLOv8n (end to end: to its predict(); network only: to its ONNX in ONNX Runtime):", "",
              "| model | " + " | ".join(title.replace(" ms", "") for _, title in DEPLOY_COLUMNS) + " |",
              "|---|" + "---|" * len(DEPLOY_COLUMNS)]
    for name, row in rows.items():
        cells = [f"{row[key]['median'] / (network if 'network' in key else base):.2f}" if key in row else "-"
                 for key, _ in DEPLOY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def deployment_targets(rows):
    peer = rows.get("yolov8n")
    if not peer:
        return []
    base = peer["pytorch"]["median"]
    wanted = (("lite0", "ort_int8", 0.6), ("lite0", "pytorch_fused", 1.0), ("tiny", "ort_int8", 0.3),
              ("tiny", "pytorch_fused", 0.5))
    titles = dict(DEPLOY_COLUMNS)
    return [(f"{size} {titles[key].replace(' ms', '')} / YOLOv8n predict()", rows[size][key]["median"] / base,
             f"<= {limit}", rows[size][key]["median"] / base <= limit)
            for size, key, limit in wanted if size in rows and key in rows[size]]


# ---------------------------------------------------------------------------------------------- training

def random_targets(batch_size, img_size, num_classes, generator, max_boxes=6):
    """Random xyxy boxes (4 to 60 % of the side, 1 to max_boxes per image) and labels 0..num_classes-1."""
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * img_size * 0.6
        wh = (torch.rand(n, 2, generator=generator) * 0.56 + 0.04) * img_size
        boxes = torch.cat([xy, (xy + wh).clamp(max=img_size)], dim=1)
        targets.append({"boxes_xyxy": boxes, "labels": torch.randint(num_classes, (n,), generator=generator)})
    return targets


def training_step_fn(name, model, batch_size, img_size, num_classes):
    """A closure running one full training step (forward, loss, backward, SGD step) on fixed random data."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, img_size, img_size, generator=generator)
    targets = random_targets(batch_size, img_size, num_classes, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    if name == BASELINE:
        image_list = list(images)
        ssd_targets = [{"boxes": t["boxes_xyxy"], "labels": t["labels"] + 1} for t in targets]  # 0 = background

        def loss_fn():
            return sum(model(image_list, ssd_targets).values())
    else:
        criterion = DetectionLoss()

        def loss_fn():
            return criterion(model(images), targets)["loss"]

    def step():
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def train_worker(args):
    """Child process: one model's training throughput and peak RSS, printed as one JSON line."""
    torch.manual_seed(0)
    model = build_model(args.train_worker, args.num_classes, args.img_size)
    if args.memory_format == "contiguous":
        model.set_memory_format(torch.contiguous_format)
    step = training_step_fn(args.train_worker, model, args.batch_size, args.img_size, args.num_classes)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = time_ms(step, args.train_steps, args.train_warmup)
    rss_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step_ms_all": times["all"], "peak_rss_mb": rss_peak_kb / 1024,
                      "rss_before_mb": rss_before_kb / 1024}))


def training(name, args, memory_format="channels_last"):
    """Run train_worker for `name` in a fresh interpreter, so peak RSS is this model's own."""
    command = [sys.executable, os.path.abspath(__file__), "--train-worker", name, "--memory-format", memory_format,
               "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
               "--num-classes", str(args.num_classes), "--train-steps", str(args.train_steps),
               "--train-warmup", str(args.train_warmup), "--threads", str(torch.get_num_threads())]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"training measurement of {name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_rounds(names, args):
    """training() of every model, `args.train_rounds` times in turn, so a slow spell of a shared machine
    falls on all models alike; each model's steps of all rounds are pooled into one median and range."""
    runs = {name: [] for name in names}
    for _ in range(args.train_rounds):
        for name in names:
            runs[name].append(training(name, args))
    results = {}
    for name, measured in runs.items():
        steps = [t for run in measured for t in run["step_ms_all"]]
        median = statistics.median(steps)
        results[name] = {"step_ms": {"median": median, "min": min(steps), "max": max(steps)},
                         "images_per_s": args.batch_size * 1e3 / median,
                         "images_per_s_range": [args.batch_size * 1e3 / max(steps), args.batch_size * 1e3 / min(steps)],
                         "peak_rss_mb": max(run["peak_rss_mb"] for run in measured),
                         "rss_before_mb": max(run["rss_before_mb"] for run in measured)}
    return results


# ---------------------------------------------------------------------------------------------- data

def loader_throughput(preset, image_dir, ann_path, args):
    """Images/s of build_dataloader with the `preset` augmentation (default workers), after a warm-up epoch."""
    dataset = CocoDetectionDataset(ann_path, image_dir, transforms=build_transforms(preset, args.img_size))
    loader = build_dataloader(dataset, batch_size=args.batch_size, shuffle=True)
    per_epoch = []
    for epoch in range(1 + max(1, args.loader_epochs)):
        start, count = time.perf_counter(), 0
        for images, _ in loader:
            count += len(images)
        if epoch:  # epoch 0 starts the workers
            per_epoch.append(count / (time.perf_counter() - start))
    return {"median": statistics.median(per_epoch), "min": min(per_epoch), "max": max(per_epoch),
            "num_workers": loader.num_workers}


def loader_measurements(args):
    class_names = [f"class{i}" for i in range(args.num_classes)]
    with tempfile.TemporaryDirectory(prefix="speed_coco_") as root:
        image_dir, ann_path = os.path.join(root, "images"), os.path.join(root, "annotations.json")
        write_shapes_split(image_dir, ann_path, args.loader_images, class_names, img_size=args.loader_image_size,
                           min_objects=1, max_objects=6)
        return {preset: loader_throughput(preset, image_dir, ann_path, args) for preset in ("strong", "moderate")}


# ---------------------------------------------------------------------------------------------- optimisations

def optimisation_gains(size, args):
    """Before/after of each CPU optimisation on one size, in this process."""
    generator = torch.Generator().manual_seed(0)
    frame = camera_frame(args.img_size, generator)
    tensor = torch.rand(1, 3, args.img_size, args.img_size, generator=generator)
    model = build_model(size, args.num_classes, args.img_size).eval()
    gains = {}
    with torch.no_grad():
        predict = lambda m: (lambda: m.predict(frame, conf_threshold=SCORE_THRESHOLD))  # noqa: E731
        # predict() used to call eval() and train(False) every time; both walk all modules.
        walks = time_ms(lambda: (model.eval(), model.train(False)), args.repeats, args.warmup)
        gains["predict() without mode switches"] = (walks["median"], 0.0, "ms per call (the two module walks)")
        # predict() used to convert uint8 frames to float before resizing; it now resizes uint8.
        resize_float, resize_uint8 = time_ms_pair(lambda: letterbox(frame.float() / 255, args.img_size),
                                                  lambda: letterbox(frame, args.img_size), args.repeats, args.warmup)
        gains["letterbox resizes uint8, not float"] = (resize_float["median"], resize_uint8["median"], "ms")
        fused_model = build_model(size, args.num_classes, args.img_size)
        fused_model.load_state_dict(model.state_dict())
        fused_model.fuse()
        unfused, fused = time_ms_pair(predict(model), predict(fused_model), args.repeats, args.warmup)
        gains["BatchNorm fused into convs (model.fuse()), predict()"] = (unfused["median"], fused["median"], "ms")
        contiguous_model = build_model(size, args.num_classes, args.img_size).eval()
        contiguous_model.load_state_dict(model.state_dict())
        contiguous_model.set_memory_format(torch.contiguous_format)
        contiguous, channels_last = time_ms_pair(lambda: contiguous_model(tensor), lambda: model(tensor),
                                                 args.repeats, args.warmup)
        gains["channels_last vs NCHW, forward batch 1"] = (contiguous["median"], channels_last["median"], "ms")
    if not args.skip_train:
        nchw, nhwc = (args.batch_size * 1e3 / statistics.median(training(size, args, fmt)["step_ms_all"])
                      for fmt in ("contiguous", "channels_last"))
        gains[f"channels_last vs NCHW, training batch {args.batch_size}"] = (nchw, nhwc, "images/s")
    return gains


# ---------------------------------------------------------------------------------------------- report

def _ms(t):
    return f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f})"


def _ratio(a, b):
    return a / b if b else float("nan")


def report(args, info, rows, loaders, gains, ratios, deploy_lines=()):
    lines = ["# CPU speed", "",
             f"Machine: {info['cpu']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs; "
             f"{info['torch_threads']} torch threads; torch {info['torch']}, torchvision {info['torchvision']}, "
             f"Python {info['python']}; {info['platform']}.", "",
             f"`python benchmarks/speed.py {' '.join(args.argv)}`".replace(" `", "`"), "",
             f"fp32, input {args.img_size}x{args.img_size}, {args.num_classes} classes (ssdlite: +1 background). "
             f"Latency: batch 1, median (min-max) of {args.repeats} runs after {args.warmup} warm-up. "
             f"`predict` = letterbox/resize of a {args.img_size * 2}x{args.img_size * 3 // 2} uint8 frame, forward, "
             f"decoding and NMS at score threshold {SCORE_THRESHOLD} (ssdlite's default; random weights put "
             f"NMS at full load); for ssdlite, `model([image])` in eval mode. Training: batch "
             f"{args.batch_size}, forward + loss + backward + SGD step on random boxes, median of "
             f"{args.train_steps} steps after {args.train_warmup} in each of {args.train_rounds} fresh processes per "
             f"model (models in turn, steps pooled); peak RSS "
             f"is that process's ru_maxrss (Python and torch included; 'before' = after building the model "
             f"and data). ssdlite320 always runs at 320 px (its transform resizes).", "",
             "`predict compiled`: `model.compile()` (torch.compile, inductor) on a copy, ours BatchNorm-fused "
             "first; compilation is in the warm-up.", "",
             "| model | params | MACs | forward ms | predict ms | predict fused ms | predict compiled ms | "
             "train img/s | peak RSS MB (before) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        train = row.get("train")
        train_text = (f"{train['images_per_s']:.1f} ({train['images_per_s_range'][0]:.1f}-"
                      f"{train['images_per_s_range'][1]:.1f})" if train else "-")
        rss_text = f"{train['peak_rss_mb']:.0f} ({train['rss_before_mb']:.0f})" if train else "-"
        fused = _ms(row["predict_fused_ms"]) if "predict_fused_ms" in row else "-"
        compiled = _ms(row["predict_compiled_ms"]) if "predict_compiled_ms" in row else "-"
        lines.append(f"| {name} | {row['params'] / 1e6:.2f} M | {row['macs'] / 1e9:.2f} G | {_ms(row['forward_ms'])} "
                     f"| {_ms(row['predict_ms'])} | {fused} | {compiled} | {train_text} | {rss_text} |")
    if loaders:
        lines += ["", f"Data loader (build_dataloader, default workers = {loaders['strong']['num_workers']}, "
                  f"batch {args.batch_size}): {args.loader_images} generated {args.loader_image_size}x"
                  f"{args.loader_image_size} JPEGs, 1-6 boxes each, output {args.img_size} px; median "
                  f"(min-max) of {args.loader_epochs} epochs after a warm-up epoch. Workers share the CPUs with "
                  f"nothing else here; in training they share them with the model.", "",
                  "| augmentation | images/s |", "|---|---|"]
        lines += [f"| {preset} | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) |" for preset, r in loaders.items()]
    if gains:
        lines += ["", f"Optimisations, measured on `{args.gain_size}` in this run (before -> after):", "",
                  "| optimisation | before | after | unit | gain |", "|---|---|---|---|---|"]
        for what, (before, after, unit) in gains.items():
            gain = (f"{before / after:.2f}x faster" if unit == "ms" and after else
                    f"{after / before:.2f}x faster" if unit == "images/s" else f"-{before:.2f} ms")
            lines.append(f"| {what} | {before:.2f} | {after:.2f} | {unit} | {gain} |")
    lines += list(deploy_lines)
    lines += ["", "Targets (ratios within this run):", ""]
    lines += [f"- {text}: **{value:.2f}** (target {target}) {'met' if ok else 'NOT met'}"
              for text, value, target, ok in ratios]
    return "\n".join(lines) + "\n"


def target_ratios(rows, loaders):
    ratios = []
    tiny, base = rows.get("tiny"), rows.get(BASELINE)
    if tiny and base:
        for key, label in (("predict_ms", "predict()"), ("predict_fused_ms", "fused predict()"),
                           ("predict_compiled_ms", "fused + compiled predict()")):
            if key in tiny:
                value = _ratio(tiny[key]["median"], base["predict_ms"]["median"])
                ratios.append((f"tiny {label} latency / ssdlite320 predict latency", value, "<= 0.5", value <= 0.5))
        if "predict_compiled_ms" in tiny and "predict_compiled_ms" in base:
            value = _ratio(tiny["predict_compiled_ms"]["median"], base["predict_compiled_ms"]["median"])
            ratios.append(("tiny fused + compiled predict() latency / ssdlite320 compiled predict latency", value,
                           "<= 0.5", value <= 0.5))
        if tiny.get("train") and base.get("train"):
            value = _ratio(tiny["train"]["images_per_s"], base["train"]["images_per_s"])
            ratios.append(("tiny training images/s / ssdlite320's", value, ">= 2", value >= 2))
    if tiny and tiny.get("train") and loaders:
        for preset, result in loaders.items():
            value = _ratio(result["median"], tiny["train"]["images_per_s"])
            ratios.append((f"`{preset}` loader images/s / tiny training images/s", value, ">= 3", value >= 3))
    return ratios


# ---------------------------------------------------------------------------------------------- CLI

def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=None, help="model sizes (default: all of MODEL_SIZES)")
    parser.add_argument("--img-size", type=int, default=320, help="input side in pixels")
    parser.add_argument("--num-classes", type=int, default=30, help="foreground classes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per latency")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before each latency")
    parser.add_argument("--batch-size", type=int, default=16, help="training and data-loader batch")
    parser.add_argument("--train-steps", type=int, default=8, help="timed training steps per model")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed training steps per model")
    parser.add_argument("--train-rounds", type=int, default=2,
                        help="fresh-process training measurements per model, models taken in turn")
    parser.add_argument("--loader-images", type=int, default=64, help="generated images for the loader test")
    parser.add_argument("--loader-image-size", type=int, default=640, help="side of the generated images")
    parser.add_argument("--loader-epochs", type=int, default=3, help="timed loader epochs")
    parser.add_argument("--gain-size", default="tiny", help="size on which the optimisations are measured")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="markdown file to write")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="no torch.compile column (it compiles every model first: a few minutes on 2 CPUs)")
    parser.add_argument("--skip-train", action="store_true", help="no training measurements")
    parser.add_argument("--skip-loader", action="store_true", help="no data-loader measurements")
    parser.add_argument("--skip-deploy", action="store_true",
                        help="no deployment table (ONNX Runtime fp32 and INT8, the YOLO peers)")
    parser.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"),
                        help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_worker:
        return train_worker(args)
    sizes = args.sizes or list(MODEL_SIZES)
    unknown = [s for s in sizes + [args.gain_size] if s not in MODEL_SIZES]
    if unknown:
        sys.exit(f"error: unknown model size {unknown[0]!r}; choose from {', '.join(MODEL_SIZES)}")
    info = machine_info()
    print(f"{info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}", flush=True)
    models, rows = {}, {}
    for name in sizes + [BASELINE]:
        torch.manual_seed(0)
        models[name] = build_model(name, args.num_classes, args.img_size)
        params, macs = params_and_macs(name, models[name], args.img_size)
        rows[name] = {"params": params, "macs": macs}
    for name, timed in latencies(models, args.img_size, args).items():
        rows[name].update(timed)
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    del models
    if not args.skip_train:
        for name, measured in training_rounds(list(rows), args).items():
            rows[name]["train"] = measured
            print(f"{name} training: {json.dumps(measured)}", flush=True)
    loaders = None if args.skip_loader else loader_measurements(args)
    gains = optimisation_gains(args.gain_size, args) if args.gain_size in sizes else {}
    deploy = {} if args.skip_deploy else deployment([s for s in sizes if s != "small"], args)
    for name, row in deploy.items():
        print(f"{name} deployment: {json.dumps(row)}", flush=True)
    markdown = report(args, info, rows, loaders, gains, target_ratios(rows, loaders) + deployment_targets(deploy),
                      deployment_report(deploy, args) if deploy else [])
    print(markdown)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(markdown)
    return {"machine": info, "models": rows, "loaders": loaders, "gains": gains}


if __name__ == "__main__":
    main()
