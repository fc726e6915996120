"""What the memory banks of finished CRCKD runs hold: how far apart the class centroids are,
how sharp the CRP target is, and how the CCD negatives are drawn. Reads each run's ``last.pt``
(written by ``train.py``; the runs of ``reproduce.py`` keep it) and prints one markdown table::

    python reference_training/inspect_banks.py runs/reproduction/aptos/crckd-paper-s2020 \\
        runs/reproduction/ham10000/crckd-paper-s2020

Columns, for the teacher bank ``M_T`` (the side CRP takes its target from) at the end of the
run, with ``tau`` and ``K`` of the run:

- ``rows/K``: bank rows over negatives per anchor; below 1 every anchor draws its negatives
  with replacement.
- ``with repl.``: share of anchors (bank rows) whose class leaves fewer than ``K`` rows of
  other classes, so that their negatives repeat. CRD's instance-level negatives are always
  drawn with replacement (1.00).
- ``centroid cos``: mean cosine between two different class centroids (ReLU, as in the loss).
- ``nearest-centroid bal. acc.``: each bank row assigned to its nearest centroid, recall per
  class, averaged over classes: how well the bank separates the classes.
- ``CRP target on own class``: softmax(row · centroidsᵀ / tau) of each bank row, the mass on
  its own class, averaged per class and then over classes. The bank row stands in for the
  teacher embedding it was built from.
- ``log Z``: the two frozen NCE normalisers (student-anchored, teacher-anchored).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crckd_losses.functional import class_centroids  # noqa: E402


def bank_stats(memory: torch.Tensor, labels: torch.Tensor, num_classes: int, tau: float,
               num_negatives: int, relu: bool = True, instance: bool = False,
               ) -> dict[str, float]:
    """The table's numbers for one bank (``memory`` ``[N, d]``, ``labels`` ``[N]``);
    ``instance``: the run drew CRD's negatives (any class, always with replacement)."""
    memory = memory.double()
    labels = labels.long()
    n = memory.shape[0]
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    centroids = class_centroids(memory, labels, num_classes, relu=relu)
    cos = centroids @ centroids.T
    pair = present.unsqueeze(0) & present.unsqueeze(1) & ~torch.eye(num_classes, dtype=torch.bool)
    scores = memory @ centroids.T  # [N, C]
    scores[:, ~present] = float("-inf")
    nearest = scores.argmax(dim=1)
    own_mass = torch.softmax(scores / tau, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    recall = torch.zeros(num_classes, dtype=torch.float64)
    mass = torch.zeros(num_classes, dtype=torch.float64)
    recall.index_add_(0, labels, (nearest == labels).double())
    mass.index_add_(0, labels, own_mass)
    k = present.sum()
    return {
        "rows/K": n / num_negatives,
        "with repl.": 1.0 if instance else float(
            ((n - counts[labels]) < num_negatives).double().mean()),
        "centroid cos": float(cos[pair].mean()),
        "nearest-centroid bal. acc.": float((recall[present] / counts[present]).sum() / k),
        "CRP target on own class": float((mass[present] / counts[present]).sum() / k),
    }


def inspect_run(folder: Path) -> dict[str, Any]:
    """Reads ``folder/last.pt`` and returns the row of the table for its teacher bank."""
    path = folder / "last.pt"
    if not path.is_file():
        raise SystemExit(f"{folder}: no last.pt (only CCD/CRP runs that were kept have one)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config, crckd = state["config"], state.get("crckd") or {}
    if "teacher_bank.memory" not in crckd:
        raise SystemExit(f"{folder}: the run has no memory bank (method {config['method']})")
    memory, labels = crckd["teacher_bank.memory"], crckd["teacher_bank.labels"]
    num_classes = int(crckd["teacher_bank.class_sums"].shape[1])
    summary = folder / "summary.json"
    # the K the run used (summary.json holds it after any cap to a fraction of the bank)
    k = int((json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {})
            .get("num_negatives") or config["num_negatives"])
    tau = float(config.get("temperature") or 0.07)
    row: dict[str, Any] = {"run": f"{config['dataset']} / {folder.name}", "rows": len(labels)}
    row.update(bank_stats(memory, labels, num_classes, tau, k,
                          bool(config.get("centroid_relu", True)),
                          config.get("contrast") == "instance"))
    log_z = crckd.get("ccd.log_normalizer")
    row["log Z"] = " / ".join(f"{v:.1f}" for v in log_z.tolist()) if log_z is not None else "n/a"
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders holding last.pt")
    args = p.parse_args(argv)
    rows = [inspect_run(Path(folder)) for folder in args.runs]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
