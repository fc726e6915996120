"""TensorBoard event files of the reference training, read back with tensorboard's
``EventAccumulator``: the epoch rows as curves, and one point per epoch after a resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra writes the event files")
pytest.importorskip("sklearn")
pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from reference_training import engine, tensorboard_log  # noqa: E402
from reference_training import train as train_cli  # noqa: E402


def _curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_columns_become_tags() -> None:
    assert tensorboard_log.tag("train_loss") == "train/loss"
    assert tensorboard_log.tag("val_auc") == "val/auc"
    assert tensorboard_log.tag("teacher_test_balanced_accuracy") == "test/teacher_balanced_accuracy"
    assert tensorboard_log.tag("lr") == "schedule/lr"
    assert tensorboard_log.event_folder(None, Path("runs/a")) == Path("runs/a")
    assert tensorboard_log.event_folder("tb", Path("runs/a")) == Path("tb/a")
    assert tensorboard_log.event_folder("tb", Path("runs/cv/fold2")) == Path("tb/cv/fold2")


def test_a_killed_and_resumed_run_has_one_point_per_epoch(tmp_path: Path, ham: Path,
                                                          tiny_config) -> None:
    config = tiny_config(tmp_path, ham, "run", epochs=2, checkpoint_every_steps=2)
    with pytest.raises(engine.TrainingInterrupted):  # in epoch 2, after epoch 1's events
        engine.train(config, stop_after_steps=8, log=False)
    assert [s for s, _ in _curves(Path(config["out"]))["train/loss"]] == [1]
    train_cli.main(["--resume", config["out"], "--no-progress"])
    curves = _curves(Path(config["out"]))
    rows = list(csv.DictReader(open(Path(config["out"]) / "metrics.csv")))
    for column, tag in (("train_loss", "train/loss"), ("test_auc", "test/auc"),
                        ("teacher_val_accuracy", "val/teacher_accuracy"), ("lr", "schedule/lr")):
        assert [s for s, _ in curves[tag]] == [1, 2], tag
        assert [v for _, v in curves[tag]] == pytest.approx(
            [float(r[column]) for r in rows], rel=1e-6), tag


def test_a_resume_from_an_earlier_epoch_replaces_the_later_points(tmp_path: Path) -> None:
    """A run killed between an epoch's events and its checkpoint writes that epoch again."""
    first = tensorboard_log.open_writer({}, tmp_path, 0)
    for epoch in (1, 2, 3):
        tensorboard_log.write_row(first, {"epoch": epoch, "train_loss": float(epoch)})
    first.close()
    resumed = tensorboard_log.open_writer({}, tmp_path, 1)  # its checkpoint is epoch 1's
    for epoch in (2, 3):
        tensorboard_log.write_row(resumed, {"epoch": epoch, "train_loss": 10.0 * epoch})
    resumed.close()
    assert _curves(tmp_path)["train/loss"] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_tensorboard_false_writes_nothing(tmp_path: Path) -> None:
    assert tensorboard_log.open_writer({"tensorboard": False}, tmp_path, 0) is None
    tensorboard_log.write_row(None, {"epoch": 1, "lr": 0.1})
    assert not list(tmp_path.iterdir())
