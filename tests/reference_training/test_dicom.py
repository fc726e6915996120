"""DICOM in the own-data path: files written here with pydicom (both photometric
interpretations, a rescale, a window, colour, a multi-frame file to refuse) and pydicom's own
sample files; a DICOM tree trained on, grouped by patient."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="DICOM needs the dicom extra (pydicom)")
pytest.importorskip("sklearn")
pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage  # noqa: E402

from reference_training import data as datamod  # noqa: E402
from reference_training import train as train_cli  # noqa: E402
from reference_training.data import dicom  # noqa: E402
from reference_training.data.images import decode_dicom  # noqa: E402

# Stored CT values; with intercept -1024 they are -1024 (air), 0 (water), 40 and 240 HU.
STORED = np.array([[0, 1024, 1064, 1264]] * 4, dtype=np.int16)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                patient: str = "P0", bits: int | None = None, **attributes: object) -> Path:
    """A DICOM file of ``pixels`` (``[H, W]``, ``[H, W, 3]`` or frames ``[N, H, W]``) with
    the given attributes (``RescaleIntercept=-1024``, ``WindowCenter=40``, ...)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.PatientID, ds.Modality = patient, "CT"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for name, value in attributes.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _channel(path: Path, window: tuple[float, float] | None = None) -> np.ndarray:
    out = decode_dicom(path, 4, window)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    return out[0, :, 0].astype(int)


