"""Input checks shared by the functional and module APIs.

Shape, dtype and device checks cost nothing at run time and always run. Checks that read
tensor *values* (finiteness, index ranges) need the values on the host: free on a CPU, a
device-to-host sync on an accelerator. :func:`set_value_checks` chooses where they run; by
default (``"auto"``) they run on CPU tensors and not on accelerators, where the banks mask bad
rows on the device instead. They are always skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Literal

import torch

_LIBRARY_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))

ValueChecks = Literal["auto", "raise", "mask"]
VALUE_CHECKS: tuple[ValueChecks, ...] = ("auto", "raise", "mask")
_VALUE_CHECKS: ValueChecks = "auto"


def set_value_checks(mode: ValueChecks | bool) -> None:
    """Choose where the library reads tensor values to check them (NaN/Inf, index ranges).

    - ``"auto"`` (default): on CPU tensors, read them and raise a ``ValueError`` before any
      state changes; on accelerators, read nothing, so a training step never waits for the
      device.
    - ``"raise"``: read and raise on every device (each check is a host sync on a GPU).
    - ``"mask"``: never read values, not even on a CPU.

    Whatever the mode, a memory bank never takes a non-finite row or writes at an
    out-of-range index: :meth:`~crckd_losses.MomentumMemoryBank.update` masks such rows on the
    device and counts them in ``rejected_rows``. Shape, dtype and device checks always run.
    ``True`` means ``"raise"`` and ``False`` means ``"mask"``.

    Args:
        mode: ``"auto"``, ``"raise"``, ``"mask"``, or a bool.
    """
    global _VALUE_CHECKS
    if isinstance(mode, bool):
        _VALUE_CHECKS = "raise" if mode else "mask"
        return
    _VALUE_CHECKS = check_choice("mode", mode, VALUE_CHECKS)  # type: ignore[assignment]


def value_checks() -> ValueChecks:
    """The mode :func:`set_value_checks` set (``"auto"`` by default)."""
    return _VALUE_CHECKS


def reads_values(x: torch.Tensor) -> bool:
    """Whether checks read the values of ``x`` now: by the mode and ``x``'s device, and never
    inside a ``torch.compile`` trace."""
    if _VALUE_CHECKS == "mask" or torch.compiler.is_compiling():
        return False
    return _VALUE_CHECKS == "raise" or x.device.type == "cpu"


def _dims(ndim: int) -> str:
    return f"{ndim} dimension" + ("" if ndim == 1 else "s")


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: object, ndim: int) -> torch.Tensor:
    t = check_tensor(name, x)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {_dims(ndim)}, got shape {tuple(t.shape)}")
    return t


def check_index(name: str, x: object, ndim: int) -> torch.Tensor:
    t = check_tensor(name, x)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {_dims(ndim)}, got shape {tuple(t.shape)}")
    return t


def check_nonempty(name: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        raise ValueError(
            f"{name} is an empty batch (shape {tuple(x.shape)}); need at least one row"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if reads_values(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_range(name: str, x: torch.Tensor, high: int) -> None:
    """Every entry of ``x`` must lie in ``[0, high)``."""
    if reads_values(x) and x.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(x))  # one pass over x, not two
        if lo < 0 or hi >= high:
            raise ValueError(f"{name} must lie in [0, {high}), got values in [{lo}, {hi}]")


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def check_unit_interval(name: str, value: object, *, closed_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = 0.0 <= value <= 1.0 if closed_high else 0.0 <= value < 1.0
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must lie in [0, 1{bracket}, got {value}")
    return float(value)


def check_reduction(reduction: str) -> str:
    return check_choice("reduction", reduction, ("mean", "sum", "none"))


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses reduce in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def as_label_tensor(name: str, labels: object) -> torch.Tensor:
    """``labels`` as a 1-D, non-empty long tensor: a tensor, a numpy array or any sequence of
    integers (a torchvision dataset's ``.targets``). Floats and bools are refused."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach()
    elif isinstance(labels, str) or _holds_strings(labels):
        raise TypeError(
            f"{name} must be integer class ids, got class names (strings), as read from a "
            f"CSV; map them to ids first, e.g. classes = sorted(set(names)); "
            f"ids = [classes.index(n) for n in names]"
        )
    else:
        try:
            t = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"{name} must be a tensor, array or sequence of integer class ids, got "
                f"{type(labels).__name__} ({error})"
            ) from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(
            f"{name} must hold integer class ids, got dtype {t.dtype}; convert them, e.g. "
            f"torch.as_tensor({name}).long() if they are whole numbers"
        )
    if t.dim() != 1:
        raise ValueError(f"{name} must have 1 dimension, got shape {tuple(t.shape)}")
    check_nonempty(name, t)
    return t.long()


def _holds_strings(labels: object) -> bool:
    """Whether ``labels`` is a sequence or array whose first entry is a string (a CSV's
    class names, a numpy array of dtype ``str`` or ``object``)."""
    kind = getattr(getattr(labels, "dtype", None), "kind", None)
    if kind in ("U", "S"):
        return True
    try:
        first = next(iter(labels))  # type: ignore[call-overload]
    except (TypeError, StopIteration):
        return False
    return isinstance(first, (str, bytes))


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` must be one of ``allowed`` (the options of a string setting)."""
    if not isinstance(value, str) or value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def warn_at_caller(message: str) -> None:
    """A ``UserWarning`` that points at the first frame outside this library and torch (the
    user's own line), however deep inside modules and wrappers it was raised."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        (_LIBRARY_DIR, _TORCH_DIR)
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, stacklevel=level)
