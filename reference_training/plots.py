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


# The student's metrics drawn per epoch, in percent as the printed tables show them.
CURVE_METRICS = {"auc": "AUC", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                 "f1": "macro F1"}
# Losses on a scale of their own get a panel of their own: CCD (L_S + L_T, before its weight of
# 0.1) is about 13 at the paper's K, the other losses about 1.
OWN_PANEL_LOSSES = ("ccd",)


def _save(fig, path: Path) -> None:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def losses_figure(history: list[dict[str, float]], title: str = ""):  # type: ignore[no-untyped-def]
    """The training losses per epoch: those near 1 in one panel, CCD in its own."""
    epochs = [row["epoch"] for row in history]
    keys = [k[len("train_"):] for k in history[0] if k.startswith("train_")]
    panels = [[k for k in keys if k not in OWN_PANEL_LOSSES]]
    panels += [[k] for k in keys if k in OWN_PANEL_LOSSES]
    panels = [keys for keys in panels if keys]
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, keys in zip(axes[0], panels, strict=True):
        for key in keys:
            ax.plot(epochs, [row[f"train_{key}"] for row in history], label=key)
        own = keys[0] in OWN_PANEL_LOSSES
        label_epoch_axes(ax, f"{keys[0]} (unweighted, own scale)" if own else "training losses",
                         "mean over the epoch's steps")
    fig.suptitle(f"{title}: training losses" if title else "training losses")
    return fig


def metrics_figure(history: list[dict[str, float]], title: str = ""):  # type: ignore[no-untyped-def]
    """Validation and test metrics per epoch, in %: the student solid, its mean teacher
    dashed (where the run has one)."""
    epochs = [row["epoch"] for row in history]
    fig, axes = _pyplot().subplots(1, len(CURVE_METRICS), figsize=(4 * len(CURVE_METRICS), 3.6))
    for ax, (metric, name) in zip(axes, CURVE_METRICS.items(), strict=True):
        for who, style in (("", "-"), ("teacher_", "--")):
            for part, color in (("val", "C0"), ("test", "C1")):
                key = f"{who}{part}_{metric}"
                if key in history[0]:
                    values = [100 * row.get(key, float("nan")) for row in history]
                    ax.plot(epochs, values, style, color=color,
                            label=f"{who.rstrip('_') or 'student'} {part}")
        label_epoch_axes(ax, name, "%")
    fig.suptitle(f"{title}: metrics" if title else "metrics")
    return fig


def plot_curves(history: list[dict[str, float]], out_dir: Path, title: str = "") -> None:
    """``losses.png`` (:func:`losses_figure`) and ``metrics.png`` (:func:`metrics_figure`),
    each titled ``title`` (the run)."""
    _save(losses_figure(history, title), out_dir / runfiles.LOSSES_PLOT)
    _save(metrics_figure(history, title), out_dir / runfiles.METRICS_PLOT)


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
    _save(fig, path)


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
    _save(fig, path)


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
    _save(fig, path)
