"""Constants that eager code builds once per setting and reuses step after step."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def built_once(store: dict[K, T], key: K, build: Callable[[], T]) -> T:
    """``store[key]``, made by ``build()`` on first use. Inside a ``torch.compile`` trace it is
    built afresh and nothing is stored, so no traced tensor leaks into the store."""
    if torch.compiler.is_compiling():
        return build()
    if key not in store:
        store[key] = build()
    return store[key]
