"""benchmarks/transfer_study.py: its metrics on hand-made curves, every arm's argv through the real parser, and
one micro study end to end (then again, reusing every run)."""
import csv
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

import config
import finetune_single_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = config.load_json(config.DEFAULT_CONFIG_PATH)


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("transfer_study", os.path.join(ROOT, "benchmarks", "transfer_study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def curve(map50, map_=None):
    return {"mAP50": list(map50), "mAP": list(map_ if map_ is not None else map50), "epoch_time": [1.0] * len(map50)}


# ---------------------------------------------------------------------------------------------- metrics

def test_speedup_is_scratch_epochs_to_its_best_over_the_arm_epochs_to_that_value(study):
    scratch = [0.1, 0.3, 0.5, 0.6, 0.6, 0.55]  # best 0.6, first reached at epoch 4
    assert study.convergence_speedup(scratch, [0.4, 0.65, 0.7, 0.7, 0.7, 0.7]) == 2.0
    assert study.convergence_speedup(scratch, [0.6, 0.1, 0.1, 0.1, 0.1, 0.1]) == 4.0  # reaching once counts
    assert study.convergence_speedup(scratch, scratch) == 1.0
    assert study.convergence_speedup(scratch, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == pytest.approx(4 / 6)
    assert study.convergence_speedup(scratch, [0.59] * 6) is None  # not reached
    assert study.convergence_speedup([0.0] * 6, [0.5] * 6) is None  # scratch never scored: no target
    assert study.convergence_speedup([math.nan, 0.3, 0.5], [0.5, 0.5, 0.5]) == 3.0  # NaN epochs never win


def test_gains_are_paired_by_seed_and_relative_to_scratch(study):
    curves = {("scratch", 0): curve([0.2, 0.5], [0.1, 0.2]), ("scratch", 1): curve([0.3, 0.4], [0.1, 0.25]),
              ("naive", 0): curve([0.5, 0.6], [0.2, 0.3]), ("naive", 1): curve([0.1, 0.5], [0.1, 0.2])}
    summary = study.summarise(curves, ["scratch", "naive"], [0, 1])
    naive = summary["naive"]
    assert naive["gain_mAP50"]["mean"] == pytest.approx(0.1) and naive["gain_mAP50"]["std"] == pytest.approx(0.0)
    assert naive["gain_mAP50_pct"]["mean"] == pytest.approx((20 + 25) / 2)  # +0.1 on 0.5, +0.1 on 0.4
    assert naive["gain_mAP_pct"]["min"] == pytest.approx(-20) and naive["gain_mAP_pct"]["max"] == pytest.approx(50)
    assert naive["per_seed"][0]["speedup"] == 2.0 and naive["per_seed"][1]["speedup"] == 1.0
    assert naive["speedup"]["mean"] == pytest.approx(1.5) and naive["reached"] == 2 and naive["seeds"] == 2
    assert naive["best_mAP50"]["mean"] == pytest.approx(0.55) and naive["final_mAP"]["mean"] == pytest.approx(0.25)
    assert summary["scratch"]["speedup"]["mean"] == 1.0 and summary["scratch"]["gain_mAP50"]["mean"] == 0.0
    assert study.relative_gain_pct(0.3, 0.0) is None
    assert study.spread([1.0, None, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "min": 1.0,
                                              "max": 3.0, "n": 2}
    assert study.spread([None])["n"] == 0
    alone = study.summarise({("naive", 0): curve([0.5])}, ["naive"], [0])["naive"]  # no scratch: nothing to gain
    assert alone["gain_mAP50"]["n"] == 0 and alone["reached"] == 0


def test_claims_say_where_they_hold_and_where_not(study):
    curves = {}
    for seed in (0, 1):
        curves[("scratch", seed)] = curve([0.2, 0.4, 0.5, 0.5])  # its best, 0.5, at epoch 3
        curves[("three_stage", seed)] = curve([0.3, 0.5, 0.6, 0.6])  # 0.5 at epoch 2: 1.5x, +20%
        curves[("naive", seed)] = curve([0.5, 0.56, 0.56, 0.7])  # 0.5 at epoch 1: 3x, +40%
        curves[("heads_only", seed)] = curve([0.3, 0.4, 0.45, 0.45])  # never 0.5, -10%
    text = "\n".join(study.claim_lines(study.summarise(curves, list(dict.fromkeys(a for a, _ in curves)), [0, 1])))
    assert "holds for naive (3.0x, min 3.0x, 2/2 seeds); does not hold for three_stage (1.5x where reached, " \
           "2/2 seeds), heads_only (never reaches scratch's best mAP50)" in text
    assert "in final mAP50: holds for three_stage (+20%, +20% to +20%), naive (+40%, +40% to +40%); " \
           "does not hold for heads_only (-10%, -10% to -10%)" in text
    assert "three_stage does not beat naive: final mAP50 0.600 vs 0.700 (ahead in 0/2 seeds)" in text
    assert "three_stage beats heads_only: final mAP50 0.600 vs 0.450 (ahead in 2/2 seeds)" in text
    without_scratch = "\n".join(study.claim_lines(study.summarise(curves, ["three_stage", "naive"], [0, 1])))
    assert "run it with the other arms" in without_scratch and "does not beat naive" in without_scratch


# ---------------------------------------------------------------------------------------------- arms

def test_three_stages_split_the_epochs_like_the_default_config(study):
    assert study.split_epochs(12, (10, 10, 20)) == (3, 3, 6)
    assert study.split_epochs(20, (10, 10, 20)) == (5, 5, 10)
    assert study.split_epochs(3, (10, 10, 20)) == (1, 1, 1)
    assert study.split_epochs(5, (10, 10, 20)) == (1, 1, 3)
    assert study.split_epochs(10, (0, 10, 20)) == (0, 3, 7)  # a recipe without stage 1 keeps it at 0
    with pytest.raises(config.ConfigError, match="--epochs 2 is too few for the 3-stage recipe"):
        study.split_epochs(2, (10, 10, 20))


def test_every_arm_argv_is_a_valid_finetune_command_with_its_schedule(study, tmp_path):
    """Each arm's argv and --config go through finetune_single_class's own parser and checks."""
    data = {key: str(tmp_path / key) for key in study.DATA_KEYS}
    for path in data.values():
        Path(path).touch()
    from checkpoints import save_checkpoint
    from model_lightweight import create_lightweight_model
    weights = {"model_size": "nano", "pretrained": str(tmp_path / "nano.pth"),
               "pretrained_lite0": str(tmp_path / "lite0.pth"), "starts": {}}
    for size in ("nano", "lite0"):
        save_checkpoint(create_lightweight_model(3, size, imagenet_pretrained=False).backbone_checkpoint(),
                        str(tmp_path / f"{size}.pth"))
    args = study.get_args_parser().parse_args(["--epochs", "8", "--img-size", "64", "--workers", "0", "--no-progress"])
    finetune, pretrain_rates, _ = study.load_schedule_config(None)
    configs = {}
    for arm in study.ARMS:
        folder = tmp_path / arm
        folder.mkdir()
        (folder / study.RUN_CONFIG).write_text(json.dumps(study.arm_schedule(arm, 8, finetune, pretrain_rates)))
        argv = study.arm_argv(arm, 3, args, {**data, "class_name": "whiteline"}, weights, str(folder))
        configs[arm] = finetune_single_class.parse_config(argv)
        assert configs[arm]["seed"] == 3 and configs[arm]["img_size"] == 64 and configs[arm]["workers"] == 0
        assert configs[arm]["output_dir"] == str(folder) and not configs[arm]["progress"]
    stages = {arm: tuple(config[f"stage{i}_epochs"] for i in (1, 2, 3)) for arm, config in configs.items()}
    recipe = finetune_single_class.split_epochs(8, [DEFAULT_CONFIG["finetuning"][f"stage{i}_epochs"] for i in (1, 2, 3)])
    assert stages == {"scratch": (0, 0, 8), "three_stage": recipe, "three_stage_seed": (2, 2, 4), "naive": (0, 0, 8),
                      "heads_only": (8, 0, 0), "lite0_imagenet": recipe, "lite0_imagenet_coco": recipe}
    pretraining, finetuning = DEFAULT_CONFIG["pretraining"], DEFAULT_CONFIG["finetuning"]
    scratch, naive = configs["scratch"], configs["naive"]
    assert (scratch["stage3_backbone_lr"], scratch["stage3_fpn_lr"], scratch["stage3_head_lr"]) == \
           (pretraining["backbone_lr"], pretraining["fpn_lr"], pretraining["head_lr"])
    assert naive["stage3_backbone_lr"] == finetuning["stage3_backbone_lr"]
    seed_defaults = config.load_json(study.SEED_DEFAULTS)
    for key in ("stage1_head_lr", "stage2_fpn_lr", "stage3_backbone_lr", "ema_ramp_iters", "stage3_train_bn"):
        assert configs["three_stage_seed"][key] == seed_defaults[key], key
    assert scratch["init"] == "random" and scratch["model_size"] == "nano"
    for arm in study.PRETRAINED_ARMS:
        assert configs[arm]["init"] == weights["pretrained"] and configs[arm]["model_size"] == "nano"
    lite0, lite0_coco = configs["lite0_imagenet"], configs["lite0_imagenet_coco"]
    assert lite0["model_size"] == "lite0" and lite0["init"] == "imagenet"  # the package's ImageNet weights
    assert lite0_coco["model_size"] == "lite0" and lite0_coco["init"] == weights["pretrained_lite0"]
    lite0_argv = study.arm_argv("lite0_imagenet_coco", 0, args, {**data, "class_name": None}, weights, "runs")
    assert lite0_argv[lite0_argv.index("--model-size") + 1] == "lite0" and "--class-name" not in lite0_argv
    assert lite0_argv[lite0_argv.index("--init") + 1] == weights["pretrained_lite0"]


def test_bad_input_is_one_clear_error_before_anything_trains(study, tmp_path):
    out = ["--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")]
    with pytest.raises(SystemExit):  # argparse names the valid arms
        study.main(["--arms", "scratch", "fancy"] + out)
    with pytest.raises(config.ConfigError, match="--train-ann does not exist"):
        study.main(["--train-root", str(tmp_path), "--train-ann", str(tmp_path / "nope.json"), "--val-root",
                    str(tmp_path), "--val-ann", str(tmp_path)] + out)
    with pytest.raises(config.ConfigError, match="--val-root is missing"):
        study.main(["--train-root", str(tmp_path), "--train-ann", str(tmp_path), "--val-ann", str(tmp_path)] + out)
    with pytest.raises(config.ConfigError, match="--pretrained not found"):
        study.main(["--pretrained", str(tmp_path / "missing.pth")] + out)
    with pytest.raises(config.ConfigError, match="--epochs 2 is too few"):
        study.main(["--epochs", "2"] + out)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"stage3_backbone_lr": 2e-5, "img_size": 320}))
    with pytest.raises(config.ConfigError, match="sets 'img_size', which the study sets for every arm"):
        study.main(["--config", str(config_file)] + out)
    config_file.write_text(json.dumps({"stage3_backbone_lr": 2e-5, "stage3_backbone_rate": 1}))
    with pytest.raises(config.ConfigError, match="unknown config key 'stage3_backbone_rate'"):
        study.main(["--config", str(config_file)] + out)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_micro_study_end_to_end_then_reuses_every_run(study, tmp_path, no_run_pictures):
    out = tmp_path / "study"
    arms = ["scratch", "three_stage", "heads_only"]
    argv = ["--arms", *arms, "--seeds", "0", "--epochs", "3", "--img-size", "64", "--num-train", "8", "--num-val", "4",
            "--pretrain-epochs", "1", "--pretrain-num-train", "8", "--pretrain-num-val", "4",
            "--data", str(tmp_path / "data"), "--out", str(out), "--workers", "0", "--device", "cpu", "--no-progress"]
    result = study.main(argv)

    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((row["arm"], int(row["epoch"])) for row in rows) == sorted((a, e) for a in arms for e in (1, 2, 3))
    stages = {arm: [int(row["stage"]) for row in rows if row["arm"] == arm] for arm in arms}
    assert stages == {"scratch": [3, 3, 3], "three_stage": [1, 2, 3], "heads_only": [1, 1, 1]}
    assert all(0.0 <= float(row["mAP50"]) <= 1.0 and 0.0 <= float(row["mAP"]) <= 1.0 for row in rows)
    assert os.path.getsize(out / "transfer_study.png") > 0
    report = (out / "transfer_study.md").read_text()
    assert all(f"| {arm} |" in report for arm in arms) and "## The claims" in report and "--epochs 3" in report

    # the pretrained arms started from the study's pretraining checkpoint, scratch from random weights
    pretrained = result["weights"]["pretrained"]
    assert Path(pretrained).is_file() and Path(pretrained).is_relative_to(out / "runs" / "pretrain_nano")
    configs = {arm: json.loads((Path(result["run_dirs"][(arm, 0)]) / "config.json").read_text()) for arm in arms}
    assert configs["three_stage"]["init"] == configs["heads_only"]["init"] == pretrained
    assert configs["scratch"]["init"] == "random"
    # heads_only never trains backbone or FPN: they still hold the pretraining checkpoint's weights exactly
    source = torch.load(pretrained, weights_only=True)["model_state_dict"]
    heads_only = torch.load(Path(result["run_dirs"][("heads_only", 0)]) / "last_model.pth",
                            weights_only=True)["model_state_dict"]
    transferred = [key for key in source if key.startswith(("backbone.", "fpn."))]
    assert transferred and all(torch.equal(heads_only[key], source[key]) for key in transferred)

    folders = sorted(path for path in out.rglob("*") if path.is_dir())
    again = study.main(argv)  # everything is reused: no new run folder, the same curves
    assert sorted(path for path in out.rglob("*") if path.is_dir()) == folders
    assert again["run_dirs"] == result["run_dirs"] and again["curves"] == result["curves"]


