"""CRCKD in a MONAI workflow: a 2-D ``DenseNet121``, MONAI's dictionary transforms and
``Dataset``, the two views made by MONAI's random transforms, and a checkpoint per epoch
from which a stopped run continues exactly.

Run it: ``python crckd_monai.py OUT_DIR`` (two epochs on random images, CPU); run it again
with more ``--epochs`` and it continues from ``OUT_DIR/last.pt``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.networks.nets import DenseNet121
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureTyped,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    ScaleIntensityd,
)
from torch import nn

from crckd_losses import CRCKDLoss, EMATeacher, IndexedDataset
from crckd_losses.functional import consistency_kl, sigmoid_rampup


def random_view(key: str) -> list:
    """MONAI random transforms for one view; each view gets its own, so the two differ."""
    return [
        RandFlipd(keys=key, prob=0.5, spatial_axis=1),
        RandRotate90d(keys=key, prob=0.5),
        RandGaussianNoised(keys=key, prob=0.5, std=0.05),
    ]


def two_views() -> Compose:
    """``{"image", "label"}`` to ``{"image", "view_2", "label"}``: the student's and the
    teacher's views of one image. Read files with ``LoadImaged(keys="image")`` first (it
    reads DICOM, NIfTI, PNG, ...)."""
    return Compose(
        [
            ScaleIntensityd(keys="image"),
            CopyItemsd(keys="image", names="view_2"),
            *random_view("image"),
            *random_view("view_2"),
            EnsureTyped(keys=("image", "view_2"), track_meta=False),
        ]
    )


class DenseNetWithFeatures(nn.Module):
    """MONAI's DenseNet121 returning ``(logits, pooled features [B, 1024])``."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.net = DenseNet121(
            spatial_dims=2, in_channels=in_channels, out_channels=num_classes
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.net.class_layers  # relu, pool, flatten, out
        features = head[:-1](self.net.features(x))
        return head[-1](features), features


class Distillation(nn.Module):
    """The student, its mean teacher and the CRCKD losses (heads, banks, ``Z``): one
    ``state_dict`` for the checkpoint."""

    def __init__(
        self,
        train_labels: torch.Tensor,
        num_classes: int,
        num_positives: int = 20,
        num_negatives: int = 4096,
    ) -> None:
        super().__init__()
        self.student = DenseNetWithFeatures(num_classes)
        self.teacher = EMATeacher(self.student, decay=0.99)
        self.crckd = CRCKDLoss(
            train_labels,
            1024,
            1024,
            num_positives=num_positives,
            num_negatives=num_negatives,
        )

    def loss(
        self, batch: dict[str, torch.Tensor], indices: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        logits_s, f_s = self.student(batch["image"])
        with torch.no_grad():
            logits_t, f_t = self.teacher(batch["view_2"])
        crckd = self.crckd(f_s, f_t, indices)
        kl = consistency_kl(logits_s, logits_t)
        return (
            F.cross_entropy(logits_s, batch["label"])
            + sigmoid_rampup(epoch, 30) * kl
            + (crckd.loss)
        )


def random_data(
    num_images: int = 24, num_classes: int = 2, size: int = 32
) -> list[dict[str, object]]:
    """Stand-in for ``[{"image": path, "label": k}, ...]``: ``[1, S, S]`` arrays whose
    brightness follows the class."""
    rng = np.random.default_rng(0)
    return [
        {
            "image": (rng.random((1, size, size)) + i % num_classes).astype(np.float32),
            "label": i % num_classes,
        }
        for i in range(num_images)
    ]


def train(
    out_dir: Path, epochs: int = 2, seed: int = 0
) -> tuple[Distillation, list[float]]:
    """Trains up to ``epochs``, continuing from ``out_dir/last.pt`` when it is there;
    returns the model and the losses of this session's steps."""
    data = random_data()
    labels = torch.tensor([item["label"] for item in data])
    dataset = IndexedDataset(Dataset(data, transform=two_views()))
    torch.manual_seed(seed)
    model = Distillation(labels, num_classes=2, num_positives=4, num_negatives=8)
    params = [*model.student.parameters(), *model.crckd.parameters()]  # not the teacher's
    optimizer = torch.optim.Adam(params, lr=1e-3)
    checkpoint, start, losses = Path(out_dir) / "last.pt", 0, []
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
    for epoch in range(start, epochs):
        # MONAI's DataLoader seeds the random transforms from torch's generator (in each
        # worker too): one seed per epoch fixes the order, the views and CRCKD's draws.
        torch.manual_seed(seed + epoch)
        for batch, indices in DataLoader(
            dataset, batch_size=8, shuffle=True, drop_last=True
        ):
            loss = model.loss(batch, indices, epoch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.teacher.update(model.student)  # after each optimiser step
            losses.append(loss.item())
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
        }
        torch.save(state, checkpoint.with_suffix(".tmp"))
        os.replace(checkpoint.with_suffix(".tmp"), checkpoint)  # never half a checkpoint
    return model, losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    train(args.out_dir, args.epochs)
