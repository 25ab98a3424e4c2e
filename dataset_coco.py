"""Detection data: image loading, the dataset, train/val sets, transform presets, collate and loaders.

A dataset item is ``(image, target)`` with ``target = {"boxes_xyxy", "labels", "image_id", "orig_size",
"decode_scale", "decode_origin"}``; labels are contiguous ``0..num_classes-1`` and ``dataset.category_ids[label]``
maps back to the COCO ``category_id`` for evaluation [tv-ref ``FilterAndRemapCocoCategories``]. A large JPEG may be
decoded reduced, to the size its consumer needs (``decode_side``; issue #27). COCO ``xywh`` boxes are converted
to ``xyxy``, clipped and sanitised once at init [tv-ref ``coco_utils``]; every later box change (resize,
crop, pad, flip) is done by ``torchvision.transforms.v2`` on ``tv_tensors.BoundingBoxes``.

Annotations come in any format annotations.py reads (COCO JSON, Pascal VOC, YOLO), each turned into a COCO dict
(hence the module's name). Inspect a data set before training on it, or write it as one COCO JSON:

    python dataset_coco.py --ann data/annotations/instances_val2017.json --root data/val2017
    python dataset_coco.py --ann kangaroo/annots --class-name kangaroo --img-size 320     # Pascal VOC
    python dataset_coco.py --ann roads/data.yaml --to-coco roads_train.json               # YOLO -> COCO JSON
"""
import argparse
import contextlib
import io
import logging
import math
import os
import random

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from annotations import (EXIF_ORIENTATION, FORMATS, hash_split, index_coco, read_annotations, read_yaml_entry,
                         subset)
from config import run_cli, write_json_atomic
# Reading a photo lives in image_io (torchvision-free, for predict's cold start); its names stay importable here.
from image_io import DecodedImage, decode_image, load_image  # noqa: F401
from inference import LETTERBOX_FILL  # the grey predict() pads with (YOLOv5's); inference.py never imports the model

logger = logging.getLogger(__name__)

TRANSFORM_PRESETS = ("strong", "moderate", "letterbox")
# ScaleJitter's range of each augmenting preset: the largest scale is the most of a photo's detail it can use.
SCALE_RANGES = {"strong": (0.5, 1.5), "moderate": (0.75, 1.25)}
IMAGE_SUBDIRS = ("", "JPEGImages", "images")  # Pascal VOC and Roboflow-style exports keep images in these
COCO_LAYOUT_FILES = ("train2017/", "val2017/", "annotations/instances_train2017.json",
                     "annotations/instances_val2017.json")
COCO_LAYOUT = """expected COCO layout:
  COCO_ROOT/
    train2017/                            training images
    val2017/                              validation images
    annotations/instances_train2017.json
    annotations/instances_val2017.json"""
SMALL_AREA, MEDIUM_AREA = 32 ** 2, 96 ** 2  # COCO's area bands (cocodataset.org/#detection-eval)


def resolve_image_path(root, file_name):
    """Find ``file_name`` of a COCO ``images`` entry on disk.

    Tries ``root/file_name``, ``root/JPEGImages/file_name``, ``root/images/file_name``, then the same three
    with ``basename(file_name)`` (exports often store paths of the machine that wrote them).

    Returns:
        (path or None, tried): the first existing path and every path tried up to it.
    """
    file_name = file_name.replace("\\", "/")
    tried = []
    for name in (file_name, os.path.basename(file_name)):
        for subdir in IMAGE_SUBDIRS:
            path = os.path.join(root, subdir, name)
            if path in tried:
                continue
            tried.append(path)
            if os.path.isfile(path):
                return path, tried
    return None, tried


def load_train_val(train_ann, train_root=None, val_ann=None, val_root=None, val_fraction=0.2, split=None):
    """The training and validation records (COCO dicts with their image roots) of a run.

    Without a validation set (no `val_ann`, and no val entry in a YOLO data.yaml) a part of the training
    annotations is held out: `split` (a run's split.json, on resume) or else `val_fraction` of the images, chosen
    by a hash of each path (annotations.hash_split), so adding images never moves an old one across the split.

    Returns:
        ((train dict, root), (val dict, root), the split record {"val_fraction", "train", "val"} or None).
    """
    train, train_root, kind = read_annotations(train_ann, train_root, "train")
    if val_ann is None and kind == "yolo" and os.path.isfile(train_ann):
        val_ann = train_ann if read_yaml_entry(train_ann, "val") else None
    if val_ann is not None:
        val, val_root, _ = read_annotations(val_ann, val_root, "val")
        return (_named(train, train_ann), train_root), (_named(val, val_ann), val_root), None
    if split is None:
        train_names, val_names = hash_split(train, val_fraction)
        split = {"val_fraction": val_fraction, "source": str(train_ann), "train": train_names, "val": val_names}
    if not split["val"] or not split["train"]:
        raise ValueError(f"--val-fraction {val_fraction} of the {len(train['images'])} images of {train_ann} leaves "
                         f"{len(split['train'])} to train on and {len(split['val'])} to validate on; use another "
                         f"fraction or pass a validation set (--val-ann)")
    parts = [_named(subset(train, set(split[part])), f"{train_ann} ({part} part, {len(split[part])} images)")
             for part in ("train", "val")]
    return (parts[0], train_root), (parts[1], train_root), split


