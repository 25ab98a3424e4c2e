"""Where the time goes: torch.profiler tables of one training step and of predict() on the CPU.

    python benchmarks/profile_step.py                      # tiny, 320 px, batch 16 training, batch 1 predict
    python benchmarks/profile_step.py --size nano --batch-size 8 --row-limit 30 --threads 2
    python benchmarks/profile_step.py --skip-train --fused # predict() of the BatchNorm-fused model

Prints the top ops by self CPU time (the op's own time, without its children), so a slow kernel and a
slow Python-side helper are told apart; --group-by-shape splits ops by input shape.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from losses import DetectionLoss  # noqa: E402
from model_lightweight import MODEL_SIZES, create_lightweight_model  # noqa: E402
from speed import SCORE_THRESHOLD, camera_frame, random_targets  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def training_step(model, criterion, optimizer, images, targets):
    with record_function("forward"):
        outputs = model(images)
    with record_function("loss"):
        loss = criterion(outputs, targets)["loss"]
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer_step"):
        optimizer.step()


def profile_fn(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            fn()
    return prof


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES), help="model size")
    parser.add_argument("--img-size", type=int, default=320, help="input side in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--num-classes", type=int, default=30, help="foreground classes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled warm-up steps")
    parser.add_argument("--row-limit", type=int, default=25, help="rows of each table")
    parser.add_argument("--fused", action="store_true", help="profile predict() of model.fuse()")
    parser.add_argument("--group-by-shape", action="store_true", help="one row per op and input shape")
    parser.add_argument("--skip-train", action="store_true", help="profile predict() only")
    parser.add_argument("--skip-predict", action="store_true", help="profile the training step only")
    return parser


def print_table(title, prof, args):
    print(f"\n=== {title} ===")
    averages = prof.key_averages(group_by_input_shape=args.group_by_shape)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.row_limit, max_name_column_width=60))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = create_lightweight_model(args.num_classes, args.size, img_size=args.img_size)
    print(f"{args.size} @ {args.img_size}px, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_train:
        model.train()
        criterion = DetectionLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
        targets = random_targets(args.batch_size, args.img_size, args.num_classes, generator)
        prof = profile_fn(lambda: training_step(model, criterion, optimizer, images, targets),
                          args.warmup, args.steps)
        print_table(f"training step, batch {args.batch_size} ({args.steps} steps)", prof, args)
    if not args.skip_predict:
        model.eval()
        if args.fused:
            model.fuse()
        frame = camera_frame(args.img_size, generator)
        with torch.no_grad():
            prof = profile_fn(lambda: model.predict(frame, conf_threshold=SCORE_THRESHOLD), args.warmup * 5,
                              args.steps * 10)
        print_table(f"predict(), batch 1{', fused' if args.fused else ''} ({args.steps * 10} calls)", prof, args)


if __name__ == "__main__":
    main()
