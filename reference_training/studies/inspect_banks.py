"""What the memory banks of finished CRCKD runs hold: how far apart the class centroids are,
how sharp the CRP target is, and how the CCD negatives are drawn. Reads each run's ``last.pt``
(written by ``train.py``; the runs of ``reproduce.py`` keep it) and prints one markdown table::

    python reference_training/studies/inspect_banks.py runs/reproduction/aptos/crckd-paper-s2020 \\
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

With ``--images`` (the run's data must be readable, at the path in its config or
``--data-dir``), the run's teacher, network and head as saved, also embeds the training and
test images (no augmentation) and scores them against the bank's centroids, as CRP does:

- ``train NC`` / ``test NC``: nearest-centroid balanced accuracy of those embeddings; the gap
  between the two says how much of the class structure the teacher hands to CCD and CRP holds
  on images it did not train on.
- ``test CRP own``: the CRP target's mass on the true class, test images.

With ``--lesions``, it prints instead, per class of the run's training split, how often CCD's
class positives are another image of the anchor's own lesion (``group`` in ``split.csv``;
HAM10000 holds several images of many lesions, APTOS one per image):

- ``rows``: training images of the class.
- ``with a sibling``: share of them whose lesion has another training image.
- ``sibling positives``: expected number of such images among an anchor's ``P-1`` class
  positives (drawn uniformly from the class's rows), and that number in % of ``P-1``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crckd_losses import EmbeddingHead  # noqa: E402
from crckd_losses.functional import class_centroids  # noqa: E402
from reference_training import checkpoint, runfiles  # noqa: E402
from reference_training.metrics import class_mean  # noqa: E402


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
    separation, own_mass = nearest_centroid(memory, labels, centroids, tau)
    return {
        "rows/K": n / num_negatives,
        "with repl.": 1.0 if instance else float(
            ((n - counts[labels]) < num_negatives).double().mean()),
        "centroid cos": float(cos[pair].mean()),
        "nearest-centroid bal. acc.": separation,
        "CRP target on own class": own_mass,
    }


def nearest_centroid(embeddings: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                     tau: float) -> tuple[float, float]:
    """Balanced accuracy of assigning each (L2-normalised) embedding to its nearest centroid,
    and the softmax(embedding · centroidsᵀ / tau) mass on the true class, averaged per class
    and then over the classes present. A zero centroid (a class with no bank rows) is never
    chosen and gets no mass."""
    labels = labels.long()
    num_classes = centroids.shape[0]
    scores = embeddings.double() @ centroids.double().T
    scores[:, centroids.abs().sum(dim=1) == 0] = float("-inf")
    own = torch.softmax(scores / tau, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    return (class_mean(scores.argmax(1) == labels, labels, num_classes),
            class_mean(own, labels, num_classes))


def run_images(folder: Path, config: dict[str, Any], data_dir: str | None = None,
               ) -> tuple[Any, dict[str, Any], torch.Tensor]:
    """A finished run's records, its split (``folder/split.csv``) and all its images decoded at
    the run's size: ``(records, split, images [N, 3, S, S] uint8)``."""
    from reference_training import data as datamod

    records = datamod.read_config_dataset(config, data_dir)
    split = datamod.read_split(folder / runfiles.SPLIT, records)
    images = datamod.load_images(records, config["image_size"], config.get("cache_dir"), 0,
                                 False)
    return records, split, images


