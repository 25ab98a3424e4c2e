"""Deterministic synthetic "shapes" detection data in COCO format.

Each class is a filled shape (square, circle, triangle, cross, ring, diamond, ...) in its own colour,
drawn at 20-45% of the image side with little overlap on a mildly noisy textured background. The task
is easy enough that a tiny detector learns it in a few dozen iterations, which makes it the shared
fixture for tests and the demo. Only numpy and PIL are used, and small sets are written in a moment.

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


# ------------------------------------------------------------------------------------ shared helpers

def _write_coco_json(ann_path, images, annotations, categories):
    """Write one COCO annotation file atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(ann_path)), exist_ok=True)
    tmp = f"{ann_path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    os.replace(tmp, ann_path)
    return str(ann_path)


def _box_annotation(ann_id, image_id, category_id, box):
    x0, y0, x1, y1 = (int(v) for v in box)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}


def _noise_field(rng, height, width, cells, low=0.0, high=1.0):
    """Smooth random field: ``cells`` x ``cells`` uniform values upsampled bilinearly to (height, width)."""
    coarse = rng.uniform(low, high, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR))


def _texture(rng, height, width, base, contrast, grain):
    """An RGB float texture: ``base`` colour modulated at three spatial scales, plus per-pixel grain."""
    shade = sum(_noise_field(rng, height, width, cells, -1, 1) * weight
                for cells, weight in ((3, 0.5), (9, 0.3), (27, 0.2)))
    pixels = np.asarray(base, np.float32)[None, None, :] * (1 + contrast * shade[..., None])
    return pixels + grain * rng.standard_normal(size=(height, width, 1), dtype=np.float32)


def _to_image(pixels):
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _save_jpeg(image, path):
    # 4:4:4 chroma: the default 4:2:0 subsampling smears coloured edges by a pixel or two off the box
    image.save(path, quality=92, subsampling=0)


# ------------------------------------------------------------------- multi-class cluttered scenes

def _regular_polygon(sides, radius=0.5, phase=0.0, centre=(0.5, 0.5)):
    angles = phase + 2 * np.pi * np.arange(sides) / sides
    return [(centre[0] + radius * np.sin(a), centre[1] - radius * np.cos(a)) for a in angles]


def _star(points, inner):
    angles = np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * inner)
    return [(0.5 + r * np.sin(a), 0.5 - r * np.cos(a)) for a, r in zip(angles, radii)]


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _ellipse(cx=0.5, cy=0.5, rx=0.5, ry=0.5, start=0.0, stop=2 * np.pi, steps=40):
    angles = np.linspace(start, stop, steps)
    return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]


