"""The commands a one-folder user runs after fine-tuning (issue #26): evaluate.py --run and predict.py --run score
the images the run validated on (its split.json), export.py --int8 calibrates on those it trained on, and --ann
naming a run's records is a one-line error that points at --run.

One tiny fine-tuning (nano, 64 px, one epoch) on a synthetic one-folder VOC set, shared by the module.
"""
import argparse
import json
import os
import shutil

import pytest

import evaluate
import export
import finetune_single_class
import predict
from conftest import exits_with_one_line, skip_run_pictures
from synthetic_data import write_shapes_split
from test_annotations import write_voc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run on one annotated folder of 16 images, a quarter held out by --val-fraction (split.json)."""
    root = tmp_path_factory.mktemp("one_folder")
    coco = write_shapes_split(root / "images", root / "coco.json", 16, ["thing"], img_size=64, seed=2)
    annots = write_voc(json.loads(open(coco).read()), root / "images", root / "photos")
    with pytest.MonkeyPatch.context() as monkeypatch:
        skip_run_pictures(monkeypatch)
        summary = finetune_single_class.finetune(
            train_ann=annots, val_fraction=0.25, model_size="nano", init="random", epochs=None, stage1_epochs=1,
            stage2_epochs=0, stage3_epochs=0, img_size=64, batch_size=4, workers=0, device="cpu",
            output_dir=str(root / "runs"), progress=False)
    run_dir = summary["run_dir"]
    split = json.loads(open(os.path.join(run_dir, "split.json")).read())
    assert split["train"] and split["val"] and len(split["train"]) + len(split["val"]) == 16
    return {"dir": run_dir, "best": summary["best_model"], "split": split, "annots": annots,
            "images": str(root / "photos" / "images")}


def scored_images(monkeypatch):
    """The base names of the images each later evaluate.main call scores, one sorted list per call."""
    calls, real = [], evaluate.collect_detections

    def spy(model, dataset, *args, **kwargs):
        calls.append(sorted(os.path.basename(path) for path in dataset.image_paths))
        return real(model, dataset, *args, **kwargs)
    monkeypatch.setattr(evaluate, "collect_detections", spy)
    return calls


def test_evaluate_run_scores_exactly_the_val_part_and_the_whole_folder_warns(run, monkeypatch, capsys, caplog):
    """--run scores the images split.json held out and says which; --ann of the training folder scores train and val
    together, which a warning now says, pointing at --run."""
    calls = scored_images(monkeypatch)
    evaluate.main(["--run", run["dir"], "--device", "cpu"])
    val = sorted(run["split"]["val"])
    assert calls == [val]
    assert (f"val part of {run['annots']} per {os.path.join(run['dir'], 'split.json')}: {len(val)} images"
            in capsys.readouterr().out)
    with caplog.at_level("WARNING"):
        evaluate.main(["--checkpoint", run["best"], "--ann", run["annots"], "--device", "cpu"])
    assert len(calls[1]) == 16 != len(calls[0])
    assert f"{len(run['split']['train'])} of the 16 images of --ann {run['annots']} trained" in caplog.text
    assert f"evaluate.py --run {run['dir']}" in caplog.text


@pytest.mark.parametrize("ann", ["split.json", "run folder"])
def test_evaluate_ann_naming_a_run_record_is_one_line_that_points_at_run(run, capsys, ann):
    path = os.path.join(run["dir"], "split.json") if ann == "split.json" else run["dir"]
    line = exits_with_one_line(capsys, lambda: evaluate.main(["--checkpoint", run["best"], "--ann", path]))
    assert line.startswith(f"error: --ann {path} is ") and line.endswith(f"--run {run['dir']}")


def test_predict_run_draws_and_scores_the_val_images_only(run, tmp_path):
    summary = predict.main(["--run", run["dir"], "--save-dir", str(tmp_path / "out"), "--workers", "0",
                            "--no-progress", "--device", "cpu"])
    val = sorted(run["split"]["val"])
    assert sorted(name for name in os.listdir(summary["save_dir"]) if name.endswith(".jpg")) == val
    assert summary["images"] == len(val)
    saved = json.loads(open(summary["predictions_json"]).read())
    assert {detection["file_name"] for detection in saved} <= set(val)
    scored = evaluate.main(["--run", run["dir"], "--device", "cpu"])  # --ann defaulted: the same scores
    assert summary["metrics"]["mAP"] == pytest.approx(scored["mAP"], abs=1e-6)
    assert summary["metrics"]["mAP50"] == pytest.approx(scored["mAP50"], abs=1e-6)


def test_export_int8_without_calib_images_calibrates_on_the_runs_train_part(run, tmp_path):
    export.main(["--checkpoint", run["best"], "--int8", "--output", str(tmp_path / "model.onnx"), "--runs", "1",
                 "--warmup", "0"])
    calibration = json.loads((tmp_path / "model_int8.json").read_text())["quantization"]["calibration"]
    used = sorted(os.path.basename(path) for path in calibration["files"])
    assert calibration["images"] == len(run["split"]["train"]) and used == sorted(run["split"]["train"])
    assert not set(used) & set(run["split"]["val"])
    assert calibration["source"].startswith(f"train part of {run['annots']} per ")


@pytest.mark.parametrize("calib", ["annots", "images"])
def test_explicit_calib_images_lose_the_images_the_run_validated_on(run, tmp_path, capsys, calib):
    """--calib-images that is the run's one folder (its annotations or its image folder) calibrates on its train part
    and says so; the same folder for a checkpoint outside any run is used whole."""
    args = argparse.Namespace(checkpoint=run["best"], calib_images=run[calib], calib_root=None, calib_count=100)
    paths, source = export._calibration_paths(args)
    assert sorted(os.path.basename(path) for path in paths) == sorted(run["split"]["train"])
    assert f"holds {len(run['split']['val'])} images that {run['dir']} validated on" in capsys.readouterr().out
    assert source.startswith(f"{run[calib]} without the val part of {run['annots']}")
    args.checkpoint = shutil.copy(run["best"], tmp_path / "best_model.pth")
    assert len(export._calibration_paths(args)[0]) == 16
