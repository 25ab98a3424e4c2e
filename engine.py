"""The training machinery shared by pretraining and fine-tuning (torchvision's detection `engine.py` role).

- config: defaults < config_transfer_learning.json < --config FILE < command-line flags, unknown keys refused
- run folders, metrics.csv and TensorBoard logging
- learning-rate schedules stepped per iteration, an EMA of the weights with a ramped decay
- train_one_epoch (single process or DistributedDataParallel, optional autocast), RNG state capture
- mixed precision and learning-rate scaling settings shared by both scripts
"""
import argparse
import contextlib
import csv
import datetime
import difflib
import json
import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LambdaLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import distributed

logger = logging.getLogger(__name__)


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ramped_ema_update(decay, ramp_iters):
    """EMA update for AveragedModel whose decay ramps up as decay * (1 - exp(-n / ramp_iters)): a fixed
    0.9999 would leave the average at the random init for thousands of steps (YOLOv5's ModelEMA ramp)."""
    @torch.no_grad()
    def update(ema_tensors, model_tensors, num_averaged):
        current = decay * (1 - math.exp(-float(num_averaged) / ramp_iters))
        if torch.is_floating_point(ema_tensors[0]):
            torch._foreach_lerp_(ema_tensors, model_tensors, 1 - current)
        else:  # integer buffers such as BatchNorm's num_batches_tracked
            for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
                ema_tensor.copy_(model_tensor)
    return update


def build_ema(model, decay=0.9998, ramp_iters=2000):
    """An AveragedModel (weights and BatchNorm buffers) of `model`; evaluate and save `ema.module`."""
    return AveragedModel(model, multi_avg_fn=ramped_ema_update(decay, ramp_iters), use_buffers=True)


def log_iteration(writer, model, optimizer, losses, step):
    for key, value in losses.items():
        writer.add_scalar(f"train/{key}", value.item(), step)
    for group in optimizer.param_groups:
        writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
    for group, norm in group_grad_norms(getattr(model, "module", model)).items():
        writer.add_scalar(f"grad_norm/{group}", norm, step)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device, enabled, amp_dtype=None):
    """Autocast in `amp_dtype` ("bf16" or "fp16"; default bfloat16 on CPU, float16 on CUDA); a no-op
    context when disabled. The loss runs outside it, in float32 (DetectionLoss also casts its inputs)."""
    device_type = torch.device(device).type
    dtype = AMP_DTYPES[amp_dtype or ("fp16" if device_type == "cuda" else "bf16")]
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def check_amp_dtype(amp_dtype, device):
    """Refuse an amp_dtype the device cannot run, in one line."""
    if amp_dtype is None:
        return
    if amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    on_cuda = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if amp_dtype == "fp16" and not on_cuda:
        raise ConfigError("--amp-dtype fp16 needs CUDA; on the CPU use bf16 (the default there)")
    if amp_dtype == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use --amp-dtype fp16")


def build_grad_scaler(device, amp, amp_dtype=None):
    """A GradScaler for float16 on CUDA (its small exponent range underflows gradients); None otherwise,
    since bfloat16 has float32's range."""
    if amp and torch.device(device).type == "cuda" and (amp_dtype or "fp16") == "fp16":
        return torch.amp.GradScaler("cuda")
    return None


LR_SCALINGS = ("linear", "sqrt", "none")


def lr_scale_factor(scaling, batch_size, world_size, reference_batch_size=None):
    """Multiplier of every configured learning rate for a global batch of batch_size * world_size.

    The config's rates were tuned at `reference_batch_size` (None: `batch_size`, so a single process
    keeps them as written). "linear": Goyal et al. 2017; "sqrt": the usual rule for Adam-type optimizers.
    """
    ratio = batch_size * world_size / (reference_batch_size or batch_size)
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[scaling]


def check_lr_scaling(config):
    if config["lr_scaling"] not in LR_SCALINGS:
        raise ConfigError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {config['lr_scaling']!r}")
    reference = config["lr_reference_batch_size"]
    if reference is not None and (not isinstance(reference, int) or isinstance(reference, bool) or reference < 1):
        raise ConfigError(f"lr_reference_batch_size must be a positive integer or null, got {reference!r}")


