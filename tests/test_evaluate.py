"""Tests for evaluate.py: COCO mAP via pycocotools, P/R/F1 from COCOeval's matches, evaluate(), CLI errors.

A hand-built COCO set (4 images, classes cat=7, dog=3, bird=11 in that label order, a missed cat,
false positives, a crowd dog region, one empty image) is scored with hand-counted expectations.
The model and dataset are small fakes, so most tests do not need model_lightweight or dataset_coco; those of
issue #24 score real datasets (the ground truth is the dataset's cleaned boxes) and a real model.
"""

import contextlib
import copy
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import evaluate

CLASS_NAMES = ["cat", "dog", "bird"]
CATEGORY_IDS = [7, 3, 11]  # label i -> CATEGORY_IDS[i]; non-contiguous and not sorted on purpose
IMAGE_IDS = [1, 2, 3, 4]


def _coco_dict(first_ann_id=1):
    images = [{"id": 1, "width": 100, "height": 80, "file_name": "1.jpg"},
              {"id": 2, "width": 90, "height": 70, "file_name": "2.jpg"},
              {"id": 3, "width": 100, "height": 90, "file_name": "3.jpg"},
              {"id": 4, "width": 64, "height": 48, "file_name": "4.jpg"}]  # no objects
    boxes = [(1, 7, [10, 10, 30, 20], 0),
             (1, 3, [50, 40, 20, 30], 0),
             (2, 7, [5, 5, 40, 40], 0),
             (2, 7, [60, 10, 20, 20], 0),  # never detected
             (3, 3, [20, 20, 30, 30], 0),
             (3, 3, [0, 50, 100, 30], 1)]  # crowd region: ignored by COCOeval
    annotations = [{"id": first_ann_id + i, "image_id": image_id, "category_id": category_id,
                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": crowd}
                   for i, (image_id, category_id, bbox, crowd) in enumerate(boxes)]
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 11, "name": "bird"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _make_coco(coco_dict):
    coco = COCO()
    coco.dataset = copy.deepcopy(coco_dict)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


# Sorted by score: 0.95 TP, 0.9 TP, 0.85 on crowd (ignored), 0.8 TP, 0.7 TP, 0.6 FP, 0.55 FP, 0.3 FP.
HAND_DETECTIONS = [
    _det(1, 7, [10, 10, 30, 20], 0.9),   # TP cat
    _det(1, 3, [50, 40, 20, 30], 0.8),   # TP dog
    _det(2, 7, [5, 5, 40, 40], 0.95),    # TP cat
    _det(2, 3, [0, 0, 10, 10], 0.6),     # FP: no dog in image 2
    _det(3, 3, [20, 20, 30, 30], 0.7),   # TP dog
    _det(3, 3, [10, 55, 20, 20], 0.85),  # inside the crowd region: neither TP nor FP
    _det(4, 7, [10, 10, 20, 20], 0.3),   # FP on the empty image, low score
    _det(1, 7, [12, 10, 30, 20], 0.55),  # FP: duplicate of the 0.9 cat (IoU 0.875)
]
NUM_GT = 5  # non-crowd ground truths


class FakeDataset:
    """What evaluate() reads from a CocoDetectionDataset built with transforms=None.

    Each image is filled with its image id, so FakeDetector knows which image it sees.
    """

    def __init__(self, coco_dict, resize_to=None):
        self.coco = _make_coco(coco_dict)
        self.image_ids = sorted(self.coco.imgs)
        self.class_names = list(CLASS_NAMES)
        self.category_ids = list(CATEGORY_IDS)
        self.resize_to = resize_to

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index):
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        height, width = self.resize_to or (info["height"], info["width"])
        image = torch.full((3, height, width), image_id, dtype=torch.uint8)
        anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes_xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                                  dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.category_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
        target = {"boxes_xyxy": boxes_xyxy, "labels": labels, "image_id": image_id,
                  "orig_size": torch.tensor([info["height"], info["width"]])}
        return image, target


