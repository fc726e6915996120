"""The two recipes (method §6-§7): what each method's loss weighs at each epoch, and the
settings where the released code departs from the paper.

``paper`` reads the paper; ``released-code`` reproduces ``train_CRCKD.py`` as closely as this
code can. Each departure is a config key a user can also set alone; ``null`` (the default)
means "the recipe's", which :func:`fill` writes into the config before a run, so the run
folder's ``config.json`` says what ran.

=================  ============================  =================================================
key                paper                         released-code
=================  ============================  =================================================
epoch_lr_reset     false                         ``lr / 3`` (its ``base_lr`` 1e-4 against the
                                                 3e-4 peak), set on every group after each epoch
amp                true (float16 on CUDA)        false: float32
sampler            null: the library's default   "independent": i.i.d. rows per item
                   ("independent")
drop_last          true                          false: the last partial batch is trained on,
                                                 its KL divided by the nominal batch size
metric_labels      "present"                     "sklearn": scikit-learn's and imblearn's macro
                                                 averages (classes in the labels or predictions)
crp_anchor_norm    false: the CRP ablation's     true: L2-normalised, and a small class gives
                   rows as they are, a small     the rows it has
                   class padded with repeats
teacher_buffers,   the library's defaults        "leave", train mode
teacher_train_mode
class weights      the training split's counts   the whole dataset's counts
loss weights       :func:`loss_weights`          :func:`loss_weights`
=================  ============================  =================================================
"""

from __future__ import annotations

import math
from typing import Any

RECIPES = ("paper", "released-code")
METRIC_LABELS = ("present", "sklearn")
AMP_DTYPES = ("float16", "bfloat16")

# The released code's settings where they differ from the paper's reading (method §7.9-7.12).
RELEASED: dict[str, Any] = {
    "amp": False,
    "sampler": "independent",
    "drop_last": False,
    "metric_labels": "sklearn",
    "crp_anchor_norm": True,
}
PAPER: dict[str, Any] = {
    "epoch_lr_reset": False,
    "amp": True,
    "drop_last": True,
    "metric_labels": "present",
    "crp_anchor_norm": False,
}


def fill(config: dict[str, Any]) -> dict[str, Any]:
    """Writes the recipe's value into every departure key left ``null``; checks them."""
    released = config["recipe"] == "released-code"
    for key, value in (RELEASED if released else PAPER).items():
        if config.get(key) is None:
            config[key] = value
    if config.get("epoch_lr_reset") is None:  # released-code: base_lr = peak / 3
        config["epoch_lr_reset"] = float(config["lr"]) / 3.0
    reset = config["epoch_lr_reset"]
    if reset is not False and not (isinstance(reset, (int, float)) and not isinstance(reset, bool)
                                   and reset > 0 and math.isfinite(reset)):
        raise ValueError(f"epoch_lr_reset must be false, null or a positive number, got {reset!r}")
    if config["metric_labels"] not in METRIC_LABELS:
        raise ValueError(f"metric_labels must be one of {list(METRIC_LABELS)}, got "
                         f"{config['metric_labels']!r}")
    if config["crp_anchors"] not in ("centroids", "rows"):
        raise ValueError(f"crp_anchors must be 'centroids' or 'rows', got "
                         f"{config['crp_anchors']!r}")
    if config["amp_dtype"] not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {list(AMP_DTYPES)}, got "
                         f"{config['amp_dtype']!r}")
    for key in ("amp", "drop_last", "channels_last", "crp_anchor_norm"):
        if not isinstance(config[key], bool):
            raise ValueError(f"{key} must be true or false, got {config[key]!r}")
    return config


def teacher_setting(config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :class:`crckd_losses.EMATeacher` besides ``decay``.

    ``teacher_buffers`` and ``teacher_train_mode`` null mean the recipe's: the released code
    keeps the teacher's own BatchNorm statistics and train mode (method §2); the paper recipe
    passes nothing, so it follows the library's defaults.
    """
    released = config["recipe"] == "released-code"
    setting: dict[str, Any] = {"buffers": "leave", "train_mode": True} if released else {}
    if config.get("teacher_buffers") is not None:
        setting["buffers"] = config["teacher_buffers"]
    if config.get("teacher_train_mode") is not None:
        setting["train_mode"] = bool(config["teacher_train_mode"])
    return setting


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
