"""Fine-tune a pretrained detector to one class in three stages: heads, then + FPN, then everything.

    python finetune_single_class.py \\
        --pretrained-backbone pretrain_results/multi_class_*/backbone_weights/best_backbone.pth \\
        --class-name whiteline \\
        --train-root datasets/inaoka/train/JPEGImages --train-ann datasets/inaoka/train/annotations.json \\
        --val-root datasets/inaoka/val --val-ann datasets/inaoka/val/annotations.json --batch-size 16
    python finetune_single_class.py --config custom_config.json
    python finetune_single_class.py --no-pretrained ...        # same schedule from random init (the baseline)
    python finetune_single_class.py --model-size lite0 ...     # EfficientNet-Lite0 from its ImageNet weights
    python finetune_single_class.py --resume finetune_results/whiteline_*/last_model.pth
    torchrun --nproc_per_node=2 finetune_single_class.py --config custom_config.json --amp

Stages and learning rates come from config_transfer_learning.json ("finetuning" and "optimization");
a --config file (sections or the flat format) overrides them and may hold the data paths too; flags
override both. `--pretrained-backbone` initialises weights (a backbone file or any full checkpoint) and
restores nothing else; `--resume` continues an interrupted run exactly (optimizer, schedule, stage, EMA).
Backbone init: --pretrained-backbone PATH (e.g. a lite0 pretraining's best_backbone.pth: ImageNet -> COCO
classes -> one class), or --no-pretrained for random weights; model size lite0 without either starts from
the ImageNet weights (ImageNet -> one class), and its random baseline is --no-pretrained --no-imagenet.
"""
import argparse
import logging
import math
import os
import sys
import time

import torch

import distributed
import engine
from backbone_efficientnet import MissingWeightsPackageError
from dataset_coco import CocoDetectionDataset, build_dataloader, build_transforms, dataset_report
from evaluate import evaluate, format_metrics
from losses import DetectionLoss
from model_lightweight import (DEFAULT_CONF_THRESHOLD, LAYER_GROUPS, create_lightweight_model, has_imagenet_weights,
                               load_checkpoint_file, model_checkpoint, read_backbone_state, save_checkpoint)

logger = logging.getLogger("finetune")

