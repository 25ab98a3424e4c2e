"""How long the default fine-tuning should be: the same command at several lengths and seeds, with each run's
CPU time, side by side on the machine's cores.

    python benchmarks/schedule_study.py --epochs 12 16 20 --seeds 0 1 2 --jobs 2 --out schedule_study -- \\
        --class-name kangaroo --train-root datasets/kangaroo/images --train-ann kangaroo_split/train.json \\
        --val-root datasets/kangaroo/images --val-ann kangaroo_split/val.json

Every run is `finetune_single_class.py FLAGS --epochs E --seed S --workers 0 --no-progress` with one torch
thread (OMP_NUM_THREADS=1), --jobs of them at a time, so each run's user + system time is its CPU time
(os.wait4's rusage of that child alone). --epochs E shares E epochs among the three stages in the config's
proportions, as a user's --epochs does. The flags after `--` are finetune_single_class.py's.

Writes to --out: runs/ (the runs), runs.csv (one row per run: epochs, seed, final and best mAP / mAP50, CPU
seconds, wall seconds, peak RSS) and schedule_study.md (mean and std over seeds per length, then per seed). The
same command again reuses every finished run.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("epochs", "seed", "final_mAP", "final_mAP50", "best_mAP", "best_mAP50", "best_epoch", "cpu_s", "wall_s",
          "max_rss_kib")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", nargs="+", type=int, default=[12, 16, 20], help="total epochs of each length")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (at most the cores)")
    parser.add_argument("--out", default="schedule_study", help="output folder")
    return parser


def run_name(epochs, seed):
    return f"e{epochs}_s{seed}"


def finished(out, epochs, seed):
    """The row of a finished run, read back from runs.csv, or None."""
    path = os.path.join(out, "runs.csv")
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["epochs"]) == epochs and int(row["seed"]) == seed:
                return row
    return None


def start(out, epochs, seed, flags):
    command = [sys.executable, os.path.join(ROOT, "finetune_single_class.py"), *flags, "--epochs", str(epochs),
               "--seed", str(seed), "--workers", "0", "--no-progress", "--output-dir", os.path.join(out, "runs"),
               "--name", run_name(epochs, seed)]
    log = open(os.path.join(out, f"{run_name(epochs, seed)}.log"), "w")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, log, time.perf_counter()


def record(out, epochs, seed, usage, wall):
    """The run's row: final and best scores from its metrics.csv, its CPU time and peak memory."""
    run_dir = os.path.join(out, "runs", run_name(epochs, seed))
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("mAP") not in (None, "")]
    best = max(rows, key=lambda row: float(row["mAP"]))
    row = {"epochs": epochs, "seed": seed, "final_mAP": rows[-1]["mAP"], "final_mAP50": rows[-1]["mAP50"],
           "best_mAP": best["mAP"], "best_mAP50": best["mAP50"], "best_epoch": best["epoch"],
           "cpu_s": f"{usage.ru_utime + usage.ru_stime:.1f}", "wall_s": f"{wall:.1f}",
           "max_rss_kib": usage.ru_maxrss}
    path = os.path.join(out, "runs.csv")
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    return row


def run_all(args, flags):
    pending = [(e, s) for e in args.epochs for s in args.seeds if finished(args.out, e, s) is None]
    running = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            epochs, seed = pending.pop(0)
            process, log, began = start(args.out, epochs, seed, flags)
            running[process.pid] = (process, log, began, epochs, seed)
            print(f"started {run_name(epochs, seed)}", flush=True)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        process, log, began, epochs, seed = running.pop(pid)
        log.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{run_name(epochs, seed)} failed; see {args.out}/{run_name(epochs, seed)}.log")
        row = record(args.out, epochs, seed, usage, time.perf_counter() - began)
        print(f"{run_name(epochs, seed)}: final mAP {float(row['final_mAP']):.3f}, {float(row['cpu_s']) / 60:.1f} "
              f"CPU-minutes", flush=True)


def mean_std(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def write_report(args, flags):
    with open(os.path.join(args.out, "runs.csv"), newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["epochs"]) in args.epochs
                and int(row["seed"]) in args.seeds]
    lines = ["# Schedule length", "",
             f"`python benchmarks/schedule_study.py --epochs {' '.join(map(str, args.epochs))} --seeds "
             f"{' '.join(map(str, args.seeds))} --jobs {args.jobs} --out {args.out} -- {' '.join(flags)}`", "",
             f"One torch thread a run, {args.jobs} run(s) at a time; CPU time is the run's own user + system time. "
             f"Mean ± std over seeds {', '.join(map(str, args.seeds))}.", "",
             "| epochs | final mAP | final mAP50 | best mAP | mAP50 at best mAP | CPU-minutes | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for epochs in args.epochs:
        mine = [row for row in rows if int(row["epochs"]) == epochs]
        if not mine:
            continue
        column = {key: [float(row[key]) for row in mine] for key in FIELDS}
        lines.append(f"| {epochs} | {mean_std(column['final_mAP'])} | {mean_std(column['final_mAP50'])} | "
                     f"{mean_std(column['best_mAP'])} | {mean_std(column['best_mAP50'])} | "
                     f"{statistics.mean(column['cpu_s']) / 60:.1f} | "
                     f"{statistics.mean(column['max_rss_kib']) / 1024:.0f} |")
    lines += ["", "| epochs | seed | final mAP | final mAP50 | best mAP (epoch) | CPU-minutes | wall |", "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: (int(row["epochs"]), int(row["seed"]))):
        lines.append(f"| {row['epochs']} | {row['seed']} | {float(row['final_mAP']):.3f} | "
                     f"{float(row['final_mAP50']):.3f} | {float(row['best_mAP']):.3f} ({row['best_epoch']}) | "
                     f"{float(row['cpu_s']) / 60:.1f} | {float(row['wall_s']) / 60:.1f} min |")
    path = os.path.join(args.out, "schedule_study.md")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, flags = get_args_parser().parse_args(argv[:cut]), argv[cut + 1:]
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    with open(os.path.join(args.out, "flags.json"), "w") as handle:
        json.dump(flags, handle)
    run_all(args, flags)
    return write_report(args, flags)


if __name__ == "__main__":
    main()
