"""The epoch loop of both training scripts: stages of epochs; after each epoch the EMA weights are evaluated, the
row logged, the checkpoints saved; patience, Ctrl-C and non-finite losses end a run cleanly.

A script builds a `Trainer` (the model on its device, EMA, loss, loader, rank 0's `runs.Run`) and a plan of stages,
then calls `fit`:

    trainer = new_trainer(config, model, provenance, loader, val_dataset, run, device)
    fit(trainer, plan, begin_stage, start_epoch, "finetune_single_class.py")

`begin_stage(trainer, stage)` is the script's own: what the stage freezes and its optimizer and schedule. One
step of training is engine.train_one_epoch's; where a run writes is runs.py's.
"""
import dataclasses
import logging
import math
import os
import time

import torch

import distributed
import engine
from checkpoints import json_safe, load_init, model_checkpoint, save_checkpoint, training_checkpoint
from config import ConfigError, inference_defaults, write_json_atomic
from dataset_coco import build_dataloader
from evaluate import calibrated_thresholds, evaluate
from losses import DetectionLoss
from backbone_efficientnet import MissingWeightsPackageError
from model_lightweight import LAYER_GROUPS, create_lightweight_model
from runs import PR_CURVE_FILE, Run, epoch_line, epoch_record, log_validation_images, plot_run, write_best_records, \
    write_pr_curve, write_val_predictions

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Trainer:
    """What the epoch loop touches, on every rank: `run` is rank 0's (None elsewhere), `train_model` the model or
    the DistributedDataParallel wrapper that steps it, `provenance` where each layer group's starting weights came
    from ({"weights", "pretrained", "new"}), `resume_from` the training checkpoint a resumed run continues."""
    config: dict
    state: engine.TrainState
    provenance: dict
    loader: object
    val_dataset: object
    criterion: object
    run: Run = None
    train_model: object = None
    resume_from: dict = None
    stop: str = None  # why the run stopped early (patience), once it has


def fit(trainer, plan, begin_stage, script_file):
    """Train the stages of `plan` (dicts with index, name, first_epoch and last_epoch), from the epoch after the
    resumed checkpoint's. `begin_stage(trainer, stage)` sets up each stage (freezing, optimizer, schedule, the DDP
    wrapper). Every eval_interval-th epoch and the last are evaluated; patience may stop the run early."""
    start = trainer.resume_from["epoch"] + 1 if trainer.resume_from else 1
    final = plan[-1]["last_epoch"]
    with FaultGuard(trainer.run, script_file):
        for stage in (stage for stage in plan if stage["last_epoch"] >= start):
            begin_stage(trainer, stage)
            for epoch in range(max(start, stage["first_epoch"]), stage["last_epoch"] + 1):
                evaluated = epoch % trainer.config["eval_interval"] == 0 or epoch == final
                train_epoch(trainer, stage, epoch, final, evaluated)
                if trainer.stop:
                    break
            distributed.check_in_sync(trainer.state.model)
            if trainer.stop:
                break


def setup_process(config, script_file, argv):
    """This process's device (joining torchrun's process group, if any), its seed and its allocator (freed memory
    kept for the next step). Plain `python` on a machine with several GPUs and no --device is refused with the
    torchrun command that uses them all."""
    hint = None if config["device"] else distributed.torchrun_hint(script_file, list(argv or []))
    if hint:
        raise ConfigError(hint)
    device = distributed.init_distributed(config["device"])
    engine.seed_everything(distributed.rank_seed(config["seed"]))
    engine.keep_freed_memory()
    return device


def new_trainer(config, model, provenance, loader, val_dataset, run, device, resume_from=None):
    """The model on its device (SyncBatchNorm, rank 0's weights on every rank), its EMA and GradScaler, the loss."""
    model = model.to(device)
    if config["sync_bn"]:
        model = distributed.convert_sync_batchnorm(model)
    distributed.broadcast_model(model)  # every rank starts from rank 0's random layers
    state = engine.TrainState(model, ema=engine.build_ema(model, config["ema_decay"], config["ema_ramp_iters"]),
                              scaler=engine.build_grad_scaler(device, config["amp"], config["amp_dtype"]))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size
    return Trainer(config, state, provenance, loader, val_dataset, DetectionLoss(), run, model, resume_from)


