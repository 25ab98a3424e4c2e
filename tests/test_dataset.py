"""Tests of dataset_coco.py (loading, class selection, sanitising, transforms, batching, report)
and of the synthetic_data.py generator that the other test files build on."""
import json
import logging
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

import config
import dataset_coco
import engine
from conftest import exits_with_one_line, write_bad_images, write_coco_json
from dataset_coco import (LETTERBOX_FILL, TRANSFORM_PRESETS, CocoDetectionDataset, build_dataloader,
                          build_transforms, coco_layout_paths, collate_fn, dataset_report, default_num_workers,
                          load_image, main, resolve_image_path)
from losses import DetectionLoss
from model_lightweight import create_lightweight_model
from synthetic_data import class_style, write_coco_layout, write_shapes_split

CATS = [(7, "dog"), (3, "cat"), (5, "bird")]


# -------------------------------------------------------------------------- labels, classes, sanitising

def test_xywh_to_xyxy_and_label_remap(make_coco):
    ann, root = make_coco([(7, "dog"), (3, "cat")], [(11, "a.jpg", 100, 80)],
                          [(11, 3, [10, 20, 30, 40]), (11, 7, [50, 5, 20, 10])])
    dataset = CocoDetectionDataset(ann, root)
    assert dataset.category_ids == [3, 7] and dataset.class_names == ["cat", "dog"]
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 80, 100)
    assert target["boxes_xyxy"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes_xyxy"], torch.tensor([[10., 20., 40., 60.], [50., 5., 70., 15.]]))
    assert target["labels"].tolist() == [0, 1]
    assert target["image_id"] == 11 and target["orig_size"].tolist() == [80, 100]


def test_classes_by_name_case_insensitive_in_given_order(make_coco):
    ann, root = make_coco(CATS, [(1, "a.jpg", 64, 64), (2, "b.jpg", 64, 64)],
                          [(1, 3, [1, 1, 10, 10]), (1, 7, [20, 20, 10, 10]), (2, 5, [5, 5, 9, 9])])
    dataset = CocoDetectionDataset(ann, root, classes=["DOG", "Cat"])
    assert dataset.class_names == ["dog", "cat"] and dataset.category_ids == [7, 3]
    _, target = dataset[0]
    assert sorted(zip(target["labels"].tolist(), target["boxes_xyxy"][:, 0].tolist())) == [(0, 20.0), (1, 1.0)]
    # the bird-only image stays as a negative: unselected classes are background
    assert len(dataset) == 2 and dataset[1][1]["labels"].numel() == 0
    assert dataset.stats["annotations_other_classes"] == 1


def test_unknown_class_name_lists_available(make_coco):
    ann, root = make_coco(CATS, [(1, "a.jpg", 64, 64)], [])
    with pytest.raises(ValueError, match="horse") as info:
        CocoDetectionDataset(ann, root, classes=["horse"])
    assert all(name in str(info.value) for name in ("dog", "cat", "bird"))


def test_classes_k_most_frequent_ignores_crowd_and_breaks_ties_by_id(make_coco):
    box = [1, 1, 10, 10]
    annotations = ([(1, 7, box)] * 3 + [(1, 5, box)] * 3 + [(1, 3, box)]  # dog 3, bird 3, cat 1
                   + [(1, 3, box, 1)] * 5)  # 5 crowd cats must not count
    ann, root = make_coco(CATS, [(1, "a.jpg", 64, 64)], annotations)
    dataset = CocoDetectionDataset(ann, root, classes=2)
    assert dataset.category_ids == [5, 7] and dataset.class_names == ["bird", "dog"]
    assert CocoDetectionDataset(ann, root, classes=1).class_names == ["bird"]
    with pytest.raises(ValueError):
        CocoDetectionDataset(ann, root, classes=4)


def test_crowd_ignored(make_coco):
    ann, root = make_coco(CATS, [(1, "a.jpg", 64, 64)], [(1, 3, [1, 1, 10, 10], 1), (1, 3, [30, 30, 10, 10])])
    dataset = CocoDetectionDataset(ann, root)
    assert dataset.stats["crowd_ignored"] == 1
    torch.testing.assert_close(dataset[0][1]["boxes_xyxy"], torch.tensor([[30., 30., 40., 40.]]))


def test_degenerate_outside_nan_boxes_dropped_or_clipped(make_coco):
    annotations = [(1, 3, [-10, -10, 30, 30]),      # clipped -> [0, 0, 20, 20]
                   (1, 3, [90, 70, 20, 20]),        # clipped -> [90, 70, 100, 80]
                   (1, 3, [200, 200, 10, 10]),      # outside -> dropped
                   (1, 3, [10, 10, 0, 5]),          # zero width -> dropped
                   (1, 3, [10, 10, 0.5, 5]),        # under 1 px -> dropped
                   (1, 3, [10, 10, -5, 5]),         # negative width -> dropped
                   (1, 3, [float("nan"), 1, 5, 5]),  # non-finite -> dropped
                   (1, 3, [1, 2, 3]),               # malformed -> dropped
                   (1, 3, [5.5, 6, 10, 12.5])]      # kept as is
    ann, root = make_coco(CATS, [(1, "a.jpg", 100, 80)], annotations)
    dataset = CocoDetectionDataset(ann, root)
    expected = torch.tensor([[0., 0., 20., 20.], [90., 70., 100., 80.], [5.5, 6., 15.5, 18.5]])
    torch.testing.assert_close(dataset[0][1]["boxes_xyxy"], expected)
    stats = dataset.stats
    assert (stats["boxes_clipped"], stats["boxes_dropped"], stats["boxes_kept"]) == (2, 6, 3)
    assert (stats["boxes_dropped_degenerate"], stats["boxes_dropped_invalid"]) == (4, 2)


def test_empty_images_kept_as_negatives_or_dropped(make_coco):
    images = [(1, "a.jpg", 64, 48), (2, "b.jpg", 64, 48), (3, "c.jpg", 64, 48)]
    annotations = [(1, 3, [1, 1, 10, 10]), (3, 3, [1, 1, 10, 10], 1)]  # image 3 has only a crowd box
    ann, root = make_coco(CATS, images, annotations)
    dataset = CocoDetectionDataset(ann, root)
    assert dataset.image_ids == [1, 2, 3] and dataset.stats["images_without_boxes"] == 2
    _, target = dataset[1]
    assert target["boxes_xyxy"].shape == (0, 4) and target["boxes_xyxy"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    positives = CocoDetectionDataset(ann, root, include_empty=False)
    assert positives.image_ids == [1] and positives.stats["images_dropped_empty"] == 2
    assert positives[0][1]["labels"].tolist() == [0]


# ------------------------------------------------------------------------------------------ image files

def _save(path, color=(10, 20, 30), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_resolve_image_path_tries_root_subdirs_and_basename(tmp_path):
    for relative in ("a.jpg", "JPEGImages/b.jpg", "images/c.jpg", "d.jpg", "images/e.jpg"):
        _save(tmp_path / relative)
    assert resolve_image_path(str(tmp_path), "a.jpg")[0] == str(tmp_path / "a.jpg")
    assert resolve_image_path(str(tmp_path), "b.jpg")[0] == str(tmp_path / "JPEGImages" / "b.jpg")
    assert resolve_image_path(str(tmp_path), "c.jpg")[0] == str(tmp_path / "images" / "c.jpg")
    assert resolve_image_path(str(tmp_path), "/home/someone/export/d.jpg")[0] == str(tmp_path / "d.jpg")
    assert resolve_image_path(str(tmp_path), "C:\\data\\e.jpg")[0] == str(tmp_path / "images" / "e.jpg")
    path, tried = resolve_image_path(str(tmp_path), "sub/x.jpg")
    assert path is None
    assert tried == [str(tmp_path / p) for p in ("sub/x.jpg", "JPEGImages/sub/x.jpg", "images/sub/x.jpg",
                                                 "x.jpg", "JPEGImages/x.jpg", "images/x.jpg")]


def test_missing_images_error_names_every_place_tried(make_coco):
    ann, root = make_coco(CATS, [(1, "sub/gone.jpg", 64, 64)], [], write_images=False)
    with pytest.raises(FileNotFoundError) as info:
        CocoDetectionDataset(ann, root)
    message = str(info.value)
    assert "gone.jpg" in message
    assert all(place in message for place in resolve_image_path(root, "sub/gone.jpg")[1])


def test_few_missing_images_dropped_with_one_warning(make_coco, tmp_path, caplog):
    images = [(i, f"{i}.jpg", 16, 16) for i in range(1, 31)]
    ann, root = make_coco(CATS, images, [(2, 3, [1, 1, 5, 5])])
    (tmp_path / "images" / "1.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="dataset_coco"):
        dataset = CocoDetectionDataset(ann, root, max_missing_fraction=0.05)
    assert len(dataset) == 29 and 1 not in dataset.image_ids and dataset.stats["images_missing"] == 1
    assert sum("1.jpg" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(FileNotFoundError):
        CocoDetectionDataset(ann, root, max_missing_fraction=0.0)


def test_exif_rotated_image_loads_displayed_and_box_covers_object(make_coco, tmp_path):
    # Displayed frame: 80 wide x 48 tall, red square at x 50..70, y 10..30 on black.
    displayed = np.zeros((48, 80, 3), np.uint8)
    displayed[10:30, 50:70] = (255, 0, 0)
    ann, root = make_coco(CATS, [(1, "rot.jpg", 80, 48)], [(1, 3, [50, 10, 20, 20])], write_images=False)
    for orientation, stored_rotation in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        stored = Image.fromarray(displayed).transpose(stored_rotation)  # 48 wide x 80 tall on disk
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(tmp_path / "images" / "rot.jpg", quality=98, exif=exif)
        image, target = CocoDetectionDataset(ann, root)[0]
        assert image.shape == (3, 48, 80)
        x0, y0, x1, y1 = target["boxes_xyxy"][0].int().tolist()
        inside = image[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2].float().mean(dim=(1, 2))
        assert inside[0] > 200 and inside[1] < 60 and inside[2] < 60
        assert image[:, :, :40].float().mean() < 20  # the left half stays background


@pytest.mark.parametrize("mode, make, expected", [
    ("L", lambda: Image.new("L", (6, 4), 77), (77, 77, 77)),
    ("LA", lambda: Image.new("LA", (6, 4), (77, 0)), (255, 255, 255)),  # transparent -> white
    ("RGBA", lambda: Image.new("RGBA", (6, 4), (200, 100, 50, 255)), (200, 100, 50)),
    ("P", lambda: Image.new("RGB", (6, 4), (0, 0, 255)).quantize(4), (0, 0, 255)),
    ("CMYK", lambda: Image.new("CMYK", (6, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ("I;16", lambda: Image.fromarray(np.full((4, 6), 40000, np.uint16)), (156, 156, 156)),  # 40000 >> 8
    ("I", lambda: Image.fromarray(np.full((4, 6), 30000, np.int32)), (117, 117, 117)),  # 30000 >> 8
])
def test_image_modes_load_as_uint8_rgb(tmp_path, mode, make, expected):
    img = make()
    assert img.mode == mode
    suffix = {"CMYK": ".jpg", "I": ".tif"}.get(mode, ".png")
    img.save(tmp_path / f"x{suffix}")
    with Image.open(tmp_path / f"x{suffix}") as reread:
        assert reread.mode.startswith(mode[0])  # the file really holds the mode under test
    tensor = load_image(tmp_path / f"x{suffix}")
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 4, 6)
    assert (tensor.float().mean(dim=(1, 2)) - torch.tensor(expected, dtype=torch.float32)).abs().max() <= 3


def test_palette_with_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (6, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.save(tmp_path / "p.png", transparency=1)
    assert load_image(tmp_path / "p.png")[:, 0, 0].tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------------------- transforms

def _target(boxes, labels, size):
    return {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=size),
            "labels": torch.tensor(labels, dtype=torch.int64)}


@pytest.mark.parametrize("preset", TRANSFORM_PRESETS)
def test_presets_output_square_float_with_boxes_inside(shapes_dataset, preset):
    size = 96
    dataset = CocoDetectionDataset(shapes_dataset["ann_path"], shapes_dataset["image_dir"],
                                   transforms=build_transforms(preset, size))
    torch.manual_seed(0)
    for _ in range(2):
        for index in range(len(dataset)):
            image, target = dataset[index]
            assert image.shape == (3, size, size) and image.dtype == torch.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
            boxes = target["boxes_xyxy"]
            assert boxes.dtype == torch.float32 and len(boxes) == len(target["labels"])
            assert (boxes >= 0).all() and (boxes <= size).all()
            assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()


@pytest.mark.parametrize("preset", TRANSFORM_PRESETS)
def test_boxes_follow_the_object_through_presets(preset):
    # A white square on black: wherever the geometry moves it, the box must still hold white pixels.
    pixels = torch.zeros(3, 120, 160, dtype=torch.uint8)
    pixels[:, 30:90, 40:100] = 250
    transforms = build_transforms(preset, 64)
    torch.manual_seed(0)
    for _ in range(15):
        image, out = transforms(tv_tensors.Image(pixels), _target([[40, 30, 100, 90]], [0], (120, 160)))
        for x0, y0, x1, y1 in out["boxes"].tolist():
            cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
            rows = slice(math.ceil(cy - half_h), math.floor(cy + half_h))
            core = image[:, rows, math.ceil(cx - half_w):math.floor(cx + half_w)]
            if core.numel():
                assert core.mean() > 0.45, (preset, out["boxes"])


@pytest.mark.parametrize("preset", ["strong", "moderate"])
def test_boxes_cropped_away_are_removed_with_their_labels(preset):
    transforms = build_transforms(preset, 48)
    pixels = torch.zeros(3, 120, 120, dtype=torch.uint8)
    torch.manual_seed(0)
    counts = []
    for _ in range(25):
        _, out = transforms(tv_tensors.Image(pixels), _target([[0, 0, 8, 8], [90, 90, 115, 115]], [0, 1], (120, 120)))
        boxes = out["boxes"]
        assert len(boxes) == len(out["labels"]) and (boxes[:, 2:] - boxes[:, :2] >= 1).all()
        counts.append(len(boxes))
    assert min(counts) < 2 <= max(counts)  # the crop did cut boxes away, and sometimes kept both


def test_letterbox_maps_a_known_box_exactly():
    transforms = build_transforms("letterbox", 64)
    grey = LETTERBOX_FILL / 255
    wide = torch.full((3, 100, 200), 10, dtype=torch.uint8)  # scale 64 / 200 = 0.32 -> 32 x 64
    image, out = transforms(tv_tensors.Image(wide), _target([[20, 10, 120, 60]], [2], (100, 200)))
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[6.4, 3.2, 38.4, 19.2]]))
    assert out["labels"].tolist() == [2]
    assert torch.allclose(image[:, 32:, :], torch.tensor(grey))  # padded at the bottom
    assert torch.allclose(image[:, :32, :], torch.tensor(10 / 255))
    tall = torch.full((3, 200, 100), 10, dtype=torch.uint8)  # padded on the right
    image, out = transforms(tv_tensors.Image(tall), _target([[10, 20, 60, 120]], [0], (200, 100)))
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[3.2, 6.4, 19.2, 38.4]]))
    assert torch.allclose(image[:, :, 32:], torch.tensor(grey))
    assert torch.allclose(image[:, :, :32], torch.tensor(10 / 255))


@pytest.mark.parametrize("preset", TRANSFORM_PRESETS)
def test_empty_targets_through_every_preset(preset):
    transforms = build_transforms(preset, 48)
    torch.manual_seed(0)
    for _ in range(10):
        image, out = transforms(tv_tensors.Image(torch.randint(0, 255, (3, 40, 70), dtype=torch.uint8)),
                                _target([], [], (40, 70)))
        assert image.shape == (3, 48, 48) and out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_empty_image_of_the_dataset_through_strong(shapes_dataset):
    dataset = CocoDetectionDataset(shapes_dataset["ann_path"], shapes_dataset["image_dir"],
                                   transforms=build_transforms("strong", 64))
    empty = [i for i in range(len(dataset)) if dataset.get_annotations(i)[1].numel() == 0]
    assert len(empty) == 1
    image, target = dataset[empty[0]]
    assert image.shape == (3, 64, 64) and target["boxes_xyxy"].shape == (0, 4)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="letterbox"):
        build_transforms("heavy", 64)


