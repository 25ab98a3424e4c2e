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
import os
import sys
import time

import torch

import engine
from dataset_coco import CocoDetectionDataset, build_dataloader, build_transforms, dataset_report
from evaluate import evaluate, format_metrics
from losses import DetectionLoss
from backbone_efficientnet import MissingWeightsPackageError
from model_lightweight import (create_lightweight_model, has_imagenet_weights, model_checkpoint, read_backbone_state,
                               save_checkpoint)

logger = logging.getLogger("finetune")

STAGES = (  # (name, layer groups trained)
    ("heads", ("head",)),
    ("heads+fpn", ("fpn", "head")),
    ("all", ("backbone", "fpn", "head")),
)
DEFAULTS = {
    "config": None, "pretrained_backbone": None, "pretrained_backbone_path": None, "no_pretrained": False,
    "class_name": None, "train_root": None, "train_ann": None, "val_root": None, "val_ann": None,
    "model_size": "tiny", "img_size": 320, "batch_size": 16, "workers": None, "augmentation": "moderate",
    "num_classes": 1, "output_dir": "finetune_results", "resume": None, "device": None, "seed": 0, "amp": False,
    "stage1_epochs": 10, "stage1_head_lr": 1e-3,
    "stage2_epochs": 10, "stage2_head_lr": 1e-3, "stage2_fpn_lr": 1e-4,
    "stage3_epochs": 20, "stage3_head_lr": 5e-4, "stage3_fpn_lr": 1e-4, "stage3_backbone_lr": 1e-5,
    "stage3_train_bn": True, "stage_warmup_iters": 50, "stage_final_lr_factor": 0.05,
    "weight_decay": 0.05, "clip_grad_norm": 5.0, "ema_decay": 0.9998, "ema_ramp_iters": 2000,
    "warmup_start_factor": 0.001, "conf_threshold": 0.5, "progress": True, "no_imagenet": False,
}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file (sections or flat keys) over config_transfer_learning.json")
    parser.add_argument("--pretrained-backbone", help="backbone file or full checkpoint to initialise from")
    parser.add_argument("--no-pretrained", action="store_true", help="random init, same schedule (baseline)")
    parser.add_argument("--class-name", help="category to detect (case-insensitive); default: the file's only one")
    parser.add_argument("--train-root", help="training images folder")
    parser.add_argument("--train-ann", help="training COCO annotation JSON")
    parser.add_argument("--val-root", help="validation images folder")
    parser.add_argument("--val-ann", help="validation COCO annotation JSON")
    parser.add_argument("--model-size", help="nano | tiny | small | lite0; must match the backbone file")
    parser.add_argument("--no-imagenet", action="store_true",
                        help="lite0: no ImageNet weights (with --no-pretrained: the random-init baseline)")
    parser.add_argument("--img-size", type=int, help="square input side, a multiple of 32")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: per CPU count)")
    parser.add_argument("--output-dir", help="runs go to OUTPUT_DIR/<class>_<timestamp> (default finetune_results)")
    parser.add_argument("--resume", help="last_model.pth of an interrupted run (or its folder)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
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
        config = {**checkpoint["config"], **engine.explicit_cli_values(parser, argv), "resume": resume}
    config["pretrained_backbone"] = config["pretrained_backbone"] or config.pop("pretrained_backbone_path", None)
    config.pop("pretrained_backbone_path", None)
    check_config(config)
    return config


def check_config(config):
    """Cross-field checks up front, each a one-line error."""
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
        if key.endswith("_lr") and value < 0:
            raise engine.ConfigError(f"{key} must be >= 0, got {value}")


def stage_plan(config):
    """The stages to run: index (1-3), name, layer groups trained, per-group lrs, first and last epoch."""
    plan, first = [], 1
    for index, (name, groups) in enumerate(STAGES, start=1):
        epochs = config[f"stage{index}_epochs"]
        if epochs == 0:
            continue
        lrs = {group: config[f"stage{index}_{group}_lr"] for group in groups}
        plan.append({"index": index, "name": name, "groups": groups, "lrs": lrs, "first_epoch": first,
                     "last_epoch": first + epochs - 1})
        first += epochs
    return plan


def build_data(config):
    classes = [config["class_name"]] if config["class_name"] else None
    train = CocoDetectionDataset(config["train_ann"], config["train_root"], classes=classes,
                                 transforms=build_transforms(config["augmentation"], config["img_size"]))
    if len(train.class_names) != 1:
        raise engine.ConfigError(f"{config['train_ann']} has {len(train.class_names)} categories; choose one with "
                                 f"--class-name ({', '.join(train.class_names)})")
    val = CocoDetectionDataset(config["val_ann"], config["val_root"], classes=train.class_names)
    loader = build_dataloader(train, config["batch_size"], shuffle=True, num_workers=config["workers"],
                              drop_last=len(train) > config["batch_size"], seed=config["seed"])
    if loader.num_workers > 0:
        # Start the persistent workers now: their base seed is drawn from the generator on the first
        # iteration only, and a resumed run must shuffle like an uninterrupted one (reseeded per epoch).
        iter(loader)
    return loader, val, train.class_names


def build_model(config):
    """A pretrained backbone (backbone file or full checkpoint) whose size must match, or for lite0 without
    one the ImageNet backbone (unless no_imagenet), or random init. On --resume the weights come later."""
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
        report = model.load_backbone_weights(path)
        logger.info("pretrained backbone: loaded %d/%d tensors from %s", report["loaded"], report["total"], path)
    return model


def configure_stage(model, stage, config):
    """Freeze what the stage does not train (BN statistics too); a fresh AdamW and warmup-cosine schedule."""
    model.freeze_backbone("backbone" not in stage["groups"])
    model.freeze_fpn("fpn" not in stage["groups"])
    if stage["index"] == 3 and not config["stage3_train_bn"]:
        model.freeze_batchnorm("backbone")
        model.freeze_batchnorm("fpn")
    lrs = stage["lrs"]
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
    row.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
    row.update({k: metrics[k] for k in ("mAP", "mAP50", "mAP75", "precision", "recall", "f1", "best_f1",
                                        "best_f1_threshold")})
    row.update({"images_per_second": round(train_metrics["images_per_second"], 2),
                "epoch_time": round(epoch_time, 2)})
    return row


def main(argv=None):
    """Run (or resume) a fine-tuning; returns the summary dict (also written to summary.json)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    config = parse_config(argv)
    device = torch.device(config["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    engine.seed_everything(config["seed"])
    loader, val_dataset, class_names = build_data(config)
    logger.info("training data:\n%s", dataset_report(loader.dataset, config["img_size"]))
    model = build_model(config).to(device)
    criterion = DetectionLoss()
    ema = engine.build_ema(model, config["ema_decay"], config["ema_ramp_iters"])
    scaler = torch.amp.GradScaler("cuda") if config["amp"] and device.type == "cuda" else None

    checkpoint = engine.load_training_checkpoint(config["resume"]) if config["resume"] else None
    run_dir = (os.path.dirname(os.path.abspath(config["resume"])) if checkpoint
               else engine.create_run_dir(config["output_dir"], class_names[0].replace(" ", "_")))
    engine.write_json_atomic(config, os.path.join(run_dir, "config.json"))
    logger.info("run folder %s\neffective config: %s", run_dir, config)
    writer = engine.create_tensorboard_writer(run_dir)
    log = engine.MetricsLog(run_dir, writer)
    summary = checkpoint.get("summary", {}) if checkpoint else {}
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else 1
    best_map = checkpoint.get("best_map", float("-inf")) if checkpoint else float("-inf")
    plan = stage_plan(config)
    if start_epoch > plan[-1]["last_epoch"]:
        raise engine.ConfigError(f"{config['resume']} already finished all {plan[-1]['last_epoch']} epochs; "
                                 f"nothing to resume")
    metrics = {}
    for stage in plan:
        if stage["last_epoch"] < start_epoch:
            continue
        optimizer = configure_stage(model, stage, config)
        scheduler = stage_scheduler(optimizer, stage, len(loader), config)
        if checkpoint and checkpoint.get("stage") == stage["index"] and start_epoch > stage["first_epoch"]:
            engine.restore_training_state(checkpoint, model, ema, optimizer, scheduler, scaler)
        elif checkpoint and start_epoch == stage["first_epoch"]:
            engine.restore_training_state(checkpoint, model, ema, None, None, scaler)
        checkpoint = None
        logger.info("stage %d (%s), epochs %d-%d, lrs %s; %s", stage["index"], stage["name"],
                    stage["first_epoch"], stage["last_epoch"], stage["lrs"], engine.describe_trainable(model))
        writer.add_text("stages", f"stage {stage['index']} ({stage['name']}) starts at epoch {stage['first_epoch']}",
                        stage["first_epoch"])
        for epoch in range(max(start_epoch, stage["first_epoch"]), stage["last_epoch"] + 1):
            loader.generator.manual_seed(config["seed"] + epoch)
            started = time.perf_counter()
            train_metrics = engine.train_one_epoch(
                model, criterion, optimizer, loader, device, epoch, scheduler, ema, scaler, config["amp"],
                config["clip_grad_norm"], progress=config["progress"],
                description=f"stage {stage['index']} ({stage['name']}) epoch {epoch}/{plan[-1]['last_epoch']}",
                writer=writer, global_step=(epoch - 1) * len(loader))
            metrics = evaluate(ema.module, val_dataset, device, conf_threshold=config["conf_threshold"])
            row = epoch_row(epoch, stage, train_metrics, optimizer, metrics, time.perf_counter() - started)
            log.log(row, epoch)
            writer.add_scalar("epoch/stage", stage["index"], epoch)
            engine.log_validation_images(writer, ema.module, val_dataset, epoch, class_names)
            logger.info("epoch %d stage %d: loss %.4f mAP %.4f mAP50 %.4f P %.3f R %.3f F1 %.3f (%.1f img/s)", epoch,
                        stage["index"], row["loss"], row["mAP"], row["mAP50"], row["precision"], row["recall"],
                        row["f1"], row["images_per_second"])
            if metrics["mAP"] > best_map:  # NaN is never best
                best_map = metrics["mAP"]
                summary = {"best_epoch": epoch, "best_stage": stage["index"], "best_stage_name": stage["name"],
                           "best_metrics": {k: v for k, v in metrics.items() if k != "per_class_AP"}}
                save_checkpoint(model_checkpoint(ema.module, class_names, config=config, epoch=epoch,
                                                 stage=stage["index"], metrics=summary["best_metrics"]),
                                os.path.join(run_dir, "best_model.pth"))
            summary.update({"run_dir": run_dir, "last_epoch": epoch, "last_metrics": row})
            save_checkpoint(engine.training_checkpoint(model, ema, class_names, config, optimizer, scheduler, scaler,
                                                       epoch=epoch, stage=stage["index"], best_map=best_map,
                                                       summary=summary),
                            os.path.join(run_dir, "last_model.pth"))
    writer.close()
    summary.update({"best_model": os.path.join(run_dir, "best_model.pth"),
                    "last_model": os.path.join(run_dir, "last_model.pth")})
    engine.write_json_atomic(summary, os.path.join(run_dir, "summary.json"))
    logger.info("best epoch %s (stage %s): %s\n%s", summary.get("best_epoch"), summary.get("best_stage"),
                run_dir, format_metrics(metrics))
    return summary


def run():
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    try:
        main()
    except (engine.ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
