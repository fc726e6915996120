"""A host-side stand-in for ``torch.cuda.make_graphed_callables``, for the CPU tests of
``CRCKDLoss.capture_cuda_graphs`` (tests/test_graphs.py) and of the benchmark row that uses
it (tests/test_benchmarks.py)."""

import pytest
import torch

from crckd_losses import _graphs


def stand_in(module, sample, num_warmup_iters):
    """``make_graphed_callables``' host side for one module (the library's wrapper of a
    ``CRCKDLoss``, which it holds as ``module.crckd``)."""
    crckd = module.crckd
    params = [p for p in module.parameters() if p.requires_grad]
    inputs = [t for t in sample if t.requires_grad] + params

    def fwd_bwd():
        outs = [o for o in torch.utils._pytree.tree_leaves(module(*sample)) if o.requires_grad]
        torch.autograd.grad(outs, inputs, grad_outputs=[torch.ones_like(o) for o in outs],
                            allow_unused=True)

    for _ in range(num_warmup_iters):
        fwd_bwd()
    # the capture pass: the Python runs, the kernels are only recorded (so the tensors keep
    # their values, and their version counters move as the Python sees the writes)
    tensors = list(module.buffers())
    before = [t.clone() for t in tensors]
    fwd_bwd()
    banks = (crckd.student_bank, crckd.teacher_bank)
    current = [b._class_sums_current() for b in banks]
    with torch.no_grad():
        for t, b in zip(tensors, before):
            t.copy_(b)
    for b, was in zip(banks, current):
        if was:
            b._sums_of = (b.memory, b.memory._version)
    orig, training = module.forward, module.training
    stand_in.replayed = 0

    def new_fwd(*args):
        # A replay: the captured kernels run, no Python does. Here the step runs (without the
        # graphs, which would call back here), and then the banks' host-side bookkeeping is
        # put back as it was, with the version counters read as unchanged, as after a replay.
        assert module.training == training
        stand_in.replayed += 1
        banks = (crckd.student_bank, crckd.teacher_bank)
        host = [(b._class_sums_current(), set(b._sums_valid), set(b._requested_kinds))
                for b in banks]
        graphs = crckd.__dict__.pop("_graphs")
        try:
            return orig(*args)
        finally:
            crckd.__dict__["_graphs"] = graphs
            for b, (current, valid, requested) in zip(banks, host):
                b._sums_of = (b.memory, b.memory._version) if current else None
                b._sums_valid, b._requested_kinds = valid, requested

    module.forward = new_fwd
    return module


def graphs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``capture_cuda_graphs`` run on a CPU, through :func:`stand_in`."""
    monkeypatch.setattr(_graphs, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(_graphs, "make_graphed_callables", stand_in)
