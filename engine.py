"""The training loop and what it needs, shared by pretraining and fine-tuning (torchvision's detection `engine.py`).

- `train_one_epoch`: one pass over the data (single process or DistributedDataParallel, optional autocast),
  carrying a `TrainState` (model, optimizer, schedule, EMA, GradScaler) from step to step;
- an EMA of the weights with a ramped decay, mixed-precision settings, learning-rate scaling for the global batch;
- schedules stepped per iteration.

A training checkpoint of a TrainState (resumed exactly: weights, optimizer, schedule, EMA, scaler, RNG state) is
checkpoints.py's.
"""
import ctypes
import dataclasses
import logging
import math
import platform
import random
import time

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LambdaLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import distributed
from config import ConfigError, TrainingFailed
from model_lightweight import LAYER_GROUPS

logger = logging.getLogger(__name__)


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory():
    """Let glibc's malloc keep the memory a training step frees for the next step, instead of handing it back.

    By default glibc serves every block over 32 MB with a fresh mmap and unmaps it on free, and trims the heap
    top as soon as 128 kB to 32 MB lie free there: each step of a CPU training then takes its large activations
    and gradients as new pages, zeroed by the kernel one page fault at a time (the run's system time). With
    mmap off and the trim threshold at 2 GB, the next step reuses the same memory (what PyTorch's performance
    guide gets from jemalloc or tcmalloc), for a peak memory a little higher (the heap fragments). Training
    scripts call it once (trainer.setup_process). Returns whether it applied (glibc only: a no-op on macOS,
    Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


# ---- EMA, mixed precision, learning-rate scaling ---------------------------------------------------------
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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device, enabled, amp_dtype=None):
    """Autocast in `amp_dtype` ("bf16" or "fp16"; default bfloat16 on CPU, float16 on CUDA); a no-op
    context when disabled. The loss runs outside it, in float32 (DetectionLoss also casts its inputs)."""
    device_type = torch.device(device).type
    dtype = AMP_DTYPES[amp_dtype or ("fp16" if device_type == "cuda" else "bf16")]
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def build_grad_scaler(device, amp, amp_dtype=None):
    """A GradScaler for float16 on CUDA (its small exponent range underflows gradients); None otherwise,
    since bfloat16 has float32's range."""
    if amp and torch.device(device).type == "cuda" and (amp_dtype or "fp16") == "fp16":
        return torch.amp.GradScaler("cuda")
    return None


def lr_scale_factor(scaling, batch_size, world_size, reference_batch_size=None):
    """Multiplier of every configured learning rate for a global batch of batch_size * world_size.

    The config's rates were tuned at `reference_batch_size` (None: `batch_size`, so a single process
    keeps them as written). "linear": Goyal et al. 2017; "sqrt": the usual rule for Adam-type optimizers.
    """
    ratio = batch_size * world_size / (reference_batch_size or batch_size)
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[scaling]


# ---- the loop -------------------------------------------------------------------------------------------
class NonFiniteLossError(TrainingFailed):
    """Too many non-finite losses in a row: the run stops (exit status 1)."""


@dataclasses.dataclass
class TrainState:
    """What a run carries from step to step, epoch to epoch and stage to stage; a training checkpoint saves it.

    `model` is the bare model (a DistributedDataParallel wrapper runs the steps, never replaces it); the
    optimizer and scheduler are rebuilt for every fine-tuning stage; `nonfinite_streak` counts skipped
    non-finite steps in a row across epochs.
    """
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    ema: AveragedModel = None
    scaler: object = None
    nonfinite_streak: int = 0


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How each step runs: autocast, gradient clipping, the non-finite-loss limit, TensorBoard's interval."""
    amp: bool = False
    amp_dtype: str = None
    clip_grad_norm: float = None
    max_nonfinite_steps: int = None
    log_interval: int = 20

    @classmethod
    def from_config(cls, config):
        return cls(config["amp"], config["amp_dtype"], config["clip_grad_norm"], config["max_nonfinite_steps"],
                   config["log_interval"])


