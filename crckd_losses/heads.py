"""The projection head of method §1: Linear, then L2 normalisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._checks import check_float, check_positive_int


class EmbeddingHead(nn.Module):
    """``g = normalise(W f + b)``: maps a backbone feature to a unit-length embedding.

    Args:
        in_dim: size of the input feature ``f`` (128 in the paper).
        out_dim: size of the embedding ``g`` (128 in the paper).

    Shapes:
        ``[B, in_dim]`` float -> ``[B, out_dim]`` with unit L2 norm per row. Outside autocast,
        a feature of another floating dtype than the weights (float64 from a float64 model)
        is cast to the weights' dtype; cast the head (``.double()``) to compute in float64.

    Examples:
        >>> head = EmbeddingHead(16, 8)
        >>> g = head(torch.randn(4, 16))
        >>> torch.allclose(g.norm(dim=1), torch.ones(4))
        True
    """

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return normalize_rows(self.project(features))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``W f + b``, the embedding before its normalisation (checked as :meth:`forward`).

        Args:
            features: ``[B, in_dim]`` float.

        Returns:
            ``[B, out_dim]``.
        """
        check_float("features", features, 2)
        if features.shape[1] != self.linear.in_features:
            raise ValueError(
                f"features must have {self.linear.in_features} columns, got shape "
                f"{tuple(features.shape)}"
            )
        weight = self.linear.weight
        if features.dtype != weight.dtype and not torch.is_autocast_enabled(features.device.type):
            # A float64 (or float16) feature meets float32 weights: compute in the weights'
            # dtype, as autocast would, instead of failing inside nn.Linear.
            features = features.to(weight.dtype)
        out: torch.Tensor = self.linear(features)
        return out


_EPS = 1e-12  # F.normalize's


def _normalized(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows / max(||row||, eps)`` per row, with what its backward keeps: the divisor and
    which rows were not clamped."""
    norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    denom = norm.clamp_min(_EPS)
    return rows / denom, denom, norm >= _EPS


def _normalized_backward(out: torch.Tensor, denom: torch.Tensor, unclamped: torch.Tensor,
                         grad: torch.Tensor) -> torch.Tensor:
    r""":math:`(\delta_g - g (g \cdot \delta_g)) / ||y||`, or :math:`\delta_g / \epsilon` for a
    row clamped at :math:`\epsilon`."""
    along = torch.bmm(out.unsqueeze(1), grad.unsqueeze(2)).squeeze(2) * unclamped
    return torch.addcmul(grad, out, along, value=-1) / denom


class _NormalizeRows(torch.autograd.Function):
    r"""``g = y / max(||y||, eps)`` per row, as ``F.normalize(y, dim=1)``, with its gradient
    written out: :math:`\delta_y = (\delta_g - g (g \cdot \delta_g)) / ||y||` (and
    :math:`\delta_g / \epsilon` for a row clamped at :math:`\epsilon`). Four kernels each way,
    where autograd's composition of norm, clamp and division takes about fourteen backward."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        out, denom, unclamped = _normalized(rows)
        ctx.save_for_backward(out, denom, unclamped)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out, denom, unclamped = ctx.saved_tensors
        return _normalized_backward(out, denom, unclamped, grad)


class _NormalizeRowPair(torch.autograd.Function):
    """:class:`_NormalizeRows` of two ``[B, d]`` tensors at once (CRCKD's student and teacher
    embeddings): one set of kernels for both, each way, and one Python call. The outputs are
    views of one ``[2B, d]`` result."""

    @staticmethod
    def forward(ctx: Any, first: torch.Tensor, second: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out, denom, unclamped = _normalized(torch.cat([first, second]))
        ctx.save_for_backward(out, denom, unclamped)
        split = first.shape[0]
        return out[:split], out[split:]

    @staticmethod
    def backward(ctx: Any, grad_first: torch.Tensor | None, grad_second: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        out, denom, unclamped = ctx.saved_tensors
        # The split from a gradient's shape, not a size kept on ctx from forward: dynamo before
        # torch 2.6 cannot trace that into the backward graph.
        given = grad_first if grad_first is not None else grad_second
        assert given is not None  # autograd calls backward with at least one gradient
        split = given.shape[0] if grad_first is not None else out.shape[0] - given.shape[0]
        grad = torch.cat([torch.zeros_like(out[:split]) if grad_first is None else grad_first,
                          torch.zeros_like(out[split:]) if grad_second is None
                          else grad_second])
        grad_rows = _normalized_backward(out, denom, unclamped, grad)
        return grad_rows[:split], grad_rows[split:]


def normalize_row_pair(first: torch.Tensor, second: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`normalize_rows` of two ``[B, d]`` tensors, computed together where both take a
    gradient and share a dtype (fewer kernels and one Python call instead of two).

    Args:
        first: ``[B, d]`` float.
        second: ``[B', d]`` float.

    Returns:
        Both, unit L2 norm per row; the same values as two :func:`normalize_rows` calls.
    """
    if first.requires_grad and second.requires_grad and torch.is_grad_enabled() and \
            first.dtype == second.dtype and first.shape[1:] == second.shape[1:]:
        out: tuple[torch.Tensor, torch.Tensor] = _NormalizeRowPair.apply(first, second)
        return out
    return normalize_rows(first), normalize_rows(second)


def normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """``F.normalize(rows, dim=1)`` for ``[B, d]`` rows, with a cheaper backward.

    Args:
        rows: ``[B, d]`` float.

    Returns:
        ``[B, d]``, unit L2 norm per row (rows of norm below 1e-12 are divided by 1e-12).

    Examples:
        >>> y = torch.tensor([[3.0, 4.0]])
        >>> normalize_rows(y)
        tensor([[0.6000, 0.8000]])
    """
    if rows.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _NormalizeRows.apply(rows)
        return out
    norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    plain: torch.Tensor = rows / norm.clamp_min(_EPS)
    return plain
