"""results.png: a training run at a glance, rewritten after every evaluation (both scripts); confusion_matrix.png
(fine-tuning with two or more classes); and detections drawn on images (predict.py's pictures and videos, the
results of model.predict()).

Three panels: the loss terms per epoch; val mAP50 and mAP per epoch; the precision-recall curve at IoU 0.5 of the
best epoch (pr_curve.csv: every operating point), with the calibrated score threshold (the one predict() defaults
to) marked at its operating point on the curve. Fine-tuning's stage boundaries are dashed in the first two.

Drawn detections stay readable on any photo (issue #26): box lines and label text scale with the image, labels
are "name 0.87" in DejaVu Sans on a filled rectangle of the box's colour, the text black or white, whichever
contrasts more with it. val_predictions.jpg (fine-tuning's best epoch) shows val images as ground truth | predictions
side by side (truth_and_prediction, prediction_grid): people look before they read.
"""
import functools
import logging
import math
import os

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# Saturated colours cycled by class index, none dark or grey, so boxes stand out on foliage, sky, earth and road.
# The first, the colour of a single-class model, is hot pink: green's complement, far from sky and earth too.
PALETTE = ("#FF2D95", "#00E5FF", "#FFD400", "#7CFF1F", "#FF7A00", "#B45CFF", "#00FFA3", "#FF3B3B", "#4D8DFF")


def _numbers(rows, key):
    values = []
    for row in rows:
        try:
            value = float(row.get(key, ""))
        except (TypeError, ValueError):
            value = math.nan
        values.append(value)
    return values


def stage_starts(rows):
    """Epochs at which a new stage begins (none for a one-stage run)."""
    epochs, stages = [int(row["epoch"]) for row in rows], [str(row.get("stage", "")) for row in rows]
    return [epoch for epoch, stage, previous in zip(epochs[1:], stages[1:], stages) if stage != previous]


