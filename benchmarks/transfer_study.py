"""Measure what transfer learning buys on a one-class data set, instead of repeating what was promised.

    python benchmarks/transfer_study.py                  # synthetic whiteline, nano, 12 epochs, seeds 0 1 2
    python benchmarks/transfer_study.py --arms scratch three_stage naive heads_only --epochs 20 --workers 2
    python benchmarks/transfer_study.py --pretrained pretrain_results/multi_class_<stamp>/best_model.pth \\
        --class-name whiteline --train-root datasets/inaoka/train/JPEGImages \\
        --train-ann datasets/inaoka/train/annotations.json --val-root datasets/inaoka/val \\
        --val-ann datasets/inaoka/val/annotations.json

The seed promised "2-3x faster convergence" and "10-20% higher mAP on small data sets" from transfer
learning, and a three-stage recipe (issue #8). Every arm fine-tunes the same data for the same total
epochs (--epochs) with the same seed:

  scratch              random init; one stage, everything unfrozen, at the *pretraining* rates (backbone_lr,
                       fpn_lr, head_lr of config_transfer_learning.json "pretraining"): a random backbone at
                       stage 3's 1e-5 would barely move, and a strawman baseline flatters transfer;
  three_stage          pretrained; the recipe: stages 1/2/3 in the config's proportions (10:10:20) of --epochs;
  naive                pretrained; one stage, everything unfrozen, at the stage-3 rates;
  heads_only           pretrained; stage 1 (heads on a frozen backbone and FPN) for all epochs;
  lite0_imagenet       EfficientNet-Lite0 from the ImageNet weights the pip package ships; three stages;
  lite0_imagenet_coco  lite0 pretrained ImageNet -> multi-class scenes; three stages.

"Pretrained" means the full checkpoint of a multi-class pretraining (backbone, FPN and head, all but the
class output, as demo.py uses it): --pretrained / --pretrained-lite0, or else a pretraining run here on the
synthetic multi-class scenes (seed 0, shared by every seed). Rates come from config_transfer_learning.json
"finetuning", with a --config file's keys over them. Every run is finetune_single_class.main(argv) with its
arm's --config written next to it, so the study also checks the real interfaces end to end. --seeds change
the fine-tuning (new layers' init, data order, augmentation); the data set stays the same.

Writes to --out: curves.csv (arm, seed, epoch, stage, mAP50, mAP, epoch_time), transfer_study.png (mean curve
per arm with the min-max band over seeds, three-stage boundaries dashed) and transfer_study.md (settings,
the table, per-seed numbers, which claims hold). Runs live in --out/runs; the same command again reuses
every finished run and the pretraining, so an interrupted study goes on where it stopped.
"""
import argparse
import csv
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config as cfg  # noqa: E402
import finetune_single_class  # noqa: E402
from finetune_single_class import split_epochs  # noqa: E402
import pretrain_multi_class  # noqa: E402
import runs  # noqa: E402
from checkpoints import init_model_size  # noqa: E402
from model_lightweight import MODEL_SIZES, has_imagenet_weights  # noqa: E402
from synthetic_data import SCENE_CLASSES, make_dataset  # noqa: E402

logger = logging.getLogger("transfer_study")

ARMS = ("scratch", "three_stage", "three_stage_seed", "naive", "heads_only", "lite0_imagenet", "lite0_imagenet_coco")
PRETRAINED_ARMS = ("three_stage", "three_stage_seed", "naive", "heads_only")  # start from --pretrained or --starts
THREE_STAGE_ARMS = ("three_stage", "three_stage_seed", "lite0_imagenet", "lite0_imagenet_coco")
SEED_DEFAULTS = os.path.join(ROOT, "benchmarks", "configs", "seed_finetuning.json")  # the three_stage_seed recipe
SIZES = tuple(size for size in MODEL_SIZES if not has_imagenet_weights(size))  # lite0 has arms of its own
DATA_KEYS = ("train_root", "train_ann", "val_root", "val_ann")
# finetune_single_class keys that the study sets for every arm; a --config file may not set them
STUDY_KEYS = DATA_KEYS + ("class_name", "model_size", "img_size", "batch_size", "seed", "workers", "device",
                          "output_dir", "resume", "config", "progress", "init", "epochs")
