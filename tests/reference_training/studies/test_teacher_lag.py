"""teacher_lag.py on fake run folders: the teacher's lag per third of the run, the last-epochs
and best-epoch metrics, and the method-against-method differences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference_training.metrics import METRICS
from reference_training.studies import teacher_lag


def _write_run(folder: Path, method: str, student: list[float],
               teacher: list[float] | None = None, last: int = 2) -> Path:
    """A finished run whose every val metric at epoch e is ``student[e]`` (the teacher's
    ``teacher[e]``), but AUC is 0.2 higher."""
    folder.mkdir(parents=True)
    epochs = len(student)
    summary = {"method": method, "seed": 2020, "epochs": epochs,
               "last_epochs": {"epochs": list(range(epochs - last + 1, epochs + 1))}}
    (folder / "summary.json").write_text(json.dumps(summary))
    prefixes = ("", "teacher_") if teacher is not None else ("",)
    cols = [f"{p}val_{m}" for p in prefixes for m in METRICS]
    lines = [",".join(["epoch", *cols])]
    for e, s in enumerate(student):
        t = teacher[e] if teacher is not None else 0.0
        values = [(t if c.startswith("teacher_") else s) + (0.2 if c.endswith("_auc") else 0)
                  for c in cols]
        lines.append(",".join([str(float(e + 1)), *map(str, values)]))
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_lag_table_numbers(tmp_path: Path) -> None:
    base = _write_run(tmp_path / "b", "baseline", [0.5, 0.6, 0.6, 0.7, 0.6, 0.65])
    mt = _write_run(tmp_path / "m", "mt", [0.5, 0.6, 0.7, 0.6, 0.7, 0.7],
                    [0.3, 0.4, 0.6, 0.6, 0.75, 0.7])
    text = teacher_lag.main([str(base), str(mt), "--out", str(tmp_path / "out")])
    # T − S per third: (-20 - 20) / 2 = -20.0, (-10 + 0) / 2 = -5.0, (+5 + 0) / 2 = +2.5;
    # the teacher is level or ahead on epochs 4, 5 and 6.
    assert "| mt, 6 epochs, seed 2020 | -20.0 | -5.0 | +2.5 | 3 of 6 |" in text
    # last 2 epochs: MT student bal. acc. 70.0 (AUC 90.0), teacher 72.5; the student's best
    # epoch by bal. acc. is the first at 70.0, epoch 3.
    assert ("| mt, 6 epochs, seed 2020 | 2 | 90.0 | 70.0 | 70.0 | 92.5 | 72.5 | 72.5 | "
            "90.0 | 70.0 | 70.0 | 3 |") in text
    assert "| baseline, 6 epochs, seed 2020 | 2 | 82.5 | 62.5 | 62.5 | – | – | – |" in text
    # MT − baseline: last +7.5 on every metric; best: 70.0 against 70.0 (epoch 4) = +0.0
    assert "| 6 epochs, seed 2020 | mt − baseline | +7.5 | +7.5 | +7.5 | +0.0 | +0.0 | +0.0 |" \
        in text
    assert (tmp_path / "out" / "table_lag.md").read_text() == text + "\n"
    assert (tmp_path / "out" / "teacher_lag.png").stat().st_size > 0


def test_runs_without_validation_are_refused(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"method": "mt", "seed": 1, "epochs": 1,
                                                  "last_epochs": {"epochs": [1]}}))
    (run / "metrics.csv").write_text("epoch,test_auc\n1.0,0.5\n")
    with pytest.raises(SystemExit, match="no validation metrics"):
        teacher_lag.main([str(run), "--out", str(tmp_path / "out")])
