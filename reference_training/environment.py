"""``environment.json``: what made a run's numbers, one entry per session (a resumed run adds
one): the library's version and git commit (with a dirty flag, where the code is a
checkout), torch, CUDA and the device, Python, the command line, and the start and end times.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import runfiles

#: The fields that can change a run's numbers; compare.py notes a row whose runs differ in them.
COMPARED = ("crckd_losses", "crckd_losses_git", "torch", "cuda", "device")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def git_state(folder: Path) -> str | None:
    """``"<commit>"`` or ``"<commit> (dirty)"`` for a git checkout at ``folder`` (tracked
    files changed), ``None`` elsewhere (an installed package) or without git."""
    if not (folder / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                                  text=True, timeout=20, check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" (dirty)" if dirty else "")


def describe(device: torch.device, command: list[str] | None = None) -> dict[str, Any]:
    """This session's environment (without its times); ``command`` defaults to
    ``sys.argv``."""
    import crckd_losses

    library = Path(crckd_losses.__file__).resolve().parents[1]
    training = Path(__file__).resolve().parents[1]
    info: dict[str, Any] = {
        "crckd_losses": crckd_losses.__version__,
        "crckd_losses_git": git_state(library),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{device.type} ({platform.processor() or platform.machine()})"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": shlex.join(command or ["python", *sys.argv]),
    }
    if training != library:  # the training code from another checkout than the library
        info["reference_training_git"] = git_state(training)
    return info


def begin(folder: Path, device: torch.device, command: list[str] | None = None) -> None:
    """Adds this session to ``folder/environment.json``."""
    path = Path(folder) / runfiles.ENVIRONMENT
    sessions = runfiles.read_json(path)["sessions"] if path.is_file() else []
    sessions.append({**describe(device, command), "started": _now(), "ended": None,
                     "outcome": None})
    runfiles.write_json({"sessions": sessions}, path)


def end(folder: Path, outcome: str) -> None:
    """Writes the end time and ``outcome`` (``"finished"``, ``"interrupted"``, or the error)
    into this session's entry."""
    path = Path(folder) / runfiles.ENVIRONMENT
    if not path.is_file():
        return
    data = runfiles.read_json(path)
    data["sessions"][-1].update({"ended": _now(), "outcome": outcome})
    runfiles.write_json(data, path)


def compared(folder: Path) -> dict[str, set[str]]:
    """Each :data:`COMPARED` field's values over a run's sessions (``"unknown"`` for a run
    without ``environment.json``, e.g. one from an older version)."""
    path = Path(folder) / runfiles.ENVIRONMENT
    sessions = runfiles.read_json(path)["sessions"] if path.is_file() else [{}]
    return {key: {str(s.get(key, "unknown")) for s in sessions} for key in COMPARED}
