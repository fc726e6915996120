"""Targets, the markdown report and the plots, all computed from the results dictionary.

Every section of :data:`benchmarks.sections.REGISTRY` whose results are present contributes
its own targets, markdown and figures; this module adds the header, the targets table, the
overview figure (the sections' speed-up bars and panels) and the list of what was skipped.

Re-render the markdown and figures of saved results (targets recomputed with the current
bounds; the JSON file is left as it is)::

    python benchmarks/report.py benchmarks/results/<device-name>.json [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sections import REGISTRY  # noqa: E402
from benchmarks.sections.common import Bar, Section, fmt  # noqa: E402


def _present(results: dict[str, Any]) -> list[tuple[Section, dict[str, Any]]]:
    """(section, its results) for every registered section the results hold, in order."""
    held = results["sections"]
    return [(s, held[s.name]) for s in REGISTRY if s.name in held]


def compute_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target that the sections run allow, with its measured value."""
    meta = results.get("meta", {})
    return [t for s, r in _present(results) for t in s.targets(r, meta)]


def write_markdown(results: dict[str, Any], path: Path, stem: str) -> None:
    """Writes the human-readable report next to the JSON."""
    meta = results["meta"]
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
            md.append(f"| {t['text']} | {fmt(t['value'])} | {met} | {t['detail']} |")
        md.append("")
    for section, result in _present(results):
        md += section.markdown(result, meta, stem)
    if _has_overview(results):
        md += [f"![overview]({stem}-speedups.png)", ""]
    if meta.get("skipped"):
        md += ["## Skipped", ""] + [f"- {x}" for x in meta["skipped"]] + [""]
    path.write_text("\n".join(md))


def _bars(results: dict[str, Any]) -> list[Bar]:
    meta = results.get("meta", {})
    return [b for s, r in _present(results) for b in s.bars(r, meta)]


def _panels(results: dict[str, Any]) -> list[Any]:
    panels = (s.overview_panel(r) for s, r in _present(results))
    return [p for p in panels if p is not None]


def _has_overview(results: dict[str, Any]) -> bool:
    return bool(_bars(results) or _panels(results))


def write_plots(results: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    """Writes the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    written: list[str] = []
    for section, result in _present(results):
        written += section.plots(result, meta, out_dir, stem)
    bars, panels = _bars(results), _panels(results)
    if bars or panels:
        fig, axes = plt.subplots(1, 1 + max(len(panels), 1),
                                 figsize=(12, 0.35 * max(len(bars), 6) + 1.5),
                                 gridspec_kw={"width_ratios": [2.2] + [1] * max(len(panels), 1)})
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
        for draw, panel_ax in zip(panels, axes[1:]):
            draw(panel_ax)
        fig.tight_layout()
        name = f"{stem}-speedups.png"
        fig.savefig(out_dir / name, dpi=72)
        plt.close(fig)
        written.append(name)
    return written


def rerender(json_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Writes the markdown and figures of saved results again, with targets recomputed.

    Args:
        json_path: a ``<device-name>.json`` written by ``benchmarks/run.py``.
        out_dir: where to write (default: next to the JSON file).

    Returns:
        The files written.
    """
    results = json.loads(json_path.read_text())
    results["targets"] = compute_targets(results)
    out = out_dir or json_path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = json_path.stem
    write_markdown(results, out / f"{stem}.md", stem)
    return [out / f"{stem}.md"] + [out / n for n in write_plots(results, out, stem)]


def main(argv: list[str] | None = None) -> None:
    """The command line: re-renders saved results."""
    parser = argparse.ArgumentParser(description="Re-render saved benchmark results.")
    parser.add_argument("results", type=Path, nargs="+", help="<device-name>.json files")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: next to each JSON file)")
    args = parser.parse_args(argv)
    for path in args.results:
        for written in rerender(path, args.out):
            print(f"wrote {written.name}")


if __name__ == "__main__":
    main()
