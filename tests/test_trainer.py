"""trainer.py: the epoch loop's faults lose no work (a run stopped by its losses, kill -9, Ctrl-C, a crash between
the epoch's writes; kill -9 and Ctrl-C in real subprocesses), and a resumed run equals an uninterrupted one."""
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
import trainer
from test_engine import NaNLoss
from conftest import ENV, FAST_PRETRAIN, REPO, exits_with_one_line, loss_curve, read_rows, write_json
from model_lightweight import create_lightweight_model
from synthetic_data import write_coco_layout


def test_nonfinite_streak_stops_pretraining_and_keeps_last_good_checkpoint(fault_data, tmp_path, monkeypatch, capsys,
                                                                           no_run_pictures):
    criterion = NaNLoss()
    real = engine.train_one_epoch

    def poison_from_epoch_2(*args, **kwargs):
        criterion.poisoned = args[5] >= 2
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "DetectionLoss", lambda: criterion)
    monkeypatch.setattr(engine, "train_one_epoch", poison_from_epoch_2)
    config = write_json(tmp_path / "c.json", {"max_nonfinite_steps": 2})
    argv = ["--coco-root", str(fault_data / "coco"), "--epochs", "3", *FAST_PRETRAIN, "--config", str(config),
            "--output-dir", str(tmp_path / "runs")]
    line = exits_with_one_line(capsys, lambda: pretrain.run(argv), status=1)
    (run_dir,) = [tmp_path / "runs" / d for d in os.listdir(tmp_path / "runs")]
    last = run_dir / "last_model.pth"
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
    return subprocess.Popen([sys.executable, "pretrain_multi_class.py", *args, "--no-plots"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=restore_sigint)


def wait_for_run_dir(output_dir, process, timeout=240):
    """Poll until the process has made its run folder under `output_dir`; fail, not hang, if it died first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(output_dir) and os.listdir(output_dir):
            (run_dir,) = [output_dir / name for name in os.listdir(output_dir)]
            return run_dir
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.02)
    raise TimeoutError(output_dir)


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
@pytest.mark.parametrize("workers", ["0", "2"])
def test_kill_9_then_resume_equals_uninterrupted_run(long_coco, tmp_path, workers):
    """Bit for bit, with loader workers too: their augmentations follow (seed, epoch, image), not the random state
    a worker carried from earlier epochs, which no checkpoint holds (issue #24)."""
    args = ["--coco-root", long_coco, "--epochs", "2", *FAST_PRETRAIN, "--seed", "5", "--workers", workers]
    straight = pretrain_process(*args, "--output-dir", str(tmp_path / "straight"))
    killed = pretrain_process(*args, "--output-dir", str(tmp_path / "killed"))
    run_dir = wait_for_run_dir(tmp_path / "killed", killed)
    last = run_dir / "last_model.pth"
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
                              "--workers", workers, "--no-progress"], cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at epoch 2" in resumed.stderr
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
    (straight_dir,) = [tmp_path / "straight" / d for d in os.listdir(tmp_path / "straight")]

    assert [int(row["epoch"]) for row in read_rows(run_dir)] == [1, 2], resumed.stderr[-3000:]  # each once
    assert loss_curve(run_dir) == loss_curve(straight_dir)
    a = torch.load(straight_dir / "last_model.pth", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["best_map"] == b["best_map"]
    for key in ("train_state_dict", "model_state_dict"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), (key, name)
    assert a["ema_updates"] == b["ema_updates"]
    assert a["scheduler_state_dict"]["last_epoch"] == b["scheduler_state_dict"]["last_epoch"]


@pytest.mark.slow
def test_ctrl_c_exits_130_with_resume_command(long_coco, tmp_path):
    process = pretrain_process("--coco-root", long_coco, "--epochs", "50", *FAST_PRETRAIN,
                               "--output-dir", str(tmp_path))
    run_dir = wait_for_run_dir(tmp_path, process)
    wait_for_epoch(run_dir / "last_model.pth", 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    done = torch.load(run_dir / "last_model.pth", weights_only=True)["epoch"]
    assert line.startswith("interrupted in epoch ") and f"holds epoch {done}" in line, line
    command = line.split("resume with: ")[1].split()
    assert command == ["python", "pretrain_multi_class.py", "--resume", str(run_dir)]
    resumed = subprocess.run([sys.executable, *command[1:], "--epochs", str(done + 1), "--workers", "0",
                              "--no-progress"], cwd=REPO,
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(row["epoch"]) for row in read_rows(run_dir)] == list(range(1, done + 2))


def test_a_crash_between_the_epoch_writes_never_leaves_last_ahead_of_best(tmp_path, monkeypatch):
    """Issue #24 item 8: save_epoch killed after each of its writes in a new best epoch. Whatever survives, the
    best (and best backbone) files are at least as new as the best epoch `last` records, so a resume never calls a
    run finished with an older best model."""
    model = create_lightweight_model(2, "nano", img_size=64)
    state = engine.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), ema=engine.build_ema(model))
    stage = {"index": 1, "name": "pretrain"}
    real_save = trainer.save_checkpoint

    def best_epoch(run, epoch):
        run.best_map = epoch / 10
        run.summary.update(best_epoch=epoch, best_metrics={"mAP": run.best_map}, conf_threshold=0.3)
        trainer.save_epoch(trainer.Trainer(run.config, state, {}, None, None, None, run), stage, epoch,
                           {"mAP": run.best_map}, is_best=True)

    class Killed(Exception):
        pass

    writes, crash = [], {"after": None}

    def crashing_save(payload, path):
        if len(writes) == crash["after"]:
            raise Killed(path)
        real_save(payload, path)
        writes.append(path)

    monkeypatch.setattr(trainer, "save_checkpoint", crashing_save)
    for crash_after in range(6):
        run = runs.Run(str(tmp_path / str(crash_after)), {"save_interval": 1}, ["a", "b"], pretrain.LAYOUT, "pretrain")
        crash["after"] = None
        best_epoch(run, 1)
        writes.clear()
        crash["after"] = crash_after
        try:
            best_epoch(run, 2)
        except Killed:
            pass
        last = torch.load(run.path("last"), weights_only=True)
        recorded = last["summary"]["best_epoch"]
        assert last["best_map"] == recorded / 10, writes
        for kind in ("best", "best_backbone"):
            assert torch.load(run.path(kind), weights_only=True)["epoch"] >= recorded, (kind, writes)
    assert writes[-1] == run.path("last")  # the last crash point is after every write: epoch 2 complete
