"""demo.py end to end at a tiny scale: every stage runs through the scripts' real interfaces."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import demo


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_writes_its_report(tmp_path):
    out = tmp_path / "demo_results"
    result = demo.main(["--out", str(out), "--data", str(tmp_path / "datasets"), "--scale", "0.02", "--workers", "0",
                        "--no-progress"])
    for name in ("predictions.png", "transfer_curve.png", "summary.md", "demo_config.json"):
        assert os.path.getsize(out / name) > 0, name
    summary = (out / "summary.md").read_text()
    assert "| pretrained |" in summary and "| scratch |" in summary
    for run in result["results"].values():  # the checkpoints the summary names exist and were evaluated
        assert os.path.isfile(run["best_model"]) and run["best_model"] in summary
        assert 0.0 <= run["metrics"]["mAP50"] <= 1.0
        epochs, map50, stages = run["curve"]
        assert epochs == sorted(epochs) and set(stages) == {1, 2, 3}
    # the pretrained arm started from the shipped starter, as a user's first fine-tuning does; the scratch arm
    # from nothing; both the same lite0 with the same schedule
    pretrained = json.loads((Path(result["results"]["pretrained"]["best_model"]).parent / "config.json").read_text())
    scratch = json.loads((Path(result["results"]["scratch"]["best_model"]).parent / "config.json").read_text())
    assert pretrained["init"] == "starter" and scratch["init"] == "random"
    assert pretrained["model_size"] == scratch["model_size"] == "lite0"
    assert "CPU-minutes" in summary and result["cpu_minutes"] > 0


@pytest.mark.slow
def test_a_failed_side_run_is_reported_with_its_log(tmp_path):
    """The scratch arm runs as a subprocess: its failure must stop the demo with a line naming its log."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    log = str(tmp_path / "finetune_scratch.log")
    with pytest.raises(demo.DemoStepFailed, match=r"exit code 3.*finetune_scratch\.log"):
        demo.wait_for_finetune(process, str(tmp_path / "runs"), set(), log, epochs=3, progress=False)


def test_transfer_comparison_reads_the_two_verdicts_off_the_curves():
    stages = [1, 2, 3, 3]
    curves = {"pretrained": ([1, 2, 3, 4], [0.2, 0.5, 0.7, 0.8], stages),
              "scratch": ([1, 2, 3, 4], [0.0, 0.1, 0.4, 0.55], stages)}
    comparison = demo.transfer_comparison(curves)
    assert comparison["reaches_scratch_final_at"] == 3 and abs(comparison["final_lead"] - 0.25) < 1e-9
    curves["scratch"] = ([1, 2, 3, 4], [0.0, 0.1, 0.4, 0.9], stages)  # scratch ends higher: never reached
    assert demo.transfer_comparison(curves)["reaches_scratch_final_at"] is None


def test_the_demo_fine_tunes_with_todays_defaults():
    """The demo shows what a user gets: lite0 and the shipped defaults' rates, freezing and augmentation; only
    the schedule's length, input size and batch are its own (so it fits minutes on 2 cores)."""
    config, sizes = demo.scaled_plan(1.0)
    assert config["finetuning"]["model_size"] == "lite0"
    assert set(config["finetuning"]) <= {"model_size", "img_size", "batch_size", "stage_warmup_iters",
                                         "stage1_epochs", "stage2_epochs", "stage3_epochs"}
    assert set(sizes) == {"whiteline"}
