"""Time to the first detection: `python predict.py --source one_photo.jpg` from a cold start (issue #27 item 4).

    python benchmarks/cold_start.py --photo datasets/kangaroo/images/00001.jpg
    python benchmarks/cold_start.py --photo photo.jpg --repos . ../before   # two checkouts, round-robin

Every figure is the wall time of a fresh Python process, the median over --rounds rounds; each round runs every
command of every checkout once, so a busy machine slows them alike:
  interpreter  `python -c pass`
  imports      `python -c "import predict"` minus the interpreter
  model load   `python -c "import predict, ort_detector; ort_detector.load_detector(CHECKPOINT)"` minus the imports
  the work     `python predict.py --checkpoint CHECKPOINT --source PHOTO` (decode, predict, draw, save) minus the
               model load
  total        that predict.py command
A checkout's predict.py writes into a fresh folder each round (--exist-ok keeps one folder). The page cache is warm
after the first round (the median hides the first), as it is for a user's second command.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTER = os.path.join("weights", "lite0_coco_starter.pth")


def commands(checkpoint, photo, save_dir):
    """{phase: argv} of the cumulative commands, run in a checkout."""
    return {"interpreter": [sys.executable, "-c", "pass"],
            "imports": [sys.executable, "-c", "import predict"],
            "model load": [sys.executable, "-c", "import sys, predict, ort_detector; "
                                                 "ort_detector.load_detector(sys.argv[1])", checkpoint],
            "total": [sys.executable, "predict.py", "--checkpoint", checkpoint, "--source", photo, "--save-dir",
                      save_dir, "--exist-ok", "--no-progress"]}


def wall(argv, cwd, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(repos, photo, rounds, threads):
    """{repo: {phase: median cumulative seconds}}."""
    times = {repo: {} for repo in repos}
    with tempfile.TemporaryDirectory(prefix="cold_start_") as work:
        for _ in range(rounds):
            for repo in repos:
                checkpoint = os.path.abspath(os.path.join(repo, STARTER))
                for phase, argv in commands(checkpoint, os.path.abspath(photo), os.path.join(work, "out")).items():
                    times[repo].setdefault(phase, []).append(wall(argv, repo, threads))
    return {repo: {phase: statistics.median(values) for phase, values in phases.items()}
            for repo, phases in times.items()}


def table(medians):
    lines = ["| checkout | interpreter s | imports s | model load s | the work s | total s | total / first |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    first = None
    for repo, m in medians.items():
        first = first or m["total"]
        parts = (m["interpreter"], m["imports"] - m["interpreter"], m["model load"] - m["imports"],
                 m["total"] - m["model load"], m["total"])
        lines.append(f"| {repo} | " + " | ".join(f"{value:.2f}" for value in parts) + f" | {m['total'] / first:.2f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", required=True, help="the photo to predict on")
    parser.add_argument("--repos", nargs="+", default=[ROOT], help="checkouts to compare (each with weights/)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    medians = measure(args.repos, args.photo, args.rounds, args.threads)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
             f"{args.threads} threads; Python {platform.python_version()}.", "",
             f"`python benchmarks/cold_start.py --photo {args.photo} --repos {' '.join(args.repos)} "
             f"--rounds {args.rounds} --threads {args.threads}`", "", *table(medians)]
    print("\n".join(lines))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    return medians


if __name__ == "__main__":
    main()
