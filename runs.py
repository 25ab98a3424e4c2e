"""A training run's folder and records, the same for both scripts: where a run writes, what it writes at the end of
every epoch, and how it resumes.

    RUN/config.json      the resolved config, with the provenance of the starting weights
    RUN/metrics.csv      one row per epoch, the same columns in both scripts (epoch_record)
    RUN/summary.json     the best epoch, its metrics and calibrated score threshold, the last epoch, the files
    RUN/pr_curve.csv     the best epoch's precision-recall curve at IoU 0.5: every operating point (write_pr_curve)
    RUN/results.png      losses, val mAP and that curve, redrawn after every evaluation (plots.py)
    RUN/tensorboard/     the same numbers per epoch; losses, rates and gradient norms per iteration; val images
    checkpoints          `last` every epoch (resumable), `best` on a new best val mAP (the EMA weights, with the
                         validation best-F1 threshold that predict() then defaults to); where, the script's layout

Only rank 0 keeps a Run; every write is atomic, so a crash never leaves half a file and `last` always holds
whole epochs.
"""
import csv
import dataclasses
import datetime
import logging
import math
import os
import time

import torch

import distributed
import engine
from config import ConfigError, check_types, file_values, load_json, resumed, script_defaults, write_json_atomic
from dataset_coco import build_dataloader, coco_layout_paths, load_train_val, resolve_image_path
from evaluate import evaluate
from losses import DetectionLoss
from plots import PANEL_HEIGHT, plot_results, prediction_grid, truth_and_prediction
from backbone_efficientnet import MissingWeightsPackageError
from model_lightweight import (DEFAULT_CONF_THRESHOLD, LAYER_GROUPS, create_lightweight_model, load_init, model_checkpoint,
                               save_checkpoint)

logger = logging.getLogger(__name__)
SPLIT_FILE = "split.json"
PR_CURVE_FILE = "pr_curve.csv"


@dataclasses.dataclass
class Run:
    """Rank 0's side of a training run: its folder, settings, logs and what it has written so far."""
    run_dir: str
    config: dict
    class_names: list
    layout: dict  # file kind -> path relative to run_dir: "last", "best", optionally "last_backbone",
    #               "best_backbone" and "snapshot" (with {epoch})
    script: str  # "pretrain" or "finetune": checked when a checkpoint is resumed
    writer: object = None
    log: "MetricsLog" = None
    best_map: float = None
    last_saved_epoch: int = None
    summary: dict = dataclasses.field(default_factory=dict)

    def path(self, kind, **fields):
        return os.path.join(self.run_dir, self.layout[kind].format(**fields))


# ---- starting and resuming --------------------------------------------------------------------------------
def create_run_dir(output_dir, name):
    """output_dir/name_YYYYmmdd_HHMMSS, with a numeric suffix if that exists: runs never collide."""
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    base = os.path.join(output_dir, f"{name}_{stamp}")
    path, suffix = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            suffix += 1
            path = f"{base}_{suffix}"


