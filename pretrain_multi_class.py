"""Multi-class COCO pretraining of the lightweight detector; its backbone is saved for transfer.

Trains on 20-30 common COCO classes (config_transfer_learning.json "pretraining" + "optimization"),
scores the EMA of the weights with COCO mAP, keeps the best by mAP and writes the backbone alone to
backbone_weights/, which `finetune_single_class.py --pretrained-backbone` and
`create_lightweight_model(backbone_weights_path=...)` read. Sizes nano/tiny/small start from random
weights; lite0 (EfficientNet-Lite0) starts its backbone from ImageNet weights unless --no-imagenet.

    python pretrain_multi_class.py --coco-root /path/to/coco --epochs 100 --batch-size 32 --model-size tiny
    python pretrain_multi_class.py --coco-root data/coco128 --classes 20 --img-size 320 --device cpu
    python pretrain_multi_class.py --coco-root /path/to/coco --model-size lite0     # ImageNet -> COCO classes
    python pretrain_multi_class.py --resume pretrain_results/multi_class_<stamp>/checkpoints/last.pth --epochs 150
    torchrun --nproc_per_node=4 pretrain_multi_class.py --coco-root /path/to/coco --batch-size 32 --amp --sync-bn

Outputs, in OUTPUT_DIR/multi_class_<YYYYmmdd_HHMMSS>/: checkpoints/{last,best,epoch_<N>}.pth,
backbone_weights/{best,last}_backbone.pth, config.json, metrics.csv (one row per epoch), tensorboard/.
"""
import argparse
import collections
import json
import logging
import math
import os
import sys
import time

import torch

import distributed
import engine
from dataset_coco import (CocoDetectionDataset, build_dataloader, build_transforms, coco_layout_paths, dataset_report,
                          load_coco_json)
from evaluate import evaluate, format_metrics
from losses import DetectionLoss
from backbone_efficientnet import MissingWeightsPackageError
from model_lightweight import MODEL_SIZES, STRIDES, create_lightweight_model, has_imagenet_weights, save_checkpoint

logger = logging.getLogger("pretrain")

