"""reference_training/plots.py: the run plots are titled, CCD has a panel of its own, and every
metric is drawn in percent, as the printed tables give it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from reference_training import plots, runfiles  # noqa: E402


def _history(with_ccd: bool) -> list[dict[str, float]]:
    rows = []
    for epoch in (1, 2, 3):
        row = {"epoch": epoch, "train_loss": 2.5 / epoch, "train_ce": 1.0 / epoch}
        if with_ccd:
            row |= {"train_kl": 0.1, "train_ccd": 13.0 - epoch, "train_crp": 0.8}
        for who in ("", "teacher_"):
            for part in ("val", "test"):
                row |= {f"{who}{part}_{m}": 0.5 + 0.1 * epoch for m in plots.CURVE_METRICS}
        rows.append(row)
    return rows


def _lines(ax) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}


def test_ccd_has_its_own_panel() -> None:
    fig = plots.losses_figure(_history(with_ccd=True), "crckd (paper), sample, seed 0")
    shared, ccd = fig.axes
    assert sorted(_lines(shared)) == ["ce", "crp", "kl", "loss"]
    assert list(_lines(ccd)) == ["ccd"] and "ccd" in ccd.get_title()
    assert fig.get_suptitle() == "crckd (paper), sample, seed 0: training losses"
    assert all(ax.get_title() and ax.get_xlabel() == "epoch" for ax in fig.axes)


def test_a_run_without_ccd_has_one_loss_panel() -> None:
    fig = plots.losses_figure(_history(with_ccd=False))
    assert len(fig.axes) == 1 and sorted(_lines(fig.axes[0])) == ["ce", "loss"]


def test_metrics_are_in_percent() -> None:
    fig = plots.metrics_figure(_history(with_ccd=True), "mt (paper), aptos, seed 1")
    assert [ax.get_title() for ax in fig.axes] == list(plots.CURVE_METRICS.values())
    for ax in fig.axes:
        assert ax.get_ylabel() == "%"
        lines = _lines(ax)
        assert sorted(lines) == ["student test", "student val", "teacher test", "teacher val"]
        assert lines["student test"] == pytest.approx([60.0, 70.0, 80.0])
    assert fig.get_suptitle() == "mt (paper), aptos, seed 1: metrics"


def test_plot_curves_writes_both_pngs(tmp_path: Path) -> None:
    plots.plot_curves(_history(with_ccd=True), tmp_path, "a run")
    for name in (runfiles.LOSSES_PLOT, runfiles.METRICS_PLOT):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
