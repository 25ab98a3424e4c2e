"""quantize.py's logging: ONNX Runtime's quantiser prints a line per tensor it adjusts through the root logger;
export.py --int8 keeps them out unless -v (issue #26 item 6)."""
import logging

import pytest

import export
import quantize
from checkpoints import model_checkpoint, save_checkpoint
from model_lightweight import create_lightweight_model
from synthetic_data import write_shapes_split


def _root_info(records):
    """The records logged on the root logger itself below WARNING: how onnxruntime.quantization logs (logging.info)."""
    return [record.getMessage() for record in records if record.name == "root" and record.levelno < logging.WARNING]


def test_onnxruntime_logs_drop_the_root_loggers_own_info_lines_and_nothing_else(caplog):
    caplog.set_level(logging.INFO)
    root, package = logging.getLogger(), logging.getLogger("onnxruntime")
    before = (list(root.filters), package.level)
    with quantize.onnxruntime_logs():
        logging.info("Increased scale[0] for weight `w` by ratio 2.0")  # as onnxruntime.quantization logs
        logging.getLogger("onnxruntime.quantization.preprocess").info("a pre-processing detail")
        logging.warning("a quantiser warning")
        logging.getLogger("quantize").info("INT8: our own line")
    assert [record.getMessage() for record in caplog.records] == ["a quantiser warning", "INT8: our own line"]
    assert (list(root.filters), package.level) == before  # restored
    caplog.clear()
    with quantize.onnxruntime_logs(verbose=True):
        logging.info("Increased scale[1] for weight `w` by ratio 2.0")
    assert _root_info(caplog.records) == ["Increased scale[1] for weight `w` by ratio 2.0"]


@pytest.mark.slow
def test_int8_export_prints_no_onnxruntime_info_line_unless_verbose(tmp_path, caplog):
    """The real quantiser on a tiny model: export.py --int8 logs its own lines and none of ONNX Runtime's INFO
    lines ("Increased scale[...]", "Created a copy of bias input ..."); verbose lets them through."""
    caplog.set_level(logging.INFO)
    write_shapes_split(tmp_path / "images", tmp_path / "ann.json", 4, ["thing"], img_size=64, seed=0)
    checkpoint = str(tmp_path / "model.pth")
    save_checkpoint(model_checkpoint(create_lightweight_model(1, "nano", img_size=64), ["thing"]), checkpoint)
    export.main(["--checkpoint", checkpoint, "--int8", "--calib-images", str(tmp_path / "images"), "--runs", "1",
                 "--warmup", "0"])
    assert _root_info(caplog.records) == [] and "INT8: calibrated on 4 images" in caplog.text
    caplog.clear()
    quantize.quantize_int8(str(tmp_path / "model.onnx"), str(tmp_path / "verbose_int8.onnx"),
                           quantize.calibration_images(str(tmp_path / "images"), 4), 64, verbose=True)
    assert _root_info(caplog.records)  # the lines the default keeps out exist
