"""Targets, the markdown report and the plots, all computed from the results dictionary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TARGETS_TEXT = {
    "ccd_speed": "CCD (paper sizes, both directions, fwd+bwd): reference time / library time >= 10",
    "ccd_memory": "CCD peak extra memory: reference / library >= 20",
    "crp_speed": "Centroids + CRP: per-class-loop reference / library >= 10",
    "ema_loop": "EMA: per-parameter loop / library >= 2.5 (each model)",
    "ema_timm": "EMA: timm ModelEmaV3 / library >= 1 (each model, same buffer handling)",
    "sampling": "Class-guided sampling: numpy per-anchor / library >= 50",
    "train_overhead": "Training step: CRCKD over MT <= 15 %",
    "linear_in_width": "Library CCD time grows at most linearly in B(P+K) (log-log slope <= 1.1)",
    "flat_in_n": "Library CCD time flat in N where it gathers (log-log slope <= 0.1)",
}


def _ratio(rows: dict[str, Any], num: str, den: str, key: str = "median_s") -> float | None:
    a, b = rows.get(num, {}).get(key), rows.get(den, {}).get(key)
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def _target(name: str, value: float | None, ok: bool | None, detail: str = "") -> dict[str, Any]:
    return {"name": name, "text": TARGETS_TEXT[name], "value": value, "met": ok, "detail": detail}


def compute_targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the issue that the sections run allow, with its measured value."""
    out = []
    ccd = sections.get("ccd")
    if ccd:
        first = next(iter(ccd["by_dtype"]))
        rows = ccd["by_dtype"][first]["rows"]
        speed = _ratio(rows, "reference", "auto")
        mem = _ratio(rows, "reference", "auto", "peak_bytes")
        others = ", ".join(
            f"{dt}: {_fmt(_ratio(v['rows'], 'reference', 'auto'))}x time, "
            f"{_fmt(_ratio(v['rows'], 'reference', 'auto', 'peak_bytes'))}x memory"
            for dt, v in ccd["by_dtype"].items()
        )
        out.append(_target("ccd_speed", speed, None if speed is None else speed >= 10, others))
        out.append(_target("ccd_memory", mem, None if mem is None else mem >= 20, others))
    crp = sections.get("crp")
    if crp:
        rows = crp["points"][0]["rows"]
        speed = _ratio(rows, "reference, per step (row write + class loop)",
                       "library, per step (bank update + running sums)")
        full = _ratio(rows, "reference", "library")
        q = crp["points"][0]["params"]
        out.append(_target("crp_speed", speed, None if speed is None else speed >= 10,
                           f"C={q['C']}, N={q['N']}, per training step (B rows written, "
                           f"centroids read); both reducing the whole bank: {_fmt(full)}x"))
    ema = sections.get("ema")
    if ema:
        loops = [(p["model"], _ratio(p["rows"], "loop (buffers copied)",
                                     "library (buffers copied)")) for p in ema["points"]]
        timms = [(p["model"], _ratio(p["rows"], "timm ModelEmaV3", "library (buffers averaged)"))
                 for p in ema["points"]]
        for key, pairs, bound in (("ema_loop", loops, 2.5), ("ema_timm", timms, 1.0)):
            values = [v for _, v in pairs if v is not None]
            worst = min(values) if values else None
            out.append(_target(key, worst, None if worst is None else worst >= bound,
                               ", ".join(f"{m}: {_fmt(v)}x" for m, v in pairs)))
    sampling = sections.get("sampling")
    if sampling:
        rows = sampling["points"][0]["rows"]
        shuffle = _ratio(rows, "numpy reference", "library shuffle")
        independent = _ratio(rows, "numpy reference", "library independent")
        gen = _ratio(rows, "numpy Generator.choice", "library shuffle")
        gen_ind = _ratio(rows, "numpy Generator.choice", "library independent")
        out.append(_target("sampling", independent,
                           None if independent is None else independent >= 50,
                           f"np.random.choice reference: shuffle {_fmt(shuffle)}x, independent "
                           f"{_fmt(independent)}x (value: independent, the default); against "
                           f"numpy Generator.choice: shuffle {_fmt(gen)}x, independent "
                           f"{_fmt(gen_ind)}x"))
    train = sections.get("train")
    if train:
        over = train["crckd_over_mt"]
        out.append(_target("train_overhead", over, over <= 0.15,
                           f"{100 * over:.1f} % (value is a fraction)"))
    sweeps = sections.get("sweeps")
    if sweeps:
        fits = sweeps["fits"]
        slopes = [fits.get("slope_time_vs_B(P+K)_over_K"), fits.get("slope_time_vs_B(P+K)_over_B")]
        slopes_ok = [s for s in slopes if s is not None]
        worst = max(slopes_ok) if slopes_ok else None
        out.append(_target("linear_in_width", worst, None if worst is None else worst <= 1.1,
                           f"slope over K sweep {_fmt(slopes[0])}, over B sweep {_fmt(slopes[1])}"))
        flat = fits.get("slope_time_vs_N_in_gather_region")
        out.append(_target("flat_in_n", flat, None if flat is None else flat <= 0.1,
                           f"gather region N = {fits.get('gather_region_N')}, time ratio "
                           f"largest/smallest N "
                           f"{_fmt(fits.get('time_ratio_largest_over_smallest_N_in_gather_region'))}"))
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    return f"{x:.{digits}g}"


