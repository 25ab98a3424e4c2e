"""runs.py: run folders, the files and per-epoch records both scripts share, resume settings, and a run read back."""
import json
import os

import pytest
import torch

import pretrain_multi_class as pretrain
import runs
import finetune_single_class
from conftest import FAST_PRETRAIN, STAGES, finetune_args, write_json


def test_run_folders_never_collide(tmp_path):
    folders = {runs.create_run_dir(str(tmp_path), "run") for _ in range(3)}
    assert len(folders) == 3 and all(os.path.dirname(f) == str(tmp_path) for f in folders)


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


def test_the_json_files_of_a_run_are_strict_json(one_epoch_finetune):
    """Issue #24 item 6: summary.json held `"AP_large": NaN` (no large box in 96 px images), which strict parsers
    refuse; every JSON file of a tiny fine-tuning run parses strictly, with null for the undefined metrics."""
    summary = one_epoch_finetune
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
        runs.resume({"resume": str(fault_data / "nowhere"), "name": "x"}, {}, runs.LAYOUT, "finetune", ())


def test_resuming_a_run_that_kept_its_pr_curve_in_the_summary_moves_it_to_pr_curve_csv(tmp_path):
    """Runs from before pr_curve.csv kept the curve in summary.json (and in `last`'s summary); resumed, the curve
    moves to pr_curve.csv and the summary they write from then on stays small."""
    curve = {"recall": [0.5, 1.0], "precision": [1.0, 0.5], "score": [0.8, 0.2]}
    checkpoint = {"epoch": 2, "best_map": 0.4, "summary": {"best_epoch": 2, "best_pr_curve": curve}}
    config = {"resume": str(tmp_path / "old_run" / "last_model.pth")}
    (tmp_path / "old_run").mkdir()
    run = runs.open_run(config, ["thing"], runs.LAYOUT, "finetune", "thing", {}, checkpoint)
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


# ---- issue #25: one run contract for both scripts ----------------------------------------------------------------

def test_both_scripts_write_the_same_files_summary_keys_and_an_unchanged_config(fault_data, tmp_path,
                                                                                one_epoch_finetune):
    """Pretraining and fine-tuning end alike: the same file names in the run folder (pretraining adds its
    backbone files and snapshots), the same summary keys returned and written, and config.json holding the
    resolved config only (what the run derived, class names and provenance, is in the summary)."""
    pretrained = pretrain.main(["--coco-root", str(fault_data / "coco"), "--epochs", "1", *FAST_PRETRAIN,
                                "--output-dir", str(tmp_path / "pre"), "--no-progress"])
    finetuned = one_epoch_finetune
    files = {name: set(os.listdir(summary["run_dir"])) for name, summary in
             (("pre", pretrained), ("fine", finetuned))}
    # no snapshot in 1 epoch (save_interval 10); a confusion matrix with two or more classes
    assert files["pre"] - files["fine"] == {"backbone_weights", "confusion_matrix.png"}, files
    assert files["fine"] - files["pre"] <= {"split.json"}, files
    assert {"best_model.pth", "last_model.pth", "config.json", "summary.json", "metrics.csv"} <= files["fine"]
    assert set(pretrained) - set(finetuned) == {"best_backbone", "last_backbone"}
    assert set(finetuned) <= set(pretrained)
    for summary in (pretrained, finetuned):
        written = json.load(open(os.path.join(summary["run_dir"], "summary.json")))
        assert set(written) == set(summary) and written["class_names"] and written["provenance"]["weights"]
        saved = json.load(open(os.path.join(summary["run_dir"], "config.json")))
        assert not {"provenance", "class_names"} & set(saved)
        last = torch.load(summary["last_model"], weights_only=True)
        assert last["config"] == saved  # the checkpoint resumes from the config as resolved


def test_no_plots_draws_nothing_and_changes_no_number(one_epoch_finetune, fault_data, tmp_path):
    """--no-plots (YOLOv5's --noplots) leaves out results.png, val_predictions.jpg and the TensorBoard images;
    drawing uses no random numbers, so the metrics and the weights are those of a run that draws."""
    from conftest import read_rows
    config = write_json(tmp_path / "one_epoch.json", {**STAGES, "stage2_epochs": 0})
    quiet = finetune_single_class.main(finetune_args(fault_data, tmp_path / "runs", **{"--config": config})
                                       + ["--no-plots"])
    files = set(os.listdir(quiet["run_dir"]))
    assert not {"results.png", "val_predictions.jpg"} & files and "best_model.pth" in files
    assert {"results.png", "val_predictions.jpg"} <= set(os.listdir(one_epoch_finetune["run_dir"]))
    timing = ("images_per_second", "epoch_time")
    rows = [[{k: v for k, v in row.items() if k not in timing} for row in read_rows(summary["run_dir"])]
            for summary in (quiet, one_epoch_finetune)]
    assert rows[0] == rows[1]
    weights = [torch.load(summary["last_model"], weights_only=True)["train_state_dict"]
               for summary in (quiet, one_epoch_finetune)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[1])
