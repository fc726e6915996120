"""crckd_losses.functional against loop references written from the method, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from crckd_losses import functional as CF
from tests import reference

D64 = torch.float64


def unit(*shape, dtype=D64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def make_case(batch=5, bank=40, dim=6, positives=3, negatives=7):
    g_s, g_t = unit(batch, dim), unit(batch, dim)
    m_s, m_t = unit(bank, dim), unit(bank, dim)
    idx = torch.randint(0, bank, (batch, positives + negatives))
    return g_s, g_t, m_s, m_t, idx


class _OpNames(TorchDispatchMode):
    """Records the name of every aten/oneDNN operator run inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_ccd_matches_loop_reference(path):
    g_s, g_t, m_s, m_t, idx = make_case()
    log_z_s, log_z_t = 1.3, -0.4
    l_s, l_t = CF.class_guided_contrastive_loss(
        g_s, g_t, m_s, m_t, idx, num_positives=3, temperature=0.07,
        student_log_normalizer=log_z_s, teacher_log_normalizer=log_z_t, path=path,
    )
    ref_s = reference.nce_direction(g_s, m_t, idx, 3, 0.07, log_z_s, 40)
    ref_t = reference.nce_direction(g_t, m_s, idx, 3, 0.07, log_z_t, 40)
    assert l_s.dtype == D64
    assert float(l_s) == pytest.approx(ref_s, rel=1e-10, abs=1e-10)
    assert float(l_t) == pytest.approx(ref_t, rel=1e-10, abs=1e-10)


def test_first_batch_normalizer_matches_reference():
    g_s, _, _, m_t, idx = make_case()
    u = CF.contrastive_scores(g_s, m_t, idx, 0.07)
    got = float(CF.estimate_log_normalizer(u, 40))
    assert got == pytest.approx(reference.first_batch_log_z(g_s, m_t, idx, 0.07, 40), rel=1e-10)


def test_ccd_without_normalizer_uses_batch_estimate():
    g_s, g_t, m_s, m_t, idx = make_case()
    l_s, _ = CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, num_positives=3)
    log_z = reference.first_batch_log_z(g_s, m_t, idx, 0.07, 40)
    assert float(l_s) == pytest.approx(reference.nce_direction(g_s, m_t, idx, 3, 0.07, log_z, 40),
                                       rel=1e-10)


def test_dense_and_gather_paths_agree_with_grads():
    g_s, _, _, m_t, idx = make_case(batch=8, bank=100, dim=16, positives=4, negatives=30)
    grads = []
    for path in ("dense", "gather"):
        a = g_s.clone().requires_grad_()
        loss = CF.nce_loss(CF.contrastive_scores(a, m_t, idx, 0.1, path), 0.5, 0.3, 4)
        loss.backward()
        grads.append((float(loss.detach()), a.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)


def test_choose_score_path_threshold():
    width = 100
    assert CF.choose_score_path(CF.DENSE_PATH_FACTOR * width, width) == "dense"
    assert CF.choose_score_path(CF.DENSE_PATH_FACTOR * width + 1, width) == "gather"


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_ccd_gradcheck(path):
    _, _, _, m_t, idx = make_case(batch=3, bank=12, dim=4, positives=2, negatives=4)
    anchor = unit(3, 4).requires_grad_()

    def f(a):
        return CF.nce_loss(CF.contrastive_scores(a, m_t, idx, 0.5, path), 0.2, 4 / 12, 2)

    assert torch.autograd.gradcheck(f, (anchor,))


def test_crp_matches_reference_and_gradcheck():
    g_s, g_t = unit(6, 5), unit(6, 5)
    c_s, c_t = unit(4, 5), unit(4, 5)
    got = CF.categorical_relation_loss(g_s, g_t, c_s, c_t, temperature=0.07)
    assert float(got) == pytest.approx(reference.crp(g_s, g_t, c_s, c_t, 0.07), rel=1e-10)
    a = g_s.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: CF.categorical_relation_loss(x, g_t, c_s, c_t, 0.3), (a,)
    )


