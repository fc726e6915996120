"""graph_crckd_loss: a CRCKDLoss's training step as CUDA graphs, on a CPU.

CUDA graphs need a GPU. Here a host-side stand-in
(``tests/crckd_losses/backends/graph_stand_in.py``) takes the place of the graph objects
only: the warm-up calls run for real and write the banks; a capture runs the Python without
changing any tensor; a replay recomputes the captured work from the static inputs into the
static outputs and runs no Python. Everything else is the library's own code: the state and
the random stream put back, the copies in and out of the static tensors, gradients in memory
of their own, the check that a backward reads its own forward's activations, the calls that
run eagerly, the errors, the release on load or move. The real capture and replay on a GPU
are in ``tests/crckd_losses/test_cuda.py``.
"""

import copy
import pickle
import warnings

import pytest
import torch

from crckd_losses import CRCKDLoss, GraphedCRCKDLoss, graph_crckd_loss
from crckd_losses.backends import cuda_graphs as cuda_graphs_module
from tests.crckd_losses.backends import graph_stand_in as _graph_stand_in
from tests.crckd_losses.backends.graph_stand_in import HostGraphs


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    _graph_stand_in.graphs_on_cpu(monkeypatch)


def make(**kw):
    """A module whose banks write in place through snapshots, as the wrapper's do."""
    torch.manual_seed(0)
    labels = torch.arange(120) % 4
    kw = {"embed_dim": 8, "num_positives": 4, "num_negatives": 24, "backend": "dense", **kw}
    crckd = CRCKDLoss(labels, student_dim=10, teacher_dim=12, **kw)
    for bank in (crckd.student_bank, crckd.teacher_bank):
        bank.copy_on_write = "snapshot"
    return crckd


def graphed(crckd, batch_size=6, **kw):
    """``crckd`` wrapped, its graphs captured now."""
    wrapper = graph_crckd_loss(crckd, batch_size, **kw)
    wrapper.capture()
    return wrapper


def batch(seed, size=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 10, generator=g, requires_grad=True),
            torch.randn(size, 12, generator=g), torch.randperm(120, generator=g)[:size])


def state_of(crckd):
    """The state a step trains."""
    banks = (crckd.student_bank, crckd.teacher_bank)
    return [t.clone() for b in banks for t in (b.memory, b.rejected_rows)] + \
        [crckd.ccd.log_normalizer.clone(), *[p.detach().clone() for p in crckd.parameters()]]


def trained_once(**kw):
    """A module after one eager training step (which estimates Z)."""
    crckd = make(**kw)
    torch.manual_seed(1)
    crckd(*batch(0)).loss.backward()
    return crckd


