"""Deterministic synthetic "shapes" detection data in COCO format.

Each class is a filled shape (square, circle, triangle, cross, ring, diamond, ...) in its own colour,
drawn at 20-45% of the image side with little overlap on a mildly noisy textured background. The task
is easy enough that a tiny detector learns it in a few dozen iterations, which makes it the shared
fixture for tests and the demo. Only numpy and PIL are used; 100 images of 128 px take well under 1 s.

    from synthetic_data import write_shapes_split, write_coco_layout
    write_shapes_split("data/img", "data/ann.json", num_images=50, class_names=["a", "b"])
    write_coco_layout("data/coco_shapes", ["a", "b", "c"], num_train=200, num_val=50)

Category ids are deliberately non-contiguous (id = 2 * i + category_id_offset) so that code relying on
``category_id - 1`` as a label breaks in tests instead of in production.
"""
import json
import logging
import os

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ("square", "circle", "triangle", "cross", "ring", "diamond", "hexagon", "frame")
# Saturated colours far from the mid-grey background; 7 entries against 8 shapes, so cycling both
# keeps (shape, colour) pairs distinct for the first 56 classes.
COLOURS = ((220, 30, 30), (30, 90, 230), (240, 200, 20), (30, 170, 60),
           (200, 40, 200), (20, 200, 210), (250, 120, 10))
MIN_SIDE_FRACTION = 0.20
MAX_SIDE_FRACTION = 0.45
MAX_IOU = 0.1  # "little overlap": a new object may overlap an existing one by at most this IoU
PLACEMENT_TRIES = 30


def class_style(class_index):
    """Shape name and RGB colour of class ``class_index`` (both cycled)."""
    return SHAPES[class_index % len(SHAPES)], COLOURS[class_index % len(COLOURS)]


def _background(rng, img_size):
    """Low-frequency colour texture plus pixel noise, kept in mid tones so shapes stand out."""
    coarse = rng.uniform(80, 170, size=(4, 4, 3)).astype(np.uint8)
    texture = Image.fromarray(coarse).resize((img_size, img_size), Image.BILINEAR)
    pixels = np.asarray(texture, dtype=np.float32) + rng.normal(0.0, 8.0, size=(img_size, img_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _iou(box, other):
    ix = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    iy = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1])
    return inter / (area - inter)


def _sample_box(rng, img_size, placed):
    """An integer xyxy box 20-45% of the side that overlaps ``placed`` by IoU <= MAX_IOU, or None."""
    low, high = MIN_SIDE_FRACTION * img_size, MAX_SIDE_FRACTION * img_size
    for _ in range(PLACEMENT_TRIES):
        width, height = (int(round(v)) for v in rng.uniform(low, high, size=2))
        x0 = int(rng.integers(0, img_size - width + 1))
        y0 = int(rng.integers(0, img_size - height + 1))
        box = (x0, y0, x0 + width, y0 + height)
        if all(_iou(box, other) <= MAX_IOU for other in placed):
            return box
    return None


def draw_shape(draw, shape, box, colour):
    """Fill ``shape`` so that it touches all four sides of the pixel box ``box`` (xyxy, exclusive end)."""
    x0, y0 = box[0], box[1]
    x1, y1 = box[2] - 1, box[3] - 1  # ImageDraw coordinates are inclusive
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=colour, width=max(2, int(min(rx, ry) * 0.45)))
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=colour)
    elif shape == "cross":
        arm_x, arm_y = (x1 - x0) / 6, (y1 - y0) / 6
        draw.rectangle((cx - arm_x, y0, cx + arm_x, y1), fill=colour)
        draw.rectangle((x0, cy - arm_y, x1, cy + arm_y), fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "hexagon":
        quarter = (x1 - x0) / 4
        draw.polygon([(x0, cy), (x0 + quarter, y0), (x1 - quarter, y0), (x1, cy), (x1 - quarter, y1),
                      (x0 + quarter, y1)], fill=colour)
    elif shape == "frame":
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=max(2, int(min(rx, ry) * 0.45)))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_image(rng, img_size, num_classes, num_objects):
    """One image and its objects as a list of (class_index, xyxy int box)."""
    image = _background(rng, img_size)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(num_objects):
        box = _sample_box(rng, img_size, [b for _, b in objects])
        if box is None:
            break
        class_index = int(rng.integers(num_classes))
        shape, colour = class_style(class_index)
        draw_shape(draw, shape, box, colour)
        objects.append((class_index, box))
    return image, objects


