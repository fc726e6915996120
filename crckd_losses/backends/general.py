"""The ``"dense"`` and ``"gather"`` backends: both CCD directions through general torch
operators, on any device and dtype.

The same maths as :func:`crckd_losses.functional.class_guided_contrastive_loss`, arranged to
do less work:

- ``"dense"`` multiplies the batch against the whole bank (``B x N``) and gathers the sampled
  columns; ``"gather"`` gathers the ``B x (P+K) x d`` rows first, rebuilding them in backward
  instead of keeping them. Dense is cheaper while ``N <= DENSE_PATH_FACTOR * (P+K)``
  (:func:`choose_score_path`); past that, gathering is.
- Both directions are stacked into one ``[2, B, P+K]`` tensor, so the NCE critic, its
  reduction and their backward run once for both.
- The critic is one ``addcmul`` and one ``logsigmoid``: :math:`\\log h(v)` for positives and
  :math:`\\log(1-h(v))` for negatives is ``logsigmoid(sign * v)``; the weighted sum over
  columns (and over the batch) is one matrix-vector product, in float32 or wider.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from .._cache import built_once
from .._checks import reduction_dtype

#: The dense path is taken while ``N <= DENSE_PATH_FACTOR * (P + K)``. Past that, gathering
#: the ``B x (P+K) x d`` rows costs less than multiplying against the whole bank. The
#: benchmarks' crossover section measures it: on a 2-core CPU (float32, B=64, d=128) dense
#: took 0.54-0.57x gather's time at 32 (P+K) and gather won from about 55 (P+K); dense's peak
#: memory (about 6 B N floats) passes gather's (B (P+K) d floats) at about d/6 (P+K), 21 at
#: d = 128. 32 keeps the time and takes the memory of at most 1.5x gather's.
DENSE_PATH_FACTOR = 32

ScorePath = Literal["dense", "gather"]

#: ``log_normalizer(raw, scale)``: the ``[2]`` :math:`\log Z` of both directions, given their
#: ``[2, B, P+K]`` dot products ``raw`` (scores :math:`u = \mathrm{scale} \cdot
#: \mathrm{raw}`, ``scale = 1/tau``).
LogNormalizer = Callable[[torch.Tensor, float], torch.Tensor]


def choose_score_path(bank_size: int, samples_per_anchor: int) -> ScorePath:
    """The path ``backend="auto"`` takes where it runs the general operators.

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


def score_dtype(anchor: torch.Tensor, memory: torch.Tensor) -> torch.dtype:
    """The matmul's dtype: the autocast dtype on accelerators; on a CPU, float32 at least,
    since CPUs without bfloat16 matrix units multiply float32 faster than bfloat16."""
    device = anchor.device.type
    dtype = anchor.dtype if anchor.dtype == memory.dtype else \
        torch.promote_types(anchor.dtype, memory.dtype)
    if torch.is_autocast_enabled(device):
        dtype = torch.float32 if device == "cpu" else torch.get_autocast_dtype(device)
    return dtype


class _GatheredDot(torch.autograd.Function):
    """``u[b, j] = anchor[b] . memory[index[b, j]]`` without keeping the gathered block: it is
    built in forward, used and freed, then rebuilt in backward. ``memory`` is a constant."""

    @staticmethod
    def forward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx, anchor: torch.Tensor, memory: torch.Tensor,
        index: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(memory, index)
        return torch.bmm(_rows(memory, index, anchor.dtype), anchor.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None]:
        memory, index = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None
        rows = _rows(memory, index, grad.dtype)
        return torch.bmm(grad.unsqueeze(1), rows).squeeze(1), None, None


