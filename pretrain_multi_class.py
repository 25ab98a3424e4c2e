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

Outputs, in OUTPUT_DIR/multi_class_<YYYYmmdd_HHMMSS>/ (OUTPUT_DIR/NAME with --name): the files of every run
(runs.py: best_model.pth, last_model.pth, config.json, metrics.csv, summary.json, ...), snapshots/epoch_<N>.pth
every save_interval epochs, and backbone_weights/{best,last}_backbone.pth.
"""
import collections
import logging
import time

import config as cfg
import distributed
import engine
import runs
from checkpoints import restore_training_state
from dataset_coco import (CocoDetectionDataset, augmented_side, build_transforms, coco_layout_paths, dataset_report,
                          load_train_val)
from model_lightweight import LAYER_GROUPS, MODEL_SIZES, STRIDES, has_imagenet_weights
from trainer import build_model, build_optimizer, describe_trainable, fit, new_trainer, setup_process, training_loader

logger = logging.getLogger("pretrain")

SCRIPT = "pretrain"
SCRIPT_FILE = "pretrain_multi_class.py"
LAYOUT = {**runs.LAYOUT, **runs.BACKBONE_LAYOUT}  # the run contract, plus the backbone files fine-tuning can start from
FIXED_KEYS = ("model_size", "img_size", "classes")  # a resumed run keeps them
STAGE = {"index": 1, "name": "pretrain", "groups": LAYER_GROUPS, "first_epoch": 1}  # one stage: everything trains


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
    cfg.add_run_flags(parser, defaults)
    return parser


# ---- configuration ------------------------------------------------------------------------------------------
def resolve_config(typed):
    """config_transfer_learning.json < --config < `typed` (flags or keyword arguments); on --resume the run's own
    config < --config < `typed`. Returns (config, resume checkpoint or None)."""
    config, explicit = cfg.resolve("pretraining", typed)
    config, checkpoint = runs.resume(config, explicit, LAYOUT, SCRIPT, FIXED_KEYS)
    if config["train_ann"]:
        cfg.check_data(config, explicit)
    # a resumed run keeps the classes it trained (those of the requested ones that had boxes)
    config["classes"] = list(checkpoint["class_names"]) if checkpoint else parse_classes(config["classes"])
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
    for key in ("epochs", "T_0", "T_mult"):
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
            train_ann, train_root, val_ann, val_root, config["val_fraction"], runs.saved_split(config))
        classes = config["classes"]
        if isinstance(classes, list) and not config["strict_classes"]:
            classes = present_classes(classes, train_data, train_ann)
        bad = config["max_bad_image_fraction"]
        train = CocoDetectionDataset(train_data, train_root, classes=classes, max_missing_fraction=bad,
                                     transforms=build_transforms(config["augmentation"], config["img_size"]),
                                     decode_side=augmented_side(config["augmentation"], config["img_size"]))
        val = CocoDetectionDataset(val_data, val_root, classes=train.class_names, max_missing_fraction=bad,
                                   decode_side=config["img_size"])
    except (FileNotFoundError, ValueError) as error:
        raise cfg.ConfigError(str(error)) from error
    counts = box_counts(train.coco.dataset)
    empty = [name for name, cid in zip(train.class_names, train.category_ids) if not counts[cid]]
    if empty:
        logger.warning("classes without a box in %s (trained as negatives only): %s", train_ann, ", ".join(empty))
    return training_loader(train, config), val, train.class_names, split


def begin_stage(trainer, stage):
    """Everything trains: AdamW over the three groups, linear warmup then cosine warm restarts stepped per
    iteration (T_0 in epochs), restored on --resume, and one DDP wrapper. The warmup is capped at
    warmup_max_epochs (YOLOv5's warmup_epochs): on a small data set warmup_iters can be most of the run; the cap
    depends on the data and batch size only, so a resumed run builds the same schedule."""
    config, state = trainer.config, trainer.state
    lrs = {group: config[f"{group}_lr"] for group in LAYER_GROUPS}
    state.optimizer = build_optimizer(state.model, lrs, config)
    iters_per_epoch = len(trainer.loader)
    warmup_iters = min(config["warmup_iters"], config["warmup_max_epochs"] * iters_per_epoch)
    state.scheduler = engine.build_warmup_cosine_restarts(state.optimizer, warmup_iters, config["warmup_start_factor"],
                                                          config["T_0"] * iters_per_epoch, config["T_mult"],
                                                          config["eta_min"])
    if trainer.resume_from is not None:
        restore_training_state(trainer.resume_from, state)
    trainer.train_model = distributed.wrap_model(state.model, next(state.model.parameters()).device)
    logger.info("%s, %d classes: %s", config["model_size"], state.model.num_classes, describe_trainable(state.model))


# ---- the run ------------------------------------------------------------------------------------------------
def train(config, checkpoint=None, argv=None):
    """Pretrain (or resume). Returns the summary (also in summary.json: best and last epoch, metrics, class names,
    the checkpoint and backbone files); {} on ranks > 0 under torchrun, where every rank trains on its shard and
    rank 0 evaluates, logs and writes."""
    started = time.perf_counter()
    device = setup_process(config, SCRIPT_FILE, argv)
    loader, val_dataset, class_names, split = build_data(config)
    if distributed.is_main_process():
        logger.info("training data:\n%s", dataset_report(loader.dataset, config["img_size"]))
    model, provenance = build_model(config, len(class_names), checkpoint)
    run = (runs.open_run(config, class_names, LAYOUT, SCRIPT, "multi_class", provenance, checkpoint)
           if distributed.is_main_process() else None)
    runs.write_split(run, split)
    trainer = new_trainer(config, model, provenance, loader, val_dataset, run, device, checkpoint)
    fit(trainer, [{**STAGE, "last_epoch": config["epochs"]}], begin_stage, SCRIPT_FILE)
    if run is None:
        return {}
    summary = runs.close_run(run)
    line = runs.final_line(summary, time.perf_counter() - started, stages=False)
    if summary["best_model"]:
        line += f"; to fine-tune from it: --init {summary['best_model']} (or its backbone, {summary['best_backbone']})"
    logger.info(line)
    return summary


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
    cfg.run_cli(main, argv, bad_input=cfg.TRAINING_INPUT_ERRORS)


if __name__ == "__main__":
    run()
