"""COCO-style evaluation of a detector: mAP from pycocotools plus precision/recall/F1 at a threshold, AP, AP50 and
the best-F1 threshold of every class, and a confusion matrix.

`evaluate(model, data)` is the only evaluation path: training calls it every epoch with the live
model and the CLI below scores a checkpoint. mAP numbers come straight from pycocotools' COCOeval, scored
against the boxes as the dataset cleaned them for training (`ground_truth_coco`), not the raw file;
precision, recall and F1 are read from COCOeval's own per-image matches (IoU 0.5), not from a
second matcher, so both sets of numbers agree on what counts as a true positive. Thresholds are one score or one
per class (a checkpoint's calibrated per-class thresholds, `calibrated_thresholds`); a class without ground truth
in the scored set has None (JSON null) for its AP, AP50 and best F1, never a crash.

Score a fine-tuning run's best checkpoint (or its export, --checkpoint) on the images the run validated on, or a
checkpoint on an annotated set:

    python evaluate.py --run finetune_results/kangaroo_<stamp>
    python evaluate.py --run RUN --checkpoint RUN/best_model_int8.onnx      # its INT8 export, on the same images
    python evaluate.py --checkpoint runs/finetune/best.pt --ann data/val.json --root data/images
    python evaluate.py --checkpoint best.pt --ann val.json --root images --class-name person --conf 0.4
    python evaluate.py --checkpoint best.pt --ann val.json --root images --save-json preds.json
"""

import argparse
import collections
import contextlib
import copy
import io
import logging
import math
import os
import time

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from config import inference_defaults, write_json_atomic
from inference import clip_boxes, detection_settings
from plots import threshold_text

logger = logging.getLogger(__name__)

