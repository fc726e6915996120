"""CRCKDLoss: the method's step order, gradients, train/eval, resume."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from crckd_losses import (
    CRCKDLoss,
    EMATeacher,
    IndexedDataset,
    MomentumMemoryBank,
    set_value_checks,
)
from crckd_losses import functional as CF

D64 = torch.float64


def make(n=90, classes=3, **kw):
    labels = torch.arange(n) % classes
    kw = {"embed_dim": 8, "num_positives": 4, "num_negatives": 20, **kw}
    return labels, CRCKDLoss(labels, student_dim=10, teacher_dim=12, **kw).double()


def test_step_follows_spec_order():
    labels, crckd = make()
    f_s, f_t = torch.randn(5, 10, dtype=D64), torch.randn(5, 12, dtype=D64)
    idx = torch.tensor([0, 7, 20, 41, 88])
    sample = crckd.student_bank.sample(idx, 4, 20)
    m_s, m_t = crckd.student_bank.memory.clone(), crckd.teacher_bank.memory.clone()
    out = crckd(f_s, f_t, idx, sample_indices=sample)

    g_s = F.normalize(crckd.student_head.linear(f_s), dim=1)
    g_t = F.normalize(crckd.teacher_head.linear(f_t), dim=1)
    l_s, l_t = CF.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, sample, 4)
    new_s = m_s.clone()
    new_t = m_t.clone()
    new_s[idx] = F.normalize(0.5 * m_s[idx] + 0.5 * g_s, dim=1)
    new_t[idx] = F.normalize(0.5 * m_t[idx] + 0.5 * g_t, dim=1)
    torch.testing.assert_close(crckd.student_bank.memory, new_s.detach())
    torch.testing.assert_close(crckd.teacher_bank.memory, new_t.detach())
    crp = CF.categorical_relation_loss(g_s, g_t, CF.class_centroids(new_s, labels, 3),
                                       CF.class_centroids(new_t, labels, 3))
    torch.testing.assert_close(out.ccd_student, l_s)
    torch.testing.assert_close(out.ccd_teacher, l_t)
    torch.testing.assert_close(out.ccd, l_s + l_t)
    torch.testing.assert_close(out.crp, crp)
    torch.testing.assert_close(out.loss, 0.1 * (l_s + l_t) + 1.0 * crp)


def test_teacher_backbone_feature_gets_no_gradient():
    _, crckd = make()
    f_s = torch.randn(5, 10, dtype=D64, requires_grad=True)
    f_t = torch.randn(5, 12, dtype=D64, requires_grad=True)
    crckd(f_s, f_t, torch.arange(5)).loss.backward()
    assert f_t.grad is None
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert crckd.teacher_head.linear.weight.grad.abs().sum() > 0


def test_teacher_head_gradient_equals_weighted_teacher_term():
    _, crckd = make()
    _, copy = make()
    copy.load_state_dict(crckd.state_dict())
    f_s, f_t = torch.randn(5, 10, dtype=D64), torch.randn(5, 12, dtype=D64)
    idx = torch.arange(5)
    sample = crckd.student_bank.sample(idx, 4, 20)
    crckd(f_s, f_t, idx, sample_indices=sample).loss.backward()
    (0.1 * copy(f_s, f_t, idx, sample_indices=sample).ccd_teacher).backward()
    torch.testing.assert_close(crckd.teacher_head.linear.weight.grad,
                               copy.teacher_head.linear.weight.grad)


def test_eval_mode_leaves_banks():
    _, crckd = make()
    crckd.eval()
    before = crckd.student_bank.memory.clone()
    crckd(torch.randn(4, 10, dtype=D64), torch.randn(4, 12, dtype=D64), torch.arange(4))
    assert torch.equal(before, crckd.student_bank.memory)


def test_state_dict_contents_and_resume_bit_for_bit():
    torch.manual_seed(0)
    _, crckd = make()
    opt = torch.optim.Adam(crckd.parameters(), lr=1e-2)
    steps = [(torch.randn(6, 10, dtype=D64), torch.randn(6, 12, dtype=D64),
              torch.randperm(90)[:6]) for _ in range(5)]
    samples = [crckd.student_bank.sample(i, 4, 20) for _, _, i in steps]

    def step(module, optim, k):
        f_s, f_t, idx = steps[k]
        optim.zero_grad()
        out = module(f_s, f_t, idx, sample_indices=samples[k])
        out.loss.backward()
        optim.step()
        return out.loss.detach()

    for k in range(3):
        step(crckd, opt, k)
    state = copy.deepcopy({"crckd": crckd.state_dict(), "opt": opt.state_dict()})
    keys = set(state["crckd"])
    assert {"student_bank.memory", "teacher_bank.memory", "ccd.log_normalizer",
            "ccd.normalizer_initialized", "student_head.linear.weight",
            "teacher_head.linear.weight"} <= keys
    tail = [step(crckd, opt, k) for k in (3, 4)]

    _, resumed = make()
    resumed.load_state_dict(state["crckd"])
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(state["opt"])
    tail2 = [step(resumed, opt2, k) for k in (3, 4)]
    assert [float(t) for t in tail] == [float(t) for t in tail2]
    for (name, a), b in zip(crckd.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_arguments():
    labels = torch.arange(30) % 3
    with pytest.raises(ValueError, match="ccd_weight"):
        CRCKDLoss(labels, 4, 4, ccd_weight=-1)
    with pytest.raises(ValueError, match=r"num_positives=31 is larger than the bank \(30 rows"):
        CRCKDLoss(labels, 4, 4, num_positives=31, num_negatives=5)
    crckd = CRCKDLoss(labels, 4, 4, embed_dim=4, num_positives=2, num_negatives=5)
    with pytest.raises(ValueError, match="one batch size"):
        crckd(torch.randn(3, 4), torch.randn(2, 4), torch.arange(3))
    with pytest.raises(ValueError, match=r"student_feat must have 4 columns \(student_dim\)"):
        crckd(torch.randn(3, 5), torch.randn(3, 4), torch.arange(3))
    with pytest.raises(ValueError, match=r"teacher_feat must have 4 columns \(teacher_dim\)"):
        crckd(torch.randn(3, 4), torch.randn(3, 6), torch.arange(3))


@pytest.mark.parametrize("which", ["student_feat", "teacher_feat"])
def test_non_finite_feature_names_the_callers_argument_and_leaves_banks(which):
    labels = torch.arange(30) % 3
    crckd = CRCKDLoss(labels, 4, 4, embed_dim=4, num_positives=2, num_negatives=5)
    feats = {"student_feat": torch.randn(3, 4), "teacher_feat": torch.randn(3, 4)}
    feats[which][1, 2] = float("nan")
    before = [crckd.student_bank.memory.clone(), crckd.teacher_bank.memory.clone()]
    with pytest.raises(ValueError, match=f"^{which} contains NaN or Inf"):
        crckd(feats["student_feat"], feats["teacher_feat"], torch.arange(3))
    assert torch.equal(crckd.student_bank.memory, before[0])
    assert torch.equal(crckd.teacher_bank.memory, before[1])


def test_float64_features_with_float32_heads():
    labels = [0, 1, 2] * 10  # a plain list, as torchvision's .targets
    crckd = CRCKDLoss(labels, 4, 4, embed_dim=4, num_positives=2, num_negatives=5)
    f_s = torch.randn(3, 4, dtype=D64, requires_grad=True)
    out = crckd(f_s, torch.randn(3, 4, dtype=D64), torch.arange(3))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and f_s.grad.dtype == D64
    assert bool(torch.isfinite(f_s.grad).all())


def test_too_many_negatives_warns_once_at_construction(recwarn):
    labels = torch.tensor([0] * 20 + [1] * 8 + [2] * 4)
    crckd = CRCKDLoss(labels, 4, 4, embed_dim=4, num_positives=2, num_negatives=4096)
    for _ in range(3):
        crckd(torch.randn(3, 4), torch.randn(3, 4), torch.arange(3))
    warned = [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert len(warned) == 1, [str(w.message) for w in warned]
    assert warned[0].filename == __file__
    assert "num_negatives=4096 is larger than the bank (32 rows)" in str(warned[0].message)
    assert "num_negatives=min(4096, 12)" in str(warned[0].message)


def test_functional_exports_only_its_public_names():
    functions = {name for name in dir(CF) if callable(getattr(CF, name))
                 and getattr(getattr(CF, name), "__module__", None) == CF.__name__
                 and not name.startswith("_") and not isinstance(getattr(CF, name), type)}
    assert functions <= set(CF.__all__)
    assert not [name for name in CF.__all__ if name.startswith("_")]
    assert all(hasattr(CF, name) for name in CF.__all__)
    namespace: dict[str, object] = {}
    exec("from crckd_losses.functional import *", namespace)
    assert "_scores" not in namespace and "reduce" not in namespace


def test_indexed_dataset():
    base = torch.utils.data.TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    ds = IndexedDataset(base)
    assert len(ds) == 4
    x, y, i = ds[3]
    assert i == 3 and int(y) == 1
    assert IndexedDataset([10, 20])[1] == (20, 1)
    assert IndexedDataset([10, 20])[-1] == (20, 1)  # the item's own row, not -1
    with pytest.raises(AttributeError, match="IndexedDataset .wrapping list. has no attribute"):
        getattr(IndexedDataset([10, 20]), "targets")  # noqa: B009
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[2].tolist() == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(iter([1, 2]))  # type: ignore[arg-type]


def test_indexed_dataset_over_a_subset_keeps_indices_in_batches():
    base = torch.utils.data.TensorDataset(torch.randn(6, 2), torch.arange(6))
    ds = IndexedDataset(torch.utils.data.Subset(base, [5, 3, 1]))
    x, y, i = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert y.tolist() == [5, 3, 1]
    assert i.tolist() == [0, 1, 2]
    assert ds.indices == [5, 3, 1]  # attributes of the wrapped dataset pass through


def test_bfloat16_autocast_step_is_close():
    torch.manual_seed(0)
    labels = torch.arange(300) % 5
    crckd = CRCKDLoss(labels, 32, 32, embed_dim=16, num_positives=5, num_negatives=100)
    f_s, f_t = torch.randn(16, 32), torch.randn(16, 32)
    idx = torch.arange(16)
    sample = crckd.student_bank.sample(idx, 5, 100)
    crckd.eval()  # no bank writes, so both calls see the same banks
    crckd.ccd.train()
    ref = crckd(f_s, f_t, idx, sample_indices=sample)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crckd(f_s, f_t, idx, sample_indices=sample)
    for r, g in zip(ref, got):
        assert torch.isfinite(g)
        assert float(g.detach()) == pytest.approx(float(r.detach()), rel=1e-2, abs=1e-3)


def test_compile_fullgraph_traces_a_whole_step():
    torch._dynamo.reset()
    _, eager = make()
    _, compiled = make()
    compiled.load_state_dict(eager.state_dict())
    f_s, f_t = torch.randn(5, 10, dtype=D64), torch.randn(5, 12, dtype=D64)
    idx = torch.arange(5)
    sample = eager.student_bank.sample(idx, 4, 20)
    want = eager(f_s, f_t, idx, sample_indices=sample)
    got = torch.compile(compiled, backend="eager", fullgraph=True)(f_s, f_t, idx,
                                                                   sample_indices=sample)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(compiled.student_bank.memory, eager.student_bank.memory)


class _NoHostReads(TorchDispatchMode):
    """Fails on any operator that reads a tensor's values on the host or sizes its output from
    them: on an accelerator each would make the step wait for the device."""

    SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique",
               "_unique2", "bincount", "repeat_interleave"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        assert name not in self.SYNCING, f"{name} reads values on the host"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler", ["independent", "shuffle"])
def test_default_step_reads_no_values_where_checks_do_not(sampler):
    """With the accelerators' policy ('mask'), a whole step (the first call's Z, sampling, both
    bank updates, centroids, backward, the EMA update) never reads a value on the host."""
    labels, crckd = make(n=300)
    crckd.ccd.sampler = sampler
    student = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.BatchNorm1d(10)).double()
    teacher = EMATeacher(student)
    f_t = torch.randn(16, 12, dtype=D64)
    set_value_checks("mask")
    try:
        with _NoHostReads():
            for _ in range(3):
                idx = torch.randperm(300)[:16]
                out = crckd(student(torch.randn(16, 10, dtype=D64)), f_t, idx)
                out.loss.backward()
                teacher.update(student)
    finally:
        set_value_checks("auto")
    assert torch.isfinite(out.loss) and int(teacher.num_updates) == 3


def test_bad_rows_are_masked_where_values_are_not_read():
    labels, crckd = make(n=90)
    f_s, f_t = torch.randn(6, 10, dtype=D64), torch.randn(6, 12, dtype=D64)
    f_t[2, 0] = float("inf")
    idx = torch.tensor([0, 7, 20, 41, 500, 88])  # 500: out of range
    before = crckd.student_bank.memory.clone(), crckd.teacher_bank.memory.clone()
    set_value_checks("mask")
    try:
        crckd(f_s, f_t, idx)
    finally:
        set_value_checks("auto")
    for bank, old in zip((crckd.student_bank, crckd.teacher_bank), before):
        assert bool(torch.isfinite(bank.memory).all())
        assert int(bank.rejected_rows) == 2
        changed = (bank.memory != old).any(dim=1).nonzero().flatten().tolist()
        assert changed == [0, 7, 41, 88]  # not 20 (an Inf feature), not 500, not 89
        torch.testing.assert_close(bank.centroids(), CF.class_centroids(bank.memory, labels, 3))
    # with the CPU default, the same input is refused before anything changes
    memory = crckd.student_bank.memory.clone()
    with pytest.raises(ValueError, match="teacher_feat contains NaN or Inf"):
        crckd(f_s, f_t, idx)
    f_t[2, 0] = 0.0
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 90\), got values in"):
        crckd(f_s, f_t, idx)
    assert torch.equal(crckd.student_bank.memory, memory)


def test_snapshot_banks_match_copy_on_write_and_keep_their_addresses():
    """copy_on_write="snapshot" (in place, losses read a static snapshot): the same losses,
    gradients and banks as the default over several steps, and no bank tensor ever moves,
    which is what a CUDA graph needs."""
    torch.manual_seed(0)
    labels, default = make(n=120)
    _, snapshot = make(n=120)
    for bank in (snapshot.student_bank, snapshot.teacher_bank):
        bank.copy_on_write = "snapshot"
    snapshot.load_state_dict(default.state_dict())
    addresses = None
    for step in range(4):
        f_s = torch.randn(8, 10, dtype=D64)
        f_t = torch.randn(8, 12, dtype=D64)
        idx = torch.randint(0, 120, (8,))  # repeats included
        sample = default.student_bank.sample(idx, 4, 20)
        grads = []
        for crckd in (default, snapshot):
            x = f_s.clone().requires_grad_()
            out = crckd(x, f_t, idx, sample_indices=sample)
            out.loss.backward()
            grads.append((out, x.grad))
        (want, want_grad), (got, got_grad) = grads
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
        banks = (snapshot.student_bank, snapshot.teacher_bank)
        now = [t.data_ptr() for b in banks for t in (b.memory, b.read())]
        assert addresses is None or now == addresses, f"a bank tensor moved at step {step}"
        addresses = now
    for name in ("student_bank", "teacher_bank"):
        torch.testing.assert_close(getattr(snapshot, name).memory, getattr(default, name).memory,
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="copy_on_write must be True, False or 'snapshot'"):
        MomentumMemoryBank(labels, 8, copy_on_write="yes")


def test_a_state_dict_saved_by_version_0_2_loads_and_continues():
    """``data/crckd_state_v0.2.pt`` was saved by version 0.2 (commit 915dc3f) after two
    training steps, with a third step's inputs and outputs. Loaded into today's module
    (strictly), the third step gives the same losses and the
    same bank to float32 rounding. Its running class sums, which today's banks no longer
    keep, are dropped on load."""
    from pathlib import Path

    saved = torch.load(Path(__file__).parent / "data" / "crckd_state_v0.2.pt")
    crckd = CRCKDLoss(torch.arange(30) % 3, 6, 5, embed_dim=4, num_positives=3,
                      num_negatives=8)
    crckd.load_state_dict(saved["state_dict"])
    assert "student_bank.class_sums" in saved["state_dict"]
    assert "student_bank.class_sums" not in crckd.state_dict()
    out = crckd(*saved["inputs"][:3], sample_indices=saved["inputs"][3])
    for got, want in zip(out, saved["outputs"], strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crckd.student_bank.memory, saved["memory_after"])