def named_run_dir(output_dir, name, create=False):
    """OUTPUT_DIR/NAME of --name: a new or empty folder; one that holds a run, finished or not, is refused, so a
    reused name never overwrites (or mixes into) another run's files."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"--name must be a folder name (--output-dir says where), got {name!r}")
    path = os.path.join(output_dir, name)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConfigError(f"--name {name}: {path} already exists and is not an empty folder; continue that run with "
                          f"--resume {path}, or choose another --name")
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def run_dir_of(checkpoint_path, layout):
    """The run folder a `last` checkpoint of `layout` lies in (checkpoints/last.pth -> its grandparent)."""
    depth = len(os.path.normpath(layout["last"]).split(os.sep))
    run_dir = os.path.abspath(checkpoint_path)
    for _ in range(depth):
        run_dir = os.path.dirname(run_dir)
    return run_dir


def resolve(section, typed, layout, script, fixed_keys):
    """A script's settings: config_transfer_learning.json's `section` < --config < `typed` (flags or keyword
    arguments), or on --resume the run's own config < --config < `typed`.

    Returns:
        (config, resume checkpoint or None, the keys given explicitly by --config or `typed`).
    """
    defaults = script_defaults(section)
    check_types({k: v for k, v in typed.items() if k != "config"}, defaults, "the arguments")
    from_file = file_values(typed["config"], section, defaults) if typed.get("config") else {}
    config = {**defaults, **from_file, **typed}
    if config["name"] is not None and config["resume"]:
        raise ConfigError("--name names a new run's folder; a resumed run continues in its own, drop --name")
    config, checkpoint = load_resume(config, typed, section, defaults, layout, script, fixed_keys)
    if config["name"] is not None:
        named_run_dir(config["output_dir"], config["name"])  # refused now, not after the data has loaded
    return config, checkpoint, {**from_file, **typed}


def load_resume(config, typed, section, defaults, layout, script, fixed_keys):
    """The config and checkpoint of a --resume: RUN or its `last` checkpoint, the run's own settings with a
    --config file and typed flags over them (those in `fixed_keys` cannot change).

    Returns:
        (config, checkpoint); (config, None) without --resume.
    """
    if not config["resume"]:
        return config, None
    path = config["resume"]
    if os.path.isdir(path):
        path = os.path.join(path, layout["last"])
    if not os.path.isfile(path):
        raise ConfigError(f"--resume checkpoint not found: {path}")
    checkpoint = engine.load_training_checkpoint(path)
    written_by = checkpoint.get("script", "pretrain" if checkpoint.get("stage") == "pretrain" else "finetune")
    if written_by != script:
        raise ConfigError(f"{path} is a {written_by} checkpoint, not a {script} one; resume it with its own script")
    folder = os.path.dirname(layout["last"])
    if folder and os.path.basename(os.path.dirname(os.path.abspath(path))) != folder:
        raise ConfigError(f"--resume expects RUN/{layout['last']} (or RUN), got {path}")
    overrides = {**(file_values(typed["config"], section, defaults) if typed.get("config") else {}), **typed}
    config = resumed(config, checkpoint["config"], overrides, fixed_keys, path)
    config["resume"] = path
    return config, checkpoint


def build_model(config, num_classes, checkpoint=None):
    """The model of a run and the provenance of its weights ({"weights", "pretrained", "new"} layer groups): a new
    run's starting weights come from --init (model_lightweight.load_init); a resumed run's architecture from its
    checkpoint, whose weights are restored later, and its provenance from its config (a run from before
    provenance-aware stages froze every group as the recipe said, so: all pretrained)."""
    if checkpoint is not None:
        model = create_lightweight_model(**checkpoint["model_config"], imagenet_pretrained=False)
        return model, config.get("provenance") or {"weights": "(not recorded)", "pretrained": list(LAYER_GROUPS),
                                                   "new": []}
    try:
        model = create_lightweight_model(num_classes, config["model_size"], img_size=config["img_size"],
                                         imagenet_pretrained=False)
        loaded = load_init(model, config["init"])
    except (MissingWeightsPackageError, ValueError) as error:
        raise ConfigError(str(error)) from None
    logger.info("init: %s", loaded)
    return model, {"weights": loaded, "pretrained": [g for g in LAYER_GROUPS if g in model.pretrained_groups],
                   "new": [g for g in LAYER_GROUPS if g not in model.pretrained_groups]}


def check_not_finished(checkpoint, total_epochs, path):
    """Never overwrite a finished run: resuming needs epochs left to train."""
    if checkpoint is not None and checkpoint["epoch"] >= total_epochs:
        raise ConfigError(f"{path} already finished {checkpoint['epoch']} of {total_epochs} epochs; pass --epochs "
                          f"larger than {checkpoint['epoch']} to train on")


def open_run(config, class_names, layout, script, name, checkpoint=None):
    """Rank 0: a new folder OUTPUT_DIR/<name>_<stamp> (OUTPUT_DIR/NAME with --name), or the resumed run's own;
    config.json, TensorBoard and metrics.csv (rows after the checkpoint's epoch dropped: they are trained again)."""
    if checkpoint is not None:
        run_dir = run_dir_of(config["resume"], layout)
        logger.info("resumed from %s at epoch %d", config["resume"], checkpoint["epoch"] + 1)
    elif config.get("name"):
        run_dir = named_run_dir(config["output_dir"], config["name"], create=True)
    else:
        run_dir = create_run_dir(config["output_dir"], name)
    write_json_atomic(config, os.path.join(run_dir, "config.json"))
    from torch.utils.tensorboard import SummaryWriter  # slow to import; only rank 0 needs it
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    done = checkpoint["epoch"] if checkpoint else 0
    run = Run(run_dir, config, list(class_names), layout, script, writer, MetricsLog(run_dir, writer, done))
    if checkpoint is not None:
        run.best_map, run.last_saved_epoch = checkpoint.get("best_map"), checkpoint["epoch"]
        run.summary = checkpoint.get("summary") or {}
        old_curve = run.summary.pop("best_pr_curve", None)  # runs before pr_curve.csv kept it in the summary
        if old_curve and not os.path.isfile(os.path.join(run_dir, PR_CURVE_FILE)):
            write_pr_curve(old_curve, os.path.join(run_dir, PR_CURVE_FILE))
        if run.best_map is not None and not math.isfinite(run.best_map):  # runs before None meant "no best yet"
            run.best_map = None
    return run


# ---- an epoch ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Session:
    """What the epoch loop of either script touches, on every rank: `run` is rank 0's (None elsewhere) and
    `train_model` is the model or the DistributedDataParallel wrapper that steps it."""
    config: dict
    state: engine.TrainState
    loader: object
    val_dataset: object
    criterion: object
    run: Run = None
    train_model: object = None
    stop: str = None  # why the run stopped early (patience), once it has


def setup_process(config, script_file, argv):
    """This process's device (joining torchrun's process group, if any) and its seed. Plain `python` on a machine
    with several GPUs and no --device is refused with the torchrun command that uses them all."""
    hint = None if config["device"] else distributed.torchrun_hint(script_file, list(argv or []))
    if hint:
        raise ConfigError(hint)
    device = distributed.init_distributed(config["device"])
    engine.seed_everything(distributed.rank_seed(config["seed"]))
    return device


def new_session(config, model, loader, val_dataset, run, device):
    """The model on its device (SyncBatchNorm, rank 0's weights on every rank), its EMA and GradScaler, the loss."""
    model = model.to(device)
    if config["sync_bn"]:
        model = distributed.convert_sync_batchnorm(model)
    distributed.broadcast_model(model)  # every rank starts from rank 0's random layers
    state = engine.TrainState(model, ema=engine.build_ema(model, config["ema_decay"], config["ema_ramp_iters"]),
                              scaler=engine.build_grad_scaler(device, config["amp"], config["amp_dtype"]))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size
    return Session(config, state, loader, val_dataset, DetectionLoss(), run, model)


def training_loader(dataset, config, drop_last=False):
    """The shuffled training loader (a DistributedSampler's shard under torchrun). Its order and augmentations are
    a function of (seed, epoch, image) (dataset_coco.SeededSampler), so a resumed run sees the batches of an
    uninterrupted one whatever the workers did before. `drop_last`: leave out a last partial batch when there are
    whole ones (a batch of a few images gives noisy BatchNorm statistics, which fine-tuning on small sets feels)."""
    sampler = distributed.train_sampler(dataset, config["seed"])
    return build_dataloader(dataset, config["batch_size"], shuffle=True, num_workers=config["workers"],
                            drop_last=drop_last and len(sampler or dataset) > config["batch_size"],
                            seed=distributed.rank_seed(config["seed"]), sampler=sampler)


def saved_split(config, layout):
    """A resumed run's split.json (the images it held out for validation), or None."""
    if not config.get("resume"):
        return None
    path = os.path.join(run_dir_of(config["resume"], layout), SPLIT_FILE)
    return load_json(path, "split file") if os.path.isfile(path) else None


def write_split(run, split):
    """split.json: which images of the training annotations trained and which validated (reused on --resume)."""
    if run is not None and split is not None:
        write_json_atomic(split, os.path.join(run.run_dir, SPLIT_FILE))


# ---- a run's own data, read back by the commands that score and deploy its model ---------------------------------
BEST_CHECKPOINTS = ("best_model.pth", os.path.join("checkpoints", "best.pth"))  # fine-tuning's, pretraining's


def is_run_dir(folder):
    """Whether `folder` is a training run's: its config.json names the run's data."""
    path = os.path.join(folder, "config.json")
    try:
        config = load_json(path, "run config") if os.path.isfile(path) else None
    except ConfigError:
        return False
    return isinstance(config, dict) and bool(config.get("train_ann") or config.get("coco_root"))


def checkpoint_run(path):
    """The run folder a checkpoint (or a model exported beside it) lies in, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    for candidate in (folder, os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None):
        if candidate and is_run_dir(candidate):
            return candidate
    return None


def best_checkpoint(run_dir):
    """A run's best checkpoint: RUN/best_model.pth (fine-tuning) or RUN/checkpoints/best.pth (pretraining)."""
    paths = [os.path.join(run_dir, name) for name in BEST_CHECKPOINTS]
    return next((path for path in paths if os.path.isfile(path)), paths[0])


def run_data(run_dir):
    """The images a run trained and validated on, read back from its config.json and split.json through the loader
    training used (dataset_coco.load_train_val), so that evaluate.py --run, predict.py --run and export.py --int8
    see exactly the run's own parts: scores on the held-out images, INT8 calibrated on the others (issue #26).

    Returns:
        dict with "config" (config.json), "split" (split.json; None when the run had a validation set), and
        "train" and "val", each {"data": COCO dict, "root": its image folder, "images": sorted paths on disk,
        "source": what it is in words ("val part of photos/annots per RUN/split.json"), "ann": the annotation
        path whose images these are all or part of (None for a YOLO data.yaml's val entry)}.

    Raises:
        ConfigError: `run_dir` is not a run folder, or its data cannot be read (one line).
    """
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a training run folder (no config.json naming its data)")
    config = load_json(os.path.join(run_dir, "config.json"), "run config")
    split_path = os.path.join(run_dir, SPLIT_FILE)
    saved = load_json(split_path, "split file") if os.path.isfile(split_path) else None
    try:
        if config.get("coco_root"):  # pretraining on COCO's own layout
            paths = coco_layout_paths(config["coco_root"])
            anns = paths["train_ann"], paths["train_images"], paths["val_ann"], paths["val_images"]
        else:
            anns = config["train_ann"], config.get("train_root"), config.get("val_ann"), config.get("val_root")
        train, val, split = load_train_val(*anns, config.get("val_fraction"), saved)
    except (FileNotFoundError, ValueError) as error:  # config.json's relative paths are the training's folder's
        raise ConfigError(f"cannot read the data of run {run_dir} (as its config.json names it, from the current "
                          f"folder): {str(error).splitlines()[0]}") from None
    train_ann, val_ann = anns[0], anns[2]
    if split is None:
        sources = {"train": (str(train_ann), train_ann),
                   "val": (str(val_ann), val_ann) if val_ann else (f"val entry of {train_ann}", None)}
    else:
        if saved is None:
            logger.warning("%s has no %s: its val part is chosen again by the hash of each path (val_fraction %g), "
                           "so images added since are in it too", run_dir, SPLIT_FILE, split["val_fraction"])
        record = split_path if saved is not None else f"val_fraction {split['val_fraction']:g}"
        sources = {part: (f"{part} part of {train_ann} per {record}", train_ann) for part in ("train", "val")}
    parts = {}
    for part, (data, root) in (("train", train), ("val", val)):
        images = sorted(path for path, _ in (resolve_image_path(root, image["file_name"]) for image in data["images"])
                        if path is not None)
        if len(images) < len(data["images"]):
            logger.warning("%d of the %d images of the %s are missing on disk", len(data["images"]) - len(images),
                           len(data["images"]), sources[part][0])
        parts[part] = {"data": data, "root": root, "images": images, "source": sources[part][0],
                       "ann": sources[part][1]}
    return {"config": config, "split": split, **parts}


def lr_scale(config):
    """engine.lr_scale_factor for this run's global batch, logged once."""
    world_size = distributed.get_world_size()
    scale = engine.lr_scale_factor(config["lr_scaling"], config["batch_size"], world_size,
                                   config["lr_reference_batch_size"])
    logger.info("%d process(es) x batch %d = global batch %d; learning rates x %.3g (%s scaling)", world_size,
                config["batch_size"], world_size * config["batch_size"], scale, config["lr_scaling"])
    return scale


def train_epoch(session, stage, epoch, total_epochs, evaluated=True):
    """Train one epoch (its batches a function of seed and epoch, so a resumed run repeats them), then rank 0
    evaluates, logs and saves while the other ranks wait. Returns the evaluation's metrics on rank 0, else None."""
    config, loader = session.config, session.loader
    loader.sampler.set_epoch(epoch)  # the order (a DistributedSampler's too) and every image's augmentation
    started = time.perf_counter()
    train_metrics = engine.train_one_epoch(
        session.train_model, session.criterion, loader, session.state, engine.StepOptions.from_config(config), epoch,
        session.run.writer if session.run else None, config["progress"] and session.run is not None,
        f"stage {stage['index']} ({stage['name']}) epoch {epoch}/{total_epochs}")
    engine.check_skipped_images(train_metrics, loader, config["max_bad_image_fraction"], epoch)
    if distributed.get_world_size() > 1:
        logger.info("epoch %d data shards: %s", epoch, distributed.describe_shards(train_metrics["image_ids"]))
    metrics = None
    if session.run is not None:
        metrics = finish_epoch(session.run, session.state, stage, epoch, train_metrics, session.val_dataset, started,
                               evaluated)
    # every rank learns whether rank 0 stopped the run; the broadcast also makes them wait while it wrote
    session.stop = distributed.broadcast_object(patience_stop(session.run, config, epoch, evaluated))
    return metrics


# ---- the end of an epoch ------------------------------------------------------------------------------------
def finish_epoch(run, state, stage, epoch, train_metrics, val_dataset, started, evaluated=True):
    """Rank 0's end of an epoch: evaluate the EMA, log the row, write the checkpoints and the summary.

    Returns the evaluation's metrics, or None when this epoch is not evaluated.
    """
    config = run.config
    model = state.ema.module
    metrics = (evaluate(model, val_dataset, conf_threshold=config["conf_threshold"], num_workers=config["workers"])
               if evaluated else None)
    is_best = metrics is not None and math.isfinite(metrics["mAP"]) and (run.best_map is None
                                                                        or metrics["mAP"] > run.best_map)
    if is_best:
        run.best_map = metrics["mAP"]
    row = epoch_record(epoch, stage, train_metrics, state.optimizer, metrics, run.best_map,
                       time.perf_counter() - started)
    run.log.log(row, epoch)
    if evaluated:
        log_validation_images(run.writer, model, val_dataset, epoch, run.class_names)
    logger.info(epoch_line(row, config, is_best))
    if is_best:
        threshold = calibrated_threshold(metrics)
        run.summary.update(best_epoch=epoch, best_stage=stage["index"], best_stage_name=stage["name"],
                           conf_threshold=threshold,
                           best_metrics={k: v for k, v in metrics.items() if k not in ("per_class_AP", "pr_curve")})
        write_pr_curve(metrics["pr_curve"], os.path.join(run.run_dir, PR_CURVE_FILE))
    run.summary.update(run_dir=run.run_dir, last_epoch=epoch, last_metrics=row)
    save_epoch(run, state, stage, epoch, metrics, is_best)
    if is_best:
        write_val_predictions(run, model, val_dataset)
    write_json_atomic(run.summary, os.path.join(run.run_dir, "summary.json"))
    if evaluated:
        plot_results(run.log.rows, run.summary, os.path.join(run.run_dir, "results.png"),
                     f"{run.script}: {os.path.basename(run.run_dir)}",
                     read_pr_curve(os.path.join(run.run_dir, PR_CURVE_FILE)))
    return metrics


def patience_stop(run, config, epoch, evaluated):
    """Rank 0: why the run stops here (val mAP has not improved for `patience` epochs), or None."""
    if run is None or not config["patience"] or not evaluated:
        return None
    best_epoch = run.summary.get("best_epoch") or 0
    if epoch - best_epoch < config["patience"]:
        return None
    reason = (f"val mAP has not improved for {epoch - best_epoch} epochs (patience {config['patience']}); "
              f"best at epoch {best_epoch or '-'}")
    run.summary["stopped_early"] = {"epoch": epoch, "reason": reason}
    write_json_atomic(run.summary, os.path.join(run.run_dir, "summary.json"))
    logger.info("stopping after epoch %d: %s", epoch, reason)
    return reason


def calibrated_threshold(metrics):
    """The validation best-F1 score threshold, which predict() then defaults to; DEFAULT_CONF_THRESHOLD when
    no threshold found a true positive."""
    return metrics["best_f1_threshold"] if metrics["best_f1"] > 0 else DEFAULT_CONF_THRESHOLD


def save_epoch(run, state, stage, epoch, metrics, is_best):
    """`best` (and its backbone) on a new best mAP, a snapshot every save_interval, the backbone of `last`, then
    `last`, each file atomic. `last` goes last: it says which epoch finished and which was best, so a crash between
    two writes resumes that epoch and never trusts a `best` older than `last` records (issue #24). The best and
    backbone files hold the EMA weights, which were scored."""
    metadata = {"epoch": epoch, "stage": stage["index"], "stage_name": stage["name"], "script": run.script}
    backbone = None
    if "last_backbone" in run.layout:
        backbone = state.ema.module.backbone_checkpoint(class_names=run.class_names, epoch=epoch,
                                                        mAP=metrics["mAP"] if metrics else None)
    if is_best:
        best = model_checkpoint(state.ema.module, run.class_names, config=engine.json_safe(run.config),
                                metrics=run.summary["best_metrics"], conf_threshold=run.summary["conf_threshold"],
                                **metadata)
        save_checkpoint(best, run.path("best"))
        if backbone is not None:
            save_checkpoint(backbone, run.path("best_backbone"))
    checkpoint = engine.training_checkpoint(state, run.class_names, run.config, best_map=run.best_map,
                                            summary=run.summary, **metadata)
    interval = run.config.get("save_interval")
    if "snapshot" in run.layout and interval and epoch % interval == 0:
        save_checkpoint(checkpoint, run.path("snapshot", epoch=epoch))
    if backbone is not None:
        save_checkpoint(backbone, run.path("last_backbone"))
    save_checkpoint(checkpoint, run.path("last"))
    run.last_saved_epoch = epoch


def close_run(run, names):
    """The summary with the files' paths under `names` ({layout kind: summary key}; null for a file never
    written), written once more; TensorBoard closed."""
    run.writer.close()
    for kind, name in names.items():
        path = run.path(kind)
        run.summary[name] = path if os.path.isfile(path) else None
    if not os.path.isfile(run.path("best")):
        logger.warning("no epoch had a defined mAP (no validation boxes?), so there is no %s", run.layout["best"])
    write_json_atomic(run.summary, os.path.join(run.run_dir, "summary.json"))
    return run.summary


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint holds the work and how to resume."""


class faults:
    """Around a script's epoch loop: Ctrl-C becomes TrainingInterrupted with the resume command, and a run stopped
    by non-finite losses says which checkpoint keeps the last good epoch. `last` is written atomically at the end
    of every epoch, so it always holds whole epochs and the resume is exact. `run` is None on ranks > 0."""

    def __init__(self, run, script_file):
        self.run, self.script_file = run, script_file

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        run = self.run
        if run is None or kind is None or not issubclass(kind, (KeyboardInterrupt, engine.NonFiniteLossError)):
            return False
        run.writer.close()
        done, last = run.last_saved_epoch, run.path("last")
        if issubclass(kind, engine.NonFiniteLossError):
            kept = (f"{last} keeps the last good epoch ({done})" if done is not None
                    else "no epoch finished, so nothing was saved")
            raise engine.NonFiniteLossError(f"{error}; {kept}") from None
        if done is None:
            raise TrainingInterrupted("interrupted before the first epoch finished; nothing to resume, start the "
                                      "run again") from None
        raise TrainingInterrupted(f"interrupted in epoch {done + 1}; {last} holds epoch {done} (the unfinished "
                                  f"epoch is trained again on resume); resume with: python {self.script_file} "
                                  f"--resume {run.run_dir}") from None


# ---- records ---------------------------------------------------------------------------------------------------
METRIC_COLUMNS = ("mAP", "mAP50", "mAP75", "precision", "recall", "f1", "best_f1", "best_f1_threshold",
                  "best_f1_precision", "best_f1_recall")


def epoch_record(epoch, stage, train_metrics, optimizer, metrics, best_map, epoch_time):
    """One metrics.csv row: the same columns for both scripts (metrics left empty on an epoch not evaluated)."""
    row = {"epoch": epoch, "stage": stage["index"], "stage_name": stage["name"]}
    row.update({k: v for k, v in train_metrics.items() if k.startswith("loss")})
    row.update({k: train_metrics.get(k, 0) for k in ("nonfinite_steps", "scaler_skips", "images_skipped")})
    for group in LAYER_GROUPS:  # one rate per layer group (its no-decay twin has the same); empty when frozen
        rates = [g["lr"] for g in optimizer.param_groups if g.get("layer_group") == group]
        row[f"lr_{group}"] = rates[0] if rates else ""
    row.update({k: metrics[k] if metrics else "" for k in METRIC_COLUMNS})
    row.update(best_mAP=best_map if best_map is not None else "",
               images_per_second=train_metrics["images_per_second"], epoch_time=epoch_time)
    return {k: float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v for k, v in row.items()}


def write_pr_curve(curve, path):
    """pr_curve.csv: one row per operating point (recall, precision, score), scores descending; a score is the
    lowest one that operating point keeps. Kept out of summary.json, which it would outgrow (a row per distinct
    score of the val detections)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("recall", "precision", "score"))
        writer.writerows(zip(curve["recall"], curve["precision"], curve["score"]))
    os.replace(tmp, path)


