"""CRCKDLoss: both heads, both banks, CCD and CRP, run in the method's order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_finite,
    check_float,
    check_index,
    check_nonempty,
    check_range,
    check_same_device,
    check_unit_interval,
    reduce,
)
from .backends import Backend, compiled, compiles, cuda_graphs
from .contrastive import ClassGuidedContrastiveLoss, Normalizer
from .functional import _relation_per_sample
from .heads import EmbeddingHead
from .memory import MomentumMemoryBank, centroids_of, gather_rows, plan_write, write_banks
from .relation import CategoricalRelationLoss
from .sampling import Sampler, class_guided_indices


class CRCKDOutput(NamedTuple):
    """What one :class:`CRCKDLoss` step returns.

    Attributes:
        loss: ``ccd_weight * ccd + crp_weight * crp``, the term to add to the task loss.
        ccd: :math:`L_{CCD} = L_S + L_T`.
        crp: :math:`L_{CRP}`.
        ccd_student: :math:`L_S`.
        ccd_teacher: :math:`L_T`.
    """

    loss: torch.Tensor
    ccd: torch.Tensor
    crp: torch.Tensor
    ccd_student: torch.Tensor
    ccd_teacher: torch.Tensor


class CRCKDLoss(nn.Module):
    r"""The distillation part of CRCKD (method §1, §3–§6) in one module.

    Owns the two projection heads, the two banks and both losses. One call runs one training
    step in the method's order:

    1. ``g_S = head_S(f_S)``, ``g_T = head_T(f_T.detach())`` (the teacher backbone gets no
       gradient; the teacher head learns through :math:`L_T` only);
    2. CCD scores against the banks as they are (:math:`L_S`, :math:`L_T`);
    3. in training mode, bank update at the batch's indices (student bank with ``g_S``, teacher
       bank with ``g_T``);
    4. class centroids of the updated banks;
    5. CRP between ``g_S`` and ``g_T`` against those centroids.

    ``state_dict`` holds the heads, both banks and CCD's normalisation constants, so a resumed
    run resumes all of them.

    Args:
        labels: ``[N]`` integer class ids of the training set (a tensor, a numpy array or a
            sequence such as a torchvision dataset's ``.targets``), in ``[0, C)`` with every
            class present; the banks' size and row classes.
        student_dim: size of the student feature ``f_S`` (128 in the paper).
        teacher_dim: size of the teacher feature ``f_T``.
        embed_dim: ``d`` (128).
        num_positives: ``P`` (20), at most ``N``.
        num_negatives: ``K`` (4096); other-class rows are drawn with replacement for anchors
            whose classes have fewer than ``K`` of them. A ``K`` above ``N`` warns once, here,
            with the largest value that fits the data
            (:attr:`MomentumMemoryBank.max_distinct_negatives`).
        temperature: ``tau`` for both CCD and CRP (0.07).
        momentum: bank momentum ``m`` (0.5).
        ccd_weight: :math:`\lambda_{CCD}` (0.1).
        crp_weight: :math:`\lambda_{CRP}` (1.0).
        normalizer: see :class:`ClassGuidedContrastiveLoss`.
        normalizer_momentum: see :class:`ClassGuidedContrastiveLoss`.
        centroid_relu: ReLU the bank rows before averaging (method §3, the default).
        sampler: ``"independent"`` (the method's law) or ``"shuffle"`` (faster, anchors of one
            class correlated; see :meth:`MomentumMemoryBank.sample`).
        num_classes: ``C``; defaults to ``labels.max() + 1``.
        backend: how the step is computed, all to the same values: ``"auto"`` (default),
            ``"reference"``, ``"dense"``, ``"gather"``, ``"compiled"`` or ``"triton"``; see
            :mod:`crckd_losses.backends`. ``"auto"`` compiles the step with inductor on a
            CUDA device with Triton installed, in one process (the first training calls then
            compile it: once for the first step, which estimates :math:`Z`, once for the
            steady state; a compile failure warns and falls back to eager), and otherwise
            runs the general operators. To run the step as CUDA graphs, wrap the module with
            :func:`~crckd_losses.graph_crckd_loss`.

    Examples:
        >>> labels = torch.randint(0, 3, (100,))
        >>> crckd = CRCKDLoss(labels, student_dim=16, teacher_dim=16, embed_dim=8,
        ...                   num_positives=4, num_negatives=16)
        >>> f_s = torch.randn(5, 16, requires_grad=True)
        >>> f_t = torch.randn(5, 16)
        >>> out = crckd(f_s, f_t, indices=torch.arange(5))
        >>> out.loss.backward()
        >>> sorted(out._fields)
        ['ccd', 'ccd_student', 'ccd_teacher', 'crp', 'loss']
    """

    def __init__(
        self,
        labels: torch.Tensor | Sequence[int],
        student_dim: int,
        teacher_dim: int,
        embed_dim: int = 128,
        num_positives: int = 20,
        num_negatives: int = 4096,
        temperature: float = 0.07,
        momentum: float = 0.5,
        ccd_weight: float = 0.1,
        crp_weight: float = 1.0,
        normalizer: Normalizer = "first_batch",
        normalizer_momentum: float = 0.9,
        centroid_relu: bool = True,
        sampler: Sampler = "independent",
        num_classes: int | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("ccd_weight", ccd_weight), ("crp_weight", crp_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        check_unit_interval("momentum", momentum)
        self.ccd_weight = float(ccd_weight)
        self.crp_weight = float(crp_weight)
        self.centroid_relu = bool(centroid_relu)
        self.student_head = EmbeddingHead(student_dim, embed_dim)
        self.teacher_head = EmbeddingHead(teacher_dim, embed_dim)
        self.student_bank = MomentumMemoryBank(labels, embed_dim, momentum, num_classes)
        self.teacher_bank = MomentumMemoryBank(labels, embed_dim, momentum, num_classes)
        if isinstance(num_positives, int) and num_positives > self.student_bank.size:
            raise ValueError(
                f"num_positives={num_positives} is larger than the bank "
                f"({self.student_bank.size} rows, one per label); use at most "
                f"{self.student_bank.size}"
            )
        if isinstance(num_negatives, int) and not isinstance(num_negatives, bool):
            self.student_bank.warn_if_negatives_repeat(num_negatives)
        self.ccd = ClassGuidedContrastiveLoss(
            num_positives,
            num_negatives,
            temperature,
            normalizer=normalizer,
            normalizer_momentum=normalizer_momentum,
            sampler=sampler,
            backend=backend,
        )
        self.crp = CategoricalRelationLoss(temperature)

    @property
    def backend(self) -> Backend:
        """The backend the module was built with (see :mod:`crckd_losses.backends`)."""
        return self.ccd.backend

    def forward(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        indices: torch.Tensor,
        sample_indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CRCKDOutput:
        """One CRCKD step: steps 1-5 of the class docstring, after the checks and the draw of
        the sampled rows.

        Args:
            student_feat: ``[B, student_dim]`` student features ``f_S``.
            teacher_feat: ``[B, teacher_dim]`` teacher features ``f_T`` (detached here).
            indices: ``[B]`` dataset indices of the batch (see :class:`IndexedDataset`).
            sample_indices: ``[B, P+K]`` bank rows to use instead of sampling.
            generator: ``torch.Generator`` for the sampler.

        Returns:
            :class:`CRCKDOutput`.
        """
        student_feat, teacher_feat, indices = self.check_inputs(student_feat, teacher_feat,
                                                                indices)
        cuda_graphs.invalidate_replays(self)
        rows = self.student_bank._readable(indices)
        ccd = self.ccd
        if sample_indices is None:
            sample_indices = class_guided_indices(
                self.student_bank.layout, rows, ccd.num_positives, ccd.num_negatives,
                generator, ccd.sampler)
        else:
            sample_indices = ccd.check_sample_indices(sample_indices, indices.shape[0],
                                                      self.student_bank)
        args = (self, student_feat, teacher_feat, indices, rows, sample_indices)
        if compiles(self.backend, student_feat.device, step=True):
            out: CRCKDOutput = compiled.run(self, self.backend == "compiled", _step, *args)
            return out
        return _step(*args)

    def check_inputs(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                     indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The checks of :meth:`forward`: shapes, dtypes, devices, and (where
        :func:`~crckd_losses.set_value_checks` reads them) finite features and indices in
        range. Returns the inputs, the indices as long."""
        check_float("student_feat", student_feat, 2)
        check_float("teacher_feat", teacher_feat, 2)
        check_index("indices", indices, 1)
        batch = student_feat.shape[0]
        if teacher_feat.shape[0] != batch:
            raise ValueError(
                f"student_feat and teacher_feat must have one batch size, got "
                f"{batch} and {teacher_feat.shape[0]}"
            )
        if indices.shape[0] != batch:
            raise ValueError(
                f"indices must have one entry per feature row ({batch}), got shape "
                f"{tuple(indices.shape)}"
            )
        check_nonempty("student_feat", student_feat)
        check_same_device(student_feat=student_feat, teacher_feat=teacher_feat,
                          indices=indices, memory=self.student_bank.memory)
        for name, feat, head, dim_name in (
            ("student_feat", student_feat, self.student_head, "student_dim"),
            ("teacher_feat", teacher_feat, self.teacher_head, "teacher_dim"),
        ):
            if feat.shape[1] != head.linear.in_features:
                raise ValueError(
                    f"{name} must have {head.linear.in_features} columns ({dim_name}), got "
                    f"shape {tuple(feat.shape)}"
                )
            check_finite(name, feat)
        check_range("indices", indices, self.student_bank.size)
        return student_feat, teacher_feat, indices.long()

    def __getstate__(self) -> dict[str, Any]:
        # The CUDA graphs of graph_crckd_loss hold this module's addresses: a copy
        # (copy.deepcopy) or a pickle leaves them behind and runs eagerly.
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call, unused-ignore]
        return {k: v for k, v in state.items() if k != "_graphs"}

    def _apply(self, fn: Any, recurse: bool = True) -> CRCKDLoss:
        self.__dict__.pop("_graphs", None)  # moved or cast: graphs are captured again
        return super()._apply(fn, recurse)  # type: ignore[no-any-return, no-untyped-call, unused-ignore]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_graphs", None)  # loaded: graphs are captured again
        super()._load_from_state_dict(*args, **kwargs)


