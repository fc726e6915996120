"""Which mean-teacher setting should be the default: the teacher's own validation metrics
against its student's, per setting of :class:`crckd_losses.EMATeacher`.

Settings (``buffers``, ``train_mode``):

- ``copy-eval``: ``"copy"``, ``False``: the student's BatchNorm statistics on averaged weights,
  teacher in eval mode;
- ``average-eval``: ``"average"``, ``False``: floating buffers averaged like the weights (timm's
  ModelEmaV3), teacher in eval mode;
- ``own-train``: ``"leave"``, ``True``: the teacher keeps its own running statistics and runs in
  train mode (the released CRCKD code, the original Mean Teacher).

Each (dataset, setting) is one ``train.py`` run of ``--method`` (MT by default) with the same
``--config``, through :func:`reference_training.reproduce.run_one` (a finished run is kept, an
interrupted one resumes)::

    python reference_training/studies/compare_teachers.py --data-root DATA --datasets aptos \\
        --config reference_training/configs/small_cnn_val.json

``--collect`` copies the finished runs (summary, metrics, config; no checkpoint) under
``--docs-out`` and writes ``table.md`` (validation balanced accuracy and macro F1 of teacher and
student: mean of the last epochs, and each one's best epoch) and ``teachers_val.png`` (per-epoch
validation balanced accuracy, teacher solid, student dashed). Every run is one "case" (dataset,
model, image size, tag less the setting) and one setting. The engine evaluates every teacher in
eval mode (BatchNorm on its running statistics, dropout off): for ``own-train`` these are the
statistics the teacher kept itself while it ran in train mode.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from reference_training import runfiles  # noqa: E402
from reference_training.config import load_file  # noqa: E402
from reference_training.reproduce import copy_run, run_one  # noqa: E402

SETTINGS: dict[str, tuple[str, bool]] = {
    "copy-eval": ("copy", False),
    "average-eval": ("average", False),
    "own-train": ("leave", True),
}
METRICS = ("balanced_accuracy", "f1")
TAG_PART = re.compile(r"(, )?teacher (copy-eval|average-eval|own-train)$")


def setting_name(teacher: dict[str, Any]) -> str:
    """``copy-eval`` etc. for a summary's ``teacher`` entry (``buffers-mode`` if not one of
    :data:`SETTINGS`)."""
    key = (teacher["buffers"], bool(teacher["train_mode"]))
    for name, value in SETTINGS.items():
        if value == key:
            return name
    return f"{key[0]}-{'train' if key[1] else 'eval'}"


def setting_config(base: Path, setting: str, folder: Path, epochs: int | None = None) -> Path:
    """``base`` with the setting's ``teacher_*`` keys and the setting added to its tag, written
    to ``folder`` (the run folder's name and summary carry the tag); ``epochs`` replaces the
    file's epoch count, and is said in the tag too."""
    config = load_file(base)
    buffers, train_mode = SETTINGS[setting]
    config["teacher_buffers"], config["teacher_train_mode"] = buffers, train_mode
    parts = [config.get("tag")]
    if epochs is not None and epochs != config.get("epochs"):
        config["epochs"] = epochs
        parts.append(f"{epochs} epochs")
    config["tag"] = ", ".join(t for t in (*parts, f"teacher {setting}") if t)
    folder.mkdir(parents=True, exist_ok=True)
    stem = base.stem + (f"-{epochs}ep" if epochs is not None else "")
    path = folder / f"{stem}-{setting}.json"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def run_grid(args: argparse.Namespace) -> list[Path]:
    """Runs (or keeps) every dataset x setting; returns the run folders."""
    out = []
    for dataset in args.datasets:
        for setting in args.settings:
            config = setting_config(Path(args.config), setting, Path(args.runs) / "configs",
                                    args.epochs)
            ns = argparse.Namespace(config=str(config), runs=args.runs, data_dir=None,
                                    ham_dir=args.ham_dir, aptos_dir=args.aptos_dir)
            out.append(run_one(ns, dataset, args.method, args.recipe, args.seed))
    return out


# --- collect -----------------------------------------------------------------------------


def _history(folder: Path) -> list[dict[str, float]]:
    with open(folder / runfiles.METRICS, newline="", encoding="utf-8") as handle:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(handle)]


