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

from .data import DATASETS, OWN_DATASETS
from .models import efficientnet_lite_available

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS = ("baseline", "mt", "crd", "ccd", "crp", "crckd")
RECIPES = ("paper", "released-code")

# method §6, the released code's defaults, for the real datasets.
DEFAULTS: dict[str, Any] = {
    "dataset": "sample",
    "data_dir": None,
    "method": "crckd",
    "recipe": "paper",
    "model": "densenet121",
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
    "sampler": "shuffle",
    "centroid_relu": True,
    "fold": None,  # APTOS: 1..5 or "all"; folder and csv: 1..num_folds or "all" for k-fold CV
    "num_folds": 5,  # folder and csv with a fold (APTOS has 5)
    # --dataset csv: the CSV (paths relative to data_dir) and its columns; a group column
    # (patient or lesion) keeps each group's images in one part of the split.
    "csv": None,
    "image_column": "image",
    "label_column": "label",
    "group_column": None,
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
    "amp": True,
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

# The sample runs on 2 CPU cores in minutes: a small pretrained backbone, small images.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "sample": {
        "model": "efficientnet_lite0" if efficientnet_lite_available() else "resnet18",
        "pretrained": efficientnet_lite_available(),
        "image_size": 64,
        "epochs": 6,
        "batch_size": 32,
        "lr": 1e-3,
        "num_negatives": 4096,
        "negatives_max_fraction": 0.5,
        "last_epochs": 3,
        "num_workers": 0,
    },
    "aptos": {"fold": 1},
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
    if path.suffix == ".toml":
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
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
    if config["contrast"] == "instance":
        config["num_positives"] = 1  # CRD: the anchor's own row is the only positive
    epochs = config["epochs"]
    if config["rampup_epochs"] is None:
        config["rampup_epochs"] = 30 * epochs / 80
    if config["begin_epoch"] is None:
        config["begin_epoch"] = math.floor(20 * epochs / 80)
    return config


def uses_teacher(config: dict[str, Any]) -> bool:
    """Every method but the baseline has a mean teacher."""
    return config["method"] != "baseline"


def uses_contrast(config: dict[str, Any]) -> bool:
    """Whether the run needs :class:`crckd_losses.CRCKDLoss` (heads and banks)."""
    return config["method"] in ("crd", "ccd", "crp", "crckd")


def loss_weights(config: dict[str, Any], epoch: int) -> dict[str, float]:
    """The weights of KL, CCD and CRP at ``epoch`` (0-based) under the config's recipe.

    Paper: ``kl_weight * λ_KL(e)``, ``ccd_weight``, ``crp_weight`` from the start. Released
    code (method §7.1-7.2): KL and CRP are off before ``begin_epoch``; from it on the CCD weight
    is applied twice (0.1 becomes 0.01).
    """
    from crckd_losses.functional import sigmoid_rampup

    kl = config["kl_weight"] * sigmoid_rampup(epoch, config["rampup_epochs"])
    ccd, crp = float(config["ccd_weight"]), float(config["crp_weight"])
    if config["recipe"] == "released-code":
        if epoch < config["begin_epoch"]:
            kl, crp = 0.0, 0.0
        else:
            ccd = ccd * ccd
    if not uses_teacher(config):
        kl = 0.0
    return {"kl": kl, "ccd": ccd, "crp": crp}
