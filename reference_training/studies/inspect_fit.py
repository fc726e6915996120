"""How much better each finished run's student does on its training images than on unseen test
images, for any method (the control for ``inspect_banks.py --images``, which needs a bank).
Reads each run's ``last.pt`` (written by ``train.py``; the runs of ``reproduce.py`` keep it)
and prints one markdown table::

    python reference_training/studies/inspect_fit.py \\
        runs/reproduction/ham10000/{baseline,mt,crckd}-paper-s2020

The student (the network every test metric is taken from) scores the training and the test
images of the run's split, without augmentation. Columns:

- ``train bal. acc.`` / ``test bal. acc.``: balanced accuracy of the classifier's argmax.
- ``train NC`` / ``test NC``: nearest-centroid balanced accuracy in the student's feature
  space ``f`` (the input of the classifier and of the CCD/CRP heads), L2-normalised, with the
  class centroids taken from the training images. The same measure ``inspect_banks.py`` takes
  on the teacher's embedding, here available for runs without a bank.
- ``gap``: train minus test, for each of the two.

The run's data must be readable, at the path in its config or ``--data-dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crckd_losses.functional import class_centroids  # noqa: E402
from reference_training import checkpoint  # noqa: E402
from reference_training.metrics import class_mean  # noqa: E402
from reference_training.studies.inspect_banks import (  # noqa: E402
    nearest_centroid,
    print_table,
    run_images,
)


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Recall per class, averaged over the classes present in ``labels``."""
    return class_mean(predicted.long() == labels.long(), labels, num_classes)


def fit_scores(train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               num_classes: int) -> dict[str, float]:
    """The table's numbers from ``(logits [n, C], features [n, d], labels [n])`` of the
    training and the test images."""
    centroids = class_centroids(F.normalize(train[1].double(), dim=1), train[2], num_classes,
                                relu=False)
    row: dict[str, float] = {}
    for part, (logits, _, labels) in (("train", train), ("test", test)):
        row[f"{part} bal. acc."] = balanced_accuracy(logits.argmax(1), labels, num_classes)
    row["bal. acc. gap"] = row["train bal. acc."] - row["test bal. acc."]
    for part, (_, feats, labels) in (("train", train), ("test", test)):
        # tau only sets the CRP-style mass, which this table does not show
        row[f"{part} NC"] = nearest_centroid(F.normalize(feats.double(), dim=1), labels,
                                             centroids, tau=1.0)[0]
    row["NC gap"] = row["train NC"] - row["test NC"]
    return row


@torch.no_grad()
def score_parts(folder: Path, state: dict[str, Any], data_dir: str | None = None,
                batch_size: int = 256,
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """The run's student (as saved) on its training and test images, without augmentation:
    ``({part: (probabilities, features, labels)}, num_classes)``."""
    from reference_training.models import build_network

    config = checkpoint.config_of(state)
    records, split, images = run_images(folder, config, data_dir)
    num_classes = len(records.classes)
    network = build_network(config["model"], num_classes, config["feat_dim"])
    network.load_state_dict(checkpoint.student_state(state))
    network.eval()
    from reference_training.engine import predict

    parts = {}
    for part in ("train", "test"):
        # probabilities stand for the logits: the table only reads their argmax
        probs, feats = predict(network, images[torch.as_tensor(split[part])], batch_size,
                               torch.device("cpu"))
        parts[part] = (probs, feats, torch.as_tensor(records.labels[split[part]]))
    return parts, num_classes


def inspect_run(folder: Path, data_dir: str | None = None) -> dict[str, Any]:
    """Reads ``folder/last.pt`` and returns the run's row of the table."""
    state = checkpoint.read(folder)
    parts, num_classes = score_parts(folder, state, data_dir)
    row: dict[str, Any] = {"run": f"{checkpoint.config_of(state)['dataset']} / {folder.name}"}
    row.update(fit_scores(parts["train"], parts["test"], num_classes))
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders holding last.pt")
    p.add_argument("--data-dir", help="the dataset's folder, if not the one in the run's config")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for folder in args.runs:
        rows.append(inspect_run(Path(folder), args.data_dir))
        print(f"[done] {folder}", file=sys.stderr, flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
