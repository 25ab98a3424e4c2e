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
from model_lightweight import create_lightweight_model
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
@pytest.mark.parametrize("workers", ["0", "2"])
def test_kill_9_then_resume_equals_uninterrupted_run(long_coco, tmp_path, workers):
    """Bit for bit, with loader workers too: their augmentations follow (seed, epoch, image), not the random state
    a worker carried from earlier epochs, which no checkpoint holds (issue #24)."""
    args = ["--coco-root", long_coco, "--epochs", "3", *FAST_PRETRAIN, "--seed", "5", "--workers", workers]
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
                              "--workers", workers, "--no-progress"], cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=300)
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


def test_a_crash_between_the_epoch_writes_never_leaves_last_ahead_of_best(tmp_path, monkeypatch):
    """Issue #24 item 8: save_epoch killed after each of its writes in a new best epoch. Whatever survives, the
    best (and best backbone) files are at least as new as the best epoch `last` records, so a resume never calls a
    run finished with an older best model."""
    model = create_lightweight_model(2, "nano", img_size=64)
    state = engine.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), ema=engine.build_ema(model))
    stage = {"index": 1, "name": "pretrain"}
    real_save = runs.save_checkpoint

    def best_epoch(run, epoch):
        run.best_map = epoch / 10
        run.summary.update(best_epoch=epoch, best_metrics={"mAP": run.best_map}, conf_threshold=0.3)
        runs.save_epoch(run, state, stage, epoch, {"mAP": run.best_map}, is_best=True)

    class Killed(Exception):
        pass

    writes, crash = [], {"after": None}

    def crashing_save(payload, path):
        if len(writes) == crash["after"]:
            raise Killed(path)
        real_save(payload, path)
        writes.append(path)

    monkeypatch.setattr(runs, "save_checkpoint", crashing_save)
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


def _strict_json(path):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse does."""
    import json

    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


def test_write_json_atomic_writes_undefined_numbers_as_null(tmp_path):
    """Issue #24 item 6: NaN and infinities, nested, in numpy scalars too, become null; numbers stay numbers."""
    import numpy as np
    from config import write_json_atomic
    data = {"AP_small": float("nan"), "rows": [{"loss": float("inf"), "lr": np.float32(0.5)}, (np.float64("-inf"),)],
            "epochs": np.int64(3), "ok": True, "name": "run"}
    write_json_atomic(data, str(tmp_path / "x.json"))
    written = _strict_json(tmp_path / "x.json")
    assert written == {"AP_small": None, "rows": [{"loss": None, "lr": 0.5}, [None]], "epochs": 3, "ok": True,
                       "name": "run"}
    assert written["ok"] is True and type(written["epochs"]) is int  # booleans and integers keep their type


def test_the_json_files_of_a_run_are_strict_json(fault_data, tmp_path):
    """Issue #24 item 6: summary.json held `"AP_large": NaN` (no large box in 96 px images), which strict parsers
    refuse; every JSON file of a tiny fine-tuning run parses strictly, with null for the undefined metrics."""
    import finetune_single_class
    from conftest import STAGES, finetune_args
    config = write_json(tmp_path / "one_epoch.json", {**STAGES, "stage2_epochs": 0})
    summary = finetune_single_class.main(finetune_args(fault_data, tmp_path / "runs", **{"--config": config}))
    names = sorted(name for name in os.listdir(summary["run_dir"]) if name.endswith(".json"))
    assert {"config.json", "summary.json"} <= set(names)
    for name in names:
        _strict_json(os.path.join(summary["run_dir"], name))
    written = _strict_json(os.path.join(summary["run_dir"], "summary.json"))
    assert written["best_metrics"]["AP_large"] is None and written["best_metrics"]["mAP"] is not None


