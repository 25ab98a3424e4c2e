"""Fine-tuning a few classes (#28): the class list from flags, config and resume; per-class AP, AP50 and
thresholds (null for a class without val boxes); the confusion matrix; per-class thresholds in model.predict(),
predict.py, the ONNX sidecar and the ONNX Runtime backend; one two-class run end to end (train, evaluate, predict
with --save-txt, export fp32 and INT8)."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import config
import evaluate
import export
import finetune_single_class as finetune
import predict
from checkpoints import model_checkpoint, save_checkpoint
from conftest import (exits_with_one_line, finetune_args, finetune_cli, skip_run_pictures, write_coco_json, write_json,
                      STAGES)
from inference import select_detections
from model_lightweight import create_lightweight_model, load_model
from ort_detector import OrtDetector
from test_predict_export import randomise

TWO = ["whiteline", "kerb"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the class list ------------------------------------------------------------------------------------------
def no_num_classes(fault_data, tmp_path):
    """fault_data's flat config without its num_classes 1 (which a two-class run refuses)."""
    return write_json(tmp_path / "flat.json", {k: v for k, v in STAGES.items() if k != "num_classes"})


@pytest.mark.parametrize("flags, expected", [(["whiteline", "kerb"], TWO), (["kerb,whiteline"], ["kerb", "whiteline"]),
                                             (["whiteline"], ["whiteline"]), (["a, b", "c"], ["a", "b", "c"])])
def test_class_names_come_as_several_flags_or_a_comma_list(fault_data, tmp_path, flags, expected):
    argv = finetune_args(fault_data, tmp_path, **{"--class-name": None, "--config": no_num_classes(fault_data, tmp_path)})
    assert finetune.parse_config(argv + ["--class-name", *flags])["class_name"] == expected
    settings = {"class_name": ",".join(flags), "train_ann": str(fault_data / "train.json")}
    assert finetune.resolve_config(settings)[0]["class_name"] == expected  # finetune(class_name="a,b")


def test_num_classes_follows_the_list_and_a_mismatch_is_one_line(fault_data, tmp_path, monkeypatch, capsys):
    argv = finetune_args(fault_data, tmp_path / "runs", **{"--class-name": None})  # flat.json has num_classes 1
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, argv + ["--class-name", *TWO]))
    assert line == ("error: num_classes is 1 but the classes are 2 (whiteline, kerb); drop num_classes (it follows "
                    "the class list) or name 1 classes")
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, argv + ["--all-classes"]))  # found in the data
    assert "num_classes is 1 but the classes are 2 (whiteline, kerb)" in line
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, finetune_args(
        fault_data, tmp_path / "runs", **{"--class-name": "whiteline,zebra", "--config": no_num_classes(fault_data, tmp_path)})))
    assert line.endswith("train.json: class 'zebra' is not in the annotation file; available: whiteline, kerb")
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, finetune_args(
        fault_data, tmp_path / "runs", **{"--class-name": None, "--config": no_num_classes(fault_data, tmp_path)})))
    assert "has 2 categories; choose with --class-name (whiteline, kerb), or take them all with --all-classes" in line
    assert not (tmp_path / "runs").exists()


