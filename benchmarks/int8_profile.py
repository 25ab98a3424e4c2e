"""Where an INT8 network's time goes in ONNX Runtime, by operator type: ours against YOLOv8n (issue #27 item 3).

    python benchmarks/int8_profile.py --calib datasets/kangaroo/images --threads 2

Builds the INT8 graphs as benchmarks/folder_speed.py does (ours by export.py --int8, the peers through
quantize.quantize_int8 with the same calibration photos and float rule; random weights for tiny and the peers, the
COCO starter for lite0), runs each --runs times on one letterboxed photo with ONNX Runtime's profiler on, and sums
the kernel time of every node by operator type. The per-run total of the profile is the network time the
fair-deployment table compares.
"""
import argparse
import collections
import glob
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import folder_speed  # noqa: E402


def op_times(onnx_path, batch, runs, threads):
    """{op type: ms per run} from ONNX Runtime's profile of `runs` runs (after 5 unprofiled ones would not be
    separable, so the first run, the warm-up, is dropped)."""
    import onnxruntime
    from inference import session_options
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(os.path.dirname(onnx_path), os.path.basename(onnx_path) + "_profile")
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(runs + 1):
        session.run(None, {name: batch})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    warm = starts[1] if len(starts) > 1 else 0
    totals = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm:
            totals[event["args"].get("op_name", "?")] += event["dur"] / 1000 / runs
    return dict(totals)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", required=True, help="a folder of photos: 8 calibrate, the first is profiled")
    parser.add_argument("--sizes", nargs="+", default=["lite0", "tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--output", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from image_io import decode_image
    from inference import letterbox
    paths = folder_speed.image_paths(args.calib)
    calibration = paths[::max(1, len(paths) // 8)][:8]
    batch = letterbox(decode_image(calibration[0], folder_speed.IMG_SIZE).image, folder_speed.IMG_SIZE,
                      rect=True)[0][None].numpy()
    profiles = {}
    with tempfile.TemporaryDirectory(prefix="int8_profile_") as work:
        folder = os.path.join(work, "calibration")
        os.makedirs(folder)
        for index, path in enumerate(calibration):
            os.symlink(os.path.abspath(path), os.path.join(folder, f"{index:03d}{os.path.splitext(path)[1]}"))
        for size in args.sizes:
            folder_speed.our_detectors(size, work, folder, args.threads)
            profiles[size] = op_times(os.path.join(work, f"{size}_int8.onnx"), batch, args.runs, args.threads)
        for name, yaml in folder_speed.PEERS.items():
            model = folder_speed.load_yolo(yaml)
            if model is None:
                break
            _, int8_path = folder_speed.export_yolo(model, work, name, calibration)
            profiles[name] = op_times(int8_path, batch, args.runs, args.threads)
        for leftover in glob.glob(os.path.join(work, "*_profile*.json")):
            os.remove(leftover)
    ops = sorted({op for times in profiles.values() for op in times},
                 key=lambda op: -max(times.get(op, 0.0) for times in profiles.values()))
    lines = [f"INT8 networks in ONNX Runtime, {args.threads} threads, one {batch.shape[3]}x{batch.shape[2]} "
             f"letterboxed photo, kernel ms per run by operator type (mean of {args.runs} profiled runs)", "",
             "| operator | " + " | ".join(profiles) + " |", "|---|" + "---:|" * len(profiles)]
    for op in ops:
        if max(times.get(op, 0.0) for times in profiles.values()) >= 0.05:
            lines.append(f"| {op} | " + " | ".join(f"{times.get(op, 0.0):.2f}" for times in profiles.values()) + " |")
    lines.append("| **all kernels** | " + " | ".join(f"**{sum(times.values()):.2f}**" for times in profiles.values())
                 + " |")
    print("\n".join(lines))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    return profiles


if __name__ == "__main__":
    main()
