"""Datasets of the paper read from their official layouts, splits, the decode cache and views.

Everything CPU-bound happens once: each image is decoded and resized to ``image_size`` a
single time and kept in a cached ``uint8`` tensor file. Training then only draws each sample's view
parameters (method §2) from a generator seeded by ``(seed, epoch, index)`` and applies them to a
whole batch in one ``grid_sample`` on the training device: the views of a sample do not
depend on the number of workers, on the rank of a distributed run or on where a resumed run
restarts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
APTOS_CLASSES = ("0", "1", "2", "3", "4")
HAM10000_COLUMNS = ("lesion_id", "image_id", "dx")
APTOS_COLUMNS = ("id_code", "diagnosis")
HAM10000_IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "images", ".")
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data" / "ham10000_sample"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / "cache"


@dataclass
class Records:
    """A dataset as read from its label file: one entry per image.

    Attributes:
        name: ``"ham10000"``, ``"aptos"`` or ``"sample"``.
        paths: image files.
        labels: ``[N]`` int64 class indices.
        groups: what must not be split apart (HAM10000's ``lesion_id``; the image id else).
        ids: image ids as the label file names them.
        classes: class names, index = label.
    """

    name: str
    paths: list[Path]
    labels: np.ndarray
    groups: list[str]
    ids: list[str]
    classes: tuple[str, ...]
    source: Path = field(default_factory=Path)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | np.ndarray) -> Records:
        """The records at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return Records(
            self.name,
            [self.paths[i] for i in index],
            self.labels[index],
            [self.groups[i] for i in index],
            [self.ids[i] for i in index],
            self.classes,
            self.source,
        )


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; expected {list(columns)}, found {header}"
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _index_images(folders: Sequence[Path], suffix: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.lower().endswith(suffix):
                    found.setdefault(entry.name[: -len(suffix)], Path(entry.path))
    return found


def read_ham10000(data_dir: str | Path, name: str = "ham10000") -> Records:
    """HAM10000 from its official layout.

    ``HAM10000_metadata.csv`` (columns ``lesion_id, image_id, dx``, others ignored) and
    ``<image_id>.jpg`` in ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/``,
    ``images/`` or the CSV's own folder.

    Args:
        data_dir: the folder holding ``HAM10000_metadata.csv``.
        name: the dataset name to record.

    Raises:
        FileNotFoundError: no CSV, or an image it lists is missing.
        ValueError: missing columns, an unknown ``dx``, or no image at all.
    """
    root = Path(data_dir)
    csv_path = root / "HAM10000_metadata.csv"
    rows = _read_csv(csv_path, HAM10000_COLUMNS)
    folders = [root / f for f in HAM10000_IMAGE_FOLDERS]
    images = _index_images(folders, ".jpg")
    if not images:
        raise ValueError(
            f"no .jpg images under {root} (looked in {', '.join(HAM10000_IMAGE_FOLDERS)})"
        )
    lookup = {c: i for i, c in enumerate(HAM10000_CLASSES)}
    paths, labels, groups, ids = [], [], [], []
    for line, row in enumerate(rows, start=2):
        dx = row["dx"].strip()
        if dx not in lookup:
            raise ValueError(
                f"{csv_path}, line {line}: unknown label {dx!r} in column 'dx'; "
                f"expected one of {list(HAM10000_CLASSES)}"
            )
        image_id = row["image_id"].strip()
        if image_id not in images:
            raise FileNotFoundError(
                f"{csv_path}, line {line}: image {image_id}.jpg not found in "
                f"{', '.join(str(f) for f in folders if f.is_dir())}"
            )
        paths.append(images[image_id])
        labels.append(lookup[dx])
        groups.append(row["lesion_id"].strip() or image_id)
        ids.append(image_id)
    return Records(name, paths, np.asarray(labels, np.int64), groups, ids, HAM10000_CLASSES,
                   csv_path)


def read_aptos(data_dir: str | Path) -> Records:
    """APTOS 2019 from its official layout: ``train.csv`` + ``train_images/<id_code>.png``.

    Raises:
        FileNotFoundError: no CSV, or an image it lists is missing.
        ValueError: missing columns, a ``diagnosis`` outside 0..4, or no image at all.
    """
    root = Path(data_dir)
    csv_path = root / "train.csv"
    rows = _read_csv(csv_path, APTOS_COLUMNS)
    folder = root / "train_images"
    images = _index_images([folder], ".png")
    if not images:
        raise ValueError(f"no .png images in {folder}")
    paths, labels, ids = [], [], []
    for line, row in enumerate(rows, start=2):
        grade = row["diagnosis"].strip()
        if grade not in APTOS_CLASSES:
            raise ValueError(
                f"{csv_path}, line {line}: unknown label {grade!r} in column 'diagnosis'; "
                f"expected one of {list(APTOS_CLASSES)}"
            )
        image_id = row["id_code"].strip()
        if image_id not in images:
            raise FileNotFoundError(
                f"{csv_path}, line {line}: image {image_id}.png not found in {folder}"
            )
        paths.append(images[image_id])
        labels.append(int(grade))
        ids.append(image_id)
    return Records("aptos", paths, np.asarray(labels, np.int64), list(ids), ids, APTOS_CLASSES,
                   csv_path)


def default_data_dir(dataset: str) -> Path:
    """Where a dataset is looked for when ``--data-dir`` is not given.

    ``sample`` ships in the repository. The real datasets are looked for in
    ``$CRCKD_DATA_DIR`` and then in ``../shared/data`` beside the repository.
    """
    if dataset == "sample":
        return SAMPLE_DIR
    sub = {"ham10000": "ham10000_200x150", "aptos": "aptos2019_128x128"}[dataset]
    candidates = []
    if os.environ.get("CRCKD_DATA_DIR"):
        candidates.append(Path(os.environ["CRCKD_DATA_DIR"]) / sub)
    candidates.append(REPO_ROOT.parent / "shared" / "data" / sub)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no --data-dir given for dataset {dataset!r} and none of "
        f"{[str(c) for c in candidates]} exists; pass --data-dir DIR"
    )


def read_dataset(dataset: str, data_dir: str | Path | None = None) -> Records:
    """Reads ``"sample"``, ``"ham10000"`` or ``"aptos"``."""
    if dataset not in ("sample", "ham10000", "aptos"):
        raise ValueError(f"dataset must be 'sample', 'ham10000' or 'aptos', got {dataset!r}")
    root = Path(data_dir) if data_dir else default_data_dir(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if dataset == "aptos":
        return read_aptos(root)
    return read_ham10000(root, name=dataset)


def limit_records(records: Records, max_images: int, seed: int) -> Records:
    """A random subset of whole groups, stratified by class, of about ``max_images`` images.

    For short checks on the real data; every class keeps at least one group.
    """
    rng = np.random.default_rng(seed)
    fraction = max_images / len(records)
    if fraction >= 1:
        return records
    chosen: list[int] = []
    for c in np.unique(records.labels):
        members = np.flatnonzero(records.labels == c)
        group_names = sorted({records.groups[i] for i in members})
        rng.shuffle(group_names)
        take = set(group_names[: max(1, round(fraction * len(group_names)))])
        chosen.extend(i for i in members if records.groups[i] in take)
    return records.subset(sorted(chosen))


def split_grouped(records: Records, seed: int) -> dict[str, np.ndarray]:
    """HAM10000's 70/10/20 split, stratified by class and grouped by ``lesion_id``.

    ``StratifiedGroupKFold(5)`` takes one fifth as the test part, then
    ``StratifiedGroupKFold(8)`` of the rest one eighth (10 % of the whole) as validation.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``, sorted record positions.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = records.labels, np.asarray(records.groups)
    outer = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    rest, test = next(outer.split(np.zeros(len(labels)), labels, groups))
    inner = StratifiedGroupKFold(n_splits=8, shuffle=True, random_state=seed)
    train, val = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
    return {"train": np.sort(rest[train]), "val": np.sort(rest[val]), "test": np.sort(test)}


def split_folds(records: Records, fold: int, seed: int = 2020, num_folds: int = 5,
                val_fraction: float | None = None) -> dict[str, np.ndarray]:
    """APTOS's 5-fold stratified CV (shuffle, seed 2020): fold ``fold`` (1-based) is the test set.

    By default there is no validation part (the paper has none); the summary then reports
    only the last-11-epoch protocol. ``val_fraction`` (in (0, 0.5]) holds out that share of
    the fold's training part, stratified by class, as a validation part, so that settings
    can be compared without looking at the test fold. The test fold is unchanged.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if not 1 <= fold <= num_folds:
        raise ValueError(f"fold must be in 1..{num_folds}, got {fold}")
    folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    train, test = list(folds.split(np.zeros(len(records)), records.labels))[fold - 1]
    if not val_fraction:
        return {"train": np.sort(train), "test": np.sort(test)}
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    train, val = train_test_split(train, test_size=val_fraction, random_state=seed,
                                  stratify=records.labels[train])
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def write_split(path: Path, records: Records, split: dict[str, np.ndarray]) -> None:
    """Writes ``image_id, group, label, split`` per image, so a split can be reused."""
    rows = []
    for part, index in split.items():
        rows.extend((records.ids[i], records.groups[i], records.classes[records.labels[i]], part)
                    for i in index)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "group", "label", "split"])
        writer.writerows(sorted(rows))
    os.replace(tmp, path)


