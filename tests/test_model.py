"""Contracts of model_lightweight: shapes, layer groups, freezing, param groups, weight transfer, predict,
BatchNorm fusion."""
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from checkpoints import model_checkpoint, save_checkpoint
from backbone_efficientnet import conv_bn
from model_lightweight import MODEL_SIZES, ConvBNAct, count_macs, create_lightweight_model, fuse_batchnorm, load_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_lightweight_model(3, "nano", img_size=64)


def test_forward_shapes_per_level(model):
    outputs = model(torch.rand(2, 3, 64, 64))
    assert outputs["level_sizes"] == [8 * 8, 4 * 4, 2 * 2]  # strides 8, 16, 32
    num_points = sum(outputs["level_sizes"])
    assert outputs["cls_logits"].shape == (2, num_points, 3)
    assert outputs["box_ltrb"].shape == (2, num_points, 4)
    assert (outputs["box_ltrb"] >= 0).all()
    assert outputs["points"].shape == (num_points, 2)
    assert outputs["strides"].tolist() == [8.0] * 64 + [16.0] * 16 + [32.0] * 4
    assert outputs["points"][0].tolist() == [4.0, 4.0]  # centre of the first stride-8 cell


def test_every_parameter_in_exactly_one_layer_group(model):
    grouped = [id(p) for group in ("backbone", "fpn", "head") for p in getattr(model, group).parameters()]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert model.fpn.lateral[0][0].in_channels == model.backbone.out_channels[0]


def test_tiny_is_in_the_nanodet_plus_class():
    model = create_lightweight_model(80, "tiny")
    assert sum(p.numel() for p in model.parameters()) <= 1.5e6
    assert 0.4e9 <= count_macs(model, 320) <= 1.2e9
    sizes = [sum(p.numel() for p in create_lightweight_model(80, s).parameters()) for s in ("nano", "tiny", "small")]
    assert sizes == sorted(sizes) and set(MODEL_SIZES) >= {"nano", "tiny", "small"}


def test_classification_bias_uses_focal_prior(model):
    probabilities = torch.sigmoid(model.head.cls_pred.bias)
    assert torch.allclose(probabilities, torch.full_like(probabilities, 0.01), atol=1e-6)


def test_freeze_backbone_keeps_grads_and_batchnorm_statistics_frozen(model):
    model.freeze_backbone()
    model.train()
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
    assert all(not m.training for m in backbone_bns)
    assert all(m.training for m in model.head.modules() if isinstance(m, _BatchNorm))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.rand(2, 3, 64, 64))["cls_logits"].sum().backward()
    optimizer.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.cls_pred.parameters())
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key  # running stats and weights unchanged

    model.freeze_backbone(False)
    model.train()
    assert all(m.training for m in backbone_bns)
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_freeze_fpn_only_touches_fpn(model):
    model.freeze_fpn()
    assert not any(p.requires_grad for p in model.fpn.parameters())
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert all(not m.training for m in model.fpn.modules() if isinstance(m, _BatchNorm))


def test_param_groups_cover_trainable_parameters_exactly_once(model):
    model.freeze_backbone()
    groups = model.get_param_groups(1e-5, 1e-4, 1e-3, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"fpn", "fpn_no_decay", "head", "head_no_decay"}
    assert by_name["fpn"]["lr"] == 1e-4 and by_name["head_no_decay"]["lr"] == 1e-3
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and by_name["head"]["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in by_name["head_no_decay"]["params"])
    torch.optim.AdamW(groups)  # accepted by a real optimizer


def test_reset_classifier_keeps_class_agnostic_weights(model):
    box_before = model.head.box_pred.weight.clone()
    branch_before = model.head.cls_branch.layers[0].conv.weight.clone()
    model.head.reset_classifier(1)
    assert model.num_classes == 1
    assert model(torch.rand(1, 3, 64, 64))["cls_logits"].shape[-1] == 1
    assert torch.equal(model.head.box_pred.weight, box_before)
    assert torch.equal(model.head.cls_branch.layers[0].conv.weight, branch_before)
    assert torch.allclose(torch.sigmoid(model.head.cls_pred.bias), torch.tensor([0.01]))


def test_load_backbone_from_full_checkpoint_80_to_1_classes(tmp_path, model):
    source = create_lightweight_model(80, "nano", img_size=64)
    path = tmp_path / "full.pth"
    save_checkpoint(model_checkpoint(source, [str(i) for i in range(80)]), path)
    target = create_lightweight_model(1, "nano", img_size=64)
    report = target.load_backbone_weights(path)
    assert report["loaded"] == report["total"] == len(target.backbone.state_dict())
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value)
    assert not torch.equal(target.head.box_pred.weight, source.head.box_pred.weight)  # head untouched


