"""Block pooling for the gates: per-block average (and max and min) of queries or keys, in one read.

The gates score blocks from pooled queries (average) and pooled keys (max, min, average). RoPE models hand the
attention function rotated queries and keys, while the gates want them before RoPE: the kernel undoes the rotation on
the fly (``x * cos - rotate_half(x) * sin``, divided by ``cos^2 + sin^2`` for scaled RoPE variants) as it pools, so the
full-size tensors are read once and nothing full-size is written. Tokens outside the sequence or masked by key padding
take no part; a block with no valid token gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import next_power_of_2


@triton.jit
def _pool_kernel(
    X, COS, SIN, VALID, AVG, MAX, MIN,
    stride_xb, stride_xh, stride_xs,
    stride_rb, stride_rs,  # cos / sin (B or 1, S, D), last stride 1
    stride_valid_b,
    stride_ob, stride_oh, stride_on,  # outputs (B, H, NB, D) fp32, last stride 1
    num_heads, seq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROTATE: tl.constexpr,
    HAS_VALID: tl.constexpr,
    EXTREMES: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    bh = tl.program_id(1)
    batch = bh // num_heads
    head = bh % num_heads
    rows = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    valid = rows < seq
    if HAS_VALID:
        valid = valid & (tl.load(VALID + batch * stride_valid_b + rows, mask=rows < seq, other=0) != 0)
    mask = valid[:, None] & (cols[None, :] < HEAD_DIM)
    base = X + batch * stride_xb + head * stride_xh + rows[:, None] * stride_xs
    x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if UNROTATE:
        half: tl.constexpr = HEAD_DIM // 2
        # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] otherwise.
        partner = tl.where(cols < half, cols + half, cols - half)
        rotated = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        rotated = tl.where(cols[None, :] < half, -rotated, rotated)
        r_offsets = batch * stride_rb + rows[:, None] * stride_rs + cols[None, :]
        cos = tl.load(COS + r_offsets, mask=mask, other=1.0).to(tl.float32)
        sin = tl.load(SIN + r_offsets, mask=mask, other=0.0).to(tl.float32)
        x = (x * cos - rotated * sin) / (cos * cos + sin * sin)
    count = tl.maximum(tl.sum(valid.to(tl.float32), 0), 1.0)
    out = batch * stride_ob + head * stride_oh + block * stride_on + cols
    out_mask = cols < HEAD_DIM
    tl.store(AVG + out, tl.sum(tl.where(mask, x, 0.0), 0) / count, mask=out_mask)
    if EXTREMES:
        any_valid = tl.max(valid.to(tl.int32), 0) > 0
        maximum = tl.max(tl.where(mask, x, float("-inf")), 0)
        minimum = tl.min(tl.where(mask, x, float("inf")), 0)
        tl.store(MAX + out, tl.where(any_valid, maximum, 0.0), mask=out_mask)
        tl.store(MIN + out, tl.where(any_valid, minimum, 0.0), mask=out_mask)


def pool_blocks(
    x: torch.Tensor,
    block_size: int,
    *,
    valid: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    extremes: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-block pooling of ``x`` ``(B, H, S, D)``: ``(average,)`` or ``(average, maximum, minimum)``, each
    ``(B, H, NB, D)`` fp32. ``valid`` ``(B, S)`` marks the tokens that count; ``cos``/``sin`` ``(B or 1, S, D)`` (as
    transformers' rotary embeddings return them) undo RoPE first."""
    batch, heads, seq, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    blocks = -(-seq // block_size)
    outputs = [x.new_empty(batch, heads, blocks, head_dim, dtype=torch.float32) for _ in range(3 if extremes else 1)]
    avg = outputs[0]
    maximum, minimum = (outputs[1], outputs[2]) if extremes else (avg, avg)
    unrotate = cos is not None
    if unrotate:
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        cos, sin = (t.expand(-1, seq, head_dim).contiguous() for t in (cos, sin))
        stride_rb = 0 if cos.shape[0] == 1 else cos.stride(0)
        stride_rs = cos.stride(1)
    else:
        cos = sin = x
        stride_rb = stride_rs = 0
    if valid is not None:
        valid = valid.to(torch.uint8).contiguous()
        stride_valid = valid.stride(0)
    else:
        valid, stride_valid = x.new_empty(1, dtype=torch.uint8), 0
    _pool_kernel[(blocks, batch * heads)](
        x, cos, sin, valid, avg, maximum, minimum,
        x.stride(0), x.stride(1), x.stride(2),
        stride_rb, stride_rs, stride_valid,
        avg.stride(0), avg.stride(1), avg.stride(2),
        heads, seq,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK=block_size, UNROTATE=unrotate,
        HAS_VALID=stride_valid != 0, EXTREMES=extremes,
    )  # fmt: skip
    return tuple(outputs)
