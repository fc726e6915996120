"""MomentumMemoryBank: update, class-guided sampling, centroids, state, bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from crckd_losses import MomentumMemoryBank
from crckd_losses.sampling import class_guided_indices
from tests import reference


def imbalanced_labels(n=200, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])[:classes]
    labels = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g)
    labels[:classes] = torch.arange(classes)
    return labels


def test_initial_rows_uniform_in_bound():
    bank = MomentumMemoryBank(imbalanced_labels(2000), dim=12)
    bound = 1 / math.sqrt(12 / 3)
    assert bank.memory.shape == (2000, 12)
    assert float(bank.memory.abs().max()) <= bound
    assert float(bank.memory.abs().max()) > 0.95 * bound
    assert float(bank.memory.mean()) == pytest.approx(0.0, abs=0.01)


def test_update_matches_reference():
    bank = MomentumMemoryBank(imbalanced_labels(), dim=8, momentum=0.5, dtype=torch.float64)
    before = bank.memory.clone()
    idx = torch.tensor([3, 17, 150])
    feats = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=1)
    bank.update(idx, feats)
    torch.testing.assert_close(bank.memory, reference.bank_update(before, idx, feats, 0.5),
                               rtol=1e-12, atol=1e-12)
    assert torch.allclose(bank.memory[idx].norm(dim=1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("copy_on_write", [True, False])
def test_copy_on_write_keeps_old_tensor(copy_on_write):
    bank = MomentumMemoryBank(imbalanced_labels(), dim=8, copy_on_write=copy_on_write)
    old = bank.memory
    snapshot = old.clone()
    bank.update(torch.tensor([0, 1]), torch.randn(2, 8))
    assert (bank.memory is old) is (not copy_on_write)
    assert torch.equal(old, snapshot) is copy_on_write


def check_sample(bank, anchors, idx, positives, negatives):
    labels = bank.labels
    assert idx.shape == (anchors.shape[0], positives + negatives)
    assert idx.dtype == torch.long
    assert torch.equal(idx[:, 0], anchors)
    y = labels[anchors][:, None]
    assert bool((labels[idx[:, :positives]] == y).all())
    assert bool((labels[idx[:, positives:]] != y).all())
    counts = torch.bincount(labels, minlength=bank.num_classes)
    for row, anchor in zip(idx, anchors):
        n_class = int(counts[labels[anchor]])
        if n_class >= positives - 1:
            assert len(set(row[1:positives].tolist())) == positives - 1
        if bank.size - n_class >= negatives:
            assert len(set(row[positives:].tolist())) == negatives


@pytest.mark.parametrize("sampler", ["shuffle", "independent"])
@pytest.mark.parametrize("positives, negatives", [(1, 10), (5, 40), (20, 100), (8, 190)])
def test_sample_structure(sampler, positives, negatives):
    bank = MomentumMemoryBank(imbalanced_labels(), dim=4)
    anchors = torch.randperm(200)[:32]
    idx = bank.sample(anchors, positives, negatives, sampler=sampler)
    check_sample(bank, anchors, idx, positives, negatives)


@pytest.mark.parametrize("sampler", ["shuffle", "independent"])
def test_sample_with_too_few_rows_repeats(sampler):
    labels = torch.tensor([0] * 3 + [1] * 4)
    bank = MomentumMemoryBank(labels, dim=4)
    anchors = torch.tensor([0, 5])
    idx = bank.sample(anchors, num_positives=6, num_negatives=7, sampler=sampler)
    check_sample(bank, anchors, idx, 6, 7)


@pytest.mark.parametrize("sampler", ["shuffle", "independent"])
def test_sample_with_too_few_rows_is_iid(sampler):
    """Method §4: where too few rows exist, each column is an i.i.d. uniform draw. The counts
    of one row over K draws are then Binomial(K, 1/L), not the near-constant counts that
    cycling through the rows would give."""
    labels = torch.tensor([0] * 4 + [1] * 6)
    bank = MomentumMemoryBank(labels, dim=4)
    g = torch.Generator().manual_seed(3)
    draws, k_pos, k_neg = 2000, 9, 15  # 8 same-class columns over 4 rows; 15 over 6 rows
    idx = bank.sample(torch.zeros(draws, dtype=torch.long), k_pos, k_neg, generator=g,
                      sampler=sampler)
    for cols, rows, k in ((slice(1, k_pos), range(0, 4), k_pos - 1),
                          (slice(k_pos, None), range(4, 10), k_neg)):
        counts = torch.stack([(idx[:, cols] == r).sum(1) for r in rows]).double()  # [L, draws]
        p = 1 / len(rows)
        mean, var = k * p, k * p * (1 - p)
        assert float(counts.mean()) == pytest.approx(mean, rel=0.02)
        assert float(counts.var()) == pytest.approx(var, rel=0.1)


def overlap_moments(bank, anchors, k, sampler, draws, seed):
    g = torch.Generator().manual_seed(seed)
    overlaps = []
    for _ in range(draws):
        idx = bank.sample(anchors, 1, k, generator=g, sampler=sampler)
        a, b = (set(row.tolist()) for row in idx[:, 1:])
        overlaps.append(len(a & b))
    values = torch.tensor(overlaps, dtype=torch.float64)
    return float(values.mean()), float(values.var())


def test_independent_sampler_anchors_are_independent():
    """Two anchors of one class: with independent uniform K-subsets of the L other-class rows,
    their overlap is hypergeometric (mean K^2/L, variance K (K/L) (1-K/L) (L-K)/(L-1))."""
    labels = torch.tensor([0] * 20 + [1] * 40)
    bank = MomentumMemoryBank(labels, dim=4)
    big, k = 40, 20
    mean, var = overlap_moments(bank, torch.tensor([0, 1]), k, "independent", 3000, 0)
    expected_var = k * (k / big) * (1 - k / big) * (big - k) / (big - 1)
    assert mean == pytest.approx(k * k / big, rel=0.03)
    assert var == pytest.approx(expected_var, rel=0.15)


def test_shuffle_sampler_correlates_anchors_of_one_class():
    """The documented departure of "shuffle": two anchors of one class take arcs of one cycle,
    so the overlap has the independent draw's mean but a far larger variance."""
    labels = torch.tensor([0] * 20 + [1] * 40)
    bank = MomentumMemoryBank(labels, dim=4)
    big, k = 40, 20
    mean, var = overlap_moments(bank, torch.tensor([0, 1]), k, "shuffle", 3000, 0)
    expected_var = k * (k / big) * (1 - k / big) * (big - k) / (big - 1)
    assert mean == pytest.approx(k * k / big, rel=0.05)
    assert var > 5 * expected_var


