"""Stateless CRCKD math: every equation of the method as a pure function.

Notation (shapes in the docstrings use it): ``B`` batch size, ``N`` bank rows (training-set
size), ``C`` classes, ``d`` embedding size, ``P`` positives and ``K`` negatives per anchor,
``tau`` temperature.

All losses work in log space (``logsigmoid``, ``log_softmax``) and reduce in float32 or wider,
so they stay finite under float16/bfloat16 autocast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F

from . import _fused
from ._cache import built_once
from ._checks import (
    check_choice,
    check_finite,
    check_float,
    check_index,
    check_nonempty,
    check_positive_float,
    check_positive_int,
    check_range,
    check_reduction,
    check_same_device,
    reduce,
)

__all__ = [
    "DENSE_PATH_FACTOR",
    "SCORE_PATHS",
    "ScorePath",
    "categorical_relation_loss",
    "choose_score_path",
    "class_centroids",
    "class_guided_contrastive_loss",
    "consistency_kl",
    "contrastive_scores",
    "estimate_log_normalizer",
    "nce_loss",
    "sigmoid_rampup",
]

ScorePath = Literal["auto", "dense", "gather", "triton"]
SCORE_PATHS: tuple[ScorePath, ...] = ("auto", "dense", "gather", "triton")

#: The dense path (one ``B x N`` matmul, then a gather of the sampled columns) is taken while
#: ``N <= DENSE_PATH_FACTOR * (P + K)``. Past that, gathering the ``B x (P+K) x d`` rows costs
#: less than multiplying against the whole bank. ``benchmarks/run.py`` measures the crossover:
#: on a 2-core CPU (float32, B=64, d=128) dense stays faster over the whole measured range, up
#: to N = 64 (P+K) (0.55-0.71x gather's time there), but its peak memory (about 3 B N floats)
#: reaches the gather path's (B (P+K) d floats) at about d/3 (P+K); at 32 dense is 2.9-4.6x
#: faster than gather and no larger in memory.
DENSE_PATH_FACTOR = 32


def _reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def choose_score_path(bank_size: int, samples_per_anchor: int) -> Literal["dense", "gather"]:
    """The path :func:`contrastive_scores` takes for ``path="auto"``.

    Args:
        bank_size: ``N``, rows in the bank.
        samples_per_anchor: ``P + K``, columns of the sampled index matrix.

    Returns:
        ``"dense"`` when ``N <= DENSE_PATH_FACTOR * (P + K)``, else ``"gather"``.

    Examples:
        >>> choose_score_path(7012, 4116)
        'dense'
        >>> choose_score_path(1_000_000, 4116)
        'gather'
    """
    return "dense" if bank_size <= DENSE_PATH_FACTOR * samples_per_anchor else "gather"


def _gather_rows(memory: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = memory.index_select(0, index.flatten()).view(*index.shape, memory.shape[1])
    return rows.to(dtype)


class _GatheredDot(torch.autograd.Function):
    """``u[b, j] = anchor[b] . memory[index[b, j]]`` without keeping the gathered block.

    The ``B x (P+K) x d`` block is built in forward, used and freed, then rebuilt in backward,
    so it never lives across the two passes. ``memory`` is a constant (no gradient).
    """

    @staticmethod
    def forward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx,
        anchor: torch.Tensor,
        memory: torch.Tensor,
        index: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(memory, index)
        rows = _gather_rows(memory, index, anchor.dtype)
        return torch.bmm(rows, anchor.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None]:
        memory, index = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None
        rows = _gather_rows(memory, index, grad.dtype)
        grad_anchor = torch.bmm(grad.unsqueeze(1), rows).squeeze(1)
        return grad_anchor, None, None


def contrastive_scores(
    anchor: torch.Tensor,
    memory: torch.Tensor,
    sample_indices: torch.Tensor,
    temperature: float = 0.07,
    path: ScorePath = "auto",
) -> torch.Tensor:
    r"""Scores of anchors against sampled bank rows: :math:`u_{ij} = g_i \cdot M[idx_{ij}]/\tau`.

    Args:
        anchor: ``[B, d]`` float, the anchors ``g`` (L2-normalised embeddings).
        memory: ``[N, d]`` float, the other side's bank (read as a constant).
        sample_indices: ``[B, P+K]`` long, rows of ``memory`` per anchor.
        temperature: ``tau > 0``.
        path: ``"dense"`` multiplies the batch against the whole bank (``B x N``) and gathers
            the sampled columns; ``"gather"`` gathers ``B x (P+K) x d`` rows first. ``"auto"``
            picks by :func:`choose_score_path`. Both give the same values. ``"triton"``
            selects the Triton kernels of the CCD losses; scores alone then gather.

    Returns:
        ``[B, P+K]`` scores, in the matmul's dtype (float16/bfloat16 under autocast).

    Examples:
        >>> g = F.normalize(torch.randn(4, 8), dim=1)
        >>> bank = F.normalize(torch.randn(100, 8), dim=1)
        >>> idx = torch.randint(0, 100, (4, 6))
        >>> contrastive_scores(g, bank, idx).shape
        torch.Size([4, 6])
    """
    _check_score_args(anchor, memory, sample_indices, temperature, path)
    return _scores(anchor, memory, sample_indices.long(), temperature, path)


def _check_score_args(anchor: torch.Tensor, memory: torch.Tensor, sample_indices: torch.Tensor,
                      temperature: float, path: str) -> None:
    check_float("anchor", anchor, 2)
    check_float("memory", memory, 2)
    check_index("sample_indices", sample_indices, 2)
    check_nonempty("anchor", anchor)
    check_same_device(anchor=anchor, memory=memory, sample_indices=sample_indices)
    if anchor.shape[1] != memory.shape[1]:
        raise ValueError(
            f"anchor has embedding size {anchor.shape[1]} but memory has {memory.shape[1]}"
        )
    if sample_indices.shape[0] != anchor.shape[0]:
        raise ValueError(
            f"sample_indices must have one row per anchor ({anchor.shape[0]}), "
            f"got shape {tuple(sample_indices.shape)}"
        )
    check_choice("path", path, SCORE_PATHS)
    check_positive_float("temperature", temperature)
    check_range("sample_indices", sample_indices, memory.shape[0])


def _scores(
    anchor: torch.Tensor,
    memory: torch.Tensor,
    sample_indices: torch.Tensor,
    temperature: float,
    path: ScorePath,
) -> torch.Tensor:
    """:func:`contrastive_scores` without its checks, for callers that made them."""
    # 1/tau goes on the B x d side, the smallest tensor in the product.
    return _raw_scores(anchor * (1.0 / temperature), memory, sample_indices, path)


def _score_dtype(anchor: torch.Tensor, memory: torch.Tensor) -> torch.dtype:
    """The matmul's dtype: the autocast dtype on accelerators; on a CPU, float32 at least,
    since CPUs without bfloat16 matrix units multiply float32 faster than bfloat16."""
    device = anchor.device.type
    dtype = anchor.dtype if anchor.dtype == memory.dtype else torch.promote_types(
        anchor.dtype, memory.dtype)
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if device == "cpu":
            dtype = torch.float32
    return dtype


def _raw_scores(
    anchor: torch.Tensor,
    memory: torch.Tensor,
    sample_indices: torch.Tensor,
    path: ScorePath,
) -> torch.Tensor:
    """``[B, P+K]`` dot products ``anchor[b] . memory[idx[b, j]]`` (no temperature)."""
    return _paired_raw_scores([anchor], [memory], sample_indices, path)[0]


def _paired_raw_scores(
    anchors: list[torch.Tensor],
    memories: list[torch.Tensor],
    sample_indices: torch.Tensor,
    path: ScorePath,
) -> torch.Tensor:
    """``[D, B, P+K]``: the dot products of ``anchors[k]`` against ``memories[k]`` at the same
    sampled rows, for ``D`` directions. On the dense path the ``D`` score matrices are
    stacked and gathered once (one gather, and one scatter in backward, for all)."""
    if path == "triton":  # the Triton kernels compute the CCD pair; scores alone gather
        path = "gather"
    if path == "auto":
        path = choose_score_path(memories[0].shape[0], sample_indices.shape[1])
    dtype = _score_dtype(anchors[0], memories[0])
    with torch.autocast(anchors[0].device.type, enabled=False):
        if path == "dense":
            full = []
            for anchor, memory in zip(anchors, memories):
                a = anchor if anchor.dtype == dtype else anchor.to(dtype)
                bank = memory.detach()
                full.append(a @ (bank if bank.dtype == dtype else bank.to(dtype)).t())
            stacked = full[0].unsqueeze(0) if len(full) == 1 else torch.stack(full)
            return stacked.gather(2, sample_indices.expand(len(full), *sample_indices.shape))
        out = [_GatheredDot.apply(a if a.dtype == dtype else a.to(dtype), m.detach(),
                                  sample_indices) for a, m in zip(anchors, memories)]
        return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)


def estimate_log_normalizer(scores: torch.Tensor, bank_size: int) -> torch.Tensor:
    r""":math:`\log Z` with :math:`Z = N \cdot \mathrm{mean}(e^{u})` over all scores (method §4).

    Computed as ``log N + logsumexp(u) - log(numel)``, so ``exp(u)`` is never formed.

    Args:
        scores: ``[B, P+K]`` scores ``u`` (any float dtype).
        bank_size: ``N``.

    Returns:
        A 0-d float32 (float64 for float64 input) tensor, detached.

    Examples:
        >>> u = torch.zeros(2, 3)
        >>> float(estimate_log_normalizer(u, 10).exp())
        10.0
    """
    check_positive_int("bank_size", bank_size)
    if scores.numel() == 0:
        raise ValueError("scores is empty; cannot estimate the normalisation constant")
    u = scores.detach().to(_reduction_dtype(scores.dtype)).flatten()
    return math.log(bank_size) + torch.logsumexp(u, 0) - math.log(u.numel())


def nce_loss(
    scores: torch.Tensor,
    log_normalizer: torch.Tensor | float,
    noise_constant: float,
    num_positives: int,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""The NCE critic loss of one CCD direction (method §4).

    With :math:`v = u - \log Z - \log c`, :math:`\log h = \mathrm{logsigmoid}(v)` and
    :math:`\log(1-h) = \mathrm{logsigmoid}(-v)`:

    .. math::
        \ell_i = -\Big[\tfrac{1}{P}\sum_{p<P}\log h(x_{ip}) + \sum_{k\ge P}\log(1-h(x_{ik}))\Big]

    Args:
        scores: ``[B, P+K]`` scores ``u``; the first ``P`` columns are positives.
        log_normalizer: :math:`\log Z`, a float or 0-d tensor.
        noise_constant: :math:`c = K / N`.
        num_positives: ``P``.
        reduction: ``"mean"`` (the paper's :math:`1/B` sum), ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        The reduced loss in float32 (float64 for float64 input).

    Examples:
        >>> u = torch.tensor([[2.0, 0.0, -1.0]])
        >>> nce_loss(u, log_normalizer=0.0, noise_constant=1.0, num_positives=1).shape
        torch.Size([])
    """
    check_float("scores", scores, 2)
    check_nonempty("scores", scores)
    check_positive_int("num_positives", num_positives)
    check_positive_float("noise_constant", noise_constant)
    check_reduction(reduction)
    if scores.shape[1] <= num_positives:
        raise ValueError(
            f"scores has {scores.shape[1]} columns; need more than num_positives={num_positives} "
            "so that at least one negative remains"
        )
    return reduce(_nce_per_sample(scores, log_normalizer, noise_constant, num_positives), reduction)


