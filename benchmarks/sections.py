"""The benchmark sections: each builds its inputs, checks that every contender computes the
same values, times the contenders against each other and returns plain JSON-able results.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import crckd_losses
from crckd_losses import (
    CRCKDLoss,
    EMATeacher,
    MomentumMemoryBank,
    functional,
)

from . import references
from .measure import peak_extra_bytes, synchronize, time_group

PAPER = {"B": 64, "d": 128, "P": 20, "K": 4096, "N": 7012, "C": 7, "tau": 0.07}

#: The largest ``B x (P+K) x d`` block a sweep point may gather (bytes); bigger points of the
#: reference and of the forced gather path are skipped so the run fits in this machine's memory.
BLOCK_CAP_BYTES = 600e6

Row = dict[str, Any]


@dataclass
class Bench:
    """Settings shared by all sections and a place to note what was skipped.

    Attributes:
        device: where everything runs.
        dtypes: the dtypes to run the paper-size comparisons in; sweeps use the first.
        quick: the reduced grid.
        budget_s: seconds of timing to aim for per comparison (after warm-up).
        skipped: human-readable notes of grid points left out, and why.
    """

    device: torch.device
    dtypes: list[torch.dtype]
    quick: bool = False
    budget_s: float = 6.0
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


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32 or dtype == torch.float64:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> float:
    diff = _rel_diff(got, want)
    if not diff <= rtol:
        raise AssertionError(f"{name}: relative difference {diff:.3g} exceeds {rtol:.1g}")
    return diff


def _tolerance(dtype: torch.dtype) -> float:
    # float32 sums of thousands of terms, and CRP gradients near p_S = p_T, cancel to ~1e-3.
    return {torch.float64: 1e-10, torch.float32: 5e-3}.get(dtype, 1e-1)


# ---------------------------------------------------------------------------------------------
# CCD
# ---------------------------------------------------------------------------------------------


@dataclass
class CCDInputs:
    """Inputs of one CCD comparison (both directions)."""

    student_emb: torch.Tensor
    teacher_emb: torch.Tensor
    student_memory: torch.Tensor
    teacher_memory: torch.Tensor
    sample_indices: torch.Tensor
    num_positives: int
    log_z: tuple[float, float]
    temperature: float = PAPER["tau"]

    @property
    def bank_size(self) -> int:
        return int(self.student_memory.shape[0])


def make_ccd_inputs(
    batch: int,
    dim: int,
    num_positives: int,
    num_negatives: int,
    bank_size: int,
    device: torch.device,
    num_classes: int | None = None,
    seed: int = 0,
) -> CCDInputs:
    """Random unit embeddings and banks, sampled indices and a frozen ``log Z`` per direction.

    With ``num_classes``, the indices come from the library's class-guided sampler on random
    labels (the paper's setting); without, uniform random rows (the scoring cost does not
    depend on which rows are read, and this keeps very large sweeps cheap).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def unit(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)

    memory_s, memory_t = unit(bank_size), unit(bank_size)
    g_s, g_t = unit(batch).requires_grad_(), unit(batch).requires_grad_()
    width = num_positives + num_negatives
    if num_classes is not None:
        labels = torch.randint(0, num_classes, (bank_size,), generator=g).to(device)
        bank = MomentumMemoryBank(labels, dim=dim)
        anchors = torch.randperm(bank_size, generator=g)[:batch].to(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        idx = bank.sample(anchors, num_positives, num_negatives, generator=gen)
    else:
        idx = torch.randint(0, bank_size, (batch, width), generator=g).to(device)
    with torch.no_grad():
        log_z = tuple(
            float(
                functional.estimate_log_normalizer(
                    functional.contrastive_scores(a, m, idx, PAPER["tau"], path="dense"),
                    bank_size,
                )
            )
            for a, m in ((g_s, memory_t), (g_t, memory_s))
        )
    return CCDInputs(g_s, g_t, memory_s, memory_t, idx, num_positives, log_z)  # type: ignore[arg-type]


def ccd_library(x: CCDInputs, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's CCD (both directions) with a forced or automatic score path."""
    return functional.class_guided_contrastive_loss(
        x.student_emb,
        x.teacher_emb,
        x.student_memory,
        x.teacher_memory,
        x.sample_indices,
        x.num_positives,
        x.temperature,
        x.log_z[0],
        x.log_z[1],
        path=path,  # type: ignore[arg-type]
    )


def ccd_reference(x: CCDInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The CRD-style reference (gather, exp) on the same inputs."""
    return references.naive_ccd(
        x.student_emb,
        x.teacher_emb,
        x.student_memory,
        x.teacher_memory,
        x.sample_indices,
        x.num_positives,
        x.temperature,
        x.log_z[0],
        x.log_z[1],
    )


def _ccd_step(
    x: CCDInputs, compute: Callable[[CCDInputs], tuple[torch.Tensor, torch.Tensor]], ctx: Any
) -> Callable[[], None]:
    def step() -> None:
        with ctx():
            loss_s, loss_t = compute(x)
        (loss_s + loss_t).backward()
        x.student_emb.grad = None
        x.teacher_emb.grad = None

    return step


def check_ccd(x: CCDInputs, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Asserts that the dense path, the gather path and the reference agree (losses, grads)."""
    ctx = _autocast(device, dtype)
    results = {}
    for name, compute in (
        ("dense", lambda v: ccd_library(v, "dense")),
        ("gather", lambda v: ccd_library(v, "gather")),
        ("reference", ccd_reference),
    ):
        with ctx:
            loss_s, loss_t = compute(x)
        grads = torch.autograd.grad(loss_s + loss_t, [x.student_emb, x.teacher_emb])
        results[name] = (loss_s.detach().float(), loss_t.detach().float(), *grads)
    want = results["dense"]
    diffs = {}
    tol = _tolerance(dtype)
    low_precision = dtype not in (torch.float32, torch.float64)
    for name in ("gather", "reference"):
        for what, got, exp in zip(("L_S", "L_T", "grad_S", "grad_T"), results[name], want):
            if name == "reference" and low_precision:
                # exp/log in bfloat16 loses the loss (log(1-h) rounds near 1): record, do not
                # assert; the float32 run asserts that the reference computes the same thing.
                diffs[f"{name}/{what} (not asserted)"] = _rel_diff(got, exp)
            else:
                diffs[f"{name}/{what}"] = _assert_close(f"CCD {name} {what}", got, exp, tol)
    if low_precision:
        # The library under autocast against itself in float32.
        full = ccd_library(x, "dense")
        for what, got, exp in zip(("L_S", "L_T"), results["dense"], full):
            diffs[f"dense/{what} vs float32"] = _assert_close(
                f"CCD {dtype} vs float32 {what}", got, exp.detach(), tol
            )
    return diffs


CCD_CONTENDERS = ("auto", "dense", "gather", "reference")


def _ccd_fns(
    x: CCDInputs, dtype: torch.dtype, device: torch.device, names: tuple[str, ...]
) -> dict[str, Callable[[], None]]:
    def ctx() -> Any:
        return _autocast(device, dtype)

    makers: dict[str, Callable[[CCDInputs], tuple[torch.Tensor, torch.Tensor]]] = {
        "auto": lambda v: ccd_library(v, "auto"),
        "dense": lambda v: ccd_library(v, "dense"),
        "gather": lambda v: ccd_library(v, "gather"),
        "reference": ccd_reference,
    }
    return {name: _ccd_step(x, makers[name], ctx) for name in names}


def run_ccd(bench: Bench) -> dict[str, Any]:
    """CCD, both directions, at the paper's sizes: library paths against the reference."""
    p = dict(PAPER)
    if bench.quick:
        p.update(B=16, K=256, N=1000)
    out: dict[str, Any] = {"params": p, "by_dtype": {}}
    for dtype in bench.dtypes:
        x = make_ccd_inputs(p["B"], p["d"], p["P"], p["K"], p["N"], bench.device, p["C"])
        checks = check_ccd(x, dtype, bench.device)
        fns = _ccd_fns(x, dtype, bench.device, CCD_CONTENDERS)

        def checks_off(step: Callable[[], None] = fns["auto"]) -> None:
            crckd_losses.set_value_checks(False)
            try:
                step()
            finally:
                crckd_losses.set_value_checks(True)

        fns["auto, value checks off"] = checks_off
        rows = bench.compare(fns, samples=p["B"], budget_s=2 * bench.budget_s)
        out["by_dtype"][str(dtype).replace("torch.", "")] = {
            "auto_path": functional.choose_score_path(p["N"], p["P"] + p["K"]),
            "rows": rows,
            "max_rel_diff_vs_dense": checks,
        }
    return out


def _sweep_points(bench: Bench) -> dict[str, list[dict[str, int]]]:
    base = {k: PAPER[k] for k in ("B", "d", "P", "K", "N")}
    if bench.quick:
        base.update(B=8, K=256, N=2000, d=64)
        return {
            "N": [dict(base, N=n) for n in (500, 4000)],
            "K": [dict(base, K=k) for k in (64, 256)],
            "B": [dict(base, B=b) for b in (4, 16)],
            "d": [dict(base, d=d) for d in (32, 64)],
        }
    return {
        "N": [dict(base, N=n) for n in (1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000)],
        # N = 100k, so that the automatic path gathers for all but the widest K.
        "K": [dict(base, N=100_000, K=k) for k in (256, 1024, 4096, 16384, 65536)],
        "B": [dict(base, B=b) for b in (32, 64, 128, 256, 512, 1024)],
        "d": [dict(base, d=d) for d in (64, 128, 256, 512)],
    }


def run_sweeps(bench: Bench) -> dict[str, Any]:
    """CCD (both directions, forward+backward) swept over N, K, B and d, one at a time.

    The automatic path is not timed separately: it runs exactly the path that
    ``choose_score_path`` names, so its figures are that path's.
    """
    dtype = bench.dtypes[0]
    out: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "sweeps": {}}
    for axis, points in _sweep_points(bench).items():
        rows = []
        for q in points:
            width = q["P"] + q["K"]
            block = q["B"] * width * q["d"] * torch.empty((), dtype=dtype).element_size()
            names: tuple[str, ...] = ("dense", "gather", "reference")
            if block > BLOCK_CAP_BYTES:
                names = ("dense",)
                bench.skipped.append(
                    f"sweep {axis}={q[axis]}: gather path and reference skipped, their "
                    f"B x (P+K) x d block would be {block / 1e9:.1f} GB "
                    f"(cap {BLOCK_CAP_BYTES / 1e9:.1f} GB)"
                )
            x = make_ccd_inputs(q["B"], q["d"], q["P"], q["K"], q["N"], bench.device)
            fns = _ccd_fns(x, dtype, bench.device, names)
            timed = bench.compare(fns, samples=q["B"], min_rounds=3)
            auto = functional.choose_score_path(q["N"], width)
            timed["auto"] = dict(timed[auto]) if auto in timed else {}
            rows.append({"params": q, "auto_path": auto, "rows": timed})
            del x, fns
        out["sweeps"][axis] = rows
    out["fits"] = _sweep_fits(out["sweeps"])
    return out


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _sweep_fits(sweeps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Log-log slopes of the automatic path's time: in ``B (P+K)`` and in ``N``."""
    fits: dict[str, Any] = {}
    for axis in ("K", "B"):
        xs, ys = [], []
        for point in sweeps.get(axis, []):
            row = point["rows"].get("auto")
            if row:
                xs.append(point["params"]["B"] * (point["params"]["P"] + point["params"]["K"]))
                ys.append(row["median_s"])
        fits[f"slope_time_vs_B(P+K)_over_{axis}"] = _slope(xs, ys)
        fits[f"slope_time_vs_B(P+K)_over_{axis}_largest_half"] = _slope(
            xs[len(xs) // 2 :], ys[len(ys) // 2 :]
        )
    gather_n = [
        (p["params"]["N"], p["rows"]["auto"]["median_s"], p["rows"]["auto"]["peak_bytes"])
        for p in sweeps.get("N", [])
        if p["auto_path"] == "gather" and p["rows"].get("auto")
    ]
    if len(gather_n) >= 2:
        fits["gather_region_N"] = [n for n, _, _ in gather_n]
        fits["slope_time_vs_N_in_gather_region"] = _slope(
            [n for n, _, _ in gather_n], [t for _, t, _ in gather_n]
        )
        fits["time_ratio_largest_over_smallest_N_in_gather_region"] = (
            gather_n[-1][1] / gather_n[0][1]
        )
        fits["memory_ratio_largest_over_smallest_N_in_gather_region"] = (
            gather_n[-1][2] / gather_n[0][2]
        )
    return fits


def run_crossover(bench: Bench) -> dict[str, Any]:
    """Dense against gather path as the bank grows past ``P+K``: where does gather win?"""
    dtype = bench.dtypes[0]
    if bench.quick:
        widths, factors = (276,), (1, 16)
        batch = 8
    else:
        widths, factors = (1044, 4116), (1, 2, 4, 8, 16, 32, 64)
        batch = PAPER["B"]
    out: dict[str, Any] = {
        "dtype": str(dtype).replace("torch.", ""),
        "B": batch,
        "d": PAPER["d"],
        "library_factor": functional.DENSE_PATH_FACTOR,
        "curves": [],
    }
    for width in widths:
        points = []
        for factor in factors:
            n = factor * width
            x = make_ccd_inputs(batch, PAPER["d"], PAPER["P"], width - PAPER["P"], n, bench.device)
            timed = bench.compare(_ccd_fns(x, dtype, bench.device, ("dense", "gather")),
                                  samples=batch, min_rounds=3)
            points.append(
                {
                    "N": n,
                    "N_over_width": factor,
                    "dense_s": timed["dense"]["median_s"],
                    "gather_s": timed["gather"]["median_s"],
                    "dense_bytes": timed["dense"]["peak_bytes"],
                    "gather_bytes": timed["gather"]["peak_bytes"],
                }
            )
        out["curves"].append({"width": width, "points": points,
                              "measured_factor": _crossing(points)})
    return out


def _crossing(points: list[dict[str, Any]]) -> float | None:
    """``N/(P+K)`` where ``dense_s / gather_s`` crosses 1 (log-linear interpolation)."""
    prev = None
    for p in points:
        r = math.log(p["dense_s"] / p["gather_s"])
        if prev is not None and prev[1] < 0 <= r:
            f0, r0 = prev
            f1 = p["N_over_width"]
            return float(math.exp(math.log(f0) + (math.log(f1) - math.log(f0)) * (-r0) / (r - r0)))
        prev = (p["N_over_width"], r)
    if prev is not None and prev[1] < 0:
        return math.inf  # dense wins across the grid
    return 0.0 if points else None


# ---------------------------------------------------------------------------------------------
# Peer: pytorch-metric-learning SupConLoss with CrossBatchMemory
# ---------------------------------------------------------------------------------------------


def run_peer(bench: Bench) -> dict[str, Any]:
    """Label-aware contrast against a memory: the library's CCD step against PML's.

    PML's ``CrossBatchMemory(SupConLoss)`` contrasts each embedding with every memory entry
    (all ``B x M`` pairs) and enqueues the batch. The library's contender is one CCD direction
    as a training step uses it: class-guided sampling of ``P+K`` rows, scoring, backward and
    the bank's momentum update. The two compute different losses (no value check); they do the
    same job at matched ``B``, ``d`` and memory size.
    """
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        bench.skipped.append("peer: pytorch-metric-learning is not installed")
        return {"skipped": "pytorch-metric-learning is not installed"}
    p = dict(PAPER)
    sizes = (1000,) if bench.quick else (PAPER["N"], 30_000)
    if bench.quick:
        p.update(B=16, K=256)
    points = [_peer_point(bench, p, size) for size in sizes]
    return {"params": p, "points": points}


def _peer_point(bench: Bench, p: dict[str, Any], size: int) -> dict[str, Any]:
    from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss

    dev = bench.device
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, p["C"], (size,), generator=g).to(dev)
    bank_s = MomentumMemoryBank(labels, dim=p["d"], copy_on_write=False).to(dev)
    bank_t = MomentumMemoryBank(labels, dim=p["d"], copy_on_write=False).to(dev)
    emb = torch.randn(p["B"], p["d"], generator=g).to(dev).requires_grad_()
    batch_idx = torch.randperm(size, generator=g)[: p["B"]].to(dev)
    batch_labels = labels[batch_idx]
    noise = p["K"] / size

    def library_step() -> None:
        rows = bank_s.sample(batch_idx, p["P"], p["K"])
        anchor = F.normalize(emb, dim=1)
        scores = functional.contrastive_scores(anchor, bank_t.memory, rows, p["tau"])
        loss = functional.nce_loss(scores, 1.0, noise, p["P"])
        loss.backward()
        bank_s.update(batch_idx, anchor.detach())
        emb.grad = None

    pml = CrossBatchMemory(SupConLoss(temperature=p["tau"]), p["d"], memory_size=size).to(dev)
    with torch.no_grad():
        for start in range(0, size, p["B"]):
            fill = torch.randn(min(p["B"], size - start), p["d"], generator=g).to(dev)
            pml(F.normalize(fill, dim=1), labels[start : start + fill.shape[0]])

    def pml_step() -> None:
        loss = pml(F.normalize(emb, dim=1), batch_labels)
        loss.backward()
        emb.grad = None

    rows = bench.compare({"library CCD step": library_step, "PML SupCon+CrossBatchMemory":
                          pml_step}, samples=p["B"])
    return {"memory_size": size, "rows": rows}


# ---------------------------------------------------------------------------------------------
# CRP
# ---------------------------------------------------------------------------------------------


def run_crp(bench: Bench) -> dict[str, Any]:
    """Centroids of both banks + CRP forward/backward: library against a per-class loop."""
    cases = [dict(PAPER)]
    if bench.quick:
        cases = [dict(PAPER, B=16, N=1000)]
    else:
        cases += [dict(PAPER, C=5, N=3662), dict(PAPER, C=30), dict(PAPER, C=100),
                  dict(PAPER, N=100_000)]
    out: dict[str, Any] = {"points": []}
    for q in cases:
        for dtype in bench.dtypes if q == PAPER else bench.dtypes[:1]:
            out["points"].append(_crp_case(bench, q, dtype))
    return out


def _crp_case(bench: Bench, q: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    dev = bench.device
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.arange(q["C"]), torch.randint(0, q["C"], (q["N"] - q["C"],),
                                                           generator=g)]).to(dev)
    # Banks with class structure (a direction per class plus noise), as after some training:
    # with i.i.d. random rows all centroids nearly coincide and CRP's gradient is all rounding.
    directions = torch.randn(q["C"], q["d"], generator=g)

    def clustered(lab: torch.Tensor) -> torch.Tensor:
        rows = directions[lab.cpu()] + 1.5 * torch.randn(len(lab), q["d"], generator=g)
        return F.normalize(rows, dim=1).to(dev)

    m_s, m_t = clustered(labels), clustered(labels)
    batch_labels = torch.randint(0, q["C"], (q["B"],), generator=g)
    g_s = clustered(batch_labels).requires_grad_()
    g_t = clustered(batch_labels)
    tau = q["tau"]

    def library() -> torch.Tensor:
        c_s = functional.class_centroids(m_s, labels, q["C"])
        c_t = functional.class_centroids(m_t, labels, q["C"])
        return functional.categorical_relation_loss(g_s, g_t, c_s, c_t, tau)

    def reference() -> torch.Tensor:
        c_s = references.loop_centroids(m_s, labels, q["C"])
        c_t = references.loop_centroids(m_t, labels, q["C"])
        return references.naive_crp(g_s, g_t, c_s, c_t, tau)

    diffs = {}
    with torch.no_grad():  # float64 truth
        c64 = [functional.class_centroids(m.double(), labels, q["C"]) for m in (m_s, m_t)]
    g64 = g_s.detach().double().requires_grad_()
    true_loss = functional.categorical_relation_loss(g64, g_t.double(), *c64, tau)
    true_grad = torch.autograd.grad(true_loss, g64)[0]
    low_precision = dtype not in (torch.float32, torch.float64)
    for name, fn in (("library", library), ("reference", reference)):
        with _autocast(dev, dtype):
            loss = fn()
        grad = torch.autograd.grad(loss, g_s)[0]
        for what, got, want in (("loss", loss, true_loss), ("grad", grad, true_grad)):
            key = f"{name}/{what} vs float64"
            if name == "reference" and low_precision:
                diffs[key + " (not asserted)"] = _rel_diff(got, want)
            else:
                diffs[key] = _assert_close(f"CRP {key}", got, want, _tolerance(dtype))
    diffs["centroids"] = _assert_close(
        "centroids",
        functional.class_centroids(m_s, labels, q["C"]),
        references.loop_centroids(m_s, labels, q["C"]),
        _tolerance(torch.float32),
    )

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with _autocast(dev, dtype):
                loss = fn()
            loss.backward()
            g_s.grad = None

        return run

    # Per training step, as CRCKDLoss runs it: write the batch's B rows into both banks, then
    # read the centroids (the library from its running class sums) and take CRP. The
    # reference writes the same rows into plain tensors and loops over classes.
    row_idx = torch.randperm(q["N"], generator=g)[: q["B"]].to(dev)
    feats = g_t.detach()
    banks = []
    for m in (m_s, m_t):
        bank = MomentumMemoryBank(labels, q["d"]).to(dev)
        with torch.no_grad():
            bank.memory.copy_(m)
        banks.append(bank)
    plain = [m_s.clone(), m_t.clone()]

    def library_step() -> torch.Tensor:
        for bank in banks:
            bank.update(row_idx, feats)
        return functional.categorical_relation_loss(
            g_s, g_t, banks[0].centroids(), banks[1].centroids(), tau)

    def reference_step() -> torch.Tensor:
        with torch.no_grad():
            for m in plain:
                m[row_idx] = F.normalize(0.5 * m[row_idx] + 0.5 * feats, dim=1)
        c_s = references.loop_centroids(plain[0], labels, q["C"])
        c_t = references.loop_centroids(plain[1], labels, q["C"])
        return references.naive_crp(g_s, g_t, c_s, c_t, tau)

    with torch.no_grad():  # the first step of each, from the same banks, agrees
        diffs["per-step library vs reference"] = _assert_close(
            "CRP per step", library_step(), reference_step(), _tolerance(torch.float32))

    rows = bench.compare({"library": step(library), "reference": step(reference),
                          "library, per step (bank update + running sums)": step(library_step),
                          "reference, per step (row write + class loop)": step(reference_step)},
                         samples=q["B"])
    return {"params": q, "dtype": str(dtype).replace("torch.", ""), "rows": rows,
            "max_rel_diff": diffs}


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def check_sampling_structure(
    rows: np.ndarray, anchors: np.ndarray, labels: np.ndarray, num_positives: int
) -> None:
    """Asserts method §4's shape of a sampled index matrix.

    Column 0 is the anchor; columns ``1..P-1`` share its class; the rest do not; each part is
    free of repeats wherever its pool is large enough.
    """
    counts = np.bincount(labels)
    for r, i in zip(rows, anchors):
        y = labels[i]
        if r[0] != i:
            raise AssertionError("column 0 is not the anchor's own row")
        pos, neg = r[1:num_positives], r[num_positives:]
        if not (labels[pos] == y).all():
            raise AssertionError("a positive has another class")
        if (labels[neg] == y).any():
            raise AssertionError("a negative has the anchor's class")
        if counts[y] >= len(pos) and len(np.unique(pos)) != len(pos):
            raise AssertionError("positives repeat although the class has enough rows")
        if len(labels) - counts[y] >= len(neg) and len(np.unique(neg)) != len(neg):
            raise AssertionError("negatives repeat although enough other rows exist")


def sampling_uniformity(
    draw: Callable[[], np.ndarray],
    anchors: np.ndarray,
    labels: np.ndarray,
    num_positives: int,
    draws: int,
) -> dict[str, float]:
    """Chi-square per degree of freedom of how often each row is drawn, per anchor and part.

    Under the method's distribution every row of the anchor's class (positives) and every row of the
    other classes (negatives) is equally likely, so both statistics are close to 1.

    Returns:
        ``{"positives": chi2/dof, "negatives": chi2/dof}`` averaged over anchors.
    """
    n = len(labels)
    pos_counts = np.zeros((len(anchors), n))
    neg_counts = np.zeros((len(anchors), n))
    for _ in range(draws):
        rows = draw()
        for a in range(len(anchors)):
            np.add.at(pos_counts[a], rows[a, 1:num_positives], 1)
            np.add.at(neg_counts[a], rows[a, num_positives:], 1)
    stats: dict[str, list[float]] = {"positives": [], "negatives": []}
    for a, i in enumerate(anchors):
        same = labels == labels[i]
        parts = (("positives", pos_counts, same), ("negatives", neg_counts, ~same))
        for part, counts, mask in parts:
            observed = counts[a][mask]
            expected = observed.sum() / mask.sum()
            chi2 = ((observed - expected) ** 2 / expected).sum()
            stats[part].append(chi2 / max(mask.sum() - 1, 1))
    return {k: float(np.mean(v)) for k, v in stats.items()}


def check_sampling(device: torch.device, draws: int = 400) -> dict[str, Any]:
    """Library samplers and the numpy reference: same structure, uniform marginals."""
    rng = np.random.default_rng(0)
    labels_np = np.concatenate([np.arange(4), rng.integers(0, 4, 196)])
    legacy = np.random.RandomState(0)
    labels = torch.as_tensor(labels_np).to(device)
    bank = MomentumMemoryBank(labels, dim=4).to(device)
    anchors_np = np.array([0, 1, 2, 3, 50, 120])
    anchors = torch.as_tensor(anchors_np).to(device)
    p, k = 6, 40
    same, other = references.class_index_lists(labels_np, 4)
    gen = torch.Generator(device=device).manual_seed(0)
    drawers: dict[str, Callable[[], np.ndarray]] = {
        "library shuffle": lambda: bank.sample(anchors, p, k, gen, "shuffle").cpu().numpy(),
        "library independent": lambda: bank.sample(anchors, p, k, gen, "independent")
        .cpu()
        .numpy(),
        "numpy reference": lambda: references.numpy_sample(
            anchors_np, labels_np, same, other, p, k, legacy
        ),
        "numpy Generator.choice": lambda: references.numpy_sample(
            anchors_np, labels_np, same, other, p, k, rng
        ),
    }
    result = {}
    for name, draw in drawers.items():
        check_sampling_structure(draw(), anchors_np, labels_np, p)
        stats = sampling_uniformity(draw, anchors_np, labels_np, p, draws)
        for part, value in stats.items():
            if not 0.5 < value < 1.6:
                raise AssertionError(f"{name} {part}: chi2/dof {value:.2f}, not uniform")
        result[name] = stats
    return result


def run_sampling(bench: Bench) -> dict[str, Any]:
    """Class-guided sampling of ``[B, P+K]`` indices: library samplers against numpy."""
    checks = check_sampling(bench.device, draws=60 if bench.quick else 400)
    cases = [dict(PAPER, B=16, K=256, N=1000)] if bench.quick else [
        dict(PAPER), dict(PAPER, C=5, N=3662, K=2048), dict(PAPER, B=512),
        dict(PAPER, N=100_000)
    ]
    points = [_sampling_point(bench, q) for q in cases]
    return {"uniformity_chi2_per_dof": checks, "points": points}


def _sampling_point(bench: Bench, q: dict[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    labels = torch.cat([torch.arange(q["C"]),
                        torch.randint(0, q["C"], (q["N"] - q["C"],), generator=g)])
    labels_np = labels.numpy()
    bank = MomentumMemoryBank(labels.to(bench.device), dim=4).to(bench.device)
    anchors = torch.randperm(q["N"], generator=g)[: q["B"]]
    anchors_dev, anchors_np = anchors.to(bench.device), anchors.numpy()
    same, other = references.class_index_lists(labels_np, q["C"])
    legacy, modern = np.random.RandomState(0), np.random.default_rng(0)
    fns = {
        "library shuffle": lambda: bank.sample(anchors_dev, q["P"], q["K"],
                                               sampler="shuffle"),
        "library independent": lambda: bank.sample(anchors_dev, q["P"], q["K"],
                                                   sampler="independent"),
        "numpy reference": lambda: torch.from_numpy(references.numpy_sample(
            anchors_np, labels_np, same, other, q["P"], q["K"], legacy)).to(bench.device),
        "numpy Generator.choice": lambda: torch.from_numpy(references.numpy_sample(
            anchors_np, labels_np, same, other, q["P"], q["K"], modern)).to(bench.device),
    }
    rows = bench.compare(fns, samples=q["B"],
                         no_memory=("numpy reference", "numpy Generator.choice"))
    return {"params": q, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Bank update
# ---------------------------------------------------------------------------------------------


def run_bank(bench: Bench) -> dict[str, Any]:
    """``MomentumMemoryBank.update`` with ``copy_on_write`` on (default) and off."""
    sizes = (1000,) if bench.quick else (PAPER["N"], 100_000, 1_000_000)
    batch = 16 if bench.quick else PAPER["B"]
    points = []
    for n in sizes:
        g = torch.Generator().manual_seed(3)
        labels = torch.randint(0, PAPER["C"], (n,), generator=g).to(bench.device)
        banks = {
            cow: MomentumMemoryBank(labels, dim=PAPER["d"], copy_on_write=cow).to(bench.device)
            for cow in (True, False)
        }
        idx = torch.randperm(n, generator=g)[:batch].to(bench.device)
        feats = F.normalize(torch.randn(batch, PAPER["d"], generator=g), dim=1).to(bench.device)
        fns = {
            f"copy_on_write={cow}": (lambda b=b, i=idx, f=feats: b.update(i, f))
            for cow, b in banks.items()
        }
        rows = bench.compare(fns, samples=batch)
        points.append({"N": n, "B": batch, "d": PAPER["d"], "rows": rows})
    return {"points": points}


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _ema_contenders(student: nn.Module, decay: float) -> dict[str, tuple[Any, Callable[[], None]]]:
    """name -> (teacher module, one update); every teacher starts as a copy of ``student``."""
    out: dict[str, tuple[Any, Callable[[], None]]] = {}
    lib_copy = EMATeacher(student, decay=decay, warmup=False, buffers="copy")
    out["library (buffers copied)"] = (lib_copy.module, lambda: lib_copy.update(student))
    lib_avg = EMATeacher(student, decay=decay, warmup=False, buffers="average")
    out["library (buffers averaged)"] = (lib_avg.module, lambda: lib_avg.update(student))
    loop_copy = copy.deepcopy(student)
    out["loop (buffers copied)"] = (
        loop_copy, lambda: references.loop_ema(loop_copy, student, decay, average_buffers=False)
    )
    loop_avg = copy.deepcopy(student)
    out["loop (buffers averaged)"] = (
        loop_avg, lambda: references.loop_ema(loop_avg, student, decay, average_buffers=True)
    )
    try:
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(student, decay=decay)
        timm_ema.module.train(student.training)
        out["timm ModelEmaV3"] = (timm_ema.module, lambda: timm_ema.update(student))
    except ImportError:
        pass
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    averaged.update_parameters(student)  # the first call copies; later calls average
    out["torch AveragedModel"] = (averaged.module, lambda: averaged.update_parameters(student))
    return out


#: Contenders that compute the same thing, for the value check: parameters averaged, and
#: buffers either copied or averaged.
EMA_GROUPS = {
    "copy": ("library (buffers copied)", "loop (buffers copied)", "torch AveragedModel"),
    "average": ("library (buffers averaged)", "loop (buffers averaged)", "timm ModelEmaV3"),
}


def check_ema(student: nn.Module, decay: float = 0.99, steps: int = 3) -> dict[str, float]:
    """Asserts that every EMA contender matches its group's library result after ``steps``."""
    student = copy.deepcopy(student)
    contenders = _ema_contenders(student, decay)
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        with torch.no_grad():
            for t in student.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=g).to(t) * 0.1)
                else:
                    t.add_(1)
        for _, update in contenders.values():
            update()
    diffs = {}
    for members in EMA_GROUPS.values():
        want = _state(contenders[members[0]][0])
        for name in members[1:]:
            if name not in contenders:
                continue
            got = _state(contenders[name][0])
            diffs[name] = max(_rel_diff(a, b) for a, b in zip(got, want))
            if diffs[name] > 1e-5:
                raise AssertionError(f"EMA {name} differs from the library by {diffs[name]:.3g}")
    return diffs


def run_ema(bench: Bench) -> dict[str, Any]:
    """EMA update of DenseNet-121 and ResNet-50: library against loops, timm, torch."""
    import torchvision

    names = ("resnet18",) if bench.quick else ("densenet121", "resnet50")
    points = []
    for name in names:
        torch.manual_seed(0)
        student = getattr(torchvision.models, name)(weights=None).to(bench.device)
        checks = check_ema(student)
        contenders = _ema_contenders(student, decay=0.99)
        fns = {k: v[1] for k, v in contenders.items()}
        rows = bench.compare(fns, samples=None)
        points.append({
            "model": name,
            "parameters": sum(p.numel() for p in student.parameters()),
            "parameter_tensors": len(list(student.parameters())),
            "buffer_tensors": len(list(student.buffers())),
            "rows": rows,
            "max_rel_diff": checks,
        })
        del contenders, fns, student
    return {"points": points}


# ---------------------------------------------------------------------------------------------
# Whole training step
# ---------------------------------------------------------------------------------------------


class _Net(nn.Module):
    """ResNet-18 backbone, a 128-d feature layer and a linear classifier (method §1's shape)."""

    def __init__(self, num_classes: int, feat_dim: int = 128) -> None:
        super().__init__()
        import torchvision

        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.feature = nn.Linear(512, feat_dim)
        self.classifier = nn.Linear(feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.feature(self.backbone(x))
        return f, self.classifier(f)


def run_train(bench: Bench) -> dict[str, Any]:
    """One optimiser step of baseline (WCE), mean teacher (MT) and CRCKD on ResNet-18."""
    p = dict(PAPER, image=64)
    if bench.quick:
        p.update(B=4, image=32, K=256, N=1000)
    dev = bench.device
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.arange(p["C"]),
                        torch.randint(0, p["C"], (p["N"] - p["C"],), generator=g)]).to(dev)
    counts = torch.bincount(labels, minlength=p["C"]).float()
    weight = counts.sum() / counts
    batch_idx = torch.randperm(p["N"], generator=g)[: p["B"]].to(dev)
    y = labels[batch_idx]
    view1 = torch.randn(p["B"], 3, p["image"], p["image"], generator=g).to(dev)
    view2 = torch.randn(p["B"], 3, p["image"], p["image"], generator=g).to(dev)

    def build(kind: str) -> Callable[[], None]:
        torch.manual_seed(0)
        student = _Net(p["C"]).to(dev)
        params = list(student.parameters())
        teacher = EMATeacher(student, decay=0.99) if kind != "baseline" else None
        crckd = None
        if kind == "CRCKD":
            crckd = CRCKDLoss(labels, 128, 128, embed_dim=p["d"], num_positives=p["P"],
                              num_negatives=p["K"], temperature=p["tau"]).to(dev)
            params += list(crckd.parameters())
        opt = torch.optim.Adam(params, lr=3e-4, weight_decay=5e-4)

        def step() -> None:
            f_s, logits = student(view1)
            loss = F.cross_entropy(logits, y, weight=weight)
            if teacher is not None:
                with torch.no_grad():
                    f_t, logits_t = teacher(view2)
                loss = loss + functional.consistency_kl(logits, logits_t)
                if crckd is not None:
                    loss = loss + crckd(f_s, f_t, batch_idx).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if teacher is not None:
                teacher.update(student)

        return step

    fns = {kind: build(kind) for kind in ("baseline", "MT", "CRCKD")}
    rows = bench.compare(fns, samples=p["B"], budget_s=3 * bench.budget_s)
    return {"params": p, "rows": rows,
            "crckd_over_mt": rows["CRCKD"]["median_s"] / rows["MT"]["median_s"] - 1.0}


SECTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "ccd": run_ccd,
    "sweeps": run_sweeps,
    "crossover": run_crossover,
    "peer": run_peer,
    "crp": run_crp,
    "sampling": run_sampling,
    "bank": run_bank,
    "ema": run_ema,
    "train": run_train,
}


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