class FakeDetector(torch.nn.Module):
    """model.predict stand-in: returns fixed xyxy predictions per image id, filtered by score."""

    def __init__(self, predictions, num_classes=len(CLASS_NAMES)):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.num_classes = num_classes
        self.predictions = predictions  # image_id -> list of (box_xyxy, score, label)
        self.calls = []

    def predict(self, images, conf_threshold=0.5, iou_threshold=0.6, max_detections=100):
        self.calls.append({"training": self.training, "conf_threshold": conf_threshold,
                           "iou_threshold": iou_threshold, "max_detections": max_detections,
                           "dtypes": {image.dtype for image in images},
                           "devices": {image.device for image in images}})
        results = []
        for image in images:
            kept = [p for p in self.predictions.get(int(image[0, 0, 0]), []) if p[1] >= conf_threshold]
            results.append({"boxes": torch.tensor([p[0] for p in kept], dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor([p[1] for p in kept], dtype=torch.float32),
                            "labels": torch.tensor([p[2] for p in kept], dtype=torch.int64)})
        return results


def _perfect_predictions(dataset):
    predictions = {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        predictions[target["image_id"]] = [(box, 0.9, int(label)) for box, label
                                           in zip(target["boxes_xyxy"].tolist(), target["labels"])]
    return predictions


def _hand_predictions():
    """HAND_DETECTIONS as model outputs: xyxy boxes and labels 0..2."""
    predictions = {}
    for d in HAND_DETECTIONS:
        x, y, w, h = d["bbox"]
        predictions.setdefault(d["image_id"], []).append(
            ([x, y, x + w, y + h], d["score"], CATEGORY_IDS.index(d["category_id"])))
    return predictions


def _metrics(detections, conf_threshold=0.5, coco_dict=None):
    coco = _make_coco(coco_dict or _coco_dict())
    return evaluate.coco_metrics(coco, detections, IMAGE_IDS, CATEGORY_IDS, CLASS_NAMES, conf_threshold)


def test_perfect_predictions_score_one():
    dataset = FakeDataset(_coco_dict())
    model = FakeDetector(_perfect_predictions(dataset))
    metrics = evaluate.evaluate(model, dataset, batch_size=2, num_workers=0)
    for key in ("mAP", "mAP50", "mAP75", "precision", "recall", "f1", "best_f1"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["per_class_AP"]["cat"] == pytest.approx(1.0)
    assert metrics["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert metrics["num_detections"] == NUM_GT


def test_hand_built_case_matches_cocoeval_and_hand_counts():
    metrics = _metrics(HAND_DETECTIONS)

    coco = _make_coco(_coco_dict())
    with contextlib.redirect_stdout(io.StringIO()):
        direct = COCOeval(coco, coco.loadRes(copy.deepcopy(HAND_DETECTIONS)), iouType="bbox")
        direct.params.imgIds = IMAGE_IDS
        direct.params.catIds = CATEGORY_IDS
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    for key, index in evaluate.STATS_KEYS.items():
        if direct.stats[index] == -1:
            assert math.isnan(metrics[key]), key
        else:
            assert metrics[key] == pytest.approx(direct.stats[index]), key
    assert math.isnan(metrics["AP_large"])  # no large ground truth here

    # By hand: cat finds 2 of 3 with precision 1 -> 67 of 101 recall points; dog finds 2 of 2
    # with precision 1 before its FP (the crowd hit is ignored) -> AP 1. Boxes are exact, so
    # every IoU threshold gives the same AP.
    assert metrics["per_class_AP"]["cat"] == pytest.approx(67 / 101)
    assert metrics["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert math.isnan(metrics["per_class_AP"]["bird"])  # no ground truth
    assert metrics["mAP"] == pytest.approx((67 / 101 + 1) / 2)
    assert metrics["mAP50"] == pytest.approx((67 / 101 + 1) / 2)

    # Score >= 0.5: TP 0.95, 0.9, 0.8, 0.7; FP 0.6, 0.55; 0.85 ignored; 5 ground truths.
    assert metrics["precision"] == pytest.approx(4 / 6)
    assert metrics["recall"] == pytest.approx(4 / 5)
    assert metrics["f1"] == pytest.approx(8 / 11)
    assert metrics["num_detections"] == len(HAND_DETECTIONS)


def test_coco_metrics_leaves_detections_unchanged():
    detections = [_det(1, 7, [10, 10, 30, 20], 0.9), _det(4, 7, [10, 10, 20, 20], 0.3)]
    _metrics(detections)
    # loadRes adds id/area/segmentation/iscrowd to the dicts it gets
    assert detections == [_det(1, 7, [10, 10, 30, 20], 0.9), _det(4, 7, [10, 10, 20, 20], 0.3)]


def test_conf_threshold_filters_low_score_false_positive():
    above = _metrics(HAND_DETECTIONS, conf_threshold=0.25)  # keeps the 0.3 FP
    below = _metrics(HAND_DETECTIONS, conf_threshold=0.35)  # drops it
    assert above["precision"] == pytest.approx(4 / 7)
    assert below["precision"] == pytest.approx(4 / 6)
    assert above["recall"] == below["recall"] == pytest.approx(4 / 5)
    assert _metrics(HAND_DETECTIONS, conf_threshold=0.56)["precision"] == pytest.approx(4 / 5)
    assert _metrics(HAND_DETECTIONS, conf_threshold=0.96)["recall"] == 0.0
    assert above["mAP"] == below["mAP"]  # mAP does not depend on conf_threshold


def test_best_f1_threshold_is_the_best_score_cut():
    metrics = _metrics(HAND_DETECTIONS)
    # cuts: 0.95 -> 2/6, 0.9 -> 4/7, 0.8 -> 6/8, 0.7 -> 8/9, 0.6 -> 8/10, 0.55 -> 8/11, 0.3 -> 8/12
    assert metrics["best_f1"] == pytest.approx(8 / 9)
    assert metrics["best_f1_threshold"] == pytest.approx(0.65)  # midway between the kept 0.7 and the next, 0.6
    f1_at = {d["score"]: _metrics(HAND_DETECTIONS, conf_threshold=d["score"])["f1"] for d in HAND_DETECTIONS}
    assert max(f1_at.values()) == pytest.approx(metrics["best_f1"])
    assert f1_at[0.7] == pytest.approx(metrics["best_f1"])


def test_no_detections_gives_zeros():
    metrics = _metrics([])
    for key in ("mAP", "mAP50", "mAP75", "precision", "recall", "f1", "best_f1", "best_f1_threshold"):
        assert metrics[key] == 0.0, key
    assert metrics["num_detections"] == 0
    assert metrics["per_class_AP"]["cat"] == 0.0 and metrics["per_class_AP"]["dog"] == 0.0
    assert math.isnan(metrics["per_class_AP"]["bird"])

    dataset = FakeDataset(_coco_dict())
    assert evaluate.evaluate(FakeDetector({}), dataset, num_workers=0)["mAP"] == 0.0


def test_predictions_to_coco_maps_labels_and_converts_boxes():
    results = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [1.0, 2.0, 3.0, 5.0]]),
                "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([1, 0])},
               {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64)}]
    detections = evaluate.predictions_to_coco(results, [5, 6], CATEGORY_IDS)
    assert detections == [
        {"image_id": 5, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 5, "category_id": 7, "bbox": [1.0, 2.0, 2.0, 3.0], "score": pytest.approx(0.4)}]
    with pytest.raises(ValueError, match="out of range"):
        evaluate.predictions_to_coco([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                       "labels": torch.tensor([3])}], [5], CATEGORY_IDS)


