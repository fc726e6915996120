"""Shared test settings and helpers: tiny datasets in the official layouts and tiny run
configs, as fixtures (``make_ham``, ``make_aptos``, ``tiny_config``, ``data_root``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: The devices the device fixture runs a test on: the CPU, and CUDA where present.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device present: a test that takes it runs once per device."""
    return torch.device(request.param)


HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _image(path: Path, label: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    base = np.array([40 + 30 * label, 200 - 25 * label, 100 + (label % 3) * 50])
    pixels = np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(pixels).save(path)


def _make_ham(root: Path, layout: str = "parts", lesions_per_class: int = 6,
             seed: int = 0) -> Path:
    """A tiny HAM10000 in an official layout: ``parts`` (two part folders), ``images`` or
    ``flat`` (images beside the CSV). Lesions of 1-2 images, class-coloured 20x15 JPEGs."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    for c, dx in enumerate(HAM10000_CLASSES):
        for lesion in range(lesions_per_class):
            for _ in range(1 + (lesion % 2)):
                rows.append((f"HAM_{c}{lesion:04d}", f"ISIC_{n:07d}", dx, c))
                n += 1
    for i, (_, image_id, _, c) in enumerate(rows):
        folder = {"parts": root / f"HAM10000_images_part_{1 + i % 2}", "images": root / "images",
                  "flat": root}[layout]
        folder.mkdir(exist_ok=True)
        _image(folder / f"{image_id}.jpg", c, (20, 15), rng)
    with open(root / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        for lesion, image_id, dx, _ in rows:
            writer.writerow([lesion, image_id, dx, "histo", "50.0", "male", "back"])
    return root


def _make_aptos(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """A tiny APTOS 2019: ``train.csv`` + ``train_images/<id_code>.png`` (16x16)."""
    rng = np.random.default_rng(seed)
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    with open(root / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id_code", "diagnosis"])
        for grade in range(5):
            for k in range(per_class):
                code = f"{grade}{k:03d}abcdef"
                _image(root / "train_images" / f"{code}.png", grade, (16, 16), rng)
                writer.writerow([code, grade])
    return root


def _data_root() -> Path | None:
    if os.environ.get("CRCKD_DATA_DIR"):
        return Path(os.environ["CRCKD_DATA_DIR"])
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _tiny_config(tmp_path: Path, data_dir: Path, name: str = "run", **overrides) -> dict:
    flags = {"dataset": "ham10000", "data_dir": str(data_dir), "model": "tiny_cnn",
             "pretrained": False, "image_size": 16, "epochs": 1, "batch_size": 8, "lr": 1e-3,
             "num_positives": 3, "num_negatives": 16, "num_workers": 0, "progress": False,
             "out": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"),
             "eval_batch_size": 16}
    flags.update(overrides)
    from reference_training import config as cfgmod

    return cfgmod.resolve(flags)


@pytest.fixture(scope="session")
def make_ham():
    """``make_ham(root, layout="parts", lesions_per_class=6, seed=0)``: a tiny HAM10000."""
    return _make_ham


@pytest.fixture(scope="session")
def ham(tmp_path_factory, make_ham):
    """A tiny HAM10000 in the official two-part layout, made once and only read by tests."""
    return make_ham(tmp_path_factory.mktemp("ham") / "HAM10000", "parts")


@pytest.fixture(scope="session")
def make_aptos():
    """``make_aptos(root, per_class=10, seed=0)``: a tiny APTOS 2019."""
    return _make_aptos


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(tmp_path, data_dir, name="run", **overrides)``: a resolved config of a
    seconds-long run (tiny_cnn, 16 px, one epoch)."""
    return _tiny_config


@pytest.fixture(scope="session")
def data_root():
    """The real datasets' folder, or ``None``."""
    return _data_root()
