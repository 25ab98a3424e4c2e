"""Annotations as people have them, read into one in-memory COCO dict: COCO JSON, Pascal VOC XML, YOLO txt.

    read_annotations("data/annotations.json", "data/images")    # COCO instances JSON (images under a root)
    read_annotations("kangaroo/annots")                         # Pascal VOC: a folder of XML (LabelImg, CVAT)
    read_annotations("roads/data.yaml", split="val")            # YOLO (Ultralytics): data.yaml ...
    read_annotations("roads/labels/train")                      # ... or a labels folder beside images/

The format is told by the path: a .json file, a folder of .xml files (or with Annotations/ or annots/ in it), a
data.yaml, or a folder of .txt labels. Every format becomes the same records, a COCO dict (images with file names
relative to the image root, xywh pixel boxes, categories), which pycocotools indexes in memory for the dataset and
for COCOeval. This module writes nothing and imports none of the toolkit's (config.write_json_atomic saves a COCO
dict). Pascal VOC's `difficult` objects become COCO crowd boxes (ignored in training and evaluation alike); its
1-based pixel corners become COCO's 0-based coordinates, as Detectron2 reads them.

IMAGE_EXTENSIONS is the one list of image files every command reads (training, predict.py --source, INT8
calibration).

`hash_split` holds out a part of one annotated folder for validation, by a hash of each image's path, so adding
images later never moves an old image across the split.
"""
import collections
import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import xml.etree.ElementTree as ET

from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VOC_ANNOTATION_DIRS = ("Annotations", "annots", "annotations")
VOC_IMAGE_DIRS = ("JPEGImages", "images", "Images")
COCO_FIELDS = {"images": ("id", "file_name"), "annotations": ("image_id", "category_id", "bbox"),
               "categories": ("id", "name")}
FORMATS = {"coco": "COCO JSON", "voc": "Pascal VOC XML", "yolo": "YOLO txt"}
EXIF_ORIENTATION = 0x0112
# Labels written with 6 decimals (Ultralytics, Roboflow) put a box edge that touches the image a rounding step past
# it (cx + w / 2 = 1.0000005): that is the edge, not a box to clip and warn about.
YOLO_EDGE_TOLERANCE = 1e-5


def detect_format(path):
    """'coco', 'voc' or 'yolo' from the path a user gave; a one-line error when it is none of them."""
    path = str(path)
    if os.path.isfile(path):
        if path.lower().endswith(".json"):
            return "coco"
        if path.lower().endswith((".yaml", ".yml")):
            return "yolo"
        raise ValueError(f"annotations {path}: expected a COCO .json file, a YOLO data.yaml, or a folder of Pascal "
                         f"VOC .xml or YOLO .txt files")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    if _voc_folder(path):
        return "voc"
    if _yolo_labels(path) or os.path.isdir(os.path.join(path, "labels")):
        return "yolo"
    raise ValueError(f"no annotations in folder {path}: expected Pascal VOC .xml files (there, or in Annotations/ or "
                     f"annots/) or YOLO .txt labels (there, or in labels/)")


def read_annotations(path, image_root=None, split="train"):
    """Read annotations of any supported format.

    Args:
        path: a COCO .json, a folder of VOC .xml, a YOLO data.yaml or a YOLO labels folder.
        image_root: folder the images lie under; needed for COCO JSON, found when None for VOC (JPEGImages/ or
            images/ beside the XML folder, else the XML folder itself) and YOLO (images/ where labels/ is).
        split: a data.yaml's "train" or "val" entry.
    Returns:
        (COCO-format dict, image root, format name).
    Raises:
        FileNotFoundError or ValueError, one line naming the file and the problem.
    """
    kind = detect_format(path)
    if kind == "coco":
        if image_root is None:
            raise ValueError(f"{path} is a COCO JSON: pass the folder its file_name entries are relative to (--root "
                             f"or --train-root/--val-root)")
        data = read_coco_json(path)
        check_coco_dict(data, path)
        return data, str(image_root), kind
    if kind == "voc":
        data, root = read_voc(path, image_root)
        return data, root, kind
    data, root = read_yolo(path, image_root, split)
    return data, root, kind


