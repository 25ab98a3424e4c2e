"""annotations.py: Pascal VOC and YOLO folders read into the same records as COCO, the split of one folder, and
bad input in each format as a one-line error or a counted warning."""
import json
import logging
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import annotations
import dataset_coco
from evaluate import coco_metrics
from synthetic_data import write_shapes_split

CLASSES = ["square", "circle"]


def write_voc(coco, image_dir, folder):
    """LabelImg's layout: folder/annots/*.xml beside folder/images/ (a copy of `image_dir`), 1-based corners."""
    os.makedirs(os.path.join(folder, "annots"))
    os.symlink(os.path.abspath(image_dir), os.path.join(folder, "images"))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for image in coco["images"]:
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = image["file_name"]
        size = ET.SubElement(root, "size")
        ET.SubElement(size, "width").text, ET.SubElement(size, "height").text = str(image["width"]), str(image["height"])
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = names[ann["category_id"]]
            ET.SubElement(obj, "difficult").text = "0"
            box = ET.SubElement(obj, "bndbox")
            x, y, w, h = ann["bbox"]
            for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                ET.SubElement(box, key).text = str(value)
        stem = os.path.splitext(image["file_name"])[0]
        ET.ElementTree(root).write(os.path.join(folder, "annots", f"{stem}.xml"))
    return os.path.join(folder, "annots")


def write_yolo(coco, image_dir, folder):
    """Ultralytics' layout: folder/images/train, folder/labels/train, folder/data.yaml (names in category order)."""
    os.makedirs(os.path.join(folder, "images"))
    os.symlink(os.path.abspath(image_dir), os.path.join(folder, "images", "train"))
    os.makedirs(os.path.join(folder, "labels", "train"))
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    for image in coco["images"]:
        lines = []
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            W, H = image["width"], image["height"]
            lines.append(f"{index[ann['category_id']]} {(x + w / 2) / W:.8f} {(y + h / 2) / H:.8f} {w / W:.8f} "
                         f"{h / H:.8f}")
        stem = os.path.splitext(image["file_name"])[0]
        with open(os.path.join(folder, "labels", "train", f"{stem}.txt"), "w") as f:
            f.write("\n".join(lines))
    with open(os.path.join(folder, "data.yaml"), "w") as f:
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/train",
                        "names": [c["name"] for c in categories]}, f)
    return os.path.join(folder, "data.yaml")


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory):
    """One synthetic set (two classes, one empty image) as COCO JSON, a VOC folder and a YOLO folder."""
    root = tmp_path_factory.mktemp("formats")
    ann = write_shapes_split(root / "images", root / "coco.json", 8, CLASSES, img_size=96, seed=3, empty_fraction=0.125)
    coco = json.loads(open(ann).read())
    # VOC files name their classes but do not number them: the readers number them 1..K in name order (YOLO in
    # its names' order, written so here); the COCO original is renumbered the same way, so reports can be equal.
    ids = {c["id"]: i + 1 for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["name"]))}
    coco["categories"] = sorted(({**c, "id": ids[c["id"]]} for c in coco["categories"]), key=lambda c: c["id"])
    coco["annotations"] = [{**a, "category_id": ids[a["category_id"]]} for a in coco["annotations"]]
    with open(ann, "w") as f:
        json.dump(coco, f)
    return {"coco": (ann, str(root / "images")), "voc": (write_voc(coco, root / "images", root / "voc"), None),
            "yolo": (write_yolo(coco, root / "images", root / "yolo"), None)}


def report_body(dataset):
    """The dataset report without the lines that name the files."""
    return [line for line in dataset_coco.dataset_report(dataset, 96).splitlines()
            if not line.startswith(("annotations:", "images root:"))]


