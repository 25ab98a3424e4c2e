"""Fine-tune a pretrained detector to one class, or a few, in three stages: heads, then + FPN, then everything.

    python finetune_single_class.py --class-name kangaroo --train-root photos/images --train-ann photos/annots \\
        --val-root val/images --val-ann val/annots                       # lite0 from its starting weights
    python finetune_single_class.py --class-name solid dashed --train-ann road/data.yaml    # two classes
    python finetune_single_class.py --all-classes --train-ann defects/annots --class-init by_name
    python finetune_single_class.py --init pretrain_results/multi_class_<stamp>/best_model.pth \\
        --class-name whiteline --train-root data/train/JPEGImages --train-ann data/train/annotations.json \\
        --val-root data/val --val-ann data/val/annotations.json
    python finetune_single_class.py --init imagenet ...   # lite0's ImageNet backbone, FPN and head from scratch
    python finetune_single_class.py --init random ...     # the baseline: the same schedule from random weights
    python finetune_single_class.py --config my.json --epochs 40 --name kangaroo_40ep
    python finetune_single_class.py ... --epochs 1      # a smoke test of one's data: stages without an epoch skip
    python finetune_single_class.py --resume finetune_results/whiteline_<stamp>
    torchrun --nproc_per_node=2 finetune_single_class.py --config my.json --amp

In Python (a notebook): `from finetune_single_class import finetune; summary = finetune(class_name=..., ...)`,
keyword arguments being the config keys (class_name: a name, "a,b" or a list).

Classes: --class-name names them (the order is the label order; several names or a comma list), --all-classes takes
every category of the data, and neither takes the data's only one. One class runs exactly as the single-class script
always did. --class-init by_name starts the class output of each class the starting checkpoint knows by name (the
starter's COCO classes, with synonyms such as motorbike/motorcycle) from that checkpoint's own row
(checkpoints.match_class_names); the default, none, starts every class output afresh.

Every default lives in config_transfer_learning.json ("finetuning" and "optimization"); a --config file
(sections or flat keys) overrides it, and flags override both. --init chooses the starting weights (see
checkpoints.load_init); --pretrained-backbone PATH and --no-pretrained are its older spellings.
--resume continues an interrupted run exactly (weights, optimizer, schedule, stage, EMA, RNG).
Writes OUTPUT_DIR/<class>_<stamp>/ (a+b_<stamp> for classes a and b, N_classes_<stamp> for more than three;
OUTPUT_DIR/NAME with --name): best_model.pth, last_model.pth, config.json, metrics.csv, summary.json,
pr_curve.csv, per_class.csv, results.png, tensorboard/; with two or more classes also confusion_matrix.png.
"""
import logging
import os
import time

import config as cfg
import distributed
import engine
import runs
from checkpoints import CLASS_INITS, INITS, STARTER_SIZE, init_model_size, restore_training_state
from dataset_coco import CocoDetectionDataset, augmented_side, build_transforms, dataset_report, load_train_val
from evaluate import format_per_class
from model_lightweight import LAYER_GROUPS, MODEL_SIZES, STRIDES
from trainer import (build_model, build_optimizer, describe_trainable, fit, new_trainer, setup_process,
                     stage_writer_note, training_loader)

logger = logging.getLogger("finetune")

SCRIPT = "finetune"
SCRIPT_FILE = "finetune_single_class.py"
FIXED_KEYS = ("model_size", "img_size", "class_name", "all_classes")  # a resumed run keeps them
MAX_NAMED_CLASSES = 3  # a run folder is named after up to this many classes, else after their count
STAGES = (  # (name, pretrained layer groups the stage releases)
    ("heads", ("head",)),
    ("heads+fpn", ("fpn", "head")),
    ("all", ("backbone", "fpn", "head")),
)


