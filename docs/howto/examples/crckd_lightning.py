"""CRCKD in a PyTorch Lightning module: the student, the mean teacher and CRCKDLoss in
Lightning's hooks, with checkpoints that resume exactly.

Run it: ``python crckd_lightning.py OUT_DIR`` (two epochs on random images, CPU); again
with ``--resume`` to continue from ``OUT_DIR/last.ckpt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from crckd_losses import CRCKDLoss, EMATeacher, IndexedDataset
from crckd_losses.functional import consistency_kl, sigmoid_rampup


class TwoViews(Dataset):
    """``(view 1, view 2, label)``: two random augmentations of one image, for the student
    and the teacher (wrap it in ``IndexedDataset`` for the bank rows). The views of image
    ``i`` are drawn from the seed ``first_seed + i``, whichever worker draws them and
    when."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: nn.Module,
        first_seed: int,
    ) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.first_seed = first_seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
            torch.manual_seed(self.first_seed + i)
            image = self.images[i]
            return self.augment(image), self.augment(image), self.labels[i]


class TwoViewData(L.LightningDataModule):
    """Each epoch's loader, rebuilt by Lightning at every epoch
    (``reload_dataloaders_every_n_epochs=1``): its order and views follow from (seed,
    epoch). Lightning starts the first epoch of a run, a resumed one too, before the
    epoch's hooks, so nothing the loader draws may depend on the state of a random
    generator."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: nn.Module,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.images, self.labels, self.augment = images, labels, augment
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def train_dataloader(self) -> DataLoader:
        epoch, n = self.trainer.current_epoch, len(self.labels)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        views = TwoViews(
            self.images, self.labels, self.augment, (self.seed * 1_000 + epoch) * n
        )
        # generator: the workers' seeds come from it, not from the global generator
        return DataLoader(
            IndexedDataset(views),
            self.batch_size,
            sampler=order,
            drop_last=True,
            num_workers=self.num_workers,
            generator=generator,
        )


class SmallNet(nn.Module):
    """Any backbone will do; CRCKD needs ``(logits [B, C], features [B, feat_dim])``."""

    def __init__(self, num_classes: int, feat_dim: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, feat_dim),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.classifier(features), features


class CRCKDModule(L.LightningModule):
    """Student, mean teacher and CRCKD losses. The teacher and the CRCKD heads, banks and
    ``Z`` are submodules: Lightning's checkpoints hold them (``state_dict``)."""

    def __init__(
        self,
        student: nn.Module,
        train_labels: torch.Tensor,
        feat_dim: int = 32,
        lr: float = 1e-3,
        ema_decay: float = 0.99,
        rampup_epochs: float = 30,
        num_positives: int = 20,
        num_negatives: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "train_labels"])
        self.student = student
        self.teacher = EMATeacher(student, decay=ema_decay)
        self.crckd = CRCKDLoss(
            train_labels,
            feat_dim,
            feat_dim,
            num_positives=num_positives,
            num_negatives=num_negatives,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The CRCKD projection heads learn with the student; the teacher has no gradients.
        params = [*self.student.parameters(), *self.crckd.parameters()]
        return torch.optim.Adam(params, lr=self.hparams.lr)

    def on_train_epoch_start(self) -> None:
        # The steps' random draws (CRCKD's bank rows, dropout) follow from (seed, epoch):
        # a run resumed from an epoch's checkpoint draws what the unbroken run drew.
        torch.manual_seed(self.hparams.seed + self.current_epoch)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        view_1, view_2, labels, indices = batch  # IndexedDataset appends the bank rows
        logits_s, f_s = self.student(view_1)
        with torch.no_grad():
            logits_t, f_t = self.teacher(view_2)
        crckd = self.crckd(f_s, f_t, indices)
        kl_weight = sigmoid_rampup(self.current_epoch, self.hparams.rampup_epochs)
        loss = (
            F.cross_entropy(logits_s, labels)
            + kl_weight * consistency_kl(logits_s, logits_t)
            + crckd.loss
        )
        self.log_dict({"loss": loss, "ccd": crckd.ccd, "crp": crckd.crp}, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().optimizer_step(*args, **kwargs)
        self.teacher.update(self.student)  # after each optimiser step, as the method says


def random_images(
    num_images: int = 48, num_classes: int = 3, size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in data: ``[N, 3, S, S]`` float images whose brightness follows the class."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(num_images) % num_classes
    noise = torch.rand(num_images, 3, size, size, generator=generator)
    return (0.5 * noise + 0.25 * labels[:, None, None, None]).clamp(0, 1), labels


def fit(
    out_dir: Path,
    epochs: int = 2,
    resume: bool = False,
    callbacks: list[L.Callback] | None = None,
) -> CRCKDModule:
    """Trains (or, with ``resume``, continues from ``out_dir/last.ckpt``) up to
    ``epochs``."""
    images, labels = random_images()
    augment = v2.Compose(
        [v2.RandomHorizontalFlip(), v2.RandomResizedCrop(16, (0.7, 1.0))]
    )
    data = TwoViewData(images, labels, augment, batch_size=8)
    torch.manual_seed(0)  # the same initial weights and banks in every session
    module = CRCKDModule(
        SmallNet(num_classes=3), labels, num_positives=4, num_negatives=16
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=out_dir,
        logger=False,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[ModelCheckpoint(dirpath=out_dir, save_last=True), *(callbacks or [])],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        module, datamodule=data, ckpt_path=out_dir / "last.ckpt" if resume else None
    )
    return module


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    fit(args.out_dir, args.epochs, args.resume)
