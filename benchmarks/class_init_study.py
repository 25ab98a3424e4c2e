"""Measure class-aware head init (issue #28): does a class the starter already knows learn faster or better when its
class output starts from the starter's own row (--class-init by_name) than from the prior (none)?

    python benchmarks/class_init_study.py --coco-root datasets/coco128                 # rebuild a starter, then study
    python benchmarks/class_init_study.py --coco-root datasets/coco128 --class-name dog cat --seeds 0 1 2
    python benchmarks/class_init_study.py --coco-root datasets/coco128 --starter out/starter_without_held_out.pth
    python benchmarks/class_init_study.py --train-ann photos/annots --class-name dog --starter weights/lite0_coco_starter.pth

The shipped starter learned all of coco128, so fine-tuning it on coco128 images would measure its memory. The study
leaves a fixed part of coco128 out instead: --held-out-fraction of its training images, chosen by a salted hash of
each file name (independent of the fine-tuning's own val split), and rebuilds a starter on the rest with the starter
recipe (config_transfer_learning.json's "starter" section, as tools/make_starter.py; --starter reuses one). Each
seed then fine-tunes the held-out images twice, --class-init none and by_name, everything else equal:
finetune_single_class.main with the "finetuning" defaults, --epochs, and --val-fraction of the held-out images
validating. --class-name defaults to the --num-classes classes with the most held-out boxes among those the starter
knows. With --train-ann (photos the starter never saw) the data are yours and --starter is required.

Writes to --out: curves.csv (arm, seed, epoch, mAP50, mAP and AP50 per class), class_init_study.md (settings, mean
and per-seed mAP50 at epochs 1, 2, 5 and the last, per-class AP50 at the last, the verdict) and runs/ (one folder per
arm and seed; the same command again reuses the finished runs and resumes an interrupted one).
"""
import argparse
import csv
import hashlib
import logging
import math
import os
import shlex
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config as cfg  # noqa: E402
import finetune_single_class  # noqa: E402
import pretrain_multi_class  # noqa: E402
import runs  # noqa: E402
from checkpoints import load_checkpoint_file, match_class_names  # noqa: E402
from dataset_coco import coco_layout_paths  # noqa: E402

logger = logging.getLogger("class_init_study")

ARMS = ("none", "by_name")  # --class-init of each arm
REPORT_EPOCHS = (1, 2, 5)  # and the last
SALT = "class_init_study"  # the held-out part is chosen apart from hash_split's val part of it


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", help="coco128 (COCO 2017's layout): part held out of a rebuilt starter")
    parser.add_argument("--held-out-fraction", type=float, default=0.3, help="coco128 images left out of the starter")
    parser.add_argument("--train-ann", help="instead of --coco-root: your own annotations (any format), which the "
                                            "--starter never saw")
    parser.add_argument("--train-root", help="with --train-ann: its images folder (COCO JSON)")
    parser.add_argument("--starter", help="a starter that never saw the fine-tuning images (default with "
                                          "--coco-root: rebuild one without the held-out part)")
    parser.add_argument("--starter-epochs", type=int, help="epochs of the rebuilt starter (default: the recipe's)")
    parser.add_argument("--model-size", help="size of the rebuilt starter (default: the recipe's, lite0)")
    parser.add_argument("--class-name", nargs="+", help="classes to fine-tune (default: --num-classes of the "
                                                        "starter's classes with the most held-out boxes)")
    parser.add_argument("--num-classes", type=int, default=2, help="classes chosen when --class-name is not given")
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs, the same for both arms")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--val-fraction", type=float, default=0.3, help="held-out images that validate")
    parser.add_argument("--img-size", type=int, help="input side (default: the recipe's and finetuning's)")
    parser.add_argument("--batch-size", type=int, help="fine-tuning batch (default: finetuning's)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: per CPU count)")
    parser.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "class_init_study"),
                        help="where curves.csv, class_init_study.md, the data split and runs/ go")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return parser


