"""A host-side stand-in for the CUDA graphs of ``graph_crckd_loss``, for its CPU tests
(tests/crckd_losses/backends/test_cuda_graphs.py) and for the benchmark row that uses it
(tests/benchmarks/test_benchmarks.py).

It keeps what a CUDA graph does to the state and to static tensors: a capture runs the
Python (versions, caches) but no kernel, so every tensor keeps its value; a replay runs the
captured work on whatever the static inputs hold now and writes the static outputs, but no
Python. Here a replay runs the same function again and copies its results into the static
outputs.
"""

import pytest
import torch

from crckd_losses.backends import cuda_graphs


def _copy_into(static, fresh):
    with torch.no_grad():
        if isinstance(static, torch.Tensor):
            static.copy_(fresh)
        else:
            for s, f in zip(static, fresh):
                s.copy_(f)


def _refuse_cached_casts():
    """A real capture under autocast with its cast cache on would capture no cast of a weight
    cast before it, and its replays would read that stale cast from memory the cache later
    frees. Replaying by running the Python again cannot show that, so the stand-in refuses
    to capture in that state."""
    if torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled():
        raise AssertionError("captured under autocast with its weight-cast cache on")


class HostGraphs:
    """Warm-up, capture and replay of one capture of ``graph_crckd_loss``, on the host."""

    #: Replays of captured functions, over every instance (forward and backward counted).
    replays = 0

    def __init__(self, crckd):
        self.crckd = crckd

    def warm_up(self, fn, times):
        _refuse_cached_casts()
        for _ in range(times):
            fn()

    def capture(self, fn):
        _refuse_cached_casts()
        crckd = self.crckd
        tensors = list(crckd.buffers())
        before = [t.clone() for t in tensors]
        result = fn()
        with torch.no_grad():  # a capture launches nothing: the values stay as they were
            for t, b in zip(tensors, before):
                t.copy_(b)

        def replay():
            # No Python runs in a replay. The graphs are set aside while the work runs, so
            # that the module's eager calls inside it do not count as calls between replays.
            graphs = crckd.__dict__.pop("_graphs", None)
            try:
                # a replay runs the captured work whatever the grad mode of its caller (an
                # autograd Function's forward and backward run without grad)
                with torch.enable_grad():
                    fresh = fn()
            finally:
                if graphs is not None:
                    crckd.__dict__["_graphs"] = graphs
            _copy_into(result, fresh)
            HostGraphs.replays += 1

        return replay, result


def graphs_on_cpu(monkeypatch: pytest.MonkeyPatch, graphs=HostGraphs) -> None:
    """Let ``graph_crckd_loss`` run on a CPU, through ``graphs``."""
    monkeypatch.setattr(cuda_graphs, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_graphs, "make_graphs", graphs)
    HostGraphs.replays = 0
