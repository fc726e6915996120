"""reference_training/studies/inspect_fit.py: the train/test fit scores on inputs whose answers are
known, and on a real (tiny) run of a method without a bank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reference_training.studies.inspect_fit import balanced_accuracy, fit_scores, inspect_run, main


def test_balanced_accuracy_averages_recall_over_present_classes() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 1, 0, 2])
    # recall 2/3, 1, 1/2; class 3 is absent and left out
    assert balanced_accuracy(predicted, labels, 4) == pytest.approx((2 / 3 + 1 + 0.5) / 3)


def test_fit_scores_on_known_features() -> None:
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # training images: class 0 on e1, class 1 on e2, classifier right on all
    train = (torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]]),
             torch.tensor([e1, e1, e2, e2]), torch.tensor([0, 0, 1, 1]))
    # test images: one class-1 image lies on e1 (nearest to centroid 0); the classifier calls
    # one class-0 image class 1
    test = (torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]),
            torch.tensor([e1, e1, [3.0, 0.1]]), torch.tensor([0, 1, 1]))
    row = fit_scores(train, test, 2)
    assert row["train bal. acc."] == 1.0 and row["train NC"] == 1.0
    assert row["test bal. acc."] == pytest.approx((0.0 + 0.5) / 2)
    assert row["test NC"] == pytest.approx((1.0 + 0.0) / 2)
    assert row["bal. acc. gap"] == pytest.approx(0.75)
    assert row["NC gap"] == pytest.approx(0.5)


def test_scores_a_real_run_without_a_bank(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make_ham, tiny_config) -> None:
    pytest.importorskip("sklearn")
    from reference_training import engine

    data = make_ham(tmp_path / "HAM10000", "parts")
    config = tiny_config(tmp_path, data, method="mt", epochs=1)
    summary = engine.train(config, log=False)
    row = inspect_run(Path(config["out"]))
    for key in ("train bal. acc.", "test bal. acc.", "train NC", "test NC"):
        assert 0.0 <= row[key] <= 1.0, key
    # the student scored here is the one the run's last test metrics came from
    assert row["test bal. acc."] == pytest.approx(summary["final_test"]["balanced_accuracy"])
    main([config["out"]])
    assert f"| ham10000 / {Path(config['out']).name} |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no last.pt"):
        inspect_run(tmp_path)
