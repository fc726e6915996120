"""The reference maths of CRCKD: every equation of the method as a pure function in plain
torch, one function each, in the order of :doc:`/method`.

This is what the library computes; the backends (:mod:`crckd_losses.backends`) compute the
same values faster and are tested against these functions. Nothing here depends on the
device.

Notation (shapes in the docstrings use it): ``B`` batch size, ``N`` bank rows (training-set
size), ``C`` classes, ``d`` embedding size, ``P`` positives and ``K`` negatives per anchor,
``tau`` temperature.

All losses work in log space (``logsigmoid``, ``log_softmax``) and reduce in float32 or wider,
so they stay finite under float16/bfloat16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import (
    check_finite,
    check_float,
    check_index,
    check_nonempty,
    check_positive_float,
    check_positive_int,
    check_range,
    check_reduction,
    check_same_device,
    reduce,
    reduction_dtype,
)

__all__ = [
    "categorical_relation_loss",
    "class_centroids",
    "class_guided_contrastive_loss",
    "consistency_kl",
    "contrastive_scores",
    "estimate_log_normalizer",
    "nce_loss",
    "sigmoid_rampup",
]


def contrastive_scores(
    anchor: torch.Tensor,
    memory: torch.Tensor,
    sample_indices: torch.Tensor,
    temperature: float = 0.07,
) -> torch.Tensor:
    r"""Scores of anchors against sampled bank rows: :math:`u_{ij} = g_i \cdot M[idx_{ij}]/\tau`
    (method §4).

    Args:
        anchor: ``[B, d]`` float, the anchors ``g`` (L2-normalised embeddings).
        memory: ``[N, d]`` float, the other side's bank (read as a constant).
        sample_indices: ``[B, P+K]`` integer rows of ``memory`` per anchor.
        temperature: ``tau > 0``.

    Returns:
        ``[B, P+K]`` scores, in the matmul's dtype (float16/bfloat16 under autocast).

    Examples:
        >>> g = F.normalize(torch.randn(4, 8), dim=1)
        >>> bank = F.normalize(torch.randn(100, 8), dim=1)
        >>> idx = torch.randint(0, 100, (4, 6))
        >>> contrastive_scores(g, bank, idx).shape
        torch.Size([4, 6])
    """
    check_float("anchor", anchor, 2)
    check_float("memory", memory, 2)
    check_index("sample_indices", sample_indices, 2)
    check_nonempty("anchor", anchor)
    check_same_device(anchor=anchor, memory=memory, sample_indices=sample_indices)
    if anchor.shape[1] != memory.shape[1]:
        raise ValueError(
            f"anchor has embedding size {anchor.shape[1]} but memory has {memory.shape[1]}"
        )
    if sample_indices.shape[0] != anchor.shape[0]:
        raise ValueError(
            f"sample_indices must have one row per anchor ({anchor.shape[0]}), "
            f"got shape {tuple(sample_indices.shape)}"
        )
    check_positive_float("temperature", temperature)
    check_range("sample_indices", sample_indices, memory.shape[0])
    dtype = torch.promote_types(anchor.dtype, memory.dtype)
    rows = memory.detach()[sample_indices.long()].to(dtype)  # [B, P+K, d]
    return torch.bmm(rows, anchor.to(dtype).unsqueeze(2)).squeeze(2) / temperature


def estimate_log_normalizer(scores: torch.Tensor, bank_size: int) -> torch.Tensor:
    r""":math:`\log Z` with :math:`Z = N \cdot \mathrm{mean}(e^{u})` over all scores (method §4).

    Computed as ``log N + logsumexp(u) - log(numel)``, so ``exp(u)`` is never formed.

    Args:
        scores: scores ``u`` of any shape (``[B, P+K]``), any float dtype.
        bank_size: ``N``.

    Returns:
        A 0-d float32 (float64 for float64 input) tensor, detached.

    Examples:
        >>> u = torch.zeros(2, 3)
        >>> float(estimate_log_normalizer(u, 10).exp())
        10.0
    """
    check_positive_int("bank_size", bank_size)
    if scores.numel() == 0:
        raise ValueError("scores is empty; cannot estimate the normalisation constant")
    u = scores.detach().to(reduction_dtype(scores.dtype)).flatten()
    return math.log(bank_size) + torch.logsumexp(u, 0) - math.log(u.numel())


def nce_loss(
    scores: torch.Tensor,
    log_normalizer: torch.Tensor | float,
    noise_constant: float,
    num_positives: int,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""The NCE critic loss of one CCD direction (method §4).

    With :math:`v = u - \log Z - \log c`, :math:`\log h = \mathrm{logsigmoid}(v)` and
    :math:`\log(1-h) = \mathrm{logsigmoid}(-v)`:

    .. math::
        \ell_i = -\Big[\tfrac{1}{P}\sum_{p<P}\log h(x_{ip}) + \sum_{k\ge P}\log(1-h(x_{ik}))\Big]

    Args:
        scores: ``[B, P+K]`` scores ``u``; the first ``P`` columns are positives.
        log_normalizer: :math:`\log Z`, a float or 0-d tensor.
        noise_constant: :math:`c = K / N`.
        num_positives: ``P``.
        reduction: ``"mean"`` (the paper's :math:`1/B` sum), ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        The reduced loss in float32 (float64 for float64 input).

    Examples:
        >>> u = torch.tensor([[2.0, 0.0, -1.0]])
        >>> nce_loss(u, log_normalizer=0.0, noise_constant=1.0, num_positives=1).shape
        torch.Size([])
    """
    check_float("scores", scores, 2)
    check_nonempty("scores", scores)
    check_positive_int("num_positives", num_positives)
    check_positive_float("noise_constant", noise_constant)
    check_reduction(reduction)
    if scores.shape[1] <= num_positives:
        raise ValueError(
            f"scores has {scores.shape[1]} columns; need more than num_positives={num_positives} "
            "so that at least one negative remains"
        )
    dtype = reduction_dtype(scores.dtype)
    log_z = torch.as_tensor(log_normalizer, dtype=dtype, device=scores.device)
    v = scores.to(dtype) - (log_z + math.log(noise_constant))
    log_h = F.logsigmoid(v[:, :num_positives])  # log h(x) of the positives
    log_one_minus_h = F.logsigmoid(-v[:, num_positives:])  # log(1 - h(x)) of the negatives
    return reduce(-(log_h.mean(dim=1) + log_one_minus_h.sum(dim=1)), reduction)


