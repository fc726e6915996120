"""CUDA graphs of a :class:`~crckd_losses.CRCKDLoss` training step, its forward and its
backward (:meth:`~crckd_losses.CRCKDLoss.capture_cuda_graphs`).

``torch.cuda.make_graphed_callables`` does the capture. What this module adds is what that
function does not know about the loss: its warm-up calls write both banks (and move
:math:`Z` under ``normalizer="ema"``) with made-up features, so the state is saved before and
put back after, in place, since the graphs hold addresses; the random stream is put back
too; the host-side bookkeeping of the banks' running class sums is told what the replays keep
current; and a call the graphs cannot take (another batch size or dtype, eval mode, given
rows or a generator) runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import distributed
from ._checks import check_positive_int, set_value_checks, value_checks

if TYPE_CHECKING:
    from .crckd import CRCKDLoss, CRCKDOutput

#: The device type the graphs need (the tests run the bookkeeping on a CPU with a stand-in for
#: :func:`make_graphed_callables`).
_DEVICE_TYPE = "cuda"


def make_graphed_callables(module: torch.nn.Module, sample: tuple[torch.Tensor, ...],
                           num_warmup_iters: int) -> Any:  # pragma: no cover - needs a GPU
    """``torch.cuda.make_graphed_callables`` (looked up here, so that tests can stand in)."""
    return torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=num_warmup_iters)


class Graphs(NamedTuple):
    """A captured step and the calls it fits.

    Attributes:
        run: the graphed forward (copies its inputs into the static ones, replays; its
            outputs' backward replays the backward graph).
        batch: the batch size captured.
        dtype: the feature dtype captured.
        autocast: the autocast dtype the capture ran under (``None``: none).
        kinds: per bank, which running class sums the replays keep current.
        keep: tensors made outside the capture that the graphs read by address (the banks'
            snapshots, CCD's cached bias): held here so that they are never freed under them.
        replays: ``[count]``, the calls that replayed (a list, to count in place).
    """

    run: Callable[..., CRCKDOutput]
    batch: int
    dtype: torch.dtype
    autocast: torch.dtype | None
    kinds: tuple[frozenset[int], ...]
    keep: tuple[Any, ...]
    replays: list[int]


class _Packed(torch.nn.Module):
    """The step with its five outputs stacked into one tensor, which is what gets graphed.
    With five outputs, a backward through the loss alone would first have autograd
    materialise a zero gradient for each of the four others (outputs a loop only logs) and
    then copy all five into the graph's static gradients: nine small kernels. Stacked, and
    read back by ``select``, it is the loss's select backward and one copy. Every output
    still carries its gradient."""

    def __init__(self, crckd: CRCKDLoss) -> None:
        super().__init__()
        self.crckd = crckd

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                indices: torch.Tensor) -> torch.Tensor:
        return torch.stack(tuple(self.crckd(student_feat, teacher_feat, indices)))


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def capture(crckd: CRCKDLoss, batch_size: int, num_warmup_iters: int) -> Graphs:
    """Capture ``crckd``'s training step for batches of ``batch_size``; the state it trains is
    left as it was. See :meth:`~crckd_losses.CRCKDLoss.capture_cuda_graphs`."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_warmup_iters", num_warmup_iters)
    banks = (crckd.student_bank, crckd.teacher_bank)
    device = banks[0].memory.device
    if "_graphs" in crckd.__dict__:
        raise RuntimeError("capture_cuda_graphs() was already called on this module")
    if device.type != _DEVICE_TYPE:
        raise ValueError(
            f"capture_cuda_graphs() needs the module on a CUDA device, got {device}; move it "
            "with .cuda() first")
    if not crckd.training:
        raise ValueError("capture_cuda_graphs() captures the training step: call it in "
                         "training mode (eval-mode calls then run eagerly)")
    for name, bank in (("student_bank", banks[0]), ("teacher_bank", banks[1])):
        if bank.copy_on_write != "snapshot":
            raise ValueError(
                f"capture_cuda_graphs() needs banks written in place: build CRCKDLoss with "
                f"copy_on_write='snapshot' ({name} has copy_on_write={bank.copy_on_write!r})")
    if distributed.world_size() > 1:
        raise ValueError("capture_cuda_graphs() runs in one process only: the banks' "
                         "all-gathers under torch.distributed cannot be captured")
    if not crckd.ccd._initialized:  # the host mirror of normalizer_initialized: no read
        raise ValueError("capture_cuda_graphs() needs one eager training step first: the "
                         "first step estimates the CCD normaliser Z")
    with torch.no_grad():
        for bank in banks:  # running sums that describe the rows, both kinds, to restore
            if not bank._class_sums_current() or bank._sums_valid != {0, 1}:
                bank._rebuild_class_sums()
        state = [t for bank in banks for t in (bank.memory, bank.class_sums, bank.rejected_rows)]
        if crckd.ccd.normalizer != "first_batch":  # "ema" moves Z every step
            state += [crckd.ccd.log_normalizer, crckd.ccd.normalizer_initialized]
        saved = [t.clone() for t in state]
    dtype = crckd.student_head.linear.weight.dtype
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    # The made-up features and the warm-up calls' samples draw random numbers: the stream
    # goes back to where it was, so a graphed run draws what an eager run from the same seed
    # would. Whatever happens, the state the warm-up calls wrote is put back.
    captured = False
    mode = value_checks()
    try:
        # No value is read while capturing (a read is a host sync, which a capture refuses;
        # the made-up features need no check): real calls are checked before each replay.
        set_value_checks("mask")
        with torch.random.fork_rng(devices=rng_devices):
            sample = (
                torch.randn(batch_size, crckd.student_head.linear.in_features, device=device,
                            dtype=dtype, requires_grad=True),
                torch.randn(batch_size, crckd.teacher_head.linear.in_features, device=device,
                            dtype=dtype),
                torch.arange(batch_size, device=device) % banks[0].size,
            )
            packed = _Packed(crckd)
            make_graphed_callables(packed, sample, num_warmup_iters)
        graphed = packed.__dict__.pop("forward")  # set on the instance: take it back off
        # What the captured step keeps current: the sums that were current when it was
        # captured (a compiled step reduces the whole bank and keeps none).
        kinds = tuple(frozenset(bank._sums_valid if bank._class_sums_current() else ())
                      for bank in banks)
        captured = True
    finally:
        set_value_checks(mode)
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)  # in place: the graphs read these addresses
        # Restored together, the rows and both sums agree (both were made current above);
        # once captured, only the sums that the replays keep stay marked current.
        for bank, kind in zip(banks, kinds if captured else ({0, 1}, {0, 1})):
            bank._sums_of = (bank.memory, bank.memory._version)
            bank._sums_valid = set(kind)
    keep = (tuple(bank.__dict__.get("_snapshot") for bank in banks),
            crckd.ccd.__dict__.get("_cached_bias"))

    def run(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
            indices: torch.Tensor) -> CRCKDOutput:
        from .crckd import CRCKDOutput

        # select, not unbind: the backward of an unbind materialises a zero gradient for
        # every unused output, a select's only for its own
        packed = graphed(student_feat, teacher_feat, indices)
        return CRCKDOutput(*(packed.select(0, i) for i in range(len(CRCKDOutput._fields))))

    return Graphs(run, batch_size, dtype, _autocast_dtype(device), kinds, keep, [0])


def fits(graphs: Graphs, crckd: CRCKDLoss, student_feat: torch.Tensor,
         teacher_feat: torch.Tensor) -> bool:
    """Whether this (checked) call is one the graphs were captured for."""
    return (crckd.training and student_feat.shape[0] == graphs.batch
            and student_feat.dtype == graphs.dtype and teacher_feat.dtype == graphs.dtype
            and _autocast_dtype(student_feat.device) == graphs.autocast)


def replay(graphs: Graphs, crckd: CRCKDLoss, student_feat: torch.Tensor,
           teacher_feat: torch.Tensor, indices: torch.Tensor) -> CRCKDOutput:
    """One graphed step; the banks' host-side bookkeeping then says what it kept current."""
    out = graphs.run(student_feat, teacher_feat, indices)
    for bank, kinds in zip((crckd.student_bank, crckd.teacher_bank), graphs.kinds):
        bank._sums_valid &= kinds
    graphs.replays[0] += 1
    return out
