"""The Triton kernels of ``path="triton"``: the same losses and gradients as the general
operators. On a CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which
executes the same kernel code with numpy; ``tests/test_cuda.py`` runs them compiled."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from crckd_losses import ClassGuidedContrastiveLoss, CRCKDLoss, MomentumMemoryBank
from crckd_losses import functional as CF
from crckd_losses.functional import class_guided_contrastive_loss

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs Triton")


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def inputs(batch=6, dim=24, size=300, width=43, dtype=torch.float32):
    g_s = F.normalize(torch.randn(batch, dim), dim=1).to(dtype).requires_grad_()
    g_t = F.normalize(torch.randn(batch, dim), dim=1).to(dtype).requires_grad_()
    m_s, m_t = (F.normalize(torch.randn(size, dim), dim=1).to(dtype) for _ in range(2))
    return g_s, g_t, m_s, m_t, torch.randint(0, size, (batch, width))


def close(got, want, rel=2e-6):
    """Equal up to ``rel`` of ``want``'s largest magnitude: the kernels sum in another order,
    so entries that cancel to near zero differ by rounding at the scale of the whole tensor."""
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = got.detach(), want.detach()
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * float(want.double().abs().max()), (err, float(want.abs().max()))


def losses_and_grads(path, g_s, g_t, m_s, m_t, idx, reduction="mean", log_z=None, seed=5):
    l_s, l_t = class_guided_contrastive_loss(
        g_s, g_t, m_s, m_t, idx, num_positives=3, student_log_normalizer=log_z,
        teacher_log_normalizer=log_z, reduction=reduction, path=path)
    weight = torch.randn(l_s.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((l_s * weight).sum() + (0.7 * l_t * weight).sum(), [g_s, g_t])
    return l_s, l_t, *grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("log_z", [None, 1.3])
def test_matches_dense_path(interpreter, reduction, log_z):
    args = inputs()
    want = losses_and_grads("dense", *args, reduction=reduction, log_z=log_z)
    got = losses_and_grads("triton", *args, reduction=reduction, log_z=log_z)
    for a, b in zip(want, got):
        close(b, a)


@pytest.mark.parametrize("chunk", [512, 32, 64])
def test_odd_sizes_and_masking(interpreter, monkeypatch, chunk):
    # d not a power of two, P + K spanning several blocks with a ragged last one, B = 1; the
    # gradient's columns in one chunk, in chunks of one block, in chunks of two blocks.
    monkeypatch.setattr(CF, "_TRITON_CHUNK", chunk)
    args = inputs(batch=1, dim=5, size=40, width=97)
    for a, b in zip(losses_and_grads("dense", *args), losses_and_grads("triton", *args)):
        close(b, a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_scores_rounded_as_the_general_path(interpreter, dtype):
    args = inputs(dtype=dtype)
    want = losses_and_grads("dense", *args)
    got = losses_and_grads("triton", *args)
    for a, b in zip(want[:2], got[:2]):  # losses, from scores rounded alike
        close(b, a)
    for a, b in zip(want[2:], got[2:]):  # gradients: the general path's pass through `dtype`
        close(b, a, 1e-2)


def test_float32_bank_rounded_under_autocast(interpreter, monkeypatch):
    # CUDA autocast: float32 anchors and banks, bfloat16 scores. On a CPU the library keeps
    # float32 scores under autocast, so the score dtype is set here for both paths alike.
    monkeypatch.setattr(CF, "_score_dtype", lambda anchor, memory: torch.bfloat16)
    args = inputs()
    want = losses_and_grads("dense", *args)
    got = losses_and_grads("triton", *args)
    for a, b in zip(want[:2], got[:2]):
        close(b, a)
    for a, b in zip(want[2:], got[2:]):
        close(b, a, 1e-2)


def test_one_side_frozen_and_second_order(interpreter):
    g_s, g_t, m_s, m_t, idx = inputs()
    for path in ("dense", "triton"):
        l_s, l_t = class_guided_contrastive_loss(g_s, g_t.detach(), m_s, m_t, idx, 3, path=path)
        (grad,) = torch.autograd.grad(l_s + l_t, [g_s], create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), [g_s])
        if path == "dense":
            want = (grad, second)
    close(grad, want[0])
    close(second, want[1], 1e-5)


def test_module_keeps_its_normaliser(interpreter):
    labels = torch.randint(0, 3, (200,))
    labels[:3] = torch.arange(3)
    banks = [MomentumMemoryBank(labels, dim=16) for _ in range(2)]
    losses = {}
    for path in ("dense", "triton"):
        ccd = ClassGuidedContrastiveLoss(num_positives=4, num_negatives=32, path=path)
        torch.manual_seed(1)
        steps = []
        for _ in range(3):  # the first call estimates Z; the next ones use it
            g_s, g_t = (F.normalize(torch.randn(8, 16), dim=1) for _ in range(2))
            g_s.requires_grad_()
            idx = torch.randperm(200)[:8]
            sample = banks[0].sample(idx, 4, 32)
            loss = ccd(g_s, g_t, idx, banks[0], banks[1], sample_indices=sample)
            steps.append((loss, *torch.autograd.grad(loss, [g_s])))
        losses[path] = (steps, ccd.log_normalizer.clone())
    for a, b in zip(losses["dense"][0], losses["triton"][0]):
        for x, y in zip(a, b):
            close(y, x)
    torch.testing.assert_close(losses["triton"][1], losses["dense"][1], rtol=1e-6, atol=0)


def test_crckd_step_matches(interpreter):
    labels = torch.randint(0, 4, (150,))
    labels[:4] = torch.arange(4)
    out = {}
    for path in ("dense", "triton"):
        torch.manual_seed(0)
        crckd = CRCKDLoss(labels, 12, 10, embed_dim=8, num_positives=3, num_negatives=20,
                          path=path)
        f_s = torch.randn(5, 12, requires_grad=True)
        f_t = torch.randn(5, 10)
        result = crckd(f_s, f_t, torch.arange(5), generator=torch.Generator().manual_seed(3))
        result.loss.backward()
        out[path] = (*result, f_s.grad, crckd.student_bank.memory.clone())
    for a, b in zip(out["dense"], out["triton"]):
        close(b, a)


def test_clear_errors_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = inputs()
    with pytest.raises(ValueError, match="CUDA tensors"):
        class_guided_contrastive_loss(*args, num_positives=3, path="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float64"):
        class_guided_contrastive_loss(*inputs(dtype=torch.float64), num_positives=3,
                                      path="triton")


def test_inside_torch_compile_the_general_path_runs(monkeypatch):
    # Inside a compiled function the Triton kernels are not called (inductor generates its
    # own), so path="triton" there takes "auto"'s path: no error on a CPU, the same values.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = inputs()

    def both(path):
        return torch.stack(class_guided_contrastive_loss(*args, num_positives=3, path=path))

    compiled = torch.compile(both, backend="eager", fullgraph=True)
    close(compiled("triton"), both("auto"))