def test_voc_and_yolo_copies_read_like_the_coco_original(three_formats):
    datasets = {kind: dataset_coco.CocoDetectionDataset(path, root) for kind, (path, root) in three_formats.items()}
    reference = datasets["coco"]
    for kind in ("voc", "yolo"):
        dataset = datasets[kind]
        assert annotations.detect_format(three_formats[kind][0]) == kind
        assert report_body(dataset) == report_body(reference), kind
        assert dataset.class_names == reference.class_names
        by_file = {os.path.basename(p): i for i, p in enumerate(dataset.image_paths)}
        for index, path in enumerate(reference.image_paths):
            boxes, labels = dataset.get_annotations(by_file[os.path.basename(path)])
            expected_boxes, expected_labels = reference.get_annotations(index)
            torch.testing.assert_close(boxes, expected_boxes, atol=1e-3, rtol=0)
            assert torch.equal(labels, expected_labels)


def test_the_same_predictions_score_the_same_in_every_format(three_formats):
    """Detections made from the COCO truth, moved a little and mapped to each format's ids, give one mAP."""
    rng = np.random.default_rng(0)
    reference = dataset_coco.CocoDetectionDataset(*three_formats["coco"])
    predictions = {}
    for index, path in enumerate(reference.image_paths):
        boxes, labels = reference.get_annotations(index)
        predictions[os.path.basename(path)] = [(box + torch.tensor(rng.normal(0, 2, 4), dtype=torch.float32), int(label),
                                                float(rng.uniform(0.3, 1))) for box, label in zip(boxes, labels)]
    scores = {}
    for kind, (path, root) in three_formats.items():
        dataset = dataset_coco.CocoDetectionDataset(path, root)
        detections = []
        for image_id, image_path in zip(dataset.image_ids, dataset.image_paths):
            for box, label, score in predictions[os.path.basename(image_path)]:
                x0, y0, x1, y1 = box.tolist()
                detections.append({"image_id": image_id, "category_id": dataset.category_ids[label],
                                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
        scores[kind] = coco_metrics(dataset.coco, detections, dataset.image_ids, dataset.category_ids,
                                    dataset.class_names)
    for kind in ("voc", "yolo"):
        for key in ("mAP", "mAP50", "mAP75", "recall"):
            assert scores[kind][key] == pytest.approx(scores["coco"][key], abs=1e-6), (kind, key)
    assert 0.3 < scores["coco"]["mAP"] < 1  # the boxes moved: a score that could tell formats apart


def test_to_coco_writes_what_the_report_read(three_formats, tmp_path, capsys):
    voc, _ = three_formats["voc"]
    dataset_coco.main(["--ann", voc, "--to-coco", str(tmp_path / "out.json")])
    assert "format: Pascal VOC XML" in capsys.readouterr().out
    written = dataset_coco.CocoDetectionDataset(str(tmp_path / "out.json"), os.path.join(os.path.dirname(voc), "images"))
    assert report_body(written) == report_body(dataset_coco.CocoDetectionDataset(voc))


def test_difficult_voc_objects_are_crowd(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    voc = write_voc({"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                     "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}],
                     "categories": [{"id": 1, "name": "thing"}]}, tmp_path / "img", tmp_path / "voc")
    xml = tmp_path / "voc" / "annots" / "a.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>"))
    data, _, _ = annotations.read_annotations(voc)
    assert data["annotations"][0]["iscrowd"] == 1 and data["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 10.0]


# ---- one folder, split for you ------------------------------------------------------------------------------------
def test_the_split_is_deterministic_and_stable_when_images_are_added():
    names = [f"img_{i:04d}.jpg" for i in range(400)]
    data = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)], "annotations": [],
            "categories": []}
    train, val = annotations.hash_split(data, 0.2)
    assert (train, val) == annotations.hash_split(data, 0.2)  # deterministic
    assert sorted(train + val) == sorted(names) and not set(train) & set(val)
    assert 0.14 < len(val) / len(names) < 0.26
    more = {**data, "images": data["images"] + [{"id": 1000 + i, "file_name": f"new_{i}.jpg"} for i in range(200)]}
    train2, val2 = annotations.hash_split(more, 0.2)
    assert set(val) <= set(val2) and set(train) <= set(train2)  # no old image changed sides