def test_crp_gradient_reaches_only_student():
    g_s, g_t = unit(4, 5).requires_grad_(), unit(4, 5).requires_grad_()
    c = unit(3, 5).requires_grad_()
    CF.categorical_relation_loss(g_s, g_t, c, c).backward()
    assert g_s.grad is not None and g_s.grad.abs().sum() > 0
    assert g_t.grad is None and c.grad is None


def test_consistency_kl_reference_gradcheck_and_detach():
    s, t = torch.randn(5, 4, dtype=D64), torch.randn(5, 4, dtype=D64)
    assert float(CF.consistency_kl(s, t)) == pytest.approx(reference.kl_rows(t, s), rel=1e-10)
    s = s.requires_grad_()
    t = t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: CF.consistency_kl(x, t.detach()), (s,))
    CF.consistency_kl(s, t).backward()
    assert t.grad is None


def test_centroids_match_reference():
    memory = torch.randn(30, 6, dtype=D64)
    labels = torch.randint(0, 4, (30,))
    labels[:4] = torch.arange(4)
    for relu in (True, False):
        got = CF.class_centroids(memory, labels, 4, relu=relu)
        torch.testing.assert_close(got, reference.centroids(memory, labels, 4, relu), rtol=1e-10,
                                   atol=1e-12)


def test_centroids_read_no_values_with_checks_off():
    # With the accelerators' policy nothing is read on the host: an empty class (3 here)
    # still gets its zero row, and the counts have a static shape (no bincount, whose size
    # comes from the labels' largest value).
    from crckd_losses import set_value_checks

    memory = torch.randn(12, 5, dtype=D64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 4, 4])
    set_value_checks("mask")
    try:
        with _OpNames() as ops:
            got = CF.class_centroids(memory, labels, 5)
    finally:
        set_value_checks("auto")
    assert not set(ops.names) & {"aten.bincount", "aten._local_scalar_dense", "aten.item"}, \
        ops.names
    torch.testing.assert_close(got, reference.centroids(memory, labels, 5), rtol=1e-10,
                               atol=1e-12)
    assert not got[3].any()


def test_sigmoid_rampup_values():
    assert CF.sigmoid_rampup(0, 30) == pytest.approx(math.exp(-5))
    assert CF.sigmoid_rampup(15, 30) == pytest.approx(math.exp(-5 * 0.25))
    assert CF.sigmoid_rampup(45, 30) == 1.0
    assert CF.sigmoid_rampup(3, 0) == 1.0
    with pytest.raises(ValueError, match="epoch"):
        CF.sigmoid_rampup(-1)


def test_reductions():
    g_s, g_t, m_s, m_t, idx = make_case()
    per = CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, 3, reduction="none",
                                           student_log_normalizer=0.0, teacher_log_normalizer=0.0)
    mean = CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, 3,
                                            student_log_normalizer=0.0, teacher_log_normalizer=0.0)
    assert per[0].shape == (5,)
    torch.testing.assert_close(per[0].mean(), mean[0])
    crp_none = CF.categorical_relation_loss(g_s, g_t, m_s[:3], m_t[:3], reduction="none")
    torch.testing.assert_close(crp_none.sum(),
                               CF.categorical_relation_loss(g_s, g_t, m_s[:3], m_t[:3],
                                                            reduction="sum"))


# --- properties -----------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 6))
def test_ccd_is_invariant_to_batch_permutation(seed, batch):
    torch.manual_seed(seed)
    g_s, g_t, m_s, m_t, idx = make_case(batch=batch)
    perm = torch.randperm(batch)
    kw = dict(num_positives=3, student_log_normalizer=0.1, teacher_log_normalizer=0.2)
    a = CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, **kw)
    b = CF.class_guided_contrastive_loss(g_s[perm], g_t[perm], m_s, m_t, idx[perm], **kw)
    assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-12)
    assert float(a[1]) == pytest.approx(float(b[1]), rel=1e-12)