def _nce_per_sample(
    scores: torch.Tensor,
    log_normalizer: torch.Tensor | float,
    noise_constant: float,
    num_positives: int,
) -> torch.Tensor:
    """``[B]`` NCE losses of one direction, without checks."""
    dtype = _reduction_dtype(scores.dtype)
    log_z = torch.as_tensor(log_normalizer, dtype=dtype, device=scores.device).reshape(1)
    bias = _nce_bias(log_z, noise_constant, scores.shape[1], num_positives, dtype)
    return _nce_rows(scores.unsqueeze(0), 1.0, bias, num_positives)[0]


def _nce_bias(log_normalizer: torch.Tensor, noise_constant: float, width: int,
              num_positives: int, dtype: torch.dtype) -> torch.Tensor:
    r"""``[D, 1, P+K]``: :math:`-\mathrm{sign} \cdot (\log Z + \log c)` per direction and
    column, the part of :func:`_nce_rows`' argument that does not depend on the scores."""
    _, neg_sign, _ = _nce_columns(width, num_positives, 1.0, dtype, log_normalizer.device)
    shift = log_normalizer.to(dtype) + math.log(noise_constant)
    return shift.view(-1, 1, 1) * neg_sign


def _nce_rows(
    raw: torch.Tensor,
    scale: float,
    bias: torch.Tensor,
    num_positives: int,
    reduction: str = "none",
    owned: bool = False,
) -> torch.Tensor:
    r"""``[D, B]`` NCE losses of ``D`` directions at once (``[D]`` for ``reduction`` "mean" or
    "sum"), without checks. ``owned``: ``raw`` is a temporary of the caller's that may be
    overwritten.

    ``raw`` is ``[D, B, P+K]`` with scores :math:`u = \mathrm{scale} \cdot \mathrm{raw}`;
    ``bias`` is :func:`_nce_bias`. One fused pass: :math:`\log h = \mathrm{logsigmoid}(v)` for
    positives and :math:`\log(1-h) = \mathrm{logsigmoid}(-v)` for negatives is
    ``logsigmoid(sign * v)``, with ``sign * v = (sign * scale) * raw - sign * (log Z + log c)``
    in one ``addcmul``; the weighted sum over columns is one matmul.
    """
    dtype = bias.dtype
    directions, batch, width = raw.shape
    signed_scale, _, neg_weight = _nce_columns(width, num_positives, scale, dtype, raw.device)
    x = raw if raw.dtype == dtype else raw.to(dtype)
    cpu = _cpu_logsigmoid(x)
    if cpu and (owned or x is not raw):
        # The CPU log-sigmoid needs two more buffers than F.logsigmoid while it runs; writing
        # the scores in place (they are this function's own) keeps the peak where it was.
        signed = x.mul_(signed_scale).add_(bias)
    else:
        signed = torch.addcmul(bias, x, signed_scale)
    if reduction == "none":
        rows, weight = directions * batch, neg_weight
    else:
        # The batch reduction folded into the column weights: one matrix-vector product.
        rows = directions
        weight = _tiled(neg_weight, num_positives, batch,
                        1.0 / batch if reduction == "mean" else 1.0)
    with torch.autocast(raw.device.type, enabled=False):  # keep the reduction in `dtype`
        logsig = _CPULogSigmoid.apply(signed) if cpu else F.logsigmoid(signed)
        out = torch.mv(logsig.view(rows, -1), weight)
    return out.view(directions, batch) if reduction == "none" else out


