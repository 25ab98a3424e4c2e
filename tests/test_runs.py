"""runs.py: run folders, the per-epoch records and checkpoints both scripts share, and faults that lose no work
(a run stopped by its losses, kill -9, Ctrl-C; the last two in real subprocesses)."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine
import pretrain_multi_class as pretrain
import runs
from test_engine import NaNLoss
from conftest import ENV, FAST_PRETRAIN, REPO, exits_with_one_line, loss_curve, read_rows, write_json
from synthetic_data import write_coco_layout


def test_run_folders_never_collide(tmp_path):
    folders = {runs.create_run_dir(str(tmp_path), "run") for _ in range(3)}
    assert len(folders) == 3 and all(os.path.dirname(f) == str(tmp_path) for f in folders)


def test_nonfinite_streak_stops_pretraining_and_keeps_last_good_checkpoint(fault_data, tmp_path, monkeypatch, capsys):
    criterion = NaNLoss()
    real = engine.train_one_epoch

    def poison_from_epoch_2(*args, **kwargs):
        criterion.poisoned = args[5] >= 2
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "DetectionLoss", lambda: criterion)
    monkeypatch.setattr(engine, "train_one_epoch", poison_from_epoch_2)
    config = write_json(tmp_path / "c.json", {"max_nonfinite_steps": 2})
    argv = ["--coco-root", str(fault_data / "coco"), "--epochs", "3", *FAST_PRETRAIN, "--config", str(config),
            "--output-dir", str(tmp_path / "runs")]
    line = exits_with_one_line(capsys, lambda: pretrain.run(argv), status=1)
    (run_dir,) = [tmp_path / "runs" / d for d in os.listdir(tmp_path / "runs")]
    last = run_dir / "checkpoints" / "last.pth"
    assert ("2 non-finite losses in a row at epoch 2" in line and "lower the learning rate" in line
            and f"{last} keeps the last good epoch (1)" in line), line
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["train_state_dict"].values() if v.is_floating_point())


def restore_sigint():
    """A shell starts background jobs (`cmd &`, CI runners) with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler; give the child the default disposition, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pretrain_process(*args):
    return subprocess.Popen([sys.executable, "pretrain_multi_class.py", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=restore_sigint)


def wait_for_epoch(path, epoch, process, timeout=240):
    """Poll until the checkpoint at `path` records `epoch` (written atomically, so a read never sees half)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        if os.path.isfile(path):
            if torch.load(path, map_location="cpu", weights_only=True)["epoch"] >= epoch:
                return
        time.sleep(0.02)
    raise TimeoutError(path)


@pytest.fixture(scope="module")
def long_coco(tmp_path_factory):
    """24 training images, so an epoch has 6 iterations and a kill lands inside one."""
    root = tmp_path_factory.mktemp("long_coco")
    write_coco_layout(str(root), ["person", "car"], num_train=24, num_val=4, img_size=64, seed=1)
    return str(root)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(long_coco, tmp_path):
    args = ["--coco-root", long_coco, "--epochs", "3", *FAST_PRETRAIN, "--seed", "5"]
    straight = pretrain_process(*args, "--output-dir", str(tmp_path / "straight"))
    killed = pretrain_process(*args, "--output-dir", str(tmp_path / "killed"))
    killed_dir = tmp_path / "killed"
    while not (killed_dir.exists() and os.listdir(killed_dir)):
        time.sleep(0.02)
    (run_dir,) = [killed_dir / d for d in os.listdir(killed_dir)]
    last = run_dir / "checkpoints" / "last.pth"
    wait_for_epoch(last, 1, killed)
    killed.send_signal(signal.SIGKILL)  # during epoch 2
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["epoch"] == 1, "the kill came too late to test a mid-run fault"
    # A kill between metrics.csv and last.pth leaves a row the checkpoint does not have: resume drops it.
    rows = read_rows(run_dir)
    with open(run_dir / "metrics.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow({**rows[0], "epoch": "2", "loss": "999"})
    resumed = subprocess.run([sys.executable, "pretrain_multi_class.py", "--resume", str(run_dir), "--device", "cpu",
                              "--workers", "0", "--no-progress"], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at epoch 2" in resumed.stderr
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
    (straight_dir,) = [tmp_path / "straight" / d for d in os.listdir(tmp_path / "straight")]

    assert [int(row["epoch"]) for row in read_rows(run_dir)] == [1, 2, 3], resumed.stderr[-3000:]  # each once
    assert loss_curve(run_dir) == loss_curve(straight_dir)
    a = torch.load(straight_dir / "checkpoints" / "last.pth", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["best_map"] == b["best_map"]
    for key in ("train_state_dict", "model_state_dict"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), (key, name)
    assert a["ema_updates"] == b["ema_updates"]
    assert a["scheduler_state_dict"]["last_epoch"] == b["scheduler_state_dict"]["last_epoch"]


@pytest.mark.slow
def test_ctrl_c_exits_130_with_resume_command(long_coco, tmp_path):
    process = pretrain_process("--coco-root", long_coco, "--epochs", "50", *FAST_PRETRAIN,
                               "--output-dir", str(tmp_path))
    while not os.listdir(tmp_path):
        time.sleep(0.02)
    (run_dir,) = [tmp_path / d for d in os.listdir(tmp_path)]
    wait_for_epoch(run_dir / "checkpoints" / "last.pth", 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    done = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["epoch"]
    assert line.startswith("interrupted in epoch ") and f"holds epoch {done}" in line, line
    command = line.split("resume with: ")[1].split()
    assert command == ["python", "pretrain_multi_class.py", "--resume", str(run_dir)]
    resumed = subprocess.run([sys.executable, *command[1:], "--epochs", str(done + 1), "--workers", "0",
                              "--no-progress"], cwd=REPO,
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(row["epoch"]) for row in read_rows(run_dir)] == list(range(1, done + 2))