@pytest.mark.parametrize("sampler", ["shuffle", "independent"])
def test_sample_is_uniform_over_allowed_rows(sampler):
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    bank = MomentumMemoryBank(labels, dim=4)
    g = torch.Generator().manual_seed(5)
    anchors = torch.tensor([0, 12, 45])
    hits_pos = torch.zeros(60)
    hits_neg = torch.zeros(60)
    draws = 3000
    for _ in range(draws):
        idx = bank.sample(anchors[:1], 4, 15, generator=g, sampler=sampler)
        hits_pos += torch.bincount(idx[0, 1:4], minlength=60)
        hits_neg += torch.bincount(idx[0, 4:], minlength=60)
    # Each class-0 row: expected 3/10 of draws; each other-class row: 15/50 of draws.
    for hits, rows, expected in ((hits_pos, slice(0, 10), 0.3), (hits_neg, slice(10, 60), 0.3)):
        freq = hits[rows] / draws
        sigma = math.sqrt(expected * (1 - expected) / draws)
        assert float((freq - expected).abs().max()) < 5 * sigma
    assert hits_pos[10:].sum() == 0 and hits_neg[:10].sum() == 0


def test_layout_knows_on_the_host_whether_a_pool_is_too_small():
    """The bank's layout carries its smallest and largest class size as host ints, so the
    sampler can tell without a device read whether any anchor needs the with-replacement
    fallback: a class of fewer than P-1 rows, or fewer than K rows outside some class."""
    labels = torch.tensor([0] * 4 + [1] * 6 + [2] * 10)  # N = 20
    layout = MomentumMemoryBank(labels, dim=4).layout
    assert layout.size_range == (4, 10)
    assert not layout.needs_replacement(5, 10)  # 4 >= P-1 = 4; 20 - 10 >= K = 10
    assert layout.needs_replacement(6, 10)  # class 0 has 4 < 5 rows
    assert layout.needs_replacement(5, 11)  # only 10 rows outside class 2
    assert layout._replace(size_range=None).needs_replacement(1, 1)  # unknown: assume so


