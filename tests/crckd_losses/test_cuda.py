"""CUDA checks: the same results as on the CPU, mixed precision, and no host syncs."""

import importlib.util

import pytest
import torch

from crckd_losses import CRCKDLoss, EMATeacher, MomentumMemoryBank, backends, graph_crckd_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs Triton")


def paper_sized(device, dtype=torch.float32, backend="dense"):
    torch.manual_seed(0)
    labels = torch.randint(0, 7, (7012,))
    labels[:7] = torch.arange(7)
    crckd = CRCKDLoss(labels, 128, 128, backend=backend).to(device=device, dtype=dtype)
    f_s = torch.randn(64, 128, dtype=dtype)
    f_t = torch.randn(64, 128, dtype=dtype)
    idx = torch.randperm(7012)[:64]
    return crckd, f_s.to(device), f_t.to(device), idx.to(device)


@pytest.mark.parametrize("backend", ["reference", "dense", "gather"])
def test_step_matches_cpu(backend):
    cpu, f_s, f_t, idx = paper_sized("cpu", torch.float64, "reference")
    gpu, *_ = paper_sized("cuda", torch.float64, backend)
    sample = cpu.student_bank.sample(idx, 20, 4096)
    want = cpu(f_s, f_t, idx, sample_indices=sample)
    got = gpu(f_s.cuda(), f_t.cuda(), idx.cuda(), sample_indices=sample.cuda())
    for a, b in zip(want, got):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gpu.student_bank.memory.cpu(), cpu.student_bank.memory)
    torch.testing.assert_close(gpu.student_bank.centroids().cpu(), cpu.student_bank.centroids())


def test_sampler_on_device():
    labels = torch.randint(0, 7, (7012,), device="cuda")
    bank = MomentumMemoryBank(labels, dim=16)
    anchors = torch.randperm(7012, device="cuda")[:64]
    g = torch.Generator(device="cuda").manual_seed(0)
    for sampler in ("shuffle", "independent"):
        idx = bank.sample(anchors, 20, 4096, generator=g, sampler=sampler)
        assert idx.device.type == "cuda" and torch.equal(idx[:, 0], anchors)
        y = labels[anchors][:, None]
        assert bool((labels[idx[:, :20]] == y).all()) and bool((labels[idx[:, 20:]] != y).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_close_to_float32(dtype):
    crckd, f_s, f_t, idx = paper_sized("cuda")
    sample = crckd.student_bank.sample(idx, 20, 4096)
    crckd.eval()  # no bank writes: both calls read the same banks
    crckd.ccd.train()
    want = crckd(f_s, f_t, idx, sample_indices=sample)
    with torch.autocast("cuda", dtype=dtype):
        got = crckd(f_s, f_t, idx, sample_indices=sample)
    for a, b in zip(want, got):
        assert torch.isfinite(b)
        assert float(b.detach()) == pytest.approx(float(a.detach()), rel=1e-2, abs=1e-3)


@needs_triton
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_triton_path_matches_dense(autocast):
    """backend="triton" (compiled kernels) against the dense path: the same losses, the same
    gradients of both heads, at the paper's sizes, in float32 and under autocast."""
    crckd, f_s, f_t, idx = paper_sized("cuda")
    sample = crckd.student_bank.sample(idx, 20, 4096)
    crckd.eval()  # no bank writes: both calls read the same banks
    crckd.ccd.train()
    crckd(f_s, f_t, idx, sample_indices=sample)  # Z estimated once, then frozen for both
    results = {}
    for path in ("dense", "triton"):
        crckd.ccd.backend = path
        crckd.zero_grad()
        f = f_s.clone().requires_grad_()
        with torch.autocast("cuda", dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            out = crckd(f, f_t, idx, sample_indices=sample)
        out.loss.backward()
        results[path] = (*out, f.grad, crckd.student_head.linear.weight.grad.clone(),
                         crckd.teacher_head.linear.weight.grad.clone())
    rel = 2e-5 if autocast is None else 1e-2
    for a, b in zip(results["dense"], results["triton"]):
        err = float((b.float() - a.float()).abs().max())
        assert err <= rel * float(a.float().abs().max()) + 1e-7, err


@pytest.mark.parametrize("sampler", ["independent", "shuffle"])
@pytest.mark.parametrize("backend", ["dense", "auto", "compiled", "triton"])
def test_default_training_step_has_no_host_sync(sampler, backend):
    """A whole default step: CRCKDLoss forward and backward (sampling, both bank updates,
    centroids, the first call's Z too) and the EMA update, with the default value checks;
    eager, and compiled (by two warm-up steps first, since compiling is not a training
    step)."""
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton")
    crckd, f_s, f_t, idx = paper_sized("cuda", backend=backend)
    fused = backends.compiles(backend, f_s.device, step=True)
    crckd.ccd.sampler = sampler
    student = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.BatchNorm1d(128)).cuda()
    teacher = EMATeacher(student)
    optimizer = torch.optim.Adam([*student.parameters(), *crckd.parameters()],
                                 capturable=True)
    steps = 3
    if fused:
        for _ in range(2):
            crckd(student(f_s), f_t, idx).loss.backward()
        steps = 2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            out = crckd(student(f_s), f_t, idx)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            teacher.update(student)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss)
    assert int(crckd.student_bank.rejected_rows) == 0


