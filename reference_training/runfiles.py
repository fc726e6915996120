"""A run folder's file names and the one way files are written into it (atomically).

Every module that reads or writes a run folder names its files from here, so a reader
finds the layout in one place:

- ``config.json``: the resolved config; ``split.csv``: the split (one row per image);
- ``metrics.csv``: one row per epoch (losses, weights, the student's and the teacher's metrics);
- ``summary.json``: the protocols (mean of the last epochs, best on validation);
- ``last.pt``: the training state (:mod:`reference_training.checkpoint`); ``best.pt``: the
  student at the best validation epoch;
- the plots ``losses.png``, ``metrics.png``, ``confusion_test.png``, ``embedding_test.png``;
- ``cv_summary.md``: the table over the folds of a cross-validation root folder;
- ``environment.json``: what ran it, each session (versions, commit, device, command line,
  start and end times; :mod:`reference_training.environment`).

A write goes to a temporary file in the same folder, then ``os.replace``: a run killed at
any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError, disk_full

CONFIG = "config.json"
SPLIT = "split.csv"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
LOSSES_PLOT = "losses.png"
METRICS_PLOT = "metrics.png"
CONFUSION_PLOT = "confusion_test.png"
EMBEDDING_PLOT = "embedding_test.png"
PLOTS = (METRICS_PLOT, LOSSES_PLOT, CONFUSION_PLOT, EMBEDDING_PLOT)
CV_SUMMARY = "cv_summary.md"
ENVIRONMENT = "environment.json"
#: The files that make a folder a run folder (never overwritten without --overwrite).
RUN_FILES = (CONFIG, SPLIT, METRICS, SUMMARY, LAST_CHECKPOINT, BEST_CHECKPOINT, *PLOTS,
             CV_SUMMARY, ENVIRONMENT)


def run_files_in(folder: Path) -> list[str]:
    """The run files :data:`RUN_FILES` that ``folder`` holds."""
    return [name for name in RUN_FILES if (Path(folder) / name).is_file()]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` for a temporary path beside ``path``, then moves it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if not disk_full(error):
            raise
        kept = (f"the previous {path.name} is intact" if path.exists()
                else f"there was no earlier {path.name}")
        raise UserError(
            f"the disk is full (or read-only): writing {path} failed ({error.__class__.__name__}"
            f": {str(error).strip()[:120]}); {kept}. Free some space, then continue the run "
            f"with --resume {path.parent}") from error
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(text: str, path: Path) -> None:
    """``text`` (UTF-8) to ``path``, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(obj: Any, path: Path) -> None:
    """JSON with NaN written as ``null``, atomically."""
    write_text(json.dumps(json_safe(obj), indent=2) + "\n", path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
