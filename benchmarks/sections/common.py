"""What every benchmark section shares: the run settings (:class:`Bench`), the paper's sizes,
the value-check helpers, the :class:`Section` interface that the report iterates, and the
number and table formatting of the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import crckd_losses

from ..measure import peak_extra_bytes, synchronize, time_group

PAPER: dict[str, Any] = {"B": 64, "d": 128, "P": 20, "K": 4096, "N": 7012, "C": 7, "tau": 0.07}

#: The largest ``B x (P+K) x d`` block a sweep point may gather (bytes); bigger points of the
#: reference and of the forced gather path are skipped so the run fits in this machine's memory.
BLOCK_CAP_BYTES = 600e6

Row = dict[str, Any]
#: One target: ``{"name", "text", "value", "met", "detail"}``.
Target = dict[str, Any]
#: One bar of the overview figure: (label, speed-up of the library, target or ``None``).
Bar = tuple[str, float, float | None]


@dataclass
class Bench:
    """Settings shared by all sections and a place to note what was skipped.

    Attributes:
        device: where everything runs.
        dtypes: the dtypes to run the paper-size comparisons in; sweeps use the first.
        quick: the reduced grid.
        budget_s: seconds of timing to aim for per comparison (after warm-up).
        cuda_graphs: on CUDA, also time steps captured in a CUDA graph.
        skipped: human-readable notes of grid points left out, and why.
    """

    device: torch.device
    dtypes: list[torch.dtype]
    quick: bool = False
    budget_s: float = 6.0
    cuda_graphs: bool = True
    skipped: list[str] = field(default_factory=list)

    @property
    def min_rounds(self) -> int:
        return 1 if self.quick else 5

    @property
    def max_rounds(self) -> int:
        return 2 if self.quick else 25

    def compare(
        self,
        fns: Mapping[str, Callable[[], Any]],
        samples: int | None,
        memory: bool = True,
        budget_s: float | None = None,
        min_rounds: int | None = None,
        no_memory: tuple[str, ...] = (),
    ) -> dict[str, Row]:
        """Warms up, times round-robin, measures peak extra memory, returns one row each.

        Args:
            fns: name -> zero-argument callable.
            samples: samples (anchors, images) per call, for throughput; ``None`` for none.
            memory: measure peak extra memory.
            budget_s: timing budget for this comparison (default ``self.budget_s``).
            min_rounds: minimum timed rounds (default ``self.min_rounds``).
            no_memory: contenders whose memory the tracker cannot see (numpy work).

        Returns:
            name -> ``{"median_s", "min_s", "iqr_s", "rounds", "samples_per_s", "peak_bytes"}``.
        """
        budget = self.budget_s if budget_s is None else budget_s
        low = self.min_rounds if min_rounds is None or self.quick else min_rounds
        estimate = 0.0
        for fn in fns.values():
            # The first call warms up (lazy init, allocator); a slow one also gives the estimate.
            synchronize(self.device)
            t0 = time.perf_counter()
            fn()
            synchronize(self.device)
            first = time.perf_counter() - t0
            if first > 0.5 or self.quick:
                estimate += first
                continue
            t0 = time.perf_counter()
            fn()
            synchronize(self.device)
            estimate += time.perf_counter() - t0
        rounds = int(min(max(low, budget / max(estimate, 1e-9)), self.max_rounds))
        timed = time_group(fns, self.device, warmup=0, repeats=max(rounds, low))
        rows: dict[str, Row] = {}
        for name, fn in fns.items():
            row: Row = dict(timed[name])
            row["samples_per_s"] = samples / row["median_s"] if samples else None
            row["peak_bytes"] = (
                peak_extra_bytes(fn, self.device) if memory and name not in no_memory else None
            )
            rows[name] = row
        return rows


class Section:
    """One benchmark section: it runs, and it says what its results mean.

    A section owns everything about its part of the suite: :meth:`run` builds the inputs,
    checks that the contenders compute the same values, times them and returns plain JSON-able
    results; the other methods turn those results (fresh, or read back from a saved JSON file)
    into targets, markdown and plots. ``benchmarks/report.py`` calls these methods for every
    section of the registry in ``benchmarks/sections/__init__.py`` whose results it holds.

    Attributes:
        name: the key of the section's results in the JSON file and on the command line.
    """

    name: str = ""

    def run(self, bench: Bench) -> dict[str, Any]:
        """Measures; returns JSON-able results."""
        raise NotImplementedError

    def targets(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Target]:
        """The section's targets with their measured values (``meta`` names the device)."""
        return []

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        """The section's part of the report, as lines (``stem``: the results' file stem)."""
        return []

    def plots(
        self, result: dict[str, Any], meta: dict[str, Any], out_dir: Path, stem: str
    ) -> list[str]:
        """Writes the section's own figures into ``out_dir``; returns their file names."""
        return []

    def bars(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Bar]:
        """Bars of the overview figure: the library's speed-ups with their targets."""
        return []

    def overview_panel(self, result: dict[str, Any]) -> Callable[[Any], None] | None:
        """A panel of the overview figure, drawn on the matplotlib axes it is given; ``None``
        for none."""
        return None


def bar(label: str, value: float | None, bound: float | None) -> list[Bar]:
    """One overview bar, or none where the value is missing."""
    return [] if value is None else [(label, value, bound)]