def get_args_parser(defaults):
    def default(key, text):
        return cfg.help_default(defaults, key, text)
    parser = cfg.argument_parser(__doc__)
    parser.add_argument("--config", help="JSON file (sections or flat keys) over config_transfer_learning.json")
    cfg.add_init_flags(parser, default("init", "starting weights: starter, imagenet, random, or a checkpoint or "
                                               "backbone file (none: starter for lite0)"))
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--class-name", nargs="+", metavar="NAME",
                         help="categories to detect (case-insensitive), in label order: --class-name a b, or a comma "
                              "list a,b; default: the data's only one")
    classes.add_argument("--all-classes", action="store_true", help="every category of the data, in id order")
    parser.add_argument("--class-init", choices=CLASS_INITS, help=default(
        "class_init", "by_name: start the class outputs of classes the starting checkpoint knows by name from its "
                      "own; none: all afresh"))
    cfg.add_data_flags(parser, defaults)
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES),
                        help=default("model_size", "nano | tiny | small | lite0; --init PATH: the file's size"))
    parser.add_argument("--epochs", type=int, help=default("epochs", "total epochs, shared by the three stages in "
                                                                     "the config's proportions; 1 or 2 (a smoke test "
                                                                     "of the data) go to the last stage, then the "
                                                                     "first"))
    parser.add_argument("--img-size", type=int, help=default("img_size", "square input side, a multiple of 32"))
    parser.add_argument("--batch-size", type=int, help=default("batch_size", "per process (GPU)"))
    cfg.add_run_flags(parser, defaults)
    return parser


# ---- configuration ------------------------------------------------------------------------------------------
def resolve_config(typed, argv=None):
    """config_transfer_learning.json < --config < `typed` (flags or keyword arguments); on --resume the run's own
    config < --config < `typed`. Returns (config, resume checkpoint or None)."""
    config, explicit = cfg.resolve("finetuning", typed)
    config, checkpoint = runs.resume(config, explicit, runs.LAYOUT, SCRIPT, FIXED_KEYS)
    config["class_name"] = parse_class_names(config["class_name"])  # also a run's from before #28: one string
    cfg.check_data(config, explicit)
    if checkpoint is None:
        resolve_init(config, typed)
    if config["epochs"] is not None:
        if config["epochs"] < 1:
            raise cfg.ConfigError(f"epochs must be >= 1, got {config['epochs']}")
        stage_epochs = share_epochs(config["epochs"], [config[f"stage{i}_epochs"] for i in (1, 2, 3)])
        config.update({f"stage{i}_epochs": epochs for i, epochs in enumerate(stage_epochs, start=1)})
    check_config(config)
    runs.check_not_finished(checkpoint, sum(config[f"stage{i}_epochs"] for i in (1, 2, 3)), config["resume"])
    return config, checkpoint


def parse_config(argv=None):
    """The resolved config of a command line (see resolve_config)."""
    return resolve_config(typed_flags(argv))[0]


def typed_flags(argv):
    return vars(get_args_parser(cfg.script_defaults("finetuning")).parse_args(argv))


def resolve_init(config, typed):
    """The starting weights: --init, else lite0's starter; a file's model size unless --model-size was typed."""
    init = config["init"]
    if init not in (None, *INITS) and not os.path.isfile(init):
        raise cfg.ConfigError(f"pretrained backbone not found: {init} (--init takes starter, imagenet, random or "
                              f"a checkpoint or backbone file)")
    try:
        source_size = init_model_size(init)
    except ValueError as error:
        raise cfg.ConfigError(str(error)) from None
    if source_size and "model_size" not in typed:
        config["model_size"] = source_size
    if init is None:
        if config["model_size"] != STARTER_SIZE:
            raise cfg.ConfigError(f"model_size {config['model_size']!r} has no pretrained weights of its own: pass "
                                  f"--init PATH (a pretraining's checkpoint or backbone file) or --init random")
        config["init"] = "starter"


def parse_class_names(value):
    """class_name as a list of names: a name, "a,b" or a list (of names or comma lists); None stays None."""
    if value is None:
        return None
    parts = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if parts is None or not all(isinstance(part, str) for part in parts):
        raise cfg.ConfigError(f"class_name must be a name, 'a,b' or a list of names, got {value!r}")
    names = [name.strip() for part in parts for name in part.split(",") if name.strip()]
    if not names:
        raise cfg.ConfigError(f"class_name {value!r} names no class")
    return names