def test_starts_run_every_pretrained_recipe_once_per_start(study, tmp_path):
    """--starts imagenet=imagenet coco=FILE: ARM@NAME arms, each from its own weights; scratch is one arm."""
    from checkpoints import model_checkpoint, save_checkpoint
    from model_lightweight import create_lightweight_model
    coco = tmp_path / "lite0_coco.pth"
    save_checkpoint(model_checkpoint(create_lightweight_model(3, "lite0", imagenet_pretrained=False), ["a", "b", "c"]),
                    coco)
    args = study.get_args_parser().parse_args(["--starts", "imagenet=imagenet", f"coco={coco}", "--arms", "scratch",
                                               "naive", "three_stage", "--img-size", "64"])
    starts, size = study.parse_starts(args)
    assert starts == {"imagenet": "imagenet", "coco": str(coco)} and size == "lite0"
    arms = study.expand_arms(args.arms, starts)
    assert arms == ["scratch", "naive@imagenet", "naive@coco", "three_stage@imagenet", "three_stage@coco"]
    weights = {"model_size": size, "pretrained": None, "pretrained_lite0": None, "starts": starts}
    assert study.arm_init_flags("scratch", weights) == ["--model-size", "lite0", "--init", "random"]
    assert study.arm_init_flags("naive@imagenet", weights) == ["--model-size", "lite0", "--init", "imagenet"]
    assert study.arm_init_flags("three_stage@coco", weights) == ["--model-size", "lite0", "--init", str(coco)]
    finetune, rates, _ = study.load_schedule_config(None)
    assert study.arm_schedule("naive@coco", 8, finetune, rates) == study.arm_schedule("naive", 8, finetune, rates)
    bad = study.get_args_parser().parse_args(["--starts", "a=imagenet", f"b={tmp_path / 'missing.pth'}"])
    with pytest.raises(config.ConfigError, match="neither 'imagenet', 'starter' nor a file"):
        study.parse_starts(bad)


def test_skip_leaves_arms_of_the_matrix_out(study, tmp_path):
    out = ["--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")]
    with pytest.raises(config.ConfigError, match="--skip naive@nowhere is not an arm of this study"):
        study.main(["--starts", "imagenet=imagenet", "--arms", "naive", "--skip", "naive@nowhere",
                    "--num-train", "2", "--num-val", "2", "--img-size", "64"] + out)
