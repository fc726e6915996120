"""EMATeacher: the mean teacher of method §2, an exponential moving average of the student."""

from __future__ import annotations

import copy
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ._checks import check_choice, check_unit_interval

BufferMode = Literal["copy", "average", "leave"]
BUFFER_MODES: tuple[BufferMode, ...] = ("copy", "average", "leave")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a ``DistributedDataParallel``/``DataParallel`` wrapper or a
    ``torch.compile`` result (any nesting of them).

    Args:
        model: a module, possibly wrapped.

    Returns:
        The innermost module.
    """
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ) and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


class EMATeacher(nn.Module):
    r"""Mean teacher: a deep copy of the student, moved towards it after each optimiser step.

    At update ``t = 0, 1, 2, ...``:
    :math:`\alpha_t = \min(1 - 1/(t+1), \alpha)` (with ``warmup``, else :math:`\alpha`) and
    :math:`\theta_T \leftarrow \alpha_t \theta_T + (1-\alpha_t)\theta_S`, in one
    ``torch._foreach_lerp_`` over all parameters. At ``t = 0`` the teacher becomes a copy of the
    student. The teacher never receives gradients.

    Args:
        student: the student model; may be wrapped in DDP or compiled (the plain module inside
            is copied and read).
        decay: :math:`\alpha` (0.99 in the paper).
        warmup: use :math:`\alpha_t` above; ``False`` uses :math:`\alpha` from the first step.
        buffers: what happens to buffers (BatchNorm statistics) at each update:
            ``"average"`` (default) applies the same EMA to floating-point buffers and copies
            the rest (timm's ``ModelEmaV3``), so the statistics match the averaged weights;
            ``"copy"`` takes the student's current statistics (ignite's ``EMAHandler``), which
            can make the teacher far worse than its student (see the guide on choosing
            hyperparameters); ``"leave"`` keeps the teacher's own (the released code's
            behaviour, with ``train_mode=True``).
        train_mode: ``True`` keeps the teacher in train mode, so its BatchNorm uses batch
            statistics (the released code); ``False`` keeps it in eval mode. Calls to
            ``.train()``/``.eval()`` on this wrapper do not change it.

    Attributes:
        module: the teacher network.
        num_updates: 0-d long buffer, the step count ``t``; saved in ``state_dict``.

    Examples:
        >>> student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> teacher = EMATeacher(student, decay=0.99)
        >>> teacher.update(student)  # after each optimiser step
        >>> int(teacher.num_updates)
        1
        >>> teacher(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    num_updates: torch.Tensor

    def __init__(
        self,
        student: nn.Module,
        decay: float = 0.99,
        warmup: bool = True,
        buffers: BufferMode = "average",
        train_mode: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        self.decay = check_unit_interval("decay", decay, closed_high=True)
        self.warmup = bool(warmup)
        self.buffers_mode: BufferMode = check_choice(  # type: ignore[assignment]
            "buffers", buffers, BUFFER_MODES)
        self.train_mode = bool(train_mode)
        self.module = copy.deepcopy(unwrap_model(student))
        self.module.requires_grad_(False)
        self.module.train(self.train_mode)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # A host mirror of num_updates, so that the decay needs no device read per step; read
        # from the buffer once after a load.
        self._step: int | None = 0

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay}, warmup={self.warmup}, buffers={self.buffers_mode!r}, "
            f"train_mode={self.train_mode}"
        )

    def train(self, mode: bool = True) -> EMATeacher:
        """Keeps the teacher's own mode (``train_mode``); the wrapper's flag follows ``mode``."""
        self.training = mode
        self.module.train(self.train_mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the teacher."""
        return self.module(*args, **kwargs)

    def current_decay(self) -> float:
        r""":math:`\alpha_t` for the next update."""
        if not self.warmup:
            return self.decay
        if self._step is None:
            self._step = int(self.num_updates)  # once, after a load
        return min(1.0 - 1.0 / (self._step + 1), self.decay)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student`` (call it after ``optimizer.step()``).

        Args:
            student: the same architecture the teacher was built from (wrapped or not).
        """
        plan = self._plan(unwrap_model(student))
        weight = 1.0 - self.current_decay()
        if plan.lerp_teacher:
            torch._foreach_lerp_(plan.lerp_teacher, plan.lerp_student, weight)
        for teacher_group, student_group in plan.copy_groups:
            torch._foreach_copy_(teacher_group, student_group)
        self.num_updates.add_(1)
        if self._step is not None:
            self._step += 1

    def _plan(self, source: nn.Module) -> _UpdatePlan:
        """Which teacher tensors to lerp and which to copy; built once per student module."""
        cached = self.__dict__.get("_cached_plan")
        if cached is not None and cached[0] is source:
            return cached[1]  # type: ignore[no-any-return]
        pairs = self._pairs(
            list(self.module.named_parameters()), list(source.named_parameters()), "parameters"
        )
        if self.buffers_mode != "leave":
            buffer_pairs = self._pairs(
                list(self.module.named_buffers()), list(source.named_buffers()), "buffers"
            )
        else:
            buffer_pairs = []
        plan = _UpdatePlan([], [], [])
        # Copies go in one _foreach_copy_ per dtype: a list of mixed dtypes (float statistics
        # with the long num_batches_tracked) leaves the fused multi-tensor kernel on a GPU.
        # Where there are several, _as_one_copy_group turns them into one group of raw views.
        copies: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        average_buffers = self.buffers_mode == "average"
        for pair_list, averaged in ((pairs, True), (buffer_pairs, average_buffers)):
            for t, s in pair_list:
                if averaged and t.is_floating_point():
                    plan.lerp_teacher.append(t)
                    plan.lerp_student.append(s)
                else:
                    group = copies.setdefault(t.dtype, ([], []))
                    group[0].append(t)
                    group[1].append(s)
        plan.copy_groups.extend(_as_one_copy_group(list(copies.values())))
        self.__dict__["_cached_plan"] = (source, plan)
        return plan

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._step = None  # read num_updates again, once

    def _apply(self, fn: Any, recurse: bool = True) -> EMATeacher:
        # Moving or casting the teacher may replace its tensors: rebuild the plan next time.
        self.__dict__.pop("_cached_plan", None)
        return super()._apply(fn, recurse)  # type: ignore[no-any-return, no-untyped-call, unused-ignore]

    @staticmethod
    def _pairs(
        teacher: list[tuple[str, torch.Tensor]],
        student: list[tuple[str, torch.Tensor]],
        kind: str,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(teacher) != len(student) or any(
            tn != sn or t.shape != s.shape for (tn, t), (sn, s) in zip(teacher, student)
        ):
            raise ValueError(
                f"student {kind} do not match the teacher's: update() needs the architecture "
                "the teacher was copied from"
            )
        for (name, t), (_, s) in zip(teacher, student):
            if t.dtype != s.dtype:
                raise ValueError(
                    f"the student's {name} is {s.dtype} but the teacher's is {t.dtype}: cast "
                    f"the teacher too (teacher.to({s.dtype})) or build it after the cast"
                )
        return [(t, s) for (_, t), (_, s) in zip(teacher, student)]


#: Integer dtypes by size in bytes: the raw views a bitwise copy goes through.
_RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_one_copy_group(
    groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Copy groups of several dtypes as one group of integer views of the same bytes, so that
    one ``_foreach_copy_`` copies them all: a copy moves bits, so viewing both sides as the
    same integer type copies every value exactly (NaN payloads and signed zeros too). With
    buffers copied, a BatchNorm model then takes one copy call, as with buffers averaged,
    instead of one per dtype. Groups stay as they are where a tensor is not contiguous or
    the devices differ."""
    pairs = [(t, s) for teacher, student in groups for t, s in zip(teacher, student)]
    if len(groups) < 2 or len({t.device for t, _ in pairs} | {s.device for _, s in pairs}) != 1 \
            or not all(t.is_contiguous() and s.is_contiguous() for t, s in pairs):
        return groups
    raw = _RAW_DTYPES[min(t.element_size() for t, _ in pairs)]
    return [([t.view(-1).view(raw) for t, _ in pairs], [s.view(-1).view(raw) for _, s in pairs])]


class _UpdatePlan(NamedTuple):
    lerp_teacher: list[torch.Tensor]
    lerp_student: list[torch.Tensor]
    copy_groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]]
