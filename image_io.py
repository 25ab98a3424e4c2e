"""Reading a photo as it is displayed: EXIF orientation, any PIL mode to 8-bit RGB, truncated JPEGs, and a large
JPEG decoded at the size its consumer needs (libjpeg's DCT scaling).

predict.py's cold start imports this module, not dataset_coco: it needs neither torchvision nor pycocotools
(issue #27), so `python predict.py --source photo.jpg` loads torch, PIL and numpy only.
"""
import io
import logging
import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from annotations import EXIF_ORIENTATION

logger = logging.getLogger(__name__)

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"  # start- and end-of-image markers


def _to_rgb(img):
    """Any PIL mode -> 8-bit RGB; alpha is composited on white, as image viewers show it."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit PNGs open as I;16 (or I in older Pillow); convert("L") would clip at 255 instead of scaling.
        pixels = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(pixels.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("LA", "PA", "RGBA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # L, 1, P, CMYK, YCbCr


class DecodedImage(NamedTuple):
    """What decode_image returns: the pixels and how they map to the photo's full displayed frame, where a decoded
    point p is the full-frame (p - origin) * scale."""
    image: torch.Tensor  # uint8 (3, h, w)
    scale: int  # full-frame pixels per decoded pixel: 1, or 2, 4, 8 for a JPEG decoded reduced
    origin: tuple  # (x, y): where the full frame's (0, 0) lies in decoded pixels; (0, 0) but for mirrored axes
    size: tuple  # (H, W) of the full image as displayed (EXIF orientation applied)


# libjpeg pads a scaled image at the stored frame's right and bottom, by (pad_x, pad_y) decoded pixels (a fraction of
# one); an EXIF orientation that mirrors a stored axis brings that padding to the displayed left or top, where it
# moves the origin. Orientations as ImageOps.exif_transpose turns them (5-8 swap the axes).
DECODED_ORIGIN = {2: lambda pad_x, pad_y: (pad_x, 0.0), 3: lambda pad_x, pad_y: (pad_x, pad_y),
                  4: lambda pad_x, pad_y: (0.0, pad_y), 6: lambda pad_x, pad_y: (pad_y, 0.0),
                  7: lambda pad_x, pad_y: (pad_y, pad_x), 8: lambda pad_x, pad_y: (0.0, pad_x)}


def decode_image(path, min_side=None):
    """Read an image as it is displayed, as 8-bit RGB, reduced when the consumer needs far fewer pixels.

    EXIF orientation is applied (``ImageOps.exif_transpose``), so pixels match annotations made in the
    displayed frame. Grayscale, palette, alpha, CMYK and 16-bit (``I;16``/``I``, scaled by ``>> 8``) images
    are converted to RGB.

    With ``min_side``, a JPEG whose longest side is at least twice ``min_side`` is decoded at 1/2, 1/4 or 1/8 of
    its size by libjpeg's DCT scaling (``Image.draft``; issue #27: a 12-MP photo decodes several times faster), the
    smallest scale whose longest side is still at least ``min_side``. A full-frame point p is the decoded
    p / scale + origin: libjpeg rounds the decoded size up and pads past W / scale (on the displayed left or top
    where EXIF mirrors that axis), so ``size / image.shape`` is not the scale. Other formats and smaller JPEGs
    are decoded in full.

    A JPEG whose last bytes are missing (an interrupted download or copy; Pillow refuses it as "truncated") is
    decoded as far as it goes, with a warning: the end-of-image marker is appended and libjpeg fills the few
    missing rows, as image viewers show it. Skipping it would drop its boxes from training and count them as
    misses in evaluation.

    Returns:
        DecodedImage(image uint8 (3, h, w), scale int, origin (x, y) decoded pixels, size (H, W) of the full
        displayed image).
    """
    try:
        with Image.open(path) as img:
            return _decode(img, min_side)
    except OSError as error:
        if "truncated" not in str(error):
            raise
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(JPEG_START):
            raise
        logger.warning("%s is a truncated JPEG (%s); decoded what it holds", path, error)
        with Image.open(io.BytesIO(data + JPEG_END)) as img:
            return _decode(img, min_side)


def load_image(path):
    """The full image as displayed, uint8 (3, H, W): ``decode_image`` without reduction."""
    return decode_image(path).image


def _decode(img, min_side):
    stored_width, stored_height = img.size  # before any reduction or EXIF turn
    scale = _draft(img, min_side) if min_side else 1
    pad = (img.size[0] - stored_width / scale, img.size[1] - stored_height / scale)  # exact: multiples of 1/8
    img.load()
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)  # read once loaded, as exif_transpose reads it (PNG eXIf)
    # exif_transpose and convert("RGB") copy the photo even when they change nothing (benchmarks/results/decode.md).
    displayed = ImageOps.exif_transpose(img) if orientation in range(2, 9) else img
    origin = DECODED_ORIGIN[orientation](*pad) if orientation in DECODED_ORIGIN else (0.0, 0.0)
    turned = orientation in (5, 6, 7, 8)  # a quarter turn swaps the axes (not told by sizes: 803 and 801 at 1/8)
    size = (stored_width, stored_height) if turned else (stored_height, stored_width)
    return DecodedImage(pil_to_tensor(_to_rgb(displayed)), scale, origin, size)


def _draft(img, min_side):
    """Ask the JPEG decoder for the smallest DCT scale whose longest side stays >= min_side; returns the scale."""
    width, height = img.size
    longest = max(width, height)
    if longest < 2 * min_side:
        return 1
    # draft keeps each side >= the one asked for, so asking for the photo's shape at min_side keeps the longest.
    request = (math.ceil(width * min_side / longest), math.ceil(height * min_side / longest))
    drafted = img.draft(img.mode, request)  # None for formats other than JPEG/MPO
    if drafted is None:
        return 1
    _, box = drafted  # the full image's extent in decoded pixels: (0, 0, W / scale, H / scale)
    return round(width / box[2])


def pil_to_tensor(img):
    """A PIL image as a uint8 (C, H, W) tensor sharing one copy of its pixels (torchvision's pil_to_tensor,
    without importing torchvision)."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return pixels.view(img.size[1], img.size[0], -1).permute(2, 0, 1)