# Each object class is a list of (polygon in the unit square, 1 = paint or 0 = cut a hole): classes differ
# in outline and inner structure (holes, stripes, gaps), never only in colour, because every instance gets
# a random colour. Several are line-like (bars, dashes, stripes, ladders, chevrons) so that a backbone
# pretrained on them has seen thin bright structures on texture, as road markings, cracks and wires are.
SCENE_CLASSES = {
    "square": [(_rect(0, 0, 1, 1), 1)],
    "disc": [(_ellipse(), 1)],
    "triangle": [([(0, 1), (1, 1), (0.5, 0)], 1)],
    "cross": [(_rect(0.35, 0, 0.65, 1), 1), (_rect(0, 0.35, 1, 0.65), 1)],
    "ring": [(_ellipse(), 1), (_ellipse(rx=0.3, ry=0.3), 0)],
    "diamond": [([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)], 1)],
    "hexagon": [(_regular_polygon(6, phase=np.pi / 6), 1)],
    "frame": [(_rect(0, 0, 1, 1), 1), (_rect(0.22, 0.22, 0.78, 0.78), 0)],
    "star": [(_star(5, 0.45), 1)],
    "arrow": [([(0, 0.35), (0.55, 0.35), (0.55, 0.1), (1, 0.5), (0.55, 0.9), (0.55, 0.65), (0, 0.65)], 1)],
    "crescent": [(_ellipse(), 1), (_ellipse(cx=0.7, rx=0.42, ry=0.45), 0)],
    "pentagon": [(_regular_polygon(5), 1)],
    "trapezoid": [([(0, 1), (0.25, 0), (0.75, 0), (1, 1)], 1)],
    "half_disc": [(_ellipse(cy=1.0, ry=1.0, start=np.pi, stop=2 * np.pi), 1)],
    "target": [(_ellipse(), 1), (_ellipse(rx=0.36, ry=0.36), 0), (_ellipse(rx=0.2, ry=0.2), 1)],
    "checker": [(_rect(i / 3, j / 3, (i + 1) / 3, (j + 1) / 3), 1) for i in range(3) for j in range(3)
                if (i + j) % 2 == 0],
    "stripes": [(_rect(0, k / 5, 1, (k + 0.6) / 5), 1) for k in range(5)],
    "ladder": [(_rect(0, 0, 0.15, 1), 1), (_rect(0.85, 0, 1, 1), 1)] +
              [(_rect(0, k / 4 + 0.05, 1, k / 4 + 0.17), 1) for k in range(4)],
    "chevron": [([(0, 0), (0.5, 0.45), (1, 0), (1, 0.4), (0.5, 0.85), (0, 0.4)], 1)],
    "zigzag": [([(x, y + d) for x, y in zip(np.linspace(0, 1, 5), (0, 0.7, 0, 0.7, 0))] +
                [(x, y + 0.3) for x, y in zip(np.linspace(1, 0, 5), (0, 0.7, 0, 0.7, 0))], 1) for d in (0.0,)],
    "l_shape": [(_rect(0, 0, 0.35, 1), 1), (_rect(0, 0.65, 1, 1), 1)],
    "t_shape": [(_rect(0, 0, 1, 0.3), 1), (_rect(0.35, 0, 0.65, 1), 1)],
    "h_shape": [(_rect(0, 0, 0.3, 1), 1), (_rect(0.7, 0, 1, 1), 1), (_rect(0, 0.38, 1, 0.62), 1)],
    "bar": [(_rect(0, 0.3, 1, 0.7), 1)],
    "dashes": [(_rect(k / 3, 0.3, k / 3 + 0.2, 0.7), 1) for k in range(3)] + [(_rect(0.9, 0.3, 1, 0.7), 1)],
    "dice": [(_ellipse(cx=x, cy=y, rx=0.13, ry=0.13, steps=16), 1)
             for x in (0.15, 0.5, 0.85) for y in (0.15, 0.85)] + [(_ellipse(rx=0.13, ry=0.13, steps=16), 1)],
    "heart": [(_ellipse(cx=0.27, cy=0.3, rx=0.27, ry=0.27), 1), (_ellipse(cx=0.73, cy=0.3, rx=0.27, ry=0.27), 1),
              ([(0.02, 0.38), (0.98, 0.38), (0.5, 1)], 1)],
    "hourglass": [([(0, 0), (1, 0), (0.55, 0.5), (1, 1), (0, 1), (0.45, 0.5)], 1)],
}
# Thin classes get an elongated aspect ratio, as real bars and lines have.
_ELONGATED = {"bar": (3.0, 8.0), "dashes": (3.0, 6.0), "stripes": (0.8, 1.6), "ladder": (0.4, 0.8),
              "zigzag": (1.5, 3.0), "chevron": (1.2, 2.0)}
_PALETTE = ((235, 235, 235), (250, 250, 245), (220, 40, 40), (40, 90, 220), (240, 200, 30), (40, 160, 70),
            (190, 50, 190), (30, 190, 200), (245, 130, 20), (30, 30, 30), (150, 100, 60), (160, 160, 170))


def _scene_background(rng, height, width):
    """Cluttered texture: asphalt-, grass-, sand- or concrete-like base, blotches and low-contrast scribbles."""
    base = _PALETTE[int(rng.integers(len(_PALETTE)))] if rng.random() < 0.3 else \
        ((90, 90, 95), (70, 110, 60), (180, 160, 120), (140, 140, 135))[int(rng.integers(4))]
    pixels = _texture(rng, height, width, base, contrast=rng.uniform(0.1, 0.35), grain=rng.uniform(3, 12))
    image = _to_image(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):  # clutter that is not an object: faint blobs and scribbles
        tone = tuple(int(c) for c in np.clip(np.asarray(base) + rng.normal(0, 15, 3), 0, 255))
        if rng.random() < 0.5:
            x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, 0.08 * max(height, width))
            draw.ellipse((x - r, y - r * rng.uniform(0.4, 1), x + r, y + r * rng.uniform(0.4, 1)), fill=tone)
        else:
            points = np.cumsum(rng.normal(0, 0.05 * max(height, width), size=(6, 2)), 0) + \
                (rng.uniform(0, width), rng.uniform(0, height))
            draw.line([tuple(p) for p in points], fill=tone, width=int(rng.integers(1, 4)))
    return image


