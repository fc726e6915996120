"""Images decoded and resized once, kept in a cached ``uint8`` tensor file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import dicom
from .datasets import DEFAULT_CACHE_DIR, IMAGE_SUFFIXES, WIDE_MODES, Records


def decode_image(img, size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A Pillow image as the network's input: ``[size, size, 3]`` uint8, resized (bilinear,
    aspect ratio not kept) whatever its size.

    8-bit images go through Pillow's ``convert("RGB")``: grayscale is repeated in the three
    channels, a palette is looked up, an alpha channel is dropped. Images of more than 8 bits
    (16-bit PNG or TIFF, 32-bit integer or float TIFF) are scaled linearly from their own
    minimum (0) to their own maximum (255), then repeated in the three channels; a constant
    image becomes 0.
    """
    from PIL import Image

    if img.mode not in WIDE_MODES:
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR),
                          dtype=np.uint8).copy()
    values = np.nan_to_num(np.asarray(img, dtype=np.float32))
    return _gray(values, size, float(values.min()), float(values.max()))


def _gray(values: np.ndarray, size: int, low: float, high: float) -> np.ndarray:
    """``[H, W]`` float32 values resized to ``[size, size]``, ``low..high`` scaled to 0..255
    (a constant image to 0), in the three channels."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(values).resize((size, size), Image.BILINEAR))
    scaled = (resized - low) * (255.0 / (high - low)) if high > low else 0 * resized
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def decode_dicom(path: Path, size: int, window: tuple[float, float] | None = None
                 ) -> np.ndarray:
    """A DICOM file as the network's input, ``[size, size, 3]`` uint8: grayscale through
    :func:`reference_training.data.dicom.read_pixels` (``[0, 1]`` becomes 0..255), colour as
    :func:`decode_image` reads RGB."""
    from PIL import Image

    pixels = dicom.read_pixels(path, window)
    if pixels.ndim == 3:
        return decode_image(Image.fromarray(pixels, "RGB"), size)
    return _gray(pixels, size, 0.0, 1.0)


def is_dicom_file(path: Path) -> bool:
    """Read as DICOM: not a Pillow image suffix, and :func:`dicom.is_dicom`."""
    return path.suffix.lower() not in IMAGE_SUFFIXES and dicom.is_dicom(path)


class _DecodeDataset(Dataset[tuple[torch.Tensor, str]]):
    """``(image [3, S, S] uint8, "")``, or zeros and the reason where a file cannot be read, so
    that every unreadable file is named at once. ``window``: the DICOM window of the set."""

    def __init__(self, paths: Sequence[Path], size: int,
                 window: tuple[float, float] | None = None) -> None:
        self.paths, self.size, self.window = list(paths), size, window

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        path = self.paths[i]
        try:
            if is_dicom_file(path):
                array = decode_dicom(path, self.size, self.window)
            else:
                with Image.open(path) as img:
                    array = decode_image(img, self.size)
        except Exception as error:  # PIL and pydicom raise many types for a broken file
            return (torch.zeros(3, self.size, self.size, dtype=torch.uint8),
                    f"cannot read image {path}: {error}")
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), ""


def cache_key(records: Records, size: int, dicom_window: Sequence[float] | None = None) -> str:
    """A key for the decoded tensor file: the dataset, its files (name, size, mtime), size and
    the DICOM window (``None`` keeps the key of the sets without one)."""
    digest = hashlib.sha1()
    window = [] if dicom_window is None else [list(map(float, dicom_window))]
    digest.update(json.dumps([records.name, size, *window]).encode())
    for path in records.paths:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def load_images(records: Records, size: int, cache_dir: str | Path | None = None,
                num_workers: int = 0, log: bool = True,
                dicom_window: Sequence[float] | None = None) -> torch.Tensor:
    """All images of ``records`` decoded and resized to ``size x size``: ``[N, 3, S, S]`` uint8.

    Read from the cache when present, else decoded (with ``num_workers`` processes) and
    written atomically. ``cache_dir=None`` uses ``reference_training/cache``.
    ``dicom_window``: ``(center, width)`` for every grayscale DICOM file (see
    :mod:`reference_training.data.dicom`); ``None`` uses each file's own.
    """
    window = dicom.check_window(dicom_window)
    folder = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    key = cache_key(records, size, window)
    path = folder / f"{records.name}_{size}px_{len(records)}_{key}.pt"
    if path.is_file():
        images = torch.load(path, weights_only=True)
        if isinstance(images, torch.Tensor) and images.shape == (len(records), 3, size, size):
            return images
    if any(is_dicom_file(p) for p in records.paths):
        dicom.require_pydicom()  # one line for the set, not one per file
    loader = DataLoader(_DecodeDataset(records.paths, size, window), batch_size=64,
                        num_workers=num_workers, generator=torch.Generator())
    if log:
        print(f"decoding {len(records)} images to {size}x{size} once (cache: {path})")
    batches = list(loader)
    errors = [error for _, messages in batches for error in messages if error]
    if errors:
        raise ValueError(
            f"{len(errors)} image(s) of {records.source} cannot be read: "
            + "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
            + ". Replace those files, or remove them (their rows of the CSV, their files in "
            "the class folders); nothing was written to the cache"
        )
    images = (torch.cat([b for b, _ in batches]) if len(records)
              else torch.empty(0, 3, size, size, dtype=torch.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(images, tmp)
    os.replace(tmp, path)
    return images