def _named(data, source):
    return {**data, "info": {"source": str(source)}}


def coco_layout_paths(coco_root):
    """Paths of COCO 2017's own layout under ``coco_root`` (see ``COCO_LAYOUT``).

    Returns:
        dict with ``train_images``, ``val_images``, ``train_ann``, ``val_ann``.

    Raises:
        FileNotFoundError: one line naming what is missing and the expected layout.
    """
    paths = {"train_images": os.path.join(coco_root, "train2017"),
             "val_images": os.path.join(coco_root, "val2017"),
             "train_ann": os.path.join(coco_root, "annotations", "instances_train2017.json"),
             "val_ann": os.path.join(coco_root, "annotations", "instances_val2017.json")}
    missing = [name for name, path in zip(COCO_LAYOUT_FILES, paths.values())
               if not (os.path.isdir(path) if name.endswith("/") else os.path.isfile(path))]
    if missing:
        raise FileNotFoundError(f"{coco_root} is missing {', '.join(missing)}; expected COCO layout: "
                                f"{coco_root}/{{{', '.join(COCO_LAYOUT_FILES)}}}")
    return paths


# --------------------------------------------------------------------------------------------- dataset


def turn_to_displayed(annotations, orientation, width, height):
    """Turn xywh boxes of a photo's stored W x H frame into its displayed frame, in place: EXIF orientations 5-8,
    as PIL's exif_transpose turns the pixels (transpose, 90 degrees clockwise, transverse, 90 anticlockwise)."""
    corner = {5: lambda x, y: (y, x), 6: lambda x, y: (height - y, x), 7: lambda x, y: (height - y, width - x),
              8: lambda x, y: (y, width - x)}[orientation]
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        (x0, y0), (x1, y1) = corner(x, y), corner(x + w, y + h)
        ann["bbox"] = [min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0)]


def _select_categories(coco, classes):
    """(category_ids, class_names) for ``classes``: None, a list of names, or an int K (most frequent)."""
    categories = coco.loadCats(sorted(coco.getCatIds()))
    if not categories:
        raise ValueError("the annotation file has no categories")
    if classes is None:
        chosen = categories
    elif isinstance(classes, int) and not isinstance(classes, bool):
        if not 1 <= classes <= len(categories):
            raise ValueError(f"classes={classes}: the file has {len(categories)} categories")
        counts = {c["id"]: 0 for c in categories}
        for ann in coco.dataset.get("annotations", []):
            if not ann.get("iscrowd", 0) and ann["category_id"] in counts:
                counts[ann["category_id"]] += 1
        chosen = sorted(categories, key=lambda c: (-counts[c["id"]], c["id"]))[:classes]
    else:
        chosen = _categories_by_name(categories, [classes] if isinstance(classes, str) else list(classes))
    return [c["id"] for c in chosen], [c["name"] for c in chosen]


def _categories_by_name(categories, names):
    by_name = {}
    for category in categories:
        by_name.setdefault(category["name"].lower(), []).append(category)
    available = ", ".join(c["name"] for c in categories)
    chosen = []
    for name in names:
        matches = by_name.get(str(name).lower(), [])
        if not matches:
            raise ValueError(f"class {name!r} is not in the annotation file; available: {available}")
        if len(matches) > 1:
            raise ValueError(f"class {name!r} matches several categories: {[c['id'] for c in matches]}")
        if matches[0] in chosen:
            raise ValueError(f"class {name!r} is listed twice in {names}")
        chosen.append(matches[0])
    return chosen


