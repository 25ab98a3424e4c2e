"""engine.py: the training loop (non-finite steps, determinism), its state and options."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

import engine
import pretrain_multi_class as pretrain
from conftest import FAST_PRETRAIN, loss_curve
from dataset_coco import CocoDetectionDataset, build_dataloader, build_transforms
from losses import DetectionLoss
from model_lightweight import create_lightweight_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NaNLoss(torch.nn.Module):
    """DetectionLoss whose total is NaN while `self.poisoned`."""

    def __init__(self):
        super().__init__()
        self.inner, self.poisoned = DetectionLoss(), False

    def forward(self, outputs, targets):
        losses = self.inner(outputs, targets)
        if self.poisoned:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def test_nonfinite_step_is_skipped_and_counted(fault_data):
    dataset = CocoDetectionDataset(fault_data / "train.json", fault_data / "train", transforms=build_transforms("letterbox", 64))
    loader = build_dataloader(dataset, batch_size=4, shuffle=False, num_workers=0)
    model = create_lightweight_model(2, "nano", img_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    criterion = NaNLoss()
    criterion.poisoned = True
    state, options = engine.TrainState(model, optimizer, nonfinite_streak=3), engine.StepOptions(max_nonfinite_steps=10)
    metrics = engine.train_one_epoch(model, criterion, loader, state, options, progress=False)
    assert metrics["nonfinite_steps"] == 2 and state.nonfinite_streak == 5
    for key, value in model.state_dict().items():  # no update from a NaN step (BN statistics aside)
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before[key]), key
    assert not optimizer.state
    criterion.poisoned = False
    metrics = engine.train_one_epoch(model, criterion, loader, state, options, progress=False)
    assert state.nonfinite_streak == 0 and np.isfinite(metrics["loss"])


def test_same_seed_same_loss_curve_on_cpu(fault_data, tmp_path, no_run_pictures):
    argv = ["--coco-root", str(fault_data / "coco"), "--epochs", "2", *FAST_PRETRAIN, "--seed", "3"]
    first = pretrain.main(argv + ["--output-dir", str(tmp_path / "a")])
    second = pretrain.main(argv + ["--output-dir", str(tmp_path / "b")])
    assert loss_curve(first["run_dir"]) == loss_curve(second["run_dir"])
    a, b = (torch.load(r["last_model"], weights_only=True)["train_state_dict"] for r in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)


KEPT_MEMORY_PROBE = """
import resource, sys
import engine
import torch
if sys.argv[1] == "keep":
    assert engine.keep_freed_memory()
faults = []
for _ in range(12):  # a step's activation: allocated, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2 ** 20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-4:]))  # the steady state: the first steps may still grow the heap
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_kept_for_the_next_step():
    """keep_freed_memory (training's allocator): once the heap has grown, a 64 MB block freed and taken again
    costs no new page faults, where glibc's default maps fresh pages every time."""
    def faults(mode):
        done = subprocess.run([sys.executable, "-c", KEPT_MEMORY_PROBE, mode], capture_output=True, text=True,
                              cwd=ROOT, check=True)
        return int(done.stdout.split()[-1])
    pages = 64 * 2 ** 20 // 4096
    default = faults("default")
    assert default > 3 * pages  # fresh pages at every one of the last 4 steps
    assert faults("keep") < default / 2
