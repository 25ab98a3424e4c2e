"""The fixed split of the kangaroo photos that the transfer study and the README's figures use: every fifth image by
sorted name is validation, the rest training, written as two COCO JSONs (the images stay where they are).

    python benchmarks/kangaroo_split.py --voc datasets/kangaroo/annots --out kangaroo_split
    # -> kangaroo_split/train.json (132 images), kangaroo_split/val.json (32 images); images: datasets/kangaroo/images

A fixed rule rather than finetune_single_class.py's --val-fraction hash, so that every figure in the README is
measured on the same 32 photos. The boxes come from annotations.read_voc (VOC's 1-based corners to COCO's
0-based pixels).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from annotations import read_voc, subset  # noqa: E402
from config import write_json_atomic  # noqa: E402

EVERY = 5  # every fifth image by sorted name is validation


def split(voc_folder, every=EVERY):
    """(train dict, val dict, image root) of a Pascal VOC folder, every `every`-th sorted image held out."""
    data, image_root = read_voc(voc_folder)
    names = sorted(image["file_name"] for image in data["images"])
    val = set(names[every - 1::every])
    return subset(data, set(names) - val), subset(data, val), image_root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc", required=True, help="the kangaroo set's folder of Pascal VOC XML files (annots/)")
    parser.add_argument("--out", required=True, help="folder for train.json and val.json")
    args = parser.parse_args(argv)
    train, val, image_root = split(args.voc)
    os.makedirs(args.out, exist_ok=True)
    for name, data in (("train", train), ("val", val)):
        write_json_atomic(data, os.path.join(args.out, f"{name}.json"), indent=None)
        print(f"{name}: {len(data['images'])} images, {len(data['annotations'])} boxes -> "
              f"{os.path.join(args.out, name + '.json')} (images under {image_root})")


if __name__ == "__main__":
    main()
