"""The starter detector in weights/: what it is, how it was made, and that lite0 fine-tuning starts from it."""
import json
import logging
import os

import pytest
import torch

import trainer
from checkpoints import STARTER_PATH
from model_lightweight import create_lightweight_model

SIDECAR = os.path.splitext(STARTER_PATH)[0] + ".json"


def test_the_starter_is_a_small_plain_checkpoint_with_its_story():
    assert os.path.getsize(STARTER_PATH) <= 10 * 1024 * 1024
    checkpoint = torch.load(STARTER_PATH, map_location="cpu", weights_only=True)  # tensors and plain types only
    assert set(checkpoint) >= {"model_state_dict", "model_config", "class_names"}
    assert checkpoint["model_config"]["model_size"] == "lite0" and len(checkpoint["class_names"]) > 1
    floats = [v for v in checkpoint["model_state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    sidecar = json.loads(open(SIDECAR).read())
    # the shipped starter was built before make_starter.py moved to tools/
    assert sidecar["command"].startswith(("python make_starter.py", "python tools/make_starter.py"))
    assert sidecar["code_version"]
    assert "CC BY 4.0" in sidecar["data"]["credits"] and "Flickr" in sidecar["data"]["credits"]
    assert "fitting" in sidecar["scores"]["set"] and sidecar["scores"]["stored"]["mAP50"] > 0
    config_file = os.path.join(os.path.dirname(os.path.dirname(SIDECAR)), "config_transfer_learning.json")
    recipe = {k: v for k, v in json.loads(open(config_file).read())["starter"].items() if not k.startswith("_")}
    assert sidecar["recipe"] == recipe  # the file still holds the recipe the starter was made with


def test_a_notebook_model_can_ask_for_the_starter():
    starter = torch.load(STARTER_PATH, map_location="cpu", weights_only=True)["model_state_dict"]
    model = create_lightweight_model(1, "lite0", starter=True)
    assert model.pretrained_groups == {"backbone", "fpn", "head"} and model.num_classes == 1
    for key in ("backbone.stem.0.weight", "fpn.lateral.0.0.weight", "head.box_pred.weight"):
        torch.testing.assert_close(model.state_dict()[key], starter[key].float())
    with pytest.raises(ValueError, match="the starter detector is a lite0"):
        create_lightweight_model(1, "tiny", starter=True)


def test_lite0_fine_tuning_starts_from_the_starter_by_default(caplog):
    from config import script_defaults
    config = dict(script_defaults("finetuning"), init="starter", img_size=320)
    with caplog.at_level(logging.INFO):
        model, provenance = trainer.build_model(config, 1)
    assert provenance["pretrained"] == ["backbone", "fpn", "head"] and provenance["new"] == []
    assert "the starter detector" in caplog.text and "all but the class output" in caplog.text
    assert script_defaults("finetuning")["model_size"] == "lite0" and script_defaults("finetuning")["init"] is None
