"""CRCKDLoss: both heads, both banks, CCD and CRP, run in the method's order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from . import _fused, _graphs
from ._checks import (
    check_finite,
    check_float,
    check_index,
    check_nonempty,
    check_range,
    check_same_device,
    check_unit_interval,
    reduce,
    warn_at_caller,
)
from ._fused import Fused
from .contrastive import ClassGuidedContrastiveLoss, Normalizer
from .functional import ScorePath, _relation_per_sample
from .heads import EmbeddingHead, normalize_row_pair
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
        path: ``"auto"``, ``"dense"``, ``"gather"`` or ``"triton"`` (see
            :class:`ClassGuidedContrastiveLoss`).
        num_classes: ``C``; defaults to ``labels.max() + 1``.
        copy_on_write: how the banks are written (see :class:`MomentumMemoryBank`):
            ``"snapshot"`` keeps every tensor in place, for capture in a CUDA graph.
        fused: ``"auto"`` (default) compiles the step after the checks and the sampling
            with inductor (``torch.compile``) where that pays and works: CUDA tensors with
            Triton installed, in one process, outside an outer ``torch.compile``. ``True``
            compiles it on any device, ``False`` never. The compiled step matches the eager
            one to float rounding; the first training calls compile it (once for the first
            step, which estimates :math:`Z`, once for the steady state). Under ``"auto"`` a
            compile failure warns and falls back to eager. With ``path="triton"``,
            ``"auto"`` runs the step eagerly with the Triton kernels; ``True`` compiles it
            and inductor generates its own kernels instead. See :doc:`/howto/gpu`.
        cuda_graphs: ``True`` runs the training step as CUDA graphs without a call of your
            own: the first training call that can be captured after the first (which
            estimates :math:`Z`) calls :meth:`capture_cuda_graphs` for its batch size and
            feature dtype, under its autocast, and every call that fits replays from then
            on. It needs ``copy_on_write="snapshot"``, the module on a CUDA device and one
            process. Calls made while a CUDA graph of your own is being captured (a whole
            step) run eagerly into it, and a load or a move captures again at the next
            call. A capture that fails raises, as :meth:`capture_cuda_graphs` does, with
            the state as it was. ``False`` (default): only an explicit
            :meth:`capture_cuda_graphs` captures.

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
        path: ScorePath = "auto",
        num_classes: int | None = None,
        copy_on_write: bool | Literal["snapshot"] = True,
        fused: Fused = "auto",
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        self.fused: Fused = _fused.check_fused(fused)
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if cuda_graphs and copy_on_write != "snapshot":
            raise ValueError(
                "cuda_graphs=True needs banks written in place: pass copy_on_write='snapshot' "
                f"(got copy_on_write={copy_on_write!r})")
        self.cuda_graphs = cuda_graphs
        for name, value in (("ccd_weight", ccd_weight), ("crp_weight", crp_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        check_unit_interval("momentum", momentum)
        self.ccd_weight = float(ccd_weight)
        self.crp_weight = float(crp_weight)
        self.centroid_relu = bool(centroid_relu)
        self.student_head = EmbeddingHead(student_dim, embed_dim)
        self.teacher_head = EmbeddingHead(teacher_dim, embed_dim)
        self.student_bank = MomentumMemoryBank(labels, embed_dim, momentum, num_classes,
                                               copy_on_write=copy_on_write)
        self.teacher_bank = MomentumMemoryBank(labels, embed_dim, momentum, num_classes,
                                               copy_on_write=copy_on_write)
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
            path=path,
        )
        self.crp = CategoricalRelationLoss(temperature)

    def forward(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        indices: torch.Tensor,
        sample_indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CRCKDOutput:
        """One CRCKD step.

        Args:
            student_feat: ``[B, student_dim]`` student features ``f_S``.
            teacher_feat: ``[B, teacher_dim]`` teacher features ``f_T`` (detached here).
            indices: ``[B]`` dataset indices of the batch (see :class:`IndexedDataset`).
            sample_indices: ``[B, P+K]`` bank rows to use instead of sampling.
            generator: ``torch.Generator`` for the sampler.

        Returns:
            :class:`CRCKDOutput`.
        """
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
        indices = indices.long()
        packed = _graphs.replay_if_captured(self, student_feat, teacher_feat, indices,
                                            sample_indices is None and generator is None)
        if packed is not None:
            # select, not unbind: an unbind's backward makes a zero gradient for every unused
            # output, a select's only for its own
            return CRCKDOutput(*(packed.select(0, i) for i in range(len(CRCKDOutput._fields))))
        rows = self.student_bank._readable(indices)
        ccd = self.ccd
        if sample_indices is None:
            sample_indices = class_guided_indices(
                self.student_bank.layout, rows, ccd.num_positives, ccd.num_negatives,
                generator, ccd.sampler)
        else:
            sample_indices = ccd.check_sample_indices(sample_indices, batch, self.student_bank)
        # The Triton kernels are the fused CCD of path="triton": "auto" leaves that step eager.
        fused = False if self.fused == "auto" and ccd.path == "triton" else self.fused
        out: CRCKDOutput = _fused.run(self, fused, student_feat.device, _step, self,
                                      student_feat, teacher_feat, indices, rows,
                                      sample_indices)
        return out

    def capture_cuda_graphs(self, batch_size: int, num_warmup_iters: int = 3,
                            dtype: torch.dtype | None = None) -> None:
        """Run the training step, forward and backward, as two CUDA graphs from now on.

        An eager step launches each of its kernels from Python; on a GPU that launching, not
        the arithmetic, is most of what CRCKD adds to a training step. After this call, a
        training-mode call with a batch of ``batch_size`` features of the captured dtype copies
        its three inputs into static tensors and replays one graph, and ``backward`` replays
        a second; the rest of your loop (model, optimiser, teacher) stays eager. The capture
        follows ``torch.cuda.make_graphed_callables`` (warm-up calls on a side stream, both
        graphs in one memory pool) and adds what this module needs:

        - the warm-up calls write both banks (and move :math:`Z` under
          ``normalizer="ema"``) from made-up features: the state is saved first and put back
          afterwards, in place, so training continues exactly where it was; the random stream
          is put back too, so a graphed run draws the rows an eager run from the same seed
          would. If the capture fails, the state is put back all the same;
        - the outputs and the gradients leave the graphs in memory of their own: an output
          kept past the next call keeps its value, and gradients accumulate over several
          calls (micro-batches) as they do eagerly;
        - a backward must run before the module's next call (it reads its own call's
          activations and the banks' snapshots, which the next call overwrites, replayed or
          eager); a late one raises;
        - the input checks still run on every call (shapes, devices, and values where
          :func:`~crckd_losses.set_value_checks` reads them; on a GPU it reads none by
          default, and the banks refuse bad rows on the device as in an eager step);
        - a call the graphs were not captured for runs eagerly, on the same banks: another
          batch size (the last partial batch of an epoch), eval mode, ``sample_indices`` or a
          ``generator`` given; and, with a warning the first time, features of another
          dtype or on another device, another autocast state, or other parameters
          requiring gradients.

        Needs: the module on a CUDA device, in training mode, built with
        ``copy_on_write="snapshot"`` (banks written in place: the graphs hold their
        addresses), one process (no ``torch.distributed``), and one eager training step
        before (the first estimates :math:`Z`). Call it where you run the loss: under the
        autocast you train with (the capture turns autocast's cache of weight casts off for
        itself, so that each replay casts the heads' current weights), outside
        ``torch.inference_mode()``. Loading a state dict into the module, or moving or
        casting it, releases the graphs (a warning says so); call this again. A copy or a
        pickle of the module leaves them behind. Do not write the banks yourself between
        replays. See :doc:`/howto/gpu` ("Graphing only the loss").

        Args:
            batch_size: ``B`` of the calls to replay.
            num_warmup_iters: eager calls before the capture, on made-up features (compiling
                with ``fused`` happens there).
            dtype: the dtype of the features the calls pass; by default the heads'. Under
                autocast a backbone's features are often of the autocast dtype: pass it.

        Raises:
            ValueError: where one of the needs above is not met.
            RuntimeError: on a second call.
        """
        self.__dict__["_graphs"] = _graphs.capture(self, batch_size, num_warmup_iters, dtype)

    @property
    def cuda_graph_replays(self) -> int:
        """How many calls replayed the graphs of :meth:`capture_cuda_graphs` (0 without
        them)."""
        graphs: _graphs.Graphs | None = self.__dict__.get("_graphs")
        return 0 if graphs is None else graphs.replays[0]

    def _release_graphs(self, why: str) -> None:
        if self.__dict__.pop("_graphs", None) is not None and not self.cuda_graphs:
            warn_at_caller(f"{why} released the CUDA graphs of capture_cuda_graphs(); call it "
                           "again to replay")

    def __getstate__(self) -> dict[str, Any]:
        # The graphs hold this module's addresses: a copy (copy.deepcopy) or a pickle leaves
        # them behind and runs eagerly (with cuda_graphs=True it captures its own).
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call, unused-ignore]
        return {k: v for k, v in state.items() if k not in ("_graphs", "_capturing")}

    def _apply(self, fn: Any, recurse: bool = True) -> CRCKDLoss:
        self._release_graphs("moving or casting the module")
        return super()._apply(fn, recurse)  # type: ignore[no-any-return, no-untyped-call, unused-ignore]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._release_graphs("load_state_dict")
        super()._load_from_state_dict(*args, **kwargs)


def _step(crckd: CRCKDLoss, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
          indices: torch.Tensor, rows: torch.Tensor, sample_indices: torch.Tensor
          ) -> CRCKDOutput:
    """Steps 1-5 of :class:`CRCKDLoss` on checked inputs and drawn samples; what the fused
    path compiles."""
    # Both heads' normalisations in one computation (the same values as the heads' own).
    g_s, g_t = normalize_row_pair(crckd.student_head.project(student_feat),
                                  crckd.teacher_head.project(teacher_feat.detach()))
    both = crckd.ccd._both(g_s, g_t, crckd.student_bank, crckd.teacher_bank, sample_indices)
    banks = (crckd.student_bank, crckd.teacher_bank)
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
    # Both banks' centroids in one [2, C, d] tensor, 1/tau folded in.
    scaled = centroids_of(banks, crckd.centroid_relu, scale=1.0 / crckd.crp.temperature)
    crp = reduce(_relation_per_sample(g_s, g_t.detach(), scaled[0], scaled[1], 1.0),
                 crckd.crp.reduction)
    ccd_loss = both.sum(dim=0)
    loss = torch.add(ccd_loss * crckd.ccd_weight, crp, alpha=crckd.crp_weight)
    return CRCKDOutput(loss, ccd_loss, crp, both[0], both[1])
