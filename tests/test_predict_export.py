"""predict.py and export.py: drawn images and COCO results, CLI errors, BatchNorm fusion, ONNX Runtime parity.

The model is a random-init nano at 64 px whose BatchNorm statistics and prediction layers are randomised,
so fusion has real statistics to fold and outputs depend on the input (the focal-prior init would make
every score ~0.01 and every image look alike).
"""
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import nn

import export
import predict
from checkpoints import model_checkpoint, save_checkpoint
from dataset_coco import load_image
from inference import letterbox
from model_lightweight import create_lightweight_model, load_model
from synthetic_data import write_shapes_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ["square", "circle"]
CONF = 0.3


def randomise(model, seed=0):
    """Non-trivial BatchNorm statistics and prediction weights, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
        for conv in (model.head.cls_pred, model.head.box_pred):
            conv.weight.normal_(0.0, 0.3, generator=generator)
            conv.bias.zero_()
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP barriers with 2 threads make each conv wait
    for a descheduled thread, and a 64 px forward pass took 4 s instead of 25 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """4 synthetic 96 px images (one empty; category ids 1 and 3) and a 2-class nano checkpoint at 64 px."""
    root = tmp_path_factory.mktemp("predict_export")
    ann_path = write_shapes_split(root / "images", root / "ann.json", 4, CLASS_NAMES, img_size=96, seed=0,
                                  empty_fraction=0.25)
    torch.manual_seed(0)
    model = randomise(create_lightweight_model(len(CLASS_NAMES), "nano", img_size=64))
    checkpoint = str(root / "best_model.pth")
    save_checkpoint(model_checkpoint(model, CLASS_NAMES), checkpoint)
    return {"root": root, "image_dir": str(root / "images"), "ann_path": ann_path, "checkpoint": checkpoint}


def predict_args(setup, source, save_dir, *extra):
    return ["--checkpoint", setup["checkpoint"], "--source", str(source), "--save-dir", str(save_dir),
            "--conf", str(CONF), "--workers", "0", "--device", "cpu", "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------- predict

def test_predict_folder_writes_drawn_images_and_coco_results(setup, tmp_path, capsys):
    summary = predict.main(predict_args(setup, setup["image_dir"], tmp_path / "out", "--ann", setup["ann_path"]))
    tmp_path = tmp_path / "out"  # the run's folder, made by predict.py

    inputs = sorted(os.listdir(setup["image_dir"]))
    assert sorted(os.listdir(tmp_path)) == sorted(inputs + ["predictions.json"])
    for name in inputs:
        assert Image.open(tmp_path / name).size == Image.open(os.path.join(setup["image_dir"], name)).size
    assert summary["images"] == 4 and summary["skipped"] == []
    assert {"mAP", "mAP50", "precision", "per_class_AP"} <= set(summary["metrics"])

    detections = json.loads((tmp_path / "predictions.json").read_text())
    assert len(detections) == summary["detections"] > 0
    gt = COCO(setup["ann_path"])
    results = gt.loadRes(str(tmp_path / "predictions.json"))  # the round trip the issue asks for
    assert len(results.anns) == len(detections)
    ids_by_file = {image["file_name"]: image["id"] for image in gt.dataset["images"]}
    names_by_id = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    for d in detections:
        assert d["image_id"] == ids_by_file[d["file_name"]]
        assert names_by_id[d["category_id"]] == d["category_name"]  # ids 1 and 3 from the file
        assert d["score"] > CONF and len(d["bbox"]) == 4 and d["bbox"][2] >= 0

    # The saved detections of an image are model.predict's above --conf, in xywh.
    model = load_model(setup["checkpoint"])
    first = [d for d in detections if d["file_name"] == inputs[0]]
    (expected,) = model.predict(load_image(os.path.join(setup["image_dir"], inputs[0])), CONF, 0.6, 100)
    assert len(first) == len(expected["scores"])
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in first)]
    np.testing.assert_allclose(xyxy, expected["boxes"].numpy(), atol=0.01)

    out = capsys.readouterr().out
    assert out.count(": ") >= 4 and f"{inputs[0]}: " in out and "mAP@[.5:.95]" in out


def test_predict_glob_single_file_formats_and_unreadable(setup, tmp_path, caplog):
    source = tmp_path / "mixed"
    (source / "nested").mkdir(parents=True)
    image = Image.open(os.path.join(setup["image_dir"], "000001.jpg"))
    image.convert("RGBA").save(source / "a.png")
    image.convert("L").save(source / "b.BMP")
    image.save(source / "c.webp")
    image.save(source / "nested" / "d.jpg")
    (source / "notes.txt").write_text("not an image")
    (source / "broken.jpg").write_bytes(b"not a jpeg")

    with caplog.at_level(logging.WARNING, logger="predict"):
        folder = predict.main(predict_args(setup, source, tmp_path / "folder"))
    assert folder["images"] == 3 and folder["skipped"] == [str(source / "broken.jpg")]  # not recursive
    assert "broken.jpg" in caplog.text
    assert sorted(os.listdir(tmp_path / "folder")) == ["a.png", "b.BMP", "c.webp", "predictions.json"]

    recursive = predict.main(predict_args(setup, f"{source}/**/*.*", tmp_path / "glob"))
    assert recursive["images"] == 4 and (tmp_path / "glob" / "nested" / "d.jpg").is_file()

    single = predict.main(predict_args(setup, source / "c.webp", tmp_path / "single", "--conf", "0.0"))
    detections = json.loads((tmp_path / "single" / "predictions.json").read_text())
    assert single["images"] == 1 and detections
    assert {d["image_id"] for d in detections} == {1} and {d["category_id"] for d in detections} <= {1, 2}

    with pytest.raises(predict.PredictError, match="could be read"):
        predict.main(predict_args(setup, source / "broken.jpg", tmp_path / "bad"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing checkpoint", "empty folder"])
def test_predict_cli_errors_are_one_line(setup, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = predict_args(setup, empty, tmp_path / "out")
    if case == "missing checkpoint":
        args[1] = str(tmp_path / "nope.pth")
    result = subprocess.run([sys.executable, "predict.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert ("nope.pth" if case == "missing checkpoint" else "no images") in lines[0]


# ---------------------------------------------------------------------------------------------- export

def pytorch_outputs(model, images):
    with torch.no_grad():
        outputs = model(images)
    boxes = torch.cat([outputs["points"] - outputs["box_ltrb"][..., :2],
                       outputs["points"] + outputs["box_ltrb"][..., 2:]], dim=-1)
    return boxes.numpy(), outputs["cls_logits"].sigmoid().numpy()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
def test_export_onnx_matches_pytorch(setup, tmp_path, dynamic):
    check_image = os.path.join(setup["image_dir"], "000000.jpg")
    args = ["--checkpoint", setup["checkpoint"], "--output", str(tmp_path / "model.onnx"), "--runs", "1",
            "--warmup", "0", "--check-image", check_image] + (["--dynamic-batch"] if dynamic else [])
    result = export.main(args)
    assert result["passed"] and result["opset"] == export.DEFAULT_OPSET
    assert len(result["checks"]) == (4 if dynamic else 3)  # square, 4:3 (and batch 2), the letterboxed image
    for check in result["checks"].values():  # at 64 px even the boxes agree to 1e-4 px
        assert max(check["onnxruntime_vs_pytorch"].values()) <= 1e-4
    assert set(result["latency_ms"]) == {"pytorch", "pytorch_fused", "onnxruntime"}

    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["class_names"] == CLASS_NAMES and sidecar["opset"] == export.DEFAULT_OPSET
    assert sidecar["input"]["shape"] == ["batch" if dynamic else 1, 3, "height", "width"]
    assert sidecar["input"]["normalization"]["applied_inside_model"] is True
    assert sidecar["input"]["letterbox"]["pad_value"] == pytest.approx(114 / 255)
    assert list(sidecar["outputs"]) == ["boxes", "scores"]

    # Independent of export.py's own check: ONNX Runtime against the model as load_model returns it.
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    letterboxed = letterbox(load_image(check_image), 64)[0][None]
    images = torch.cat([letterboxed, torch.rand(1, 3, 64, 64)]) if dynamic else letterboxed
    boxes, scores = session.run(["boxes", "scores"], {"images": images.numpy()})
    want_boxes, want_scores = pytorch_outputs(load_model(setup["checkpoint"]), images)
    assert boxes.shape == (len(images), 64 + 16 + 4, 4) and scores.shape == (len(images), 84, 2)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4, rtol=0)
    rect = letterbox(load_image(check_image)[:, :48], 64, rect=True)[0][None]  # height and width are dynamic
    assert rect.shape[-2:] == (32, 64)
    boxes, scores = session.run(["boxes", "scores"], {"images": rect.numpy()})
    want_boxes, want_scores = pytorch_outputs(load_model(setup["checkpoint"]), rect)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)


def test_export_with_nms_matches_model_postprocess(setup, tmp_path):
    result = export.main(["--checkpoint", setup["checkpoint"], "--output", str(tmp_path / "nms.onnx"),
                          "--include-nms", "--dynamic-batch", "--conf", str(CONF), "--iou", "0.5",
                          "--max-det", "1000", "--runs", "1", "--warmup", "0"])
    assert result["passed"]
    session = onnxruntime.InferenceSession(str(tmp_path / "nms.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    (detections,) = session.run(["detections"], {"images": images.numpy()})

    model = load_model(setup["checkpoint"])
    with torch.no_grad():
        expected = model.postprocess(model(images), CONF, 0.5, max_detections=1000)
    assert len(detections) == sum(len(r["scores"]) for r in expected) > 0
    for b, want in enumerate(expected):
        rows = detections[detections[:, 0] == b]
        rows = rows[np.lexsort((-rows[:, 5], rows[:, 6]))]  # by class, then score descending
        order = np.lexsort((-want["scores"].numpy(), want["labels"].numpy()))
        np.testing.assert_array_equal(rows[:, 6], want["labels"].numpy()[order])
        np.testing.assert_allclose(rows[:, 1:5], want["boxes"].numpy()[order], atol=1e-4)
        np.testing.assert_allclose(rows[:, 5], want["scores"].numpy()[order], atol=1e-5)


def test_predict_ann_matches_each_image_by_its_own_path(setup, tmp_path):
    """a/0001.png and b/0001.png in one file: --source DIR/a scores 0001.png as a/0001.png; with 0001.png and
    sub/0001.png, DIR/0001.png is 0001.png; a base name that fits two entries and no path is an error."""
    images = {name: load_image(os.path.join(setup["image_dir"], name)) for name in sorted(os.listdir(setup["image_dir"]))}
    first = next(iter(images.values()))
    for folder in ("a", "b", "sub"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for relative in ("a/0001.png", "b/0001.png", "0001.png", "sub/0001.png"):
        Image.fromarray(first.permute(1, 2, 0).numpy()).save(tmp_path / "data" / relative)
    entries = [(1, "a/0001.png"), (2, "b/0001.png"), (3, "0001.png"), (4, "sub/0001.png")]
    (best,) = load_model(setup["checkpoint"]).predict(first, CONF)  # its top detection is image 1's one box
    x0, y0, x1, y1 = best["boxes"][0].tolist()
    ann = {"images": [{"id": i, "file_name": name, "width": 96, "height": 96} for i, name in entries],
           "annotations": [{"id": 1, "image_id": 1, "category_id": (1, 3)[int(best["labels"][0])],
                            "bbox": [x0, y0, x1 - x0, y1 - y0]}],
           "categories": [{"id": 1, "name": "square"}, {"id": 3, "name": "circle"}]}  # no iscrowd, no area
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    _, _, ids = predict.coco_ids(str(tmp_path / "ann.json"), [str(tmp_path / "data" / "a" / "0001.png")], CLASS_NAMES)
    assert ids == [1]
    _, _, ids = predict.coco_ids(str(tmp_path / "ann.json"), [str(tmp_path / "data" / "0001.png"),
                                                              str(tmp_path / "data" / "sub" / "0001.png")], CLASS_NAMES)
    assert ids == [3, 4]
    (tmp_path / "other").mkdir()
    Image.fromarray(first.permute(1, 2, 0).numpy()).save(tmp_path / "other" / "0001.png")
    ann["images"] = [image for image in ann["images"] if image["id"] in (1, 2)]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    with pytest.raises(predict.PredictError, match=r"matches several images .* \(a/0001.png, b/0001.png\)"):
        predict.coco_ids(str(tmp_path / "ann.json"), [str(tmp_path / "other" / "0001.png")], CLASS_NAMES)
    summary = predict.main(predict_args(setup, tmp_path / "data" / "a", tmp_path / "out", "--ann",
                                        str(tmp_path / "ann.json")))
    # Scored as image 1 (without KeyError), against its one box, which its top detection finds.
    detections = json.loads(open(summary["predictions_json"]).read())
    assert summary["images"] == 1 and {d["image_id"] for d in detections} == {1}
    assert summary["metrics"]["recall"] == 1.0
    assert summary["metrics"]["precision"] == pytest.approx(1 / len(detections))


# ---------------------------------------------------------------------------------------------- video, outputs

@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 9-frame synthetic video written with PyAV: shapes moving over a still background."""
    from video import VideoWriter
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(0)
    background = torch.from_numpy(rng.integers(60, 120, (3, 72, 96), dtype=np.uint8))
    with VideoWriter(path, fps=12) as writer:
        for index in range(9):
            frame = background.clone()
            frame[:, 20:44, 8 + 6 * index:32 + 6 * index] = 230
            writer.write(frame)
    return str(path)


