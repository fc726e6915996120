"""reference_training on your own data: a folder per class or a CSV, any image format, timm.

The datasets are built on the fly: grayscale, 16-bit, RGB, RGBA and palette images of
several sizes and aspect ratios, and for the CSV a patient column.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

from reference_training import config as cfgmod  # noqa: E402
from reference_training import data as datamod  # noqa: E402
from reference_training import train as train_cli  # noqa: E402
from reference_training.models import build_network  # noqa: E402

CLASSES = ("benign", "malignant", "normal")
# (suffix, Pillow mode, width, height): every class gets each kind in turn.
KINDS = (("png", "L", 24, 18), ("png", "I;16", 20, 20), ("jpg", "RGB", 16, 30),
         ("png", "RGBA", 30, 12), ("png", "P", 18, 18), ("tif", "I;16", 22, 16))


def _write_image(path: Path, kind: tuple[str, str, int, int], label: int,
                 rng: np.random.Generator) -> None:
    """A class-coloured image of one kind; the 16-bit ones use 12 bits (0..4095), as CT and
    X-ray exports often do."""
    _, mode, width, height = kind
    level = 0.2 + 0.3 * label
    noise = rng.normal(0, 0.05, (height, width))
    if mode == "I;16":
        values = np.clip((level + noise) * 4095, 0, 4095).astype(np.uint16)
        PIL.fromarray(values).save(path)
        return
    gray = np.clip((level + noise) * 255, 0, 255).astype(np.uint8)
    rgb = np.stack([gray, np.roll(gray, 1, 0), 255 - gray], axis=2)
    image = PIL.fromarray(rgb)
    if mode == "L":
        image = PIL.fromarray(gray)
    elif mode == "RGBA":
        image = PIL.fromarray(np.concatenate([rgb, np.full_like(gray, 200)[..., None]], 2))
    elif mode == "P":
        image = image.convert("P")
    image.save(path)


def make_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """``root/<class>/<i>.<suffix>``, the kinds of :data:`KINDS` in turn, one class in a
    sub-folder of its own folder."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            kind = KINDS[i % len(KINDS)]
            folder = root / name / ("more" if label == 2 and i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            _write_image(folder / f"{i:03d}.{kind[0]}", kind, label, rng)
    (root / "benign" / "notes.txt").write_text("not an image")
    return root


def make_table(root: Path, patients_per_class: int = 6, labels: str = "names",
               seed: int = 0) -> Path:
    """``root/images/p<patient>_<k>.<suffix>`` and ``root/labels.csv`` with columns
    ``file, diagnosis, patient``: two images per patient, labels as names or integers."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    for label, name in enumerate(CLASSES):
        for p in range(patients_per_class):
            patient = f"P{label}{p:02d}"
            for k in range(2):
                kind = KINDS[n % len(KINDS)]
                n += 1
                file = f"images/{patient}_{k}.{kind[0]}"
                _write_image(root / file, kind, label, rng)
                rows.append((file, name if labels == "names" else str(label * 5), patient))
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "diagnosis", "patient"])
        writer.writerows(rows)
    return root / "labels.csv"


def _cli(data: list[str], out: Path, *extra: str) -> dict:
    return train_cli.main([
        *data, "--model", "tiny_cnn", "--image-size", "16", "--epochs", "2",
        "--batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--no-progress",
        "--out", str(out), "--config", str(_small_config(out.parent)), *extra])


def _small_config(folder: Path, **settings: object) -> Path:
    """A config file of small CRCKD settings (and ``settings``), its cache beside it."""
    path = folder / "small.json"
    path.write_text(json.dumps({"num_positives": 3, "num_negatives": 16, "eval_batch_size": 16,
                                "cache_dir": (folder / "cache").as_posix(), **settings}))
    return path


def test_folder_layout_gives_sorted_classes_and_every_image(tmp_path: Path) -> None:
    records = datamod.read_folder(make_folder(tmp_path / "data"))
    assert records.classes == CLASSES
    assert len(records) == 3 * 12  # notes.txt is not an image
    assert records.ids[0] == "benign/000.png"
    assert any(i.startswith("normal/more/") for i in records.ids)
    assert np.bincount(records.labels).tolist() == [12, 12, 12]


def test_every_image_kind_becomes_three_channels(tmp_path: Path) -> None:
    sixteen = np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16)
    PIL.fromarray(sixteen).save(tmp_path / "wide.png")
    PIL.fromarray(sixteen).save(tmp_path / "wide.tif")
    for name in ("wide.png", "wide.tif"):
        with PIL.open(tmp_path / name) as img:
            assert img.mode.startswith("I")
            out = datamod.decode_image(img, 2)
        # the image's own minimum and maximum become 0 and 255; gray in every channel
        assert out.shape == (2, 2, 3) and out.dtype == np.uint8
        assert out[..., 0].tolist() == [[0, 85], [170, 255]]
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    flat = PIL.fromarray(np.full((3, 3), 7, np.uint16))
    assert not datamod.decode_image(flat, 3).any()
    gray = PIL.fromarray(np.full((4, 6), 90, np.uint8))
    assert (datamod.decode_image(gray, 5) == 90).all()
    rgba = PIL.fromarray(np.full((4, 4, 4), (10, 20, 30, 0), np.uint8))
    assert datamod.decode_image(rgba, 4)[0, 0].tolist() == [10, 20, 30]
    palette = PIL.fromarray(np.full((4, 4, 3), (204, 0, 51), np.uint8)).convert("P")  # web-safe
    assert datamod.decode_image(palette, 4)[0, 0].tolist() == [204, 0, 51]


def test_csv_with_groups_splits_no_patient_across_parts(tmp_path: Path) -> None:
    table = make_table(tmp_path / "data", patients_per_class=10)
    records = datamod.read_table(tmp_path / "data", table, "file", "diagnosis", "patient")
    assert records.classes == CLASSES and len(records) == 60
    groups = np.asarray(records.groups)
    config = cfgmod.resolve({"dataset": "csv", "data_dir": str(tmp_path / "data"),
                             "csv": str(table)})
    splits = [datamod.make_split(records, config)]
    splits += [datamod.make_split(records, {**config, "fold": k, "val_fraction": 0.25})
               for k in (1, 2)]
    for split in splits:
        parts = [set(groups[idx]) for idx in split.values()]
        assert sum(len(p) for p in parts) == len(set(records.groups))  # no group in two parts
        assert sum(len(v) for v in split.values()) == len(records)
    tests = [datamod.make_split(records, {**config, "fold": k})["test"] for k in range(1, 6)]
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(records)))


def test_integer_labels_sort_as_numbers(tmp_path: Path) -> None:
    make_table(tmp_path / "data", labels="integers")
    records = datamod.read_table(tmp_path / "data", "labels.csv", "file", "diagnosis")
    assert records.classes == ("0", "5", "10")
    assert records.groups == records.ids  # no group column: every image its own group


@pytest.mark.slow
def test_folder_dataset_trains_end_to_end_and_its_split_is_reused(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=14)
    summary = _cli(["--dataset", "folder", "--data-dir", str(data), "--method", "crckd"],
                   tmp_path / "run")
    assert summary["classes"] == list(CLASSES) and summary["dataset"] == "folder"
    assert summary["best_on_val"] is not None  # the 70/10/20 split has a validation part
    split = tmp_path / "run" / "split.csv"
    rows = list(csv.DictReader(open(split)))
    assert {r["split"] for r in rows} == {"train", "val", "test"} and len(rows) == 42
    assert len(list((tmp_path / "cache").glob("folder_16px_*.pt"))) == 1
    again = _cli(["--dataset", "folder", "--data-dir", str(data), "--method", "baseline",
                  "--recipe", "released-code", "--split-file", str(split)], tmp_path / "again")
    assert (tmp_path / "again" / "split.csv").read_text() == split.read_text()
    assert again["method"] == "baseline"
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # decoded once, served twice


@pytest.mark.slow
def test_csv_dataset_trains_every_fold_end_to_end(tmp_path: Path) -> None:
    table = make_table(tmp_path / "data", patients_per_class=6)
    summaries = _cli(["--dataset", "csv", "--data-dir", str(tmp_path / "data"), "--csv",
                      str(table), "--image-column", "file", "--label-column", "diagnosis",
                      "--group-column", "patient", "--method", "mt", "--fold", "all",
                      "--num-folds", "3"], tmp_path / "cv", "--epochs", "1")
    assert len(summaries) == 3 and all(s["classes"] == list(CLASSES) for s in summaries)
    assert "csv / mt / paper / tiny_cnn (n=3)" in (tmp_path / "cv" / "cv_summary.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "cv" / "fold2" / "split.csv")))
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row["group"], set()).add(row["split"])
    assert all(len(parts) == 1 for parts in by_patient.values())


# Bad data: each fails before training, naming the file, row or class and the fix.


def test_unreadable_image_is_named_and_the_cache_is_kept(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    records = datamod.read_folder(data)
    datamod.load_images(records, 8, tmp_path / "cache", log=False)
    cached = sorted((tmp_path / "cache").iterdir())
    (data / "normal" / "004.png").write_bytes(b"truncated")
    (data / "benign" / "002.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 image\(s\) .* cannot be read: cannot read image "
                                         r".*002\.jpg.*004\.png.* Replace those files"):
        datamod.load_images(datamod.read_folder(data), 8, tmp_path / "cache", log=False)
    assert sorted((tmp_path / "cache").iterdir()) == cached  # nothing lost, nothing half-written
    with pytest.raises(SystemExit, match="error: .*004.png"):  # one message, no traceback
        _cli(["--dataset", "folder", "--data-dir", str(data)], tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_path_that_does_not_exist_names_the_line(tmp_path: Path) -> None:
    table = make_table(tmp_path / "data")
    (tmp_path / "data" / "images" / "P000_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 path\(s\) in column 'file' name no file "
                                                r"\(line\(s\) 3; .*P000_1.png\).*--data-dir"):
        datamod.read_table(tmp_path / "data", table, "file", "diagnosis", "patient")


def test_empty_label_cells_name_their_lines(tmp_path: Path) -> None:
    table = make_table(tmp_path / "data")
    lines = table.read_text().splitlines()
    for i in (4, 9):
        lines[i] = lines[i].replace(",benign,", ",,").replace(",malignant,", ",,")
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"column 'diagnosis' is empty on line\(s\) 5, 10; "
                                         "fill those cells or remove the rows"):
        datamod.read_table(tmp_path / "data", table, "file", "diagnosis")


def test_class_with_too_few_images_names_the_class(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    for extra in sorted((data / "malignant").glob("*.*"))[3:]:
        extra.unlink()
    config = cfgmod.resolve({"dataset": "folder", "data_dir": str(data)})
    records = datamod.read_folder(data)
    with pytest.raises(ValueError, match=r"class\(es\) 'malignant' \(3\) have fewer than 5 "
                                         r"images.*add images to them, or leave them out"):
        datamod.make_split(records, config)
    with pytest.raises(ValueError, match=r"'malignant' \(3\) have fewer than 4"):
        datamod.make_split(records, {**config, "fold": 1, "num_folds": 4})
    # grouped: patients count, not images
    table = make_table(tmp_path / "csv", patients_per_class=3)
    grouped = datamod.read_table(tmp_path / "csv", table, "file", "diagnosis", "patient")
    with pytest.raises(ValueError, match=r"'benign' \(3\), 'malignant' \(3\), 'normal' \(3\) "
                                         "have fewer than 5 groups"):
        datamod.make_split(grouped, {**config, "dataset": "csv"})


def test_csv_without_the_named_columns_says_which_flags(tmp_path: Path) -> None:
    table = make_table(tmp_path / "data")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image', 'label'\]; expected "
                                         r".*found \['file', 'diagnosis', 'patient'\]; name the "
                                         "CSV's own columns with --image-column"):
        datamod.read_table(tmp_path / "data", table)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['subject'\]"):
        datamod.read_table(tmp_path / "data", table, "file", "diagnosis", "subject")


def test_folder_with_an_empty_class_and_csv_flags_missing(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    (data / "cyst").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['cyst'\] hold no image"):
        datamod.read_folder(data)
    with pytest.raises(ValueError, match="--dataset csv needs --csv FILE"):
        cfgmod.resolve({"dataset": "csv", "data_dir": str(data)})
    with pytest.raises(ValueError, match="--dataset folder needs --data-dir DIR"):
        cfgmod.resolve({"dataset": "folder"})
    with pytest.raises(FileNotFoundError, match="--csv labels.csv: no such file in the "
                                                "working directory .* nor in --data-dir"):
        datamod.read_table(data, "labels.csv")


# Backbones


def test_timm_backbone_from_scratch_from_weights_and_from_its_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm", reason="timm is optional: pip install timm")
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    net = build_network("timm/test_resnet", 3)
    logits, feats = net(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert logits.shape == (2, 3) and feats.shape == (2, 128)
    with pytest.raises(FileNotFoundError, match="--weights FILE.*efficientnet_lite0"):
        build_network("timm/test_resnet", 3, pretrained=True)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.backbone.state_dict().items()}, weights)
    loaded = build_network("timm/test_resnet", 3, weights=weights)
    first = next(iter(net.backbone.state_dict()))
    assert torch.equal(loaded.backbone.state_dict()[first], net.backbone.state_dict()[first])
    # what a download on another machine leaves in the Hugging Face cache
    snapshot = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "hf" / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (tmp_path / "hf" / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("abc")
    save_file({k: v.contiguous() for k, v in net.backbone.state_dict().items()},
              snapshot / "model.safetensors")
    cached = build_network("timm/test_resnet", 3, pretrained=True)
    assert torch.equal(cached.backbone.state_dict()[first], net.backbone.state_dict()[first])
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_network("timm/no_such_net", 3)


def test_timm_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm then raises ImportError
    with pytest.raises(ImportError, match="needs timm: pip install timm"):
        build_network("timm/resnet18", 3)


@pytest.mark.slow
def test_timm_model_trains_on_a_folder(tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is optional: pip install timm")
    data = make_folder(tmp_path / "data", per_class=10)
    summary = _cli(["--dataset", "folder", "--data-dir", str(data), "--method", "crckd",
                    "--fold", "1"], tmp_path / "run", "--model", "timm/test_resnet",
                   "--epochs", "1")
    assert summary["model"] == "timm/test_resnet"


@pytest.mark.slow
def test_reproduce_and_compare_take_your_own_data(tmp_path: Path) -> None:
    from reference_training import reproduce
    from reference_training.compare import main as compare_main

    table = make_table(tmp_path / "data", patients_per_class=5)
    settings = _small_config(tmp_path, model="tiny_cnn", image_size=16, epochs=1, batch_size=8,
                             num_workers=0)
    runs = tmp_path / "runs"
    grid = ["--datasets", "csv", "--data-dir", str(tmp_path / "data"), "--csv", str(table),
            "--image-column", "file", "--label-column", "diagnosis", "--group-column",
            "patient", "--methods", "baseline", "crckd", "--config", str(settings),
            "--runs", str(runs)]
    reproduce.main([*grid, "--folds", "1"])
    for method in ("baseline", "crckd"):
        config = (runs / "csv-cv" / f"{method}-paper-s2020" / "config.json").read_text()
        assert '"fold": 1' in config and '"group_column": "patient"' in config
    out = tmp_path / "table.md"
    compare_main([str(runs / "csv-cv"), "--out", str(out)])
    assert "csv / crckd / paper / tiny_cnn (n=1)" in out.read_text()
    reproduce.main(["--collect", "--runs", str(runs), "--docs-out", str(tmp_path / "docs")])
    assert (tmp_path / "docs" / "csv-cv" / "table_last.md").is_file()
    settings_kept = (tmp_path / "docs" / "csv-cv" / "crckd-paper-s2020" / "config.json")
    assert '"csv"' not in settings_kept.read_text().replace('"dataset": "csv"', "")
