"""Shared pytest fixtures: a tiny synthetic shapes data set, a builder for hand-written COCO JSONs, and the data
set, flags and helpers of the bad-input and fault tests."""
import csv
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import finetune_single_class
import trainer
from checkpoints import save_checkpoint
from model_lightweight import create_lightweight_model
from synthetic_data import write_coco_layout, write_shapes_split


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
    """8 train images (128 px) of 2 classes, one of them without objects; category ids 1 and 3.

    Returns:
        dict with ``image_dir``, ``ann_path`` and ``class_names``.
    """
    root = tmp_path_factory.mktemp("shapes")
    class_names = ["square", "circle"]
    ann_path = write_shapes_split(root / "images", root / "train.json", num_images=8, class_names=class_names,
                                  img_size=128, seed=0, empty_fraction=0.125)
    return {"image_dir": str(root / "images"), "ann_path": ann_path, "class_names": class_names}


def write_coco_json(path, categories, images, annotations):
    """Write a COCO JSON from compact tuples.

    Args:
        categories: [(category_id, name)].
        images: [(image_id, file_name, width, height)].
        annotations: [(image_id, category_id, bbox_xywh)] or [(image_id, category_id, bbox_xywh, iscrowd)].
    """
    data = {"categories": [{"id": cid, "name": name} for cid, name in categories],
            "images": [{"id": iid, "file_name": name, "width": w, "height": h} for iid, name, w, h in images],
            "annotations": []}
    for ann_id, (image_id, category_id, bbox, *crowd) in enumerate(annotations, start=1):
        area = bbox[2] * bbox[3] if len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox) else 0
        data["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": category_id,
                                    "bbox": bbox, "area": area, "iscrowd": crowd[0] if crowd else 0})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def make_coco(tmp_path):
    """Builder of a tiny COCO set in ``tmp_path``: ``make_coco(categories, images, annotations)``.

    Tuples as in ``write_coco_json``; every image is written as a mid-grey JPEG of its size under
    ``tmp_path/images`` unless ``write_images=False``. Returns ``(ann_path, image_root)``.
    """
    def build(categories, images, annotations, write_images=True, name="ann.json"):
        image_root = tmp_path / "images"
        image_root.mkdir(exist_ok=True)
        if write_images:
            for _, file_name, width, height in images:
                (image_root / file_name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(image_root / file_name)
        return write_coco_json(tmp_path / name, categories, images, annotations), str(image_root)
    return build


# ---- runs without their pictures --------------------------------------------------------------------------------
RUN_PICTURES = ("plot_run", "log_validation_images", "write_val_predictions")  # trainer.finish_epoch's drawings


def skip_run_pictures(monkeypatch):
    """Training runs in this test draw no results.png, TensorBoard images or val_predictions.jpg.

    Drawing them takes most of a tiny run's time, and they draw no random numbers and change no weights, so
    metrics.csv and the checkpoints stay bit for bit the same. For tests that read none of them; the tests of the
    results files keep drawing."""
    for name in RUN_PICTURES:
        monkeypatch.setattr(trainer, name, lambda *args, **kwargs: None)


@pytest.fixture
def no_run_pictures(monkeypatch):
    """skip_run_pictures for one test."""
    skip_run_pictures(monkeypatch)


# ---- bad input and faults: a data set, flags and helpers shared by the modules that test them ------------------
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


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory):
    """Fine-tuning files (train/val, 2 categories at 96 px), a COCO layout for pretraining, a nano backbone
    file, a flat config, a malicious pickle and a corrupt file."""
    root = tmp_path_factory.mktemp("faults")
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


@pytest.fixture(scope="session")
def one_epoch_finetune(fault_data, tmp_path_factory):
    """The summary of a finished one-epoch fine-tuning (stage 1 alone) on fault_data, every results file drawn,
    shared by the tests that read a run's files."""
    root = tmp_path_factory.mktemp("one_epoch_finetune")
    config = write_json(root / "one_epoch.json", {**STAGES, "stage2_epochs": 0})
    return finetune_single_class.main(finetune_args(fault_data, root / "runs", **{"--config": config}))


def finetune_args(fault_data, output_dir, **overrides):
    values = {"--config": fault_data / "flat.json", "--class-name": "whiteline", "--train-root": fault_data / "train",
              "--train-ann": fault_data / "train.json", "--val-root": fault_data / "val", "--val-ann": fault_data / "val.json",
              "--pretrained-backbone": fault_data / "nano_backbone.pth", "--batch-size": "4", "--model-size": "nano",
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
    return finetune_single_class.run


def write_json(path, payload):
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def write_bad_images(image_dir, names):
    """Turn the first file into a truncated PNG and the second into text named like an image."""
    first = image_dir / names[0]
    first.write_bytes(first.read_bytes()[:200])
    (image_dir / names[1]).write_text("this is not an image")


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def loss_curve(run_dir):
    return [(row["epoch"], row["loss"], row["loss_cls"], row["loss_box"]) for row in read_rows(run_dir)]
