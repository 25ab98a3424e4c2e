"""A training run's folder and records, the same for both scripts: where a run writes, what it writes at the end of
every epoch, how it resumes, and how the commands that score and deploy its model read it back.

    RUN/config.json      the resolved config, as the run used it
    RUN/metrics.csv      one row per epoch, the same columns in both scripts (epoch_record)
    RUN/summary.json     class names, provenance of the starting weights, the best epoch, its metrics and
                         calibrated score thresholds (conf_threshold for all classes, conf_thresholds one per
                         class), per_class (AP, AP50, best F1 and threshold of each class; null where a class has
                         no val box), the last epoch, the files
    RUN/pr_curve.csv     the best epoch's precision-recall curve at IoU 0.5: every operating point (write_pr_curve)
    RUN/per_class.csv    the best epoch's AP, AP50, best F1 and calibrated threshold of each class (write_best_records)
    RUN/confusion_matrix.png  the best epoch's, at the calibrated thresholds, with two or more classes
    RUN/results.png      losses, val mAP and that curve, redrawn after every evaluation (plots.py)
    RUN/val_predictions.jpg  the best epoch's predictions beside the ground truth
    RUN/tensorboard/     the same numbers per epoch; losses, rates and gradient norms per iteration; val images
    RUN/last_model.pth   every epoch (resumable); RUN/best_model.pth on a new best val mAP (the EMA weights, with
                         the validation best-F1 threshold that predict() then defaults to); snapshots/ every
                         save_interval epochs; pretraining also backbone_weights/{last,best}_backbone.pth

Only rank 0 keeps a Run; every write is atomic, so a crash never leaves half a file and `last` always holds
whole epochs. The epoch loop that fills these files is trainer.py's.
"""
import csv
import dataclasses
import datetime
import logging
import math
import os

from checkpoints import load_training_checkpoint
from config import ConfigError, load_json, resumed, write_json_atomic
from dataset_coco import coco_layout_paths, load_train_val, resolve_image_path
from model_lightweight import LAYER_GROUPS
from plots import PANEL_HEIGHT, plot_confusion_matrix, plot_results, prediction_grid, threshold_text, \
    truth_and_prediction

logger = logging.getLogger(__name__)
SPLIT_FILE = "split.json"
PR_CURVE_FILE = "pr_curve.csv"
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.png"
MAX_CLASSES_IN_LINE = 8  # the epoch and final log lines name each class up to this many (pretraining has ~30)
PER_CLASS_FIELDS = ("class", "num_gt", "AP", "AP50", "best_f1", "best_f1_threshold", "best_f1_precision",
                    "best_f1_recall", "conf_threshold")
# Where both scripts write their checkpoints (file kind -> path in the run folder) and the summary key of each.
LAYOUT = {"last": "last_model.pth", "best": "best_model.pth", "snapshot": os.path.join("snapshots", "epoch_{epoch}.pth")}
BACKBONE_LAYOUT = {"last_backbone": os.path.join("backbone_weights", "last_backbone.pth"),
                   "best_backbone": os.path.join("backbone_weights", "best_backbone.pth")}  # pretraining's too
SUMMARY_KEYS = {"best": "best_model", "last": "last_model", "best_backbone": "best_backbone",
                "last_backbone": "last_backbone"}
OLD_CHECKPOINT_FOLDER = "checkpoints"  # pretraining runs before #25 wrote checkpoints/{last,best}.pth


@dataclasses.dataclass
class Run:
    """Rank 0's side of a training run: its folder, settings, logs and what it has written so far."""
    run_dir: str
    config: dict
    class_names: list
    layout: dict  # file kind -> path relative to run_dir: LAYOUT, with pretraining's BACKBONE_LAYOUT
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


