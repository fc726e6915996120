r"""The ``"triton"`` backend: both CCD directions, forward and backward, in the hand-written
Triton kernels of :mod:`~crckd_losses.backends.triton_kernels`.

The sampled rows are gathered and dotted inside the kernels (from the GPU's cache: the
paper's banks are 3.6 MB), so neither the ``B x N`` product nor the ``B x (P+K) x d`` block
is formed, and a forward and backward take five kernel launches (scores, :math:`Z` aside;
NCE; the batch reduction; gradients and the sum of their column chunks) where the general
operators take about twenty. It needs Triton and CUDA tensors (CPU tensors under Triton's
interpreter, ``TRITON_INTERPRET=1``, which the tests use). It has never run on a GPU: see
:data:`crckd_losses.backends.STATUS`.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from .._checks import reduction_dtype
from .general import LogNormalizer, nce_bias, nce_rows, paired_raw_scores, score_dtype


def available() -> bool:
    """Whether Triton is installed."""
    return importlib.util.find_spec("triton") is not None


def check(anchor: torch.Tensor, memory: torch.Tensor) -> torch.dtype:
    """The backend needs Triton, CUDA tensors (CPU tensors under Triton's interpreter) and
    scores in float32, bfloat16 or float16; returns the scores' dtype."""
    if not available():
        raise ValueError("backend='triton' needs Triton installed (pip install triton)")
    device = anchor.device.type
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device != "cuda" and not (device == "cpu" and interpreted):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (on CPU tensors only under Triton's "
            f"interpreter, TRITON_INTERPRET=1), got {device} tensors; use 'auto' there"
        )
    dtype = score_dtype(anchor, memory)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"backend='triton' computes float32, bfloat16 or float16 scores, got {dtype}; use "
            f"'auto' for other dtypes"
        )
    return dtype


def blocks(dim: int) -> tuple[int, int]:
    """``(BLOCK_J, BLOCK_D)``: sampled columns per program of the scores kernel (and per
    step of the gradient kernel), and ``d`` rounded up to a power of two. The gathered tile
    is ``BLOCK_J x BLOCK_D``, at most 4096 values per bank (32 columns at ``d = 128``), so
    that a large ``d`` does not overflow the registers."""
    block_d = max(16, 1 << (dim - 1).bit_length())
    return max(2, min(32, 4096 // block_d)), block_d


#: Sampled columns per program of the gradient kernel (a multiple of every ``BLOCK_J``): at
#: the paper's sizes (P+K = 4116, B = 64) 9 chunks of 64 anchors, 576 programs, enough to
#: fill a large GPU.
CHUNK = 512


def ccd_pair(student_emb: torch.Tensor, teacher_emb: torch.Tensor,
             student_memory: torch.Tensor, teacher_memory: torch.Tensor,
             sample_indices: torch.Tensor, num_positives: int, temperature: float,
             log_normalizer: LogNormalizer, reduction: str) -> torch.Tensor:
    """Both CCD directions from checked arguments, as
    :func:`~crckd_losses.backends.general.ccd_pair`."""
    dtype = check(student_emb, teacher_memory)
    noise = (sample_indices.shape[1] - num_positives) / student_memory.shape[0]
    out: torch.Tensor = _TritonNCE.apply(
        student_emb.to(dtype).contiguous(), teacher_emb.to(dtype).contiguous(),
        teacher_memory.detach().contiguous(), student_memory.detach().contiguous(),
        sample_indices.contiguous(), 1.0 / temperature, noise, num_positives, log_normalizer,
        reduction)
    return out


class _TritonNCE(torch.autograd.Function):
    r"""The values are the general path's to float rounding (the sums run in another order);
    under bfloat16 or float16 autocast the bank rows and the scores are rounded to that
    dtype as the general path's matmul rounds them. The scores' buffer becomes the backward's
    factor :math:`-w_j\,\mathrm{sign}_j\,\sigma(-x_j)/\tau`, the one ``[2, B, P+K]`` tensor
    kept. A second-order gradient is taken through the general path, recomputed."""

    @staticmethod
    def forward(  # type: ignore[override, unused-ignore]
        ctx: torch.autograd.function.FunctionCtx, anchor_s: torch.Tensor,
        anchor_t: torch.Tensor, memory_t: torch.Tensor, memory_s: torch.Tensor,
        index: torch.Tensor, scale: float, noise: float, num_positives: int,
        log_normalizer: LogNormalizer, reduction: str,
    ) -> torch.Tensor:
        from . import triton_kernels as kernels

        batch, width = index.shape
        dim, dtype = anchor_s.shape[1], anchor_s.dtype
        block_j, block_d = blocks(dim)
        raw = torch.empty(2, batch, width, dtype=torch.float32, device=index.device)
        rows = torch.empty(2, batch, dtype=torch.float32, device=index.device)
        with _launching_on(index.device):
            kernels.scores[(_cdiv(width, block_j), batch)](
                anchor_s, anchor_t, memory_t, memory_s, index, raw, batch, width, dim,
                anchor_s.stride(0), memory_t.stride(0),
                ROUND={torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype],
                BLOCK_J=block_j, BLOCK_D=block_d)
            seen = raw if dtype == torch.float32 else raw.to(dtype)
            bias = nce_bias(log_normalizer(seen, scale), noise, width, num_positives,
                            reduction_dtype(seen.dtype))
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
            return _second_order(ctx, grad)
        factor, index, memory_t, memory_s, anchor_s, anchor_t, _ = \
            ctx.saved_tensors  # type: ignore[attr-defined]
        _, _, reduction = ctx.setting  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        from . import triton_kernels as kernels

        batch, width = index.shape
        dim = anchor_s.shape[1]
        block_j, block_d = blocks(dim)
        chunks = _cdiv(width, CHUNK)
        partial = torch.empty(chunks, 2, batch, dim, dtype=torch.float32, device=index.device)
        coef_b = grad.stride(1) if reduction == "none" else 0
        with _launching_on(index.device):
            kernels.grad[(batch, chunks)](
                factor, index, memory_t, memory_s, grad, partial, batch, width, dim,
                CHUNK, memory_t.stride(0), grad.stride(0), coef_b,
                1.0 / batch if reduction == "mean" else 1.0,
                NEED_S=needs[0], NEED_T=needs[1], BLOCK_J=block_j, BLOCK_D=block_d)
        grads = partial[0] if chunks == 1 else partial.sum(0)
        out = [g.to(a.dtype) if n else None for g, a, n in zip(grads, (anchor_s, anchor_t), needs)]
        return (out[0], out[1], *(None,) * 8)


def _second_order(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The backward under a double backward: the anchors' gradients recomputed through the
    general operators, with ``create_graph=True``."""
    _, index, memory_t, memory_s, anchor_s, anchor_t, bias = ctx.saved_tensors
    scale, num_positives, reduction = ctx.setting
    needs = ctx.needs_input_grad[:2]
    raw = paired_raw_scores((anchor_s, anchor_t), (memory_t, memory_s), index, "gather")
    out = nce_rows(raw, scale, bias, num_positives, reduction)
    inputs = [a for a, n in zip((anchor_s, anchor_t), needs) if n]
    grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
    return (next(grads) if needs[0] else None, next(grads) if needs[1] else None,
            *(None,) * 8)


def _launching_on(device: torch.device) -> AbstractContextManager[Any]:
    """The tensors' GPU made current for a Triton launch, which goes to the current device's
    current stream (a module on ``cuda:1`` while ``cuda:0`` is current would otherwise launch
    on the wrong GPU); nothing on a CPU (Triton's interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)``, for launch grids."""
    return -(-a // b)
