"""Builds ``sample_data/ham10000_sample/``: a small real subset of HAM10000 for the default run.

Whole lesions are drawn per class (seeded) until each class has its target number of images,
so every image of a chosen lesion is in, and the lesion-grouped split still holds. The
images are re-encoded as small JPEG thumbnails (4:3, ``--width`` px wide) next to a subset of
``HAM10000_metadata.csv`` with the original rows. The classes are less skewed than in the full
dataset (``nv`` is capped), so that every class has enough images to train and test on.

HAM10000: Tschandl, Rosendahl & Kittler, Sci. Data 5, 180161 (2018),
doi:10.1038/sdata.2018.161, CC BY-NC 4.0.

Usage::

    python reference_training/studies/make_sample.py [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reference_training.data import (  # noqa: E402
    HAM10000_CLASSES,
    SAMPLE_DIR,
    default_data_dir,
    read_ham10000,
)

TARGETS = {"nv": 130, "mel": 70, "bkl": 70, "bcc": 60, "akiec": 60, "vasc": 50, "df": 50}

ATTRIBUTION = """\
# HAM10000 sample: attribution and licence

The images and `HAM10000_metadata.csv` in this folder are a small subset of the HAM10000
dataset ("Human Against Machine with 10000 training images"), reduced to {width}x{height}
JPEG thumbnails:

> Tschandl, P., Rosendahl, C. & Kittler, H. The HAM10000 dataset, a large collection of
> multi-source dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161
> (2018). doi:10.1038/sdata.2018.161. Data: Harvard Dataverse, doi:10.7910/DVN/DBW86T.

Licence: Creative Commons Attribution-NonCommercial 4.0 International (CC BY-NC 4.0),
https://creativecommons.org/licenses/by-nc/4.0/. Non-commercial use only, with attribution.
Changes made: {count} of the 10015 images were chosen (whole lesions, seeded, at most a set
number of images per class), scaled down and re-encoded as JPEG; the metadata rows are the
original ones for those images. This licence covers this folder only, not the code of the
repository (Apache-2.0).

Regenerate with `python reference_training/studies/make_sample.py --source <HAM10000 folder>`.
"""


def build(source: Path, out: Path, width: int = 80, seed: int = 2020, quality: int = 85) -> int:
    """Writes the sample to ``out``; returns the number of images."""
    from PIL import Image

    records = read_ham10000(source)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c, name in enumerate(HAM10000_CLASSES):
        members = np.flatnonzero(records.labels == c)
        lesions = sorted({records.groups[i] for i in members})
        rng.shuffle(lesions)
        count = 0
        for lesion in lesions:
            if count >= TARGETS[name]:
                break
            rows = [i for i in members if records.groups[i] == lesion]
            chosen.extend(rows)
            count += len(rows)
    keep = {records.ids[i] for i in chosen}
    height = width * 3 // 4
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in chosen:
        with Image.open(records.paths[i]) as img:
            img.convert("RGB").resize((width, height), Image.LANCZOS).save(
                out / "images" / f"{records.ids[i]}.jpg", "JPEG", quality=quality)
    with open(records.source, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [row for row in reader if row[header.index("image_id")] in keep]
    with open(out / "HAM10000_metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    (out / "ATTRIBUTION.md").write_text(
        ATTRIBUTION.format(width=width, height=height, count=len(chosen)), encoding="utf-8")
    return len(chosen)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="HAM10000 folder (default: $CRCKD_DATA_DIR or "
                                         "../shared/data beside the repository)")
    parser.add_argument("--out", default=str(SAMPLE_DIR))
    parser.add_argument("--width", type=int, default=80)
    args = parser.parse_args(argv)
    source = Path(args.source) if args.source else default_data_dir("ham10000")
    count = build(source, Path(args.out), args.width)
    print(f"wrote {count} images to {args.out}")


if __name__ == "__main__":
    main()
