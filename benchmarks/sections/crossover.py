"""Dense against gather path of the CCD scores as the bank grows past ``P+K``: where gather
starts to win, against the library's :data:`~crckd_losses.backends.DENSE_PATH_FACTOR`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from crckd_losses import backends

from .ccd import ccd_fns, make_ccd_inputs
from .common import PAPER, Bench, Section, dtype_name, fmt


def run_crossover(bench: Bench) -> dict[str, Any]:
    """Dense against gather path as the bank grows past ``P+K``: where does gather win?"""
    dtype = bench.dtypes[0]
    widths: tuple[int, ...]
    factors: tuple[int, ...]
    if bench.quick:
        widths, factors = (276,), (1, 16)
        batch = 8
    else:
        widths, factors = (1044, 4116), (1, 2, 4, 8, 16, 32, 64)
        batch = PAPER["B"]
    out: dict[str, Any] = {
        "dtype": dtype_name(dtype),
        "B": batch,
        "d": PAPER["d"],
        "library_factor": backends.DENSE_PATH_FACTOR,
        "curves": [],
    }
    for width in widths:
        points = []
        for factor in factors:
            n = factor * width
            x = make_ccd_inputs(batch, PAPER["d"], PAPER["P"], width - PAPER["P"], n, bench.device)
            timed = bench.compare(ccd_fns(x, dtype, bench.device, ("dense", "gather")),
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


class Crossover(Section):
    """The dense/gather crossover of the CCD scores."""

    name = "crossover"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_crossover(bench)

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        s = result
        md = ["## Dense/gather crossover", "",
              f"B={s['B']}, d={s['d']}, {s['dtype']}. The library picks dense while "
              f"N <= {s['library_factor']} (P+K). Plot: ![crossover]({stem}-crossover.png)", ""]
        for c in s["curves"]:
            md += [f"P+K = {c['width']}: measured crossover N/(P+K) = "
                   f"{fmt(c['measured_factor'])}", "",
                   "| N/(P+K) | N | dense ms | gather ms | dense/gather | dense MB | gather MB |",
                   "|---:|---:|---:|---:|---:|---:|---:|"]
            for p in c["points"]:
                md.append(f"| {p['N_over_width']} | {p['N']} | {fmt(p['dense_s'] * 1e3)} | "
                          f"{fmt(p['gather_s'] * 1e3)} | {fmt(p['dense_s'] / p['gather_s'])} | "
                          f"{fmt(p['dense_bytes'] / 1e6)} | {fmt(p['gather_bytes'] / 1e6)} |")
            md.append("")
        return md

    def plots(
        self, result: dict[str, Any], meta: dict[str, Any], out_dir: Path, stem: str
    ) -> list[str]:
        import matplotlib.pyplot as plt

        s = result
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in s["curves"]:
            xs = [p["N_over_width"] for p in c["points"]]
            ys = [p["dense_s"] / p["gather_s"] for p in c["points"]]
            ax.plot(xs, ys, marker="o", label=f"P+K={c['width']}")
        ax.axhline(1.0, color="gray", lw=1)
        ax.axvline(s["library_factor"], color="k", ls=":", label="DENSE_PATH_FACTOR")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N / (P+K)")
        ax.set_ylabel("dense time / gather time")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        name = f"{stem}-crossover.png"
        fig.savefig(out_dir / name, dpi=72)
        plt.close(fig)
        return [name]


SECTION = Crossover()
