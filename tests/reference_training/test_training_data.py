"""reference_training data: official layouts, splits, bad data, views, metrics, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchvision")
PIL = pytest.importorskip("PIL.Image")

from crckd_losses.sampling import instance_indices  # noqa: E402
from reference_training import config as cfgmod  # noqa: E402
from reference_training import data as datamod  # noqa: E402
from reference_training.metrics import compute_metrics  # noqa: E402


@pytest.mark.parametrize("layout", ["parts", "images", "flat"])
def test_ham10000_layouts(tmp_path: Path, layout: str, make_ham) -> None:
    records = datamod.read_ham10000(make_ham(tmp_path / "ham", layout))
    assert len(records) == 7 * 9
    assert sorted(set(records.labels.tolist())) == list(range(7))
    assert all(p.is_file() for p in records.paths)


def test_ham10000_split_is_grouped_stratified_and_reusable(tmp_path: Path, make_ham) -> None:
    records = datamod.read_ham10000(make_ham(tmp_path / "ham", lesions_per_class=10))
    split = datamod.split_grouped(records, seed=1)
    parts = [set(np.asarray(records.groups)[idx]) for idx in split.values()]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(len(v) for v in split.values()) == len(records)
    assert 0.1 < len(split["test"]) / len(records) < 0.3
    datamod.check_split(records, split)
    again = datamod.split_grouped(records, seed=1)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    datamod.write_split(tmp_path / "split.csv", records, split)
    read = datamod.read_split(tmp_path / "split.csv", records)
    assert all(np.array_equal(split[k], read[k]) for k in split)


def test_aptos_folds_cover_everything_once(tmp_path: Path, make_aptos) -> None:
    records = datamod.read_aptos(make_aptos(tmp_path / "aptos"))
    tests = [datamod.split_folds(records, fold)["test"] for fold in range(1, 6)]
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(records)))
    with pytest.raises(ValueError, match="fold must be in 1..5"):
        datamod.split_folds(records, 6)


def test_aptos_inner_validation_comes_from_the_training_fold_only(
        tmp_path: Path, make_aptos) -> None:
    records = datamod.read_aptos(make_aptos(tmp_path / "aptos"))
    plain = datamod.split_folds(records, 2)
    inner = datamod.split_folds(records, 2, val_fraction=0.2)
    assert np.array_equal(inner["test"], plain["test"])  # the test fold is untouched
    assert sorted(np.concatenate([inner["train"], inner["val"]]).tolist()) == \
        plain["train"].tolist()
    assert abs(len(inner["val"]) - 0.2 * len(plain["train"])) <= 1
    with pytest.raises(ValueError, match="val_fraction"):
        datamod.split_folds(records, 2, val_fraction=0.9)


def test_bad_data_fails_fast_naming_the_problem(tmp_path: Path, make_ham) -> None:
    root = make_ham(tmp_path / "ham", "images")
    csv_path = root / "HAM10000_metadata.csv"
    text = csv_path.read_text()
    # unknown label
    csv_path.write_text(text.replace(",nv,", ",melanoma?,", 1))
    with pytest.raises(ValueError, match=r"unknown label 'melanoma\?' in column 'dx'"):
        datamod.read_ham10000(root)
    # missing column
    csv_path.write_text(text.replace("lesion_id,", "lesion,", 1))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['lesion_id'\]"):
        datamod.read_ham10000(root)
    csv_path.write_text(text)
    # missing image
    (root / "images" / "ISIC_0000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="ISIC_0000003.jpg not found"):
        datamod.read_ham10000(root)
    # unreadable image
    (root / "images" / "ISIC_0000003.jpg").write_bytes(b"not a jpeg")
    records = datamod.read_ham10000(root)
    with pytest.raises(ValueError, match="cannot read image .*ISIC_0000003.jpg"):
        datamod.load_images(records, 8, tmp_path / "cache", log=False)
    # empty folder
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "HAM10000_metadata.csv").write_text(text)
    with pytest.raises(ValueError, match="no .jpg images under"):
        datamod.read_ham10000(empty)
    # no label file
    with pytest.raises(FileNotFoundError, match="label file not found"):
        datamod.read_aptos(tmp_path / "nothing")


def test_aptos_bad_label_and_missing_image(tmp_path: Path, make_aptos) -> None:
    root = make_aptos(tmp_path / "aptos")
    csv_path = root / "train.csv"
    text = csv_path.read_text()
    csv_path.write_text(text + "zzz,7\n")
    with pytest.raises(ValueError, match="unknown label '7' in column 'diagnosis'"):
        datamod.read_aptos(root)
    csv_path.write_text(text + "zzz,3\n")
    with pytest.raises(FileNotFoundError, match="zzz.png not found"):
        datamod.read_aptos(root)


def test_class_absent_from_training_split_is_an_error(tmp_path: Path, make_ham) -> None:
    records = datamod.read_ham10000(make_ham(tmp_path / "ham"))
    split = datamod.split_grouped(records, seed=0)
    vasc = datamod.HAM10000_CLASSES.index("vasc")
    moved = split["train"][records.labels[split["train"]] == vasc]
    split["train"] = split["train"][records.labels[split["train"]] != vasc]
    split["test"] = np.sort(np.concatenate([split["test"], moved]))
    with pytest.raises(ValueError, match=r"class\(es\) \['vasc'\] .* no image in the training"):
        datamod.check_split(records, split)


def test_cache_is_written_once_and_reused(tmp_path: Path, make_ham) -> None:
    records = datamod.read_ham10000(make_ham(tmp_path / "ham"))
    first = datamod.load_images(records, 12, tmp_path / "cache", log=False)
    assert first.shape == (len(records), 3, 12, 12) and first.dtype == torch.uint8
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    second = datamod.load_images(records, 12, tmp_path / "cache", log=False)
    assert torch.equal(first, second)
    datamod.load_images(records, 10, tmp_path / "cache", log=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_views_are_the_spec_transforms() -> None:
    x = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)

    def view(*params: float) -> torch.Tensor:
        return datamod.apply_views(x, torch.tensor([params], dtype=torch.float32))

    assert torch.equal(view(0, 0, 0, 0, 0, 0), x.float())
    assert torch.equal(view(0, 0, 0, 1, 0, 0), x.float().flip(-1))
    assert torch.equal(view(0, 0, 0, 0, 1, 0), x.float().flip(-2))
    turned = view(0, 0, 0, 0, 0, 2)
    assert torch.equal(turned, torch.rot90(x.float(), 2, (-2, -1)))
    generator = torch.Generator().manual_seed(0)
    params = torch.stack([datamod.draw_view_params(generator, teacher=True) for _ in range(400)])
    assert params[:, 0].abs().max() <= 10 and params[:, 1:3].abs().max() <= 0.02
    assert set(params[:, 5].tolist()) == {0.0, 1.0, 2.0, 3.0}
    student = datamod.draw_view_params(generator, teacher=False)
    assert student[4] == 0 and student[5] == 0


def test_views_do_not_depend_on_the_loader() -> None:
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    ds = datamod.TwoViewDataset(images, torch.zeros(10, dtype=torch.long), seed=3)
    ds.set_epoch(2)
    a = ds[4][1]
    ds.set_epoch(1)
    ds.set_epoch(2)
    assert torch.equal(a, ds[4][1])
    ds.set_epoch(3)
    assert not torch.equal(a, ds[4][1])


def test_global_batch_sampler_slices_are_the_global_batch() -> None:
    one = datamod.GlobalBatchSampler(20, 8, seed=1)
    two = [datamod.GlobalBatchSampler(20, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    batches = list(one)
    split = [list(s) for s in two]
    assert len(batches) == 2
    for i, batch in enumerate(batches):
        assert split[0][i] + split[1][i] == batch
    one.set_epoch(3, start_step=1)
    assert list(one) == batches[1:]
    with pytest.raises(ValueError, match="divisible"):
        datamod.GlobalBatchSampler(20, 7, seed=1, rank=0, world_size=2)


def test_instance_rows_exclude_only_the_anchor() -> None:
    generator = torch.Generator().manual_seed(0)
    indices = torch.tensor([0, 5, 9])
    rows = instance_indices(indices, 10, 500, generator)
    assert torch.equal(rows[:, 0], indices)
    for i, anchor in enumerate(indices.tolist()):
        assert set(rows[i, 1:].tolist()) == set(range(10)) - {anchor}


def test_metrics_with_a_class_absent_from_the_test_split() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(4)[[0, 0, 1, 2, 2, 2]] * 0.9 + 0.025
    m = compute_metrics(labels, probs, 4)
    assert m["classes_absent"] == 1
    assert m["auc"] == pytest.approx(np.mean([1.0, 0.75, 0.875]))
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert 0 <= m["specificity"] <= 1 and -1 <= m["kappa"] <= 1


def test_recipe_loss_weights() -> None:
    paper = cfgmod.resolve({"method": "crckd", "epochs": 80})
    released = cfgmod.resolve({"method": "crckd", "epochs": 80, "recipe": "released-code"})
    assert released["begin_epoch"] == 20 and paper["rampup_epochs"] == 30
    assert cfgmod.loss_weights(paper, 0)["ccd"] == pytest.approx(0.1)
    assert cfgmod.loss_weights(paper, 0)["crp"] == 1.0
    assert cfgmod.loss_weights(paper, 30)["kl"] == 1.0
    early, late = cfgmod.loss_weights(released, 19), cfgmod.loss_weights(released, 20)
    assert early == {"kl": 0.0, "ccd": pytest.approx(0.1), "crp": 0.0}
    assert late["ccd"] == pytest.approx(0.01) and late["crp"] == 1.0 and late["kl"] > 0
    assert cfgmod.loss_weights(cfgmod.resolve({"method": "baseline"}), 50)["kl"] == 0.0
    with pytest.raises(ValueError, match="--method must be one of"):
        cfgmod.resolve({"method": "nope"})


def test_every_method_has_a_config_file() -> None:
    for method in cfgmod.METHODS:
        assert (cfgmod.CONFIG_DIR / f"{method}.json").is_file()
        cfgmod.resolve({"method": method})
    assert cfgmod.resolve({"method": "crd"})["contrast"] == "instance"
