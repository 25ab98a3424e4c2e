"""Probe a checkpoint's BatchNorm statistics: are a layer group's running statistics the ones its inputs have?

    python benchmarks/bn_probe.py RUN/last_model.pth --groups fpn --train-ann train.json --train-root images \\
        --val-ann val.json --val-root images

Scores the checkpoint on the val set as saved, then again after re-estimating the BatchNorm statistics of
`--groups` on training batches (what happens implicitly when a stage switches those BatchNorms to train
mode), and prints, per BatchNorm, the running variance against the variance its inputs really have. A group
frozen from a random init keeps mean 0 / variance 1 while its inputs have another scale: the head then
learns on features normalised by the wrong statistics, and releasing the group changes the head's inputs
at once (the stage-boundary collapse of the transfer-on-real-photos issue).
"""
import argparse
import os
import sys

import torch
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dataset_coco import CocoDetectionDataset, build_dataloader, build_transforms  # noqa: E402
from evaluate import evaluate  # noqa: E402
from model_lightweight import load_model  # noqa: E402


def input_variances(model, group, loader, batches):
    """Mean over channels of each BatchNorm's input variance (per channel, over batch and pixels)."""
    seen, hooks = {}, []
    for name, module in getattr(model, group).named_modules():
        if isinstance(module, _BatchNorm):
            def hook(module, inputs, output, name=name):
                seen.setdefault(name, []).append(inputs[0].float().var(dim=(0, 2, 3)).mean().item())
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for index, (images, _) in enumerate(loader):
            if index == batches:
                break
            model(images)
    for handle in hooks:
        handle.remove()
    return {name: sum(values) / len(values) for name, values in seen.items()}


def head_input_std(model, loader, batches):
    """Standard deviation of the FPN's outputs (the head's inputs), per pyramid level."""
    sums = None
    with torch.no_grad():
        for index, (images, _) in enumerate(loader):
            if index == batches:
                break
            x = ((images - model.pixel_mean) / model.pixel_std).contiguous(memory_format=model.memory_format)
            stds = [f.float().std().item() for f in model.fpn(model.backbone(x))]
            sums = stds if sums is None else [a + b for a, b in zip(sums, stds)]
    return [value / min(batches, len(loader)) for value in sums]


def reestimate(model, group, loader, batches):
    """Replace the group's running statistics by their cumulative average over `batches` training batches."""
    norms = [m for m in getattr(model, group).modules() if isinstance(m, _BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average
        norm.train()
    with torch.no_grad():
        for index, (images, _) in enumerate(loader):
            if index == batches:
                break
            model(images)
    model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--groups", nargs="+", default=["fpn"], choices=("backbone", "fpn", "head"))
    parser.add_argument("--train-ann", required=True)
    parser.add_argument("--train-root", required=True)
    parser.add_argument("--val-ann", required=True)
    parser.add_argument("--val-root", required=True)
    parser.add_argument("--batches", type=int, default=8, help="training batches for the statistics")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint)
    names = model.class_names
    train = CocoDetectionDataset(args.train_ann, args.train_root, classes=names,
                                 transforms=build_transforms("letterbox", model.img_size))
    val = CocoDetectionDataset(args.val_ann, args.val_root, classes=names)
    loader = build_dataloader(train, 16, shuffle=True, num_workers=0)
    before = evaluate(model, val, num_workers=0)
    stds = head_input_std(model, loader, args.batches)
    print(f"as saved: mAP50 {before['mAP50']:.3f} mAP {before['mAP']:.3f}; head input std per level "
          f"{', '.join(f'{v:.3f}' for v in stds)}")
    for group in args.groups:
        variances = input_variances(model, group, loader, args.batches)
        norms = dict(getattr(model, group).named_modules())
        print(f"{group}: BatchNorm running variance vs the variance of its inputs (mean over channels)")
        for name, variance in variances.items():
            running = norms[name].running_var.mean().item()
            print(f"  {name:40s} running {running:9.4f}  inputs {variance:9.4f}  ratio {variance / running:8.2f}")
        reestimate(model, group, loader, args.batches)
    after = evaluate(model, val, num_workers=0)
    stds = head_input_std(model, loader, args.batches)
    print(f"{'+'.join(args.groups)} statistics re-estimated on {args.batches} training batches: mAP50 "
          f"{after['mAP50']:.3f} mAP {after['mAP']:.3f}; head input std per level {', '.join(f'{v:.3f}' for v in stds)}")


if __name__ == "__main__":
    main()
