"""Multi-class COCO pretraining of the lightweight detector; its checkpoints start the fine-tunings.

Trains on 20-30 common COCO classes (config_transfer_learning.json "pretraining" + "optimization"), scores
the EMA of the weights with COCO mAP, keeps the best by mAP and also writes the backbone alone to
backbone_weights/. Sizes nano/tiny/small start from random weights; lite0 (EfficientNet-Lite0) from its
ImageNet backbone unless --init says otherwise.

    python pretrain_multi_class.py --coco-root /path/to/coco --epochs 100 --batch-size 32 --model-size tiny
    python pretrain_multi_class.py --coco-root data/coco128 --classes 20 --img-size 320 --device cpu --name coco128
    python pretrain_multi_class.py --coco-root /path/to/coco --model-size lite0     # ImageNet -> COCO classes
    python pretrain_multi_class.py --resume pretrain_results/multi_class_<stamp> --epochs 150
    torchrun --nproc_per_node=4 pretrain_multi_class.py --coco-root /path/to/coco --batch-size 32 --amp --sync-bn

In Python: `from pretrain_multi_class import pretrain; result = pretrain(coco_root=..., epochs=...)`.

Outputs, in OUTPUT_DIR/multi_class_<YYYYmmdd_HHMMSS>/ (OUTPUT_DIR/NAME with --name): checkpoints/{last,best,
epoch_<N>}.pth, backbone_weights/{best,last}_backbone.pth, config.json, metrics.csv, summary.json, pr_curve.csv,
results.png, tensorboard/.
"""
import collections
import logging
import time

import torch

import config as cfg
import distributed
import engine
import runs
from dataset_coco import CocoDetectionDataset, build_transforms, coco_layout_paths, dataset_report, load_train_val
from model_lightweight import (LAYER_GROUPS, MODEL_SIZES, STRIDES, has_imagenet_weights)

logger = logging.getLogger("pretrain")

SCRIPT = "pretrain"
LAYOUT = {"last": "checkpoints/last.pth", "best": "checkpoints/best.pth", "snapshot": "checkpoints/epoch_{epoch}.pth",
          "last_backbone": "backbone_weights/last_backbone.pth", "best_backbone": "backbone_weights/best_backbone.pth"}
FIXED_KEYS = ("model_size", "img_size", "classes")  # a resumed run keeps them
STAGE = {"index": 1, "name": "pretrain", "groups": LAYER_GROUPS}  # one stage: everything trains


