"""The toolkit's point in one command, on synthetic data: fine-tune the shipped starter, compare with scratch.

    python demo.py                      # minutes on 2 CPU cores (README: "The demo"); writes demo_results/
    python demo.py --out my_demo --data datasets --workers 2

1. writes a synthetic single-class data set under --data (reused when present): "whiteline" road scenes in
   the fine-tuning layout (tools/make_synthetic_data.py);
2. fine-tunes the shipped lite0 starter (ImageNet backbone, then COCO classes; --init starter, the default a
   user gets) on whiteline with the three-stage recipe and today's fine-tuning defaults;
3. fine-tunes lite0 from random init with the same schedule (--init random), the honest baseline;
4. evaluates both best models on the whiteline val set and writes demo_results/: predictions.png,
   transfer_curve.png and summary.md.
The training script runs through its public interfaces (the scratch arm as a subprocess, the pretrained arm
through main(argv)), so the demo also checks it end to end. The two arms run side by side on half the CPUs
each: on a model this small two single-thread processes do far more than one with two threads.
"""
import argparse
import csv
import glob
import json
import logging
import os
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import config as cfg
import finetune_single_class
from dataset_coco import CocoDetectionDataset, load_image, usable_cpus
from evaluate import evaluate
from model_lightweight import load_model
from synthetic_data import make_dataset

logger = logging.getLogger("demo")


class DemoStepFailed(cfg.TrainingFailed):
    """A training script run as a subprocess failed (exit status 1); the message says which and where its output is."""

# The demo's schedule, written to OUT/demo_config.json and passed to both arms with --config: today's
# fine-tuning defaults (rates, frozen early backbone, EMA, augmentation) on a shorter schedule with smaller
# inputs and fewer images, so the whole demo takes minutes on 2 CPU cores.
DEMO_CONFIG = {
    "finetuning": {"model_size": "lite0", "img_size": 256, "batch_size": 8, "stage1_epochs": 1, "stage2_epochs": 1,
                   "stage3_epochs": 4, "stage_warmup_iters": 20},
}
DATA_SIZES = {"whiteline": (200, 80)}
STAGE_NAMES = {1: "heads", 2: "heads+fpn", 3: "all"}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_results", help="where the figures, summary and runs go")
    parser.add_argument("--data", default="datasets", help="where the synthetic data sets are written or found")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: per CPU count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply data set sizes and epochs (e.g. 0.1 for a smoke run)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return parser


def scaled_plan(scale):
    """DEMO_CONFIG and DATA_SIZES with data set sizes and epochs multiplied by ``scale`` (at least 1 each)."""
    def times(value):
        return max(1, round(value * scale))
    config = json.loads(json.dumps(DEMO_CONFIG))
    for stage in (1, 2, 3):
        config["finetuning"][f"stage{stage}_epochs"] = times(config["finetuning"][f"stage{stage}_epochs"])
    sizes = {kind: (max(4, round(n * scale)), max(2, round(m * scale))) for kind, (n, m) in DATA_SIZES.items()}
    return config, sizes


def common_flags(args, workers=True):
    flags = ["--seed", str(args.seed)]
    if workers and args.workers is not None:
        flags += ["--workers", str(args.workers)]
    return flags + ([] if args.progress else ["--no-progress"])