def check_classes(config, class_names):
    """num_classes, where set, equals the number of classes (it follows them when null)."""
    if config["num_classes"] is not None and config["num_classes"] != len(class_names):
        raise cfg.ConfigError(f"num_classes is {config['num_classes']} but the classes are {len(class_names)} "
                              f"({', '.join(class_names)}); drop num_classes (it follows the class list) or name "
                              f"{config['num_classes']} classes")


def check_config(config):
    """Cross-field checks up front, each a one-line error."""
    if config["class_name"] is not None and config["all_classes"]:
        raise cfg.ConfigError(f"class_name {config['class_name']} and all_classes both choose the classes; pass one")
    if config["class_name"] is not None:
        check_classes(config, config["class_name"])
    if config["num_classes"] is not None and config["num_classes"] < 1:
        raise cfg.ConfigError(f"num_classes must be >= 1 (or null: the number of classes), got {config['num_classes']}")
    if config["class_init"] not in CLASS_INITS:
        raise cfg.ConfigError(f"class_init must be one of {', '.join(CLASS_INITS)}, got {config['class_init']!r}")
    for i in range(1, 4):
        if config[f"stage{i}_epochs"] < 0:
            raise cfg.ConfigError(f"stage{i}_epochs must be >= 0, got {config[f'stage{i}_epochs']}")
    if sum(config[f"stage{i}_epochs"] for i in range(1, 4)) == 0:
        raise cfg.ConfigError("every stage has 0 epochs: set stage1_epochs, stage2_epochs or stage3_epochs")
    if config["backbone_freeze_stride"] not in (0, 2, 4, 8, 16, 32):
        raise cfg.ConfigError(f"backbone_freeze_stride must be 0 (nothing kept frozen) or a stride 2, 4, 8, 16 or 32, "
                              f"got {config['backbone_freeze_stride']}")
    cfg.check_common(config, max(STRIDES))


def share_epochs(total_epochs, proportions):
    """--epochs over the stages: split_epochs, or with fewer epochs than stages (--epochs 1 or 2, a smoke test of
    one's data) one epoch to the last stage, then to the earliest (heads, then everything: the recipe in
    miniature). The stages left at 0 are skipped."""
    used = [index for index, weight in enumerate(proportions) if weight > 0]
    if 0 < total_epochs < len(used):
        funded = ([used[-1]] + used[:-1])[:total_epochs]
        return tuple(1 if index in funded else 0 for index in range(len(proportions)))
    return split_epochs(total_epochs, proportions)


def split_epochs(total_epochs, proportions):
    """Stage epochs in the recipe's proportions (E/4, E/4, the rest for 10:10:20): the earlier stages round down
    to at least 1 epoch each, the last stage with epochs takes what is left; a stage with 0 stays at 0. Every
    stage of the recipe gets an epoch (the transfer study compares whole recipes), so fewer are refused."""
    used = [index for index, weight in enumerate(proportions) if weight > 0]
    if not used:
        raise cfg.ConfigError("the recipe has no stage with epochs (stage1_epochs..stage3_epochs all 0)")
    if total_epochs < len(used):
        raise cfg.ConfigError(f"--epochs {total_epochs} is too few for the {len(used)}-stage recipe "
                              f"(proportions {list(proportions)}); use at least {len(used)}")
    epochs = [max(1, int(total_epochs * weight / sum(proportions))) if weight > 0 else 0 for weight in proportions]
    epochs[used[-1]] = 0
    while sum(epochs) >= total_epochs:  # the minimum of 1 ate the last stage's share: take from the largest
        epochs[max(used[:-1], key=lambda index: epochs[index])] -= 1
    epochs[used[-1]] = total_epochs - sum(epochs)
    return tuple(epochs)


