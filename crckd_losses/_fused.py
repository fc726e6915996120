"""The fused path of :class:`~crckd_losses.CRCKDLoss`: its step after the checks and the
sampling, compiled once with inductor (``torch.compile``).

On a GPU the step's cost is kernel launches, not arithmetic; inductor fuses its elementwise
work into a few generated kernels. ``fused="auto"`` (the default) takes this path where it is
known to pay and to work: CUDA tensors, Triton installed, one process (no
``torch.distributed`` group of several ranks), and not already inside a ``torch.compile``
trace (the outer compile then fuses the step itself). Everywhere else the same function runs
eagerly. ``fused=True`` forces the path on any device (on a CPU inductor generates C++), except
under a ``TorchDispatchMode`` (operator counters, memory trackers), where nothing compiled can
run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import distributed
from ._checks import warn_at_caller

Fused = bool | Literal["auto"]

_COMPILED: dict[str, Callable[..., Any]] = {}


def check_fused(value: object) -> Fused:
    """``value`` must be ``True``, ``False`` or ``"auto"``."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"fused must be True, False or 'auto', got {value!r}")


def triton_available() -> bool:
    """Whether Triton, which inductor needs for GPU kernels, is installed."""
    return importlib.util.find_spec("triton") is not None


def use_fused(setting: Fused, device: torch.device) -> bool:
    """Whether a step on ``device`` takes the compiled path under ``setting``. Never inside a
    ``torch.compile`` trace, nor under a ``TorchDispatchMode`` (an operator counter or memory
    tracker), which compiled code cannot run under: there the step runs eagerly."""
    if torch.compiler.is_compiling() or setting is False or \
            _get_current_dispatch_mode() is not None:
        return False
    if setting is True:
        return True
    return device.type == "cuda" and triton_available() and distributed.world_size() == 1


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled with inductor into one graph, built once per function."""
    key = f"{fn.__module__}.{fn.__qualname__}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, fullgraph=True)
    return _COMPILED[key]


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` may have come from tracing or compiling: an exception of dynamo or
    inductor, or one that dynamo marked with the user frame it was tracing when it was raised
    (torch 2.7's dynamo raised some of its own failures as plain ``AssertionError``)."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor")) or \
        hasattr(error, "innermost_user_frame_summary")


def run(owner: Any, setting: Fused, device: torch.device, fn: Callable[..., Any],
        *args: Any) -> Any:
    """``fn(*args)`` on ``device``, compiled when :func:`use_fused` says so. Under ``"auto"`` a
    compile failure warns once and falls back to eager for ``owner`` from then on (nothing has
    run when compilation fails, so no state has changed); under ``True`` it is raised. An
    error that the eager call raises too is the step's own: it is raised, and compiling is
    tried again next time."""
    if owner.__dict__.get("_fused_failed") or not use_fused(setting, device):
        return fn(*args)
    try:
        return compiled(fn)(*args)
    except Exception as error:
        if setting is True or not is_compile_error(error):
            raise
        out = fn(*args)
        owner.__dict__["_fused_failed"] = True
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warn_at_caller(
            f"fused='auto': compiling the CRCKD step failed ({type(error).__name__}: "
            f"{first_line}); running it eagerly from now on. Pass fused=False to skip the "
            f"attempt."
        )
        return out