def _parse_boxes(annotations, image_index, image_sizes, stats):
    """Turn COCO xywh boxes into xyxy clipped to their image; drop non-finite and < 1 px boxes, counting each.

    Returns (kept boxes float32 (K, 4), keep mask bool (M,)) for the M ``annotations``.
    """
    raw = np.full((len(annotations), 4), np.nan, dtype=np.float64)
    for row, ann in enumerate(annotations):
        bbox = ann.get("bbox")
        if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
            raw[row] = [float(v) if isinstance(v, (int, float)) else np.nan for v in bbox]
    finite = np.isfinite(raw).all(axis=1)
    raw[~finite] = 0.0
    boxes = torchvision.ops.box_convert(torch.from_numpy(raw), "xywh", "xyxy")
    heights, widths = (torch.from_numpy(image_sizes[image_index, k]).to(boxes.dtype)[:, None] for k in (0, 1))
    clipped = boxes.clone()
    clipped[:, 0::2] = torch.minimum(torch.clamp(clipped[:, 0::2], min=0), widths)
    clipped[:, 1::2] = torch.minimum(torch.clamp(clipped[:, 1::2], min=0), heights)
    wide_enough = ((clipped[:, 2:] - clipped[:, :2]) >= 1).all(dim=1).numpy()
    keep = finite & wide_enough
    stats["boxes_dropped_invalid"] += int((~finite).sum())
    stats["boxes_dropped_degenerate"] += int((finite & ~wide_enough).sum())
    stats["boxes_dropped"] += int((~keep).sum())
    stats["boxes_clipped"] += int(((clipped != boxes).any(dim=1).numpy() & keep).sum())
    return clipped[keep].to(torch.float32).numpy(), keep