def load_annotations(path, image_root=None, split="train"):
    """read_annotations, then checked and indexed by pycocotools: (COCO object, image root, format name)."""
    data, root, kind = read_annotations(path, image_root, split)
    return index_coco(data, path), root, kind


def index_coco(data, source):
    """A COCO dict checked (one-line errors naming `source`), with COCOeval's optional fields filled, indexed."""
    check_coco_dict(data, source)
    fill_coco_defaults(data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


# ---- COCO JSON --------------------------------------------------------------------------------------------
def read_coco_json(path):
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file {path} is not JSON ({error}); pass a COCO instances file") from None


def check_coco_dict(data, source):
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {source} holds a JSON {type(data).__name__}, not a COCO dict with "
                         f"images, annotations and categories")
    missing = [key for key in COCO_FIELDS if key not in data]
    if missing:
        raise ValueError(f"annotation file {source} is not COCO: it lacks {', '.join(missing)} (a COCO instances "
                         f"file has images, annotations and categories lists; found keys {sorted(data)[:8]})")
    for key, fields in COCO_FIELDS.items():
        if not isinstance(data[key], list):
            raise ValueError(f"annotation file {source}: {key!r} must be a list, got a {type(data[key]).__name__}")
        for position, entry in enumerate(data[key]):
            absent = [field for field in fields if not isinstance(entry, dict) or field not in entry]
            if absent:
                raise ValueError(f"annotation file {source}: {key}[{position}] lacks {', '.join(absent)} "
                                 f"(each entry needs {', '.join(fields)})")
    for key in ("images", "annotations"):
        # pycocotools indexes by id and keeps the last entry of each: a duplicate image id merges two photos (one
        # disappears, its boxes go to the other), a duplicate annotation id scores one box twice and the other never.
        counts = collections.Counter(entry["id"] for entry in data[key] if isinstance(entry.get("id"), (int, str)))
        repeated = [entry_id for entry_id, count in counts.items() if count > 1]
        if repeated:
            raise ValueError(f"annotation file {source}: {len(repeated)} {key} ids appear more than once (id "
                             f"{repeated[0]!r} {counts[repeated[0]]} times); give every {key} entry its own id")


def fill_coco_defaults(data):
    """Fill what a COCO file may leave out but pycocotools reads, in place: annotation ``id`` (numbered on past
    the largest), ``iscrowd`` 0 and ``area`` = box width x height (COCO's own area is the mask's; for boxes only,
    the box's)."""
    next_id = max((ann["id"] for ann in data["annotations"] if isinstance(ann.get("id"), int)), default=0) + 1
    for ann in data["annotations"]:
        if "id" not in ann:  # pycocotools indexes annotations by id
            ann["id"], next_id = next_id, next_id + 1
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            bbox = ann.get("bbox")
            valid = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
            ann["area"] = float(bbox[2] * bbox[3]) if valid else 0.0
    return data


# ---- building records -----------------------------------------------------------------------------------------
class _Records:
    """Accumulates images, boxes and categories (ids 1..K in sorted name order) into a COCO dict."""

    def __init__(self):
        self.images, self.boxes, self.names = [], [], set()

    def add_image(self, file_name, width=None, height=None):
        image = {"id": len(self.images) + 1, "file_name": file_name.replace(os.sep, "/")}
        if width and height:
            image.update(width=int(width), height=int(height))
        self.images.append(image)
        return image["id"]

    def add_box(self, image_id, name, bbox_xywh, crowd=0):
        self.names.add(name)
        self.boxes.append((image_id, name, [float(v) for v in bbox_xywh], int(bool(crowd))))

    def coco(self, names=None):
        """The COCO dict; `names` (a list) fixes the categories and their order, else the sorted names seen."""
        names = list(names) if names is not None else sorted(self.names)
        ids = {name: i + 1 for i, name in enumerate(names)}
        annotations = [{"id": i + 1, "image_id": image_id, "category_id": ids[name], "bbox": bbox,
                        "area": bbox[2] * bbox[3], "iscrowd": crowd}
                       for i, (image_id, name, bbox, crowd) in enumerate(self.boxes)]
        return {"images": self.images, "annotations": annotations,
                "categories": [{"id": ids[name], "name": name} for name in names]}