def _object_mask(rng, shape, size, box_size, centre, angle):
    """Mask (L image of ``size``) of one instance of ``shape``: scaled to ``box_size``, rotated by ``angle``."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    cos, sin = np.cos(angle), np.sin(angle)
    for polygon, value in SCENE_CLASSES[shape]:
        unit = np.asarray(polygon, np.float64) - 0.5
        local = unit * np.asarray(box_size)
        rotated = np.stack([local[:, 0] * cos - local[:, 1] * sin, local[:, 0] * sin + local[:, 1] * cos], 1)
        draw.polygon([tuple(p) for p in rotated + np.asarray(centre)], fill=255 * value)
    return mask


def render_scene(rng, width, height, class_names, max_objects=8, empty=False):
    """A cluttered multi-class scene: objects of random colour, scale (6-50% of the shorter side), aspect
    and rotation, overlapping a little. Boxes are those of the visible pixels, as COCO's are.

    Returns:
        (PIL image, [(class_index, xyxy box)]).
    """
    image = _scene_background(rng, height, width)
    masks, labels = [], []
    for _ in range(0 if empty else int(rng.integers(1, max_objects + 1))):
        class_index = int(rng.integers(len(class_names)))
        shape = class_names[class_index]
        side = rng.uniform(0.06, 0.5) * min(width, height)
        low, high = _ELONGATED.get(shape, (0.7, 1.4))
        aspect = rng.uniform(low, high)
        box_size = (side * np.sqrt(aspect), side / np.sqrt(aspect))
        angle = rng.uniform(-np.pi, np.pi) if shape in _ELONGATED or rng.random() < 0.5 else 0.0
        centre = (rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height)
        mask = _object_mask(rng, shape, (width, height), box_size, centre, angle)
        occupied = np.asarray(mask) > 0
        if occupied.sum() < 30 or any((occupied & m).sum() > 0.3 * occupied.sum() for m in masks):
            continue  # too small, or would hide much of an earlier object
        colour = _PALETTE[int(rng.integers(len(_PALETTE)))]
        shaded = np.asarray(colour, np.float32) * rng.uniform(0.85, 1.1) + rng.normal(0, 6, (height, width, 1))
        image.paste(_to_image(shaded), (0, 0), mask)
        masks = [m & ~occupied for m in masks] + [occupied]  # later objects occlude earlier ones
        labels.append(class_index)
    objects = []
    for class_index, visible in zip(labels, masks):
        if visible.sum() < 20:
            continue
        ys, xs = np.nonzero(visible)
        objects.append((class_index, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return image, objects


def write_scene_split(image_dir, ann_path, num_images, class_names=None, width=256, height=256, seed=0,
                      max_objects=8, empty_fraction=0.05):
    """Write ``num_images`` cluttered multi-class scenes (see ``render_scene``) and their COCO JSON.

    ``class_names`` are keys of ``SCENE_CLASSES`` (default: all of them). Category ids are ``2 * i + 1``.
    """
    class_names = list(class_names or SCENE_CLASSES)
    unknown = [name for name in class_names if name not in SCENE_CLASSES]
    if unknown:
        raise ValueError(f"unknown scene classes {unknown}; known: {', '.join(SCENE_CLASSES)}")
    rng = np.random.default_rng(seed)
    os.makedirs(image_dir, exist_ok=True)
    empty = set(rng.permutation(num_images)[:int(round(empty_fraction * num_images))].tolist())
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render_scene(rng, width, height, class_names, max_objects, empty=index in empty)
        file_name = f"{index:06d}.jpg"
        _save_jpeg(image, os.path.join(image_dir, file_name))
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for class_index, box in objects:
            annotations.append(_box_annotation(len(annotations) + 1, index + 1, 2 * class_index + 1, box))
    categories = [{"id": 2 * i + 1, "name": name, "supercategory": "scene"} for i, name in enumerate(class_names)]
    return _write_coco_json(ann_path, images, annotations, categories)


# --------------------------------------------------------------------------------- whiteline scenes

def _homography(src, dst):
    """3x3 matrix mapping the four ``src`` points onto the four ``dst`` points (direct linear transform)."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.asarray(rows, np.float64))
    return vt[-1].reshape(3, 3) / vt[-1, -1]


