"""MomentumMemoryBank: one row per training sample, with labels, updates, sampling, centroids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from ._cache import built_once
from ._checks import (
    as_label_tensor,
    check_choice,
    check_finite,
    check_float,
    check_index,
    check_nonempty,
    check_positive_int,
    check_range,
    check_same_device,
    check_unit_interval,
    reads_values,
    warn_at_caller,
)
from .sampling import (
    SAMPLERS,
    ClassLayout,
    Sampler,
    class_anchor_indices,
    class_guided_indices,
)


class MomentumMemoryBank(nn.Module):
    r"""A momentum memory bank ``M`` (method §3): ``N x d`` rows addressed by dataset index.

    The bank's size and every row's class come from ``labels``, the training set's label
    tensor, so the bank always matches the data.

    Rows start i.i.d. uniform in :math:`[-s, s]`, :math:`s = 1/\sqrt{d/3}`, not normalised.
    :meth:`update` writes :math:`M[i] \leftarrow \mathrm{normalise}(m M[i] + (1-m) g_i)`.

    Args:
        labels: ``[N]`` integer class ids of the training set, in ``[0, C)``: a tensor, a numpy
            array or any integer sequence (such as a torchvision dataset's ``.targets``).
        dim: ``d``, the embedding size.
        momentum: ``m`` in ``[0, 1)``; the paper uses 0.5.
        num_classes: ``C``; defaults to ``labels.max() + 1``. Every class must have a row.
        copy_on_write: how :meth:`update` writes, given that the method's order updates the
            banks between the contrastive forward and the backward:

            - ``True`` (default): into a new tensor instead of the old one, so a loss whose
              graph read the bank before the update still backpropagates through the values
              it read;
            - ``False``: in place, saving one ``N x d`` copy per update; then call
              :meth:`update` only after ``backward``;
            - ``"snapshot"``: in place, and the losses read the rows through :meth:`read`, a
              static snapshot copied at each read. Every tensor keeps its address from step to
              step, so the whole step can be captured in a CUDA graph (see the GPU how-to).
        generator: a ``torch.Generator`` for the initial rows.
        dtype: dtype of the rows (float32 by default).

    Attributes:
        memory: ``[N, d]`` buffer, the rows.
        labels: ``[N]`` long buffer, the class of each row.
        rejected_rows: 0-d long buffer (not saved), the copies :meth:`update` refused
            (non-finite, or an index out of range) since the bank was built.

    Examples:
        >>> labels = torch.tensor([0, 0, 1, 1, 1, 2])
        >>> bank = MomentumMemoryBank(labels, dim=4)
        >>> bank.update(torch.tensor([0, 2]), F.normalize(torch.randn(2, 4), dim=1))
        >>> idx = bank.sample(torch.tensor([0, 2]), num_positives=2, num_negatives=3)
        >>> idx.shape
        torch.Size([2, 5])
        >>> bank.centroids().shape
        torch.Size([3, 4])
    """

    memory: torch.Tensor
    labels: torch.Tensor
    rejected_rows: torch.Tensor
    _order: torch.Tensor
    _class_start: torch.Tensor
    _class_count: torch.Tensor
    _row_info: torch.Tensor

    def __init__(
        self,
        labels: torch.Tensor | Sequence[int],
        dim: int = 128,
        momentum: float = 0.5,
        num_classes: int | None = None,
        copy_on_write: bool | Literal["snapshot"] = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        labels = as_label_tensor("labels", labels)
        check_positive_int("dim", dim)
        self.momentum = check_unit_interval("momentum", momentum)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0:
            raise ValueError(f"labels must be >= 0, got a minimum of {low}")
        if num_classes is None:
            num_classes = high + 1
        check_positive_int("num_classes", num_classes)
        if high >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got a maximum of {high}")
        counts = torch.bincount(labels, minlength=num_classes)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"every class in [0, {num_classes}) needs at least one row in labels; classes "
                f"{empty} have none. The bank only groups rows by class, so give it consecutive "
                "class ids: labels = torch.unique(labels, return_inverse=True)[1]"
            )
        if num_classes < 2:
            raise ValueError("labels must hold at least 2 classes, so that negatives exist")
        self.num_classes = num_classes
        self.dim = dim
        if copy_on_write not in (True, False, "snapshot"):
            raise ValueError(
                f"copy_on_write must be True, False or 'snapshot', got {copy_on_write!r}")
        self.copy_on_write: bool | Literal["snapshot"] = copy_on_write
        self._synced = False
        bound = 1.0 / math.sqrt(dim / 3.0)
        rows = torch.rand(labels.shape[0], dim, generator=generator, dtype=dtype, device="cpu")
        self.register_buffer("memory", (rows * 2 - 1).mul_(bound).to(labels.device))
        self.register_buffer("labels", labels)
        # Class-sorted index order, built once (see sampling.ClassLayout).
        layout = ClassLayout.from_labels(labels, num_classes)
        self.register_buffer("_order", layout.order, persistent=False)
        self.register_buffer("_class_count", layout.sizes, persistent=False)
        self.register_buffer("_class_start", layout.starts, persistent=False)
        self.register_buffer("_row_info", layout.row_info, persistent=False)
        self._size_range = layout.size_range  # host ints: the labels never change
        self._warned_negatives = False
        # Rows that update() refused (non-finite, or an index out of range), counted on the
        # device so that no step waits for it; read it when you like (a sync on a GPU).
        self.register_buffer("rejected_rows", torch.zeros((), dtype=torch.long,
                                                          device=labels.device), persistent=False)

    @property
    def size(self) -> int:
        """``N``, the number of rows."""
        return int(self.memory.shape[0])

    def read(self) -> torch.Tensor:
        """The rows as a loss should read them this step (``[N, d]``, a constant).

        With ``copy_on_write="snapshot"``, a copy into a buffer allocated once, so that the
        in-place update later in the step leaves what the backward needs untouched; otherwise
        ``memory`` itself.
        """
        if self.copy_on_write != "snapshot":
            return self.memory
        snapshot = self.__dict__.get("_snapshot")
        if snapshot is None or snapshot.shape != self.memory.shape or \
                snapshot.dtype != self.memory.dtype or snapshot.device != self.memory.device:
            snapshot = torch.empty_like(self.memory)
            self.__dict__["_snapshot"] = snapshot
        with torch.no_grad():
            snapshot.copy_(self.memory)
        return snapshot

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, num_classes={self.num_classes}, "
            f"momentum={self.momentum}, copy_on_write={self.copy_on_write}"
        )

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        check_index("indices", indices, 1)
        check_nonempty("indices", indices)
        check_same_device(indices=indices, memory=self.memory)
        check_range("indices", indices, self.size)
        return indices.long()

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        r"""Momentum update at ``indices`` (method §3), without gradient.

        :math:`M[i] \leftarrow \mathrm{normalise}(m M[i] + (1-m) f_i)`.

        An index may appear more than once (a sampler with replacement, such as
        ``WeightedRandomSampler``, or two ranks holding one sample): its row is then updated
        once, from the **last** occurrence's feature, as if the earlier writes had been
        overwritten (under ``torch.distributed``, the highest rank's last occurrence). No host
        sync is needed for this.

        An index out of range or a non-finite feature raises a ``ValueError`` where values are
        read (CPU tensors by default, see :func:`~crckd_losses.set_value_checks`). Where they
        are not, the copy is refused on the device: nothing is written for it (an in-range
        row keeps its last valid copy's write), and ``rejected_rows`` counts it.

        Under ``torch.distributed`` the indices and features of all ranks are gathered first,
        so every rank holds the same bank; the first update also copies rank 0's initial rows
        to every rank. A call that raises leaves the bank unchanged.

        Args:
            indices: ``[B]`` integer dataset indices.
            features: ``[B, d]`` float embeddings (detached here).
        """
        indices = self._check_indices(indices)
        check_float("features", features, 2)
        if features.shape != (indices.shape[0], self.dim):
            raise ValueError(
                f"features must have shape ({indices.shape[0]}, {self.dim}) to match indices, "
                f"got {tuple(features.shape)}"
            )
        check_same_device(features=features, memory=self.memory)
        check_finite("features", features)
        self._sync_once()
        indices, (features,) = gather_rows(indices, features.detach())
        self._write(plan_write(indices, self.labels, features))

    def _sync_once(self) -> None:
        """On the first write under ``torch.distributed``, rank 0's initial rows to every rank.

        Ranks drew their random initial rows from their own generators. Done at the first
        write, not in ``__init__``, because then the bank is on the device its process group
        communicates on.
        """
        if not self._synced and distributed.world_size() > 1:
            distributed.broadcast_(self.memory)
        self._synced = True

    def _write(self, plan: WritePlan) -> None:
        """The momentum update of ``plan`` (its features gathered)."""
        write_banks([self], plan)

    @property
    def layout(self) -> ClassLayout:
        """The bank's class-sorted row order (:class:`~crckd_losses.sampling.ClassLayout`)."""
        return ClassLayout(self.labels, self._order, self._class_start, self._class_count,
                           self._row_info, self._known_size_range())

    def _known_size_range(self) -> tuple[int, int] | None:
        """The smallest and largest class size, kept on the host; ``None`` for a bank pickled
        whole by a version without them."""
        known: tuple[int, int] | None = self.__dict__.get("_size_range")
        return known

    @property
    def max_distinct_negatives(self) -> int:
        """The largest ``K`` for which every anchor's negatives are distinct rows: ``N`` minus
        the size of the largest class. Above it, anchors of the largest class (and, past
        ``N - n_c``, of class ``c``) draw their negatives with replacement."""
        known = self._known_size_range()
        return self.size - (known[1] if known is not None else int(self._class_count.max()))

    def warn_if_negatives_repeat(self, num_negatives: int) -> None:
        """Warn, once per bank, when ``num_negatives`` is larger than the bank itself, so that
        every anchor's negatives repeat rows. The warning points at the user's own line.

        Args:
            num_negatives: ``K``.
        """
        if num_negatives > self.size and not self._warned_negatives:
            self._warned_negatives = True
            warn_at_caller(
                f"num_negatives={num_negatives} is larger than the bank ({self.size} rows): "
                "every anchor's negatives are drawn with replacement. The largest value with "
                f"distinct negatives for every anchor is {self.max_distinct_negatives} "
                f"(bank size minus its largest class); pass num_negatives=min(4096, "
                f"{self.max_distinct_negatives}) or similar to fit this dataset"
            )

    @torch.no_grad()
    def sample(
        self,
        indices: torch.Tensor,
        num_positives: int,
        num_negatives: int,
        generator: torch.Generator | None = None,
        sampler: Sampler = "independent",
    ) -> torch.Tensor:
        """Class-guided row indices for each anchor (method §4), vectorised on the bank's device.

        Column 0 is the anchor's own row; columns ``1..P-1`` are rows of the anchor's class,
        a uniform draw without replacement where the class has at least ``P-1`` rows and
        i.i.d. with replacement otherwise; the last ``K`` columns are rows of other classes,
        without replacement where at least ``K`` exist and i.i.d. with replacement otherwise.

        - ``"independent"`` (default): every anchor's draw has exactly that law, independently
          of the others. It costs ``O(B x N)`` random numbers and a ``topk`` per call.
        - ``"shuffle"`` (faster on a CPU where ``K`` is large): each anchor's draw has the same
          law on its own, but anchors of one class in one call take windows of one shared
          permutation, so their sets are not independent of each other.

        See :mod:`crckd_losses.sampling` for both. ``K`` larger than the whole bank warns once
        per bank (:meth:`warn_if_negatives_repeat`).

        Raises:
            ValueError: ``P`` larger than the bank, indices out of range, an unknown
                ``sampler``.

        Args:
            indices: ``[B]`` dataset indices of the anchors.
            num_positives: ``P >= 1`` (column 0 included).
            num_negatives: ``K >= 1``.
            generator: a ``torch.Generator`` on the bank's device, for reproducible draws.
            sampler: ``"independent"`` or ``"shuffle"``.

        Returns:
            ``[B, P+K]`` long tensor of row indices.
        """
        indices = self._check_indices(indices)
        check_positive_int("num_positives", num_positives)
        check_positive_int("num_negatives", num_negatives)
        check_choice("sampler", sampler, SAMPLERS)
        if num_positives > self.size:
            raise ValueError(
                f"num_positives={num_positives} is larger than the bank ({self.size} rows); "
                f"use at most {self.size}"
            )
        self.warn_if_negatives_repeat(num_negatives)
        return class_guided_indices(self.layout, self._readable(indices), num_positives,
                                    num_negatives, generator, sampler)

    def _readable(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` safe to read rows at: where their values were not checked (see
        :func:`~crckd_losses.set_value_checks`), clamped into the bank rather than read out of
        bounds; the update refuses such a row."""
        return indices if reads_values(indices) else indices.clamp(0, self.size - 1)

    @torch.no_grad()
    def centroids(self, relu: bool = True) -> torch.Tensor:
        """Class centroids of the bank, ``[C, d]``, L2-normalised (method §3): one
        ``index_add_`` over the rows, in float32 or wider
        (:func:`~crckd_losses.functional.class_centroids`).

        Args:
            relu: apply ReLU to the rows before averaging (the released code's default).
        """
        return centroids_of([self], relu)[0]

    @torch.no_grad()
    def class_anchor_indices(
        self, per_class: int = 30, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Rows for the CRP ablation (method §5): ``per_class`` random rows of each class.

        Rows are drawn without replacement where a class has enough (else each row of the
        class appears as evenly as possible). Index both banks with the same result, so that
        student and teacher relate to the same samples.

        Args:
            per_class: rows per class.
            generator: a ``torch.Generator`` on the bank's device.

        Returns:
            ``[C * per_class]`` long row indices, class by class.
        """
        check_positive_int("per_class", per_class)
        return class_anchor_indices(self.layout, per_class, generator)

    @torch.no_grad()
    def class_anchors(
        self, per_class: int = 30, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The CRP ablation's anchors: the rows :meth:`class_anchor_indices` draws, no ReLU.

        For a student/teacher pair, draw the indices once and index both banks' ``memory``
        with them (or pass generators with the same seed), so both sides use the same rows.

        Args:
            per_class: rows per class.
            generator: a ``torch.Generator`` on the bank's device.

        Returns:
            ``[C * per_class, d]``, class by class.
        """
        return self.memory[self.class_anchor_indices(per_class, generator)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[no-untyped-def]
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "labels"
        if key in state_dict:
            saved = state_dict[key]
            if saved.shape != self.labels.shape:
                error_msgs.append(
                    f"{key}: the saved bank has {saved.shape[0]} rows and this one "
                    f"{self.labels.shape[0]}; it was built for another training set"
                )
                return
            if not torch.equal(saved.to(self.labels.device), self.labels):
                differ = int((saved.to(self.labels.device) != self.labels).sum())
                error_msgs.append(
                    f"{key}: the saved bank's labels differ from this bank's in {differ} of "
                    f"{self.labels.shape[0]} rows; it was built for another training set "
                    "(or the dataset's order changed)"
                )
                return
        # Versions up to 0.2 saved running class sums beside the rows; the centroids are now
        # reduced from the rows, so the sums are dropped.
        state_dict.pop(prefix + "class_sums", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class WritePlan(NamedTuple):
    """Where one bank update writes, shared by the banks that take the same indices.

    Attributes:
        rows: ``[B]`` long bank rows, in range (an out-of-range index is clamped, and its copy
            then writes back what the row already holds).
        source: ``[B]`` long, the position whose feature each copy writes: the last valid copy
            of the same row.
        written: ``[B, 1]`` bool, whether the row takes a new value at all.
        rejected: 0-d long, the copies refused (non-finite feature, index out of range).
        features: ``[D, B, d]``, each bank's features (a view of the input).
    """

    rows: torch.Tensor
    source: torch.Tensor
    written: torch.Tensor
    rejected: torch.Tensor
    features: torch.Tensor


def plan_write(indices: torch.Tensor, labels: torch.Tensor, *features: torch.Tensor,
               rows: torch.Tensor | None = None) -> WritePlan:
    """The :class:`WritePlan` of an update at ``indices`` (``[B]`` long) of a bank with row
    classes ``labels`` (``[N]``), given each bank's ``[B, d]`` features: a copy is valid when
    its index is in range and its features are finite in every bank. ``rows`` may pass
    ``indices`` already clamped to ``[0, N)``. No host sync."""
    size = labels.shape[0]
    if rows is None:
        rows = indices.clamp(0, size - 1)
    joined = features[0] if len(features) == 1 else torch.cat(features, dim=1)
    # A copy is refused where a feature is NaN or +-Inf, or where clamping moved its index.
    # The row's largest magnitude (max norm: no square to overflow) is NaN or Inf exactly where
    # a feature is. Not a product with 0, which NaN propagates through in eager code:
    # inductor (torch 2.11 to 2.13) folds x * 0 to 0, and compiled, such rows got in.
    finite = torch.linalg.vector_norm(joined, ord=math.inf, dim=1) < math.inf
    refused = finite <= (indices != rows)  # on booleans: not finite, or out of range
    positions = _positions(indices.shape[0], indices.device)
    last = torch.full((size,), -1, dtype=torch.long, device=indices.device)
    last.scatter_reduce_(0, rows, positions.masked_fill(refused, -1), reduce="amax")
    source = last.index_select(0, rows)
    stacked = joined.view(joined.shape[0], len(features), -1).transpose(0, 1)  # [D, B, d]
    return WritePlan(rows, source.clamp_min(0), (source >= 0).unsqueeze(1), refused.sum(),
                     stacked)


_POSITIONS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _positions(count: int, device: torch.device) -> torch.Tensor:
    """``arange(count)`` on ``device``, built once per size in eager code."""
    return built_once(_POSITIONS, (count, device), lambda: torch.arange(count, device=device))


@torch.no_grad()
def write_banks(banks: Sequence[MomentumMemoryBank], plan: WritePlan) -> None:
    """The momentum update of every bank in ``banks`` at the rows of one ``plan``, bank ``k``
    with the plan's ``features[k]``. Banks of one dtype and momentum are updated in one
    stacked computation (CRCKD's student and teacher banks), others one by one."""
    first = banks[0]
    if any(b.memory.dtype != first.memory.dtype or b.momentum != first.momentum
           for b in banks[1:]):
        for k, bank in enumerate(banks):
            write_banks([bank], plan._replace(features=plan.features[k:k + 1]))
        return
    old = _stack([b.memory.index_select(0, plan.rows) for b in banks])  # [D, B, d]
    # Every copy of a repeated index computes the same new row (from the last valid copy's
    # feature; the old row where there is none), so duplicate writes agree whatever order
    # the device applies them in.
    update = plan.features.index_select(1, plan.source)
    update = update if update.dtype == old.dtype else update.to(old.dtype)
    # lerp(f, M, m) = m M + (1 - m) f
    new = torch.where(plan.written, F.normalize(torch.lerp(update, old, first.momentum), dim=2),
                      old)
    for k, bank in enumerate(banks):
        if bank.copy_on_write is True:
            bank.memory = bank.memory.index_copy(0, plan.rows, new[k])
        else:
            bank.memory.index_copy_(0, plan.rows, new[k])
    counters = [b.rejected_rows for b in banks]
    if len(counters) == 1:
        counters[0].add_(plan.rejected)
    else:
        # The list form: the one-tensor form reads the value on the host.
        torch._foreach_add_(counters, [plan.rejected] * len(counters))


@torch.no_grad()
def centroids_of(banks: Sequence[MomentumMemoryBank], relu: bool = True, scale: float = 1.0
                 ) -> torch.Tensor:
    """``[D, C, d]``: the :meth:`~MomentumMemoryBank.centroids` of ``D`` banks of one shape
    and labels, times ``scale``, in one stacked reduction (float32 or wider)."""
    first = banks[0]
    rows = _stack([b.memory for b in banks])
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    if relu:
        rows = rows.clamp_min(0)
    sums = rows.new_zeros(len(banks), first.num_classes, first.dim).index_add_(
        1, first.labels, rows)
    # normalise(sum / n_c) = normalise(sum): the class size only scales the row.
    norm = torch.linalg.vector_norm(sums, dim=2, keepdim=True).clamp_min(1e-12)
    out: torch.Tensor = sums / norm if scale == 1.0 else sums / (norm * (1.0 / scale))
    return out.to(first.memory.dtype)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def gather_rows(indices: torch.Tensor, *features: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Every rank's ``indices`` and feature sets, in one all-gather for all the sets (the
    inputs unchanged outside ``torch.distributed``)."""
    if distributed.world_size() == 1:
        return indices, features
    indices, joined = distributed.gather_for_update(indices, torch.cat(features, dim=1))
    return indices, tuple(torch.split(joined, [f.shape[1] for f in features], dim=1))