def read_pr_curve(path):
    """pr_curve.csv as {"recall", "precision", "score"} lists of floats; empty lists when there is none yet."""
    curve = {"recall": [], "precision": [], "score": []}
    if os.path.isfile(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key in curve:
                    curve[key].append(float(row[key]))
    return curve


def final_line(summary, best_path, seconds, stages=True):
    """A training's last log line, what a user scrolls to: the best epoch's metrics, the calibrated threshold,
    the best model's path and the run's wall time."""
    took = f"done in {datetime.timedelta(seconds=round(seconds))}"
    if best_path is None:
        return (f"{took}: no epoch had a defined val mAP (no validation boxes?), so there is no best model; "
                f"last epoch {summary.get('last_epoch')} in {summary.get('run_dir')}")
    metrics, threshold = summary["best_metrics"], summary["conf_threshold"]
    stage = f" (stage {summary['best_stage']}, {summary['best_stage_name']})" if stages else ""
    operating_point = (f"P/R/F1 {metrics['best_f1_precision']:.3f}/{metrics['best_f1_recall']:.3f}/"
                       f"{metrics['best_f1']:.3f} at the calibrated threshold {threshold:.3f}"
                       if metrics["best_f1"] > 0 else f"no true positive at any threshold (threshold {threshold:.3f})")
    return (f"{took}: best epoch {summary['best_epoch']}{stage}: mAP {metrics['mAP']:.4f} mAP50 "
            f"{metrics['mAP50']:.4f}, {operating_point}; best model: {best_path}")


def epoch_line(row, config, is_best):
    """The epoch's log line: loss terms, mAP and mAP50, P/R/F1 at conf_threshold and at the best-F1 threshold,
    images per second and the epoch's time."""
    text = (f"epoch {row['epoch']} (stage {row['stage']}, {row['stage_name']}): loss {row['loss']:.4f} "
            f"(cls {row['loss_cls']:.4f}, box {row['loss_box']:.4f})")
    if row["mAP"] != "":
        text += (f" | mAP {row['mAP']:.4f} mAP50 {row['mAP50']:.4f}{' (best)' if is_best else ''} | P/R/F1 "
                 f"{row['precision']:.3f}/{row['recall']:.3f}/{row['f1']:.3f} at {config['conf_threshold']:g}, "
                 f"{row['best_f1_precision']:.3f}/{row['best_f1_recall']:.3f}/{row['best_f1']:.3f} at "
                 f"{row['best_f1_threshold']:.3f} (best F1)")
    return text + f" | {row['images_per_second']:.1f} img/s, {row['epoch_time']:.1f} s"


class MetricsLog:
    """One row per epoch in metrics.csv (rewritten atomically, so a resumed run never duplicates an epoch) and
    the same numbers in TensorBoard."""

    def __init__(self, run_dir, writer=None, keep_until=None):
        """keep_until: on resume, the checkpoint's epoch; rows of later epochs are dropped at once."""
        self.path = os.path.join(run_dir, "metrics.csv")
        self.writer = writer
        self.rows = []
        if os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))
        if keep_until is not None and any(int(r["epoch"]) > keep_until for r in self.rows):
            self.rows = [r for r in self.rows if int(r["epoch"]) <= keep_until]
            self._write()

    def log(self, row, step):
        self.rows = [r for r in self.rows if int(r["epoch"]) < int(row["epoch"])] + [row]
        self._write()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch" and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, step)

    def _write(self):
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def log_validation_images(writer, model, dataset, step, class_names, num_images=4, conf_threshold=0.3):
    """The first val images as ground truth | predictions (val_prediction_pairs) for TensorBoard."""
    if writer is None:
        return
    from torchvision.transforms.functional import pil_to_tensor
    for i, pair in enumerate(val_prediction_pairs(model, dataset, class_names, conf_threshold, num_images,
                                                  height=TENSORBOARD_PANEL_HEIGHT)):
        writer.add_image(f"val/image_{i}", pil_to_tensor(pair), step)


