"""Does the mean teacher catch up with its student on a longer schedule, and does the mean
teacher help once it has? Per-epoch validation metrics of every run's student and, for MT and
CRCKD, of its teacher, compared on the validation part only.

Give it the run folders of one dataset, split and seed, with a validation part (the
``val_fraction`` settings files), for example the 24-epoch runs of
``configs/cpu_scale_val_24ep.json`` and the 8-epoch ones of ``configs/cpu_scale_val.json``::

    python reference_training/studies/teacher_lag.py RUNS/aptos/*-paper-s2020-val* --out DIR

It writes ``DIR/table_lag.md``:

- per run, the teacher's validation balanced accuracy minus its student's (T − S), averaged
  over each third of the run, and on how many epochs the teacher was at least level;
- per run, the student's (and the teacher's) validation AUC, balanced accuracy and macro F1,
  mean of the run's last epochs (its ``last_epochs``), and at the student's best epoch by
  validation balanced accuracy;
- method against method, per schedule: MT − baseline, CRCKD − MT and CRCKD − baseline on
  those student metrics;

and ``DIR/teacher_lag.png``: validation balanced accuracy per epoch, students dashed, teachers
solid, and T − S per epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from reference_training import runfiles  # noqa: E402

METRICS = ("auc", "balanced_accuracy", "f1")
NAMES = {"auc": "AUC", "balanced_accuracy": "bal. acc.", "f1": "macro F1"}
ORDER = ("baseline", "mt", "crckd")


def load(folder: Path) -> dict[str, Any]:
    """A run's summary, per-epoch history (floats) and schedule length."""
    summary = json.loads((folder / runfiles.SUMMARY).read_text(encoding="utf-8"))
    with open(folder / runfiles.METRICS, newline="", encoding="utf-8") as handle:
        history = [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                   for row in csv.DictReader(handle)]
    if not history or "val_balanced_accuracy" not in history[0]:
        raise SystemExit(f"{folder}: no validation metrics (run it with val_fraction)")
    return {"folder": folder, "summary": summary, "history": history,
            "method": summary["method"], "epochs": len(history),
            "last": len(summary["last_epochs"]["epochs"]),
            "has_teacher": "teacher_val_balanced_accuracy" in history[0]}


def _mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def student_best(run: dict[str, Any]) -> dict[str, float]:
    """The student's row at its best epoch by validation balanced accuracy."""
    history = run["history"]
    scores = [r["val_balanced_accuracy"] for r in history]
    best = max(range(len(history)), key=lambda i: scores[i] if math.isfinite(scores[i])
               else -math.inf)
    return history[best]