RUN_CONFIG = "study_config.json"  # the --config of the run in the same folder
DONE = "done.json"  # written when a run finishes: its argv, config and result, for reuse
CLAIM_SPEEDUP = 2.0  # "2-3x faster convergence"
CLAIM_GAIN_PCT = 10.0  # "10-20% higher mAP"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (default: all)")
    parser.add_argument("--epochs", type=int, default=12, help="total fine-tuning epochs, the same for every arm")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES),
                        help="size of scratch and the pretrained arms (default: --pretrained's, else nano)")
    parser.add_argument("--pretrained", help="multi-class pretraining checkpoint of that size (best_model.pth; "
                                             "default: pretrain one here on the synthetic scenes)")
    parser.add_argument("--pretrained-lite0", help="lite0 pretraining checkpoint (best.pth or best_backbone.pth) "
                                                   "for lite0_imagenet_coco (default: pretrain one here)")
    parser.add_argument("--starts", nargs="+", metavar="NAME=SPEC", default=[],
                        help="run every pretrained arm once per start, as ARM@NAME; SPEC is 'imagenet' (lite0's "
                             "ImageNet backbone), 'starter' (the lite0 starter detector) or a checkpoint / backbone "
                             "file; scratch takes their model size")
    parser.add_argument("--skip", nargs="+", default=[], metavar="ARM@NAME",
                        help="arms of the --arms x --starts matrix to leave out (the report lists them)")
    parser.add_argument("--pretrain-epochs", type=int, default=8, help="epochs of the study's own pretraining")
    parser.add_argument("--pretrain-num-train", type=int, default=600, help="synthetic scenes it trains on")
    parser.add_argument("--pretrain-num-val", type=int, default=100, help="synthetic scenes it is scored on")
    parser.add_argument("--config", help="JSON (sections or flat keys) over config_transfer_learning.json: the "
                                         "fine-tuning rates, the stage proportions, optimisation settings")
    parser.add_argument("--data", default="datasets", help="where the synthetic data sets are written or found")
    parser.add_argument("--num-train", type=int, default=150, help="synthetic whiteline training images")
    parser.add_argument("--num-val", type=int, default=60, help="synthetic whiteline validation images")
    parser.add_argument("--class-name", help="with your own data: the category to detect")
    parser.add_argument("--train-root", help="your own data: training images folder")
    parser.add_argument("--train-ann", help="your own data: training COCO annotation JSON")
    parser.add_argument("--val-root", help="your own data: validation images folder")
    parser.add_argument("--val-ann", help="your own data: validation COCO annotation JSON")
    parser.add_argument("--img-size", type=int, default=256, help="square input side, a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tuning (and own pretraining) batch")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: per CPU count)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "transfer_study"),
                        help="where curves.csv, transfer_study.png, transfer_study.md and runs/ go")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return parser


# ---------------------------------------------------------------------------------------------- the metrics

def first_epoch_reaching(values, target):
    """First epoch (1-based) whose value is >= target, or None."""
    return next((epoch for epoch, value in enumerate(values, start=1) if value >= target), None)


def best_value(values):
    """The largest finite value (0.0 if none): a NaN epoch (nothing to score) must not win or poison max()."""
    return max((v for v in values if math.isfinite(v)), default=0.0)


def convergence_speedup(scratch_map50, arm_map50):
    """Epochs scratch needs to reach its best mAP50, divided by the epochs the arm needs to reach that value.

    Args:
        scratch_map50, arm_map50: val mAP50 per epoch, epoch 1 first, same seed.
    Returns:
        the speed-up (> 1: the arm is faster), or None when the arm never reaches scratch's best, or when
        scratch never scores above 0 (then there is no target to reach).
    """
    target = best_value(scratch_map50)
    arm_epochs = first_epoch_reaching(arm_map50, target)
    if target <= 0 or arm_epochs is None:
        return None
    return first_epoch_reaching(scratch_map50, target) / arm_epochs


def relative_gain_pct(value, baseline):
    """How much higher `value` is than `baseline`, in percent of it; None when the baseline is 0."""
    return 100.0 * (value - baseline) / baseline if baseline > 0 else None