def test_evaluate_hand_case_through_the_model_api():
    dataset = FakeDataset(_coco_dict())
    model = FakeDetector(_hand_predictions())
    metrics = evaluate.evaluate(model, dataset, batch_size=3, num_workers=0, iou_threshold=0.45,
                                max_detections=50)
    expected = _metrics(HAND_DETECTIONS)
    for key in ("mAP", "mAP50", "precision", "recall", "f1", "best_f1", "best_f1_threshold"):
        assert metrics[key] == pytest.approx(expected[key]), key
    assert [len(call["dtypes"]) for call in model.calls] == [1, 1]
    for call in model.calls:
        assert call["conf_threshold"] == evaluate.MAP_SCORE_THRESHOLD
        assert call["iou_threshold"] == 0.45 and call["max_detections"] == 50
        assert call["dtypes"] == {torch.uint8} and call["devices"] == {model.weight.device}


def test_evaluate_accepts_a_shuffled_dataloader():
    dataset = FakeDataset(_coco_dict())
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=True,
                                         collate_fn=lambda batch: tuple(zip(*batch)),
                                         generator=torch.Generator().manual_seed(0))
    metrics = evaluate.evaluate(FakeDetector(_hand_predictions()), loader)
    assert metrics["mAP"] == pytest.approx((67 / 101 + 1) / 2)
    assert metrics["precision"] == pytest.approx(4 / 6)


