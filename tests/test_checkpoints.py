"""Contracts of checkpoints.py: plain-dict checkpoints that load with weights_only=True and refuse code, the RNG
state of an exact resume, and starting weights."""
import os
import random

import numpy as np
import pytest
import torch

import pretrain_multi_class as pretrain
from checkpoints import get_rng_state, load_init, model_checkpoint, save_checkpoint, set_rng_state
from conftest import REPO, exits_with_one_line, finetune_args, finetune_cli
from model_lightweight import create_lightweight_model, load_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_lightweight_model(3, "nano", img_size=64)


def test_checkpoint_roundtrip_with_weights_only(tmp_path, model):
    path = tmp_path / "model.pth"
    save_checkpoint(model_checkpoint(model, ["a", "b", "c"], epoch=3), path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["model_config"]["model_size"] == "nano"
    loaded = load_model(path)
    assert loaded.class_names == ["a", "b", "c"] and not loaded.training
    images = torch.rand(1, 3, 64, 64)
    model.eval()
    assert torch.equal(loaded(images)["cls_logits"], model(images)["cls_logits"])


def test_malicious_pickle_never_runs(fault_data, tmp_path, monkeypatch, capsys):
    marker, evil = fault_data / "PWNED", str(fault_data / "evil.pth")
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, finetune_args(
        fault_data, tmp_path, **{"--pretrained-backbone": evil})))
    assert "refused: it would run" in line and "io.open" in line and evil in line
    line = exits_with_one_line(capsys, finetune_cli(monkeypatch, ["--resume", evil]))
    assert "refused: it would run" in line
    line = exits_with_one_line(capsys, lambda: pretrain.run(["--resume", evil]))
    assert "refused: it would run" in line
    with pytest.raises(ValueError, match="refused: it would run io.open") as error:
        load_model(evil)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really is malicious: an unsafe load creates the marker
    assert marker.exists()
    marker.unlink()


def test_every_torch_load_is_weights_only():
    for name in sorted(os.listdir(REPO)):
        if name.endswith(".py"):
            text = open(os.path.join(REPO, name)).read()
            for start in [i for i in range(len(text)) if text.startswith("torch.load(", i)]:
                call = text[start:text.index(")", start) + 1]
                assert "weights_only=True" in call, (name, call)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    """Python, NumPy and torch draw again what they drew after the state was saved (exact resume)."""
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))
    save_checkpoint({"rng_state": get_rng_state()}, tmp_path / "rng.pth")
    want = draws()
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng_state"])
    assert draws() == want


def test_a_backbone_only_init_from_a_full_checkpoint_loads_the_backbone_alone(tmp_path, model):
    """create_lightweight_model's backbone_weights_path: even a full detector gives its backbone only."""
    path = tmp_path / "full.pth"
    save_checkpoint(model_checkpoint(model, ["a", "b", "c"]), path)
    torch.manual_seed(1)
    target = create_lightweight_model(1, "nano", img_size=64)
    fpn_before = {k: v.clone() for k, v in target.fpn.state_dict().items()}
    assert "backbone" in load_init(target, str(path), backbone_only=True)
    assert target.pretrained_groups == {"backbone"}
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value)
    assert all(torch.equal(target.fpn.state_dict()[k], v) for k, v in fpn_before.items())
