"""Decode + letterbox time of a large JPEG: full decode against the JPEG decoder's reduced decoding (issue #27).

    python benchmarks/decode_speed.py                          # a 4000x3000 synthetic road photo, 320 px input
    python benchmarks/decode_speed.py --photo IMG_1234.jpg --img-size 640

Round-robin in one process (each repeat runs every decoder once, so a busy machine slows them alike) and the
median per decoder: PIL in full (dataset_coco.load_image), PIL reduced (dataset_coco.decode_image with
min_side=img_size, Image.draft), and torchvision.io.decode_jpeg (libjpeg-turbo, full size: it has no reduced
decoding on the CPU). Each is followed by inference.letterbox, as predict() does.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset_coco import decode_image, load_image  # noqa: E402
from inference import letterbox  # noqa: E402
from synthetic_data import render_whiteline  # noqa: E402


def synthetic_photo(path, width, height):
    """A rendered road scene saved as a quality-90 JPEG, the size of a phone photo."""
    image, _ = render_whiteline(np.random.default_rng(0), width, height)
    image.save(path, quality=90)


def decoders(path, img_size):
    def torchvision_full():
        data = torchvision.io.read_file(path)
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True)
    return {"PIL full": lambda: load_image(path), "PIL reduced (draft)": lambda: decode_image(path, img_size).image,
            "torchvision decode_jpeg full": torchvision_full}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", help="a JPEG to time (default: a synthetic 4000x3000 one)")
    parser.add_argument("--img-size", type=int, default=320, help="network input side")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = args.photo or os.path.join(folder, "photo.jpg")
        if not args.photo:
            synthetic_photo(path, 4000, 3000)
        fns = decoders(path, args.img_size)
        times = {name: [] for name in fns}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for name, fn in fns.items():
                start = time.perf_counter()
                letterbox(fn(), args.img_size, rect=True)
                if round_:
                    times[name].append(1000 * (time.perf_counter() - start))
        with Image.open(path) as img:
            size = img.size
    print(f"{size[0]}x{size[1]} JPEG, letterbox to {args.img_size}, {args.threads} thread(s), median of "
          f"{args.repeats}:")
    for name, values in times.items():
        print(f"  {name:<30} {statistics.median(values):7.1f} ms")
    return {name: statistics.median(values) for name, values in times.items()}


if __name__ == "__main__":
    main()