def case_name(summary: dict[str, Any], config: dict[str, Any]) -> str:
    """What a run compares with: dataset (and APTOS fold), model, pretrained or not, image
    size, the tag less its teacher setting."""
    dataset = summary["dataset"] + (f" fold {summary['fold']}" if summary.get("fold") else "")
    init = "pretrained" if config.get("pretrained") or config.get("weights") else "from scratch"
    name = f"{dataset}, {summary['model']} {init}, {config.get('image_size')} px"
    name += f", {summary['epochs']} epochs"
    tag = TAG_PART.sub("", summary.get("tag") or "")
    tag = re.sub(rf"(, )?{summary['epochs']} epochs", "", tag).strip(", ")
    return name + (f" ({tag})" if tag else "")


def run_stats(history: list[dict[str, float]], last: int) -> dict[str, dict[str, Any]]:
    """Per model (``student``, ``teacher``): validation metrics, mean of the ``last`` epochs,
    and at that model's own best epoch by validation balanced accuracy."""
    stats: dict[str, dict[str, Any]] = {}
    for who, prefix in (("student", ""), ("teacher", "teacher_")):
        tail = history[-min(last, len(history)):]
        mean = {m: float(sum(r[f"{prefix}val_{m}"] for r in tail) / len(tail)) for m in METRICS}
        scores = [r[f"{prefix}val_balanced_accuracy"] for r in history]
        scores = [s if math.isfinite(s) else -math.inf for s in scores]
        best_row = history[max(range(len(history)), key=scores.__getitem__)]
        stats[who] = {"last": mean, "best": {m: best_row[f"{prefix}val_{m}"] for m in METRICS},
                      "best_epoch": int(best_row["epoch"])}
    gaps = [r["teacher_val_balanced_accuracy"] - r["val_balanced_accuracy"] for r in history]
    stats["gap_all_epochs"] = float(sum(gaps) / len(gaps))
    return stats