def parallel_share(workers=None):
    """(torch threads, loader workers) for each of two runs side by side: half the CPUs each.

    On 2 CPUs that is one thread and in-process loading per run: two single-thread runs get far more
    from 2 cores than one run with 2 threads, whose intra-op parallelism on a small model is poor.
    """
    threads = max(1, usable_cpus() // 2)
    return threads, (min(2, threads - 1) if workers is None else workers)


def total_epochs(config):
    return sum(config["finetuning"][f"stage{stage}_epochs"] for stage in (1, 2, 3))


def start_script(script, argv, threads, log_path):
    """Run one of the training scripts by its command line in a subprocess with ``threads`` torch threads,
    its output going to ``log_path``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    with open(log_path, "w") as log:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, path] + argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_dirs(output_dir):
    return set(glob.glob(os.path.join(output_dir, "*", "")))


def wait_for_finetune(process, output_dir, earlier_runs, log_path, epochs, progress=True):
    """Wait for a fine-tuning subprocess writing a new run under ``output_dir`` (not one of
    ``earlier_runs``), showing its epochs; return the new run's summary.json.

    Raises:
        DemoStepFailed: the run failed; the message names its log.
    """
    bar = tqdm(total=epochs, desc="scratch epochs", disable=not progress)
    while process.poll() is None:
        time.sleep(2)
        for run in run_dirs(output_dir) - earlier_runs:
            if os.path.isfile(os.path.join(run, "metrics.csv")):
                with open(os.path.join(run, "metrics.csv")) as f:
                    bar.update(max(0, sum(1 for _ in f) - 1 - bar.n))
    bar.close()
    new = [run for run in run_dirs(output_dir) - earlier_runs if os.path.isfile(os.path.join(run, "summary.json"))]
    if process.returncode != 0 or len(new) != 1:
        raise DemoStepFailed(f"the scratch fine-tuning failed (exit code {process.returncode}); see {log_path}")
    with open(os.path.join(new[0], "summary.json")) as f:
        return json.load(f)


def read_curve(metrics_csv):
    """(epochs, mAP50s, stages) of a fine-tuning run's metrics.csv."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    return [int(r["epoch"]) for r in rows], [float(r["mAP50"]) for r in rows], [int(r["stage"]) for r in rows]


def transfer_comparison(curves):
    """What the two curves say: the pretrained lead at the last epoch and the first epoch at which the
    pretrained run reaches scratch's final mAP50 (the issue's two ways of judging transfer)."""
    epochs, pretrained, _ = curves["pretrained"]
    _, scratch, _ = curves["scratch"]
    reached = next((epoch for epoch, value in zip(epochs, pretrained) if value >= scratch[-1]), None)
    return {"epochs": epochs[-1], "final_lead": pretrained[-1] - scratch[-1], "scratch_final": scratch[-1],
            "reaches_scratch_final_at": reached}


def plot_transfer_curve(curves, path):
    """mAP50 per epoch for each run, stage boundaries dashed, scratch's final mAP50 dotted."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, (epochs, map50, _) in curves.items():
        ax.plot(epochs, map50, marker="o", markersize=3, label=label)
    epochs, _, stages = next(iter(curves.values()))
    for previous, (epoch, stage) in zip(stages, list(zip(epochs, stages))[1:]):
        if stage != previous:
            ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=0.8)
    for row, stage in enumerate(sorted(set(stages))):  # staggered, so one-epoch stages stay readable
        first = epochs[stages.index(stage)]
        ax.text(first - 0.4, 1.03 - 0.06 * row, f"stage {stage}: {STAGE_NAMES[stage]}", fontsize=8, color="grey")
    if "pretrained" in curves and "scratch" in curves:
        comparison = transfer_comparison(curves)
        ax.axhline(comparison["scratch_final"], color="grey", linestyle=":", linewidth=0.8)
        if comparison["reaches_scratch_final_at"]:
            ax.annotate(f"pretrained reaches scratch's final\nmAP50 at epoch {comparison['reaches_scratch_final_at']}",
                        (comparison["reaches_scratch_final_at"], comparison["scratch_final"]),
                        xytext=(70, 80), textcoords="offset points", fontsize=8,
                        arrowprops={"arrowstyle": "->", "color": "grey"})
    ax.set(xlabel="epoch", ylabel="val mAP@0.5", ylim=(0, 1.08), title="whiteline: pretrained vs scratch, same schedule")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_predictions(model, dataset, path, num_images=8, conf_threshold=None):
    """A grid of val images: ground truth in green, the model's boxes (with scores) in red, at the model's
    calibrated threshold unless `conf_threshold` says otherwise."""
    from torchvision.utils import draw_bounding_boxes, make_grid, save_image
    tiles = []
    for index in range(min(num_images, len(dataset))):
        image = load_image(dataset.image_paths[index])
        truth, _ = dataset.get_annotations(index)
        truth = torch.as_tensor(truth, dtype=torch.float32)
        detections = model.predict(image, conf_threshold=conf_threshold)[0]
        tile = draw_bounding_boxes(image, truth, colors="lime", width=1)
        labels = [f"{s:.2f}" for s in detections["scores"].tolist()]
        tiles.append(draw_bounding_boxes(tile, detections["boxes"], labels=labels, colors="red", width=2))
    save_image(make_grid(tiles, nrow=4, padding=4).float() / 255, path)


def cpu_minutes():
    """User + system CPU time of this process and its finished children, in minutes: on a shared machine
    the wall time says little about what the demo itself costs."""
    try:
        import resource
    except ImportError:  # Windows: this process only
        return time.process_time() / 60
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage) / 60


def write_summary(path, results, wall_times, total_time, cpu_time):
    lines = ["# Demo results", "", f"Whole demo: {total_time / 60:.1f} min wall, {cpu_time:.1f} CPU-minutes, on "
             f"{os.cpu_count()} CPU cores.", "",
             "| run | mAP | mAP50 | precision | recall | F1 | best epoch | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        m = result["metrics"]
        lines.append(f"| {name} | {m['mAP']:.3f} | {m['mAP50']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                     f"{m['f1']:.3f} | {result['best_epoch']} | {wall_times[name]:.0f} s |")
    comparison = transfer_comparison({name: result["curve"] for name, result in results.items()})
    reached = comparison["reaches_scratch_final_at"]
    lines += ["", f"At the last epoch ({comparison['epochs']}) the pretrained run leads by "
              f"{100 * comparison['final_lead']:.1f} mAP50 points; it reaches scratch's final mAP50 "
              f"({comparison['scratch_final']:.3f}) " + (f"at epoch {reached}." if reached else "at no epoch.")]
    lines += ["", "pretrained: lite0 from the shipped starter (`--init starter`); scratch: lite0 from random weights "
              "(`--init random`).", "", "Checkpoints:", ""]
    lines += [f"- {name}: `{result['best_model']}` (best), `{result['last_model']}` (last)"
              for name, result in results.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    started = time.perf_counter()
    config, sizes = scaled_plan(args.scale)
    os.makedirs(args.out, exist_ok=True)
    config_path = os.path.join(args.out, "demo_config.json")
    cfg.write_json_atomic(config, config_path)
    print(f"demo: synthetic data -> fine-tuning (the shipped starter and scratch) -> {args.out}/\n"
          f"      minutes on 2 CPU cores, longer on fewer; schedule in {config_path}", flush=True)

    print("\n== 1/4 synthetic data set", flush=True)
    road, _ = make_dataset("whiteline", os.path.join(args.data, "whiteline"), *sizes["whiteline"], seed=args.seed)

    wall = {}
    data_flags = ["--class-name", "whiteline", "--train-root", road["train_images"], "--train-ann", road["train_ann"],
                  "--val-root", road["val_images"], "--val-ann", road["val_ann"], "--config", config_path]
    # the starter detector: backbone, FPN and head initialise the fine-tuning (all but the class output)
    pretrained_flags = ["--init", "starter"]
    threads, workers = parallel_share(args.workers)
    print(f"\n== 2/4 fine-tuning on whiteline, both arms side by side ({threads} torch thread(s) and {workers} "
          f"loader worker(s) each): scratch in a subprocess, pretrained here", flush=True)
    tic = time.perf_counter()
    scratch_dir = os.path.join(args.out, "finetune_scratch")
    scratch_log = os.path.join(args.out, "finetune_scratch.log")
    earlier_runs = run_dirs(scratch_dir)
    scratch = start_script("finetune_single_class.py", data_flags + ["--init", "random", "--output-dir", scratch_dir,
                           "--workers", str(workers), "--no-progress"] + common_flags(args, workers=False),
                           threads, scratch_log)
    summaries = {}
    try:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            summaries["pretrained"] = finetune_single_class.main(
                data_flags + pretrained_flags + ["--output-dir", os.path.join(args.out, "finetune_pretrained"),
                                                 "--workers", str(workers)] + common_flags(args, workers=False))
        finally:
            torch.set_num_threads(previous_threads)
        wall["pretrained"] = time.perf_counter() - tic
        print(f"\n== 3/4 fine-tuning on whiteline: scratch (random init, same schedule; log {scratch_log})",
              flush=True)
        summaries["scratch"] = wait_for_finetune(scratch, scratch_dir, earlier_runs, scratch_log, total_epochs(config),
                                                 args.progress)
        wall["scratch"] = time.perf_counter() - tic
    finally:
        if scratch.poll() is None:  # interrupted or failed here: do not leave the other arm running
            scratch.terminate()
            scratch.wait()

    print("\n== 4/4 evaluation on the whiteline val set", flush=True)
    val = CocoDetectionDataset(road["val_ann"], road["val_images"])
    results = {}
    for name, summary in summaries.items():
        model = load_model(summary["best_model"])
        results[name] = {"metrics": evaluate(model, val, torch.device("cpu")), "best_epoch": summary["best_epoch"],
                         "best_model": summary["best_model"], "last_model": summary["last_model"],
                         "curve": read_curve(os.path.join(summary["run_dir"], "metrics.csv"))}
    draw_predictions(load_model(summaries["pretrained"]["best_model"]), val, os.path.join(args.out, "predictions.png"))
    plot_transfer_curve({name: r["curve"] for name, r in results.items()}, os.path.join(args.out, "transfer_curve.png"))
    total = time.perf_counter() - started
    cpu_time = cpu_minutes()
    write_summary(os.path.join(args.out, "summary.md"), results, wall, total, cpu_time)
    for name, r in results.items():
        print(f"{name:10s} mAP50 {r['metrics']['mAP50']:.3f}  mAP {r['metrics']['mAP']:.3f}  F1 {r['metrics']['f1']:.3f}")
    print(f"demo finished in {total / 60:.1f} min ({cpu_time:.1f} CPU-minutes); see {args.out}/summary.md, "
          "predictions.png, transfer_curve.png")
    return {"results": results, "wall_times": wall, "total_time": total, "cpu_minutes": cpu_time}


def run(argv=None):
    """Command-line entry: the training scripts' exit policy (a failed step is one line, exit 1)."""
    cfg.run_cli(main, argv)


if __name__ == "__main__":
    run()