def test_load_backbone_only_file_through_create(tmp_path, model):
    path = tmp_path / "backbone.pth"
    save_checkpoint(model.backbone_checkpoint(class_names=["a", "b", "c"]), path)
    payload = torch.load(path, weights_only=True)
    assert payload["model_size"] == "nano" and payload["class_names"] == ["a", "b", "c"]
    fresh = create_lightweight_model(1, "nano", backbone_weights_path=str(path), img_size=64)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[key], value)


def test_load_backbone_of_another_size_names_both_sizes(tmp_path):
    path = tmp_path / "small.pth"
    save_checkpoint(create_lightweight_model(2, "small").backbone_checkpoint(), path)
    with pytest.raises(ValueError, match=r"model_size 'small'.*this model is 'nano'"):
        create_lightweight_model(2, "nano").load_backbone_weights(path)


def test_load_backbone_missing_keys_strict_and_not(tmp_path, model):
    state = dict(model.backbone.state_dict())
    dropped = next(iter(state))
    del state[dropped]
    path = tmp_path / "partial.pth"
    torch.save({"backbone_state_dict": state}, path)
    with pytest.raises(ValueError, match="missing"):
        create_lightweight_model(3, "nano").load_backbone_weights(path)
    report = create_lightweight_model(3, "nano").load_backbone_weights(path, strict=False)
    assert report["missing_keys"] == [dropped]


def test_checkpoint_of_another_architecture_is_a_one_line_error(tmp_path, model):
    """A checkpoint whose shapes no longer fit (an older model_lightweight.py) names the file and the fix."""
    checkpoint = model_checkpoint(model, ["a", "b", "c"], epoch=3)
    checkpoint["model_state_dict"]["backbone.stem.0.weight"] = torch.zeros(32, 3, 3, 3)  # the old 32-channel stem
    path = tmp_path / "old.pth"
    save_checkpoint(checkpoint, path)
    with pytest.raises(ValueError, match="do not fit this code's 'nano' architecture.*stem.*retrain") as error:
        load_model(path)
    assert "\n" not in str(error.value)


def test_predict_accepts_single_batch_and_list_and_maps_to_original_pixels(model):
    torch.manual_seed(0)
    image = (torch.rand(3, 50, 100) * 255).to(torch.uint8)
    single = model.predict(image, conf_threshold=0.0, max_detections=5)
    from_float = model.predict(image.float() / 255, conf_threshold=0.0, max_detections=5)
    assert torch.allclose(single[0]["boxes"], from_float[0]["boxes"], atol=1e-4)
    mixed = model.predict([image, torch.rand(3, 64, 64)], conf_threshold=0.0, max_detections=5)
    assert len(mixed) == 2 and torch.allclose(mixed[0]["boxes"], single[0]["boxes"], atol=1e-4)
    batch = model.predict(torch.rand(2, 3, 64, 64), conf_threshold=0.0)
    assert len(batch) == 2
    boxes = single[0]["boxes"]
    assert (boxes[:, 2] <= 100).all() and (boxes[:, 3] <= 50).all() and (boxes >= 0).all()
    assert single[0]["labels"].dtype == torch.int64 and len(single[0]["boxes"]) <= 5
    assert model.training  # predict restores the mode


def test_predict_boxes_scale_back_to_the_original_image(model):
    """A letterboxed 2x image must give the same detections at 2x the coordinates."""
    torch.manual_seed(1)
    small = torch.rand(3, 32, 64)
    large = torch.nn.functional.interpolate(small[None], scale_factor=2, mode="nearest")[0]
    model.eval()
    # Both letterbox to the same 64x32 network input (up- vs downsampled), so compare at loose tolerance.
    a = model.predict(small, conf_threshold=0.0, max_detections=3)[0]["boxes"]
    b = model.predict(large, conf_threshold=0.0, max_detections=3)[0]["boxes"]
    assert torch.allclose(a * 2, b, atol=2.0)


def test_unknown_size_and_bad_img_size_are_clear_errors():
    with pytest.raises(ValueError, match="choose one of"):
        create_lightweight_model(1, "huge")
    with pytest.raises(ValueError, match="multiple of 32"):
        create_lightweight_model(1, "nano", img_size=100)