# -------------------------------------------------------------------------------------------- batching

def test_collate_stacks_equal_shapes_and_lists_others():
    target = {"labels": torch.zeros(0, dtype=torch.int64)}
    images, targets = collate_fn([(torch.zeros(3, 8, 8), target), (torch.ones(3, 8, 8), target)])
    assert images.shape == (2, 3, 8, 8) and targets == [target, target]
    images, _ = collate_fn([(torch.zeros(3, 8, 8), target), (torch.zeros(3, 6, 8), target)])
    assert isinstance(images, list) and [i.shape[1] for i in images] == [8, 6]


def test_build_dataloader_batches_and_seeded_order(shapes_dataset):
    dataset = CocoDetectionDataset(shapes_dataset["ann_path"], shapes_dataset["image_dir"],
                                   transforms=build_transforms("letterbox", 64))
    loader = build_dataloader(dataset, batch_size=3, shuffle=True, num_workers=0, seed=1)
    batches = list(loader)
    assert [len(t) for _, t in batches] == [3, 3, 2]
    assert batches[0][0].shape == (3, 3, 64, 64) and batches[0][0].dtype == torch.float32
    order = [t["image_id"] for _, targets in batches for t in targets]
    assert sorted(order) == sorted(dataset.image_ids)
    again = [t["image_id"] for _, ts in build_dataloader(dataset, 3, True, num_workers=0, seed=1) for t in ts]
    assert again == order
    assert len(list(build_dataloader(dataset, 3, False, num_workers=0, drop_last=True))) == 2