def class_guided_contrastive_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    sample_indices: torch.Tensor,
    num_positives: int,
    temperature: float = 0.07,
    student_log_normalizer: torch.Tensor | float | None = None,
    teacher_log_normalizer: torch.Tensor | float | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""CCD, both directions: :math:`(L_S, L_T)`; :math:`L_{CCD} = L_S + L_T` (method §4).

    :math:`L_S` scores student anchors against the teacher bank, :math:`L_T` teacher anchors
    against the student bank, both over the same sampled rows, with noise constant
    :math:`c = K/N`.

    Args:
        student_emb: ``[B, d]`` student embeddings ``g_S`` (trainable).
        teacher_emb: ``[B, d]`` teacher embeddings ``g_T`` (the teacher head is trainable
            through :math:`L_T`).
        student_memory: ``[N, d]`` student bank ``M_S`` (constant).
        teacher_memory: ``[N, d]`` teacher bank ``M_T`` (constant).
        sample_indices: ``[B, P+K]`` integer rows: column 0 the anchor's own row, columns
            ``1..P-1`` same-class rows, then ``K`` other-class rows.
        num_positives: ``P``.
        temperature: ``tau``.
        student_log_normalizer: :math:`\log Z` for :math:`L_S`; ``None`` estimates it from these
            scores (:func:`estimate_log_normalizer`), which is what a first call does.
        teacher_log_normalizer: :math:`\log Z` for :math:`L_T`; ``None`` as above.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``(L_S, L_T)``.

    Examples:
        >>> gs, gt = (F.normalize(torch.randn(4, 8), dim=1) for _ in range(2))
        >>> ms, mt = (F.normalize(torch.randn(50, 8), dim=1) for _ in range(2))
        >>> idx = torch.randint(0, 50, (4, 2 + 10))
        >>> l_s, l_t = class_guided_contrastive_loss(gs, gt, ms, mt, idx, num_positives=2)
        >>> bool(l_s > 0) and bool(l_t > 0)
        True
    """
    check_float("student_emb", student_emb, 2)
    check_float("teacher_emb", teacher_emb, 2)
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"student_emb and teacher_emb must have one shape, got {tuple(student_emb.shape)} "
            f"and {tuple(teacher_emb.shape)}"
        )
    if student_memory.shape != teacher_memory.shape:
        raise ValueError(
            f"student_memory and teacher_memory must have one shape, got "
            f"{tuple(student_memory.shape)} and {tuple(teacher_memory.shape)}"
        )
    check_positive_int("num_positives", num_positives)
    check_finite("student_emb", student_emb)
    check_finite("teacher_emb", teacher_emb)
    check_index("sample_indices", sample_indices, 2)
    bank_size = student_memory.shape[0]
    num_negatives = sample_indices.shape[1] - num_positives
    if num_negatives < 1:
        raise ValueError(
            f"sample_indices has {sample_indices.shape[1]} columns; need num_positives="
            f"{num_positives} plus at least one negative"
        )
    losses = []
    for anchor, memory, log_z in ((student_emb, teacher_memory, student_log_normalizer),
                                  (teacher_emb, student_memory, teacher_log_normalizer)):
        u = contrastive_scores(anchor, memory, sample_indices, temperature)
        if log_z is None:
            log_z = estimate_log_normalizer(u, bank_size)
        losses.append(nce_loss(u, log_z, num_negatives / bank_size, num_positives, reduction))
    return losses[0], losses[1]


def class_centroids(
    memory: torch.Tensor, labels: torch.Tensor, num_classes: int, relu: bool = True
) -> torch.Tensor:
    r"""Class centroids of a bank (method §3).

    :math:`c_c = \mathrm{normalise}(\mathrm{mean}_{j: y_j=c}\,\mathrm{ReLU}(M_j))`.

    One ``index_add_`` over the bank; no loop over classes.

    Args:
        memory: ``[N, d]`` float bank rows.
        labels: ``[N]`` long, the class of each row, in ``[0, num_classes)``.
        num_classes: ``C``.
        relu: apply ReLU to the rows first (the released code's choice, method §3).

    Returns:
        ``[C, d]`` L2-normalised centroids, detached. A class with no rows gets a zero row.

    Examples:
        >>> m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> class_centroids(m, torch.tensor([0, 1, 1]), 2)
        tensor([[1.0000, 0.0000],
                [0.4472, 0.8944]])
    """
    check_float("memory", memory, 2)
    check_index("labels", labels, 1)
    check_positive_int("num_classes", num_classes)
    if labels.shape[0] != memory.shape[0]:
        raise ValueError(
            f"labels must have one entry per memory row ({memory.shape[0]}), got {labels.shape[0]}"
        )
    check_range("labels", labels, num_classes)
    rows = memory.detach()
    if relu:
        rows = rows.clamp_min(0)
    labels = labels.long()
    sums = rows.new_zeros(num_classes, rows.shape[1]).index_add_(0, labels, rows)
    # Counted by index_add_, not bincount: bincount sizes its output from the labels' largest
    # value, a host read on a GPU and a graph break for torch.compile before torch 2.10.
    counts = labels.new_zeros(num_classes).index_add_(0, labels, torch.ones_like(labels))
    counts = counts.clamp_min(1)
    return F.normalize(sums / counts.unsqueeze(1).to(sums.dtype), dim=1)


def categorical_relation_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_centroids: torch.Tensor,
    teacher_centroids: torch.Tensor,
    temperature: float = 0.07,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Categorical relation preserving loss, CRP (method §5).

    :math:`\frac{1}{B}\sum_i \mathrm{KL}(\mathrm{softmax}(r_{T,i})\,\|\,\mathrm{softmax}(r_{S,i}))`

    With :math:`r_S = g_S C_S^\top/\tau` and :math:`r_T = g_T C_T^\top/\tau`. The teacher side
    and both centroid sets are detached; only ``student_emb`` gets a gradient.

    Args:
        student_emb: ``[B, d]`` student embeddings ``g_S``.
        teacher_emb: ``[B, d]`` teacher embeddings ``g_T``.
        student_centroids: ``[C, d]`` centroids of the student bank.
        teacher_centroids: ``[C, d]`` centroids of the teacher bank.
        temperature: ``tau``.
        reduction: ``"mean"`` (the paper's), ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        The loss in float32 (float64 for float64 input).

    Examples:
        >>> g = F.normalize(torch.randn(3, 4), dim=1)
        >>> c = F.normalize(torch.randn(5, 4), dim=1)
        >>> float(categorical_relation_loss(g, g, c, c))
        0.0
    """
    check_float("student_emb", student_emb, 2)
    check_float("teacher_emb", teacher_emb, 2)
    check_float("student_centroids", student_centroids, 2)
    check_float("teacher_centroids", teacher_centroids, 2)
    check_nonempty("student_emb", student_emb)
    check_reduction(reduction)
    check_positive_float("temperature", temperature)
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"student_emb and teacher_emb must have one shape, got {tuple(student_emb.shape)} "
            f"and {tuple(teacher_emb.shape)}"
        )
    if student_centroids.shape != teacher_centroids.shape:
        raise ValueError(
            f"student_centroids and teacher_centroids must have one shape, got "
            f"{tuple(student_centroids.shape)} and {tuple(teacher_centroids.shape)}"
        )
    if student_centroids.shape[1] != student_emb.shape[1]:
        raise ValueError(
            f"centroids have size {student_centroids.shape[1]} but embeddings have "
            f"{student_emb.shape[1]}"
        )
    check_same_device(student_emb=student_emb, student_centroids=student_centroids)
    check_finite("student_emb", student_emb)
    check_finite("teacher_emb", teacher_emb)
    return reduce(_relation_per_sample(student_emb, teacher_emb, student_centroids,
                                       teacher_centroids, temperature), reduction)


