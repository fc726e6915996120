"""All-gather helpers so that every rank of a ``torch.distributed`` job holds the same banks.

Outside a distributed job (or with one process) every helper returns its input unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of processes in the default group, 1 outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def all_gather_varlen(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (any first-dimension size) from every rank, in rank order.

    Like MoCo's ``concat_all_gather``, without gradient, but ranks may hold batches of
    different sizes: each pads to the largest before ``all_gather`` and trims after.

    Args:
        tensor: ``[B_r, ...]`` on this rank.

    Returns:
        ``[sum_r B_r, ...]``, the same on every rank.
    """
    if world_size() == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:c] for g, c in zip(gathered, counts)], dim=0)


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy (a no-op with one process).

    Args:
        tensor: the same shape on every rank.
        src: the rank whose values win.

    Returns:
        ``tensor``.
    """
    if world_size() > 1:
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def gather_for_update(
    indices: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices and features of every rank, for a bank write that all ranks repeat.

    Args:
        indices: ``[B_r]`` long on this rank.
        features: ``[B_r, d]`` on this rank.

    Returns:
        ``([sum B_r], [sum B_r, d])``, identical on every rank.
    """
    if world_size() == 1:
        return indices, features
    return all_gather_varlen(indices), all_gather_varlen(features.contiguous())


@torch.no_grad()
def global_log_mean_exp(values: torch.Tensor) -> torch.Tensor:
    """``log(mean(exp(values)))`` over the values of all ranks together.

    Used to estimate the NCE normalisation constant from the global batch, so a distributed
    run sets the same ``Z`` as one process on the whole batch.

    Args:
        values: any shape; flattened.

    Returns:
        0-d tensor in ``values``' dtype.
    """
    flat = values.flatten()
    lse = torch.logsumexp(flat, 0)
    if world_size() == 1:
        return lse - math.log(flat.numel())
    # A fill on the device, not torch.tensor(): that copies from the host, a sync on CUDA.
    count = torch.full((), float(flat.numel()), dtype=flat.dtype, device=flat.device)
    pair = torch.stack([lse, count])
    gathered = all_gather_varlen(pair.unsqueeze(0))
    return torch.logsumexp(gathered[:, 0], 0) - torch.log(gathered[:, 1].sum())