def run_dir_of(checkpoint_path):
    """The run folder a checkpoint lies in: its folder, or the one above a snapshots/ (or an old checkpoints/)."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    if os.path.basename(folder) in (OLD_CHECKPOINT_FOLDER, os.path.dirname(LAYOUT["snapshot"])):
        return os.path.dirname(folder)
    return folder


def resume(config, explicit, layout, script, fixed_keys):
    """A run's settings after config.resolve: on --resume (RUN or its `last` checkpoint) the run's own config with
    the --config file and typed flags (`explicit`) over it, those in `fixed_keys` unchanged; a new run's --name
    refused now if its folder holds a run, not after the data has loaded.

    Returns:
        (config, resume checkpoint or None).
    """
    if config["name"] is not None and config["resume"]:
        raise ConfigError("--name names a new run's folder; a resumed run continues in its own, drop --name")
    if config["name"] is not None:
        named_run_dir(config["output_dir"], config["name"])
    if not config["resume"]:
        return config, None
    path = config["resume"]
    if os.path.isdir(path):
        old = os.path.join(path, OLD_CHECKPOINT_FOLDER, "last.pth")
        path = old if os.path.isfile(old) and not os.path.isfile(os.path.join(path, layout["last"])) else \
            os.path.join(path, layout["last"])
    if not os.path.isfile(path):
        raise ConfigError(f"--resume checkpoint not found: {path}")
    checkpoint = load_training_checkpoint(path)
    written_by = checkpoint.get("script", "pretrain" if checkpoint.get("stage") == "pretrain" else "finetune")
    if written_by != script:
        raise ConfigError(f"{path} is a {written_by} checkpoint, not a {script} one; resume it with its own script")
    config = resumed(config, checkpoint["config"], explicit, fixed_keys, path)
    config["resume"] = path
    return config, checkpoint


def check_not_finished(checkpoint, total_epochs, path):
    """Never overwrite a finished run: resuming needs epochs left to train."""
    if checkpoint is not None and checkpoint["epoch"] >= total_epochs:
        raise ConfigError(f"{path} already finished {checkpoint['epoch']} of {total_epochs} epochs; pass --epochs "
                          f"larger than {checkpoint['epoch']} to train on")


def open_run(config, class_names, layout, script, name, provenance, checkpoint=None):
    """Rank 0: a new folder OUTPUT_DIR/<name>_<stamp> (OUTPUT_DIR/NAME with --name), or the resumed run's own;
    config.json (the resolved config as it is), TensorBoard and metrics.csv (rows after the checkpoint's epoch
    dropped: they are trained again). The summary starts with what the run derived: its class names and where
    each layer group's starting weights came from."""
    if checkpoint is not None:
        run_dir = run_dir_of(config["resume"])
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
    run.summary.update(class_names=list(class_names), provenance=provenance)
    return run


def saved_split(config):
    """A resumed run's split.json (the images it held out for validation), or None."""
    if not config.get("resume"):
        return None
    path = os.path.join(run_dir_of(config["resume"]), SPLIT_FILE)
    return load_json(path, "split file") if os.path.isfile(path) else None


def write_split(run, split):
    """split.json: which images of the training annotations trained and which validated (reused on --resume)."""
    if run is not None and split is not None:
        write_json_atomic(split, os.path.join(run.run_dir, SPLIT_FILE))


# ---- a run's own data, read back by the commands that score and deploy its model ---------------------------------
BEST_CHECKPOINTS = (LAYOUT["best"], os.path.join(OLD_CHECKPOINT_FOLDER, "best.pth"))


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
    for candidate in (folder, os.path.dirname(folder) if os.path.basename(folder) == OLD_CHECKPOINT_FOLDER else None):
        if candidate and is_run_dir(candidate):
            return candidate
    return None


def best_checkpoint(run_dir):
    """A run's best checkpoint: RUN/best_model.pth (RUN/checkpoints/best.pth in older pretraining runs)."""
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


def close_run(run):
    """The summary with the paths of the run's files under SUMMARY_KEYS (null for a file never written), written
    once more; TensorBoard closed."""
    run.writer.close()
    for kind, name in SUMMARY_KEYS.items():
        if kind in run.layout:
            path = run.path(kind)
            run.summary[name] = path if os.path.isfile(path) else None
    if not os.path.isfile(run.path("best")):
        logger.warning("no epoch had a defined mAP (no validation boxes?), so there is no %s", run.layout["best"])
    write_json_atomic(run.summary, os.path.join(run.run_dir, "summary.json"))
    return run.summary


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
    if metrics and len(metrics["per_class"]) > 1:  # AP50_<class>, AP_<class>; empty where a class has no val box
        for name, entry in metrics["per_class"].items():
            row.update({f"{key}_{name}": "" if entry[key] is None else entry[key] for key in ("AP50", "AP")})
    row.update(best_mAP=best_map if best_map is not None else "",
               images_per_second=train_metrics["images_per_second"], epoch_time=epoch_time)
    return {k: float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v for k, v in row.items()}


def plot_run(run):
    """RUN/results.png: losses, val mAP and the best epoch's precision-recall curve (plots.plot_results)."""
    plot_results(run.log.rows, run.summary, os.path.join(run.run_dir, "results.png"),
                 f"{run.script}: {os.path.basename(run.run_dir)}", read_pr_curve(os.path.join(run.run_dir, PR_CURVE_FILE)))


def write_best_records(run, metrics, plots=True):
    """The best epoch's per-class records: per_class.csv (summary.json's per_class as a table) and, with two or more
    classes and `plots`, confusion_matrix.png at the calibrated thresholds."""
    path, tmp = os.path.join(run.run_dir, PER_CLASS_FILE), os.path.join(run.run_dir, PER_CLASS_FILE + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PER_CLASS_FIELDS)
        writer.writeheader()
        for name, entry in run.summary["per_class"].items():
            writer.writerow({"class": name, **{k: "" if entry.get(k) is None else entry[k]
                                               for k in PER_CLASS_FIELDS[1:]}})
    os.replace(tmp, path)
    if plots and len(run.class_names) > 1:
        path = os.path.join(run.run_dir, CONFUSION_FILE)
        tmp = path + ".tmp.png"
        plot_confusion_matrix(metrics["confusion_matrix"], run.class_names, tmp,
                              f"epoch {run.summary['best_epoch']}: IoU 0.5, thresholds "
                              f"{threshold_text(metrics['confusion_thresholds'])}")
        os.replace(tmp, path)


