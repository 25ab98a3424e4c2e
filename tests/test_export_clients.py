"""Clients of an exported model outside this repo (issue #26): OpenCV's DNN module on a --static export, and
examples/onnxruntime_client.py (ONNX Runtime, numpy and Pillow only). Both must find predict.py's boxes.

Reuses test_predict_export's random-init nano checkpoint at 64 px and its 96 px synthetic images.
"""
import importlib.util
import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
from PIL import Image

import export
from dataset_coco import load_image
from model_lightweight import load_model
from test_predict_export import CONF, REPO, one_thread, setup  # noqa: F401 (pytest fixtures)


def load_client():
    spec = importlib.util.spec_from_file_location("onnxruntime_client",
                                                  os.path.join(REPO, "examples", "onnxruntime_client.py"))
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    return client


class OpenCVSession:
    """cv2.dnn behind ONNX Runtime's session.run, so the example client's decoding runs on OpenCV's outputs."""

    def __init__(self, onnx_path):
        cv2 = pytest.importorskip("cv2")  # requirements-dev.txt's opencv-python-headless
        self.net = cv2.dnn.readNetFromONNX(onnx_path)

    def run(self, output_names, feed):
        self.net.setInput(feed["images"])
        return list(self.net.forward(output_names))


@pytest.fixture(scope="module")
def photos(setup, tmp_path_factory):
    """setup's square images and a 2:1 copy of each (letterboxed to 64x32 by predict.py)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in sorted(os.listdir(setup["image_dir"])):
        image = Image.open(os.path.join(setup["image_dir"], name))
        image.save(folder / name)
        image.resize((96, 48)).save(folder / f"wide_{name}")
    return sorted(str(path) for path in folder.iterdir())


def export_model(setup, path, *extra):
    export.main(["--checkpoint", setup["checkpoint"], "--output", str(path), "--runs", "1", "--warmup", "0",
                 "--conf", str(CONF), *extra])
    return json.loads(open(os.path.splitext(str(path))[0] + ".json").read())


def assert_same_detections(got, want, what):
    """Same count at the threshold and, one to one, the same class, score within 1e-3 and box within 1 px.
    Matched as sets: INT8 scores tie, so score order is no common order."""
    boxes, scores, labels = got
    want_boxes, want_scores, want_labels = (want[key].numpy() for key in ("boxes", "scores", "labels"))
    assert len(scores) == len(want_scores), f"{what}: {len(scores)} detections, predict.py {len(want_scores)}"
    unmatched = list(range(len(want_scores)))
    for box, score, label in zip(boxes, scores, labels):
        same = [j for j in unmatched if want_labels[j] == label and abs(want_scores[j] - score) <= 1e-3
                and np.abs(want_boxes[j] - box).max() <= 1.0]
        assert same, f"{what}: predict.py has no detection like class {label}, score {score:.4f}, box {box}"
        unmatched.remove(same[0])


def test_a_static_export_runs_in_opencv_dnn_with_the_boxes_of_predict(setup, photos, tmp_path):
    """cv2.dnn on the --static graph, decoded as the example client does, finds predict.py's boxes: PyTorch's on
    square photos (the same letterbox), and on every photo those of predict.py run on the static .onnx (its
    onnxruntime backend pads a static graph's input to the square too)."""
    from ort_detector import load_detector
    sidecar = export_model(setup, tmp_path / "static.onnx", "--static")
    assert sidecar["input"]["static"] is True and sidecar["input"]["shape"] == [1, 3, 64, 64]
    assert sidecar["outputs"]["boxes"]["shape"] == [1, 64 + 16 + 4, 4]
    assert "round(height * scale)" in sidecar["input"]["letterbox"]["resize"]
    assert "clipped to the image" in sidecar["postprocess"]["clip"]
    ops = {node.op_type for node in onnx.load(str(tmp_path / "static.onnx")).graph.node}
    assert not ops & {"Range", "Expand"}  # the anchor grid is a constant, not built from the input shape

    client, model = load_client(), load_model(setup["checkpoint"])
    session, detector = OpenCVSession(str(tmp_path / "static.onnx")), load_detector(str(tmp_path / "static.onnx"))
    found = 0
    for path in photos:
        image = Image.open(path).convert("RGB")
        got = client.detect(session, sidecar, image, conf=CONF)
        (want,) = detector.predict(load_image(path), conf_threshold=CONF)
        assert_same_detections(got, want, f"{os.path.basename(path)}, onnxruntime backend")
        if image.width == image.height:
            (want,) = model.predict(load_image(path), conf_threshold=CONF)
            assert_same_detections(got, want, f"{os.path.basename(path)}, pytorch")
        found += len(got[1])
    assert found > 0


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_the_example_client_finds_the_boxes_of_predict(setup, photos, tmp_path, static):
    """The client letterboxes as the sidecar says (to multiples of 32, or to the square of a static graph) and
    finds the boxes of predict.py: PyTorch's for a dynamic export, the onnxruntime backend's for a static one."""
    from ort_detector import load_detector
    sidecar = export_model(setup, tmp_path / "model.onnx", *(["--static"] if static else []))
    assert sidecar["input"]["static"] is static
    client = load_client()
    reference = load_detector(str(tmp_path / "model.onnx")) if static else load_model(setup["checkpoint"])
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    found = 0
    for path in photos:
        got = client.detect(session, sidecar, Image.open(path).convert("RGB"), conf=CONF)
        (want,) = reference.predict(load_image(path), conf_threshold=CONF)
        assert_same_detections(got, want, os.path.basename(path))
        found += len(got[1])
    assert found > 0


def test_static_with_a_dynamic_batch_is_one_line_and_exit_2(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["export.py", "--checkpoint", setup["checkpoint"], "--output",
                                     str(tmp_path / "m.onnx"), "--static", "--dynamic-batch"])
    with pytest.raises(SystemExit) as exit_info:
        export.run()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--static" in err[0]


def test_a_static_int8_export_runs_in_opencv_dnn_as_in_onnxruntime(setup, photos, tmp_path):
    """The QDQ graph of --static --int8 (calibrated on square letterboxes, its only input shape) runs in cv2.dnn
    with ONNX Runtime's outputs, up to where the two round an activation half a quantisation step apart (one of
    these images). Raw outputs, not detections: this random model's INT8 scores
    tie by the dozen at the max_detections cut, where such rounding picks which tied box stays."""
    export_model(setup, tmp_path / "static.onnx", "--static", "--int8", "--calib-images", setup["image_dir"])
    sidecar = json.loads((tmp_path / "static_int8.json").read_text())
    assert sidecar["input"]["static"] is True and "quantization" in sidecar
    int8_path, letterbox = str(tmp_path / "static_int8.onnx"), load_client().letterbox
    opencv = OpenCVSession(int8_path)
    session = onnxruntime.InferenceSession(int8_path, providers=["CPUExecutionProvider"])
    for path in photos:
        images, _ = letterbox(Image.open(path).convert("RGB"), sidecar["input"]["letterbox"], static=True)
        want_boxes, want_scores = session.run(["boxes", "scores"], {"images": images})
        boxes, scores = opencv.run(["boxes", "scores"], {"images": images})
        np.testing.assert_allclose(scores, want_scores, atol=5e-3, rtol=0, err_msg=path)
        np.testing.assert_allclose(boxes, want_boxes, atol=0.25, rtol=0, err_msg=path)
