"""compare_teachers.py's collect part on fake run folders: which run is which setting and case,
the table's numbers, and that checkpoints stay behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference_training.config import resolve
from reference_training.engine import teacher_setting
from reference_training.metrics import METRICS
from reference_training.studies import compare_teachers as ct


def _write_run(folder: Path, setting: str, student: list[float], teacher: list[float],
               tag: str = "val, teacher ") -> None:
    """A finished run: every val metric of the student (teacher) at epoch e is
    ``student[e]`` (``teacher[e]``), but macro F1 is 0.1 lower."""
    folder.mkdir(parents=True)
    buffers, train_mode = ct.SETTINGS[setting]
    summary = {"dataset": "aptos", "fold": 1, "model": "small_cnn", "epochs": len(student),
               "tag": tag + setting, "last_epochs": {"epochs": [len(student) - 1,
                                                                len(student)]},
               "teacher": {"buffers": buffers, "train_mode": train_mode}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.json").write_text(json.dumps({"image_size": 32, "pretrained": False}))
    (folder / "last.pt").write_bytes(b"checkpoint")
    cols = [f"{p}{part}_{m}" for p in ("", "teacher_") for part in ("val", "test")
            for m in METRICS]
    lines = [",".join(["epoch", *cols])]
    for e, (s, t) in enumerate(zip(student, teacher, strict=True)):
        values = [(s if not c.startswith("teacher_") else t) - (0.1 if c.endswith("_f1") else 0)
                  for c in cols]
        lines.append(",".join([str(float(e + 1)), *map(str, values)]))
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_collect_table_numbers(tmp_path: Path) -> None:
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    _write_run(runs / "aptos" / "own", "own-train", [0.5, 0.6, 0.7], [0.5, 0.8, 0.6])
    _write_run(runs / "aptos" / "copy", "copy-eval", [0.5, 0.6, 0.7], [0.2, 0.3, 0.5])
    text = ct.collect(runs, docs)
    case = "aptos fold 1, small_cnn from scratch, 32 px, 3 epochs (val)"
    # last 2 epochs: student (0.6 + 0.7) / 2 = 65.0, F1 55.0; copy teacher 40.0, F1 30.0
    # and T − S over all epochs: copy (-30 - 30 - 20) / 3 = -26.7, own (0 + 20 - 10) / 3 = +3.3
    assert f"| {case} | copy-eval | 40.0 | 65.0 | -25.0 | 30.0 | 55.0 | -25.0 | -26.7 |" in text
    assert f"| {case} | own-train | 70.0 | 65.0 | +5.0 | 60.0 | 55.0 | +5.0 | +3.3 |" in text
    # best epoch by balanced accuracy: own-train teacher 80.0 at epoch 2, student 70.0 at 3
    assert f"| {case} | own-train | 80.0 (2) | 70.0 (3) | +10.0 | 70.0 | 60.0 | +10.0 |" in text
    lines = text.splitlines()
    assert lines.index(next(x for x in lines if "copy-eval" in x)) < \
        lines.index(next(x for x in lines if "own-train" in x))  # settings in SETTINGS order
    assert (docs / "table.md").read_text() == text + "\n"
    assert (docs / "teachers_val.png").stat().st_size > 0
    assert (docs / "aptos" / "own" / "metrics.csv").is_file()
    assert not (docs / "aptos" / "own" / "last.pt").exists()


@pytest.mark.parametrize("recipe,keys,expected", [
    ("paper", {}, {}),  # the library's defaults
    ("released-code", {}, {"buffers": "leave", "train_mode": True}),
    ("paper", {"teacher_buffers": "average"}, {"buffers": "average"}),
    ("released-code", {"teacher_train_mode": False}, {"buffers": "leave", "train_mode": False}),
])
def test_teacher_setting_follows_the_recipe_unless_set(recipe: str, keys: dict,
                                                       expected: dict) -> None:
    config = resolve({"method": "mt", "recipe": recipe, **keys})
    assert teacher_setting(config) == expected


def test_teacher_keys_are_checked() -> None:
    with pytest.raises(ValueError, match="teacher_buffers"):
        resolve({"method": "mt", "teacher_buffers": "mean"})