def check_args(args):
    """Bad input as one line, before anything trains."""
    if bool(args.coco_root) == bool(args.train_ann):
        raise cfg.ConfigError("pass --coco-root (coco128, part held out of a rebuilt starter) or --train-ann with "
                              "--starter (your own photos), not both")
    if args.train_ann and not args.starter:
        raise cfg.ConfigError("--train-ann needs --starter: a starter that never saw these images")
    if not 0 < args.held_out_fraction < 1 or not 0 < args.val_fraction < 1:
        raise cfg.ConfigError("--held-out-fraction and --val-fraction must be in (0, 1)")
    if args.epochs < 1 or len(set(args.seeds)) != len(args.seeds):
        raise cfg.ConfigError(f"--epochs must be >= 1 and --seeds distinct, got {args.epochs} and {args.seeds}")
    if args.starter and not os.path.isfile(args.starter):
        raise cfg.ConfigError(f"--starter not found: {args.starter}")


# ---- data and the starter --------------------------------------------------------------------------------------
def is_held_out(file_name, fraction):
    """Whether an image is left out of the study's starter: a salted hash of its name, as a number in [0, 1)."""
    digest = hashlib.sha1(f"{SALT}:{file_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def split_coco(coco_root, fraction, folder):
    """Write folder/starter_part.json and folder/held_out.json, the two parts of COCO layout's training images.

    Returns:
        (starter part path, held-out path, their images folder).
    """
    paths = coco_layout_paths(coco_root)
    data = cfg.load_json(paths["train_ann"], "annotations")
    parts = {}
    for name, keep in (("starter_part", False), ("held_out", True)):
        images = [image for image in data["images"] if is_held_out(image["file_name"], fraction) == keep]
        ids = {image["id"] for image in images}
        part = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
        parts[name] = os.path.join(folder, f"{name}.json")
        cfg.write_json_atomic(part, parts[name], indent=None)
        logger.info("%s: %d images, %d boxes", parts[name], len(images), len(part["annotations"]))
    return parts["starter_part"], parts["held_out"], paths["train_images"]


def starter_recipe(args):
    """config_transfer_learning.json's "starter" section with the flags' overrides."""
    recipe = {k: v for k, v in cfg.load_json(cfg.DEFAULT_CONFIG_PATH)["starter"].items() if not k.startswith("_")}
    overrides = {"epochs": args.starter_epochs, "model_size": args.model_size, "img_size": args.img_size}
    recipe.update({key: value for key, value in overrides.items() if value is not None})
    if recipe["model_size"] != "lite0" and recipe["init"] == "imagenet":
        recipe["init"] = "random"  # only lite0 has ImageNet weights (a small starter is for trying the study out)
    return recipe


def build_starter(args, starter_part, image_root, folder):
    """A starter that never saw the held-out images: the recipe on the starter part, validated on it as the shipped
    starter was on coco128; reused when its run finished."""
    done = os.path.join(folder, "starter.json")
    recipe = starter_recipe(args)
    if os.path.isfile(done) and cfg.load_json(done)["recipe"] == recipe:
        return cfg.load_json(done)["checkpoint"]
    settings = {**recipe, "train_ann": starter_part, "train_root": image_root, "val_ann": starter_part,
                "val_root": image_root, "workers": args.workers, "device": args.device, "output_dir": folder,
                "progress": args.progress, "plots": False}
    summary = pretrain_multi_class.pretrain(**settings)
    checkpoint = summary["best_model"] or summary["last_model"]
    cfg.write_json_atomic({"recipe": recipe, "checkpoint": checkpoint, "class_names": summary["class_names"]}, done)
    return checkpoint


def choose_classes(args, train_ann, starter_names):
    """--class-name, else the --num-classes classes of `train_ann` (COCO JSON) the starter knows, most boxes first."""
    if args.class_name:
        return args.class_name
    data = cfg.load_json(train_ann, "annotations")
    counts = {c["id"]: 0 for c in data["categories"]}
    for ann in data["annotations"]:
        counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: (-counts[c["id"]], c["id"]))
             if counts[c["id"]] and match_class_names([c["name"]], starter_names)]
    if not names:
        raise cfg.ConfigError(f"no class of {train_ann} with boxes is one of the starter's; pass --class-name")
    return names[:args.num_classes]


