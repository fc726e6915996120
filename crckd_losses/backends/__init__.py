"""Backends: faster ways to compute the same maths as :mod:`crckd_losses.functional`, chosen by
one switch, ``backend=``, on :class:`~crckd_losses.CRCKDLoss` and
:class:`~crckd_losses.ClassGuidedContrastiveLoss`.

========== ==================================================================================
backend    what it runs
========== ==================================================================================
auto       the fastest backend that has run on the tensors' kind of device (see below)
reference  :func:`crckd_losses.functional.class_guided_contrastive_loss`, as written
dense      general operators: one ``B x N`` product per direction, then a gather
gather     general operators: the ``B x (P+K) x d`` sampled rows, for very large banks
compiled   the module's step compiled with inductor (``torch.compile``), general operators
triton     hand-written Triton kernels for CCD (CUDA; never run on a GPU yet)
========== ==================================================================================

Every backend gives the reference's values to float rounding, with every option of the
modules (the tests check each one against :mod:`~crckd_losses.functional` in float64).
``"auto"`` picks among the backends whose :data:`STATUS` records a run on that kind of
device: on a CUDA device with Triton installed and in one process, ``"compiled"`` for
:class:`~crckd_losses.CRCKDLoss`; otherwise ``"dense"`` while ``N <= DENSE_PATH_FACTOR *
(P+K)`` and ``"gather"`` past it (:func:`~crckd_losses.backends.general.choose_score_path`).
A backend that has never run on a GPU is used there only when asked for by name.

The training step's CUDA graphs are not a backend but a wrapper,
:func:`crckd_losses.backends.cuda_graphs.graph_crckd_loss`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch

from .. import distributed
from ..functional import contrastive_scores, nce_loss
from . import general, triton
from .general import DENSE_PATH_FACTOR, LogNormalizer, choose_score_path

Backend = Literal["auto", "reference", "dense", "gather", "compiled", "triton"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)


class Run(NamedTuple):
    """One recorded run of a backend on a kind of device.

    Attributes:
        device: the device, as its maker names it.
        commit: the commit of this repository that ran.
        date: the day of the run.
        result: what was measured, with the file that holds it.
    """

    device: str
    commit: str
    date: str
    result: str


_H200 = ("NVIDIA H200", "c2c0dd3", "2026-11-30")
_H200_FILE = "benchmarks/results/cuda-nvidia-h200.md"

#: Where each backend (and the CUDA-graph wrapper, ``"cuda_graphs"``) has run, by device
#: type. ``"auto"`` reads it: it never picks a backend without a run on that device type. The
#: GPU how-to page shows it as a table (:func:`status_table`).
STATUS: dict[str, dict[str, tuple[Run, ...]]] = {
    "reference": {"cpu": (Run("CPU", "every commit", "-", "the test suite"),)},
    "dense": {
        "cpu": (Run("CPU", "every commit", "-", "the test suite"),),
        "cuda": (Run(*_H200, f"CCD at the paper's sizes 1.07 ms, fwd+bwd, float32 "
                             f"({_H200_FILE})"),),
    },
    "gather": {
        "cpu": (Run("CPU", "every commit", "-", "the test suite"),),
        "cuda": (Run(*_H200, f"CCD at the paper's sizes 1.57 ms, fwd+bwd, float32 "
                             f"({_H200_FILE})"),),
    },
    "compiled": {
        "cpu": (Run("CPU", "every commit", "-", "the test suite"),),
        "cuda": (Run(*_H200, f"CRCKD step 79 kernels instead of 136, CRCKD over MT "
                             f"+25.4 % ({_H200_FILE})"),),
    },
    "triton": {"cpu": (Run("CPU", "every commit", "-",
                           "the test suite, in Triton's interpreter only"),)},
    "cuda_graphs": {"cpu": (Run("CPU", "every commit", "-",
                                "the test suite, with a host-side stand-in for the graphs"),)},
}


def has_run_on(name: str, device_type: str) -> bool:
    """Whether :data:`STATUS` records a run of ``name`` on ``device_type``."""
    return bool(STATUS[name].get(device_type))


def status_table() -> str:
    """:data:`STATUS` as an RST list-table (the one on the GPU how-to page), one row per
    backend: its GPU runs (device, commit, date, result) or "never run on a GPU"."""
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 14 86", "",
             "   * - backend", "     - on a GPU"]
    for name, runs in STATUS.items():
        gpu = "; ".join(f"{r.device}, commit {r.commit}, {r.date}: {r.result}"
                        for r in runs.get("cuda", ()))
        lines += [f"   * - ``{name}``", f"     - {gpu or 'never run on a GPU'}"]
    return "\n".join(lines)


def check_backend(value: object) -> Backend:
    """``value`` must be one of :data:`BACKENDS`."""
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
    return value


def compiles(backend: Backend, device: torch.device, step: bool) -> bool:
    """Whether a module's step runs compiled: ``"compiled"`` always; ``"auto"`` for a whole
    CRCKD ``step`` on a device type where the compiled step has run, with Triton installed
    (inductor's GPU kernels are Triton's), in one process."""
    if backend == "compiled":
        return True
    return (backend == "auto" and step and has_run_on("compiled", device.type)
            and device.type == "cuda" and triton.available() and distributed.world_size() == 1)


def ccd_pair(backend: Backend, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
             student_memory: torch.Tensor, teacher_memory: torch.Tensor,
             sample_indices: torch.Tensor, num_positives: int, temperature: float,
             log_normalizer: LogNormalizer, reduction: str) -> torch.Tensor:
    """Both CCD directions from checked arguments on ``backend``: ``[2]`` (:math:`L_S, L_T`),
    or ``[2, B]`` with ``reduction="none"``. ``log_normalizer`` gives :math:`\\log Z` of both
    directions from their dot products (see :data:`~.general.LogNormalizer`)."""
    args = (student_emb, teacher_emb, student_memory, teacher_memory, sample_indices,
            num_positives, temperature, log_normalizer, reduction)
    if backend == "reference":
        return _reference_pair(*args)
    if backend == "triton" and not torch.compiler.is_compiling():
        return triton.ccd_pair(*args)
    if backend in ("dense", "gather"):
        path: general.ScorePath = backend
    else:  # auto, compiled, and triton inside a torch.compile trace (inductor fuses its own)
        path = choose_score_path(student_memory.shape[0], sample_indices.shape[1])
    return general.ccd_pair(path, *args)


def _reference_pair(student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                    student_memory: torch.Tensor, teacher_memory: torch.Tensor,
                    sample_indices: torch.Tensor, num_positives: int, temperature: float,
                    log_normalizer: LogNormalizer, reduction: str) -> torch.Tensor:
    """:func:`~crckd_losses.functional.class_guided_contrastive_loss`'s equations, with the
    modules' :math:`Z`."""
    u = torch.stack([contrastive_scores(student_emb, teacher_memory, sample_indices, temperature),
                     contrastive_scores(teacher_emb, student_memory, sample_indices, temperature)])
    log_z = log_normalizer(u, 1.0)
    noise = (sample_indices.shape[1] - num_positives) / student_memory.shape[0]
    return torch.stack([nce_loss(u[k], log_z[k], noise, num_positives, reduction)
                        for k in range(2)])


__all__ = ["BACKENDS", "DENSE_PATH_FACTOR", "STATUS", "Backend", "Run", "ccd_pair",
           "check_backend", "choose_score_path", "compiles", "has_run_on", "status_table"]
