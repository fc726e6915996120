"""CUDA graphs of a :class:`~crckd_losses.CRCKDLoss` training step, its forward and its
backward: :func:`graph_crckd_loss` wraps the module in a :class:`GraphedCRCKDLoss`, called
as the module is.

The capture follows ``torch.cuda.make_graphed_callables`` (warm-up calls on a side stream,
then the forward and the backward captured into one memory pool), with what that function
does not do for this module:

- its warm-up calls write both banks (and move :math:`Z` under ``normalizer="ema"``) from
  made-up features: the state is saved before and put back after, in place, since the
  graphs hold addresses; the random stream is put back too;
- the five outputs are captured as one stacked tensor, handed out in memory of their own
  (a loop that keeps ``out.loss`` past the next call keeps its value), and read back by
  ``select``, whose backward, unlike five separate outputs', materialises no zero gradient
  for the outputs a loop only logs;
- the gradients leave the graph in memory of their own (one concatenation per dtype), so a
  parameter's ``.grad`` never aliases the graph's static gradient, which the next replay
  overwrites (with a graphed callable's gradients, accumulating over two micro-batches
  counts the second one twice);
- a backward after the module's next call (whose replay would have overwritten the
  activations it reads, or whose eager step the banks' snapshots) raises;
- the capture restricts CUDA calls in its own thread only (``capture_error_mode=
  "thread_local"``), so that a data loader's pin-memory thread, busy with the next batches
  mid-loop, cannot break it;
- the warm-up calls and the captures run with gradients on and, under autocast, with
  autocast's cache of weight casts off (a cast cached earlier would not be captured, and
  every replay would read it stale);
- a call the graphs do not fit runs eagerly.

The graph objects come from :class:`CudaGraphs`; the tests put a host-side stand-in in its
place (``tests/crckd_losses/backends/graph_stand_in.py``) and so run all of the above on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .. import distributed
from .._checks import check_positive_int, set_value_checks, value_checks, warn_at_caller

if TYPE_CHECKING:
    from ..crckd import CRCKDLoss, CRCKDOutput

#: The device type the graphs need (the tests set ``"cpu"`` with their stand-in).
_DEVICE_TYPE = "cuda"


class CudaGraphs:
    """Warm-up and capture on one side stream into one memory pool, as
    ``torch.cuda.make_graphed_callables`` does, on the module's GPU (which need not be the
    current device)."""

    def __init__(self, crckd: CRCKDLoss) -> None:  # pragma: no cover - needs a GPU
        self.device = crckd.student_bank.memory.device
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call, unused-ignore]
            self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, fn: Callable[[], Any], times: int) -> None:  # pragma: no cover
        """``fn()`` ``times`` times on the side stream, the device idle before and after (so
        that lazy initialisation stays out of the captures)."""
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            with torch.cuda.stream(self.stream):
                for _ in range(times):
                    fn()
            torch.cuda.synchronize()

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:  # pragma: no cover
        """``fn`` captured: ``(replay, what fn returned)``; replays write into the latter.

        In ``"thread_local"`` mode: the capture happens in the middle of a training loop,
        where a ``DataLoader(pin_memory=True)`` keeps a thread that allocates pinned memory
        for the next batches. Under the default ``"global"`` mode that thread's CUDA calls
        would invalidate the capture, and the error would then surface in the thread too,
        ending the run at the next batch. The pinning thread's work is not the step's and
        is rightly left out of the graph."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), \
                torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                 capture_error_mode="thread_local"):
            result = fn()
        return graph.replay, result  # a replay runs on its capture's device


#: Builds the graph objects of one capture (tests replace it).
make_graphs: Callable[[CRCKDLoss], Any] = CudaGraphs


