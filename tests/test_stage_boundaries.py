"""No collapse at a stage boundary: releasing a layer group must not wipe out what the previous stage learned.

For each start a user can have (a backbone file, a full pretrained detector, lite0's ImageNet backbone), a
three-stage fine-tuning on learnable synthetic shapes: val mAP50 at the first epoch of stage k+1 is at least
0.8x its value at the last epoch of stage k. Before stages followed provenance, a random FPN was frozen with
its initial BatchNorm statistics through stage 1 and its release changed the head's inputs at once.
"""
import csv
import json
import os

import pytest

import finetune_single_class as finetune
import pretrain_multi_class as pretrain
from conftest import skip_run_pictures
from synthetic_data import write_coco_layout, write_shapes_split

pytestmark = pytest.mark.slow
SCHEDULE = {"stage1_epochs": 10, "stage1_head_lr": 4e-3, "stage2_epochs": 3, "stage2_head_lr": 2e-3,
            "stage2_fpn_lr": 1e-3, "stage3_epochs": 3, "stage3_head_lr": 1e-3, "stage3_fpn_lr": 5e-4,
            "stage3_backbone_lr": 2e-4, "stage_warmup_iters": 4, "ema_ramp_iters": 20}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """16 images of 96 px with 1-3 squares each (trained and scored on the same images: the test is about
    what a stage boundary does to what was learned), and a nano pretrained on other shapes (its full
    checkpoint and its backbone file). Without provenance-aware stages, the backbone file and lite0 learned
    almost nothing in stage 1 here, and what lite0 had learned was gone when stage 2 began."""
    root = tmp_path_factory.mktemp("boundaries")
    write_shapes_split(root / "train", root / "train.json", 16, ["square"], img_size=96, seed=0)
    write_coco_layout(root / "coco", ["square", "circle", "ring"], num_train=24, num_val=8, img_size=96)
    with pytest.MonkeyPatch.context() as monkeypatch:
        skip_run_pictures(monkeypatch)
        result = pretrain.main(["--coco-root", str(root / "coco"), "--classes", "3", "--epochs", "20",
                                "--batch-size", "4", "--eval-interval", "20", "--model-size", "nano", "--img-size",
                                "96", "--workers", "0", "--device", "cpu", "--output-dir", str(root / "pretrain"),
                                "--no-progress"])
    (root / "schedule.json").write_text(json.dumps(SCHEDULE))
    return {"root": root, "full": result["last_model"], "backbone": result["last_backbone"]}


def stage_curve(shapes, tmp_path, init_flags):
    root = shapes["root"]
    summary = finetune.main(["--config", str(root / "schedule.json"), "--class-name", "square",
                             "--train-root", str(root / "train"), "--train-ann", str(root / "train.json"),
                             "--val-root", str(root / "train"), "--val-ann", str(root / "train.json"),
                             "--batch-size", "4", "--img-size", "96", "--workers", "0", "--device", "cpu",
                             "--output-dir", str(tmp_path), "--no-progress", *init_flags])
    with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return [(int(row["stage"]), float(row["mAP50"])) for row in rows]


def assert_no_collapse(curve):
    for (stage, last), (next_stage, first) in zip(curve, curve[1:]):
        if next_stage != stage:
            assert first >= 0.8 * last, f"stage {stage} ends at mAP50 {last:.3f}, stage {next_stage} starts at " \
                                        f"{first:.3f}: {curve}"
    assert curve[SCHEDULE["stage1_epochs"] - 1][1] >= 0.2, f"stage 1 learned too little for the comparison to mean anything: {curve}"


@pytest.mark.parametrize("init", ["backbone", "full"])
def test_no_collapse_from_a_pretrained_nano(shapes, tmp_path, init, no_run_pictures):
    assert_no_collapse(stage_curve(shapes, tmp_path, ["--model-size", "nano", "--pretrained-backbone",
                                                      shapes[init]]))


def test_no_collapse_from_lite0_imagenet(shapes, tmp_path, no_run_pictures):
    assert_no_collapse(stage_curve(shapes, tmp_path, ["--model-size", "lite0", "--init", "imagenet"]))
