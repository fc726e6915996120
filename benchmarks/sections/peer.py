"""Label-aware contrast against a memory: the library's CCD step against
pytorch-metric-learning's ``CrossBatchMemory(SupConLoss)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from crckd_losses import MomentumMemoryBank, functional

from .common import PAPER, Bar, Bench, Section, bar, params, ratio, table


def run_peer(bench: Bench) -> dict[str, Any]:
    """Label-aware contrast against a memory: the library's CCD step against PML's.

    PML's ``CrossBatchMemory(SupConLoss)`` contrasts each embedding with every memory entry
    (all ``B x M`` pairs) and enqueues the batch. The library's contender is one CCD direction
    as a training step uses it: class-guided sampling of ``P+K`` rows, scoring, backward and
    the bank's momentum update. The two compute different losses (no value check); they do the
    same job at matched ``B``, ``d`` and memory size.
    """
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        bench.skipped.append("peer: pytorch-metric-learning is not installed")
        return {"skipped": "pytorch-metric-learning is not installed"}
    p = dict(PAPER)
    sizes = (1000,) if bench.quick else (PAPER["N"], 30_000)
    if bench.quick:
        p.update(B=16, K=256)
    points = [_peer_point(bench, p, size) for size in sizes]
    return {"params": p, "points": points}


def _peer_point(bench: Bench, p: dict[str, Any], size: int) -> dict[str, Any]:
    from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss

    dev = bench.device
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, p["C"], (size,), generator=g).to(dev)
    bank_s = MomentumMemoryBank(labels, dim=p["d"], copy_on_write=False).to(dev)
    bank_t = MomentumMemoryBank(labels, dim=p["d"], copy_on_write=False).to(dev)
    emb = torch.randn(p["B"], p["d"], generator=g).to(dev).requires_grad_()
    batch_idx = torch.randperm(size, generator=g)[: p["B"]].to(dev)
    batch_labels = labels[batch_idx]
    noise = p["K"] / size

    def library_step() -> None:
        rows = bank_s.sample(batch_idx, p["P"], p["K"])
        anchor = F.normalize(emb, dim=1)
        scores = functional.contrastive_scores(anchor, bank_t.memory, rows, p["tau"])
        loss = functional.nce_loss(scores, 1.0, noise, p["P"])
        loss.backward()
        bank_s.update(batch_idx, anchor.detach())
        emb.grad = None

    pml = CrossBatchMemory(SupConLoss(temperature=p["tau"]), p["d"], memory_size=size).to(dev)
    with torch.no_grad():
        for start in range(0, size, p["B"]):
            fill = torch.randn(min(p["B"], size - start), p["d"], generator=g).to(dev)
            pml(F.normalize(fill, dim=1), labels[start : start + fill.shape[0]])

    def pml_step() -> None:
        loss = pml(F.normalize(emb, dim=1), batch_labels)
        loss.backward()
        emb.grad = None

    rows = bench.compare({"library CCD step": library_step, "PML SupCon+CrossBatchMemory":
                          pml_step}, samples=p["B"])
    return {"memory_size": size, "rows": rows}


class Peer(Section):
    """The library's CCD step against PML's SupCon with a cross-batch memory."""

    name = "peer"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_peer(bench)

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        if "points" not in result:
            return []
        s = result
        md = ["## Peer: pytorch-metric-learning SupConLoss + CrossBatchMemory", "",
              "One step of label-aware contrast against a memory of the given size "
              f"(`{params(s['params'])}`). The library step: class-guided sampling of P+K rows, "
              "scores, NCE, backward, momentum bank update (one direction). PML: SupCon over all "
              "B x M pairs, backward, enqueue. Different losses for the same job; no value "
              "check.", ""]
        for p in s["points"]:
            md += [f"memory size {p['memory_size']}:", ""]
            md += table(p["rows"], "PML SupCon+CrossBatchMemory") + [""]
        return md

    def bars(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Bar]:
        out: list[Bar] = []
        for p in result.get("points", []):
            out += bar(f"CCD step vs PML SupCon+XBM (M={p['memory_size']})",
                       ratio(p["rows"], "PML SupCon+CrossBatchMemory", "library CCD step"), None)
        return out


SECTION = Peer()
