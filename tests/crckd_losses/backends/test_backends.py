"""crckd_losses.backends: every backend against the reference maths of
crckd_losses.functional, over dtype x device; what "auto" picks; the status table."""

import pytest
import torch
import torch.nn.functional as F

from crckd_losses import ClassGuidedContrastiveLoss, CRCKDLoss, backends
from crckd_losses import functional as CF
from crckd_losses.backends import general
from tests import ROOT
from tests.crckd_losses.backends.helpers import ccd_pair

#: (dtype of the inputs, autocast dtype or None, relative tolerance)
DTYPES = {"float64": (torch.float64, None, 1e-10), "float32": (torch.float32, None, 2e-5),
          "bfloat16 autocast": (torch.float32, torch.bfloat16, 3e-2)}


def runnable(backend, device, autocast):
    """Why ``backend`` cannot run here, or None."""
    if backend == "triton" and (device.type != "cuda" or not backends.triton.available()):
        return "backend='triton' needs a CUDA device and Triton"
    if backend == "compiled" and device.type == "cpu":
        if autocast is not None:
            return "inductor's CPU code under bfloat16 autocast: covered on CUDA"
        if (2, 10) <= torch.__version__ < (2, 12):  # TorchVersion compares with tuples
            return ("torch 2.10/2.11's CPU inductor emits C++ that does not compile "
                    "(test_compiled.py marks it as an expected failure)")
    return None


def crckd_steps(backend, dtype, autocast, device, steps=2):
    """Two training steps of a small CRCKDLoss on given rows: every output, the gradient of
    the student feature and of both heads, and both banks after the steps."""
    torch.manual_seed(0)
    labels = torch.arange(90, device=device) % 3
    crckd = CRCKDLoss(labels, 10, 12, embed_dim=8, num_positives=4, num_negatives=20,
                      backend=backend).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    results = []
    for _ in range(steps):
        f_s = torch.randn(6, 10, generator=g, dtype=dtype).to(device).requires_grad_()
        f_t = torch.randn(6, 12, generator=g, dtype=dtype).to(device)
        idx = torch.randperm(90, generator=g)[:6].to(device)
        rows = crckd.student_bank.sample(idx, 4, 20, generator=None).cpu()
        rows = torch.randint(0, 90, rows.shape, generator=g).to(device)
        rows[:, 0] = idx
        with torch.autocast(device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            out = crckd(f_s, f_t, idx, sample_indices=rows)
        crckd.zero_grad()
        out.loss.backward()
        results += [*(o.detach() for o in out), f_s.grad,
                    *(p.grad.clone() for p in crckd.parameters())]
    return results + [crckd.student_bank.memory, crckd.teacher_bank.memory]


def assert_close(got, want, rel):
    for a, b in zip(got, want, strict=True):
        a, b = a.double().cpu(), b.double().cpu()
        assert float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-3)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", [b for b in backends.BACKENDS if b != "reference"])
def test_crckd_step_matches_the_reference_backend(backend, dtype_name, device):
    """Each backend against ``backend="reference"``, whose CCD is
    :func:`functional.class_guided_contrastive_loss` as written (and whose CRP is
    :func:`functional.categorical_relation_loss`'s maths): losses, input and head
    gradients, and both banks over two steps (the first estimates Z, the second reads it)."""
    dtype, autocast, rel = DTYPES[dtype_name]
    why = runnable(backend, device, autocast)
    if why:
        pytest.skip(why)
    if backend == "compiled":
        torch._dynamo.reset()
    got = crckd_steps(backend, dtype, autocast, device)
    want = crckd_steps("reference", dtype, autocast, device)
    assert_close(got, want, rel)