def _camera(rng, world_w, world_l, width, height):
    """Homography from the road plane (world pixels, road along +y towards the camera) to the image, and the
    image row above which the sky is.

    Half the scenes are seen from a vehicle (perspective: lines converge, far dashes shrink), half from
    above (a drone or survey camera: rotation and scale only)."""
    world = [(0, 0), (world_w, 0), (world_w, world_l), (0, world_l)]
    if rng.random() < 0.4:
        horizon = height * rng.uniform(0.3, 0.42)
        centre, top_half = width * rng.uniform(0.4, 0.6), width * rng.uniform(0.2, 0.35)
        spread = width * rng.uniform(0.1, 0.4)
        image = [(centre - top_half, horizon), (centre + top_half, horizon), (width + spread, height),
                 (-spread, height)]
        return _homography(world, image), int(horizon)
    angle = rng.uniform(-0.25, 0.25) + (np.pi / 2 if rng.random() < 0.3 else 0.0)
    scale = rng.uniform(0.55, 0.85)
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    # rotate/scale about the world centre, then put that centre at the image centre (with a small offset)
    offset = np.asarray([width, height]) / 2 + rng.uniform(-0.1, 0.1, 2) * (width, height)
    image = [tuple(offset + [cos * (x - world_w / 2) - sin * (y - world_l / 2),
                             sin * (x - world_w / 2) + cos * (y - world_l / 2)]) for x, y in world]
    return _homography(world, image), 0


def _road_layout(rng, world_w, world_l):
    """White markings (world rectangles, one per painted segment) and distractors of one road."""
    kerb = rng.uniform(0.06, 0.14) * world_w
    left, right = kerb, world_w - kerb
    lanes = int(rng.integers(2, 5))
    lane_w = (right - left) / lanes
    line_w = rng.uniform(8, 14)
    dash, gap = rng.uniform(50, 110), rng.uniform(50, 120)
    phase = rng.uniform(0, dash + gap)
    white, yellow = [], []
    stop_y = rng.uniform(0.55, 0.8) * world_l if rng.random() < 0.35 else None
    cross = None
    if rng.random() < 0.35:
        start = rng.uniform(0.15, 0.55) * world_l
        cross = (start, start + rng.uniform(120, 220))
    blocked = [(stop_y - 30, stop_y + 60)] if stop_y else []
    if cross:
        blocked.append((cross[0] - 40, cross[1] + 40))

    def solid(x):  # a solid line is one segment between the blocked bands (stop line, crosswalk)
        edges = [0.0] + [v for band in sorted(blocked) for v in band] + [world_l]
        return [(x - line_w / 2, max(a, 0), x + line_w / 2, min(b, world_l))
                for a, b in zip(edges[::2], edges[1::2]) if min(b, world_l) - max(a, 0) > 40]

    def dashed(x):
        segments, y = [], -phase
        while y < world_l:
            y0, y1 = max(y, 0.0), min(y + dash, world_l)
            if y1 - y0 > 15 and not any(y1 > a and y0 < b for a, b in blocked):
                segments.append((x - line_w / 2, y0, x + line_w / 2, y1))
            y += dash + gap
        return segments

    centre_lane = lanes // 2 if lanes >= 2 else None
    for k in range(1, lanes):
        x = left + k * lane_w
        if k == centre_lane and rng.random() < 0.4:  # a yellow centre line (single or double): not white
            yellow += [(x - line_w / 2 + o, 0, x + line_w / 2 + o, world_l) for o in
                       ((0,) if rng.random() < 0.5 else (-line_w, line_w))]
        else:
            white += solid(x) if rng.random() < 0.3 else dashed(x)
    if rng.random() < 0.7:  # edge lines
        for x in (left + line_w, right - line_w):
            white += solid(x)
    if stop_y:
        white.append((left + line_w * 2, stop_y, right - line_w * 2, stop_y + rng.uniform(25, 45)))
    if cross:
        stripe, spacing = rng.uniform(30, 50), rng.uniform(30, 50)
        x = left + spacing / 2
        while x + stripe < right - spacing / 2:
            white.append((x, cross[0], x + stripe, cross[1]))
            x += stripe + spacing
    return white, yellow, (left, right)


def _rect_mask(size, rects):
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for x0, y0, x1, y1 in rects:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    return mask


MIN_MARKING_PIXELS = 120  # a marking covering fewer image pixels is not painted (and so not labelled)
MIN_MARKING_SIDE = 5