@pytest.mark.parametrize("sampler", ["shuffle", "independent"])
def test_sampler_skips_the_fallback_draw_exactly(sampler):
    """Where no pool is too small, the sampler makes no with-replacement draw: its indices are
    those a layout without size_range gives (which draws the fallback and discards it) from a
    generator one fallback draw behind."""
    labels = torch.tensor([0] * 12 + [1] * 20 + [2] * 28)
    layout = MomentumMemoryBank(labels, dim=4).layout
    anchors = torch.tensor([0, 13, 40, 59])
    positives, negatives = 5, 30
    assert not layout.needs_replacement(positives, negatives)
    g_known = torch.Generator().manual_seed(7)
    torch.rand(4, positives - 1 + negatives, generator=g_known, dtype=torch.float64)
    known = class_guided_indices(layout, anchors, positives, negatives, g_known, sampler)
    unknown = class_guided_indices(layout._replace(size_range=None), anchors, positives,
                                   negatives, torch.Generator().manual_seed(7), sampler)
    assert torch.equal(known, unknown)


def test_sample_generator_reproducible():
    bank = MomentumMemoryBank(imbalanced_labels(), dim=4)
    anchors = torch.arange(16)
    a = bank.sample(anchors, 5, 30, generator=torch.Generator().manual_seed(1))
    b = bank.sample(anchors, 5, 30, generator=torch.Generator().manual_seed(1))
    c = bank.sample(anchors, 5, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@given(classes=st.integers(2, 6), n=st.integers(2, 60), seed=st.integers(0, 1000),
       positives=st.integers(1, 12), negatives=st.integers(1, 80))
def test_sample_properties(classes, n, seed, positives, negatives):
    torch.manual_seed(seed)
    n = max(n, classes, positives, negatives)
    labels = torch.cat([torch.arange(classes), torch.randint(0, classes, (n - classes,))])
    bank = MomentumMemoryBank(labels, dim=3)
    anchors = torch.randint(0, n, (min(n, 7),))
    for sampler in ("shuffle", "independent"):
        idx = bank.sample(anchors, positives, negatives, sampler=sampler)
        check_sample(bank, anchors, idx, positives, negatives)


def test_class_with_one_member_and_single_class_batch():
    labels = torch.tensor([0, 1, 1, 1, 1, 1])
    bank = MomentumMemoryBank(labels, dim=4)
    idx = bank.sample(torch.tensor([0]), 3, 4)
    assert idx[0, :3].tolist() == [0, 0, 0]
    idx = bank.sample(torch.tensor([1, 2, 3]), 3, 2)
    assert bool((idx[:, 3:] == 0).all())


def test_centroids_match_reference():
    labels = imbalanced_labels(50)
    bank = MomentumMemoryBank(labels, dim=6, dtype=torch.float64)
    for relu in (True, False):
        torch.testing.assert_close(bank.centroids(relu=relu),
                                   reference.centroids(bank.memory, labels, 5, relu),
                                   rtol=1e-10, atol=1e-12)


def test_class_anchor_indices_pair_banks():
    labels = imbalanced_labels(50)
    bank_s, bank_t = MomentumMemoryBank(labels, dim=6), MomentumMemoryBank(labels, dim=6)
    rows = bank_s.class_anchor_indices(per_class=3, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (15,)
    assert labels[rows].tolist() == sorted(labels[rows].tolist())
    same = bank_t.class_anchors(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, bank_t.memory[rows])


def test_class_anchors():
    labels = imbalanced_labels(50)
    bank = MomentumMemoryBank(labels, dim=6)
    anchors = bank.class_anchors(per_class=4)
    assert anchors.shape == (20, 6)
    # every anchor is a bank row of the right class, class by class
    for c in range(5):
        for row in anchors[4 * c:4 * c + 4]:
            matches = (bank.memory == row).all(dim=1).nonzero().flatten()
            assert int(labels[matches[0]]) == c


def test_state_dict_round_trip():
    labels = imbalanced_labels()
    bank = MomentumMemoryBank(labels, dim=8)
    bank.update(torch.tensor([1, 2]), torch.randn(2, 8))
    other = MomentumMemoryBank(labels, dim=8)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.memory, bank.memory)
    assert set(bank.state_dict()) == {"memory", "labels"}
    assert torch.equal(other.centroids(), bank.centroids())


def test_state_dict_from_other_dataset_rejected():
    bank = MomentumMemoryBank(imbalanced_labels(seed=1), dim=8)
    other = MomentumMemoryBank(imbalanced_labels(seed=2), dim=8)
    with pytest.raises(RuntimeError, match=r"labels differ from this bank's in \d+ of"):
        other.load_state_dict(bank.state_dict())
    bigger = MomentumMemoryBank(torch.cat([imbalanced_labels(seed=1), torch.tensor([0, 1])]),
                                dim=8)
    with pytest.raises(RuntimeError, match=r"has \d+ rows and this one \d+"):
        bigger.load_state_dict(bank.state_dict())


@pytest.mark.parametrize(
    "labels, kwargs, error, match",
    [
        (torch.tensor([0.0, 1.0]), {}, TypeError, "labels must hold integer class ids"),
        ([0.5, 1.0], {}, TypeError, "labels must hold integer class ids"),
        (torch.tensor([True, False]), {}, TypeError, "labels must hold integer class ids"),
        ("ab", {}, TypeError, "got class names"),
        (["nv", "mel"], {}, TypeError, r"got class names \(strings\).*classes.index"),
        (np.array(["0", "1"]), {}, TypeError, "got class names"),
        ({0: 1}, {}, TypeError, "labels must be a tensor, array or sequence"),
        (torch.tensor([[0, 1]]), {}, ValueError, "labels must have 1 dimension"),
        (torch.tensor([0, 1, -1]), {}, ValueError, "labels must be >= 0"),
        (torch.tensor([0, 0, 0]), {}, ValueError, "at least 2 classes"),
        (torch.tensor([0, 2, 2]), {}, ValueError,
         r"classes \[1\] have none.*torch.unique\(labels, return_inverse=True\)\[1\]"),
        (torch.tensor([0, 1, 5]), {"num_classes": 3}, ValueError, r"labels must lie in \[0, 3\)"),
        (torch.tensor([], dtype=torch.long), {}, ValueError, "empty"),
        (torch.tensor([0, 1]), {"momentum": 1.0}, ValueError, "momentum"),
        (torch.tensor([0, 1]), {"dim": 0}, ValueError, "dim must be at least 1"),
    ],
)
def test_construction_errors(labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        MomentumMemoryBank(labels, **kwargs)


@pytest.mark.parametrize(
    "indices, features, error, match",
    [
        (torch.tensor([0, 500]), torch.randn(2, 8), ValueError, r"indices must lie in \[0, 200\)"),
        (torch.tensor([0, 1]), torch.randn(2, 7), ValueError, r"features must have shape \(2, 8\)"),
        (torch.tensor([0, 1]), torch.randn(3, 8), ValueError, r"features must have shape \(2, 8\)"),
        (torch.tensor([0, 1]), torch.tensor([[1, 2]] * 2), TypeError, "floating-point"),
        (torch.tensor([0.0, 1.0]), torch.randn(2, 8), TypeError, "integer"),
        (torch.tensor([0, 1]), torch.full((2, 8), float("nan")), ValueError, "NaN"),
        (torch.tensor([], dtype=torch.long), torch.randn(0, 8), ValueError, "empty"),
    ],
)
def test_bad_update_leaves_bank_unchanged(indices, features, error, match):
    bank = MomentumMemoryBank(imbalanced_labels(), dim=8)
    before = bank.memory.clone()
    with pytest.raises(error, match=match):
        bank.update(indices, features)
    assert torch.equal(bank.memory, before)


def test_bad_sample_arguments():
    bank = MomentumMemoryBank(imbalanced_labels(), dim=8)
    with pytest.raises(ValueError, match="num_negatives must be at least 1"):
        bank.sample(torch.tensor([0]), 2, 0)
    with pytest.raises(ValueError, match="sampler must be"):
        bank.sample(torch.tensor([0]), 2, 3, sampler="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 200\)"):
        bank.sample(torch.tensor([200]), 2, 3)
    with pytest.raises(ValueError, match=r"num_positives=201 is larger than the bank \(200 rows\)"):
        bank.sample(torch.tensor([0]), 201, 2)


def test_more_negatives_than_rows_warns_once_at_the_callers_line(recwarn):
    bank = MomentumMemoryBank(imbalanced_labels(), dim=8)
    anchors = torch.tensor([0, 1, 2])
    fits = 200 - int(torch.bincount(bank.labels).max())
    assert bank.max_distinct_negatives == fits
    idx = bank.sample(anchors, 3, 300)
    check_sample(bank, anchors, idx, 3, 300)
    bank.sample(anchors, 3, 300)
    warned = [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert len(warned) == 1
    assert "num_negatives=300 is larger than the bank (200 rows)" in str(warned[0].message)
    assert f"num_negatives=min(4096, {fits})" in str(warned[0].message)
    assert warned[0].filename == __file__


def test_labels_as_list_or_numpy():
    np = pytest.importorskip("numpy")
    as_list = [0, 1, 1, 2, 0]
    for labels in (as_list, tuple(as_list), np.array(as_list), np.array(as_list, np.int32)):
        bank = MomentumMemoryBank(labels, dim=4)
        assert bank.labels.dtype == torch.long
        assert bank.labels.tolist() == as_list


def test_repeated_indices_last_write_wins():
    labels = imbalanced_labels()
    bank = MomentumMemoryBank(labels, dim=8, dtype=torch.float64)
    before = bank.memory.clone()
    feats = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    bank.update(torch.tensor([3, 7, 3, 3]), feats)
    expected = reference.bank_update(before, torch.tensor([7, 3]), feats[[1, 3]], 0.5)
    torch.testing.assert_close(bank.memory, expected, rtol=1e-12, atol=1e-12)


def _fold_times_zero(gm):
    """What inductor's joint-graph constant folding did in torch 2.11 to 2.13: ``x * 0``
    (an integer 0) replaced by zeros, whatever ``x`` holds."""
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (aten.mul.Tensor, aten.mul.Scalar) \
                and any(isinstance(a, int) and a == 0 for a in node.args):
            with gm.graph.inserting_before(node):
                zeros = gm.graph.call_function(aten.zeros_like.default, (node.args[0],))
            node.replace_all_uses_with(zeros)
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def test_write_plan_refuses_non_finite_rows_when_compiled_with_x_times_0_folded():
    # Compiled by torch 2.11-2.13, a finiteness check through NaN * 0 = NaN let NaN rows into
    # the banks: the compiler had folded x * 0 to 0. The plan must not rely on it.
    from torch.fx.experimental.proxy_tensor import make_fx

    from crckd_losses.memory import plan_write

    labels = torch.arange(10) % 2
    idx = torch.tensor([3, 12, -1, 5, 6, 7, 8])
    a, b = torch.randn(7, 4), torch.randn(7, 4)
    a[3, 0], b[4, 1], a[5, 2] = float("nan"), float("inf"), -float("inf")

    def plan(idx, labels, a, b):
        p = plan_write(idx, labels, a, b)
        return p.rejected, p.written.flatten()

    folded = _fold_times_zero(make_fx(plan)(idx, labels, a, b))
    for rejected, written in (plan(idx, labels, a, b), folded(idx, labels, a, b)):
        assert int(rejected) == 5  # two indices out of range, three rows not finite
        assert written.tolist() == [True, False, False, False, False, False, True]


def test_a_finite_row_of_any_magnitude_is_not_refused():
    # Only NaN and Inf are refused: a row near the largest double is finite (a check through
    # its L2 norm would overflow and refuse it; its largest magnitude does not).
    bank = MomentumMemoryBank(imbalanced_labels(), dim=4, dtype=torch.float64)
    feats = torch.tensor([[1e300, -1e300, 1.0, 0.0], [0.0, 0.0, 0.0, 1.7e308]],
                         dtype=torch.float64)
    bank.update(torch.tensor([3, 7]), feats)
    assert int(bank.rejected_rows) == 0
    assert torch.isfinite(bank.memory).all()


@given(seed=st.integers(0, 10_000), copy_on_write=st.booleans())
def test_repeated_indices_keep_centroids_exact(seed, copy_on_write):
    """Hundreds of updates whose indices repeat (within a batch, as a sampler with replacement
    gives): the centroids are those of the rows, every row counted once."""
    g = torch.Generator().manual_seed(seed)
    labels = imbalanced_labels(60, seed=seed)
    bank = MomentumMemoryBank(labels, dim=6, dtype=torch.float64, copy_on_write=copy_on_write)
    bank.centroids()
    for _ in range(300):
        rows = torch.randint(0, 60, (24,), generator=g)  # about 4 repeats per batch
        bank.update(rows, torch.randn(24, 6, generator=g, dtype=torch.float64))
    torch.testing.assert_close(bank.centroids(True), reference.centroids(
        bank.memory, labels, 5, True), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bank.centroids(False), reference.centroids(
        bank.memory, labels, 5, False), rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_traces_bank_ops():
    torch._dynamo.reset()
    bank = MomentumMemoryBank(imbalanced_labels(), dim=8, copy_on_write=False)
    anchors = torch.arange(8)
    feats = F.normalize(torch.randn(8, 8), dim=1)

    def step(bank, anchors, feats):
        idx = bank.sample(anchors, 4, 16)
        bank.update(anchors, feats)
        return idx, bank.centroids()

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    idx, cents = compiled(bank, anchors, feats)
    check_sample(bank, anchors, idx, 4, 16)
    assert cents.shape == (5, 8)


@pytest.mark.parametrize("copy_on_write", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_incremental_centroids_track_every_write(copy_on_write, dtype):
    labels = imbalanced_labels(300)
    bank = MomentumMemoryBank(labels, dim=8, copy_on_write=copy_on_write, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)

    def fresh(relu):
        return reference.centroids(bank.memory.double(), labels, 5, relu).to(dtype)

    bank.centroids(relu=True)
    bank.centroids(relu=False)  # both sums cached, then kept current by update()
    for _ in range(200):
        rows = torch.randperm(300)[:16]
        bank.update(rows, torch.randn(16, 8, dtype=dtype))
    for relu in (True, False):
        torch.testing.assert_close(bank.centroids(relu), fresh(relu), **tol)
    # writes that bypass update() are detected
    with torch.no_grad():
        bank.memory[:50] = 1.0
    torch.testing.assert_close(bank.centroids(), fresh(True), **tol)
    other = MomentumMemoryBank(labels, dim=8, dtype=dtype)
    bank.load_state_dict(other.state_dict())
    torch.testing.assert_close(bank.centroids(False), fresh(False), **tol)
    bank.memory = torch.randn(300, 8, dtype=dtype)
    torch.testing.assert_close(bank.centroids(), fresh(True), **tol)


def test_centroids_after_casting_the_module():
    bank = MomentumMemoryBank(imbalanced_labels(), dim=8).to(torch.float32)
    bank.update(torch.tensor([0, 1]), torch.randn(2, 8))
    torch.testing.assert_close(bank.centroids(), reference.centroids(bank.memory, bank.labels, 5))