# Every valid config key with its default; config files are checked against these names and types.
DEFAULTS = {
    "config": None, "coco_root": None, "classes": None, "augmentation": "strong", "img_size": 320,
    "workers": None, "model_size": "tiny", "epochs": 100, "batch_size": 32,
    "backbone_lr": 1e-3, "fpn_lr": 2e-3, "head_lr": 2e-3, "weight_decay": 0.05,
    "warmup_iters": 300, "warmup_start_factor": 0.001, "T_0": 10, "T_mult": 2, "eta_min": 1e-5,
    "clip_grad_norm": 5.0, "ema_decay": 0.9998, "ema_ramp_iters": 2000, "amp": False, "amp_dtype": None,
    "sync_bn": False, "lr_scaling": "linear", "lr_reference_batch_size": None,
    "eval_interval": 1, "save_interval": 10, "conf_threshold": 0.5,
    "output_dir": "pretrain_results", "resume": None, "device": None, "seed": 0, "print_freq": 20,
    "progress": True, "no_imagenet": False, "max_nonfinite_steps": 10, "max_bad_image_fraction": 0.05,
}
# Settings of this machine and invocation, never taken from a resumed checkpoint's config.
RUNTIME_KEYS = ("config", "resume", "device", "workers", "print_freq", "progress")
ARCHITECTURE_KEYS = ("model_size", "img_size", "classes")  # fixed for the life of a run


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", help="folder with train2017/, val2017/ and annotations/instances_*2017.json")
    parser.add_argument("--config", help="JSON file (sections or flat keys) over config_transfer_learning.json")
    parser.add_argument("--classes", help="comma-separated class names, or K for the K most frequent "
                                          "(default: the config's 30 classes present in the data)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES),
                        help="default tiny; lite0 is EfficientNet-Lite0, ImageNet-initialised")
    parser.add_argument("--no-imagenet", action="store_true",
                        help="lite0: random backbone init instead of the ImageNet weights")
    parser.add_argument("--img-size", type=int, help="square input side, a multiple of 32 (default 320)")
    parser.add_argument("--epochs", type=int, help="last epoch to train (default 100)")
    parser.add_argument("--batch-size", type=int, help="per process (GPU); the global batch is N times it under "
                                                       "torchrun (default 32)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: per CPU count)")
    parser.add_argument("--output-dir", help="runs go to OUTPUT_DIR/multi_class_<timestamp> (default pretrain_results)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="RUN/checkpoints/last.pth: continue that run in RUN")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    parser.add_argument("--amp-dtype", choices=sorted(engine.AMP_DTYPES),
                        help="autocast dtype with --amp (default bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    parser.add_argument("--eval-interval", type=int, help="evaluate every N epochs and at the last (default 1)")
    parser.add_argument("--save-interval", type=int, help="keep checkpoints/epoch_<N>.pth every N epochs (default 10)")
    parser.add_argument("--print-freq", type=int, help="TensorBoard iteration scalars every N iterations (default 20)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return parser


# ---- configuration -----------------------------------------------------------------------------------
def parse_config(argv=None):
    """defaults < config_transfer_learning.json < --config < CLI; with --resume the checkpoint's config
    replaces the first two.

    Returns:
        (config dict, resume checkpoint or None, set of keys typed on the command line)
    """
    parser = get_args_parser()
    config = engine.resolve_config(parser, argv, "pretraining", DEFAULTS)
    typed = engine.explicit_cli_values(parser, argv)
    checkpoint = None
    if config["resume"] and os.path.isdir(config["resume"]):  # the run folder
        typed["resume"] = config["resume"] = os.path.join(config["resume"], "checkpoints", "last.pth")
    if config["resume"]:
        checkpoint = engine.load_training_checkpoint(config["resume"])
        config = resumed_config(config, checkpoint, typed)
    for key, default in DEFAULTS.items():  # JSON may say 10.0 where an int is meant (range(), T_0)
        if type(default) is int and isinstance(config[key], float):
            config[key] = int(config[key])
    config["classes"] = parse_classes(config["classes"])
    check_config(config)
    return config, checkpoint, set(typed)


def resumed_config(config, checkpoint, typed):
    """The interrupted run's config, then --config and typed flags (e.g. a larger --epochs) over it."""
    path = config["resume"]
    if checkpoint.get("stage") != "pretrain":
        raise engine.ConfigError(f"{path} is a {checkpoint.get('stage')!r} checkpoint, not a pretraining one")
    saved = {k: v for k, v in checkpoint["config"].items() if k not in RUNTIME_KEYS}
    engine.check_config(saved, DEFAULTS, path)
    overrides = dict(typed)
    if config["config"]:
        overrides = {**engine.config_sections(engine.load_json(config["config"]), "pretraining"), **typed}
    for key in ARCHITECTURE_KEYS:
        if key in overrides and normalise(key, overrides[key]) != normalise(key, saved.get(key)):
            raise engine.ConfigError(f"{key} cannot change on --resume: the run has {saved.get(key)!r}, "
                                     f"got {overrides[key]!r}")
    config = {**config, **saved, **overrides}
    if os.path.basename(os.path.dirname(os.path.abspath(path))) != "checkpoints":
        raise engine.ConfigError(f"--resume expects RUN/checkpoints/<name>.pth, got {path}")
    if checkpoint["epoch"] >= config["epochs"]:  # never overwrite a finished run
        raise engine.ConfigError(f"{path} already finished {checkpoint['epoch']} of {config['epochs']} epochs; "
                                 f"pass --epochs larger than {checkpoint['epoch']} to train on")
    return config


def normalise(key, value):
    if key == "classes":
        value = parse_classes(value)
        return [name.lower() for name in value] if isinstance(value, list) else value
    return value


def parse_classes(value):
    """None (all categories), a list of names, "a,b,c" or "K"/K (the K most frequent) -> None, list or int."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        value = [name.strip() for name in text.split(",") if name.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(name, str) for name in value):
        raise engine.ConfigError(f"classes must be a list of names, 'name,name,...' or a number K, got {value!r}")
    return value


def check_config(config):
    """Cross-field facts up front, each a one-line error."""
    if not config["coco_root"]:
        raise engine.ConfigError("no COCO folder: pass --coco-root /path/to/coco (or --resume a run)")
    if config["model_size"] not in MODEL_SIZES:
        raise engine.ConfigError(f"model_size {config['model_size']!r} is not one of {sorted(MODEL_SIZES)}")
    stride = max(STRIDES)
    if config["img_size"] < stride or config["img_size"] % stride:
        raise engine.ConfigError(f"img_size {config['img_size']} is not a positive multiple of {stride}; "
                                 f"use {stride * max(1, round(config['img_size'] / stride))}")
    for key in ("epochs", "batch_size", "eval_interval", "save_interval", "print_freq", "T_0", "T_mult",
                "max_nonfinite_steps"):
        if config[key] < 1:
            raise engine.ConfigError(f"{key} must be >= 1, got {config[key]}")
    for key in ("backbone_lr", "fpn_lr", "head_lr", "eta_min", "weight_decay"):
        if not config[key] >= 0:
            raise engine.ConfigError(f"{key} must be >= 0, got {config[key]}")
    if not 0 <= config["max_bad_image_fraction"] <= 1:
        raise engine.ConfigError(f"max_bad_image_fraction must be in [0, 1], got {config['max_bad_image_fraction']}")
    if config["warmup_iters"] < 0 or not 0 < config["warmup_start_factor"] <= 1:
        raise engine.ConfigError("warmup_iters must be >= 0 and warmup_start_factor in (0, 1]")
    device = config["device"] or ""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise engine.ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if config["sync_bn"] and (device.startswith("cpu") or not torch.cuda.is_available()):
        raise engine.ConfigError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on the CPU")
    engine.check_amp_dtype(config["amp_dtype"], config["device"])
    engine.check_lr_scaling(config)


# ---- data, model, optimizer --------------------------------------------------------------------------
def box_counts(coco_dict):
    """Non-crowd boxes per category_id of a COCO dict."""
    return collections.Counter(ann["category_id"] for ann in coco_dict.get("annotations", [])
                               if not ann.get("iscrowd", 0))


def present_classes(requested, ann_file):
    """The requested names that have at least one box in `ann_file` (spelled as there); warns once
    about the others. The default list names 30 COCO classes, and subsets such as coco128 lack some."""
    data = load_coco_json(ann_file).dataset
    counts = box_counts(data)
    names = {c["name"].lower(): c["name"] for c in data.get("categories", []) if counts[c["id"]] > 0}
    kept = [names[name.lower()] for name in requested if name.lower() in names]
    dropped = [name for name in requested if name.lower() not in names]
    if not kept:
        raise engine.ConfigError(f"none of the {len(requested)} configured classes ({', '.join(requested[:4])}, ...) "
                                 f"has a box in {ann_file}; choose with --classes NAME,NAME or --classes K")
    if dropped:
        logger.warning("dropped %d of %d classes without boxes in %s: %s", len(dropped), len(requested),
                       ann_file, ", ".join(dropped))
    return kept


def build_data(config, strict_classes):
    """Train loader (strong augmentation) and val dataset (original images) over the same classes.

    Names typed with --classes must all exist (else an error); the config's list keeps those present.
    Bad input (missing files, unknown classes) is raised as ConfigError.
    """
    try:
        paths = coco_layout_paths(config["coco_root"])
        classes = config["classes"]
        if isinstance(classes, list) and not strict_classes:
            classes = present_classes(classes, paths["train_ann"])
        bad = config["max_bad_image_fraction"]
        train = CocoDetectionDataset(paths["train_ann"], paths["train_images"], classes=classes,
                                     transforms=build_transforms(config["augmentation"], config["img_size"]),
                                     max_missing_fraction=bad)
        val = CocoDetectionDataset(paths["val_ann"], paths["val_images"], classes=train.class_names,
                                   max_missing_fraction=bad)
    except (FileNotFoundError, ValueError) as error:
        raise engine.ConfigError(str(error)) from error
    counts = box_counts(train.coco.dataset)
    empty = [name for name, cid in zip(train.class_names, train.category_ids) if not counts[cid]]
    if empty:
        logger.warning("classes without a box in %s (trained as negatives only): %s", paths["train_ann"],
                       ", ".join(empty))
    loader = build_dataloader(train, config["batch_size"], shuffle=True, num_workers=config["workers"],
                              seed=distributed.rank_seed(config["seed"]),
                              sampler=distributed.train_sampler(train, config["seed"]))
    if loader.num_workers > 0:
        # Start the persistent workers now: a DataLoader draws its workers' base seed from the generator
        # before the shuffle, but only on the first epoch, so a resumed run would shuffle differently.
        iter(loader)
    return loader, val, train.class_names


def build_model(config, num_classes, model_config=None):
    """A fresh model (lite0: ImageNet backbone unless no_imagenet), or the architecture a resumed
    checkpoint records (its weights are restored afterwards, so no ImageNet weights are read)."""
    if model_config is not None:
        return create_lightweight_model(**model_config, imagenet_pretrained=False)
    imagenet = has_imagenet_weights(config["model_size"]) and not config["no_imagenet"]
    try:
        model = create_lightweight_model(num_classes, config["model_size"], img_size=config["img_size"],
                                         imagenet_pretrained=imagenet)
    except MissingWeightsPackageError as error:
        raise engine.ConfigError(str(error)) from error
    logger.info("backbone init: %s", "ImageNet weights" if imagenet else "random")
    return model


def build_optimizer(config, model, iters_per_epoch, lr_scale=1.0):
    """AdamW over the backbone/FPN/head groups; linear warmup then cosine warm restarts, per iteration.
    The warmup is capped at 3 epochs (YOLOv5's warmup_epochs): on a small data set 300 iterations can be
    most of the run. The cap depends on the data and batch size only, so a resumed run builds the same.
    `lr_scale` multiplies the peak rates (engine.lr_scale_factor for the global batch)."""
    optimizer = torch.optim.AdamW(model.get_param_groups(config["backbone_lr"] * lr_scale, config["fpn_lr"] * lr_scale,
                                                         config["head_lr"] * lr_scale, config["weight_decay"]))
    warmup_iters = min(config["warmup_iters"], 3 * iters_per_epoch)
    scheduler = engine.build_warmup_cosine_restarts(optimizer, warmup_iters, config["warmup_start_factor"],
                                                    config["T_0"] * iters_per_epoch, config["T_mult"],
                                                    config["eta_min"])
    return optimizer, scheduler


# ---- run folder, per-epoch logging and checkpoints ---------------------------------------------------
def prepare_run_dir(config, checkpoint):
    """A new multi_class_<stamp> folder, or the resumed run's own (the parent of its checkpoints/)."""
    if checkpoint is None:
        return engine.create_run_dir(config["output_dir"], "multi_class")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(config["resume"])))
    later = [row["epoch"] for row in engine.MetricsLog(run_dir).rows if int(row["epoch"]) > checkpoint["epoch"]]
    if later:
        logger.warning("resuming %s from epoch %d: metrics of epochs %s and last.pth will be replaced",
                       run_dir, checkpoint["epoch"], ", ".join(later))
    config["output_dir"] = os.path.dirname(run_dir)
    return run_dir


def is_new_best(value, best):
    """NaN (nothing to score) is never best; a tie keeps the earlier epoch."""
    return value is not None and math.isfinite(value) and (best is None or value > best)


def epoch_row(epoch, train_metrics, optimizer, metrics, best_map, epoch_time):
    row = {"epoch": epoch}
    row.update({k: v for k, v in train_metrics.items() if k.startswith("loss")})
    row.update({k: train_metrics.get(k, 0) for k in ("nonfinite_steps", "images_skipped")})
    for group in optimizer.param_groups:  # one lr per layer group; its no-decay twin has the same
        row.setdefault(f"lr_{group['layer_group']}", group["lr"])
    row.update({"images_per_second": train_metrics["images_per_second"], "epoch_time": epoch_time})
    if metrics is not None:
        row.update({k: metrics[k] for k in ("mAP", "mAP50", "mAP75", "precision", "recall", "f1")})
    row["best_mAP"] = best_map
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}


