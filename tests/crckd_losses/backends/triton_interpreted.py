"""The Triton kernels of ``backend="triton"`` in Triton's interpreter: the same losses and
gradients as the general operators, and the benchmark rows that time them on CUDA.

The interpreter runs the same kernel code with numpy on CPU tensors. It must be chosen before
Triton is first imported (``TRITON_INTERPRET=1``), so ``tests/crckd_losses/backends/test_triton.py``
runs this
file in a process of its own; collected in a process without it, every test here is skipped.
``tests/crckd_losses/test_cuda.py`` runs the kernels compiled.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from crckd_losses import ClassGuidedContrastiveLoss, CRCKDLoss, MomentumMemoryBank
from crckd_losses.backends import general
from crckd_losses.backends import triton as triton_backend
from tests.crckd_losses.backends.helpers import ccd_pair

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="run by tests/crckd_losses/backends/test_triton.py"
                                       " with TRITON_INTERPRET=1")



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
    l_s, l_t = ccd_pair(
        path, g_s, g_t, m_s, m_t, idx, num_positives=3, student_log_normalizer=log_z,
        teacher_log_normalizer=log_z, reduction=reduction)
    weight = torch.randn(l_s.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((l_s * weight).sum() + (0.7 * l_t * weight).sum(), [g_s, g_t])
    return l_s, l_t, *grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("log_z", [None, 1.3])
def test_matches_dense_path(reduction, log_z):
    args = inputs()
    want = losses_and_grads("dense", *args, reduction=reduction, log_z=log_z)
    got = losses_and_grads("triton", *args, reduction=reduction, log_z=log_z)
    for a, b in zip(want, got):
        close(b, a)


@pytest.mark.parametrize("chunk, dim", [(512, 5), (32, 5), (64, 5), (64, 300)])
def test_odd_sizes_and_masking(monkeypatch, chunk, dim):
    # d not a power of two, P + K spanning several blocks with a ragged last one, B = 1; the
    # gradient's columns in one chunk, in chunks of one block, in chunks of two blocks; a
    # large d (blocks of 8 columns).
    monkeypatch.setattr(triton_backend, "CHUNK", chunk)
    assert triton_backend.blocks(dim)[0] == (8 if dim == 300 else 32)
    args = inputs(batch=1, dim=dim, size=40, width=97)
    for a, b in zip(losses_and_grads("dense", *args), losses_and_grads("triton", *args)):
        close(b, a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_scores_rounded_as_the_general_path(dtype):
    args = inputs(dtype=dtype)
    want = losses_and_grads("dense", *args)
    got = losses_and_grads("triton", *args)
    for a, b in zip(want[:2], got[:2]):  # losses, from scores rounded alike
        close(b, a)
    for a, b in zip(want[2:], got[2:]):  # gradients: the general path's pass through `dtype`
        close(b, a, 1e-2)


def test_float32_bank_rounded_under_autocast(monkeypatch):
    # CUDA autocast: float32 anchors and banks, bfloat16 scores. On a CPU the library keeps
    # float32 scores under autocast, so the score dtype is set here for both paths alike.
    for module in (general, triton_backend):
        monkeypatch.setattr(module, "score_dtype", lambda anchor, memory: torch.bfloat16)
    args = inputs()
    want = losses_and_grads("dense", *args)
    got = losses_and_grads("triton", *args)
    for a, b in zip(want[:2], got[:2]):
        close(b, a)
    for a, b in zip(want[2:], got[2:]):
        close(b, a, 1e-2)


def test_one_side_frozen_and_second_order():
    g_s, g_t, m_s, m_t, idx = inputs()
    for path in ("dense", "triton"):
        l_s, l_t = ccd_pair(path, g_s, g_t.detach(), m_s, m_t, idx, 3)
        (grad,) = torch.autograd.grad(l_s + l_t, [g_s], create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), [g_s])
        if path == "dense":
            want = (grad, second)
    close(grad, want[0])
    close(second, want[1], 1e-5)


def test_module_keeps_its_normaliser():
    labels = torch.randint(0, 3, (200,))
    labels[:3] = torch.arange(3)
    banks = [MomentumMemoryBank(labels, dim=16) for _ in range(2)]
    losses = {}
    for path in ("dense", "triton"):
        ccd = ClassGuidedContrastiveLoss(num_positives=4, num_negatives=32, backend=path)
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


def test_crckd_step_matches():
    labels = torch.randint(0, 4, (150,))
    labels[:4] = torch.arange(4)
    out = {}
    for path in ("dense", "triton"):
        torch.manual_seed(0)
        crckd = CRCKDLoss(labels, 12, 10, embed_dim=8, num_positives=3, num_negatives=20,
                          backend=path)
        f_s = torch.randn(5, 12, requires_grad=True)
        f_t = torch.randn(5, 10)
        result = crckd(f_s, f_t, torch.arange(5), generator=torch.Generator().manual_seed(3))
        result.loss.backward()
        out[path] = (*result, f_s.grad, crckd.student_bank.memory.clone())
    for a, b in zip(out["dense"], out["triton"]):
        close(b, a)


def test_ccd_section_checks_times_and_reports_the_triton_row(monkeypatch) -> None:
    """The CUDA-only row of ``backend="triton"``, run here in Triton's interpreter: its values
    are checked against the dense path before timing, its step runs, and the section reports
    it (a target of its own, a sentence in the markdown)."""
    from benchmarks.sections import ccd, common

    monkeypatch.setattr(ccd, "triton_row", lambda device: True)
    x = ccd.make_ccd_inputs(4, 8, 3, 20, 60, torch.device("cpu"), 3)
    diffs = ccd.check_ccd(x, torch.float32, torch.device("cpu"))
    assert {"triton/L_S", "triton/L_T", "triton/grad_S", "triton/grad_T"} <= set(diffs)
    step = ccd.ccd_fns(x, torch.float32, torch.device("cpu"), (ccd.TRITON,))[ccd.TRITON]
    step()
    rows = {name: {"median_s": t, "min_s": t, "iqr_s": 0.1, "rounds": 3,
                   "samples_per_s": 4 / t, "peak_bytes": 1e6}
            for name, t in (("auto", 1.0), ("reference", 2.0), (ccd.TRITON, 0.25))}
    result = {"params": dict(common.PAPER), "by_dtype": {"float32": {
        "auto_path": "dense", "rows": rows, "max_rel_diff_vs_dense": diffs}}}
    meta = {"device": "cuda"}
    found = {t["name"]: t for t in ccd.SECTION.targets(result, meta)}
    assert found["ccd_speed_triton"]["value"] == 8.0 and found["ccd_speed_triton"]["met"]
    assert "`triton kernels` is `backend=\"triton\"`" in "\n".join(
        ccd.SECTION.markdown(result, meta, "x"))


def test_train_section_step_with_the_triton_path(monkeypatch) -> None:
    """The training step the CUDA-only row ``CRCKD, Triton kernels`` times, here in Triton's
    interpreter on the quick grid: it trains with ``backend="triton"``, eagerly."""
    from benchmarks.sections import train

    step, (_, _, crckd, _) = train.make_step(train.make_batch(torch.device("cpu"), quick=True),
                                             "CRCKD", backend="triton")
    assert crckd.backend == "triton"
    losses = [step() for _ in range(2)]
    assert all(bool(torch.isfinite(loss)) for loss in losses)