# ---- runs -----------------------------------------------------------------------------------------------------
def run_arm(arm, seed, args, data, folder):
    """One fine-tuning (--class-init `arm`, `seed`), or its finished run, or the rest of an interrupted one;
    returns its run folder."""
    run_dir = os.path.join(folder, f"{arm}_seed_{seed}")
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary_path) and cfg.load_json(summary_path).get("last_epoch") == args.epochs:
        logger.info("reusing the finished run %s", run_dir)
        return run_dir
    if os.path.isfile(os.path.join(run_dir, runs.LAYOUT["last"])):
        finetune_single_class.main(["--resume", run_dir, *runtime_flags(args)])
        return run_dir
    argv = ["--train-ann", data["train_ann"], "--class-name", *data["class_names"], "--init", data["starter"],
            "--class-init", arm, "--seed", str(seed), "--epochs", str(args.epochs), "--eval-interval", "1",
            "--val-fraction", str(args.val_fraction), "--output-dir", folder, "--name", os.path.basename(run_dir),
            "--no-plots"]
    argv += ["--train-root", data["train_root"]] if data["train_root"] else []
    argv += ["--img-size", str(args.img_size)] if args.img_size else []
    argv += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    finetune_single_class.main(argv + runtime_flags(args))
    return run_dir


def runtime_flags(args):
    flags = ["--workers", str(args.workers)] if args.workers is not None else []
    flags += ["--device", args.device] if args.device else []
    return flags + ([] if args.progress else ["--no-progress"])


def read_curve(run_dir, class_names):
    """{"mAP50", "mAP", "AP50 <class>"...: per-epoch lists} of a run's metrics.csv (one class: AP50 is mAP50)."""
    rows = runs.MetricsLog(run_dir).rows
    curve = {key: [float(row[key]) for row in rows] for key in ("mAP50", "mAP")}
    for name in class_names:
        column = f"AP50_{name}" if len(class_names) > 1 else "mAP50"
        curve[f"AP50 {name}"] = [float(row[column]) if row.get(column) not in ("", None) else float("nan")
                                 for row in rows]
    return curve


# ---- outputs ----------------------------------------------------------------------------------------------------
def write_curves(curves, path):
    keys = list(next(iter(curves.values())))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "seed", "epoch", *keys])
        for (arm, seed), curve in curves.items():
            for index in range(len(curve["mAP50"])):
                writer.writerow([arm, seed, index + 1, *(f"{curve[key][index]:.4f}" for key in keys)])


def report_epochs(epochs):
    return sorted({epoch for epoch in REPORT_EPOCHS if epoch < epochs} | {epochs})


def mean_std(values):
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def verdict(curves, seeds, epochs):
    """Whether the copy helps, from the numbers alone: by_name ahead of none in mean mAP50 and in every seed, at the
    first epoch and at the last."""
    lines, helps = [], True
    for epoch in sorted({1, epochs}):
        gains = [curves[("by_name", s)]["mAP50"][epoch - 1] - curves[("none", s)]["mAP50"][epoch - 1] for s in seeds]
        means = {arm: statistics.fmean(curves[(arm, s)]["mAP50"][epoch - 1] for s in seeds) for arm in ARMS}
        ahead = sum(gain > 0 for gain in gains)
        helps &= statistics.fmean(gains) > 0 and ahead == len(seeds)
        lines.append(f"- epoch {epoch}: by_name {means['by_name']:.3f} vs none {means['none']:.3f} "
                     f"({statistics.fmean(gains):+.3f}); by_name ahead in {ahead}/{len(seeds)} seeds.")
    lines.append(f"- **The copy {'helps' if helps else 'does not clearly help'}** here (by_name ahead in the mean and "
                 f"in every seed at the first and the last epoch: {'yes' if helps else 'no'}).")
    return lines


