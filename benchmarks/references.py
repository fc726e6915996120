"""Straightforward implementations that a user would otherwise write, from the method page.

Each is the plain way to compute one part of CRCKD: CCD by gathering the ``B x (P+K) x d``
block of bank rows and exponentiating the scores (as CRD does), class centroids with a Python
loop over classes, class-guided sampling with ``np.random.choice`` per anchor, and the mean
teacher's EMA with a loop over parameters. The benchmarks time the library against them and
first check that both compute the same values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def naive_nce_direction(
    anchor: torch.Tensor,
    memory: torch.Tensor,
    sample_indices: torch.Tensor,
    num_positives: int,
    temperature: float,
    log_normalizer: float,
    eps: float = 0.0,
) -> torch.Tensor:
    r"""One CCD direction the CRD way: gather rows, ``exp(u)/Z``, ``h = x/(x+c)``, ``log``.

    Args:
        anchor: ``[B, d]`` anchors ``g`` (L2-normalised).
        memory: ``[N, d]`` the other side's bank (read as a constant).
        sample_indices: ``[B, P+K]`` long; the first ``P`` columns are positives.
        num_positives: ``P``.
        temperature: ``tau``.
        log_normalizer: :math:`\log Z`.
        eps: added to the denominators, as the released code does (``0`` gives the formula).

    Returns:
        The scalar loss :math:`-\frac1B\sum_i[\frac1P\sum_p\log h + \sum_k\log(1-h)]`.
    """
    batch, width = sample_indices.shape
    num_negatives = width - num_positives
    noise = num_negatives / memory.shape[0]
    rows = torch.index_select(memory.detach(), 0, sample_indices.reshape(-1))
    rows = rows.view(batch, width, memory.shape[1])
    scores = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)
    x = torch.exp(scores / temperature) / math.exp(log_normalizer)
    x_pos, x_neg = x[:, :num_positives], x[:, num_positives:]
    log_h = torch.log(x_pos / (x_pos + noise + eps))
    log_one_minus_h = torch.log(noise / (x_neg + noise + eps))
    per_anchor = log_h.mean(dim=1) + log_one_minus_h.sum(dim=1)
    return -per_anchor.mean()


def naive_ccd(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    sample_indices: torch.Tensor,
    num_positives: int,
    temperature: float,
    student_log_normalizer: float,
    teacher_log_normalizer: float,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both CCD directions with :func:`naive_nce_direction`: ``(L_S, L_T)``.

    Args:
        student_emb: ``[B, d]`` ``g_S``.
        teacher_emb: ``[B, d]`` ``g_T``.
        student_memory: ``[N, d]`` ``M_S``.
        teacher_memory: ``[N, d]`` ``M_T``.
        sample_indices: ``[B, P+K]`` long, shared by both directions.
        num_positives: ``P``.
        temperature: ``tau``.
        student_log_normalizer: :math:`\\log Z_S`.
        teacher_log_normalizer: :math:`\\log Z_T`.
        eps: see :func:`naive_nce_direction`.

    Returns:
        ``(L_S, L_T)``: student anchors against the teacher bank, and the reverse.
    """
    loss_s = naive_nce_direction(
        student_emb, teacher_memory, sample_indices, num_positives, temperature,
        student_log_normalizer, eps,
    )
    loss_t = naive_nce_direction(
        teacher_emb, student_memory, sample_indices, num_positives, temperature,
        teacher_log_normalizer, eps,
    )
    return loss_s, loss_t


def loop_centroids(
    memory: torch.Tensor, labels: torch.Tensor, num_classes: int, relu: bool = True
) -> torch.Tensor:
    """Class centroids with a loop over classes: mask, (ReLU,) mean, normalise.

    Args:
        memory: ``[N, d]`` bank rows.
        labels: ``[N]`` long class of each row.
        num_classes: ``C``.
        relu: ReLU the rows first (method §3's default).

    Returns:
        ``[C, d]`` L2-normalised centroids.
    """
    rows = []
    for c in range(num_classes):
        members = memory[labels == c]
        if relu:
            members = torch.relu(members)
        rows.append(F.normalize(members.mean(dim=0), dim=0))
    return torch.stack(rows)


