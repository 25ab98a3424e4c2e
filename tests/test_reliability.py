"""Reliability and safety (issue #7): bad input is one clear line and exit 2, faults lose no work,
checkpoints cannot run code.

The bad-input table runs the scripts' command-line entry points (`run()`) in-process, so each row costs
a config check rather than a Python start-up; the kill -9 and Ctrl-C tests use real subprocesses.
Everything is nano at 64 px with --workers 0 on CPU.
"""
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_coco
import engine
import finetune_single_class as finetune
import pretrain_multi_class as pretrain
from conftest import write_coco_json
from dataset_coco import CocoDetectionDataset, build_dataloader, build_transforms, collate_fn, dataset_report
from losses import DetectionLoss
from model_lightweight import create_lightweight_model, load_model, model_checkpoint, save_checkpoint
from synthetic_data import write_coco_layout, write_shapes_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST_PRETRAIN = ["--batch-size", "4", "--model-size", "nano", "--img-size", "64", "--workers", "0",
                 "--device", "cpu", "--no-progress"]
STAGES = {"num_classes": 1, "stage1_epochs": 1, "stage2_epochs": 1, "stage3_epochs": 0}


class Evil:
    """Unpickling this object opens (creates) `marker`: a stand-in for any code a checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(autouse=True)
def drop_script_log_handlers():
    """The scripts' logging.basicConfig binds a handler to this test's captured stderr; remove it after."""
    yield
    for handler in [h for h in logging.root.handlers if type(h) is logging.StreamHandler]:
        logging.root.removeHandler(handler)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fine-tuning files (train/val, 2 categories at 96 px), a COCO layout for pretraining, a nano backbone
    file, a flat config, a malicious pickle and a corrupt file."""
    root = tmp_path_factory.mktemp("reliability")
    write_shapes_split(root / "train", root / "train.json", 8, ["whiteline", "kerb"], img_size=96, seed=0)
    write_shapes_split(root / "val", root / "val.json", 4, ["whiteline", "kerb"], img_size=96, seed=1)
    write_coco_layout(str(root / "coco"), ["person", "car", "dog"], num_train=8, num_val=4, img_size=64, seed=0)
    backbone = create_lightweight_model(3, "nano", img_size=64).backbone_checkpoint()
    save_checkpoint(backbone, str(root / "nano_backbone.pth"))
    save_checkpoint(create_lightweight_model(3, "small", img_size=64).backbone_checkpoint(),
                    str(root / "small_backbone.pth"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)},
               root / "resnet.pth")  # another architecture's plain state dict
    (root / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip" * 20)
    torch.save({"model_state_dict": {"w": Evil(str(root / "PWNED"))}}, root / "evil.pth")
    (root / "flat.json").write_text(json.dumps(STAGES))
    return root


def finetune_args(data, output_dir, **overrides):
    values = {"--config": data / "flat.json", "--class-name": "whiteline", "--train-root": data / "train",
              "--train-ann": data / "train.json", "--val-root": data / "val", "--val-ann": data / "val.json",
              "--pretrained-backbone": data / "nano_backbone.pth", "--batch-size": "4", "--model-size": "nano",
              "--img-size": "64", "--workers": "0", "--device": "cpu", "--output-dir": output_dir}
    values.update(overrides)
    args = []
    for flag, value in values.items():
        if value is not None:
            args += [flag, str(value)]
    return args


def exits_with_one_line(capsys, entry, status=2):
    """Run a CLI entry point; check the exit status and that the error is one line. Returns that line."""
    logging.disable(logging.CRITICAL)  # the scripts log to stderr; only the error line is under test here
    try:
        with pytest.raises(SystemExit) as exit_info:
            entry()
    finally:
        logging.disable(logging.NOTSET)
    err = capsys.readouterr().err
    assert exit_info.value.code == status, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def finetune_cli(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["finetune_single_class.py", *argv])
    return finetune.run


def write_json(path, payload):
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


# ---------------------------------------------------------------------------------------- bad-input table

BAD_FINETUNE = {  # row id: (flag overrides, or a callable(data, tmp_path) returning them; expected message)
    "train_root_missing": ({"--train-root": "/nowhere/images"}, "train_root does not exist: /nowhere/images"),
    "train_ann_missing": ({"--train-ann": "/nowhere/ann.json"}, "train_ann does not exist: /nowhere/ann.json"),
    "backbone_missing": ({"--pretrained-backbone": "/nowhere/b.pth"}, "pretrained backbone not found"),
    "config_missing": ({"--config": "/nowhere/c.json"}, "config file not found: /nowhere/c.json"),
    "ann_not_json": (lambda d, t: {"--train-ann": write_json(t / "a.json", "{images: oops")}, "is not JSON"),
    "ann_json_list": (lambda d, t: {"--train-ann": write_json(t / "a.json", [1, 2])}, "holds a JSON list"),
    "ann_missing_keys": (lambda d, t: {"--train-ann": write_json(t / "a.json", {"images": []})},
                         "is not COCO: it lacks annotations, categories"),
    "ann_wrong_type": (lambda d, t: {"--train-ann": write_json(
        t / "a.json", {"images": {}, "annotations": [], "categories": []})}, "'images' must be a list, got a dict"),
    "ann_entry_lacks_field": (lambda d, t: {"--train-ann": write_json(
        t / "a.json", {"images": [{"id": 1}], "annotations": [], "categories": []})}, "images[0] lacks file_name"),
    "class_name_unknown": ({"--class-name": "zebra"}, "class 'zebra' is not in the annotation file; "
                                                      "available: whiteline, kerb"),
    "class_without_boxes": (lambda d, t: {"--train-ann": write_coco_json(
        t / "a.json", [(1, "whiteline")], [(i, name, 96, 96) for i, name in enumerate(os.listdir(d / "train"))],
        [])},
        "no usable 'whiteline' box in"),
    "all_images_missing": (lambda d, t: {"--train-root": t}, "8/8 images of"),
    "backbone_other_size": (lambda d, t: {"--pretrained-backbone": d / "small_backbone.pth"},
                            "holds a 'small' backbone but model_size is 'nano'; pass --model-size small"),
    "backbone_other_architecture": (lambda d, t: {"--pretrained-backbone": d / "resnet.pth"},
                                    "do not match this architecture"),
    "backbone_corrupt": (lambda d, t: {"--pretrained-backbone": d / "corrupt.pth"},
                         "is not a readable torch checkpoint"),
    "config_unknown_key": (lambda d, t: {"--config": write_json(t / "c.json", {**STAGES, "stage1_head_lrr": 1})},
                           "unknown config key 'stage1_head_lrr'"),
    "config_wrong_type": (lambda d, t: {"--config": write_json(t / "c.json", {**STAGES, "stage1_head_lr": "fast"})},
                          "config key 'stage1_head_lr' in"),
    "batch_size_zero": ({"--batch-size": "0"}, "batch_size must be >= 1"),
    "negative_epochs": (lambda d, t: {"--config": write_json(t / "c.json", {**STAGES, "stage2_epochs": -1})},
                        "stage2_epochs must be >= 0, got -1"),
    "negative_lr": (lambda d, t: {"--config": write_json(t / "c.json", {**STAGES, "stage1_head_lr": -0.001})},
                    "stage1_head_lr must be >= 0, got -0.001"),
    "img_size_not_multiple": ({"--img-size": "100"}, "img_size 100 is not a multiple of 32; use 96"),
    "max_nonfinite_steps_zero": (lambda d, t: {"--config": write_json(
        t / "c.json", {**STAGES, "max_nonfinite_steps": 0})}, "max_nonfinite_steps must be >= 1"),
}


@pytest.mark.parametrize("row", list(BAD_FINETUNE))
def test_finetune_bad_input_is_one_line_exit_2(row, data, tmp_path, monkeypatch, capsys):
    overrides, expected = BAD_FINETUNE[row]
    overrides = overrides(data, tmp_path) if callable(overrides) else overrides
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, finetune_args(data, tmp_path / "runs", **overrides)))
    assert line.startswith("error: ") and expected in line, line
    if row.startswith(("ann_", "all_", "class_without")):
        assert str(overrides.get("--train-ann", data / "train.json")) in line  # says where
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