class NonFiniteLossError(RuntimeError):
    pass


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint holds the work and how to resume."""


def last_epoch_saved(last_checkpoint):
    if not os.path.isfile(last_checkpoint):
        return None
    return torch.load(last_checkpoint, map_location="cpu", weights_only=True)["epoch"]


@contextlib.contextmanager
def training_faults(script, last_checkpoint, run_dir, writer=None):
    """Around a script's epoch loop: Ctrl-C becomes TrainingInterrupted with the resume command, and a
    NonFiniteLossError says which checkpoint keeps the last good epoch. `last` is written atomically at
    the end of every epoch, so it always holds a whole epoch and the resume is exact."""
    try:
        yield
    except KeyboardInterrupt:
        if writer is not None:
            writer.close()
        done = last_epoch_saved(last_checkpoint)
        if done is None:
            raise TrainingInterrupted("interrupted before the first epoch finished; nothing to resume, start the "
                                      "run again") from None
        raise TrainingInterrupted(f"interrupted in epoch {done + 1}; {last_checkpoint} holds epoch {done} (the "
                                  f"unfinished epoch is trained again on resume); resume with: python {script} "
                                  f"--resume {run_dir}") from None
    except NonFiniteLossError as error:
        if writer is not None:
            writer.close()
        done = last_epoch_saved(last_checkpoint)
        kept = (f"{last_checkpoint} keeps the last good epoch ({done})" if done is not None
                else "no epoch finished, so nothing was saved")
        raise NonFiniteLossError(f"{error}; {kept}") from None


def describe_losses(losses):
    return ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())


def train_one_epoch(model, criterion, optimizer, data_loader, device, epoch=0, scheduler=None, ema=None,
                    scaler=None, amp=False, clip_grad_norm=None, progress=True, description=None,
                    writer=None, global_step=0, log_interval=20, max_nonfinite_steps=None, nonfinite_streak=0,
                    amp_dtype=None):
    """Train for one pass over `data_loader`.

    The scheduler (if any) is stepped every iteration, so warmup and cosine schedules behave in short runs.
    With a TensorBoard `writer`, every `log_interval` iterations it logs each loss term, each param
    group's learning rate and each layer group's gradient norm (gradient flow) at `global_step + i`.
    A step whose loss is NaN or inf (averaged over the ranks, so all ranks skip it together) is skipped (no
    backward, optimizer, scheduler or EMA update) and counted; after `max_nonfinite_steps` in a row
    (`nonfinite_streak` carries the count over from the previous epoch) NonFiniteLossError stops the run.
    Batches whose images all failed to load (None) and images dropped from a batch are counted as
    "images_skipped". `model` may be a DistributedDataParallel wrapper; the EMA tracks the model inside it,
    and the logged losses are averaged over the ranks.

    Returns:
        dict of mean loss terms over the finite steps (all ranks) plus "images_per_second" (all ranks),
        "iterations", "nonfinite_steps", "nonfinite_streak", "scaler_skips" (steps GradScaler skipped on
        overflowing float16 gradients), "images_skipped" and "image_ids" (this rank's, in order).
    """
    model.train()
    sums, num_images, image_ids, start = {}, 0, [], time.perf_counter()
    finite_steps, nonfinite_steps, images_seen, scaler_skips = 0, 0, 0, 0
    bar = tqdm(data_loader, desc=description or f"epoch {epoch}", disable=not progress, leave=False,
               dynamic_ncols=True)
    for iteration, batch in enumerate(bar):
        if batch is None:  # every image of the batch was unreadable (warned by the dataset)
            continue
        images, targets = batch
        images_seen += len(images)
        images = images.to(device, non_blocking=True)
        with autocast_context(device, amp, amp_dtype):
            outputs = model(images)
        losses = criterion(outputs, targets)
        logged = distributed.reduce_mean(losses)
        if not math.isfinite(logged["loss"].item()):
            nonfinite_steps += 1
            nonfinite_streak += 1
            for key in logged:
                sums.setdefault(key, 0.0)
            logger.warning("epoch %d iteration %d: non-finite loss (%s), step skipped (%d in a row)", epoch,
                           iteration, describe_losses(logged), nonfinite_streak)
            if max_nonfinite_steps is not None and nonfinite_streak >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{nonfinite_streak} non-finite losses in a row at epoch {epoch} ({describe_losses(logged)}), "
                    f"so training stopped (max_nonfinite_steps={max_nonfinite_steps}); lower the learning rate, "
                    f"keep clip_grad_norm on, try without --amp, or check the data for broken boxes")
            continue
        nonfinite_streak = 0
        finite_steps += 1
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
        else:
            losses["loss"].backward()
        step = global_step + iteration
        if writer is not None and step % log_interval == 0:
            log_iteration(writer, model, optimizer, logged, step)
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        stepped = True
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()  # ... and then the scale is lowered
            stepped = scaler.get_scale() >= scale
            scaler_skips += not stepped
        else:
            optimizer.step()
        if stepped:  # after a step the scaler skipped, nothing was learned: the schedule and the EMA wait
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update_parameters(distributed.unwrap_model(model))

        num_images += images.shape[0]
        image_ids.extend(int(target["image_id"]) for target in targets)
        for key, value in logged.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        if progress:
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in logged.items()}
                            | {"lr": f"{optimizer.param_groups[0]['lr']:.2e}",
                               "img/s": f"{num_images / (time.perf_counter() - start):.1f}"})
    metrics = {key: value / finite_steps if finite_steps else float("nan") for key, value in sums.items()}
    # every rank runs the same number of equal batches (DistributedSampler pads), so the total is world x ours
    metrics["images_per_second"] = num_images * distributed.get_world_size() / max(time.perf_counter() - start, 1e-9)
    metrics["iterations"] = max(len(data_loader), 1)
    metrics["image_ids"] = image_ids
    expected = expected_images(data_loader)
    metrics.update(nonfinite_steps=nonfinite_steps, nonfinite_streak=nonfinite_streak, scaler_skips=scaler_skips,
                   images_skipped=expected - images_seen if expected is not None else 0)
    return metrics


def expected_images(data_loader):
    """Images one pass of a DataLoader yields when all load (None for a plain iterable)."""
    batch_sampler = getattr(data_loader, "batch_sampler", None)
    if batch_sampler is None or not hasattr(batch_sampler, "sampler"):
        return None
    if batch_sampler.drop_last:
        return len(batch_sampler) * batch_sampler.batch_size
    return len(batch_sampler.sampler)


def check_skipped_images(train_metrics, data_loader, max_fraction, epoch):
    """Refuse an epoch in which more than `max_fraction` of the images could not be read."""
    expected = expected_images(data_loader) or 1
    skipped = train_metrics.get("images_skipped", 0)
    if skipped > max_fraction * expected:
        raise ConfigError(f"{skipped}/{expected} training images of epoch {epoch} could not be read (more than "
                          f"max_bad_image_fraction={max_fraction:g}); see the warnings above for their names, "
                          f"fix or remove them from the annotation file")
    if skipped:
        logger.warning("epoch %d: skipped %d/%d unreadable training images", epoch, skipped, expected)


# ---- configuration ----------------------------------------------------------------------------------
DEFAULT_CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_transfer_learning.json")


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message says what and how to fix it."""


def load_json(path, what="config file"):
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what} {path} is not valid JSON: {error}") from None