def test_evaluate_restores_training_mode():
    dataset = FakeDataset(_coco_dict())
    model = FakeDetector(_perfect_predictions(dataset))
    model.train()
    evaluate.evaluate(model, dataset, num_workers=0)
    assert model.training
    assert model.calls and not any(call["training"] for call in model.calls)
    model.eval()
    evaluate.evaluate(model, dataset, num_workers=0)
    assert not model.training

    def broken_predict(*args, **kwargs):
        raise RuntimeError("boom")

    model.train()
    model.predict = broken_predict
    with pytest.raises(RuntimeError, match="boom"):
        evaluate.evaluate(model, dataset, num_workers=0)
    assert model.training


def test_evaluate_refuses_transformed_images():
    dataset = FakeDataset(_coco_dict(), resize_to=(32, 32))
    with pytest.raises(ValueError, match="transforms=None"):
        evaluate.evaluate(FakeDetector({}), dataset, num_workers=0)


def test_evaluate_rejects_class_count_mismatch():
    with pytest.raises(ValueError, match="classes"):
        evaluate.evaluate(FakeDetector({}, num_classes=2), FakeDataset(_coco_dict()), num_workers=0)


def test_annotation_id_zero_still_matches():
    coco_dict = _coco_dict(first_ann_id=0)  # pycocotools reads gt id 0 as "no match"
    dataset = FakeDataset(coco_dict)
    metrics = evaluate.evaluate(FakeDetector(_perfect_predictions(dataset)), dataset, num_workers=0)
    assert metrics["mAP"] == pytest.approx(1.0)
    assert metrics["recall"] == pytest.approx(1.0)


def test_per_class_ap_keys_are_class_names_in_label_order():
    metrics = _metrics(HAND_DETECTIONS)
    assert list(metrics["per_class_AP"]) == CLASS_NAMES
    # Class order differs from category-id order: a swap would give cat 1.0 and dog 67/101.
    assert metrics["per_class_AP"]["cat"] < metrics["per_class_AP"]["dog"]


def test_format_metrics_shows_overall_and_per_class():
    table = evaluate.format_metrics(_metrics(HAND_DETECTIONS))
    assert f"{(67 / 101 + 1) / 2:.4f}" in table
    assert f"{67 / 101:.4f}" in table
    for name in CLASS_NAMES:
        assert name in table
    assert "n/a" in table  # bird (no ground truth) and AP large


@pytest.mark.parametrize("missing", ["checkpoint", "ann", "root"])
def test_cli_reports_missing_path(tmp_path, capsys, missing):
    paths = {"checkpoint": tmp_path / "model.pt", "ann": tmp_path / "val.json", "root": tmp_path / "images"}
    paths["checkpoint"].write_bytes(b"")
    paths["ann"].write_text("{}")
    paths["root"].mkdir()
    paths[missing] = tmp_path / "does-not-exist"
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--checkpoint", str(paths["checkpoint"]), "--ann", str(paths["ann"]),
                       "--root", str(paths["root"])])
    assert error.value.code == 2
    assert f"--{missing} not found" in capsys.readouterr().err


def test_repeated_annotation_ids_are_all_scored(caplog):
    coco_dict = _coco_dict()
    for ann in coco_dict["annotations"]:
        ann["id"] = 1  # an export bug: pycocotools would keep one box per id and drop the rest silently
    dataset = FakeDataset(coco_dict)
    with caplog.at_level("WARNING"):
        metrics = evaluate.evaluate(FakeDetector(_perfect_predictions(dataset)), dataset, num_workers=0)
    assert metrics["mAP"] == pytest.approx(1.0)
    assert metrics["recall"] == pytest.approx(1.0)
    assert "not unique" in caplog.text


def test_a_coco_file_without_iscrowd_or_area_is_scored(tmp_path):
    """Both keys are optional in the files the dataset accepts; COCOeval reads both, so index_coco fills
    COCO's defaults (iscrowd 0, area = box width x height) and a perfect prediction scores 1."""
    import json
    from annotations import index_coco, read_coco_json
    data = _coco_dict()
    for ann in data["annotations"]:
        del ann["iscrowd"], ann["area"]
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(data))
    coco = index_coco(read_coco_json(path), path)
    assert all(ann["iscrowd"] == 0 and ann["area"] == ann["bbox"][2] * ann["bbox"][3] for ann in coco.anns.values())
    perfect = [_det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in data["annotations"]]
    metrics = evaluate.coco_metrics(coco, perfect, IMAGE_IDS, CATEGORY_IDS, CLASS_NAMES)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["recall"] == 1.0


