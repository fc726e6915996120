"""ClassGuidedContrastiveLoss and CategoricalRelationLoss modules."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from crckd_losses import (
    CategoricalRelationLoss,
    ClassGuidedContrastiveLoss,
    MomentumMemoryBank,
    set_value_checks,
    value_checks,
)
from crckd_losses import functional as CF
from tests import reference

D64 = torch.float64


def setup(n=120, dim=8, batch=6, classes=4, dtype=D64):
    labels = torch.arange(n) % classes
    banks = [MomentumMemoryBank(labels, dim=dim, dtype=dtype) for _ in range(2)]
    for bank in banks:
        bank.update(torch.arange(n), F.normalize(torch.randn(n, dim, dtype=dtype), dim=1))
    g_s = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=1)
    g_t = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=1)
    return labels, banks, g_s, g_t, torch.randperm(n)[:batch]


def test_forward_matches_reference_and_sets_z_once():
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    ccd = ClassGuidedContrastiveLoss(num_positives=3, num_negatives=10, temperature=0.07)
    sample = bank_s.sample(idx, 3, 10)
    terms = ccd.terms(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    log_z_s = reference.first_batch_log_z(g_s, bank_t.memory, sample, 0.07, 120)
    log_z_t = reference.first_batch_log_z(g_t, bank_s.memory, sample, 0.07, 120)
    assert float(ccd.log_normalizer[0]) == pytest.approx(log_z_s, rel=1e-10)
    assert float(ccd.log_normalizer[1]) == pytest.approx(log_z_t, rel=1e-10)
    assert float(terms.student) == pytest.approx(
        reference.nce_direction(g_s, bank_t.memory, sample, 3, 0.07, log_z_s, 120), rel=1e-10)
    assert float(terms.teacher) == pytest.approx(
        reference.nce_direction(g_t, bank_s.memory, sample, 3, 0.07, log_z_t, 120), rel=1e-10)
    total = ccd(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    assert float(total) == pytest.approx(float(terms.student + terms.teacher), rel=1e-12)
    # frozen: a second, different batch does not move Z
    frozen = ccd.log_normalizer.clone()
    ccd(F.normalize(g_s * 0.5 + 0.1, dim=1), g_t, idx, bank_s, bank_t)
    assert torch.equal(ccd.log_normalizer, frozen)


def test_ema_normalizer_moves_in_linear_space():
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    ccd = ClassGuidedContrastiveLoss(3, 10, normalizer="ema", normalizer_momentum=0.75)
    sample = bank_s.sample(idx, 3, 10)
    ccd(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    first = ccd.log_normalizer.clone()
    g2 = F.normalize(g_s + 0.3, dim=1)
    ccd(g2, g_t, idx, bank_s, bank_t, sample_indices=sample)
    est = reference.first_batch_log_z(g2, bank_t.memory, sample, 0.07, 120)
    expected = math.log(0.75 * math.exp(float(first[0])) + 0.25 * math.exp(est))
    assert float(ccd.log_normalizer[0]) == pytest.approx(expected, rel=1e-10)


def test_eval_mode_does_not_write_z():
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    ccd = ClassGuidedContrastiveLoss(3, 10).eval()
    ccd(g_s, g_t, idx, bank_s, bank_t)
    assert not bool(ccd.normalizer_initialized)
    assert float(ccd.log_normalizer.abs().sum()) == 0.0


def test_bank_update_between_forward_and_backward_keeps_gradients():
    labels, (bank_s, bank_t), g_s, g_t, idx = setup()
    sample = bank_s.sample(idx, 3, 10)

    def run(update_first):
        ccd = ClassGuidedContrastiveLoss(3, 10)
        s = g_s.clone().requires_grad_()
        t = g_t.clone().requires_grad_()
        banks = [MomentumMemoryBank(labels, dim=8, dtype=D64) for _ in range(2)]
        for b, src in zip(banks, (bank_s, bank_t)):
            b.load_state_dict(src.state_dict())
        loss = ccd(s, t, idx, banks[0], banks[1], sample_indices=sample)
        if update_first:
            banks[0].update(idx, torch.randn(6, 8, dtype=D64))
            banks[1].update(idx, torch.randn(6, 8, dtype=D64))
        loss.backward()
        return s.grad, t.grad

    for path_grads in zip(run(False), run(True)):
        torch.testing.assert_close(path_grads[0], path_grads[1], rtol=0, atol=0)


def test_gradients_flow_to_both_anchors():
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    s, t = g_s.clone().requires_grad_(), g_t.clone().requires_grad_()
    terms = ClassGuidedContrastiveLoss(3, 10).terms(s, t, idx, bank_s, bank_t)
    terms.student.backward(retain_graph=True)
    # Both directions run through one stacked graph: L_S gives the teacher anchor an exact
    # zero gradient (not None), and the student anchor a real one.
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or not bool(t.grad.any())
    s_grad = s.grad.clone()
    terms.teacher.backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
    assert torch.equal(s.grad, s_grad)  # L_T leaves the student anchor alone


def test_bad_input_leaves_z_unchanged():
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    ccd = ClassGuidedContrastiveLoss(3, 10)
    bad_calls = [
        (ValueError, "NaN", lambda: ccd(g_s.clone().fill_(float("nan")), g_t, idx, bank_s, bank_t)),
        (ValueError, r"sample_indices must have shape \(6, 13\)",
         lambda: ccd(g_s, g_t, idx, bank_s, bank_t, sample_indices=torch.zeros(6, 5).long())),
        (ValueError, r"sample_indices must lie in \[0, 120\)",
         lambda: ccd(g_s, g_t, idx, bank_s, bank_t, sample_indices=torch.full((6, 13), 999))),
        (ValueError, "indices must have one entry per embedding",
         lambda: ccd(g_s, g_t, idx[:2], bank_s, bank_t)),
        (ValueError, r"indices must lie in \[0, 120\)",
         lambda: ccd(g_s, g_t, idx + 1000, bank_s, bank_t)),
        (TypeError, "teacher_bank must be a MomentumMemoryBank",
         lambda: ccd(g_s, g_t, idx, bank_s, bank_t.memory)),
        (ValueError, "embedding size", lambda: ccd(g_s[:, :4], g_t[:, :4], idx, bank_s, bank_t)),
    ]
    for error, match, call in bad_calls:
        with pytest.raises(error, match=match):
            call()
        assert not bool(ccd.normalizer_initialized)
        assert float(ccd.log_normalizer.abs().sum()) == 0.0


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_positives"):
        ClassGuidedContrastiveLoss(num_positives=0)
    with pytest.raises(ValueError, match="temperature"):
        ClassGuidedContrastiveLoss(temperature=0.0)
    with pytest.raises(ValueError, match="normalizer must be"):
        ClassGuidedContrastiveLoss(normalizer="last")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_negatives must be an int"):
        ClassGuidedContrastiveLoss(num_negatives=4.5)  # type: ignore[arg-type]


def test_banks_of_other_labels_are_refused_and_unnormalised_rows_warned_once():
    """Two banks of one shape but other labels would pair rows of different samples: an error
    on a CPU (where value checks read). Embeddings that are not unit rows give a loss of
    another scale silently: a warning, once per module; zero rows (F.normalize of a zero
    feature) and float32-normalised bfloat16 rows are unit enough."""
    labels, (bank_s, bank_t), g_s, g_t, idx = setup()
    other = MomentumMemoryBank(labels.roll(1), dim=8, dtype=D64)
    ccd = ClassGuidedContrastiveLoss(3, 10)
    with pytest.raises(ValueError, match="same labels.*differ in 120 of 120 rows"):
        ccd(g_s, g_t, idx, bank_s, other)
    with pytest.raises(ValueError, match="one device"):
        ccd(g_s, g_t, idx, bank_s, MomentumMemoryBank(labels, dim=8, dtype=D64).to("meta"))
    zero = g_s.clone()
    zero[0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ccd(zero, g_t, idx, bank_s, bank_t)
        ccd(g_s.bfloat16().double(), g_t, idx, bank_s, bank_t)
    with pytest.warns(UserWarning, match=r"teacher_emb has rows that are not L2-normalised"):
        ccd(g_s, g_t * 3, idx, bank_s, bank_t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ccd(g_s * 3, g_t, idx, bank_s, bank_t)  # warned once already
    set_value_checks("mask")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ClassGuidedContrastiveLoss(3, 10)(g_s * 3, g_t, idx, bank_s, other)  # nothing read
    finally:
        set_value_checks("auto")


def test_state_dict_round_trip_of_z():
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    ccd = ClassGuidedContrastiveLoss(3, 10)
    ccd(g_s, g_t, idx, bank_s, bank_t)
    fresh = ClassGuidedContrastiveLoss(3, 10)
    fresh.load_state_dict(ccd.state_dict())
    assert torch.equal(fresh.log_normalizer, ccd.log_normalizer)
    assert bool(fresh.normalizer_initialized)


def test_compile_fullgraph_traces_losses():
    torch._dynamo.reset()
    _, (bank_s, bank_t), g_s, g_t, idx = setup(dtype=torch.float32)
    g_s, g_t = g_s.float(), g_t.float()
    ccd = ClassGuidedContrastiveLoss(3, 10)
    crp = CategoricalRelationLoss()
    sample = bank_s.sample(idx, 3, 10)
    eager = ccd(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    compiled_ccd = torch.compile(ccd, backend="eager", fullgraph=True)
    got = compiled_ccd(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    torch.testing.assert_close(got, eager)
    cs, ct = bank_s.centroids(), bank_t.centroids()
    compiled_crp = torch.compile(crp, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_crp(g_s, g_t, cs, ct), crp(g_s, g_t, cs, ct))
    for fn, args in [
        (CF.consistency_kl, (torch.randn(4, 3), torch.randn(4, 3))),
        (CF.class_centroids, (bank_s.memory, bank_s.labels, 4)),
    ]:
        torch.testing.assert_close(torch.compile(fn, backend="eager", fullgraph=True)(*args),
                                   fn(*args))


@pytest.mark.parametrize("mode", ["mask", False])
def test_value_checks_can_be_switched_off(mode):
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    ccd = ClassGuidedContrastiveLoss(3, 10)
    bad = g_s.clone()
    bad[0, 0] = float("nan")
    set_value_checks(mode)
    try:
        assert value_checks() == "mask"
        loss = ccd(bad, g_t, idx, bank_s, bank_t)
    finally:
        set_value_checks("auto")
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="mode must be one of 'auto', 'raise', 'mask'"):
        set_value_checks(1)  # type: ignore[arg-type]
    assert value_checks() == "auto"


def test_crp_module_matches_reference():
    g_s = F.normalize(torch.randn(5, 4, dtype=D64), dim=1)
    g_t = F.normalize(torch.randn(5, 4, dtype=D64), dim=1)
    c_s = F.normalize(torch.randn(3, 4, dtype=D64), dim=1)
    c_t = F.normalize(torch.randn(3, 4, dtype=D64), dim=1)
    got = CategoricalRelationLoss(temperature=0.2)(g_s, g_t, c_s, c_t)
    assert float(got) == pytest.approx(reference.crp(g_s, g_t, c_s, c_t, 0.2), rel=1e-10)
    with pytest.raises(ValueError, match="centroids have size"):
        CategoricalRelationLoss()(g_s, g_t, c_s[:, :2], c_t[:, :2])


def test_a_z_loaded_into_a_loss_that_has_run_is_the_one_used():
    """Loading a state dict (another Z) into a loss that has already run: its next value is
    that of a fresh loss loaded with the same state, not one computed from the old Z."""
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    sample = bank_s.sample(idx, 3, 10)
    ran = ClassGuidedContrastiveLoss(3, 10)
    ran(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    other = ClassGuidedContrastiveLoss(3, 10)
    other(F.normalize(g_s + 1.0, dim=1), g_t, idx, bank_s, bank_t, sample_indices=sample)
    assert not torch.equal(other.log_normalizer, ran.log_normalizer)
    ran.load_state_dict(other.state_dict())
    fresh = ClassGuidedContrastiveLoss(3, 10)
    fresh.load_state_dict(other.state_dict())
    want = fresh(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    got = ran(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    assert float(got) == float(want)
    with torch.no_grad():  # changed in place, as an optimiser or a user would
        ran.log_normalizer.add_(0.5)
    moved = ran(g_s, g_t, idx, bank_s, bank_t, sample_indices=sample)
    assert float(moved) != float(want)


def test_ema_normalizer_with_momentum_zero_follows_each_batch():
    """normalizer="ema" with momentum 0: Z is each training batch's own estimate."""
    _, (bank_s, bank_t), g_s, g_t, idx = setup()
    ccd = ClassGuidedContrastiveLoss(3, 10, normalizer="ema", normalizer_momentum=0.0)
    for shift in (0.0, 0.4):
        a = F.normalize(g_s + shift, dim=1)
        sample = bank_s.sample(idx, 3, 10)
        ccd(a, g_t, idx, bank_s, bank_t, sample_indices=sample)
        want = reference.first_batch_log_z(a, bank_t.memory, sample, 0.07, 120)
        assert float(ccd.log_normalizer[0]) == pytest.approx(want, rel=1e-10)


def test_crp_default_temperature():
    assert CategoricalRelationLoss().temperature == 0.07
    assert ClassGuidedContrastiveLoss().temperature == 0.07