# ---- stages -------------------------------------------------------------------------------------------------
def stage_plan(config, pretrained_groups):
    """The stages to run: index (1-3), name, layer groups trained, per-group lrs, first and last epoch.

    The stages release the *pretrained* groups as the recipe says (heads, then the FPN, then the backbone, each
    at its own rate); a group that starts from random weights (`pretrained_groups` lacks it: the FPN after a
    backbone-only or ImageNet init, everything after --init random) trains from stage 1 at the stage's head
    rate, BatchNorm in train mode. Frozen random features with their initial BatchNorm statistics teach the head
    nothing it can keep: releasing them later changes the head's inputs at once (the stage-boundary collapse).
    """
    plan, first = [], 1
    for index, (name, released) in enumerate(STAGES, start=1):
        epochs = config[f"stage{index}_epochs"]
        if epochs == 0:
            logger.info("stage %d (%s) has 0 epochs: skipped", index, name)
            continue
        groups = tuple(g for g in LAYER_GROUPS if g in released or g not in pretrained_groups)
        lrs = {group: config[f"stage{index}_{group if group in pretrained_groups else 'head'}_lr"] for group in groups}
        plan.append({"index": index, "name": name, "groups": groups, "lrs": lrs, "first_epoch": first,
                     "last_epoch": first + epochs - 1})
        first += epochs
    return plan


def describe_stage(stage, pretrained_groups):
    """'trains head (pretrained) at 0.002, fpn (new) at 0.002; frozen: backbone (pretrained)'."""
    def origin(group):
        return "pretrained" if group in pretrained_groups else "new"
    trained = ", ".join(f"{g} ({origin(g)}) at {stage['lrs'][g]:g}" for g in stage["groups"])
    frozen = ", ".join(f"{g} ({origin(g)})" for g in LAYER_GROUPS if g not in stage["groups"]) or "nothing"
    return f"trains {trained}; frozen: {frozen}"


def begin_stage(trainer, stage):
    """Freeze what the stage does not train (BatchNorm statistics too; stage3_train_bn false keeps the pretrained
    backbone's and FPN's frozen in stage 3; a pretrained backbone's layers up to backbone_freeze_stride stay frozen
    throughout), a fresh AdamW and schedule over the rest, restored from the resumed checkpoint when the run resumes
    inside this stage, and a new DDP wrapper (it hooks the parameters trainable now)."""
    config, state, checkpoint = trainer.config, trainer.state, trainer.resume_from
    model, pretrained = state.model, set(trainer.provenance["pretrained"])
    model.freeze_backbone("backbone" not in stage["groups"])
    model.freeze_fpn("fpn" not in stage["groups"])
    early_stride = config["backbone_freeze_stride"] if "backbone" in pretrained else 0
    model.freeze_early_backbone(early_stride)
    if stage["index"] == 3 and not config["stage3_train_bn"]:
        for group in pretrained & {"backbone", "fpn"}:
            model.freeze_batchnorm(group)
    state.optimizer = build_optimizer(model, stage["lrs"], config)
    total = (stage["last_epoch"] - stage["first_epoch"] + 1) * len(trainer.loader)
    warmup = min(config["stage_warmup_iters"], int(total * config["stage_warmup_max_fraction"]))
    state.scheduler = engine.build_warmup_cosine(state.optimizer, total, warmup, config["warmup_start_factor"],
                                                 config["stage_final_lr_factor"])
    if checkpoint is not None and stage["first_epoch"] <= checkpoint["epoch"] + 1 <= stage["last_epoch"]:
        inside = checkpoint.get("stage") == stage["index"]  # else it resumes at this stage's first epoch
        restore_training_state(checkpoint, state, optimizer=inside)
    trainer.train_model = None  # drop the previous stage's wrapper before building the next
    trainer.train_model = distributed.wrap_model(model, next(model.parameters()).device)
    early = (f"; the backbone's stem and stages to stride {early_stride} stay frozen"
             if early_stride and "backbone" in stage["groups"] else "")
    logger.info("stage %d (%s), epochs %d-%d: %s%s; %s", stage["index"], stage["name"], stage["first_epoch"],
                stage["last_epoch"], describe_stage(stage, pretrained), early, describe_trainable(model))
    stage_writer_note(trainer.run, stage)


