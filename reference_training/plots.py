"""PNG plots of a run: loss curves, metric curves, confusion matrix, 2-D embedding of features."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import runfiles


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_epoch_axes(ax, title: str, ylabel: str, fontsize: int = 9) -> None:  # type: ignore[no-untyped-def]
    """Title, an integer epoch x axis, ``ylabel``, a light grid and a small legend."""
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_curves(history: list[dict[str, float]], out_dir: Path) -> None:
    """``losses.png`` (training losses per epoch) and ``metrics.png`` (val/test curves of the
    student, solid, and of the mean teacher, dashed, where the run has one)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    loss_keys = [k for k in history[0] if k.startswith("train_")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in loss_keys:
        ax.plot(epochs, [row[key] for row in history], label=key[len("train_"):])
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / runfiles.LOSSES_PLOT, dpi=100)
    plt.close(fig)
    metrics = ("auc", "accuracy", "balanced_accuracy", "f1")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
    for ax, metric in zip(axes, metrics, strict=False):
        for who, style in (("", "-"), ("teacher_", "--")):
            for part, color in (("val", "C0"), ("test", "C1")):
                key = f"{who}{part}_{metric}"
                if key in history[0]:
                    ax.plot(epochs, [row.get(key, float("nan")) for row in history], style,
                            color=color, label=f"{who.rstrip('_') or 'student'} {part}")
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / runfiles.METRICS_PLOT, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: tuple[str, ...], path: Path) -> None:
    """The confusion matrix with counts in the cells."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(classes), 1 + 0.6 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_embedding(features: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                   path: Path, method: str = "pca", seed: int = 0) -> None:
    """Student features ``f`` projected to 2-D (PCA, or t-SNE), coloured by class."""
    plt = _pyplot()
    if method == "tsne" and len(features) > 5:
        from sklearn.manifold import TSNE

        points = TSNE(2, random_state=seed,
                      perplexity=min(30.0, len(features) / 4)).fit_transform(features)
    else:
        from sklearn.decomposition import PCA

        points = PCA(2, random_state=seed).fit_transform(features)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c, name in enumerate(classes):
        mask = labels == c
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=6, label=name)
    ax.legend(markerscale=2, fontsize=7)
    ax.set_title(f"student features f ({method.upper()})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_method_curves(curves: dict[str, list[list[dict[str, float]]]], part: str,
                       metrics: tuple[str, ...], path: Path, title: str = "") -> None:
    """Per-epoch ``part`` metrics of several methods: the mean over each method's runs (line)
    and their range (band). ``curves`` maps a label to its runs' ``metrics.csv`` rows."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        key = f"{part}_{metric}"
        for label, runs in curves.items():
            length = min(len(rows) for rows in runs)
            values = np.array([[100 * float(r[key]) for r in rows[:length]] for rows in runs])
            epochs = [int(float(r["epoch"])) for r in runs[0][:length]]
            line, = ax.plot(epochs, values.mean(0), label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(),
                                alpha=0.15)
        ax.set_title(f"{part} {metric} (%)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