def spread(values):
    """mean, std (sample; 0 for one value), min, max and count of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values), "n": len(values)}


def seed_scores(arm_curve, scratch_curve):
    """One arm's numbers in one seed; gains and speed-up are against scratch's run with the same seed.

    Args:
        arm_curve, scratch_curve: {"mAP50": [...], "mAP": [...], "epoch_time": [...]} per epoch, or
            scratch_curve None (scratch not run: no gains, no speed-up).
    """
    scores = {"final_mAP50": arm_curve["mAP50"][-1], "best_mAP50": best_value(arm_curve["mAP50"]),
              "final_mAP": arm_curve["mAP"][-1], "best_mAP": best_value(arm_curve["mAP"]),
              "time": sum(arm_curve.get("epoch_time", [])), "gain_mAP50": None, "gain_mAP50_pct": None,
              "gain_mAP_pct": None, "speedup": None, "scratch_best_mAP50": None}
    if scratch_curve is not None:
        scores.update(gain_mAP50=scores["final_mAP50"] - scratch_curve["mAP50"][-1],
                      gain_mAP50_pct=relative_gain_pct(scores["final_mAP50"], scratch_curve["mAP50"][-1]),
                      gain_mAP_pct=relative_gain_pct(scores["final_mAP"], scratch_curve["mAP"][-1]),
                      speedup=convergence_speedup(scratch_curve["mAP50"], arm_curve["mAP50"]),
                      scratch_best_mAP50=best_value(scratch_curve["mAP50"]))
    return scores


def summarise(curves, arms, seeds):
    """Per arm: its per-seed scores and their spread over seeds.

    Args:
        curves: {(arm, seed): {"mAP50": [...], "mAP": [...], "epoch_time": [...]}}.
    Returns:
        {arm: {"per_seed": {seed: seed_scores}, <score name>: spread, "reached": seeds whose speed-up is
        defined, "seeds": number of seeds}}.
    """
    summary = {}
    for arm in arms:
        per_seed = {seed: seed_scores(curves[(arm, seed)], curves.get(("scratch", seed))) for seed in seeds}
        names = next(iter(per_seed.values())).keys()
        summary[arm] = {name: spread([scores[name] for scores in per_seed.values()]) for name in names}
        summary[arm].update(per_seed=per_seed, reached=summary[arm]["speedup"]["n"], seeds=len(seeds))
    return summary


# ---------------------------------------------------------------------------------------------- the claims

def _join(items):
    return ", ".join(items) if items else "none"


def speedup_claim(summary, others):
    """'2-3x faster convergence': holds for an arm that reaches scratch's best in every seed, >= 2x on average."""
    holds, fails = [], []
    for arm in others:
        s = summary[arm]
        reached = f"{s['reached']}/{s['seeds']} seeds"
        if s["reached"] == 0:
            fails.append(f"{arm} (never reaches scratch's best mAP50)")
        elif s["reached"] == s["seeds"] and s["speedup"]["mean"] >= CLAIM_SPEEDUP:
            holds.append(f"{arm} ({s['speedup']['mean']:.1f}x, min {s['speedup']['min']:.1f}x, {reached})")
        else:
            fails.append(f"{arm} ({s['speedup']['mean']:.1f}x where reached, {reached})")
    return (f"- **\"2-3x faster convergence\"** (speed-up >= {CLAIM_SPEEDUP:g}x on average, scratch's best mAP50 "
            f"reached in every seed): holds for {_join(holds)}; does not hold for {_join(fails)}.")


def gain_claim(summary, others, metric):
    """'10-20% higher mAP': holds for an arm whose final `metric` is >= 10% above scratch's on average."""
    key = f"gain_{metric}_pct"
    holds, fails = [], []
    for arm in others:
        gain = summary[arm][key]
        if gain["n"] == 0:
            fails.append(f"{arm} (scratch scored 0: undefined)")
            continue
        span = f", {gain['min']:+.0f}% to {gain['max']:+.0f}%" if gain["n"] > 1 else ""
        text = f"{arm} ({gain['mean']:+.0f}%{span})"
        (holds if gain["mean"] >= CLAIM_GAIN_PCT else fails).append(text)
    return f"  - in final {metric}: holds for {_join(holds)}; does not hold for {_join(fails)}."


def recipe_claim(summary, rival, arm="three_stage"):
    """Whether `arm` (three_stage) ends above `rival` in final mAP50 (mean over seeds), and in how many seeds."""
    ours, theirs = summary[arm], summary[rival]
    wins = sum(ours["per_seed"][seed]["final_mAP50"] > theirs["per_seed"][seed]["final_mAP50"]
               for seed in ours["per_seed"])
    verdict = "beats" if ours["final_mAP50"]["mean"] > theirs["final_mAP50"]["mean"] else "does not beat"
    return (f"  - {arm} {verdict} {rival}: final mAP50 {ours['final_mAP50']['mean']:.3f} vs "
            f"{theirs['final_mAP50']['mean']:.3f} (ahead in {wins}/{ours['seeds']} seeds), best mAP50 "
            f"{ours['best_mAP50']['mean']:.3f} vs {theirs['best_mAP50']['mean']:.3f}.")


def claim_lines(summary):
    """The seed's claims, each stated as holding or not for every arm, from the numbers alone."""
    lines = ["## The claims", ""]
    others = [arm for arm in summary if arm != "scratch"]
    if "scratch" in summary and others:
        lines += [speedup_claim(summary, others),
                  f"- **\"10-20% higher mAP\"** (final score >= {CLAIM_GAIN_PCT:g}% above scratch's, mean over "
                  f"seeds; range in brackets):", gain_claim(summary, others, "mAP"),
                  gain_claim(summary, others, "mAP50")]
        if any(s["per_seed"][seed]["scratch_best_mAP50"] == 0 for s in summary.values() for seed in s["per_seed"]):
            lines.append("- In some seed scratch never scored above 0 mAP50, so its speed-ups are undefined there.")
    else:
        lines.append("- Speed-up and gain are measured against scratch: run it with the other arms to check them.")
    recipe_lines = []
    for arm in (arm for arm in summary if recipe_of(arm) == "three_stage"):
        rivals = [with_start(rival, start_of(arm)) for rival in ("three_stage_seed", "naive", "heads_only")]
        recipe_lines += [recipe_claim(summary, rival, arm) for rival in rivals if rival in summary]
    if recipe_lines:
        lines += ["- **The three-stage recipe** (the defaults of config_transfer_learning.json) against the seed's "
                  "defaults and one stage:"] + recipe_lines
    seeds = next(iter(summary.values()))["seeds"]
    lines += ["", f"These verdicts are for this data set, model size and schedule, over {seeds} seed(s); they say "
              "nothing of other data."]
    return lines


