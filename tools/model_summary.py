"""Parameters (per layer group) and MACs of every model size, as the README's "Models" table shows them.

    python tools/model_summary.py                           # 80 classes, 320x320
    python tools/model_summary.py --img-size 416 --num-classes 1
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_lightweight import LAYER_GROUPS, MODEL_SIZES, count_macs, create_lightweight_model  # noqa: E402


def summary_table(img_size=320, num_classes=80):
    rows = ["| size | params | backbone | fpn | head | MACs @ {0} |".format(img_size),
            "|---|---|---|---|---|---|"]
    for size in MODEL_SIZES:
        model = create_lightweight_model(num_classes, size, img_size=img_size, imagenet_pretrained=False)
        counts = [sum(p.numel() for p in getattr(model, g).parameters()) for g in LAYER_GROUPS]
        rows.append(f"| {size} | {sum(counts) / 1e6:.2f} M | " + " | ".join(f"{c / 1e6:.2f} M" for c in counts)
                    + f" | {count_macs(model, img_size) / 1e9:.2f} G |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--num-classes", type=int, default=80)
    args = parser.parse_args(argv)
    print(summary_table(args.img_size, args.num_classes))
    print(f"\nMACs counted with torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls, "
          f"FLOPs / 2), {args.num_classes} classes, {args.img_size}x{args.img_size} input.")


if __name__ == "__main__":
    main()