BAD_PRETRAIN = {
    "coco_root_missing": (["--coco-root", "/nowhere"], "/nowhere is missing train2017/"),
    "unknown_classes": (["--classes", "dog,unicorn"], "class 'unicorn' is not in the annotation file; "
                                                      "available: person, car, dog"),
    "epochs_negative": (["--epochs", "-1"], "epochs must be >= 1, got -1"),
    "batch_size_zero": (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    "img_size_not_multiple": (["--img-size", "100"], "img_size 100 is not a positive multiple of 32; use 96"),
    "resume_missing": (["--resume", "/nowhere/checkpoints/last.pth"], "--resume checkpoint not found"),
    "resume_corrupt": (["--resume", "{data}/corrupt.pth"], "is not a readable torch checkpoint"),
}


@pytest.mark.parametrize("row", list(BAD_PRETRAIN))
def test_pretrain_bad_input_is_one_line_exit_2(row, data, tmp_path, capsys):
    argv, expected = BAD_PRETRAIN[row]
    argv = [arg.format(data=data) for arg in argv]
    if "--coco-root" not in argv and "--resume" not in argv:
        argv += ["--coco-root", str(data / "coco")]
    line = exits_with_one_line(capsys, lambda: pretrain.run(argv + ["--output-dir", str(tmp_path / "runs")]))
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key, value, expected", [
    ("head_lr", -1.0, "head_lr must be >= 0, got -1.0"),
    ("epochs", "ten", "config key 'epochs' in"),
    ("epoch", 3, "did you mean 'epochs'?"),
])
def test_pretrain_bad_config_values(key, value, expected, data, tmp_path, capsys):
    config = write_json(tmp_path / "c.json", {"pretraining": {key: value}})
    line = exits_with_one_line(capsys, lambda: pretrain.run(["--coco-root", str(data / "coco"), "--config",
                                                             str(config), "--output-dir", str(tmp_path)]))
    assert expected in line, line


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