def get_args_parser(defaults):
    def default(key, text):
        return cfg.help_default(defaults, key, text)
    parser = cfg.argument_parser(__doc__)
    parser.add_argument("--coco-root", help="folder with train2017/, val2017/ and annotations/instances_*2017.json")
    cfg.add_data_flags(parser, defaults)
    parser.add_argument("--config", help="JSON file (sections or flat keys) over config_transfer_learning.json")
    parser.add_argument("--classes", help="comma-separated class names, or K for the K most frequent (default: the "
                                          "config's 30 common COCO classes present in the data)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), help=default("model_size", "architecture"))
    cfg.add_init_flags(parser, default("init", "starting weights: imagenet, random, or a checkpoint or backbone "
                                               "file (none: imagenet for lite0, random for the others)"))
    parser.add_argument("--img-size", type=int, help=default("img_size", "square input side, a multiple of 32"))
    parser.add_argument("--epochs", type=int, help=default("epochs", "last epoch to train"))
    parser.add_argument("--batch-size", type=int, help=default("batch_size", "per process (GPU); the global batch "
                                                                             "is N times it under torchrun"))
    parser.add_argument("--eval-interval", type=int, help=default("eval_interval", "evaluate every N epochs and at "
                                                                                   "the last"))
    parser.add_argument("--save-interval", type=int, help=default("save_interval", "keep checkpoints/epoch_<N>.pth "
                                                                                   "every N epochs"))
    cfg.add_run_flags(parser, defaults)
    return parser


# ---- configuration ------------------------------------------------------------------------------------------
def resolve_config(typed):
    """config_transfer_learning.json < --config < `typed` (flags or keyword arguments); on --resume the run's own
    config < --config < `typed`. Returns (config, resume checkpoint or None)."""
    config, checkpoint, explicit = runs.resolve("pretraining", typed, LAYOUT, SCRIPT, FIXED_KEYS)
    if config["train_ann"]:
        cfg.check_data(config, explicit)
    config["classes"] = parse_classes(config["classes"])
    if config["init"] is None:
        config["init"] = "imagenet" if has_imagenet_weights(config["model_size"]) else "random"
    check_config(config)
    runs.check_not_finished(checkpoint, config["epochs"], config["resume"])
    # names typed (or kept by a resumed run) must all exist; the config's default list keeps those present
    config["strict_classes"] = "classes" in typed or checkpoint is not None
    return config, checkpoint


def typed_flags(argv):
    return vars(get_args_parser(cfg.script_defaults("pretraining")).parse_args(argv))


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
        raise cfg.ConfigError(f"classes must be a list of names, 'name,name,...' or a number K, got {value!r}")
    return value


def check_config(config):
    """Cross-field facts up front, each a one-line error."""
    if not config["coco_root"] and not config["train_ann"]:
        raise cfg.ConfigError("no data: pass --coco-root /path/to/coco, or --train-ann (and --train-root for a COCO "
                              "JSON), or --resume a run")
    if config["coco_root"] and config["train_ann"]:
        raise cfg.ConfigError("pass either --coco-root (COCO 2017's layout) or --train-ann, not both")
    for key in ("epochs", "eval_interval", "save_interval", "T_0", "T_mult"):
        if config[key] < 1:
            raise cfg.ConfigError(f"{key} must be >= 1, got {config[key]}")
    if config["eta_min"] < 0 or config["warmup_iters"] < 0:
        raise cfg.ConfigError("eta_min and warmup_iters must be >= 0")
    cfg.check_common(config, max(STRIDES))


# ---- data, model, optimizer ---------------------------------------------------------------------------------
def box_counts(coco_dict):
    """Non-crowd boxes per category_id of a COCO dict."""
    return collections.Counter(ann["category_id"] for ann in coco_dict.get("annotations", [])
                               if not ann.get("iscrowd", 0))


def present_classes(requested, data, source):
    """The requested names that have at least one box in the COCO dict `data` (spelled as there); warns once
    about the others. The default list names 30 COCO classes, and subsets such as coco128 lack some."""
    counts = box_counts(data)
    names = {c["name"].lower(): c["name"] for c in data.get("categories", []) if counts[c["id"]] > 0}
    kept = [names[name.lower()] for name in requested if name.lower() in names]
    dropped = [name for name in requested if name.lower() not in names]
    if not kept:
        raise cfg.ConfigError(f"none of the {len(requested)} configured classes ({', '.join(requested[:4])}, ...) "
                              f"has a box in {source}; choose with --classes NAME,NAME or --classes K")
    if dropped:
        logger.warning("dropped %d of %d classes without boxes in %s: %s", len(dropped), len(requested),
                       source, ", ".join(dropped))
    return kept


def data_paths(config):
    """(train_ann, train_root, val_ann, val_root): --coco-root's COCO 2017 layout, or the data flags."""
    if config["coco_root"]:
        paths = coco_layout_paths(config["coco_root"])
        return paths["train_ann"], paths["train_images"], paths["val_ann"], paths["val_images"]
    return config["train_ann"], config["train_root"], config["val_ann"], config["val_root"]


def build_data(config):
    """Train loader (strong augmentation) and val dataset (original images) over the same classes, and the split
    record when part of the training annotations is held out for validation."""
    try:
        train_ann, train_root, val_ann, val_root = data_paths(config)
        (train_data, train_root), (val_data, val_root), split = load_train_val(
            train_ann, train_root, val_ann, val_root, config["val_fraction"], runs.saved_split(config, LAYOUT))
        classes = config["classes"]
        if isinstance(classes, list) and not config["strict_classes"]:
            classes = present_classes(classes, train_data, train_ann)
        bad = config["max_bad_image_fraction"]
        train = CocoDetectionDataset(train_data, train_root, classes=classes, max_missing_fraction=bad,
                                     transforms=build_transforms(config["augmentation"], config["img_size"]))
        val = CocoDetectionDataset(val_data, val_root, classes=train.class_names, max_missing_fraction=bad)
    except (FileNotFoundError, ValueError) as error:
        raise cfg.ConfigError(str(error)) from error
    counts = box_counts(train.coco.dataset)
    empty = [name for name, cid in zip(train.class_names, train.category_ids) if not counts[cid]]
    if empty:
        logger.warning("classes without a box in %s (trained as negatives only): %s", train_ann, ", ".join(empty))
    return runs.training_loader(train, config), val, train.class_names, split


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


# ---- the run ------------------------------------------------------------------------------------------------
def train(config, checkpoint=None, argv=None):
    """Pretrain (or resume). Returns the last evaluation's metrics plus best_mAP, class_names, run_dir and the
    checkpoint paths; {} on ranks > 0 under torchrun, where every rank trains on its shard and rank 0 evaluates,
    logs and writes."""
    started = time.perf_counter()
    device = runs.setup_process(config, "pretrain_multi_class.py", argv)
    loader, val_dataset, class_names, split = build_data(config)
    config["classes"] = list(class_names)
    if distributed.is_main_process():
        logger.info("training data:\n%s", dataset_report(loader.dataset, config["img_size"]))
    model, config["provenance"] = runs.build_model(config, len(class_names), checkpoint)
    run = runs.open_run(config, class_names, LAYOUT, SCRIPT, "multi_class", checkpoint) \
        if distributed.is_main_process() else None
    runs.write_split(run, split)
    session = runs.new_session(config, model, loader, val_dataset, run, device)
    state = session.state
    state.optimizer, state.scheduler = build_optimizer(config, state.model, len(loader), runs.lr_scale(config))
    if checkpoint is not None:
        engine.restore_training_state(checkpoint, state)
    session.train_model = distributed.wrap_model(state.model, device)  # everything trains: one wrapper
    logger.info("%s, %d classes: %s", config["model_size"], len(class_names), runs.describe_trainable(state.model))
    metrics, epochs = None, config["epochs"]
    with runs.faults(run, "pretrain_multi_class.py"):
        for epoch in range(checkpoint["epoch"] + 1 if checkpoint else 1, epochs + 1):
            evaluated = epoch % config["eval_interval"] == 0 or epoch == epochs
            metrics = runs.train_epoch(session, {**STAGE, "first_epoch": 1, "last_epoch": epochs}, epoch, epochs,
                                       evaluated) or metrics
            if session.stop:
                break
    distributed.check_in_sync(state.model)
    if run is None:
        return {}
    names = {"last": "last_checkpoint", "best": "best_checkpoint", "last_backbone": "last_backbone",
             "best_backbone": "best_backbone"}
    summary = runs.close_run(run, names)
    paths = {name: summary[name] for name in names.values()}
    line = runs.final_line(summary, paths["best_checkpoint"], time.perf_counter() - started, stages=False)
    if paths["best_checkpoint"]:
        line += f"; to fine-tune from it: --init {paths['best_checkpoint']} (or its backbone, {paths['best_backbone']})"
    logger.info(line)
    return {**(metrics or {}), "best_mAP": run.best_map, "epochs": epochs, "class_names": list(class_names),
            "run_dir": run.run_dir, **paths}


def pretrain(**settings):
    """Pretrain from Python: keyword arguments are the config keys (those of config_transfer_learning.json's
    "pretraining" and "optimization" sections, plus config, resume, device and progress). Logging is left as the
    caller configured it."""
    config, checkpoint = resolve_config(settings)
    return train(config, checkpoint)


def main(argv=None):
    """The command line: pretrain() with its output on stderr."""
    return cfg.command_line(argv, lambda args: resolve_config(typed_flags(args)), train)


def run(argv=None):
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    cfg.run_cli(main, argv)


if __name__ == "__main__":
    run()
