"""Datasets read from their layouts, splits, the decode cache and views.

The paper's datasets (HAM10000, APTOS 2019, the shipped sample) are read from their official
layouts; any other labelled image set (PNG, JPEG, TIFF, DICOM) from a folder per class
(``folder``) or a CSV of paths and labels (``csv``).

Everything CPU-bound happens once: each image is decoded and resized to ``image_size`` a
single time and kept in a cached ``uint8`` tensor file. Training then only draws each sample's view
parameters (method §2) from a generator seeded by ``(seed, epoch, index)`` and applies them to a
whole batch in one ``grid_sample`` on the training device: the views of a sample do not
depend on the number of workers, on the rank of a distributed run or on where a resumed run
restarts.
"""

from __future__ import annotations

from .batches import GlobalBatchSampler, class_weights, shard
from .datasets import (
    APTOS_CLASSES,
    DATASETS,
    DEFAULT_CACHE_DIR,
    HAM10000_CLASSES,
    OWN_DATASETS,
    SAMPLE_DIR,
    Records,
    default_data_dir,
    read_aptos,
    read_config_dataset,
    read_dataset,
    read_folder,
    read_ham10000,
    read_table,
)
from .images import cache_key, decode_dicom, decode_image, load_images
from .splits import (
    check_class_sizes,
    check_same_data,
    check_split,
    limit_records,
    make_split,
    read_split,
    split_folds,
    split_grouped,
    write_split,
)
from .views import TwoViewDataset, apply_views, draw_view_params, view_matrices

__all__ = [
    "APTOS_CLASSES", "DATASETS", "DEFAULT_CACHE_DIR", "GlobalBatchSampler", "HAM10000_CLASSES",
    "OWN_DATASETS", "Records", "SAMPLE_DIR", "TwoViewDataset", "apply_views", "cache_key",
    "check_class_sizes", "check_same_data", "check_split", "class_weights", "decode_dicom",
    "decode_image", "default_data_dir", "draw_view_params", "limit_records", "load_images",
    "make_split", "read_aptos", "read_config_dataset", "read_dataset", "read_folder",
    "read_ham10000", "read_split", "read_table", "shard", "split_folds", "split_grouped",
    "view_matrices", "write_split",
]