def log_epoch(row, epochs, is_best):
    scores = (f" | mAP {row['mAP']:.4f} mAP50 {row['mAP50']:.4f} P {row['precision']:.3f} "
              f"R {row['recall']:.3f}{' (best)' if is_best else ''}" if "mAP" in row else "")
    logger.info("epoch %d/%d: loss %.4f (cls %.4f, box %.4f) lr %s | %.1f img/s, %.1f s%s", row["epoch"], epochs,
                row["loss"], row["loss_cls"], row["loss_box"],
                " ".join(f"{k[3:]} {v:.2e}" for k, v in row.items() if k.startswith("lr_")),
                row["images_per_second"], row["epoch_time"], scores)


def output_paths(run_dir):
    return {"last_checkpoint": os.path.join(run_dir, "checkpoints", "last.pth"),
            "best_checkpoint": os.path.join(run_dir, "checkpoints", "best.pth"),
            "last_backbone": os.path.join(run_dir, "backbone_weights", "last_backbone.pth"),
            "best_backbone": os.path.join(run_dir, "backbone_weights", "best_backbone.pth")}


def save_epoch(run_dir, config, class_names, model, ema, optimizer, scheduler, scaler, epoch, best_map, metrics,
               is_best):
    """last.pth and last_backbone.pth every epoch, epoch_<N>.pth every save_interval, best.pth and
    best_backbone.pth on a new best mAP; the backbone files hold the EMA weights, which were scored."""
    paths = output_paths(run_dir)
    checkpoint = engine.training_checkpoint(model, ema, class_names, config, optimizer, scheduler, scaler,
                                            epoch=epoch, best_map=best_map, stage="pretrain")
    mAP = metrics["mAP"] if metrics is not None else None
    backbone = ema.module.backbone_checkpoint(class_names=list(class_names), epoch=epoch, mAP=mAP)
    save_checkpoint(checkpoint, paths["last_checkpoint"])
    save_checkpoint(backbone, paths["last_backbone"])
    if epoch % config["save_interval"] == 0:
        save_checkpoint(checkpoint, os.path.join(run_dir, "checkpoints", f"epoch_{epoch}.pth"))
    if is_best:
        save_checkpoint(checkpoint, paths["best_checkpoint"])
        save_checkpoint(backbone, paths["best_backbone"])


