"""What ``train.py --resume DIR`` accepts beside the folder: the given flags (and ``--config``
file) against the run's saved ``config.json``.

A setting that changes what the run is (method, recipe, data, split, model, image size, seed,
learning rate, batch size, epochs, ...) is refused, naming the flag, the saved value and the
given one. How the run is driven (:data:`~reference_training.config.NEUTRAL_KEYS`: device,
workers, progress, ...) and where its files lie
(:data:`~reference_training.config.PATH_KEYS`: a run packed on one machine and unpacked on
another reads its data from a new path) take the given values; the data itself is then
checked against the run's ``split.csv`` (:func:`reference_training.data.check_same_data`).
"""

from __future__ import annotations

from typing import Any

from . import config as cfgmod
from .errors import UserError

#: Keys a resumed run takes from the command line.
FREE_KEYS = cfgmod.PATH_KEYS + cfgmod.NEUTRAL_KEYS

EPOCHS_NOTE = (
    "a run cannot be extended: its OneCycle learning-rate schedule (and the KL ramp-up and "
    "the released-code begin epoch) is laid out for the saved number of epochs from the first "
    "step, so more epochs would not continue it; train a new run with --out NEW_FOLDER and the "
    "epochs you want")


def _normal(key: str, value: Any) -> Any:
    """A flag's value as the saved config holds it (``--fold 1`` is the integer 1)."""
    if key == "fold" and isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def resumed_config(folder: str, saved: dict[str, Any], flags: dict[str, Any],
                   from_file: dict[str, Any], names: dict[str, str],
                   file_name: str | None = None) -> dict[str, Any]:
    """The config the run in ``folder`` continues with: ``saved`` with the free keys the
    command line gives. ``flags`` are the given flags (config keys, ``None`` left out),
    ``from_file`` the keys of the ``--config`` file, ``names`` each key's flag.

    Raises:
        UserError: naming every setting that differs from ``saved``.
    """
    given = {k: _normal(k, v) for k, v in {**from_file, **flags}.items() if k != "out"}
    # validate() fills the derived keys (ramp-up, recipe) a file may give as null
    candidate = cfgmod.validate({**saved, **given})
    differ = [k for k in candidate if k not in FREE_KEYS and candidate[k] != saved.get(k)]
    if differ:
        lines = [_conflict(k, saved.get(k), candidate[k], _source(k, flags, from_file, names,
                                                                  file_name))
                 for k in differ]
        raise UserError(
            f"--resume {folder}: a resumed run keeps the settings it started with, and these "
            "differ from its config.json:\n" + "\n".join(lines)
            + "\nDrop them to continue the run, or start a new run with --out NEW_FOLDER.")
    return {**saved, **{k: v for k, v in given.items() if k in FREE_KEYS}}


def _source(key: str, flags: dict[str, Any], from_file: dict[str, Any], names: dict[str, str],
            file_name: str | None) -> str:
    """Where a differing value came from: its flag, the ``--config`` file, or neither (a
    value derived from another key)."""
    if key in flags:
        return names.get(key, "--" + key.replace("_", "-"))
    if key in from_file:
        return f"{key} in {file_name}"
    return f"{key} (follows from the others)"


def _conflict(key: str, saved: Any, given: Any, source: str) -> str:
    line = f"  {source}: {key} is {saved!r} in the run, {given!r} given"
    return line + (f" ({EPOCHS_NOTE})" if key == "epochs" else "")