def test_predict_defaults_to_the_checkpoint_threshold(tmp_path):
    """A fine-tuned checkpoint stores its calibrated threshold: load_model reads it and predict() keeps what
    scores at or above it unless told otherwise; a checkpoint without one defaults to 0.25."""
    torch.manual_seed(0)
    model = create_lightweight_model(1, "nano", img_size=64, imagenet_pretrained=False)
    image = torch.rand(3, 64, 64)
    scores = model.eval().predict(image, conf_threshold=0.0)[0]["scores"]
    threshold = float(scores.median())  # half of the detections score at or above it
    save_checkpoint(model_checkpoint(model, ["x"], conf_threshold=threshold), tmp_path / "calibrated.pth")
    loaded = load_model(tmp_path / "calibrated.pth")
    assert loaded.conf_threshold == threshold
    kept = loaded.predict(image)[0]["scores"]
    assert len(kept) == int((scores >= threshold).sum()) and (kept >= threshold).all()
    assert len(loaded.predict(image, conf_threshold=0.0)[0]["scores"]) == len(scores)
    plain = model_checkpoint(model, ["x"])
    del plain["conf_threshold"]
    save_checkpoint(plain, tmp_path / "plain.pth")
    assert load_model(tmp_path / "plain.pth").conf_threshold == 0.25


def test_predict_runs_a_fused_copy_never_stale_after_a_weight_change():
    """predict() gets the BatchNorm-fused speed by itself: a fused copy made on the first call, made again after a
    training step (even one taken in eval mode), load_state_dict or .to(); never served with old weights."""
    from losses import DetectionLoss
    torch.manual_seed(0)
    model = create_lightweight_model(1, "nano", img_size=64, imagenet_pretrained=False).eval()
    image = torch.rand(3, 48, 64)

    def fresh(m):
        return fuse_batchnorm(m).predict(image, conf_threshold=0.0)[0]["scores"]

    first = model.predict(image, conf_threshold=0.0)[0]["scores"]
    copy = model._fused_copy.model
    assert copy is not None and copy._fused and not model._fused  # the model itself stays trainable
    assert torch.allclose(first, fresh(model), atol=1e-5)
    model.predict(image, conf_threshold=0.0)
    assert model._fused_copy.model is copy  # unchanged weights: the same copy

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    targets = [{"boxes_xyxy": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([0])}]
    DetectionLoss()(model(torch.rand(1, 3, 64, 64)), targets)["loss"].backward()
    optimizer.step()  # a step in eval mode: nothing but the weights' versions tells
    stepped = model.predict(image, conf_threshold=0.0)[0]["scores"]
    assert not torch.allclose(stepped, first) and torch.allclose(stepped, fresh(model), atol=1e-5)

    other = create_lightweight_model(1, "nano", img_size=64, imagenet_pretrained=False).eval()
    model.load_state_dict(other.state_dict())
    assert torch.allclose(model.predict(image, conf_threshold=0.0)[0]["scores"], fresh(other), atol=1e-5)
    assert "_fused_copy" not in " ".join(model.state_dict())  # not a submodule: not saved


