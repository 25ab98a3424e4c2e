"""Run a trained detector on images and videos: drawn pictures and videos, COCO-format results, YOLO txt labels,
optional evaluation.

    python predict.py --checkpoint finetune_results/whiteline_*/best_model.pth --source photos/
    python predict.py --checkpoint best_model.pth --source "data/**/*.jpg" --save-txt
    python predict.py --checkpoint best_model.pth --source dashcam.mp4            # an annotated video
    python predict.py --checkpoint best_model.pth --source val/images --ann val/annotations.json
    python predict.py --run finetune_results/whiteline_<stamp>    # the images the run validated on, drawn and scored

--source is an image, a video (mp4/avi/mov/mkv, read with PyAV), a folder (its images and videos, not subfolders) or
a glob (quote it; ** recurses). Images are read by image_io.decode_image (EXIF orientation, grayscale, palette,
alpha, CMYK and 16-bit handled). Each run writes a new folder: --save-dir (default predictions), or predictions-2,
predictions-3, ... when it exists (--exist-ok reuses it); it is made by the first file written, so a run that fails
on its input leaves none. It receives each image with its boxes drawn, as NAME.EXT (not with --no-save), and
predictions.json: COCO results ({"image_id", "file_name", "category_id", "category_name", "bbox" xywh pixels,
"score"}); each video as NAME.mp4 with boxes drawn and NAME.json with the detections of every frame; with
--save-txt, labels/NAME.txt per image (per frame: labels/NAME_<frame>.txt) in YOLO's format, `class cx cy w h`
normalised (and the score with --save-conf). NAME is the file's path relative to the folder the images (or the
videos) share, without its extension: the base name for one folder, subfolders kept for a recursive glob. Where two
files' outputs would share a name (a.jpg and a.png with --save-txt, a.mp4 and a.mov, a_0.jpg and the frames of
a.mp4; compared case-insensitively; predictions.json is reserved), the first (images first, each kind in sorted path
order) keeps NAME and each later one appends its extension (a.png -> a_png.png and labels/a_png.txt), then _2, _3,
...: no output is overwritten within a run. The score threshold is the checkpoint's calibrated one unless --conf
says otherwise (fine-tuning calibrates one per class, each class's best F1 on val; --conf is one for all). Each class
is drawn in its own colour with its name. With --ann (any format dataset_coco reads), category and image ids are that
file's (matched by class
name and file path), and the image detections are scored against its ground truth with evaluate.coco_metrics;
otherwise categories are 1..K in the checkpoint's class order and images 1..N in sorted path order.
"""
import argparse
import collections
import glob
import itertools
import logging
import os
import posixpath
import sys

import torch
from PIL import Image
from tqdm import tqdm

from config import inference_defaults, run_cli, write_json_atomic
from annotations import IMAGE_EXTENSIONS, index_coco, read_annotations
from image_io import decode_image, pil_to_tensor
from evaluate import (MAP_SCORE_THRESHOLD, coco_metrics, format_metrics, ground_truth_coco, predictions_to_coco,
                      speed_line, speed_ms, timed_iter, to_original_frame)
from inference import detection_settings, lowest_threshold
from ort_detector import ModelLoadError, load_detector
from plots import draw_detections, threshold_text
from video import VIDEO_EXTENSIONS, VideoError, VideoWriter, open_video, read_frames, video_fps

logger = logging.getLogger("predict")

SUMMARY_SCORES = 10  # scores listed per class in the one-line summary of an image


class PredictError(ValueError):
    """Bad input for predict.py: reported as one line and exit status 2."""


# ---------------------------------------------------------------------------------------------- inputs

