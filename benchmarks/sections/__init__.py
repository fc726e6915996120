"""The benchmark sections, one module each, and their registry.

Each module defines one :class:`~benchmarks.sections.common.Section` (``SECTION``) that owns its
run, its targets, its markdown and its plots. :data:`REGISTRY` lists them in the order they
run and appear in the report; ``benchmarks/run.py`` and ``benchmarks/report.py`` only iterate
it.
"""

from __future__ import annotations

from . import bank, ccd, crossover, crp, ema, ops, peer, sampling, sweeps, train
from .common import Bench, Section

REGISTRY: tuple[Section, ...] = (
    ccd.SECTION,
    sweeps.SECTION,
    crossover.SECTION,
    peer.SECTION,
    crp.SECTION,
    sampling.SECTION,
    bank.SECTION,
    ema.SECTION,
    train.SECTION,
    ops.SECTION,
)

#: name -> section, in :data:`REGISTRY` order.
SECTIONS: dict[str, Section] = {s.name: s for s in REGISTRY}

__all__ = ["REGISTRY", "SECTIONS", "Bench", "Section"]