def read_split(path: str | Path, records: Records) -> dict[str, np.ndarray]:
    """Reads a split written by :func:`write_split` back, against ``records``."""
    path = Path(path)
    rows = _read_csv(path, ("image_id", "split"))
    position = {image_id: i for i, image_id in enumerate(records.ids)}
    parts: dict[str, list[int]] = {}
    for line, row in enumerate(rows, start=2):
        if row["image_id"] not in position:
            raise ValueError(f"{path}, line {line}: image {row['image_id']!r} is not in the data")
        parts.setdefault(row["split"], []).append(position[row["image_id"]])
    if "train" not in parts or "test" not in parts:
        raise ValueError(f"{path}: column 'split' must name 'train' and 'test' rows")
    return {k: np.sort(np.asarray(v, np.int64)) for k, v in parts.items()}


def check_split(records: Records, split: dict[str, np.ndarray]) -> None:
    """Every class must be in the training part (the banks and the class weights need it)."""
    present = set(np.unique(records.labels[split["train"]]).tolist())
    absent = [records.classes[c] for c in range(len(records.classes)) if c not in present]
    if absent:
        raise ValueError(
            f"class(es) {absent} of {records.source} have no image in the training split; "
            "every class needs training images"
        )


class _DecodeDataset(Dataset[torch.Tensor]):
    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                array = np.asarray(img, dtype=np.uint8).copy()
        except Exception as error:  # PIL raises many types for a broken file
            raise ValueError(f"cannot read image {path}: {error}") from error
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def cache_key(records: Records, size: int) -> str:
    """A key for the decoded tensor file: the dataset, its files (name, size, mtime) and size."""
    digest = hashlib.sha1()
    digest.update(json.dumps([records.name, size]).encode())
    for path in records.paths:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def load_images(records: Records, size: int, cache_dir: str | Path | None = None,
                num_workers: int = 0, log: bool = True) -> torch.Tensor:
    """All images of ``records`` decoded and resized to ``size x size``: ``[N, 3, S, S]`` uint8.

    Read from the cache when present, else decoded (with ``num_workers`` processes) and
    written atomically. ``cache_dir=None`` uses ``reference_training/cache``.
    """
    folder = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    path = folder / f"{records.name}_{size}px_{len(records)}_{cache_key(records, size)}.pt"
    if path.is_file():
        images = torch.load(path, weights_only=True)
        if isinstance(images, torch.Tensor) and images.shape == (len(records), 3, size, size):
            return images
    loader = DataLoader(_DecodeDataset(records.paths, size), batch_size=64,
                        num_workers=num_workers, generator=torch.Generator())
    if log:
        print(f"decoding {len(records)} images to {size}x{size} once (cache: {path})")
    images = torch.cat(list(loader)) if len(records) else torch.empty(0, 3, size, size)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(images, tmp)
    os.replace(tmp, path)
    return images


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


