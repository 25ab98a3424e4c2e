"""Class-aware head init (#28): a fine-tuning's class whose name the starting checkpoint knows (case-insensitive,
COCO's synonyms, '_' as ' ') starts from that checkpoint's own class output row; the other rows start afresh."""
import json
import os

import pytest
import torch

from checkpoints import class_key, load_init, match_class_names, model_checkpoint, save_checkpoint
from model_lightweight import create_lightweight_model

START = ["person", "car", "motorcycle", "airplane", "couch", "tv", "dining table", "potted plant", "dog"]


@pytest.mark.parametrize("name, start", [("Dog", "dog"), ("motorbike", "motorcycle"), ("aeroplane", "airplane"),
                                         ("sofa", "couch"), ("tvmonitor", "tv"), ("diningtable", "dining table"),
                                         ("pottedplant", "potted plant"), ("potted_plant", "potted plant"),
                                         ("Dining_Table", "dining table"), ("TV", "tv")])
def test_names_match_with_synonyms(name, start):
    assert match_class_names([name], START) == {0: START.index(start)}


def test_unknown_names_do_not_match():
    assert match_class_names(["kangaroo", "dogs", "table", "monitor"], START) == {}
    assert class_key("Potted_Plant") == class_key("potted plant") == "pottedplant"


def start_checkpoint(tmp_path):
    torch.manual_seed(0)
    start = create_lightweight_model(len(START), "nano", img_size=64)
    with torch.no_grad():  # distinct, recognisable rows: row j is all j + 1
        for j in range(len(START)):
            start.head.cls_pred.weight[j].fill_(j + 1)
            start.head.cls_pred.bias[j].fill_(-(j + 1))
    path = tmp_path / "start.pth"
    save_checkpoint(model_checkpoint(start, START), path)
    return str(path), start


def test_load_init_copies_the_matching_rows_and_no_others(tmp_path):
    path, start = start_checkpoint(tmp_path)
    names = ["kangaroo", "Motorbike", "dog", "sofa_bed", "TVMonitor"]
    torch.manual_seed(1)
    model = create_lightweight_model(len(names), "nano", img_size=64, imagenet_pretrained=False)
    fresh = {k: v.clone() for k, v in model.head.cls_pred.state_dict().items()}
    line = load_init(model, path, class_names=names)
    weight, bias = model.head.cls_pred.weight, model.head.cls_pred.bias
    copied = {1: START.index("motorcycle"), 2: START.index("dog"), 4: START.index("tv")}
    for row in range(len(names)):
        if row in copied:
            assert torch.equal(weight[row], start.head.cls_pred.weight[copied[row]])
            assert bias[row] == start.head.cls_pred.bias[copied[row]]
        else:  # the focal-prior init of a new class, untouched
            assert torch.equal(weight[row], fresh["weight"][row]) and bias[row] == fresh["bias"][row]
    assert "Motorbike (motorcycle), dog (dog), TVMonitor (tv)" in line and "new: kangaroo, sofa_bed" in line
    # everything else is the start's, as without class-aware init
    assert torch.equal(model.head.box_pred.weight, start.head.box_pred.weight)


def test_without_class_names_no_row_is_copied(tmp_path):
    path, _ = start_checkpoint(tmp_path)
    torch.manual_seed(1)
    model = create_lightweight_model(2, "nano", img_size=64, imagenet_pretrained=False)
    fresh = model.head.cls_pred.weight.clone()
    load_init(model, path)
    assert torch.equal(model.head.cls_pred.weight, fresh)


def test_the_class_init_study_runs_on_a_tiny_synthetic_coco(tmp_path, monkeypatch):
    """benchmarks/class_init_study.py end to end at toy scale: a one-epoch nano starter without the held-out part,
    both arms for one seed, the report. Its figures mean nothing; the plumbing is what is checked."""
    import sys
    from conftest import REPO, skip_run_pictures
    from synthetic_data import write_coco_layout
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import class_init_study as study
    skip_run_pictures(monkeypatch)
    write_coco_layout(str(tmp_path / "coco"), ["person", "car", "dog"], num_train=24, num_val=4, img_size=64, seed=0)
    out = tmp_path / "study"
    argv = ["--coco-root", str(tmp_path / "coco"), "--starter-epochs", "1", "--model-size", "nano", "--img-size",
            "64", "--epochs", "1", "--seeds", "0", "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--held-out-fraction", "0.5", "--out", str(out), "--no-progress"]
    curves = study.main(argv)
    assert set(curves) == {("none", 0), ("by_name", 0)}
    report = (out / "class_init_study.md").read_text()
    assert "| by_name |" in report and "## Verdict" in report
    held_out = json.loads((out / "held_out.json").read_text())
    starter_part = json.loads((out / "starter_part.json").read_text())
    assert not {i["file_name"] for i in held_out["images"]} & {i["file_name"] for i in starter_part["images"]}
    log = (out / "runs" / "by_name_seed_0" / "summary.json").read_text()
    assert "copied the class output of" in json.loads(log)["provenance"]["weights"]
    assert study.main(argv).keys() == curves.keys()  # the second time reuses every run


def test_the_starter_copies_its_coco_classes_by_name():
    """The shipped starter (float16 weights) into a lite0 of four classes: three known to it by name or synonym."""
    from checkpoints import STARTER_PATH, load_checkpoint_file
    starter = load_checkpoint_file(STARTER_PATH)
    model = create_lightweight_model(4, "lite0", imagenet_pretrained=False)
    line = load_init(model, "starter", class_names=["Dog", "motorbike", "kangaroo", "tvmonitor"])
    assert "copied the class output of Dog (dog), motorbike (motorcycle), tvmonitor (tv)" in line
    assert line.endswith("new: kangaroo")
    names = starter["class_names"]
    for row, name in ((0, "dog"), (1, "motorcycle"), (3, "tv")):
        expected = starter["model_state_dict"]["head.cls_pred.bias"][names.index(name)].float()
        assert model.head.cls_pred.bias[row] == expected
