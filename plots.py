"""results.png: a training run at a glance, rewritten after every evaluation (both scripts).

Three panels: the loss terms per epoch; val mAP50 and mAP per epoch; the precision-recall curve at IoU 0.5 of the
best epoch, with the calibrated score threshold (the one predict() defaults to) marked. Fine-tuning's stage
boundaries are dashed in the first two.
"""
import logging
import math

logger = logging.getLogger(__name__)


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


def plot_results(rows, summary, path, title):
    """Write the three panels of a run's metrics.csv `rows` and its `summary` (best epoch, pr curve, threshold)."""
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
    plot_pr_curve(axes[2], summary)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pr_curve(ax, summary):
    curve, threshold = summary.get("best_pr_curve") or {}, summary.get("conf_threshold")
    if curve.get("recall"):
        ax.plot(curve["recall"], curve["precision"], color="tab:purple")
        metrics = summary.get("best_metrics", {})
        if threshold is not None and metrics.get("best_f1", 0) > 0:
            ax.plot([metrics["best_f1_recall"]], [metrics["best_f1_precision"]], "o", color="tab:red",
                    label=f"threshold {threshold:.2f}: P {metrics['best_f1_precision']:.2f}, "
                          f"R {metrics['best_f1_recall']:.2f}")
            ax.legend(fontsize=8, loc="lower left")
    ax.set(title=f"precision-recall at IoU 0.5, epoch {summary.get('best_epoch', '-')}", xlabel="recall",
           ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