class Captured:
    """One captured step: its static tensors, its replays, and which replay is current."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                 grad_output: torch.Tensor, grads: tuple[torch.Tensor, ...],
                 replay_forward: Callable[[], None], replay_backward: Callable[[], None],
                 params: tuple[torch.Tensor, ...]) -> None:
        self.inputs = inputs
        self.output = output
        self.grad_output = grad_output
        self.grads = grads  # student_feat's, then each trainable parameter's
        self.replay_forward = replay_forward
        self.replay_backward = replay_backward
        self.params = params  # the module's parameters, whose addresses the graphs read
        self.trainable = tuple(p.requires_grad for p in params)  # which have a gradient
        # the gradients by dtype: each group leaves the graph in one concatenation
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        self.groups = list(by_dtype.values())
        self.generation = 0  # forward replays so far: the activations are the last one's


class _Replayed(torch.autograd.Function):
    """A captured step as one autograd node: inputs copied in, forward replayed, the stacked
    outputs copied out; in backward, the gradient copied in, backward replayed, the gradients
    copied out in one concatenation."""

    @staticmethod
    def forward(ctx: Any, step: Captured, student_feat: torch.Tensor,  # type: ignore[override, unused-ignore]
                teacher_feat: torch.Tensor, indices: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        for static, given in zip(step.inputs, (student_feat, teacher_feat, indices)):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        step.replay_forward()
        step.generation += 1
        ctx.step, ctx.generation = step, step.generation
        return step.output.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        step: Captured = ctx.step
        if step.generation != ctx.generation:
            raise RuntimeError(
                "the backward of a CRCKDLoss call replayed from CUDA graphs must run before "
                "the next call replays them or runs eagerly (it reads the activations and the "
                "banks' snapshots of its own call, which the next call overwrites); to "
                "accumulate gradients, call backward after each call")
        step.grad_output.copy_(grad)
        step.replay_backward()
        grads: list[torch.Tensor] = list(step.grads)
        for group in step.groups:
            flat = torch.cat([step.grads[i].reshape(-1) for i in group])
            pieces = torch.split(flat, [step.grads[i].numel() for i in group])
            for i, piece in zip(group, pieces):
                grads[i] = piece.view(step.grads[i].shape)
        out: list[torch.Tensor | None] = [None, grads[0], None, None]
        rest = iter(grads[1:])
        out += [next(rest) if has_grad else None for has_grad in step.trainable]
        return tuple(out)


class Graphs(NamedTuple):
    """A captured step and the calls it fits.

    Attributes:
        step: the static tensors and replays.
        batch: the batch size captured.
        dtype: the feature dtype captured.
        autocast: the autocast dtype the capture ran under (``None``: none).
        keep: tensors made outside the capture that the graphs read by address (the banks'
            snapshots, CCD's cached bias): held here so that they are never freed under them.
        warned: the reason a call did not fit, once one has been warned about.
    """

    step: Captured
    batch: int
    dtype: torch.dtype
    autocast: torch.dtype | None
    keep: tuple[Any, ...]
    warned: list[str]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


@contextmanager
def _capturing(device: torch.device) -> Iterator[None]:
    """How the warm-up calls and the captures run.

    - No value is read: a read is a host sync, which a capture refuses (and made-up
      features need no check). Real calls are checked before each replay.
    - Gradients are on, whatever the caller's grad mode: a training step is captured.
    - Under autocast, autocast's cache of weight casts is off. With it on, a capture would
      reuse a cast made before it (by a warm-up call or an eager step in the same autocast
      block) instead of capturing the cast: every replay would then read weights as they
      were then, from memory the cache frees when the caller's autocast block ends.
    """
    mode = value_checks()
    set_value_checks("mask")
    try:
        with torch.enable_grad():
            if torch.is_autocast_enabled(device.type):
                with torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                                    cache_enabled=False):
                    yield
            else:
                yield
    finally:
        set_value_checks(mode)


def _check_capturable(crckd: CRCKDLoss) -> None:
    """What no later call can change: refused when the wrapper is made."""
    device = crckd.student_bank.memory.device
    if device.type != _DEVICE_TYPE:
        raise ValueError(
            f"graph_crckd_loss() needs the module on a CUDA device, got {device}; move it "
            "with .cuda() first")
    if distributed.world_size() > 1:
        raise ValueError("graph_crckd_loss() runs in one process only: the banks' "
                         "all-gathers under torch.distributed cannot be captured")
    if not any(p.requires_grad for p in crckd.parameters()):
        raise ValueError("graph_crckd_loss() captures a training step, but no parameter "
                         "of the module requires a gradient")


def _capture_step(crckd: CRCKDLoss, batch_size: int, num_warmup_iters: int,
                  dtype: torch.dtype) -> Captured:
    """Warm-up calls and the two captures, on made-up inputs (state not restored here)."""
    device = crckd.student_bank.memory.device
    sample = (
        torch.randn(batch_size, crckd.student_head.linear.in_features, device=device,
                    dtype=dtype, requires_grad=True),
        torch.randn(batch_size, crckd.teacher_head.linear.in_features, device=device,
                    dtype=dtype),
        torch.arange(batch_size, device=device) % crckd.student_bank.size,
    )
    params = list(crckd.parameters())
    surface = (sample[0], *(p for p in params if p.requires_grad))
    graphs = make_graphs(crckd)

    def forward() -> torch.Tensor:
        return torch.stack(tuple(crckd(*sample)))

    def forward_backward() -> None:
        out = forward()
        torch.autograd.grad(out, surface, torch.ones_like(out))

    graphs.warm_up(forward_backward, num_warmup_iters)
    latest: list[torch.Tensor] = []  # what the backward differentiates: the forward's output

    def captured_forward() -> torch.Tensor:
        latest[:] = [forward()]
        return latest[0]

    replay_forward, output = graphs.capture(captured_forward)
    grad_output = torch.empty_like(output)
    replay_backward, grads = graphs.capture(
        lambda: torch.autograd.grad(latest[0], surface, grad_output))
    return Captured(sample, output, grad_output, tuple(grads), replay_forward, replay_backward,
                    tuple(params))


def capture(crckd: CRCKDLoss, batch_size: int, num_warmup_iters: int,
            dtype: torch.dtype) -> Graphs:
    """Capture ``crckd``'s training step for batches of ``batch_size`` features of ``dtype``;
    the state it trains is left as it was, whether or not the capture succeeds."""
    banks = (crckd.student_bank, crckd.teacher_bank)
    device = banks[0].memory.device
    with torch.no_grad():
        state = [t for bank in banks for t in (bank.memory, bank.rejected_rows)]
        if crckd.ccd.normalizer != "first_batch":  # "ema" moves Z every step
            state += [crckd.ccd.log_normalizer, crckd.ccd.normalizer_initialized]
        saved = [t.clone() for t in state]
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        # The made-up features and the warm-up calls' samples draw random numbers: the stream
        # goes back to where it was, so a graphed run draws what an eager run from the same
        # seed would.
        with _capturing(device), torch.random.fork_rng(devices=rng_devices):
            step = _capture_step(crckd, batch_size, num_warmup_iters, dtype)
    finally:
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)  # in place: the graphs read these addresses
    keep = tuple(bank.__dict__.get("_snapshot") for bank in banks)
    return Graphs(step, batch_size, dtype, _autocast_dtype(device), keep, [])


def stream_capturing(device: torch.device) -> bool:
    """Whether CUDA work on ``device``'s current stream is being captured now (a whole step
    of the caller's own, or these graphs' capture): no replay or capture may start inside."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def may_capture(crckd: CRCKDLoss, student_feat: torch.Tensor) -> bool:
    """Whether this (checked, training-mode) call can be captured: on the graphs' device
    type, after the first training step (which estimates :math:`Z`), with gradients on, and
    outside any capture."""
    return (student_feat.device.type == _DEVICE_TYPE and crckd.ccd._initialized
            and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            and not stream_capturing(student_feat.device))


