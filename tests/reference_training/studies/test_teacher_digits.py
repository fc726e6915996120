"""teacher_digits.py: the teacher-setting comparison on digits runs end to end."""

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from reference_training.studies import teacher_digits


def test_one_epoch_grid_writes_its_table(tmp_path: Path) -> None:
    teacher_digits.main(["--out", str(tmp_path), "--seeds", "0", "--epochs", "1", "--last", "1"])
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert len(runs) == 7  # baseline, then MT and CRCKD with each of the three teachers
    assert set(runs["baseline/-/0"][0]) == {"epoch", "student"}
    assert set(runs["crckd/average-eval/0"][0]) == {"epoch", "student", "teacher"}
    table = (tmp_path / "table.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[1] for r in rows] == ["-", "copy-eval", "average-eval", "own-train",
                                                 "copy-eval", "average-eval", "own-train"]
    student = 100 * runs["mt/own-train/0"][-1]["student"]
    assert f"{student:.1f}" in rows[3]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