@given(seed=st.integers(0, 2**16), classes=st.integers(2, 6))
def test_crp_is_invariant_to_relabelling_classes(seed, classes):
    torch.manual_seed(seed)
    g_s, g_t = unit(4, 5), unit(4, 5)
    memory_s, memory_t = torch.randn(20, 5, dtype=D64), torch.randn(20, 5, dtype=D64)
    labels = torch.arange(20) % classes
    relabel = torch.randperm(classes)
    a = CF.categorical_relation_loss(g_s, g_t, CF.class_centroids(memory_s, labels, classes),
                                     CF.class_centroids(memory_t, labels, classes))
    b = CF.categorical_relation_loss(g_s, g_t,
                                     CF.class_centroids(memory_s, relabel[labels], classes),
                                     CF.class_centroids(memory_t, relabel[labels], classes))
    assert float(a) == pytest.approx(float(b), rel=1e-10, abs=1e-14)


@given(scale=st.floats(0.01, 100.0))
def test_centroids_ignore_scale_of_bank(scale):
    torch.manual_seed(1)
    memory = torch.randn(12, 4, dtype=D64)
    labels = torch.arange(12) % 3
    torch.testing.assert_close(CF.class_centroids(memory * scale, labels, 3),
                               CF.class_centroids(memory, labels, 3), rtol=1e-10, atol=1e-12)


def test_batch_of_one():
    g_s, g_t, m_s, m_t, idx = make_case(batch=1)
    l_s, l_t = CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, 3)
    assert torch.isfinite(l_s) and torch.isfinite(l_t)
    assert torch.isfinite(CF.categorical_relation_loss(g_s, g_t, m_s[:2], m_t[:2]))


# --- stability and bad input ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_finite_and_close(dtype):
    g_s, g_t, m_s, m_t, idx = make_case(batch=16, bank=500, dim=32, positives=5, negatives=200)
    g_s, g_t, m_s, m_t = (t.float() for t in (g_s, g_t, m_s, m_t))
    kw = dict(num_positives=5, temperature=0.07)
    ref = CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, **kw)
    ref_crp = CF.categorical_relation_loss(g_s, g_t, m_s[:7], m_t[:7])
    with torch.autocast("cpu", dtype=dtype):
        got = CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, **kw)
        got_crp = CF.categorical_relation_loss(g_s, g_t, m_s[:7], m_t[:7])
    for r, g in zip((*ref, ref_crp), (*got, got_crp)):
        assert g.dtype == torch.float32
        assert torch.isfinite(g)
        assert float(g) == pytest.approx(float(r), rel=1e-2)


def test_extreme_scores_stay_finite():
    anchor = torch.tensor([[1.0, 0.0]])
    memory = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    idx = torch.tensor([[0, 1, 2]])
    u = CF.contrastive_scores(anchor, memory, idx, temperature=0.001)  # |u| = 1000
    loss = CF.nce_loss(u, log_normalizer=0.0, noise_constant=0.5, num_positives=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a, m, i: (a[:, :3], m, i), ValueError, "embedding size"),
        (lambda a, m, i: (a, m, i.float()), TypeError, "sample_indices must be an integer"),
        (lambda a, m, i: (a, m, i + 1000), ValueError, r"sample_indices must lie in \[0, 40\)"),
        (lambda a, m, i: (a.long(), m, i), TypeError, "anchor must be a floating-point"),
        (lambda a, m, i: (a[:0], m, i[:0]), ValueError, "empty batch"),
        (lambda a, m, i: (a, m, i[:2]), ValueError, "one row per anchor"),
        (lambda a, m, i: (a[0], m, i), ValueError, "anchor must have 2 dimensions"),
    ],
)
def test_scores_bad_input(mutate, error, match):
    g_s, _, _, m_t, idx = make_case()
    a, m, i = mutate(g_s, m_t, idx)
    with pytest.raises(error, match=match):
        CF.contrastive_scores(a, m, i)