def mismatch(graphs: Graphs, crckd: CRCKDLoss, student_feat: torch.Tensor,
             teacher_feat: torch.Tensor) -> str | None:
    """Why this (checked) training call cannot replay the graphs: ``None`` where it can,
    ``""`` for another batch size (the last partial batch of an epoch, expected), otherwise
    the reason, to warn about."""
    if student_feat.shape[0] != graphs.batch:
        return ""
    if student_feat.device != graphs.step.inputs[0].device:
        # a replica of the module (nn.DataParallel copies its attributes) on another GPU
        return (f"features on {student_feat.device}, captured on "
                f"{graphs.step.inputs[0].device}")
    if student_feat.dtype != graphs.dtype or teacher_feat.dtype != graphs.dtype:
        return (f"features of dtype {student_feat.dtype} and {teacher_feat.dtype}, captured "
                f"for {graphs.dtype}: pass graph_crckd_loss(dtype=...)")
    autocast = _autocast_dtype(student_feat.device)
    if autocast != graphs.autocast:
        return (f"autocast {'off' if autocast is None else autocast} where the capture ran "
                f"under {'none' if graphs.autocast is None else graphs.autocast}")
    if tuple(p.requires_grad for p in graphs.step.params) != graphs.step.trainable:
        return "other parameters require gradients than at the capture"
    return None


def invalidate_replays(crckd: CRCKDLoss) -> None:
    """Called by every eager call of ``crckd``: it rewrites the banks' snapshots in place,
    which the backward of a replayed call still to come would read, so that backward now
    raises (autograd's version check does not see into a graph's replay)."""
    graphs: Graphs | None = crckd.__dict__.get("_graphs")
    if graphs is not None and not torch.compiler.is_compiling():
        graphs.step.generation += 1


