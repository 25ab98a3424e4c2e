"""Shared pytest fixtures: a tiny synthetic shapes data set and a builder for hand-written COCO JSONs."""
import json

import numpy as np
import pytest
from PIL import Image

from synthetic_data import write_shapes_split


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
    """8 train images (128 px) of 2 classes, one of them without objects; category ids 1 and 3.

    Returns:
        dict with ``image_dir``, ``ann_path`` and ``class_names``.
    """
    root = tmp_path_factory.mktemp("shapes")
    class_names = ["square", "circle"]
    ann_path = write_shapes_split(root / "images", root / "train.json", num_images=8, class_names=class_names,
                                  img_size=128, seed=0, empty_fraction=0.125)
    return {"image_dir": str(root / "images"), "ann_path": ann_path, "class_names": class_names}


def write_coco_json(path, categories, images, annotations):
    """Write a COCO JSON from compact tuples.

    Args:
        categories: [(category_id, name)].
        images: [(image_id, file_name, width, height)].
        annotations: [(image_id, category_id, bbox_xywh)] or [(image_id, category_id, bbox_xywh, iscrowd)].
    """
    data = {"categories": [{"id": cid, "name": name} for cid, name in categories],
            "images": [{"id": iid, "file_name": name, "width": w, "height": h} for iid, name, w, h in images],
            "annotations": []}
    for ann_id, (image_id, category_id, bbox, *crowd) in enumerate(annotations, start=1):
        area = bbox[2] * bbox[3] if len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox) else 0
        data["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": category_id,
                                    "bbox": bbox, "area": area, "iscrowd": crowd[0] if crowd else 0})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def make_coco(tmp_path):
    """Builder of a tiny COCO set in ``tmp_path``: ``make_coco(categories, images, annotations)``.

    Tuples as in ``write_coco_json``; every image is written as a mid-grey JPEG of its size under
    ``tmp_path/images`` unless ``write_images=False``. Returns ``(ann_path, image_root)``.
    """
    def build(categories, images, annotations, write_images=True, name="ann.json"):
        image_root = tmp_path / "images"
        image_root.mkdir(exist_ok=True)
        if write_images:
            for _, file_name, width, height in images:
                (image_root / file_name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(image_root / file_name)
        return write_coco_json(tmp_path / name, categories, images, annotations), str(image_root)
    return build