def test_a_video_gives_an_annotated_video_and_the_detections_of_every_frame(setup, clip, tmp_path):
    from video import read_frames
    summary = predict.main(predict_args(setup, clip, tmp_path / "out", "--save-txt", "--save-conf", "--batch-size", "4"))
    assert summary["videos"][clip] == {"frames": 9, "detections": summary["videos"][clip]["detections"]}
    frames = list(read_frames(tmp_path / "out" / "clip.mp4"))
    assert len(frames) == 9 and frames[0][2].shape == (3, 72, 96)
    record = json.loads((tmp_path / "out" / "clip.json").read_text())
    assert [f["frame"] for f in record["frames"]] == list(range(9)) and record["fps"] == 12
    model = load_model(setup["checkpoint"])
    first = list(read_frames(clip))[0][2]
    (expected,) = model.predict(first, CONF, 0.6, 100)
    assert len(record["frames"][0]["detections"]) == len(expected["scores"])
    lines = (tmp_path / "out" / "labels" / "clip_0.txt").read_text().split("\n")
    assert len([line for line in lines if line]) == len(expected["scores"])
    if expected["scores"].numel():
        label, cx, cy, w, h, score = lines[0].split()
        x0, y0, x1, y1 = expected["boxes"][0].tolist()
        assert abs(float(cx) - (x0 + x1) / 2 / 96) < 1e-4 and abs(float(score) - expected["scores"][0]) < 1e-4