# ---- issue #26: results files and run folders -------------------------------------------------------------------
def test_the_marked_threshold_is_a_point_on_the_pr_curve(tmp_path):
    """Issue #26 item 8: results.png marks the operating point the calibrated threshold selects (the lowest score
    it keeps), on the curve drawn from pr_curve.csv, labelled with the threshold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plots import operating_point, plot_pr_curve
    curve = {"recall": [0.1, 0.3, 0.5, 0.6, 0.8], "precision": [1.0, 0.9, 0.8, 0.6, 0.4],
             "score": [0.9, 0.7, 0.5004, 0.3, 0.1]}
    runs.write_pr_curve(curve, str(tmp_path / "pr_curve.csv"))
    assert runs.read_pr_curve(str(tmp_path / "pr_curve.csv")) == curve  # floats round-trip exactly
    assert runs.read_pr_curve(str(tmp_path / "missing.csv")) == {"recall": [], "precision": [], "score": []}
    threshold = 0.4002  # between 0.5004 (kept) and 0.3: the third operating point
    assert operating_point(curve, threshold) == 2
    assert operating_point(curve, 0.1) == 4 and operating_point(curve, 0.95) is None
    fig, ax = plt.subplots()
    plot_pr_curve(ax, {"conf_threshold": threshold, "best_epoch": 3}, curve)
    drawn, marker = ax.lines
    assert drawn.get_xydata().tolist() == [[r, p] for r, p in zip(curve["recall"], curve["precision"])]
    assert marker.get_xydata().tolist() == [[0.5, 0.8]]  # on the curve, not P/R recomputed elsewhere
    assert "0.400" in marker.get_label() and any(text.get_text() == "0.400" for text in ax.texts)
    plt.close(fig)


def test_name_names_the_run_folder_and_never_reuses_one_that_holds_a_run(fault_data, tmp_path):
    """Issue #26 item 6: --name NAME is OUTPUT_DIR/NAME for both scripts; a folder holding anything (a finished or
    interrupted run) is refused up front, before data loads, and so are paths and --name with --resume."""
    import finetune_single_class
    from config import ConfigError
    from conftest import finetune_args
    out = tmp_path / "runs"
    assert runs.named_run_dir(str(out), "mine", create=True) == str(out / "mine") and (out / "mine").is_dir()
    assert runs.named_run_dir(str(out), "mine") == str(out / "mine")  # empty: usable
    (out / "mine" / "last_model.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder; continue that run with "
                                          "--resume"):
        finetune_single_class.parse_config(finetune_args(fault_data, out, **{"--name": "mine"}))
    with pytest.raises(ConfigError, match="already exists"):
        pretrain.resolve_config(pretrain.typed_flags(["--coco-root", str(fault_data / "coco"), "--output-dir",
                                                      str(out), "--name", "mine"]))
    for bad in ("a/b", "..", ""):
        with pytest.raises(ConfigError, match="--name must be a folder name"):
            runs.named_run_dir(str(out), bad)
    with pytest.raises(ConfigError, match="a resumed run continues in its own"):
        runs.resolve("finetuning", {"resume": str(fault_data / "nowhere"), "name": "x"}, finetune_single_class.LAYOUT,
                     "finetune", ())


def test_resuming_a_run_that_kept_its_pr_curve_in_the_summary_moves_it_to_pr_curve_csv(tmp_path):
    """Runs from before pr_curve.csv kept the curve in summary.json (and in `last`'s summary); resumed, the curve
    moves to pr_curve.csv and the summary they write from then on stays small."""
    import finetune_single_class
    curve = {"recall": [0.5, 1.0], "precision": [1.0, 0.5], "score": [0.8, 0.2]}
    checkpoint = {"epoch": 2, "best_map": 0.4, "summary": {"best_epoch": 2, "best_pr_curve": curve}}
    config = {"resume": str(tmp_path / "old_run" / "last_model.pth")}
    (tmp_path / "old_run").mkdir()
    run = runs.open_run(config, ["thing"], finetune_single_class.LAYOUT, "finetune", "thing", checkpoint)
    run.writer.close()
    assert "best_pr_curve" not in run.summary and run.summary["best_epoch"] == 2
    assert runs.read_pr_curve(str(tmp_path / "old_run" / runs.PR_CURVE_FILE)) == curve


class FixedDetector:
    """Predicts one box per image, class 0 at score 0.9, at the top-left quarter of the image."""

    def predict(self, images, conf_threshold=None):
        self.conf_threshold = conf_threshold
        return [{"boxes": torch.tensor([[0.0, 0.0, image.shape[-1] / 2, image.shape[-2] / 2]]),
                 "scores": torch.tensor([0.9]), "labels": torch.tensor([0])} for image in images]


def test_the_best_epoch_writes_val_images_with_truth_beside_predictions(make_coco, tmp_path):
    """Issue #26 item 6: RUN/val_predictions.jpg shows up to 8 val images, each 480 px tall as two panels, the
    ground truth in green | the predictions at the calibrated threshold in the class colour, two pairs a row."""
    import types
    import numpy as np
    from PIL import Image, ImageColor
    from dataset_coco import CocoDetectionDataset
    from plots import PALETTE, PANEL_HEIGHT, TRUTH_COLOUR
    images = [(i, f"{i}.jpg", 64, 48) for i in range(1, 11)]  # 4:3 at 480 px tall: 640 wide
    ann_path, image_root = make_coco([(3, "cat")], images, [(i, 3, [32, 24, 24, 16]) for i in range(1, 11)])
    dataset = CocoDetectionDataset(ann_path, image_root, transforms=None)
    run = types.SimpleNamespace(run_dir=str(tmp_path), class_names=["cat"], summary={"conf_threshold": 0.42})
    model = FixedDetector()
    runs.write_val_predictions(run, model, dataset)
    assert model.conf_threshold == 0.42
    grid = np.asarray(Image.open(tmp_path / runs.VAL_PREDICTIONS_FILE).convert("RGB")).astype(int)
    pair_width, gap = 2 * 640, 8
    assert grid.shape == (4 * PANEL_HEIGHT + 3 * gap, 2 * pair_width + gap, 3)  # 8 of the 10 images

    def close(pixel, colour):
        return np.abs(pixel - np.array(ImageColor.getrgb(colour))).max() < 40  # JPEG
    for top, left in ((0, 0), (PANEL_HEIGHT + gap, pair_width + gap)):  # the first pair and the fourth
        truth_edge = grid[top + 300, left + 320 + 1]  # the left edge of the box (32, 24)-(56, 40), scaled by 10
        predicted_edge = grid[top + 120, left + 640 + 1]  # the left edge of the prediction (0, 0)-(32, 24)
        assert close(truth_edge, TRUTH_COLOUR) and close(predicted_edge, PALETTE[0])
        assert close(grid[top + 300, left + 640 + 320 + 1], "#808080")  # no truth drawn on the prediction panel
