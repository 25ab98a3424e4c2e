"""Speed work keeps outputs identical (channels_last, the uint8 letterbox), and benchmarks/speed.py keeps running;
BatchNorm fusion's tests are in test_model.py."""
import importlib.util
import os
from argparse import Namespace

import pytest
import torch

from test_model import trained_statistics_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_speed():
    spec = importlib.util.spec_from_file_location("speed", os.path.join(ROOT, "benchmarks", "speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_keeps_the_training_mode():
    model = trained_statistics_model()
    model.train()
    model.predict(torch.rand(3, 64, 64))
    assert model.training
    model.eval()
    model.predict(torch.rand(3, 64, 64))
    assert not model.training


def test_channels_last_toggle_keeps_outputs():
    model = trained_statistics_model()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = model(images)["cls_logits"]
        got = model.set_memory_format(torch.contiguous_format)(images)["cls_logits"]
    assert model.backbone.stem[0].weight.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_speed_script_smoke(tmp_path):
    """Every measurement of benchmarks/speed.py except training, at toy sizes, writes the report."""
    speed = load_speed()
    output = tmp_path / "speed.md"
    result = speed.main(["--sizes", "nano", "--gain-size", "nano", "--img-size", "64", "--repeats", "1",
                         "--warmup", "0", "--batch-size", "2", "--loader-images", "4", "--loader-image-size", "96",
                         "--loader-epochs", "1", "--threads", "1", "--skip-train", "--no-compile", "--output", str(output)])
    assert set(result["models"]) == {"nano", speed.BASELINE}
    for row in result["models"].values():
        assert row["predict_ms"]["median"] > 0 and row["forward_ms"]["median"] > 0 and row["macs"] > 0
    assert set(result["loaders"]) == {"strong", "moderate"} and result["loaders"]["strong"]["median"] > 0
    assert any("fuse" in what for what in result["gains"])
    text = output.read_text()
    assert "| nano |" in text and "| ssdlite320 |" in text and "| strong |" in text and "threads" in text


@pytest.mark.slow
def test_speed_training_rounds_pool_the_steps_of_every_process():
    speed = load_speed()
    args = Namespace(img_size=64, batch_size=2, num_classes=3, train_steps=2, train_warmup=0, train_rounds=2)
    result = speed.training_rounds(["nano"], args)["nano"]
    steps = result["step_ms"]
    assert 0 < steps["min"] <= steps["median"] <= steps["max"]
    assert result["images_per_s"] == pytest.approx(2e3 / steps["median"])
    assert result["peak_rss_mb"] >= result["rss_before_mb"] > 50  # torch alone takes more than 50 MB


def test_letterbox_of_uint8_equals_the_letterbox_data_transform():
    """predict() resizes uint8 as uint8 (the fast path); its pixels must be the data pipeline's."""
    from torchvision import tv_tensors

    from dataset_coco import build_transforms
    from inference import letterbox
    image = (torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 10.0, 50.0, 40.0]]), format="XYXY", canvas_size=(90, 120))
    want, _ = build_transforms("letterbox", 64)(tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([0])})
    got, ratios = letterbox(image, 64)
    assert got.dtype == torch.float32 and ratios == (64 / 120, 48 / 90)
    torch.testing.assert_close(got, want.as_subclass(torch.Tensor), atol=0, rtol=0)


