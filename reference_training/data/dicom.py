"""DICOM files as 2-D images, read with pydicom (the ``dicom`` extra), imported only when a
DICOM file is met.

A grayscale file goes through DICOM's display pipeline: the modality LUT (Rescale Slope and
Intercept, or a Modality LUT Sequence: stored values to Hounsfield units, for CT), then a
VOI transform to ``[0, 1]``, then MONOCHROME1 is inverted so that every image has the same
polarity (high values bright). The VOI transform is, in this order of preference:

1. the window given for the whole set (``--dicom-window CENTER WIDTH``): ``CENTER - WIDTH/2``
   becomes 0 and ``CENTER + WIDTH/2`` becomes 1, clipped (the file's own window is ignored);
2. the file's VOI LUT Sequence (its first LUT);
3. the file's first Window Center / Window Width, with its VOI LUT Function (``LINEAR``,
   ``LINEAR_EXACT`` or ``SIGMOID``, PS3.3 C.11.2.1.2);
4. none of these: the image's own minimum to its own maximum (as 16-bit PNGs are read).

RGB and YBR files are colour (pydicom converts YBR to RGB), PALETTE COLOR through its
palette. Multi-frame files, files without pixel data and compressed files with no decoder
installed are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
INSTALL = "pip install pydicom (or the project's dicom extra: pip install -e \".[dicom]\")"


def is_dicom(path: Path) -> bool:
    """A file named ``*.dcm`` or ``*.dicom``, or any file of another name (a DICOM tree's
    ``IM000001``, a UID) with the ``DICM`` marker at byte 128; never a ``DICOMDIR`` index."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.name.upper() == "DICOMDIR":
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def require_pydicom() -> Any:
    """The ``pydicom`` module, or an ``ImportError`` that says how to install it."""
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"the data holds DICOM files, and reading them needs pydicom: "
                          f"{INSTALL}") from None
    return pydicom


def check_window(window: Sequence[float] | None) -> tuple[float, float] | None:
    """``dicom_window`` as ``(center, width)``, or ``None``; a width must be positive."""
    if window is None:
        return None
    values = list(window)
    if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"dicom_window must be [center, width], got {window!r}")
    if values[1] <= 0:
        raise ValueError(f"dicom_window's width must be positive, got {values[1]!r}")
    return float(values[0]), float(values[1])


def read_pixels(path: Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """The file's image: ``[H, W]`` float32 in ``[0, 1]`` (grayscale, through the pipeline of
    the module's docstring) or ``[H, W, 3]`` uint8 (colour).

    Raises:
        ValueError: the file cannot be a 2-D image (the message says why).
    """
    pydicom = require_pydicom()
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = pydicom.dcmread(path)
    pixels = _stored_pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        if pixels.dtype != np.uint8:  # 16-bit palette entries
            pixels = pixels >> 8
        return pixels.astype(np.uint8)
    if pixels.ndim == 3:  # RGB, or YBR converted to RGB by pydicom
        bits = int(ds.get("BitsStored", 8))
        if bits > 8:
            pixels = np.rint(pixels * (255.0 / (2**bits - 1)))
        return pixels.astype(np.uint8)
    unit = _voi(apply_modality_lut(pixels, ds).astype(np.float32), ds, window)
    return 1.0 - unit if photometric == "MONOCHROME1" else unit


def _stored_pixels(ds: Any) -> np.ndarray:
    """The stored values of a single-frame image, or a ``ValueError`` naming why not."""
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        kind = ds.SOPClassUID.name if "SOPClassUID" in ds else "DICOM file"
        raise ValueError(f"no pixel data (a {kind}, not an image)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames), not a 2-D image: export one "
                         "frame per file, or leave the file out")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ValueError(f"compressed pixel data ({syntax.name}) that pydicom cannot "
                             "decode") from None
        if not decoder.is_available:
            raise ValueError(
                f"compressed pixel data ({syntax.name}) and no decoder installed for it; "
                f"install one of: {'; '.join(decoder.missing_dependencies)}")
    return np.asarray(ds.pixel_array)


def _voi(values: np.ndarray, ds: Any, window: tuple[float, float] | None) -> np.ndarray:
    """Modality values to ``[0, 1]`` float32 by the first applicable VOI transform."""
    if window is not None:
        return _window(values, *window, "LINEAR_EXACT")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_voi

        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(apply_voi(values, ds, 0) / (2**bits - 1), 0, 1).astype(np.float32)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        # several windows (e.g. lung and mediastinum): the first, as viewers open the file
        center, width = (float(np.ravel(np.asarray(v, dtype=np.float64))[0])
                         for v in (center, width))
        if width > 0:
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            return _window(values, center, width, function)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """A window to ``[0, 1]``, by DICOM's VOI LUT Function (PS3.3 C.11.2.1.2)."""
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        scaled = (values - center) / width + 0.5
    else:  # LINEAR: the window's ends at center - 0.5 -/+ (width - 1) / 2
        scaled = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def tag_groups(paths: Sequence[Path], keyword: str, fallback: Sequence[str]) -> list[str]:
    """Each file's value of the DICOM attribute ``keyword`` (``PatientID``, ``StudyInstanceUID``,
    ...); a file that is not DICOM or lacks the attribute is its own group (``fallback``)."""
    pydicom = require_pydicom()
    if pydicom.datadict.tag_for_keyword(keyword) is None:
        raise ValueError(f"dicom_group_tag must be a DICOM keyword such as 'PatientID' or "
                         f"'StudyInstanceUID', got {keyword!r}")
    groups = []
    for path, own in zip(paths, fallback):
        value = ""
        if is_dicom(path):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword])
                value = str(ds.get(keyword, "") or "").strip()
            except Exception:  # unreadable: the decode step reports it with the reason
                value = ""
        groups.append(f"{keyword}={value}" if value else own)
    return groups
