"""Write the synthetic data sets that the demo, the tests and the benchmarks use, anywhere.

    python tools/make_synthetic_data.py --out datasets/ --kind coco --num-train 600 --num-val 100
    python tools/make_synthetic_data.py --out datasets/ --kind whiteline --num-train 300 --num-val 80

``coco`` goes to ``OUT/synthetic_coco`` in COCO 2017's layout (train with
``pretrain_multi_class.py --coco-root OUT/synthetic_coco``); ``whiteline`` to ``OUT/whiteline`` in the
fine-tuning layout of the README. The output is a pure function of the arguments, and a second call with
the same arguments reuses what is there.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the toolkit's modules
from config import run_cli  # noqa: E402
from synthetic_data import DATASET_KINDS, make_dataset  # noqa: E402

FOLDERS = {"coco": "synthetic_coco", "whiteline": "whiteline"}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="datasets", help="parent folder (default: datasets)")
    parser.add_argument("--kind", choices=DATASET_KINDS, required=True)
    parser.add_argument("--num-train", type=int, default=None, help="default: 600 (coco) or 300 (whiteline)")
    parser.add_argument("--num-val", type=int, default=None, help="default: 100 (coco) or 80 (whiteline)")
    parser.add_argument("--width", type=int, help="image width (default: 256 coco, 320 whiteline)")
    parser.add_argument("--height", type=int, help="image height (default: 256 coco, 240 whiteline)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    num_train = args.num_train if args.num_train is not None else {"coco": 600, "whiteline": 300}[args.kind]
    num_val = args.num_val if args.num_val is not None else {"coco": 100, "whiteline": 80}[args.kind]
    if num_train < 1 or num_val < 1:
        raise ValueError(f"--num-train and --num-val must be >= 1, got {num_train} and {num_val}")
    root = os.path.join(args.out, FOLDERS[args.kind])
    started = time.perf_counter()
    paths, written = make_dataset(args.kind, root, num_train, num_val, args.seed, args.width, args.height)
    verb = f"wrote in {time.perf_counter() - started:.1f} s" if written else "reused (same arguments)"
    print(f"{args.kind}: {num_train} train + {num_val} val images {verb}: {root}")
    for key, path in paths.items():
        print(f"  {key:13s} {path}")
    return paths


def run(argv=None):
    """Command-line entry: bad input is one line on stderr and exit status 2."""
    return run_cli(main, argv, bad_input=(ValueError,))


if __name__ == "__main__":
    run()