#: Whether float32 log-sigmoids on a CPU take :class:`_CPULogSigmoid` (see there). The
#: operator counts of the benchmarks turn it off to count the step an accelerator runs.
_CPU_VECTORISED_LOGSIGMOID = True


def _cpu_logsigmoid(x: torch.Tensor) -> bool:
    """Whether the log-sigmoid of ``x`` takes :class:`_CPULogSigmoid` instead of
    ``F.logsigmoid``: float32 on a CPU, outside ``torch.compile`` (inductor's own code is
    vectorised)."""
    return _CPU_VECTORISED_LOGSIGMOID and x.device.type == "cpu" and \
        x.dtype == torch.float32 and not torch.compiler.is_compiling()


class _CPULogSigmoid(torch.autograd.Function):
    r"""``logsigmoid`` from vectorised operators, for CPUs.

    ``F.logsigmoid`` computes :math:`\min(x, 0) - \mathrm{log1p}(e^{-|x|})`, and torch's CPU
    ``log1p`` is a scalar loop: at the paper's CCD sizes (2 x 64 x 4116 values) it took 2.6 ms
    against 0.2 ms for ``log`` on the project's AVX-512 CPU, a third of the whole CCD step.
    Here :math:`\mathrm{log1p}(t)` for :math:`t = e^{-|x|} \in (0, 1]` is
    :math:`\log u - ((u - 1) - t) / u` with :math:`u = 1 + t` (the correction restores what
    rounding :math:`u` lost; :math:`u - 1` and its difference with :math:`t` are exact), and
    the backward is :math:`\sigma(-x)` times the incoming gradient. Both are within 2 ulp of
    float64 over :math:`x \in [-120, 120]` (``tests/crckd_losses/test_functional.py``), as torch's own are;
    a gradient below about 3e-39 (``x`` above about 88) is flushed to zero.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        # Three buffers of x's size, as F.logsigmoid holds (its output and its buffer).
        t, u, err = (torch.empty_like(x) for _ in range(3))
        ctx.save_for_backward(x)
        return _logsigmoid_into(x, t, u, err)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = ctx.saved_tensors[0]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # a double backward records this: out of place
            return torch.sigmoid(-x) * grad
        return x.neg().sigmoid_().mul_(grad)


def _logsigmoid_into(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, err: torch.Tensor
                     ) -> torch.Tensor:
    """:class:`_CPULogSigmoid`'s forward into three given buffers of ``x``'s shape; the
    result is written into ``u``, which is returned."""
    torch.abs(x, out=t).neg_().exp_()  # t = exp(-|x|)
    torch.add(t, 1.0, out=u)
    torch.sub(u, 1.0, out=err).sub_(t).div_(u)  # ((u - 1) - t) / u
    torch.log(u, out=t).sub_(err)  # log1p(t); t is not needed any more
    return torch.clamp(x, max=0.0, out=u).sub_(t)


_TILED: dict[tuple[int, int, int, float, torch.dtype, torch.device], torch.Tensor] = {}


def _tiled(weight: torch.Tensor, num_positives: int, times: int, scale: float) -> torch.Tensor:
    """``weight`` (the column weights of :func:`_nce_columns`) repeated ``times`` times, times
    ``scale``; built once per setting. The key is the setting, not the tensor's ``id``, which
    ``torch.compile`` cannot trace."""
    key = (weight.numel(), num_positives, times, scale, weight.dtype, weight.device)
    return built_once(_TILED, key, lambda: weight.repeat(times) * scale)


_COLUMNS: dict[tuple[int, int, float, torch.dtype, torch.device],
               tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _nce_columns(width: int, num_positives: int, scale: float, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-column constants of :func:`_nce_rows`: ``sign * scale``, ``-sign`` and ``-weight``
    (sign +1 for positives, -1 for negatives; weight 1/P for positives, 1 for negatives).
    They never change from step to step, so eager code builds them once per setting."""

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sign = torch.full((width,), -1.0, dtype=dtype, device=device)
        sign[:num_positives] = 1.0
        weight = torch.ones(width, dtype=dtype, device=device)
        weight[:num_positives] = 1.0 / num_positives  # set in `dtype`, not rounded first
        return sign * scale, -sign, -weight

    return built_once(_COLUMNS, (width, num_positives, scale, dtype, device), build)