# ---- per-class metrics ----------------------------------------------------------------------------------------
def coco(tmp_path):
    """Three classes (ids 1, 2, 5), two images; class 'bird' (5) has no ground truth."""
    path = write_coco_json(tmp_path / "gt.json", [(1, "cat"), (2, "dog"), (5, "bird")],
                           [(1, "a.jpg", 100, 100), (2, "b.jpg", 100, 100)],
                           [(1, 1, [10, 10, 20, 20]), (1, 2, [50, 50, 30, 30]), (2, 1, [0, 0, 40, 40])])
    from pycocotools.coco import COCO
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def detection(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_per_class_ap_thresholds_and_a_class_without_val_boxes_is_null(tmp_path):
    gt = coco(tmp_path)
    detections = [detection(1, 1, [10, 10, 20, 20], 0.9), detection(2, 1, [0, 0, 40, 40], 0.6),
                  detection(1, 2, [50, 50, 30, 30], 0.4), detection(2, 2, [60, 60, 20, 20], 0.8),  # a dog FP
                  detection(2, 5, [5, 5, 10, 10], 0.7)]  # a bird where there is none
    metrics = evaluate.coco_metrics(gt, detections, [1, 2], [1, 2, 5], ["cat", "dog", "bird"], conf_threshold=0.5)
    per_class = metrics["per_class"]
    assert list(per_class) == ["cat", "dog", "bird"]
    assert per_class["cat"]["AP50"] == pytest.approx(1.0) and per_class["cat"]["num_gt"] == 2
    assert per_class["cat"]["best_f1"] == 1.0 and 0.0 < per_class["cat"]["best_f1_threshold"] < 0.6
    assert per_class["dog"]["best_f1"] == pytest.approx(2 / 3) and per_class["dog"]["best_f1_threshold"] < 0.4
    assert per_class["bird"] == {"AP": None, "AP50": None, "num_gt": 0, "best_f1": None, "best_f1_threshold": None,
                                 "best_f1_precision": None, "best_f1_recall": None}
    pooled, thresholds = evaluate.calibrated_thresholds(metrics, 0.25)
    assert thresholds[:2] == [per_class["cat"]["best_f1_threshold"], per_class["dog"]["best_f1_threshold"]]
    assert thresholds[2] == pooled  # no val box: the pooled threshold
    # JSON null, never NaN; the table says n/a
    assert json.loads(json.dumps(config.json_ready(metrics), allow_nan=False))["per_class"]["bird"]["AP"] is None
    table = evaluate.format_metrics(metrics)
    assert "bird" in table and "n/a" in table and "background" in table
    # per-class report thresholds: the dog FP at 0.8 is dropped by dog's 0.85, the bird's at 0.7 kept by 0.5
    at = evaluate.coco_metrics(gt, detections, [1, 2], [1, 2, 5], ["cat", "dog", "bird"], [0.5, 0.85, 0.5])
    assert (at["precision"], at["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_the_confusion_matrix_counts_predicted_against_true_with_background(tmp_path):
    gt = coco(tmp_path)
    detections = [detection(1, 2, [10, 10, 20, 20], 0.9),   # a cat called dog
                  detection(1, 2, [50, 50, 30, 30], 0.8),   # the dog
                  detection(2, 1, [0, 0, 40, 40], 0.3),     # the second cat, under cat's threshold 0.5: missed
                  detection(2, 5, [70, 70, 10, 10], 0.9)]   # a bird on background
    matrix = evaluate.confusion_matrix(gt, detections, [1, 2], [1, 2, 5], [0.5, 0.5, 0.5])
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[1, 0] = expected[1, 1] = 1  # predicted dog: one cat, one dog
    expected[3, 0] = 1  # a cat missed
    expected[2, 3] = 1  # a bird on background
    assert (matrix == expected).all(), matrix


# ---- per-class thresholds at inference --------------------------------------------------------------------------
def test_select_detections_applies_a_threshold_per_class():
    scores = torch.tensor([[[0.5, 0.3], [0.2, 0.9]]])  # (B, A, C)
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20.0, 20, 30, 30]]])
    found = select_detections(scores, boxes, [0.4, 0.25], 0.5, 10)[0]
    assert sorted(zip(found["labels"].tolist(), found["scores"].tolist())) == [
        (0, 0.5), (1, pytest.approx(0.3)), (1, pytest.approx(0.9))]
    found = select_detections(scores, boxes, [0.6, 0.95], 0.5, 10)[0]
    assert len(found["scores"]) == 0
    with pytest.raises(ValueError, match="3 per-class score thresholds for 2 classes"):
        select_detections(scores, boxes, [0.1, 0.2, 0.3], 0.5, 10)


def test_per_class_thresholds_survive_the_checkpoint_and_the_onnx_export(tmp_path):
    torch.manual_seed(0)
    model = randomise(create_lightweight_model(3, "nano", img_size=64)).eval()
    thresholds = [0.3, 0.55, 0.45]
    model.conf_thresholds = thresholds
    path = str(tmp_path / "best_model.pth")
    save_checkpoint(model_checkpoint(model, ["a", "b", "c"], conf_threshold=0.4), path)
    loaded = load_model(path)
    assert loaded.conf_thresholds == thresholds and loaded.conf_threshold == 0.4
    image = (torch.rand(3, 48, 64) * 255).to(torch.uint8)
    found = loaded.predict(image)[0]
    assert len(found["scores"]) and all(s >= thresholds[l] for s, l in zip(found["scores"].tolist(),
                                                                          found["labels"].tolist()))
    low = loaded.predict(image, conf_threshold=0.3, max_detections=1000)[0]  # one threshold for all keeps more
    assert len(low["scores"]) > len(found["scores"])
    export.main(["--checkpoint", path, "--runs", "1", "--warmup", "0"])
    sidecar = json.loads((tmp_path / "best_model.json").read_text())
    assert sidecar["postprocess"]["calibrated_conf_thresholds"] == thresholds
    detector = OrtDetector(str(tmp_path / "best_model.onnx"))
    assert detector.conf_thresholds == thresholds
    onnx_found = detector.predict(image)[0]
    assert onnx_found["labels"].tolist() == found["labels"].tolist()
    assert torch.allclose(onnx_found["scores"], found["scores"], atol=1e-4)


