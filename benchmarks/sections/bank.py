"""``MomentumMemoryBank.update`` with ``copy_on_write`` on (the default) and off."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from crckd_losses import MomentumMemoryBank

from .common import PAPER, Bench, Section, table


def run_bank(bench: Bench) -> dict[str, Any]:
    """``MomentumMemoryBank.update`` with ``copy_on_write`` on (default) and off."""
    sizes = (1000,) if bench.quick else (PAPER["N"], 100_000, 1_000_000)
    batch = 16 if bench.quick else PAPER["B"]
    points = []
    for n in sizes:
        g = torch.Generator().manual_seed(3)
        labels = torch.randint(0, PAPER["C"], (n,), generator=g).to(bench.device)
        banks = {
            cow: MomentumMemoryBank(labels, dim=PAPER["d"], copy_on_write=cow).to(bench.device)
            for cow in (True, False)
        }
        idx = torch.randperm(n, generator=g)[:batch].to(bench.device)
        feats = F.normalize(torch.randn(batch, PAPER["d"], generator=g), dim=1).to(bench.device)
        fns = {
            f"copy_on_write={cow}": (lambda b=b, i=idx, f=feats: b.update(i, f))
            for cow, b in banks.items()
        }
        rows = bench.compare(fns, samples=batch)
        points.append({"N": n, "B": batch, "d": PAPER["d"], "rows": rows})
    return {"points": points}


class Bank(Section):
    """The bank update."""

    name = "bank"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_bank(bench)

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        md = ["## Bank update", "", "`MomentumMemoryBank.update` of B rows.", ""]
        for p in result["points"]:
            md += [f"N={p['N']}, B={p['B']}, d={p['d']}:", ""]
            md += table(p["rows"], "copy_on_write=False", "rows/s") + [""]
        return md


SECTION = Bank()