# ---------------------------------------------------------------------------------------------- configuration

def check_args(args):
    """Bad input as one line, before anything trains."""
    if len(set(args.seeds)) != len(args.seeds):
        raise cfg.ConfigError(f"--seeds has repeats: {args.seeds}")
    if len(set(args.arms)) != len(args.arms):
        raise cfg.ConfigError(f"--arms has repeats: {args.arms}")
    for name in ("epochs", "pretrain_epochs", "num_train", "num_val"):
        if getattr(args, name) < 1:
            raise cfg.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("pretrained", "pretrained_lite0"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise cfg.ConfigError(f"--{name.replace('_', '-')} not found: {path}")


def load_schedule_config(path):
    """config_transfer_learning.json's settings, with a --config file's over them.

    Returns:
        (fine-tuning settings, the pretraining rates scratch trains at, the file's fine-tuning keys, which
        every arm's config repeats).
    """
    defaults = cfg.load_json(cfg.DEFAULT_CONFIG_PATH)
    finetune = cfg.script_defaults("finetuning")
    pretrain = cfg.config_sections(defaults, "pretraining")
    overrides = {}
    if path:
        data = cfg.load_json(path)
        overrides = cfg.renamed(cfg.config_sections(data, "finetuning"), path)
        cfg.check_types(overrides, finetune, path)
        taken = sorted(set(overrides) & set(STUDY_KEYS))
        if taken:
            raise cfg.ConfigError(f"{path} sets {taken[0]!r}, which the study sets for every arm from its own "
                                     f"flags; remove it from the file")
        if "pretraining" in data:
            own = cfg.renamed(cfg.config_sections(data, "pretraining"), path)
            cfg.check_types(own, cfg.script_defaults("pretraining"), path)
            pretrain.update(own)
        finetune.update(overrides)
    rates = {name: pretrain[name] for name in ("backbone_lr", "fpn_lr", "head_lr")}
    return finetune, rates, overrides


def recipe_of(arm):
    """'three_stage@imagenet' -> 'three_stage': the recipe part of an arm."""
    return arm.split("@", 1)[0]


def start_of(arm):
    """'three_stage@imagenet' -> 'imagenet'; None for an arm without a --starts name."""
    return arm.split("@", 1)[1] if "@" in arm else None


def with_start(recipe, start):
    return f"{recipe}@{start}" if start else recipe


def expand_arms(arms, starts):
    """With --starts, every pretrained recipe runs once per start ('naive@imagenet', 'naive@coco', ...)."""
    if not starts:
        return list(arms)
    return [with_start(arm, start) for arm in arms for start in (starts if arm in PRETRAINED_ARMS else [None])]


def seed_schedule(finetune):
    """`finetune` with the seed's defaults (SEED_DEFAULTS) over it: the three_stage_seed recipe."""
    values = cfg.config_sections(cfg.load_json(SEED_DEFAULTS, "seed defaults"), "finetuning")
    return {**finetune, **values}


def arm_schedule(arm, total_epochs, finetune, pretrain_rates):
    """One arm's stage epochs and learning rates, as flat finetune_single_class config keys."""
    arm = recipe_of(arm)
    seed_values = {}
    if arm == "three_stage_seed":
        finetune = seed_schedule(finetune)
        seed_values = {key: finetune[key] for key in cfg.load_json(SEED_DEFAULTS) if not key.startswith("_")}
    rates = {key: value for key, value in finetune.items() if key.startswith("stage") and key.endswith("_lr")}
    if arm in THREE_STAGE_ARMS:
        epochs = split_epochs(total_epochs, [finetune[f"stage{i}_epochs"] for i in (1, 2, 3)])
    elif arm == "heads_only":
        epochs = (total_epochs, 0, 0)
    else:  # scratch and naive: everything trains from the first epoch
        epochs = (0, 0, total_epochs)
    if arm == "scratch":
        rates.update(stage3_backbone_lr=pretrain_rates["backbone_lr"], stage3_fpn_lr=pretrain_rates["fpn_lr"],
                     stage3_head_lr=pretrain_rates["head_lr"])
    return {**seed_values, **{f"stage{i}_epochs": e for i, e in enumerate(epochs, start=1)}, **rates}


def start_flags(spec):
    """finetune_single_class flags of a --starts entry: a named start (imagenet, starter) or a file."""
    return ["--model-size", start_model_size(spec), "--init", spec]


def start_model_size(spec):
    return "lite0" if spec == "imagenet" else init_model_size(spec)


def arm_init_flags(arm, weights):
    """How an arm's weights start, as finetune_single_class flags."""
    model_size, pretrained, pretrained_lite0 = weights["model_size"], weights["pretrained"], weights["pretrained_lite0"]
    if start_of(arm):
        return start_flags(weights["starts"][start_of(arm)])
    if arm == "scratch":
        return ["--model-size", model_size, "--init", "random"]
    if arm == "lite0_imagenet":  # no weights file: lite0 starts from the package's ImageNet weights
        return start_flags("imagenet")
    if arm == "lite0_imagenet_coco":
        return ["--model-size", "lite0", "--init", pretrained_lite0]
    return ["--model-size", model_size, "--init", pretrained]


def runtime_flags(args):
    """Flags of this machine and invocation, the same for every run."""
    flags = ["--workers", str(args.workers)] if args.workers is not None else []
    flags += ["--device", args.device] if args.device else []
    return flags + ([] if args.progress else ["--no-progress"])


def arm_argv(arm, seed, args, data, weights, folder):
    """finetune_single_class's argv for one arm and seed; its --config is folder/RUN_CONFIG."""
    data_flags = [flag for key in DATA_KEYS for flag in (f"--{key.replace('_', '-')}", data[key])]
    data_flags += ["--class-name", data["class_name"]] if data["class_name"] else []
    init = arm_init_flags(arm, weights)
    return (data_flags + init + ["--config", os.path.join(folder, RUN_CONFIG), "--output-dir", folder,
                                 "--seed", str(seed), "--img-size", str(args.img_size),
                                 "--batch-size", str(args.batch_size)] + runtime_flags(args))


def parse_starts(args):
    """--starts NAME=SPEC ... -> {name: spec}, each checked; all of one model size."""
    starts = {}
    for entry in args.starts:
        name, _, spec = entry.partition("=")
        if not name or not spec or "@" in name or name in starts:
            raise cfg.ConfigError(f"--starts takes distinct NAME=SPEC entries (SPEC: imagenet or a file), got "
                                     f"{entry!r}")
        if spec not in ("imagenet", "starter") and not os.path.isfile(spec):
            raise cfg.ConfigError(f"--starts {name}: {spec} is neither 'imagenet', 'starter' nor a file")
        starts[name] = spec
    sizes = {start_model_size(spec) for spec in starts.values()}
    if len(sizes) > 1:
        raise cfg.ConfigError(f"--starts mixes model sizes ({', '.join(sorted(map(str, sizes)))}); one size per "
                                 f"study, so that scratch compares with every start")
    return starts, next(iter(sizes), None)


def resolve_model_size(args):
    """The size of scratch and the pretrained arms: --model-size, else --starts', else --pretrained's, else nano."""
    if args.starts:
        size = parse_starts(args)[1]
        if args.model_size and args.model_size != size:
            raise cfg.ConfigError(f"--starts are {size} weights but --model-size is {args.model_size!r}")
        return size
    source = init_model_size(args.pretrained) if args.pretrained else None
    if args.model_size and source and source != args.model_size:
        raise cfg.ConfigError(f"--pretrained {args.pretrained} holds a {source!r} model but --model-size is "
                                 f"{args.model_size!r}; drop --model-size or pass a {args.model_size} checkpoint")
    size = args.model_size or source or "nano"
    if size not in SIZES:
        raise cfg.ConfigError(f"--pretrained {args.pretrained} holds a {size!r} model; the pretrained arms take "
                                 f"{', '.join(SIZES)} (lite0 checkpoints go to --pretrained-lite0)")
    if args.pretrained_lite0 and init_model_size(args.pretrained_lite0) not in ("lite0", None):
        raise cfg.ConfigError(f"--pretrained-lite0 {args.pretrained_lite0} holds a "
                                 f"{init_model_size(args.pretrained_lite0)!r} model, not lite0")
    return size


# ---------------------------------------------------------------------------------------------- data and runs

def study_data(args):
    """The fine-tuning data: the flags' COCO-format set, or the synthetic whiteline set (written once, reused)."""
    given = {key: getattr(args, key) for key in DATA_KEYS}
    if any(given.values()):
        for key, path in given.items():
            if not path:
                raise cfg.ConfigError(f"--{key.replace('_', '-')} is missing: your own data needs --train-root, "
                                         f"--train-ann, --val-root and --val-ann")
            if not os.path.exists(path):
                raise cfg.ConfigError(f"--{key.replace('_', '-')} does not exist: {path}")
        return {**given, "class_name": args.class_name, "source": "your data"}
    root = os.path.join(args.data, f"whiteline_{args.num_train}_{args.num_val}")
    paths, _ = make_dataset("whiteline", root, args.num_train, args.num_val)
    return {"train_root": paths["train_images"], "train_ann": paths["train_ann"], "val_root": paths["val_images"],
            "val_ann": paths["val_ann"], "class_name": "whiteline", "source": "synthetic whiteline (synthetic_data.py)"}


def run_or_reuse(folder, entry, argv, config, is_complete):
    """entry(argv) with `config` written to folder/RUN_CONFIG, unless folder/DONE records a finished run with the
    same argv and config that `is_complete(result)` accepts; returns that run's result dict."""
    marker = os.path.join(folder, DONE)
    # progress bars do not change a run, so a run without them is reused by a command with them and back
    record = json.loads(json.dumps({"argv": [a for a in argv if a != "--no-progress"], "config": config}))
    if os.path.isfile(marker):
        done = cfg.load_json(marker, "run record")
        if {key: done.get(key) for key in record} == record and is_complete(done["result"]):
            logger.info("reusing the finished run %s", done["result"]["run_dir"])
            return done["result"]
        logger.info("%s holds a run with other settings or unfinished; running again", folder)
    os.makedirs(folder, exist_ok=True)
    cfg.write_json_atomic(config, os.path.join(folder, RUN_CONFIG))
    result = entry(argv)
    cfg.write_json_atomic({**record, "result": result}, marker)
    return result


def pretrain_schedule(model_size, args):
    """The study's own pretraining on the synthetic multi-class scenes: every class, a short warmup and one
    cosine cycle over --pretrain-epochs (config_transfer_learning.json's rates)."""
    return {"classes": len(SCENE_CLASSES), "model_size": model_size, "img_size": args.img_size,
            "epochs": args.pretrain_epochs, "batch_size": args.batch_size, "warmup_iters": 60,
            "T_0": args.pretrain_epochs, "T_mult": 1, "eval_interval": min(2, args.pretrain_epochs),
            "save_interval": args.pretrain_epochs, "seed": 0}


def pretrain_here(model_size, args, runs_dir):
    """The full checkpoint of a pretraining of `model_size` on the synthetic scenes, run once and reused."""
    root = os.path.join(args.data, f"synthetic_coco_{args.pretrain_num_train}_{args.pretrain_num_val}")
    make_dataset("coco", root, args.pretrain_num_train, args.pretrain_num_val)  # COCO 2017's layout under root
    folder = os.path.join(runs_dir, f"pretrain_{model_size}")
    argv = ["--coco-root", root, "--config", os.path.join(folder, RUN_CONFIG), "--output-dir", folder]
    result = run_or_reuse(folder, pretrain_multi_class.main, argv + runtime_flags(args),
                          pretrain_schedule(model_size, args), lambda r: os.path.isfile(r.get("last_model") or ""))
    return result["best_model"] or result["last_model"]


def study_weights(args, runs_dir):
    """Model size and the checkpoints the pretrained arms start from (given, or pretrained here)."""
    size = resolve_model_size(args)
    weights = {"model_size": size, "pretrained": args.pretrained, "pretrained_lite0": args.pretrained_lite0,
               "pretrained_here": [], "starts": parse_starts(args)[0]}
    if not args.pretrained and not args.starts and set(args.arms) & set(PRETRAINED_ARMS):
        weights["pretrained"] = pretrain_here(size, args, runs_dir)
        weights["pretrained_here"].append(size)
    if not args.pretrained_lite0 and "lite0_imagenet_coco" in args.arms:
        weights["pretrained_lite0"] = pretrain_here("lite0", args, runs_dir)
        weights["pretrained_here"].append("lite0")
    return weights


def read_run_curve(run_dir):
    """{"stage", "mAP50", "mAP", "epoch_time": per-epoch lists} of a fine-tuning run's metrics.csv."""
    rows = runs.MetricsLog(run_dir).rows
    curve = {"stage": [int(row["stage"]) for row in rows], "epoch_time": [float(row["epoch_time"]) for row in rows]}
    curve.update({key: [float(row[key]) for row in rows] for key in ("mAP50", "mAP")})
    return curve


def run_arm(arm, seed, args, data, weights, schedule, runs_dir):
    """One arm and seed through finetune_single_class.main (or its finished run); returns (curve, run dir)."""
    folder = os.path.join(runs_dir, arm, f"seed_{seed}")
    logger.info("== %s, seed %d", arm, seed)
    result = run_or_reuse(folder, finetune_single_class.main, arm_argv(arm, seed, args, data, weights, folder),
                          schedule, lambda r: len(read_run_curve(r["run_dir"])["mAP50"]) == args.epochs)
    return read_run_curve(result["run_dir"]), result["run_dir"]


# ---------------------------------------------------------------------------------------------- outputs

def write_curves_csv(curves, path):
    """One row per arm, seed and epoch."""
    fields = ("arm", "seed", "epoch", "stage", "mAP50", "mAP", "epoch_time")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for (arm, seed), curve in curves.items():
            for index, stage in enumerate(curve["stage"]):
                writer.writerow([arm, seed, index + 1, stage, curve["mAP50"][index], curve["mAP"][index],
                                 curve["epoch_time"][index]])


def stage_boundaries(schedule):
    """Epochs after which a three-stage schedule changes stage."""
    epochs = [schedule[f"stage{i}_epochs"] for i in (1, 2, 3)]
    return [sum(epochs[:i + 1]) for i in range(2) if epochs[i] and any(epochs[i + 1:])]


def plot_curves(curves, arms, seeds, boundaries, path):
    """Mean val mAP50 and mAP per epoch for each arm, the min-max band over seeds, stage boundaries dashed."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, metric in zip(axes, ("mAP50", "mAP")):
        for arm in arms:
            per_epoch = list(zip(*(curves[(arm, seed)][metric] for seed in seeds)))
            epochs = range(1, len(per_epoch) + 1)
            (line,) = ax.plot(epochs, [statistics.fmean(v) for v in per_epoch], marker="o", markersize=3, label=arm)
            if len(seeds) > 1:
                ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        for epoch in boundaries:
            ax.axvline(epoch + 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xlabel="epoch", ylabel=f"val {metric}", ylim=(0, 1.02), title=f"{metric}, mean of {len(seeds)} seed(s)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("transfer study (dashed: three-stage boundaries; band: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cell(stat, fmt="{:.3f}", unit=""):
    """'mean ± std' (just the mean for one seed), '-' when there is no value."""
    if stat["n"] == 0:
        return "-"
    text = fmt.format(stat["mean"]) + unit
    return text + f" ± {fmt.format(stat['std']).lstrip('+')}{unit}" if stat["n"] > 1 else text


def _speedup_cell(s):
    if s["reached"] == 0:
        return f"not reached (0/{s['seeds']})"
    return f"{_cell(s['speedup'], '{:.2f}', 'x')} ({s['reached']}/{s['seeds']})"


def table_lines(summary):
    """The per-arm table: mean ± std over seeds."""
    lines = ["| arm | final mAP50 | best mAP50 | final mAP | best mAP | gain mAP50 (abs) | gain mAP50 (rel) | "
             "gain mAP (rel) | speed-up (seeds reached) | time |", "|---" * 10 + "|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {_cell(s['final_mAP50'])} | {_cell(s['best_mAP50'])} | {_cell(s['final_mAP'])} | "
                     f"{_cell(s['best_mAP'])} | {_cell(s['gain_mAP50'], '{:+.3f}')} | "
                     f"{_cell(s['gain_mAP50_pct'], '{:+.1f}', '%')} | {_cell(s['gain_mAP_pct'], '{:+.1f}', '%')} | "
                     f"{_speedup_cell(s)} | {_cell(s['time'], '{:.0f}', ' s')} |")
    return lines


def per_seed_lines(summary):
    """Every arm and seed, so the spread behind each mean is visible."""
    lines = ["| arm | seed | final mAP50 | best mAP50 | final mAP | best mAP | speed-up |", "|---" * 7 + "|"]
    for arm, s in summary.items():
        for seed, scores in s["per_seed"].items():
            speedup = "not reached" if scores["speedup"] is None else f"{scores['speedup']:.2f}x"
            lines.append(f"| {arm} | {seed} | {scores['final_mAP50']:.3f} | {scores['best_mAP50']:.3f} | "
                         f"{scores['final_mAP']:.3f} | {scores['best_mAP']:.3f} | {speedup} |")
    return lines


def _stage_rates(schedule, stage):
    """'backbone, fpn, head' learning rates of one stage ('-' for a frozen group)."""
    return ", ".join(f"{schedule[key]:g}" if key in schedule else "-"
                     for key in (f"stage{stage}_{group}_lr" for group in ("backbone", "fpn", "head")))


def settings_lines(argv, args, data, weights, schedules, elapsed):
    """What was run: the command, the data, the initialisations and every arm's schedule."""
    counts = {split: len(cfg.load_json(data[f"{split}_ann"], "annotation file")["images"])
              for split in ("train", "val")}
    lines = ["# Transfer study", "", f"`python benchmarks/transfer_study.py {shlex.join(argv)}`", "",
             f"- data: {data['source']}, class {data['class_name'] or '(the only one)'}: {counts['train']} train "
             f"images ({data['train_ann']}), {counts['val']} val images ({data['val_ann']})",
             f"- model size {weights['model_size']} (lite0 arms: lite0), {args.img_size} px, batch {args.batch_size}, "
             f"{args.epochs} epoch(s) for every arm, seeds {' '.join(map(str, args.seeds))}; this invocation took "
             f"{elapsed / 60:.1f} min (finished runs are reused; each run's own time is the table's last column)"]
    if weights["pretrained"]:
        lines.append(f"- three_stage, naive and heads_only start from `{weights['pretrained']}`")
    for name, spec in weights["starts"].items():
        lines.append(f"- ARM@{name} starts from {'the ImageNet weights of lite0' if spec == 'imagenet' else spec}")
    if args.skip:
        lines.append(f"- not run: {', '.join(args.skip)}")
    if weights["pretrained_lite0"]:
        lines.append(f"- lite0_imagenet_coco starts from `{weights['pretrained_lite0']}`")
    if weights["pretrained_here"]:
        lines.append(f"- pretrained here ({', '.join(weights['pretrained_here'])}): {args.pretrain_epochs} epoch(s) on "
                     f"{args.pretrain_num_train} synthetic multi-class scenes, seed 0")
    lines += ["", "| arm | stage epochs (1/2/3) | rates of the stages run (backbone, fpn, head) |", "|---|---|---|"]
    for arm, schedule in schedules.items():
        stages = "/".join(str(schedule[f"stage{i}_epochs"]) for i in (1, 2, 3))
        rates = " / ".join(_stage_rates(schedule, i) for i in (1, 2, 3) if schedule[f"stage{i}_epochs"])
        lines.append(f"| {arm} | {stages} | {rates} |")
    return lines


NOTES = [
    "Notes:",
    "- Scores are COCO mAP50 and mAP@[.5:.95] of the EMA weights on the val set after every epoch; *final* is the "
    "last epoch, *best* the highest over epochs (chosen on the same val set, so optimistic for every arm alike).",
    "- Gains compare each arm's final score with scratch's in the same seed (relative: in % of scratch's), then "
    "average over seeds; scratch's own row is the baseline.",
    "- Speed-up, per seed: the first epoch at which scratch reaches its best mAP50, divided by the first epoch at "
    "which the arm reaches that value; 'not reached' when it never does (the count says in how many seeds it did).",
    "- Scratch trains everything from epoch 1 at the pretraining rates (config_transfer_learning.json "
    "\"pretraining\": backbone_lr, fpn_lr, head_lr), not at stage 3's: a random backbone at 1e-5 would hardly "
    "move, and beating such a baseline would prove nothing.",
    "- The lite0 arms are a different architecture; their gains over the (nano/tiny/small) scratch arm mix "
    "architecture and initialisation.",
]


def write_report(path, argv, args, data, weights, schedules, summary, elapsed):
    lines = settings_lines(argv, args, data, weights, schedules, elapsed)
    lines += ["", "## Results", "", "Mean ± std over seeds.", ""] + table_lines(summary)
    lines += ["", "![val mAP50 and mAP per epoch](transfer_study.png)", ""] + claim_lines(summary)
    lines += ["", "## Per seed", ""] + per_seed_lines(summary) + [""] + NOTES
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
    """Run (or reuse) every arm and seed, then write curves.csv, transfer_study.png and transfer_study.md.

    Returns:
        dict: "curves" {(arm, seed): per-epoch lists}, "summary" (see summarise), "run_dirs" {(arm, seed): path},
        "weights" (model size and the pretrained checkpoints used) and "outputs" (the three files).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    started = time.perf_counter()
    check_args(args)
    finetune, pretrain_rates, overrides = load_schedule_config(args.config)
    recipes = {arm: {**overrides, **arm_schedule(arm, args.epochs, finetune, pretrain_rates)} for arm in args.arms}
    data = study_data(args)
    runs_dir = os.path.join(args.out, "runs")
    weights = study_weights(args, runs_dir)
    arms = expand_arms(args.arms, weights["starts"])
    unknown = sorted(set(args.skip) - set(arms))
    if unknown:
        raise cfg.ConfigError(f"--skip {unknown[0]} is not an arm of this study ({', '.join(arms)})")
    arms = [arm for arm in arms if arm not in args.skip]
    schedules = {arm: recipes[recipe_of(arm)] for arm in arms}
    curves, run_dirs = {}, {}
    try:
        for seed in args.seeds:  # seed by seed, so an interrupted study already has whole comparisons
            for arm in arms:
                curves[(arm, seed)], run_dirs[(arm, seed)] = run_arm(arm, seed, args, data, weights,
                                                                     schedules[arm], runs_dir)
    except KeyboardInterrupt as error:
        raise KeyboardInterrupt(f"{error}\nthe study: run the same command again; finished runs are reused") from error
    summary = summarise(curves, arms, args.seeds)
    outputs = {name: os.path.join(args.out, name) for name in ("curves.csv", "transfer_study.png", "transfer_study.md")}
    write_curves_csv(curves, outputs["curves.csv"])
    three_stage = [schedules[arm] for arm in sorted(arms, key=lambda arm: recipe_of(arm) != "three_stage")
                   if recipe_of(arm) in THREE_STAGE_ARMS]  # the default recipe's boundaries first
    plot_curves(curves, arms, args.seeds, stage_boundaries(three_stage[0]) if three_stage else [],
                outputs["transfer_study.png"])
    write_report(outputs["transfer_study.md"], argv, args, data, weights, schedules, summary,
                 time.perf_counter() - started)
    logger.info("transfer study written to %s", ", ".join(outputs.values()))
    return {"curves": curves, "summary": summary, "run_dirs": run_dirs, "weights": weights, "outputs": outputs}


def run():
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    cfg.run_cli(main, None)


if __name__ == "__main__":
    run()
