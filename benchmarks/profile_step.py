"""Where the time goes: torch.profiler tables of one training step and of predict() on the CPU.

    python benchmarks/profile_step.py                      # tiny, 320 px, batch 16 training, batch 1 predict
    python benchmarks/profile_step.py --size nano --batch-size 8 --row-limit 30 --threads 2
    python benchmarks/profile_step.py --skip-train --fused # predict() of the BatchNorm-fused model
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --phases --class-name kangaroo \
        --train-root datasets/kangaroo/images --train-ann kangaroo_split/train.json \
        --val-root datasets/kangaroo/images --val-ann kangaroo_split/val.json   # a real stage-3 step, by phase

Prints the top ops by self CPU time (the op's own time, without its children), so a slow kernel and a
slow Python-side helper are told apart; --group-by-shape splits ops by input shape.

--phases times the default fine-tuning's stage-3 step as finetune_single_class.py builds it (its config, data,
starting weights, freezing, optimizer, schedule, EMA) phase by phase with wall clocks: the loader's batch, forward,
the ATSS assignment, the rest of the loss, backward, gradient clipping, the optimizer, the schedule, the EMA; then
the end of an epoch: the evaluation of the EMA weights on val and the checkpoint writes. Any other flag after
--phases is finetune_single_class.py's.
"""
import argparse
import os
import sys
import tempfile
import time

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
    parser.add_argument("--phases", action="store_true",
                        help="wall time of each phase of a real fine-tuning stage-3 step and of an epoch's end; the "
                             "flags that follow are finetune_single_class.py's")
    parser.add_argument("--phase-steps", type=int, default=8, help="--phases: timed steps (after 2 warm-up ones)")
    return parser


def print_table(title, prof, args):
    print(f"\n=== {title} ===")
    averages = prof.key_averages(group_by_input_shape=args.group_by_shape)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.row_limit, max_name_column_width=60))


class PhaseClock:
    """Wall seconds per named phase, summed over steps."""

    def __init__(self):
        self.seconds, self.last = {}, time.perf_counter()

    def lap(self, phase):
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


class TimedAssigner:
    """Wraps the loss's assigner so the clock tells the ATSS assignment from the rest of the loss."""

    def __init__(self, assigner, clock):
        self.assigner, self.clock = assigner, clock

    def __call__(self, *args):
        self.clock.lap("loss (rest)")
        result = self.assigner(*args)
        self.clock.lap("assignment (ATSS)")
        return result


def stage3_trainer(finetune_argv):
    """The Trainer of a default fine-tuning, in its last stage, as finetune_single_class.train builds it (no run
    folder)."""
    import finetune_single_class as ft
    import trainer as training
    config, _ = ft.resolve_config(ft.typed_flags(finetune_argv + ["--no-progress"]))
    device = training.setup_process(config, ft.SCRIPT_FILE, [])
    loader, val_dataset, class_names, _ = ft.build_data(config)
    model, provenance = training.build_model(config, len(class_names))
    trainer = training.new_trainer(config, model, provenance, loader, val_dataset, None, device)
    plan = ft.stage_plan(config, set(provenance["pretrained"]))
    ft.begin_stage(trainer, plan[-1])
    return trainer, plan[-1]


def profile_phases(args, finetune_argv):
    """Per-step wall time of each phase of stage 3, and the end of an epoch, printed as a table."""
    import engine
    import evaluate as scoring
    from checkpoints import save_checkpoint, training_checkpoint
    trainer, stage = stage3_trainer(finetune_argv)
    state, config, clock = trainer.state, trainer.config, PhaseClock()
    trainer.criterion.assigner = TimedAssigner(trainer.criterion.assigner, clock)
    trainer.loader.sampler.set_epoch(stage["first_epoch"])
    batches, steps, images = iter(trainer.loader), 0, 0
    state.model.train()
    for step in range(2 + args.phase_steps):
        if step == 2:
            clock, steps, images = PhaseClock(), 0, 0
            trainer.criterion.assigner.clock = clock
        try:
            batch_images, targets = next(batches)
        except StopIteration:
            batches = iter(trainer.loader)
            batch_images, targets = next(batches)
        clock.lap("loader (decode, augment, collate)")
        outputs = trainer.train_model(batch_images)
        clock.lap("forward")
        loss = trainer.criterion(outputs, targets)["loss"]
        clock.lap("loss (rest)")
        loss.detach().item()  # the step's sync, as train_one_epoch's logging
        engine.backward(state, loss)
        clock.lap("backward")
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), config["clip_grad_norm"])
        clock.lap("gradient clipping")
        state.optimizer.step()
        clock.lap("optimizer (AdamW)")
        state.scheduler.step()
        clock.lap("schedule")
        state.ema.update_parameters(state.model)
        clock.lap("EMA")
        steps, images = steps + 1, images + len(batch_images)
    per_epoch = len(trainer.loader)
    rows = [(phase, seconds / steps) for phase, seconds in clock.seconds.items()]
    step_seconds = sum(seconds for _, seconds in rows)
    started = time.perf_counter()
    scoring.evaluate(state.ema.module, trainer.val_dataset, conf_threshold=config["report_threshold"],
                     num_workers=config["workers"])
    evaluation = time.perf_counter() - started
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(training_checkpoint(state, ["x"], config, best_map=0.0, summary={}, epoch=1),
                        os.path.join(folder, "last_model.pth"))
    saving = time.perf_counter() - started
    epoch = step_seconds * per_epoch + evaluation + saving
    print(f"stage-3 step, batch {config['batch_size']}, {config['img_size']} px, {torch.get_num_threads()} thread(s), "
          f"workers {config['workers']}: {step_seconds * 1000:.0f} ms a step ({images / (step_seconds * steps):.2f} "
          f"img/s), {steps} steps after 2 warm-up ones\n")
    print(f"| phase | ms a step | share of an epoch ({per_epoch} steps, one evaluation, one checkpoint) |")
    print("|---|---|---|")
    for phase, seconds in rows:
        print(f"| {phase} | {seconds * 1000:.1f} | {seconds * per_epoch / epoch:.1%} |")
    print(f"| evaluation of the EMA on val ({len(trainer.val_dataset)} images), once an epoch | "
          f"{evaluation * 1000:.0f} (whole) | {evaluation / epoch:.1%} |")
    print(f"| training checkpoint write, once an epoch | {saving * 1000:.0f} (whole) | {saving / epoch:.1%} |")
    print(f"\nan epoch: {epoch:.1f} s")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--phases" in argv:
        cut = argv.index("--phases")
        args = get_args_parser().parse_args(argv[:cut + 1])
        if args.threads:
            torch.set_num_threads(args.threads)
        return profile_phases(args, argv[cut + 1:])
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