def test_build_dataloader_with_workers(shapes_dataset):
    dataset = CocoDetectionDataset(shapes_dataset["ann_path"], shapes_dataset["image_dir"])
    loader = build_dataloader(dataset, batch_size=4, shuffle=False, num_workers=1)
    assert loader.persistent_workers and loader.num_workers == 1
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 128, 128) and images.dtype == torch.uint8 and len(targets) == 4


def test_default_num_workers(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert (default_num_workers(), default_num_workers(4)) == (8, 4)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers(4) == 0


# --------------------------------------------------------------------------------------- layout, report

def test_coco_layout_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        coco_layout_paths(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "instances_val2017.json" in message
    paths = write_coco_layout(str(tmp_path / "coco"), ["a", "b"], num_train=2, num_val=1, img_size=32)
    assert coco_layout_paths(str(tmp_path / "coco")) == paths
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").unlink()
    missing = str(pytest.raises(FileNotFoundError, coco_layout_paths, str(tmp_path / "coco")).value)
    assert missing.split(";")[0].endswith("missing annotations/instances_val2017.json")
    dataset = CocoDetectionDataset(paths["train_ann"], paths["train_images"])
    assert len(dataset) == 2 and dataset.class_names == ["a", "b"]


def test_dataset_report_mentions_key_numbers(make_coco, tmp_path, capsys):
    # At img_size 320 a 100 px image scales by 3.2: 5 px -> 16 (small), 20 -> 64 (medium), 50 -> 160 (large).
    images = [(1, "a.jpg", 100, 100), (2, "b.jpg", 100, 50), (3, "c.jpg", 100, 100)] + \
        [(i, f"{i}.jpg", 10, 10) for i in range(4, 41)]
    annotations = [(1, 3, [0, 0, 5, 5]), (1, 7, [10, 10, 20, 20]), (1, 3, [40, 40, 50, 50]),
                   (2, 3, [1, 1, 5, 5], 1), (2, 3, [500, 1, 5, 5]), (1, 5, [1, 1, 9, 9])]
    ann, root = make_coco([(3, "cat"), (7, "dog"), (5, "bird")], images, annotations)
    (tmp_path / "images" / "c.jpg").unlink()
    dataset = CocoDetectionDataset(ann, root, classes=["cat", "dog"])
    report = dataset_report(dataset, 320)
    for expected in ("40 listed, 39 found, 1 missing", "cat (category_id 3): 2 boxes",
                     "dog (category_id 7): 1 boxes", "min 0, mean 0.08, max 3",
                     "small (< 32^2) 1, medium (< 96^2) 1, large 1", "images without boxes: 38",
                     "1 crowd", "1 annotations of other classes", "boxes dropped: 1"):
        assert expected in report, (expected, report)
    assert main(["--ann", ann, "--root", root, "--class-name", "cat", "--img-size", "320"]).count("\n") > 5
    assert "cat (category_id 3): 2 boxes" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- synthetic data

def test_synthetic_split_is_deterministic_with_noncontiguous_ids(tmp_path):
    kwargs = dict(num_images=6, class_names=["a", "b", "c"], img_size=64, seed=3, empty_fraction=0.5)
    first = json.loads(open(write_shapes_split(tmp_path / "i1", tmp_path / "1.json", **kwargs)).read())
    second = json.loads(open(write_shapes_split(tmp_path / "i2", tmp_path / "2.json", **kwargs)).read())
    assert first == second
    assert (np.asarray(Image.open(tmp_path / "i1" / "000000.jpg")) ==
            np.asarray(Image.open(tmp_path / "i2" / "000000.jpg"))).all()
    assert [c["id"] for c in first["categories"]] == [1, 3, 5]
    assert len({a["image_id"] for a in first["annotations"]}) == 3  # exactly half the images are empty
    for ann in first["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and x + w <= 64 and 0 <= y and y + h <= 64 and 0.2 * 64 - 1 <= min(w, h)
        assert max(w, h) <= 0.45 * 64 + 1 and ann["area"] == w * h and ann["iscrowd"] == 0


def test_synthetic_boxes_are_tight_around_their_shape(tmp_path):
    ann_path = write_shapes_split(tmp_path / "img", tmp_path / "a.json", 10, ["square"], img_size=96, seed=1,
                                  max_objects=1)
    data = json.load(open(ann_path))
    colour = np.array(class_style(0)[1], dtype=np.float32)
    files = {image["id"]: image["file_name"] for image in data["images"]}
    assert len(data["annotations"]) == 10
    for ann in data["annotations"]:
        pixels = np.asarray(Image.open(tmp_path / "img" / files[ann["image_id"]]), dtype=np.float32)
        x, y, w, h = ann["bbox"]
        distance = np.abs(pixels - colour).max(axis=2)  # (H, W), 0 where the pixel is the class colour
        assert distance[y + 1:y + h - 1, x + 1:x + w - 1].max() < 40  # a filled square: all inside
        outside = np.ones_like(distance, dtype=bool)
        outside[max(0, y - 1):y + h + 1, max(0, x - 1):x + w + 1] = False
        assert distance[outside].min() > 40  # and nothing of it beyond one pixel outside the box


def test_a_truncated_jpeg_is_decoded_with_a_warning(tmp_path, caplog):
    """A JPEG whose last bytes are missing (an interrupted copy) still holds nearly all of its picture: it is
    decoded, not skipped, so its boxes are neither lost to training nor counted as misses in evaluation."""
    pixels = np.zeros((60, 80, 3), np.uint8)
    pixels[10:50, 20:60] = (200, 40, 40)
    Image.fromarray(pixels).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:-20])
    with pytest.raises(OSError):  # Pillow alone refuses it
        with Image.open(tmp_path / "cut.jpg") as img:
            img.load()
    with caplog.at_level(logging.WARNING):
        image = load_image(tmp_path / "cut.jpg")
    assert image.shape == (3, 60, 80) and "truncated JPEG" in caplog.text
    assert (image[:, 30, 40].int() - torch.tensor([200, 40, 40])).abs().max() < 30
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + data[8:100])  # not a JPEG: still an error
    with pytest.raises(OSError):
        load_image(tmp_path / "cut.png")