# ---- main ----------------------------------------------------------------------------------------------
def main(argv=None):
    """Pretrain (or resume); returns the last evaluation's metrics plus best_mAP, class_names and paths.

    Under torchrun every rank trains on its shard; rank 0 evaluates, logs and writes, and returns the
    dict; the other ranks return {}.
    """
    config, checkpoint, typed = parse_config(argv)
    hint = None if config["device"] else distributed.torchrun_hint("pretrain_multi_class.py",
                                                                     sys.argv[1:] if argv is None else argv)
    if hint:
        raise engine.ConfigError(hint)
    device = distributed.init_distributed(config["device"])
    is_main = distributed.is_main_process()
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", force=True)
    config["device"] = str(device)
    engine.seed_everything(distributed.rank_seed(config["seed"]))
    loader, val_dataset, class_names = build_data(config, strict_classes="classes" in typed or checkpoint is not None)
    config["classes"] = list(class_names)
    run_dir = prepare_run_dir(config, checkpoint) if is_main else None
    if is_main:
        engine.write_json_atomic(config, os.path.join(run_dir, "config.json"))
    logger.info("run folder %s\neffective config:\n%s", run_dir,
                "\n".join(f"  {key}: {json.dumps(value)}" for key, value in config.items()))
    if is_main:
        logger.info("training data:\n%s", dataset_report(loader.dataset, config["img_size"]))

    model = build_model(config, len(class_names), checkpoint and checkpoint["model_config"]).to(device)
    if config["sync_bn"]:
        model = distributed.convert_sync_batchnorm(model)
    distributed.broadcast_model(model)  # every rank starts from rank 0's random init
    logger.info("%s %s, %d classes: %s", config["model_size"], type(model).__name__, len(class_names),
                engine.describe_trainable(model))
    world_size = distributed.get_world_size()
    lr_scale = engine.lr_scale_factor(config["lr_scaling"], config["batch_size"], world_size,
                                      config["lr_reference_batch_size"])
    logger.info("%d process(es) x batch %d = global batch %d; learning rates x %.3g (%s scaling)", world_size,
                config["batch_size"], world_size * config["batch_size"], lr_scale, config["lr_scaling"])
    optimizer, scheduler = build_optimizer(config, model, len(loader), lr_scale)
    ema = engine.build_ema(model, config["ema_decay"], config["ema_ramp_iters"])
    scaler = engine.build_grad_scaler(device, config["amp"], config["amp_dtype"])
    criterion = DetectionLoss()
    start_epoch, best_map = 1, None
    if checkpoint is not None:
        engine.restore_training_state(checkpoint, model, ema, optimizer, scheduler, scaler)
        start_epoch, best_map = checkpoint["epoch"] + 1, checkpoint.get("best_map")
        logger.info("resumed from %s at epoch %d (best mAP so far %s)", config["resume"], start_epoch, best_map)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size
    train_model = distributed.wrap_model(model, device)  # every parameter trains: one wrapper for the run

    writer = engine.create_tensorboard_writer(run_dir) if is_main else None
    metrics_log = engine.MetricsLog(run_dir, writer, keep_until=checkpoint["epoch"] if checkpoint else 0) if is_main else None
    metrics, streak = None, 0
    last_path = output_paths(run_dir)["last_checkpoint"] if run_dir else ""
    with engine.training_faults("pretrain_multi_class.py", last_path, run_dir, writer):
        for epoch in range(start_epoch, config["epochs"] + 1):
            loader.generator.manual_seed(distributed.rank_seed(config["seed"] + epoch))  # the same order when resumed
            distributed.set_epoch(loader, epoch)
            started = time.perf_counter()
            train_metrics = engine.train_one_epoch(
                train_model, criterion, optimizer, loader, device, epoch, scheduler, ema, scaler, config["amp"],
                config["clip_grad_norm"], progress=config["progress"] and is_main,
                description=f"epoch {epoch}/{config['epochs']}", writer=writer, global_step=(epoch - 1) * len(loader),
                log_interval=config["print_freq"], amp_dtype=config["amp_dtype"],
                max_nonfinite_steps=config["max_nonfinite_steps"], nonfinite_streak=streak)
            streak = train_metrics["nonfinite_streak"]
            engine.check_skipped_images(train_metrics, loader, config["max_bad_image_fraction"], epoch)
            if world_size > 1:
                logger.info("epoch %d data shards: %s", epoch, distributed.describe_shards(train_metrics["image_ids"]))
            if is_main:
                metrics, best_map = finish_epoch(run_dir, config, class_names, model, ema, optimizer, scheduler,
                                                 scaler, epoch, best_map, train_metrics, val_dataset, metrics_log,
                                                 writer, started)
            distributed.barrier()  # the other ranks wait while rank 0 evaluates and writes
    distributed.check_in_sync(model)
    if not is_main:
        return {}
    writer.close()
    paths = output_paths(run_dir)

    if best_map is None:
        logger.warning("no epoch had a defined mAP (no validation boxes?), so there is no best.pth")
        paths.update(best_checkpoint=None, best_backbone=None)
    logger.info("last evaluation (epoch %d):\n%s\nbest mAP %s; backbone for fine-tuning: %s", config["epochs"],
                format_metrics(metrics), best_map, paths["best_backbone"])
    return {**metrics, "best_mAP": best_map, "epochs": config["epochs"], "class_names": list(class_names),
            "run_dir": run_dir, **paths}