def naive_crp(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_centroids: torch.Tensor,
    teacher_centroids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """CRP with ``F.kl_div`` on softmaxed sample-to-centroid relations (method §5).

    Args:
        student_emb: ``[B, d]`` ``g_S``.
        teacher_emb: ``[B, d]`` ``g_T`` (detached here).
        student_centroids: ``[C, d]``.
        teacher_centroids: ``[C, d]``.
        temperature: ``tau``.

    Returns:
        The scalar loss.
    """
    r_s = student_emb @ student_centroids.detach().t() / temperature
    r_t = teacher_emb.detach() @ teacher_centroids.detach().t() / temperature
    return F.kl_div(F.log_softmax(r_s, dim=1), F.softmax(r_t, dim=1), reduction="batchmean")


def class_index_lists(labels: np.ndarray, num_classes: int) -> tuple[list[np.ndarray], ...]:
    """Per class, the rows of that class and the rows of every other class (built once).

    Args:
        labels: ``[N]`` integer labels.
        num_classes: ``C``.

    Returns:
        ``(same, other)``: two lists of ``C`` index arrays.
    """
    same = [np.flatnonzero(labels == c) for c in range(num_classes)]
    other = [np.flatnonzero(labels != c) for c in range(num_classes)]
    return same, other


def numpy_sample(
    indices: np.ndarray,
    labels: np.ndarray,
    same: Sequence[np.ndarray],
    other: Sequence[np.ndarray],
    num_positives: int,
    num_negatives: int,
    rng: np.random.RandomState | np.random.Generator,
) -> np.ndarray:
    """Class-guided indices drawn per anchor with ``rng.choice`` (method §4).

    Column 0 is the anchor's row; ``P-1`` rows of its class follow (without replacement when
    the class has enough rows), then ``K`` rows of other classes (without replacement when
    there are at least ``K``). The same distribution as
    :meth:`crckd_losses.MomentumMemoryBank.sample`.

    Args:
        indices: ``[B]`` anchor rows.
        labels: ``[N]`` labels.
        same: from :func:`class_index_lists`.
        other: from :func:`class_index_lists`.
        num_positives: ``P``.
        num_negatives: ``K``.
        rng: a ``np.random.RandomState`` (what ``np.random.choice`` uses, as CRD and the
            released code call it: a full permutation per draw without replacement) or a
            ``np.random.Generator`` (whose ``choice`` avoids the full permutation).

    Returns:
        ``[B, P+K]`` int64 array.
    """
    out = np.empty((len(indices), num_positives + num_negatives), dtype=np.int64)
    for row, i in enumerate(indices):
        y = labels[i]
        pool = same[y]
        out[row, 0] = i
        if num_positives > 1:
            take = num_positives - 1
            out[row, 1:num_positives] = rng.choice(pool, take, replace=len(pool) < take)
        pool = other[y]
        out[row, num_positives:] = rng.choice(
            pool, num_negatives, replace=len(pool) < num_negatives
        )
    return out


@torch.no_grad()
def loop_ema(
    teacher: torch.nn.Module, student: torch.nn.Module, decay: float, average_buffers: bool
) -> None:
    """The mean-teacher EMA one parameter at a time: ``t.mul_(a).add_(s, alpha=1-a)``.

    Args:
        teacher: the averaged copy, updated in place.
        student: the trained model.
        decay: :math:`\\alpha`.
        average_buffers: average floating-point buffers the same way (and copy the others);
            ``False`` copies every buffer.
    """
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s, alpha=1.0 - decay)
    buffers: Iterable[tuple[torch.Tensor, torch.Tensor]] = zip(teacher.buffers(), student.buffers())
    for t, s in buffers:
        if average_buffers and t.is_floating_point():
            t.mul_(decay).add_(s, alpha=1.0 - decay)
        else:
            t.copy_(s)