@pytest.mark.parametrize("argv, expected", [
    (["--ann", "/nowhere.json", "--root", "/"], "annotation file not found: /nowhere.json"),
    (["--ann", "{data}/train.json", "--root", "{data}/train", "--class-name", "zebra"], "available: whiteline, kerb"),
    (["--ann", "{data}/flat.json", "--root", "{data}/train"], "is not COCO: it lacks images, annotations"),
])
def test_dataset_cli_bad_input_is_one_line(argv, expected, data, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dataset_coco.py", *[a.format(data=data) for a in argv]])
    line = exits_with_one_line(capsys, dataset_coco.run)
    assert expected in line, line


def test_full_checkpoint_accepted_as_backbone(data, tmp_path):
    source = create_lightweight_model(5, "nano", img_size=64)
    save_checkpoint(model_checkpoint(source, [str(i) for i in range(5)]), str(tmp_path / "full.pth"))
    config = finetune.parse_config(finetune_args(data, tmp_path, **{"--pretrained-backbone": tmp_path / "full.pth"}))
    model = finetune.build_model(config)
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


# ----------------------------------------------------------------------------------------------- safety

def test_malicious_pickle_never_runs(data, tmp_path, monkeypatch, capsys):
    marker, evil = data / "PWNED", str(data / "evil.pth")
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, finetune_args(
        data, tmp_path, **{"--pretrained-backbone": evil})))
    assert "refused: it would run" in line and "io.open" in line and evil in line
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, ["--resume", evil]))
    assert "refused: it would run" in line
    line = exits_with_one_line(capsys, lambda: pretrain.run(["--resume", evil]))
    assert "refused: it would run" in line
    with pytest.raises(ValueError, match="refused: it would run io.open") as error:
        load_model(evil)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really is malicious: an unsafe load creates the marker
    assert marker.exists()
    marker.unlink()


def test_every_torch_load_is_weights_only():
    for name in sorted(os.listdir(REPO)):
        if name.endswith(".py"):
            text = open(os.path.join(REPO, name)).read()
            for start in [i for i in range(len(text)) if text.startswith("torch.load(", i)]:
                call = text[start:text.index(")", start) + 1]
                assert "weights_only=True" in call, (name, call)


def test_run_folders_never_collide(tmp_path):
    folders = {engine.create_run_dir(str(tmp_path), "run") for _ in range(3)}
    assert len(folders) == 3 and all(os.path.dirname(f) == str(tmp_path) for f in folders)


# ------------------------------------------------------------------------------------------ data faults

