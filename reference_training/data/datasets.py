"""Datasets read from their layouts: HAM10000, APTOS 2019, the shipped sample, a folder per
class (``folder``) or a CSV of paths and labels (``csv``), as :class:`Records`."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import dicom

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
REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "ham10000_sample"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / "cache"


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
    where = ", ".join(str(f) for f in folders if f.is_dir())
    paths, labels, ids = _match_rows(rows, csv_path, "dx", HAM10000_CLASSES, "image_id",
                                     images, ".jpg", where)
    groups = [row["lesion_id"].strip() or image_id for row, image_id in zip(rows, ids)]
    return Records(name, paths, np.asarray(labels, np.int64), groups, ids, HAM10000_CLASSES,
                   csv_path)


def _match_rows(rows: list[dict[str, str]], csv_path: Path, label_column: str,
                classes: tuple[str, ...], id_column: str, images: dict[str, Path],
                suffix: str, where: str) -> tuple[list[Path], list[int], list[str]]:
    """Each CSV row's image path, class index (its ``label_column`` value's position in
    ``classes``) and image id, in row order; an unknown label or a missing image is an error
    naming the CSV line (``where``: the image folders, for the message)."""
    lookup = {c: i for i, c in enumerate(classes)}
    paths, labels, ids = [], [], []
    for line, row in enumerate(rows, start=2):
        value = row[label_column].strip()
        if value not in lookup:
            raise ValueError(
                f"{csv_path}, line {line}: unknown label {value!r} in column "
                f"'{label_column}'; expected one of {list(classes)}"
            )
        image_id = row[id_column].strip()
        if image_id not in images:
            raise FileNotFoundError(
                f"{csv_path}, line {line}: image {image_id}{suffix} not found in {where}"
            )
        paths.append(images[image_id])
        labels.append(lookup[value])
        ids.append(image_id)
    return paths, labels, ids


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
    paths, labels, ids = _match_rows(rows, csv_path, "diagnosis", APTOS_CLASSES, "id_code",
                                     images, ".png", str(folder))
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
    its folder (sub-folders included) whose names end in one of :data:`IMAGE_SUFFIXES`, and
    the DICOM files (``.dcm``, or any other name with the DICOM marker: a DICOM tree's
    ``IM000001``). Image ids are the paths relative to ``data_dir``; every image is its own group.

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
        files = sorted(p for p in folder.rglob("*") if not p.name.startswith(".") and p.is_file()
                       and (p.suffix.lower() in IMAGE_SUFFIXES or dicom.is_dicom(p)))
        if not files:
            empty.append(folder.name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if empty:
        raise ValueError(
            f"{root}: class folder(s) {empty} hold no image ({', '.join(IMAGE_SUFFIXES)} "
            "or DICOM); "
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
                 label_column: str = "label", group_column: str | None = None,
                 dicom_group_tag: str | None = None) -> Records:
    """Reads ``"sample"``, ``"ham10000"``, ``"aptos"``, ``"folder"`` (:func:`read_folder`) or
    ``"csv"`` (:func:`read_table`, which takes ``csv`` and the column names).

    ``dicom_group_tag`` (``folder`` and ``csv``): group the images by this DICOM attribute
    (``PatientID``, ...), read from each file's header, instead of a group column."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    if dataset in OWN_DATASETS and not data_dir:
        raise ValueError(f"--dataset {dataset} needs --data-dir DIR")
    root = Path(data_dir) if data_dir else default_data_dir(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if dicom_group_tag and dataset not in OWN_DATASETS:
        raise ValueError(f"--dicom-group-tag is for --dataset folder or csv, not {dataset}")
    if dicom_group_tag and group_column:
        raise ValueError("--group-column and --dicom-group-tag both name the groups; pass one")
    if dataset == "aptos":
        return read_aptos(root)
    if dataset not in OWN_DATASETS:
        return read_ham10000(root, name=dataset)
    if dataset == "csv" and not csv:
        raise ValueError("--dataset csv needs --csv FILE (image paths relative to --data-dir)")
    records = (read_folder(root) if dataset == "folder"
               else read_table(root, csv or "", image_column, label_column, group_column))
    if dicom_group_tag:
        records.groups = dicom.tag_groups(records.paths, dicom_group_tag, records.ids)
    return records


def read_config_dataset(config: dict, data_dir: str | Path | None = None) -> Records:
    """:func:`read_dataset` with a run config's dataset keys (``data_dir`` overrides its)."""
    return read_dataset(config["dataset"], data_dir or config["data_dir"], config.get("csv"),
                        config.get("image_column") or "image",
                        config.get("label_column") or "label", config.get("group_column"),
                        config.get("dicom_group_tag"))