def training_loader(dataset, config, drop_last=False):
    """The shuffled training loader (a DistributedSampler's shard under torchrun). Its order and augmentations are
    a function of (seed, epoch, image) (dataset_coco.SeededSampler), so a resumed run sees the batches of an
    uninterrupted one whatever the workers did before. `drop_last`: leave out a last partial batch when there are
    whole ones (a batch of a few images gives noisy BatchNorm statistics, which fine-tuning on small sets feels)."""
    sampler = distributed.train_sampler(dataset, config["seed"])
    return build_dataloader(dataset, config["batch_size"], shuffle=True, num_workers=config["workers"],
                            drop_last=drop_last and len(sampler or dataset) > config["batch_size"],
                            seed=distributed.rank_seed(config["seed"]), sampler=sampler)


def build_optimizer(model, lrs, config):
    """AdamW over the layer groups that `lrs` ({group: rate}) names, each rate times lr_scale's factor for the
    global batch; the groups without a rate get 0 (frozen groups have no trainable parameters to step)."""
    scale = lr_scale(config)
    return torch.optim.AdamW(model.get_param_groups(lrs.get("backbone", 0.0) * scale, lrs.get("fpn", 0.0) * scale,
                                                    lrs["head"] * scale, config["weight_decay"]))


def lr_scale(config):
    """engine.lr_scale_factor for this run's global batch, logged once."""
    world_size = distributed.get_world_size()
    scale = engine.lr_scale_factor(config["lr_scaling"], config["batch_size"], world_size,
                                   config["lr_reference_batch_size"])
    logger.info("%d process(es) x batch %d = global batch %d; learning rates x %.3g (%s scaling)", world_size,
                config["batch_size"], world_size * config["batch_size"], scale, config["lr_scaling"])
    return scale


def build_model(config, num_classes, checkpoint=None, init_classes=None):
    """The model of a run and the provenance of its weights ({"weights", "pretrained", "new"} layer groups): a new
    run's starting weights come from --init (checkpoints.load_init; `init_classes`, the run's class names, also
    copies the class outputs of the classes the starting checkpoint knows by name); a resumed run's architecture from its
    checkpoint, whose weights are restored later, and its provenance from the checkpoint's summary (older runs kept
    it in their config; a run from before provenance-aware stages froze every group as the recipe said, so: all
    pretrained)."""
    if checkpoint is not None:
        model = create_lightweight_model(**checkpoint["model_config"], imagenet_pretrained=False)
        provenance = ((checkpoint.get("summary") or {}).get("provenance") or checkpoint["config"].get("provenance")
                      or {"weights": "(not recorded)", "pretrained": list(LAYER_GROUPS), "new": []})
        return model, provenance
    try:
        model = create_lightweight_model(num_classes, config["model_size"], img_size=config["img_size"],
                                         imagenet_pretrained=False)
        loaded = load_init(model, config["init"], class_names=init_classes)
    except (MissingWeightsPackageError, ValueError) as error:
        raise ConfigError(str(error)) from None
    logger.info("init: %s", loaded)
    return model, {"weights": loaded, "pretrained": [g for g in LAYER_GROUPS if g in model.pretrained_groups],
                   "new": [g for g in LAYER_GROUPS if g not in model.pretrained_groups]}


def train_epoch(trainer, stage, epoch, total_epochs, evaluated=True):
    """Train one epoch (its batches a function of seed and epoch, so a resumed run repeats them), then rank 0
    evaluates, logs and saves while the other ranks wait. Returns the evaluation's metrics on rank 0, else None."""
    config, loader, run = trainer.config, trainer.loader, trainer.run
    loader.sampler.set_epoch(epoch)  # the order (a DistributedSampler's too) and every image's augmentation
    started = time.perf_counter()
    train_metrics = engine.train_one_epoch(
        trainer.train_model, trainer.criterion, loader, trainer.state, engine.StepOptions.from_config(config), epoch,
        run.writer if run else None, config["progress"] and run is not None,
        f"stage {stage['index']} ({stage['name']}) epoch {epoch}/{total_epochs}")
    engine.check_skipped_images(train_metrics, loader, config["max_bad_image_fraction"], epoch)
    if distributed.get_world_size() > 1:
        logger.info("epoch %d data shards: %s", epoch, distributed.describe_shards(train_metrics["image_ids"]))
    metrics = None
    if run is not None:
        metrics = finish_epoch(trainer, stage, epoch, train_metrics, started, evaluated)
    # every rank learns whether rank 0 stopped the run; the broadcast also makes them wait while it wrote
    trainer.stop = distributed.broadcast_object(patience_stop(run, config, epoch, evaluated))
    return metrics