def class_guided_contrastive_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    sample_indices: torch.Tensor,
    num_positives: int,
    temperature: float = 0.07,
    student_log_normalizer: torch.Tensor | float | None = None,
    teacher_log_normalizer: torch.Tensor | float | None = None,
    reduction: str = "mean",
    path: ScorePath = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""CCD, both directions: :math:`(L_S, L_T)`; :math:`L_{CCD} = L_S + L_T` (method §4).

    :math:`L_S` scores student anchors against the teacher bank, :math:`L_T` teacher anchors
    against the student bank, both over the same sampled rows.

    Args:
        student_emb: ``[B, d]`` student embeddings ``g_S`` (trainable).
        teacher_emb: ``[B, d]`` teacher embeddings ``g_T`` (the teacher head is trainable
            through :math:`L_T`).
        student_memory: ``[N, d]`` student bank ``M_S`` (constant).
        teacher_memory: ``[N, d]`` teacher bank ``M_T`` (constant).
        sample_indices: ``[B, P+K]`` long: column 0 the anchor's own row, columns ``1..P-1``
            same-class rows, then ``K`` other-class rows.
        num_positives: ``P``.
        temperature: ``tau``.
        student_log_normalizer: :math:`\log Z` for :math:`L_S`; ``None`` estimates it from these
            scores (:func:`estimate_log_normalizer`), which is what a first call does.
        teacher_log_normalizer: :math:`\log Z` for :math:`L_T`; ``None`` as above.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        path: see :func:`contrastive_scores`; ``"triton"`` computes both directions,
            forward and backward, in hand-written Triton kernels (CUDA tensors; see
            :class:`~crckd_losses.ClassGuidedContrastiveLoss`).

    Returns:
        ``(L_S, L_T)``.

    Examples:
        >>> gs, gt = (F.normalize(torch.randn(4, 8), dim=1) for _ in range(2))
        >>> ms, mt = (F.normalize(torch.randn(50, 8), dim=1) for _ in range(2))
        >>> idx = torch.randint(0, 50, (4, 2 + 10))
        >>> l_s, l_t = class_guided_contrastive_loss(gs, gt, ms, mt, idx, num_positives=2)
        >>> bool(l_s > 0) and bool(l_t > 0)
        True
    """
    check_float("student_emb", student_emb, 2)
    check_float("teacher_emb", teacher_emb, 2)
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"student_emb and teacher_emb must have one shape, got {tuple(student_emb.shape)} "
            f"and {tuple(teacher_emb.shape)}"
        )
    if student_memory.shape != teacher_memory.shape:
        raise ValueError(
            f"student_memory and teacher_memory must have one shape, got "
            f"{tuple(student_memory.shape)} and {tuple(teacher_memory.shape)}"
        )
    check_positive_int("num_positives", num_positives)
    check_finite("student_emb", student_emb)
    check_finite("teacher_emb", teacher_emb)
    bank_size = student_memory.shape[0]
    num_negatives = sample_indices.shape[1] - num_positives
    if num_negatives < 1:
        raise ValueError(
            f"sample_indices has {sample_indices.shape[1]} columns; need num_positives="
            f"{num_positives} plus at least one negative"
        )
    _check_score_args(student_emb, teacher_memory, sample_indices, temperature, path)
    check_reduction(reduction)

    def bias_of(raw: torch.Tensor, scale: float, noise: float) -> torch.Tensor:
        given = (student_log_normalizer, teacher_log_normalizer)
        dtype = _reduction_dtype(raw.dtype)
        log_z = torch.stack([
            estimate_log_normalizer(raw[k] * scale, bank_size) if given[k] is None
            else torch.as_tensor(given[k], dtype=dtype, device=raw.device).reshape(())
            for k in range(2)
        ]).to(dtype)
        return _nce_bias(log_z, noise, raw.shape[2], num_positives, dtype)

    both = _ccd_pair(student_emb, teacher_emb, student_memory, teacher_memory,
                     sample_indices.long(), num_positives, temperature, path, bias_of,
                     reduction)
    return both[0], both[1]


#: ``bias_of(raw, scale, noise)``: the ``[2, 1, P+K]`` :func:`_nce_bias` of both directions,
#: given their ``[2, B, P+K]`` dot products, ``1/tau`` and the noise constant.
BiasOf = Callable[[torch.Tensor, float, float], torch.Tensor]


def _ccd_pair(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    sample_indices: torch.Tensor,
    num_positives: int,
    temperature: float,
    path: ScorePath,
    bias_of: BiasOf,
    reduction: str,
) -> torch.Tensor:
    r"""Both CCD directions from checked arguments (long ``sample_indices``): ``[2]``
    (:math:`L_S, L_T`), or ``[2, B]`` with ``reduction="none"``.

    The dot products of each direction are stacked into one ``[2, B, P+K]`` tensor, so the
    NCE critic, its reduction and their backward run once for both. Shared by
    :func:`class_guided_contrastive_loss` and :class:`~crckd_losses.ClassGuidedContrastiveLoss`,
    which keeps its own :math:`Z`."""
    scale = 1.0 / temperature
    noise = (sample_indices.shape[1] - num_positives) / student_memory.shape[0]
    if path == "triton" and not torch.compiler.is_compiling():
        dtype = _check_triton(student_emb, teacher_memory)
        triton_out: torch.Tensor = _TritonNCE.apply(
            student_emb.to(dtype).contiguous(), teacher_emb.to(dtype).contiguous(),
            teacher_memory.detach().contiguous(), student_memory.detach().contiguous(),
            sample_indices.contiguous(), scale, noise, num_positives, bias_of, reduction)
        return triton_out
    if path in ("auto", "triton"):  # "triton" inside torch.compile: inductor fuses its own
        path = choose_score_path(student_memory.shape[0], sample_indices.shape[1])
    if path == "dense" and _cpu_dense_pair(student_emb, teacher_memory):
        f32 = torch.float32
        out: torch.Tensor = _CPUDenseNCE.apply(
            student_emb.to(f32), teacher_emb.to(f32), teacher_memory.detach().to(f32),
            student_memory.detach().to(f32), sample_indices, scale, noise, num_positives,
            bias_of, reduction)
        return out
    raw = _paired_raw_scores([student_emb, teacher_emb], [teacher_memory, student_memory],
                             sample_indices, path)
    return _nce_rows(raw, scale, bias_of(raw, scale, noise), num_positives, reduction,
                     owned=True)


#: Whether dense CCD on a CPU takes :class:`_CPUDenseNCE` (where :func:`_cpu_dense_pair`
#: allows); off, the same values come from the general operators (the benchmarks time both).
_CPU_DENSE_PAIR = True


def _cpu_dense_pair(anchor: torch.Tensor, memory: torch.Tensor) -> bool:
    """Whether both CCD directions take :class:`_CPUDenseNCE`: float32 scores (autocast
    included) on a CPU, outside ``torch.compile``, with the CPU log-sigmoid switched on."""
    return _CPU_DENSE_PAIR and _CPU_VECTORISED_LOGSIGMOID and anchor.device.type == "cpu" and \
        _score_dtype(anchor, memory) == torch.float32 and not torch.compiler.is_compiling()


#: Whether :class:`_CPUDenseNCE` may run its four matrix products through oneDNN (see
#: :func:`_cpu_gemm`); off, they are ``torch.mm`` (the benchmarks time both). Read when the
#: forward runs: its backward's products follow the same choice.
_CPU_ONEDNN_GEMM = True

#: :func:`_cpu_gemm` takes oneDNN from this many multiply-adds per product: below it, oneDNN's
#: larger fixed cost per call outweighs its faster kernel. The CCD section of ``benchmarks/``
#: times products on either side (16 x 64 x 500, 32 x 128 x 2000) through both.
_ONEDNN_MIN_MACS = 1 << 21

_ONEDNN_WORKS: list[bool] = []


def _onednn_works() -> bool:
    """Whether this torch build runs float32 matrix products through oneDNN's
    ``mkldnn::_linear_pointwise`` (the operator ``torch.compile`` uses for CPU linear layers),
    with the right values, for a plain and a transposed right-hand side. Probed once per
    process; any failure (no oneDNN in the build, an operator that changed) means no."""
    if not _ONEDNN_WORKS:
        works = False
        try:
            if torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call, unused-ignore]
                a = torch.arange(12, dtype=torch.float32).view(3, 4) / 7
                b = torch.arange(20, dtype=torch.float32).view(5, 4) / 3
                c = torch.arange(24, dtype=torch.float32).view(4, 6) / 5
                # b.t() reaches oneDNN as a plain weight, c as a transposed one.
                works = all(torch.allclose(_onednn_mm(x, w), x @ w)
                            for x, w in ((a, b.t()), (b, c)))
        except (AttributeError, RuntimeError, NotImplementedError):
            works = False
        _ONEDNN_WORKS.append(works)
    return _ONEDNN_WORKS[0]


def _takes_onednn(rows: int, inner: int, cols: int) -> bool:
    """Whether :func:`_cpu_gemm` runs a ``[rows, inner] @ [inner, cols]`` product through
    oneDNN (unless told not to)."""
    return rows * inner * cols >= _ONEDNN_MIN_MACS and _onednn_works()


def _cpu_gemm(a: torch.Tensor, b: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    r"""``a @ b`` for float32 CPU matrices, through oneDNN where it works and the product is
    large enough (:data:`_ONEDNN_MIN_MACS`), else ``torch.mm``.

    Why: torch's float32 ``mm`` on CPU is MKL's ``sgemm``; on the benchmarks' AMD EPYC
    (Zen 5, AVX-512) oneDNN's kernels ran CCD's products about twice as fast (the CCD
    section's "CPU matrix products" table times them alone and inside the CCD step). Same
    float32 inputs and outputs; the sums may be accumulated in another order, so results may
    differ from ``torch.mm``'s by float32 rounding. ``onednn=False`` always takes
    ``torch.mm``."""
    if onednn and _takes_onednn(a.shape[0], a.shape[1], b.shape[1]):
        return _onednn_mm(a, b)
    return torch.mm(a, b)


def _onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` through oneDNN's ``mkldnn::_linear_pointwise``, whatever the size; the caller
    knows that oneDNN works (:func:`_onednn_works`)."""
    weight = b.t()  # linear multiplies by its weight's transpose
    if not (weight.is_contiguous() or b.is_contiguous()):
        weight = weight.contiguous()
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        a.contiguous(), weight, None, "none", [], "")
    return out