def write_report(curves, args, data, path, command):
    seeds, epochs = args.seeds, args.epochs
    shown = report_epochs(epochs)
    lines = ["# Class-aware head init: the starter's class outputs copied by name, or not", "",
             f"Command: `{command}`", "",
             f"- data: {data['source']}; classes {', '.join(data['class_names'])}; starter {data['starter']}",
             f"- fine-tuning: finetune_single_class.py defaults, {epochs} epochs, seeds {' '.join(map(str, seeds))}, "
             f"--val-fraction {args.val_fraction} of the images validating", "",
             "## Val mAP50 (mean ± std over seeds)", "",
             "| arm | " + " | ".join(f"epoch {e}" for e in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for arm in ARMS:
        cells = [mean_std([curves[(arm, seed)]["mAP50"][e - 1] for seed in seeds]) for e in shown]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Per seed (mAP50)", "", "| arm | seed | " + " | ".join(f"epoch {e}" for e in shown) + " |",
              "|---|---|" + "---|" * len(shown)]
    for (arm, seed), curve in curves.items():
        lines.append(f"| {arm} | {seed} | " + " | ".join(f"{curve['mAP50'][e - 1]:.3f}" for e in shown) + " |")
    lines += ["", f"## AP50 per class at epoch {epochs} (mean over seeds)", "",
              "| arm | " + " | ".join(data["class_names"]) + " |", "|---|" + "---|" * len(data["class_names"])]
    for arm in ARMS:
        means = [statistics.fmean(curves[(arm, s)][f'AP50 {name}'][-1] for s in seeds) for name in data["class_names"]]
        cells = ["n/a (no val box)" if math.isnan(mean) else f"{mean:.3f}" for mean in means]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdict", "", *verdict(curves, seeds, epochs), "",
              "These numbers are for this data, model and schedule; they say nothing of other data."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def study_data(args, folder):
    """The fine-tuning data and starter: coco128's held-out part and a starter rebuilt without it, or yours."""
    if args.train_ann:
        starter = args.starter
        train_ann, train_root, source = args.train_ann, args.train_root, f"{args.train_ann} (yours)"
    else:
        starter_part, train_ann, train_root = split_coco(args.coco_root, args.held_out_fraction, folder)
        starter = args.starter or build_starter(args, starter_part, train_root, os.path.join(folder, "starter"))
        source = (f"{os.path.basename(os.path.normpath(args.coco_root))}'s {args.held_out_fraction:g} held out of "
                  f"the starter (salted hash of the file names)")
    starter_names = load_checkpoint_file(starter, "starter").get("class_names") or []
    class_names = choose_classes(args, train_ann, starter_names)
    copied = match_class_names(class_names, starter_names)
    if not copied:
        raise cfg.ConfigError(f"none of {class_names} is a class of the starter ({', '.join(starter_names)}): "
                              f"by_name would copy nothing")
    return {"train_ann": train_ann, "train_root": train_root, "starter": starter, "class_names": class_names,
            "source": source}


def main(argv=None):
    """Run both arms for every seed; write curves.csv and class_init_study.md. Returns {(arm, seed): curve}."""
    cfg.script_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    check_args(args)
    os.makedirs(args.out, exist_ok=True)
    data = study_data(args, args.out)
    logger.info("classes %s from %s, starter %s", data["class_names"], data["source"], data["starter"])
    curves = {}
    for seed in args.seeds:
        for arm in ARMS:
            run_dir = run_arm(arm, seed, args, data, os.path.join(args.out, "runs"))
            curves[(arm, seed)] = read_curve(run_dir, data["class_names"])
    write_curves(curves, os.path.join(args.out, "curves.csv"))
    report = os.path.join(args.out, "class_init_study.md")
    write_report(curves, args, data, report, "python benchmarks/class_init_study.py " + shlex.join(argv))
    logger.info("wrote %s and curves.csv", report)
    return curves


if __name__ == "__main__":
    cfg.run_cli(main, None, bad_input=(cfg.ConfigError, FileNotFoundError, ValueError))
