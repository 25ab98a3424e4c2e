"""config.py and the scripts' configuration: one source of defaults, the precedence of file, --config and flags,
and bad input as one line and exit status 2 (the scripts' command-line entries run in-process, so each row costs
a config check rather than a Python start-up)."""
import logging
import os

import pytest

import config
import finetune_single_class as finetune
import pretrain_multi_class as pretrain
from conftest import exits_with_one_line, finetune_args, finetune_cli, write_json, STAGES
from conftest import write_coco_json


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
    "img_size_not_multiple": ({"--img-size": "100"}, "img_size 100 is not a positive multiple of 32; use 96"),
    "max_nonfinite_steps_zero": (lambda d, t: {"--config": write_json(
        t / "c.json", {**STAGES, "max_nonfinite_steps": 0})}, "max_nonfinite_steps must be >= 1"),
}


@pytest.mark.parametrize("row", list(BAD_FINETUNE))
def test_finetune_bad_input_is_one_line_exit_2(row, fault_data, tmp_path, monkeypatch, capsys):
    overrides, expected = BAD_FINETUNE[row]
    overrides = overrides(fault_data, tmp_path) if callable(overrides) else overrides
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, finetune_args(fault_data, tmp_path / "runs", **overrides)))
    assert line.startswith("error: ") and expected in line, line
    if row.startswith(("ann_", "all_", "class_without")):
        assert str(overrides.get("--train-ann", fault_data / "train.json")) in line  # says where
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


BAD_PRETRAIN = {
    "coco_root_missing": (["--coco-root", "/nowhere"], "/nowhere is missing train2017/"),
    "unknown_classes": (["--classes", "dog,unicorn"], "class 'unicorn' is not in the annotation file; "
                                                      "available: person, car, dog"),
    "epochs_negative": (["--epochs", "-1"], "epochs must be >= 1, got -1"),
    "batch_size_zero": (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    "img_size_not_multiple": (["--img-size", "100"], "img_size 100 is not a positive multiple of 32; use 96"),
    "resume_missing": (["--resume", "/nowhere/last_model.pth"], "--resume checkpoint not found"),
    "resume_corrupt": (["--resume", "{data}/corrupt.pth"], "is not a readable torch checkpoint"),
}


@pytest.mark.parametrize("row", list(BAD_PRETRAIN))
def test_pretrain_bad_input_is_one_line_exit_2(row, fault_data, tmp_path, capsys):
    argv, expected = BAD_PRETRAIN[row]
    argv = [arg.format(data=fault_data) for arg in argv]
    if "--coco-root" not in argv and "--resume" not in argv:
        argv += ["--coco-root", str(fault_data / "coco")]
    line = exits_with_one_line(capsys, lambda: pretrain.run(argv + ["--output-dir", str(tmp_path / "runs")]))
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key, value, expected", [
    ("head_lr", -1.0, "head_lr must be >= 0, got -1.0"),
    ("epochs", "ten", "config key 'epochs' in"),
    ("epoch", 3, "did you mean 'epochs'?"),
])
def test_pretrain_bad_config_values(key, value, expected, fault_data, tmp_path, capsys):
    config_file = write_json(tmp_path / "c.json", {"pretraining": {key: value}})
    line = exits_with_one_line(capsys, lambda: pretrain.run(["--coco-root", str(fault_data / "coco"), "--config",
                                                             str(config_file), "--output-dir", str(tmp_path)]))
    assert expected in line, line