def test_bad_boxes_dropped_clipped_and_reported_once(tmp_path, caplog):
    Image.fromarray(np.full((80, 100, 3), 128, np.uint8)).save(tmp_path / "a.png")
    ann = write_coco_json(tmp_path / "a.json", [(1, "x")], [(1, "a.png", 100, 80)],
                          [(1, 1, [-10, -10, 30, 30]), (1, 1, [10, 10, 0, 5]), (1, 1, [10, 10, -5, 5]),
                           (1, 1, [200, 200, 10, 10]), (1, 1, [float("nan"), 1, 5, 5]), (1, 1, [5, 6, 10, 12])])
    with caplog.at_level(logging.WARNING, logger="dataset_coco"):
        dataset = CocoDetectionDataset(ann, str(tmp_path), transforms=build_transforms("strong", 64))
    (record,) = caplog.records
    assert "clipped 1 boxes, dropped 4 (3 degenerate/outside, 1 non-finite/malformed)" in record.getMessage()
    image, target = dataset[0]  # training goes on with the two usable boxes
    assert image.shape == (3, 64, 64) and len(target["boxes_xyxy"]) <= 2
    report = dataset_report(dataset, 64)
    assert "boxes dropped: 4 (3 under 1 px or outside the image, 1 non-finite or malformed)" in report
    assert "WARNING: 4 of 6 boxes were dropped" in report


def write_bad_images(image_dir, names):
    """Turn the first file into a truncated PNG and the second into text named like an image."""
    first = image_dir / names[0]
    first.write_bytes(first.read_bytes()[:200])
    (image_dir / names[1]).write_text("this is not an image")