VAL_PREDICTIONS_FILE = "val_predictions.jpg"
VAL_PREDICTIONS_IMAGES = 8
TENSORBOARD_PANEL_HEIGHT = 320  # smaller than the file's: TensorBoard keeps every epoch's images


def val_prediction_pairs(model, dataset, class_names, conf_threshold, num_images, height=PANEL_HEIGHT):
    """plots.truth_and_prediction of the first `num_images` readable val images (the same ones every epoch, so
    epochs compare), predicted at `conf_threshold`."""
    items = []
    for index in range(len(dataset)):
        if len(items) == num_images:
            break
        item = dataset[index]  # None for an unreadable image (the dataset warned)
        if item is not None:
            items.append(item)
    if not items:
        return []
    images, targets = zip(*items)
    predictions = model.predict(list(images), conf_threshold=conf_threshold)
    return [truth_and_prediction(image, target, prediction, class_names, conf_threshold, height)
            for image, target, prediction in zip(images, targets, predictions)]


def write_val_predictions(run, model, dataset):
    """RUN/val_predictions.jpg for the best epoch: up to VAL_PREDICTIONS_IMAGES val images, ground truth | the
    predictions at the calibrated threshold, two pairs a row; people look at it before they read the numbers."""
    pairs = val_prediction_pairs(model, dataset, run.class_names, run.summary["conf_threshold"],
                                 VAL_PREDICTIONS_IMAGES)
    if pairs:
        path = os.path.join(run.run_dir, VAL_PREDICTIONS_FILE)
        tmp = path + ".tmp.jpg"  # the old picture stays until the new one is whole
        prediction_grid(pairs).save(tmp, quality=90)
        os.replace(tmp, path)


def describe_trainable(model):
    """One line with trainable and frozen parameter counts per layer group."""
    parts = []
    for group in LAYER_GROUPS:
        params = list(getattr(model, group).parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        parts.append(f"{group} {trainable / 1e6:.3f}M trainable / {sum(p.numel() for p in params) / 1e6:.3f}M")
    return "; ".join(parts)


def stage_writer_note(run, stage):
    """A TensorBoard text marking where a stage starts."""
    if run is not None:
        run.writer.add_text("stages", f"stage {stage['index']} ({stage['name']}) starts at epoch "
                                      f"{stage['first_epoch']}", stage["first_epoch"])