def find_sources(source):
    """Sorted image and video paths of `source` (a file, a folder, non-recursive, or a glob) with their names.

    Returns:
        (image paths, image names, video paths, video names): names are paths relative to the folder the images
        (the videos) share, the base name for one folder; image names are the file_name of predictions.json, and
        both are the start of the output names (output_stems).
    """
    media = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    if os.path.isdir(source):
        paths = [os.path.join(source, name) for name in os.listdir(source)]
    elif os.path.isfile(source):
        if not source.lower().endswith(media):
            raise PredictError(f"--source {source} is neither an image ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) "
                               f"nor a video ({'/'.join(e[1:] for e in VIDEO_EXTENSIONS)})")
        paths = [source]
    elif not os.path.exists(source) and not glob.has_magic(source):  # a typo, not an empty folder (issue #24)
        raise PredictError(f"--source {source} does not exist")
    else:
        paths = glob.glob(source, recursive=True)
    paths = sorted(p for p in paths if os.path.isfile(p) and p.lower().endswith(media))
    if not paths:
        what = "folder" if os.path.isdir(source) else "glob" if glob.has_magic(source) else "path"
        raise PredictError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) or videos "
                           f"({', '.join(e[1:] for e in VIDEO_EXTENSIONS)}) found in --source {what} {source}")
    images = [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)]
    videos = [p for p in paths if p.lower().endswith(VIDEO_EXTENSIONS)]
    return images, _relative_names(images), videos, _relative_names(videos)


def _relative_names(paths):
    """`paths` relative to the folder they share (base names for one folder)."""
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def output_stems(image_names, video_names, save_txt=False):
    """One output stem per file, so that no output of a run overwrites another (issue #24).

    An image writes STEM.EXT (drawn) and, with `save_txt`, labels/STEM.txt; a video STEM.mp4, STEM.json and
    labels/STEM_<frame>.txt; predictions.json is the images'. A file keeps its name without the extension as its
    stem unless its outputs would share a name with another's (compared case-insensitively, as macOS and Windows
    do). Then the first of those (images first, in the order given) keeps it, and each later one appends its
    extension, then _2, _3, ...: a.jpg, a.png -> a, a_png.

    Returns:
        (image stems, video stems) in the order of `image_names`, `video_names`.
    """
    files = [(name, False) for name in image_names] + [(name, True) for name in video_names]
    plain = [_claims(*os.path.splitext(name), is_video, save_txt) for name, is_video in files]
    owners, probers = collections.Counter(), collections.Counter()
    for owns, probes in plain:
        owners.update(owns)
        probers.update(probes)
    taken, taken_probes, stems = {"predictions.json"}, set(), [None] * len(files)
    for i, (owns, probes) in enumerate(plain):  # a name no other file's outputs share stays as it is
        if all(owners[k] == 1 and not probers[k] for k in owns) and not any(owners[k] for k in probes) \
                and _free(owns, probes, taken, ()):
            stems[i] = os.path.splitext(files[i][0])[0]
            taken |= owns
            taken_probes |= probes
    for i in (i for i, stem in enumerate(stems) if stem is None):
        name, is_video = files[i]
        for number, candidate in enumerate(_stem_candidates(*os.path.splitext(name))):
            owns, probes = _claims(candidate, os.path.splitext(name)[1], is_video, save_txt)
            # A suffixed stem also avoids every file's own name, so it never takes one a later file keeps.
            if _free(owns, probes, taken, taken_probes) and (number == 0 or _free(owns, probes, owners, probers)):
                break
        stems[i] = candidate
        taken |= owns
        taken_probes |= probes
    return stems[:len(image_names)], stems[len(image_names):]


def _free(owns, probes, owned, probed):
    """Whether outputs `owns` (and frame labels `probes`) clash with none of `owned` (and `probed`)."""
    return not any(k in owned or k in probed for k in owns) and not any(k in owned for k in probes)


def _stem_candidates(stem, extension):
    yield stem
    yield f"{stem}_{extension[1:]}"
    for number in itertools.count(2):
        yield f"{stem}_{extension[1:]}_{number}"


