"""The two views of method §2, drawn per sample from ``(seed, epoch, index)`` and applied to a
whole batch on the training device."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # One independent stream per (seed, epoch, sample), via a 64-bit mix of the three.
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def draw_view_params(generator: torch.Generator, teacher: bool, degrees: float = 10.0,
                     translate: float = 0.02) -> torch.Tensor:
    """One view's random parameters (method §2): ``[angle, tx, ty, hflip, vflip, k]``.

    Angle uniform in ±``degrees``; translation uniform in ±``translate`` of the size (as a
    fraction); horizontal flip with p = 0.5. The teacher's view adds a vertical flip
    (p = 0.5) and a rotation by ``k``·90°, ``k`` uniform in {0, 1, 2, 3}; the student's has
    ``vflip = k = 0``.
    """
    u = torch.rand(6, generator=generator, dtype=torch.float64)
    params = torch.stack([
        (2 * u[0] - 1) * degrees,
        (2 * u[1] - 1) * translate,
        (2 * u[2] - 1) * translate,
        (u[3] < 0.5).double(),
        (u[4] < 0.5).double() if teacher else u.new_zeros(()),
        torch.floor(u[5] * 4).clamp_max(3) if teacher else u.new_zeros(()),
    ])
    return params.float()


def view_matrices(params: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 3]`` forward maps of normalised image coordinates for ``[B, 6]`` view params:
    rotate by ``angle`` and translate, then flip horizontally, then vertically, then rotate
    by ``k``·90°."""
    angle = torch.deg2rad(params[:, 0])
    batch = params.shape[0]
    eye = torch.eye(3, dtype=params.dtype, device=params.device).repeat(batch, 1, 1)
    affine = eye.clone()
    affine[:, 0, 0], affine[:, 0, 1] = angle.cos(), -angle.sin()
    affine[:, 1, 0], affine[:, 1, 1] = angle.sin(), angle.cos()
    affine[:, 0, 2], affine[:, 1, 2] = 2 * params[:, 1], 2 * params[:, 2]
    flips = eye.clone()
    flips[:, 0, 0] = 1 - 2 * params[:, 3]
    flips[:, 1, 1] = 1 - 2 * params[:, 4]
    quarter = params[:, 5] * (math.pi / 2)
    turn = eye.clone()
    turn[:, 0, 0], turn[:, 0, 1] = quarter.cos().round(), -quarter.sin().round()
    turn[:, 1, 0], turn[:, 1, 1] = quarter.sin().round(), quarter.cos().round()
    return turn @ flips @ affine


def apply_views(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The augmented views of a batch, in one ``grid_sample``: ``[B, 3, S, S]`` float in
    ``[0, 255]`` (zeros where the affine map leaves the image, as torchvision's fill=0).

    Args:
        images: ``[B, 3, S, S]`` uint8 (square).
        params: ``[B, 6]`` from :func:`draw_view_params`.
    """
    import torch.nn.functional as F

    if torch.is_autocast_enabled(images.device.type):
        with torch.autocast(images.device.type, enabled=False):
            return apply_views(images, params)
    x = images.float()
    # affine_grid maps output coordinates to input ones: the inverse of the forward map.
    theta = torch.linalg.inv(view_matrices(params.to(x.device)))[:, :2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class TwoViewDataset(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Training items ``(image, view params, label)`` from cached uint8 images.

    ``view params`` is ``[2, 6]``: the student's view and the teacher's (see
    :func:`draw_view_params`), drawn from a generator seeded by ``(seed, epoch, index)``;
    :func:`apply_views` turns them into pixels batch-wise on the training device. Wrap it in
    :class:`crckd_losses.IndexedDataset` to get the bank row too. Call :meth:`set_epoch`
    before each epoch's loader is created (workers copy the dataset).

    Args:
        images: ``[N, 3, S, S]`` uint8.
        labels: ``[N]`` int64.
        seed: the run's seed.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        self.images, self.labels = images, labels
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, i))
        params = torch.stack([draw_view_params(generator, teacher=False),
                              draw_view_params(generator, teacher=True)])
        return self.images[i], params, int(self.labels[i])