# ---- issue #24: the ground truth is the dataset's cleaned boxes; the threshold sits between two scores --------

class SizeKeyedDetector(FakeDetector):
    """model.predict stand-in for real (uniform grey) images: fixed xyxy predictions per image (H, W)."""

    def predict(self, images, conf_threshold=0.5, iou_threshold=0.6, max_detections=100):
        results = []
        for image in images:
            kept = [p for p in self.predictions.get(tuple(image.shape[-2:]), []) if p[1] >= conf_threshold]
            results.append({"boxes": torch.tensor([p[0] for p in kept], dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor([p[1] for p in kept], dtype=torch.float32),
                            "labels": torch.tensor([p[2] for p in kept], dtype=torch.int64)})
        return results


def _dataset_with(make_coco, extra_box):
    """Images of 64x48 and 80x60 px, one plain cat each, `extra_box` (xywh) in the second; category id 5."""
    from dataset_coco import CocoDetectionDataset
    ann_path, image_root = make_coco([(5, "cat")], [(1, "a.jpg", 64, 48), (2, "b.jpg", 80, 60)],
                                     [(1, 5, [4, 4, 20, 20]), (2, 5, [10, 10, 20, 20]), (2, 5, extra_box)])
    return CocoDetectionDataset(ann_path, image_root, transforms=None)


def _as_trained_predictions(dataset):
    """Perfect predictions of what the model trained on: the dataset's own boxes, keyed by image (H, W)."""
    return {dataset.image_size(index): [(box, 0.9, int(label)) for box, label
                                        in zip(*(t.tolist() for t in dataset.get_annotations(index)))]
            for index in range(len(dataset))}


def test_a_box_the_dataset_dropped_is_not_scored_as_a_miss(make_coco):
    """Issue #24 item 4: a box wholly outside the image is dropped from training, so it is no miss either."""
    dataset = _dataset_with(make_coco, [100, 10, 10, 10])  # x 100..110 in an 80 px wide image
    assert dataset.stats["boxes_dropped"] == 1
    metrics = evaluate.evaluate(SizeKeyedDetector(_as_trained_predictions(dataset), 1), dataset, num_workers=0)
    assert metrics["mAP50"] == pytest.approx(1.0) and metrics["mAP"] == pytest.approx(1.0)
    assert metrics["recall"] == 1.0 and metrics["precision"] == 1.0


def test_a_box_half_outside_is_scored_clipped_as_trained(make_coco):
    """Issue #24 item 4: a box trained clipped to the image and predicted there is a match (unclipped, IoU 0.4)."""
    dataset = _dataset_with(make_coco, [60, 10, 50, 20])  # x 60..110, clipped to 60..80
    assert dataset.stats["boxes_clipped"] == 1
    metrics = evaluate.evaluate(SizeKeyedDetector(_as_trained_predictions(dataset), 1), dataset, num_workers=0)
    assert metrics["mAP50"] == pytest.approx(1.0) and metrics["mAP"] == pytest.approx(1.0)
    assert metrics["recall"] == 1.0


def test_ground_truth_coco_holds_the_cleaned_boxes_crowds_and_areas(make_coco, tmp_path, caplog):
    """Kept boxes as the dataset holds them (clipped, EXIF-turned), crowd regions kept for COCOeval to ignore,
    other classes and dropped boxes out, the file's area scaled where clipped, ids from 1; the drops logged."""
    from dataset_coco import CocoDetectionDataset
    ann_path, image_root = make_coco(
        [(5, "cat"), (9, "dog")], [(1, "a.jpg", 64, 48), (2, "rot.jpg", 60, 40)],
        [(1, 5, [4, 4, 20, 20]), (1, 5, [50, 10, 30, 10]), (1, 5, [1, 2, 3]), (1, 5, [70, 0, 5, 5]),
         (1, 5, [0, 20, 64, 28], 1), (1, 9, [30, 30, 10, 10]), (2, 5, [10, 5, 20, 10])])
    data = json.loads(open(ann_path).read())
    data["annotations"][1]["area"] = 150.0  # a mask's area, smaller than the box's 300
    open(ann_path, "w").write(json.dumps(data))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60x40 as annotated, displayed 40 wide and 60 high
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(os.path.join(image_root, "rot.jpg"), exif=exif)
    dataset = CocoDetectionDataset(ann_path, image_root, classes=["cat"], transforms=None)
    with caplog.at_level("INFO", logger="evaluate"):
        coco_gt = evaluate.ground_truth_coco(dataset)
    assert "1 of 6 clipped to the image, 2 dropped (1 under 1 px or outside the image, 1 malformed" in caplog.text
    assert sorted(coco_gt.getCatIds()) == [5] and sorted(coco_gt.anns) == [1, 2, 3, 4]
    assert coco_gt.imgs[2]["width"] == 40 and coco_gt.imgs[2]["height"] == 60
    plain = [(a["image_id"], a["bbox"], a["area"]) for a in coco_gt.anns.values() if not a["iscrowd"]]
    assert plain == [(1, [4.0, 4.0, 20.0, 20.0], 400), (1, [50.0, 10.0, 14.0, 10.0], pytest.approx(150 * 14 / 30)),
                     (2, [25.0, 10.0, 10.0, 20.0], 200)]
    for index in range(len(dataset)):  # exactly the boxes training sees
        boxes = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in dataset.get_annotations(index)[0].tolist()]
        assert boxes == [a["bbox"] for a in coco_gt.imgToAnns[dataset.image_ids[index]] if not a["iscrowd"]]
    (crowd,) = [a for a in coco_gt.anns.values() if a["iscrowd"]]
    assert crowd["bbox"] == [0.0, 20.0, 64.0, 28.0] and crowd["category_id"] == 5