def test_each_run_gets_its_own_folder_unless_exist_ok(setup, tmp_path):
    first = predict.main(predict_args(setup, setup["image_dir"], tmp_path / "predictions"))
    second = predict.main(predict_args(setup, setup["image_dir"], tmp_path / "predictions"))
    third = predict.main(predict_args(setup, setup["image_dir"], tmp_path / "predictions", "--exist-ok"))
    assert [os.path.basename(r["save_dir"]) for r in (first, second, third)] == \
        ["predictions", "predictions-2", "predictions"]


@pytest.mark.parametrize("case", ["missing", "undecodable"])
def test_a_missing_or_undecodable_video_is_one_line_and_exit_2(setup, tmp_path, case, monkeypatch, capsys):
    path = tmp_path / "clip.mp4"
    if case == "undecodable":
        path.write_bytes(b"not a video at all" * 50)
    monkeypatch.setattr(sys, "argv", ["predict.py", *predict_args(setup, path, tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        predict.run()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and str(path) in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------- ONNX Runtime, INT8

def test_the_onnxruntime_backend_predicts_what_pytorch_predicts(setup, tmp_path):
    """predict.py and evaluate.py with --backend onnxruntime: the same letterbox (rectangular), selection and
    mapping back; boxes within 1 px and scores within 1e-3 of PyTorch's, on square and 4:3 photos."""
    from ort_detector import load_detector
    source = tmp_path / "photos"
    source.mkdir()
    for name in sorted(os.listdir(setup["image_dir"])):
        image = Image.open(os.path.join(setup["image_dir"], name))
        image.save(source / name)
        image.resize((96, 48)).save(source / f"wide_{name}")  # 2:1: letterboxed to 64 wide, 32 high
    torch_run = predict.main(predict_args(setup, source, tmp_path / "torch", "--conf", "0.05"))
    ort_run = predict.main(predict_args(setup, source, tmp_path / "ort", "--conf", "0.05", "--backend", "onnxruntime"))
    (exported,) = glob.glob(os.path.join(os.path.dirname(setup["checkpoint"]), "onnx_cache", "best_model-*.onnx"))
    want = json.loads(open(torch_run["predictions_json"]).read())
    got = json.loads(open(ort_run["predictions_json"]).read())
    assert len(want) == len(got) > 0
    for a, b in zip(sorted(want, key=lambda d: (d["file_name"], -d["score"])),
                    sorted(got, key=lambda d: (d["file_name"], -d["score"]))):
        assert a["file_name"] == b["file_name"] and a["category_id"] == b["category_id"]
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) <= 1.0 and abs(a["score"] - b["score"]) <= 1e-3
    detector = load_detector(exported)
    assert detector.class_names == CLASS_NAMES and detector.rect
    metrics = {backend: evaluate_main(setup, backend) for backend in ("pytorch", "onnxruntime")}
    assert metrics["onnxruntime"]["mAP"] == pytest.approx(metrics["pytorch"]["mAP"], abs=1e-3)


def evaluate_main(setup, backend):
    import evaluate
    return evaluate.main(["--checkpoint", setup["checkpoint"], "--ann", setup["ann_path"], "--root",
                          setup["image_dir"], "--backend", backend, "--conf", str(CONF)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A nano that has learned 8 synthetic images (so that quantisation has scores to lose), and its checkpoint."""
    from dataset_coco import CocoDetectionDataset, build_dataloader, build_transforms
    from engine import StepOptions, TrainState, seed_everything, train_one_epoch
    from losses import DetectionLoss
    root = tmp_path_factory.mktemp("int8")
    ann = write_shapes_split(root / "images", root / "ann.json", 8, CLASS_NAMES, img_size=96, seed=5)
    seed_everything(0)
    train = CocoDetectionDataset(ann, root / "images", transforms=build_transforms("letterbox", 64))
    model = create_lightweight_model(2, "nano", img_size=64)
    optimizer = torch.optim.AdamW(model.get_param_groups(3e-3, 3e-3, 3e-3, weight_decay=1e-4))
    state = TrainState(model, optimizer)
    loader = build_dataloader(train, batch_size=8, shuffle=True, num_workers=0)
    for epoch in range(40):
        train_one_epoch(model, DetectionLoss(), loader, state, StepOptions(clip_grad_norm=5.0), epoch, progress=False)
    checkpoint = str(root / "trained.pth")
    save_checkpoint(model_checkpoint(model.eval(), CLASS_NAMES), checkpoint)
    return {"checkpoint": checkpoint, "ann": ann, "images": str(root / "images")}


def test_int8_export_runs_and_keeps_most_of_the_float_map(trained, tmp_path):
    import evaluate
    result = export.main(["--checkpoint", trained["checkpoint"], "--output", str(tmp_path / "m.onnx"), "--int8",
                          "--calib-images", trained["images"], "--runs", "1", "--warmup", "0"])  # all 8 images, as a user's default
    assert os.path.isfile(tmp_path / "m.onnx") and os.path.isfile(tmp_path / "m_int8.onnx")  # float kept beside
    sidecar = json.loads((tmp_path / "m_int8.json").read_text())
    assert sidecar["quantization"]["format"] == "QDQ" and sidecar["quantization"]["calibration"]["images"] == 8
    assert sidecar["float_model"] == "m.onnx" and "onnxruntime_int8" in result["latency_ms"]
    assert "7 bits" in sidecar["quantization"]["weights"] and "VNNI" in sidecar["quantization"]["quantized_for"]
    import onnx
    int8 = onnx.load(str(tmp_path / "m_int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in int8.graph.node}
    checked, violations = integer_weight_violations(int8)  # the same integers with and without VNNI
    assert checked >= 30 and violations == []
    scores = {name: evaluate.main(["--checkpoint", str(tmp_path / name), "--ann", trained["ann"], "--root",
                                   trained["images"]]) for name in ("m.onnx", "m_int8.onnx")}
    assert scores["m.onnx"]["mAP50"] > 0.5  # the float model learned: a score quantisation could lose
    # Issue #24: within 2 points of float, and (the integers being the same on every CPU, checked above) on CPUs
    # with and without VNNI alike.
    assert scores["m_int8.onnx"]["mAP50"] >= scores["m.onnx"]["mAP50"] - 0.02
    assert scores["m_int8.onnx"]["mAP"] >= scores["m.onnx"]["mAP"] - 0.05


def test_folding_same_padding_into_convs_keeps_outputs_and_drops_the_pads(tmp_path):
    """lite0's stride-2 convolutions pad TensorFlow-style (a separate Pad); folded into the Conv, the graph
    computes the same and the quantiser has no float Pad to wrap."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import quantize
    from backbone_efficientnet import Conv2dSame
    torch.manual_seed(0)
    net = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), Conv2dSame(8, 8, 5, stride=2, groups=8)).eval()
    path, prepared = str(tmp_path / "net.onnx"), str(tmp_path / "prepared.onnx")
    torch.onnx.export(net, (torch.rand(1, 3, 64, 96),), path, dynamo=False, input_names=["images"],
                      dynamic_axes={"images": {2: "height", 3: "width"}})
    quant_pre_process(path, prepared, skip_symbolic_shape=True)
    graph = onnx.load(prepared)
    assert sum(node.op_type == "Pad" for node in graph.graph.node) == 2
    assert quantize.fold_pads_into_convs(graph) == 2
    assert not any(node.op_type == "Pad" for node in graph.graph.node)
    folded = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    for height, width in ((64, 96), (128, 64)):
        x = torch.rand(1, 3, height, width)
        expected = net(x).detach().numpy()
        got = folded.run(None, {"images": x.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    """setup's checkpoint exported once (float, boxes and scores outputs), in a folder of its own."""
    path = tmp_path_factory.mktemp("exported") / "model.onnx"
    export.main(["--checkpoint", setup["checkpoint"], "--output", str(path), "--runs", "1", "--warmup", "0"])
    return str(path)


@pytest.mark.parametrize("case", ["truncated onnx", "sidecar without class_names"])
@pytest.mark.parametrize("cli", ["evaluate", "predict"])
def test_an_unloadable_onnx_or_sidecar_is_one_line_and_exit_2(setup, exported, tmp_path, monkeypatch, capsys, case,
                                                               cli):
    import evaluate
    path = tmp_path / "model.onnx"
    model_bytes = open(exported, "rb").read()
    sidecar = json.loads(open(os.path.splitext(exported)[0] + ".json").read())
    if case == "truncated onnx":  # an interrupted copy: InvalidProtobuf in ONNX Runtime
        model_bytes = model_bytes[:len(model_bytes) // 2]
    else:
        del sidecar["class_names"]
    path.write_bytes(model_bytes)
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(SystemExit) as exit_info:
        if cli == "evaluate":
            evaluate.main(["--checkpoint", str(path), "--ann", setup["ann_path"], "--root", setup["image_dir"]])
        else:
            args = predict_args(setup, setup["image_dir"], tmp_path / "out")
            args[1] = str(path)  # --checkpoint
            monkeypatch.setattr(sys, "argv", ["predict.py", *args])
            predict.run()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: cannot load --checkpoint")
    assert ("InvalidProtobuf" if case == "truncated onnx" else "class_names") in err[0]


def test_the_onnxruntime_backend_never_overwrites_an_export_beside_the_checkpoint(setup, tmp_path):
    """A .pth run with --backend onnxruntime is exported into onnx_cache/, keyed by the checkpoint's bytes: the
    user's own best_model.onnx (here: other options) stays as it was, and an unchanged checkpoint is not
    exported again."""
    from ort_detector import load_detector
    checkpoint = tmp_path / "best_model.pth"
    shutil.copy(setup["checkpoint"], checkpoint)
    (tmp_path / "best_model.onnx").write_bytes(b"the user's export, made with --include-nms")
    (tmp_path / "best_model.json").write_text('{"outputs": {"detections": {}}}')

    first = load_detector(str(checkpoint), "onnxruntime")
    assert (tmp_path / "best_model.onnx").read_bytes() == b"the user's export, made with --include-nms"
    assert (tmp_path / "best_model.json").read_text() == '{"outputs": {"detections": {}}}'
    assert os.path.dirname(first.path) == str(tmp_path / "onnx_cache") and first.class_names == CLASS_NAMES
    assert sorted(os.listdir(tmp_path / "onnx_cache")) == sorted([os.path.basename(first.path),
                                                                  os.path.basename(first.path)[:-5] + ".json"])
    written = os.stat(first.path).st_mtime_ns
    again = load_detector(str(checkpoint), "onnxruntime")
    assert again.path == first.path and os.stat(first.path).st_mtime_ns == written  # reused

    model = load_model(setup["checkpoint"])
    save_checkpoint(model_checkpoint(model, CLASS_NAMES, conf_threshold=0.42), str(checkpoint))  # retrained
    retrained = load_detector(str(checkpoint), "onnxruntime")
    assert retrained.path != first.path and retrained.conf_threshold == pytest.approx(0.42)


def test_the_sidecar_carries_the_calibrated_threshold_that_the_ort_detector_defaults_to(setup, tmp_path):
    from ort_detector import OrtDetector
    model = load_model(setup["checkpoint"])
    checkpoint = str(tmp_path / "calibrated.pth")
    save_checkpoint(model_checkpoint(model, CLASS_NAMES, conf_threshold=0.55), checkpoint)
    export.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "calibrated.onnx"), "--runs", "1",
                 "--warmup", "0"])
    sidecar = json.loads((tmp_path / "calibrated.json").read_text())
    assert sidecar["postprocess"]["calibrated_conf_threshold"] == pytest.approx(0.55)
    detector = OrtDetector(tmp_path / "calibrated.onnx")
    assert detector.conf_threshold == pytest.approx(0.55)
    image = load_image(os.path.join(setup["image_dir"], "000000.jpg"))
    (default,), (low,) = detector.predict(image), detector.predict(image, conf_threshold=0.05)
    (at_055,) = detector.predict(image, conf_threshold=0.55)
    assert len(low["scores"]) > len(default["scores"]) > 0 and float(default["scores"].min()) >= 0.55
    assert torch.equal(default["scores"], at_055["scores"])


def integer_weight_violations(onnx_model):
    """Integer convolutions / matrix products whose 8-bit kernels could saturate: each is fine when its weights
    are uint8 (U8U8 kernels add in 32 bits) or int8 within [-64, 64] (7 bits: a pair of uint8 x int8 products,
    at most 2 * 255 * 64 = 32640, fits VPMADDUBSW's int16). Returns (checked count, [violating node names])."""
    from onnx import numpy_helper
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx_model.graph.initializer}
    producers = {output: node for node in onnx_model.graph.node for output in node.output}
    checked, violations = 0, []
    for node in onnx_model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        weight, activation = producers.get(node.input[1]), producers.get(node.input[0])
        if weight is None or weight.op_type != "DequantizeLinear" or weight.input[0] not in initializers:
            continue  # a float node
        checked += 1
        q = initializers[weight.input[0]]
        activation_type = initializers.get(activation.input[2]).dtype if activation.op_type == "DequantizeLinear" \
            else None
        if q.dtype == np.uint8 and activation_type == np.uint8:
            continue
        if q.dtype == np.int8 and -64 <= int(q.min()) and int(q.max()) <= 64:
            continue
        violations.append(node.name)
    return checked, violations


def test_int8_calibration_skips_an_unreadable_image_and_cannot_saturate_without_vnni(setup, exported, tmp_path,
                                                                                     caplog):
    """One unreadable image among good ones is skipped with a warning (none readable: one ValueError); every
    integer convolution of the result has 7-bit weights, so it computes the same on x86-64 CPUs with and without
    VNNI."""
    import onnx

    import quantize
    images = tmp_path / "calib"
    images.mkdir()
    for name in ("000000.jpg", "000001.jpg"):
        shutil.copy(os.path.join(setup["image_dir"], name), images / name)
    (images / "000002.jpg").write_bytes(b"not a jpeg")
    paths = quantize.calibration_images(str(images), 10)
    with caplog.at_level(logging.WARNING, logger="quantize"):
        done = quantize.quantize_int8(exported, str(tmp_path / "int8.onnx"), paths, 64)
    assert done["calibration"]["images"] == 2
    assert done["calibration"]["skipped_unreadable"] == [str(images / "000002.jpg")]
    assert "000002.jpg" in caplog.text and "7 bits" in done["weights"] and "VNNI" in done["quantized_for"]
    checked, violations = integer_weight_violations(onnx.load(str(tmp_path / "int8.onnx")))
    assert checked >= 30 and violations == []
    with pytest.raises(ValueError, match="none of the 1 calibration images could be read"):
        quantize.quantize_int8(exported, str(tmp_path / "none.onnx"), [str(images / "000002.jpg")], 64)


ORT_OUTPUTS = """
import sys
import numpy as np
import onnxruntime
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
session = onnxruntime.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([session.run(["scores"], {"images": image[None]})[0] for image in images]))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or os.uname().machine != "x86_64",
                    reason="needs qemu-user (qemu-x86_64) on an x86-64 machine")
def test_int8_scores_are_the_same_on_a_cpu_without_vnni(trained, tmp_path):
    """The INT8 model run by ONNX Runtime under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512, no VNNI: the
    kernels that saturate 8-bit weights) gives this CPU's scores exactly."""
    import quantize
    export.main(["--checkpoint", trained["checkpoint"], "--output", str(tmp_path / "m.onnx"), "--runs", "1",
                 "--warmup", "0"])
    paths = quantize.calibration_images(trained["images"], 6)
    quantize.quantize_int8(str(tmp_path / "m.onnx"), str(tmp_path / "m_int8.onnx"), paths, 64)
    images = np.stack([letterbox(load_image(os.path.join(trained["images"], name)), 64)[0].numpy()
                       for name in sorted(os.listdir(trained["images"]))])
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "ort_outputs.py").write_text(ORT_OUTPUTS)
    scores = {}
    for cpu, prefix in (("this", []), ("haswell", ["qemu-x86_64", "-cpu", "Haswell"])):
        subprocess.run([*prefix, sys.executable, str(tmp_path / "ort_outputs.py"), str(tmp_path / "m_int8.onnx"),
                        str(tmp_path / "images.npy"), str(tmp_path / f"{cpu}.npy")], check=True, timeout=300,
                       capture_output=True)
        scores[cpu] = np.load(tmp_path / f"{cpu}.npy")
    np.testing.assert_array_equal(scores["haswell"], scores["this"])