def _normalize_pair(y_s: torch.Tensor, y_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both heads' L2 normalisation (the heads' own), in one computation where the two
    projections share a dtype: on a GPU, half the kernels."""
    if y_s.dtype != y_t.dtype:
        return F.normalize(y_s, dim=1), F.normalize(y_t, dim=1)
    g = F.normalize(torch.cat([y_s, y_t]), dim=1)
    return g[:y_s.shape[0]], g[y_s.shape[0]:]


def _step(crckd: CRCKDLoss, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
          indices: torch.Tensor, rows: torch.Tensor, sample_indices: torch.Tensor
          ) -> CRCKDOutput:
    """Steps 1-5 of :class:`CRCKDLoss` on checked inputs and drawn samples; what the
    ``"compiled"`` backend compiles."""
    # 1. the embeddings
    g_s, g_t = _normalize_pair(crckd.student_head.project(student_feat),
                               crckd.teacher_head.project(teacher_feat.detach()))
    # 2. CCD against the banks as they are
    both = crckd.ccd._both(g_s, g_t, crckd.student_bank, crckd.teacher_bank, sample_indices,
                           crckd.backend)
    banks = (crckd.student_bank, crckd.teacher_bank)
    # 3. the bank update
    if crckd.training:
        with torch.no_grad():
            for bank in banks:
                bank._sync_once()
            gathered, (new_s, new_t) = gather_rows(indices, g_s.detach(), g_t.detach())
            # One plan for both banks: a row enters neither bank unless both sides are
            # finite, and the index bookkeeping is done once.
            plan = plan_write(gathered, crckd.student_bank.labels, new_s, new_t,
                              rows=None if gathered is not indices else rows)
            write_banks(banks, plan)
    # 4. both banks' centroids in one [2, C, d] tensor, 1/tau folded in
    scaled = centroids_of(banks, crckd.centroid_relu, scale=1.0 / crckd.crp.temperature)
    # 5. CRP
    crp = reduce(_relation_per_sample(g_s, g_t.detach(), scaled[0], scaled[1], 1.0),
                 crckd.crp.reduction)
    ccd_loss = both.sum(dim=0)
    loss = torch.add(ccd_loss * crckd.ccd_weight, crp, alpha=crckd.crp_weight)
    return CRCKDOutput(loss, ccd_loss, crp, both[0], both[1])
