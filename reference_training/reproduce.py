"""Runs the reproduction grid (docs/reproduction.md) and collects what the docs page shows.

Each (dataset, method, recipe, seed, APTOS fold) is one ``train.py`` run under ``--runs``, with
the same settings file for every method. A run whose folder already holds ``summary.json`` is
kept, and an interrupted one resumes from its last checkpoint, so the grid can be run in
pieces::

    python reference_training/reproduce.py --data-root DATA --datasets ham10000 aptos \\
        --methods baseline mt crckd --seeds 2020 2021 2022

``DATA`` holds ``ham10000_200x150/`` and ``aptos2019_128x128/`` (or pass ``--ham-dir`` and
``--aptos-dir``). Afterwards ``--collect`` copies every run's ``summary.json`` (and the plots
of seed ``--plot-seed``) under ``docs/reproduction_runs/`` and writes the tables with
``compare.py``. ``--folds 1 2 3 4 5`` runs more APTOS folds: the main tables stay on fold 1
(all seeds), and the seeds run on several folds get cross-validation tables of their own
(``table_folds_*.md``: mean ± std over the folds, and method against method fold by fold).

GPU windows are short: ``--concurrent N`` runs N of the grid's runs at once on one device
(each its own process; as many as fit in memory; small models at small sizes leave most of
a large GPU idle with one), ``--window SECONDS`` stops them when the window ends (each
resumes from its last checkpoint next time; set ``checkpoint_every_steps`` in the settings
file so little is lost), and ``--pack FILE.tar`` / ``--unpack FILE.tar`` carry the runs
folder (checkpoints, metrics, configs) from one window's machine to the next. The
throughput of each run and of the grid (images per second) is printed at the end.

Your own data runs the same grid: ``--datasets folder --data-dir DIR``, or ``--datasets csv
--data-dir DIR --csv FILE`` with the column flags of ``train.py``. With ``--folds`` it is
cross-validated, and those runs go under ``<dataset>-cv/``, apart from the 70/10/20 ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS_RUNS = ROOT / "docs" / "reproduction_runs"
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from reference_training.compare import (  # noqa: E402
    PAIR_METRICS,
    compare,
    group_name,
    load_summaries,
    mean_std,
    run_order,
    signed_mean_std,
)
from reference_training.config import PATH_KEYS, load_file  # noqa: E402
from reference_training.data import OWN_DATASETS  # noqa: E402
from reference_training.runfiles import (  # noqa: E402
    CONFIG,
    ENVIRONMENT,
    LAST_CHECKPOINT,
    METRICS,
    PLOTS,
    SPLIT,
    SUMMARY,
)

TABLE_FLAGS = ("csv", "image_column", "label_column", "group_column")
CURVE_METRICS = ("balanced_accuracy", "f1", "auc")


def run_folder_name(method: str, recipe: str, seed: int, fold: int = 1, tag: str | None = None,
                    ) -> str:
    """``<method>-<recipe>-s<seed>[-fold<k>][-<tag>]``: fold 1 (and HAM10000's one split) has
    no fold part, so the folders of earlier fold-1 runs keep their names."""
    name = f"{method}-{recipe}-s{seed}" + (f"-fold{fold}" if fold != 1 else "")
    return name + ("-" + re.sub(r"[^A-Za-z0-9.]+", "-", tag).strip("-") if tag else "")


def _fold(summary: dict[str, Any]) -> int:
    """The run's APTOS fold; 1 for HAM10000's one split."""
    return int(summary.get("fold") or 1)


def _run_key(summary: dict[str, Any]) -> tuple[str, str, int]:
    """``(method, recipe, seed)``: what pairs a run with its twin on another fold or setting."""
    return summary["method"], summary["recipe"], summary["seed"]


def _grid_folds(args: argparse.Namespace, dataset: str) -> list[int | None]:
    """APTOS's folds (fold 1 by default); HAM10000's one split; your own data's ``--folds``,
    or its 70/10/20 split (``None``) when none are given."""
    if dataset == "aptos":
        return list(args.folds or [1])
    if dataset in OWN_DATASETS and args.folds:
        return list(args.folds)
    return [None] if dataset in OWN_DATASETS else [1]


def run_command(args: argparse.Namespace, dataset: str, method: str, recipe: str, seed: int,
                fold: int | None = 1) -> tuple[Path, list[str] | None]:
    """The run folder of one grid point and the ``train.py`` command that trains it (or
    resumes it from its last checkpoint); ``None`` when it is finished. ``fold`` ``None``:
    your own data's 70/10/20 split."""
    own = dataset in OWN_DATASETS
    fold = fold if dataset == "aptos" or own else 1
    name = run_folder_name(method, recipe, seed, fold or 1, load_file(args.config).get("tag"))
    # Cross-validated runs of your own data are a protocol of their own, never pooled with
    # its 70/10/20 runs.
    out = Path(args.runs) / (f"{dataset}-cv" if own and fold else dataset) / name
    if (out / SUMMARY).is_file():
        return out, None
    data_dir = {"ham10000": args.ham_dir, "aptos": args.aptos_dir}.get(dataset, args.data_dir)
    cmd = [sys.executable, str(ROOT / "reference_training" / "train.py"),
           "--dataset", dataset, "--data-dir", str(data_dir), "--method", method,
           "--recipe", recipe, "--seed", str(seed), "--config", args.config,
           "--no-progress"]
    # --resume also starts afresh a run that stopped before its first checkpoint
    cmd += ["--resume", str(out)] if (out / CONFIG).is_file() else ["--out", str(out)]
    if fold is not None and (dataset == "aptos" or own):
        cmd += ["--fold", str(fold)]
    if dataset == "csv":
        for key in TABLE_FLAGS:
            if getattr(args, key):
                cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return out, cmd


def run_one(args: argparse.Namespace, dataset: str, method: str, recipe: str, seed: int,
            fold: int | None = 1) -> Path:
    """Train one grid point (or resume it); returns its run folder."""
    out, cmd = run_command(args, dataset, method, recipe, seed, fold)
    if cmd is None:
        print(f"[keep] {out}", flush=True)
        return out
    print(f"[run ] {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    print(f"[done] {out} in {time.time() - start:.0f} s", flush=True)
    return out


def run_grid(jobs: list[tuple[Path, list[str] | None]], concurrent: int = 1,
             window: float | None = None, log_dir: Path | None = None) -> dict[str, Any]:
    """Runs ``jobs`` (from :func:`run_command`), ``concurrent`` at a time, each in its own
    process on the same device. When ``window`` seconds have passed, the runs still going are
    stopped (they resume from their last checkpoint next time) and no new one starts.

    Returns the finished runs' throughput (``images_per_second`` from each ``summary.json``)
    and the grid's: the images trained by the runs that finished, over the wall time.
    """
    start = time.time()
    pending = [(out, cmd) for out, cmd in jobs if cmd is not None]
    running: list[tuple[Path, subprocess.Popen[bytes], Any]] = []
    finished: list[Path] = []
    stopped: list[Path] = []
    failed: list[Path] = []
    while pending or running:
        out_of_time = window is not None and time.time() - start > window
        while pending and len(running) < concurrent and not out_of_time:
            out, cmd = pending.pop(0)
            assert cmd is not None
            out.parent.mkdir(parents=True, exist_ok=True)
            log = open((log_dir or out.parent) / f"{out.name}.log", "ab")
            print(f"[run ] {' '.join(cmd[1:])}", flush=True)
            running.append((out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                            log))
        if out_of_time:
            for out, proc, log in running:
                proc.terminate()
                proc.wait()
                log.close()
                stopped.append(out)
                print(f"[stop] {out}: the window ended; it resumes from its last checkpoint",
                      flush=True)
            stopped += [out for out, _ in pending]
            break
        time.sleep(0.2)
        for item in list(running):
            out, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            (finished if proc.returncode == 0 else failed).append(out)
            print(f"[{'done' if proc.returncode == 0 else 'FAIL'}] {out} "
                  f"({time.time() - start:.0f} s into the grid)", flush=True)
    wall = time.time() - start
    runs, images = {}, 0.0
    for out in finished:
        summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
        runs[f"{out.parent.name}/{out.name}"] = summary.get("train_images_per_second")
        images += float(summary.get("train_images") or 0) * int(summary.get("epochs") or 0)
    return {"concurrent": concurrent, "wall_seconds": wall, "runs_images_per_second": runs,
            "grid_images_per_second": images / wall if finished and wall > 0 else None,
            "finished": len(finished), "stopped": [str(p) for p in stopped],
            "failed": [str(p) for p in failed]}


# What a window hands to the next: enough to resume every run and to collect the finished.
PACKED = (CONFIG, SPLIT, METRICS, SUMMARY, LAST_CHECKPOINT, ENVIRONMENT, *PLOTS)


def pack(runs: Path, archive: Path) -> int:
    """Writes the run folders under ``runs`` (checkpoints, metrics, configs, splits,
    summaries, plots; no image cache) into the tar ``archive``; returns the files packed."""
    count = 0
    with tarfile.open(archive, "w") as tar:
        for path in sorted(Path(runs).glob("*/*/*")):
            if path.name in PACKED and path.is_file():
                tar.add(path, arcname=str(path.relative_to(runs)))
                count += 1
    return count


def unpack(archive: Path, runs: Path) -> int:
    """Extracts a :func:`pack` archive under ``runs``; returns the files extracted."""
    Path(runs).mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in PACKED]
        tar.extractall(runs, members=members, filter="data")
    return len(members)


def _group_name(s: dict[str, Any]) -> str:
    return f"{s['method']} / {s['recipe']}"


def recall_time_table(summaries: list[dict[str, Any]]) -> str:
    """Per-class test recall (mean of the last epochs) and training seconds per epoch, one row
    per method and recipe (mean ± std over its seeds), so the rare classes and the cost of
    each method can be read side by side."""
    summaries = sorted(summaries, key=run_order)
    classes = summaries[0]["classes"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(_group_name(s), []).append(s)
    head = ["method / recipe", "n", *[f"recall {c}" for c in classes], "s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in groups.items():
        recalls = [r.get("test_recall_per_class", {}).get("last_epochs", {}) for r in runs]
        cells = [mean_std([rec[c] for rec in recalls if c in rec]) for c in classes]
        cells.append(mean_std([r.get("train_seconds_per_epoch") for r in runs], 1.0, 0))
        lines.append("| " + " | ".join([name, str(len(runs)), *cells]) + " |")
    return "\n".join(lines)


PAIRS = (("mt", "baseline"), ("crckd", "mt"), ("crckd", "baseline"))


def paired_table(summaries: list[dict[str, Any]], protocol: str = "last", by: str = "seed",
                 ) -> str:
    """Method against method, seed by seed (the same seed gives both runs the same split,
    initial weights and batch order), or fold by fold with ``by="fold"`` (runs of one seed):
    the mean ± std of the difference in test metrics, in points, and on how many seeds (folds)
    the first method is ahead. Methods are compared in the paper recipe; a method run in both
    recipes also gets released-code − paper. ``""`` when no pair of runs shares a key."""
    by_key: dict[tuple[str, str, int], dict[str, float]] = {}
    for s in summaries:
        source = (s["last_epochs"]["test"] if protocol == "last"
                  else (s.get("best_on_val") or {}).get("test"))
        if source:
            by_key[(s["method"], s["recipe"], int(s.get(by) or 1))] = source
    head = ["comparison", f"{by}s", *[f"Δ {m}" for m in PAIR_METRICS],
            *[f"ahead on {m}" for m in PAIR_METRICS[:2]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = list(dict.fromkeys(m for m, _, _ in by_key))
    pairs = [((a, "paper"), (b, "paper"), f"{a} − {b}") for a, b in PAIRS]
    pairs += [((m, "released-code"), (m, "paper"), f"{m}: released-code − paper")
              for m in methods]
    for first, second, name in pairs:
        keys = sorted(k for (m, r, k) in by_key if (m, r) == first and (*second, k) in by_key)
        if not keys:
            continue
        deltas = {m: [by_key[(*first, k)][m] - by_key[(*second, k)][m] for k in keys]
                  for m in PAIR_METRICS}
        cells = [signed_mean_std(deltas[m]) for m in PAIR_METRICS]
        cells += [f"{sum(d > 0 for d in deltas[m])}/{len(keys)}" for m in PAIR_METRICS[:2]]
        lines.append("| " + " | ".join([name, str(len(keys)), *cells]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _read_history(folder: Path) -> list[dict[str, str]]:
    with open(folder / METRICS, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _curves(folders: list[Path], summaries: dict[Path, dict[str, Any]],
            ) -> dict[str, list[list[dict[str, str]]]]:
    """Each run's ``metrics.csv`` rows, by group (method, recipe, tag), in method order;
    ``summaries`` holds the runs' summaries, already read."""
    pairs = [(summaries[f], f) for f in folders if (f / METRICS).is_file()]
    curves: dict[str, list[list[dict[str, str]]]] = {}
    for summary, folder in sorted(pairs, key=lambda p: run_order(p[0])):
        label = group_name(summary).split(" / ", 1)[1].replace(f" / {summary['model']}", "")
        curves.setdefault(label, []).append(_read_history(folder))
    return curves


def copy_run(run: Path, dest: Path, plots: tuple[str, ...] = ()) -> None:
    """Copies a run's ``summary.json``, ``metrics.csv``, ``config.json`` (less the keys that
    name folders of the machine it ran on) and the ``plots`` it has into ``dest``; never its
    checkpoints."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run / SUMMARY, dest / SUMMARY)
    if (run / METRICS).is_file():
        shutil.copy2(run / METRICS, dest / METRICS)
    if (run / CONFIG).is_file():
        config = json.loads((run / CONFIG).read_text(encoding="utf-8"))
        settings = {k: v for k, v in config.items() if k not in PATH_KEYS}
        (dest / CONFIG).write_text(json.dumps(settings, indent=2) + "\n",
                                          encoding="utf-8")
    for name in plots:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)


def collect(args: argparse.Namespace) -> None:
    """Copy summaries and metrics (and one seed's plots) into the docs; write the tables and
    the method curves. Tagged runs (a setting changed, see ``tag``) get their own tables on the
    validation part, and never enter the main tables."""
    from reference_training import plots

    runs = sorted(Path(args.runs).glob(f"*/*/{SUMMARY}"))
    if not runs:
        raise SystemExit(f"no finished runs under {args.runs}")
    for summary in runs:
        run = summary.parent
        meta = json.loads(summary.read_text(encoding="utf-8"))
        copy_run(run, Path(args.docs_out) / run.parent.name / run.name,
                 PLOTS if meta.get("seed") == args.plot_seed and _fold(meta) == 1 else ())
    for dataset_dir in sorted(p for p in Path(args.docs_out).iterdir() if p.is_dir()):
        folders = sorted(p for p in dataset_dir.iterdir() if (p / SUMMARY).is_file())
        summaries = load_summaries(folders)
        untagged = [(f, s) for f, s in zip(folders, summaries, strict=True) if not s.get("tag")]
        # The main tables hold fold 1 (HAM10000's one split has no other); a method and seed
        # also run on other folds gets the cross-validation tables below, with its fold 1.
        main = [f for f, s in untagged if _fold(s) == 1]
        tagged = [f for f, s in zip(folders, summaries, strict=True) if s.get("tag")]
        main_summaries = [s for _, s in untagged if _fold(s) == 1]
        _write_fold_tables(dataset_dir, untagged)
        for protocol in ("last", "best"):
            table = compare(main, protocol)
            (dataset_dir / f"table_{protocol}.md").write_text(table + "\n", encoding="utf-8")
            paired = paired_table(main_summaries, protocol)
            target = dataset_dir / f"table_paired_{protocol}.md"
            if paired:
                target.write_text(paired + "\n", encoding="utf-8")
            else:
                target.unlink(missing_ok=True)
        (dataset_dir / "table_recall_time.md").write_text(
            recall_time_table(main_summaries) + "\n", encoding="utf-8")
        by_folder = dict(zip(folders, summaries, strict=True))
        paper = [f for f in main if by_folder[f]["recipe"] == "paper"]
        plots.plot_method_curves(_curves(paper, by_folder), "test", CURVE_METRICS,
                                 dataset_dir / "curves_test.png",
                                 f"{dataset_dir.name}: test metrics per epoch, paper recipe")
        _write_tagged_tables(dataset_dir, main, tagged, by_folder)
    print(f"collected {len(runs)} runs under {args.docs_out}")


def _write_tagged_tables(dataset_dir: Path, main: list[Path], tagged: list[Path],
                         by_folder: dict[Path, dict[str, Any]]) -> None:
    """Tables of the tagged runs (a setting changed, see ``tag``): on validation, and on test
    beside the plain runs of the same method, recipe and seed where they trained on the same
    images."""
    from reference_training import plots

    def key(folder: Path) -> tuple[str, str, int]:
        return _run_key(by_folder[folder])

    def has_val(folder: Path) -> bool:
        return bool(by_folder[folder]["last_epochs"].get("val"))

    with_val = [f for f in tagged if has_val(f)]
    # Plain runs that have a validation part themselves (HAM10000's one split) go beside
    # the tagged runs of their method, recipe and seed: the same training and validation
    # images, so the setting is compared seed-paired on validation, then on test.
    tagged_val_keys = {key(t) for t in with_val}
    plain_val = [f for f in main if has_val(f) and key(f) in tagged_val_keys]
    if with_val:
        tables = [compare(plain_val + with_val, protocol, "val")
                  for protocol in ("last", "best")]
        (dataset_dir / "table_tagged_val.md").write_text("\n\n".join(tables) + "\n",
                                                         encoding="utf-8")
        plots.plot_method_curves(_curves(plain_val + with_val, by_folder), "val",
                                 CURVE_METRICS, dataset_dir / "curves_tagged_val.png",
                                 f"{dataset_dir.name}: validation metrics per epoch")
    # Tagged runs trained on the same images as a plain run: those with no validation part
    # (a setting chosen on validation, then run on the test fold), and those whose plain
    # run has the same validation part. APTOS's validation runs train on less of the fold.
    plain_val_keys = {key(p) for p in plain_val}
    on_test = [f for f in tagged if not has_val(f) or key(f) in plain_val_keys]
    if on_test:
        keys = {key(f) for f in on_test}
        plain = [f for f in main if key(f) in keys]
        (dataset_dir / "table_tagged_test.md").write_text(
            compare(plain + on_test, "last") + "\n", encoding="utf-8")


def _write_fold_tables(dataset_dir: Path, untagged: list[tuple[Path, dict[str, Any]]]) -> None:
    """Cross-validation tables, from the untagged runs: the seeds run on the most folds (more
    than one) give the mean ± std over the folds, per-class recall and seconds per epoch over
    the folds, and method against method fold by fold; a fold other than 1 where a method ran
    with several seeds gets its own table, method against method seed by seed. Both protocols,
    the best-on-validation one only where the runs had a validation part."""
    folds: dict[tuple[str, str, int], set[int]] = {}
    for _, s in untagged:
        folds.setdefault(_run_key(s), set()).add(_fold(s))
    most = max((len(v) for v in folds.values()), default=0)
    cv = [(f, s) for f, s in untagged
          if most > 1 and len(folds[_run_key(s)]) == most]
    _write_tables(dataset_dir, "table_folds", cv, "fold")
    recall = dataset_dir / "table_folds_recall_time.md"
    if cv:
        recall.write_text(recall_time_table([s for _, s in cv]) + "\n", encoding="utf-8")
    else:
        recall.unlink(missing_ok=True)
    for stale in dataset_dir.glob("table_fold[0-9]*.md"):
        stale.unlink()
    for fold in sorted({_fold(s) for _, s in untagged} - {1}):
        runs = [(f, s) for f, s in untagged if _fold(s) == fold]
        seeds: dict[tuple[str, str], set[int]] = {}
        for _, s in runs:
            seeds.setdefault((s["method"], s["recipe"]), set()).add(s["seed"])
        if max(len(v) for v in seeds.values()) > 1:
            _write_tables(dataset_dir, f"table_fold{fold}", runs, "seed")


def _write_tables(dataset_dir: Path, stem: str, runs: list[tuple[Path, dict[str, Any]]],
                  by: str) -> None:
    """``<stem>_last.md`` and ``<stem>_best.md``: the runs pooled, then method against method
    paired ``by`` seed or fold; a protocol no run has is removed, not written empty."""
    for protocol in ("last", "best"):
        target = dataset_dir / f"{stem}_{protocol}.md"
        if not runs or (protocol == "best" and not any(s.get("best_on_val") for _, s in runs)):
            target.unlink(missing_ok=True)
            continue
        paired = paired_table([s for _, s in runs], protocol, by=by)
        text = compare([f for f, _ in runs], protocol)
        target.write_text(text + ("\n\n" + paired if paired else "") + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", help="folder holding ham10000_200x150/ and aptos2019_128x128/")
    p.add_argument("--ham-dir")
    p.add_argument("--aptos-dir")
    p.add_argument("--datasets", nargs="+", default=["ham10000", "aptos"],
                   choices=("ham10000", "aptos", *OWN_DATASETS))
    p.add_argument("--data-dir", help="folder and csv: your images' folder (as train.py's)")
    p.add_argument("--csv", help="csv: the CSV of paths and labels")
    p.add_argument("--image-column")
    p.add_argument("--label-column")
    p.add_argument("--group-column")
    p.add_argument("--methods", nargs="+",
                   default=["baseline", "mt", "crd", "ccd", "crp", "crckd"])
    p.add_argument("--recipes", nargs="+", default=["paper"], choices=("paper", "released-code"))
    p.add_argument("--seeds", nargs="+", type=int, default=[2020])
    p.add_argument("--folds", "--fold", nargs="+", type=int, default=None,
                   choices=range(1, 6), metavar="FOLD",
                   help="APTOS folds to run (1..5; default 1); HAM10000 has one split; your "
                        "own data: 5-fold CV folds (default: the 70/10/20 split)")
    p.add_argument("--config", default=str(ROOT / "reference_training" / "configs" /
                                           "cpu_scale.json"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "reproduction"))
    p.add_argument("--collect", action="store_true", help="only collect finished runs")
    p.add_argument("--concurrent", type=int, default=1,
                   help="runs at once on the one device (default 1: one after another)")
    p.add_argument("--window", type=float,
                   help="seconds: stop the runs still going then (they resume next time)")
    p.add_argument("--pack", help="afterwards, write the runs folder (checkpoints, metrics) to "
                                  "this .tar for the next window")
    p.add_argument("--unpack", help="first, extract a --pack archive under --runs")
    p.add_argument("--throughput-out", help="write the throughput (images/s) as JSON here")
    p.add_argument("--plot-seed", type=int, default=2020)
    p.add_argument("--docs-out", default=str(DOCS_RUNS),
                   help="where --collect writes (default: the docs' folder)")
    args = p.parse_args(argv)
    if args.collect:
        collect(args)
        return
    root = Path(args.data_root) if args.data_root else None
    args.ham_dir = args.ham_dir or (root / "ham10000_200x150" if root else None)
    args.aptos_dir = args.aptos_dir or (root / "aptos2019_128x128" if root else None)
    for dataset in args.datasets:
        if dataset in OWN_DATASETS:
            if not args.data_dir or (dataset == "csv" and not args.csv):
                p.error(f"--datasets {dataset} needs --data-dir DIR"
                        + (" and --csv FILE" if dataset == "csv" else ""))
        elif (args.ham_dir if dataset == "ham10000" else args.aptos_dir) is None:
            p.error(f"--data-root or --{'ham' if dataset == 'ham10000' else 'aptos'}-dir needed")
    if args.unpack:
        print(f"unpacked {unpack(Path(args.unpack), Path(args.runs))} files", flush=True)
    if args.concurrent < 1:
        p.error("--concurrent must be at least 1")
    jobs = [run_command(args, dataset, method, recipe, seed, fold)
            for dataset in args.datasets for seed in args.seeds for recipe in args.recipes
            for fold in _grid_folds(args, dataset) for method in args.methods]
    for out, cmd in jobs:
        if cmd is None:
            print(f"[keep] {out}", flush=True)
    report = run_grid(jobs, args.concurrent, args.window)
    print(json.dumps(report, indent=1))
    if args.throughput_out:
        Path(args.throughput_out).write_text(json.dumps(report, indent=1) + "\n",
                                             encoding="utf-8")
    if args.pack:
        print(f"packed {pack(Path(args.runs), Path(args.pack))} files into {args.pack}")
    if report["failed"]:
        raise SystemExit(f"{len(report['failed'])} run(s) failed: see their .log files")

if __name__ == "__main__":
    main()
