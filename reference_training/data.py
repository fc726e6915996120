"""Datasets read from their layouts, splits, the decode cache and views.

The paper's datasets (HAM10000, APTOS 2019, the shipped sample) are read from their official
layouts; any other labelled image set from a folder per class (``folder``) or a CSV of paths
and labels (``csv``).

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
# Datasets of the user's own, read from a layout rather than a named dataset.
OWN_DATASETS = ("folder", "csv")
DATASETS = ("sample", "ham10000", "aptos", *OWN_DATASETS)
# The files a class folder may hold (as torchvision's ImageFolder, less the rare formats).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                  ".gif")
# Pillow modes of more than 8 bits per pixel: scaled to 0..255 by the image's own range.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data" / "ham10000_sample"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / "cache"


@dataclass
class Records:
    """A dataset as read from its label file: one entry per image.

    Attributes:
        name: ``"ham10000"``, ``"aptos"``, ``"sample"``, ``"folder"`` or ``"csv"``.
        paths: image files.
        labels: ``[N]`` int64 class indices.
        groups: what must not be split apart (HAM10000's ``lesion_id``, a CSV's group column;
            the image id else).
        ids: image ids as the label file names them (for ``folder`` and ``csv``, the path
            relative to the data folder).
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


def _read_csv(path: Path, columns: Sequence[str], fix: str = "") -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's BOM
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; expected {list(columns)}, found {header}"
                + fix
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


def _lines(numbers: Sequence[int], limit: int = 5) -> str:
    """``"2, 5, 9"`` or ``"2, 5, 9, 11, 12 and 3 more"``."""
    text = ", ".join(str(n) for n in numbers[:limit])
    return text + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def _class_order(names: Sequence[str]) -> tuple[str, ...]:
    """Class names in sorted order: numerically when every name is an integer (so ``10`` comes
    after ``9``), as text else."""
    unique = set(names)
    try:
        return tuple(sorted(unique, key=int))
    except ValueError:
        return tuple(sorted(unique))