def _ms(row: dict[str, Any]) -> str:
    return _fmt(row["median_s"] * 1e3) if row.get("median_s") is not None else "n/a"


def _mb(row: dict[str, Any]) -> str:
    b = row.get("peak_bytes")
    return "n/a" if b is None else _fmt(b / 1e6)


def _thru(row: dict[str, Any]) -> str:
    v = row.get("samples_per_s")
    return "n/a" if v is None else f"{v:,.0f}"


def _table(rows: dict[str, Any], baseline: str | None, unit: str = "samples/s") -> list[str]:
    head = f"| contender | median ms | IQR ms | {unit} | peak extra MB |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    if baseline:
        lines[0] = head + f" time vs {baseline} | memory vs {baseline} |"
        lines[1] += "---:|---:|"
    for name, row in rows.items():
        if not row:
            continue
        line = (f"| {name} | {_ms(row)} | {_fmt(row['iqr_s'] * 1e3)} | {_thru(row)} | "
                f"{_mb(row)} |")
        if baseline:
            t = _ratio(rows, name, baseline)
            m = _ratio(rows, name, baseline, "peak_bytes")
            t_x, m_x = ("x" if v is not None else "" for v in (t, m))
            line += f" {_fmt(t)}{t_x} | {_fmt(m)}{m_x} |"
        lines.append(line)
    return lines