def finish_epoch(trainer, stage, epoch, train_metrics, started, evaluated=True):
    """Rank 0's end of an epoch: evaluate the EMA, log the row, write the checkpoints and the summary.

    Returns the evaluation's metrics, or None when this epoch is not evaluated.
    """
    run, config, state = trainer.run, trainer.config, trainer.state
    model = state.ema.module
    metrics = (evaluate(model, trainer.val_dataset, conf_threshold=config["report_threshold"],
                        num_workers=config["workers"]) if evaluated else None)
    is_best = metrics is not None and math.isfinite(metrics["mAP"]) and (run.best_map is None
                                                                        or metrics["mAP"] > run.best_map)
    if is_best:
        run.best_map = metrics["mAP"]
    row = epoch_record(epoch, stage, train_metrics, state.optimizer, metrics, run.best_map,
                       time.perf_counter() - started)
    run.log.log(row, epoch)
    if evaluated and config["plots"]:
        log_validation_images(run.writer, model, trainer.val_dataset, epoch, run.class_names)
    logger.info(epoch_line(row, config, is_best, metrics))
    if is_best:
        threshold, thresholds = calibrated_thresholds(metrics, inference_defaults()["conf_threshold"])
        run.summary.update(best_epoch=epoch, best_stage=stage["index"], best_stage_name=stage["name"],
                           conf_threshold=threshold, conf_thresholds=thresholds,
                           best_metrics={k: v for k, v in metrics.items() if k not in NOT_SUMMED_UP},
                           per_class={name: {**entry, "conf_threshold": t}
                                      for (name, entry), t in zip(metrics["per_class"].items(), thresholds)})
        write_pr_curve(metrics["pr_curve"], os.path.join(run.run_dir, PR_CURVE_FILE))
        write_best_records(run, metrics, config["plots"])
    run.summary.update(run_dir=run.run_dir, last_epoch=epoch, last_metrics=row)
    save_epoch(trainer, stage, epoch, metrics, is_best)
    if is_best and config["plots"]:
        write_val_predictions(run, model, trainer.val_dataset)
    write_json_atomic(run.summary, os.path.join(run.run_dir, "summary.json"))
    if evaluated and config["plots"]:
        plot_run(run)
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


# evaluate()'s results that summary.json's best_metrics leaves out: per_class (the summary's own key, with the
# thresholds), the curve (pr_curve.csv) and the confusion matrix (confusion_matrix.png, per_class.csv's folder)
NOT_SUMMED_UP = ("per_class_AP", "per_class", "pr_curve", "confusion_matrix", "confusion_thresholds")


def save_epoch(trainer, stage, epoch, metrics, is_best):
    """`best` (and its backbone) on a new best mAP, a snapshot every save_interval, the backbone of `last`, then
    `last`, each file atomic. `last` goes last: it says which epoch finished and which was best, so a crash between
    two writes resumes that epoch and never trusts a `best` older than `last` records (issue #24). The best and
    backbone files hold the EMA weights, which were scored."""
    run, state = trainer.run, trainer.state
    metadata = {"epoch": epoch, "stage": stage["index"], "stage_name": stage["name"], "script": run.script}
    backbone = None
    if "last_backbone" in run.layout:
        backbone = state.ema.module.backbone_checkpoint(class_names=run.class_names, epoch=epoch,
                                                        mAP=metrics["mAP"] if metrics else None)
    if is_best:
        best = model_checkpoint(state.ema.module, run.class_names, config=json_safe(run.config),
                                metrics=run.summary["best_metrics"], conf_threshold=run.summary["conf_threshold"],
                                conf_thresholds=run.summary.get("conf_thresholds"), **metadata)
        save_checkpoint(best, run.path("best"))
        if backbone is not None:
            save_checkpoint(backbone, run.path("best_backbone"))
    checkpoint = training_checkpoint(state, run.class_names, run.config, best_map=run.best_map,
                                     summary=run.summary, **metadata)
    interval = run.config.get("save_interval")
    if "snapshot" in run.layout and interval and epoch % interval == 0:
        save_checkpoint(checkpoint, run.path("snapshot", epoch=epoch))
    if backbone is not None:
        save_checkpoint(backbone, run.path("last_backbone"))
    save_checkpoint(checkpoint, run.path("last"))
    run.last_saved_epoch = epoch


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint holds the work and how to resume."""


class FaultGuard:
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


