"""The mean teacher's BatchNorm setting on a small model trained from scratch, in seconds.

A user's first loop, made reproducible: scikit-learn's 8x8 digits (shipped with it, no
download), made imbalanced (classes 5-9 kept at one in four), a small CNN with BatchNorm and
dropout trained from scratch, a ``WeightedRandomSampler`` with replacement (so bank indices
repeat), two noisy views per image, and the README's loop. For each ``EMATeacher`` setting it
trains the baseline (cross-entropy only), MT (+ consistency) and CRCKD (+ CCD and CRP), and
scores student and teacher on a held-out validation part after every epoch.

    python reference_training/studies/teacher_digits.py --out docs/teacher_runs/digits

writes ``table.md`` (balanced accuracy on validation, mean of the last 5 epochs, per seed and
mean) and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from crckd_losses import CRCKDLoss, EMATeacher, IndexedDataset
from crckd_losses.functional import consistency_kl, sigmoid_rampup

SETTINGS = {  # name: (buffers, train_mode)
    "copy-eval": ("copy", False),
    "average-eval": ("average", False),
    "own-train": ("leave", True),
}


class _Views(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Two independently noised views of each image, and its label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.images[i]
        return x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x), self.labels[i]


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU blocks, pooling, dropout, a 128-d feature and a classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        )
        self.feature = nn.Linear(32, 128)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.feature(self.body(x))
        return f, self.classifier(f)


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Imbalanced digits, 80/20 train/validation: ``(x_train, y_train, x_val, y_val)``."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    keep = torch.tensor([i for i in range(len(y)) if y[i] < 5 or i % 4 == 0])
    x, y = x[keep], y[keep]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def balanced_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int = 10) -> float:
    pred = logits.argmax(1)
    recalls = [float((pred[y == c] == c).float().mean()) for c in range(num_classes)
               if bool((y == c).any())]
    return sum(recalls) / len(recalls)


def train_one(method: str, setting: str, seed: int, epochs: int) -> list[dict[str, float]]:
    """Per-epoch validation balanced accuracy of the student (and of the teacher)."""
    x_tr, y_tr, x_val, y_val = load_digits_split()
    torch.manual_seed(seed)
    student = SmallCNN()
    counts = torch.bincount(y_tr, minlength=10).float()
    class_weights = counts.sum() / counts
    sampler = WeightedRandomSampler((1.0 / counts)[y_tr], num_samples=len(y_tr),
                                    replacement=True)
    loader = DataLoader(IndexedDataset(_Views(x_tr, y_tr)), batch_size=64, sampler=sampler,
                        drop_last=True)
    teacher = None
    if method != "baseline":
        buffers, train_mode = SETTINGS[setting]
        teacher = EMATeacher(student, decay=0.99, buffers=buffers,  # type: ignore[arg-type]
                             train_mode=train_mode)
    crckd = None
    if method == "crckd":
        negatives = min(4096, len(y_tr) - int(torch.bincount(y_tr).max()))
        crckd = CRCKDLoss(y_tr, 128, 128, num_negatives=negatives)
    params = [*student.parameters(), *(crckd.parameters() if crckd else [])]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    history = []
    for epoch in range(epochs):
        for x_s, x_t, y, idx in loader:
            f_s, logits_s = student(x_s)
            loss = F.cross_entropy(logits_s, y, weight=class_weights)
            if teacher is not None:
                with torch.no_grad():
                    f_t, logits_t = teacher(x_t)
                loss = loss + sigmoid_rampup(epoch, epochs / 4) * consistency_kl(logits_s, logits_t)
                if crckd is not None:
                    loss = loss + crckd(f_s, f_t, idx).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if teacher is not None:
                teacher.update(student)
        student.eval()
        with torch.no_grad():
            row = {"epoch": epoch + 1, "student": balanced_accuracy(student(x_val)[1], y_val)}
            if teacher is not None:  # evaluated as it teaches, in its own mode
                row["teacher"] = balanced_accuracy(teacher(x_val)[1], y_val)
        student.train()
        history.append(row)
    return history


def _last(history: list[dict[str, float]], key: str, n: int) -> float:
    return statistics.mean(r[key] for r in history[-n:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/teacher_digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--last", type=int, default=5, help="epochs averaged in the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    grid = [("baseline", "-")] + [(m, s) for m in ("mt", "crckd") for s in SETTINGS]
    for method, setting in grid:
        for seed in args.seeds:
            key = f"{method}/{setting}/{seed}"
            runs[key] = train_one(method, setting, seed, args.epochs)
            print(key, {k: round(_last(runs[key], k, args.last), 3)
                        for k in runs[key][-1] if k != "epoch"}, flush=True)
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    lines = [
        f"Validation balanced accuracy (%), mean of the last {args.last} of {args.epochs} "
        f"epochs; seeds {', '.join(map(str, args.seeds))}. "
        "`python reference_training/studies/teacher_digits.py`.", "",
        "| method | teacher | student (per seed) | student mean | teacher (per seed) "
        "| teacher mean |",
        "|---|---|---|---:|---|---:|",
    ]
    for method, setting in grid:
        student = [100 * _last(runs[f"{method}/{setting}/{s}"], "student", args.last)
                   for s in args.seeds]
        cells = [method, setting, " / ".join(f"{v:.1f}" for v in student),
                 f"{statistics.mean(student):.1f}"]
        if method == "baseline":
            cells += ["-", "-"]
        else:
            teacher = [100 * _last(runs[f"{method}/{setting}/{s}"], "teacher", args.last)
                       for s in args.seeds]
            cells += [" / ".join(f"{v:.1f}" for v in teacher), f"{statistics.mean(teacher):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(runs, grid, args.seeds, out / "curves.png")


def _plot(runs: dict[str, Any], grid: list[tuple[str, str]], seeds: list[int],
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = {"copy-eval": "tab:red", "average-eval": "tab:blue", "own-train": "tab:green"}
    for ax, method in zip(axes, ("mt", "crckd")):
        base = [runs[f"baseline/-/{s}"] for s in seeds]
        epochs = [r["epoch"] for r in base[0]]
        ax.plot(epochs, [100 * statistics.mean(h[i]["student"] for h in base)
                         for i in range(len(epochs))], color="black", label="baseline")
        for setting, colour in colours.items():
            hist = [runs[f"{method}/{setting}/{s}"] for s in seeds]
            for key, style in (("student", "--"), ("teacher", "-")):
                ax.plot(epochs, [100 * statistics.mean(h[i][key] for h in hist)
                                 for i in range(len(epochs))], style, color=colour,
                        label=f"{setting} {key}")
        ax.set_title(f"{method.upper()}: teacher (solid) and student (dashed)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation balanced accuracy (%), mean over seeds")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