def _relation_per_sample(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_centroids: torch.Tensor,
    teacher_centroids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``[B]`` CRP terms from checked arguments."""
    # 1/tau goes on the C x d centroids, the smallest operand (callers may fold it in and
    # pass temperature 1).
    scale = 1.0 / temperature
    c_s = student_centroids.detach().to(student_emb.dtype)
    c_t = teacher_centroids.to(teacher_emb.dtype)
    if scale != 1.0:
        c_s, c_t = c_s * scale, c_t * scale
    r_s = student_emb @ c_s.t()
    with torch.no_grad():
        r_t = teacher_emb.detach() @ c_t.t()
    return _kl_rows(r_t, r_s)


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` rows of KL(softmax(teacher) || softmax(student)), in the reduction dtype."""
    dtype = reduction_dtype(student_logits.dtype)
    log_p_s = F.log_softmax(student_logits.to(dtype), dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(dtype), dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def consistency_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    r"""Mean-teacher consistency (method §2): :math:`\frac{1}{B}\sum_i \mathrm{KL}(p_T\|p_S)`.

    Args:
        student_logits: ``[B, C]`` student logits.
        teacher_logits: ``[B, C]`` teacher logits (detached here).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The loss in float32 (float64 for float64 input).

    Examples:
        >>> z = torch.randn(2, 5)
        >>> float(consistency_kl(z, z))
        0.0
    """
    check_float("student_logits", student_logits, 2)
    check_float("teacher_logits", teacher_logits, 2)
    check_nonempty("student_logits", student_logits)
    check_reduction(reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    return reduce(_kl_rows(teacher_logits, student_logits), reduction)


def sigmoid_rampup(epoch: float, rampup_length: float = 30.0) -> float:
    r"""Ramp-up weight :math:`\exp(-5(1-\min(e,R)/R)^2)` (method §2), evaluated per epoch.

    Args:
        epoch: ``e >= 0``.
        rampup_length: ``R`` epochs; ``0`` gives 1 from the start.

    Returns:
        A float in ``(0, 1]``.

    Examples:
        >>> round(sigmoid_rampup(0, 30), 6)
        0.006738
        >>> sigmoid_rampup(30, 30)
        1.0
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length}")
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(float(epoch), float(rampup_length)) / float(rampup_length)
    return float(math.exp(-5.0 * phase * phase))
