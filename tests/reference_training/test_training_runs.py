"""reference_training runs: every method, both recipes, resume, DDP, compare, real data."""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")


from reference_training import config as cfgmod
from reference_training import engine
from reference_training import train as train_cli
from reference_training.compare import compare


@pytest.mark.parametrize("method", cfgmod.METHODS)
def test_every_method_runs_and_writes_its_outputs(
        tmp_path: Path, ham: Path, method: str, tiny_config) -> None:
    config = tiny_config(tmp_path, ham, method=method, epochs=2)
    summary = engine.train(config, log=False)
    run = Path(config["out"])
    for name in ("config.json", "metrics.csv", "summary.json", "split.csv", "last.pt",
                 "best.pt", "losses.png", "metrics.png", "confusion_test.png",
                 "embedding_test.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 2
    for key in ("val_auc", "test_auc", "test_accuracy", "test_precision",
                "test_balanced_accuracy", "test_f1", "test_kappa", "test_specificity"):
        assert key in rows[0]
    assert summary["method"] == method and summary["best_on_val"] is not None
    assert 0 <= summary["last_epochs"]["test"]["accuracy"] <= 1
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["crckd"] is not None) == (method in ("crd", "ccd", "crp", "crckd"))
    assert (state["teacher"] is not None) == (method != "baseline")
    if state["crckd"] is not None:
        assert "student_bank.memory" in state["crckd"] and "ccd.log_normalizer" in state["crckd"]


def test_released_code_recipe_runs(tmp_path: Path, ham: Path, tiny_config) -> None:
    config = tiny_config(tmp_path, ham, recipe="released-code", epochs=2, begin_epoch=1)
    engine.train(config, log=False)
    rows = list(csv.DictReader(open(Path(config["out"]) / "metrics.csv")))
    assert float(rows[0]["kl_weight"]) == 0.0 and float(rows[0]["crp_weight"]) == 0.0
    assert float(rows[1]["ccd_weight"]) == pytest.approx(0.01)
    assert float(rows[1]["crp_weight"]) == 1.0


