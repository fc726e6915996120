"""Splits: the grouped 70/10/20 split, APTOS's folds, an inner validation part, subsets for
short checks, and ``split.csv``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .datasets import OWN_DATASETS, Records, _read_csv


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


def split_rows(records: Records, split: dict[str, np.ndarray]) -> list[tuple[str, ...]]:
    """``(image_id, group, label, split)`` per image, sorted: what ``split.csv`` holds."""
    rows = []
    for part, index in split.items():
        rows.extend((str(records.ids[i]), str(records.groups[i]),
                     records.classes[records.labels[i]], part) for i in index)
    return sorted(rows)


def write_split(path: Path, records: Records, split: dict[str, np.ndarray]) -> None:
    """Writes ``image_id, group, label, split`` per image, so a split can be reused."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "group", "label", "split"])
        writer.writerows(split_rows(records, split))
    os.replace(tmp, path)


def check_same_data(path: Path, records: Records, split: dict[str, np.ndarray]) -> None:
    """A resumed run's data must be the data it trained on: the split ``records`` give now
    (image ids, groups, labels, parts) must be the one in its ``split.csv`` at ``path``,
    wherever the images now lie.

    Raises:
        ValueError: saying how many rows differ, with an example of each kind.
    """
    with open(path, newline="", encoding="utf-8") as handle:
        saved = {tuple(row) for row in list(csv.reader(handle))[1:]}
    now = set(split_rows(records, split))
    if saved == now:
        return
    gone, new = sorted(saved - now), sorted(now - saved)
    parts = [f"{len(gone)} of its rows are not in the data read now (e.g. {gone[0]})"
             if gone else "", f"{len(new)} rows are new (e.g. {new[0]})" if new else ""]
    raise ValueError(
        f"the data read from {records.source} is not the data the run in {path.parent} "
        "trained on: "
        + " and ".join(p for p in parts if p) + f", against its {path.name} (image, group, "
        "label, part). Point --data-dir (and --csv) at the run's own data: it may lie "
        "elsewhere now, but must be the same images, labels and split.")


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