def read_folder(data_dir: str | Path) -> Records:
    """A folder with one sub-folder per class (torchvision's ``ImageFolder`` layout).

    Class names are the sub-folders' names in sorted order; each class holds the files under
    its folder (sub-folders included) whose names end in one of :data:`IMAGE_SUFFIXES`.
    Image ids are the paths relative to ``data_dir``; every image is its own group.

    Raises:
        ValueError: no class sub-folder, fewer than two, or a class folder without images.
    """
    root = Path(data_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(
            f"{root}: --dataset folder needs one sub-folder per class (DIR/<class>/<image>), "
            f"and at least two; found {[p.name for p in folders]}"
        )
    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.startswith(".") and p.is_file())
        if not files:
            empty.append(folder.name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if empty:
        raise ValueError(
            f"{root}: class folder(s) {empty} hold no image ({', '.join(IMAGE_SUFFIXES)}); "
            "put the class's images in it, or remove the folder to leave the class out"
        )
    ids = [p.relative_to(root).as_posix() for p in paths]
    return Records("folder", paths, np.asarray(labels, np.int64), list(ids), ids,
                   tuple(p.name for p in folders), root)


def read_table(data_dir: str | Path, csv_file: str | Path, image_column: str = "image",
               label_column: str = "label", group_column: str | None = None) -> Records:
    """A CSV of image paths and labels, with an optional group column (patient or lesion).

    Args:
        data_dir: the folder the paths in ``image_column`` are relative to (absolute paths
            are taken as they are).
        csv_file: the CSV; a relative path not found from the working directory is looked
            for in ``data_dir``.
        image_column: the column of image paths.
        label_column: the column of labels: class names, or integers. Classes are sorted,
            numerically when all labels are integers.
        group_column: images of one value are never split apart; an empty cell makes the
            image its own group.

    Raises:
        FileNotFoundError: no CSV, or paths that name no file.
        ValueError: missing columns, empty image or label cells, a path listed twice, or
            fewer than two classes.
    """
    root = Path(data_dir)
    csv_path = Path(csv_file)
    if not csv_path.is_file() and not csv_path.is_absolute():
        if not (root / csv_path).is_file():
            raise FileNotFoundError(
                f"--csv {csv_file}: no such file in the working directory ({Path.cwd()}) nor "
                f"in --data-dir {root}"
            )
        csv_path = root / csv_path
    columns = [image_column, label_column] + ([group_column] if group_column else [])
    rows = _read_csv(csv_path, columns, "; name the CSV's own columns with --image-column, "
                     "--label-column and --group-column")
    for column in (image_column, label_column):
        blank = [line for line, row in enumerate(rows, start=2) if not (row[column] or "").strip()]
        if blank:
            raise ValueError(
                f"{csv_path}: column {column!r} is empty on line(s) {_lines(blank)}; fill "
                "those cells or remove the rows"
            )
    names = [row[label_column].strip() for row in rows]
    ids = [row[image_column].strip() for row in rows]
    seen: dict[str, int] = {}
    twice = []
    for line, image in enumerate(ids, start=2):
        if image in seen:
            twice.append(f"{image!r} (lines {seen[image]} and {line})")
        seen.setdefault(image, line)
    if twice:
        raise ValueError(
            f"{csv_path}: image(s) listed more than once: {', '.join(twice[:5])}"
            + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
            + "; keep one row per image"
        )
    paths = [root / image for image in ids]
    missing = [line for line, path in enumerate(paths, start=2) if not path.is_file()]
    if missing:
        first = paths[missing[0] - 2]
        raise FileNotFoundError(
            f"{csv_path}: {len(missing)} path(s) in column {image_column!r} name no file "
            f"(line(s) {_lines(missing)}; the first is {first}); paths are relative to "
            f"--data-dir {root}: fix the paths or --data-dir, or remove the rows"
        )
    classes = _class_order(names)
    if len(classes) < 2:
        raise ValueError(f"{csv_path}: column {label_column!r} names one class only, {classes}; "
                         "a classifier needs at least two")
    lookup = {c: i for i, c in enumerate(classes)}
    groups = ids
    if group_column:
        groups = [(row[group_column] or "").strip() or image for row, image in zip(rows, ids)]
    return Records("csv", paths, np.asarray([lookup[n] for n in names], np.int64), groups, ids,
                   classes, csv_path)


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


def read_dataset(dataset: str, data_dir: str | Path | None = None,
                 csv: str | Path | None = None, image_column: str = "image",
                 label_column: str = "label", group_column: str | None = None) -> Records:
    """Reads ``"sample"``, ``"ham10000"``, ``"aptos"``, ``"folder"`` (:func:`read_folder`) or
    ``"csv"`` (:func:`read_table`, which takes ``csv`` and the column names)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    if dataset in OWN_DATASETS and not data_dir:
        raise ValueError(f"--dataset {dataset} needs --data-dir DIR")
    root = Path(data_dir) if data_dir else default_data_dir(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if dataset == "folder":
        return read_folder(root)
    if dataset == "csv":
        if not csv:
            raise ValueError("--dataset csv needs --csv FILE (image paths relative to --data-dir)")
        return read_table(root, csv, image_column, label_column, group_column)
    if dataset == "aptos":
        return read_aptos(root)
    return read_ham10000(root, name=dataset)


def read_config_dataset(config: dict, data_dir: str | Path | None = None) -> Records:
    """:func:`read_dataset` with a run config's dataset keys (``data_dir`` overrides its)."""
    return read_dataset(config["dataset"], data_dir or config["data_dir"], config.get("csv"),
                        config.get("image_column") or "image",
                        config.get("label_column") or "label", config.get("group_column"))


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

    Where some group holds several images (a CSV's group column), the folds, and the
    validation part, are grouped too (``StratifiedGroupKFold``): no group is in two parts.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

    if not 1 <= fold <= num_folds:
        raise ValueError(f"fold must be in 1..{num_folds}, got {fold}")
    groups = np.asarray(records.groups)
    grouped = len(set(records.groups)) < len(records)
    folds = (StratifiedGroupKFold if grouped else StratifiedKFold)(
        n_splits=num_folds, shuffle=True, random_state=seed)
    train, test = list(folds.split(np.zeros(len(records)), records.labels,
                                   groups if grouped else None))[fold - 1]
    if not val_fraction:
        return {"train": np.sort(train), "test": np.sort(test)}
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if grouped:
        inner = StratifiedGroupKFold(n_splits=round(1 / val_fraction), shuffle=True,
                                     random_state=seed)
        rest, held = next(inner.split(np.zeros(len(train)), records.labels[train],
                                      groups[train]))
        train, val = train[rest], train[held]
    else:
        train, val = train_test_split(train, test_size=val_fraction, random_state=seed,
                                      stratify=records.labels[train])
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def check_class_sizes(records: Records, parts: int) -> None:
    """Every class needs ``parts`` groups (images, where there is no group column) or more,
    so that a split into ``parts`` stratified parts can give each part some of it.

    Raises:
        ValueError: naming each class with too few, and the fix.
    """
    few = []
    for c, name in enumerate(records.classes):
        count = len({g for g, label in zip(records.groups, records.labels) if label == c})
        if count < parts:
            few.append(f"{name!r} ({count})")
    if few:
        unit = "groups" if len(set(records.groups)) < len(records) else "images"
        raise ValueError(
            f"{records.source}: class(es) {', '.join(few)} have fewer than {parts} {unit}, "
            f"and the split cuts each class into {parts} parts; add {unit} to them, or leave "
            "them out (remove the class folder, or its rows from the CSV)"
        )


def make_split(records: Records, config: dict) -> dict[str, np.ndarray]:
    """The run's split from its config: ``split_file`` when given, else the dataset's own.

    APTOS and, with ``fold`` set, ``folder`` and ``csv`` are split by :func:`split_folds`
    (``num_folds`` folds); HAM10000, the sample and ``folder`` / ``csv`` without ``fold``
    by the 70/10/20 :func:`split_grouped`. Checked by :func:`check_split`.
    """
    own = config["dataset"] in OWN_DATASETS
    num_folds = int(config.get("num_folds") or 5)
    if config["split_file"]:
        split = read_split(config["split_file"], records)
    elif config["dataset"] == "aptos" or (own and config["fold"]):
        if own:
            check_class_sizes(records, num_folds)
        split = split_folds(records, int(config["fold"] or 1), config["cv_seed"],
                            num_folds=num_folds, val_fraction=config["val_fraction"])
    else:
        if own:
            check_class_sizes(records, 5)
        split = split_grouped(records, config["split_seed"])
    check_split(records, split)
    return split


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
    low, high = float(values.min()), float(values.max())
    resized = np.asarray(Image.fromarray(values).resize((size, size), Image.BILINEAR))
    scaled = (resized - low) * (255.0 / (high - low)) if high > low else 0 * resized
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


class _DecodeDataset(Dataset[tuple[torch.Tensor, str]]):
    """``(image [3, S, S] uint8, "")``, or zeros and the reason where a file cannot be read, so
    that every unreadable file is named at once."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                array = decode_image(img, self.size)
        except Exception as error:  # PIL raises many types for a broken file
            return (torch.zeros(3, self.size, self.size, dtype=torch.uint8),
                    f"cannot read image {path}: {error}")
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), ""


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
    """Seeded global batches, each cut into contiguous per-rank slices.

    Every rank draws the same permutation for an epoch (from ``seed`` and ``epoch``), forms
    the same global batches of ``batch_size``, and keeps slice ``rank`` of each. So N processes
    see exactly the samples one process sees with the same global batch, and a resumed run can
    start at any ``start_step``. With ``drop_last`` off the epoch ends with a partial batch (as
    the released code's loader does), cut as evenly as it goes (``torch.tensor_split``); a
    partial batch smaller than the number of processes is dropped.

    Args:
        size: dataset size.
        batch_size: the global batch size; divisible by ``world_size``.
        seed: the run's seed.
        rank: this process's rank.
        world_size: number of processes.
        drop_last: drop the last partial batch of each epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the number of processes "
                f"({world_size})"
            )
        self.size, self.batch_size, self.seed = size, min(batch_size, size), seed
        self.rank, self.world_size = rank, world_size
        if self.batch_size % world_size:
            raise ValueError(f"the training set ({size}) is smaller than {world_size} processes")
        self.drop_last = drop_last
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + int(not self.drop_last and rest >= self.world_size)

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, -1))
        return torch.randperm(self.size, generator=generator)

    def global_batch(self, step: int) -> torch.Tensor:
        """The dataset indices of global batch ``step`` of the current epoch."""
        return self._order()[step * self.batch_size:(step + 1) * self.batch_size]

    def global_size(self, step: int) -> int:
        """The size of global batch ``step`` (``batch_size`` but for a last partial one)."""
        return min(self.batch_size, self.size - step * self.batch_size)

    def local_slice(self, global_size: int) -> slice:
        """This rank's rows of a global batch of ``global_size``."""
        bounds = [len(part) for part in torch.arange(global_size).tensor_split(self.world_size)]
        start = sum(bounds[:self.rank])
        return slice(start, start + bounds[self.rank])

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = self._order()
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield batch[self.local_slice(len(batch))].tolist()


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