def stats(run: dict[str, Any]) -> dict[str, Any]:
    """Per run: last-epochs means of student and teacher, best-epoch student metrics, T − S
    per third of the run and the epochs where the teacher was level or ahead."""
    history, last = run["history"], run["last"]
    tail = history[-last:]
    out: dict[str, Any] = {
        "student_last": {m: _mean([r[f"val_{m}"] for r in tail]) for m in METRICS},
        "student_best": {m: student_best(run)[f"val_{m}"] for m in METRICS},
        "best_epoch": int(student_best(run)["epoch"]),
    }
    if run["has_teacher"]:
        out["teacher_last"] = {m: _mean([r[f"teacher_val_{m}"] for r in tail])
                               for m in METRICS}
        gaps = [r["teacher_val_balanced_accuracy"] - r["val_balanced_accuracy"]
                for r in history]
        n = len(gaps)
        thirds = [gaps[i * n // 3:(i + 1) * n // 3] for i in range(3)]
        out["gap_thirds"] = [_mean(t) for t in thirds]
        out["level_epochs"] = sum(g >= 0 for g in gaps)
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}" if math.isfinite(v) else "n/a"


def _d(a: float, b: float) -> str:
    return f"{100 * (a - b):+.1f}" if math.isfinite(a - b) else "n/a"


def _label(run: dict[str, Any]) -> str:
    return f"{run['method']}, {run['epochs']} epochs, seed {run['summary']['seed']}"


def table(runs: list[dict[str, Any]]) -> str:
    """The markdown of ``table_lag.md`` (see the module docstring)."""
    runs = sorted(runs, key=lambda r: (r["epochs"], r["summary"]["seed"],
                                       ORDER.index(r["method"]) if r["method"] in ORDER
                                       else len(ORDER)))
    for r in runs:
        r["stats"] = stats(r)
    lines = ["Teacher against its student, validation balanced accuracy (T − S, points): mean "
             "over each third of the run, and the epochs where the teacher was level or ahead.",
             "", "| run | T − S, first third | second third | last third | epochs T ≥ S |",
             "|---|---|---|---|---|"]
    for r in runs:
        if r["has_teacher"]:
            g = r["stats"]["gap_thirds"]
            lines.append(f"| {_label(r)} | {_d(g[0], 0)} | {_d(g[1], 0)} | {_d(g[2], 0)} | "
                         f"{r['stats']['level_epochs']} of {r['epochs']} |")
    head = ["run", "last epochs"]
    head += [f"S {NAMES[m]}" for m in METRICS] + [f"T {NAMES[m]}" for m in METRICS]
    head += [f"S {NAMES[m]}, best epoch" for m in METRICS] + ["best epoch"]
    lines += ["", "Validation metrics in %: S the student, T its teacher; mean of the run's "
              "last epochs, and the student at its best epoch by validation balanced accuracy.",
              "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        s = r["stats"]
        teacher = s.get("teacher_last", {})
        cells = [_label(r), str(r["last"])]
        cells += [_pct(s["student_last"][m]) for m in METRICS]
        cells += [_pct(teacher.get(m, math.nan)) if teacher else "–" for m in METRICS]
        cells += [_pct(s["student_best"][m]) for m in METRICS] + [str(s["best_epoch"])]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = (("mt", "baseline"), ("crckd", "mt"), ("crckd", "baseline"))
    head = ["schedule, seed", "comparison"]
    head += [f"{NAMES[m]}, last" for m in METRICS] + [f"{NAMES[m]}, best" for m in METRICS]
    lines += ["", "Student against student on validation, the same schedule and seed (points).",
              "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["epochs"], r["summary"]["seed"]), {})[r["method"]] = r
    for (epochs, seed), by_method in groups.items():
        for a, b in pairs:
            if a in by_method and b in by_method:
                sa, sb = by_method[a]["stats"], by_method[b]["stats"]
                cells = [f"{epochs} epochs, seed {seed}", f"{a} − {b}"]
                cells += [_d(sa["student_last"][m], sb["student_last"][m]) for m in METRICS]
                cells += [_d(sa["student_best"][m], sb["student_best"][m]) for m in METRICS]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Validation balanced accuracy per epoch (one panel per schedule; students dashed,
    teachers solid), and T − S per epoch."""
    from reference_training.plots import _pyplot, label_epoch_axes

    plt = _pyplot()
    schedules = sorted({r["epochs"] for r in runs})
    fig, axes = plt.subplots(1, len(schedules) + 1, figsize=(5.2 * (len(schedules) + 1), 4),
                             squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(ORDER)}
    for ax, epochs in zip(axes[0], schedules, strict=False):
        for r in (r for r in runs if r["epochs"] == epochs):
            x = [int(row["epoch"]) for row in r["history"]]
            colour = colours.get(r["method"], "gray")
            seed = r["summary"]["seed"]
            ax.plot(x, [100 * row["val_balanced_accuracy"] for row in r["history"]], "--",
                    color=colour, label=f"{r['method']} student, seed {seed}")
            if r["has_teacher"]:
                ax.plot(x, [100 * row["teacher_val_balanced_accuracy"] for row in r["history"]],
                        "-", color=colour, label=f"{r['method']} teacher, seed {seed}")
        label_epoch_axes(ax, f"{epochs} epochs: validation balanced accuracy", "%")
    ax = axes[0][-1]
    for r in runs:
        if r["has_teacher"]:
            x = [int(row["epoch"]) for row in r["history"]]
            ax.plot(x, [100 * (row["teacher_val_balanced_accuracy"] -
                               row["val_balanced_accuracy"]) for row in r["history"]],
                    "-" if r["epochs"] == max(schedules) else ":",
                    color=colours.get(r["method"], "gray"), label=_label(r))
    ax.axhline(0, color="black", linewidth=0.8)
    label_epoch_axes(ax, "teacher − student, validation balanced accuracy", "points")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path,
                   help="run folders with a validation part (files among them are skipped)")
    p.add_argument("--out", type=Path, required=True, help="folder for the table and the plot")
    args = p.parse_args(argv)
    # Files beside the run folders (a grid's logs, matched by a glob) are not runs.
    runs = [load(folder) for folder in args.runs if not folder.is_file()]
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (args.out / "table_lag.md").write_text(text + "\n", encoding="utf-8")
    plot(runs, args.out / "teacher_lag.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
