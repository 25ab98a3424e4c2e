"""predict.py at its edges (issue #24): unique output names, numeric flags checked by the parser, no folder
from a failed run, a missing --source named as missing.

The checkpoint, images and argv helper are test_predict_export's (a randomised nano at 64 px).
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from conftest import exits_with_one_line
from test_predict_export import exported, one_thread, predict_args, setup  # noqa: F401 (fixtures)


def write_clip(path, frames, seed=0):
    """A tiny synthetic video (64x48) of `frames` frames, written with PyAV."""
    from video import VideoWriter
    path.parent.mkdir(parents=True, exist_ok=True)
    background = torch.from_numpy(np.random.default_rng(seed).integers(60, 120, (3, 48, 64), dtype=np.uint8))
    with VideoWriter(path, fps=10) as writer:
        for index in range(frames):
            frame = background.clone()
            frame[:, 10:30, 4 + 4 * index:24 + 4 * index] = 230
            writer.write(frame)
    return str(path)


# ---------------------------------------------------------------------------------------------- output names

def test_output_stems_keep_unique_names_and_suffix_the_later_of_a_collision():
    stems = predict.output_stems
    assert stems(["a.jpg", "b.png", os.path.join("sub", "a.jpg")], [], save_txt=True) == \
        (["a", "b", os.path.join("sub", "a")], [])  # the simple case is unchanged
    assert stems(["a.jpg", "a.png"], [], save_txt=True) == (["a", "a_png"], [])  # one labels/a.txt otherwise
    assert stems(["a.jpg", "a.png"], [], save_txt=False) == (["a", "a"], [])  # a.jpg and a.png do not collide
    assert stems(["a.jpg", "a.png", "a_png.jpg"], [], save_txt=True) == (["a", "a_png_2", "a_png"], [])
    assert stems(["A.JPG", "a.jpg"], []) == (["A", "a_jpg"], [])  # one file on macOS and Windows
    assert stems([], ["a.mp4", "a.mov"]) == ([], ["a", "a_mov"])  # both would write a.mp4 and a.json
    assert stems([], ["predictions.mp4"]) == ([], ["predictions_mp4"])  # predictions.json is the images'
    assert stems(["a_0.jpg", "a_1.jpg"], ["a.mp4"], save_txt=True) == (["a_0", "a_1"], ["a_mp4"])  # frame labels
    assert stems(["a_0.jpg"], ["a.mp4"], save_txt=False) == (["a_0"], ["a"])


def test_images_with_one_stem_keep_their_own_labels(setup, tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    names = sorted(os.listdir(setup["image_dir"]))
    Image.open(os.path.join(setup["image_dir"], names[0])).save(source / "a.jpg")
    Image.open(os.path.join(setup["image_dir"], names[1])).save(source / "a.png")
    Image.open(os.path.join(setup["image_dir"], names[2])).save(source / "b.jpg")
    summary = predict.main(predict_args(setup, source, tmp_path / "out", "--save-txt", "--conf", "0.05"))
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "labels")) == ["a.txt", "a_png.txt", "b.txt"]
    assert sorted(os.listdir(out)) == ["a.jpg", "a_png.png", "b.jpg", "labels", "predictions.json"]
    detections = json.loads((out / "predictions.json").read_text())
    for name, stem in (("a.jpg", "a"), ("a.png", "a_png"), ("b.jpg", "b")):  # each file its own image's boxes
        lines = [line for line in (out / "labels" / f"{stem}.txt").read_text().splitlines() if line]
        assert len(lines) == len([d for d in detections if d["file_name"] == name])
    assert summary["images"] == 3


def test_videos_with_one_name_keep_their_own_outputs(setup, tmp_path):
    """day1/clip.mp4 and day2/clip.mp4 (a ** glob) keep their folders; of day2/clip.mov and day2/clip.mp4 the
    later in sorted order gets its extension; no video's frames end up in another's files."""
    root = tmp_path / "drive"
    clips = {"day1/clip": write_clip(root / "day1" / "clip.mp4", 3, seed=1),
             "day2/clip_mp4": write_clip(root / "day2" / "clip.mp4", 4, seed=2),
             "day2/clip": write_clip(root / "day2" / "clip.mov", 2, seed=3)}
    summary = predict.main(predict_args(setup, f"{root}/**/*.*", tmp_path / "out", "--save-txt"))
    out = tmp_path / "out"
    for stem, path in clips.items():
        record = json.loads((out / f"{stem}.json").read_text())
        frames = summary["videos"][path]["frames"]
        assert record["video"] == path and len(record["frames"]) == frames and frames in (2, 3, 4)
        assert (out / f"{stem}.mp4").is_file()
        assert (out / "labels" / f"{stem}_{frames - 1}.txt").is_file()
        assert not (out / "labels" / f"{stem}_{frames}.txt").exists()
    assert sorted(summary["videos"][p]["frames"] for p in clips.values()) == [2, 3, 4]


# ---------------------------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flag, value", [("--max-det", "-1"), ("--max-det", "0"), ("--batch-size", "0"),
                                         ("--workers", "-1"), ("--threads", "0"), ("--threads", "-2"),
                                         ("--conf", "1.5"), ("--conf", "-0.1"), ("--conf", "nan"), ("--iou", "2"),
                                         ("--iou", "-1")])
def test_out_of_range_numeric_flags_are_a_parser_error(setup, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(predict_args(setup, setup["image_dir"], tmp_path / "out", flag, value))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"argument {flag}: must be" in err.strip().splitlines()[-1] and value in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- failures

def test_a_failed_run_leaves_no_folder(setup, tmp_path):
    source = tmp_path / "broken"
    source.mkdir()
    (source / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(predict.PredictError, match="could be read"):
        predict.main(predict_args(setup, source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    summary = predict.main(predict_args(setup, setup["image_dir"], tmp_path / "out"))
    assert summary["save_dir"] == str(tmp_path / "out")  # the name was not used up by the failed run


@pytest.mark.parametrize("missing", ["photos", "photo.jpg", "clip.mp4"])
def test_a_missing_source_says_it_does_not_exist(setup, tmp_path, monkeypatch, capsys, missing):
    source = tmp_path / missing
    monkeypatch.setattr(sys, "argv", ["predict.py", *predict_args(setup, source, tmp_path / "out")])
    line = exits_with_one_line(capsys, predict.run)
    assert line == f"error: --source {source} does not exist"
    assert not (tmp_path / "out").exists()


def test_a_glob_that_matches_nothing_says_no_images_found(setup, tmp_path):
    with pytest.raises(predict.PredictError, match="no images .* found in --source glob"):
        predict.main(predict_args(setup, tmp_path / "*.jpg", tmp_path / "out"))


def test_predict_finds_the_tiff_images_that_training_reads(setup, tmp_path):
    """One list of image extensions (annotations.IMAGE_EXTENSIONS): a TIFF data set that trains is one that
    predict.py --source reads, not "no images"."""
    from annotations import read_annotations
    from dataset_coco import CocoDetectionDataset
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "labels").mkdir()
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp_path / "ds" / "images" / "a.tif")
    (tmp_path / "ds" / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "ds" / "labels" / "classes.txt").write_text("thing\n")
    data, root, _ = read_annotations(str(tmp_path / "ds" / "labels"))
    image, target = CocoDetectionDataset(data, root, transforms=None)[0]
    assert image.shape == (3, 48, 64) and len(target["boxes_xyxy"]) == 1
    summary = predict.main(predict_args(setup, tmp_path / "ds" / "images", tmp_path / "out"))
    assert summary["images"] == 1 and (tmp_path / "out" / "a.tif").is_file()


# ---------------------------------------------------------------------------------------------- drawing (issue #26)

GREY = (128, 128, 128)


def draw_one(size, box, colour=None, label=0):
    """predict.draw of one detection (or plots.draw_detections with `colour`) on a plain grey (H, W) image, as
    an (H, W, 3) array."""
    height, width = size
    image = torch.tensor(GREY, dtype=torch.uint8)[:, None, None].expand(3, height, width).contiguous()
    result = {"boxes": torch.tensor([box], dtype=torch.float32), "scores": torch.tensor([0.87]),
              "labels": torch.tensor([label])}
    if colour is None:
        return predict.draw(image, result, ["kangaroo", "wallaby"]).permute(1, 2, 0).numpy()
    from plots import draw_detections
    return np.asarray(draw_detections(image, result["boxes"], result["labels"], result["scores"], ["kangaroo"],
                                      colours=[colour]))


def label_area(array, box_top):
    """The label's rectangle: the bounding box of the pixels above the box that are not background."""
    ys, xs = np.nonzero((array[:box_top] != GREY).any(axis=2))
    assert len(ys), "no label above the box"
    return array[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def test_labels_and_lines_scale_with_a_large_photo():
    """On a 2560x1920 photo the label's text is at least 2 % of the image tall and the box line at least 3 px
    wide, measured on the drawn pixels (before: a fixed bitmap font some 10 px tall)."""
    array = draw_one((1920, 2560), (400, 600, 1400, 1500))
    colour = array[1000, 400]
    row = array[1000]  # crosses the left and right edges of the box
    left_edge = np.nonzero((row == colour).all(axis=1))[0]
    left_edge = left_edge[left_edge < 900]
    assert left_edge.min() == 400 and len(left_edge) == left_edge.max() - left_edge.min() + 1 >= 3
    label = label_area(array, 600)
    text_rows = np.nonzero(((label != colour).any(axis=2)).any(axis=1))[0]  # rows holding any text pixel
    assert text_rows.max() - text_rows.min() + 1 >= 0.02 * 1920
    assert label.shape[0] >= 0.02 * 1920 and label.shape[1] > label.shape[0]


def contrasting(colour):
    """Black or white, whichever has the higher WCAG contrast ratio with an RGB colour."""
    linear = [((c / 255 + 0.055) / 1.055) ** 2.4 if c > 10 else c / 255 / 12.92 for c in colour]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return (0, 0, 0) if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else (255, 255, 255)


@pytest.mark.parametrize("label, colour, text", [(0, None, (0, 0, 0)), (1, None, None),
                                                 (0, "#1A1A66", (255, 255, 255)), (0, "#7A0000", (255, 255, 255)),
                                                 (0, "#FFD400", (0, 0, 0))])
def test_labels_are_filled_with_the_box_colour_and_text_that_contrasts(label, colour, text):
    """Inside the label rectangle every pixel is the box colour, the text colour or a blend of the two (never the
    photo behind it), and the text is black on a light colour, white on a dark one; the first class, the colour
    of a single-class model, is bright (black text)."""
    array = draw_one((480, 640), (100, 200, 300, 400), colour, label)
    fill = array[300, 100].astype(float)  # the box's left edge
    text = text or contrasting(array[300, 100].tolist())
    assert text == contrasting(array[300, 100].tolist())
    label = label_area(array, 200).reshape(-1, 3).astype(float)
    # the position of each pixel on the segment from the fill to the text colour, and its distance from it
    along = ((label - fill) @ (np.array(text) - fill)) / ((np.array(text) - fill) ** 2).sum()
    off = np.linalg.norm(label - (fill + along[:, None] * (np.array(text) - fill)), axis=1)
    assert off.max() <= 3 and along.min() >= -0.02 and along.max() <= 1.02
    assert (along == 0).mean() > 0.5  # mostly background fill
    assert ((label == text).all(axis=1)).sum() > 10  # solid text pixels of the contrasting colour


def test_a_label_at_the_top_edge_goes_inside_the_box_and_small_images_keep_legible_sizes():
    import plots
    array = draw_one((48, 64), (10, 0, 60, 40))
    assert (array[2, 12] != GREY).any()  # the label, inside the box
    assert plots.line_width(48, 64) == 2 and plots.font_size(48, 64) == 11
    assert plots.line_width(1920, 2560) >= 3 and plots.font_size(1920, 2560) >= 0.02 * 1920


def test_the_ort_detector_returns_named_detections_that_draw(setup, exported):
    """OrtDetector.predict gives what model.predict gives: the tensors plus the sidecar's class names, and draws."""
    from dataset_coco import load_image
    from ort_detector import OrtDetector
    from test_predict_export import CLASS_NAMES
    image = load_image(os.path.join(setup["image_dir"], sorted(os.listdir(setup["image_dir"]))[0]))
    (result,) = OrtDetector(exported).predict(image, conf_threshold=0.0, max_detections=5)
    assert len(result["labels"]) and result.names == [CLASS_NAMES[label] for label in result["labels"].tolist()]
    assert result.draw(image).size == (image.shape[2], image.shape[1])


# ---------------------------------------------------------------------------------------------- speed

@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_predict_ends_with_the_time_per_image_of_each_phase(setup, exported, tmp_path, capsys, backend):
    """Issue #26 item 6: the last line is Ultralytics' "Speed:", per image: decode+preprocess, network and
    postprocess, on both backends; the numbers come back in the summary and add up to no more than the wall time."""
    import time
    checkpoint = setup["checkpoint"] if backend == "pytorch" else exported
    argv = predict_args(setup, setup["image_dir"], tmp_path / "out", "--backend", backend, "--batch-size", "3")
    argv[argv.index("--checkpoint") + 1] = checkpoint
    start = time.perf_counter()
    summary = predict.main(argv)
    wall_per_image = 1000 * (time.perf_counter() - start) / summary["images"]
    speed = summary["speed_ms"]
    assert set(speed) == {"preprocess", "network", "postprocess"} and all(v > 0 for v in speed.values()), speed
    assert sum(speed.values()) <= wall_per_image
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == (f"Speed: {speed['preprocess']:.1f} ms decode+preprocess, {speed['network']:.1f} ms network, "
                         f"{speed['postprocess']:.1f} ms postprocess per image (64x64 input, 4 images)")


# ---------------------------------------------------------------------------------------------- reduced decoding

def test_no_save_decodes_a_large_jpeg_reduced_and_finds_the_same_boxes(setup, tmp_path):
    """Issue #27: without drawings a large JPEG is decoded at about the network's input size (1/8 here); the
    detections, in the original frame, are the full decode's within a pixel of the network input (12 px here)."""
    name = sorted(os.listdir(setup["image_dir"]))[0]
    small = Image.open(os.path.join(setup["image_dir"], name)).convert("RGB")
    (tmp_path / "big").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned, as a phone writes it
    big = small.resize((small.width * 8 + 5, small.height * 8 + 3), Image.Resampling.BICUBIC)  # libjpeg pads it
    big.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "big" / "big.jpg", quality=95, exif=exif)
    runs = {}
    for mode, extra in (("full", ()), ("reduced", ("--no-save",))):
        argv = predict_args(setup, tmp_path / "big", tmp_path / mode, "--conf", "0.0", "--max-det", "5",
                            "--save-txt", *extra)
        predict.main(argv)
        runs[mode] = json.loads((tmp_path / mode / "predictions.json").read_text())
    assert os.path.isfile(tmp_path / "full" / "big.jpg") and not os.path.exists(tmp_path / "reduced" / "big.jpg")
    assert len(runs["full"]) == len(runs["reduced"]) == 5
    network_pixel = big.width / 64
    for full, reduced in zip(runs["full"], runs["reduced"]):
        assert full["category_id"] == reduced["category_id"]
        assert np.allclose(full["bbox"], reduced["bbox"], atol=network_pixel), (full, reduced)
    labels = (tmp_path / "reduced" / "labels" / "big.txt").read_text().split()
    assert len(labels) == 5 * 5 and all(0 <= float(value) <= 1 for value in labels)
