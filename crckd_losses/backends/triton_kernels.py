"""Triton kernels of the CCD pair (``backend="triton"``); imported only where Triton is installed.

Three kernels compute both CCD directions, forward and backward, without forming the
``B x N`` product or the ``B x (P+K) x d`` block:

- :func:`scores`: ``raw[k, b, j] = anchor_k[b] . memory_k[idx[b, j]]`` for both directions,
  one program per ``(column block, anchor)``; the sampled indices are read once for both.
- :func:`nce`: the NCE critic of every row, one program per anchor: the row losses
  ``sum_j -w_j logsigmoid(x_j)`` and, in place of the scores, the factor
  ``-w_j sign_j scale sigmoid(-x_j)`` that the backward needs.
- :func:`grad`: ``grad_k[b] = coef[k, b] * sum_j factor[k, b, j] memory_k[idx[b, j]]``, one
  program per anchor and chunk of columns (so that a small batch still fills the GPU); the
  caller sums the chunks' shares.

The library imports this module when a kernel first runs. Triton's CPU interpreter, which
the tests use, is chosen by ``TRITON_INTERPRET=1`` before Triton is first imported.
"""

import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]


@triton.jit  # type: ignore[untyped-decorator, unused-ignore]
def _round_bf16(x):  # type: ignore[no-untyped-def]
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), kept in float32: written
    out on the bits, since Triton's interpreter truncates in its own cast."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit  # type: ignore[untyped-decorator, unused-ignore]
def scores(anchor_s, anchor_t, memory_t, memory_s, index, raw,  # type: ignore[no-untyped-def]
           batch, width, dim, stride_anchor, stride_memory,
           ROUND: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    block = tl.program_id(0)
    b = tl.program_id(1)
    cols = block * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < width
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    rows = tl.load(index + b * width + cols, mask=col_ok, other=0)
    ok = col_ok[:, None] & d_ok[None, :]
    offsets = rows[:, None] * stride_memory + d[None, :]
    a_s = tl.load(anchor_s + b * stride_anchor + d, mask=d_ok, other=0.0).to(tl.float32)
    a_t = tl.load(anchor_t + b * stride_anchor + d, mask=d_ok, other=0.0).to(tl.float32)
    m_t = tl.load(memory_t + offsets, mask=ok, other=0.0).to(tl.float32)
    m_s = tl.load(memory_s + offsets, mask=ok, other=0.0).to(tl.float32)
    # bfloat16 or float16 scores: the bank read in that dtype, as the general path casts it,
    # and each product rounded to it, as a half-precision matmul returns it.
    if ROUND == 1:
        m_t, m_s = _round_bf16(m_t), _round_bf16(m_s)
    if ROUND == 2:
        m_t, m_s = m_t.to(tl.float16).to(tl.float32), m_s.to(tl.float16).to(tl.float32)
    u_s = tl.sum(m_t * a_s[None, :], axis=1)
    u_t = tl.sum(m_s * a_t[None, :], axis=1)
    if ROUND == 1:
        u_s, u_t = _round_bf16(u_s), _round_bf16(u_t)
    if ROUND == 2:
        u_s, u_t = u_s.to(tl.float16).to(tl.float32), u_t.to(tl.float16).to(tl.float32)
    tl.store(raw + b * width + cols, u_s, mask=col_ok)
    tl.store(raw + (batch + b) * width + cols, u_t, mask=col_ok)


@triton.jit  # type: ignore[untyped-decorator, unused-ignore]
def nce(raw, bias, rows_out, batch, width, num_positives,  # type: ignore[no-untyped-def]
        scale, inv_positives, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    k = tl.program_id(1)
    row = raw + (k * batch + b) * width
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < width
        positive = cols < num_positives
        u = tl.load(row + cols, mask=ok, other=0.0)
        shift = tl.load(bias + k * width + cols, mask=ok, other=0.0)
        signed_scale = tl.where(positive, scale, -scale)
        neg_weight = tl.where(positive, -inv_positives, -1.0)
        x = u * signed_scale + shift
        # logsigmoid(x) = min(x, 0) - log1p(t), t = exp(-|x|); log1p(t) as
        # log(v) - ((v - 1) - t) / v with v = 1 + t, which restores what rounding v lost.
        t = tl.exp(-tl.abs(x))
        v = 1.0 + t
        log1p = tl.log(v) - ((v - 1.0) - t) / v
        logsig = tl.minimum(x, 0.0) - log1p
        total += tl.where(ok, neg_weight * logsig, 0.0)
        # d logsigmoid(x) / dx = sigmoid(-x) = (t if x >= 0 else 1) / v
        sigmoid_neg = tl.where(x >= 0.0, t, 1.0) / v
        tl.store(row + cols, sigmoid_neg * neg_weight * signed_scale, mask=ok)
    tl.store(rows_out + k * batch + b, tl.sum(total, axis=0))


@triton.jit  # type: ignore[untyped-decorator, unused-ignore]
def grad(factor, index, memory_t, memory_s, coef, partial,  # type: ignore[no-untyped-def]
         batch, width, dim, chunk, stride_memory, coef_k, coef_b, coef_scale,
         NEED_S: tl.constexpr, NEED_T: tl.constexpr,
         BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    part = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    acc_s = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(part * chunk, tl.minimum(width, (part + 1) * chunk), BLOCK_J):
        cols = start + tl.arange(0, BLOCK_J)
        col_ok = cols < tl.minimum(width, (part + 1) * chunk)
        rows = tl.load(index + b * width + cols, mask=col_ok, other=0)
        ok = col_ok[:, None] & d_ok[None, :]
        offsets = rows[:, None] * stride_memory + d[None, :]
        if NEED_S:
            f_s = tl.load(factor + b * width + cols, mask=col_ok, other=0.0)
            m_t = tl.load(memory_t + offsets, mask=ok, other=0.0).to(tl.float32)
            acc_s += tl.sum(m_t * f_s[:, None], axis=0)
        if NEED_T:
            f_t = tl.load(factor + (batch + b) * width + cols, mask=col_ok, other=0.0)
            m_s = tl.load(memory_s + offsets, mask=ok, other=0.0).to(tl.float32)
            acc_t += tl.sum(m_s * f_t[:, None], axis=0)
    # partial[part, k, b, :]: the column chunk's share, summed over chunks by the caller
    out = partial + (part * 2 * batch + b) * dim + d
    if NEED_S:
        c_s = tl.load(coef + b * coef_b).to(tl.float32) * coef_scale
        tl.store(out, acc_s * c_s, mask=d_ok)
    if NEED_T:
        c_t = tl.load(coef + coef_k + b * coef_b).to(tl.float32) * coef_scale
        tl.store(out + batch * dim, acc_t * c_t, mask=d_ok)