def test_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_run(
        tmp_path: Path, ham: Path, tiny_config) -> None:
    common = {"epochs": 2, "checkpoint_every_steps": 2}
    straight = tiny_config(tmp_path, ham, "straight", **common)
    engine.train(straight, log=False)
    broken = tiny_config(tmp_path, ham, "broken", **common)
    steps = (len(list(csv.DictReader(open(Path(straight["out"]) / "split.csv")))) and None)
    del steps
    # 5 steps per epoch here: checkpoints after global steps 2, 4, 5 (epoch end), 7; stopping
    # after step 8 loses step 8, which the resumed run repeats.
    with pytest.raises(engine.TrainingInterrupted):
        engine.train(broken, stop_after_steps=8, log=False)
    state = torch.load(Path(broken["out"]) / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    train_cli.main(["--resume", broken["out"], "--no-progress"])
    a = (Path(straight["out"]) / "metrics.csv").read_text()
    b = (Path(broken["out"]) / "metrics.csv").read_text()
    assert a == b
    # The summary still covers the epochs of the interrupted session.
    ja = json.loads((Path(straight["out"]) / "summary.json").read_text())
    jb = json.loads((Path(broken["out"]) / "summary.json").read_text())
    assert set(ja["test_recall_per_class"]) == {"last_epochs", "best_on_val"}
    assert jb["test_recall_per_class"] == ja["test_recall_per_class"]
    assert jb["train_seconds_per_epoch"] is not None
    sa = torch.load(Path(straight["out"]) / "last.pt", weights_only=True)
    sb = torch.load(Path(broken["out"]) / "last.pt", weights_only=True)
    for part in ("student", "teacher", "crckd"):
        for key, value in sa[part].items():
            assert torch.equal(value, sb[part][key]), (part, key)


def test_killed_before_its_first_checkpoint_resumes_from_scratch(tmp_path: Path, ham: Path,
                                                                 tiny_config) -> None:
    """A real ``kill -9`` while the run is still setting up (no ``last.pt``): ``--resume``
    starts it afresh from the folder's config and split and ends like an uninterrupted run."""
    import signal
    import subprocess
    import time

    straight = tiny_config(tmp_path, ham, "straight", epochs=2)
    engine.train(straight, log=False)
    out = tmp_path / "killed"
    flags = ["--dataset", "ham10000", "--data-dir", str(ham), "--model", "tiny_cnn",
             "--no-pretrained", "--image-size", "16", "--epochs", "2", "--batch-size", "8",
             "--lr", "1e-3", "--num-workers", "0", "--no-progress", "--out", str(out)]
    # the run's own settings, through a config file as a user would write them
    extra = {k: straight[k] for k in ("num_positives", "num_negatives", "cache_dir",
                                      "eval_batch_size")}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    script = Path(train_cli.__file__)
    proc = subprocess.Popen([sys.executable, str(script), *flags, "--config",
                             str(tmp_path / "extra.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "config.json").is_file() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "config.json").is_file()
    if (out / "last.pt").is_file():
        pytest.skip("the run reached its first checkpoint before the kill landed")
    train_cli.main(["--resume", str(out), "--no-progress"])
    assert (out / "metrics.csv").read_text() == (
        Path(straight["out"]) / "metrics.csv").read_text()


def test_resume_of_a_folder_with_nothing_in_it_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="nothing to resume.*--out"):
        train_cli.main(["--resume", str(tmp_path)])


def test_cli_aptos_all_folds_and_compare(tmp_path: Path, make_aptos) -> None:
    root = make_aptos(tmp_path / "aptos", per_class=8)
    out = tmp_path / "cv"
    summaries = train_cli.main([
        "--dataset", "aptos", "--data-dir", str(root), "--model", "tiny_cnn", "--method", "mt",
        "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--fold", "all",
        "--num-workers", "0", "--no-progress", "--out", str(out)])
    assert len(summaries) == 5 and all(s["best_on_val"] is None for s in summaries)
    table = (out / "cv_summary.md").read_text()
    assert "aptos / mt / paper / tiny_cnn (n=5)" in table and "±" in table
    assert "n=5" in compare([out / f"fold{k}" for k in range(1, 6)])
    md = tmp_path / "table.md"
    train_cli.main(["compare", str(out), "--out", str(md)])
    assert md.read_text().startswith("test, mean of the last epochs")


def test_pretrained_without_cached_weights_says_how_to_supply_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reference_training.models import build_network

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError, match="--weights PATH"):
        build_network("resnet18", 7, pretrained=True)
    net = build_network("resnet18", 7)
    weights = tmp_path / "r18.pt"
    torch.save(net.backbone.state_dict(), weights)
    loaded = build_network("resnet18", 7, weights=weights)
    assert torch.equal(loaded.backbone.conv1.weight, net.backbone.conv1.weight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, config: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    engine.train(config, log=False)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(
        tmp_path: Path, ham: Path, tiny_config) -> None:
    # tiny_cnn has no BatchNorm, so per-rank batches give exactly the global batch's outputs.
    import torch.multiprocessing as mp

    common = {"epochs": 2, "device": "cpu"}
    one = tiny_config(tmp_path, ham, "one", **common)
    engine.train(one, log=False)
    two = tiny_config(tmp_path, ham, "two", **common)
    mp.spawn(_ddp_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    a = list(csv.DictReader(open(Path(one["out"]) / "metrics.csv")))
    b = list(csv.DictReader(open(Path(two["out"]) / "metrics.csv")))
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-4, abs=1e-5), key
    sa = torch.load(Path(one["out"]) / "last.pt", weights_only=True)
    sb = torch.load(Path(two["out"]) / "last.pt", weights_only=True)
    for part in ("student", "teacher", "crckd"):
        for key, value in sa[part].items():
            if value.is_floating_point():
                torch.testing.assert_close(value, sb[part][key], rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(value, sb[part][key]), (part, key)


@pytest.mark.parametrize("dataset", ["ham10000", "aptos"])
def test_short_run_on_the_real_data(tmp_path: Path, dataset: str, tiny_config, data_root) -> None:
    root = data_root
    if root is None:
        pytest.skip("real data not found: set CRCKD_DATA_DIR or put shared/data beside the repo")
    sub = {"ham10000": "ham10000_200x150", "aptos": "aptos2019_128x128"}[dataset]
    if not (root / sub).is_dir():
        pytest.skip(f"{root / sub} is absent")
    config = tiny_config(tmp_path, root / sub, dataset=dataset, method="crckd",
                         max_images=240, image_size=24, batch_size=32, fold=1,
                         num_negatives=64, num_positives=5)
    summary = engine.train(config, log=False)
    assert len(summary["classes"]) == (7 if dataset == "ham10000" else 5)
    assert summary["last_epochs"]["test"]["auc"] == summary["last_epochs"]["test"]["auc"]
    saved = json.loads((Path(config["out"]) / "summary.json").read_text())
    assert saved["dataset"] == dataset
