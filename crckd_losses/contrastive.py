"""ClassGuidedContrastiveLoss: the CCD term of method §4, with its normalisation constants."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from . import backends, distributed
from ._checks import (
    check_choice,
    check_finite,
    check_float,
    check_index,
    check_positive_float,
    check_positive_int,
    check_range,
    check_reduction,
    check_same_device,
    check_unit_interval,
    reads_values,
    warn_at_caller,
)
from .backends import Backend, check_backend, compiled
from .memory import MomentumMemoryBank
from .sampling import SAMPLERS, Sampler

Normalizer = Literal["first_batch", "ema"]
NORMALIZERS: tuple[Normalizer, ...] = ("first_batch", "ema")


class CCDTerms(NamedTuple):
    """The two directions of CCD.

    Attributes:
        student: :math:`L_S`, student anchors against the teacher bank.
        teacher: :math:`L_T`, teacher anchors against the student bank.
    """

    student: torch.Tensor
    teacher: torch.Tensor


class ClassGuidedContrastiveLoss(nn.Module):
    r"""Class-guided contrastive distillation (CCD, method §4): :math:`L_S + L_T`.

    For each anchor, ``P`` positives (its own bank row, then rows of its class) and ``K``
    negatives (rows of other classes) are read from the *other* side's bank, scored as
    :math:`u = g \cdot M / \tau`, and scored by the NCE critic with noise constant
    :math:`c = K/N` and normalisation constant :math:`Z`, one per direction.

    :math:`Z` is kept as a buffer (``log_normalizer``: ``[log Z_S, log Z_T]``). With
    ``normalizer="first_batch"`` it is set to :math:`N\cdot\mathrm{mean}(e^u)` on the first
    training call and frozen (CRD's and the released code's choice). With ``"ema"`` it then
    follows an exponential moving average of that estimate in linear space, with
    ``normalizer_momentum``, which tracks the banks as they move away from their random start.
    Under ``torch.distributed`` the estimate is taken over the global batch.

    The banks are read as constants. :class:`MomentumMemoryBank` writes copy-on-write by
    default, so the banks may be updated between this forward and the backward (CRP needs the
    updated banks) and the gradients stay those of the rows as they were read.

    Args:
        num_positives: ``P`` (20 in the paper), the anchor's own row included.
        num_negatives: ``K`` (4096 in the paper).
        temperature: ``tau`` (0.07).
        normalizer: ``"first_batch"`` or ``"ema"``.
        normalizer_momentum: EMA momentum for ``normalizer="ema"``, in ``[0, 1)``.
        sampler: how :meth:`MomentumMemoryBank.sample` draws rows: ``"independent"`` (the
            method's law for every anchor) or ``"shuffle"`` (faster; anchors of one class
            share one permutation).
        backend: how the loss is computed, all to the same values: ``"auto"`` (default),
            ``"reference"``, ``"dense"``, ``"gather"``, ``"compiled"`` or ``"triton"``; see
            :mod:`crckd_losses.backends`. Here ``"auto"`` runs the general operators,
            ``"dense"`` or ``"gather"`` by the bank's size.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes:
        - student_emb, teacher_emb: ``[B, d]``, L2-normalised
        - indices: ``[B]`` long dataset indices of the batch
        - sample_indices: ``[B, P+K]`` long (optional; overrides the sampler)
        - output: scalar, or ``[B]`` with ``reduction="none"``

    Examples:
        >>> import torch.nn.functional as F
        >>> labels = torch.randint(0, 3, (200,))
        >>> bank_s, bank_t = MomentumMemoryBank(labels, dim=8), MomentumMemoryBank(labels, dim=8)
        >>> ccd = ClassGuidedContrastiveLoss(num_positives=4, num_negatives=32)
        >>> g_s = F.normalize(torch.randn(6, 8, requires_grad=True), dim=1)
        >>> g_t = F.normalize(torch.randn(6, 8), dim=1)
        >>> idx = torch.arange(6)
        >>> loss = ccd(g_s, g_t, idx, bank_s, bank_t)
        >>> loss.backward()
        >>> bool(ccd.normalizer_initialized)
        True
    """

    log_normalizer: torch.Tensor
    normalizer_initialized: torch.Tensor

    def __init__(
        self,
        num_positives: int = 20,
        num_negatives: int = 4096,
        temperature: float = 0.07,
        normalizer: Normalizer = "first_batch",
        normalizer_momentum: float = 0.9,
        sampler: Sampler = "independent",
        backend: Backend = "auto",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.num_positives = check_positive_int("num_positives", num_positives)
        self.num_negatives = check_positive_int("num_negatives", num_negatives)
        self.temperature = check_positive_float("temperature", temperature)
        self.normalizer = check_choice("normalizer", normalizer, NORMALIZERS)
        self.normalizer_momentum = check_unit_interval("normalizer_momentum", normalizer_momentum)
        self.sampler: Sampler = check_choice("sampler", sampler, SAMPLERS)  # type: ignore[assignment]
        self.backend: Backend = check_backend(backend)
        self.reduction = check_reduction(reduction)
        self.register_buffer("log_normalizer", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("normalizer_initialized", torch.zeros((), dtype=torch.bool))
        self._initialized = False

    def extra_repr(self) -> str:
        return (
            f"num_positives={self.num_positives}, num_negatives={self.num_negatives}, "
            f"temperature={self.temperature}, normalizer={self.normalizer!r}, "
            f"sampler={self.sampler!r}, backend={self.backend!r}"
        )

    def forward(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        indices: torch.Tensor,
        student_bank: MomentumMemoryBank,
        teacher_bank: MomentumMemoryBank,
        sample_indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """:math:`L_S + L_T`. See :meth:`terms` for the arguments."""
        terms = self.terms(
            student_emb, teacher_emb, indices, student_bank, teacher_bank, sample_indices, generator
        )
        return terms.student + terms.teacher

    def terms(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        indices: torch.Tensor,
        student_bank: MomentumMemoryBank,
        teacher_bank: MomentumMemoryBank,
        sample_indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CCDTerms:
        """Both CCD directions, apart.

        Args:
            student_emb: ``[B, d]`` student embeddings ``g_S``.
            teacher_emb: ``[B, d]`` teacher embeddings ``g_T``.
            indices: ``[B]`` dataset indices of the batch (bank rows of the anchors).
            student_bank: ``M_S``.
            teacher_bank: ``M_T`` (same labels as ``student_bank``).
            sample_indices: ``[B, P+K]`` rows to use instead of sampling, to reproduce a
                result exactly.
            generator: ``torch.Generator`` for the sampler.

        Returns:
            :class:`CCDTerms` ``(student, teacher)``.
        """
        check_float("student_emb", student_emb, 2)
        check_float("teacher_emb", teacher_emb, 2)
        if not isinstance(student_bank, MomentumMemoryBank):
            raise TypeError(
                f"student_bank must be a MomentumMemoryBank, got {type(student_bank).__name__}"
            )
        if not isinstance(teacher_bank, MomentumMemoryBank):
            raise TypeError(
                f"teacher_bank must be a MomentumMemoryBank, got {type(teacher_bank).__name__}"
            )
        if student_bank.memory.shape != teacher_bank.memory.shape:
            raise ValueError(
                f"student_bank and teacher_bank must have one shape, got "
                f"{tuple(student_bank.memory.shape)} and {tuple(teacher_bank.memory.shape)}"
            )
        check_index("indices", indices, 1)
        if indices.shape[0] != student_emb.shape[0]:
            raise ValueError(
                f"indices must have one entry per embedding ({student_emb.shape[0]}), got "
                f"shape {tuple(indices.shape)}"
            )
        if sample_indices is None:
            sample_indices = student_bank.sample(
                indices, self.num_positives, self.num_negatives, generator, self.sampler
            )
        else:
            sample_indices = self.check_sample_indices(
                sample_indices, student_emb.shape[0], student_bank)
        if student_emb.shape != teacher_emb.shape or student_emb.shape[1] != student_bank.dim:
            raise ValueError(
                f"student_emb and teacher_emb must both have shape ({student_emb.shape[0]}, "
                f"{student_bank.dim}) (the banks' embedding size), got "
                f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}"
            )
        check_same_device(student_emb=student_emb, teacher_emb=teacher_emb,
                          student_bank=student_bank.memory, teacher_bank=teacher_bank.memory)
        if student_bank.labels is not teacher_bank.labels and reads_values(student_bank.labels) \
                and not torch.equal(student_bank.labels, teacher_bank.labels):
            differ = int((student_bank.labels != teacher_bank.labels).sum())
            raise ValueError(
                f"student_bank and teacher_bank must hold the same labels (one training set in "
                f"one order); they differ in {differ} of {student_bank.size} rows"
            )
        check_finite("student_emb", student_emb)
        check_finite("teacher_emb", teacher_emb)
        self._check_unit_rows(student_emb=student_emb, teacher_emb=teacher_emb)
        both = self._both(student_emb, teacher_emb, student_bank, teacher_bank,
                          sample_indices.long())
        return CCDTerms(both[0], both[1])

    #: How far a row's L2 norm may be from 1 before :meth:`terms` warns (float16 and bfloat16
    #: embeddings normalised in float32 are within 0.4 %).
    UNIT_NORM_TOLERANCE = 1e-2

    def _check_unit_rows(self, **embeddings: torch.Tensor) -> None:
        """Warns, once per module, where value checks read ``embeddings`` and a row's L2 norm
        is neither 1 (within :attr:`UNIT_NORM_TOLERANCE`) nor 0 (``F.normalize`` of a zero
        row): the critic's scores assume unit rows, and unnormalised ones give a loss of
        another scale without any error."""
        if self.__dict__.get("_warned_norms"):
            return
        for name, x in embeddings.items():
            if not reads_values(x) or x.numel() == 0:
                continue
            norms = torch.linalg.vector_norm(x.detach().float(), dim=1)
            off = ((norms - 1).abs() > self.UNIT_NORM_TOLERANCE) & (norms > 1e-6)
            if bool(off.any()):
                low, high = (float(v) for v in torch.aminmax(norms))
                self.__dict__["_warned_norms"] = True
                warn_at_caller(
                    f"{name} has rows that are not L2-normalised (norms from {low:.3g} to "
                    f"{high:.3g}); CCD expects unit rows, e.g. F.normalize({name}, dim=1) or "
                    f"an EmbeddingHead. Warned once per ClassGuidedContrastiveLoss."
                )
                return

    def _both(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        student_bank: MomentumMemoryBank,
        teacher_bank: MomentumMemoryBank,
        sample_indices: torch.Tensor,
        backend: Backend | None = None,
    ) -> torch.Tensor:
        """``[2]`` (:math:`L_S, L_T`), or ``[2, B]`` unreduced, from checked arguments, on
        ``backend`` (this module's by default; compiled where it says so)."""
        if backend is None:
            backend = self.backend
            if backends.compiles(backend, student_emb.device, step=False):
                out: torch.Tensor = compiled.run(self, True, _both, self, student_emb,
                                                 teacher_emb, student_bank, teacher_bank,
                                                 sample_indices)
                return out
        bank_size = student_bank.size
        return backends.ccd_pair(
            backend, student_emb, teacher_emb, student_bank.read(), teacher_bank.read(),
            sample_indices, self.num_positives, self.temperature,
            lambda raw, scale: self._normalizer(raw, scale, bank_size), self.reduction,
        )

    def check_sample_indices(self, sample_indices: torch.Tensor, batch: int,
                             bank: MomentumMemoryBank) -> torch.Tensor:
        """``sample_indices`` given in place of the sampler's, checked against this loss's
        ``P + K`` and the bank; returned as long.

        Args:
            sample_indices: ``[B, P+K]`` integer bank rows.
            batch: ``B``.
            bank: the bank they index.
        """
        check_index("sample_indices", sample_indices, 2)
        width = self.num_positives + self.num_negatives
        if tuple(sample_indices.shape) != (batch, width):
            raise ValueError(
                f"sample_indices must have shape ({batch}, {width}) "
                f"(num_positives + num_negatives), got {tuple(sample_indices.shape)}"
            )
        check_same_device(sample_indices=sample_indices, memory=bank.memory)
        check_range("sample_indices", sample_indices, bank.size)
        return sample_indices.long()

    @torch.no_grad()
    def _normalizer(self, raw: torch.Tensor, scale: float, bank_size: int) -> torch.Tensor:
        r"""``[2]`` :math:`\log Z` for the ``[2, B, P+K]`` scores ``u = scale * raw`` of both
        directions: estimated from them on the first training call (and, with ``"ema"``,
        moved towards them on every later one), then the buffer."""
        if self.normalizer == "first_batch" and self._initialized:
            return self.log_normalizer
        u = raw * scale
        estimate = torch.stack(
            [distributed.global_log_mean_exp(u[k].detach().to(self.log_normalizer.dtype))
             for k in range(2)]
        ) + math.log(bank_size)
        current = self.log_normalizer
        if self.normalizer == "ema" and self.normalizer_momentum > 0:
            m = self.normalizer_momentum
            moved = torch.logaddexp(current + math.log(m), estimate + math.log1p(-m))
        elif self.normalizer == "ema":
            moved = estimate
        else:
            moved = current
        new = torch.where(self.normalizer_initialized, moved, estimate)
        if self.training:
            self.log_normalizer.copy_(new)
            self.normalizer_initialized.fill_(True)
            self._initialized = True
        return new

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # A Python mirror of `normalizer_initialized`, so a frozen Z costs no work per step.
        self._initialized = bool(self.normalizer_initialized)


def _both(ccd: ClassGuidedContrastiveLoss, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
          student_bank: MomentumMemoryBank, teacher_bank: MomentumMemoryBank,
          sample_indices: torch.Tensor) -> torch.Tensor:
    """:meth:`ClassGuidedContrastiveLoss._both` on the general operators: what the
    ``"compiled"`` backend compiles."""
    return ccd._both(student_emb, teacher_emb, student_bank, teacher_bank, sample_indices,
                     "compiled")