def test_evaluate_cli_scores_a_file_with_a_malformed_bbox(make_coco, tmp_path, caplog):
    """Issue #24 item 4: a 3-number bbox the dataset dropped with a warning used to crash COCOeval."""
    from checkpoints import model_checkpoint, save_checkpoint
    from model_lightweight import create_lightweight_model
    ann_path, image_root = make_coco([(5, "cat")], [(1, "a.jpg", 64, 48), (2, "b.jpg", 80, 60)],
                                     [(1, 5, [4, 4, 20, 20]), (2, 5, [10, 10, 20]), (2, 5, [30, 20, 30, 30])])
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "model.pth")
    save_checkpoint(model_checkpoint(create_lightweight_model(1, "nano", img_size=64), ["cat"]), checkpoint)
    metrics = evaluate.main(["--checkpoint", checkpoint, "--ann", ann_path, "--root", image_root, "--device", "cpu"])
    assert metrics["num_detections"] > 0 and 0.0 <= metrics["mAP"] <= 1.0
    assert "dropped 1" in caplog.text


def test_best_f1_threshold_lies_between_the_kept_score_and_the_next():
    """Issue #24 item 5: the stored threshold keeps the best-F1 detections with a margin on both sides, so a score
    that moves by an ulp on another backend or batch size neither drops out nor slips in."""
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.3])
    is_tp = np.array([True, True, True, False, False])
    best = evaluate._best_f1(scores, is_tp, ~is_tp, num_gt=3)
    assert best["best_f1"] == 1.0 and best["best_f1_threshold"] == pytest.approx(0.75)
    for kept_score in (0.8, np.nextafter(np.float32(0.8), np.float32(0))):  # an ulp lower still passes
        assert kept_score >= best["best_f1_threshold"]
    assert np.nextafter(np.float32(0.7), np.float32(1)) < best["best_f1_threshold"]  # an ulp higher still fails

    lowest = evaluate._best_f1(scores, np.ones(5, bool), np.zeros(5, bool), num_gt=5)  # every detection kept
    assert 0.3 * 0.99 < lowest["best_f1_threshold"] < np.nextafter(np.float32(0.3), np.float32(0))