@torch.no_grad()
def embed_parts(folder: Path, state: dict[str, Any], data_dir: str | None,
                batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The run's teacher embeddings (network, then teacher head) of its training and test
    images, without augmentation: ``{part: (embeddings [n, d], labels [n])}``."""
    from reference_training.models import build_network

    config, crckd = checkpoint.config_of(state), checkpoint.crckd_state(state)
    records, split, images = run_images(folder, config, data_dir)
    network = build_network(config["model"], len(records.classes), config["feat_dim"])
    teacher = {k.removeprefix("module."): v for k, v in checkpoint.teacher_state(state).items()
               if k.startswith("module.")}
    network.load_state_dict(teacher)
    head = EmbeddingHead(config["feat_dim"], config["embed_dim"])
    head.load_state_dict({k.removeprefix("teacher_head."): v for k, v in crckd.items()
                          if k.startswith("teacher_head.")})
    network.eval()
    head.eval()
    from reference_training.engine import predict

    parts = {}
    for part in ("train", "test"):
        _, feats = predict(network, images[torch.as_tensor(split[part])], batch_size,
                           torch.device("cpu"))
        parts[part] = (head(feats), torch.as_tensor(records.labels[split[part]]))
    return parts


def inspect_run(folder: Path, images: bool = False, data_dir: str | None = None,
                ) -> dict[str, Any]:
    """Reads ``folder/last.pt`` and returns the row of the table for its teacher bank (and,
    with ``images``, for its teacher's embeddings of the training and test images)."""
    state = checkpoint.read(folder, " (only CCD/CRP runs that were kept have one)")
    config, crckd = checkpoint.config_of(state), checkpoint.crckd_state(state)
    if "teacher_bank.memory" not in crckd:
        raise SystemExit(f"{folder}: the run has no memory bank (method {config['method']})")
    memory, labels = crckd["teacher_bank.memory"], crckd["teacher_bank.labels"]
    num_classes = int(labels.max()) + 1
    summary = folder / runfiles.SUMMARY
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
    if images:
        centroids = class_centroids(memory.double(), labels, num_classes,
                                    relu=bool(config.get("centroid_relu", True)))
        parts = embed_parts(folder, state, data_dir)
        row["train NC"] = nearest_centroid(*parts["train"], centroids, tau)[0]
        row["test NC"], row["test CRP own"] = nearest_centroid(*parts["test"], centroids, tau)
    return row


def sibling_positives(split_csv: Path, num_positives: int) -> list[dict[str, Any]]:
    """Per class of the training part of ``split_csv`` (columns ``group``, ``label``,
    ``split``): the ``--lesions`` table's rows. The ``P-1`` class positives of an anchor are a
    uniform draw without replacement from its class's ``n_c`` rows (its own row among them),
    so each other image of its lesion is drawn with probability ``min(1, (P-1)/n_c)``."""
    import csv
    from collections import Counter

    with open(split_csv, newline="", encoding="utf-8") as f:
        train = [r for r in csv.DictReader(f) if r["split"] == "train"]
    per_group = Counter(r["group"] for r in train)
    per_class = Counter(r["label"] for r in train)
    rows = []
    for label in sorted(per_class):
        n = per_class[label]
        siblings = [per_group[r["group"]] - 1 for r in train if r["label"] == label]
        draw = min(1.0, (num_positives - 1) / n)
        expected = sum(siblings) * draw / n
        rows.append({"class": label, "rows": n,
                     "with a sibling": sum(1 for k in siblings if k > 0) / n,
                     "sibling positives": expected,
                     "% of P-1": 100 * expected / max(num_positives - 1, 1)})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """``rows`` as one markdown table, floats to two decimals."""
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders holding last.pt")
    p.add_argument("--images", action="store_true",
                   help="also embed the training and test images with the run's teacher")
    p.add_argument("--data-dir", help="the dataset's folder, if not the one in the run's config")
    p.add_argument("--lesions", action="store_true",
                   help="instead: per class, how often CCD's positives share the anchor's lesion")
    args = p.parse_args(argv)
    if args.lesions:
        for folder in args.runs:
            config = json.loads((Path(folder) / runfiles.CONFIG).read_text(encoding="utf-8"))
            print(f"{folder} (P = {config['num_positives']}):\n")
            print_table(sibling_positives(Path(folder) / runfiles.SPLIT,
                                           int(config["num_positives"])))
        return
    print_table([inspect_run(Path(folder), args.images, args.data_dir)
                  for folder in args.runs])


if __name__ == "__main__":
    main()
