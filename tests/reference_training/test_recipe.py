"""reference_training/recipe.py: what each recipe sets, and the released code's settings a
user can switch on alone (lr reset, float32, sampler, last partial batch, metric averages)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

from reference_training import config as cfgmod
from reference_training import data as datamod
from reference_training import engine
from reference_training.metrics import compute_metrics


def test_each_recipe_fills_its_settings_and_a_key_set_alone_wins() -> None:
    paper = cfgmod.resolve({"dataset": "ham10000", "data_dir": "x"})
    assert (paper["epoch_lr_reset"], paper["amp"], paper["sampler"], paper["drop_last"],
            paper["metric_labels"]) == (False, True, None, True, "present")
    released = cfgmod.resolve({"dataset": "ham10000", "data_dir": "x",
                               "recipe": "released-code"})
    assert released["epoch_lr_reset"] == pytest.approx(1e-4)  # its base_lr at the 3e-4 peak
    assert (released["amp"], released["sampler"], released["drop_last"],
            released["metric_labels"]) == (False, "independent", False, "sklearn")
    alone = cfgmod.resolve({"dataset": "ham10000", "data_dir": "x", "drop_last": False,
                            "epoch_lr_reset": 2e-4})
    assert alone["drop_last"] is False and alone["epoch_lr_reset"] == 2e-4
    assert alone["amp"] is True and alone["metric_labels"] == "present"
    with pytest.raises(ValueError, match="metric_labels"):
        cfgmod.resolve({"dataset": "ham10000", "data_dir": "x", "metric_labels": "all"})
    with pytest.raises(ValueError, match="epoch_lr_reset"):
        cfgmod.resolve({"dataset": "ham10000", "data_dir": "x", "epoch_lr_reset": -1.0})


def test_real_datasets_default_to_imagenet_weights() -> None:
    for dataset in ("ham10000", "aptos"):
        config = cfgmod.resolve({"dataset": dataset, "data_dir": "x"})
        assert config["model"] == "densenet121" and config["pretrained"] is True


def test_missing_weights_stop_the_run_before_it_writes_anything(
        tmp_path: Path, ham: Path, tiny_config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    config = tiny_config(tmp_path, ham, model="resnet18", pretrained=True)
    with pytest.raises(FileNotFoundError, match=r"--weights PATH.*efficientnet_lite0"):
        engine.train(config, log=False)
    assert not Path(config["out"]).exists()


def test_last_partial_batch_is_kept_when_drop_last_is_off() -> None:
    # The released code's loader: 2929 APTOS training images at 64 give 46 steps, not 45.
    assert datamod.GlobalBatchSampler(2929, 64, 0, drop_last=False).steps_per_epoch == 46
    assert datamod.GlobalBatchSampler(2929, 64, 0).steps_per_epoch == 45
    one = datamod.GlobalBatchSampler(21, 8, 3, drop_last=False)
    batches = list(one)
    assert [len(b) for b in batches] == [8, 8, 5]
    assert sorted(i for b in batches for i in b) == list(range(21))
    assert one.global_size(2) == 5
    # two ranks: slices of the partial batch are as even as they go and cover it once
    ranks = [datamod.GlobalBatchSampler(21, 8, 3, rank=r, world_size=2, drop_last=False)
             for r in range(2)]
    per_rank = [list(r) for r in ranks]
    assert [len(b) for b in per_rank[0]] == [4, 4, 3] and [len(b) for b in per_rank[1]] == [4, 4, 2]
    for step in range(3):
        assert per_rank[0][step] + per_rank[1][step] == batches[step]


def test_sklearn_averages_match_scikit_learn_when_a_class_is_absent() -> None:
    from sklearn.metrics import f1_score, precision_score

    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 3, 1, 2, 2, 2])  # class 3 is predicted once but absent
    probs = np.eye(4)[pred] * 0.9 + 0.025
    released = compute_metrics(labels, probs, 4, "sklearn")
    assert released["precision"] == pytest.approx(precision_score(labels, pred, average="macro",
                                                                  zero_division=0))
    assert released["f1"] == pytest.approx(f1_score(labels, pred, average="macro",
                                                    zero_division=0))
    # imblearn's specificity_score(average="macro"): tn / (tn + fp) over classes 0..3
    spec = []
    for c in range(4):
        tn = np.sum((labels != c) & (pred != c))
        fp = np.sum((labels != c) & (pred == c))
        spec.append(tn / (tn + fp))
    assert released["specificity"] == pytest.approx(np.mean(spec))
    paper = compute_metrics(labels, probs, 4)
    assert paper["precision"] == pytest.approx(precision_score(labels, pred, labels=[0, 1, 2],
                                                               average="macro", zero_division=0))
    assert paper["specificity"] == pytest.approx(np.mean(spec[:3]))
    everyone = np.array([0, 1, 2, 3, 0, 1])
    both = [compute_metrics(everyone, np.eye(4)[[0, 1, 2, 3, 1, 1]], 4, mode)
            for mode in ("present", "sklearn")]
    assert both[0] == both[1]


def test_released_code_recipe_resets_the_lr_after_each_epoch(tmp_path: Path, ham: Path,
                                                             tiny_config) -> None:
    config = tiny_config(tmp_path, ham, recipe="released-code", epochs=2, begin_epoch=1)
    engine.train(config, log=False)
    state = torch.load(Path(config["out"]) / "last.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(config["lr"] / 3)
    rows = list(csv.DictReader(open(Path(config["out"]) / "metrics.csv")))
    # metrics.csv keeps the scheduled lr the epoch ended on
    assert float(rows[-1]["lr"]) != pytest.approx(config["lr"] / 3)
    paper = tiny_config(tmp_path, ham, "paper", epochs=2)
    engine.train(paper, log=False)
    state = torch.load(Path(paper["out"]) / "last.pt", weights_only=True)
    rows = list(csv.DictReader(open(Path(paper["out"]) / "metrics.csv")))
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(float(rows[-1]["lr"]))


def test_released_code_recipe_killed_and_resumed_ends_like_an_uninterrupted_run(
        tmp_path: Path, ham: Path, tiny_config) -> None:
    common = {"epochs": 2, "checkpoint_every_steps": 2, "recipe": "released-code",
              "begin_epoch": 1, "batch_size": 7}
    straight = tiny_config(tmp_path, ham, "straight", **common)
    engine.train(straight, log=False)
    broken = tiny_config(tmp_path, ham, "broken", **common)
    with pytest.raises(engine.TrainingInterrupted):
        engine.train(broken, stop_after_steps=9, log=False)
    engine.train(broken, resume=broken["out"], log=False)
    a = (Path(straight["out"]) / "metrics.csv").read_text()
    b = (Path(broken["out"]) / "metrics.csv").read_text()
    assert a == b


@pytest.mark.parametrize("recipe", ["paper", "released-code"])
def test_crp_ablation_runs_under_both_recipes(tmp_path: Path, ham: Path, tiny_config,
                                              recipe: str) -> None:
    config = tiny_config(tmp_path, ham, method="crp", recipe=recipe, crp_anchors="rows",
                         crp_anchor_rows=4, epochs=2, begin_epoch=0)
    assert config["crp_anchor_norm"] is (recipe == "released-code")
    engine.train(config, log=False)
    rows = list(csv.DictReader(open(Path(config["out"]) / "metrics.csv")))
    assert all(np.isfinite(float(r["train_crp"])) and float(r["train_crp"]) >= 0 for r in rows)
