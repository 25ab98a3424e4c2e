"""Tests of pretrain_multi_class.py: the CLI end to end (outputs, backbone transfer, --resume), config
precedence and errors, class selection.

The data is a synthetic COCO layout whose class names are COCO names, so the default 30-class list
applies (keeping the 3 present); nano at 64 px with workers 0 keeps the file fast on 2 CPU cores.
"""
import collections
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import pretrain_multi_class
import pretrain_multi_class as pretrain
from config import ConfigError
from conftest import ENV, FAST_PRETRAIN, exits_with_one_line, write_bad_images, write_json
from model_lightweight import create_lightweight_model
from synthetic_data import write_coco_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ["person", "car", "dog"]
FAST = ["--epochs", "2", "--batch-size", "4", "--model-size", "nano", "--img-size", "64", "--workers", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco_layout(str(root), CLASS_NAMES, num_train=8, num_val=4, img_size=64, seed=0)
    return str(root)


def run_cli(*args):
    return subprocess.run([sys.executable, "pretrain_multi_class.py", *args, "--no-plots"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cli_run(coco_root, tmp_path_factory):
    """One 2-epoch CLI run; returns its run folder."""
    output_dir = tmp_path_factory.mktemp("runs")
    result = run_cli("--coco-root", coco_root, *FAST, "--output-dir", str(output_dir), "--save-interval", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [entry.path for entry in os.scandir(output_dir)]
    return run_dir


@pytest.mark.slow
def test_cli_writes_every_output(cli_run):
    assert os.path.basename(cli_run).startswith("multi_class_")
    for name in ("last_model.pth", "best_model.pth", "snapshots/epoch_1.pth", "snapshots/epoch_2.pth",
                 "backbone_weights/best_backbone.pth", "backbone_weights/last_backbone.pth", "config.json",
                 "metrics.csv"):
        assert os.path.isfile(os.path.join(cli_run, name)), name
    assert os.listdir(os.path.join(cli_run, "tensorboard"))
    rows = read_metrics(cli_run)
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert all(row["mAP"] != "" and row["mAP50"] != "" and row["lr_head"] != "" for row in rows)
    for folder in ("snapshots", "backbone_weights"):
        for name in os.listdir(os.path.join(cli_run, folder)):
            torch.load(os.path.join(cli_run, folder, name), map_location="cpu", weights_only=True)
    last = torch.load(os.path.join(cli_run, "last_model.pth"), weights_only=True)
    assert last["epoch"] == 2 and last["script"] == "pretrain" and last["class_names"] == CLASS_NAMES
    config = json.load(open(os.path.join(cli_run, "config.json")))
    assert config["epochs"] == 2 and config["weight_decay"] == 0.05
    assert json.load(open(os.path.join(cli_run, "summary.json")))["class_names"] == CLASS_NAMES


@pytest.mark.slow
def test_best_backbone_loads_into_fresh_model(cli_run):
    best = torch.load(os.path.join(cli_run, "best_model.pth"), weights_only=True)
    path = os.path.join(cli_run, "backbone_weights", "best_backbone.pth")
    backbone_file = torch.load(path, weights_only=True)
    assert backbone_file["model_size"] == "nano" and backbone_file["class_names"] == CLASS_NAMES
    assert backbone_file["epoch"] == best["epoch"]
    model = create_lightweight_model(1, "nano", img_size=64, backbone_weights_path=path)
    loaded = model.backbone.state_dict()
    ema_backbone = {k[len("backbone."):]: v for k, v in best["model_state_dict"].items() if k.startswith("backbone.")}
    assert loaded.keys() == ema_backbone.keys()
    for key, value in ema_backbone.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    # the checkpoints' model_state_dict is the EMA, which differs from the raw weights the optimizer stepped
    last = torch.load(os.path.join(cli_run, "last_model.pth"), weights_only=True)
    assert any(not torch.equal(v, last["train_state_dict"][k]) for k, v in last["model_state_dict"].items()
               if v.is_floating_point())


@pytest.mark.slow
def test_resume_continues_in_same_folder(cli_run, tmp_path, no_run_pictures):
    run_dir = str(tmp_path / os.path.basename(cli_run))
    shutil.copytree(cli_run, run_dir)  # leave the module's run untouched
    last = os.path.join(run_dir, "last_model.pth")
    # in-process: cli_run already ran the command line
    pretrain_multi_class.main(["--resume", last, "--epochs", "3", "--device", "cpu", "--workers", "0"])
    assert [int(row["epoch"]) for row in read_metrics(run_dir)] == [1, 2, 3]
    assert torch.load(last, weights_only=True)["epoch"] == 3
    assert json.load(open(os.path.join(run_dir, "config.json")))["epochs"] == 3
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(run_dir)]  # no new run folder
    with pytest.raises(ConfigError, match="already finished 3"):  # never overwrite a finished run
        pretrain_multi_class.main(["--resume", last, "--epochs", "3", "--device", "cpu"])


def test_resume_matches_uninterrupted_run(coco_root, tmp_path, no_run_pictures):
    common = ["--coco-root", coco_root, *FAST, "--no-progress"]
    straight = pretrain_multi_class.main(common + ["--output-dir", str(tmp_path / "a")])  # 2 epochs
    first = pretrain_multi_class.main(common + ["--epochs", "1", "--output-dir", str(tmp_path / "b")])
    # workers is a setting of the machine, not of the run: with 0 the augmentation draws come from the
    # main process's RNG, which the checkpoint restores, so the resumed epoch is bit-for-bit the same
    resumed = pretrain_multi_class.main(["--resume", first["last_model"], "--epochs", "2", "--device", "cpu",
                                         "--workers", "0", "--no-progress"])
    assert resumed["run_dir"] == first["run_dir"]
    a, b = (torch.load(r["last_model"], weights_only=True) for r in (straight, resumed))
    for key in ("train_state_dict", "model_state_dict"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, msg=f"{key} {name}")
    assert resumed["last_metrics"]["mAP"] == pytest.approx(straight["last_metrics"]["mAP"])


def test_cli_flag_beats_config_file_and_config_json_records_it(coco_root, tmp_path, no_run_pictures):
    config_file = tmp_path / "custom.json"
    config_file.write_text(json.dumps({"pretraining": {"epochs": 5, "head_lr": 0.005,
                                                       "classes": ["dog", "unicorn", "car"]}}))
    result = pretrain_multi_class.main(["--coco-root", coco_root, "--config", str(config_file), *FAST,
                                        "--epochs", "1", "--no-progress", "--output-dir", str(tmp_path / "runs")])
    config = json.load(open(os.path.join(result["run_dir"], "config.json")))
    assert config["epochs"] == 1  # CLI beats the file
    assert config["head_lr"] == 0.005  # the file beats config_transfer_learning.json (0.002)
    assert config["weight_decay"] == 0.05  # the "optimization" section still applies
    # a configured list trains those present; config.json keeps the list as configured
    assert config["classes"] == ["dog", "unicorn", "car"] and result["class_names"] == ["dog", "car"]
    assert [int(row["epoch"]) for row in read_metrics(result["run_dir"])] == [1]


def test_unknown_config_key_names_the_nearest(coco_root, tmp_path):
    config_file = tmp_path / "typo.json"
    config_file.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ConfigError, match="'epoch'.*'epochs'"):
        pretrain_multi_class.main(["--coco-root", coco_root, "--config", str(config_file),
                                   "--output-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_classes_k_takes_the_most_frequent(coco_root, tmp_path, no_run_pictures):
    with open(os.path.join(coco_root, "annotations", "instances_train2017.json")) as f:
        data = json.load(f)
    counts = collections.Counter(ann["category_id"] for ann in data["annotations"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    expected = [names[cid] for cid in sorted(counts, key=lambda cid: (-counts[cid], cid))[:2]]
    result = pretrain_multi_class.main(["--coco-root", coco_root, *FAST, "--epochs", "1", "--classes", "2",
                                        "--no-progress", "--output-dir", str(tmp_path)])
    assert result["class_names"] == expected
    assert torch.load(result["best_backbone"], weights_only=True)["class_names"] == expected


def test_typed_unknown_class_is_an_error(coco_root, tmp_path):
    with pytest.raises(ConfigError, match="unicorn"):
        pretrain_multi_class.main(["--coco-root", coco_root, "--classes", "dog,unicorn",
                                   "--output-dir", str(tmp_path)])


def test_missing_coco_folder_is_one_line_and_exit_2(tmp_path, capsys):
    """Through the command-line entry in-process; test_pretrain_cli_subprocess_is_one_line runs the interpreter."""
    line = exits_with_one_line(capsys, lambda: pretrain_multi_class.run(
        ["--coco-root", str(tmp_path / "nowhere"), "--device", "cpu", "--output-dir", str(tmp_path / "runs")]))
    assert "train2017/" in line and "annotations/instances_val2017.json" in line


@pytest.mark.slow
def test_pretrain_cli_subprocess_is_one_line(tmp_path):
    """The real command line (interpreter, logging set up) shows the same single line."""
    result = subprocess.run([sys.executable, "pretrain_multi_class.py", "--coco-root", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path} is missing train2017/, val2017/, "
                                                  f"annotations/instances_train2017.json, annotations/"
                                                  f"instances_val2017.json; expected COCO layout: {tmp_path}/"
                                                  f"{{train2017/, val2017/, annotations/instances_train2017.json, "
                                                  f"annotations/instances_val2017.json}}"]


def test_pretrain_with_unreadable_images_finishes_or_stops_clearly(tmp_path, capsys, no_run_pictures):
    root = tmp_path / "coco"
    write_coco_layout(str(root), ["person", "car"], num_train=8, num_val=4, img_size=64, seed=0)
    write_bad_images(root / "train2017", sorted(os.listdir(root / "train2017"))[:2])
    argv = ["--coco-root", str(root), "--epochs", "1", *FAST_PRETRAIN, "--output-dir", str(tmp_path / "runs")]
    line = exits_with_one_line(capsys, lambda: pretrain.run(argv))
    assert "2/8 training images of epoch 1 could not be read" in line
    config = write_json(tmp_path / "c.json", {"max_bad_image_fraction": 0.3})
    result = pretrain.main(argv + ["--config", str(config)])
    with open(os.path.join(result["run_dir"], "metrics.csv")) as f:
        (row,) = list(csv.DictReader(f))
    assert row["images_skipped"] == "2" and row["nonfinite_steps"] == "0"


def test_pretraining_on_a_yolo_folder_through_the_python_api(tmp_path, no_run_pictures):
    """Any multi-class data: a YOLO data.yaml (its train and val entries), from pretrain(); logging untouched."""
    import logging
    from synthetic_data import write_shapes_split
    from test_annotations import write_yolo
    ann = write_shapes_split(tmp_path / "images", tmp_path / "coco.json", 8, ["square", "circle", "ring"],
                             img_size=64, seed=4)
    data_yaml = write_yolo(json.loads(open(ann).read()), tmp_path / "images", tmp_path / "yolo")
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    result = pretrain_multi_class.pretrain(train_ann=data_yaml, classes=None, epochs=1, batch_size=4,
                                           model_size="nano", img_size=64, workers=0, device="cpu",
                                           output_dir=str(tmp_path / "runs"), progress=False)
    assert (root.level, list(root.handlers)) == before
    assert result["class_names"] == ["square", "circle", "ring"]  # the data.yaml's names, in its order
    assert not os.path.exists(os.path.join(result["run_dir"], "split.json"))  # its val entry validated
    with pytest.raises(ConfigError, match="either --coco-root .* or --train-ann, not both"):
        pretrain_multi_class.pretrain(train_ann=data_yaml, coco_root=str(tmp_path))