# ---- data and model -----------------------------------------------------------------------------------------
def build_data(config, classes=None):
    """Training loader (moderate augmentation) and val dataset (original images) of the run's classes (`classes`, a
    resumed run's; else class_name, or every category with all_classes), their names, and the split record when
    part of the training annotations is held out for validation."""
    classes = classes or config["class_name"]
    bad = config["max_bad_image_fraction"]
    try:
        (train_data, train_root), (val_data, val_root), split = load_train_val(
            config["train_ann"], config["train_root"], config["val_ann"], config["val_root"], config["val_fraction"],
            runs.saved_split(config))
        train = CocoDetectionDataset(train_data, train_root, classes=classes, max_missing_fraction=bad,
                                     transforms=build_transforms(config["augmentation"], config["img_size"]),
                                     decode_side=augmented_side(config["augmentation"], config["img_size"]))
        val = CocoDetectionDataset(val_data, val_root, classes=train.class_names, max_missing_fraction=bad,
                                   decode_side=config["img_size"])
    except (FileNotFoundError, ValueError) as error:
        raise cfg.ConfigError(str(error)) from None
    if classes is None and not config["all_classes"] and len(train.class_names) != 1:
        raise cfg.ConfigError(f"{config['train_ann']} has {len(train.class_names)} categories; choose with "
                              f"--class-name ({', '.join(train.class_names)}), or take them all with --all-classes")
    check_classes(config, train.class_names)
    if train.stats["boxes_kept"] == 0:
        s = train.stats
        raise cfg.ConfigError(
            f"no usable {' or '.join(repr(name) for name in train.class_names)} box in {config['train_ann']}: "
            f"{s['images_missing']} of "
            f"{s['images_total']} images missing on disk, {s['boxes_dropped']} boxes dropped as degenerate or "
            f"non-finite, {s['crowd_ignored']} crowd boxes ignored; check --class-name and the annotation file")
    return training_loader(train, config, drop_last=True), val, train.class_names, split


def train(config, checkpoint=None, argv=None):
    """Run (or resume) a fine-tuning. Returns the summary (also in summary.json); {} on ranks > 0 under torchrun,
    where every rank trains on its shard and rank 0 evaluates and writes."""
    started = time.perf_counter()
    device = setup_process(config, SCRIPT_FILE, argv)
    loader, val_dataset, class_names, split = build_data(config, checkpoint["class_names"] if checkpoint else None)
    if distributed.is_main_process():
        logger.info("training data:\n%s", dataset_report(loader.dataset, config["img_size"]))
    model, provenance = build_model(config, len(class_names), checkpoint,
                                    class_names if config["class_init"] == "by_name" else None)
    logger.info("pretrained groups: %s; new (random) groups: %s", ", ".join(provenance["pretrained"]) or "none",
                ", ".join(provenance["new"]) or "none")
    run = (runs.open_run(config, class_names, runs.LAYOUT, SCRIPT, run_name(class_names), provenance,
                         checkpoint) if distributed.is_main_process() else None)
    runs.write_split(run, split)
    trainer = new_trainer(config, model, provenance, loader, val_dataset, run, device, checkpoint)
    fit(trainer, stage_plan(config, set(provenance["pretrained"])), begin_stage, SCRIPT_FILE)
    if run is None:
        return {}
    summary = runs.close_run(run)
    logger.info(runs.final_line(summary, time.perf_counter() - started))
    if len(class_names) > 1 and summary.get("per_class"):
        logger.info("best epoch per class (%s):\n%s", runs.PER_CLASS_FILE, format_per_class(summary["per_class"]))
    return summary


def run_name(class_names):
    """The run folder's name before its stamp: the class ('kangaroo'), 'a+b' for a few, 'N_classes' for more."""
    if len(class_names) > MAX_NAMED_CLASSES:
        return f"{len(class_names)}_classes"
    return "+".join(name.replace(" ", "_").replace("/", "_") for name in class_names)


def finetune(**settings):
    """Fine-tune from Python: keyword arguments are the config keys (those of config_transfer_learning.json's
    "finetuning" and "optimization" sections, plus config, resume, device and progress). Returns the summary.

    Logging is left as the caller configured it (logging.basicConfig(level=logging.INFO) shows the epochs).
    """
    config, checkpoint = resolve_config(settings)
    return train(config, checkpoint)


def main(argv=None):
    """The command line: finetune() with its output on stderr; returns the summary."""
    return cfg.command_line(argv, lambda args: resolve_config(typed_flags(args)), train)


def run():
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    cfg.run_cli(main, bad_input=cfg.TRAINING_INPUT_ERRORS)


if __name__ == "__main__":
    run()