class CocoDetectionDataset(torch.utils.data.Dataset):
    """COCO-format detection dataset with contiguous labels over a chosen subset of categories.

    Args:
        ann_file: annotations in any format annotations.py reads (a COCO JSON, a Pascal VOC folder, a YOLO
            data.yaml or labels folder), or a COCO-format dict of records (its "info" "source" names it).
        image_root: folder the ``file_name`` entries are relative to (see ``resolve_image_path``); None lets a
            VOC or YOLO reader find it.
        classes: None (all categories, in category-id order), a list of names (that order,
            case-insensitive), or an int K (the K most frequent by non-crowd annotations, ties by id).
        transforms: None, or a v2 callable ``(Image, {"boxes": BoundingBoxes, "labels"}) -> same``,
            e.g. ``build_transforms(...)``.
        include_empty: keep images with no selected box as negatives.
        max_missing_fraction: share of images that may be missing on disk, or unreadable with no size in the
            annotations (dropped with a warning).
        decode_side: None (decode every image in full), or the longest side the consumer uses: a JPEG at least
            twice as large is decoded reduced to no less (``decode_image``), and its boxes scaled with it.
            ``augmented_side(preset, img_size)`` for a training pipeline, ``img_size`` for evaluation.

    Attributes:
        coco: the unfiltered pycocotools ``COCO`` object.
        image_ids, image_paths: kept images, sorted by id, and their files.
        class_names, category_ids: label ``i`` is ``class_names[i]``, COCO ``category_ids[i]``.
        stats: counters of what init kept, clipped and dropped (see ``dataset_report``).
    """

    def __init__(self, ann_file, image_root=None, classes=None, transforms=None, include_empty=True,
                 max_missing_fraction=0.05, decode_side=None):
        if isinstance(ann_file, dict):
            data, self.ann_file = ann_file, str(ann_file.get("info", {}).get("source", "annotations"))
        else:
            data, image_root, _ = read_annotations(ann_file, image_root)
            self.ann_file = str(ann_file)
        self.image_root = str(image_root)
        self.transforms, self.include_empty, self.decode_side = transforms, include_empty, decode_side
        self.coco = index_coco(data, self.ann_file)
        try:
            self.category_ids, self.class_names = _select_categories(self.coco, classes)
        except ValueError as error:
            raise ValueError(f"{self.ann_file}: {error}") from None
        self.stats = dict.fromkeys(
            ("images_total", "images_missing", "images_unreadable", "images_without_boxes", "images_dropped_empty",
             "images_turned",
             "annotations_total", "annotations_other_classes", "crowd_ignored", "boxes_kept", "boxes_clipped",
             "boxes_dropped", "boxes_dropped_invalid", "boxes_dropped_degenerate"), 0)
        image_ids, image_paths, sizes = self._find_images(max_missing_fraction)
        self._index_annotations(image_ids, image_paths, sizes)
        self._warned_size_mismatch = False
        self._log_summary()
        if not self.image_ids:
            s = self.stats
            raise ValueError(f"no usable images in {self.ann_file}: {s['images_total']} listed, {s['images_missing']} "
                             f"missing on disk, {s['images_unreadable']} unreadable without a size, "
                             f"{s['images_dropped_empty']} dropped without a box of "
                             f"{', '.join(self.class_names)}")

    def _find_images(self, max_missing_fraction):
        """The images on disk with their (H, W) sizes. Missing images, and unreadable ones whose size the
        annotations do not give (nothing to place their boxes in), are dropped with a warning while together they
        are at most max_missing_fraction of the set; an unreadable image with a size stays, skipped when loaded."""
        image_ids, image_paths, sizes, missing, unreadable = [], [], [], [], []
        all_ids = sorted(self.coco.getImgIds())
        for image_id in all_ids:
            path, tried = resolve_image_path(self.image_root, self.coco.imgs[image_id]["file_name"])
            if path is None:
                missing.append((self.coco.imgs[image_id]["file_name"], tried))
                continue
            try:
                sizes.append(self._image_size(image_id, path))
            except OSError as error:  # PIL's UnidentifiedImageError is one too
                unreadable.append((path, error))
                continue
            image_ids.append(image_id)
            image_paths.append(path)
        self.stats.update(images_total=len(all_ids), images_missing=len(missing), images_unreadable=len(unreadable))
        if len(missing) + len(unreadable) > max_missing_fraction * len(all_ids):
            if missing:
                name, tried = missing[0]
                raise FileNotFoundError(
                    f"{len(missing)}/{len(all_ids)} images of {self.ann_file} not found"
                    f"{f' and {len(unreadable)} unreadable' if unreadable else ''} (more than "
                    f"max_missing_fraction={max_missing_fraction:g}); first missing {name!r}, looked in: "
                    f"{', '.join(tried)}")
            path, error = unreadable[0]
            raise ValueError(f"{len(unreadable)}/{len(all_ids)} images of {self.ann_file} cannot be read and it gives "
                             f"no width/height for them (more than max_missing_fraction={max_missing_fraction:g}); "
                             f"first {path} ({error}); fix the files or add their sizes to the annotations")
        if missing:
            logger.warning("%s: dropped %d/%d images not found under %s, e.g. %s", self.ann_file, len(missing),
                           len(all_ids), self.image_root, ", ".join(name for name, _ in missing[:5]))
        if unreadable:
            logger.warning("%s: dropped %d/%d images that cannot be read and whose width/height it does not give, "
                           "e.g. %s (%s)", self.ann_file, len(unreadable), len(all_ids), *unreadable[0])
        return image_ids, image_paths, sizes

    def _image_size(self, image_id, path):
        """(H, W) as displayed. A photo that EXIF turns a quarter (orientations 5-8) but whose annotations give its
        stored size was annotated in the stored frame: its boxes are turned with it (`turn_to_displayed`)."""
        info = self.coco.imgs[image_id]
        try:
            with Image.open(path) as img:  # the header only
                stored_w, stored_h = img.size
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        except (OSError, UnidentifiedImageError):
            if info.get("height") and info.get("width"):
                return int(info["height"]), int(info["width"])  # unreadable now: skipped when loaded
            raise  # no size either: _find_images drops it
        turned = orientation in (5, 6, 7, 8)
        displayed = (stored_w, stored_h) if not turned else (stored_h, stored_w)
        given = (int(info.get("width") or 0), int(info.get("height") or 0))
        if turned and given == (stored_w, stored_h) and given != displayed:
            turn_to_displayed(self.coco.imgToAnns.get(image_id, []), orientation, stored_w, stored_h)
            info["width"], info["height"] = displayed
            self.stats["images_turned"] += 1
        elif given[0] and given[1]:
            return given[1], given[0]
        return displayed[1], displayed[0]

    def _index_annotations(self, image_ids, image_paths, sizes):
        # Boxes of all images live in a few flat numpy arrays (not one tensor per image): lists of Python
        # objects get copied into every DataLoader worker on access (pytorch/pytorch#13246).
        sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)  # (num_images, 2) = (H, W)
        if self.stats["images_turned"]:
            logger.warning("%s: %d EXIF-rotated photos are annotated in their stored (unrotated) frame; their boxes "
                           "were turned with the image, as it is displayed and trained on", self.ann_file,
                           self.stats["images_turned"])
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco.createIndex()  # COCOeval scores the turned boxes, as the model predicts them
        label_of = {category_id: label for label, category_id in enumerate(self.category_ids)}
        selected, image_index, labels = [], [], []
        for index, image_id in enumerate(image_ids):
            for ann in self.coco.imgToAnns.get(image_id, []):
                self.stats["annotations_total"] += 1
                if ann.get("category_id") not in label_of:
                    self.stats["annotations_other_classes"] += 1
                elif ann.get("iscrowd", 0):
                    self.stats["crowd_ignored"] += 1
                else:
                    selected.append(ann)
                    image_index.append(index)
                    labels.append(label_of[ann["category_id"]])
        image_index = np.array(image_index, dtype=np.int64)
        boxes, keep = _parse_boxes(selected, image_index, sizes, self.stats)
        image_index, labels = image_index[keep], np.array(labels, dtype=np.int64)[keep]
        counts = np.bincount(image_index, minlength=len(image_ids))
        self.stats["boxes_kept"] = int(keep.sum())
        self.stats["images_without_boxes"] = int((counts == 0).sum())
        kept_images = np.ones(len(image_ids), dtype=bool) if self.include_empty else counts > 0
        self.stats["images_dropped_empty"] = int((~kept_images).sum())
        box_kept = kept_images[image_index]
        self.image_ids = [i for i, k in zip(image_ids, kept_images) if k]
        self.image_paths = [p for p, k in zip(image_paths, kept_images) if k]
        self._sizes = sizes[kept_images]
        self._boxes, self._labels = boxes[box_kept], labels[box_kept]  # sorted by image: (M, 4), (M,)
        self._offsets = np.concatenate([[0], np.cumsum(counts[kept_images])])

    def _log_summary(self):
        s = self.stats
        level = logging.WARNING if s["boxes_dropped"] or s["boxes_clipped"] else logging.INFO
        logger.log(level, "%s: %d images (%d missing, %d without boxes%s), %d boxes in %d classes; "
                   "ignored %d crowd and %d other-class annotations; clipped %d boxes, dropped %d "
                   "(%d degenerate/outside, %d non-finite/malformed)", self.ann_file, len(self.image_ids),
                   s["images_missing"], s["images_without_boxes"],
                   "" if self.include_empty else f", {s['images_dropped_empty']} of them dropped",
                   s["boxes_kept"], len(self.class_names), s["crowd_ignored"], s["annotations_other_classes"],
                   s["boxes_clipped"], s["boxes_dropped"], s["boxes_dropped_degenerate"],
                   s["boxes_dropped_invalid"])

    def __len__(self):
        return len(self.image_ids)

    def get_annotations(self, index):
        """Boxes and labels of item ``index`` without loading the image.

        Returns:
            (boxes_xyxy float32 (N, 4) in the JSON's pixel frame, labels int64 (N,)).
        """
        start, end = self._offsets[index], self._offsets[index + 1]
        return torch.from_numpy(self._boxes[start:end].copy()), torch.from_numpy(self._labels[start:end].copy())

    def image_size(self, index):
        """(H, W) of item ``index`` as the JSON states it."""
        return tuple(int(v) for v in self._sizes[index])

    def __getitem__(self, key):
        """Returns ``(image, target)`` for ``key``: an index, or ``(index, seed)`` from ``SeededSampler``, whose
        transforms then draw their randomness from ``seed`` alone (``seeded_rng``).

        Without transforms ``image`` is the decoded uint8 (3, h, w): the original, or a JPEG reduced by
        ``decode_scale`` (see ``decode_side``), and boxes are in its pixels; with transforms both are in the
        transformed frame (float32 (3, S, S) in [0, 1] for the presets).
        ``target``: ``boxes_xyxy`` float32 (N, 4), ``labels`` int64 (N,) in ``0..num_classes-1``,
        ``image_id`` int, ``orig_size`` int64 (2,) = (H, W) of the original image, ``decode_scale`` int and
        ``decode_origin`` (x, y): a decoded point p is the original (p - decode_origin) * decode_scale (1 and (0, 0)
        when decoded in full; see ``decode_image``).
        """
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            image, scale, origin, (height, width) = decode_image(self.image_paths[index], self.decode_side)
        except (OSError, UnidentifiedImageError, ValueError) as error:  # truncated, not an image, ...
            # Skipped rather than fatal: one bad file should not end a long run. Training counts the
            # skips per epoch and stops past max_bad_image_fraction (engine.check_skipped_images).
            logger.warning("skipping unreadable image %s: %s", self.image_paths[index], error)
            return None
        boxes, labels = self.get_annotations(index)
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
        if (height, width) != self.image_size(index):
            boxes = self._on_size_mismatch(index, boxes, (height, width))
        if scale != 1:  # exact in float32: a power of two and multiples of 1/8
            boxes = tv_tensors.wrap(boxes / scale + torch.tensor(origin * 2, dtype=boxes.dtype), like=boxes,
                                    canvas_size=tuple(image.shape[-2:]))
        if self.transforms is not None:
            with seeded_rng(seed):
                image, out = self.transforms(tv_tensors.Image(image), {"boxes": boxes, "labels": labels})
            image, boxes, labels = image.as_subclass(torch.Tensor), out["boxes"], out["labels"]
        target = {"boxes_xyxy": boxes.as_subclass(torch.Tensor).to(torch.float32), "labels": labels,
                  "image_id": self.image_ids[index], "orig_size": torch.tensor([height, width]),
                  "decode_scale": scale, "decode_origin": origin}
        return image, target

    def _on_size_mismatch(self, index, boxes, size):
        # Usually EXIF-rotated photos annotated in the stored frame, or a JSON made for resized images.
        if not self._warned_size_mismatch:
            self._warned_size_mismatch = True
            logger.warning("%s is %s (H, W) but %s says %s; boxes clamped to the image (warned once)",
                           self.image_paths[index], size, self.ann_file, self.image_size(index))
        return F.clamp_bounding_boxes(boxes)