# ---- one source of defaults, precedence --------------------------------------------------------------------
def test_every_default_comes_from_the_config_file(fault_data, tmp_path):
    """The scripts hold no defaults of their own: what a run uses without flags is the file's value, and the
    flags' help quotes it."""
    data = config.load_json(config.DEFAULT_CONFIG_PATH)
    resolved = finetune.parse_config(finetune_args(fault_data, tmp_path)[2:])  # without --config
    for key, value in config.config_sections(data, "finetuning").items():
        if not key.startswith("_") and key not in ("init", "model_size", "img_size", "batch_size", "workers",
                                                    "class_name", "train_ann", "train_root", "val_ann", "val_root",
                                                    "output_dir"):
            assert resolved[key] == value, key
    defaults = config.script_defaults("finetuning")
    assert "(default: 320)" in " ".join(finetune.get_args_parser(defaults).format_help().split())
    assert "(default: 416)" in " ".join(finetune.get_args_parser({**defaults, "img_size": 416}).format_help().split())
    assert "(default: 100)" in " ".join(pretrain.get_args_parser(config.script_defaults("pretraining"))
                                        .format_help().split())
    assert not hasattr(finetune, "DEFAULTS") and not hasattr(pretrain, "DEFAULTS")


def test_file_then_config_then_typed_flags(fault_data, tmp_path):
    config_file = write_json(tmp_path / "c.json", {"finetuning": {**STAGES, "stage1_head_lr": 0.007, "seed": 4}})
    argv = finetune_args(fault_data, tmp_path, **{"--config": config_file, "--seed": "9"})
    resolved = finetune.parse_config(argv)
    assert resolved["seed"] == 9  # typed beats the file
    assert resolved["stage1_head_lr"] == 0.007  # --config beats config_transfer_learning.json
    assert resolved["weight_decay"] == config.load_json(config.DEFAULT_CONFIG_PATH)["optimization"]["weight_decay"]


def test_only_typed_flags_override():
    parser = finetune.get_args_parser(config.script_defaults("finetuning"))
    assert vars(parser.parse_args([])) == {}
    assert vars(parser.parse_args(["--no-progress", "--img-size", "64"])) == {"progress": False, "img_size": 64}
    assert vars(parser.parse_args(["--pretrained-backbone", "b.pth"])) == {"init": "b.pth"}
    with pytest.raises(SystemExit):  # two spellings of the starting weights that disagree
        parser.parse_args(["--init", "imagenet", "--no-pretrained"])


def test_a_missing_or_broken_defaults_file_is_one_line(tmp_path):
    with pytest.raises(config.ConfigError, match="default config not found"):
        config.script_defaults("finetuning", str(tmp_path / "none.json"))
    (tmp_path / "broken.json").write_text("{oops")
    with pytest.raises(config.ConfigError, match="is not valid JSON"):
        config.script_defaults("finetuning", str(tmp_path / "broken.json"))
    (tmp_path / "other.json").write_text('{"pretraining": {}}')
    with pytest.raises(config.ConfigError, match="has no 'finetuning' section"):
        config.script_defaults("finetuning", str(tmp_path / "other.json"))


@pytest.mark.parametrize("error, status", [(config.ConfigError("bad value"), 2), (config.TrainingFailed("nan"), 1),
                                           (KeyboardInterrupt("resume with: ..."), 130)])