# ---- one two-class run, end to end, from one VOC folder -------------------------------------------------------
@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory):
    """A one-epoch fine-tuning of both classes (--all-classes) of one VOC folder, a quarter held out for val; of its
    pictures only the confusion matrix is drawn (the others take most of a tiny run's time)."""
    from synthetic_data import write_shapes_split
    from test_annotations import write_voc
    root = tmp_path_factory.mktemp("two_classes")
    ann = write_shapes_split(root / "images", root / "coco.json", 16, ["solid", "dashed line"], img_size=64, seed=3)
    voc = write_voc(json.loads(open(ann).read()), root / "images", root / "voc")
    with pytest.MonkeyPatch.context() as monkeypatch:
        skip_run_pictures(monkeypatch)
        summary = finetune.main(["--train-ann", voc, "--all-classes", "--model-size", "nano", "--init", "random",
                                 "--epochs", "1", "--img-size", "64", "--batch-size", "4", "--workers", "0",
                                 "--device", "cpu", "--val-fraction", "0.25", "--output-dir", str(root / "runs"),
                                 "--no-progress"])
    return {"root": root, "voc": voc, "summary": summary, "run_dir": summary["run_dir"]}


def test_a_two_class_run_records_its_classes_and_per_class_results(two_class_run):
    summary, run_dir = two_class_run["summary"], two_class_run["run_dir"]
    assert os.path.basename(run_dir).startswith("dashed_line+solid_")
    names = ["dashed line", "solid"]  # VOC has no category ids: names in sorted order
    saved = json.loads(open(os.path.join(run_dir, "config.json")).read())
    assert saved["all_classes"] is True and saved["class_name"] is None and saved["num_classes"] is None
    checkpoint = torch.load(summary["best_model"], weights_only=True)
    assert checkpoint["class_names"] == summary["class_names"] == names
    assert checkpoint["model_config"]["num_classes"] == 2
    assert checkpoint["conf_thresholds"] == summary["conf_thresholds"] and len(summary["conf_thresholds"]) == 2
    assert list(summary["per_class"]) == names
    assert all(entry["conf_threshold"] == t for entry, t in zip(summary["per_class"].values(), summary["conf_thresholds"]))
    written = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert list(written["per_class"]) == names and "per_class" not in written["best_metrics"]
    with open(os.path.join(run_dir, "per_class.csv"), newline="") as f:
        assert [row["class"] for row in csv.DictReader(f)] == names
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        row = next(csv.DictReader(f))
    assert {"AP50_solid", "AP_solid", "AP50_dashed line", "AP_dashed line"} <= set(row)
    assert os.path.isfile(os.path.join(run_dir, "confusion_matrix.png"))
    with pytest.raises(config.ConfigError, match="class_name cannot change on --resume"):
        finetune.parse_config(["--resume", run_dir, "--epochs", "3", "--class-name", "solid"])
    resumed = finetune.parse_config(["--resume", run_dir, "--epochs", "3"])
    assert resumed["all_classes"] is True and resumed["class_name"] is None


def test_a_two_class_run_evaluates_predicts_and_exports_with_per_class_thresholds(two_class_run, tmp_path):
    from test_predict import write_clip
    run_dir, best = two_class_run["run_dir"], two_class_run["summary"]["best_model"]
    thresholds = two_class_run["summary"]["conf_thresholds"]
    metrics = evaluate.main(["--run", run_dir, "--device", "cpu"])
    assert list(metrics["per_class"]) == ["dashed line", "solid"] and metrics["confusion_thresholds"] == thresholds
    result = predict.main(["--run", run_dir, "--save-txt", "--save-dir", str(tmp_path / "pred"), "--workers", "0",
                           "--device", "cpu", "--no-progress"])
    held_out = json.loads(open(os.path.join(run_dir, "split.json")).read())["val"]
    assert result["images"] == len(held_out) and set(result["metrics"]["per_class"]) == {"solid", "dashed line"}
    for label_file in (tmp_path / "pred" / "labels").iterdir():
        assert all(line.split()[0] in ("0", "1") for line in label_file.read_text().splitlines())
    exported = export.main(["--checkpoint", best, "--int8", "--runs", "1", "--warmup", "0"])
    for sidecar in (exported["sidecar_path"], exported["int8_sidecar_path"]):
        post = json.loads(open(sidecar).read())["postprocess"]
        assert post["calibrated_conf_thresholds"] == thresholds
    assert OrtDetector(exported["int8_path"]).conf_thresholds == thresholds
    clip = write_clip(tmp_path / "clip.mp4", 3)
    video = predict.main(["--checkpoint", exported["int8_path"], "--source", clip, "--save-dir", str(tmp_path / "v"),
                          "--save-txt", "--workers", "0", "--no-progress"])
    assert video["videos"][clip]["frames"] == 3 and (tmp_path / "v" / "clip.mp4").is_file()