def write_markdown(results: dict[str, Any], path: Path, stem: str) -> None:
    """Writes the human-readable report next to the JSON."""
    meta, sections = results["meta"], results["sections"]
    md = [f"# crckd-losses benchmarks: {meta['device_name']}", ""]
    md += [f"- machine: {meta['machine']}", f"- torch {meta['torch']}, {meta['threads']} threads",
           f"- date: {meta['date']}", f"- dtypes: {', '.join(meta['dtypes'])}",
           f"- grid: {'quick' if meta['quick'] else 'full'}; wall time {meta['wall_s']:.0f} s",
           f"- timing: {meta['timing_method']}", f"- memory: {meta['memory_method']}",
           f"- load average at start / end: {meta['load_start']} / {meta.get('load_end')}"]
    md += [f"- note: {meta['note']}"] if meta.get("note") else []
    md += [""]
    if results.get("targets"):
        md += ["## Targets", "", "| target | measured | met | detail |", "|---|---:|:-:|---|"]
        for t in results["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            md.append(f"| {t['text']} | {_fmt(t['value'])} | {met} | {t['detail']} |")
        md.append("")
    if "ccd" in sections:
        s = sections["ccd"]
        md += ["## CCD at the paper's sizes", "",
               f"Both directions, forward+backward, `{_params(s['params'])}`; samples = anchors. "
               "`auto` is the library's default; `reference` gathers the B x (P+K) x d block and "
               "exponentiates (CRD's way).", ""]
        for dt, v in s["by_dtype"].items():
            md += [f"### {dt} (auto picks `{v['auto_path']}`)", ""]
            md += _table(v["rows"], "reference")
            md += ["", f"Max relative difference against the library's dense path in {dt}: "
                   + ", ".join(f"{k} {_fmt(x, 2)}" for k, x in v["max_rel_diff_vs_dense"].items()),
                   ""]
    if "sweeps" in sections:
        s = sections["sweeps"]
        md += ["## CCD sweeps", "", f"{s['dtype']}; one size varied at a time from the paper's. "
               "Sampled rows are uniform random here. `auto` is the path the library picks "
               "(its figures are that path's). Plot: "
               f"![sweeps]({stem}-sweeps.png)", ""]
        for axis, points in s["sweeps"].items():
            md += [f"### over {axis}", "",
                   f"| {axis} | auto path | auto ms | dense ms | gather ms | reference ms | "
                   "auto MB | dense MB | gather MB | reference MB | reference/auto time |",
                   "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for p in points:
                r = p["rows"]
                cells = [_ms(r[k]) if r.get(k) else "skipped" for k in
                         ("auto", "dense", "gather", "reference")]
                mems = [_mb(r[k]) if r.get(k) else "skipped" for k in
                        ("auto", "dense", "gather", "reference")]
                md.append(f"| {p['params'][axis]} | {p['auto_path']} | " + " | ".join(cells)
                          + " | " + " | ".join(mems)
                          + f" | {_fmt(_ratio(r, 'reference', 'auto'))} |")
            md.append("")
        md += ["Fits: " + ", ".join(f"{k} = {_fmt(v) if not isinstance(v, list) else v}"
                                    for k, v in s["fits"].items()), ""]
    if "crossover" in sections:
        s = sections["crossover"]
        md += ["## Dense/gather crossover", "",
               f"B={s['B']}, d={s['d']}, {s['dtype']}. The library picks dense while "
               f"N <= {s['library_factor']} (P+K). Plot: ![crossover]({stem}-crossover.png)", ""]
        for c in s["curves"]:
            md += [f"P+K = {c['width']}: measured crossover N/(P+K) = "
                   f"{_fmt(c['measured_factor'])}", "",
                   "| N/(P+K) | N | dense ms | gather ms | dense/gather | dense MB | gather MB |",
                   "|---:|---:|---:|---:|---:|---:|---:|"]
            for p in c["points"]:
                md.append(f"| {p['N_over_width']} | {p['N']} | {_fmt(p['dense_s'] * 1e3)} | "
                          f"{_fmt(p['gather_s'] * 1e3)} | {_fmt(p['dense_s'] / p['gather_s'])} | "
                          f"{_fmt(p['dense_bytes'] / 1e6)} | {_fmt(p['gather_bytes'] / 1e6)} |")
            md.append("")
    if "peer" in sections and "points" in sections["peer"]:
        s = sections["peer"]
        md += ["## Peer: pytorch-metric-learning SupConLoss + CrossBatchMemory", "",
               "One step of label-aware contrast against a memory of the given size "
               f"(`{_params(s['params'])}`). The library step: class-guided sampling of P+K rows, "
               "scores, NCE, backward, momentum bank update (one direction). PML: SupCon over all "
               "B x M pairs, backward, enqueue. Different losses for the same job; no value "
               "check.", ""]
        for p in s["points"]:
            md += [f"memory size {p['memory_size']}:", ""]
            md += _table(p["rows"], "PML SupCon+CrossBatchMemory") + [""]
    if "crp" in sections:
        md += ["## Centroids + CRP", "",
               "Centroids of both banks, then CRP forward+backward. Reference: a Python loop over "
               "classes (mask, ReLU, mean, normalise) and `F.kl_div`. `library`/`reference` "
               "reduce the whole bank each call; the `per step` rows also write the batch's B "
               "rows into both banks first, as a training step does, and the library then reads "
               "its centroids from the bank's running class sums.", ""]
        for p in sections["crp"]["points"]:
            md += [f"`{_params(p['params'])}`, {p['dtype']}:", ""]
            md += _table(p["rows"], "reference") + [""]
    if "sampling" in sections:
        s = sections["sampling"]
        md += ["## Class-guided sampling", "",
               "`[B, P+K]` indices. Reference: `np.random.choice` (a `RandomState`, as CRD and the "
               "released code) per anchor from per-class index lists built once; also numpy's "
               "newer `Generator.choice`, which avoids a full permutation per draw (numpy "
               "memory is not seen by the tracker). Uniformity check "
               "(chi-square per degree of freedom of row frequencies, ~1 when uniform): "
               + ", ".join(f"{k}: pos {_fmt(v['positives'])}, neg {_fmt(v['negatives'])}"
                           for k, v in s["uniformity_chi2_per_dof"].items()), ""]
        for p in s["points"]:
            md += [f"`{_params(p['params'])}`:", ""]
            md += _table(p["rows"], "numpy reference", "anchors/s") + [""]
    if "bank" in sections:
        md += ["## Bank update", "", "`MomentumMemoryBank.update` of B rows.", ""]
        for p in sections["bank"]["points"]:
            md += [f"N={p['N']}, B={p['B']}, d={p['d']}:", ""]
            md += _table(p["rows"], "copy_on_write=False", "rows/s") + [""]
    if "ema" in sections:
        md += ["## EMA update", "",
               "One update of the teacher, decay 0.99. `buffers copied` = parameters averaged, "
               "buffers copied (the library's default; torch AveragedModel with "
               "use_buffers=False); `buffers averaged` = floating buffers averaged too (timm "
               "ModelEmaV3).", ""]
        for p in sections["ema"]["points"]:
            md += [f"{p['model']} ({p['parameters']:,} parameters in {p['parameter_tensors']} "
                   f"tensors, {p['buffer_tensors']} buffers):", ""]
            md += _table(p["rows"], "library (buffers copied)", "updates/s") + [""]
    if "train" in sections:
        s = sections["train"]
        md += ["## Whole training step", "",
               f"ResNet-18 + 128-d feature + classifier, Adam, random {s['params']['image']}px "
               f"images, `{_params(s['params'])}`. CRCKD over MT: "
               f"{100 * s['crckd_over_mt']:.1f} %.", ""]
        md += _table(s["rows"], "MT") + [""]
        md += [f"![overview]({stem}-speedups.png)", ""]
    if meta.get("skipped"):
        md += ["## Skipped", ""] + [f"- {x}" for x in meta["skipped"]] + [""]
    path.write_text("\n".join(md))


def _params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def write_plots(results: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    """Writes the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = results["sections"]
    written: list[str] = []
    style = {"auto": ("k", "-", 2.5), "dense": ("tab:blue", "--", 1.2),
             "gather": ("tab:orange", "--", 1.2), "reference": ("tab:red", ":", 1.8)}
    if "sweeps" in sections:
        sweeps = sections["sweeps"]["sweeps"]
        fig, axes = plt.subplots(2, len(sweeps), figsize=(4 * len(sweeps), 7), squeeze=False)
        for col, (axis, points) in enumerate(sweeps.items()):
            for row, (key, scale, label) in enumerate(
                (("median_s", 1e3, "ms (fwd+bwd)"), ("peak_bytes", 1e-6, "peak extra MB"))
            ):
                ax = axes[row][col]
                for name, (color, ls, lw) in style.items():
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
        fig.suptitle(f"CCD both directions, {results['meta']['device_name']}, "
                     f"{sections['sweeps']['dtype']}")
        fig.tight_layout()
        name = f"{stem}-sweeps.png"
        fig.savefig(out_dir / name, dpi=72)
        plt.close(fig)
        written.append(name)
    if "crossover" in sections:
        s = sections["crossover"]
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
        written.append(name)
    bars = _speedup_bars(sections)
    if bars or "train" in sections:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * max(len(bars), 6) + 1.5),
                                 gridspec_kw={"width_ratios": [2.2, 1]})
        ax = axes[0]
        if bars:
            labels = [b[0] for b in bars]
            values = [b[1] for b in bars]
            colors = ["tab:green" if b[2] is None or b[1] >= b[2] else "tab:red" for b in bars]
            ax.barh(range(len(bars)), values, color=colors)
            for i, b in enumerate(bars):
                if b[2] is not None:
                    ax.plot([b[2], b[2]], [i - 0.4, i + 0.4], color="k", lw=2)
            ax.set_yticks(range(len(bars)), labels, fontsize=8)
            ax.set_xscale("log")
            ax.axvline(1.0, color="gray", lw=1)
            ax.invert_yaxis()
            ax.set_xlabel("speed-up of the library (x; black tick = target)")
        ax = axes[1]
        if "train" in sections:
            rows = sections["train"]["rows"]
            ax.bar(list(rows), [r["median_s"] * 1e3 for r in rows.values()],
                   color=["gray", "tab:blue", "tab:green"])
            ax.set_ylabel("ms per training step")
            ax.set_title(f"CRCKD over MT: {100 * sections['train']['crckd_over_mt']:.1f} %")
        fig.tight_layout()
        name = f"{stem}-speedups.png"
        fig.savefig(out_dir / name, dpi=72)
        plt.close(fig)
        written.append(name)
    return written


def _speedup_bars(sections: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    bars: list[tuple[str, float, float | None]] = []

    def add(label: str, value: float | None, target: float | None) -> None:
        if value is not None:
            bars.append((label, value, target))

    if "ccd" in sections:
        for dt, v in sections["ccd"]["by_dtype"].items():
            add(f"CCD time vs reference ({dt})", _ratio(v["rows"], "reference", "auto"), 10)
            add(f"CCD memory vs reference ({dt})",
                _ratio(v["rows"], "reference", "auto", "peak_bytes"), 20)
    if "peer" in sections:
        for p in sections["peer"].get("points", []):
            add(f"CCD step vs PML SupCon+XBM (M={p['memory_size']})",
                _ratio(p["rows"], "PML SupCon+CrossBatchMemory", "library CCD step"), None)
    if "crp" in sections:
        p = sections["crp"]["points"][0]
        add("centroids+CRP vs class loop", _ratio(p["rows"], "reference", "library"), 10)
    if "sampling" in sections:
        p = sections["sampling"]["points"][0]
        for mode in ("shuffle", "independent"):
            add(f"sampling ({mode}) vs numpy",
                _ratio(p["rows"], "numpy reference", f"library {mode}"), 50)
    if "ema" in sections:
        for p in sections["ema"]["points"]:
            add(f"EMA {p['model']} vs loop",
                _ratio(p["rows"], "loop (buffers copied)", "library (buffers copied)"), 2.5)
            add(f"EMA {p['model']} vs timm ModelEmaV3",
                _ratio(p["rows"], "timm ModelEmaV3", "library (buffers averaged)"), 1.0)
            add(f"EMA {p['model']} vs torch AveragedModel",
                _ratio(p["rows"], "torch AveragedModel", "library (buffers copied)"), None)
    return bars