def test_the_exit_code_policy(error, status, capsys):
    def main(argv):
        raise error
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(main)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---- each default written once: "shared", "inference", renamed keys (issue #25) -----------------------------------
def _settings(section):
    return {key: value for key, value in section.items() if not key.startswith("_")}


def test_the_files_shared_and_inference_values_reach_both_scripts_and_the_commands(fault_data, tmp_path,
                                                                                  monkeypatch):
    """Edit "shared" and "inference" in the defaults file, and both training scripts' resolved configs, the flags
    of predict.py, evaluate.py and export.py, a new model's threshold and predict()'s NMS settings follow."""
    import evaluate
    import export
    import predict
    from inference import detection_settings
    from model_lightweight import create_lightweight_model
    data = config.load_json(config.DEFAULT_CONFIG_PATH)
    data["shared"].update(report_threshold=0.4, log_interval=7, patience=3, seed=5)
    data["inference"].update(conf_threshold=0.35, iou_threshold=0.45, max_detections=50)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", write_json(tmp_path / "defaults.json", data))
    shared = _settings(data["shared"])
    finetuned = finetune.parse_config(finetune_args(fault_data, tmp_path)[2:])  # without --config
    pretrained, _ = pretrain.resolve_config(pretrain.typed_flags(["--coco-root", str(fault_data / "coco"),
                                                                   "--output-dir", str(tmp_path)]))
    typed = {"init", "img_size", "workers", "train_ann", "train_root", "val_ann", "val_root"}  # by finetune_args
    for resolved, skipped in ((finetuned, typed), (pretrained, {"init"})):  # the scripts resolve a null init
        assert {key: resolved[key] for key in shared if key not in skipped} == \
               {key: value for key, value in shared.items() if key not in skipped}
    for parser, argv in ((predict.get_args_parser(), []), (evaluate.get_args_parser(), ["--ann", "a.json"]),
                         (export.get_args_parser(), ["--checkpoint", "m.pth"])):
        args = parser.parse_args(argv)
        assert args.conf is None and args.iou == 0.45  # --conf None: the checkpoint's calibrated threshold
        assert "else 0.35)" in " ".join(parser.format_help().split())
        assert getattr(args, "max_det", 50) == 50
    model = create_lightweight_model(1, "nano", img_size=64)
    assert model.conf_threshold == 0.35 and detection_settings(model) == (0.35, 0.45, 50)
    assert config.inference_defaults()["report_threshold"] == 0.4  # evaluate()'s P/R/F1 threshold


def test_old_key_names_warn_once_and_count_under_their_new_names(fault_data, tmp_path, caplog):
    """conf_threshold (the P/R/F1 threshold of training) is now report_threshold and print_freq log_interval: a
    --config file copied from before "shared" existed resolves as the file does, each old key a one-line warning;
    --print-freq stays as a hidden alias and a resumed old run reads its own config under the new names."""
    data = config.load_json(config.DEFAULT_CONFIG_PATH)
    old_names = {new: old for old, new in config.RENAMED_KEYS.items()}
    shared = {old_names.get(key, key): value for key, value in _settings(data["shared"]).items()
              if key != "val_fraction"}  # a set val_fraction and --val-ann are refused together
    old_file = {section: {**shared, **_settings(data[section])} for section in ("pretraining", "finetuning")}
    old_file["finetuning"].update(STAGES, conf_threshold=0.3, print_freq=5)
    old_file["optimization"] = data["optimization"]
    path = write_json(tmp_path / "old.json", old_file)
    with caplog.at_level(logging.WARNING, logger="config"):
        resolved = finetune.parse_config(finetune_args(fault_data, tmp_path, **{"--config": path}))
    expected = finetune.parse_config(finetune_args(fault_data, tmp_path))
    assert {**resolved, "config": None} == {**expected, "config": None, "report_threshold": 0.3, "log_interval": 5}
    warnings = [record.getMessage() for record in caplog.records if record.name == "config"]
    assert len(warnings) == 2 and all(str(path) in line and "\n" not in line for line in warnings), warnings
    assert "'conf_threshold' is now 'report_threshold'" in warnings[0]

    parser = finetune.get_args_parser(config.script_defaults("finetuning"))
    assert vars(parser.parse_args(["--print-freq", "9"])) == vars(parser.parse_args(["--log-interval", "9"])) == \
           {"log_interval": 9}
    help_text = parser.format_help()
    assert "--log-interval" in help_text and "--report-threshold" in help_text and "--print-freq" not in help_text
    with pytest.raises(config.ConfigError, match="sets both 'conf_threshold' and 'report_threshold'"):
        config.resolve("finetuning", {"conf_threshold": 0.3, "report_threshold": 0.4})
    old_run = config.resumed(expected, {"conf_threshold": 0.2, "print_freq": 3}, {}, (), "last_model.pth")
    assert (old_run["report_threshold"], old_run["log_interval"]) == (0.2, 3)
    assert not set(config.RENAMED_KEYS) & set(old_run)