class _CPUDenseNCE(torch.autograd.Function):
    r"""Both CCD directions on the dense path with the CPU log-sigmoid, forward and backward
    written out: the same operators as :func:`_paired_raw_scores` and :func:`_nce_rows` in
    the same order, with fewer and smaller buffers, and its four matrix products through
    :func:`_cpu_gemm`. With ``torch.mm`` products (small sizes, or oneDNN switched off) the
    losses and gradients are bit for bit those of the general path; with oneDNN's they differ
    by float32 rounding (``tests/crckd_losses/test_functional.py`` checks both).

    Where the general path allocates each intermediate afresh, this one gathers the sampled
    columns of both ``[B, N]`` products into one ``[2, B, P+K]`` tensor (no stack) and then
    allocates one workspace, which holds the log-sigmoid's temporaries and in backward is the
    target of the scatter. The scores' buffer becomes :math:`\sigma(-v)`, the only
    ``[2, B, P+K]`` tensor kept for backward. At the paper's sizes this cut the peak extra
    memory of CCD from 12.9 MB to 8.5 MB; the CCD table of ``benchmarks/`` times it beside
    the general path (the row ``dense, general operators``) and beside itself with
    ``torch.mm`` products (its own table, "CPU matrix products").

    A second-order gradient (``create_graph=True``) is taken through the general path,
    recomputed from the saved inputs.
    """

    @staticmethod
    def forward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx,
        anchor_s: torch.Tensor,
        anchor_t: torch.Tensor,
        memory_t: torch.Tensor,
        memory_s: torch.Tensor,
        index: torch.Tensor,
        scale: float,
        noise: float,
        num_positives: int,
        bias_of: BiasOf,
        reduction: str,
    ) -> torch.Tensor:
        batch, width = index.shape
        dense, sampled = 2 * batch * memory_t.shape[0], 2 * batch * width
        onednn = ctx.onednn = _CPU_ONEDNN_GEMM  # type: ignore[attr-defined]
        with torch.autocast("cpu", enabled=False):
            x = torch.empty(2, batch, width, dtype=torch.float32)
            for k, (anchor, memory) in enumerate(((anchor_s, memory_t), (anchor_t, memory_s))):
                torch.gather(_cpu_gemm(anchor, memory.t(), onednn), 1, index, out=x[k])
            # Allocated once both [B, N] products are freed: the peak stays that of writing
            # them into this workspace.
            ws = torch.empty(max(dense + sampled, 3 * sampled), dtype=torch.float32)
            bias = bias_of(x, scale, noise)
            signed_scale, _, neg_weight = _nce_columns(width, num_positives, scale,
                                                       torch.float32, x.device)
            x.mul_(signed_scale).add_(bias)
            # The CPU log-sigmoid, its temporaries in the workspace (full is spent).
            logsig = _logsigmoid_into(x, *(ws[k * sampled:(k + 1) * sampled].view_as(x)
                                           for k in range(3)))
            if reduction == "none":
                out = torch.mv(logsig.view(2 * batch, -1), neg_weight).view(2, batch)
            else:
                weight = _tiled(neg_weight, num_positives, batch,
                                1.0 / batch if reduction == "mean" else 1.0)
                out = torch.mv(logsig.view(2, -1), weight)
            sigmoid_neg = x.neg_().sigmoid_()
        ctx.save_for_backward(sigmoid_neg, index, memory_t, memory_s, anchor_s, anchor_t, bias)
        # Scratch space, rewritten by every backward: kept off the saved tensors' version check.
        ctx.workspace = ws  # type: ignore[attr-defined]
        ctx.setting = (scale, num_positives, reduction)  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # a double backward: through the general path
            return _second_order(ctx, grad, "dense")
        sigmoid_neg, index, memory_t, memory_s, _, _, _ = \
            ctx.saved_tensors  # type: ignore[attr-defined]
        ws: torch.Tensor = ctx.workspace  # type: ignore[attr-defined]
        scale, num_positives, reduction = ctx.setting  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        rest = (None,) * 8
        batch, width = index.shape
        signed_scale, _, neg_weight = _nce_columns(width, num_positives, scale, torch.float32,
                                                   grad.device)
        full = ws[:2 * batch * memory_t.shape[0]].view(2, batch, -1)
        g = ws[full.numel():full.numel() + sigmoid_neg.numel()].view_as(sigmoid_neg)
        # The general path's order: mv's gradient, the log-sigmoid's, then addcmul's.
        if reduction == "none":
            torch.mul(sigmoid_neg, grad.unsqueeze(2) * neg_weight, out=g)
        else:
            w = neg_weight * (1.0 / batch) if reduction == "mean" else neg_weight
            torch.mul(sigmoid_neg, grad.view(2, 1, 1) * w, out=g)
        g.mul_(signed_scale)
        full.zero_().scatter_add_(2, index.expand_as(g), g)
        onednn: bool = ctx.onednn  # type: ignore[attr-defined]
        return (_cpu_gemm(full[0], memory_t, onednn) if needs[0] else None,
                _cpu_gemm(full[1], memory_s, onednn) if needs[1] else None, *rest)