def load_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under ``root/<dataset>/<run>/`` with teacher metrics: its case, setting,
    per-epoch history and :func:`run_stats`."""
    runs = []
    for path in sorted(root.glob("*/*/summary.json")):
        summary = json.loads(path.read_text(encoding="utf-8"))
        if "teacher" not in summary or not (path.parent / runfiles.METRICS).is_file():
            continue
        config_path = path.parent / runfiles.CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() \
            else {}
        history = _history(path.parent)
        if "teacher_val_balanced_accuracy" not in history[0]:
            continue  # no validation part
        last = len(summary["last_epochs"]["epochs"])
        runs.append({"case": case_name(summary, config),
                     "setting": setting_name(summary["teacher"]), "folder": path.parent,
                     "history": history, "stats": run_stats(history, last), "last": last})
    order = list(SETTINGS)
    runs.sort(key=lambda r: (r["case"], order.index(r["setting"]) if r["setting"] in order
                             else len(order), r["setting"]))
    return runs


def _pct(v: float) -> str:
    return f"{100 * v:.1f}" if math.isfinite(v) else "n/a"


def _delta(a: float, b: float) -> str:
    d = 100 * (a - b)
    return f"{d:+.1f}" if math.isfinite(d) else "n/a"


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per case and setting, teacher (T) and student (S) validation balanced accuracy
    and macro F1 in %, T − S; mean of the last epochs, then each model's best epoch by
    validation balanced accuracy."""
    if not runs:
        return "no runs with teacher metrics and a validation part"
    last = sorted({r["last"] for r in runs})
    head = ["case", "setting"]
    for m in ("bal. acc.", "macro F1"):
        head += [f"T {m}", f"S {m}", "T − S"]
    head.append("T − S bal. acc., mean over all epochs")
    lines = [f"Validation, mean of the last {'/'.join(map(str, last))} epochs (%)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        t, s = r["stats"]["teacher"]["last"], r["stats"]["student"]["last"]
        cells = [r["case"], r["setting"]]
        for m in METRICS:
            cells += [_pct(t[m]), _pct(s[m]), _delta(t[m], s[m])]
        cells.append(_delta(r["stats"]["gap_all_epochs"], 0.0))
        lines.append("| " + " | ".join(cells) + " |")
    head = ["case", "setting", "T best bal. acc. (epoch)", "S best bal. acc. (epoch)", "T − S",
            "T F1 there", "S F1 there", "T − S"]
    lines += ["", "Validation, each model at its own best epoch by validation balanced "
              "accuracy (%)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        t, s = r["stats"]["teacher"], r["stats"]["student"]
        tb, sb = t["best"], s["best"]
        lines.append("| " + " | ".join([
            r["case"], r["setting"],
            f"{_pct(tb['balanced_accuracy'])} ({t['best_epoch']})",
            f"{_pct(sb['balanced_accuracy'])} ({s['best_epoch']})",
            _delta(tb["balanced_accuracy"], sb["balanced_accuracy"]),
            _pct(tb["f1"]), _pct(sb["f1"]), _delta(tb["f1"], sb["f1"])]) + " |")
    lines += ["", "T teacher, S its student, in the same run. Every teacher is evaluated in eval "
              "mode: BatchNorm on its running statistics (own-train: those it kept itself while "
              "it ran in train mode), dropout off."]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Per-epoch validation balanced accuracy, one panel per case: teacher solid, student
    dashed, one colour per setting."""
    from reference_training.plots import _pyplot, label_epoch_axes

    plt = _pyplot()
    cases = list(dict.fromkeys(r["case"] for r in runs))
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4), squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(SETTINGS)}
    for ax, case in zip(axes[0], cases, strict=True):
        for r in (r for r in runs if r["case"] == case):
            epochs = [int(row["epoch"]) for row in r["history"]]
            colour = colours.get(r["setting"])
            for who, prefix, style in (("teacher", "teacher_", "-"), ("student", "", "--")):
                ax.plot(epochs, [100 * row[f"{prefix}val_balanced_accuracy"]
                                 for row in r["history"]], style, color=colour,
                        label=f"{r['setting']} {who}")
        label_epoch_axes(ax, case, "validation balanced accuracy (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def collect(runs_root: Path, docs_out: Path) -> str:
    """Copies the finished runs under ``docs_out`` and writes ``table.md`` and
    ``teachers_val.png`` there from the copies; returns the table."""
    for path in sorted(runs_root.glob("*/*/summary.json")):
        run = path.parent
        if "teacher" in json.loads(path.read_text(encoding="utf-8")):
            copy_run(run, docs_out / run.parent.name / run.name)
    runs = load_runs(docs_out)
    text = table(runs)
    (docs_out / "table.md").write_text(text + "\n", encoding="utf-8")
    if runs:
        plot(runs, docs_out / "teachers_val.png")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", help="folder holding ham10000_200x150/ and aptos2019_128x128/")
    p.add_argument("--ham-dir")
    p.add_argument("--aptos-dir")
    p.add_argument("--datasets", nargs="+", default=["aptos"], choices=("ham10000", "aptos"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--config", default=str(ROOT / "reference_training" / "configs" /
                                           "small_cnn_val.json"))
    p.add_argument("--epochs", type=int, help="replaces the config's epoch count")
    p.add_argument("--method", default="mt")
    p.add_argument("--recipe", default="paper", choices=("paper", "released-code"))
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--runs", default=str(ROOT / "runs" / "teachers"))
    p.add_argument("--collect", action="store_true", help="only collect finished runs")
    p.add_argument("--docs-out", default=str(ROOT / "docs" / "teacher_runs"))
    args = p.parse_args(argv)
    if args.collect:
        print(collect(Path(args.runs), Path(args.docs_out)))
        return
    root = Path(args.data_root) if args.data_root else None
    args.ham_dir = args.ham_dir or (root / "ham10000_200x150" if root else None)
    args.aptos_dir = args.aptos_dir or (root / "aptos2019_128x128" if root else None)
    for dataset in args.datasets:
        if (args.ham_dir if dataset == "ham10000" else args.aptos_dir) is None:
            p.error(f"--data-root or --{'ham' if dataset == 'ham10000' else 'aptos'}-dir needed")
    run_grid(args)


if __name__ == "__main__":
    main()
