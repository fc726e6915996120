"""CategoricalRelationLoss: the CRP term of method §5."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_positive_float, check_reduction
from .functional import categorical_relation_loss


class CategoricalRelationLoss(nn.Module):
    r"""Categorical relation preserving loss (CRP, method §5).

    :math:`r_S = g_S C_S^\top/\tau`, :math:`r_T = g_T C_T^\top/\tau`,
    :math:`L_{CRP} = \frac{1}{B}\sum_i
    \mathrm{KL}(\mathrm{softmax}(r_{T,i})\,\|\,\mathrm{softmax}(r_{S,i}))`.
    Only the student embeddings receive a gradient.

    Args:
        temperature: ``tau`` (0.07 as in CCD).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes:
        - student_emb, teacher_emb: ``[B, d]``
        - student_centroids, teacher_centroids: ``[C, d]`` (from
          :meth:`MomentumMemoryBank.centroids`, or any anchor rows such as
          :meth:`MomentumMemoryBank.class_anchors`)
        - output: scalar, or ``[B]`` with ``reduction="none"``

    Examples:
        >>> import torch.nn.functional as F
        >>> crp = CategoricalRelationLoss()
        >>> gs, gt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
        >>> cs, ct = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
        >>> crp(gs, gt, cs, ct).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.07, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"

    def forward(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        student_centroids: torch.Tensor,
        teacher_centroids: torch.Tensor,
    ) -> torch.Tensor:
        return categorical_relation_loss(
            student_emb,
            teacher_emb,
            student_centroids,
            teacher_centroids,
            self.temperature,
            self.reduction,
        )
