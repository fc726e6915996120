"""TensorBoard event files of a run: each epoch's ``metrics.csv`` row as scalars, the epoch
(1, 2, ...) as the step.

Tags: ``train/<loss>``, ``val/<metric>`` and ``test/<metric>`` for the student,
``val/teacher_<metric>`` and ``test/teacher_<metric>`` for the mean teacher beside them, and
``schedule/lr`` and ``schedule/<term>_weight``. A resumed run opens the same folder with
``purge_step`` at its first epoch, so epochs written after its checkpoint by the killed run are
dropped and each curve has one point per epoch. (Not named ``tensorboard``: a script run from
this folder would import it in place of the package.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INSTALL = "pip install tensorboard (or the project's extra: pip install -e \".[tensorboard]\")"


def event_folder(setting: str | None, out_dir: Path) -> Path:
    """The run folder, or ``<setting>/<run name>`` (``<cv root>/<foldK>`` for a fold)."""
    if not setting:
        return out_dir
    name = Path(out_dir.name)
    if out_dir.name.startswith("fold"):
        name = Path(out_dir.parent.name, out_dir.name)
    return Path(setting) / name


def open_writer(config: dict[str, Any], out_dir: Path, first_epoch: int,
                log: bool = True) -> Any:
    """A ``SummaryWriter`` for the run, whose first new epoch is ``first_epoch`` (0-based), or
    ``None`` with ``tensorboard: false`` or, unless a folder was asked for, without
    tensorboard installed."""
    setting = config.get("tensorboard")
    if setting is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if setting:
            raise ImportError(f"--tensorboard {setting} needs tensorboard: {INSTALL}") from None
        if log:
            print(f"no TensorBoard event files: tensorboard is not installed ({INSTALL})")
        return None
    return SummaryWriter(str(event_folder(setting, out_dir)), purge_step=first_epoch + 1)


def tag(key: str) -> str:
    """A ``metrics.csv`` column as a TensorBoard tag."""
    for part in ("train", "val", "test"):
        if key.startswith(f"{part}_"):
            return f"{part}/{key[len(part) + 1:]}"
        if key.startswith(f"teacher_{part}_"):
            return f"{part}/teacher_{key[len(part) + 9:]}"
    return f"schedule/{key}"


def write_row(writer: Any, row: dict[str, float]) -> None:
    """The epoch's row as scalars at step ``row["epoch"]``, flushed (a no-op without a
    writer)."""
    if writer is None:
        return
    step = int(row["epoch"])
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(tag(key), value, step)
    writer.flush()
