"""Timing and peak-memory measurement shared by every benchmark section.

Timing: each contender runs a few warm-up calls, then the contenders of one comparison run
round-robin (one call each per round, in a new seeded random order each round), so that a
burst of load from other processes slows them all alike and none always runs after the same
one; the reported figure is the median over rounds. Ratios are always taken between contenders
timed in the same round-robin.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory allocated before the
call. On CPU there is no allocator statistic, so :class:`LiveTensorBytes`, a
``TorchDispatchMode``, follows every tensor storage created by an operator during the call
(forward and backward), adds its bytes when it appears and subtracts them when its last
reference dies; the peak of that running sum is the *peak extra memory*: the largest amount of
tensor memory alive at one time during the call, beyond the inputs that existed before it.
The same method is used for every contender of a comparison. Memory held by numpy, by Python
objects or by the allocator's caches is not seen; contenders that work in numpy report no
memory figure.

Operator counts: :class:`OpCounter`, another ``TorchDispatchMode``, counts the aten operators a
call executes (after autograd, so the backward's operators too), leaving out views, which
compute nothing, and ``detach``. ``aten._local_scalar_dense`` is a tensor value read on the
host (``.item()``, ``bool(t)``, ``int(t)``): on an accelerator, a device-to-host sync.
"""

from __future__ import annotations

import random
import statistics
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MEMORY_METHOD_CPU = (
    "peak of live tensor-storage bytes created during the call (forward and backward), "
    "tracked per storage with a TorchDispatchMode and weak references; inputs excluded"
)
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated minus memory allocated before the call"


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the mode while they stay alive.

    Every operator output's storage is counted once, when first seen, and released by a weak
    reference callback when the storage is freed. Views and in-place results share a storage
    and add nothing. Storages that existed before the mode was entered are not counted.

    Attributes:
        live: bytes alive now.
        peak: the most bytes alive at one time since entering.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref[Any]] = {}
        self._preexisting: set[int] = set()

    def mark_existing(self, *tensors: Any) -> None:
        """Excludes the storages of ``tensors`` (and of any tensors nested in them).

        Args:
            tensors: tensors, or lists/tuples/dicts of tensors, to leave out of the count.
        """
        for t in tree_leaves(list(tensors)):
            if isinstance(t, torch.Tensor):
                self._preexisting.add(t.untyped_storage()._cdata)

    def _release(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._refs or key in self._preexisting or key in inputs:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _r, k=key, n=nbytes: self._release(k, n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: only new storages count.
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out


#: The aten operator of a host read of a tensor value (``.item()`` and friends).
HOST_SYNC_OP = "aten._local_scalar_dense"


class OpCounter(TorchDispatchMode):
    """Counts the aten operators executed inside the mode that are not views.

    An operator counts unless its schema makes its output an alias of an input
    (``OpOverload.is_view``: ``view``, ``t``, ``expand``, ``select``, ...) or it is ``detach``.

    Attributes:
        counts: operator packet name (``"aten.mm"``) -> calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Non-view operator calls counted."""
        return sum(self.counts.values())

    @property
    def host_syncs(self) -> int:
        """Calls of :data:`HOST_SYNC_OP`."""
        return self.counts.get(HOST_SYNC_OP, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        packet = func.overloadpacket
        if not func.is_view and packet is not torch.ops.aten.detach:
            self.counts[str(packet)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> OpCounter:
    """The non-view aten operators of one call of ``fn`` (forward and backward alike)."""
    counter = OpCounter()
    with counter:
        fn()
    return counter


def synchronize(device: torch.device) -> None:
    """Waits for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(
    fn: Callable[[], Any], device: torch.device, existing: Any = None
) -> int:
    """Peak extra memory of one call of ``fn`` (see the module docstring).

    Args:
        fn: the call to measure; its return value is dropped inside the measurement.
        device: where it runs.
        existing: tensors (any nesting) alive before the call whose storages ``fn`` may
            replace or reuse; they are not counted.

    Returns:
        Bytes.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    mode = LiveTensorBytes()
    if existing is not None:
        mode.mark_existing(existing)
    with mode:
        fn()
    return int(mode.peak)


def time_group(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 7,
    min_seconds: float = 0.0,
    max_seconds: float = 60.0,
) -> dict[str, dict[str, float]]:
    """Times several contenders round-robin, in a new random order each round (seeded, so a
    rerun times the same orders), and returns per-contender statistics.

    Args:
        fns: name -> zero-argument callable (one forward+backward, one update, ...).
        device: where they run (CUDA is synchronised around each call).
        warmup: untimed calls per contender before timing.
        repeats: minimum number of timed rounds.
        min_seconds: keep adding rounds until the group has spent this long timing.
        max_seconds: stop adding rounds past ``repeats`` once this much time has passed.

    Returns:
        name -> ``{"median_s", "min_s", "iqr_s", "rounds"}``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    order = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while True:
        # A call runs slower right after a contender that streams a lot of memory (its own
        # data comes back cold from DRAM). A fixed order, or one rotated by one each round,
        # keeps the same predecessor for most calls, so one contender would always pay it
        # and its neighbour never; a shuffled order spreads it over all of them.
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        spent = time.perf_counter() - start
        if rounds >= repeats and (spent >= min_seconds or spent >= max_seconds):
            break
    out: dict[str, dict[str, float]] = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        out[name] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "iqr_s": q[2] - q[0],
            "rounds": rounds,
        }
    return out