def finish_epoch(run_dir, config, class_names, model, ema, optimizer, scheduler, scaler, epoch, best_map,
                 train_metrics, val_dataset, metrics_log, writer, started):
    """Rank 0's end of an epoch: evaluate the EMA, log the row, write the checkpoints.
    Returns (metrics or None, best mAP)."""
    device = next(model.parameters()).device
    evaluated = epoch % config["eval_interval"] == 0 or epoch == config["epochs"]
    metrics = evaluate(ema.module, val_dataset, device, conf_threshold=config["conf_threshold"],
                       num_workers=config["workers"]) if evaluated else None
    is_best = is_new_best(metrics and metrics["mAP"], best_map)
    best_map = metrics["mAP"] if is_best else best_map
    row = epoch_row(epoch, train_metrics, optimizer, metrics, best_map, time.perf_counter() - started)
    metrics_log.log(row, epoch)
    if evaluated:
        engine.log_validation_images(writer, ema.module, val_dataset, epoch, class_names,
                                     conf_threshold=config["conf_threshold"])
    save_epoch(run_dir, config, class_names, model, ema, optimizer, scheduler, scaler, epoch, best_map,
               metrics, is_best)
    log_epoch(row, config["epochs"], is_best)
    return metrics, best_map


def run(argv=None):
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    engine.run_script(main, argv, bad_input=(engine.ConfigError,))


if __name__ == "__main__":
    run()
