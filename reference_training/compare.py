"""Turns several run folders into one markdown table: mean ± std over seeds or folds.

Usage::

    python reference_training/compare.py runs/a runs/b ... [--out table.md] [--protocol last|best]
        [--part test|val]

Runs are grouped by (dataset, method, recipe, model, tag), and split further by any other
key of their ``config.json`` they differ in (all but the seed and the fold, which a row pools,
and the keys of where and how a run ran); each group is one row, its differing keys in its
name. A folder without ``summary.json`` (a run that failed or has not finished) is listed as
skipped; runs of one row that ran on different versions or devices (``environment.json``)
are noted under the table.
``--against DIR`` pairs each run with the run of the same folder name in ``DIR`` instead (the
same setting measured before a change) and tables the differences.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_training import environment  # noqa: E402
from reference_training.config import METHODS, NEUTRAL_KEYS, PATH_KEYS  # noqa: E402
from reference_training.metrics import METRICS, format_table  # noqa: E402
from reference_training.runfiles import CONFIG, SUMMARY, run_files_in  # noqa: E402

#: Config keys a row pools over (the replicates) or that cannot change a run's numbers.
POOLED_KEYS = ("seed", "fold", *PATH_KEYS, *NEUTRAL_KEYS)
#: Keys filled from another one when left null: left out of a row's name beside that one.
DERIVED_FROM = {"rampup_epochs": "epochs", "begin_epoch": "epochs", "epoch_lr_reset": "lr"}


def find_runs(run_dirs: list[str | Path]) -> tuple[list[tuple[Path, dict]], list[Path]]:
    """Each finished run's folder and ``summary.json`` (a folder of folds counts each fold),
    and the folders without one (a run that failed or has not finished), to skip."""
    found: list[tuple[Path, dict]] = []
    skipped: list[Path] = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        if (path / SUMMARY).is_file():
            found.append((path, json.loads((path / SUMMARY).read_text(encoding="utf-8"))))
            continue
        subs = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
        inner, _ = find_runs([p for p in subs if (p / SUMMARY).is_file()])
        unfinished = [p for p in subs if not (p / SUMMARY).is_file() and run_files_in(p)]
        found += inner
        skipped += unfinished if inner or unfinished else [path]
    return found, skipped


def load_summaries(run_dirs: list[str | Path]) -> list[dict]:
    """``summary.json`` of each run folder (a folder of folds counts each fold)."""
    found, skipped = find_runs(run_dirs)
    if skipped:
        raise FileNotFoundError(f"no summary.json in {skipped[0]} or its subfolders")
    return [summary for _, summary in found]


def metrics_of(summary: dict, protocol: str, part: str = "test") -> dict[str, float]:
    """A run's metrics (fractions) under ``protocol`` (``"last"``/``"best"``) on ``part``
    (``"test"``/``"val"``); NaN where the run has none (no validation split)."""
    if protocol == "best":
        best = summary.get("best_on_val")
        source = best[part] if best else {}
    else:
        source = summary["last_epochs"].get(part) or {}
    return {m: (math.nan if source.get(m) is None else float(source[m])) for m in METRICS}


def group_name(summary: dict) -> str:
    """Runs with one group name are pooled: dataset, method, recipe, model and tag."""
    name = f"{summary['dataset']} / {summary['method']} / {summary['recipe']} / {summary['model']}"
    return name + (f" / {summary['tag']}" if summary.get("tag") else "")


def compare(run_dirs: list[str | Path], protocol: str = "last", part: str = "test") -> str:
    """The markdown table for ``run_dirs`` (``protocol``: ``"last"`` epochs mean or ``"best"``
    on validation; ``part``: the ``"test"`` or ``"val"`` metrics), in %, mean ± std over the
    runs of a row (:func:`rows_of`), ``n`` runs; then the notes: rows whose runs differ in
    their environment, and the folders skipped."""
    if part not in ("test", "val"):
        raise ValueError(f"part must be 'test' or 'val', got {part!r}")
    found, skipped = find_runs(run_dirs)
    if not found:
        raise FileNotFoundError("no finished run (summary.json) in "
                                + ", ".join(str(p) for p in skipped))
    means, stds, notes = {}, {}, []
    for name, runs in rows_of(found).items():
        rows = [metrics_of(s, protocol, part) for _, s in runs]
        label = f"{name} (n={len(rows)})"
        means[label] = {m: _nanmean([r[m] for r in rows]) for m in METRICS}
        stds[label] = {m: _nanstd([r[m] for r in rows]) for m in METRICS}
        notes += _environment_note(label, [folder for folder, _ in runs])
    if skipped:
        notes.append("skipped (no summary.json: the run failed or has not finished): "
                     + ", ".join(str(p) for p in skipped))
    title = (f"{part}, mean of the last epochs (paper protocol)" if protocol == "last"
             else f"{part} at the best validation epoch")
    table = f"{title}; mean ± std over runs, in %\n\n" + format_table(means, stds=stds)
    return table + "".join(f"\n\n{note}" for note in notes)


def _setting(folder: Path) -> dict:
    """A run's ``config.json`` less :data:`POOLED_KEYS` (empty for a run without one)."""
    path = folder / CONFIG
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {k: json.dumps(v, sort_keys=True) for k, v in config.items() if k not in POOLED_KEYS}