def _image_size(path):
    """(width, height) of an image as displayed (EXIF orientations 5-8 turn it a quarter), from its header."""
    with Image.open(path) as img:
        width, height = img.size
        return (height, width) if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def _find_image(folder, name):
    """`folder/name`, or an image of the same stem with any extension (annotations often lose or change it)."""
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    stem = os.path.splitext(path)[0]
    for candidate in (stem + ext for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)):
        if os.path.isfile(candidate):
            return candidate
    return None


def _warn_counts(source, counts, examples):
    if counts:
        parts = [f"{n} {what} (e.g. {examples[what]})" for what, n in counts.items()]
        logger.warning("%s: %s", source, "; ".join(parts))


# ---- Pascal VOC ----------------------------------------------------------------------------------------------
def _voc_folder(path):
    """The folder holding a VOC set's XML files: `path` itself or its Annotations/ or annots/; None if none."""
    for folder in (path, *(os.path.join(path, d) for d in VOC_ANNOTATION_DIRS)):
        if os.path.isdir(folder) and glob.glob(os.path.join(glob.escape(folder), "**", "*.xml"), recursive=True):
            return folder
    return None


def _voc_image_root(xml_folder, image_root):
    if image_root is not None:
        return str(image_root)
    parent = os.path.dirname(os.path.abspath(xml_folder))
    for name in VOC_IMAGE_DIRS:
        for base in (parent, xml_folder):
            if os.path.isdir(os.path.join(base, name)):
                return os.path.join(base, name)
    return xml_folder  # XML next to the images (LabelImg's default)


def read_voc(path, image_root=None):
    """Pascal VOC XML files (LabelImg, CVAT, Label Studio exports) as a COCO dict and the image root.

    The image of `a/b.xml` is `<filename>` in `image_root/a/` (an image of the same stem if that file is missing);
    a size missing from the XML is read from the image. Boxes: VOC's 1-based corners to COCO xywh (xmin - 1, ymin - 1,
    xmax - xmin + 1, ymax - ymin + 1); `difficult` objects become crowd boxes. Unreadable XML and malformed boxes are
    skipped and counted in one warning.
    """
    folder = _voc_folder(str(path))
    if folder is None:
        raise ValueError(f"no Pascal VOC .xml files in {path} (nor in its Annotations/ or annots/)")
    root = _voc_image_root(folder, image_root)
    records, counts, examples = _Records(), collections.Counter(), {}

    def skip(what, example):
        counts[what] += 1
        examples.setdefault(what, example)

    for xml_path in sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.xml"), recursive=True)):
        relative_dir = os.path.relpath(os.path.dirname(xml_path), folder)
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as error:
            skip("unreadable XML files", f"{xml_path}: {error}")
            continue
        name = (tree.findtext("filename") or "").strip() or os.path.splitext(os.path.basename(xml_path))[0] + ".jpg"
        name = os.path.basename(name.replace("\\", "/"))
        found = _find_image(os.path.join(root, relative_dir), name)
        file_name = os.path.normpath(os.path.relpath(found, root) if found else os.path.join(relative_dir, name))
        size = tree.find("size")
        width, height = (_int(size.findtext("width")), _int(size.findtext("height"))) if size is not None else (0, 0)
        image_id = records.add_image(file_name, width, height)
        for obj in tree.iter("object"):
            label = (obj.findtext("name") or "").strip()
            box = obj.find("bndbox")
            corners = [_float(box.findtext(k)) if box is not None else None for k in ("xmin", "ymin", "xmax", "ymax")]
            if not label or None in corners:
                skip("objects without a name or a bndbox", xml_path)
                continue
            x0, y0, x1, y1 = corners
            records.add_box(image_id, label, [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1],
                            crowd=_int(obj.findtext("difficult")))
    if not records.images:
        raise ValueError(f"no Pascal VOC annotations could be read in {folder}: {dict(counts)}")
    _warn_counts(folder, counts, examples)
    return records.coco(), root


def _int(text):
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return 0


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# ---- YOLO ----------------------------------------------------------------------------------------------------------
def _yolo_labels(folder):
    return glob.glob(os.path.join(glob.escape(folder), "**", "*.txt"), recursive=True)