class GlobalBatchSampler:
    """Seeded global batches, each cut into equal contiguous per-rank slices.

    Every rank draws the same permutation for an epoch (from ``seed`` and ``epoch``), forms
    the same global batches of ``batch_size`` (the last partial one dropped), and keeps slice
    ``rank`` of each. So N processes see exactly the samples one process sees with the same
    global batch, and a resumed run can start at any ``start_step``.

    Args:
        size: dataset size.
        batch_size: the global batch size; divisible by ``world_size``.
        seed: the run's seed.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the number of processes "
                f"({world_size})"
            )
        self.size, self.batch_size, self.seed = size, min(batch_size, size), seed
        self.rank, self.world_size = rank, world_size
        if self.batch_size % world_size:
            raise ValueError(f"the training set ({size}) is smaller than {world_size} processes")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return max(self.size // self.batch_size - self.start_step, 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.batch_size

    def global_batch(self, step: int) -> torch.Tensor:
        """The dataset indices of global batch ``step`` of the current epoch."""
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.size, generator=generator)
        return order[step * self.batch_size:(step + 1) * self.batch_size]

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.size, generator=generator)
        local = self.batch_size // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield batch[self.rank * local:(self.rank + 1) * local].tolist()


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """method §2: ``weight_c = N_total / N_c``."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class weights need every class; counts per class are {counts.tolist()}")
    return torch.tensor(counts.sum() / counts, dtype=torch.float32)


def shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous part ``rank`` of ``range(n)`` split into ``world_size`` parts."""
    per = math.ceil(n / world_size)
    return range(min(rank * per, n), min((rank + 1) * per, n))
