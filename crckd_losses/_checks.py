"""Input checks shared by the functional and module APIs.

Shape, dtype and device checks cost nothing at run time and always run. Checks that read
tensor *values* (finiteness, index ranges) need a device-to-host sync; they run in eager mode
unless switched off with :func:`set_value_checks`, and are skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_LIBRARY_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))

_VALUE_CHECKS = True


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (NaN/Inf, index ranges) on or off for the whole library.

    They are on by default. Switching them off removes the only host syncs in the losses'
    forward passes; shape, dtype and device checks stay on.

    Args:
        enabled: ``True`` to check values, ``False`` to skip those checks.
    """
    global _VALUE_CHECKS
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _VALUE_CHECKS = enabled


def value_checks_enabled() -> bool:
    """Whether value checks run now (on, and not inside a ``torch.compile`` trace)."""
    return _VALUE_CHECKS and not torch.compiler.is_compiling()


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: object, ndim: int) -> torch.Tensor:
    t = check_tensor(name, x)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_index(name: str, x: object, ndim: int) -> torch.Tensor:
    t = check_tensor(name, x)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
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
    if value_checks_enabled() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_range(name: str, x: torch.Tensor, high: int) -> None:
    """Every entry of ``x`` must lie in ``[0, high)``."""
    if value_checks_enabled() and x.numel() > 0:
        lo, hi = int(x.min()), int(x.max())
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
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


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