def test_the_calibrated_threshold_gives_the_same_detections_on_batch_1_batch_8_and_onnx(tmp_path):
    """Issue #24 items 5 and 6: at the threshold fine-tuning stores, the loaded checkpoint (one image per call and
    eight) and its ONNX export keep exactly the val detections the best F1 counted; the sidecar is strict JSON."""
    from dataset_coco import CocoDetectionDataset, load_image
    import export
    from checkpoints import model_checkpoint, save_checkpoint
    from model_lightweight import create_lightweight_model, load_model
    from ort_detector import OrtDetector
    from synthetic_data import write_shapes_split
    write_shapes_split(tmp_path / "images", tmp_path / "shapes.json", 8, ["square", "circle"], img_size=96, seed=0)
    paths = sorted(str(p) for p in (tmp_path / "images").iterdir())
    torch.manual_seed(0)
    model = create_lightweight_model(2, "nano", img_size=64).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # spread scores: the focal-prior init scores every box about 0.01
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        model.head.cls_pred.weight.normal_(0.0, 0.3, generator=generator)
        model.head.cls_pred.bias.zero_()
    images = [load_image(path) for path in paths]
    # The model's own two best boxes per image are the ground truth: true positives are certain, and the best
    # F1 cuts right at a true positive's score, the case an ulp breaks.
    data = json.loads((tmp_path / "shapes.json").read_text())
    data["annotations"] = []
    for image, result in zip(data["images"], model.predict(images, conf_threshold=0.001)):
        for box, label in zip(result["boxes"][:2].tolist(), result["labels"][:2].tolist()):
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image["id"],
                                        "category_id": data["categories"][label]["id"], "iscrowd": 0,
                                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                        "area": (box[2] - box[0]) * (box[3] - box[1])})
    (tmp_path / "val.json").write_text(json.dumps(data))
    assert [os.path.basename(p) for p in paths] == [os.path.basename(i["file_name"]) for i in data["images"]]
    val = CocoDetectionDataset(str(tmp_path / "val.json"), str(tmp_path / "images"), transforms=None)
    metrics = evaluate.evaluate(model, val, batch_size=8, num_workers=0)
    threshold = evaluate.calibrated_thresholds(metrics, 0.25)[0]
    assert metrics["best_f1"] > 0 and threshold == metrics["best_f1_threshold"]
    num_gt = len(data["annotations"])
    true_positives = round(metrics["best_f1_recall"] * num_gt)
    kept_on_val = round(true_positives / metrics["best_f1_precision"])
    assert 0 < kept_on_val < metrics["num_detections"]

    checkpoint = str(tmp_path / "best_model.pth")
    save_checkpoint(model_checkpoint(model, ["square", "circle"], conf_threshold=threshold), checkpoint)
    export.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "best_model.onnx"), "--dynamic-batch",
                 "--runs", "1", "--warmup", "0"])
    sidecar = json.loads((tmp_path / "best_model.json").read_text(), parse_constant=_refuse)
    assert sidecar["postprocess"]["calibrated_conf_threshold"] == threshold
    loaded = load_model(checkpoint)
    counts = {"batch 1": sum(len(loaded.predict([image])[0]["scores"]) for image in images),
              "batch 8": sum(len(result["scores"]) for result in loaded.predict(images)),
              "onnxruntime": sum(len(result["scores"]) for result in OrtDetector(tmp_path / "best_model.onnx",
                                                                                threads=1).predict(images))}
    assert counts == dict.fromkeys(counts, kept_on_val), (counts, kept_on_val)


def _refuse(constant):
    raise ValueError(f"{constant} is not JSON")


def test_predict_ann_scores_against_the_boxes_as_trained(make_coco):
    """Issue #24 item 4 in predict.py --ann: the ground truth of the matched images is the dataset's cleaned boxes
    (one dropped outside the image, one clipped, a malformed one dropped), with the file's image ids."""
    import predict
    ann_path, image_root = make_coco([(5, "cat")], [(1, "a.jpg", 64, 48), (2, "b.jpg", 80, 60), (3, "c.jpg", 32, 32)],
                                     [(1, 5, [4, 4, 20, 20]), (1, 5, [100, 10, 10, 10]), (2, 5, [60, 10, 50, 20]),
                                      (2, 5, [1, 2, 3]), (3, 5, [1, 1, 8, 8])])
    paths = [os.path.join(image_root, name) for name in ("b.jpg", "a.jpg")]  # c.jpg is not predicted
    coco_gt, category_ids, image_ids = predict.coco_ids(ann_path, paths, ["Cat"])
    assert category_ids == [5] and image_ids == [2, 1]
    assert sorted((a["image_id"], a["bbox"]) for a in coco_gt.anns.values()) == [(1, [4.0, 4.0, 20.0, 20.0]),
                                                                                 (2, [60.0, 10.0, 20.0, 20.0])]


