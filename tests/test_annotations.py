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
import config
import dataset_coco
from conftest import exits_with_one_line
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


# ---- data-format edges (issue #24) ----------------------------------------------------------------------------
def write_yolo_split(folder, labels, size=(40, 32)):
    """folder/images/*.png (W x H = `size`) and folder/labels/*.txt from {stem: [label line, ...] or None (no file)}."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labels"), exist_ok=True)
    for stem, lines in labels.items():
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(os.path.join(folder, "images", f"{stem}.png"))
        if lines is not None:
            with open(os.path.join(folder, "labels", f"{stem}.txt"), "w") as f:
                f.write("\n".join(lines))


def write_data_yaml(path, **entries):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump({"names": ["kangaroo"], **entries}, f)
    return str(path)


def test_a_parent_folder_named_images_keeps_the_yolo_labels(tmp_path):
    """Only the last images/ of a path becomes labels/ (Ultralytics' img2label_paths), wherever the set lies."""
    boxes = {}
    for parent in ("yolo1", os.path.join("images", "proj")):
        dataset = tmp_path / parent / "ds"
        write_yolo_split(dataset / "train", {"a": ["0 0.5 0.5 0.5 0.5"], "b": ["0 0.25 0.25 0.2 0.2"], "c": None})
        data_yaml = write_data_yaml(dataset / "data.yaml", train="train/images")
        data, root, _ = annotations.read_annotations(data_yaml)
        boxes[parent] = sorted((image["file_name"], ann["bbox"]) for image in data["images"]
                               for ann in data["annotations"] if ann["image_id"] == image["id"])
        labels_folder = str(dataset / "train" / "labels")
        data, _, _ = annotations.read_annotations(labels_folder)  # the labels folder finds its images alike
        assert len(data["annotations"]) == 2
    assert len(boxes["yolo1"]) == 2 and boxes[os.path.join("images", "proj")] == boxes["yolo1"]


def test_a_yolo_set_without_any_label_file_is_refused(tmp_path):
    write_yolo_split(tmp_path / "ds", {"a": None, "b": None})
    data_yaml = write_data_yaml(tmp_path / "ds" / "data.yaml", train="images")
    with pytest.raises(ValueError, match=r"none of the 2 images in .*images has a label file in .*labels"):
        annotations.read_annotations(data_yaml)
    write_yolo_split(tmp_path / "ds", {"c": []})  # one empty label file: a set of negatives someone labelled
    data, _, _ = annotations.read_annotations(data_yaml)
    assert len(data["images"]) == 3 and not data["annotations"]


def _coco_with(images, annotations_):
    return {"images": images, "annotations": annotations_, "categories": [{"id": 1, "name": "x"}]}


@pytest.mark.parametrize("key, data", [
    ("images", _coco_with([{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
                          [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])),
    ("annotations", _coco_with([{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                               [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                                {"id": 7, "image_id": 2, "category_id": 1, "bbox": [2, 2, 5, 5]}])),
])
def test_duplicate_coco_ids_are_one_line(tmp_path, monkeypatch, capsys, key, data):
    """pycocotools keeps the last entry of an id: one photo (or box) would vanish into another."""
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(data))
    expected = f"dup.json: 1 {key} ids appear more than once"
    with pytest.raises(ValueError, match=expected):
        annotations.read_annotations(path, tmp_path)
    with pytest.raises(ValueError, match=expected):
        annotations.index_coco(json.loads(path.read_text()), str(path))
    monkeypatch.setattr("sys.argv", ["dataset_coco.py", "--ann", str(path), "--root", str(tmp_path)])
    assert expected in exits_with_one_line(capsys, dataset_coco.run)


def test_coco_annotations_without_an_id_are_numbered():
    data = _coco_with([{"id": 1, "file_name": "a.png"}],
                      [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                       {"image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]}])  # no id: pycocotools raised KeyError
    coco = annotations.index_coco(data, "a.json")
    assert sorted(coco.anns) == [5, 6] and len(coco.imgToAnns[1]) == 2


def test_roboflow_data_yaml_is_read(tmp_path):
    """Roboflow's export: data.yaml at the root says ../train/images, and train/ valid/ test/ lie beside it
    (Ultralytics tries a '../' entry that is not there without its '../')."""
    root = tmp_path / "kangaroo.v1i.yolov8"
    write_yolo_split(root / "train", {"a": ["0 0.5 0.5 0.5 0.5"], "b": ["0 0.3 0.3 0.2 0.2", "0 0.7 0.7 0.2 0.2"],
                                      "c": None})
    write_yolo_split(root / "valid", {"d": ["0 0.5 0.5 0.25 0.25"]})
    write_yolo_split(root / "test", {"e": ["0 0.5 0.5 0.25 0.25"]})
    data_yaml = write_data_yaml(root / "data.yaml", train="../train/images", val="../valid/images",
                                test="../test/images", nc=1)
    (train, train_root), (val, val_root), split = dataset_coco.load_train_val(data_yaml)
    assert split is None and train_root == str(root / "train" / "images") and val_root == str(root / "valid" / "images")
    counts = len(train["images"]), len(train["annotations"]), len(val["images"]), len(val["annotations"])
    assert counts == (3, 3, 1, 1)
    assert train["categories"] == [{"id": 1, "name": "kangaroo"}]


@pytest.mark.parametrize("names", [{"a": "kangaroo"}, {1: "kangaroo"}])
def test_bad_yolo_names_error_names_the_file(tmp_path, names):
    write_yolo_split(tmp_path / "ds", {"a": ["0 0.5 0.5 0.5 0.5"]})
    data_yaml = write_data_yaml(tmp_path / "ds" / "data.yaml", train="images", names=names)
    with pytest.raises(ValueError, match=r"^.*ds.data\.yaml: names must be indexed 0\.\.0") as info:
        annotations.read_annotations(data_yaml)
    assert "\n" not in str(info.value)


def test_a_six_decimal_overshoot_is_the_edge_but_a_real_one_is_clipped(tmp_path, caplog):
    """YOLO labels rounded to 6 decimals put an edge that touches the image up to a few 1e-7 past it."""
    write_yolo_split(tmp_path / "ds", {"edge": ["0 0.850000 0.149999 0.300001 0.300000"],
                                       "over": ["0 0.900000 0.500000 0.300000 0.200000"]}, size=(97, 61))
    data_yaml = write_data_yaml(tmp_path / "ds" / "data.yaml", train="images")
    data, root, _ = annotations.read_annotations(data_yaml)
    edge = dataset_coco.CocoDetectionDataset(annotations.subset(data, {"edge.png"}), root)
    boxes, _ = edge.get_annotations(0)
    assert boxes[0, 2].item() == 97 and boxes[0, 1].item() == 0 and edge.stats["boxes_clipped"] == 0
    with caplog.at_level(logging.WARNING, logger="dataset_coco"):
        over = dataset_coco.CocoDetectionDataset(annotations.subset(data, {"over.png"}), root)
    assert over.stats["boxes_clipped"] == 1 and "clipped 1 boxes" in caplog.text


def test_a_data_yaml_val_wins_over_an_explicit_val_fraction_with_a_warning(tmp_path, caplog):
    write_yolo_split(tmp_path / "ds" / "train", {"a": ["0 0.5 0.5 0.5 0.5"], "b": ["0 0.3 0.3 0.2 0.2"]})
    write_yolo_split(tmp_path / "ds" / "valid", {"c": ["0 0.5 0.5 0.25 0.25"]})
    data_yaml = write_data_yaml(tmp_path / "ds" / "data.yaml", train="train/images", val="valid/images")
    settings = {"train_ann": data_yaml, "train_root": None, "val_ann": None, "val_root": None, "val_fraction": 0.3}
    with caplog.at_level(logging.WARNING, logger="config"):
        config.check_data(settings, {"val_fraction": 0.3})  # typed --val-fraction 0.3
    (record,) = caplog.records
    assert f"{data_yaml} has a val entry: its images validate, and --val-fraction 0.3 is ignored" == record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="config"):
        config.check_data(settings, {})  # the default fraction: nothing to say
    assert not caplog.records
    (_, _), (val, _), split = dataset_coco.load_train_val(data_yaml, val_fraction=0.3)
    assert split is None and [image["file_name"] for image in val["images"]] == ["c.png"]
