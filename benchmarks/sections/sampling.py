"""Class-guided sampling of ``[B, P+K]`` indices: the library's samplers against numpy, after
checking that every sampler has method §4's structure and uniform marginals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from crckd_losses import MomentumMemoryBank

from .. import references
from .common import PAPER, Bar, Bench, Section, Target, bar, fmt, params, ratio, table, target


def check_sampling_structure(
    rows: np.ndarray, anchors: np.ndarray, labels: np.ndarray, num_positives: int
) -> None:
    """Asserts method §4's shape of a sampled index matrix.

    Column 0 is the anchor; columns ``1..P-1`` share its class; the rest do not; each part is
    free of repeats wherever its pool is large enough.
    """
    counts = np.bincount(labels)
    for r, i in zip(rows, anchors):
        y = labels[i]
        if r[0] != i:
            raise AssertionError("column 0 is not the anchor's own row")
        pos, neg = r[1:num_positives], r[num_positives:]
        if not (labels[pos] == y).all():
            raise AssertionError("a positive has another class")
        if (labels[neg] == y).any():
            raise AssertionError("a negative has the anchor's class")
        if counts[y] >= len(pos) and len(np.unique(pos)) != len(pos):
            raise AssertionError("positives repeat although the class has enough rows")
        if len(labels) - counts[y] >= len(neg) and len(np.unique(neg)) != len(neg):
            raise AssertionError("negatives repeat although enough other rows exist")


def sampling_uniformity(
    draw: Callable[[], np.ndarray],
    anchors: np.ndarray,
    labels: np.ndarray,
    num_positives: int,
    draws: int,
) -> dict[str, float]:
    """Chi-square per degree of freedom of how often each row is drawn, per anchor and part.

    Under the method's distribution every row of the anchor's class (positives) and every row of the
    other classes (negatives) is equally likely, so both statistics are close to 1.

    Returns:
        ``{"positives": chi2/dof, "negatives": chi2/dof}`` averaged over anchors.
    """
    n = len(labels)
    pos_counts = np.zeros((len(anchors), n))
    neg_counts = np.zeros((len(anchors), n))
    for _ in range(draws):
        rows = draw()
        for a in range(len(anchors)):
            np.add.at(pos_counts[a], rows[a, 1:num_positives], 1)
            np.add.at(neg_counts[a], rows[a, num_positives:], 1)
    stats: dict[str, list[float]] = {"positives": [], "negatives": []}
    for a, i in enumerate(anchors):
        same = labels == labels[i]
        parts = (("positives", pos_counts, same), ("negatives", neg_counts, ~same))
        for part, counts, mask in parts:
            observed = counts[a][mask]
            expected = observed.sum() / mask.sum()
            chi2 = ((observed - expected) ** 2 / expected).sum()
            stats[part].append(chi2 / max(mask.sum() - 1, 1))
    return {k: float(np.mean(v)) for k, v in stats.items()}


def check_sampling(device: torch.device, draws: int = 400) -> dict[str, Any]:
    """Library samplers and the numpy reference: same structure, uniform marginals."""
    rng = np.random.default_rng(0)
    labels_np = np.concatenate([np.arange(4), rng.integers(0, 4, 196)])
    legacy = np.random.RandomState(0)
    labels = torch.as_tensor(labels_np).to(device)
    bank = MomentumMemoryBank(labels, dim=4).to(device)
    anchors_np = np.array([0, 1, 2, 3, 50, 120])
    anchors = torch.as_tensor(anchors_np).to(device)
    p, k = 6, 40
    same, other = references.class_index_lists(labels_np, 4)
    gen = torch.Generator(device=device).manual_seed(0)
    drawers: dict[str, Callable[[], np.ndarray]] = {
        "library shuffle": lambda: bank.sample(anchors, p, k, gen, "shuffle").cpu().numpy(),
        "library independent": lambda: bank.sample(anchors, p, k, gen, "independent")
        .cpu()
        .numpy(),
        "numpy reference": lambda: references.numpy_sample(
            anchors_np, labels_np, same, other, p, k, legacy
        ),
        "numpy Generator.choice": lambda: references.numpy_sample(
            anchors_np, labels_np, same, other, p, k, rng
        ),
    }
    result = {}
    for name, draw in drawers.items():
        check_sampling_structure(draw(), anchors_np, labels_np, p)
        stats = sampling_uniformity(draw, anchors_np, labels_np, p, draws)
        for part, value in stats.items():
            if not 0.5 < value < 1.6:
                raise AssertionError(f"{name} {part}: chi2/dof {value:.2f}, not uniform")
        result[name] = stats
    return result


def run_sampling(bench: Bench) -> dict[str, Any]:
    """Class-guided sampling of ``[B, P+K]`` indices: library samplers against numpy."""
    checks = check_sampling(bench.device, draws=60 if bench.quick else 400)
    cases = [dict(PAPER, B=16, K=256, N=1000)] if bench.quick else [
        dict(PAPER), dict(PAPER, C=5, N=3662, K=2048), dict(PAPER, B=512),
        dict(PAPER, N=100_000)
    ]
    points = [_sampling_point(bench, q) for q in cases]
    return {"uniformity_chi2_per_dof": checks, "points": points}


def _sampling_point(bench: Bench, q: dict[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    labels = torch.cat([torch.arange(q["C"]),
                        torch.randint(0, q["C"], (q["N"] - q["C"],), generator=g)])
    labels_np = labels.numpy()
    bank = MomentumMemoryBank(labels.to(bench.device), dim=4).to(bench.device)
    anchors = torch.randperm(q["N"], generator=g)[: q["B"]]
    anchors_dev, anchors_np = anchors.to(bench.device), anchors.numpy()
    same, other = references.class_index_lists(labels_np, q["C"])
    legacy, modern = np.random.RandomState(0), np.random.default_rng(0)
    fns = {
        "library shuffle": lambda: bank.sample(anchors_dev, q["P"], q["K"],
                                               sampler="shuffle"),
        "library independent": lambda: bank.sample(anchors_dev, q["P"], q["K"],
                                                   sampler="independent"),
        "numpy reference": lambda: torch.from_numpy(references.numpy_sample(
            anchors_np, labels_np, same, other, q["P"], q["K"], legacy)).to(bench.device),
        "numpy Generator.choice": lambda: torch.from_numpy(references.numpy_sample(
            anchors_np, labels_np, same, other, q["P"], q["K"], modern)).to(bench.device),
    }
    rows = bench.compare(fns, samples=q["B"],
                         no_memory=("numpy reference", "numpy Generator.choice"))
    return {"params": q, "rows": rows}


SAMPLING = "Class-guided sampling: numpy per-anchor / library >= 50"


class Sampling(Section):
    """Class-guided sampling."""

    name = "sampling"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_sampling(bench)

    def targets(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Target]:
        rows = result["points"][0]["rows"]
        shuffle = ratio(rows, "numpy reference", "library shuffle")
        independent = ratio(rows, "numpy reference", "library independent")
        gen = ratio(rows, "numpy Generator.choice", "library shuffle")
        gen_ind = ratio(rows, "numpy Generator.choice", "library independent")
        return [target("sampling", SAMPLING, independent, 50,
                       detail=f"np.random.choice reference: shuffle {fmt(shuffle)}x, independent "
                       f"{fmt(independent)}x (value: independent, the default); against "
                       f"numpy Generator.choice: shuffle {fmt(gen)}x, independent "
                       f"{fmt(gen_ind)}x")]

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        s = result
        md = ["## Class-guided sampling", "",
              "`[B, P+K]` indices. Reference: `np.random.choice` (a `RandomState`, as CRD and the "
              "released code) per anchor from per-class index lists built once; also numpy's "
              "newer `Generator.choice`, which avoids a full permutation per draw (numpy "
              "memory is not seen by the tracker). Uniformity check "
              "(chi-square per degree of freedom of row frequencies, ~1 when uniform): "
              + ", ".join(f"{k}: pos {fmt(v['positives'])}, neg {fmt(v['negatives'])}"
                          for k, v in s["uniformity_chi2_per_dof"].items()), ""]
        for p in s["points"]:
            md += [f"`{params(p['params'])}`:", ""]
            md += table(p["rows"], "numpy reference", "anchors/s") + [""]
        return md

    def bars(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Bar]:
        p = result["points"][0]
        out: list[Bar] = []
        for mode in ("shuffle", "independent"):
            out += bar(f"sampling ({mode}) vs numpy",
                       ratio(p["rows"], "numpy reference", f"library {mode}"), 50)
        return out


SECTION = Sampling()
