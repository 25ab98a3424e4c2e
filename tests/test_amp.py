"""Mixed precision (--amp): bfloat16 autocast on the CPU trains, the loss stays float32, checkpoints stay float32;
and the learning-rate scaling rule for the global batch."""
import pytest
import torch

import config
import engine
import pretrain_multi_class as pretrain
from dataset_coco import CocoDetectionDataset, build_dataloader, build_transforms
from losses import DetectionLoss
from model_lightweight import create_lightweight_model, load_model
from synthetic_data import write_coco_layout


def test_bf16_autocast_overfits_one_batch_in_float32_weights(shapes_dataset):
    engine.seed_everything(0)
    dataset = CocoDetectionDataset(shapes_dataset["ann_path"], shapes_dataset["image_dir"],
                                   transforms=build_transforms("letterbox", 64))
    loader = build_dataloader(dataset, batch_size=4, shuffle=False, num_workers=0)
    model = create_lightweight_model(len(dataset.class_names), "nano", img_size=64)
    batch = next(iter(loader))
    images, targets = batch
    with engine.autocast_context("cpu", True):
        outputs = model(images)
    assert outputs["cls_logits"].dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    assert DetectionLoss()(outputs, targets)["loss"].dtype == torch.float32  # QFL and GIoU in float32

    optimizer = torch.optim.AdamW(model.get_param_groups(3e-3, 3e-3, 3e-3, weight_decay=1e-4))
    state, options = engine.TrainState(model, optimizer), engine.StepOptions(amp=True, clip_grad_norm=5.0)
    history = [engine.train_one_epoch(model, DetectionLoss(), [batch], state, options, step,
                                      progress=False)["loss"] for step in range(16)]
    assert sum(history[-3:]) / 3 < 0.5 * sum(history[:3]) / 3, history  # bf16 run: ~1.7 -> ~0.6
    assert all(tensor.dtype == torch.float32 for tensor in model.state_dict().values() if tensor.is_floating_point())


def test_amp_pretraining_checkpoint_is_float32_and_loads(tmp_path, no_run_pictures):
    write_coco_layout(str(tmp_path / "coco"), ["person", "car"], num_train=4, num_val=2, img_size=64, seed=0)
    result = pretrain.main(["--coco-root", str(tmp_path / "coco"), "--epochs", "1", "--batch-size", "4", "--amp",
                            "--model-size", "nano", "--img-size", "64", "--workers", "0", "--device", "cpu",
                            "--no-progress", "--output-dir", str(tmp_path / "runs")])
    checkpoint = torch.load(result["last_model"], weights_only=True)
    assert checkpoint["config"]["amp"] is True
    for key in ("model_state_dict", "train_state_dict"):  # the EMA (inference) weights and the raw ones
        for name, tensor in checkpoint[key].items():
            assert not tensor.is_floating_point() or tensor.dtype == torch.float32, (key, name, tensor.dtype)
    backbone = torch.load(result["last_backbone"], weights_only=True)
    assert all(t.dtype == torch.float32 for t in backbone["backbone_state_dict"].values() if t.is_floating_point())
    model = load_model(result["last_model"])  # a float32 model, strict load
    assert next(model.parameters()).dtype == torch.float32


def test_amp_dtype_and_scaler_choices():
    with pytest.raises(config.ConfigError, match="fp16 needs CUDA"):
        config.check_device({"device": "cpu", "sync_bn": False, "amp_dtype": "fp16"})
    config.check_device({"device": "cpu", "sync_bn": False, "amp_dtype": "bf16"})
    assert engine.build_grad_scaler("cpu", amp=True) is None  # bfloat16 has float32's range: no scaling
    assert engine.build_grad_scaler("cuda", amp=True, amp_dtype="bf16") is None


def test_lr_scale_factor_follows_the_global_batch():
    assert engine.lr_scale_factor("linear", 16, 1) == 1.0  # a single process uses the config's rates
    assert engine.lr_scale_factor("linear", 16, 4) == 4.0
    assert engine.lr_scale_factor("sqrt", 16, 4) == 2.0
    assert engine.lr_scale_factor("none", 16, 4) == 1.0
    assert engine.lr_scale_factor("linear", 32, 2, reference_batch_size=256) == 0.25
    with pytest.raises(config.ConfigError, match="lr_scaling"):
        config.check_common({**config.script_defaults("finetuning"), "lr_scaling": "cubic"}, 32)


def test_a_step_the_grad_scaler_skips_advances_neither_the_schedule_nor_the_ema(shapes_dataset):
    """float16 gradients that overflow make GradScaler skip the optimizer step; nothing was learned, so the
    learning-rate schedule and the EMA must not move either (a CPU GradScaler stands in for CUDA's)."""
    engine.seed_everything(0)
    dataset = CocoDetectionDataset(shapes_dataset["ann_path"], shapes_dataset["image_dir"],
                                   transforms=build_transforms("letterbox", 64))
    batch = next(iter(build_dataloader(dataset, batch_size=4, shuffle=False, num_workers=0)))
    model = create_lightweight_model(len(dataset.class_names), "nano", img_size=64)
    optimizer = torch.optim.AdamW(model.get_param_groups(1e-3, 1e-3, 1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 / (1 + it))
    ema = engine.build_ema(model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # scaled gradients overflow float32: inf
    state = engine.TrainState(model, optimizer, scheduler, ema, scaler)
    metrics = engine.train_one_epoch(model, DetectionLoss(), [batch], state, progress=False)
    assert metrics["scaler_skips"] == 1 and scaler.get_scale() < 2.0 ** 127
    assert scheduler.last_epoch == 0 and int(ema.n_averaged) == 0
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())

    state.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # a normal step moves all three
    metrics = engine.train_one_epoch(model, DetectionLoss(), [batch], state, progress=False)
    assert metrics["scaler_skips"] == 0 and scheduler.last_epoch == 1 and int(ema.n_averaged) == 1