def per_class_line(metrics):
    """'AP50 per class: solid 0.912, dashed 0.853, kerb n/a' (n/a: no val box of the class)."""
    return "AP50 per class: " + ", ".join(f"{name} {'n/a' if e['AP50'] is None else format(e['AP50'], '.3f')}"
                                          for name, e in metrics["per_class"].items())


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


def final_line(summary, seconds, stages=True):
    """A training's last log line, what a user scrolls to: the best epoch's metrics, the calibrated threshold,
    the best model's path and the run's wall time."""
    took = f"done in {datetime.timedelta(seconds=round(seconds))}"
    best_path = summary["best_model"]
    if best_path is None:
        return (f"{took}: no epoch had a defined val mAP (no validation boxes?), so there is no best model; "
                f"last epoch {summary.get('last_epoch')} in {summary.get('run_dir')}")
    metrics, threshold = summary["best_metrics"], summary["conf_threshold"]
    stage = f" (stage {summary['best_stage']}, {summary['best_stage_name']})" if stages else ""
    per_class = summary.get("conf_thresholds") or []
    if 1 < len(per_class) <= MAX_CLASSES_IN_LINE:
        threshold_note = f"; per class {threshold_text(per_class)} ({', '.join(summary['per_class'])})"
    else:
        threshold_note = ""
    operating_point = (f"P/R/F1 {metrics['best_f1_precision']:.3f}/{metrics['best_f1_recall']:.3f}/"
                       f"{metrics['best_f1']:.3f} at the calibrated threshold {threshold:.3f}"
                       if metrics["best_f1"] > 0 else f"no true positive at any threshold (threshold {threshold:.3f})")
    return (f"{took}: best epoch {summary['best_epoch']}{stage}: mAP {metrics['mAP']:.4f} mAP50 "
            f"{metrics['mAP50']:.4f}, {operating_point}{threshold_note}; best model: {best_path}")


def epoch_line(row, config, is_best, metrics=None):
    """The epoch's log line: loss terms, mAP and mAP50, P/R/F1 at report_threshold and at the best-F1 threshold,
    AP50 per class with two to MAX_CLASSES_IN_LINE classes (`metrics`: the evaluation's), images per second and the
    epoch's time."""
    text = (f"epoch {row['epoch']} (stage {row['stage']}, {row['stage_name']}): loss {row['loss']:.4f} "
            f"(cls {row['loss_cls']:.4f}, box {row['loss_box']:.4f})")
    if row["mAP"] != "":
        text += (f" | mAP {row['mAP']:.4f} mAP50 {row['mAP50']:.4f}{' (best)' if is_best else ''} | P/R/F1 "
                 f"{row['precision']:.3f}/{row['recall']:.3f}/{row['f1']:.3f} at report_threshold "
                 f"{config['report_threshold']:g}, "
                 f"{row['best_f1_precision']:.3f}/{row['best_f1_recall']:.3f}/{row['best_f1']:.3f} at "
                 f"{row['best_f1_threshold']:.3f} (best F1)")
    if metrics is not None and 1 < len(metrics["per_class"]) <= MAX_CLASSES_IN_LINE:
        text += f" | {per_class_line(metrics)}"
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


def log_validation_images(writer, model, dataset, step, class_names, num_images=4):
    """The first val images as ground truth | predictions (val_prediction_pairs) for TensorBoard, at the score
    threshold(s) predict() uses for `model` (inference.detection_settings)."""
    if writer is None:
        return
    from inference import detection_settings
    from torchvision.transforms.functional import pil_to_tensor
    threshold = detection_settings(model)[0]
    for i, pair in enumerate(val_prediction_pairs(model, dataset, class_names, threshold, num_images,
                                                  height=TENSORBOARD_PANEL_HEIGHT)):
        writer.add_image(f"val/image_{i}", pil_to_tensor(pair), step)


VAL_PREDICTIONS_FILE = "val_predictions.jpg"
VAL_PREDICTIONS_IMAGES = 8
TENSORBOARD_PANEL_HEIGHT = 320  # smaller than the file's: TensorBoard keeps every epoch's images


def val_prediction_pairs(model, dataset, class_names, conf_threshold, num_images, height=PANEL_HEIGHT):
    """plots.truth_and_prediction of the first `num_images` readable val images (the same ones every epoch, so
    epochs compare), predicted at `conf_threshold` (a score, or one per class)."""
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
    pairs = val_prediction_pairs(model, dataset, run.class_names,
                                 run.summary.get("conf_thresholds") or run.summary["conf_threshold"],
                                 VAL_PREDICTIONS_IMAGES)
    if pairs:
        path = os.path.join(run.run_dir, VAL_PREDICTIONS_FILE)
        tmp = path + ".tmp.jpg"  # the old picture stays until the new one is whole
        prediction_grid(pairs).save(tmp, quality=90)
        os.replace(tmp, path)


