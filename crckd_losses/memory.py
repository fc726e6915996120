"""MomentumMemoryBank: one row per training sample, with labels, updates, sampling, centroids."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from ._checks import (
    check_finite,
    check_float,
    check_index,
    check_nonempty,
    check_positive_int,
    check_range,
    check_same_device,
    check_unit_interval,
    value_checks_enabled,
)
from .functional import class_centroids

Sampler = Literal["shuffle", "independent"]


class MomentumMemoryBank(nn.Module):
    r"""A momentum memory bank ``M`` (method §3): ``N x d`` rows addressed by dataset index.

    The bank's size and every row's class come from ``labels``, the training set's label
    tensor, so the bank always matches the data.

    Rows start i.i.d. uniform in :math:`[-s, s]`, :math:`s = 1/\sqrt{d/3}`, not normalised.
    :meth:`update` writes :math:`M[i] \leftarrow \mathrm{normalise}(m M[i] + (1-m) g_i)`.

    Args:
        labels: ``[N]`` integer tensor, the class of every training sample, in ``[0, C)``.
        dim: ``d``, the embedding size.
        momentum: ``m`` in ``[0, 1)``; the paper uses 0.5.
        num_classes: ``C``; defaults to ``labels.max() + 1``. Every class must have a row.
        copy_on_write: when ``True`` (default), :meth:`update` writes into a new tensor instead
            of the old one, so a loss whose graph read the bank before the update still
            backpropagates through the values it read (the method's order updates the banks between
            the contrastive forward and the backward). ``False`` writes in place, saving one
            ``N x d`` copy per update; then call :meth:`update` only after ``backward``.
        generator: a ``torch.Generator`` for the initial rows.
        dtype: dtype of the rows (float32 by default).

    Attributes:
        memory: ``[N, d]`` buffer, the rows.
        labels: ``[N]`` long buffer, the class of each row.
        class_sums: ``[2, C, d]`` float64 buffer, per-class sums of the rows and of their
            ReLU, which :meth:`centroids` reads; kept current by :meth:`update`.

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
    class_sums: torch.Tensor
    _order: torch.Tensor
    _class_start: torch.Tensor
    _class_count: torch.Tensor

    def __init__(
        self,
        labels: torch.Tensor,
        dim: int = 128,
        momentum: float = 0.5,
        num_classes: int | None = None,
        copy_on_write: bool = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_index("labels", labels, 1)
        check_nonempty("labels", labels)
        check_positive_int("dim", dim)
        self.momentum = check_unit_interval("momentum", momentum)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        labels = labels.detach().long()
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
                f"every class needs at least one row in labels; classes {empty} have none"
            )
        if num_classes < 2:
            raise ValueError("labels must hold at least 2 classes, so that negatives exist")
        self.num_classes = num_classes
        self.dim = dim
        self.copy_on_write = bool(copy_on_write)
        self._synced = False
        bound = 1.0 / math.sqrt(dim / 3.0)
        rows = torch.rand(labels.shape[0], dim, generator=generator, dtype=dtype, device="cpu")
        self.register_buffer("memory", (rows * 2 - 1).mul_(bound).to(labels.device))
        self.register_buffer("labels", labels)
        # Class-sorted index order, built once: class c occupies
        # _order[_class_start[c] : _class_start[c] + _class_count[c]].
        self.register_buffer("_order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("_class_count", counts, persistent=False)
        self.register_buffer(
            "_class_start", torch.cumsum(counts, 0) - counts, persistent=False
        )
        # Per-class sums of the rows ([0]) and of their ReLU ([1]), float64, kept current by
        # update() in O(B d) so that centroids() need not reduce the whole bank every step.
        # They are saved with the bank, so a resumed run continues from the very same sums.
        # `_sums_of` holds the memory tensor and version they describe; any other write (a
        # direct edit, a replaced tensor) makes centroids() rebuild them from the bank.
        self.register_buffer(
            "class_sums", torch.zeros(2, num_classes, dim, dtype=torch.float64,
                                      device=labels.device)
        )
        self._sums_of: tuple[torch.Tensor, int] | None = None

    @property
    def size(self) -> int:
        """``N``, the number of rows."""
        return int(self.memory.shape[0])

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

        Under ``torch.distributed`` the indices and features of all ranks are gathered first,
        so every rank holds the same bank; the first update also copies rank 0's initial rows
        to every rank. A call that raises leaves the bank unchanged.

        Args:
            indices: ``[B]`` integer dataset indices, distinct within a step.
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
        if not self._synced and distributed.world_size() > 1:
            # Ranks drew their random initial rows from their own generators: start every
            # rank from rank 0's rows. Done here, not in __init__, because here the bank is on
            # the device its process group communicates on.
            distributed.broadcast_(self.memory)
            self._drop_class_sums()
        self._synced = True
        indices, features = distributed.gather_for_update(indices, features.detach())
        sums_current = self._class_sums_current()
        old = self.memory.index_select(0, indices)
        new = F.normalize(old * self.momentum + features.to(old.dtype) * (1 - self.momentum), dim=1)
        if self.copy_on_write:
            self.memory = self.memory.index_copy(0, indices, new)
        else:
            self.memory.index_copy_(0, indices, new)
        if sums_current:
            y = self.labels[indices]
            dtype = self.class_sums.dtype  # float64 unless the module was cast
            self.class_sums[0].index_add_(0, y, (new - old).to(dtype))
            self.class_sums[1].index_add_(0, y, (new.clamp_min(0) - old.clamp_min(0)).to(dtype))
            self._sums_of = (self.memory, self.memory._version)
        else:
            self._drop_class_sums()

    def _class_sums_current(self) -> bool:
        if torch.compiler.is_compiling():
            return False  # traced code reduces the whole bank and keeps no running sums
        described = self._sums_of
        return (
            described is not None
            and described[0] is self.memory
            and described[1] == self.memory._version
        )

    def _drop_class_sums(self) -> None:
        self._sums_of = None

    @torch.no_grad()
    def _rebuild_class_sums(self) -> None:
        rows = self.memory.to(self.class_sums.dtype)
        self.class_sums.zero_()
        self.class_sums[0].index_add_(0, self.labels, rows)
        self.class_sums[1].index_add_(0, self.labels, rows.clamp_min(0))
        self._sums_of = (self.memory, self.memory._version)

    @torch.no_grad()
    def sample(
        self,
        indices: torch.Tensor,
        num_positives: int,
        num_negatives: int,
        generator: torch.Generator | None = None,
        sampler: Sampler = "shuffle",
    ) -> torch.Tensor:
        """Class-guided row indices for each anchor (method §4), vectorised on the bank's device.

        Column 0 is the anchor's own row; columns ``1..P-1`` are rows of the anchor's class,
        without replacement while the class has at least ``P-1`` rows; the last ``K`` columns
        are rows of other classes, without replacement while at least ``K`` exist.

        Two samplers give each anchor exactly that distribution:

        - ``"shuffle"`` (default, fast): one random permutation of the bank per call; each
          anchor takes a window, at its own random offset, of its class's rows and of the other
          classes' rows in that permutation. Anchors of one class in one batch draw from the
          same shuffle, so their sets are correlated (not independent); each set on its own is
          a uniform draw. When a class has fewer rows than the window, the window wraps, so
          each row appears as evenly as possible instead of i.i.d. with replacement. Its
          working memory is a few ``C x N`` and ``C x (N + K)`` int64 tables per call, so it
          grows with the number of classes.
        - ``"independent"``: a fresh uniform draw for every anchor, as the released code does
          per item (with replacement, i.i.d., where too few rows exist). It costs
          ``O(B x N)`` random numbers per call.

        Raises:
            ValueError: ``P`` larger than the bank, indices out of range, an unknown
                ``sampler``. A ``K`` larger than the bank only warns: the draws then repeat
                rows, as the released code's do on APTOS.

        Args:
            indices: ``[B]`` dataset indices of the anchors.
            num_positives: ``P >= 1`` (column 0 included).
            num_negatives: ``K >= 1``.
            generator: a ``torch.Generator`` on the bank's device, for reproducible draws.
            sampler: ``"shuffle"`` or ``"independent"``.

        Returns:
            ``[B, P+K]`` long tensor of row indices.
        """
        indices = self._check_indices(indices)
        check_positive_int("num_positives", num_positives)
        check_positive_int("num_negatives", num_negatives)
        if num_positives > self.size:
            raise ValueError(
                f"num_positives={num_positives} is larger than the bank ({self.size} rows); "
                f"use at most {self.size}"
            )
        if num_negatives > self.size:
            # Allowed (the paper's K = 4096 on a 2,930-image APTOS fold), but worth a word: no
            # anchor can have K distinct negatives, so every set repeats rows.
            warnings.warn(
                f"num_negatives={num_negatives} is larger than the bank ({self.size} rows): "
                "every anchor's negatives repeat rows (drawn with replacement)",
                stacklevel=3,  # past torch.no_grad's wrapper, to the caller of sample()
            )
        if sampler == "shuffle":
            return self._sample_shuffle(indices, num_positives, num_negatives, generator)
        if sampler == "independent":
            return self._sample_independent(indices, num_positives, num_negatives, generator)
        raise ValueError(f"sampler must be 'shuffle' or 'independent', got {sampler!r}")

    def _sample_shuffle(
        self,
        indices: torch.Tensor,
        num_positives: int,
        num_negatives: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        n, device = self.size, self.memory.device
        y = self.labels[indices]
        # One uniform shuffle of the bank. For class c, `same[c]` lists its rows and `other[c]`
        # the rows of every other class, each in shuffled order (so each a uniform random
        # permutation of its set), compacted to the front of a row of length n.
        perm = torch.randperm(n, device=device, generator=generator)
        classes = torch.arange(self.num_classes, device=device)
        is_same = self.labels[perm].unsqueeze(0) == classes[:, None]  # [C, N]
        same_rank = torch.cumsum(is_same, dim=1) - 1
        other_rank = torch.arange(n, device=device) - same_rank - 1
        slots = torch.where(is_same, same_rank, other_rank + n)  # same: [0, n_c), other: n + ...
        table = torch.empty(self.num_classes, 2 * n, dtype=torch.long, device=device)
        table.scatter_(1, slots, perm.expand(self.num_classes, n))
        count = self._class_count
        offsets = torch.rand(indices.shape[0], 2, device=device, generator=generator,
                             dtype=torch.float64)
        parts = [indices.unsqueeze(1)]
        if num_positives > 1:
            parts.append(self._windows(table[:, :n], count, y, offsets[:, 0], num_positives - 1))
        parts.append(self._windows(table[:, n:], n - count, y, offsets[:, 1], num_negatives))
        return torch.cat(parts, dim=1)

    @staticmethod
    def _windows(
        rows: torch.Tensor,
        length: torch.Tensor,
        y: torch.Tensor,
        offset: torch.Tensor,
        width: int,
    ) -> torch.Tensor:
        """``width`` consecutive entries of the cyclic sequence ``rows[c, :length[c]]`` per anchor,
        starting at ``floor(offset * length)``: a uniform draw without replacement while
        ``length >= width``, and each entry as often as possible beside the others otherwise."""
        classes, n = rows.shape
        span = n - 1 + width  # the furthest a window can reach: start <= n - 1
        position = torch.arange(span, device=rows.device).unsqueeze(0) % length[:, None]
        cyclic = rows.gather(1, position)  # [C, span], row c repeats its first length[c] entries
        start = (offset * length[y]).long().clamp_max(length[y] - 1)
        # Each window is a contiguous slice of one row: unfold makes them views, indexing copies.
        return cyclic.unfold(1, width, 1)[y, start]

    def _sample_independent(
        self,
        indices: torch.Tensor,
        num_positives: int,
        num_negatives: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        n = self.size
        y = self.labels[indices]
        count = self._class_count[y]
        same = self.labels.unsqueeze(0) == y.unsqueeze(1)  # [B, N]
        parts = [indices.unsqueeze(1)]
        if num_positives > 1:
            parts.append(
                self._draw(same, count, num_positives - 1, self._class_start[y], generator)
            )
        rest_start = torch.zeros_like(y)
        parts.append(self._draw(~same, n - count, num_negatives, rest_start, generator, y=y))
        return torch.cat(parts, dim=1)

    def _draw(
        self,
        allowed: torch.Tensor,
        available: torch.Tensor,
        k: int,
        class_start: torch.Tensor,
        generator: torch.Generator | None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``k`` allowed rows per anchor: without replacement where ``available >= k``."""
        device = allowed.device
        keys = torch.rand(allowed.shape, device=device, generator=generator)
        keys = keys.masked_fill(~allowed, 2.0)
        k_top = min(k, allowed.shape[1])
        without = keys.topk(k_top, dim=1, largest=False, sorted=False).indices
        if k_top < k:  # only rows with too few allowed rows need it, and those are replaced
            without = without.repeat(1, -(-k // k_top))[:, :k]
        # With replacement: uniform positions in the allowed set, mapped through the
        # class-sorted order (for negatives, skipping the anchor's class block).
        u = torch.rand(allowed.shape[0], k, device=device, generator=generator, dtype=torch.float64)
        pos = (u * available[:, None]).long().clamp_max(available[:, None] - 1)
        if y is None:
            replaced = self._order[class_start[:, None] + pos]
        else:
            block_start = self._class_start[y][:, None]
            block_count = self._class_count[y][:, None]
            pos = torch.where(pos >= block_start, pos + block_count, pos)
            replaced = self._order[pos]
        return torch.where((available >= k)[:, None], without, replaced)

    @torch.no_grad()
    def centroids(self, relu: bool = True) -> torch.Tensor:
        """Class centroids of the bank, ``[C, d]``, L2-normalised (method §3).

        The first call reduces the whole bank in one ``index_add_``
        (:func:`~crckd_losses.functional.class_centroids`); the per-class sums are then kept
        current by :meth:`update` from the rows it changes, so later calls cost ``O(C d)``.
        Any other write to ``memory`` is detected and triggers a full reduction again.

        Args:
            relu: apply ReLU to the rows before averaging (the released code's default).
        """
        if torch.compiler.is_compiling():
            return class_centroids(self.memory, self.labels, self.num_classes, relu=relu)
        if not self._class_sums_current():
            self._rebuild_class_sums()
        sums = self.class_sums[1 if relu else 0]
        means = sums / self._class_count.unsqueeze(1).to(sums.dtype)
        return F.normalize(means, dim=1).to(self.memory.dtype)

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
        device = self.memory.device
        keys = torch.rand(self.size, device=device, generator=generator) + self.labels
        by_class = torch.argsort(keys)
        step = torch.arange(per_class, device=device)
        where = self._class_start[:, None] + step % self._class_count[:, None]
        return by_class[where.flatten()]

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

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:
        if not torch.compiler.is_compiling() and not self._class_sums_current():
            self._rebuild_class_sums()  # saved sums always describe the saved rows
        super()._save_to_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> MomentumMemoryBank:
        current = self._class_sums_current()
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call, unused-ignore]
        if current:  # the sums moved or were cast along with the rows
            self._sums_of = (self.memory, self.memory._version)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[no-untyped-def]
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "labels"
        if key in state_dict and value_checks_enabled():
            if not torch.equal(state_dict[key].to(self.labels.device), self.labels):
                error_msgs.append(
                    f"{key}: the saved bank's labels differ from this bank's; it was built "
                    "for another training set"
                )
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "class_sums" in state_dict and prefix + "memory" in state_dict:
            self._sums_of = (self.memory, self.memory._version)  # loaded together: consistent
        else:
            self._drop_class_sums()