def _claims(stem, extension, is_video, save_txt):
    """(outputs a file with this stem owns, frame labels its label file could be mistaken for), case-folded; a
    video's frame labels are the one pattern labels/STEM_#, which labels/a_3.txt of an image falls under."""
    stem = stem.replace(os.sep, "/").casefold()
    if is_video:
        return {f"{stem}.mp4", f"{stem}.json"} | ({f"labels/{stem}_#"} if save_txt else set()), set()
    if not save_txt:
        return {stem + extension.casefold()}, set()
    prefix, _, frame = stem.rpartition("_")
    probes = {f"labels/{prefix}_#"} if prefix and frame.isascii() and frame.isdigit() else set()
    return {stem + extension.casefold(), f"labels/{stem}.txt"}, probes


def numbered_dir(path, exist_ok=False):
    """`path`, or path-2, path-3, ... the first that does not exist, so a run never overwrites another's output
    (YOLO's increment_path); with `exist_ok`, `path` itself. Only named here: the first file written makes it, so a
    run that fails before writing leaves no empty folder (issue #24)."""
    path = os.path.normpath(path)
    candidate, number = path, 1
    while not exist_ok and os.path.exists(candidate):
        number += 1
        candidate = f"{path}-{number}"
    return candidate


class ImageFiles(torch.utils.data.Dataset):
    """(index, image_io.DecodedImage or None, error message or None) per path; bad files do not raise. A JPEG
    at least twice `min_side` is decoded reduced (decode_image); None decodes every image in full."""

    def __init__(self, paths, min_side=None):
        self.paths, self.min_side = paths, min_side

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, decode_image(self.paths[index], self.min_side), None
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
            return index, None, str(error).splitlines()[0] if str(error) else type(error).__name__


def coco_ids(ann_path, paths, class_names):
    """Category ids (by class name, case-insensitive) and image ids (by file) from a COCO file, and its ground truth.

    An image matches the entry whose ``file_name`` is the longest tail of its path (``DIR/a/0001.png`` is
    ``a/0001.png``, not ``b/0001.png``); a file whose tail matches no entry but whose base name matches
    several is an error naming them, never a silent pick.

    Returns:
        (COCO ground truth of the matched images as training cleans it, see evaluate.ground_truth_coco;
        category_ids in class order; image_ids in `paths` order).
    """
    try:  # a COCO JSON's own image root does not matter here: images are matched by their paths
        data, _, _ = read_annotations(ann_path, image_root=os.path.dirname(os.path.abspath(paths[0])))
        coco = index_coco(data, ann_path)
    except (FileNotFoundError, ValueError) as error:
        raise PredictError(f"--ann: {error}") from None
    by_name = {}
    for category in coco.loadCats(coco.getCatIds()):
        by_name.setdefault(category["name"].lower(), []).append(category["id"])
    category_ids = []
    for name in class_names:
        ids = by_name.get(str(name).lower(), [])
        if not ids:
            raise PredictError(f"class {name!r} of the checkpoint is not in --ann {ann_path}; its categories: "
                               f"{', '.join(c['name'] for c in coco.loadCats(coco.getCatIds()))}")
        if len(ids) > 1:
            raise PredictError(f"class {name!r} matches several categories of --ann {ann_path}: ids {ids}")
        category_ids.append(ids[0])
    by_base = {}
    for image in coco.dataset["images"]:
        file_name = posixpath.normpath(image["file_name"].replace("\\", "/"))
        by_base.setdefault(os.path.basename(file_name), []).append((file_name, image["id"]))
    image_ids, missing = [], []
    for path in paths:
        image_id = _match_image(os.path.abspath(path).replace(os.sep, "/"), by_base, ann_path)
        (missing.append(path) if image_id is None else image_ids.append(image_id))
    if missing:
        raise PredictError(f"{len(missing)}/{len(paths)} images are not in --ann {ann_path} (e.g. "
                           f"{', '.join(missing[:3])}); pass a --source that holds only its images")
    # Scored against the boxes as training sees them: clipped to the image, dropped ones left out, EXIF-turned
    # (issue #24). The dataset reads the matched entries, each pointing at the file it matched.
    path_of = {}
    for path, image_id in zip(paths, image_ids):
        path_of.setdefault(image_id, os.path.abspath(path))
    matched = {"images": [dict(image, file_name=path_of[image["id"]]) for image in coco.dataset["images"]
                          if image["id"] in path_of],
               "annotations": [dict(ann) for ann in coco.dataset["annotations"] if ann["image_id"] in path_of],
               "categories": coco.dataset["categories"], "info": {"source": str(ann_path)}}
    from dataset_coco import CocoDetectionDataset  # with --ann only: predict's cold start skips torchvision
    try:
        dataset = CocoDetectionDataset(matched, os.path.dirname(path_of[image_ids[0]]), classes=list(class_names))
    except (FileNotFoundError, ValueError) as error:
        raise PredictError(f"--ann: {error}") from None
    return ground_truth_coco(dataset), category_ids, image_ids


