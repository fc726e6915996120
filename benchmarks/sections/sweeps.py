"""CCD (both directions, forward+backward) swept over N, K, B and d, one size at a time, and
the log-log slopes of the library's time along them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from crckd_losses import backends

from .ccd import TRITON, ccd_fns, make_ccd_inputs, triton_row
from .common import (
    BLOCK_CAP_BYTES,
    PAPER,
    Bench,
    Section,
    Target,
    dtype_name,
    fmt,
    mb,
    ms,
    ratio,
    target,
)


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
    out: dict[str, Any] = {"dtype": dtype_name(dtype), "sweeps": {}}
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
            if triton_row(bench.device):
                names += (TRITON,)
            x = make_ccd_inputs(q["B"], q["d"], q["P"], q["K"], q["N"], bench.device)
            fns = ccd_fns(x, dtype, bench.device, names)
            if TRITON in fns:
                try:  # the kernels at a size no test ran: a failure is recorded, not fatal
                    fns[TRITON]()
                except Exception as exc:  # noqa: BLE001 - recorded in the results
                    del fns[TRITON]
                    bench.skipped.append(f"sweep {axis}={q[axis]}: backend='triton' failed: "
                                         f"{type(exc).__name__}: {exc}")
            timed = bench.compare(fns, samples=q["B"], min_rounds=3)
            auto = backends.choose_score_path(q["N"], width)
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


LINEAR_IN_WIDTH = "Library CCD time grows at most linearly in B(P+K) (log-log slope <= 1.1)"
FLAT_IN_N = "Library CCD time flat in N where it gathers (log-log slope <= 0.1)"

#: Line style of each contender in the sweep plot: (colour, line style, width).
STYLE = {"auto": ("k", "-", 2.5), "dense": ("tab:blue", "--", 1.2),
         "gather": ("tab:orange", "--", 1.2), "reference": ("tab:red", ":", 1.8),
         TRITON: ("tab:green", "-.", 1.5)}


class Sweeps(Section):
    """CCD swept over N, K, B and d."""

    name = "sweeps"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_sweeps(bench)

    def targets(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Target]:
        fits = result["fits"]
        slopes = [fits.get("slope_time_vs_B(P+K)_over_K"), fits.get("slope_time_vs_B(P+K)_over_B")]
        slopes_ok = [s for s in slopes if s is not None]
        worst = max(slopes_ok) if slopes_ok else None
        flat = fits.get("slope_time_vs_N_in_gather_region")
        return [
            target("linear_in_width", LINEAR_IN_WIDTH, worst, 1.1, higher_is_better=False,
                   detail=f"slope over K sweep {fmt(slopes[0])}, over B sweep {fmt(slopes[1])}"),
            target("flat_in_n", FLAT_IN_N, flat, 0.1, higher_is_better=False,
                   detail=f"gather region N = {fits.get('gather_region_N')}, time ratio "
                   f"largest/smallest N "
                   f"{fmt(fits.get('time_ratio_largest_over_smallest_N_in_gather_region'))}"),
        ]

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        s = result
        md = ["## CCD sweeps", "", f"{s['dtype']}; one size varied at a time from the paper's. "
              "Sampled rows are uniform random here. `auto` is the path the library picks "
              "(its figures are that path's). Plot: "
              f"![sweeps]({stem}-sweeps.png)", ""]
        for axis, points in s["sweeps"].items():
            # backend="triton" (timed on CUDA only) gets its columns where it was timed
            cols = ("auto", "dense", "gather", "reference") + (
                (TRITON,) if any(TRITON in p["rows"] for p in points) else ())
            md += [f"### over {axis}", "",
                   f"| {axis} | auto path | " + " | ".join(f"{c} ms" for c in cols) + " | "
                   + " | ".join(f"{c} MB" for c in cols) + " | reference/auto time |",
                   "|---:|---|" + "---:|" * (2 * len(cols) + 1)]
            for p in points:
                r = p["rows"]
                cells = [ms(r[k]) if r.get(k) else "skipped" for k in cols]
                mems = [mb(r[k]) if r.get(k) else "skipped" for k in cols]
                md.append(f"| {p['params'][axis]} | {p['auto_path']} | " + " | ".join(cells)
                          + " | " + " | ".join(mems)
                          + f" | {fmt(ratio(r, 'reference', 'auto'))} |")
            md.append("")
        md += ["Fits: " + ", ".join(f"{k} = {fmt(v) if not isinstance(v, list) else v}"
                                    for k, v in s["fits"].items()), ""]
        return md

    def plots(
        self, result: dict[str, Any], meta: dict[str, Any], out_dir: Path, stem: str
    ) -> list[str]:
        import matplotlib.pyplot as plt

        sweeps = result["sweeps"]
        fig, axes = plt.subplots(2, len(sweeps), figsize=(4 * len(sweeps), 7), squeeze=False)
        for col, (axis, points) in enumerate(sweeps.items()):
            for row, (key, scale, label) in enumerate(
                (("median_s", 1e3, "ms (fwd+bwd)"), ("peak_bytes", 1e-6, "peak extra MB"))
            ):
                ax = axes[row][col]
                for name, (color, ls, lw) in STYLE.items():
                    xs = [p["params"][axis] for p in points if p["rows"].get(name)]
                    ys = [p["rows"][name][key] * scale for p in points if p["rows"].get(name)]
                    if xs:
                        ax.plot(xs, ys, color=color, ls=ls, lw=lw, marker="o", ms=3, label=name)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(label)
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"CCD both directions, {meta['device_name']}, {result['dtype']}")
        fig.tight_layout()
        name = f"{stem}-sweeps.png"
        fig.savefig(out_dir / name, dpi=72)
        plt.close(fig)
        return [name]


SECTION = Sweeps()
