"""The projection head of method §1: Linear, then L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        return F.normalize(self.project(features), dim=1)

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