def _second_order(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor,
                  path: ScorePath) -> tuple[torch.Tensor | None, ...]:
    """The backward of a hand-written CCD pair (:class:`_CPUDenseNCE`, :class:`_TritonNCE`)
    under a double backward: the anchors' gradients recomputed through the general
    operators on ``path``, with ``create_graph=True``. Both pairs save ``(factor, index,
    memory_t, memory_s, anchor_s, anchor_t, bias)`` and set ``ctx.setting``."""
    _, index, memory_t, memory_s, anchor_s, anchor_t, bias = \
        ctx.saved_tensors  # type: ignore[attr-defined]
    scale, num_positives, reduction = ctx.setting  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
    raw = _paired_raw_scores([anchor_s, anchor_t], [memory_t, memory_s], index, path)
    out = _nce_rows(raw, scale, bias, num_positives, reduction, owned=True)
    inputs = [a for a, n in zip((anchor_s, anchor_t), needs) if n]
    grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
    return (next(grads) if needs[0] else None, next(grads) if needs[1] else None,
            *(None,) * 8)


def _check_triton(anchor: torch.Tensor, memory: torch.Tensor) -> torch.dtype:
    """``path="triton"`` needs Triton, CUDA tensors (CPU tensors under Triton's interpreter,
    ``TRITON_INTERPRET=1``) and scores in float32, bfloat16 or float16; returns the scores'
    dtype."""
    if not _fused.triton_available():
        raise ValueError("path='triton' needs Triton installed (pip install triton)")
    device = anchor.device.type
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device != "cuda" and not (device == "cpu" and interpreted):
        raise ValueError(
            f"path='triton' runs on CUDA tensors (on CPU tensors only under Triton's "
            f"interpreter, TRITON_INTERPRET=1), got {device} tensors; use 'auto' there"
        )
    dtype = _score_dtype(anchor, memory)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"path='triton' computes float32, bfloat16 or float16 scores, got {dtype}; use "
            f"'auto' for other dtypes"
        )
    return dtype