STAGES = (  # (name, pretrained layer groups the stage releases)
    ("heads", ("head",)),
    ("heads+fpn", ("fpn", "head")),
    ("all", ("backbone", "fpn", "head")),
)
DEFAULTS = {
    "config": None, "pretrained_backbone": None, "pretrained_backbone_path": None, "no_pretrained": False,
    "transfer": "auto",
    "class_name": None, "train_root": None, "train_ann": None, "val_root": None, "val_ann": None,
    "model_size": "tiny", "img_size": 320, "batch_size": 16, "workers": None, "augmentation": "moderate",
    "num_classes": 1, "output_dir": "finetune_results", "resume": None, "device": None, "seed": 0, "amp": False,
    "amp_dtype": None, "sync_bn": False, "lr_scaling": "linear", "lr_reference_batch_size": None,
    "stage1_epochs": 10, "stage1_head_lr": 1e-3,
    "stage2_epochs": 10, "stage2_head_lr": 1e-3, "stage2_fpn_lr": 1e-4,
    "stage3_epochs": 20, "stage3_head_lr": 5e-4, "stage3_fpn_lr": 1e-4, "stage3_backbone_lr": 1e-5,
    "stage3_train_bn": True, "stage_warmup_iters": 50, "stage_final_lr_factor": 0.05,
    "weight_decay": 0.05, "clip_grad_norm": 5.0, "ema_decay": 0.9998, "ema_ramp_iters": 2000,
    "warmup_start_factor": 0.001, "conf_threshold": 0.5, "progress": True, "no_imagenet": False, "epochs": None,
    "max_nonfinite_steps": 10, "max_bad_image_fraction": 0.05,
}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file (sections or flat keys) over config_transfer_learning.json")
    parser.add_argument("--pretrained-backbone", help="backbone file or full checkpoint to initialise from")
    parser.add_argument("--no-pretrained", action="store_true", help="random init, same schedule (baseline)")
    parser.add_argument("--transfer", choices=("auto", "backbone"),
                        help="auto (default): a full checkpoint initialises backbone, FPN and head (all but the "
                             "class output), a backbone file the backbone; backbone: the backbone only")
    parser.add_argument("--class-name", help="category to detect (case-insensitive); default: the file's only one")
    parser.add_argument("--train-root", help="training images folder")
    parser.add_argument("--train-ann", help="training COCO annotation JSON")
    parser.add_argument("--val-root", help="validation images folder")
    parser.add_argument("--val-ann", help="validation COCO annotation JSON")
    parser.add_argument("--model-size", help="nano | tiny | small | lite0; must match the backbone file")
    parser.add_argument("--no-imagenet", action="store_true",
                        help="lite0: no ImageNet weights (with --no-pretrained: the random-init baseline)")
    parser.add_argument("--epochs", type=int, help="total epochs, shared by the three stages in the config's "
                                                   "proportions (default: the config's stage epochs as they are)")
    parser.add_argument("--img-size", type=int, help="square input side, a multiple of 32")
    parser.add_argument("--batch-size", type=int, help="per process (GPU); N times it under torchrun")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: per CPU count)")
    parser.add_argument("--output-dir", help="runs go to OUTPUT_DIR/<class>_<timestamp> (default finetune_results)")
    parser.add_argument("--resume", help="last_model.pth of an interrupted run (or its folder)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    parser.add_argument("--amp-dtype", choices=sorted(engine.AMP_DTYPES),
                        help="autocast dtype with --amp (default bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    return parser


def parse_config(argv):
    """defaults < config_transfer_learning.json < --config < CLI; on --resume the run's own config < CLI."""
    parser = get_args_parser()
    config = engine.resolve_config(parser, argv, "finetuning", DEFAULTS)
    if config["resume"]:
        resume = config["resume"]
        if os.path.isdir(resume):
            resume = os.path.join(resume, "last_model.pth")
        checkpoint = engine.load_training_checkpoint(resume)
        config = {**DEFAULTS, **checkpoint["config"], **engine.explicit_cli_values(parser, argv), "resume": resume}
    config["pretrained_backbone"] = config["pretrained_backbone"] or config.pop("pretrained_backbone_path", None)
    config.pop("pretrained_backbone_path", None)
    if config["epochs"] is not None:
        if config["epochs"] < 1:
            raise engine.ConfigError(f"epochs must be >= 1, got {config['epochs']}")
        stage_epochs = split_epochs(config["epochs"], [config[f"stage{i}_epochs"] for i in (1, 2, 3)])
        config.update({f"stage{i}_epochs": epochs for i, epochs in enumerate(stage_epochs, start=1)})
    check_config(config)
    return config


def check_config(config):
    """Cross-field checks up front, each a one-line error."""
    if config["transfer"] not in ("auto", "backbone"):
        raise engine.ConfigError(f"transfer must be 'auto' or 'backbone', got {config['transfer']!r}")
    if config["num_classes"] != 1:
        raise engine.ConfigError(f"num_classes is {config['num_classes']}, but this script fine-tunes one class; "
                                 f"set num_classes to 1 and pick the class with class_name")
    for key in ("train_root", "train_ann", "val_root", "val_ann"):
        if not config[key]:
            raise engine.ConfigError(f"{key} is not set: pass --{key.replace('_', '-')} or put it in --config")
        if not os.path.exists(config[key]):
            raise engine.ConfigError(f"{key} does not exist: {config[key]}")
    if not config["resume"]:
        imagenet = has_imagenet_weights(config["model_size"]) and not config["no_imagenet"]
        if config["no_pretrained"] and imagenet:
            raise engine.ConfigError(f"--no-pretrained asks for random weights, but model_size "
                                     f"{config['model_size']!r} starts from ImageNet weights: add --no-imagenet "
                                     f"for a random init, or drop --no-pretrained to start from ImageNet")
        if config["no_pretrained"] == bool(config["pretrained_backbone"]) and not imagenet:
            raise engine.ConfigError("pass exactly one of --pretrained-backbone PATH or --no-pretrained")
    if config["pretrained_backbone"] and not os.path.isfile(config["pretrained_backbone"]):
        raise engine.ConfigError(f"pretrained backbone not found: {config['pretrained_backbone']}")
    if config["batch_size"] < 1 or config["img_size"] < 32:
        raise engine.ConfigError(f"batch_size must be >= 1 and img_size >= 32, got {config['batch_size']}, "
                                 f"{config['img_size']}")
    if config["img_size"] % 32:
        raise engine.ConfigError(f"img_size {config['img_size']} is not a multiple of 32; "
                                 f"use {32 * max(1, round(config['img_size'] / 32))}")
    for i in range(1, 4):
        if config[f"stage{i}_epochs"] < 0:
            raise engine.ConfigError(f"stage{i}_epochs must be >= 0, got {config[f'stage{i}_epochs']}")
    if sum(config[f"stage{i}_epochs"] for i in range(1, 4)) == 0:
        raise engine.ConfigError("every stage has 0 epochs: set stage1_epochs, stage2_epochs or stage3_epochs")
    for key, value in config.items():
        if key.endswith("_lr") and not value >= 0:
            raise engine.ConfigError(f"{key} must be >= 0, got {value}")
    if config["max_nonfinite_steps"] < 1:
        raise engine.ConfigError(f"max_nonfinite_steps must be >= 1, got {config['max_nonfinite_steps']}")
    if not 0 <= config["max_bad_image_fraction"] <= 1:
        raise engine.ConfigError(f"max_bad_image_fraction must be in [0, 1], got {config['max_bad_image_fraction']}")
    device = config["device"] or ""
    if config["sync_bn"] and (device.startswith("cpu") or not torch.cuda.is_available()):
        raise engine.ConfigError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on the CPU")
    engine.check_amp_dtype(config["amp_dtype"], config["device"])
    engine.check_lr_scaling(config)


def stage_plan(config, pretrained_groups):
    """The stages to run: index (1-3), name, layer groups trained, per-group lrs, first and last epoch.

    The stages release the *pretrained* groups as the recipe says (heads, then the FPN, then the backbone, each
    at its own rate); a group that starts from random weights (`pretrained_groups` lacks it: the FPN after a
    backbone-only or ImageNet init, everything after --no-pretrained) trains from stage 1 at the stage's head
    rate, BatchNorm in train mode. Frozen random features with their initial BatchNorm statistics teach the head
    nothing it can keep: releasing them later changes the head's inputs at once (the stage-boundary collapse).
    """
    plan, first = [], 1
    for index, (name, released) in enumerate(STAGES, start=1):
        epochs = config[f"stage{index}_epochs"]
        if epochs == 0:
            continue
        groups = tuple(g for g in LAYER_GROUPS if g in released or g not in pretrained_groups)
        lrs = {group: config[f"stage{index}_{group if group in pretrained_groups else 'head'}_lr"] for group in groups}
        plan.append({"index": index, "name": name, "groups": groups, "lrs": lrs, "first_epoch": first,
                     "last_epoch": first + epochs - 1})
        first += epochs
    return plan


def split_epochs(total_epochs, proportions):
    """Stage epochs in the recipe's proportions (E/4, E/4, the rest for 10:10:20): the earlier stages round down
    to at least 1 epoch each, the last stage with epochs takes what is left; a stage with 0 stays at 0."""
    used = [index for index, weight in enumerate(proportions) if weight > 0]
    if not used:
        raise engine.ConfigError("the recipe has no stage with epochs (stage1_epochs..stage3_epochs all 0)")
    epochs = [max(1, int(total_epochs * weight / sum(proportions))) if weight > 0 else 0 for weight in proportions]
    epochs[used[-1]] = 0
    epochs[used[-1]] = total_epochs - sum(epochs)
    if epochs[used[-1]] < 1:
        raise engine.ConfigError(f"--epochs {total_epochs} is too few for the {len(used)}-stage recipe "
                                 f"(proportions {list(proportions)}); use at least {len(used)}")
    return tuple(epochs)


def describe_stage(stage, pretrained_groups):
    """'trains head (pretrained) at 0.002, fpn (new) at 0.002; frozen: backbone (pretrained)'."""
    def origin(group):
        return "pretrained" if group in pretrained_groups else "new"
    trained = ", ".join(f"{g} ({origin(g)}) at {stage['lrs'][g]:g}" for g in stage["groups"])
    frozen = ", ".join(f"{g} ({origin(g)})" for g in LAYER_GROUPS if g not in stage["groups"]) or "nothing"
    return f"trains {trained}; frozen: {frozen}"


def build_data(config):
    classes = [config["class_name"]] if config["class_name"] else None
    bad = config["max_bad_image_fraction"]
    train = CocoDetectionDataset(config["train_ann"], config["train_root"], classes=classes,
                                 transforms=build_transforms(config["augmentation"], config["img_size"]),
                                 max_missing_fraction=bad)
    if len(train.class_names) != 1:
        raise engine.ConfigError(f"{config['train_ann']} has {len(train.class_names)} categories; choose one with "
                                 f"--class-name ({', '.join(train.class_names)})")
    if train.stats["boxes_kept"] == 0:
        s = train.stats
        raise engine.ConfigError(
            f"no usable {train.class_names[0]!r} box in {config['train_ann']}: {s['images_missing']} of "
            f"{s['images_total']} images missing on disk, {s['boxes_dropped']} boxes dropped as degenerate or "
            f"non-finite, {s['crowd_ignored']} crowd boxes ignored; check --class-name and the annotation file")
    val = CocoDetectionDataset(config["val_ann"], config["val_root"], classes=train.class_names,
                               max_missing_fraction=bad)
    sampler = distributed.train_sampler(train, config["seed"])
    loader = build_dataloader(train, config["batch_size"], shuffle=True, num_workers=config["workers"],
                              drop_last=len(sampler or train) > config["batch_size"],
                              seed=distributed.rank_seed(config["seed"]), sampler=sampler)
    if loader.num_workers > 0:
        # Start the persistent workers now: their base seed is drawn from the generator on the first
        # iteration only, and a resumed run must shuffle like an uninterrupted one (reseeded per epoch).
        iter(loader)
    return loader, val, train.class_names


def build_model(config):
    """Pretrained weights whose size must match (a backbone file initialises the backbone; a full
    checkpoint, e.g. pretraining's checkpoints/best.pth, everything but the class output unless transfer is
    "backbone"), or for lite0 without them the ImageNet backbone (unless no_imagenet), or random init. On
    --resume the weights come later."""
    path = config["pretrained_backbone"]
    imagenet = (not path and not config["resume"] and not config.get("no_imagenet")
                and has_imagenet_weights(config["model_size"]))
    try:
        model = create_lightweight_model(1, config["model_size"], img_size=config["img_size"],
                                         imagenet_pretrained=imagenet)
    except MissingWeightsPackageError as error:
        raise engine.ConfigError(str(error)) from error
    if imagenet:
        logger.info("backbone init: ImageNet weights (%s)", config["model_size"])
    if path and not config["resume"]:
        _, source_config = read_backbone_state(path)
        source_size = (source_config or {}).get("model_size")
        if source_size and source_size != config["model_size"]:
            raise engine.ConfigError(f"{path} holds a {source_size!r} backbone but model_size is "
                                     f"{config['model_size']!r}; pass --model-size {source_size}")
        checkpoint_keys = set(load_checkpoint_file(path, "pretrained weights"))
        if config["transfer"] == "auto" and "model_state_dict" in checkpoint_keys:
            report = model.load_detector_weights(path)  # a full detector: all but the class output
            logger.info("pretrained detector: loaded %d/%d tensors from %s (all but the classifier)",
                        report["loaded"], report["total"], path)
        else:
            report = model.load_backbone_weights(path)
            logger.info("pretrained backbone: loaded %d/%d tensors from %s", report["loaded"], report["total"], path)
    return model


def init_record(config, model):
    """What the weights started from and which layer groups that made pretrained (the rest are random)."""
    if config["pretrained_backbone"]:
        weights = config["pretrained_backbone"]
    elif model.pretrained_groups:
        weights = f"ImageNet weights ({config['model_size']} backbone)"
    else:
        weights = "random"
    return {"weights": weights, "pretrained": [g for g in LAYER_GROUPS if g in model.pretrained_groups],
            "new": [g for g in LAYER_GROUPS if g not in model.pretrained_groups]}


def configure_stage(model, stage, config, pretrained_groups, lr_scale=1.0):
    """Freeze what the stage does not train (BN statistics too); a fresh AdamW (rates x `lr_scale`).
    stage3_train_bn false keeps the statistics of the pretrained backbone and FPN frozen in stage 3."""
    model.freeze_backbone("backbone" not in stage["groups"])
    model.freeze_fpn("fpn" not in stage["groups"])
    if stage["index"] == 3 and not config["stage3_train_bn"]:
        for group in ("backbone", "fpn"):
            if group in pretrained_groups:
                model.freeze_batchnorm(group)
    lrs = {group: lr * lr_scale for group, lr in stage["lrs"].items()}
    optimizer = torch.optim.AdamW(model.get_param_groups(lrs.get("backbone", 0.0), lrs.get("fpn", 0.0),
                                                         lrs["head"], config["weight_decay"]))
    return optimizer


def stage_scheduler(optimizer, stage, iters_per_epoch, config):
    total = (stage["last_epoch"] - stage["first_epoch"] + 1) * iters_per_epoch
    return engine.build_warmup_cosine(optimizer, total, config["stage_warmup_iters"],
                                      config["warmup_start_factor"], config["stage_final_lr_factor"])


def epoch_row(epoch, stage, train_metrics, optimizer, metrics, epoch_time):
    row = {"epoch": epoch, "stage": stage["index"], "stage_name": stage["name"]}
    row.update({k: round(v, 5) for k, v in train_metrics.items() if k.startswith("loss")})
    row.update({k: train_metrics.get(k, 0) for k in ("nonfinite_steps", "images_skipped")})
    row.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
    row.update({k: metrics[k] for k in ("mAP", "mAP50", "mAP75", "precision", "recall", "f1", "best_f1",
                                        "best_f1_threshold", "best_f1_precision", "best_f1_recall")})
    row.update({"images_per_second": round(train_metrics["images_per_second"], 2),
                "epoch_time": round(epoch_time, 2)})
    return row


def main(argv=None):
    """Run (or resume) a fine-tuning; returns the summary dict (also written to summary.json).

    Under torchrun every rank trains on its shard and rank 0 evaluates and writes; the other ranks return {}.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    config = parse_config(argv)
    hint = None if config["device"] else distributed.torchrun_hint("finetune_single_class.py",
                                                                    sys.argv[1:] if argv is None else argv)
    if hint:
        raise engine.ConfigError(hint)
    device = distributed.init_distributed(config["device"])
    is_main = distributed.is_main_process()
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    engine.seed_everything(distributed.rank_seed(config["seed"]))
    loader, val_dataset, class_names = build_data(config)
    if is_main:
        logger.info("training data:\n%s", dataset_report(loader.dataset, config["img_size"]))
    model = build_model(config).to(device)
    if config["sync_bn"]:
        model = distributed.convert_sync_batchnorm(model)
    distributed.broadcast_model(model)  # every rank starts from rank 0's random heads
    criterion = DetectionLoss()
    ema = engine.build_ema(model, config["ema_decay"], config["ema_ramp_iters"])
    scaler = engine.build_grad_scaler(device, config["amp"], config["amp_dtype"])
    world_size = distributed.get_world_size()
    lr_scale = engine.lr_scale_factor(config["lr_scaling"], config["batch_size"], world_size,
                                      config["lr_reference_batch_size"])
    logger.info("%d process(es) x batch %d = global batch %d; learning rates x %.3g (%s scaling)", world_size,
                config["batch_size"], world_size * config["batch_size"], lr_scale, config["lr_scaling"])

    checkpoint = engine.load_training_checkpoint(config["resume"]) if config["resume"] else None
    if checkpoint is None:
        config["init"] = init_record(config, model)
    else:  # a run from before provenance-aware stages froze every group as the recipe said: resume it so
        config.setdefault("init", {"weights": "(not recorded)", "pretrained": list(LAYER_GROUPS), "new": []})
    pretrained = set(config["init"]["pretrained"])
    logger.info("init: %s; pretrained groups: %s; new (random) groups: %s", config["init"]["weights"],
                ", ".join(config["init"]["pretrained"]) or "none", ", ".join(config["init"]["new"]) or "none")
    run_dir = None
    if is_main:
        run_dir = (os.path.dirname(os.path.abspath(config["resume"])) if checkpoint
                   else engine.create_run_dir(config["output_dir"], class_names[0].replace(" ", "_")))
        engine.write_json_atomic(config, os.path.join(run_dir, "config.json"))
    logger.info("run folder %s\neffective config: %s", run_dir, config)
    writer = engine.create_tensorboard_writer(run_dir) if is_main else None
    log = engine.MetricsLog(run_dir, writer, keep_until=checkpoint["epoch"] if checkpoint else 0) if is_main else None
    last_path, streak = os.path.join(run_dir, "last_model.pth") if run_dir else "", 0
    summary = checkpoint.get("summary", {}) if checkpoint else {}
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else 1
    best_map = checkpoint.get("best_map", float("-inf")) if checkpoint else float("-inf")
    plan = stage_plan(config, pretrained)
    if start_epoch > plan[-1]["last_epoch"]:
        raise engine.ConfigError(f"{config['resume']} already finished all {plan[-1]['last_epoch']} epochs; "
                                 f"nothing to resume")
    metrics = {}
    train_model = None
    with engine.training_faults("finetune_single_class.py", last_path, run_dir, writer):
        for stage in plan:
            if stage["last_epoch"] < start_epoch:
                continue
            optimizer = configure_stage(model, stage, config, pretrained, lr_scale)
            scheduler = stage_scheduler(optimizer, stage, len(loader), config)
            if checkpoint and checkpoint.get("stage") == stage["index"] and start_epoch > stage["first_epoch"]:
                engine.restore_training_state(checkpoint, model, ema, optimizer, scheduler, scaler)
            elif checkpoint and start_epoch == stage["first_epoch"]:
                engine.restore_training_state(checkpoint, model, ema, None, None, scaler)
            checkpoint = None
            # DDP hooks the parameters that are trainable when it is built: a new wrapper for each stage's
            # freezing, so no find_unused_parameters (an extra graph traversal every iteration) is needed
            del train_model
            train_model = distributed.wrap_model(model, device)
            logger.info("stage %d (%s), epochs %d-%d: %s; %s", stage["index"], stage["name"], stage["first_epoch"],
                        stage["last_epoch"], describe_stage(stage, pretrained), engine.describe_trainable(model))
            if is_main:
                writer.add_text("stages", f"stage {stage['index']} ({stage['name']}) starts at epoch "
                                          f"{stage['first_epoch']}", stage["first_epoch"])
            for epoch in range(max(start_epoch, stage["first_epoch"]), stage["last_epoch"] + 1):
                loader.generator.manual_seed(distributed.rank_seed(config["seed"] + epoch))
                distributed.set_epoch(loader, epoch)
                started = time.perf_counter()
                train_metrics = engine.train_one_epoch(
                    train_model, criterion, optimizer, loader, device, epoch, scheduler, ema, scaler, config["amp"],
                    config["clip_grad_norm"], progress=config["progress"] and is_main,
                    description=f"stage {stage['index']} ({stage['name']}) epoch {epoch}/{plan[-1]['last_epoch']}",
                    writer=writer, global_step=(epoch - 1) * len(loader), amp_dtype=config["amp_dtype"],
                    max_nonfinite_steps=config["max_nonfinite_steps"], nonfinite_streak=streak)
                streak = train_metrics["nonfinite_streak"]
                engine.check_skipped_images(train_metrics, loader, config["max_bad_image_fraction"], epoch)
                if world_size > 1:
                    logger.info("epoch %d data shards: %s", epoch,
                                distributed.describe_shards(train_metrics["image_ids"]))
                if is_main:
                    metrics, best_map, summary = finish_epoch(run_dir, config, class_names, model, ema, optimizer,
                                                              scheduler, scaler, stage, epoch, best_map, summary,
                                                              train_metrics, val_dataset, log, writer, started)
                distributed.barrier()  # the other ranks wait while rank 0 evaluates and writes
            distributed.check_in_sync(model)
    if not is_main:
        return {}
    writer.close()
    best_path = os.path.join(run_dir, "best_model.pth")
    if not math.isfinite(best_map):
        logger.warning("no epoch had a defined mAP (no validation boxes?), so there is no best_model.pth")
    summary.update({"best_model": best_path if math.isfinite(best_map) else None,
                    "last_model": os.path.join(run_dir, "last_model.pth")})
    engine.write_json_atomic(summary, os.path.join(run_dir, "summary.json"))
    logger.info("best epoch %s (stage %s): %s\n%s", summary.get("best_epoch"), summary.get("best_stage"),
                run_dir, format_metrics(metrics))
    return summary


def calibrated_threshold(metrics):
    """The validation best-F1 score threshold, which predict() then defaults to; DEFAULT_CONF_THRESHOLD when no
    threshold found a true positive."""
    return metrics["best_f1_threshold"] if metrics["best_f1"] > 0 else DEFAULT_CONF_THRESHOLD


def finish_epoch(run_dir, config, class_names, model, ema, optimizer, scheduler, scaler, stage, epoch, best_map,
                 summary, train_metrics, val_dataset, log, writer, started):
    """Rank 0's end of an epoch: evaluate the EMA, log, write best_model.pth (on a new best) and
    last_model.pth. Returns (metrics, best mAP, summary)."""
    device = next(model.parameters()).device
    metrics = evaluate(ema.module, val_dataset, device, conf_threshold=config["conf_threshold"],
                       num_workers=config["workers"])
    row = epoch_row(epoch, stage, train_metrics, optimizer, metrics, time.perf_counter() - started)
    log.log(row, epoch)
    writer.add_scalar("epoch/stage", stage["index"], epoch)
    engine.log_validation_images(writer, ema.module, val_dataset, epoch, class_names)
    logger.info("epoch %d stage %d: loss %.4f mAP %.4f mAP50 %.4f | P/R/F1 %.3f/%.3f/%.3f at %.2f, %.3f/%.3f/%.3f "
                "at %.2f (best F1) | %.1f img/s", epoch, stage["index"], row["loss"], row["mAP"], row["mAP50"],
                row["precision"], row["recall"], row["f1"], config["conf_threshold"], row["best_f1_precision"],
                row["best_f1_recall"], row["best_f1"], row["best_f1_threshold"], row["images_per_second"])
    if metrics["mAP"] > best_map:  # NaN is never best
        best_map = metrics["mAP"]
        threshold = calibrated_threshold(metrics)
        summary = {"best_epoch": epoch, "best_stage": stage["index"], "best_stage_name": stage["name"],
                   "conf_threshold": threshold, "best_metrics": {k: v for k, v in metrics.items() if k != "per_class_AP"}}
        save_checkpoint(model_checkpoint(ema.module, class_names, config=config, epoch=epoch, stage=stage["index"],
                                         metrics=summary["best_metrics"], conf_threshold=threshold),
                        os.path.join(run_dir, "best_model.pth"))
    summary.update({"run_dir": run_dir, "last_epoch": epoch, "last_metrics": row})
    save_checkpoint(engine.training_checkpoint(model, ema, class_names, config, optimizer, scheduler, scaler,
                                               epoch=epoch, stage=stage["index"], best_map=best_map,
                                               summary=summary),
                    os.path.join(run_dir, "last_model.pth"))
    return metrics, best_map, summary


def run():
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    engine.run_script(main, None, bad_input=(engine.ConfigError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    run()
