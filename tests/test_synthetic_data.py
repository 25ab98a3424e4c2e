"""The demo's synthetic data sets: COCO-layout multi-class scenes and whiteline road scenes."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import make_synthetic_data
from dataset_coco import CocoDetectionDataset, coco_layout_paths
from synthetic_data import SCENE_CLASSES, _object_mask, make_dataset, render_whiteline


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_scene_classes_differ_in_shape_not_only_colour():
    assert len(SCENE_CLASSES) >= 24
    rng = np.random.default_rng(0)
    masks = {name: np.asarray(_object_mask(rng, name, (64, 64), (48, 48), (32, 32), 0.0)) > 0
             for name in SCENE_CLASSES}
    names = list(masks)
    for i, a in enumerate(names):  # every pair of unrotated masks differs in at least 3% of the pixels
        for b in names[i + 1:]:
            assert (masks[a] != masks[b]).mean() > 0.03, (a, b)


def test_coco_kind_is_read_through_the_normal_coco_path(tmp_path):
    paths, written = make_dataset("coco", str(tmp_path / "coco"), num_train=20, num_val=4, seed=3, width=128,
                                  height=96)
    assert written and paths == coco_layout_paths(str(tmp_path / "coco"))
    train = CocoDetectionDataset(paths["train_ann"], paths["train_images"])
    data = read_json(paths["train_ann"])
    assert len(train.class_names) == len(SCENE_CLASSES)
    assert sum(1 for image in data["images"]
               if not any(a["image_id"] == image["id"] for a in data["annotations"])) >= 1  # empty images exist
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in data["annotations"]]
    assert min(sides) < 0.15 * 96 and max(sides) > 0.35 * 96  # varied scales
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 96


def test_whiteline_layout_matches_the_readme_and_boxes_cover_white_paint(tmp_path):
    root = tmp_path / "whiteline"
    paths, _ = make_dataset("whiteline", str(root), num_train=12, num_val=4, seed=0)
    assert paths["train_images"] == str(root / "train" / "JPEGImages")
    assert paths["val_ann"] == str(root / "val" / "annotations.json")
    assert os.path.isfile(root / "val" / "road_000000.jpg")
    data = read_json(paths["train_ann"])
    assert [c["name"] for c in data["categories"]] == ["whiteline"]
    assert len(data["annotations"]) > 12  # several marking segments per scene
    train = CocoDetectionDataset(paths["train_ann"], paths["train_images"], classes=["whiteline"])
    assert len(train) == 12
    # white paint lies inside the boxes: the brightest, least saturated pixels of a scene are mostly boxed
    # (glare is bright too, hence "mostly")
    boxed_share = []
    for image_info in data["images"]:
        pixels = np.asarray(Image.open(os.path.join(paths["train_images"], image_info["file_name"])), np.float32)
        white = (pixels.min(-1) > 200) & (pixels.max(-1) - pixels.min(-1) < 25)
        boxed = np.zeros(white.shape, bool)
        for ann in data["annotations"]:
            if ann["image_id"] == image_info["id"]:
                x, y, w, h = ann["bbox"]
                boxed[y:y + h, x:x + w] = True
        if white.sum() > 50:
            boxed_share.append((white & boxed).sum() / white.sum())
    assert np.median(boxed_share) > 0.8


def test_whiteline_scenes_have_distractors_that_are_not_labelled():
    rng = np.random.default_rng(5)
    yellow_pixels = 0
    for _ in range(10):
        image, objects = render_whiteline(rng, 160, 120)
        pixels = np.asarray(image, np.int32)
        yellow_pixels += int(((pixels[..., 0] > 170) & (pixels[..., 1] > 130) & (pixels[..., 2] < 90)).sum())
        assert all(label == 0 for label, _ in objects)
    assert yellow_pixels > 0  # yellow centre lines appear and are never a class


def test_generation_is_deterministic_and_cached(tmp_path):
    first, written = make_dataset("whiteline", str(tmp_path / "a"), 3, 2, seed=7)
    second, _ = make_dataset("whiteline", str(tmp_path / "b"), 3, 2, seed=7)
    assert written
    assert read_json(first["train_ann"]) == read_json(second["train_ann"])
    image_a = np.asarray(Image.open(os.path.join(first["train_images"], "road_000001.jpg")))
    image_b = np.asarray(Image.open(os.path.join(second["train_images"], "road_000001.jpg")))
    assert np.array_equal(image_a, image_b)
    mtime = os.path.getmtime(first["train_ann"])
    _, written_again = make_dataset("whiteline", str(tmp_path / "a"), 3, 2, seed=7)
    assert not written_again and os.path.getmtime(first["train_ann"]) == mtime
    _, rewritten = make_dataset("whiteline", str(tmp_path / "a"), 4, 2, seed=7)  # other arguments: rewritten
    assert rewritten and len(read_json(first["train_ann"])["images"]) == 4


def test_make_synthetic_data_cli(tmp_path, capsys):
    paths = make_synthetic_data.main(["--out", str(tmp_path), "--kind", "coco", "--num-train", "3", "--num-val", "2",
                                      "--width", "64", "--height", "64"])
    assert len(read_json(paths["val_ann"])["images"]) == 2
    assert "wrote" in capsys.readouterr().out
    make_synthetic_data.main(["--out", str(tmp_path), "--kind", "coco", "--num-train", "3", "--num-val", "2",
                              "--width", "64", "--height", "64"])
    assert "reused" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        make_synthetic_data.run(["--out", str(tmp_path), "--kind", "whiteline", "--num-train", "0"])
    assert error.value.code == 2
