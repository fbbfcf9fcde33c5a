"""BSFA forward kernel: the dense skeleton, with the P V work of low-scoring key tiles skipped.

For each (batch, query head, query tile) every visible key tile's scores ``Q K^T`` are computed exactly
(:func:`attn_fwd_scores`). The tile's maximum scaled score (natural-log units, over the tile's valid query rows and
visible keys) is compared with the threshold ``tau[head, query-tile position]``: below it, the V load, the ``P V``
product and the online-softmax update are skipped, so a skipped tile leaves both the numerator and the denominator
(the output is the softmax renormalised over the kept tiles). Always kept, whatever the threshold:

* the diagonal tiles, those overlapping the query tile's own (bottom-right aligned) key positions
  ``[start_m + S_kv - S_q, last valid row + S_kv - S_q]``; causal, this includes every tile that needs the causal
  element mask. Every valid row therefore keeps at least its own key.
* the first key tile, an attention sink.

The query-tile position is absolute, ``(start_m + S_kv - S_q) // BLOCK_M``, so a chunked prefill reads the same
thresholds as a full one; positions past the end of the table reuse its last entry.

Per program the kernel writes three counts, without any host synchronisation: key tiles visited, tiles that could be
skipped (visited minus always-kept) and tiles skipped. With ``RECORD_TILE_MAX`` it also writes every visited tile's
maximum scaled score (what calibration collects, at inference tile shapes).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..dense.fwd import attn_fwd_finish, attn_fwd_key_range, attn_fwd_scores, attn_fwd_update, key_padding_tile


@triton.jit
def _bsfa_tile_range(
    acc,
    m_i,
    l_i,
    visited,
    gateable,
    skipped,
    q,
    k_base,
    v_base,
    kpad_base,
    tile_max_base,
    lo,
    hi,
    tau,
    diag_lo,
    diag_hi,
    offs_m,
    offs_n,
    offs_d,
    row_valid,
    stride_kn,
    stride_vn,
    seq_k,
    causal_offset,
    scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_SEQ_END: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    RECORD_TILE_MAX: tl.constexpr,
):
    """Key tiles ``[lo, hi)``: exact scores for each, P V only for those kept (always-kept or max >= tau)."""
    kpad_next = key_padding_tile(kpad_base, lo, offs_n, seq_k, HAS_KEY_PADDING)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kpad = kpad_next
        kpad_next = key_padding_tile(kpad_base, start_n + BLOCK_N, offs_n, seq_k, HAS_KEY_PADDING)
        s = attn_fwd_scores(
            q, k_base, kpad, start_n, offs_m, offs_n, offs_d, stride_kn, seq_k, causal_offset,
            HEAD_DIM, BLOCK_D, MASK_CAUSAL, MASK_SEQ_END, HAS_KEY_PADDING,
        )  # fmt: skip
        # Rows past the end of the query sequence are zero padding: they must not vote on the tile.
        tile_max = tl.max(tl.where(row_valid, tl.max(s, 1), float("-inf")), 0) * scale
        if RECORD_TILE_MAX:
            tl.store(tile_max_base + start_n // BLOCK_N, tile_max)
        always_kept = (start_n == 0) | ((start_n + BLOCK_N > diag_lo) & (start_n <= diag_hi))
        keep = always_kept | (tile_max >= tau)
        visited += 1
        gateable += tl.where(always_kept, 0, 1)
        skipped += tl.where(keep, 0, 1)
        if keep:
            acc, m_i, l_i = attn_fwd_update(
                acc, m_i, l_i, s, v_base, start_n, offs_n, offs_d, stride_vn, seq_k, qk_scale,
                HEAD_DIM, BLOCK_D, MASK_SEQ_END, True,
            )  # fmt: skip
    return acc, m_i, l_i, visited, gateable, skipped


@triton.jit
def _bsfa_fwd_kernel(
    Q, K, V, KPAD, Out, LSE, TAU, STATS, TILE_MAX,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_kpad_b,
    stride_tau_h,
    num_q_heads, group_size, seq_q, seq_k, scale,
    num_tau_positions, num_m_tiles, num_n_tiles,
    seq_k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    RECORD_TILE_MAX: tl.constexpr,
):  # fmt: skip
    # Heavy (late) query tiles first, as in the dense kernel.
    tile_m = tl.num_programs(0) - 1 - tl.program_id(0)
    start_m = tile_m * BLOCK_M
    bh = tl.program_id(1)
    batch = bh // num_q_heads
    q_head = bh % num_q_heads
    kv_head = q_head // group_size

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    kpad_base = KPAD + batch * stride_kpad_b
    tile_max_base = TILE_MAX + (bh * num_m_tiles + tile_m) * num_n_tiles

    row_valid = offs_m < seq_q
    if BLOCK_D != HEAD_DIM:
        q_mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        q_mask = row_valid[:, None]
    q_ptrs = Q + batch * stride_qb + q_head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    causal_offset = seq_k - seq_q
    position = tl.maximum(start_m + causal_offset, 0) // BLOCK_M
    tau = tl.load(TAU + q_head * stride_tau_h + tl.minimum(position, num_tau_positions - 1))
    # Keys on the query tile's own (bottom-right aligned) positions: the diagonal.
    diag_lo = start_m + causal_offset
    diag_hi = tl.minimum(start_m + BLOCK_M, seq_q) - 1 + causal_offset

    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visited = tl.zeros([], dtype=tl.int32)
    gateable = tl.zeros([], dtype=tl.int32)
    skipped = tl.zeros([], dtype=tl.int32)

    full_hi, hi = attn_fwd_key_range(start_m, seq_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i, visited, gateable, skipped = _bsfa_tile_range(
        acc, m_i, l_i, visited, gateable, skipped, q, k_base, v_base, kpad_base, tile_max_base,
        0, full_hi, tau, diag_lo, diag_hi, offs_m, offs_n, offs_d, row_valid,
        stride_kn, stride_vn, seq_k, causal_offset, scale, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, False, False, HAS_KEY_PADDING, RECORD_TILE_MAX,
    )  # fmt: skip
    # The tail: causal, the tiles that need the element mask (all of them overlap the diagonal, so all are kept);
    # bidirectional, the sequence-end tile.
    acc, m_i, l_i, visited, gateable, skipped = _bsfa_tile_range(
        acc, m_i, l_i, visited, gateable, skipped, q, k_base, v_base, kpad_base, tile_max_base,
        full_hi, hi, tau, diag_lo, diag_hi, offs_m, offs_n, offs_d, row_valid,
        stride_kn, stride_vn, seq_k, causal_offset, scale, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, True, HAS_KEY_PADDING, RECORD_TILE_MAX,
    )  # fmt: skip

    out, lse = attn_fwd_finish(acc, m_i, l_i)
    o_ptrs = Out + batch * stride_ob + q_head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * seq_q + offs_m, lse, mask=row_valid)
    stats = STATS + (bh * num_m_tiles + tile_m) * 3
    tl.store(stats, visited)
    tl.store(stats + 1, gateable)
    tl.store(stats + 2, skipped)
