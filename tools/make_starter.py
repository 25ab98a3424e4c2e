"""Build the starter detector that fine-tuning starts lite0 from: weights/lite0_coco_starter.pth and its sidecar JSON.

    python tools/make_starter.py --coco-root datasets/coco128                # pretrain with the recipe, then write both
    python tools/make_starter.py --coco-root /path/to/coco2017                # the same recipe on full COCO 2017
    python tools/make_starter.py --coco-root datasets/coco128 --from-run pretrain_results/multi_class_<stamp>

The recipe is config_transfer_learning.json's "starter" section: pretrain_multi_class.py's settings for a lite0
that starts from ImageNet and learns the default COCO classes. The best checkpoint (its EMA weights) is stored in
half precision when that loses nothing measurable (both are scored on the val set, and the sidecar gives both),
as a plain dict that loads with torch.load(..., weights_only=True). The sidecar records the exact command, the
recipe, the data and its licences, the code version (git commit) and the scores.
"""
import argparse
import hashlib
import logging
import os
import shlex
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the toolkit's modules
import config as cfg  # noqa: E402
import pretrain_multi_class  # noqa: E402
import runs  # noqa: E402
from checkpoints import STARTER_PATH, save_checkpoint, unwrap_state_dict  # noqa: E402
from dataset_coco import CocoDetectionDataset, coco_layout_paths  # noqa: E402
from evaluate import evaluate  # noqa: E402
from model_lightweight import load_model  # noqa: E402

logger = logging.getLogger("make_starter")

COCO_CREDITS = ("images from COCO 2017 (cocodataset.org): annotations (c) COCO Consortium, CC BY 4.0; images from "
                "Flickr under their own licences")
MAX_HALF_LOSS = 0.001  # mAP50 and mAP the float16 copy may lose against float32 and still be stored in float16


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", required=True, help="COCO 2017's layout (train2017/, val2017/, annotations/)")
    parser.add_argument("--from-run", help="a finished pretraining run folder with this recipe: skip the training")
    parser.add_argument("--out", default=STARTER_PATH, help="where the starter goes (its sidecar: .json beside it)")
    parser.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    return parser


def recipe():
    """The "starter" section of config_transfer_learning.json (notes left out)."""
    data = cfg.load_json(cfg.DEFAULT_CONFIG_PATH, "default config")
    if "starter" not in data:
        raise cfg.ConfigError(f"{cfg.DEFAULT_CONFIG_PATH} has no 'starter' section; restore it from the repository")
    return {k: v for k, v in data["starter"].items() if not k.startswith("_")}


def code_version():
    """The git commit of this tree, '+changes' when it has uncommitted ones; 'unknown' outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def half_precision(state):
    """Floating-point tensors in float16, the rest as they are."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def score(checkpoint_path, val):
    metrics = evaluate(load_model(checkpoint_path), val, num_workers=0)
    return {key: round(metrics[key], 4) for key in ("mAP", "mAP50", "mAP75")}


def training_seconds(run_dir):
    """The run's own time: the sum of its epochs' (training and evaluation) from metrics.csv."""
    return sum(float(row["epoch_time"]) for row in runs.MetricsLog(run_dir).rows)


def write_starter(run_dir, coco_root, out, command, seconds):
    """The starter and its sidecar from a finished run; returns the sidecar dict."""
    best_path = os.path.join(run_dir, runs.LAYOUT["best"])
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    paths = coco_layout_paths(coco_root)
    val = CocoDetectionDataset(paths["val_ann"], paths["val_images"], classes=best["class_names"])
    starter = {"model_state_dict": half_precision(unwrap_state_dict(best["model_state_dict"])),
               "model_config": best["model_config"], "class_names": best["class_names"], "epoch": best["epoch"]}
    save_checkpoint(starter, out)
    fp32, stored, precision = score(best_path, val), score(out, val), "float16"
    if any(fp32[key] - stored[key] > MAX_HALF_LOSS for key in ("mAP", "mAP50")):
        logger.warning("float16 loses %s against %s: storing float32", stored, fp32)
        starter["model_state_dict"] = unwrap_state_dict(best["model_state_dict"])
        save_checkpoint(starter, out)
        stored, precision = fp32, "float32"
    with open(out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    run_config = cfg.load_json(os.path.join(run_dir, "config.json"))
    sidecar = {
        "file": os.path.basename(out), "sha256": digest, "bytes": os.path.getsize(out),
        "precision": precision,
        "what": "lite0 (EfficientNet-Lite0 backbone, PAN, shared head) pretrained from ImageNet on the default COCO "
                "classes present in the data; fine-tuning loads everything but the class output",
        "command": command, "recipe": recipe(), "code_version": code_version(),
        "data": {"coco_root": os.path.basename(os.path.normpath(coco_root)),
                 "train_images": len(cfg.load_json(paths["train_ann"], "annotations")["images"]),
                 "val_images": len(val), "classes": best["class_names"], "credits": COCO_CREDITS},
        "scores": {"set": "the val split of --coco-root; coco128's val images are its train images, so this "
                          "measures fitting, not generalisation",
                   "epoch": best["epoch"], "float32": fp32, "stored": stored},
        "pretraining": {"epochs": run_config["epochs"], "training_seconds": round(training_seconds(run_dir)),
                        "command_seconds": seconds, "run": os.path.basename(os.path.normpath(run_dir))},
    }
    cfg.write_json_atomic(sidecar, os.path.splitext(out)[0] + ".json")
    return sidecar


def main(argv=None):
    cfg.script_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    command = "python tools/make_starter.py " + shlex.join(argv)
    started = time.perf_counter()
    run_dir = args.from_run
    if run_dir is None:
        settings = {**recipe(), "coco_root": args.coco_root, "workers": 0, "device": args.device}
        run_dir = pretrain_multi_class.pretrain(**settings)["run_dir"]
    sidecar = write_starter(run_dir, args.coco_root, args.out, command, round(time.perf_counter() - started))
    logger.info("wrote %s (%.1f MB, %s): %s", args.out, sidecar["bytes"] / 1e6, sidecar["precision"],
                sidecar["scores"])
    return sidecar


if __name__ == "__main__":
    cfg.run_cli(main, None, bad_input=(cfg.ConfigError, FileNotFoundError, ValueError))