# ------------------------------------------------------------------------------------------ transforms

class ResizeLongestSide(v2.Transform):
    """Resize so the longest side is ``size``: (round(H * s), round(W * s)) with s = size / max(H, W)."""

    def __init__(self, size, antialias=True):
        super().__init__()
        self.size, self.antialias = size, antialias

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        scale = self.size / max(height, width)
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt, params):
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=self.antialias)


class PadToSquare(v2.Transform):
    """Pad right and bottom to ``size`` x ``size``, so (0, 0) stays put and boxes map back by a scale only."""

    def __init__(self, size, fill=LETTERBOX_FILL):
        super().__init__()
        self.size, self.fill = size, fill

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        if height > self.size or width > self.size:
            raise ValueError(f"PadToSquare({self.size}) got a larger input {(height, width)}")
        return {"padding": [0, 0, self.size - width, self.size - height]}  # left, top, right, bottom

    def transform(self, inpt, params):
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=self.fill)


def augmented_side(preset, img_size):
    """The longest image side a preset's pipeline can use: img_size times its largest zoom (ScaleJitter's upper
    scale; zoom-out and crops never enlarge the photo further). A dataset decodes its photos at no less
    (``decode_side``)."""
    if preset not in TRANSFORM_PRESETS:
        raise ValueError(f"unknown transform preset {preset!r}; choose from {', '.join(TRANSFORM_PRESETS)}")
    return math.ceil(img_size * SCALE_RANGES.get(preset, (1.0, 1.0))[1])