def load_folder_speed():
    spec = importlib.util.spec_from_file_location("folder_speed", os.path.join(ROOT, "benchmarks", "folder_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_folder_speed_smoke_without_ultralytics(tmp_path, monkeypatch):
    """benchmarks/folder_speed.py on 2 tiny photos, the YOLO peers left out as without ultralytics: both
    folder passes (with and without drawing) and the deployment table reach the report."""
    from PIL import Image
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (96, 72), (90 * index, 50, 20)).save(folder / f"{index}.jpg")
    folder_speed = load_folder_speed()
    monkeypatch.setattr(folder_speed, "load_yolo", lambda yaml: None)
    output = tmp_path / "speed_folder.md"
    results = folder_speed.main(["--folder", str(folder), "--sizes", "nano", "--threads", "1", "--rounds", "1",
                                 "--repeats", "1", "--warmup", "0", "--output", str(output)])
    passes = results[0]["folders"]
    assert set(passes) == {("photos", False), ("photos", True)}
    assert all(v["images_per_s"] > 0 for variants in passes.values() for v in variants.values())
    assert set(passes[("photos", True)]) == {"nano PyTorch", "nano ORT INT8"}
    assert results[0]["deployment"][("nano", "ort_int8_network")]["median"] > 0
    text = output.read_text()
    assert "| photos (2) | yes | nano ORT INT8 |" in text and "| nano |" in text


@pytest.mark.slow
def test_a_predict_imports_neither_torchvision_nor_dynamo(tmp_path):
    """A predict's cold start (issue #27 item 4): `predict.py` on a photo with a .pth imports neither torchvision
    (whose import pulls in torch._dynamo and its detection models), and still finds
    boxes through torchvision's compiled NMS."""
    import subprocess
    import sys

    from PIL import Image

    from checkpoints import model_checkpoint, save_checkpoint
    from model_lightweight import create_lightweight_model
    torch.manual_seed(0)
    checkpoint = tmp_path / "m.pth"
    save_checkpoint(model_checkpoint(create_lightweight_model(1, "nano", img_size=64), ["thing"]), checkpoint)
    Image.new("RGB", (80, 60), (120, 40, 200)).save(tmp_path / "a.jpg")
    code = ("import sys, predict; r = predict.main(['--checkpoint', sys.argv[1], '--source', sys.argv[2], "
            "'--save-dir', sys.argv[3], '--conf', '0.001', '--no-progress']); "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules), "
            "r['images'], r['detections'] > 0)")
    result = subprocess.run([sys.executable, "-c", code, str(checkpoint), str(tmp_path / "a.jpg"),
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[] 1 True"


def test_torchvision_free_inference_matches_torchvision():
    """inference's resize, clip, NMS and image_io's pil_to_tensor, written for the cold start, give torchvision's
    results exactly."""
    import numpy as np
    import torchvision
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    import inference
    from image_io import pil_to_tensor
    generator = torch.Generator().manual_seed(0)
    for height, width, size in ((90, 120, (48, 64)), (31, 17, (64, 35)), (64, 64, (64, 64))):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        assert torch.equal(inference.resize(image, size), TF.resize(image, list(size), antialias=True))
        floats = image.float() / 255
        assert torch.equal(inference.resize(floats, size), TF.resize(floats, list(size), antialias=True))
    for count in (0, 1, 30, 1000):
        corners = torch.rand(count, 2, generator=generator) * 300
        boxes = torch.cat([corners, corners + torch.rand(count, 2, generator=generator) * 80 + 1], dim=1)
        scores = torch.rand(count, generator=generator)
        labels = torch.randint(0, 3, (count,), generator=generator)
        for iou in (0.3, 0.6):
            assert torch.equal(inference.batched_nms(boxes, scores, labels, iou),
                               torchvision.ops.batched_nms(boxes, scores, labels, iou))
        assert torch.equal(inference.clip_boxes(boxes - 50, (200, 150)),
                           torchvision.ops.clip_boxes_to_image(boxes - 50, (200, 150)))
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    assert torch.equal(pil_to_tensor(pil), torchvision.transforms.functional.pil_to_tensor(pil))


def test_conv_bn_act_has_torchvision_s_layout():
    """The model's own conv-BN-activation block names its children as Conv2dNormActivation does, so weights load
    across, and computes the same (to float rounding: in eval mode ours folds the BatchNorm into the conv)."""
    from torchvision.ops.misc import Conv2dNormActivation

    from model_lightweight import Activation, ConvBNAct
    torch.manual_seed(0)
    ours = ConvBNAct(8, 16, 3, 2, groups=2).eval()
    theirs = Conv2dNormActivation(8, 16, 3, 2, groups=2, activation_layer=Activation).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    images = torch.rand(2, 8, 20, 20)
    torch.testing.assert_close(ours(images), theirs(images), atol=1e-5, rtol=1e-5)
