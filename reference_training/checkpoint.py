"""The training checkpoint: the one place that writes and reads its keys.

``last.pt`` holds everything a resumed run needs to continue bit for bit: the student, the
mean teacher, the CRCKD heads, banks and ``Z``, the optimiser, scheduler and grad scaler, the
random states, and the run's history so far. ``best.pt`` holds the student at the best
validation epoch. Both are written atomically (:func:`reference_training.runfiles.atomic_write`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import runfiles

FORMAT = 1


@dataclass
class Progress:
    """Where a run stands and what it has logged: the parts of a checkpoint that are not
    module state. ``epoch`` epochs are done and ``step`` steps of the next one."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    meters: dict[str, float] = field(default_factory=dict)
    best_score: float = -float("inf")
    # Kept out of metrics.csv, which must not depend on timing or on where a run resumed, but
    # here, so that a resumed run's summary still covers every epoch.
    test_recalls: dict[int, list[float]] = field(default_factory=dict)
    epoch_seconds: list[float] = field(default_factory=list)


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["sampler"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"])


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path``, atomically."""
    runfiles.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_last(folder: Path, config: dict[str, Any], progress: Progress, *,
              student: torch.nn.Module, teacher: torch.nn.Module | None,
              crckd: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
              scheduler: Any, scaler: Any, generator: torch.Generator | None) -> None:
    """Writes ``folder/last.pt``."""
    save_torch({
        "format": FORMAT, "epoch": progress.epoch, "step": progress.step, "config": config,
        "student": student.state_dict(),
        "teacher": teacher.state_dict() if teacher is not None else None,
        "crckd": crckd.state_dict() if crckd is not None else None,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": rng_state(generator),
        "history": progress.history, "meters": progress.meters,
        "best_score": progress.best_score, "test_recalls": progress.test_recalls,
        "epoch_seconds": progress.epoch_seconds,
    }, Path(folder) / runfiles.LAST_CHECKPOINT)


def save_best(folder: Path, config: dict[str, Any], student: torch.nn.Module,
              epoch: int) -> None:
    """Writes ``folder/best.pt``: the student after ``epoch`` (1-based) epochs."""
    save_torch({"student": student.state_dict(), "epoch": epoch, "config": config},
               Path(folder) / runfiles.BEST_CHECKPOINT)


def read(folder: Path, what: str = "") -> dict[str, Any]:
    """``folder/last.pt`` as saved (on the CPU). ``what`` names the caller's need in the
    error when the file is missing."""
    path = Path(folder) / runfiles.LAST_CHECKPOINT
    if not path.is_file():
        raise SystemExit(f"{folder}: no {runfiles.LAST_CHECKPOINT}{what}")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_last(folder: Path, *, student: torch.nn.Module, teacher: torch.nn.Module | None,
              crckd: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
              scheduler: Any, scaler: Any, generator: torch.Generator | None) -> Progress:
    """Restores every module and random state from ``folder/last.pt``; returns the progress."""
    state = torch.load(Path(folder) / runfiles.LAST_CHECKPOINT, map_location="cpu",
                       weights_only=True)
    student.load_state_dict(state["student"])
    if teacher is not None:
        teacher.load_state_dict(state["teacher"])
    if crckd is not None:
        crckd.load_state_dict(state["crckd"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], generator)
    return Progress(
        epoch=int(state["epoch"]), step=int(state["step"]), history=list(state["history"]),
        meters=dict(state["meters"]), best_score=float(state["best_score"]),
        # Older checkpoints lack these two; the summary then covers this session's epochs.
        test_recalls={int(e): list(r) for e, r in state.get("test_recalls", {}).items()},
        epoch_seconds=list(state.get("epoch_seconds", [])),
    )


def student_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return state["student"]


def teacher_state(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    return state.get("teacher")


def crckd_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The CRCKD heads, banks and ``Z`` (empty for a method without them)."""
    return state.get("crckd") or {}


def config_of(state: dict[str, Any]) -> dict[str, Any]:
    return state["config"]