def build_transforms(preset, img_size):
    """Build a v2 pipeline for ``(tv_tensors.Image uint8, {"boxes": BoundingBoxes, "labels"})``.

    Args:
        preset: ``"strong"`` (pretraining: photometric distortion, zoom-out, scale jitter 0.5-1.5, random
            crop/pad, flip), ``"moderate"`` (fine-tuning: mild colour jitter, scale jitter 0.75-1.25,
            crop/pad, flip) or ``"letterbox"`` (deterministic: longest side to ``img_size``, pad
            right/bottom with grey 114; a box maps back by dividing by ``img_size / max(H, W)``).
        img_size: side S of the square output.

    Returns:
        ``v2.Compose`` whose output image is float32 (3, S, S) in [0, 1]; boxes follow the geometry and
        boxes smaller than 1 px after cropping are removed with their labels. Empty targets are fine.
    """
    size = (img_size, img_size)
    crop = v2.RandomCrop(img_size, pad_if_needed=True, fill=LETTERBOX_FILL)
    to_float = v2.ToDtype(torch.float32, scale=True)  # images only; boxes keep their dtype
    if preset == "strong":
        # Photometric distortion after ScaleJitter, on about img_size^2 pixels instead of the full photo:
        # per pixel it commutes with resizing, and on a full photo its hue shift was most of the loader's time
        # (benchmarks/speed.py). Zoom-out's grey may be tinted too, as in YOLO's HSV step.
        steps = [v2.RandomZoomOut(fill=LETTERBOX_FILL, side_range=(1.0, 2.0), p=0.3),
                 v2.ScaleJitter(size, scale_range=SCALE_RANGES["strong"]), v2.RandomPhotometricDistort(p=0.5), crop,
                 v2.RandomHorizontalFlip(), to_float, v2.SanitizeBoundingBoxes()]
    elif preset == "moderate":
        # ColorJitter rather than RandomPhotometricDistort: the latter also permutes channels, which
        # fine-tuning on a single class whose colour matters should not see.
        # As in strong, the jitter runs after ScaleJitter, on about img_size^2 pixels instead of the whole
        # photo (its hue step dominated the loader; benchmarks/results/speed.md).
        jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
        steps = [v2.ScaleJitter(size, scale_range=SCALE_RANGES["moderate"]), v2.RandomApply([jitter], p=0.3), crop,
                 v2.RandomHorizontalFlip(), to_float, v2.SanitizeBoundingBoxes()]
    elif preset == "letterbox":
        steps = [ResizeLongestSide(img_size), PadToSquare(img_size), to_float, v2.SanitizeBoundingBoxes()]
    else:
        raise ValueError(f"unknown transform preset {preset!r}; choose from {', '.join(TRANSFORM_PRESETS)}")
    return v2.Compose(steps)


# ------------------------------------------------------------------------------------------ batching