def assert_same_state(a, b):
    for x, y in zip(state_of(a) if isinstance(a, CRCKDLoss) else a,
                    state_of(b) if isinstance(b, CRCKDLoss) else b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("normalizer", ["first_batch", "ema"])
def test_capture_puts_the_state_and_the_random_stream_back(graphs_on_cpu, normalizer):
    """The warm-up calls wrote both banks (and moved Z under "ema"); after the capture every
    tensor of the state is as before, in the same storage, and the random stream draws what
    it would have drawn."""
    crckd = trained_once(normalizer=normalizer)
    before = state_of(crckd)
    storages = [crckd.student_bank.memory.data_ptr(), crckd.teacher_bank.memory.data_ptr()]
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    wrapper = graphed(crckd, num_warmup_iters=2)
    assert torch.equal(torch.rand(3), want)
    assert_same_state(before, crckd)
    assert storages == [crckd.student_bank.memory.data_ptr(),
                        crckd.teacher_bank.memory.data_ptr()]
    assert wrapper.replays == 0


@pytest.mark.parametrize("normalizer", ["first_batch", "ema"])
def test_graphed_steps_match_an_eager_twin(graphs_on_cpu, normalizer):
    """Four training steps through the graphs, with a partial batch, an eval call and given
    rows in between (which run eagerly), backpropagating the loss or other outputs: losses,
    gradients, banks, Z and centroids equal those of the same steps on a
    copy that never captured."""
    crckd, twin = trained_once(normalizer=normalizer), trained_once(normalizer=normalizer)
    wrapper = graphed(crckd)
    for i, size in enumerate([6, 6, 4, 6, 6]):
        for module, call in ((crckd, wrapper), (twin, twin)):
            torch.manual_seed(100 + i)
            f_s, f_t, idx = batch(i + 1, size)
            out = call(f_s, f_t, idx)
            # every output carries its gradient, not only the loss
            (out.loss if i % 2 == 0 else out.ccd_student * 0.3 + out.crp).backward()
            module.grad_s = f_s.grad
            module.out = out
        for a, b in zip(crckd.out, twin.out):
            assert torch.equal(a, b)
        assert torch.equal(crckd.grad_s, twin.grad_s)
        if i == 1:
            idx = torch.arange(6)
            rows = crckd.student_bank.sample(idx, 4, 24)
            for module, call in ((crckd, wrapper), (twin, twin)):
                call(*batch(50)[:2], idx, sample_indices=rows)
                module.eval()
                call(*batch(51))
                module.train()
    assert wrapper.replays == 4
    assert HostGraphs.replays == 8  # a forward and a backward each
    for a, b in zip(crckd.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert_same_state(crckd, twin)
    for bank, twin_bank in ((crckd.student_bank, twin.student_bank),
                            (crckd.teacher_bank, twin.teacher_bank)):
        torch.testing.assert_close(bank.centroids(), twin_bank.centroids(), rtol=0, atol=1e-12)


def test_what_capture_needs_is_said(graphs_on_cpu):
    crckd = make()
    wrapper = graph_crckd_loss(crckd, 6)
    assert isinstance(wrapper, GraphedCRCKDLoss)
    with pytest.raises(ValueError, match="one eager training step first"):
        wrapper.capture()
    crckd(*batch(0)).loss.backward()
    with pytest.raises(ValueError, match="batch_size"):
        graph_crckd_loss(crckd, 0)
    with pytest.raises(ValueError, match="num_warmup_iters"):
        graph_crckd_loss(crckd, 6, num_warmup_iters=0)
    with pytest.raises(TypeError, match="must be a CRCKDLoss"):
        graph_crckd_loss(torch.nn.Linear(2, 2), 6)
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        graph_crckd_loss(crckd, 6, dtype=torch.int64)
    crckd.eval()
    with pytest.raises(ValueError, match="training mode"):
        wrapper.capture()
    crckd.train()
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        wrapper.capture()
    frozen = make()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the module requires a gradient"):
        graph_crckd_loss(frozen, 6)
    copying = make()
    copying.student_bank.copy_on_write = copying.teacher_bank.copy_on_write = True
    graph_crckd_loss(copying, 6)  # the wrapper writes the banks in place, read by snapshots
    assert copying.student_bank.copy_on_write == copying.teacher_bank.copy_on_write == \
        "snapshot"
    wrapper.capture()
    with pytest.raises(RuntimeError, match="captured already"):
        wrapper.capture()


def test_capture_needs_cuda():
    crckd = make()
    crckd(*batch(0)).loss.backward()
    with pytest.raises(ValueError, match="CUDA device, got cpu"):
        graph_crckd_loss(crckd, 6)


@pytest.mark.parametrize("how", ["load_state_dict", "to"])
def test_loading_or_moving_releases_the_graphs(graphs_on_cpu, how):
    """The graphs hold addresses: a load or a move releases them, and the wrapper's next call
    that fits captures them again (no warning)."""
    crckd = make()
    crckd(*batch(0)).loss.backward()
    saved = copy.deepcopy(crckd.state_dict())
    wrapper = graphed(crckd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if how == "to":
            crckd.to(torch.float64)
        else:
            crckd.load_state_dict(saved)
    assert "_graphs" not in crckd.__dict__
    assert wrapper.replays == 0 and HostGraphs.replays == 0
    f_s, f_t, idx = batch(1)
    dtype = torch.float64 if how == "to" else torch.float32
    wrapper(f_s.detach().to(dtype).requires_grad_(), f_t.to(dtype), idx).loss.backward()
    assert wrapper.replays == 1 and crckd.__dict__["_graphs"].dtype == dtype


def test_a_failed_capture_loses_nothing(monkeypatch):
    """A capture that fails after its warm-up calls (a capture error on the device) leaves
    the state as it was, raises, and the module trains on eagerly, as its twin does."""

    class Fails(HostGraphs):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    _graph_stand_in.graphs_on_cpu(monkeypatch, Fails)
    crckd, twin = trained_once(), trained_once()
    with pytest.raises(RuntimeError, match="stream is capturing"):
        graphed(crckd)
    assert "_graphs" not in crckd.__dict__
    assert_same_state(crckd, twin)
    for module in (crckd, twin):
        torch.manual_seed(7)
        module.out = module(*batch(3))
    assert torch.equal(crckd.out.loss, twin.out.loss)
    assert_same_state(crckd, twin)


def test_gradients_accumulate_over_replays(graphs_on_cpu):
    """Two micro-batches, a backward after each, one optimiser step: the heads' gradients
    are the sum of both, as eagerly. (A parameter's ``.grad`` that aliased the graph's static
    gradient would hold the second micro-batch's twice.) Outputs kept from the first call
    keep their values after the second replays."""
    crckd, twin = trained_once(), trained_once()
    wrapper = graphed(crckd)
    for module, call in ((crckd, wrapper), (twin, twin)):
        module.zero_grad(set_to_none=True)
        module.kept = []
        for i in range(2):
            torch.manual_seed(20 + i)
            out = call(*batch(10 + i))
            out.loss.backward()
            module.kept.append(out.loss.detach())
        module.kept_values = [float(v) for v in module.kept]
    assert wrapper.replays == 2
    assert crckd.kept_values[0] != crckd.kept_values[1]
    assert crckd.kept_values == twin.kept_values
    for a, b in zip(crckd.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_a_backward_after_the_next_replay_raises(graphs_on_cpu):
    """The backward of a replayed call reads the activations its forward left in the graph;
    after the next call has replayed, they are that call's: the late backward raises instead
    of returning another step's gradients. So does a second backward
    (``retain_graph=True``) after the next replay. Each call's own backward still works."""
    wrapper = graphed(trained_once())
    first = wrapper(*batch(1))
    second = wrapper(*batch(2))
    with pytest.raises(RuntimeError, match="before the next call replays them or runs eagerly"):
        first.loss.backward()
    second.loss.backward(retain_graph=True)
    wrapper(*batch(3)).loss.backward()
    with pytest.raises(RuntimeError, match="before the next call replays them or runs eagerly"):
        second.loss.backward()
    assert wrapper.replays == 3


@pytest.mark.parametrize("through", ["wrapper", "module"])
@pytest.mark.parametrize("eager_call", ["partial batch", "eval mode", "given rows"])
def test_a_backward_after_an_eager_call_raises(graphs_on_cpu, eager_call, through):
    """An eager call of the module rewrites the banks' snapshots in place, which the backward
    of a replayed call still to come would read; a replay's backward has no version check,
    so that backward raises (where eagerly autograd would find the snapshot modified), whether
    the eager call went through the wrapper or to the module itself. In order, eager calls
    between replays are fine."""
    crckd = trained_once()
    wrapper = graphed(crckd)
    call = wrapper if through == "wrapper" else crckd

    def eager():
        f_s, f_t, idx = batch(2, size=6 if eager_call != "partial batch" else 4)
        if eager_call == "eval mode":
            crckd.eval()
            call(f_s, f_t, idx)
            crckd.train()
        elif eager_call == "given rows":
            width = crckd.ccd.num_positives + crckd.ccd.num_negatives
            call(f_s, f_t, idx, sample_indices=torch.randint(0, 120, (6, width)))
        else:
            call(f_s, f_t, idx)

    replayed = wrapper(*batch(1))
    eager()
    with pytest.raises(RuntimeError, match="before the next call replays them or runs eagerly"):
        replayed.loss.backward()
    wrapper(*batch(3)).loss.backward()
    eager()
    wrapper(*batch(4)).loss.backward()
    assert wrapper.replays == 3


def test_frozen_head_gets_no_gradient(graphs_on_cpu):
    """A head whose parameters do not require a gradient stays without one, graphed too."""
    crckd, twin = trained_once(), trained_once()
    for module in (crckd, twin):
        module.teacher_head.requires_grad_(False)
        module.zero_grad(set_to_none=True)
    wrapper = graphed(crckd)
    for call in (wrapper, twin):
        torch.manual_seed(4)
        call(*batch(4)).loss.backward()
    assert wrapper.replays == 1
    assert crckd.teacher_head.linear.weight.grad is None
    assert torch.equal(crckd.student_head.linear.weight.grad,
                       twin.student_head.linear.weight.grad)


def test_capture_reads_no_value_whatever_the_mode(graphs_on_cpu):
    """A value read is a host sync, which a CUDA capture refuses: under
    set_value_checks("raise") the capture still reads nothing (no ``_local_scalar_dense``),
    the mode is back afterwards, and a call is checked before it would replay."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from crckd_losses import set_value_checks, value_checks

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    crckd = trained_once()
    set_value_checks("raise")
    try:
        with Reads():
            crckd(*batch(1)).loss.backward()  # an eager step in this mode reads values
            eager_reads, Reads.count = Reads.count, 0
            wrapper = graphed(crckd)
        assert eager_reads > 0 and Reads.count == 0
        assert value_checks() == "raise"
        f_s, f_t, idx = batch(2)
        with pytest.raises(ValueError, match="NaN or Inf"):
            wrapper(f_s.detach().index_fill(0, torch.tensor([1]), float("nan")), f_t, idx)
    finally:
        set_value_checks("auto")
    assert wrapper.replays == 0


def test_features_of_the_autocast_dtype(graphs_on_cpu):
    """Under autocast a backbone's features are often of the autocast dtype: captured for
    them (dtype=...), calls replay and match an eager twin's; captured for the heads' dtype,
    such calls warn once and run eagerly. The autocast is the default one, its weight-cast
    cache on: the capture turns the cache off for itself (the stand-in refuses a capture
    with it on) and leaves the caller's autocast as it was."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    crckd, twin, plain = trained_once(), trained_once(), trained_once()
    with autocast:
        for module in (crckd, twin, plain):  # eager steps first: the cache holds casts
            torch.manual_seed(29)
            module(*batch(29)).loss.backward()
        wrapper = graphed(crckd, dtype=torch.bfloat16)
        plain_wrapper = graphed(plain)
        assert torch.is_autocast_cache_enabled()
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        for i in range(2):
            for module, call in ((crckd, wrapper), (twin, twin), (plain, plain_wrapper)):
                torch.manual_seed(30 + i)
                f_s, f_t, idx = batch(30 + i)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    module.out = call(f_s.bfloat16(), f_t.bfloat16(), idx)
                module.caught = [str(w.message) for w in caught]
            assert torch.equal(crckd.out.loss, twin.out.loss)
            assert torch.equal(plain.out.loss, twin.out.loss)
            assert crckd.caught == []
            assert len(plain.caught) == (1 if i == 0 else 0)
    assert "dtype torch.bfloat16" in plain.__dict__["_graphs"].warned[0]
    assert wrapper.replays == 2 and plain_wrapper.replays == 0


def test_capture_under_no_grad(graphs_on_cpu):
    """Called under ``torch.no_grad()`` (beside a teacher's forward, say), the capture still
    captures the training step: the next call replays, and its gradients are the eager
    twin's."""
    crckd, twin = trained_once(), trained_once()
    with torch.no_grad():
        wrapper = graphed(crckd)
    for module, call in ((crckd, wrapper), (twin, twin)):
        torch.manual_seed(7)
        f_s, f_t, idx = batch(7)
        call(f_s, f_t, idx).loss.backward()
        module.grad_in = f_s.grad
    assert wrapper.replays == 1
    assert torch.equal(crckd.grad_in, twin.grad_in)
    for a, b in zip(crckd.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_features_on_another_device_run_eagerly(graphs_on_cpu):
    """A replica of the module on another GPU (``nn.DataParallel`` copies its attributes,
    the graphs included) must not replay graphs captured elsewhere: its calls warn once and
    run eagerly. (Here the capture's static input is put on another device instead.)"""
    crckd = trained_once()
    wrapper = graphed(crckd)
    step = crckd.__dict__["_graphs"].step
    step.inputs = (torch.empty(6, 10, device="meta"), *step.inputs[1:])
    with pytest.warns(UserWarning, match="features on cpu, captured on meta"):
        wrapper(*batch(3)).loss.backward()
    assert wrapper.replays == 0


def test_other_trainable_parameters_run_eagerly(graphs_on_cpu):
    """The backward graph computes the gradients of the parameters that required one at the
    capture: after freezing a head, calls warn once and run eagerly (no gradient for it)."""
    crckd = trained_once()
    wrapper = graphed(crckd)
    crckd.teacher_head.requires_grad_(False)
    crckd.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="other parameters require gradients"):
        wrapper(*batch(5)).loss.backward()
    assert crckd.teacher_head.linear.weight.grad is None
    assert wrapper.replays == 0
    crckd.teacher_head.requires_grad_(True)
    wrapper(*batch(6)).loss.backward()
    assert wrapper.replays == 1


def test_what_a_replayed_step_runs_besides_its_graphs(graphs_on_cpu):
    """Around its two replays, a graphed step runs only its copies: the three inputs in and
    the stacked outputs out; in backward, the select's gradient, one copy in and one
    concatenation out (no zero gradient for the outputs a loop only logs, and no copy per
    parameter). Counted with the replays themselves switched off, under the value-check
    policy of a GPU ("mask": no value read)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from crckd_losses import set_value_checks

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    crckd = trained_once()
    wrapper = graphed(crckd)
    step = crckd.__dict__["_graphs"].step
    step.replay_forward = step.replay_backward = lambda: None
    f_s, f_t, idx = batch(8)
    crckd.zero_grad(set_to_none=True)  # as a loop does: backward then sets new gradients
    set_value_checks("mask")
    try:
        with Ops() as forward:
            out = wrapper(f_s, f_t, idx)
        with Ops() as backward:
            out.loss.backward()
    finally:
        set_value_checks("auto")
    assert wrapper.replays == 1
    assert sorted(forward.names) == ["clone.default", "copy_.default", "copy_.default",
                                     "copy_.default"]
    assert sorted(backward.names) == ["cat.default", "copy_.default", "ones_like.default",
                                      "select_backward.default"]
    assert f_s.grad is not None and crckd.student_head.linear.weight.grad is not None


def test_the_wrapper_captures_by_itself(graphs_on_cpu):
    """Without ``capture()``: the first training call runs eagerly (it estimates Z), the next
    captures for its batch size and replays, and every later call that fits replays; losses,
    gradients and the state equal an eager twin's, a partial batch running eagerly in
    between, without a warning."""
    crckd, twin = make(), make()
    wrapper = graph_crckd_loss(crckd, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, size in enumerate([6, 6, 6, 4, 6]):
            for module, call in ((crckd, wrapper), (twin, twin)):
                torch.manual_seed(200 + i)
                f_s, f_t, idx = batch(200 + i, size)
                module.out = call(f_s, f_t, idx)
                module.out.loss.backward()
                module.grad_s = f_s.grad
            assert torch.equal(crckd.out.loss, twin.out.loss)
            assert torch.equal(crckd.grad_s, twin.grad_s)
            assert ("_graphs" in crckd.__dict__) == (i >= 1)
    assert wrapper.replays == 3
    assert crckd.__dict__["_graphs"].batch == 6
    for a, b in zip(crckd.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert_same_state(crckd, twin)


def test_the_wrapper_waits_for_a_call_it_can_capture(graphs_on_cpu, monkeypatch):
    """No capture from a call without gradients, of another batch size, or from inside a
    CUDA-graph capture of the caller's own (a whole step, which records the eager call
    instead); the next plain training call captures. Inside such a capture the graphs do
    not replay either. A load captures again at the next call, without a warning."""
    crckd = make()
    wrapper = graph_crckd_loss(crckd, 6)
    wrapper(*batch(0)).loss.backward()
    with torch.no_grad():
        wrapper(*batch(1))
    wrapper(*batch(9, size=4)).loss.backward()
    monkeypatch.setattr(cuda_graphs_module, "stream_capturing", lambda device: True)
    wrapper(*batch(2)).loss.backward()
    assert "_graphs" not in crckd.__dict__
    monkeypatch.undo()
    _graph_stand_in.graphs_on_cpu(monkeypatch)
    wrapper(*batch(3)).loss.backward()
    assert wrapper.replays == 1
    monkeypatch.setattr(cuda_graphs_module, "stream_capturing", lambda device: True)
    wrapper(*batch(5)).loss.backward()  # inside a capture of the caller's: eager, recorded
    assert wrapper.replays == 1
    monkeypatch.setattr(cuda_graphs_module, "stream_capturing", lambda device: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crckd.load_state_dict(copy.deepcopy(crckd.state_dict()))
    assert "_graphs" not in crckd.__dict__
    wrapper(*batch(4)).loss.backward()
    assert wrapper.replays == 2


def test_a_copy_or_a_pickle_leaves_the_graphs_behind(graphs_on_cpu):
    """The graphs hold the module's addresses: ``copy.deepcopy`` and pickling (``torch.save``
    of the module) leave them out. The copy runs eagerly and trains as the original's eager
    twin; the original still replays; a wrapper of the copy captures its own."""
    crckd, twin = trained_once(), trained_once()
    wrapper = graphed(crckd)
    copied = copy.deepcopy(crckd)
    unpickled = pickle.loads(pickle.dumps(crckd))
    for module in (copied, unpickled):
        assert "_graphs" not in module.__dict__
    for module, call in ((crckd, wrapper), (copied, copied), (unpickled, unpickled),
                         (twin, twin)):
        torch.manual_seed(60)
        module.out = call(*batch(60))
        module.out.loss.backward()
    for module in (crckd, copied, unpickled):
        assert torch.equal(module.out.loss, twin.out.loss)
        assert_same_state(module, twin)
    assert wrapper.replays == 1
    copy_wrapper = graph_crckd_loss(copied, 6)
    copy_wrapper(*batch(2)).loss.backward()
    assert copy_wrapper.replays == 1
    assert copied.__dict__["_graphs"].step.params[0] is copied.student_head.linear.weight