def config_sections(data, section):
    """The flat settings of a config dict: `optimization` merged with `section` if the file has sections
    (a copy of config_transfer_learning.json), else the dict itself (the flat custom format)."""
    if section in data or "optimization" in data:
        flat = {**data.get("optimization", {}), **data.get(section, {})}
    else:
        flat = dict(data)
    return {k: v for k, v in flat.items() if not k.startswith("_")}


def check_config(config, reference, source):
    """Refuse unknown keys (naming the nearest valid one) and values of the wrong type."""
    for key, value in config.items():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(reference))}"
            raise ConfigError(f"unknown config key {key!r} in {source}; {hint}")
        expected = reference[key]
        if expected is None or value is None:
            continue
        if isinstance(expected, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) == isinstance(expected, bool)
        elif isinstance(expected, (int, float)):
            ok = isinstance(value, (int, float)) and (isinstance(expected, float) or float(value).is_integer())
        else:
            ok = isinstance(value, type(expected)) or (isinstance(expected, list) and isinstance(value, str))
        if not ok:
            raise ConfigError(f"config key {key!r} in {source} should be a {type(expected).__name__}, "
                              f"got {value!r}")


def explicit_cli_values(parser, argv):
    """The flags the user actually typed (argparse defaults suppressed)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs.update(action="store_const", const=action.const)
            else:
                kwargs.update(type=action.type, nargs=action.nargs)
            probe.add_argument(*action.option_strings, **kwargs)
    values, _ = probe.parse_known_args(argv)
    return vars(values)


def resolve_config(parser, argv, section, defaults):
    """Merge defaults < config_transfer_learning.json[section] < --config FILE < CLI into one flat dict.

    Args:
        parser: the script's ArgumentParser (its flags' dests are config keys).
        argv: command-line arguments (None: sys.argv[1:]).
        section: "pretraining" or "finetuning".
        defaults: every valid key with its default value (types are checked against these).
    """
    cli = explicit_cli_values(parser, argv)
    parser.parse_args(argv)  # full validation and --help
    config = dict(defaults)
    for path in (DEFAULT_CONFIG_PATH, cli.get("config")):
        if path:
            values = config_sections(load_json(path), section)
            check_config(values, defaults, path)
            config.update(values)
    config.update(cli)
    return config


# ---- run folder, logs --------------------------------------------------------------------------------
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


def write_json_atomic(data, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


class MetricsLog:
    """One row per epoch in metrics.csv (rewritten atomically, so a resumed run never duplicates an epoch)
    and the same numbers in TensorBoard."""

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


def create_tensorboard_writer(run_dir):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(run_dir, "tensorboard"))


# ---- schedules ---------------------------------------------------------------------------------------
def build_warmup_cosine_restarts(optimizer, warmup_iters, warmup_start_factor, t0_iters, t_mult, eta_min):
    """Linear warmup, then torch's CosineAnnealingWarmRestarts; step it every iteration."""
    cosine = CosineAnnealingWarmRestarts(optimizer, T_0=max(1, t0_iters), T_mult=t_mult, eta_min=eta_min)
    if warmup_iters <= 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_iters)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_iters])