def render_whiteline(rng, width, height):
    """A road scene with white markings; each painted segment is one (0, xyxy box) object.

    The road plane is drawn in world coordinates (asphalt, kerbs, verges, white and yellow lines, cracks,
    worn paint), then warped into the camera; shadows and glare are added in the image. A marking that
    would cover fewer than 40 pixels in the image is not painted at all, so nothing visible is unlabelled.
    """
    world_w, world_l = 480, 960
    to_image, horizon = _camera(rng, world_w, world_l, width, height)
    to_world = np.linalg.inv(to_image)
    coeffs = tuple((to_world / to_world[2, 2]).ravel()[:8])

    def warp(img, resample=Image.BILINEAR, fill=0):
        return img.transform((width, height), Image.PERSPECTIVE, coeffs, resample, fillcolor=fill)

    white, yellow, (left, right) = _road_layout(rng, world_w, world_l)
    grey = rng.uniform(70, 120)
    # the plane is textured at half resolution: the camera shrinks it anyway, and it halves the cost
    world = _texture(rng, world_l // 2, world_w // 2, (grey, grey, grey * rng.uniform(0.95, 1.08)),
                     rng.uniform(0.08, 0.2), rng.uniform(4, 10))
    verge = ((80, 120, 60), (150, 130, 95), (110, 110, 105))[int(rng.integers(3))]
    for x0, x1 in ((0, int(left) // 2), (int(right) // 2, world_w // 2)):
        world[:, x0:x1] = _texture(rng, world_l // 2, x1 - x0, verge, 0.25, 10)
    road = _to_image(world).resize((world_w, world_l), Image.BILINEAR)
    draw = ImageDraw.Draw(road)
    kerb_tone = int(rng.uniform(95, 140))
    for x in (left, right):  # kerbs: concrete blocks with joints and a gutter shadow, darker than paint
        draw.rectangle((x - 12, 0, x + 12, world_l), fill=(kerb_tone,) * 3)
        for y in np.arange(rng.uniform(0, 40), world_l, rng.uniform(30, 50)):
            draw.line((x - 12, y, x + 12, y), fill=(kerb_tone // 2,) * 3, width=2)
        gutter = x + (12 if x == left else -12)
        draw.line((gutter, 0, gutter, world_l), fill=(40, 40, 40), width=4)
    for _ in range(int(rng.integers(0, 6))):  # cracks
        points = np.cumsum(rng.normal(0, 25, size=(int(rng.integers(4, 10)), 2)), 0) + \
            (rng.uniform(left, right), rng.uniform(0, world_l))
        draw.line([tuple(p) for p in points], fill=(int(grey * 0.4),) * 3, width=int(rng.integers(2, 5)))
    if yellow:
        road.paste((225, 185, 40), (0, 0), _rect_mask(road.size, yellow))

    objects, painted = [], []
    for rect in white:
        x0, y0, x1, y1 = rect  # a rectangle on the plane is a convex quadrilateral in the camera
        corners = to_image @ np.asarray([[x0, y0, 1], [x1, y0, 1], [x1, y1, 1], [x0, y1, 1]], np.float64).T
        quad = Image.new("L", (width, height), 0)
        ImageDraw.Draw(quad).polygon([tuple(p) for p in (corners[:2] / corners[2]).T], fill=255)
        image_mask = np.asarray(quad) > 0
        ys, xs = np.nonzero(image_mask[horizon:])
        if len(ys) < MIN_MARKING_PIXELS or min(np.ptp(xs), np.ptp(ys)) + 1 < MIN_MARKING_SIDE:
            continue  # too small to label reliably: not painted either
        ys, xs = np.nonzero(image_mask)
        objects.append((0, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
        painted.append(rect)
    if painted:
        wear = _noise_field(rng, world_l, world_w, 40) > rng.uniform(0.0, 0.3)  # paint worn off in patches
        paint = np.asarray(_rect_mask(road.size, painted)) * wear * rng.uniform(0.8, 1.0)
        road.paste((242, 242, 238), (0, 0), Image.fromarray(paint.astype(np.uint8)))
    pixels = np.asarray(warp(road), np.float32)
    outside = np.asarray(warp(Image.new("L", road.size, 255))) < 128  # beyond the modelled road plane
    pixels[outside] = _texture(rng, height, width, verge, 0.3, 10)[outside]
    if horizon:  # sky and distant scenery above the horizon
        sky = _texture(rng, horizon + 1, width, (150, 175, 205), 0.15, 3)
        pixels[:horizon + 1] = sky
    if rng.random() < 0.6:  # shadows of trees, poles and buildings
        shadow = Image.new("L", (width, height), 0)
        shade_draw = ImageDraw.Draw(shadow)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0, width), rng.uniform(horizon, height)
            shade_draw.polygon([tuple(p) for p in rng.normal(0, 0.2 * width, size=(5, 2)) + (cx, cy)], fill=255)
        pixels *= 1 - rng.uniform(0.3, 0.55) * (np.asarray(shadow, np.float32)[..., None] / 255)
    if rng.random() < 0.3:  # glare: a bright soft blob, white but not a line
        yy, xx = np.mgrid[0:height, 0:width]
        cx, cy, r = rng.uniform(0, width), rng.uniform(horizon, height), rng.uniform(0.05, 0.15) * width
        pixels += 140 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r ** 2))[..., None]
    pixels += rng.normal(0, 3, size=pixels.shape[:2] + (1,))
    return _to_image(pixels), objects


def write_whiteline_split(image_dir, ann_path, num_images, width=320, height=240, seed=0):
    """Write ``num_images`` road scenes and their single-category (``whiteline``, id 1) COCO JSON."""
    rng = np.random.default_rng(seed)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render_whiteline(rng, width, height)
        file_name = f"road_{index:06d}.jpg"
        _save_jpeg(image, os.path.join(image_dir, file_name))
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for _, box in objects:
            annotations.append(_box_annotation(len(annotations) + 1, index + 1, 1, box))
    return _write_coco_json(ann_path, images, annotations,
                            [{"id": 1, "name": "whiteline", "supercategory": "road marking"}])


# ------------------------------------------------------------------------------ layouts and caching

DATASET_KINDS = ("coco", "whiteline")
GENERATOR_VERSION = 4  # bump when the rendering changes, so cached data sets are rewritten


def dataset_paths(kind, root):
    """Where ``kind`` lives under ``root``: COCO 2017's layout, or the README's fine-tuning layout."""
    if kind == "coco":
        return {"train_images": os.path.join(root, "train2017"), "val_images": os.path.join(root, "val2017"),
                "train_ann": os.path.join(root, "annotations", "instances_train2017.json"),
                "val_ann": os.path.join(root, "annotations", "instances_val2017.json")}
    if kind == "whiteline":
        return {"train_images": os.path.join(root, "train", "JPEGImages"), "val_images": os.path.join(root, "val"),
                "train_ann": os.path.join(root, "train", "annotations.json"),
                "val_ann": os.path.join(root, "val", "annotations.json")}
    raise ValueError(f"unknown data set kind {kind!r}; choose from {', '.join(DATASET_KINDS)}")


def make_dataset(kind, root, num_train, num_val, seed=0, width=None, height=None):
    """Write a synthetic data set of ``kind`` under ``root``, or reuse it if an identical one is there.

    ``coco``: cluttered scenes of all ``SCENE_CLASSES`` (default 256x256) in COCO 2017's layout.
    ``whiteline``: road scenes (default 320x240) in the fine-tuning layout (``train/JPEGImages``,
    ``train/annotations.json``, ``val/*.jpg``, ``val/annotations.json``). The val split uses ``seed + 1``.
    A manifest (``synthetic.json``) is written last, so an interrupted write is redone on the next call.

    Returns:
        (paths dict as ``dataset_paths`` gives it, True if it was written now or False if reused).
    """
    paths = dataset_paths(kind, root)
    defaults = {"coco": (256, 256), "whiteline": (320, 240)}[kind]
    params = {"kind": kind, "num_train": num_train, "num_val": num_val, "seed": seed, "width": width or defaults[0],
              "height": height or defaults[1], "version": GENERATOR_VERSION}
    manifest = os.path.join(root, "synthetic.json")
    if os.path.isfile(manifest) and all(os.path.exists(p) for p in paths.values()):
        with open(manifest) as f:
            if json.load(f) == params:
                return paths, False
    size = {"width": params["width"], "height": params["height"]}
    for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        image_dir, ann_path = paths[f"{split}_images"], paths[f"{split}_ann"]
        if kind == "coco":
            write_scene_split(image_dir, ann_path, count, seed=split_seed, **size)
        else:
            write_whiteline_split(image_dir, ann_path, count, seed=split_seed, **size)
    tmp = f"{manifest}.tmp"
    with open(tmp, "w") as f:
        json.dump(params, f)
    os.replace(tmp, manifest)
    return paths, True