def _triton_blocks(dim: int) -> tuple[int, int]:
    """``(BLOCK_J, BLOCK_D)``: sampled columns per program of the scores kernel (and per
    step of the gradient kernel), and ``d`` rounded up to a power of two. The gathered tile
    is ``BLOCK_J x BLOCK_D``, at most 4096 values per bank (32 columns at ``d = 128``), so
    that a large ``d`` does not overflow the registers."""
    block_d = max(16, 1 << (dim - 1).bit_length())
    return max(2, min(32, 4096 // block_d)), block_d


#: Sampled columns per program of the gradient kernel (a multiple of every ``BLOCK_J``): at
#: the paper's sizes (P+K = 4116, B = 64) 9 chunks of 64 anchors, 576 programs, enough to
#: fill a large GPU.
_TRITON_CHUNK = 512


class _TritonNCE(torch.autograd.Function):
    r"""Both CCD directions with the hand-written Triton kernels of ``_triton_kernels``
    (``path="triton"``): the sampled rows are gathered and dotted inside the kernels (from
    the GPU's cache: the paper's banks are 3.6 MB), so neither the ``B x N`` product nor the
    ``B x (P+K) x d`` block is formed, and a forward and backward take five kernel launches
    (scores, :math:`Z` aside; NCE; the batch reduction; gradients and the sum of their
    column chunks) where the general operators take about twenty.

    The values are the general path's to float rounding (the sums run in another order);
    under bfloat16 or float16 autocast the bank rows and the scores are rounded to that
    dtype as the general path's matmul rounds them. The scores' buffer becomes the backward's
    factor :math:`-w_j\,\mathrm{sign}_j\,\sigma(-x_j)/\tau`, the one ``[2, B, P+K]`` tensor
    kept. A second-order gradient is taken through the general path, recomputed.
    """

    @staticmethod
    def forward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx,
        anchor_s: torch.Tensor,
        anchor_t: torch.Tensor,
        memory_t: torch.Tensor,
        memory_s: torch.Tensor,
        index: torch.Tensor,
        scale: float,
        noise: float,
        num_positives: int,
        bias_of: BiasOf,
        reduction: str,
    ) -> torch.Tensor:
        from . import _triton_kernels as kernels

        batch, width = index.shape
        dim = anchor_s.shape[1]
        dtype = anchor_s.dtype
        block_j, block_d = _triton_blocks(dim)
        raw = torch.empty(2, batch, width, dtype=torch.float32, device=index.device)
        rows = torch.empty(2, batch, dtype=torch.float32, device=index.device)
        with _launching_on(index.device):
            kernels.scores[(_cdiv(width, block_j), batch)](
                anchor_s, anchor_t, memory_t, memory_s, index, raw, batch, width, dim,
                anchor_s.stride(0), memory_t.stride(0),
                ROUND={torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype],
                BLOCK_J=block_j, BLOCK_D=block_d)
            bias = bias_of(raw if dtype == torch.float32 else raw.to(dtype), scale, noise)
            kernels.nce[(batch, 2)](raw, bias.contiguous(), rows, batch, width, num_positives,
                                    scale, 1.0 / num_positives, BLOCK=1024)
        out = rows if reduction == "none" else rows.mean(1) if reduction == "mean" else \
            rows.sum(1)
        ctx.save_for_backward(raw, index, memory_t, memory_s, anchor_s, anchor_t, bias)
        ctx.setting = (scale, num_positives, reduction)  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # a double backward: through the general path
            return _second_order(ctx, grad, "gather")
        factor, index, memory_t, memory_s, anchor_s, anchor_t, _ = \
            ctx.saved_tensors  # type: ignore[attr-defined]
        _, _, reduction = ctx.setting  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        from . import _triton_kernels as kernels

        batch, width = index.shape
        dim = anchor_s.shape[1]
        block_j, block_d = _triton_blocks(dim)
        chunks = _cdiv(width, _TRITON_CHUNK)
        partial = torch.empty(chunks, 2, batch, dim, dtype=torch.float32, device=index.device)
        coef_b = grad.stride(1) if reduction == "none" else 0
        with _launching_on(index.device):
            kernels.grad[(batch, chunks)](
                factor, index, memory_t, memory_s, grad, partial, batch, width, dim,
                _TRITON_CHUNK, memory_t.stride(0), grad.stride(0), coef_b,
                1.0 / batch if reduction == "mean" else 1.0,
                NEED_S=needs[0], NEED_T=needs[1], BLOCK_J=block_j, BLOCK_D=block_d)
        grads = partial[0] if chunks == 1 else partial.sum(0)
        out = [g.to(a.dtype) if n else None for g, a, n in zip(grads, (anchor_s, anchor_t), needs)]
        return (out[0], out[1], *(None,) * 8)


def _launching_on(device: torch.device) -> AbstractContextManager[Any]:
    """The tensors' GPU made current for a Triton launch, which goes to the current device's
    current stream (a module on ``cuda:1`` while ``cuda:0`` is current would otherwise launch
    on the wrong GPU); nothing on a CPU (Triton's interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)``, for launch grids."""
    return -(-a // b)


def class_centroids(
    memory: torch.Tensor, labels: torch.Tensor, num_classes: int, relu: bool = True
) -> torch.Tensor:
    r"""Class centroids of a bank (method §3).

    :math:`c_c = \mathrm{normalise}(\mathrm{mean}_{j: y_j=c}\,\mathrm{ReLU}(M_j))`.

    One ``index_add_`` over the bank; no loop over classes.

    Args:
        memory: ``[N, d]`` float bank rows.
        labels: ``[N]`` long, the class of each row, in ``[0, num_classes)``.
        num_classes: ``C``.
        relu: apply ReLU to the rows first (the released code's choice, method §3).

    Returns:
        ``[C, d]`` L2-normalised centroids, detached. A class with no rows gets a zero row.

    Examples:
        >>> m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> class_centroids(m, torch.tensor([0, 1, 1]), 2)
        tensor([[1.0000, 0.0000],
                [0.4472, 0.8944]])
    """
    check_float("memory", memory, 2)
    check_index("labels", labels, 1)
    check_positive_int("num_classes", num_classes)
    if labels.shape[0] != memory.shape[0]:
        raise ValueError(
            f"labels must have one entry per memory row ({memory.shape[0]}), got {labels.shape[0]}"
        )
    check_range("labels", labels, num_classes)
    rows = memory.detach()
    if relu:
        rows = rows.clamp_min(0)
    labels = labels.long()
    sums = rows.new_zeros(num_classes, rows.shape[1]).index_add_(0, labels, rows)
    # Counted by index_add_, not bincount: bincount sizes its output from the labels' largest
    # value, a host read on a GPU and a graph break for torch.compile before torch 2.10.
    counts = labels.new_zeros(num_classes).index_add_(0, labels, torch.ones_like(labels))
    counts = counts.clamp_min(1)
    return F.normalize(sums / counts.unsqueeze(1).to(sums.dtype), dim=1)


def categorical_relation_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_centroids: torch.Tensor,
    teacher_centroids: torch.Tensor,
    temperature: float = 0.07,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Categorical relation preserving loss, CRP (method §5).

    :math:`\frac{1}{B}\sum_i \mathrm{KL}(\mathrm{softmax}(r_{T,i})\,\|\,\mathrm{softmax}(r_{S,i}))`

    With :math:`r_S = g_S C_S^\top/\tau` and :math:`r_T = g_T C_T^\top/\tau`. The teacher side
    and both centroid sets are detached; only ``student_emb`` gets a gradient.

    Args:
        student_emb: ``[B, d]`` student embeddings ``g_S``.
        teacher_emb: ``[B, d]`` teacher embeddings ``g_T``.
        student_centroids: ``[C, d]`` centroids of the student bank.
        teacher_centroids: ``[C, d]`` centroids of the teacher bank.
        temperature: ``tau``.
        reduction: ``"mean"`` (the paper's), ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        The loss in float32 (float64 for float64 input).

    Examples:
        >>> g = F.normalize(torch.randn(3, 4), dim=1)
        >>> c = F.normalize(torch.randn(5, 4), dim=1)
        >>> float(categorical_relation_loss(g, g, c, c))
        0.0
    """
    check_float("student_emb", student_emb, 2)
    check_float("teacher_emb", teacher_emb, 2)
    check_float("student_centroids", student_centroids, 2)
    check_float("teacher_centroids", teacher_centroids, 2)
    check_nonempty("student_emb", student_emb)
    check_reduction(reduction)
    check_positive_float("temperature", temperature)
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"student_emb and teacher_emb must have one shape, got {tuple(student_emb.shape)} "
            f"and {tuple(teacher_emb.shape)}"
        )
    if student_centroids.shape != teacher_centroids.shape:
        raise ValueError(
            f"student_centroids and teacher_centroids must have one shape, got "
            f"{tuple(student_centroids.shape)} and {tuple(teacher_centroids.shape)}"
        )
    if student_centroids.shape[1] != student_emb.shape[1]:
        raise ValueError(
            f"centroids have size {student_centroids.shape[1]} but embeddings have "
            f"{student_emb.shape[1]}"
        )
    check_same_device(student_emb=student_emb, student_centroids=student_centroids)
    check_finite("student_emb", student_emb)
    check_finite("teacher_emb", teacher_emb)
    return reduce(_relation_per_sample(student_emb, teacher_emb, student_centroids,
                                       teacher_centroids, temperature), reduction)


def _relation_per_sample(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    student_centroids: torch.Tensor,
    teacher_centroids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``[B]`` CRP terms from checked arguments."""
    # 1/tau goes on the C x d centroids, the smallest operand (callers may fold it in and
    # pass temperature 1).
    scale = 1.0 / temperature
    c_s = student_centroids.detach().to(student_emb.dtype)
    c_t = teacher_centroids.to(teacher_emb.dtype)
    if scale != 1.0:
        c_s, c_t = c_s * scale, c_t * scale
    r_s = student_emb @ c_s.t()
    with torch.no_grad():
        r_t = teacher_emb.detach() @ c_t.t()
    return _kl_rows(r_t, r_s)


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` rows of KL(softmax(teacher) || softmax(student)), in the reduction dtype."""
    dtype = _reduction_dtype(student_logits.dtype)
    log_p_s = F.log_softmax(student_logits.to(dtype), dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(dtype), dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def consistency_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    r"""Mean-teacher consistency (method §2): :math:`\frac{1}{B}\sum_i \mathrm{KL}(p_T\|p_S)`.

    Args:
        student_logits: ``[B, C]`` student logits.
        teacher_logits: ``[B, C]`` teacher logits (detached here).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The loss in float32 (float64 for float64 input).

    Examples:
        >>> z = torch.randn(2, 5)
        >>> float(consistency_kl(z, z))
        0.0
    """
    check_float("student_logits", student_logits, 2)
    check_float("teacher_logits", teacher_logits, 2)
    check_nonempty("student_logits", student_logits)
    check_reduction(reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    return reduce(_kl_rows(teacher_logits, student_logits), reduction)


def sigmoid_rampup(epoch: float, rampup_length: float = 30.0) -> float:
    r"""Ramp-up weight :math:`\exp(-5(1-\min(e,R)/R)^2)` (method §2), evaluated per epoch.

    Args:
        epoch: ``e >= 0``.
        rampup_length: ``R`` epochs; ``0`` gives 1 from the start.

    Returns:
        A float in ``(0, 1]``.

    Examples:
        >>> round(sigmoid_rampup(0, 30), 6)
        0.006738
        >>> sigmoid_rampup(30, 30)
        1.0
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length}")
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(float(epoch), float(rampup_length)) / float(rampup_length)
    return float(math.exp(-5.0 * phase * phase))
