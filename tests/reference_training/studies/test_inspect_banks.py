"""reference_training/studies/inspect_banks.py: the bank diagnostics on banks whose answers are
known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reference_training.studies.inspect_banks import bank_stats, inspect_run, main


def _bank() -> tuple[torch.Tensor, torch.Tensor]:
    # class 0: two rows on e1; class 1: one row on e2 and one on e1 (the last is misplaced)
    memory = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    return memory, torch.tensor([0, 0, 1, 1])


def test_bank_stats_on_a_known_bank() -> None:
    memory, labels = _bank()
    stats = bank_stats(memory, labels, 2, tau=0.5, num_negatives=2)
    # centroids: class 0 -> e1; class 1 -> normalise(0.5, 0.5)
    assert stats["centroid cos"] == pytest.approx(1 / math.sqrt(2))
    # rows of class 0 nearest to centroid 0 (1 > 0.707); class 1: e2 -> centroid 1, e1 -> 0
    assert stats["nearest-centroid bal. acc."] == pytest.approx((1.0 + 0.5) / 2)
    s = 1 / math.sqrt(2)
    own0 = math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(s / 0.5))  # e1 row, class 0
    own1_e2 = math.exp(s / 0.5) / (math.exp(0.0) + math.exp(s / 0.5))  # e2 row, class 1
    own1_e1 = math.exp(s / 0.5) / (math.exp(1 / 0.5) + math.exp(s / 0.5))  # e1 row, class 1
    assert stats["CRP target on own class"] == pytest.approx((own0 + (own1_e2 + own1_e1) / 2) / 2)
    assert stats["rows/K"] == 2.0
    assert stats["with repl."] == 0.0  # every anchor has 2 rows of the other class, K = 2
    assert bank_stats(memory, labels, 2, 0.5, num_negatives=3)["with repl."] == 1.0
    assert bank_stats(memory, labels, 2, 0.5, num_negatives=2, instance=True)["with repl."] == 1.0


def test_inspect_run_reads_a_checkpoint_and_refuses_runs_without_banks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    memory, labels = _bank()
    crckd = {"teacher_bank.memory": memory, "teacher_bank.labels": labels,
             "teacher_bank.class_sums": torch.zeros(2, 2, 2),
             "ccd.log_normalizer": torch.tensor([8.75, 8.5])}
    config = {"dataset": "aptos", "method": "crckd", "num_negatives": 4096, "temperature": 0.5}
    run = tmp_path / "crckd-paper-s1"
    run.mkdir()
    torch.save({"config": config, "crckd": crckd}, run / "last.pt")
    (run / "summary.json").write_text(json.dumps({"num_negatives": 2}))  # the K the run used
    row = inspect_run(run)
    assert row["run"] == "aptos / crckd-paper-s1" and row["rows"] == 4
    assert row["rows/K"] == 2.0 and row["log Z"] == "8.8 / 8.5"
    main([str(run)])
    assert "| aptos / crckd-paper-s1 | 4 | 2.00 | 0.00 | 0.71 | 0.75 |" in capsys.readouterr().out
    bare = tmp_path / "mt-paper-s1"
    bare.mkdir()
    torch.save({"config": {**config, "method": "mt"}, "crckd": {}}, bare / "last.pt")
    with pytest.raises(SystemExit, match="no memory bank"):
        inspect_run(bare)
    with pytest.raises(SystemExit, match="no last.pt"):
        inspect_run(tmp_path)


def test_nearest_centroid_on_known_embeddings() -> None:
    from reference_training.studies.inspect_banks import nearest_centroid

    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # class 2: no test image
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    bal_acc, own = nearest_centroid(embeddings, labels, centroids, tau=1.0)
    assert bal_acc == pytest.approx((0.5 + 1.0) / 2)  # the second class-0 row is nearer to 1
    p = torch.softmax(embeddings @ centroids.T, dim=1)
    assert own == pytest.approx(float(((p[0, 0] + p[1, 0]) / 2 + p[2, 1]) / 2))


def test_images_embeds_a_real_run_with_its_saved_teacher(
        tmp_path: Path, make_ham, tiny_config) -> None:
    pytest.importorskip("sklearn")
    from reference_training import engine

    data = make_ham(tmp_path / "HAM10000", "parts")
    config = tiny_config(tmp_path, data, method="crckd", epochs=1)
    engine.train(config, log=False)
    row = inspect_run(Path(config["out"]), images=True)
    for key in ("train NC", "test NC", "test CRP own", "nearest-centroid bal. acc."):
        assert 0.0 <= row[key] <= 1.0, key
    # a teacher whose weights do not fit the network is an error, not a silent partial load
    state = torch.load(Path(config["out"]) / "last.pt", weights_only=False)
    state["teacher"] = {k: v for k, v in state["teacher"].items() if "classifier" not in k}
    torch.save(state, Path(config["out"]) / "last.pt")
    with pytest.raises(RuntimeError, match="classifier"):
        inspect_run(Path(config["out"]), images=True)


def test_sibling_positives_counts_images_of_the_anchors_lesion(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reference_training.studies.inspect_banks import sibling_positives

    split = tmp_path / "split.csv"
    # class a: lesions L1 (2 images), L2 (1); class b: L3 (3 images), one more in test
    split.write_text("image_id,group,label,split\n"
                     "i1,L1,a,train\ni2,L1,a,train\ni3,L2,a,train\n"
                     "i4,L3,b,train\ni5,L3,b,train\ni6,L3,b,train\ni7,L3,b,test\n")
    rows = {r["class"]: r for r in sibling_positives(split, num_positives=2)}
    # P-1 = 1 positive drawn from n_c rows: each sibling is drawn with probability 1/n_c
    assert rows["a"]["rows"] == 3 and rows["a"]["with a sibling"] == pytest.approx(2 / 3)
    assert rows["a"]["sibling positives"] == pytest.approx((1 + 1 + 0) / 3 / 3)
    assert rows["b"]["with a sibling"] == 1.0  # the test image does not count
    assert rows["b"]["sibling positives"] == pytest.approx(2 / 3)
    assert rows["b"]["% of P-1"] == pytest.approx(100 * 2 / 3)
    # P-1 above the class size: every sibling is drawn
    assert sibling_positives(split, 10)[1]["sibling positives"] == pytest.approx(2.0)
    run = tmp_path / "run"
    run.mkdir()
    split.rename(run / "split.csv")
    (run / "config.json").write_text(json.dumps({"num_positives": 2}))
    main(["--lesions", str(run)])
    assert "| b | 3 | 1.00 | 0.67 | 66.67 |" in capsys.readouterr().out