def _rows(memory: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return memory.index_select(0, index.flatten()).view(*index.shape, memory.shape[1]).to(dtype)


def paired_raw_scores(anchors: tuple[torch.Tensor, torch.Tensor],
                      memories: tuple[torch.Tensor, torch.Tensor], sample_indices: torch.Tensor,
                      path: ScorePath) -> torch.Tensor:
    """``[2, B, P+K]``: the dot products of ``anchors[k]`` against ``memories[k]`` at the
    sampled rows (no temperature), in :func:`score_dtype`. On the dense path both score
    matrices are gathered at once."""
    dtype = score_dtype(anchors[0], memories[0])
    with torch.autocast(anchors[0].device.type, enabled=False):
        if path == "dense":
            full = torch.stack([a.to(dtype) @ m.detach().to(dtype).t()
                                for a, m in zip(anchors, memories)])
            return full.gather(2, sample_indices.expand(2, *sample_indices.shape))
        return torch.stack([_GatheredDot.apply(a.to(dtype), m.detach(), sample_indices)
                            for a, m in zip(anchors, memories)])


_TILED: dict[tuple[int, int, int, float, torch.dtype, torch.device], torch.Tensor] = {}
_COLUMNS: dict[tuple[int, int, float, torch.dtype, torch.device],
               tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def nce_columns(width: int, num_positives: int, scale: float, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-column constants of :func:`nce_rows`: ``sign * scale``, ``-sign`` and ``-weight``
    (sign +1 for positives, -1 for negatives; weight 1/P for positives, 1 for negatives),
    built once per setting in eager code."""

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sign = torch.full((width,), -1.0, dtype=dtype, device=device)
        sign[:num_positives] = 1.0
        weight = torch.ones(width, dtype=dtype, device=device)
        weight[:num_positives] = 1.0 / num_positives  # set in `dtype`, not rounded first
        return sign * scale, -sign, -weight

    return built_once(_COLUMNS, (width, num_positives, scale, dtype, device), build)


def nce_bias(log_normalizer: torch.Tensor, noise_constant: float, width: int,
             num_positives: int, dtype: torch.dtype) -> torch.Tensor:
    r"""``[D, 1, P+K]``: :math:`-\mathrm{sign} \cdot (\log Z + \log c)` per direction and
    column, the part of the critic's argument that does not depend on the scores."""
    _, neg_sign, _ = nce_columns(width, num_positives, 1.0, dtype, log_normalizer.device)
    shift = log_normalizer.to(dtype) + math.log(noise_constant)
    return shift.view(-1, 1, 1) * neg_sign


def nce_rows(raw: torch.Tensor, scale: float, bias: torch.Tensor, num_positives: int,
             reduction: str) -> torch.Tensor:
    r"""``[D, B]`` NCE losses of ``D`` directions (``[D]`` for ``"mean"`` or ``"sum"``) from
    their dot products ``raw`` (``[D, B, P+K]``, scores ``scale * raw``) and
    :func:`nce_bias`: ``logsigmoid(sign * v)`` with ``sign * v = (sign * scale) * raw -
    sign * (log Z + log c)`` in one ``addcmul``, then one matrix-vector product."""
    dtype = bias.dtype
    directions, batch, width = raw.shape
    signed_scale, _, neg_weight = nce_columns(width, num_positives, scale, dtype, raw.device)
    with torch.autocast(raw.device.type, enabled=False):  # the reduction stays in `dtype`
        logsig = F.logsigmoid(torch.addcmul(bias, raw.to(dtype), signed_scale))
        if reduction == "none":
            return torch.mv(logsig.view(directions * batch, -1), neg_weight).view(
                directions, batch)
        # The batch reduction folded into the column weights: one matrix-vector product.
        scale_b = 1.0 / batch if reduction == "mean" else 1.0
        weight = built_once(_TILED, (width, num_positives, batch, scale_b, dtype, raw.device),
                            lambda: neg_weight.repeat(batch) * scale_b)
        return torch.mv(logsig.view(directions, -1), weight)


def ccd_pair(path: ScorePath, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
             student_memory: torch.Tensor, teacher_memory: torch.Tensor,
             sample_indices: torch.Tensor, num_positives: int, temperature: float,
             log_normalizer: LogNormalizer, reduction: str) -> torch.Tensor:
    """Both CCD directions from checked arguments: ``[2]`` (:math:`L_S, L_T`), or ``[2, B]``
    with ``reduction="none"``."""
    scale = 1.0 / temperature
    noise = (sample_indices.shape[1] - num_positives) / student_memory.shape[0]
    raw = paired_raw_scores((student_emb, teacher_emb), (teacher_memory, student_memory),
                            sample_indices, path)
    dtype = reduction_dtype(raw.dtype)
    bias = nce_bias(log_normalizer(raw, scale), noise, raw.shape[2], num_positives, dtype)
    return nce_rows(raw, scale, bias, num_positives, reduction)
