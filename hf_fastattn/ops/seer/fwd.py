"""SeerAttention's two kernels, both on the dense skeleton's tile functions.

* ``_block_sparse_fwd_kernel``: for each (batch, query head, query block) only the key blocks of a compact selection
  are visited. The selection has FlexAttention's layout, split in two lists per (batch, mask head, query block):
  *full* blocks, whose every key every row of the query block may see (no element mask), and *partial* blocks, which
  need the causal / sequence-end mask. Both lists are sorted ascending. Unselected blocks cost nothing: neither their
  ``Q K^T`` nor their ``P V`` is computed, so they leave the softmax's numerator and denominator. GQA is native: the
  mask head of query head ``h`` is ``h // (H_q // H_mask)``, K/V are indexed by KV head and never repeated.
* ``_block_target_kernel``: exact dense attention for one query block, then a second sweep over its key blocks that
  recomputes ``Q K^T`` with the row's final log-sum-exp and keeps, per key block, the largest attention probability of
  any row of the query block: the 2-D max-pooled attention map SeerAttention's gates learn. It writes the attention
  output as well (the model keeps running dense while gates train) and never materialises ``N x N``.

Query blocks and key blocks are both ``BLOCK`` wide, counted from row 0 and key 0; causality is bottom-right aligned,
element by element, as in the dense kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..dense.fwd import (
    attn_fwd_finish,
    attn_fwd_key_range,
    attn_fwd_scores,
    attn_fwd_tile,
    attn_fwd_tile_ranges,
    key_padding_tile,
)


@triton.jit
def _selected_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    kpad_base,
    index_base,
    count,
    offs_m,
    offs_n,
    offs_d,
    stride_kn,
    stride_vn,
    seq_k,
    causal_offset,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_SEQ_END: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
):
    """Fold the ``count`` key blocks listed at ``index_base`` into the softmax state."""
    for j in tl.range(0, count):
        start_n = tl.multiple_of(tl.load(index_base + j) * BLOCK, BLOCK)
        kpad = key_padding_tile(kpad_base, start_n, offs_n, seq_k, HAS_KEY_PADDING)
        acc, m_i, l_i = attn_fwd_tile(
            acc, m_i, l_i, q, k_base, v_base, kpad, start_n, offs_m, offs_n, offs_d,
            stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
            HEAD_DIM, BLOCK_D, MASK_CAUSAL, MASK_SEQ_END, HAS_KEY_PADDING,
        )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, KPAD, Out, LSE,
    FULL_COUNT, FULL_INDEX, PARTIAL_COUNT, PARTIAL_INDEX,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_kpad_b,
    stride_cb, stride_ch,  # count tensors (B, H_mask, NQ), contiguous
    stride_ib, stride_ih, stride_im,  # index tensors (B, H_mask, NQ, NK), last stride 1
    num_q_heads, group_size, mask_group_size, seq_q, seq_k, scale,
    seq_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
):  # fmt: skip
    # Late (heavier, causal) query blocks first, as in the dense kernel.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    start_m = block_m * BLOCK
    # A program takes HEADS_PER_PROGRAM query heads that share one selection (and one KV head), stacked as the rows
    # of one tile: each K/V tile is loaded once for all of them, and the matrix products are taller.
    head_groups = num_q_heads // HEADS_PER_PROGRAM
    batch = tl.program_id(1) // head_groups
    first_head = (tl.program_id(1) % head_groups) * HEADS_PER_PROGRAM
    kv_head = first_head // group_size
    mask_head = first_head // mask_group_size

    rows = tl.arange(0, HEADS_PER_PROGRAM * BLOCK)
    q_heads = first_head + rows // BLOCK
    offs_m = start_m + rows % BLOCK
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    kpad_base = KPAD + batch * stride_kpad_b

    row_valid = offs_m < seq_q
    if BLOCK_D != HEAD_DIM:
        q_mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        q_mask = row_valid[:, None]
    q_ptrs = Q + batch * stride_qb + q_heads[:, None] * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    count_offset = batch * stride_cb + mask_head * stride_ch + block_m
    index_offset = batch * stride_ib + mask_head * stride_ih + block_m * stride_im
    qk_scale = scale * 1.4426950408889634
    causal_offset = seq_k - seq_q
    m_i = tl.full([HEADS_PER_PROGRAM * BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HEADS_PER_PROGRAM * BLOCK], dtype=tl.float32)
    acc = tl.zeros([HEADS_PER_PROGRAM * BLOCK, BLOCK_D], dtype=tl.float32)

    acc, m_i, l_i = _selected_tiles(
        acc, m_i, l_i, q, k_base, v_base, kpad_base, FULL_INDEX + index_offset, tl.load(FULL_COUNT + count_offset),
        offs_m, offs_n, offs_d, stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
        HEAD_DIM, BLOCK, BLOCK_D, False, False, HAS_KEY_PADDING,
    )  # fmt: skip
    acc, m_i, l_i = _selected_tiles(
        acc, m_i, l_i, q, k_base, v_base, kpad_base, PARTIAL_INDEX + index_offset,
        tl.load(PARTIAL_COUNT + count_offset),
        offs_m, offs_n, offs_d, stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
        HEAD_DIM, BLOCK, BLOCK_D, CAUSAL, True, HAS_KEY_PADDING,
    )  # fmt: skip

    out, lse = attn_fwd_finish(acc, m_i, l_i)
    o_ptrs = Out + batch * stride_ob + q_heads[:, None] * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + (batch * num_q_heads + q_heads) * seq_q + offs_m, lse, mask=row_valid)


@triton.jit
def _pooled_probability_range(
    q,
    k_base,
    kpad_base,
    target_base,
    lse2,
    row_valid,
    lo,
    hi,
    offs_m,
    offs_n,
    offs_d,
    stride_kn,
    seq_k,
    causal_offset,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_SEQ_END: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
):
    """For each key block in ``[lo, hi)``: the largest final attention probability of any valid row, stored."""
    kpad_next = key_padding_tile(kpad_base, lo, offs_n, seq_k, HAS_KEY_PADDING)
    for start_n in tl.range(lo, hi, BLOCK):
        start_n = tl.multiple_of(start_n, BLOCK)
        kpad = kpad_next
        kpad_next = key_padding_tile(kpad_base, start_n + BLOCK, offs_n, seq_k, HAS_KEY_PADDING)
        s = attn_fwd_scores(
            q, k_base, kpad, start_n, offs_m, offs_n, offs_d, stride_kn, seq_k, causal_offset,
            HEAD_DIM, BLOCK_D, MASK_CAUSAL, MASK_SEQ_END, HAS_KEY_PADDING,
        )  # fmt: skip
        # lse2 is +inf on rows that see no key, so they contribute probability 0, like padding rows.
        p = tl.where(row_valid[:, None], tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        tl.store(target_base + start_n // BLOCK, tl.max(tl.max(p, 1), 0))


@triton.jit
def _block_target_kernel(
    Q, K, V, KPAD, Out, LSE, TARGET,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_kpad_b,
    num_q_heads, group_size, seq_q, seq_k, scale, num_key_blocks,
    seq_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
):  # fmt: skip
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    start_m = block_m * BLOCK
    bh = tl.program_id(1)
    batch = bh // num_q_heads
    q_head = bh % num_q_heads
    kv_head = q_head // group_size

    offs_m = start_m + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    kpad_base = KPAD + batch * stride_kpad_b

    row_valid = offs_m < seq_q
    if BLOCK_D != HEAD_DIM:
        q_mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        q_mask = row_valid[:, None]
    q_ptrs = Q + batch * stride_qb + q_head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    qk_scale = scale * 1.4426950408889634
    causal_offset = seq_k - seq_q
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)

    full_hi, hi = attn_fwd_key_range(start_m, seq_k, causal_offset, BLOCK, BLOCK, CAUSAL)
    acc, m_i, l_i = attn_fwd_tile_ranges(
        acc, m_i, l_i, q, k_base, v_base, kpad_base, 0, full_hi, hi, offs_m, offs_n, offs_d,
        stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
        HEAD_DIM, BLOCK, BLOCK_D, CAUSAL, HAS_KEY_PADDING,
    )  # fmt: skip
    out, lse = attn_fwd_finish(acc, m_i, l_i)
    o_ptrs = Out + batch * stride_ob + q_head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * seq_q + offs_m, lse, mask=row_valid)

    # Second sweep: the final per-row normaliser is known, so each block's probabilities are exact.
    lse2 = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    target_base = TARGET + (bh * tl.num_programs(0) + block_m) * num_key_blocks
    _pooled_probability_range(
        q, k_base, kpad_base, target_base, lse2, row_valid, 0, full_hi, offs_m, offs_n, offs_d,
        stride_kn, seq_k, causal_offset, qk_scale, HEAD_DIM, BLOCK, BLOCK_D, False, False, HAS_KEY_PADDING,
    )  # fmt: skip
    _pooled_probability_range(
        q, k_base, kpad_base, target_base, lse2, row_valid, full_hi, hi, offs_m, offs_n, offs_d,
        stride_kn, seq_k, causal_offset, qk_scale, HEAD_DIM, BLOCK, BLOCK_D, CAUSAL, True, HAS_KEY_PADDING,
    )  # fmt: skip
