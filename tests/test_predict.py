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
from test_predict_export import one_thread, predict_args, setup  # noqa: F401 (fixtures)


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