def test_bad_rows_never_enter_a_bank_on_device():
    crckd, f_s, f_t, idx = paper_sized("cuda")
    f_s[3] = float("nan")
    idx[5] = 10_000  # out of range: clamped for reads, refused for writes
    before = crckd.student_bank.memory.clone()
    out = crckd(f_s, f_t, idx)
    assert not torch.isfinite(out.loss)
    for bank in (crckd.student_bank, crckd.teacher_bank):
        assert bool(torch.isfinite(bank.memory).all())
        assert int(bank.rejected_rows) == 2
    changed = (crckd.student_bank.memory != before).any(dim=1).nonzero().flatten().cpu()
    ok = [int(i) for k, i in enumerate(idx.cpu()) if k not in (3, 5)]
    assert sorted(changed.tolist()) == sorted(ok)


def test_ema_teacher_on_device():
    student = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).cuda()
    teacher = EMATeacher(student, decay=0.5, warmup=False)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)
    for t, b, s in zip(teacher.module.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)


def test_auto_compiles_the_step_on_cuda():
    assert backends.compiles("auto", torch.device("cuda"), step=True) == \
        backends.triton.available()


def test_compile_inductor_matches_eager():
    crckd, f_s, f_t, idx = paper_sized("cuda")
    sample = crckd.student_bank.sample(idx, 20, 4096)
    crckd.eval()
    crckd.ccd.train()
    want = crckd(f_s, f_t, idx, sample_indices=sample)
    compiled = torch.compile(crckd, fullgraph=True)
    got = compiled(f_s, f_t, idx, sample_indices=sample)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _graph_setup(seed=0, backend="dense"):
    torch.manual_seed(seed)
    labels = torch.randint(0, 7, (7012,))
    labels[:7] = torch.arange(7)
    student = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128)).cuda()
    crckd = CRCKDLoss(labels.cuda(), 128, 128, backend=backend).cuda()
    for bank in (crckd.student_bank, crckd.teacher_bank):
        bank.copy_on_write = "snapshot"  # in place: the whole step is captured
    teacher = EMATeacher(student, warmup=False)
    optimizer = torch.optim.Adam([*student.parameters(), *crckd.parameters()], lr=1e-3,
                                 capturable=True)
    return student, crckd, teacher, optimizer


def _step(student, crckd, teacher, optimizer, x, f_t, idx, sample=None):
    out = crckd(student(x), f_t, idx, sample_indices=sample)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    teacher.update(student)
    return out.loss


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("backend",
                         ["dense", "auto", pytest.param("triton", marks=needs_triton)])