def test_reference_backend_is_the_functional_form():
    """The reference backend's CCD is functional.class_guided_contrastive_loss, in float64,
    with the module's Z (estimated from the first batch)."""
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    crckd = CRCKDLoss(labels, 5, 5, embed_dim=4, num_positives=3, num_negatives=9,
                      backend="reference").double()
    f_s, f_t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    idx = torch.tensor([0, 7, 20, 33])
    rows = torch.randint(0, 60, (4, 12))
    rows[:, 0] = idx
    banks = [b.memory.clone() for b in (crckd.student_bank, crckd.teacher_bank)]
    out = crckd(f_s, f_t, idx, sample_indices=rows)
    g_s = F.normalize(crckd.student_head.linear(f_s), dim=1)
    g_t = F.normalize(crckd.teacher_head.linear(f_t), dim=1)
    l_s, l_t = CF.class_guided_contrastive_loss(g_s, g_t, banks[0], banks[1], rows, 3)
    torch.testing.assert_close(out.ccd_student, l_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.ccd_teacher, l_t, rtol=1e-12, atol=1e-12)
    c_s, c_t = (CF.class_centroids(b.memory, labels, 3) for b in (crckd.student_bank,
                                                                   crckd.teacher_bank))
    torch.testing.assert_close(out.crp, CF.categorical_relation_loss(g_s, g_t, c_s, c_t),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_ccd_module_matches_functional(backend, device):
    """ClassGuidedContrastiveLoss alone on each backend (``"compiled"`` compiles its CCD)
    against the functional form with the module's Z, forward and backward, float32."""
    why = runnable(backend, device, None)
    if why:
        pytest.skip(why)
    torch._dynamo.reset()
    labels = torch.arange(80, device=device) % 4
    from crckd_losses import MomentumMemoryBank

    bank_s, bank_t = (MomentumMemoryBank(labels, dim=8) .to(device) for _ in range(2))
    ccd = ClassGuidedContrastiveLoss(num_positives=3, num_negatives=12, backend=backend)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        g_s = F.normalize(torch.randn(5, 8, generator=g), dim=1).to(device).requires_grad_()
        g_t = F.normalize(torch.randn(5, 8, generator=g), dim=1).to(device)
        idx = torch.randperm(80, generator=g)[:5].to(device)
        rows = bank_s.sample(idx, 3, 12)
        terms = ccd.terms(g_s, g_t, idx, bank_s, bank_t, sample_indices=rows)
        (grad,) = torch.autograd.grad(terms.student + terms.teacher, [g_s])
        a = g_s.detach().requires_grad_()
        want = CF.class_guided_contrastive_loss(a, g_t, bank_s.memory, bank_t.memory, rows, 3,
                                                0.07, ccd.log_normalizer[0],
                                                ccd.log_normalizer[1])
        (want_grad,) = torch.autograd.grad(want[0] + want[1], [a])
        assert_close([terms.student, terms.teacher, grad], [*want, want_grad], 2e-5)


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_general_backends_gradcheck(backend):
    g = torch.Generator().manual_seed(0)
    m_s, m_t = (F.normalize(torch.randn(12, 4, generator=g, dtype=torch.float64), dim=1)
                for _ in range(2))
    idx = torch.randint(0, 12, (3, 6), generator=g)
    anchors = [F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
               .requires_grad_() for _ in range(2)]

    def f(a, b):
        return torch.stack(ccd_pair(backend, a, b, m_s, m_t, idx, 2, 0.5, 0.2, -0.1))

    assert torch.autograd.gradcheck(f, anchors)


def test_auto_chooses_dense_or_gather_by_the_banks_size(monkeypatch):
    """``"auto"`` takes the dense path up to ``DENSE_PATH_FACTOR * (P+K)`` rows and the gather
    path past it, on both sides of the threshold."""
    width = 10
    assert backends.choose_score_path(backends.DENSE_PATH_FACTOR * width, width) == "dense"
    assert backends.choose_score_path(backends.DENSE_PATH_FACTOR * width + 1, width) == \
        "gather"
    taken = []
    original = general.ccd_pair
    monkeypatch.setattr(general, "ccd_pair", lambda path, *a: taken.append(path) or
                        original(path, *a))
    for rows in (backends.DENSE_PATH_FACTOR * width, backends.DENSE_PATH_FACTOR * width + 1):
        m = F.normalize(torch.randn(rows, 4), dim=1)
        g = F.normalize(torch.randn(2, 4), dim=1)
        ccd_pair("auto", g, g, m, m, torch.randint(0, rows, (2, width)), 3)
    assert taken == ["dense", "gather"]


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_picks_only_backends_that_have_run_on_that_device(device_type, monkeypatch):
    """What ``"auto"`` can run on a device type (compiled, dense, gather) has a run recorded
    there; taking a run away from the table takes the backend away from ``"auto"``."""
    monkeypatch.setattr(backends.triton, "available", lambda: True)
    device = torch.device(device_type)
    if backends.compiles("auto", device, step=True):
        assert backends.has_run_on("compiled", device_type)
    for name in ("dense", "gather"):
        assert backends.has_run_on(name, device_type)
    assert not backends.has_run_on("triton", "cuda")
    assert not backends.has_run_on("cuda_graphs", "cuda")


def test_status_table_is_the_gpu_pages():
    """The GPU how-to shows the status table that "auto" reads, word for word."""
    page = (ROOT / "docs" / "howto" / "gpu.rst").read_text()
    assert backends.status_table() in page
    assert "never run on a GPU" in backends.status_table()


def test_every_backend_is_valid_with_every_option():
    for backend in backends.BACKENDS:
        for sampler in ("independent", "shuffle"):
            for normalizer in ("first_batch", "ema"):
                CRCKDLoss(torch.arange(20) % 2, 4, 4, embed_dim=4, num_positives=2,
                          num_negatives=5, backend=backend, sampler=sampler,
                          normalizer=normalizer)
    with pytest.raises(ValueError, match="backend must be one of"):
        ClassGuidedContrastiveLoss(backend="fused")