def plot_results(rows, summary, path, title, pr_curve=None):
    """Write the three panels of a run's metrics.csv `rows`, its `summary` (best epoch, threshold) and the best
    epoch's `pr_curve` ({"recall", "precision", "score"} lists, scores descending; None: no panel curve)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    epochs = [int(row["epoch"]) for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    for key in ("loss", "loss_cls", "loss_box"):
        axes[0].plot(epochs, _numbers(rows, key), marker=".", label=key)
    axes[0].set(title="training loss", xlabel="epoch")
    evaluated = [(e, m50, m) for e, m50, m in zip(epochs, _numbers(rows, "mAP50"), _numbers(rows, "mAP"))
                 if not math.isnan(m50)]
    if evaluated:
        e, m50, m = zip(*evaluated)
        axes[1].plot(e, m50, marker="o", markersize=3, label="mAP50")
        axes[1].plot(e, m, marker="o", markersize=3, label="mAP (0.5:0.95)")
    if summary.get("best_epoch"):
        axes[1].axvline(summary["best_epoch"], color="green", linewidth=0.8, linestyle=":",
                        label=f"best (epoch {summary['best_epoch']})")
    axes[1].set(title="validation", xlabel="epoch", ylim=(0, 1))
    for ax in axes[:2]:
        for epoch in stage_starts(rows):
            ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    plot_pr_curve(axes[2], summary, pr_curve or {})
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def threshold_text(conf_threshold):
    """A score threshold as text: '0.412', or one per class '0.412/0.377' (one number when they are equal)."""
    values = [float(value) for value in np.asarray(conf_threshold, dtype=np.float64).reshape(-1)]
    if len(set(values)) == 1:
        return f"{values[0]:.3f}"
    return "/".join(f"{value:.3f}" for value in values)


def plot_confusion_matrix(matrix, class_names, path, title):
    """Write a confusion matrix ([predicted, true] counts, background last: evaluate.confusion_matrix) as a picture:
    the counts in each cell, the colour the share of the true class's column (what became of each true class),
    as Ultralytics' confusion_matrix.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = np.asarray(matrix, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    names = [str(name) for name in class_names] + ["background"]
    side = min(16.0, 3 + 0.6 * len(names))
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=100)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for row, column in np.ndindex(*counts.shape):
        if counts[row, column]:
            ax.text(column, row, f"{int(counts[row, column])}", ha="center", va="center", fontsize=8,
                    color="white" if shares[row, column] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="true", ylabel="predicted", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def operating_point(curve, threshold):
    """Index of the curve's point that `threshold` selects: the lowest score it keeps ('score >= threshold'), so
    the marked point lies on the curve; None when the threshold keeps no detection."""
    kept = [index for index, score in enumerate(curve.get("score", [])) if score >= threshold]
    return kept[-1] if kept else None


def plot_pr_curve(ax, summary, curve):
    threshold = summary.get("conf_threshold")
    if curve.get("recall"):
        ax.plot(curve["recall"], curve["precision"], color="tab:purple", linewidth=1)
        index = operating_point(curve, threshold) if threshold is not None else None
        if index is not None:
            recall, precision = curve["recall"][index], curve["precision"][index]
            ax.plot([recall], [precision], "o", color="tab:red",
                    label=f"threshold {threshold:.3f}: P {precision:.2f}, R {recall:.2f}")
            ax.annotate(f"{threshold:.3f}", (recall, precision), textcoords="offset points", xytext=(6, 6),
                        fontsize=8, color="tab:red")
            ax.legend(fontsize=8, loc="lower left")
    ax.set(title=f"precision-recall at IoU 0.5, epoch {summary.get('best_epoch', '-')}", xlabel="recall",
           ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------------------------- detections

def line_width(height, width):
    """Box line width in pixels: 0.3 % of the mean side, at least 2 (1-2 px lines vanish on large photos)."""
    return max(2, round(0.003 * (height + width) / 2))


def font_size(height, width):
    """Label font size in pixels: 3 % of the shorter side, at least 11 so that small images stay legible."""
    return max(11, round(0.03 * min(height, width)))


@functools.lru_cache(maxsize=16)
def label_font(size):
    """DejaVu Sans at `size` px, the TrueType font matplotlib (a requirement) bundles; PIL's default font if that
    file is missing."""
    try:
        import matplotlib
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except (ImportError, OSError) as error:
        logger.warning("no DejaVu Sans (%s): labels use PIL's default font", error)
        try:
            return ImageFont.load_default(size)
        except TypeError:  # Pillow < 10.1: one small bitmap font
            return ImageFont.load_default()


def text_colour(colour):
    """Black or white, whichever has the higher WCAG contrast ratio with `colour` (black above relative luminance
    0.179, where the two ratios are equal): the luminance is of linear light, so a bright red gets black."""
    linear = [c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4
              for c in ImageColor.getrgb(colour)[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


def as_picture(image):
    """An RGB PIL image (a copy) of a PIL image, a (3, H, W) or (1, H, W) tensor (uint8, or float in [0, 1], as
    model.predict() takes) or an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "detach"):  # a torch tensor, CHW
        image = image.detach().cpu().numpy()
        image = image.transpose(1, 2, 0) if image.ndim == 3 else image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB")


def draw_detections(image, boxes, labels, scores, class_names=None, colours=None):
    """Draw boxes with "name 0.87" labels, sized for the image (line_width, font_size).

    Args:
        image: what as_picture takes (the image the boxes were predicted on).
        boxes: (N, 4) xyxy in the image's pixels; labels (N,) class indices; scores (N,), or None for ground
            truth (the label is the name alone).
        class_names: name per class index (None: the index).
        colours: a colour per detection (default: PALETTE by class).
    Returns:
        an RGB PIL image, a copy: the input is not changed.
    """
    picture = as_picture(image)
    width, height = picture.size
    scores = [None] * len(labels) if scores is None else scores
    boxes, labels, scores = [v.tolist() if hasattr(v, "tolist") else list(v) for v in (boxes, labels, scores)]
    colours = colours or [PALETTE[int(label) % len(PALETTE)] for label in labels]
    draw = ImageDraw.Draw(picture)
    thickness, font = line_width(height, width), label_font(font_size(height, width))
    order = range(len(boxes) - 1, -1, -1)  # the highest score (first) is drawn last, on top
    for i in order:
        x0, y0, x1, y1 = (round(v) for v in boxes[i])
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colours[i], width=thickness)
    for i in order:
        name = class_names[int(labels[i])] if class_names is not None else str(int(labels[i]))
        text = name if scores[i] is None else f"{name} {scores[i]:.2f}"
        _draw_label(draw, text, boxes[i][:2], colours[i], font, (width, height))
    return picture


TRUTH_COLOUR = "#00C853"  # ground truth is green, whatever its class: the predictions carry the class colours
PANEL_HEIGHT = 480  # px, each image of val_predictions.jpg: eight pairs stay one screenful at 2 pairs a row
GRID_BACKGROUND = (40, 40, 40)


def truth_and_prediction(image, target, prediction, class_names, conf_threshold, height=PANEL_HEIGHT):
    """One image as two panels side by side, resized to `height` px before drawing (so lines and labels are sized
    for what is shown): the ground truth (target "boxes_xyxy", "labels") in green | the prediction's boxes (a
    model.predict result, "boxes", "labels", "scores") in the class colours with scores, each panel titled.

    Returns:
        an RGB PIL image, (2 * the resized width) x `height`.
    """
    picture = as_picture(image)
    scale = height / picture.height
    picture = picture.resize((max(1, round(picture.width * scale)), height), Image.BILINEAR)
    boxes = [[v * scale for v in box] for box in target["boxes_xyxy"].tolist()]
    truth = draw_detections(picture, boxes, target["labels"], None, class_names,
                            colours=[TRUTH_COLOUR] * len(boxes))
    predicted = draw_detections(picture, [[v * scale for v in box] for box in prediction["boxes"].tolist()],
                                prediction["labels"], prediction["scores"], class_names)
    pair = Image.new("RGB", (2 * picture.width, height))
    for x, panel, title in ((0, truth, f"ground truth: {len(boxes)}"),
                            (picture.width, predicted, f"predicted >= {threshold_text(conf_threshold)}: "
                                                       f"{len(prediction['scores'])}")):
        font = label_font(font_size(height, picture.width))
        _draw_label(ImageDraw.Draw(panel), title, (0, 0), "#202020", font, panel.size)
        pair.paste(panel, (x, 0))
    return pair


def prediction_grid(pairs, columns=2, gap=8):
    """truth_and_prediction pictures in a grid, `columns` pairs a row, left-aligned in cells of the widest."""
    cell_width, cell_height = max(p.width for p in pairs), max(p.height for p in pairs)
    rows = math.ceil(len(pairs) / columns)
    columns = min(columns, len(pairs))
    grid = Image.new("RGB", (columns * cell_width + (columns - 1) * gap, rows * cell_height + (rows - 1) * gap),
                     GRID_BACKGROUND)
    for index, pair in enumerate(pairs):
        row, column = divmod(index, columns)
        grid.paste(pair, (column * (cell_width + gap), row * (cell_height + gap)))
    return grid


def _draw_label(draw, text, corner, colour, font, size):
    """A filled label above the box's top-left corner; inside the box where the image's top edge is in the way."""
    pad = max(1, round(font.size / 8)) if hasattr(font, "size") else 1
    text_width = draw.textlength(text, font=font)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (draw.textbbox((0, 0), text, font)[3], 0)
    label_width, label_height = round(text_width) + 2 * pad, ascent + descent + 2 * pad
    x = max(0, min(round(corner[0]), size[0] - label_width))
    y = round(corner[1]) - label_height
    if y < 0:
        y = max(0, round(corner[1]))
    draw.rectangle((x, y, x + label_width - 1, y + label_height - 1), fill=colour)
    draw.text((x + pad, y + pad), text, fill=text_colour(colour), font=font)