def test_nonfinite_embeddings_rejected():
    g_s, g_t, m_s, m_t, idx = make_case()
    g_s[0, 0] = float("nan")
    with pytest.raises(ValueError, match="student_emb contains NaN or Inf"):
        CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, 3)
    g_t[1, 1] = float("inf")
    with pytest.raises(ValueError, match="teacher_emb contains NaN or Inf"):
        CF.categorical_relation_loss(unit(5, 6), g_t, m_s[:2], m_t[:2])


def test_labels_out_of_range_rejected():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        CF.class_centroids(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), 3)


def test_too_few_columns_rejected():
    with pytest.raises(ValueError, match="at least one negative"):
        CF.nce_loss(torch.randn(2, 3), 0.0, 0.1, num_positives=3)


def _ulps(got, want):
    """|got - want| in float32 epsilons of |want| (want in float64)."""
    scale = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return ((got.double() - want).abs() / scale).max().item()


def test_cpu_logsigmoid_is_as_accurate_as_torchs():
    """The CPU's vectorised log-sigmoid (torch's CPU log1p is a scalar loop) agrees with
    float64 to torch's own float32 accuracy, in value and gradient, over the whole range."""
    x = torch.cat([torch.linspace(-120, 120, 400_001), torch.logspace(-30, 2, 20_001),
                   -torch.logspace(-30, 2, 20_001), torch.tensor([0.0, -0.0])])
    want = F.logsigmoid(x.double().requires_grad_())
    got = CF._CPULogSigmoid.apply(x.clone().requires_grad_())
    torchs = F.logsigmoid(x)
    assert _ulps(got, want) <= 2.0 and _ulps(torchs, want) <= 2.0
    xg, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    CF._CPULogSigmoid.apply(xg).sum().backward()
    F.logsigmoid(x64).sum().backward()
    normal = x < 80  # beyond, the gradient is below 2e-35 and may be flushed to zero
    assert _ulps(xg.grad[normal], x64.grad[normal]) <= 2.0
    assert (xg.grad[~normal].double() - x64.grad[~normal]).abs().max() < 1e-34


def test_cpu_logsigmoid_edges_and_double_backward():
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0])
    out = CF._CPULogSigmoid.apply(x)
    assert out[0] == 0 and out[1] == -math.inf and math.isnan(out[2])
    assert out[3] == pytest.approx(-math.log(2.0))
    x64 = torch.randn(20, dtype=D64).mul_(10).requires_grad_()
    assert torch.autograd.gradcheck(CF._CPULogSigmoid.apply, (x64,))
    assert torch.autograd.gradgradcheck(CF._CPULogSigmoid.apply, (x64,))


def test_ccd_on_cpu_takes_the_vectorised_logsigmoid_and_matches_torchs(monkeypatch):
    """float32 CCD on a CPU runs the written-out dense pair with the vectorised log-sigmoid;
    its losses and gradients match the F.logsigmoid path to float32 rounding."""
    g_s, g_t, m_s, m_t, idx = (t.float() if t.is_floating_point() else t for t in make_case())

    def run():
        a, b = g_s.clone().requires_grad_(), g_t.clone().requires_grad_()
        ls, lt = CF.class_guided_contrastive_loss(a, b, m_s, m_t, idx, 3, 0.07, 1.0, 1.0)
        (ls + lt).backward()
        return ls, lt, a.grad, b.grad

    calls = []
    original = CF._CPUDenseNCE.apply
    monkeypatch.setattr(CF._CPUDenseNCE, "apply", lambda *a: calls.append(1) or original(*a))
    fast = run()
    assert calls
    monkeypatch.setattr(CF, "_CPU_VECTORISED_LOGSIGMOID", False)
    slow = run()
    assert len(calls) == 1
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _ccd_outputs(g_s, g_t, m_s, m_t, idx, reduction, log_z, create_graph=False,
                 dtype=torch.float32):
    """Losses, gradients and (with create_graph) second-order gradients of both directions."""
    a = g_s.clone().to(dtype).requires_grad_()
    b = g_t.clone().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ls, lt = CF.class_guided_contrastive_loss(a, b, m_s, m_t, idx, 3, 0.07, log_z, log_z,
                                                  reduction=reduction, path="dense")
    total = (1.7 * ls + 0.3 * lt).sum()
    grads = torch.autograd.grad(total, [a, b], create_graph=create_graph)
    if create_graph:
        grads = (*grads, *torch.autograd.grad((grads[0] ** 2).sum() + grads[1].sum(), [a, b]))
    return (ls.detach(), lt.detach(), *(g.detach() for g in grads))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("log_z", [None, 0.7])