def replay(graphs: Graphs, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
           indices: torch.Tensor) -> torch.Tensor:
    """One graphed step: its outputs stacked (``[5]``, in :class:`CRCKDOutput`'s order)."""
    packed: torch.Tensor = _Replayed.apply(graphs.step, student_feat, teacher_feat.detach(),
                                           indices, *graphs.step.params)
    return packed


class GraphedCRCKDLoss:
    """A :class:`~crckd_losses.CRCKDLoss` whose training step runs as two CUDA graphs, its
    forward and its backward; made by :func:`graph_crckd_loss`, called as the module is.

    Train the module itself as before (its parameters in the optimiser, its ``state_dict``
    in the checkpoint); call this object where the loop called the module.

    Attributes:
        crckd: the wrapped module.
        batch_size: ``B`` of the calls that replay.
        dtype: the feature dtype captured (``None`` until the capture: the first captured
            call's).
    """

    def __init__(self, crckd: CRCKDLoss, batch_size: int, dtype: torch.dtype | None = None,
                 num_warmup_iters: int = 3) -> None:
        from ..crckd import CRCKDLoss

        if not isinstance(crckd, CRCKDLoss):
            raise TypeError(f"crckd must be a CRCKDLoss, got {type(crckd).__name__}")
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.num_warmup_iters = check_positive_int("num_warmup_iters", num_warmup_iters)
        if dtype is not None and (not isinstance(dtype, torch.dtype)
                                  or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        _check_capturable(crckd)
        self.crckd, self.dtype = crckd, dtype
        self._replays = 0
        for bank in (crckd.student_bank, crckd.teacher_bank):
            bank.copy_on_write = "snapshot"  # in place: the graphs hold the banks' addresses

    @property
    def replays(self) -> int:
        """How many calls replayed the graphs, over every capture."""
        return self._replays

    def capture(self, dtype: torch.dtype | None = None) -> None:
        """Capture the graphs now, instead of at the first call that can be captured.

        Args:
            dtype: the features' dtype (default: the wrapper's ``dtype``, else the heads').

        Raises:
            ValueError: the module not in training mode, inside ``torch.inference_mode()``,
                or before its first training step (which estimates :math:`Z`).
            RuntimeError: the graphs are captured already.
        """
        crckd = self.crckd
        if "_graphs" in crckd.__dict__:
            raise RuntimeError("the CUDA graphs are captured already")
        if not crckd.training:
            raise ValueError("graph_crckd_loss() captures the training step: capture in "
                             "training mode (eval-mode calls then run eagerly)")
        if torch.is_inference_mode_enabled():
            raise ValueError("graph_crckd_loss() captures a training step, with gradients: "
                             "capture outside torch.inference_mode()")
        if not crckd.ccd._initialized:  # the host mirror of normalizer_initialized: no read
            raise ValueError("graph_crckd_loss() needs one eager training step first: the "
                             "first step estimates the CCD normaliser Z")
        dtype = dtype or self.dtype or crckd.student_head.linear.weight.dtype
        crckd.__dict__["_graphs"] = capture(crckd, self.batch_size, self.num_warmup_iters, dtype)

    def __call__(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                 indices: torch.Tensor, sample_indices: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> CRCKDOutput:
        """One CRCKD step, as :meth:`CRCKDLoss.forward <crckd_losses.CRCKDLoss.forward>`:
        replayed where it fits the graphs (capturing them at the first call that can be
        captured), eagerly otherwise."""
        from ..crckd import CRCKDOutput

        crckd = self.crckd
        if crckd.training and sample_indices is None and generator is None and \
                not torch.compiler.is_compiling():
            student_feat, teacher_feat, indices = crckd.check_inputs(student_feat, teacher_feat,
                                                                     indices)
            packed = self._replay(student_feat, teacher_feat, indices)
            if packed is not None:
                # select, not unbind: an unbind's backward makes a zero gradient for every
                # unused output, a select's only for its own
                return CRCKDOutput(*(packed.select(0, i) for i in range(len(CRCKDOutput._fields))))
        out: CRCKDOutput = crckd(student_feat, teacher_feat, indices, sample_indices, generator)
        return out

    def _replay(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                indices: torch.Tensor) -> torch.Tensor | None:
        """The stacked outputs of this (checked, training) call replayed, capturing the graphs
        first where they are missing and the call can be captured; ``None`` where the call
        must run eagerly."""
        crckd = self.crckd
        graphs: Graphs | None = crckd.__dict__.get("_graphs")
        if stream_capturing(student_feat.device):
            return None  # inside a capture of the caller's own: recorded eagerly
        if graphs is None and student_feat.shape[0] == self.batch_size and \
                may_capture(crckd, student_feat):
            self.capture(self.dtype or student_feat.dtype)
            graphs = crckd.__dict__["_graphs"]
        if graphs is None:
            return None
        why_not = mismatch(graphs, crckd, student_feat, teacher_feat)
        if why_not is None:
            self._replays += 1
            return replay(graphs, student_feat, teacher_feat, indices)
        if why_not and not graphs.warned:
            graphs.warned.append(why_not)
            warn_at_caller(f"this call does not fit the CUDA graphs of graph_crckd_loss() "
                           f"({why_not}); it runs eagerly, as will any such call (warned once)")
        return None


def graph_crckd_loss(crckd: CRCKDLoss, batch_size: int, dtype: torch.dtype | None = None,
                     num_warmup_iters: int = 3) -> GraphedCRCKDLoss:
    """Run ``crckd``'s training step as two CUDA graphs, its forward and its backward.

    An eager step launches each of its kernels from Python; on a GPU that launching, not the
    arithmetic, is most of what CRCKD adds to a training step. The returned object is called
    as ``crckd`` is. Its first training call that can be captured (after the module's first
    training step, which estimates :math:`Z`; with gradients on; with ``batch_size``
    features) captures the step; from then on a training call with a batch of
    ``batch_size`` features of the captured dtype copies its three inputs into static
    tensors and replays one graph, and ``backward`` replays a second; the rest of your loop
    (model, optimiser, teacher) stays eager. The capture follows
    ``torch.cuda.make_graphed_callables`` (warm-up calls on a side stream, both graphs in one
    memory pool) and adds what this module needs:

    - the banks are switched to in-place writes read through snapshots
      (``copy_on_write="snapshot"`` of :class:`~crckd_losses.MomentumMemoryBank`): the graphs
      hold their addresses;
    - the warm-up calls write both banks (and move :math:`Z` under ``normalizer="ema"``)
      from made-up features: the state is saved first and put back afterwards, in place, so
      training continues exactly where it was; the random stream is put back too, so a
      graphed run draws the rows an eager run from the same seed would. If the capture
      fails, the state is put back all the same, and the error is raised;
    - the outputs and the gradients leave the graphs in memory of their own: an output kept
      past the next call keeps its value, and gradients accumulate over several calls
      (micro-batches) as they do eagerly;
    - a backward must run before the module's next call (it reads its own call's
      activations and the banks' snapshots, which the next call overwrites, replayed or
      eager); a late one raises;
    - the input checks still run on every call (shapes, devices, and values where
      :func:`~crckd_losses.set_value_checks` reads them; on a GPU it reads none by default,
      and the banks refuse bad rows on the device as in an eager step);
    - a call the graphs do not fit runs eagerly, on the same banks: another batch size (the
      last partial batch of an epoch), eval mode, ``sample_indices`` or a ``generator``
      given, a call inside a CUDA-graph capture of your own (a whole step); and, with a
      warning the first time, features of another dtype or on another device, another
      autocast state, or other parameters requiring gradients;
    - loading a state dict into the module, or moving or casting it, releases the graphs:
      the next call that can be captured captures them again. A copy or a pickle of the
      module leaves them behind.

    Call it where you run the loss: under the autocast you train with (the capture turns
    autocast's cache of weight casts off for itself, so that each replay casts the heads'
    current weights), outside ``torch.inference_mode()``. Do not write the banks yourself
    between replays. It has never run on a GPU: see :data:`crckd_losses.backends.STATUS`
    and :doc:`/howto/gpu`.

    Args:
        crckd: the module, on a CUDA device, in one process.
        batch_size: ``B`` of the calls to replay.
        dtype: the dtype of the features the calls pass; by default the first captured
            call's. Under autocast a backbone's features are often of the autocast dtype.
        num_warmup_iters: eager calls before the capture, on made-up features.

    Returns:
        A :class:`GraphedCRCKDLoss` (its :meth:`~GraphedCRCKDLoss.capture` captures at once).

    Raises:
        ValueError: the module not on a CUDA device, several processes, or no parameter
            requiring a gradient.
        TypeError: ``crckd`` not a :class:`~crckd_losses.CRCKDLoss`, a ``dtype`` that is not
            floating point.
    """
    return GraphedCRCKDLoss(crckd, batch_size, dtype, num_warmup_iters)
