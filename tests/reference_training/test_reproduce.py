"""The reproduction page's tables: grouping, ordering and seed-paired differences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference_training.compare import compare
from reference_training.metrics import METRICS
from reference_training.reproduce import paired_table, recall_time_table


def _summary(method: str, seed: int, bal: float, f1: float, recipe: str = "paper",
             seconds: float = 10.0) -> dict:
    test = {m: 0.5 for m in METRICS}
    test.update({"balanced_accuracy": bal, "f1": f1, "auc": 0.9})
    return {"dataset": "aptos", "method": method, "recipe": recipe,
            "model": "m", "seed": seed, "fold": 1, "classes": ["a", "b"],
            "last_epochs": {"epochs": [7, 8], "test": test}, "best_on_val": None,
            "test_recall_per_class": {"last_epochs": {"a": bal, "b": f1}},
            "train_seconds_per_epoch": seconds}


def test_paired_table_differences_and_wins() -> None:
    runs = [_summary("baseline", 1, 0.50, 0.40), _summary("baseline", 2, 0.60, 0.50),
            _summary("mt", 1, 0.52, 0.38), _summary("mt", 2, 0.64, 0.46),
            _summary("mt", 3, 0.99, 0.99),  # no baseline with seed 3: left out of the pair
            _summary("crckd", 1, 0.55, 0.45, recipe="released-code")]  # not the paper recipe
    table = paired_table(runs)
    rows = [line for line in table.splitlines() if line.startswith("| mt − baseline")]
    # balanced accuracy: +2 and +4 points -> mean +3.0, std 1.4; F1: -2 and -4 -> -3.0 ± 1.4
    assert rows == ["| mt − baseline | 2 | +3.0 ± 1.4 | -3.0 ± 1.4 | +0.0 ± 0.0 | 2/2 | 0/2 |"]
    assert "crckd" not in table
    assert paired_table([_summary("baseline", 1, 0.5, 0.4)]) == ""


def test_paired_table_sets_a_methods_recipes_side_by_side() -> None:
    runs = [_summary("crckd", 1, 0.50, 0.40), _summary("crckd", 2, 0.60, 0.50),
            _summary("crckd", 1, 0.53, 0.41, recipe="released-code"),
            _summary("crckd", 2, 0.62, 0.49, recipe="released-code"),
            _summary("mt", 1, 0.40, 0.40, recipe="released-code")]  # no paper run to pair
    rows = [line for line in paired_table(runs).splitlines() if "released-code" in line]
    # balanced accuracy +3 and +2 -> +2.5 ± 0.7; F1 +1 and -1 -> +0.0 ± 1.4
    assert rows == ["| crckd: released-code − paper | 2 | +2.5 ± 0.7 | +0.0 ± 1.4 | "
                    "+0.0 ± 0.0 | 2/2 | 1/2 |"]


def test_recall_time_table_groups_seeds_in_method_order() -> None:
    runs = [_summary("crckd", 1, 0.5, 0.4, seconds=12), _summary("baseline", 1, 0.2, 0.4),
            _summary("crckd", 2, 0.7, 0.4, seconds=14)]
    lines = recall_time_table(runs).splitlines()
    assert lines[2].startswith("| baseline / paper | 1 | 20.0 | 40.0 | 10 |")
    assert lines[3] == "| crckd / paper | 2 | 60.0 ± 14.1 | 40.0 ± 0.0 | 13 ± 1 |"


def test_compare_orders_methods_as_the_paper(tmp_path: Path) -> None:
    for i, (method, seed) in enumerate([("crckd", 1), ("mt", 1), ("baseline", 1), ("crp", 1)]):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(_summary(method, seed, 0.5, 0.5)))
    table = compare(sorted(tmp_path.iterdir()))
    order = [line.split(" / ")[1] for line in table.splitlines() if line.startswith("| aptos")]
    assert order == ["baseline", "mt", "crp", "crckd"]


def _write_run(folder: Path, summary: dict, curve: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    keys = [f"{part}_{m}" for part in ("val", "test") for m in METRICS]
    lines = [",".join(["epoch", *keys])]
    lines += [",".join([str(e + 1), *[str(v)] * len(keys)]) for e, v in enumerate(curve)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")



def _write_fold_runs(runs: Path, specs: list[tuple[str, int, int, float]]) -> None:
    """APTOS runs ``(method, seed, fold, balanced accuracy)`` under ``runs/aptos``, named as
    ``reproduce.py`` names them."""
    for method, seed, fold, bal in specs:
        summary = _summary(method, seed, bal, 0.4)
        summary["fold"] = fold
        name = f"{method}-paper-s{seed}" + (f"-fold{fold}" if fold != 1 else "")
        _write_run(runs / "aptos" / name, summary, [0.3, bal])

def test_collect_keeps_tagged_runs_out_of_the_main_tables(tmp_path: Path) -> None:
    from reference_training.reproduce import main

    runs = tmp_path / "runs"
    for method, seed, bal in (("baseline", 1, 0.5), ("baseline", 2, 0.6),
                              ("crckd", 1, 0.55), ("crckd", 2, 0.7)):
        _write_run(runs / "aptos" / f"{method}-paper-s{seed}",
                   _summary(method, seed, bal, 0.4), [0.3, bal])
    tagged = _summary("mt", 1, 0.99, 0.99)
    tagged["tag"] = "val, EMA 0.9"
    tagged["last_epochs"]["val"] = {m: 0.25 for m in METRICS}
    _write_run(runs / "aptos" / "mt-paper-s1-val-EMA-0.9", tagged, [0.2, 0.25])
    on_test = _summary("crckd", 2, 0.8, 0.8)
    on_test["tag"] = "EMA 0.9"
    _write_run(runs / "aptos" / "crckd-paper-s2-EMA-0.9", on_test, [0.5, 0.8])
    (runs / "aptos" / "crckd-paper-s2-EMA-0.9" / "config.json").write_text(json.dumps(
        {"ema_decay": 0.9, "data_dir": "/somewhere/aptos", "out": "/somewhere/runs"}))
    out = tmp_path / "docs"
    main(["--collect", "--runs", str(runs), "--docs-out", str(out), "--plot-seed", "1"])
    # the tagged test-fold run, beside the plain run of its method and seed only
    test_rows = [line for line in (out / "aptos" / "table_tagged_test.md").read_text()
                 .splitlines() if line.startswith("| aptos")]
    assert [row.split(" | ")[0] for row in test_rows] == [
        "| aptos / crckd / paper / m (n=1)", "| aptos / crckd / paper / m / EMA 0.9 (n=1)"]
    assert "| 70.00 |" in test_rows[0] and "| 80.00 |" in test_rows[1]
    table = (out / "aptos" / "table_last.md").read_text()
    assert "(n=2)" in table and "mt" not in table and "99.00" not in table
    assert "EMA" not in table
    paired = (out / "aptos" / "table_paired_last.md").read_text()
    assert "| crckd − baseline | 2 | +7.5 ± 3.5 |" in paired
    tagged_table = (out / "aptos" / "table_tagged_val.md").read_text()
    assert "aptos / mt / paper / m / val, EMA 0.9 (n=1) | 25.00" in tagged_table
    settings = json.loads((out / "aptos" / "crckd-paper-s2-EMA-0.9" / "config.json").read_text())
    assert settings == {"ema_decay": 0.9}  # no folder of the machine it ran on
    for name in ("curves_test.png", "curves_tagged_val.png", "crckd-paper-s1/metrics.csv"):
        assert (out / "aptos" / name).is_file()


def test_run_folder_names_keep_fold_one_unsuffixed() -> None:
    from reference_training.reproduce import run_folder_name

    assert run_folder_name("mt", "paper", 2020) == "mt-paper-s2020"
    assert run_folder_name("mt", "paper", 2020, fold=3) == "mt-paper-s2020-fold3"
    name = run_folder_name("mt", "paper", 2020, 2, "val, EMA 0.9")
    assert name == "mt-paper-s2020-fold2-val-EMA-0.9"


def test_collect_gives_other_folds_their_own_tables(tmp_path: Path) -> None:
    from reference_training.reproduce import main

    runs = tmp_path / "runs"
    # seed 1 on folds 1-3 for baseline and crckd; seed 2 on fold 1 only; an ablation on fold 1
    _write_fold_runs(runs, [("baseline", 1, 1, 0.50), ("baseline", 1, 2, 0.40),
                            ("baseline", 1, 3, 0.60), ("crckd", 1, 1, 0.55),
                            ("crckd", 1, 2, 0.42), ("crckd", 1, 3, 0.59),
                            ("baseline", 2, 1, 0.70), ("crp", 1, 1, 0.90)])
    out = tmp_path / "docs"
    main(["--collect", "--runs", str(runs), "--docs-out", str(out), "--plot-seed", "1"])
    def bal_acc(table: str) -> dict[str, str]:
        """Row label -> balanced accuracy cell (columns: auc, accuracy, precision, bal. acc.)."""
        rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| aptos")]
        return {row[0].removeprefix("| aptos / "): row[4] for row in rows}

    # fold 1 only: baseline seeds 1 and 2 (50, 70), crckd seed 1, crp seed 1
    assert bal_acc((out / "aptos" / "table_last.md").read_text()) == {
        "baseline / paper / m (n=2)": "60.00 ± 14.14", "crp / paper / m (n=1)": "90.00",
        "crckd / paper / m (n=1)": "55.00"}
    folds = (out / "aptos" / "table_folds_last.md").read_text()
    # folds 1-3 of seed 1: baseline 50, 40, 60; crckd 55, 42, 59; no crp, no seed 2
    assert bal_acc(folds) == {"baseline / paper / m (n=3)": "50.00 ± 10.00",
                              "crckd / paper / m (n=3)": "52.00 ± 8.89"}
    # crckd - baseline fold by fold: +5, +2, -1 -> +2.0 ± 3.0, ahead on 2 of 3 (F1 ties: 0/3)
    paired = [line for line in folds.splitlines() if line.startswith("| crckd − baseline")]
    assert len(paired) == 1 and paired[0].startswith("| crckd − baseline | 3 | +2.0 ± 3.0 |")
    assert paired[0].endswith("| 2/3 | 0/3 |") and "| folds |" in folds
    recall = (out / "aptos" / "table_folds_recall_time.md").read_text().splitlines()
    # recall of class "a" is the balanced accuracy given to _summary: baseline 50, 40, 60
    assert recall[2].startswith("| baseline / paper | 3 | 50.0 ± 10.0 |") and len(recall) == 4
    # no validation part in these runs: no best-on-validation table of n/a cells
    assert not (out / "aptos" / "table_folds_best.md").exists()



def test_collect_gives_a_fold_run_with_several_seeds_its_own_seed_table(tmp_path: Path) -> None:
    from reference_training.reproduce import main

    runs = tmp_path / "runs"
    # seed 1 on folds 1-3; seed 2 on folds 1 and 3 only (fewer folds: not in the CV table)
    _write_fold_runs(runs, [("baseline", 1, 1, 0.50), ("baseline", 1, 2, 0.40),
                            ("baseline", 1, 3, 0.60), ("crckd", 1, 1, 0.55),
                            ("crckd", 1, 2, 0.42), ("crckd", 1, 3, 0.59),
                            ("baseline", 2, 1, 0.70), ("crckd", 2, 1, 0.75),
                            ("baseline", 2, 3, 0.30), ("crckd", 2, 3, 0.20)])
    out = tmp_path / "docs"
    (out / "aptos").mkdir(parents=True)
    (out / "aptos" / "table_fold2_last.md").write_text("from an earlier collect")
    main(["--collect", "--runs", str(runs), "--docs-out", str(out), "--plot-seed", "1"])
    folds = (out / "aptos" / "table_folds_last.md").read_text()
    assert "(n=3)" in folds and "(n=5)" not in folds and "(n=2)" not in folds
    fold3 = (out / "aptos" / "table_fold3_last.md").read_text()
    # fold 3, seeds 1 and 2: crckd - baseline = -1 and -10 -> -5.5 ± 6.4, ahead in 0 of 2
    assert "| aptos / crckd / paper / m (n=2) | 90.00 ± 0.00 |" in fold3
    paired = [line for line in fold3.splitlines() if line.startswith("| crckd − baseline")]
    assert paired == ["| crckd − baseline | 2 | -5.5 ± 6.4 | +0.0 ± 0.0 | +0.0 ± 0.0 | 0/2 | 0/2 |"]
    assert "| seeds |" in fold3
    # fold 2 has one seed: no table, and the one an earlier collect left is gone
    assert not (out / "aptos" / "table_fold2_last.md").exists()
    assert not (out / "aptos" / "table_fold3_best.md").exists()

def test_collect_puts_tagged_runs_beside_plain_runs_with_the_same_validation_part(
        tmp_path: Path) -> None:
    # HAM10000 has one split: plain runs have a validation part, so a tagged run (a setting
    # changed) is compared with the plain run of its method and seed on validation and on test
    from reference_training.reproduce import main

    runs = tmp_path / "runs" / "ham10000"

    def ham(method: str, seed: int, val: float, test: float, tag: str | None = None) -> dict:
        summary = _summary(method, seed, test, test)
        summary["dataset"] = "ham10000"
        summary["last_epochs"]["val"] = {m: val for m in METRICS}
        if tag:
            summary["tag"] = tag
        return summary

    _write_run(runs / "mt-paper-s1", ham("mt", 1, 0.61, 0.62), [0.5, 0.6])
    _write_run(runs / "mt-paper-s2", ham("mt", 2, 0.11, 0.12), [0.5, 0.6])  # no tagged twin
    _write_run(runs / "mt-paper-s1-EMA-0.9", ham("mt", 1, 0.63, 0.64, "EMA 0.9"), [0.5, 0.6])
    out = tmp_path / "docs"
    main(["--collect", "--runs", str(tmp_path / "runs"), "--docs-out", str(out),
          "--plot-seed", "1"])
    val = (out / "ham10000" / "table_tagged_val.md").read_text()
    rows = [line.split(" | ")[:2] for line in val.split("at the best")[0].splitlines()
            if line.startswith("| ham10000")]
    assert rows == [["| ham10000 / mt / paper / m (n=1)", "61.00"],
                    ["| ham10000 / mt / paper / m / EMA 0.9 (n=1)", "63.00"]]
    test = (out / "ham10000" / "table_tagged_test.md").read_text()
    assert "| ham10000 / mt / paper / m (n=1) | 90.00 |" in test  # auc 0.9 in _summary
    assert "12.00" not in test and "11.00" not in val  # seed 2 has no tagged run
    assert "| ham10000 / mt / paper / m / EMA 0.9 (n=1) |" in test
    main_table = (out / "ham10000" / "table_last.md").read_text()
    assert "EMA" not in main_table


def test_grid_runs_concurrently_packs_and_continues_elsewhere(tmp_path: Path, make_ham) -> None:
    import tarfile

    from reference_training.reproduce import main

    ham = make_ham(tmp_path / "HAM10000", "parts")
    settings = tmp_path / "tiny.json"
    settings.write_text(json.dumps({
        "model": "tiny_cnn", "pretrained": False, "image_size": 16, "epochs": 2,
        "batch_size": 8, "num_positives": 3, "num_negatives": 16, "num_workers": 0,
        "eval_batch_size": 16, "cache_dir": str(tmp_path / "cache")}))
    runs, archive, report = tmp_path / "runs", tmp_path / "window1.tar", tmp_path / "tp.json"
    common = ["--datasets", "ham10000", "--ham-dir", str(ham), "--methods", "baseline", "mt",
              "--config", str(settings)]
    # a window that ends at once starts nothing and says so
    main([*common, "--runs", str(runs), "--window", "0", "--throughput-out", str(report)])
    assert len(json.loads(report.read_text())["stopped"]) == 2
    main([*common, "--runs", str(runs), "--concurrent", "2", "--pack", str(archive),
          "--throughput-out", str(report)])
    result = json.loads(report.read_text())
    assert result["finished"] == 2 and result["grid_images_per_second"] > 0
    assert all(v > 0 for v in result["runs_images_per_second"].values())
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "ham10000/mt-paper-s2020/last.pt" in names
    assert "ham10000/mt-paper-s2020/metrics.csv" in names
    assert "ham10000/mt-paper-s2020/environment.json" in names  # its sessions travel too
    elsewhere = tmp_path / "next_window"
    main([*common, "--runs", str(elsewhere), "--unpack", str(archive),
          "--throughput-out", str(report)])
    assert json.loads(report.read_text())["finished"] == 0  # both kept, nothing rerun
    assert (elsewhere / "ham10000" / "mt-paper-s2020" / "summary.json").is_file()


def test_paired_against_the_same_runs_measured_before(tmp_path: Path) -> None:
    from reference_training.compare import main as compare_main

    for root, bals in (("now", (0.55, 0.62)), ("before", (0.50, 0.64))):
        for seed, bal in zip((1, 2), bals, strict=True):
            folder = tmp_path / root / f"mt-paper-s{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(_summary("mt", seed, bal, 0.4)))
    table = compare_main([str(tmp_path / "now" / "mt-paper-s1"),
                          str(tmp_path / "now" / "mt-paper-s2"),
                          "--against", str(tmp_path / "before")])
    # balanced accuracy +5 and -2 points: +1.5 ± 4.9, ahead on one run of two; F1 and AUC equal
    assert "| aptos / mt / paper / m | 2 | +1.5 ± 4.9 | +0.0 ± 0.0 | +0.0 ± 0.0 | 1/2 | 0/2 | " \
        "0/2 |" in table
    with pytest.raises(SystemExit, match="error: no summary.json in .* to compare"):
        compare_main([str(tmp_path / "now" / "mt-paper-s1"), "--against", str(tmp_path)])