def collate_fn(batch):
    """Batch ``(image, target)`` items; None items (unreadable images) are left out.

    Returns:
        (images, targets): images stacked to (B, 3, S, S) when all shapes agree, else a list of
        (3, H, W); targets a list of dicts. None when every item was None.
    """
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    images, targets = zip(*batch)
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images), list(targets)
    return list(images), list(targets)


def usable_cpus():
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers(batch_size=None):
    """DataLoader workers: the usable CPUs, at most 8 and at most ``batch_size``; 0 on a single CPU."""
    cpus = usable_cpus()
    if cpus <= 1:
        return 0
    return min(cpus, 8, batch_size or 8)


@contextlib.contextmanager
def seeded_rng(seed):
    """Python's, NumPy's and torch's CPU RNGs seeded by ``seed`` inside, the caller's states back afterwards (so
    with workers=0 training's own random stream does not move); a no-op for None."""
    if seed is None:
        yield
        return
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed, which reseeds the CUDA generators too
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


ORDER_KEY, ITEM_KEY = 0, 1  # first word of derived_seed's keys: an epoch's order and an item's never share a seed


def derived_seed(*keys):
    """A 64-bit seed from integer keys; NumPy's SeedSequence hashes them, so nearby keys give unrelated seeds."""
    return int(np.random.SeedSequence([key % 2 ** 64 for key in keys]).generate_state(1, np.uint64)[0])


