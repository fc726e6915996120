"""EMATeacher against the method §2 recurrence; buffers, modes, wrappers, state."""

import pytest
import torch
from torch import nn

from crckd_losses import EMATeacher, unwrap_model
from tests import reference


def net():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(torch.randn(8, 4, device=next(model.parameters()).device))  # moves BN statistics


def test_update_matches_reference_with_warmup():
    student = net()
    teacher = EMATeacher(student, decay=0.9)
    expected = [p.detach().clone() for p in student.parameters()]
    for step in range(5):
        perturb(student)
        teacher.update(student)
        expected = reference.ema_step(expected, [p.detach() for p in student.parameters()],
                                      step, 0.9)
        for got, want in zip(teacher.module.parameters(), expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert int(teacher.num_updates) == 5


def test_first_update_copies_student():
    student = net()
    teacher = EMATeacher(student)
    perturb(student)
    teacher.update(student)
    for t, s in zip(teacher.module.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_without_warmup_uses_decay_from_start():
    student = net()
    teacher = EMATeacher(student, decay=0.5, warmup=False)
    before = [p.clone() for p in teacher.module.parameters()]
    perturb(student)
    teacher.update(student)
    for t, b, s in zip(teacher.module.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)


@pytest.mark.parametrize("mode", ["copy", "average", "leave"])
def test_buffer_modes(mode):
    student = net()
    teacher = EMATeacher(student, decay=0.5, warmup=False, buffers=mode)
    t_mean = teacher.module[1].running_mean.clone()
    perturb(student)
    s_buffers = [b.clone() for b in student.buffers()]
    teacher.update(student)
    s_mean = s_buffers[0]
    got = teacher.module[1].running_mean
    expected = {"copy": s_mean, "average": 0.5 * t_mean + 0.5 * s_mean, "leave": t_mean}[mode]
    torch.testing.assert_close(got, expected)
    # the update reads the student and never writes it
    for before, after in zip(s_buffers, student.buffers()):
        assert torch.equal(before, after)
    # integer buffers are copied in copy/average, kept in leave
    count = teacher.module[1].num_batches_tracked
    assert int(count) == (0 if mode == "leave" else int(student[1].num_batches_tracked))


@pytest.mark.parametrize("train_mode", [True, False])
def test_teacher_keeps_its_mode(train_mode):
    teacher = EMATeacher(net(), train_mode=train_mode)
    teacher.train()
    assert teacher.module.training is train_mode and teacher.training
    teacher.eval()
    assert teacher.module.training is train_mode and not teacher.training


def test_no_gradients_reach_teacher():
    teacher = EMATeacher(net())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_wrapped_and_compiled_students():
    # DataParallel wants its module on the first GPU wherever one exists
    student = net().to("cuda" if torch.cuda.is_available() else "cpu")
    compiled = torch.compile(student, backend="eager")
    assert unwrap_model(compiled) is student
    teacher = EMATeacher(compiled)
    perturb(student)
    teacher.update(compiled)
    teacher.update(nn.DataParallel(student))
    for t, s in zip(teacher.module.parameters(), student.parameters()):
        assert torch.equal(t, s)  # step 0 copies; step 1 moves towards an equal student


def test_mismatched_student_rejected():
    teacher = EMATeacher(net())
    with pytest.raises(ValueError, match="do not match the teacher"):
        teacher.update(nn.Sequential(nn.Linear(4, 3)))


def test_state_dict_resumes_exactly():
    torch.manual_seed(3)
    student = net()
    teacher = EMATeacher(student, decay=0.9)
    for _ in range(3):
        perturb(student)
        teacher.update(student)
    resumed = EMATeacher(net(), decay=0.9)
    resumed.load_state_dict(teacher.state_dict())
    assert int(resumed.num_updates) == 3
    for _ in range(2):
        perturb(student)
        teacher.update(student)
        resumed.update(student)
    for a, b in zip(teacher.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(net(), decay=1.5)
    with pytest.raises(ValueError, match="buffers must be"):
        EMATeacher(net(), buffers="sync")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="student must be an nn.Module"):
        EMATeacher("resnet")  # type: ignore[arg-type]


class _Buffers(torch.nn.Module):
    """A parameter and buffers of three dtypes, one of them 0-d, as in BatchNorm models."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3))
        self.register_buffer("stat", torch.zeros(5))
        self.register_buffer("low", torch.zeros(3, dtype=torch.float16))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))


def test_copied_buffers_of_several_dtypes_take_one_bitwise_copy():
    """With buffers copied, buffers of several dtypes are copied by one _foreach_copy_ through
    integer views of their bytes: every value arrives bit for bit (a NaN's payload, -0.0, an
    int64 beyond float precision), and the teacher's buffers stay its own tensors."""
    from crckd_losses.teacher import _as_one_copy_group

    student = _Buffers()
    teacher = EMATeacher(student, buffers="copy")
    nan_payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)
    student.stat.copy_(torch.tensor([1.5, -0.0, float("inf"), 3e-39, 0.0]))
    student.stat[4] = nan_payload[0]
    student.low.copy_(torch.tensor([1e-7, -2.0, 65504.0], dtype=torch.float16))
    student.count.fill_(2**53 + 1)
    teacher.update(student)
    for name in ("stat", "low", "count"):
        got, want = getattr(teacher.module, name), getattr(student, name)
        assert got.dtype == want.dtype and got.data_ptr() != want.data_ptr()
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
    plan = teacher._plan(student)
    assert len(plan.copy_groups) == 1 and plan.copy_groups[0][0][0].dtype == torch.int16
    # a buffer that is not contiguous keeps the groups per dtype
    a, b = torch.zeros(4, 2).t(), torch.zeros(4, 2).t()
    groups = [([a], [b]), ([torch.zeros((), dtype=torch.long)], [torch.ones((), dtype=torch.long)])]
    assert _as_one_copy_group(groups) is groups


def test_defaults():
    """The documented defaults: decay 0.99 with warm-up, buffers averaged, eval mode."""
    teacher = EMATeacher(net())
    assert (teacher.decay, teacher.warmup, teacher.buffers_mode, teacher.train_mode) == \
        (0.99, True, "average", False)
    assert not teacher.module.training


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_a_student_cast_after_the_teacher_was_built_is_refused(buffers):
    """One copy group (float buffers averaged, the long counter copied) or two (all buffers
    copied, float and long): a student cast to float64 after the teacher was built raises the
    same error, naming the tensor and both dtypes, and changes nothing."""
    student = net()
    teacher = EMATeacher(student, buffers=buffers)
    before = [t.clone() for t in teacher.state_dict().values()]
    student.double()
    with pytest.raises(ValueError, match=r"student's 0\.weight is torch\.float64 but the "
                                         r"teacher's is torch\.float32"):
        teacher.update(student)
    for a, b in zip(before, teacher.state_dict().values()):
        assert torch.equal(a, b)
    teacher.double()
    teacher.update(student)
    assert int(teacher.num_updates) == 1


def test_a_decay_of_one_is_allowed_and_keeps_the_teacher():
    """decay=1 (closed at 1): without warm-up the teacher never moves from its copy."""
    student = net()
    teacher = EMATeacher(student, decay=1.0, warmup=False)
    before = [p.clone() for p in teacher.module.parameters()]
    perturb(student)
    teacher.update(student)
    for a, b in zip(before, teacher.module.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(student, decay=1.5)
