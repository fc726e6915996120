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


def test_ccd_matches_loop_reference():
    g_s, g_t, m_s, m_t, idx = make_case()
    log_z_s, log_z_t = 1.3, -0.4
    l_s, l_t = CF.class_guided_contrastive_loss(
        g_s, g_t, m_s, m_t, idx, num_positives=3, temperature=0.07,
        student_log_normalizer=log_z_s, teacher_log_normalizer=log_z_t,
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


def test_ccd_gradcheck():
    _, _, _, m_t, idx = make_case(batch=3, bank=12, dim=4, positives=2, negatives=4)
    anchor = unit(3, 4).requires_grad_()

    def f(a):
        return CF.nce_loss(CF.contrastive_scores(a, m_t, idx, 0.5), 0.2, 4 / 12, 2)

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


def test_default_temperature_is_the_papers():
    """tau = 0.07 wherever it is a default (method §4, §5)."""
    g_s, g_t, m_s, m_t, idx = make_case()
    torch.testing.assert_close(CF.contrastive_scores(g_s, m_t, idx),
                               CF.contrastive_scores(g_s, m_t, idx, 0.07), rtol=0, atol=0)
    for a, b in zip(CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, 3),
                    CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, 3, 0.07)):
        assert float(a) == float(b)
    c_s, c_t = unit(4, 6), unit(4, 6)
    assert float(CF.categorical_relation_loss(g_s, g_t, c_s, c_t)) == float(
        CF.categorical_relation_loss(g_s, g_t, c_s, c_t, 0.07))