def test_unreadable_images_skipped_named_and_counted(data, tmp_path, caplog):
    image_dir = tmp_path / "images"
    ann = write_shapes_split(image_dir, tmp_path / "ann.json", 6, ["a"], img_size=64, seed=0)
    names = sorted(os.listdir(image_dir))
    write_bad_images(image_dir, names)
    dataset = CocoDetectionDataset(ann, str(image_dir), transforms=build_transforms("letterbox", 64))
    loader = build_dataloader(dataset, batch_size=2, shuffle=False, num_workers=0)
    model = create_lightweight_model(1, "nano", img_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with caplog.at_level(logging.WARNING, logger="dataset_coco"):
        metrics = engine.train_one_epoch(model, DetectionLoss(), optimizer, loader, "cpu", progress=False)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert names[0] in warned and names[1] in warned and "skipping unreadable image" in warned
    assert metrics["images_skipped"] == 2 and metrics["nonfinite_steps"] == 0
    assert collate_fn([None, None]) is None  # a batch of only bad images is skipped, not a crash
    with pytest.raises(engine.ConfigError, match=r"2/6 training images of epoch 1 could not be read \(more than "
                                                 r"max_bad_image_fraction=0.05\)"):
        engine.check_skipped_images(metrics, loader, 0.05, 1)
    engine.check_skipped_images(metrics, loader, 0.5, 1)  # under the configured share: the run goes on


def test_pretrain_with_unreadable_images_finishes_or_stops_clearly(tmp_path, capsys):
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


def test_unusual_image_modes_train_and_boxes_match(tmp_path):
    """Every mode loads as RGB, the box covers the bright object (after EXIF rotation too), and a training
    epoch over them is finite."""
    displayed = np.zeros((48, 64), np.uint8)
    displayed[8:28, 30:50] = 255  # object at x 30..50, y 8..28 in the displayed frame
    rgb = np.stack([displayed] * 3, axis=-1)
    files = {
        "gray.png": Image.fromarray(displayed, "L"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((48, 64), 255, np.uint8)]), "RGBA"),
        "palette.png": Image.fromarray(rgb).quantize(4),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "sixteen.png": Image.fromarray(displayed.astype(np.uint16) * 257),
    }
    for name, image in files.items():
        image.save(tmp_path / name, quality=98) if name.endswith(".jpg") else image.save(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif.jpg", quality=98, exif=exif)
    names = [*files, "exif.jpg"]
    ann = write_coco_json(tmp_path / "ann.json", [(1, "object")],
                          [(i, name, 64, 48) for i, name in enumerate(names, start=1)],
                          [(i, 1, [30, 8, 20, 20]) for i in range(1, len(names) + 1)])
    dataset = CocoDetectionDataset(ann, str(tmp_path), transforms=build_transforms("letterbox", 64))
    for index in range(len(dataset)):
        image, target = dataset[index]
        x0, y0, x1, y1 = target["boxes_xyxy"][0].round().int().tolist()
        assert (x0, y0, x1, y1) == (30, 8, 50, 28), names[index]
        inside = image[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2].mean()
        outside = image[:, 30:46, :24].mean()
        assert inside > 0.9 and outside < 0.1, (names[index], inside, outside)
    loader = build_dataloader(dataset, batch_size=3, shuffle=False, num_workers=0)
    model = create_lightweight_model(1, "nano", img_size=64)
    metrics = engine.train_one_epoch(model, DetectionLoss(), torch.optim.AdamW(model.parameters(), 1e-3), loader,
                                     "cpu", progress=False)
    assert metrics["nonfinite_steps"] == 0 and metrics["images_skipped"] == 0 and np.isfinite(metrics["loss"])


def test_dataset_report_warns_about_tiny_boxes_and_empty_class(tmp_path):
    Image.fromarray(np.full((400, 400, 3), 128, np.uint8)).save(tmp_path / "a.png")
    ann = write_coco_json(tmp_path / "a.json", [(1, "speck"), (2, "ghost")], [(1, "a.png", 400, 400)],
                          [(1, 1, [10, 10, 12, 12]), (1, 1, [100, 100, 15, 15])])
    report = dataset_report(CocoDetectionDataset(ann, str(tmp_path)), 160)
    assert "WARNING: class 'ghost' has no boxes" in report
    assert "WARNING: 2/2 boxes are under 8 px on a side at img_size 160" in report
    assert "2/2 boxes" not in dataset_report(CocoDetectionDataset(ann, str(tmp_path)), 640)


# ----------------------------------------------------------------------------------- non-finite losses

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


def test_nonfinite_step_is_skipped_and_counted(data):
    dataset = CocoDetectionDataset(data / "train.json", data / "train", transforms=build_transforms("letterbox", 64))
    loader = build_dataloader(dataset, batch_size=4, shuffle=False, num_workers=0)
    model = create_lightweight_model(2, "nano", img_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    criterion = NaNLoss()
    criterion.poisoned = True
    metrics = engine.train_one_epoch(model, criterion, optimizer, loader, "cpu", progress=False,
                                     max_nonfinite_steps=10, nonfinite_streak=3)
    assert metrics["nonfinite_steps"] == 2 and metrics["nonfinite_streak"] == 5
    for key, value in model.state_dict().items():  # no update from a NaN step (BN statistics aside)
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before[key]), key
    assert not optimizer.state
    criterion.poisoned = False
    metrics = engine.train_one_epoch(model, criterion, optimizer, loader, "cpu", progress=False,
                                     max_nonfinite_steps=10, nonfinite_streak=5)
    assert metrics["nonfinite_streak"] == 0 and np.isfinite(metrics["loss"])


def test_nonfinite_streak_stops_pretraining_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    criterion = NaNLoss()
    real = engine.train_one_epoch

    def poison_from_epoch_2(*args, **kwargs):
        criterion.poisoned = args[5] >= 2
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "DetectionLoss", lambda: criterion)
    monkeypatch.setattr(engine, "train_one_epoch", poison_from_epoch_2)
    config = write_json(tmp_path / "c.json", {"max_nonfinite_steps": 2})
    argv = ["--coco-root", str(data / "coco"), "--epochs", "3", *FAST_PRETRAIN, "--config", str(config),
            "--output-dir", str(tmp_path / "runs")]
    line = exits_with_one_line(capsys, lambda: pretrain.run(argv), status=1)
    (run_dir,) = [tmp_path / "runs" / d for d in os.listdir(tmp_path / "runs")]
    last = run_dir / "checkpoints" / "last.pth"
    assert ("2 non-finite losses in a row at epoch 2" in line and "lower the learning rate" in line
            and f"{last} keeps the last good epoch (1)" in line), line
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["train_state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------- determinism, kill -9, Ctrl-C

def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def loss_curve(run_dir):
    return [(row["epoch"], row["loss"], row["loss_cls"], row["loss_box"]) for row in read_rows(run_dir)]


def test_same_seed_same_loss_curve_on_cpu(data, tmp_path):
    argv = ["--coco-root", str(data / "coco"), "--epochs", "2", *FAST_PRETRAIN, "--seed", "3"]
    first = pretrain.main(argv + ["--output-dir", str(tmp_path / "a")])
    second = pretrain.main(argv + ["--output-dir", str(tmp_path / "b")])
    assert loss_curve(first["run_dir"]) == loss_curve(second["run_dir"])
    a, b = (torch.load(r["last_checkpoint"], weights_only=True)["train_state_dict"] for r in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)


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