@pytest.mark.parametrize("argv, expected", [
    (["--ann", "/nowhere.json", "--root", "/"], "annotation file not found: /nowhere.json"),
    (["--ann", "{data}/train.json", "--root", "{data}/train", "--class-name", "zebra"], "available: whiteline, kerb"),
    (["--ann", "{data}/flat.json", "--root", "{data}/train"], "is not COCO: it lacks images, annotations"),
])
def test_dataset_cli_bad_input_is_one_line(argv, expected, fault_data, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dataset_coco.py", *[a.format(data=fault_data) for a in argv]])
    line = exits_with_one_line(capsys, dataset_coco.run)
    assert expected in line, line


def test_bad_boxes_dropped_clipped_and_reported_once(tmp_path, caplog):
    Image.fromarray(np.full((80, 100, 3), 128, np.uint8)).save(tmp_path / "a.png")
    ann = write_coco_json(tmp_path / "a.json", [(1, "x")], [(1, "a.png", 100, 80)],
                          [(1, 1, [-10, -10, 30, 30]), (1, 1, [10, 10, 0, 5]), (1, 1, [10, 10, -5, 5]),
                           (1, 1, [200, 200, 10, 10]), (1, 1, [float("nan"), 1, 5, 5]), (1, 1, [5, 6, 10, 12])])
    with caplog.at_level(logging.WARNING, logger="dataset_coco"):
        dataset = CocoDetectionDataset(ann, str(tmp_path), transforms=build_transforms("strong", 64))
    (record,) = caplog.records
    assert "clipped 1 boxes, dropped 4 (3 degenerate/outside, 1 non-finite/malformed)" in record.getMessage()
    image, target = dataset[0]  # training goes on with the two usable boxes
    assert image.shape == (3, 64, 64) and len(target["boxes_xyxy"]) <= 2
    report = dataset_report(dataset, 64)
    assert "boxes dropped: 4 (3 under 1 px or outside the image, 1 non-finite or malformed)" in report
    assert "WARNING: 4 of 6 boxes were dropped" in report


def test_unreadable_images_skipped_named_and_counted(fault_data, tmp_path, caplog):
    image_dir = tmp_path / "images"
    ann = write_shapes_split(image_dir, tmp_path / "ann.json", 6, ["a"], img_size=64, seed=0)
    names = sorted(os.listdir(image_dir))
    write_bad_images(image_dir, names)
    dataset = CocoDetectionDataset(ann, str(image_dir), transforms=build_transforms("letterbox", 64))
    loader = build_dataloader(dataset, batch_size=2, shuffle=False, num_workers=0)
    model = create_lightweight_model(1, "nano", img_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with caplog.at_level(logging.WARNING, logger="dataset_coco"):
        metrics = engine.train_one_epoch(model, DetectionLoss(), loader, engine.TrainState(model, optimizer),
                                         progress=False)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert names[0] in warned and names[1] in warned and "skipping unreadable image" in warned
    assert metrics["images_skipped"] == 2 and metrics["nonfinite_steps"] == 0
    assert collate_fn([None, None]) is None  # a batch of only bad images is skipped, not a crash
    with pytest.raises(config.ConfigError, match=r"2/6 training images of epoch 1 could not be read \(more than "
                                                 r"max_bad_image_fraction=0.05\)"):
        engine.check_skipped_images(metrics, loader, 0.05, 1)
    engine.check_skipped_images(metrics, loader, 0.5, 1)  # under the configured share: the run goes on


def test_unusual_image_modes_train_and_boxes_match(tmp_path):
    """Every mode loads as RGB, the box covers the bright object (after EXIF rotation too), and a training
    epoch over them is finite."""
    displayed = np.zeros((48, 64), np.uint8)
    displayed[8:28, 30:50] = 255  # object at x 30..50, y 8..28 in the displayed frame
    rgb = np.stack([displayed] * 3, axis=-1)
    files = {
        "gray.png": Image.fromarray(displayed, "L"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((48, 64), 255, np.uint8)]), "RGBA"),
        "palette.png": Image.fromarray(rgb).quantize(4),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "sixteen.png": Image.fromarray(displayed.astype(np.uint16) * 257),
    }
    for name, image in files.items():
        image.save(tmp_path / name, quality=98) if name.endswith(".jpg") else image.save(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif.jpg", quality=98, exif=exif)
    names = [*files, "exif.jpg"]
    ann = write_coco_json(tmp_path / "ann.json", [(1, "object")],
                          [(i, name, 64, 48) for i, name in enumerate(names, start=1)],
                          [(i, 1, [30, 8, 20, 20]) for i in range(1, len(names) + 1)])
    dataset = CocoDetectionDataset(ann, str(tmp_path), transforms=build_transforms("letterbox", 64))
    for index in range(len(dataset)):
        image, target = dataset[index]
        x0, y0, x1, y1 = target["boxes_xyxy"][0].round().int().tolist()
        assert (x0, y0, x1, y1) == (30, 8, 50, 28), names[index]
        inside = image[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2].mean()
        outside = image[:, 30:46, :24].mean()
        assert inside > 0.9 and outside < 0.1, (names[index], inside, outside)
    loader = build_dataloader(dataset, batch_size=3, shuffle=False, num_workers=0)
    model = create_lightweight_model(1, "nano", img_size=64)
    metrics = engine.train_one_epoch(model, DetectionLoss(), loader,
                                     engine.TrainState(model, torch.optim.AdamW(model.parameters(), 1e-3)),
                                     progress=False)
    assert metrics["nonfinite_steps"] == 0 and metrics["images_skipped"] == 0 and np.isfinite(metrics["loss"])


def test_dataset_report_warns_about_tiny_boxes_and_empty_class(tmp_path):
    Image.fromarray(np.full((400, 400, 3), 128, np.uint8)).save(tmp_path / "a.png")
    ann = write_coco_json(tmp_path / "a.json", [(1, "speck"), (2, "ghost")], [(1, "a.png", 400, 400)],
                          [(1, 1, [10, 10, 12, 12]), (1, 1, [100, 100, 15, 15])])
    report = dataset_report(CocoDetectionDataset(ann, str(tmp_path)), 160)
    assert "WARNING: class 'ghost' has no boxes" in report
    assert "WARNING: 2/2 boxes are under 8 px on a side at img_size 160" in report
    assert "2/2 boxes" not in dataset_report(CocoDetectionDataset(ann, str(tmp_path)), 640)


def test_exif_rotated_photos_annotated_in_the_stored_frame_are_turned(tmp_path, caplog):
    """A phone photo stored landscape with EXIF orientation 6 (shown portrait), annotated by a tool that ignored
    EXIF: the JSON gives the stored size and a stored-frame box. The box turns with the image, in training and
    in the ground truth COCOeval scores, so a perfect prediction in the displayed frame scores 1."""
    from evaluate import coco_metrics
    stored = np.zeros((40, 60, 3), np.uint8)  # H 40, W 60 as stored
    stored[5:15, 10:30] = 255  # the object, in the stored frame: x 10..30, y 5..15
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise: displayed 40 wide, 60 high
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=98, exif=exif)
    ann = write_coco_json(tmp_path / "ann.json", [(1, "thing")], [(1, "phone.jpg", 60, 40)], [(1, 1, [10, 5, 20, 10])])
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetectionDataset(ann, str(tmp_path))
    assert "annotated in their stored (unrotated) frame" in caplog.text and dataset.stats["images_turned"] == 1
    image, target = dataset[0]
    assert image.shape == (3, 60, 40) and dataset.image_size(0) == (60, 40)
    x0, y0, x1, y1 = target["boxes_xyxy"][0].tolist()
    assert (x0, y0, x1, y1) == (25.0, 10.0, 35.0, 30.0)  # turned: x = H - y, y = x
    assert image[:, int(y0) + 2:int(y1) - 2, int(x0) + 2:int(x1) - 2].float().mean() > 200  # the object is there
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.9}]
    assert coco_metrics(dataset.coco, perfect, [1], [1], ["thing"])["mAP"] == pytest.approx(1.0)