def rows_of(runs: list[tuple[Path, dict]]) -> dict[str, list[tuple[Path, dict]]]:
    """The table's rows: runs by :func:`group_name`, split by every config key (known to all
    of them) in which runs of one name differ, those keys named in the row's name."""
    by_name: dict[str, list[tuple[Path, dict, dict]]] = {}
    for folder, summary in sorted(runs, key=lambda r: run_order(r[1])):
        by_name.setdefault(group_name(summary), []).append((folder, summary, _setting(folder)))
    rows: dict[str, list[tuple[Path, dict]]] = {}
    for name, members in by_name.items():
        common = set.intersection(*(set(setting) for _, _, setting in members))
        differ = sorted(k for k in common if len({st[k] for _, _, st in members}) > 1)
        shown = [k for k in differ if DERIVED_FROM.get(k) not in differ]
        for folder, summary, setting in members:
            label = name + "".join(f" / {k}={setting[k]}" for k in shown)
            rows.setdefault(label, []).append((folder, summary))
    return rows


def _environment_note(label: str, folders: list[Path]) -> list[str]:
    """A note when the runs of a row ran on different versions, commits or devices."""
    seen: dict[str, set[str]] = {}
    for folder in folders:
        for key, values in environment.compared(folder).items():
            seen.setdefault(key, set()).update(values)
    differ = [f"{key} {' / '.join(sorted(values))}" for key, values in seen.items()
              if len(values) > 1]
    if not differ:
        return []
    return [f"note: the runs of {label} differ in what ran them (environment.json): "
            + "; ".join(differ)]


def run_order(summary: dict) -> tuple:
    """Sort key: dataset, then the methods in the paper's order (baseline, MT, ablations,
    CRCKD), recipe, model, tag, seed, fold."""
    method = summary["method"]
    rank = METHODS.index(method) if method in METHODS else len(METHODS)
    return (summary["dataset"], rank, method, summary["recipe"], summary["model"],
            summary.get("tag") or "", summary.get("seed") or 0, summary.get("fold") or 0)


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (sample std; the mean alone for one value), ``n/a`` for none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    mean = sum(finite) / len(finite)
    text = f"{scale * mean:.{digits}f}"
    if len(finite) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
        text += f" ± {scale * std:.{digits}f}"
    return text


def signed_mean_std(values: list[float]) -> str:
    """``mean_std`` of ``values`` in points, with its sign."""
    text = mean_std(values, 100.0, 1)
    if text.startswith("-0.0 ") or text == "-0.0":  # a mean that rounds to zero has no sign
        text = text[1:]
    return text if text.startswith("-") else "+" + text


#: The metrics of the paired tables: balanced accuracy and macro F1 (the paper's headline
#: ones on these imbalanced sets), then AUC.
PAIR_METRICS = ("balanced_accuracy", "f1", "auc")


def paired_against(run_dirs: list[str | Path], before: str | Path, protocol: str = "last",
                   part: str = "test") -> str:
    """Each run against the run of the same folder name under ``before`` (the same setting
    measured with other code or defaults): the mean ± std of the differences, in points, per
    group of :func:`group_name`, and on how many runs the new one is ahead."""
    rows: dict[str, dict[str, list[float]]] = {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        old_path = Path(before) / path.name
        if not (old_path / SUMMARY).is_file():
            raise FileNotFoundError(f"no {SUMMARY} in {old_path} to compare {path} with")
        new, old = load_summaries([path])[0], load_summaries([old_path])[0]
        got, was = metrics_of(new, protocol, part), metrics_of(old, protocol, part)
        group = rows.setdefault(group_name(new), {m: [] for m in PAIR_METRICS})
        for m in PAIR_METRICS:
            group[m].append(got[m] - was[m])
    head = ["runs", "n", *[f"Δ {m}" for m in PAIR_METRICS],
            *[f"ahead on {m}" for m in PAIR_METRICS]]
    lines = [f"{part}, {'mean of the last epochs' if protocol == 'last' else 'best epoch'}: "
             f"these runs − the same runs in {before}, in points", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, deltas in rows.items():
        n = len(deltas[PAIR_METRICS[0]])
        cells = [signed_mean_std(deltas[m]) for m in PAIR_METRICS]
        cells += [f"{sum(d > 0 for d in deltas[m])}/{n}" for m in PAIR_METRICS]
        lines.append("| " + " | ".join([name, str(n), *cells]) + " |")
    return "\n".join(lines)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _nanstd(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return math.nan  # a spread needs two runs; one run shows its value alone
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (or folders of fold runs)")
    parser.add_argument("--out", help="write the table to this markdown file")
    parser.add_argument("--protocol", choices=("last", "best"), default="last")
    parser.add_argument("--part", choices=("test", "val"), default="test",
                        help="report the test metrics (default) or the validation ones")
    parser.add_argument("--against", metavar="DIR",
                        help="instead: each run against the run of the same folder name in "
                        "DIR (the same setting, measured before), paired")
    args = parser.parse_args(argv)
    try:
        table = (paired_against(args.runs, args.against, args.protocol, args.part)
                 if args.against else compare(args.runs, args.protocol, args.part))
    except FileNotFoundError as error:  # a folder that holds no run: the user's to fix
        raise SystemExit(f"error: {error}") from None
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