def train_one_epoch(model, criterion, data_loader, state, options=StepOptions(), epoch=0, writer=None,
                    progress=True, description=None):
    """Train for one pass over `data_loader`.

    Args:
        model: `state.model`, or a DistributedDataParallel wrapper of it.
        criterion: the loss; returns a dict with "loss" and the named terms.
        data_loader: batches of (images (B, 3, S, S) float in [0, 1], list of targets), or None.
        state: TrainState whose optimizer steps; its scheduler (stepped every iteration, so warmup and cosine
            schedules behave in short runs), EMA and GradScaler follow each step that really happened.
        options: StepOptions.
        epoch: 1-based; TensorBoard's steps of this epoch start at (epoch - 1) * len(data_loader).
        writer: TensorBoard writer: every `options.log_interval` iterations each loss term, each param group's
            learning rate and each layer group's gradient norm (gradient flow).

    A step whose loss is NaN or inf (averaged over the ranks, so all ranks skip it together) is skipped (no
    backward, optimizer, scheduler or EMA update) and counted; after `options.max_nonfinite_steps` in a row
    NonFiniteLossError stops the run. Batches whose images all failed to load (None) and images dropped from a
    batch are counted as "images_skipped". The logged losses are averaged over the ranks.

    Returns:
        dict of mean loss terms over the finite steps (all ranks) plus "images_per_second" (all ranks),
        "iterations", "nonfinite_steps", "scaler_skips" (steps GradScaler skipped on overflowing float16
        gradients), "images_skipped" and "image_ids" (this rank's, in order).
    """
    model.train()
    device = next(state.model.parameters()).device
    global_step = max(epoch - 1, 0) * len(data_loader)
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
        with autocast_context(device, options.amp, options.amp_dtype):
            outputs = model(images)
        losses = criterion(outputs, targets)
        logged = distributed.reduce_mean(losses)
        if not math.isfinite(logged["loss"].item()):
            nonfinite_steps += 1
            skip_nonfinite_step(state, logged, options, epoch, iteration)
            for key in logged:
                sums.setdefault(key, 0.0)
            continue
        state.nonfinite_streak = 0
        finite_steps += 1
        backward(state, losses["loss"])
        if writer is not None and (global_step + iteration) % options.log_interval == 0:
            log_iteration(writer, state, logged, global_step + iteration)
        if options.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), options.clip_grad_norm)
        scaler_skips += not optimizer_step(state)

        num_images += images.shape[0]
        image_ids.extend(int(target["image_id"]) for target in targets)
        for key, value in logged.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        if progress:
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in logged.items()}
                            | {"lr": f"{state.optimizer.param_groups[0]['lr']:.2e}",
                               "img/s": f"{num_images / (time.perf_counter() - start):.1f}"})
    metrics = {key: value / finite_steps if finite_steps else float("nan") for key, value in sums.items()}
    # every rank runs the same number of equal batches (DistributedSampler pads), so the total is world x ours
    metrics["images_per_second"] = num_images * distributed.get_world_size() / max(time.perf_counter() - start, 1e-9)
    expected = expected_images(data_loader)
    metrics.update(iterations=max(len(data_loader), 1), image_ids=image_ids, nonfinite_steps=nonfinite_steps,
                   scaler_skips=scaler_skips, images_skipped=expected - images_seen if expected is not None else 0)
    return metrics


def skip_nonfinite_step(state, logged, options, epoch, iteration):
    """Count a non-finite loss; stop the run after `max_nonfinite_steps` in a row."""
    state.nonfinite_streak += 1
    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in logged.items())
    logger.warning("epoch %d iteration %d: non-finite loss (%s), step skipped (%d in a row)", epoch, iteration,
                   terms, state.nonfinite_streak)
    if options.max_nonfinite_steps is not None and state.nonfinite_streak >= options.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{state.nonfinite_streak} non-finite losses in a row at epoch {epoch} ({terms}), so training stopped "
            f"(max_nonfinite_steps={options.max_nonfinite_steps}); lower the learning rate, keep clip_grad_norm on, "
            f"try without --amp, or check the data for broken boxes")


def backward(state, loss):
    """Gradients of `loss`; with a GradScaler, of the scaled loss, then unscaled for clipping and logging."""
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()


def optimizer_step(state):
    """Step the optimizer, then the schedule and the EMA, unless GradScaler skipped the step (overflowing
    float16 gradients): then nothing was learned, and the schedule and the EMA wait. Returns whether it stepped."""
    stepped = True
    if state.scaler is not None:
        scale = state.scaler.get_scale()
        state.scaler.step(state.optimizer)
        state.scaler.update()  # lowers the scale after a skipped step
        stepped = state.scaler.get_scale() >= scale
    else:
        state.optimizer.step()
    if stepped:
        if state.scheduler is not None:
            state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
    return stepped


def log_iteration(writer, state, logged, step):
    """TensorBoard: each loss term, each param group's rate, each layer group's gradient norm before clipping."""
    for key, value in logged.items():
        writer.add_scalar(f"train/{key}", value.item(), step)
    for group in state.optimizer.param_groups:
        writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
    for group, norm in group_grad_norms(state.model).items():
        writer.add_scalar(f"grad_norm/{group}", norm, step)


def group_grad_norms(model, groups=LAYER_GROUPS):
    """L2 norm of the gradients of each layer group (gradient flow), 0 for a frozen group."""
    norms = {}
    for group in groups:
        grads = [p.grad for p in getattr(model, group).parameters() if p.grad is not None]
        norms[group] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0
    return norms


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


# ---- schedules -------------------------------------------------------------------------------------------
def build_warmup_cosine_restarts(optimizer, warmup_iters, warmup_start_factor, t0_iters, t_mult, eta_min):
    """Linear warmup, then torch's CosineAnnealingWarmRestarts; step it every iteration."""
    cosine = CosineAnnealingWarmRestarts(optimizer, T_0=max(1, t0_iters), T_mult=t_mult, eta_min=eta_min)
    if warmup_iters <= 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_iters)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_iters])


def build_warmup_cosine(optimizer, total_iters, warmup_iters, warmup_start_factor, final_factor):
    """Linear warmup, then one cosine decay to lr * final_factor over the rest (one fine-tuning stage)."""

    def factor(it):
        if it < warmup_iters:
            return warmup_start_factor + (1 - warmup_start_factor) * it / warmup_iters
        progress = min(1.0, (it - warmup_iters) / max(1, total_iters - warmup_iters))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return LambdaLR(optimizer, factor)