# ------------------------------------------------------------------ augmentation randomness (issue #24 item 7)

def seeded_epochs(dataset, num_workers, count, first_epoch=None):
    """`count` passes of a fresh shuffled loader (seed 7): per batch its pixels and image ids. `first_epoch`
    starts it there, as a resumed run does; None lets each pass be the next epoch."""
    loader = build_dataloader(dataset, batch_size=3, shuffle=True, num_workers=num_workers, seed=7)
    passes = []
    for offset in range(count):
        if first_epoch is not None:
            loader.sampler.set_epoch(first_epoch + offset)
        passes.append([(images.clone(), [t["image_id"] for t in targets]) for images, targets in loader])
    return passes


def assert_same_batches(passes, reference):
    assert len(passes) == len(reference)
    for batches, expected in zip(passes, reference):
        assert [ids for _, ids in batches] == [ids for _, ids in expected]
        for (images, _), (expected_images, _) in zip(batches, expected):
            assert torch.equal(images, expected_images)


def test_augmented_batches_depend_on_seed_epoch_and_index_only(shapes_dataset):
    """The same pixels with 0, 1 or 2 workers and from a fresh loader started at a later epoch (a resume), while
    loading with workers=0 leaves the main process's random streams where they were."""
    dataset = CocoDetectionDataset(shapes_dataset["ann_path"], shapes_dataset["image_dir"],
                                   transforms=build_transforms("strong", 64))
    states = torch.get_rng_state(), np.random.get_state()[1].copy()
    reference = seeded_epochs(dataset, 0, 2)
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert not torch.equal(reference[0][0][0], reference[1][0][0])  # each pass is a new epoch
    for num_workers in (1, 2):
        assert_same_batches(seeded_epochs(dataset, num_workers, 2), reference)
    assert_same_batches(seeded_epochs(dataset, 2, 1, first_epoch=1), reference[1:])
    assert_same_batches(seeded_epochs(dataset, 0, 2, first_epoch=0), reference)