def test_predict_results_carry_class_names_and_draw_and_save(tmp_path):
    """model.predict() results are still dicts of tensors (issue #26): `.names` is the class name of each
    detection, `.draw(image)` a PIL image of the input's size, `.save(path, image)` writes it; a model without
    class names names detections by index."""
    from PIL import Image
    torch.manual_seed(0)
    model = create_lightweight_model(3, "nano", img_size=64, imagenet_pretrained=False)
    save_checkpoint(model_checkpoint(model, ["cat", "dog", "emu"]), tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    image = (torch.rand(3, 50, 90) * 255).to(torch.uint8)
    (result,) = loaded.predict(image, conf_threshold=0.0, max_detections=6)
    assert set(result) == {"boxes", "scores", "labels"} and isinstance(result, dict)
    assert len(result["labels"]) and result.names == [["cat", "dog", "emu"][i] for i in result["labels"].tolist()]
    {key: value.cpu() for key, value in result.items()}  # code that maps over the tensors keeps working
    assert result.draw(image).size == (90, 50) and result.draw(image.float() / 255).size == (90, 50)
    assert result.draw(Image.new("RGB", (90, 50))).size == (90, 50)
    result.save(tmp_path / "drawn.jpg", image)
    assert Image.open(tmp_path / "drawn.jpg").size == (90, 50)
    (unnamed,) = model.eval().predict(image, conf_threshold=0.0, max_detections=6)
    assert unnamed.names == [str(i) for i in unnamed["labels"].tolist()]


# ---- BatchNorm fusion ---------------------------------------------------------------------------------------
def trained_statistics_model():
    """A nano model whose BatchNorms hold non-trivial statistics and affine weights, as after training."""
    torch.manual_seed(0)
    model = create_lightweight_model(3, "nano", img_size=64)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_fuse_matches_unfused_and_is_inference_only():
    model = trained_statistics_model()
    fused = create_lightweight_model(3, "nano", img_size=64)
    fused.load_state_dict(model.state_dict())
    assert fused.fuse() is fused
    assert not any(isinstance(m, _BatchNorm) for m in fused.modules())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(images), fused(images)
    for key in ("cls_logits", "box_ltrb"):
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)
    frame = (torch.rand(3, 48, 80, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    want, got = model.predict(frame, conf_threshold=0.0)[0], fused.predict(frame, conf_threshold=0.0)[0]
    assert len(want["boxes"]) > 0 and torch.equal(got["labels"], want["labels"])
    torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=1e-4)
    with pytest.raises(RuntimeError, match="fused"):
        fused.train()


def test_fused_model_equals_unfused():
    model = trained_statistics_model()
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, _BatchNorm) for m in fused.modules())
    assert any(isinstance(m, _BatchNorm) for m in model.modules())  # the original is untouched
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(images), fused(images)
    for key in ("cls_logits", "box_ltrb"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_fused_predict_matches_eager():
    """model.fuse().compile() (predict.py --compile, speed.py's compiled column) computes what eager does."""
    model = trained_statistics_model()
    frame = (torch.rand(3, 48, 80, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    compiled_model = create_lightweight_model(3, "nano", img_size=64)
    compiled_model.load_state_dict(model.state_dict())
    compiled_model.fuse().compile()
    with torch.no_grad():
        eager_out, compiled_out = model(images), compiled_model(images)
    for key in ("cls_logits", "box_ltrb"):
        torch.testing.assert_close(compiled_out[key], eager_out[key], atol=1e-4, rtol=1e-4)
    eager, compiled = model.predict(frame, conf_threshold=0.001)[0], compiled_model.predict(frame, conf_threshold=0.001)[0]
    assert len(eager["boxes"]) > 0 and len(compiled["boxes"]) > 0  # top detection: NMS always keeps it
    torch.testing.assert_close(compiled["boxes"][0], eager["boxes"][0], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(compiled["scores"][0], eager["scores"][0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("make", [lambda: conv_bn(8, 16, 3, stride=2), lambda: conv_bn(8, 8, 5, groups=8),
                                  lambda: conv_bn(8, 16, activation=False), lambda: ConvBNAct(8, 16, 3)],
                         ids=["same-padded stride 2", "depthwise", "no activation", "ConvBNAct"])
def test_eval_batchnorm_folds_into_its_conv_with_the_same_outputs_and_gradients(make):
    """ConvNorm folds an eval-mode BatchNorm into the conv on the fly (fine-tuning's frozen layers): the output and
    the gradients of the input, the conv weight and the BatchNorm's affine parameters are conv-then-BatchNorm's."""
    torch.manual_seed(0)
    layer = make()
    norm = layer[1]
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    layer.eval()
    x = torch.randn(2, 8, 16, 16)
    grad_out = None
    results = []
    for forward in (layer.forward, lambda inp: torch.nn.Sequential.forward(layer, inp)):
        inp = x.clone().requires_grad_(True)
        out = forward(inp)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        layer.zero_grad()
        out.backward(grad_out)
        results.append([out.detach(), inp.grad, layer[0].weight.grad, norm.weight.grad, norm.bias.grad])
    for folded, plain in zip(*results):
        torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-4)


def test_a_frozen_backbone_runs_no_batchnorm_pass(model, monkeypatch):
    """A frozen group's BatchNorms (eval mode) are folded into their convs, so a training step runs BatchNorm only
    where it learns; a hooked BatchNorm still runs as its own module."""
    calls = []
    batch_norm = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1) or batch_norm(*a, **k))
    images = torch.rand(2, 3, 64, 64)
    model.train()
    model(images)
    everywhere, calls[:] = len(calls), []
    model.freeze_backbone()
    model.train()(images)
    backbone_norms = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
    assert len(calls) == everywhere - len(backbone_norms) > 0
    handle = backbone_norms[0].register_forward_hook(lambda *args: None)
    calls[:] = []
    model(images)
    handle.remove()
    assert len(calls) == everywhere - len(backbone_norms) + 1