def _linear(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR window (PS3.3 C.11.2.1.2.1), to 0..255."""
    unit = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    return np.rint(unit * 255).astype(int)


def test_rescale_then_the_files_window_and_monochrome1_inverted(tmp_path: Path) -> None:
    hu = STORED[0].astype(float) - 1024
    common = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40,
              "WindowWidth": 400}
    mono2 = write_dicom(tmp_path / "m2.dcm", STORED, **common)
    assert _channel(mono2).tolist() == _linear(hu, 40, 400).tolist() == [0, 102, 128, 255]
    # MONOCHROME1: high values are dark; read, they are bright like MONOCHROME2's
    mono1 = write_dicom(tmp_path / "m1.dcm", STORED, "MONOCHROME1", **common)
    assert np.abs(_channel(mono1) - (255 - _channel(mono2))).max() <= 1
    # a window for the whole set replaces the file's: -1024..1024 HU -> 0..255
    assert _channel(mono2, (0.0, 2048.0)).tolist() == [0, 128, 132, 157]


def test_without_a_window_the_images_own_range_is_used(tmp_path: Path) -> None:
    for dtype, bits in ((np.uint8, 8), (np.uint16, 12), (np.int16, 16)):
        pixels = np.array([[0, 10], [20, 30]] * 2, dtype=dtype).repeat(2, 1) * (-1 if bits == 16
                                                                                 else 1)
        path = write_dicom(tmp_path / f"{bits}.dcm", pixels.astype(dtype), bits=bits)
        out = decode_dicom(path, 4)[..., 0]
        assert out.min() == 0 and out.max() == 255, dtype
    flat = write_dicom(tmp_path / "flat.dcm", np.full((4, 4), 7, np.uint16), bits=16)
    assert not decode_dicom(flat, 4).any()


def test_rgb_dicom_is_colour(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = 200, 50
    out = decode_dicom(write_dicom(tmp_path / "rgb.dcm", pixels, "RGB"), 4)
    assert out[0, 0].tolist() == [200, 0, 50]


def test_files_that_are_no_2d_image_are_reported_before_training(tmp_path: Path) -> None:
    frames = write_dicom(tmp_path / "a" / "frames.dcm", np.zeros((3, 4, 4), np.uint16))
    no_pixels = tmp_path / "a" / "report.dcm"
    write_dicom(no_pixels, STORED)
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    good = write_dicom(tmp_path / "b" / "IM000001", STORED)
    paths = [frames, no_pixels, good]
    records = datamod.Records("folder", paths, np.zeros(3, np.int64), ["a", "b", "c"],
                              ["a", "b", "c"], ("x",), tmp_path)
    with pytest.raises(ValueError) as error:
        datamod.load_images(records, 4, tmp_path / "cache", log=False)
    message = str(error.value)
    assert "2 image(s)" in message
    assert f"{frames}: multi-frame DICOM (3 frames)" in message
    assert f"{no_pixels}: no pixel data" in message
    assert not (tmp_path / "cache").exists()


def test_pydicoms_sample_files() -> None:
    ct = Path(get_testdata_file("CT_small.dcm"))  # signed 16 bit, rescaled, no window
    out = decode_dicom(ct, 128)  # its own size: the extremes are not averaged away
    assert out.min() == 0 and out.max() == 255
    mr = decode_dicom(Path(get_testdata_file("MR_small.dcm")), 16)  # its window 600/1600
    rle = decode_dicom(Path(get_testdata_file("MR_small_RLE.dcm")), 16)  # compressed, decoded
    assert np.array_equal(mr, rle)
    rgb = decode_dicom(Path(get_testdata_file("SC_rgb_small_odd.dcm")), 3)
    assert not (rgb[..., 0] == rgb[..., 1]).all()
    with pytest.raises(ValueError, match="multi-frame DICOM"):
        decode_dicom(Path(get_testdata_file("rtdose.dcm")), 8)
    from pydicom.pixels import get_decoder

    jpeg_ls = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    syntax = pydicom.dcmread(jpeg_ls).file_meta.TransferSyntaxUID
    if get_decoder(syntax).is_available:
        pytest.skip("a JPEG-LS decoder is installed: no undecodable sample file")
    with pytest.raises(ValueError, match="no decoder installed for it; install one of"):
        decode_dicom(Path(jpeg_ls), 8)


def test_dicom_files_are_found_by_suffix_or_marker(tmp_path: Path) -> None:
    marked = write_dicom(tmp_path / "IM000001", STORED)
    (tmp_path / "notes").write_text("not an image")
    (tmp_path / "DICOMDIR").write_bytes(marked.read_bytes())
    assert dicom.is_dicom(marked) and dicom.is_dicom(tmp_path / "missing.dcm")
    assert not dicom.is_dicom(tmp_path / "notes") and not dicom.is_dicom(tmp_path / "DICOMDIR")


def test_without_pydicom_one_line_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"pip install pydicom"):
        dicom.require_pydicom()


def make_tree(root: Path, patients_per_class: int = 5) -> Path:
    """``root/<class>/<patient>/<series>/IM00000<k>``: extensionless DICOM files of CT values,
    two per patient, MONOCHROME1 and MONOCHROME2 mixed; ``root/labels.csv`` lists them."""
    rng = np.random.default_rng(0)
    rows = []
    for label, name in enumerate(("normal", "nodule")):
        for p in range(patients_per_class):
            patient = f"{name}-{p}"
            for k in range(2):
                stored = (rng.normal(1024 + 300 * label, 100, (20, 24))).astype(np.int16)
                file = root / name / patient / "1" / f"IM00000{k}"
                write_dicom(file, stored, ("MONOCHROME2", "MONOCHROME1")[k], patient,
                            RescaleSlope=1, RescaleIntercept=-1024)
                rows.append((file.relative_to(root).as_posix(), name, patient))
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("file", "finding", "patient"), *rows])
    return root


def test_a_dicom_tree_trains_grouped_by_patient_id(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    out = tmp_path / "run"
    summary = train_cli.main([
        "--dataset", "folder", "--data-dir", str(root), "--dicom-group-tag",
        "--dicom-window", "40", "400", "--method", "crckd", "--model", "tiny_cnn",
        "--image-size", "16", "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
        "--no-progress", "--out", str(out), "--config",
        str(_small_config(tmp_path))])
    assert summary["classes"] == ["nodule", "normal"]
    rows = list(csv.DictReader(open(out / "split.csv")))
    assert len(rows) == 20
    parts: dict[str, set[str]] = {}
    for row in rows:
        assert row["group"].startswith("PatientID=")
        parts.setdefault(row["group"], set()).add(row["split"])
    assert len(parts) == 10 and all(len(p) == 1 for p in parts.values())


def _small_config(folder: Path) -> Path:
    path = folder / "small.json"
    path.write_text('{"num_positives": 2, "num_negatives": 4, "eval_batch_size": 16, '
                    f'"cache_dir": "{(folder / "cache").as_posix()}"}}')
    return path


def test_mistakes_in_the_dicom_flags_are_named(tmp_path: Path) -> None:
    from reference_training import config as cfgmod

    root = make_tree(tmp_path / "tree", patients_per_class=1)
    base = {"dataset": "folder", "data_dir": str(root)}
    with pytest.raises(ValueError, match="width must be positive"):
        cfgmod.resolve({**base, "dicom_window": [40, 0]})
    with pytest.raises(ValueError, match="must be a DICOM keyword"):
        datamod.read_dataset("folder", root, dicom_group_tag="Patient")
    with pytest.raises(ValueError, match="both name the groups"):
        datamod.read_dataset("csv", root, "labels.csv", "file", "finding", "patient", "PatientID")
    records = datamod.read_dataset("csv", root, "labels.csv", "file", "finding",
                                   dicom_group_tag="PatientID")
    assert sorted(set(records.groups)) == ["PatientID=nodule-0", "PatientID=normal-0"]