def test_the_pr_curve_has_every_operating_point_and_the_best_f1_threshold_lies_on_it():
    """Issue #26 item 8: one point per distinct score (ties are one operating point), unthinned and unrounded, so
    the point the calibrated threshold selects is the best-F1 operating point itself."""
    from plots import operating_point
    num_images = 250  # more distinct scores than the 200 points the curve was once thinned to
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in range(1, num_images + 1)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}
                   for i in range(1, num_images + 1)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    rng = np.random.default_rng(0)
    detections = []
    for i in range(1, num_images + 1):
        tp_score = round(float(rng.uniform(0.05, 1.0)), 3)  # 3 decimals: many ties between images
        detections.append({"image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "score": tp_score})
        if i % 3:
            detections.append({"image_id": i, "category_id": 1, "bbox": [60, 60, 10, 10],
                               "score": round(float(rng.uniform(0.05, 1.0)), 3)})
    metrics = evaluate.coco_metrics(coco, detections, list(range(1, num_images + 1)), [1], ["thing"])
    curve = metrics["pr_curve"]

    is_tp = {id(d): d["bbox"][0] == 10 for d in detections}
    distinct = sorted({d["score"] for d in detections}, reverse=True)
    assert len(distinct) > 200 and curve["score"] == distinct
    for score, recall, precision in zip(curve["score"], curve["recall"], curve["precision"]):
        kept = [d for d in detections if d["score"] >= score]
        tp = sum(is_tp[id(d)] for d in kept)
        assert recall == pytest.approx(tp / num_images, abs=1e-12)
        assert precision == pytest.approx(tp / len(kept), abs=1e-12)
    index = operating_point(curve, metrics["best_f1_threshold"])
    assert (curve["recall"][index], curve["precision"][index]) == pytest.approx(
        (metrics["best_f1_recall"], metrics["best_f1_precision"]), abs=1e-12)


def test_evaluate_ann_data_yaml_scores_its_val_images_not_train(tmp_path, capsys):
    """A data.yaml read as annotations means its val entry, as Ultralytics' val does; read as train data it scored
    the training images without a word."""
    from checkpoints import model_checkpoint, save_checkpoint
    from model_lightweight import create_lightweight_model
    from test_annotations import write_data_yaml, write_yolo_split
    write_yolo_split(tmp_path / "ds" / "train", {"a": ["0 0.5 0.5 0.5 0.5"], "b": ["0 0.3 0.3 0.2 0.2"],
                                                  "c": ["0 0.6 0.6 0.3 0.3"]})
    write_yolo_split(tmp_path / "ds" / "valid", {"d": ["0 0.5 0.5 0.25 0.25"]})
    data_yaml = write_data_yaml(tmp_path / "ds" / "data.yaml", train="train/images", val="valid/images")
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "model.pth")
    names = ["kangaroo"]
    save_checkpoint(model_checkpoint(create_lightweight_model(1, "nano", img_size=64), names), checkpoint)
    evaluate.main(["--checkpoint", checkpoint, "--ann", str(data_yaml), "--device", "cpu"])
    assert f"{data_yaml} (val): 1 images" in capsys.readouterr().out


def test_evaluate_cli_ends_with_the_time_per_image_of_each_phase(make_coco, tmp_path, capsys):
    """Issue #26 item 6: evaluate.py's last line is the time per image of decode+preprocess, network and
    postprocess, with the network's input size (a 4:3 image at 64 px is 64x64 after padding to 32s, a 2:1 one
    64x32); metrics["speed_ms"] holds the numbers, which add up to no more than the wall time."""
    import time
    from checkpoints import model_checkpoint, save_checkpoint
    from model_lightweight import create_lightweight_model
    ann_path, image_root = make_coco([(5, "cat")], [(1, "a.jpg", 64, 48), (2, "b.jpg", 80, 60), (3, "c.jpg", 96, 48)],
                                     [(1, 5, [4, 4, 20, 20]), (2, 5, [30, 20, 30, 30])])
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "model.pth")
    save_checkpoint(model_checkpoint(create_lightweight_model(1, "nano", img_size=64), ["cat"]), checkpoint)
    start = time.perf_counter()
    metrics = evaluate.main(["--checkpoint", checkpoint, "--ann", ann_path, "--root", image_root, "--device", "cpu",
                             "--batch-size", "2"])
    wall_per_image = 1000 * (time.perf_counter() - start) / 3
    speed = metrics["speed_ms"]
    assert set(speed) == {"preprocess", "network", "postprocess"} and all(v > 0 for v in speed.values()), speed
    assert sum(speed.values()) <= wall_per_image
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == (f"Speed: {speed['preprocess']:.1f} ms decode+preprocess, {speed['network']:.1f} ms network, "
                         f"{speed['postprocess']:.1f} ms postprocess per image (64x64, 64x32 input, 3 images)")
