"""compare.py: rows of comparable runs only, unfinished runs skipped, environments noted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference_training.compare import compare
from reference_training.compare import main as compare_main
from reference_training.metrics import METRICS


def _run(folder: Path, seed: int, epochs: int, bal: float, torch_version: str = "2.5.1",
         method: str = "mt") -> Path:
    """A finished run folder: summary.json, config.json and environment.json."""
    folder.mkdir(parents=True)
    test = {m: 0.5 for m in METRICS}
    test["balanced_accuracy"] = bal
    (folder / "summary.json").write_text(json.dumps({
        "dataset": "ham10000", "method": method, "recipe": "paper", "model": "m", "seed": seed,
        "fold": None, "last_epochs": {"epochs": [epochs], "test": test},
        "best_on_val": None}))
    (folder / "config.json").write_text(json.dumps({
        "dataset": "ham10000", "method": method, "recipe": "paper", "model": "m",
        "seed": seed, "epochs": epochs, "rampup_epochs": 30 * epochs / 80, "lr": 3e-4,
        "out": str(folder), "device": "cpu", "num_workers": 2}))
    (folder / "environment.json").write_text(json.dumps({"sessions": [{
        "crckd_losses": "0.3.0", "crckd_losses_git": "abc", "torch": torch_version,
        "cuda": None, "device": "cpu (x86_64)"}]}))
    return folder


def test_runs_that_differ_in_their_config_are_not_pooled(tmp_path: Path) -> None:
    _run(tmp_path / "a", 1, 6, 0.50)
    _run(tmp_path / "b", 2, 6, 0.60)
    _run(tmp_path / "c", 1, 2, 0.20)
    table = compare(sorted(tmp_path.iterdir()))
    # the seeds of the 6-epoch setting pool; the 2-epoch run is a row of its own, named by the
    # key it differs in (not by the ramp-up that follows from it, nor by its folder or device)
    assert "| ham10000 / mt / paper / m / epochs=6 (n=2) | 50.00 ± 0.00 | 50.00 ± 0.00 | " \
        "50.00 ± 0.00 | 55.00 ± 7.07 |" in table
    assert "| ham10000 / mt / paper / m / epochs=2 (n=1) | 50.00 | 50.00 | 50.00 | 20.00 |" \
        in table
    assert "rampup" not in table and "note" not in table


def test_a_folder_without_a_summary_is_listed_as_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path / "runs" / "a", 1, 6, 0.5)
    failed = tmp_path / "runs" / "failed"
    failed.mkdir()
    (failed / "config.json").write_text("{}")
    table = compare_main([str(p) for p in sorted((tmp_path / "runs").iterdir())])
    assert "(n=1)" in table
    assert table.endswith(f"skipped (no summary.json: the run failed or has not finished): "
                          f"{failed}")
    with pytest.raises(SystemExit, match=f"error: no finished run .* in {failed}"):
        compare_main([str(failed)])


def test_a_row_whose_runs_ran_on_different_versions_says_so(tmp_path: Path) -> None:
    _run(tmp_path / "a", 1, 6, 0.5, torch_version="2.4.0")
    _run(tmp_path / "b", 2, 6, 0.6, torch_version="2.5.1")
    _run(tmp_path / "c", 1, 6, 0.6, method="baseline")
    table = compare(sorted(tmp_path.iterdir()))
    assert "note: the runs of ham10000 / mt / paper / m (n=2) differ in what ran them " \
        "(environment.json): torch 2.4.0 / 2.5.1" in table
    assert "baseline / paper / m (n=1) differ" not in table