def target(
    name: str, text: str, value: float | None, bound: float, higher_is_better: bool = True,
    detail: str = "",
) -> Target:
    """A target row: ``met`` is ``None`` when the value could not be measured."""
    met = None if value is None else (value >= bound if higher_is_better else value <= bound)
    return {"name": name, "text": text, "value": value, "met": met, "detail": detail}


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """``torch.autocast`` to ``dtype``, or nothing for float32/float64."""
    if dtype == torch.float32 or dtype == torch.float64:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> float:
    """Raises unless :func:`rel_diff` is within ``rtol``; returns the difference."""
    diff = rel_diff(got, want)
    if not diff <= rtol:
        raise AssertionError(f"{name}: relative difference {diff:.3g} exceeds {rtol:.1g}")
    return diff


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of a value check in ``dtype``."""
    # float32 sums of thousands of terms, and CRP gradients near p_S = p_T, cancel to ~1e-3.
    return {torch.float64: 1e-10, torch.float32: 5e-3}.get(dtype, 1e-1)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


class ValueChecksUnsupported(RuntimeError):
    """The installed library takes only ``True``/``False`` in ``set_value_checks``."""


def _current_value_checks() -> Any:
    getter = getattr(crckd_losses, "value_checks", None)
    if getter is None:
        getter = getattr(getattr(crckd_losses, "_checks", None), "value_checks", None)
    return getter() if callable(getter) else None


@contextmanager
def value_checks(mode: str) -> Iterator[None]:
    """Runs the block under the library's value-check policy ``mode`` and restores the one
    before.

    Raises:
        ValueChecksUnsupported: the library has no such policy (an older
            ``set_value_checks(enabled: bool)``).
    """
    old = _current_value_checks()
    try:
        crckd_losses.set_value_checks(mode)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ValueChecksUnsupported(
            f"crckd_losses.set_value_checks({mode!r}) is not supported by this version: {e}"
        ) from e
    try:
        yield
    finally:
        crckd_losses.set_value_checks(old if old is not None else "auto")  # type: ignore[arg-type]


def has_value_check_policies() -> bool:
    """Whether ``crckd_losses.set_value_checks`` takes the policies ``"auto"``/``"mask"``."""
    old = _current_value_checks()
    try:
        crckd_losses.set_value_checks("auto")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    crckd_losses.set_value_checks(old if old is not None else "auto")  # type: ignore[arg-type]
    return True


@contextmanager
def value_checks_off(policies: bool | None = None) -> Iterator[None]:
    """No value reads at all: policy ``"mask"``, or ``False`` on a library without policies.

    Args:
        policies: :func:`has_value_check_policies`, when the caller knows it already (a
            timed call should not ask each time).
    """
    if has_value_check_policies() if policies is None else policies:
        with value_checks("mask"):
            yield
        return
    crckd_losses.set_value_checks(False)
    try:
        yield
    finally:
        crckd_losses.set_value_checks(True)


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Sets torch's intra-op thread count for the duration (``None`` leaves it)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# Report formatting
# ---------------------------------------------------------------------------------------------


def ratio(rows: dict[str, Any], num: str, den: str, key: str = "median_s") -> float | None:
    """``rows[num][key] / rows[den][key]``, or ``None`` where either is missing."""
    a, b = rows.get(num, {}).get(key), rows.get(den, {}).get(key)
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def fmt(x: float | None, digits: int = 3) -> str:
    """A number to ``digits`` significant digits; ``n/a`` for ``None``."""
    if x is None:
        return "n/a"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    return f"{x:.{digits}g}"


def ms(row: dict[str, Any]) -> str:
    """A row's median time in milliseconds."""
    return fmt(row["median_s"] * 1e3) if row.get("median_s") is not None else "n/a"


def mb(row: dict[str, Any]) -> str:
    """A row's peak extra memory in MB."""
    b = row.get("peak_bytes")
    return "n/a" if b is None else fmt(b / 1e6)


def _thru(row: dict[str, Any]) -> str:
    v = row.get("samples_per_s")
    return "n/a" if v is None else f"{v:,.0f}"


def table(rows: dict[str, Any], baseline: str | None, unit: str = "samples/s") -> list[str]:
    """A markdown table of timed rows, with ratios against ``baseline`` when given."""
    head = f"| contender | median ms | IQR ms | {unit} | peak extra MB |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    if baseline:
        lines[0] = head + f" time vs {baseline} | memory vs {baseline} |"
        lines[1] += "---:|---:|"
    for name, row in rows.items():
        if not row:
            continue
        line = (f"| {name} | {ms(row)} | {fmt(row['iqr_s'] * 1e3)} | {_thru(row)} | "
                f"{mb(row)} |")
        if baseline:
            t = ratio(rows, name, baseline)
            m = ratio(rows, name, baseline, "peak_bytes")
            t_x, m_x = ("x" if v is not None else "" for v in (t, m))
            line += f" {fmt(t)}{t_x} | {fmt(m)}{m_x} |"
        lines.append(line)
    return lines


def params(p: dict[str, Any]) -> str:
    """``{"B": 64, "d": 128}`` -> ``"B=64, d=128"``."""
    return ", ".join(f"{k}={v}" for k, v in p.items())