def test_seeded_sampler_keeps_a_distributed_samplers_order_and_gives_it_the_epoch(shapes_dataset):
    import distributed
    dataset = CocoDetectionDataset(shapes_dataset["ann_path"], shapes_dataset["image_dir"])
    shard = distributed.train_sampler(dataset, seed=0, num_replicas=2, rank=1)
    sampler = dataset_coco.SeededSampler(len(dataset), seed=3, sampler=shard)
    sampler.set_epoch(4)
    keys = list(sampler)
    reference = distributed.train_sampler(dataset, seed=0, num_replicas=2, rank=1)
    reference.set_epoch(4)
    assert [index for index, _ in keys] == list(reference) and len(sampler) == len(reference)
    assert len({seed for _, seed in keys}) == len(keys)


@pytest.mark.parametrize("kind", ["voc", "yolo"])
def test_an_unreadable_image_without_a_size_is_skipped_within_the_bad_share(tmp_path, caplog, kind):
    """VOC XML without <size> and YOLO labels (normalised) leave the size to the image: one that cannot be read is
    dropped like a missing one, up to max_missing_fraction, instead of ending the whole set."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annots" if kind == "voc" else tmp_path / "labels").mkdir()
    for i in range(20):
        _save(tmp_path / "images" / f"{i:02d}.png", size=(16, 12))
        if kind == "voc":
            (tmp_path / "annots" / f"{i:02d}.xml").write_text(
                f"<annotation><filename>{i:02d}.png</filename><object><name>x</name><bndbox><xmin>2</xmin>"
                f"<ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
        else:
            (tmp_path / "labels" / f"{i:02d}.txt").write_text("0 0.5 0.5 0.5 0.5")
    (tmp_path / "classes.txt").write_text("x")
    (tmp_path / "images" / "07.png").write_text("this is not an image")
    ann = str(tmp_path / ("annots" if kind == "voc" else "labels"))
    with caplog.at_level(logging.WARNING, logger="dataset_coco"):
        dataset = CocoDetectionDataset(ann, max_missing_fraction=0.05)
    assert len(dataset) == 19 and dataset.stats["images_unreadable"] == 1 and dataset.stats["boxes_kept"] == 19
    assert "07.png" in caplog.text and "cannot be read" in caplog.text
    with pytest.raises(ValueError, match=r"1/20 images of .* cannot be read and it gives no width/height .*07\.png"):
        CocoDetectionDataset(ann, max_missing_fraction=0.0)


# ------------------------------------------------------------------ reduced decoding (issue #27 item 1)

def _write_large_exif_photo(path):
    """A JPEG stored 1203 x 803 (sides no multiple of 8, so libjpeg rounds its scaled sizes up) with EXIF
    orientation 6, shown 803 wide and 1203 high, holding one bright object; returns the object's displayed xyxy box."""
    stored = np.full((803, 1203, 3), 40, np.uint8)
    stored[200:500, 600:900] = 230  # stored x 600..900, y 200..500
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise: displayed x = 803 - y, y = x
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    return [303.0, 600.0, 603.0, 900.0]