@pytest.mark.parametrize("create_graph", [False, True])
def test_cpu_dense_pair_is_bitwise_the_general_path(monkeypatch, reduction, log_z,
                                                     create_graph):
    """With ``torch.mm`` products, the written-out CPU dense pair runs the general path's
    operators in its order, so its losses, gradients and second-order gradients are the
    general path's bit for bit."""
    monkeypatch.setattr(CF, "_CPU_ONEDNN_GEMM", False)
    case = [t.float() if t.is_floating_point() else t for t in make_case(8, 60, 16, 3, 30)]
    calls = []
    original = CF._CPUDenseNCE.apply
    monkeypatch.setattr(CF._CPUDenseNCE, "apply", lambda *a: calls.append(1) or original(*a))
    fast = _ccd_outputs(*case, reduction, log_z, create_graph)
    assert len(calls) == 1
    monkeypatch.setattr(CF, "_cpu_dense_pair", lambda *a: False)
    general = _ccd_outputs(*case, reduction, log_z, create_graph)
    assert len(calls) == 1
    for got, want in zip(fast, general, strict=True):
        assert torch.equal(got, want)


needs_onednn = pytest.mark.skipif(not CF._onednn_works(),
                                  reason="this torch build cannot run oneDNN matrix products")


@needs_onednn
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_cpu_dense_pair_with_onednn_products_matches_the_general_path(monkeypatch, reduction,
                                                                       create_graph):
    """Above the size threshold the pair's four products run through oneDNN (and no
    ``torch.mm`` is left in it); losses, gradients and second-order gradients then agree with
    the general path's to float32 rounding."""
    monkeypatch.setattr(CF, "_ONEDNN_MIN_MACS", 1)
    case = [t.float() if t.is_floating_point() else t for t in make_case(8, 60, 16, 3, 30)]
    ops = _OpNames()
    with ops:
        fast = _ccd_outputs(*case, reduction, 0.7)
    assert ops.names.count("mkldnn._linear_pointwise") == 4 and "aten.mm" not in ops.names
    if create_graph:
        fast = _ccd_outputs(*case, reduction, 0.7, create_graph=True)
    monkeypatch.setattr(CF, "_cpu_dense_pair", lambda *a: False)
    general = _ccd_outputs(*case, reduction, 0.7, create_graph)
    for got, want in zip(fast, general, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


def test_cpu_gemm_takes_onednn_only_above_its_threshold(monkeypatch):
    """``_cpu_gemm`` is ``a @ b`` for a plain, a transposed and a strided right-hand side;
    it takes ``torch.mm`` below the size threshold, when told not to use oneDNN, and where
    oneDNN does not work (the probe's answer)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 10, generator=g)
    rights = (torch.randn(10, 7, generator=g), torch.randn(7, 10, generator=g).t(),
              torch.randn(10, 14, generator=g)[:, ::2])

    def taken(min_macs, onednn=True):
        monkeypatch.setattr(CF, "_ONEDNN_MIN_MACS", min_macs)
        names = []
        for b in rights:
            ops = _OpNames()
            with ops:
                got = CF._cpu_gemm(a, b, onednn)
            torch.testing.assert_close(got, a @ b, rtol=1e-6, atol=1e-6)
            names.append("mkldnn._linear_pointwise" in ops.names)
        return names

    assert taken(6 * 10 * 7 + 1) == [False] * 3
    if CF._onednn_works():
        assert taken(6 * 10 * 7) == [True] * 3
    assert taken(1, onednn=False) == [False] * 3
    monkeypatch.setattr(CF, "_ONEDNN_WORKS", [False])
    assert taken(1) == [False] * 3


@needs_onednn
def test_cpu_dense_pair_backward_takes_the_forwards_products(monkeypatch):
    """The switch is read once, in forward: flipping it before backward changes nothing."""
    monkeypatch.setattr(CF, "_ONEDNN_MIN_MACS", 1)
    g_s, g_t, m_s, m_t, idx = (t.float() if t.is_floating_point() else t
                               for t in make_case(8, 60, 16, 3, 30))
    for first in (False, True):
        monkeypatch.setattr(CF, "_CPU_ONEDNN_GEMM", first)
        a = g_s.clone().requires_grad_()
        ls, lt = CF.class_guided_contrastive_loss(a, g_t, m_s, m_t, idx, 3, path="dense")
        monkeypatch.setattr(CF, "_CPU_ONEDNN_GEMM", not first)
        ops = _OpNames()
        with ops:
            (ls + lt).backward()
        assert ops.names.count("mkldnn._linear_pointwise") == (1 if first else 0)
        assert ops.names.count("aten.mm") == (0 if first else 1)


def test_onednn_probe_says_no_when_the_operator_fails(monkeypatch):
    """A torch build whose oneDNN operator is missing or raises is detected once, and the
    products fall back to ``torch.mm``."""

    class Broken:
        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(CF, "_ONEDNN_WORKS", [])
    monkeypatch.setattr(torch.ops, "mkldnn", Broken())
    assert CF._onednn_works() is False
    a = torch.randn(64, 64)
    monkeypatch.setattr(CF, "_ONEDNN_MIN_MACS", 1)
    torch.testing.assert_close(CF._cpu_gemm(a, a), a @ a)


def test_cpu_dense_pair_under_autocast_and_with_one_anchor_frozen(monkeypatch):
    """bfloat16 anchors under CPU autocast are scored in float32 (the pair takes them), and an
    anchor that needs no gradient gets none; both as on the general path."""
    case = [t.float() if t.is_floating_point() else t for t in make_case(8, 60, 16, 3, 30)]
    fast = _ccd_outputs(*case, "mean", 0.7, dtype=torch.bfloat16)
    monkeypatch.setattr(CF, "_cpu_dense_pair", lambda *a: False)
    general = _ccd_outputs(*case, "mean", 0.7, dtype=torch.bfloat16)
    assert fast[0].dtype == torch.float32
    for got, want in zip(fast, general, strict=True):
        assert torch.equal(got, want)
    monkeypatch.undo()
    g_s, g_t, m_s, m_t, idx = case
    a = g_s.clone().requires_grad_()
    ls, lt = CF.class_guided_contrastive_loss(a, g_t, m_s, m_t, idx, 3, path="dense")
    (ls + lt).backward()
    assert a.grad is not None and g_t.grad is None


def test_cpu_dense_pair_backward_can_run_twice():
    """The pair's saved tensors are only read in backward (its workspace is rewritten), so a
    graph kept with retain_graph gives the same gradients twice."""
    g_s, g_t, m_s, m_t, idx = (t.float() if t.is_floating_point() else t
                               for t in make_case(8, 60, 16, 3, 30))
    a = g_s.clone().requires_grad_()
    ls, lt = CF.class_guided_contrastive_loss(a, g_t, m_s, m_t, idx, 3, path="dense")
    first = torch.autograd.grad(ls + lt, a, retain_graph=True)[0]
    second = torch.autograd.grad(ls + lt, a)[0]
    assert torch.equal(first, second) and first.abs().sum() > 0
