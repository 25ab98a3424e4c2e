"""Where inference time goes, layer group by layer group and convolution kind by kind, ours against YOLOv8n's.

    python benchmarks/profile_layers.py --threads 2                  # tiny, lite0 and (if installed) YOLOv8n
    python benchmarks/profile_layers.py --sizes nano tiny --runs 50

Batch 1, BatchNorm-fused networks in eval mode, on a 320x256 input (a 4:3 photo letterboxed at 320, as both
predict()s run it). Forward hooks time every convolution and every top-level layer group (ours: backbone, fpn,
head; YOLOv8n: its backbone 0-9, neck 10-21, Detect head 22); convolutions are split into depthwise (one
group per channel), pointwise (1x1) and dense (k x k). Medians over --runs calls; the hooks add a little time of
their own, the same to every model. YOLOv8n needs `pip install ultralytics` (built from its YAML, random weights).
"""
import argparse
import collections
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_lightweight import create_lightweight_model, fuse_batchnorm  # noqa: E402

YOLO_GROUPS = {"backbone": range(0, 10), "neck": range(10, 22), "head": range(22, 23)}


def conv_kind(conv):
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise conv"
    return "pointwise conv" if conv.kernel_size == (1, 1) else "dense conv"


class Timer:
    """Forward pre/post hooks that add each module's wall time to a named bucket."""

    def __init__(self):
        self.totals, self.starts = collections.Counter(), {}

    def watch(self, module, name):
        module.register_forward_pre_hook(lambda m, args: self.starts.__setitem__(id(m), time.perf_counter()))
        module.register_forward_hook(lambda m, args, out: self.totals.update(
            {name: time.perf_counter() - self.starts.pop(id(m))}))


def our_network(size):
    model = fuse_batchnorm(create_lightweight_model(30, size, img_size=320, imagenet_pretrained=False))
    groups = {"backbone": model.backbone, "fpn": model.fpn, "head": model.head}
    return model, groups


def yolo_network():
    from ultralytics import YOLO
    network = YOLO("yolov8n.yaml").model.fuse().eval()
    groups = {name: torch.nn.ModuleList(network.model[i] for i in indices) for name, indices in YOLO_GROUPS.items()}
    return network, groups


def profile(network, groups, runs):
    """{bucket: median ms}: total, each group, each convolution kind, and everything but convolutions."""
    image = torch.rand(1, 3, 256, 320)
    per_run = collections.defaultdict(list)
    timer = Timer()
    for name, group in groups.items():
        for module in (group if isinstance(group, torch.nn.ModuleList) else [group]):
            timer.watch(module, name)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            timer.watch(module, conv_kind(module))
    with torch.inference_mode():
        for run in range(runs + 5):
            timer.totals.clear()
            start = time.perf_counter()
            network(image)
            total = time.perf_counter() - start
            if run >= 5:  # warm-up
                per_run["total"].append(total)
                for name, value in timer.totals.items():
                    per_run[name].append(value)
    medians = {name: 1e3 * statistics.median(values) for name, values in per_run.items()}
    medians["not convolutions"] = medians["total"] - sum(v for k, v in medians.items() if k.endswith("conv"))
    return medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "lite0"], help="our model sizes")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per model")
    parser.add_argument("--threads", type=int, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    networks = {size: our_network(size) for size in args.sizes}
    try:
        networks["yolov8n"] = yolo_network()
    except ImportError:
        print("ultralytics is not installed: no YOLOv8n column (pip install ultralytics)")
    results = {name: profile(network, groups, args.runs) for name, (network, groups) in networks.items()}
    buckets = list(dict.fromkeys(key for result in results.values() for key in result))
    print(f"batch 1, 320x256, {torch.get_num_threads()} threads, BatchNorm fused, median ms of {args.runs} calls\n")
    print("| part | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for bucket in buckets:
        print(f"| {bucket} | " + " | ".join(f"{r[bucket]:.2f}" if bucket in r else "-" for r in results.values())
              + " |")
    return results


if __name__ == "__main__":
    main()