def _match_image(path, by_base, ann_path):
    """The id of the entry whose file_name is the longest tail of `path`; a unique base name otherwise."""
    candidates = by_base.get(os.path.basename(path), [])
    tails = [(len(name), image_id) for name, image_id in candidates if path == name or path.endswith("/" + name)]
    if tails:
        return max(tails)[1]
    if len(candidates) > 1:
        raise PredictError(f"{path} matches several images of --ann {ann_path} by name "
                           f"({', '.join(name for name, _ in candidates[:4])}); pass --source as the folder the "
                           f"file_name entries are relative to")
    return candidates[0][1] if candidates else None


# ---------------------------------------------------------------------------------------------- prediction

def predict_images(model, paths, skipped, conf_threshold=None, iou_threshold=None, max_detections=None,
                   batch_size=8, workers=0, progress=True, timings=None, min_side=None):
    """Yield (index, image_io.DecodedImage, CPU result of model.predict) per readable path, in batches with
    a progress bar; unreadable paths are logged and appended to `skipped`. The boxes are in the original image's
    pixels (decoded.size) even where `min_side` (ImageFiles) had a large JPEG decoded reduced. The thresholds go to
    model.predict (None: its defaults). `timings`: None, or a dict that gets the seconds spent waiting for decoded
    images ("decode") and model.predict's phases (evaluate.speed_ms). Paths that fit in one batch are decoded in
    this process: with nothing to overlap, starting `workers` would only delay the first detection."""
    workers = workers if len(paths) > batch_size else 0
    loader = torch.utils.data.DataLoader(ImageFiles(paths, min_side), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    bar = tqdm(loader, desc="predict", unit="batch", disable=not progress, file=sys.stderr)
    timing = {"timings": timings} if timings is not None else {}
    for batch in timed_iter(bar, timings, "decode"):
        for index, _, error in (item for item in batch if item[1] is None):
            logger.warning("skipped unreadable image %s: %s", paths[index], error)
            skipped.append(paths[index])
        batch = [item for item in batch if item[1] is not None]
        if batch:
            results = model.predict([decoded.image for _, decoded, _ in batch], conf_threshold, iou_threshold,
                                    max_detections, **timing)
            for (index, decoded, _), result in zip(batch, results):
                result = to_original_frame(result, decoded.scale, decoded.origin, decoded.size)
                yield index, decoded, {key: value.cpu() for key, value in result.items()}


def predict_video(model, path, save_dir, options, class_names, progress=True, stem=None):
    """Predict every frame of a video; write SAVE_DIR/STEM.mp4 (boxes drawn, the source's frame rate) and
    SAVE_DIR/STEM.json (the detections of every frame), and with options.save_txt a YOLO txt per frame
    (labels/STEM_<frame>.txt). `stem` is the video's from output_stems; default: its base name without extension.

    Returns:
        (frames, detections) counts.
    """
    stem = stem or os.path.splitext(os.path.basename(path))[0]
    container, stream = open_video(path)  # a missing or undecodable file fails here, in one line
    fps, total = video_fps(stream), stream.frames or None
    container.close()
    frames, detections, batch = [], 0, []
    bar = tqdm(total=total, desc=os.path.basename(path), unit="frame", disable=not progress, file=sys.stderr)
    with VideoWriter(os.path.join(save_dir, f"{stem}.mp4"), fps) as writer:
        def flush():
            nonlocal detections
            results = model.predict([frame for _, _, frame in batch], options.conf, options.iou, options.max_det)
            for (index, seconds, frame), result in zip(batch, results):
                result = {key: value.cpu() for key, value in result.items()}
                writer.write(draw(frame, result, class_names))
                frames.append({"frame": index, "time": round(seconds, 4),
                               "detections": results_json(result, f"{stem}#{index}", index + 1,
                                                          list(range(1, len(class_names) + 1)), class_names)})
                if options.save_txt:
                    write_yolo_txt(result, frame.shape[-2:], os.path.join(save_dir, "labels", f"{stem}_{index}.txt"),
                                   options.save_conf)
                detections += len(result["scores"])
            bar.update(len(batch))
            batch.clear()
        for item in read_frames(path):
            batch.append(item)
            if len(batch) == options.batch_size:
                flush()
        if batch:
            flush()
    bar.close()
    write_json_atomic({"video": path, "fps": float(fps), "frames": frames}, os.path.join(save_dir, f"{stem}.json"),
                      indent=None)
    return len(frames), detections


def write_yolo_txt(result, size, path, with_score=False):
    """One `class cx cy w h [score]` line per detection, normalised by the image's (H, W) `size` (YOLO's labels)."""
    height, width = size
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = []
    for box, label, score in zip(result["boxes"].tolist(), result["labels"].tolist(), result["scores"].tolist()):
        x0, y0, x1, y1 = box
        values = [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
        lines.append(" ".join([str(label)] + [f"{v:.6f}" for v in values] + ([f"{score:.5f}"] if with_score else [])))
    with open(path, "w") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))


