"""Centroids of both banks + CRP forward/backward: the library against a per-class loop, for a
whole-bank reduction and per training step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from crckd_losses import MomentumMemoryBank, functional

from .. import references
from .common import (
    PAPER,
    Bar,
    Bench,
    Section,
    Target,
    assert_close,
    autocast,
    bar,
    dtype_name,
    fmt,
    params,
    ratio,
    rel_diff,
    table,
    target,
    tolerance,
)

#: The row of the library's per-step work: the bank updates, then centroids and CRP.
LIBRARY_STEP = "library, per step (bank update + centroids)"


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
    labels, m_s, m_t, g_s, g_t = _crp_inputs(q, dev, g)
    tau = q["tau"]

    def library() -> torch.Tensor:
        c_s = functional.class_centroids(m_s, labels, q["C"])
        c_t = functional.class_centroids(m_t, labels, q["C"])
        return functional.categorical_relation_loss(g_s, g_t, c_s, c_t, tau)

    def reference() -> torch.Tensor:
        c_s = references.loop_centroids(m_s, labels, q["C"])
        c_t = references.loop_centroids(m_t, labels, q["C"])
        return references.naive_crp(g_s, g_t, c_s, c_t, tau)

    diffs = _check_crp(q, dtype, dev, (labels, m_s, m_t, g_s, g_t),
                       (("library", library), ("reference", reference)))
    library_step, reference_step = _per_step(q, dev, g, (labels, m_s, m_t, g_s, g_t))
    with torch.no_grad():  # the first step of each, from the same banks, agrees
        diffs["per-step library vs reference"] = assert_close(
            "CRP per step", library_step(), reference_step(), tolerance(torch.float32))

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with autocast(dev, dtype):
                loss = fn()
            loss.backward()
            g_s.grad = None

        return run

    rows = bench.compare({"library": step(library), "reference": step(reference),
                          LIBRARY_STEP: step(library_step),
                          "reference, per step (row write + class loop)": step(reference_step)},
                         samples=q["B"])
    return {"params": q, "dtype": dtype_name(dtype), "rows": rows,
            "max_rel_diff": diffs}


_Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _crp_inputs(q: dict[str, Any], dev: torch.device, g: torch.Generator) -> _Inputs:
    """``(labels, m_s, m_t, g_s, g_t)``: banks with class structure (a direction per class plus
    noise), as after some training: with i.i.d. random rows all centroids nearly coincide and
    CRP's gradient is all rounding. ``g_s`` requires a gradient."""
    labels = torch.cat([torch.arange(q["C"]), torch.randint(0, q["C"], (q["N"] - q["C"],),
                                                           generator=g)]).to(dev)
    directions = torch.randn(q["C"], q["d"], generator=g)

    def clustered(lab: torch.Tensor) -> torch.Tensor:
        rows = directions[lab.cpu()] + 1.5 * torch.randn(len(lab), q["d"], generator=g)
        return F.normalize(rows, dim=1).to(dev)

    m_s, m_t = clustered(labels), clustered(labels)
    batch_labels = torch.randint(0, q["C"], (q["B"],), generator=g)
    return labels, m_s, m_t, clustered(batch_labels).requires_grad_(), clustered(batch_labels)


def _check_crp(q: dict[str, Any], dtype: torch.dtype, dev: torch.device, x: _Inputs,
               fns: tuple[tuple[str, Callable[[], torch.Tensor]], ...]) -> dict[str, float]:
    """Asserts that each of ``fns`` gives the float64 loss and gradient in ``dtype`` (the
    reference's only recorded under low precision), and that the centroids agree."""
    labels, m_s, m_t, g_s, g_t = x
    diffs = {}
    with torch.no_grad():  # float64 truth
        c_s64, c_t64 = (functional.class_centroids(m.double(), labels, q["C"])
                        for m in (m_s, m_t))
    g64 = g_s.detach().double().requires_grad_()
    true_loss = functional.categorical_relation_loss(g64, g_t.double(), c_s64, c_t64, q["tau"])
    true_grad = torch.autograd.grad(true_loss, g64)[0]
    low_precision = dtype not in (torch.float32, torch.float64)
    for name, fn in fns:
        with autocast(dev, dtype):
            loss = fn()
        grad = torch.autograd.grad(loss, g_s)[0]
        for what, got, want in (("loss", loss, true_loss), ("grad", grad, true_grad)):
            key = f"{name}/{what} vs float64"
            if name == "reference" and low_precision:
                diffs[key + " (not asserted)"] = rel_diff(got, want)
            else:
                diffs[key] = assert_close(f"CRP {key}", got, want, tolerance(dtype))
    diffs["centroids"] = assert_close(
        "centroids",
        functional.class_centroids(m_s, labels, q["C"]),
        references.loop_centroids(m_s, labels, q["C"]),
        tolerance(torch.float32),
    )
    return diffs


def _per_step(q: dict[str, Any], dev: torch.device, g: torch.Generator,
              x: _Inputs) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Per training step, as CRCKDLoss runs it: write the batch's B rows into both banks, then
    read the centroids (one reduction of both banks) and take CRP. The reference
    writes the same rows into plain tensors and loops over classes."""
    labels, m_s, m_t, g_s, g_t = x
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
            g_s, g_t, banks[0].centroids(), banks[1].centroids(), q["tau"])

    def reference_step() -> torch.Tensor:
        with torch.no_grad():
            for m in plain:
                m[row_idx] = F.normalize(0.5 * m[row_idx] + 0.5 * feats, dim=1)
        c_s = references.loop_centroids(plain[0], labels, q["C"])
        c_t = references.loop_centroids(plain[1], labels, q["C"])
        return references.naive_crp(g_s, g_t, c_s, c_t, q["tau"])

    return library_step, reference_step


CRP_SPEED = "Centroids + CRP: per-class-loop reference / library >= 10"


class CRP(Section):
    """Centroids + CRP."""

    name = "crp"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_crp(bench)

    def targets(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Target]:
        rows = result["points"][0]["rows"]
        speed = ratio(rows, "reference, per step (row write + class loop)", LIBRARY_STEP)
        if speed is None:  # results of versions <= 0.2, whose banks kept running class sums
            speed = ratio(rows, "reference, per step (row write + class loop)",
                          "library, per step (bank update + running sums)")
        full = ratio(rows, "reference", "library")
        q = result["points"][0]["params"]
        return [target("crp_speed", CRP_SPEED, speed, 10,
                       detail=f"C={q['C']}, N={q['N']}, per training step (B rows written, "
                       f"centroids read); both reducing the whole bank: {fmt(full)}x")]

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        md = ["## Centroids + CRP", "",
              "Centroids of both banks, then CRP forward+backward. Reference: a Python loop over "
              "classes (mask, ReLU, mean, normalise) and `F.kl_div`. `library`/`reference` "
              "reduce the whole bank each call; the `per step` rows also write the batch's B "
              "rows into both banks first, as a training step does (versions up to 0.2 then read "
              "running class sums; today's banks reduce their rows).", ""]
        for p in result["points"]:
            md += [f"`{params(p['params'])}`, {p['dtype']}:", ""]
            md += table(p["rows"], "reference") + [""]
        return md

    def bars(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Bar]:
        p = result["points"][0]
        return bar("centroids+CRP vs class loop", ratio(p["rows"], "reference", "library"), 10)


SECTION = CRP()