def build_warmup_cosine(optimizer, total_iters, warmup_iters, warmup_start_factor, final_factor):
    """Linear warmup, then one cosine decay to lr * final_factor over the rest (one fine-tuning stage).
    The warmup is capped at a fifth of the stage: on a small data set a fixed count would eat most of it."""
    warmup_iters = min(warmup_iters, total_iters // 5)

    def factor(it):
        if it < warmup_iters:
            return warmup_start_factor + (1 - warmup_start_factor) * it / warmup_iters
        progress = min(1.0, (it - warmup_iters) / max(1, total_iters - warmup_iters))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return LambdaLR(optimizer, factor)


# ---- RNG state (exact resume) --------------------------------------------------------------------------
def get_rng_state():
    """Python, NumPy and torch RNG states as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"python": list(internal) + [version], "python_gauss": gauss, "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((state["python"][-1], tuple(state["python"][:-1]), state["python_gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def group_grad_norms(model, groups=("backbone", "fpn", "head")):
    """L2 norm of the gradients of each layer group (gradient flow), 0 for a frozen group."""
    norms = {}
    for group in groups:
        grads = [p.grad for p in getattr(model, group).parameters() if p.grad is not None]
        norms[group] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0
    return norms


# ---- checkpoints of a training run -------------------------------------------------------------------
def training_checkpoint(model, ema, class_names, config, optimizer=None, scheduler=None, scaler=None, **state):
    """A resumable checkpoint (a plain dict; loads with weights_only=True).

    `model_state_dict` holds the weights to use for inference (the EMA when there is one), so
    load_model and the README snippet get the evaluated model; `train_state_dict` holds the raw weights
    the optimizer steps, and `ema_updates` the EMA's step count.
    """
    from model_lightweight import model_checkpoint, unwrap_state_dict
    raw = getattr(model, "module", model)
    inference = ema.module if ema is not None else raw
    checkpoint = model_checkpoint(inference, class_names, config=json.loads(json.dumps(config, default=str)),
                                  **state)
    checkpoint["model_config"] = dict(raw.model_config)
    checkpoint["train_state_dict"] = unwrap_state_dict(raw.state_dict())
    checkpoint["ema_updates"] = int(ema.n_averaged) if ema is not None else 0
    if optimizer is not None:
        checkpoint["optimizer_state_dict"] = optimizer.state_dict()
    if scheduler is not None:
        checkpoint["scheduler_state_dict"] = scheduler.state_dict()
    if scaler is not None:
        checkpoint["scaler_state_dict"] = scaler.state_dict()
    checkpoint["rng_state"] = get_rng_state()
    return checkpoint


def load_training_checkpoint(path):
    """Read a resumable checkpoint (weights_only=True) and check it is one."""
    from model_lightweight import load_checkpoint_file
    if not os.path.isfile(path):
        raise ConfigError(f"--resume checkpoint not found: {path}")
    try:
        checkpoint = load_checkpoint_file(path, "--resume checkpoint")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{path} holds a {type(checkpoint).__name__}, not a training checkpoint")
    missing = [k for k in ("train_state_dict", "optimizer_state_dict", "config", "epoch") if k not in checkpoint]
    if missing:
        raise ConfigError(f"{path} cannot be resumed (it lacks {', '.join(missing)}); to start a new run from "
                          f"its weights, pass it as pretrained weights instead of --resume")
    return checkpoint


def restore_training_state(checkpoint, model, ema, optimizer=None, scheduler=None, scaler=None):
    from model_lightweight import unwrap_state_dict
    getattr(model, "module", model).load_state_dict(unwrap_state_dict(checkpoint["train_state_dict"]))
    if ema is not None:
        ema.module.load_state_dict(unwrap_state_dict(checkpoint["model_state_dict"]))
        ema.n_averaged.fill_(checkpoint.get("ema_updates", 0))
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    if scheduler is not None and "scheduler_state_dict" in checkpoint:
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
    if scaler is not None and "scaler_state_dict" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler_state_dict"])
    if "rng_state" in checkpoint:
        set_rng_state(checkpoint["rng_state"])


def log_validation_images(writer, model, dataset, step, class_names, num_images=4, conf_threshold=0.3):
    """Draw the model's boxes (green) and the ground truth (red) on the first val images for TensorBoard."""
    from torchvision.utils import draw_bounding_boxes
    count = min(num_images, len(dataset))
    if writer is None or count == 0:
        return
    images, targets = zip(*(dataset[i] for i in range(count)))
    predictions = model.predict(list(images), conf_threshold=conf_threshold)
    for i, (image, target, prediction) in enumerate(zip(images, targets, predictions)):
        canvas = image
        if len(target["boxes_xyxy"]):
            canvas = draw_bounding_boxes(canvas, target["boxes_xyxy"], colors="red")
        if len(prediction["boxes"]):
            labels = [f"{class_names[int(label)]} {score:.2f}"
                      for label, score in zip(prediction["labels"], prediction["scores"])]
            canvas = draw_bounding_boxes(canvas, prediction["boxes"].cpu(), labels=labels, colors="lime")
        writer.add_image(f"val/image_{i}", canvas, step)


def describe_trainable(model):
    """One line with trainable and frozen parameter counts per layer group."""
    parts = []
    for group in ("backbone", "fpn", "head"):
        params = list(getattr(model, group).parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        parts.append(f"{group} {trainable / 1e6:.3f}M trainable / {sum(p.numel() for p in params) / 1e6:.3f}M")
    return "; ".join(parts)


def run_script(main, argv=None, bad_input=(ConfigError,)):
    """A training script's command-line entry, so both scripts end the same way: bad input (`bad_input`)
    is one line on stderr and exit 2, a run stopped by non-finite losses exit 1, Ctrl-C exit 130 (128 +
    SIGINT, the shell's convention) with the resume command; never a traceback for these."""
    try:
        main(argv)
    except bad_input as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as error:
        print(str(error) or "interrupted before training started; nothing saved", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.cleanup()
