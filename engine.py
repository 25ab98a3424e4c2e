"""The training step shared by pretraining and fine-tuning: one epoch, EMA of the weights, seeding.

Both training scripts import this; it imports the model-agnostic loss interface only
(DetectionLoss-like: outputs, targets -> dict with "loss" and named parts), as torchvision's
detection reference `engine.py` does.
"""
import logging
import math
import random
import time

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

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


def autocast_context(device, enabled):
    """bfloat16 autocast on CPU, float16 on CUDA; a no-op context when disabled."""
    device_type = torch.device(device).type
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


class NonFiniteLossError(RuntimeError):
    pass


def train_one_epoch(model, criterion, optimizer, data_loader, device, epoch=0, scheduler=None, ema=None,
                    scaler=None, amp=False, clip_grad_norm=None, progress=True, description=None):
    """Train for one pass over `data_loader`.

    The scheduler (if any) is stepped every iteration, so warmup and cosine schedules behave in short runs.

    Returns:
        dict of mean loss terms over the epoch plus "images_per_second" and "iterations".
    """
    model.train()
    sums, num_images, start = {}, 0, time.perf_counter()
    bar = tqdm(data_loader, desc=description or f"epoch {epoch}", disable=not progress, leave=False,
               dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        with autocast_context(device, amp):
            outputs = model(images)
        losses = criterion(outputs, targets)
        if not math.isfinite(losses["loss"].item()):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch}: {parts}; lower the learning rate or "
                                     f"check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
        else:
            losses["loss"].backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)

        num_images += images.shape[0]
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        if progress:
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()}
                            | {"lr": f"{optimizer.param_groups[0]['lr']:.2e}",
                               "img/s": f"{num_images / (time.perf_counter() - start):.1f}"})
    iterations = max(len(data_loader), 1)
    metrics = {key: value / iterations for key, value in sums.items()}
    metrics["images_per_second"] = num_images / max(time.perf_counter() - start, 1e-9)
    metrics["iterations"] = iterations
    return metrics