class SeededSampler(torch.utils.data.Sampler):
    """An epoch's indices, each with the seed of its augmentation: ``(index, seed)`` keys of a
    ``CocoDetectionDataset``.

    The order is a shuffle seeded by (seed, epoch), ``sampler``'s order (a DistributedSampler, given the epoch) or
    0..N-1; an item's seed depends on (seed, epoch, index) alone, as torch.utils.data advises for per-sample
    randomness. So the batches do not depend on the number of workers, on which worker loads an item or on what it
    loaded before, and a run resumed at epoch k sees the pixels an uninterrupted one saw (issue #24: persistent
    workers carry their own RNG state from epoch to epoch, and no checkpoint holds it). Each pass over the
    sampler is the next epoch unless ``set_epoch`` says which.
    """

    def __init__(self, num_samples, shuffle=True, seed=0, sampler=None):
        self.num_samples, self.shuffle, self.seed, self.sampler = num_samples, shuffle, seed, sampler
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.sampler) if self.sampler is not None else self.num_samples

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            order = list(self.sampler)
        elif self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(ORDER_KEY, self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        return ((index, derived_seed(ITEM_KEY, self.seed, epoch, index)) for index in order)


def build_dataloader(dataset, batch_size, shuffle, num_workers=None, drop_last=False, seed=0, sampler=None):
    """A DataLoader over a ``CocoDetectionDataset`` with ``collate_fn``.

    Its ``SeededSampler`` makes the order and the random augmentations a function of ``seed``, the epoch and each
    item's index: the same batches run to run, with any number of workers, and after a resume. Call
    ``loader.sampler.set_epoch(epoch)`` before an epoch (without it each pass is the next epoch).
    ``num_workers=None`` -> ``default_num_workers``. A ``sampler`` (e.g. a DistributedSampler, which shuffles
    itself) replaces ``shuffle``.
    """
    if num_workers is None:
        num_workers = default_num_workers(batch_size)
    sampler = SeededSampler(len(dataset), shuffle, seed, sampler)
    # The generator only draws the workers' base seed, which no augmentation uses now; without it each new
    # iterator would draw that seed from the global RNG, which training uses.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_fn, drop_last=drop_last,
                                       generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


# -------------------------------------------------------------------------------------------- report

def _size_bands(dataset, img_size):
    """Counts of boxes in COCO's small/medium/large bands after letterbox scaling to ``img_size``."""
    bands = np.zeros(3, dtype=np.int64)
    for index in range(len(dataset)):
        boxes, _ = dataset.get_annotations(index)
        scale = img_size / max(dataset.image_size(index))
        areas = torchvision.ops.box_area(boxes).numpy() * scale ** 2
        bands += np.bincount(np.digitize(areas, [SMALL_AREA, MEDIUM_AREA]), minlength=3)
    return bands


def dataset_report(dataset, img_size):
    """A short, human-readable report of a ``CocoDetectionDataset`` (no image is loaded).

    Covers images found/missing, boxes per class, boxes per image, box sizes in COCO's small (< 32^2),
    medium (< 96^2) and large bands after scaling the longest side to ``img_size``, images without
    boxes, and what init dropped and why.
    """
    s = dataset.stats
    labels = dataset._labels
    per_image = np.diff(dataset._offsets)
    per_class = np.bincount(labels, minlength=len(dataset.class_names))
    small, medium, large = _size_bands(dataset, img_size)
    empty = ("kept as negatives" if dataset.include_empty else f"dropped ({s['images_dropped_empty']})")
    lines = [f"annotations: {dataset.ann_file}", f"images root: {dataset.image_root}",
             f"images: {s['images_total']} listed, {s['images_total'] - s['images_missing']} found, "
             f"{s['images_missing']} missing; {len(dataset)} in the dataset",
             f"images without boxes: {s['images_without_boxes']} ({empty})",
             f"classes: {len(dataset.class_names)}, boxes: {len(labels)}"]
    lines += [f"  {name} (category_id {cid}): {count} boxes"
              for name, cid, count in zip(dataset.class_names, dataset.category_ids, per_class)]
    if len(per_image):
        lines.append(f"boxes per image: min {per_image.min()}, mean {per_image.mean():.2f}, max {per_image.max()}")
    lines += [f"box sizes at img_size {img_size}: small (< 32^2) {small}, medium (< 96^2) {medium}, "
              f"large {large}",
              f"ignored: {s['crowd_ignored']} crowd annotations, {s['annotations_other_classes']} annotations "
              f"of other classes",
              f"boxes clipped to the image: {s['boxes_clipped']}",
              f"boxes dropped: {s['boxes_dropped']} ({s['boxes_dropped_degenerate']} under 1 px or outside "
              f"the image, {s['boxes_dropped_invalid']} non-finite or malformed)",
              f"images dropped: {s['images_missing']} missing on disk, {s['images_unreadable']} unreadable without "
              f"a size, {s['images_dropped_empty']} without boxes"]
    lines += report_warnings(dataset, img_size, per_class)
    return "\n".join(lines)


def report_warnings(dataset, img_size, per_class, tiny_side=8):
    """WARNING lines for data that will train badly: classes without boxes, boxes too small for img_size
    (under ``tiny_side`` px after scaling, about one cell of the finest stride-8 level), no boxes at all."""
    warnings = [f"WARNING: class {name!r} has no boxes; the model cannot learn it"
                for name, count in zip(dataset.class_names, per_class) if count == 0]
    tiny = 0
    for index in range(len(dataset)):
        boxes, _ = dataset.get_annotations(index)
        scale = img_size / max(dataset.image_size(index))
        tiny += int(((boxes[:, 2:] - boxes[:, :2]).min(dim=1).values * scale < tiny_side).sum()) if len(boxes) else 0
    total = int(per_class.sum())
    if tiny and tiny >= 0.1 * total:
        warnings.append(f"WARNING: {tiny}/{total} boxes are under {tiny_side} px on a side at img_size {img_size}; "
                        f"they are hard to detect at this input size: raise --img-size or crop the images")
    if total == 0:
        warnings.append("WARNING: no boxes at all: there is nothing to learn from this data")
    dropped = dataset.stats["boxes_dropped"]
    if dropped and dropped >= 0.05 * (total + dropped):
        warnings.append(f"WARNING: {dropped} of {total + dropped} boxes were dropped as degenerate, outside the "
                        f"image or non-finite: check how the annotation file was exported")
    return warnings


def get_args_parser():
    parser = argparse.ArgumentParser(description="Report on a detection data set, or write it as COCO JSON.",
                                     epilog=COCO_LAYOUT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", required=True, help="a COCO JSON, a Pascal VOC folder, a YOLO data.yaml or labels "
                                                     "folder")
    parser.add_argument("--root", help="the images' folder (needed for COCO JSON; VOC and YOLO find theirs)")
    parser.add_argument("--split", default="train", choices=("train", "val"), help="a data.yaml's split")
    parser.add_argument("--to-coco", metavar="OUT.json", help="write the annotations as one COCO instances JSON")
    parser.add_argument("--class-name", action="append", default=None,
                        help="keep only this class (repeat for several); default: all")
    parser.add_argument("--img-size", type=int, default=320, help="model input side for the size bands")
    return parser


def main(argv=None):
    """CLI entry point: print ``dataset_report`` and return it."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.img_size < 1:
        raise ValueError(f"--img-size must be >= 1, got {args.img_size}")
    data, root, kind = read_annotations(args.ann, args.root, args.split)
    dataset = CocoDetectionDataset({**data, "info": {"source": args.ann}}, root, classes=args.class_name)
    report = f"format: {FORMATS[kind]}\n" + dataset_report(dataset, args.img_size)
    print(report)
    if args.to_coco:
        write_json_atomic(dataset.coco.dataset, args.to_coco, indent=None)
        print(f"wrote {args.to_coco}: {len(data['images'])} images, {len(data['annotations'])} boxes; its images "
              f"are under {root}")
    return report


def run():
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    run_cli(main, None, bad_input=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    run()
