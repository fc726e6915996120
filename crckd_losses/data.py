"""Giving a dataset's items their index, which the memory banks need."""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (the doctest uses it)
from torch.utils.data import Dataset


class IndexedDataset(Dataset[tuple[Any, ...]]):
    """Wraps a map-style dataset so each item also carries its index.

    An item that is a tuple ``(x, y, ...)`` becomes ``(x, y, ..., index)``; any other item
    ``x`` becomes ``(x, index)``. The index is the bank row of that sample.

    Args:
        dataset: any map-style dataset with ``__len__`` and ``__getitem__``.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.randn(3, 2), torch.tensor([0, 1, 0])))
        >>> x, y, i = ds[2]
        >>> i
        2
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"dataset must be map-style (__getitem__ and __len__), got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type, unused-ignore]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if index < 0:  # Python's negative indexing: the bank row is the item's own
            index += len(self)
        if isinstance(item, tuple):
            return (*item, index)
        return (item, index)

    def __getattr__(self, name: str) -> Any:
        # Pass through attributes such as `targets` or `classes` of the wrapped dataset, but no
        # dunder: a passed-through `__getitems__` would let DataLoader fetch batches from the
        # wrapped dataset directly, without their indices.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self.dataset, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__} (wrapping {type(self.dataset).__name__}) has no "
                f"attribute {name!r}") from None