def test_a_single_folder_is_split_and_the_run_records_it(three_formats, tmp_path):
    voc, _ = three_formats["voc"]
    (train, _), (val, _), split = dataset_coco.load_train_val(voc, val_fraction=0.5)
    assert split["val_fraction"] == 0.5 and len(split["train"]) + len(split["val"]) == 8
    assert {i["file_name"] for i in val["images"]} == set(split["val"])
    again = dataset_coco.load_train_val(voc, val_fraction=0.9, split=split)[2]  # a resumed run keeps its split
    assert again == split
    with pytest.raises(ValueError, match="--val-fraction 0.01 of the 8 images .* leaves 8 to train on and 0"):
        dataset_coco.load_train_val(voc, val_fraction=0.01)


# ---- bad input --------------------------------------------------------------------------------------------------
def test_an_empty_or_unknown_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no annotations in folder .*empty: expected Pascal VOC"):
        annotations.read_annotations(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        annotations.read_annotations(tmp_path / "nowhere")
    (tmp_path / "notes.txt.bak").write_text("x")
    with pytest.raises(ValueError, match="expected a COCO .json file, a YOLO data.yaml"):
        annotations.read_annotations(tmp_path / "notes.txt.bak")


def test_an_xml_whose_image_is_missing_is_counted_like_a_missing_coco_image(three_formats, tmp_path, caplog):
    voc, _ = three_formats["voc"]
    copy = tmp_path / "voc"
    os.makedirs(copy / "annots")
    os.symlink(os.path.join(os.path.dirname(voc), "images"), copy / "images")
    for name in os.listdir(voc):
        (copy / "annots" / name).write_text(open(os.path.join(voc, name)).read())
    (copy / "annots" / "ghost.xml").write_text(
        "<annotation><filename>ghost.jpg</filename><size><width>96</width><height>96</height></size>"
        "<object><name>square</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
        "</object></annotation>")
    with caplog.at_level(logging.WARNING):
        dataset = dataset_coco.CocoDetectionDataset(str(copy / "annots"), max_missing_fraction=0.2)
    assert dataset.stats["images_missing"] == 1 and "ghost.jpg" in caplog.text
    with pytest.raises(FileNotFoundError, match="1/9 images of .* not found"):
        dataset_coco.CocoDetectionDataset(str(copy / "annots"), max_missing_fraction=0.0)


@pytest.mark.parametrize("line, problem", [
    ("0 0.5 0.5 0.2", "lines without 5 fields"),
    ("7 0.5 0.5 0.2 0.2", "class index outside 0..1"),
    ("0 0.5 1.4 0.2 0.2", "coordinates outside [0, 1]"),
    ("zero 0.5 0.5 0.2 0.2", "not numbers"),
])
def test_bad_yolo_lines_are_skipped_and_counted(three_formats, tmp_path, caplog, line, problem):
    data_yaml, _ = three_formats["yolo"]
    source = os.path.join(os.path.dirname(data_yaml), "labels", "train")
    copy = tmp_path / "labels" / "train"
    copy.mkdir(parents=True)
    for name in sorted(os.listdir(source)):
        (copy / name).write_text(open(os.path.join(source, name)).read())
    first = sorted(os.listdir(copy))[0]
    (copy / first).write_text((copy / first).read_text() + "\n" + line)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    os.symlink(os.path.join(os.path.dirname(data_yaml), "images"), tmp_path / "images")
    with caplog.at_level(logging.WARNING):
        data, _, _ = annotations.read_annotations(str(copy))
    original, _, _ = annotations.read_annotations(data_yaml)
    assert len(data["annotations"]) == len(original["annotations"])  # the bad line, and only it, is left out
    assert problem in caplog.text and caplog.text.count("(e.g.") == 1  # one warning, with an example
