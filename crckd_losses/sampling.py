"""Which bank rows each anchor is scored against: CCD's class-guided draw and CRD's instance draw.

Everything here is vectorised on the device of its inputs, with static output shapes and no
host sync, so it traces under ``torch.compile(fullgraph=True)`` and runs inside CUDA graphs.

The law (method §4), for an anchor ``i`` of class ``y`` in a bank of ``N`` rows, ``n_y`` of
them of class ``y`` and ``L = N - n_y`` of other classes:

- column 0 is ``i``;
- columns ``1..P-1`` are rows of class ``y`` (``i`` included): a uniform draw without
  replacement when ``n_y >= P - 1``, i.i.d. uniform with replacement otherwise;
- the last ``K`` columns are rows of other classes: without replacement when ``L >= K``,
  i.i.d. uniform with replacement otherwise.

``sampler="independent"`` gives every anchor a draw of exactly that law, independently of the
other anchors. ``sampler="shuffle"`` gives every anchor the same marginal law, but anchors of one
class in one call take windows of one shared permutation, so their sets are not independent of
each other (see :func:`class_guided_indices`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ._cache import built_once

Sampler = Literal["independent", "shuffle"]
SAMPLERS: tuple[Sampler, ...] = ("independent", "shuffle")


class ClassLayout(NamedTuple):
    """The class-sorted order of a label vector, built once per bank.

    Class ``c`` occupies ``order[starts[c] : starts[c] + sizes[c]]``.

    Attributes:
        labels: ``[N]`` long, the class of every row.
        order: ``[N]`` long, row indices sorted by class (stable).
        starts: ``[C]`` long, where each class's block starts in ``order``.
        sizes: ``[C]`` long, rows per class.
        row_info: ``[N, 4]`` long, per row: its class, that class's size and start, and the
            number of rows of other classes (one lookup gives a batch all four).
        size_range: the smallest and the largest class size as Python ints, or ``None``
            where unknown. Known, they tell the sampler without a device read whether any
            anchor's pool is too small for a draw without replacement; where none is, it
            draws no with-replacement fallback at all.
    """

    labels: torch.Tensor
    order: torch.Tensor
    starts: torch.Tensor
    sizes: torch.Tensor
    row_info: torch.Tensor
    size_range: tuple[int, int] | None = None

    @classmethod
    def from_labels(cls, labels: torch.Tensor, num_classes: int) -> ClassLayout:
        """Build the layout of ``labels`` (``[N]`` long in ``[0, num_classes)``); reads the
        smallest and largest class size to the host once, for ``size_range``."""
        sizes = torch.bincount(labels, minlength=num_classes)
        starts = torch.cumsum(sizes, 0) - sizes
        size = sizes[labels]
        info = torch.stack([labels, size, starts[labels], labels.shape[0] - size], dim=1)
        low, high = (int(v) for v in torch.aminmax(sizes))
        return cls(labels, torch.argsort(labels, stable=True), starts, sizes, info, (low, high))

    def needs_replacement(self, num_positives: int, num_negatives: int) -> bool:
        """Whether some anchor's pool may be too small for a draw without replacement: a
        class with fewer than ``P - 1`` rows, or fewer than ``K`` rows outside some class.
        ``True`` where ``size_range`` is unknown."""
        if self.size_range is None:
            return True
        smallest, largest = self.size_range
        return smallest < num_positives - 1 or self.labels.shape[0] - largest < num_negatives


_COLUMNS: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _columns(num_positives: int, num_negatives: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P-1+K]`` constants: whether each drawn column is a positive, and how many rows its
    anchor needs for a draw without replacement (``P-1`` or ``K``). Built once per setting."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        width = num_positives - 1 + num_negatives
        positive = torch.arange(width, device=device) < num_positives - 1
        return positive, torch.where(positive, num_positives - 1, num_negatives)

    return built_once(_COLUMNS, (num_positives, num_negatives, device), build)


def class_guided_indices(
    layout: ClassLayout,
    indices: torch.Tensor,
    num_positives: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
    sampler: Sampler = "independent",
) -> torch.Tensor:
    """``[B, P+K]`` class-guided row indices (method §4); no checks, see
    :meth:`~crckd_losses.MomentumMemoryBank.sample` for the checked call.

    Where a class has too few rows for a draw without replacement, both samplers draw that
    anchor's columns i.i.d. with replacement (these draws are made only where the layout's
    ``size_range`` allows such a class, see :meth:`ClassLayout.needs_replacement`). Where it
    has enough:

    - ``"independent"``: a uniform subset per anchor from its own random keys
      (``O(B N)`` random numbers and a ``topk`` per call), independent across anchors.
    - ``"shuffle"``: one uniform permutation of the bank per call; each anchor takes a window,
      at its own uniform random offset, of the cyclic sequence of its class's rows (positives)
      and of the other classes' rows (negatives) in that permutation. Each window on its own
      is a uniform subset, but anchors of one class share the permutation: two such anchors'
      windows are contiguous arcs of one cycle, so they overlap more, or less, than two
      independent draws would. Its working memory is a few ``C x N`` int64 tables.

    Args:
        layout: the bank's :class:`ClassLayout`.
        indices: ``[B]`` long anchor rows.
        num_positives: ``P >= 1``.
        num_negatives: ``K >= 1``.
        generator: a ``torch.Generator`` on the bank's device.
        sampler: ``"independent"`` or ``"shuffle"``.
    """
    y, count, start, other = layout.row_info.index_select(0, indices).unbind(1)
    batch, width = indices.shape[0], num_positives - 1 + num_negatives
    positive, need = _columns(num_positives, num_negatives, indices.device)
    fallback = layout.needs_replacement(num_positives, num_negatives)
    if fallback:
        # Every column's draw with replacement, used where its anchor's pool is too small: a
        # uniform position in the pool (the anchor's class for positives, the other classes
        # for negatives), mapped through the class-sorted order.
        pool = torch.where(positive, count[:, None], other[:, None])  # [B, P-1+K]
        u = torch.rand(batch, width, device=indices.device, generator=generator,
                       dtype=torch.float64)
        # floor(u * pool) < pool for float64 u <= 1 - 2^-53 and any pool < 2^52: no clamp.
        pos = (u * pool).long()
        # Positives start at the class's block; negatives skip over it.
        offset = torch.where(positive, start[:, None], (pos >= start[:, None]) * count[:, None])
        iid = layout.order[pos + offset]
    if sampler == "shuffle":
        without = torch.cat(_shuffle_windows(layout, y, num_positives - 1, num_negatives,
                                             generator), dim=1)
    else:
        # One key per (anchor, row): the positives' keys and the negatives' are disjoint, so
        # the two subsets are independent draws.
        keys = torch.rand(batch, layout.labels.shape[0], device=indices.device,
                          generator=generator)
        elsewhere = layout.labels.unsqueeze(0) != y.unsqueeze(1)  # [B, N]
        # Keys in [0, 1). Other classes' keys moved up to [1, 2): the anchor's class holds the
        # smallest keys (the positives'); then moved down to [-1, 0): they hold the smallest
        # keys (the negatives'). Either way the order within the allowed rows is the keys'.
        keys.add_(elsewhere)
        pos_without = _smallest(keys, num_positives - 1)
        without = torch.cat([pos_without,
                             _smallest(keys.add_(elsewhere, alpha=-2), num_negatives)], dim=1)
    chosen = torch.where(pool < need, iid, without) if fallback else without
    return torch.cat([indices.unsqueeze(1), chosen], dim=1)


def _smallest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The columns of the ``k`` smallest keys per row: a uniform subset of the allowed columns
    (i.i.d. uniform keys in ``[0, 1)``, shifted below every disallowed key) where a row allows
    at least ``k``. Rows that allow fewer give columns that the caller replaces."""
    if k == 0:
        return keys.new_empty(keys.shape[0], 0, dtype=torch.long)
    k_top = min(k, keys.shape[1])
    out = keys.topk(k_top, dim=1, largest=False, sorted=False).indices
    return out if k_top == k else out.repeat(1, -(-k // k_top))[:, :k]


def _shuffle_windows(
    layout: ClassLayout,
    y: torch.Tensor,
    num_same: int,
    num_other: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    labels, count = layout.labels, layout.sizes
    n, classes, device = labels.shape[0], count.shape[0], labels.device
    # One uniform shuffle of the bank. For class c, row c of `table` lists its rows, then (from
    # column n on) the rows of every other class, each in shuffled order.
    perm = torch.randperm(n, device=device, generator=generator)
    is_same = labels[perm].unsqueeze(0) == torch.arange(classes, device=device)[:, None]
    same_rank = torch.cumsum(is_same, dim=1) - 1
    other_rank = torch.arange(n, device=device) - same_rank - 1
    slots = torch.where(is_same, same_rank, other_rank + n)
    table = torch.empty(classes, 2 * n, dtype=torch.long, device=device)
    table.scatter_(1, slots, perm.expand(classes, n))
    offsets = torch.rand(y.shape[0], 2, device=device, generator=generator, dtype=torch.float64)
    return (_windows(table[:, :n], count, y, offsets[:, 0], num_same),
            _windows(table[:, n:], n - count, y, offsets[:, 1], num_other))


def _windows(
    rows: torch.Tensor,
    length: torch.Tensor,
    y: torch.Tensor,
    offset: torch.Tensor,
    width: int,
) -> torch.Tensor:
    """``width`` consecutive entries of the cyclic sequence ``rows[c, :length[c]]`` per anchor,
    from ``floor(offset * length)``: a uniform subset while ``length >= width``."""
    if width == 0:
        return y.new_empty(y.shape[0], 0)
    span = rows.shape[1] - 1 + width  # the furthest a window can reach: start <= n - 1
    position = torch.arange(span, device=rows.device).unsqueeze(0) % length.clamp_min(1)[:, None]
    cyclic = rows.gather(1, position)
    start = (offset * length[y]).long().clamp_max(length[y] - 1)
    # Each window is a contiguous slice of one row: unfold makes them views, indexing copies.
    return cyclic.unfold(1, width, 1)[y, start]


def class_anchor_indices(
    layout: ClassLayout,
    per_class: int,
    generator: torch.Generator | None = None,
    pad: bool = True,
) -> torch.Tensor:
    """Rows for the CRP ablation (method §5): ``per_class`` random rows of each class, class
    by class, drawn without replacement within a class.

    Args:
        layout: the bank's :class:`ClassLayout`.
        per_class: rows per class.
        generator: a ``torch.Generator`` on the labels' device.
        pad: a class with fewer than ``per_class`` rows repeats them as evenly as possible
            (``[C * per_class]`` rows in all); otherwise it gives the rows it has (the
            released code's choice).

    Returns:
        Long row indices, class by class.

    Examples:
        >>> layout = ClassLayout.from_labels(torch.tensor([0, 1, 1, 1]), 2)
        >>> class_anchor_indices(layout, 2).shape
        torch.Size([4])
        >>> class_anchor_indices(layout, 2, pad=False).shape
        torch.Size([3])
    """
    labels = layout.labels
    keys = torch.rand(labels.shape[0], device=labels.device, generator=generator) + labels
    by_class = torch.argsort(keys)
    if pad:
        step = torch.arange(per_class, device=labels.device)
        return by_class[(layout.starts[:, None] + step % layout.sizes[:, None]).flatten()]
    rank = torch.arange(labels.shape[0], device=labels.device) - layout.starts[labels[by_class]]
    return by_class[rank < per_class]


def instance_indices(
    indices: torch.Tensor,
    bank_size: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CRD's instance-level rows: column 0 the anchor, then ``K`` rows of any class other than
    the anchor's own row, i.i.d. uniform with replacement.

    Args:
        indices: ``[B]`` long anchor rows in ``[0, bank_size)``.
        bank_size: ``N >= 2``.
        num_negatives: ``K``.
        generator: a ``torch.Generator`` on ``indices``' device.

    Returns:
        ``[B, 1 + K]`` long.

    Examples:
        >>> idx = instance_indices(torch.tensor([0, 3]), bank_size=5, num_negatives=4)
        >>> idx.shape, bool((idx[:, 1:] != idx[:, :1]).all())
        (torch.Size([2, 5]), True)
    """
    draw = torch.randint(bank_size - 1, (indices.shape[0], num_negatives),
                         device=indices.device, generator=generator)
    negatives = draw + (draw >= indices[:, None]).long()
    return torch.cat([indices[:, None], negatives], dim=1)
