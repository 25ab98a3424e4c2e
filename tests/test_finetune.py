"""finetune_single_class.py end to end: outputs, stage transitions, the README snippet, config, resume."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import config
import engine
import finetune_single_class as finetune
import pretrain_multi_class as pretrain
import runs
import trainer
from checkpoints import model_checkpoint, save_checkpoint
from conftest import finetune_args, skip_run_pictures
from model_lightweight import create_lightweight_model
from synthetic_data import write_coco_layout, write_shapes_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAT_CONFIG = {"num_classes": 1, "stage1_epochs": 1, "stage1_head_lr": 2e-3,
               "stage2_epochs": 1, "stage2_head_lr": 1e-3, "stage2_fpn_lr": 2e-4,
               "stage3_epochs": 2, "stage3_head_lr": 2e-4, "stage3_fpn_lr": 1e-4, "stage3_backbone_lr": 2e-5,
               "stage3_train_bn": True, "backbone_freeze_stride": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The README's layout: train/JPEGImages + train/annotations.json, val/*.jpg + val/annotations.json,
    with a second category in the files, and a backbone file written by the pretraining code."""
    root = tmp_path_factory.mktemp("finetune")
    write_shapes_split(root / "train" / "JPEGImages", root / "train" / "annotations.json", 12,
                       ["whiteline", "kerb"], img_size=96, seed=0)
    write_shapes_split(root / "val", root / "val" / "annotations.json", 4, ["whiteline", "kerb"], img_size=96, seed=1)
    write_coco_layout(root / "coco", ["square", "circle", "ring"], num_train=8, num_val=4, img_size=64)
    with pytest.MonkeyPatch.context() as monkeypatch:
        skip_run_pictures(monkeypatch)
        pretrained = pretrain.main(["--coco-root", str(root / "coco"), "--classes", "3", "--epochs", "1",
                                    "--batch-size", "4", "--model-size", "nano", "--img-size", "64", "--workers",
                                    "0", "--device", "cpu", "--output-dir", str(root / "pretrain"), "--no-progress"])
    backbone = pretrained["last_backbone"]  # written by the pretraining code
    shutil.copy(pretrained["last_model"], root / "pretrain_full.pth")
    flat = dict(FLAT_CONFIG, init=str(backbone))
    (root / "flat.json").write_text(json.dumps(flat))
    return root


def base_args(data, output_dir):
    return ["--config", str(data / "flat.json"), "--class-name", "WHITELINE",
            "--train-root", str(data / "train" / "JPEGImages"), "--train-ann", str(data / "train" / "annotations.json"),
            "--val-root", str(data / "val"), "--val-ann", str(data / "val" / "annotations.json"),
            "--batch-size", "4", "--model-size", "nano", "--img-size", "64", "--workers", "0", "--device", "cpu",
            "--output-dir", str(output_dir)]