def test_cuda_graph_replays_a_whole_step(sampled, backend):
    """The whole default step (forward, backward, both bank updates, centroids, the optimiser
    and the EMA update) captured once and replayed: every replay matches eager execution of
    the same step, with the rows given and with the library's sampler drawing from the same
    seed; the banks, the teacher and the loss agree after four steps."""
    import copy

    parts = _graph_setup(backend=backend)
    x = torch.randn(64, 64, device="cuda")
    f_t = torch.randn(64, 128, device="cuda")
    idx = torch.randperm(7012, device="cuda")[:64]
    sample = None if sampled else parts[1].student_bank.sample(idx, 20, 4096)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Z set, caches built, gradients allocated
        for _ in range(3):
            _step(*parts, x, f_t, idx, sample)
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(parts[:3])
    eager_opt = torch.optim.Adam([*eager[0].parameters(), *eager[1].parameters()], lr=1e-3,
                                 capturable=True)
    # load_state_dict keeps tensors that are already on the right device: without the
    # deepcopy both optimisers would update the same moments.
    eager_opt.load_state_dict(copy.deepcopy(parts[3].state_dict()))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(*parts, x, f_t, idx, sample)
    inputs = [(torch.randn(64, 64, device="cuda"), torch.randn(64, 128, device="cuda"),
               torch.randperm(7012, device="cuda")[:64]) for _ in range(4)]
    rows_seen = []
    for seed, (new_x, new_ft, new_idx) in enumerate(inputs):
        x.copy_(new_x)
        f_t.copy_(new_ft)
        idx.copy_(new_idx)
        # a replay draws from the default generator where it stands, as eager code does
        torch.cuda.manual_seed(seed)
        graph.replay()
        rows_seen.append(parts[1].student_bank.read().clone())
        torch.cuda.manual_seed(seed)
        want = _step(*eager, eager_opt, new_x, new_ft, new_idx, sample)
        torch.testing.assert_close(static_loss, want, rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss)
    assert int(parts[1].student_bank.rejected_rows) == 0
    for name in ("student_bank", "teacher_bank"):
        torch.testing.assert_close(getattr(parts[1], name).memory,
                                   getattr(eager[1], name).memory, rtol=1e-5, atol=1e-6)
    for a, b in zip(parts[2].module.parameters(), eager[2].module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # each replay wrote the batch's rows: the banks moved between replays
    assert not torch.equal(rows_seen[0], rows_seen[-1])


def _trained_once(backend="dense"):
    torch.manual_seed(0)
    labels = torch.randint(0, 7, (7012,))
    labels[:7] = torch.arange(7)
    crckd = CRCKDLoss(labels.cuda(), 128, 128, backend=backend).cuda()
    torch.cuda.manual_seed(1)
    f_s = torch.randn(64, 128, device="cuda", requires_grad=True)
    crckd(f_s, torch.randn(64, 128, device="cuda"), torch.arange(64, device="cuda")
          ).loss.backward()
    return crckd


@pytest.mark.parametrize("backend",
                         ["dense", "auto", pytest.param("triton", marks=needs_triton)])
def test_graph_crckd_loss_matches_eager(backend):
    """graph_crckd_loss on a GPU: after the capture the state is as before;
    training steps replay the graphs (a partial batch runs eagerly in between, uncompiled)
    and match the same steps on an eager twin (losses, input gradients, banks, centroids,
    head gradients; outputs and gradients kept from one replay keep their values after the
    next); a replayed step, forward and backward, needs no host sync."""
    graphed, eager = _trained_once(backend), _trained_once(backend)
    before = graphed.student_bank.memory.clone()
    wrapper = graph_crckd_loss(graphed, 64)
    wrapper.capture()
    torch.testing.assert_close(graphed.student_bank.memory, before, rtol=0, atol=0)
    # the partial batch only where nothing compiles (a new size compiles the step again)
    compiled = backends.compiles(backend, before.device, step=True)
    sizes = [64, 64, 64, 64] if compiled else [64, 64, 40, 64, 64]
    kept = []
    for i, size in enumerate(sizes):
        got = []
        for module, call in ((graphed, wrapper), (eager, eager)):
            g = torch.Generator(device="cuda").manual_seed(10 + i)
            f_s = torch.randn(size, 128, device="cuda", generator=g, requires_grad=True)
            f_t = torch.randn(size, 128, device="cuda", generator=g)
            idx = torch.randperm(7012, device="cuda", generator=g)[:size]
            torch.cuda.manual_seed(100 + i)
            if module is graphed and size == 64:
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = call(f_s, f_t, idx)
                out.loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            got.append((out.loss.detach(), out.crp.detach(), f_s.grad))
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        kept.append(got)
    assert wrapper.replays == 4
    # outputs and input gradients kept from earlier replays were not overwritten by later ones
    for g, e in kept:
        for a, b in zip(g, e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in ("student_bank", "teacher_bank"):
        torch.testing.assert_close(getattr(graphed, name).memory,
                                   getattr(eager, name).memory, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(getattr(graphed, name).centroids(),
                                   getattr(eager, name).centroids(), rtol=1e-5, atol=1e-6)
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def _bf16_batch(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    f_s = torch.randn(64, 128, device="cuda", generator=g).bfloat16().requires_grad_()
    f_t = torch.randn(64, 128, device="cuda", generator=g).bfloat16()
    return f_s, f_t, torch.randperm(7012, device="cuda", generator=g)[:64]


def test_graph_crckd_loss_under_autocast():
    """Captured under bfloat16 autocast for bfloat16 features (as a backbone under autocast
    gives them). The autocast is the default one, its weight-cast cache on, and an eager step
    runs first in the same block, so the cache holds casts of the heads' weights; each later
    step runs in a block of its own and SGD moves the heads between steps. The replayed
    steps match the eager twin's: a capture that reused the cached casts would replay the
    heads as they were before it, from memory freed when its block ended."""
    graphed, eager = _trained_once(), _trained_once()
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (graphed, eager)]
    wrapper = graph_crckd_loss(graphed, 64, dtype=torch.bfloat16)

    def step(module, opt, seed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            f_s, f_t, idx = _bf16_batch(seed)
            torch.cuda.manual_seed(seed)
            out = module(f_s, f_t, idx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        return out.loss.detach(), f_s.grad

    with torch.autocast("cuda", dtype=torch.bfloat16):
        for module, opt in zip((graphed, eager), opts):
            step(module, opt, 39)
        wrapper.capture()
    for i in range(3):
        got = [step(module, opt, 40 + i) for module, opt in zip((wrapper, eager), opts)]
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert wrapper.replays == 3
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_graph_crckd_loss_beside_a_pinning_data_loader():
    """A capture mid-loop, while a DataLoader(pin_memory=True) pins the prefetched
    batches in its own thread: the capture succeeds, the loader delivers every batch, and
    the next call replays. (Under torch's default "global" capture mode the pinning thread's
    CUDA calls would invalidate the capture and then fail in the thread.)"""
    crckd = _trained_once()
    wrapper = graph_crckd_loss(crckd, 64)
    images = torch.utils.data.TensorDataset(torch.randn(64 * 12, 3, 128, 128))
    loader = torch.utils.data.DataLoader(images, batch_size=64, pin_memory=True,
                                         num_workers=2, prefetch_factor=4)
    batches = iter(loader)
    first = next(batches)[0]  # from here the pin-memory thread pins the next batches
    wrapper.capture()
    rest = [b[0] for b in batches]
    assert first.is_pinned() and len(rest) == 11 and all(b.is_pinned() for b in rest)
    f_s = torch.randn(64, 128, device="cuda", requires_grad=True)
    wrapper(f_s, torch.randn(64, 128, device="cuda"), torch.arange(64, device="cuda")
            ).loss.backward()
    assert wrapper.replays == 1 and torch.isfinite(f_s.grad).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
def test_graph_crckd_loss_on_a_device_that_is_not_current(backend):
    """A module on cuda:1 while cuda:0 is the current device: the side stream, the
    synchronisations, the captures and the Triton kernels' launches are on the module's
    device, and replays match an eager twin."""
    graphed, eager = (_trained_once(backend).to("cuda:1") for _ in range(2))
    wrapper = graph_crckd_loss(graphed, 64)
    wrapper.capture()
    for i in range(2):
        got = []
        for module in (wrapper, eager):
            g = torch.Generator(device="cuda:1").manual_seed(60 + i)
            f_s = torch.randn(64, 128, device="cuda:1", generator=g, requires_grad=True)
            f_t = torch.randn(64, 128, device="cuda:1", generator=g)
            idx = torch.randperm(7012, device="cuda:1", generator=g)[:64]
            torch.cuda.manual_seed_all(300 + i)
            out = module(f_s, f_t, idx)
            out.loss.backward()
            got.append((out.loss.detach(), f_s.grad))
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.cuda.current_device() == 0 and wrapper.replays == 2