def test_decode_image_reduces_only_jpegs_at_least_twice_the_size_needed(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for name in ("x.png", "x.jpg"):
        Image.fromarray(rgb).save(tmp_path / name)
    png = dataset_coco.decode_image(tmp_path / "x.png", min_side=8)
    assert png.scale == 1 and png.size == (48, 64) and torch.equal(png.image, load_image(tmp_path / "x.png"))
    small = dataset_coco.decode_image(tmp_path / "x.jpg", min_side=33)  # 64 < 2 x 33: decoded in full
    assert small.scale == 1 and torch.equal(small.image, load_image(tmp_path / "x.jpg"))
    half = dataset_coco.decode_image(tmp_path / "x.jpg", min_side=32)
    assert half.scale == 2 and half.image.shape == (3, 24, 32) and half.size == (48, 64)
    assert dataset_coco.decode_image(tmp_path / "x.jpg").scale == 1


def test_augmented_side_is_the_largest_zoom_of_the_preset():
    assert [dataset_coco.augmented_side(preset, 320) for preset in ("letterbox", "moderate", "strong")] == \
        [320, 400, 480]
    with pytest.raises(ValueError, match="unknown transform preset"):
        dataset_coco.augmented_side("nope", 320)


def test_a_large_exif_rotated_jpeg_decoded_reduced_keeps_its_boxes_on_the_object(tmp_path):
    """EXIF 6 turns the drafted frame as it turns the full one, and a box maps by the DCT scale (not by the size
    ratio) and the origin that the turn moves libjpeg's padding to: the object found in the reduced pixels is
    where the box says."""
    box = _write_large_exif_photo(tmp_path / "big.jpg")
    x0, y0, x1, y1 = box
    ann = write_coco_json(tmp_path / "ann.json", [(1, "thing")], [(1, "big.jpg", 803, 1203)],
                          [(1, 1, [x0, y0, x1 - x0, y1 - y0])])
    _, full = CocoDetectionDataset(ann, str(tmp_path))[0]
    image, target = CocoDetectionDataset(ann, str(tmp_path), decode_side=100)[0]
    assert full["decode_scale"] == 1 and target["decode_scale"] == 8
    assert image.shape == (3, 151, 101)  # ceil(1203 / 8), ceil(803 / 8)
    assert target["orig_size"].tolist() == full["orig_size"].tolist() == [1203, 803]
    assert target["decode_origin"] == (101 - 803 / 8, 0.0)  # the stored bottom's padding, now on the left
    origin = torch.tensor(target["decode_origin"] * 2)
    torch.testing.assert_close((target["boxes_xyxy"] - origin) * 8, full["boxes_xyxy"], atol=0, rtol=0)
    rows, cols = torch.nonzero(image.float().mean(dim=0) > 135, as_tuple=True)  # halfway between 40 and 230
    found = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
    torch.testing.assert_close(found, target["boxes_xyxy"][0], atol=0.5, rtol=0)


def test_a_reduced_decode_gives_the_letterboxed_boxes_of_the_full_one(tmp_path):
    box = _write_large_exif_photo(tmp_path / "big.jpg")
    ann = write_coco_json(tmp_path / "ann.json", [(1, "thing")], [(1, "big.jpg", 803, 1203)],
                          [(1, 1, [box[0], box[1], box[2] - box[0], box[3] - box[1]])])
    letterbox = build_transforms("letterbox", 64)
    full_image, full = CocoDetectionDataset(ann, str(tmp_path), transforms=letterbox)[0]
    image, target = CocoDetectionDataset(ann, str(tmp_path), transforms=letterbox, decode_side=64)[0]
    assert target["decode_scale"] == 8 and image.shape == full_image.shape == (3, 64, 64)
    torch.testing.assert_close(target["boxes_xyxy"], full["boxes_xyxy"], atol=0.5, rtol=0)
    assert (image - full_image).abs().mean() < 2 / 255


class _BrightObjectDetector(torch.nn.Module):
    """model.predict stand-in: one box around the pixels brighter than mid-grey, in the image's own pixels."""
    num_classes = 1

    def predict(self, images, conf_threshold=None, iou_threshold=None, max_detections=None, timings=None):
        results = []
        for image in images:
            rows, cols = torch.nonzero(image.float().mean(dim=0) > 135, as_tuple=True)
            box = torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=torch.float32)
            results.append({"boxes": box, "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.int64)})
        return results


def test_evaluation_on_reduced_decodes_scores_in_the_original_frame(tmp_path):
    """Detections on a photo decoded at 1/8 come back times 8, clipped to the original: a detector that finds the
    object in either decode scores mAP 1 against the full-frame ground truth."""
    import evaluate
    box = _write_large_exif_photo(tmp_path / "big.jpg")
    ann = write_coco_json(tmp_path / "ann.json", [(1, "thing")], [(1, "big.jpg", 803, 1203)],
                          [(1, 1, [box[0], box[1], box[2] - box[0], box[3] - box[1]])])
    for decode_side in (None, 100):
        dataset = CocoDetectionDataset(ann, str(tmp_path), decode_side=decode_side)
        (detection,) = evaluate.collect_detections(_BrightObjectDetector(), dataset, num_workers=0)
        x, y, w, h = detection["bbox"]
        assert np.allclose([x, y, x + w, y + h], box, atol=4 if decode_side else 1)  # half a decoded pixel
        assert evaluate.evaluate(_BrightObjectDetector(), dataset, num_workers=0)["mAP50"] == pytest.approx(1.0)