@pytest.mark.slow
def test_cli_end_to_end_outputs_and_readme_snippet(data, tmp_path):
    result = subprocess.run([sys.executable, "finetune_single_class.py", *base_args(data, tmp_path), "--epochs", "3",
                             "--no-plots"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = [tmp_path / d for d in os.listdir(tmp_path)]
    assert run_dir.name.startswith("whiteline_")
    for name in ("best_model.pth", "last_model.pth", "config.json", "metrics.csv", "summary.json", "tensorboard"):
        assert (run_dir / name).exists(), name
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["stage"]) for r in rows] == [1, 2, 3]
    assert {"mAP", "mAP50", "precision", "recall", "f1", "best_f1_threshold", "loss_cls"} <= set(rows[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_stage"] in (1, 2, 3) and "mAP50" in summary["best_metrics"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["stage1_head_lr"] == 2e-3 and config["batch_size"] == 4  # flat file and CLI both applied

    # The README's usage snippet, verbatim apart from the size.
    model = create_lightweight_model(num_classes=1, model_size="nano")
    checkpoint = torch.load(run_dir / "best_model.pth")  # verbatim README; torch>=2.6 means weights_only=True
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    predictions = model.predict(torch.rand(3, 80, 120), conf_threshold=0.5)
    assert set(predictions[0]) == {"boxes", "scores", "labels"}
    assert checkpoint["class_names"] == ["whiteline"] and checkpoint["epoch"] == summary["best_epoch"]
    torch.load(run_dir / "last_model.pth", weights_only=True)


def group_states(model, optimizer):
    """Which groups train, whether their BatchNorms are in train mode after model.train(), and the rates."""
    model.train()
    early = model.early_backbone_layers(4)  # the stem and the stride-4 stage (backbone_freeze_stride 4)
    early_modules = {id(m) for layer in early for m in layer.modules()}
    parts = {g: [m for m in getattr(model, g).modules() if id(m) not in early_modules]
             for g in ("backbone", "fpn", "head")}
    parts["early"] = [m for layer in early for m in layer.modules()]
    return {
        "grad": {g: any(p.requires_grad for m in modules for p in m.parameters(recurse=False))
                 for g, modules in parts.items()},
        "bn_train": {g: all(m.training for m in modules if isinstance(m, _BatchNorm)) for g, modules in parts.items()},
        "lrs": {group["name"]: group["initial_lr"] for group in optimizer.param_groups},
    }


def spy_on_stages(monkeypatch):
    """Record group_states per epoch, as each epoch of a real run starts training."""
    seen = {}
    real = engine.train_one_epoch

    def spy(model, criterion, loader, state, options, epoch, *args, **kwargs):
        seen[epoch] = group_states(model, state.optimizer)
        return real(model, criterion, loader, state, options, epoch, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    return seen


def capture_built_model(monkeypatch):
    """{"model": the model the next fine-tuning builds (and then trains)}, filled in by a spy on build_model."""
    captured = {}
    real = finetune.build_model

    def spy(config, *args):
        captured["model"], provenance = real(config, *args)
        return captured["model"], provenance

    monkeypatch.setattr(finetune, "build_model", spy)
    return captured


@pytest.fixture
def captured(monkeypatch):
    return capture_built_model(monkeypatch)


@pytest.fixture(scope="module")
def full_detector_run(data, tmp_path_factory):
    """One fine-tuning (4 epochs over the 3 stages) of the full pretrained detector, shared by the tests that read
    its stages, its trained weights and its outputs: {"summary", "seen" (group_states per epoch), "model"}."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen, captured = spy_on_stages(monkeypatch), capture_built_model(monkeypatch)
        skip_run_pictures(monkeypatch)
        summary = finetune.main(base_args(data, tmp_path_factory.mktemp("full_detector")) +
                                ["--seed", "1", "--init", str(data / "pretrain_full.pth")])
    return {"summary": summary, "seen": seen, "model": captured["model"]}


def planned_stages(data, tmp_path, flat_config, *flags):
    """group_states after finetune.begin_stage of each planned stage, on the model and data the run would build,
    without training: {stage index: states}, and the model's provenance."""
    (tmp_path / "stages.json").write_text(json.dumps(flat_config))
    args = base_args(data, tmp_path)
    args[1] = str(tmp_path / "stages.json")
    resolved = finetune.parse_config(args + list(flags))
    model, provenance = trainer.build_model(resolved, 1)
    loader = finetune.build_data(resolved)[0]
    session = trainer.new_trainer(resolved, model, provenance, loader, None, None, torch.device("cpu"))
    seen = {}
    for stage in finetune.stage_plan(resolved, set(provenance["pretrained"])):
        finetune.begin_stage(session, stage)
        seen[stage["index"]] = group_states(session.train_model, session.state.optimizer)
    return seen, provenance


def test_stages_release_a_full_detector_group_by_group(full_detector_run):
    """A full pretrained detector: heads, then + FPN, then everything, each pretrained group at its own rate."""
    seen, summary = full_detector_run["seen"], full_detector_run["summary"]
    assert seen[1]["grad"] == {"backbone": False, "fpn": False, "head": True, "early": False}
    assert seen[1]["bn_train"] == {"backbone": False, "fpn": False, "head": True, "early": False}
    assert seen[1]["lrs"] == {"head": 2e-3, "head_no_decay": 2e-3}
    assert seen[2]["grad"] == {"backbone": False, "fpn": True, "head": True, "early": False}
    assert seen[2]["bn_train"] == {"backbone": False, "fpn": True, "head": True, "early": False}
    assert seen[2]["lrs"] == {"fpn": 2e-4, "fpn_no_decay": 2e-4, "head": 1e-3, "head_no_decay": 1e-3}
    # the pretrained backbone's stem and stride-4 stage stay frozen (backbone_freeze_stride 4), the rest trains
    assert seen[3]["grad"] == {"backbone": True, "fpn": True, "head": True, "early": False}
    assert seen[3]["bn_train"] == {"backbone": True, "fpn": True, "head": True, "early": False}
    assert seen[3]["lrs"]["backbone"] == 2e-5 and seen[3]["lrs"]["fpn"] == 1e-4 and seen[3]["lrs"]["head"] == 2e-4
    assert seen[4] == seen[3]
    provenance = json.loads(open(os.path.join(summary["run_dir"], "summary.json")).read())["provenance"]
    assert provenance["pretrained"] == ["backbone", "fpn", "head"] and provenance["new"] == []


def test_a_backbone_file_trains_the_random_fpn_from_stage_1(data, tmp_path):
    """Only the backbone is pretrained: the random FPN trains with the head from stage 1 (BatchNorm in train
    mode, at the head's rate), never frozen with its initial statistics. (The stages as a run sets them up; the
    full detector's run checks that training sees what begin_stage set.)"""
    seen, provenance = planned_stages(data, tmp_path, dict(json.loads((data / "flat.json").read_text()),
                                                           stage3_train_bn=False))
    assert seen[1]["grad"] == {"backbone": False, "fpn": True, "head": True, "early": False}
    assert seen[1]["bn_train"] == {"backbone": False, "fpn": True, "head": True, "early": False}
    assert seen[1]["lrs"] == {"fpn": 2e-3, "fpn_no_decay": 2e-3, "head": 2e-3, "head_no_decay": 2e-3}
    assert seen[2]["lrs"]["fpn"] == 1e-3 and seen[2]["grad"]["backbone"] is False
    assert seen[3]["grad"] == {"backbone": True, "fpn": True, "head": True, "early": False}
    assert seen[3]["lrs"]["backbone"] == 2e-5 and seen[3]["lrs"]["fpn"] == 2e-4
    # stage3_train_bn false: the pretrained backbone's statistics stay frozen, the new FPN's keep learning
    assert seen[3]["bn_train"] == {"backbone": False, "fpn": True, "head": True, "early": False}
    assert provenance["pretrained"] == ["backbone"] and provenance["new"] == ["fpn", "head"]


def test_early_backbone_layers_stay_frozen_only_when_pretrained(data, tmp_path, full_detector_run):
    """backbone_freeze_stride keeps a pretrained backbone's stem and stride-4 stage at their pretrained weights
    through stage 3; a random backbone trains them from stage 1, and 0 releases them with the rest."""
    seen = full_detector_run["seen"]
    assert seen[3]["grad"]["backbone"] and not seen[3]["grad"]["early"] and not seen[3]["bn_train"]["early"]
    full = str(data / "pretrain_full.pth")
    source = torch.load(full, weights_only=True)["model_state_dict"]
    trained = full_detector_run["model"].state_dict()
    early = [k for k in trained if k.startswith(("backbone.stem.", "backbone.stages.0."))]
    later = [k for k in trained if k.startswith("backbone.stages.1.") and k.endswith("weight")]
    assert early and all(torch.equal(trained[k], source[k]) for k in early)  # running stats included
    assert any(not torch.equal(trained[k], source[k]) for k in later)

    seen, _ = planned_stages(data, tmp_path, FLAT_CONFIG, "--init", "random")
    assert seen[1]["grad"]["early"] and seen[1]["bn_train"]["early"]

    seen, _ = planned_stages(data, tmp_path, dict(FLAT_CONFIG, backbone_freeze_stride=0), "--init", full)
    assert not seen[2]["grad"]["early"] and seen[3]["grad"]["early"] and seen[3]["bn_train"]["early"]

    (tmp_path / "bad.json").write_text(json.dumps(dict(FLAT_CONFIG, backbone_freeze_stride=3)))
    args = base_args(data, tmp_path)
    args[1] = str(tmp_path / "bad.json")
    with pytest.raises(config.ConfigError, match="backbone_freeze_stride must be 0"):
        finetune.parse_config(args + ["--init", full])


def test_pretrained_backbone_is_loaded_and_no_pretrained_is_not(data, tmp_path, captured, no_run_pictures):
    args = base_args(data, tmp_path) + ["--seed", "2"]
    backbone = json.loads((data / "flat.json").read_text())["init"]
    source = torch.load(backbone, weights_only=True)["backbone_state_dict"]
    zero = dict(FLAT_CONFIG, stage1_epochs=1, stage2_epochs=0, stage3_epochs=0)
    (tmp_path / "heads_only.json").write_text(json.dumps(dict(zero, init=backbone)))
    args[1] = str(tmp_path / "heads_only.json")
    finetune.main(args)
    for key, value in source.items():  # backbone frozen in stage 1: still exactly the pretrained weights
        assert torch.equal(captured["model"].backbone.state_dict()[key], value), key

    (tmp_path / "scratch.json").write_text(json.dumps(zero))
    args[1] = str(tmp_path / "scratch.json")
    scratch, _ = trainer.build_model(finetune.parse_config(args + ["--no-pretrained"]), 1)  # the run's model
    first = next(iter(source))
    assert not torch.equal(scratch.backbone.state_dict()[first], source[first])


@pytest.mark.slow
def test_resume_mid_stage_equals_uninterrupted_run(data, tmp_path, monkeypatch, no_run_pictures):
    full = finetune.main(base_args(data, tmp_path / "full"))

    real = engine.train_one_epoch

    def crash_at_epoch_4(*args, **kwargs):
        if args[5] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", crash_at_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(base_args(data, tmp_path / "interrupted"))
    monkeypatch.setattr(engine, "train_one_epoch", real)
    (run_dir,) = [tmp_path / "interrupted" / d for d in os.listdir(tmp_path / "interrupted")]
    assert torch.load(run_dir / "last_model.pth", weights_only=True)["epoch"] == 3  # mid stage 3
    resumed = finetune.main(["--resume", str(run_dir / "last_model.pth"), "--workers", "0"])

    a = torch.load(os.path.join(full["run_dir"], "last_model.pth"), weights_only=True)
    b = torch.load(run_dir / "last_model.pth", weights_only=True)
    for key in a["train_state_dict"]:
        assert torch.allclose(a["train_state_dict"][key].float(), b["train_state_dict"][key].float(),
                              atol=1e-6), key
    for key in a["model_state_dict"]:
        assert torch.allclose(a["model_state_dict"][key].float(), b["model_state_dict"][key].float(),
                              atol=1e-6), key
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert resumed["last_epoch"] == 4


@pytest.mark.parametrize("extra, message", [
    # an error raised once the run has started logging; the config-time errors (an unknown --model-size for the
    # backbone file, --img-size 100, ...) are test_config.py's rows, through the same entry point in-process
    (["--class-name", "zebra"], "available: whiteline, kerb"),
])
@pytest.mark.slow
def test_bad_input_is_one_clear_line_and_exit_2(data, tmp_path, extra, message):
    result = subprocess.run([sys.executable, "finetune_single_class.py", *base_args(data, tmp_path), *extra],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unknown_config_key_names_the_nearest(data, tmp_path):
    (tmp_path / "typo.json").write_text(json.dumps({"stage1_head_lrr": 1e-3}))
    args = base_args(data, tmp_path)
    args[1] = str(tmp_path / "typo.json")
    with pytest.raises(config.ConfigError, match="did you mean 'stage1_head_lr'"):
        finetune.main(args)


def test_without_a_defined_map_there_is_no_best_model_and_the_summary_says_null(data, tmp_path):
    val = json.loads((data / "val" / "annotations.json").read_text())
    val["annotations"] = []  # nothing to score: mAP is undefined at every epoch
    (tmp_path / "empty_val.json").write_text(json.dumps(val))
    args = base_args(data, tmp_path / "runs")
    args[args.index("--val-ann") + 1] = str(tmp_path / "empty_val.json")
    summary = finetune.main(args + ["--epochs", "1"])
    assert summary["best_model"] is None and not os.path.exists(os.path.join(summary["run_dir"], "best_model.pth"))
    written = json.loads(open(os.path.join(summary["run_dir"], "summary.json")).read())
    assert written["best_model"] is None and os.path.isfile(written["last_model"])


def test_epochs_share_the_stages_in_the_config_proportions(data, tmp_path):
    resolved = finetune.parse_config(base_args(data, tmp_path) + ["--epochs", "8"])  # FLAT_CONFIG is 1:1:2
    assert [resolved[f"stage{i}_epochs"] for i in (1, 2, 3)] == [2, 2, 4]
    assert finetune.split_epochs(20, (10, 10, 20)) == (5, 5, 10)
    assert finetune.split_epochs(10, (0, 10, 20)) == (0, 3, 7)
    assert finetune.split_epochs(3, (1, 100, 1)) == (1, 1, 1)  # the minimum of 1 no longer starves the last stage


def test_epochs_1_and_2_fund_the_last_stage_then_the_first(data, tmp_path):
    """Issue #26 item 7: fewer epochs than stages are a smoke test, not an error."""
    for epochs, expected in (("1", [0, 0, 1]), ("2", [1, 0, 1]), ("3", [1, 1, 1])):
        resolved = finetune.parse_config(base_args(data, tmp_path) + ["--epochs", epochs])
        assert [resolved[f"stage{i}_epochs"] for i in (1, 2, 3)] == expected, epochs
    assert finetune.share_epochs(2, (0, 10, 20)) == (0, 1, 1) and finetune.share_epochs(1, (10, 0, 0)) == (1, 0, 0)
    assert finetune.share_epochs(20, (2, 2, 16)) == finetune.split_epochs(20, (2, 2, 16)) == (2, 2, 16)
    with pytest.raises(config.ConfigError, match="epochs must be >= 1"):
        finetune.parse_config(base_args(data, tmp_path) + ["--epochs", "0"])


def test_the_best_model_carries_its_calibrated_threshold(full_detector_run):
    summary = full_detector_run["summary"]
    checkpoint = torch.load(summary["best_model"], weights_only=True)
    metrics = summary["best_metrics"]
    expected = metrics["best_f1_threshold"] if metrics["best_f1"] > 0 else 0.25
    assert checkpoint["conf_threshold"] == summary["conf_threshold"] == expected
    with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
        row = next(csv.DictReader(f))
    assert {"precision", "recall", "f1", "best_f1_threshold", "best_f1_precision", "best_f1_recall"} <= set(row)


def test_full_checkpoint_accepted_as_backbone(fault_data, tmp_path):
    source = create_lightweight_model(5, "nano", img_size=64)
    save_checkpoint(model_checkpoint(source, [str(i) for i in range(5)]), str(tmp_path / "full.pth"))
    config = finetune.parse_config(finetune_args(fault_data, tmp_path, **{"--pretrained-backbone": tmp_path / "full.pth"}))
    model, _ = trainer.build_model(config, 1)
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


@pytest.fixture(scope="module")
def voc_folder(tmp_path_factory):
    """One annotated folder, as people label it: LabelImg's VOC XML beside its images, no split."""
    from test_annotations import write_voc
    root = tmp_path_factory.mktemp("voc")
    ann = write_shapes_split(root / "images", root / "coco.json", 16, ["thing"], img_size=64, seed=2)
    return write_voc(json.loads(open(ann).read()), root / "images", root / "voc")


def test_python_api_from_one_voc_folder_split_for_you_and_the_logging_left_alone(voc_folder, tmp_path):
    import logging
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    summary = finetune.finetune(train_ann=voc_folder, model_size="nano", init="random", epochs=1, img_size=64,
                                batch_size=4, workers=0, device="cpu", output_dir=str(tmp_path), progress=False,
                                val_fraction=0.25)
    assert (root.level, list(root.handlers)) == before  # importing or calling the API configures no logging
    run_dir = summary["run_dir"]
    split = json.loads(open(os.path.join(run_dir, "split.json")).read())
    assert len(split["train"]) + len(split["val"]) == 16 and split["val"] and split["val_fraction"] == 0.25
    assert os.path.isfile(os.path.join(run_dir, "results.png")) and os.path.isfile(summary["best_model"])
    resumed_config = finetune.parse_config(["--resume", run_dir, "--epochs", "4"])  # the run's split is kept
    assert runs_saved_split(resumed_config) == split
    with pytest.raises(config.ConfigError, match="both a validation set .* and --val-fraction"):
        finetune.finetune(train_ann=voc_folder, val_ann=voc_folder, val_fraction=0.3, model_size="nano",
                          init="random")


def runs_saved_split(resolved):
    return runs.saved_split(resolved)


def test_patience_cuts_the_stage_plan_and_the_summary_says_why(data, tmp_path, monkeypatch, no_run_pictures):
    real = trainer.evaluate
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.05])  # the best epoch is the first

    def worsening(*args, **kwargs):
        return {**real(*args, **kwargs), "mAP": next(scores)}
    monkeypatch.setattr(trainer, "evaluate", worsening)
    summary = finetune.main(base_args(data, tmp_path) + ["--epochs", "6", "--patience", "1"])
    assert summary["stopped_early"]["epoch"] == 2 and "patience 1" in summary["stopped_early"]["reason"]
    assert summary["best_epoch"] == 1 and summary["last_epoch"] == 2  # stages 1 and 2 of (1, 1, 4) epochs
    with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2]


def test_epochs_1_runs_stage_3_alone_and_writes_the_results_files(data, tmp_path, capsys):
    """Issue #26 items 7, 8 and 6: --epochs 1 trains stage 3 alone, one line naming each skipped stage; the run
    writes best/last, summary.json without the PR curve, pr_curve.csv (every operating point) and results.png, in
    OUTPUT_DIR/NAME, and val_predictions.jpg; the last line repeats the best metrics, the threshold and
    best_model.pth."""
    summary = finetune.main(base_args(data, tmp_path) + ["--epochs", "1", "--name", "smoke"])
    err = capsys.readouterr().err
    run_dir = tmp_path / "smoke"
    assert summary["run_dir"] == str(run_dir)
    assert "stage 1 (heads) has 0 epochs: skipped" in err and "stage 2 (heads+fpn) has 0 epochs: skipped" in err
    assert [(int(r["epoch"]), int(r["stage"])) for r in csv.DictReader(open(run_dir / "metrics.csv"))] == [(1, 3)]
    for name in ("best_model.pth", "last_model.pth", "summary.json", "pr_curve.csv", "results.png",
                 "val_predictions.jpg"):
        assert (run_dir / name).is_file(), name
    written = json.loads((run_dir / "summary.json").read_text())
    assert "pr_curve" not in json.dumps(written) and written["best_model"] == str(run_dir / "best_model.pth")
    with open(run_dir / "pr_curve.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["recall", "precision", "score"] and len(rows) > 2
    scores = [float(row[2]) for row in rows[1:]]
    assert all(a > b for a, b in zip(scores, scores[1:]))  # one row per distinct score, descending
    last_line = err.strip().splitlines()[-1]
    assert "done in 0:" in last_line and f"best model: {run_dir / 'best_model.pth'}" in last_line
    assert f"threshold {written['conf_threshold']:.3f}" in last_line and "mAP50" in last_line


def test_epochs_2_trains_stages_1_and_3_and_resumes_across_the_skipped_one(data, tmp_path, monkeypatch,
                                                                            no_run_pictures):
    """Issue #26 item 7: --epochs 2 (stages 1 and 3) interrupted after its first epoch resumes into stage 3."""
    real = engine.train_one_epoch

    def crash_at_epoch_2(*args, **kwargs):
        if args[5] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(base_args(data, tmp_path) + ["--epochs", "2", "--name", "two"])
    monkeypatch.setattr(engine, "train_one_epoch", real)
    resumed = finetune.main(["--resume", str(tmp_path / "two"), "--workers", "0"])
    with open(tmp_path / "two" / "metrics.csv") as f:
        assert [(int(r["epoch"]), int(r["stage"])) for r in csv.DictReader(f)] == [(1, 1), (2, 3)]
    assert resumed["last_epoch"] == 2 and os.path.isfile(resumed["last_model"])