def _yolo_names(value, source):
    """data.yaml's names: a list, or a dict {index: name} with indices 0..K-1."""
    if isinstance(value, dict):
        if not all(isinstance(k, int) or str(k).strip().isdigit() for k in value) or \
                sorted(int(k) for k in value) != list(range(len(value))):
            raise ValueError(f"{source}: names must be indexed 0..{len(value) - 1} (names: {{0: a, 1: b}} or "
                             f"names: [a, b]), got {list(value)}")
        return [str(value[k]) for k in sorted(value, key=int)]
    if isinstance(value, list) and value:
        return [str(name) for name in value]
    raise ValueError(f"{source} has no class names (names: [a, b, ...])")


def _read_yaml(path):
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not a readable YAML file: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no YOLO data.yaml mapping (path, train, val, names)")
    return data


def read_yaml_entry(path, key):
    """One entry of a YOLO data.yaml (None when absent)."""
    return _read_yaml(path).get(key)


def _names_near(labels_folder):
    """Class names for a labels folder: classes.txt there or above it, else a data.yaml above it."""
    folder = os.path.abspath(labels_folder)
    for _ in range(3):
        classes = os.path.join(folder, "classes.txt")
        if os.path.isfile(classes):
            with open(classes, encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
        for name in ("data.yaml", "dataset.yaml"):
            if os.path.isfile(os.path.join(folder, name)):
                return _yolo_names(_read_yaml(os.path.join(folder, name)).get("names"), os.path.join(folder, name))
        folder = os.path.dirname(folder)
    raise ValueError(f"no class names for the YOLO labels in {labels_folder}: put a classes.txt (one name per line) "
                     f"or a data.yaml (names: [...]) beside it or above it")


def _swap_last(folder, old, new):
    """`folder` with its last path component named `old` renamed `new`; `folder` itself when none is."""
    parts = os.path.abspath(folder).split(os.sep)
    if old not in parts:
        return str(folder)
    index = len(parts) - 1 - parts[::-1].index(old)
    return os.sep.join(parts[:index] + [new] + parts[index + 1:])


def _images_for_labels(labels_folder):
    """Ultralytics' layout: .../images/... holds the images of .../labels/... (the last 'labels' swapped)."""
    return _swap_last(labels_folder, "labels", "images")  # labels next to the images when no folder is 'labels'


def _labels_for_images(images_folder):
    """Ultralytics' img2label_paths: only the last 'images' becomes 'labels', for a parent folder may be called
    images too (.../images/proj/ds/images/train -> .../images/proj/ds/labels/train)."""
    return _swap_last(images_folder, "images", "labels")


def _data_yaml_folder(base, entry):
    """A data.yaml's train/val folder as Ultralytics resolves it: `base/entry`, else, for an entry starting with
    '../' that is not there, `base/entry[3:]` (Roboflow's exports say train: ../train/images of the train/
    folder beside data.yaml)."""
    folder = os.path.normpath(os.path.join(base, entry))
    if not os.path.exists(folder) and entry.startswith("../"):
        return os.path.normpath(os.path.join(base, entry[3:]))
    return folder


def read_yolo(path, image_root=None, split="train"):
    """YOLO txt labels (Ultralytics' layout) as a COCO dict and the image root.

    `path` is a data.yaml (its `path` and `train`/`val` image folders, `names`) or a labels folder (images in the
    mirrored images/ folder, names from classes.txt or data.yaml). Each line is `class cx cy w h`, normalised to
    [0, 1] by the image size; an image without a label file is a negative, a set where no image has one is refused.
    Lines with another field count, an unknown class index or coordinates outside [0, 1] are skipped and counted in
    one warning; an edge within YOLO_EDGE_TOLERANCE past the image is on it.
    """
    path = str(path)
    if os.path.isfile(path):
        data = _read_yaml(path)
        names = _yolo_names(data.get("names"), path)
        base = os.path.join(os.path.dirname(os.path.abspath(path)), str(data.get("path") or ""))
        entry = data.get(split)
        if not entry:
            raise ValueError(f"{path} has no {split!r} entry (the folder of its {split} images)")
        if isinstance(entry, list) or str(entry).lower().endswith(".txt"):
            raise ValueError(f"{path}: {split} must be one folder of images (lists and .txt files of paths are not "
                             f"read); point it at an images/ folder")
        images_folder = str(image_root) if image_root else _data_yaml_folder(base, str(entry))
        labels_folder = _labels_for_images(images_folder)
    else:
        labels_folder = os.path.join(path, "labels") if not _yolo_labels(path) else path
        names = _names_near(labels_folder)
        images_folder = str(image_root) if image_root is not None else _images_for_labels(labels_folder)
    if not os.path.isdir(images_folder):
        raise FileNotFoundError(f"the images of the YOLO labels in {labels_folder} are not in {images_folder}; pass "
                                f"the image folder (--root or --train-root/--val-root)")
    images = sorted(p for p in glob.glob(os.path.join(glob.escape(images_folder), "**", "*"), recursive=True)
                    if p.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {images_folder}")
    records, counts, examples, labelled = _Records(), collections.Counter(), {}, 0
    for image_path in images:
        relative = os.path.relpath(image_path, images_folder)
        try:
            width, height = _image_size(image_path)
        except (OSError, UnidentifiedImageError):
            width = height = None  # the dataset skips it as unreadable
        image_id = records.add_image(relative, width, height)
        label_path = os.path.join(labels_folder, os.path.splitext(relative)[0] + ".txt")
        labelled += os.path.isfile(label_path)
        if width and os.path.isfile(label_path):
            for line in _lines(label_path):
                box, problem = _yolo_box(line, len(names), width, height)
                if problem:
                    counts[problem] += 1
                    examples.setdefault(problem, f"{label_path}: {line!r}")
                else:
                    records.add_box(image_id, names[box[0]], box[1])
    if not labelled:  # a wrong labels folder would train every image as a negative
        raise ValueError(f"none of the {len(images)} images in {images_folder} has a label file in {labels_folder} "
                         f"(YOLO's layout: the last images/ folder of their path becomes labels/); put the .txt "
                         f"labels there")
    _warn_counts(labels_folder, counts, examples)
    if counts and not records.boxes:
        raise ValueError(f"none of the YOLO label lines in {labels_folder} could be read: {dict(counts)}")
    return records.coco(names), images_folder


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _yolo_box(line, num_classes, width, height):
    """((class index, COCO xywh), None) from one label line, or (None, what is wrong)."""
    fields = line.split()
    if len(fields) != 5:
        return None, "lines without 5 fields (class cx cy w h)"
    try:
        label, values = float(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        return None, "lines that are not numbers"
    if not label.is_integer() or not 0 <= label < num_classes:
        return None, f"lines of a class index outside 0..{num_classes - 1}"
    cx, cy, w, h = values
    if not all(0 <= v <= 1 for v in values) or w <= 0 or h <= 0:
        return None, "lines with coordinates outside [0, 1]"
    x0, x1 = (_onto_edge(v) * width for v in (cx - w / 2, cx + w / 2))
    y0, y1 = (_onto_edge(v) * height for v in (cy - h / 2, cy + h / 2))
    return (int(label), [x0, y0, x1 - x0, y1 - y0]), None


def _onto_edge(value):
    """A normalised corner within YOLO_EDGE_TOLERANCE past 0 or 1 put on that edge, so it is not clipped later."""
    if -YOLO_EDGE_TOLERANCE < value < 0:
        return 0.0
    return 1.0 if 1 < value < 1 + YOLO_EDGE_TOLERANCE else value


# ---- one folder, split for you ------------------------------------------------------------------------------------
def in_validation(file_name, fraction):
    """Whether an image belongs to the held-out part: its path's hash, as a number in [0, 1), is below
    `fraction`. Each image decides for itself, so adding images never moves an old one across the split."""
    digest = hashlib.sha1(file_name.replace(os.sep, "/").encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def subset(data, file_names):
    """The COCO dict of the images whose file_name is in `file_names`, with their boxes and every category."""
    keep = {image["id"] for image in data["images"] if image["file_name"] in file_names}
    return {**data, "images": [image for image in data["images"] if image["id"] in keep],
            "annotations": [ann for ann in data["annotations"] if ann["image_id"] in keep]}


def hash_split(data, fraction):
    """(train file names, val file names) of a COCO dict, val holding about `fraction` of the images."""
    names = [image["file_name"] for image in data["images"]]
    held_out = [in_validation(name, fraction) for name in names]
    return ([name for name, out in zip(names, held_out) if not out], [name for name, out in zip(names, held_out) if out])