# COCO practice: keep almost every detection for mAP, which integrates over all score thresholds.
MAP_SCORE_THRESHOLD = 0.001
MATCH_IOU = 0.5  # IoU at which precision/recall/F1 are reported
MAX_DETS = 100  # COCOeval's largest maxDets, the one its headline numbers use
# COCOeval.stats indices -> our keys (order of COCOeval.summarize for iouType "bbox").
STATS_KEYS = {"mAP": 0, "mAP50": 1, "mAP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5}


def predictions_to_coco(results, image_ids, category_ids):
    """Convert `model.predict` outputs to COCO result dicts.

    Args:
        results: list of per-image dicts {"boxes": float (N, 4) xyxy in original pixels,
            "scores": (N,), "labels": int64 (N,) in 0..num_classes-1}, as `model.predict` returns.
        image_ids: COCO image id of each entry of `results` (same length).
        category_ids: COCO category id of each label: label i -> category_ids[i].

    Returns:
        list of {"image_id": int, "category_id": int, "bbox": [x, y, w, h] (COCO xywh, pixels),
        "score": float}, in the order of `results`.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"got {len(results)} prediction results for {len(image_ids)} image ids")
    detections = []
    for result, image_id in zip(results, image_ids):
        boxes_xyxy = result["boxes"].detach().float().cpu().reshape(-1, 4)
        scores = result["scores"].detach().float().cpu().reshape(-1).tolist()
        labels = result["labels"].detach().cpu().reshape(-1).tolist()
        bbox_xywh = torch.cat([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], dim=1).tolist()
        for box, score, label in zip(bbox_xywh, scores, labels):
            if not 0 <= label < len(category_ids):
                raise ValueError(f"label {label} is out of range for {len(category_ids)} classes")
            detections.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                               "bbox": box, "score": score})
    return detections


def ground_truth_coco(dataset):
    """The ground truth to score a dataset's predictions against: its own cleaned boxes, as a COCO object.

    The raw annotation file is not what the model trained on: boxes the dataset dropped (outside the image, under
    1 px, malformed) would count as misses, a box it clipped to the image would be scored unclipped, and a
    malformed bbox crashes pycocotools (issue #24). So the boxes of the chosen classes in the kept images are
    cleaned by the dataset's own `_parse_boxes` (after its EXIF turn). Crowd regions stay, cleaned alike, for
    COCOeval to ignore; the file's `area` (COCO's is the mask's; it picks the size range) is kept, scaled by the
    share of the box left where the box was clipped.

    Args:
        dataset: a `CocoDetectionDataset`; an object with a `coco` but no `image_size` is scored against its
            `coco` as it is.

    Returns:
        pycocotools `COCO` holding the dataset's images (width/height as the dataset reads them), its chosen
        categories and the cleaned annotations (ids 1..N, bbox xywh in original pixels, area, iscrowd).
    """
    if not hasattr(dataset, "image_size"):
        return dataset.coco
    from dataset_coco import _parse_boxes  # lazy, as in _build_loader: the cleaning training sees
    chosen = set(dataset.category_ids)
    anns, image_index = [], []
    for index, image_id in enumerate(dataset.image_ids):
        for ann in dataset.coco.imgToAnns.get(image_id, []):
            if ann.get("category_id") in chosen:
                anns.append(ann)
                image_index.append(index)
    sizes = np.array([dataset.image_size(index) for index in range(len(dataset.image_ids))],
                     dtype=np.int64).reshape(-1, 2)  # (num_images, 2) = (H, W)
    counts = collections.Counter()
    boxes_xyxy, keep = _parse_boxes(anns, np.array(image_index, dtype=np.int64), sizes, counts)
    kept = [(ann, sizes[index]) for ann, index, k in zip(anns, image_index, keep) if k]
    annotations = []
    for ann_id, ((ann, (height, width)), (x0, y0, x1, y1)) in enumerate(zip(kept, boxes_xyxy.tolist()), start=1):
        bbox_xywh = [x0, y0, x1 - x0, y1 - y0]
        annotations.append({"id": ann_id, "image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": bbox_xywh, "area": _scored_area(ann, bbox_xywh, height, width),
                            "iscrowd": int(bool(ann.get("iscrowd", 0)))})
    if counts["boxes_dropped"] or counts["boxes_clipped"]:
        logger.info("scoring against the boxes as trained: %d of %d clipped to the image, %d dropped (%d under 1 px "
                    "or outside the image, %d malformed or non-finite)", counts["boxes_clipped"], len(anns),
                    counts["boxes_dropped"], counts["boxes_dropped_degenerate"], counts["boxes_dropped_invalid"])
    images = [{**dataset.coco.imgs[image_id], "height": int(height), "width": int(width)}
              for image_id, (height, width) in zip(dataset.image_ids, sizes.tolist())]
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations,
                       "categories": copy.deepcopy(dataset.coco.loadCats(dataset.category_ids))}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco_gt.createIndex()
    return coco_gt


def _scored_area(ann, bbox_xywh, height, width):
    """The file's area for a box inside the image; where clipped, that area times the share of the box left; the
    box's own area when the file's is unusable."""
    x, y, w, h = (float(value) for value in ann["bbox"])
    area = ann.get("area")
    if not isinstance(area, (int, float)) or not math.isfinite(area) or area < 0:
        return bbox_xywh[2] * bbox_xywh[3]
    if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
        return float(area)
    return float(area) * bbox_xywh[2] * bbox_xywh[3] / (w * h)


def coco_metrics(coco_gt, detections, image_ids, category_ids, class_names, conf_threshold=None,
                 confusion_threshold=None):
    """Score COCO-format detections against ground truth with pycocotools.

    Args:
        coco_gt: pycocotools `COCO` object holding the ground truth.
        detections: list of COCO result dicts {"image_id", "category_id", "bbox" (xywh, pixels),
            "score"}; the list is not modified. May be empty.
        image_ids: image ids to score (COCOeval `imgIds`); other images are ignored.
        category_ids: category ids to score (COCOeval `catIds`), label order.
        class_names: class name of each entry of `category_ids`.
        conf_threshold: score threshold for "precision", "recall" and "f1": a score, or a list of one per class;
            None: the training scripts' report_threshold (config.inference_defaults).
        confusion_threshold: the threshold(s) of "confusion_matrix", as conf_threshold; None: this evaluation's
            calibrated thresholds (calibrated_thresholds), the ones fine-tuning stores for predict().

    Returns:
        dict with
        - "mAP", "mAP50", "mAP75", "AP_small", "AP_medium", "AP_large": COCOeval.stats[0:6];
        - "per_class": {class name: {"AP", "AP50", "num_gt" (ground-truth boxes), "best_f1",
          "best_f1_threshold", "best_f1_precision", "best_f1_recall"}} in class order: AP@[.5:.95] is the mean of
          COCOeval's precision array over IoU thresholds and recall points (area "all", 100 detections), as
          COCOeval's own mAP, AP50 the same at IoU 0.5 alone, and the best F1 is that of the class's own
          detections; None for every value but num_gt of a class without ground truth in `image_ids`;
        - "per_class_AP": {class name: per_class's AP, nan where None} (the older key);
        - "precision", "recall", "f1": at `conf_threshold`, IoU 0.5, pooled over classes;
        - "best_f1", "best_f1_threshold", "best_f1_precision", "best_f1_recall": the best F1 over
          score thresholds, a threshold giving it (midway between the last score it keeps and the next lower
          one) and P/R there (0.0 when no threshold gives a true positive);
        - "pr_curve": {"recall", "precision", "score"} lists, the precision-recall curve at IoU 0.5 pooled over
          classes: every operating point, one per distinct detection score t (keeping 'score >= t'), scores
          descending; "best_f1_threshold" lies just under the score of the best-F1 point;
        - "confusion_matrix": (K + 1) x (K + 1) counts as lists, confusion_matrix at `confusion_threshold`;
          "confusion_thresholds": the K thresholds it used;
        - "num_detections": len(detections).
        Values pycocotools cannot define (its -1: no ground truth for that class or area range)
        are nan (None in "per_class"); every class of `class_names` has a key. With no detections every defined
        value is 0.0.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco_gt = _gt_with_positive_ann_ids(coco_gt)
        coco_dt = _load_results(coco_gt, detections)
        cocoeval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        cocoeval.params.imgIds = list(image_ids)
        cocoeval.params.catIds = list(category_ids)
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    metrics = {key: _defined(cocoeval.stats[index]) for key, index in STATS_KEYS.items()}
    scores, is_tp, is_fp, num_gt, labels, gt_per_class = _pooled_matches(cocoeval, category_ids)
    if conf_threshold is None:
        conf_threshold = inference_defaults()["report_threshold"]
    kept = scores >= class_thresholds(conf_threshold, len(category_ids))[labels]
    metrics.update(_precision_recall_at(is_tp[kept], is_fp[kept], num_gt))
    metrics.update(_best_f1(scores, is_tp, is_fp, num_gt))
    metrics["per_class"] = _per_class(cocoeval, category_ids, class_names, scores, is_tp, is_fp, labels,
                                      gt_per_class)
    metrics["per_class_AP"] = {name: float("nan") if entry["AP"] is None else entry["AP"]
                               for name, entry in metrics["per_class"].items()}
    metrics["pr_curve"] = _pr_curve(scores, is_tp, is_fp, num_gt)
    if confusion_threshold is None:
        confusion_threshold = calibrated_thresholds(metrics, inference_defaults()["conf_threshold"])[1]
    metrics["confusion_thresholds"] = class_thresholds(confusion_threshold, len(category_ids)).tolist()
    metrics["confusion_matrix"] = confusion_matrix(coco_gt, detections, image_ids, category_ids,
                                                   metrics["confusion_thresholds"]).tolist()
    metrics["num_detections"] = len(detections)
    return metrics


def class_thresholds(conf_threshold, num_classes):
    """A score threshold, or one per class, as a float64 (num_classes,) array; a list of another length raises."""
    thresholds = np.asarray(conf_threshold, dtype=np.float64).reshape(-1)
    if thresholds.size == 1:
        return np.full(num_classes, float(thresholds[0]))
    if thresholds.size != num_classes:
        raise ValueError(f"{thresholds.size} per-class thresholds for {num_classes} classes")
    return thresholds


def calibrated_thresholds(metrics, fallback):
    """The thresholds fine-tuning stores for predict(): (the pooled best-F1 threshold, one per class).

    A class's own best-F1 threshold where its detections found a true positive on val, else the pooled one; the
    pooled one where any threshold found a true positive, else `fallback` (config_transfer_learning.json's
    inference conf_threshold)."""
    pooled = metrics["best_f1_threshold"] if metrics["best_f1"] > 0 else fallback
    return pooled, [entry["best_f1_threshold"] if entry["best_f1"] else pooled
                    for entry in metrics["per_class"].values()]


def _per_class(cocoeval, category_ids, class_names, scores, is_tp, is_fp, labels, gt_per_class):
    """AP, AP50 and the best F1 of each class (coco_metrics' "per_class"); None where the class has no ground truth.
    `labels` (class index per detection) and `gt_per_class` are in class_names' order."""
    params = cocoeval.params
    precision = cocoeval.eval["precision"]  # (T iou, R recall, K classes, A areas, M maxDets), COCOeval's catIds order
    area_index, max_det_index = params.areaRngLbl.index("all"), params.maxDets.index(MAX_DETS)
    iou_index = int(np.argmin(np.abs(np.asarray(params.iouThrs) - MATCH_IOU)))
    per_class = {}
    for index, name in enumerate(class_names):
        num_gt = int(gt_per_class[index])
        if num_gt == 0:
            per_class[name] = {"AP": None, "AP50": None, "num_gt": 0, "best_f1": None, "best_f1_threshold": None,
                               "best_f1_precision": None, "best_f1_recall": None}
            continue
        k = params.catIds.index(category_ids[index])  # COCOeval sorts catIds; class order may differ
        values = precision[:, :, k, area_index, max_det_index]
        at_50 = values[iou_index][values[iou_index] > -1]
        defined = values[values > -1]
        mine = labels == index
        per_class[name] = {"AP": float(defined.mean()) if defined.size else None,
                           "AP50": float(at_50.mean()) if at_50.size else None, "num_gt": num_gt,
                           **_best_f1(scores[mine], is_tp[mine], is_fp[mine], num_gt)}
    return per_class


def _defined(value):
    """COCOeval's -1 means 'nothing to score'; report it as nan."""
    return float(value) if value > -1 else float("nan")


def _gt_with_positive_ann_ids(coco_gt):
    """Renumber ground-truth annotation ids from 1 when one of them is 0 (or negative) or ids repeat.

    COCOeval stores the matched gt id in dtMatches and reads 0 as "unmatched", so a gt with id 0
    can never be a true positive (cocoapi#332, torchvision#1530); exports starting at 0 are common.
    Repeated ids are worse: pycocotools indexes annotations by id, so `loadAnns` returns one box in
    place of all that share an id and the others silently vanish from the ground truth.
    """
    listed = len(coco_gt.dataset.get("annotations", []))
    if not coco_gt.anns or (min(coco_gt.anns) > 0 and len(coco_gt.anns) == listed):
        return coco_gt
    if len(coco_gt.anns) < listed:
        logger.warning("annotation ids are not unique (%d annotations, %d distinct ids); renumbering them "
                       "from 1 for COCOeval: fix the ids in the annotation file", listed, len(coco_gt.anns))
    else:
        logger.info("annotation ids start at %d; renumbering them from 1 for COCOeval", min(coco_gt.anns))
    renumbered = COCO()
    renumbered.dataset = dict(coco_gt.dataset)
    renumbered.dataset["annotations"] = [dict(ann, id=index + 1)
                                         for index, ann in enumerate(coco_gt.dataset["annotations"])]
    renumbered.createIndex()
    return renumbered


def _load_results(coco_gt, detections):
    """`coco_gt.loadRes` on copies of the dicts (it edits them), or an empty result set."""
    if detections:
        return coco_gt.loadRes([dict(detection) for detection in detections])
    # loadRes indexes anns[0] and so fails on an empty list; an empty result set scores as zeros.
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                       "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def _pooled_matches(cocoeval, category_ids):
    """Per-detection outcome at IoU 0.5, area 'all', 100 dets, pooled over images and classes.

    Returns (scores, is_tp, is_fp, num_gt, labels, gt_per_class): scores sorted high to low (stable, as
    COCOeval's accumulate), boolean arrays and the class index (into `category_ids`) of each detection aligned with
    them, the number of non-ignored ground truths, and that number per class (int64 (K,)).
    Detections matched to an ignored ground truth (crowd) are neither TP nor FP, as in COCOeval.
    """
    params = cocoeval.params
    iou_index = int(np.argmin(np.abs(np.asarray(params.iouThrs) - MATCH_IOU)))
    area_all = list(params.areaRng[params.areaRngLbl.index("all")])
    label_of = {category_id: index for index, category_id in enumerate(category_ids)}
    scores, matched, ignored, labels = [], [], [], []
    gt_per_class = np.zeros(len(category_ids), dtype=np.int64)
    for entry in cocoeval.evalImgs:
        if entry is None or list(entry["aRng"]) != area_all or entry["maxDet"] != MAX_DETS:
            continue
        label = label_of[entry["category_id"]]
        scores.append(np.asarray(entry["dtScores"], dtype=np.float64))
        matched.append(entry["dtMatches"][iou_index] > 0)  # holds the matched gt id, 0 = none
        ignored.append(entry["dtIgnore"][iou_index].astype(bool))
        labels.append(np.full(len(entry["dtScores"]), label, dtype=np.int64))
        gt_per_class[label] += int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
    num_gt = int(gt_per_class.sum())
    if not scores:
        empty = np.zeros(0)
        return empty, empty.astype(bool), empty.astype(bool), num_gt, empty.astype(np.int64), gt_per_class
    scores, matched, ignored, labels = (np.concatenate(parts) for parts in (scores, matched, ignored, labels))
    order = np.argsort(-scores, kind="mergesort")
    scores, matched, ignored, labels = scores[order], matched[order], ignored[order], labels[order]
    return scores, matched & ~ignored, ~matched & ~ignored, num_gt, labels, gt_per_class


def _prf(tp, fp, num_gt):
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / num_gt if num_gt > 0 else 0.0
    f1 = 2 * tp / (tp + fp + num_gt) if tp > 0 else 0.0  # = 2PR / (P + R)
    return precision, recall, f1


def _precision_recall_at(is_tp, is_fp, num_gt):
    """Precision, recall and F1 of the detections kept (at their thresholds)."""
    tp, fp = int(is_tp.sum()), int(is_fp.sum())
    precision, recall, f1 = _prf(tp, fp, num_gt)
    return {"precision": precision, "recall": recall, "f1": f1}


def _best_f1(scores, is_tp, is_fp, num_gt):
    """Best F1 over thresholds 'score >= t' for t among the detection scores, a threshold giving it, and the
    precision and recall there (the operating point fine-tuning stores as the model's calibrated threshold).

    The threshold returned lies between the last kept score and the next lower one (`_threshold_below`): on the
    kept score itself, a rerun that moves it by an ulp (batch 1 vs 8, ONNX Runtime vs PyTorch) would drop that
    detection, always a true positive, and the stored operating point would not reproduce (issue #24).
    """
    if not is_tp.any():
        return {"best_f1": 0.0, "best_f1_threshold": 0.0, "best_f1_precision": 0.0, "best_f1_recall": 0.0}
    # A threshold keeps every detection of equal score, so cut only after the last of each run.
    cuts = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    tp, fp = np.cumsum(is_tp)[cuts], np.cumsum(is_fp)[cuts]
    f1 = 2 * tp / (tp + fp + num_gt)  # = 2PR / (P + R)
    best = int(np.argmax(f1))  # first maximum: ties keep the higher threshold
    precision, recall, _ = _prf(int(tp[best]), int(fp[best]), num_gt)
    return {"best_f1": float(f1[best]), "best_f1_threshold": _threshold_below(scores, cuts[best]),
            "best_f1_precision": precision, "best_f1_recall": recall}


LOWEST_SCORE_MARGIN = 1e-3  # relative: a threshold below the lowest score, far wider than float32 noise


def _threshold_below(scores, cut):
    """A threshold keeping scores[:cut + 1] of the descending `scores`: the midpoint with the next lower score,
    or a small fraction under the lowest score."""
    if cut + 1 < len(scores):
        return (float(scores[cut]) + float(scores[cut + 1])) / 2
    return float(scores[cut]) * (1 - LOWEST_SCORE_MARGIN)


def _pr_curve(scores, is_tp, is_fp, num_gt):
    """Precision and recall of 'score >= t' for every distinct detection score t, high to low: the whole curve,
    which runs.py writes to pr_curve.csv (a thinned one can miss the calibrated operating point)."""
    if not len(scores) or num_gt == 0:
        return {"recall": [], "precision": [], "score": []}
    cuts = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))  # the last of each run of equal scores
    tp, fp = np.cumsum(is_tp)[cuts], np.cumsum(is_fp)[cuts]
    return {"recall": (tp / num_gt).tolist(), "precision": (tp / np.maximum(tp + fp, 1)).tolist(),
            "score": scores[cuts].tolist()}


def confusion_matrix(coco_gt, detections, image_ids, category_ids, thresholds, iou_threshold=MATCH_IOU):
    """Counts of predicted against true class, with background, as Ultralytics' confusion matrix.

    Per image, the detections scoring at least their class's threshold are matched to the ground-truth boxes one
    to one, whatever the classes, highest IoU first, at IoU >= `iou_threshold`. A detection on a crowd region
    (over half its area inside one) is left out, as COCOeval ignores it.

    Args:
        coco_gt, detections, image_ids, category_ids: as coco_metrics'.
        thresholds: one score threshold per class (class_thresholds).
    Returns:
        int64 (K + 1, K + 1) array: [predicted, true], class indices in `category_ids` order and index K the
        background: row K counts missed boxes, column K detections of nothing.
    """
    num_classes = len(category_ids)
    label_of = {category_id: index for index, category_id in enumerate(category_ids)}
    thresholds = class_thresholds(thresholds, num_classes)
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    by_image = collections.defaultdict(list)
    for detection in detections:
        label = label_of.get(detection["category_id"])
        if label is not None and detection["score"] >= thresholds[label]:
            by_image[detection["image_id"]].append((label, detection["bbox"]))
    for image_id in image_ids:
        anns = [ann for ann in coco_gt.imgToAnns.get(image_id, []) if ann["category_id"] in label_of]
        truth = [ann for ann in anns if not ann.get("iscrowd", 0)]
        true_labels = [label_of[ann["category_id"]] for ann in truth]
        found = _off_crowd(by_image.get(image_id, []), [ann["bbox"] for ann in anns if ann.get("iscrowd", 0)])
        pairs = _matched_pairs(_xyxy([box for _, box in found]), _xyxy([ann["bbox"] for ann in truth]),
                               iou_threshold)
        for d, g in pairs:
            matrix[found[d][0], true_labels[g]] += 1
        for g in set(range(len(truth))) - {g for _, g in pairs}:
            matrix[num_classes, true_labels[g]] += 1
        for d in set(range(len(found))) - {d for d, _ in pairs}:
            matrix[found[d][0], num_classes] += 1
    return matrix


def _off_crowd(found, crowd_xywh):
    """The (label, bbox xywh) detections of `found` with at most half their area inside any crowd region."""
    if not found or not crowd_xywh:
        return found
    boxes = _xyxy([box for _, box in found])
    inside = _intersection(boxes, _xyxy(crowd_xywh)) / (boxes[:, 2:] - boxes[:, :2]).prod(1, keepdim=True).clamp(min=1e-9)
    return [item for item, keep in zip(found, (inside <= 0.5).all(1).tolist()) if keep]


def _matched_pairs(boxes, truth, iou_threshold):
    """One-to-one (detection, truth) index pairs of xyxy boxes at IoU >= iou_threshold, highest IoU first."""
    if not len(boxes) or not len(truth):
        return []
    from torchvision.ops import box_iou  # here: predict.py imports this module and starts without torchvision
    iou = box_iou(boxes, truth)
    pairs, used_d, used_g = [], set(), set()
    for d, g in sorted(torch.nonzero(iou >= iou_threshold).tolist(), key=lambda pair: -float(iou[pair[0], pair[1]])):
        if d not in used_d and g not in used_g:
            pairs.append((d, g))
            used_d.add(d)
            used_g.add(g)
    return pairs


def _xyxy(boxes_xywh):
    boxes = torch.tensor(boxes_xywh, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def _intersection(boxes, others):
    """(N, M) intersection areas of xyxy boxes."""
    top_left = torch.max(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.min(boxes[:, None, 2:], others[None, :, 2:])
    return (bottom_right - top_left).clamp(min=0).prod(2)


def _collate_lists(batch):
    batch = [item for item in batch if item is not None]  # unreadable images (the dataset warned)
    return tuple(list(items) for items in zip(*batch)) if batch else ([], [])


def _build_loader(data, batch_size, num_workers):
    """Return (dataset, loader): a DataLoader is used as is, a dataset gets a plain ordered one."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data.dataset, data
    if num_workers is None:
        from dataset_coco import default_num_workers  # lazy: dataset_coco owns this policy
        num_workers = default_num_workers(batch_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate_lists)
    return data, loader


def _model_device(model):
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _decode_scale(target):
    """Original pixels per image pixel of a dataset item: its "decode_scale" (a JPEG decoded reduced), else 1."""
    return int(target.get("decode_scale", 1)) if isinstance(target, dict) else 1


def _decoded_frame(target):
    """(decode_scale, decode_origin, orig_size) of a dataset item, as to_original_frame takes them."""
    return _decode_scale(target), target.get("decode_origin", (0.0, 0.0)), target.get("orig_size")


def _check_original_frame(image, target):
    """Predictions must map back to original pixels: refuse images a transform has resized. A JPEG decoded at
    1/scale is ceil(orig_size / scale) (libjpeg rounds up)."""
    orig_size = target.get("orig_size") if isinstance(target, dict) else None
    if orig_size is None:
        return
    orig_size, scale = tuple(int(side) for side in orig_size), _decode_scale(target)
    if tuple(-(-side // scale) for side in orig_size) != tuple(image.shape[-2:]):
        raise ValueError(f"evaluate needs the original images (dataset built with transforms=None); "
                         f"got an image of {tuple(image.shape[-2:])} for orig_size {orig_size}"
                         f"{f' decoded at 1/{scale}' if scale != 1 else ''}")


def to_original_frame(result, scale, origin, orig_size):
    """Detections on an image decoded at 1/scale (dataset_coco.decode_image: a decoded point p is the original
    (p - origin) * scale) in original pixels, clipped to the original (H, W); `result` itself for scale 1."""
    if scale == 1:
        return result
    origin = torch.tensor(tuple(origin) * 2, dtype=result["boxes"].dtype, device=result["boxes"].device)
    boxes = clip_boxes((result["boxes"] - origin) * scale, orig_size)
    return {**result, "boxes": boxes}


@torch.no_grad()
def collect_detections(model, data, device=None, iou_threshold=None, max_detections=None,
                       batch_size=8, num_workers=None, timings=None):
    """Run `model.predict` over a dataset at score threshold 0.001 and return COCO result dicts.

    Args, model/data/device/...: as `evaluate`. The model is put in eval mode and its previous
    training mode restored afterwards, also on error. `timings`: None, or a dict that gets the seconds spent
    waiting for the loader (decoding, "decode") and model.predict's phases (see speed_ms).

    Returns:
        list of COCO result dicts (see `predictions_to_coco`), the input of `coco_metrics` and
        what the CLI writes with --save-json.
    """
    dataset, loader = _build_loader(data, batch_size, num_workers)
    device = torch.device(device) if device is not None else _model_device(model)
    _, iou_threshold, max_detections = detection_settings(model, MAP_SCORE_THRESHOLD, iou_threshold, max_detections)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(dataset.category_ids):
        raise ValueError(f"model has {num_classes} classes but the dataset has "
                         f"{len(dataset.category_ids)}: {dataset.class_names}")
    was_training = model.training
    model.eval()
    detections = []
    timing = {"timings": timings} if timings is not None else {}  # a model without timing still evaluates
    try:
        for batch in timed_iter(loader, timings, "decode"):
            images, targets = batch if batch is not None else ([], [])
            if not len(images):
                continue
            for image, target in zip(images, targets):
                _check_original_frame(image, target)
            results = model.predict([image.to(device) for image in images],
                                    conf_threshold=MAP_SCORE_THRESHOLD, iou_threshold=iou_threshold,
                                    max_detections=max_detections, **timing)
            results = [to_original_frame(result, *_decoded_frame(target)) for result, target in zip(results, targets)]
            image_ids = [int(target["image_id"]) for target in targets]
            detections.extend(predictions_to_coco(results, image_ids, dataset.category_ids))
    finally:
        model.train(was_training)
    return detections


def timed_iter(iterable, timings, phase):
    """The items of `iterable`, the seconds spent waiting for each (decoding, in a loader) added to
    timings[phase]; `iterable` itself for `timings` None."""
    if timings is None:
        yield from iterable
        return
    start = time.perf_counter()
    iterator = iter(iterable)
    for item in iterator:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start
        yield item
        start = time.perf_counter()
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


SPEED_SIZES_SHOWN = 3  # input sizes named in the Speed line
SPEED_PHASES = {"preprocess": ("decode", "preprocess"), "network": ("network",), "postprocess": ("postprocess",)}


def speed_ms(timings):
    """Milliseconds per image of each phase in `timings` (decoding counts as preprocessing), as Ultralytics'
    "Speed:" line: {"preprocess", "network", "postprocess"}; None when no image was predicted."""
    images = sum(timings.get("input_sizes", {}).values())
    if not images:
        return None
    return {name: 1000 * sum(timings.get(key, 0.0) for key in keys) / images for name, keys in SPEED_PHASES.items()}


def speed_line(timings):
    """'Speed: A ms decode+preprocess, B ms network, C ms postprocess per image (WxH input, N images)', in
    Ultralytics' manner: the network's input sizes (W x H, rectangular letterboxes differ by aspect), the commonest
    first."""
    speed, sizes = speed_ms(timings), timings.get("input_sizes", collections.Counter())
    if speed is None:
        return "Speed: no images predicted"
    shown = [f"{width}x{height}" for (width, height), _ in sizes.most_common(SPEED_SIZES_SHOWN)]
    more = ", ..." if len(sizes) > SPEED_SIZES_SHOWN else ""
    return (f"Speed: {speed['preprocess']:.1f} ms decode+preprocess, {speed['network']:.1f} ms network, "
            f"{speed['postprocess']:.1f} ms postprocess per image ({', '.join(shown)}{more} input, "
            f"{sum(sizes.values())} images)")


def evaluate(model, data, device=None, conf_threshold=None, iou_threshold=None, max_detections=None,
             batch_size=8, num_workers=None, confusion_threshold=None):
    """Score a detector on a COCO dataset: COCO mAP plus P/R/F1 at `conf_threshold`.

    Args:
        model: detector with `predict(list of uint8 (3, H, W) tensors, conf_threshold,
            iou_threshold, max_detections)` returning xyxy boxes in original pixels and labels
            in 0..num_classes-1 (`num_classes` foreground classes, no background slot).
        data: a `CocoDetectionDataset` built with transforms=None, or a DataLoader over one
            (batches of (images, targets); targets carry "image_id").
        device: where the images go; None -> the device of the model's parameters.
        conf_threshold: score threshold for precision/recall/F1, a score or one per class (mAP always uses
            0.001); None: the training scripts' report_threshold, as training reports them.
        iou_threshold: NMS IoU passed to `model.predict`; None: config_transfer_learning.json's "inference" one.
        max_detections: per-image cap passed to `model.predict`; None: the "inference" section's.
        batch_size: images per `predict` call when `data` is a dataset.
        num_workers: DataLoader workers when `data` is a dataset; None -> dataset_coco's default.
        confusion_threshold: as `coco_metrics`' (None: this evaluation's calibrated per-class thresholds).

    Returns:
        the dict of `coco_metrics`. The model's training mode is restored afterwards.
    """
    start = time.time()
    dataset = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
    detections = collect_detections(model, data, device, iou_threshold, max_detections,
                                    batch_size, num_workers)
    metrics = coco_metrics(ground_truth_coco(dataset), detections, dataset.image_ids, dataset.category_ids,
                           dataset.class_names, conf_threshold, confusion_threshold)
    logger.info("evaluated %d images, %d detections in %.1f s: mAP %.4f mAP50 %.4f",
                len(dataset.image_ids), len(detections), time.time() - start,
                metrics["mAP"], metrics["mAP50"])
    return metrics


def _fmt(value):
    return "n/a" if value is None or isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


PER_CLASS_COLUMNS = (("boxes", "num_gt"), ("AP", "AP"), ("AP50", "AP50"), ("best F1", "best_f1"),
                     ("threshold", "best_f1_threshold"), ("P", "best_f1_precision"), ("R", "best_f1_recall"))


def format_per_class(per_class):
    """coco_metrics' "per_class" as a plain-text table: a row per class, "n/a" where it has no ground truth."""
    width = max([len("class")] + [len(str(name)) for name in per_class])
    lines = [f"{'class':<{width}}" + "".join(f"  {title:>9}" for title, _ in PER_CLASS_COLUMNS),
             "-" * (width + 11 * len(PER_CLASS_COLUMNS))]
    for name, entry in per_class.items():
        cells = [f"{entry['num_gt']:>9d}"] + [f"{_fmt(entry[key]):>9}" for _, key in PER_CLASS_COLUMNS[1:]]
        lines.append(f"{str(name):<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def format_confusion(matrix, class_names):
    """A confusion matrix ([predicted, true], background last) as a plain-text table."""
    names, corner = [str(name) for name in class_names] + ["background"], "predicted \\ true"
    width = max(len(corner), *(len(name) for name in names))
    cell = max(6, *(len(name) for name in names))
    lines = [f"{corner:<{width}}" + "".join(f"  {name:>{cell}}" for name in names)]
    lines += [f"{name:<{width}}" + "".join(f"  {count:>{cell}d}" for count in row) for name, row in zip(names, matrix)]
    return "\n".join(lines)


def format_metrics(metrics):
    """Render `coco_metrics` output as a plain-text table: overall numbers, then per class AP, AP50 and best F1, and
    with two or more classes the confusion matrix."""
    rows = [("mAP@[.5:.95]", metrics["mAP"]), ("mAP@.5", metrics["mAP50"]),
            ("mAP@.75", metrics["mAP75"]), ("AP small", metrics["AP_small"]),
            ("AP medium", metrics["AP_medium"]), ("AP large", metrics["AP_large"]),
            ("precision", metrics["precision"]), ("recall", metrics["recall"]),
            ("F1", metrics["f1"]), ("best F1", metrics["best_f1"]),
            ("best F1 threshold", metrics["best_f1_threshold"])]
    per_class = metrics.get("per_class_AP", {})
    width = max([len(name) for name, _ in rows] + [len(str(name)) for name in per_class])
    lines = [f"{'metric':<{width}}  value", "-" * (width + 8)]
    lines += [f"{name:<{width}}  {_fmt(value)}" for name, value in rows]
    lines.append(f"{'detections':<{width}}  {metrics.get('num_detections', 0)}")
    if metrics.get("per_class"):
        lines += ["", format_per_class(metrics["per_class"])]
    elif per_class:
        lines += ["", f"{'class':<{width}}  AP@[.5:.95]", "-" * (width + 13)]
        lines += [f"{str(name):<{width}}  {_fmt(ap)}" for name, ap in per_class.items()]
    if metrics.get("confusion_matrix") and len(metrics["confusion_matrix"]) > 2:
        lines += ["", f"confusion matrix at IoU {MATCH_IOU:g}, thresholds "
                      f"{threshold_text(metrics['confusion_thresholds'])}:",
                  format_confusion(metrics["confusion_matrix"], list(metrics["per_class"]))]
    return "\n".join(lines)


def get_args_parser():
    defaults = inference_defaults()
    parser = argparse.ArgumentParser(description="Score a detector on an annotated set (COCO mAP, P/R/F1).")
    parser.add_argument("--checkpoint", help="best_model.pth written by training, or an exported .onnx (with its "
                                             "sidecar JSON); with --run, default RUN/best_model.pth")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--ann", help="annotations: a COCO JSON, a Pascal VOC folder, a YOLO data.yaml or labels folder")
    data.add_argument("--run", help="a fine-tuning run folder: score its own validation images, the val part of its "
                                    "--train-ann (per RUN/split.json) or its --val-ann")
    parser.add_argument("--root", help="image folder of a COCO JSON (VOC and YOLO find theirs)")
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"),
                        help="pytorch (BatchNorm fused) or onnxruntime (a .pth is exported first, beside it); "
                             "default: the checkpoint's kind")
    parser.add_argument("--threads", type=int, help="CPU threads of PyTorch or ONNX Runtime")
    parser.add_argument("--class-name", default=None,
                        help="score a 1-class model against this category (default: checkpoint class_names)")
    parser.add_argument("--conf", type=float, default=None,
                        help=f"score threshold for precision/recall/F1 and the confusion matrix (default: the "
                             f"checkpoint's calibrated thresholds, one per class, stored by fine-tuning; else "
                             f"{defaults['conf_threshold']})")
    parser.add_argument("--iou", type=float, default=defaults["iou_threshold"],
                        help="NMS IoU threshold (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per predict call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device, e.g. cpu or cuda")
    parser.add_argument("--save-json", default=None, help="write the COCO results list here")
    parser.add_argument("--full-decode", action="store_true",
                        help="decode every photo in full (default: a JPEG at least twice the network's input size "
                             "is decoded reduced, which is faster and scores the same)")
    return parser


def _check_paths(parser, args):
    """Every path given exists; with --run, --checkpoint defaults to the run's best checkpoint."""
    if args.run is not None:
        if args.root is not None:
            parser.error("--root goes with --ann; --run reads the image folders the run trained with")
        from runs import best_checkpoint, is_run_dir  # only the command line reads runs
        if os.path.isdir(args.run) and not is_run_dir(args.run):
            parser.error(f"--run {args.run} is not a training run folder (no config.json naming its data)")
        if args.checkpoint is None and os.path.isdir(args.run):
            args.checkpoint = best_checkpoint(args.run)
    elif args.checkpoint is None:
        parser.error("--checkpoint is required with --ann (--run RUN_DIR defaults it to RUN/best_model.pth)")
    for flag, path, exists in (("--run", args.run, os.path.isdir),
                               ("--checkpoint", args.checkpoint, os.path.isfile),
                               ("--ann", args.ann, os.path.exists),
                               ("--root", args.root, os.path.isdir)):
        if path is not None and not exists(path):
            parser.error(f"{flag} not found: {path}")


def _scored_dataset(args, class_names, decode_side=None):
    """The dataset to score and what it is in words: --ann, or the run's own validation part (--run), built from its
    records by the loader its training used, so the images are exactly those it validated on. `decode_side`: as
    CocoDetectionDataset's."""
    import dataset_coco  # lazy: only the CLI needs the dataset and run modules
    if args.run is None:
        from annotations import read_annotations
        from config import data_yaml_val
        ann, source = args.ann, str(args.ann)
        if data_yaml_val(args.ann):  # a data.yaml is scored on its val images, as Ultralytics' val does, not train
            data, root, _ = read_annotations(args.ann, args.root, split="val")
            ann, args.root, source = {**data, "info": {"source": f"{args.ann} (val)"}}, root, f"{args.ann} (val)"
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' "loading annotations..."
            dataset = dataset_coco.CocoDetectionDataset(ann, args.root, classes=class_names, transforms=None,
                                                        decode_side=decode_side)
        return dataset, source
    import runs
    data = runs.run_data(args.run)
    bad = {"max_missing_fraction": data["config"]["max_bad_image_fraction"]} \
        if "max_bad_image_fraction" in data["config"] else {}
    dataset = dataset_coco.CocoDetectionDataset(data["val"]["data"], data["val"]["root"], classes=class_names,
                                                transforms=None, decode_side=decode_side, **bad)
    return dataset, data["val"]["source"]


def _run_record_error(path):
    """The error for --ann naming a training run's folder or one of its records (split.json, config.json) rather than
    annotations: score the run's held-out images with --run. None for any other path."""
    import runs
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not runs.is_run_dir(folder):
        return None
    what = "a training run folder" if os.path.isdir(path) else f"a record of the training run {folder}"
    return (f"--ann {path} is {what}, not annotations; score the images the run validated on with "
            f"--run {folder}")


def _warn_if_trained_on(args, dataset):
    """--ann holding images that the checkpoint's own one-folder run trained on (its train_ann scores train and val
    together) scores them too: say how many, and that --run scores the held-out part."""
    import runs
    run_dir = runs.checkpoint_run(args.checkpoint)
    if run_dir is None or not os.path.isfile(os.path.join(run_dir, runs.SPLIT_FILE)):
        return
    try:
        train = runs.run_data(run_dir)["train"]
    except ValueError as error:  # the run's data moved or is read from another folder: nothing to compare
        logger.debug("not compared with the run's training images: %s", error)
        return
    trained = {os.path.realpath(path) for path in train["images"]}
    overlap = sum(os.path.realpath(path) in trained for path in dataset.image_paths)
    if overlap:
        logger.warning("%d of the %d images of --ann %s trained the checkpoint (%s), so these scores include "
                       "its training images; evaluate.py --run %s scores only the images the run validated on",
                       overlap, len(dataset.image_paths), args.ann, train["source"], run_dir)


def _class_names(parser, args, model):
    """--class-name for a one-class model, else the class names the checkpoint stores (load_model read them)."""
    class_names = [args.class_name] if args.class_name is not None else list(model.class_names)
    if len(class_names) != model.num_classes:
        parser.error(f"the model has {model.num_classes} classes but {len(class_names)} class names "
                     f"were given: {class_names}")
    return class_names


def main(argv=None):
    """Score a checkpoint: load model and dataset, predict, print the table; returns the metrics."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ort_detector import ModelLoadError, load_detector  # lazy: only the CLI needs the detector modules
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_detector(args.checkpoint, args.backend, args.device, args.threads)
    except (ModelLoadError, FileNotFoundError) as error:  # one line and exit status 2, as predict.py
        parser.exit(2, f"error: cannot load --checkpoint {args.checkpoint}: {str(error).splitlines()[0]}\n")
    class_names = _class_names(parser, args, model)
    if args.conf is None:
        args.conf = detection_settings(model)[0]
    try:
        dataset, source = _scored_dataset(args, class_names, None if args.full_decode else model.img_size)
    except (ValueError, FileNotFoundError) as error:  # one line and exit status 2
        message = (args.ann is not None and _run_record_error(args.ann)) or str(error).splitlines()[0]
        parser.exit(2, f"error: {message}\n")
    print(f"{source}: {len(dataset.image_ids)} images")
    if args.ann is not None:
        _warn_if_trained_on(args, dataset)
    timings = {}
    detections = collect_detections(model, dataset, args.device if args.backend != "onnxruntime" else "cpu", args.iou,
                                    batch_size=args.batch_size, num_workers=0, timings=timings)
    metrics = coco_metrics(ground_truth_coco(dataset), detections, dataset.image_ids, dataset.category_ids,
                           dataset.class_names, args.conf, args.conf)
    print(f"precision, recall and F1 at thresholds {threshold_text(args.conf)}")
    print(format_metrics(metrics))
    if args.save_json:
        write_json_atomic(detections, args.save_json, indent=None)
        logger.info("wrote %d detections to %s", len(detections), args.save_json)
    metrics["speed_ms"] = speed_ms(timings)
    print(speed_line(timings))
    return metrics


if __name__ == "__main__":
    main()