def write_shapes_split(image_dir, ann_path, num_images, class_names, img_size=128, seed=0, min_objects=1,
                       max_objects=3, empty_fraction=0.0, category_id_offset=1, file_prefix=""):
    """Write ``num_images`` JPEGs and one COCO annotation file describing them.

    Args:
        image_dir: folder for the JPEG files (created); ``file_name`` in the JSON is relative to it.
        ann_path: path of the COCO JSON to write (parent folders created).
        num_images: number of images.
        class_names: one name per class; class ``i`` gets category id ``2 * i + category_id_offset``.
        img_size: side of the square images in pixels.
        seed: the output is a pure function of the arguments (numpy ``default_rng(seed)``).
        min_objects, max_objects: objects per non-empty image, inclusive (fewer if they do not fit).
        empty_fraction: share of images with no object, exactly ``round(empty_fraction * num_images)``.
        category_id_offset: see ``class_names``.
        file_prefix: prefix of every file name, e.g. ``"train_"``.

    Returns:
        ``ann_path`` as a string. Annotations carry ``bbox`` in COCO xywh pixels, ``area`` = w * h and
        ``iscrowd`` = 0.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(ann_path)), exist_ok=True)
    category_ids = [2 * i + category_id_offset for i in range(len(class_names))]
    empty = set(rng.permutation(num_images)[:int(round(empty_fraction * num_images))].tolist())
    images, annotations = [], []
    for index in range(num_images):
        num_objects = 0 if index in empty else int(rng.integers(min_objects, max_objects + 1))
        image, objects = render_image(rng, img_size, len(class_names), num_objects)
        file_name = f"{file_prefix}{index:06d}.jpg"
        # 4:4:4 chroma: the default 4:2:0 subsampling smears coloured edges by a pixel or two off the box
        image.save(os.path.join(image_dir, file_name), quality=95, subsampling=0)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": img_size, "height": img_size})
        for class_index, (x0, y0, x1, y1) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[class_index],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "iscrowd": 0})
    categories = [{"id": cid, "name": name, "supercategory": "shape"}
                  for cid, name in zip(category_ids, class_names)]
    with open(ann_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    logger.info("wrote %d images, %d boxes to %s", num_images, len(annotations), image_dir)
    return str(ann_path)


def write_coco_layout(root, class_names, num_train, num_val, img_size=128, seed=0, **kw):
    """Write a shapes data set in COCO 2017's own folder layout under ``root``.

    ``root/train2017/``, ``root/val2017/``, ``root/annotations/instances_{train,val}2017.json``. The
    val split uses ``seed + 1`` so its images differ from train's. ``kw`` goes to ``write_shapes_split``.

    Returns:
        dict with ``train_images``, ``val_images``, ``train_ann``, ``val_ann`` paths (as
        ``dataset_coco.coco_layout_paths`` returns them).
    """
    paths = {"train_images": os.path.join(root, "train2017"), "val_images": os.path.join(root, "val2017"),
             "train_ann": os.path.join(root, "annotations", "instances_train2017.json"),
             "val_ann": os.path.join(root, "annotations", "instances_val2017.json")}
    write_shapes_split(paths["train_images"], paths["train_ann"], num_train, class_names, img_size, seed, **kw)
    write_shapes_split(paths["val_images"], paths["val_ann"], num_val, class_names, img_size, seed + 1, **kw)
    return paths
