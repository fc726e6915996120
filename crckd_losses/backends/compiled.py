"""The ``"compiled"`` backend: a module's step after its checks and its sampling, compiled
once with inductor (``torch.compile(fullgraph=True)``).

On a GPU a step's cost is kernel launches, not arithmetic; inductor fuses its elementwise
work into a few generated kernels (on a CPU it generates C++). Inside the compiled step the
CCD pair takes the general operators (``"dense"`` or ``"gather"`` by size). Under a
``TorchDispatchMode`` (operator counters, memory trackers), where nothing compiled can run,
and inside an outer ``torch.compile`` trace (which fuses the step itself), the same function
runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._checks import warn_at_caller

_COMPILED: dict[str, Callable[..., Any]] = {}


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


def run(owner: Any, chosen: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, compiled where the user chose this backend (``chosen``) or ``"auto"``
    did. A compile failure under ``"auto"`` warns once and runs ``owner``'s steps eagerly from
    then on (nothing has run when compilation fails, so no state has changed); a chosen
    backend raises it. An error that the eager call raises too is the step's own: it is
    raised, and compiling is tried again next time."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or \
            owner.__dict__.get("_compile_failed"):
        return fn(*args)
    try:
        return compiled(fn)(*args)
    except Exception as error:
        if chosen or not is_compile_error(error):
            raise
        out = fn(*args)
        owner.__dict__["_compile_failed"] = True
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warn_at_caller(
            f"backend='auto': compiling the step failed ({type(error).__name__}: "
            f"{first_line}); running it eagerly from now on. Pass backend='dense' to skip "
            f"the attempt."
        )
        return out