# ---------------------------------------------------------------------------------------------- outputs

def results_json(result, name, image_id, category_ids, class_names):
    """COCO result dicts of one image, with its file name and the category name added."""
    detections = predictions_to_coco([result], [image_id], category_ids)
    return [{"image_id": d["image_id"], "file_name": name.replace(os.sep, "/"), "category_id": d["category_id"],
             "category_name": class_names[label], "bbox": [round(v, 2) for v in d["bbox"]],
             "score": round(d["score"], 5)}
            for d, label in zip(detections, result["labels"].tolist())]


def draw(image, result, class_names):
    """uint8 (3, H, W) image with boxes and "name score" labels drawn by plots.draw_detections (lines and text
    scale with the image, labels on a filled background), for video frames; draw_picture for saved pictures."""
    if not len(result["labels"]):
        return image
    return pil_to_tensor(draw_picture(image, result, class_names))


def draw_picture(image, result, class_names):
    """draw()'s drawing as a PIL image, which save_image writes without another copy of the photo's pixels."""
    return draw_detections(image, result["boxes"], result["labels"], result["scores"], class_names)


def save_image(image, path):
    """Write a PIL image, or a uint8 (3, H, W) tensor, to `path` (JPEG and WebP at quality 95)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image.permute(1, 2, 0).numpy())
    picture.save(path, **({"quality": 95} if path.lower().endswith((".jpg", ".jpeg", ".webp")) else {}))


def summary_line(name, result, class_names):
    """'name.jpg: 2 square (0.91, 0.88), 1 circle (0.54)', classes by first (highest-scoring) detection."""
    groups = {}
    for label, score in zip(result["labels"].tolist(), result["scores"].tolist()):
        groups.setdefault(label, []).append(score)
    if not groups:
        return f"{name}: no detections"
    return f"{name}: " + ", ".join(f"{len(scores)} {class_names[label]} ({_scores_text(scores)})"
                                   for label, scores in groups.items())


def _scores_text(scores):
    shown = ", ".join(f"{score:.2f}" for score in scores[:SUMMARY_SCORES])
    return shown + (", ..." if len(scores) > SUMMARY_SCORES else "")


def above(result, conf_threshold):
    """The detections of `result` scoring at least `conf_threshold`: a score, or one per class."""
    thresholds = torch.as_tensor(conf_threshold, dtype=result["scores"].dtype)
    keep = result["scores"] >= (thresholds[result["labels"]] if thresholds.dim() else thresholds)
    return {key: value[keep] for key, value in result.items()}


# ---------------------------------------------------------------------------------------------- CLI

def _at_least(minimum):
    """An argparse type: an integer >= `minimum`, else one parser error line, not a traceback later (issue #24)."""
    def integer(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return integer


def _fraction(text):
    """An argparse type: a float in [0, 1] (a score or IoU threshold); nan and inf are errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def get_args_parser():
    defaults = inference_defaults()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="best_model.pth written by training, or an exported .onnx (with its "
                                             "sidecar JSON); with --run, default RUN/best_model.pth")
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"),
                        help="pytorch (BatchNorm fused) or onnxruntime (a .pth is exported first, into onnx_cache/ beside it); "
                             "default: the checkpoint's kind")
    parser.add_argument("--threads", type=_at_least(1), help="CPU threads of PyTorch or ONNX Runtime")
    parser.add_argument("--source", help="an image, a video, a folder of them, or a quoted glob; with --run, default "
                                         "the images the run validated on (scored against their annotations)")
    parser.add_argument("--run", help="a fine-tuning run folder: its best_model.pth, and the images it validated on "
                                      "(the val part of its --train-ann per RUN/split.json, or its --val-ann)")
    parser.add_argument("--conf", type=_fraction, default=None,
                        help=f"score threshold for drawn and saved detections, one for every class (default: "
                             f"the checkpoint's calibrated thresholds, one per class, stored by fine-tuning; else "
                             f"{defaults['conf_threshold']})")
    parser.add_argument("--iou", type=_fraction, default=defaults["iou_threshold"],
                        help="NMS IoU threshold (default: %(default)s)")
    parser.add_argument("--max-det", type=_at_least(1), default=defaults["max_detections"],
                        help="detections kept per image (default: %(default)s)")
    parser.add_argument("--save-dir", default="predictions",
                        help="output folder; when it exists, the next free SAVE_DIR-2, SAVE_DIR-3, ...")
    parser.add_argument("--exist-ok", action="store_true", help="write into --save-dir even when it exists")
    parser.add_argument("--save-txt", action="store_true",
                        help="also write YOLO txt labels, labels/NAME.txt (a file whose label would collide with "
                             "another's, e.g. a.png beside a.jpg, is named with its extension: labels/a_png.txt)")
    parser.add_argument("--save-conf", action="store_true", help="with --save-txt: the score as a sixth field")
    parser.add_argument("--no-save", dest="save", action="store_false",
                        help="write no drawn images, only predictions.json (and --save-txt labels); a large JPEG is "
                             "then decoded at about the network's input size, several times faster")
    parser.add_argument("--ann", default=None, help="annotations of the source images (COCO JSON, VOC folder, YOLO "
                                                    "labels): ids and evaluation")
    parser.add_argument("--batch-size", type=_at_least(1), default=8, help="images per forward pass")
    parser.add_argument("--workers", type=_at_least(0), default=2,
                        help="image-decoding worker processes (0: main process; a source that fits in one batch "
                             "is decoded in the main process)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device, e.g. cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the (BatchNorm-fused) network: faster once compiled, but compiling "
                             "takes a while, so it pays off on large folders (README: Speed on a CPU)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def _load(args):
    """The detector of --checkpoint on --backend (a .pth in ONNX Runtime is exported first, into onnx_cache/ beside
    it)."""
    try:
        return load_detector(args.checkpoint, args.backend, args.device, args.threads)
    except (ModelLoadError, FileNotFoundError) as error:  # already says what is wrong
        raise PredictError(f"cannot load --checkpoint {args.checkpoint}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # torch.load on a non-checkpoint raises KeyError, UnpicklingError, EOFError, ...
        raise PredictError(f"cannot load --checkpoint {args.checkpoint}: {type(error).__name__}: "
                           f"{(str(error) or '?').splitlines()[0]}") from None


def _run_sources(args):
    """--run without --source: the run's validation images (exactly those it validated on, runs.run_data), with
    --ann defaulting to their annotations so that they are also scored. Returns their paths."""
    import runs
    try:
        val = runs.run_data(args.run)["val"]
    except ValueError as error:
        raise PredictError(f"--run: {error}") from None
    if not val["images"]:
        raise PredictError(f"--run: none of the images of {val['source']} is on disk")
    if args.ann is None and val["ann"] is not None:
        args.ann = val["ann"]  # the matched images only are scored: predict_folder -> coco_ids
    elif args.ann is None:
        logger.info("not scored here (no one annotation file holds them); evaluate.py --run %s scores them", args.run)
    print(f"--source: {val['source']}: {len(val['images'])} images")
    return val["images"]


def main(argv=None):
    """Predict, draw, write predictions.json (images) and NAME.mp4 / NAME.json (videos), optionally evaluate.

    Returns:
        dict with "images" (predicted), "skipped" (unreadable paths), "detections" (saved at --conf), "videos"
        ({path: {"frames", "detections"}}), "save_dir", "predictions_json", "speed_ms" (milliseconds per image
        of the images, not videos: {"preprocess" (with decoding), "network", "postprocess"}, evaluate.speed_ms;
        None without images) and, with --ann, "metrics".
    """
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.run is not None:
        from runs import best_checkpoint, is_run_dir
        if not is_run_dir(args.run):
            raise PredictError(f"--run {args.run} is not a training run folder (no config.json naming its data)"
                               if os.path.isdir(args.run) else f"--run not found: {args.run}")
        args.checkpoint = args.checkpoint or best_checkpoint(args.run)
    elif args.checkpoint is None or args.source is None:
        raise PredictError("--checkpoint and --source are required (or --run RUN_DIR, which defaults them to the "
                           "run's best_model.pth and the images it validated on)")
    if not os.path.isfile(args.checkpoint):  # before --source is scanned: both inputs are checked up front
        raise PredictError(f"--checkpoint not found: {args.checkpoint}")
    if args.source is None:
        paths, videos, video_names = _run_sources(args), [], []
        names = _relative_names(paths)
    else:
        paths, names, videos, video_names = find_sources(args.source)
    image_stems, video_stems = output_stems(names, video_names, args.save_txt)
    for video in videos:  # a missing or undecodable video stops the run before anything is written
        open_video(video)[0].close()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args)
    save_dir = numbered_dir(args.save_dir, args.exist_ok)  # made by the first file written
    if args.compile:
        if not hasattr(model, "compile"):
            raise PredictError("--compile is for the PyTorch backend; ONNX Runtime optimises its graph itself")
        model.compile()  # nn.Module.compile: predict()'s self(...) runs the compiled forward
    class_names = list(model.class_names)
    if args.conf is None:
        args.conf = detection_settings(model)[0]  # the checkpoint's calibrated thresholds, one per class
        logger.info("score threshold %s (the checkpoint's%s; --conf overrides it)", threshold_text(args.conf),
                    f", per class: {', '.join(class_names)}" if isinstance(args.conf, list) else "")
    summary = {"images": 0, "skipped": [], "detections": 0, "videos": {}, "save_dir": save_dir,
               "predictions_json": None, "speed_ms": None}
    timings = {}
    if paths:
        summary.update(predict_folder(model, paths, names, image_stems, save_dir, args, class_names, timings))
    for video, stem in zip(videos, video_stems):
        frames, detections = predict_video(model, video, save_dir, args, class_names, args.progress, stem)
        summary["videos"][video] = {"frames": frames, "detections": detections}
        print(f"{video}: {frames} frames, {detections} detections at conf >= {threshold_text(args.conf)}: "
              f"{os.path.join(save_dir, stem)}.mp4 and .json")
    if paths:  # the last line, as Ultralytics' "Speed:"
        summary["speed_ms"] = speed_ms(timings)
        print(speed_line(timings))
    return summary


def predict_folder(model, paths, names, stems, save_dir, args, class_names, timings=None):
    """The images of a run: drawn copies (STEM.EXT), predictions.json (file_name: the name), YOLO txt labels
    (labels/STEM.txt), and the scores against --ann; `stems` from output_stems, `timings` as predict_images."""
    if args.ann:
        coco, category_ids, image_ids = coco_ids(args.ann, paths, class_names)
    else:
        coco, category_ids, image_ids = None, list(range(1, len(class_names) + 1)), list(range(1, len(paths) + 1))
    # With --ann, detections down to COCO's 0.001 are kept for mAP, so it equals evaluate.py's; the
    # drawings and predictions.json keep those above --conf.
    predict_conf = min(lowest_threshold(args.conf), MAP_SCORE_THRESHOLD) if args.ann else args.conf
    saved, all_detections, predicted, skipped = [], [], [], []
    # A drawing is of the photo's own size, as Ultralytics saves it, so it needs the full decode; without one, a
    # large JPEG is decoded at about the network's input size (issue #27).
    images = predict_images(model, paths, skipped, predict_conf, args.iou, args.max_det, args.batch_size,
                            args.workers, args.progress, timings, min_side=None if args.save else model.img_size)
    for index, decoded, result in images:
        all_detections += predictions_to_coco([result], [image_ids[index]], category_ids)
        result = above(result, args.conf)
        saved += results_json(result, names[index], image_ids[index], category_ids, class_names)
        if args.save:
            save_image(draw_picture(decoded.image, result, class_names),
                       os.path.join(save_dir, stems[index] + os.path.splitext(names[index])[1]))
        if args.save_txt:
            write_yolo_txt(result, decoded.size, os.path.join(save_dir, "labels", stems[index] + ".txt"),
                           args.save_conf)
        tqdm.write(summary_line(names[index], result, class_names))
        predicted.append(index)
    if not predicted:
        raise PredictError(f"none of the {len(paths)} images of --source {args.source} could be read "
                           f"(e.g. {skipped[0]})")
    json_path = os.path.join(save_dir, "predictions.json")
    write_json_atomic(saved, json_path, indent=None)
    print(f"{len(predicted)} images, {len(saved)} detections at conf >= {threshold_text(args.conf)}"
          f"{f', {len(skipped)} unreadable skipped' if skipped else ''}: "
          f"{'drawn images and ' if args.save else ''}{json_path}")
    result = {"images": len(predicted), "skipped": skipped, "detections": len(saved), "predictions_json": json_path}
    if coco is not None:
        print(f"evaluation against {args.ann}: mAP over the {len(all_detections)} detections with score >= "
              f"{MAP_SCORE_THRESHOLD:g} (as evaluate.py), precision/recall/F1 at --conf {threshold_text(args.conf)}")
        result["metrics"] = coco_metrics(coco, all_detections, [image_ids[i] for i in predicted], category_ids,
                                         class_names, args.conf, args.conf)
        print(format_metrics(result["metrics"]))
    return result


def run():
    """Command-line entry: bad input is one line on stderr and exit status 2, not a traceback."""
    run_cli(main, None, bad_input=(PredictError, VideoError))


if __name__ == "__main__":
    run()
