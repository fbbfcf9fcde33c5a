"""FlashAttention-2 style backward: ``delta`` preprocessing, then dK/dV and dQ in two kernels (no atomics).

dK/dV programs own one key tile of one KV head and loop over every query head of its GQA group, so repeated K/V is
never materialised and no two programs write the same gradient. The masking rules are the forward's (bottom-right
causal, key padding, sequence ends); rows with ``lse = -inf`` (nothing visible) contribute nothing.

The tiles each loop streams (Q and dO for dK/dV, K and V for dQ) are read through tile sources
(:func:`~.fwd.row_tile_source`): TMA descriptors with ``USE_TMA``. Each of those tiles feeds two matrix products, and
as plain loads Triton 3.6 did not pipeline them, so every iteration waited for its loads.

FlashAttention-2's single pass (dQ added with atomics from the dK/dV programs: 5 products per tile pair instead of 7)
was built and measured no faster on the H100 (benchmarks/NOTES.md), so the backward stays two-pass and deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd import attn_fwd_key_range, key_padding_tile, load_row_tile, row_tile_source, schedule_tile


@triton.jit
def _bwd_preprocess_kernel(Out, dOut, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                           num_q_heads, seq_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """``delta[row] = sum_d out[row, d] * dout[row, d]`` in fp32."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    batch = bh // num_q_heads
    head = bh % num_q_heads
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + batch * stride_ob + head * stride_oh + rows[:, None] * stride_om + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(dOut + batch * stride_dob + head * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)  # fmt: skip
    tl.store(Delta + bh * seq_q + rows, tl.sum(o * do, 1), mask=rows < seq_q)


@triton.jit
def _load_row_stats(LSE, Delta, row_base, rows, seq_q):
    """LSE in log2 units with empty rows (``-inf``) and out-of-range rows mapped to ``+inf`` so their p is 0."""
    in_range = rows < seq_q
    lse = tl.load(LSE + row_base + rows, mask=in_range, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + row_base + rows, mask=in_range, other=0.0)
    return lse, delta


@triton.jit
def attn_bwd_dkdv_tile(
    dk, dv, k, v, key_keep, cols,
    q_src, do_src, LSE, Delta, row_base, start_m, offs_m, offs_d,
    stride_qm, stride_dom, seq_q, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_CAUSAL: tl.constexpr,
):  # fmt: skip
    """Accumulate one query tile's contribution to the dK/dV of a key tile (scores handled transposed: keys x rows)."""
    rows = start_m + offs_m
    q = load_row_tile(q_src, start_m, rows, offs_d, stride_qm, seq_q, HEAD_DIM, BLOCK_D, True)
    do = load_row_tile(do_src, start_m, rows, offs_d, stride_dom, seq_q, HEAD_DIM, BLOCK_D, True)
    lse, delta = _load_row_stats(LSE, Delta, row_base, rows, seq_q)

    s_t = tl.dot(k, tl.trans(q))
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
    keep = key_keep[:, None]
    if MASK_CAUSAL:
        keep = keep & (cols[:, None] <= rows[None, :] + causal_offset)
    p_t = tl.where(keep, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit(do_not_specialize=["section_heads"])  # as the forward's
def _dense_bwd_dkdv_kernel(
    Q, K, V, KPAD, dOut, LSE, Delta, dK, dV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_kpad_b,
    num_q_heads, num_kv_heads, group_size, seq_q, seq_k, scale,
    section_heads,  # schedule_tile's sections of the batch * num_kv_heads heads
    seq_k_bucket, tma_ok,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    # Early key tiles are seen by the most query rows: they are the heavy ranks.
    rank, bh = schedule_tile(tl.cdiv(seq_k, BLOCK_N), section_heads)
    start_n = rank * BLOCK_N
    batch = bh // num_kv_heads
    kv_head = bh % num_kv_heads

    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    key_keep = cols < seq_k
    if HAS_KEY_PADDING:
        key_keep = key_keep & (tl.load(KPAD + batch * stride_kpad_b + cols, mask=cols < seq_k, other=0) != 0)

    qk_scale = scale * 1.4426950408889634
    causal_offset = seq_k - seq_q
    if CAUSAL:
        # Rows that see any key of this tile start at start_n - offset; rows past start_n + BLOCK_N - 1 - offset see all.
        q_lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        q_full = tl.maximum(tl.cdiv(start_n + BLOCK_N - 1 - causal_offset, BLOCK_M) * BLOCK_M, q_lo)
    else:
        q_lo = 0
        q_full = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Never pipelined: with seq_q == 1 (specialised) the row loops below fold away, and Triton would then pipeline this
    # loop and fail on the descriptor creation it cannot predicate.
    for g in tl.range(group_size, num_stages=1):
        q_head = kv_head * group_size + g
        q_src = row_tile_source(Q + batch * stride_qb + q_head * stride_qh, seq_q, stride_qm, HEAD_DIM, BLOCK_M,
                                BLOCK_D, USE_TMA)  # fmt: skip
        do_src = row_tile_source(dOut + batch * stride_dob + q_head * stride_doh, seq_q, stride_dom, HEAD_DIM,
                                 BLOCK_M, BLOCK_D, USE_TMA)  # fmt: skip
        row_base = (batch * num_q_heads + q_head) * seq_q
        for start_m in tl.range(q_lo, q_full, BLOCK_M):
            dk, dv = attn_bwd_dkdv_tile(
                dk, dv, k, v, key_keep, cols, q_src, do_src, LSE, Delta, row_base, start_m, offs_m, offs_d,
                stride_qm, stride_dom, seq_q, causal_offset, qk_scale, HEAD_DIM, BLOCK_D, True,
            )  # fmt: skip
        for start_m in tl.range(q_full, seq_q, BLOCK_M):
            dk, dv = attn_bwd_dkdv_tile(
                dk, dv, k, v, key_keep, cols, q_src, do_src, LSE, Delta, row_base, start_m, offs_m, offs_d,
                stride_qm, stride_dom, seq_q, causal_offset, qk_scale, HEAD_DIM, BLOCK_D, False,
            )  # fmt: skip

    dk = dk * scale
    tl.store(dK + batch * stride_dkb + kv_head * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :],
             dk.to(dK.dtype.element_ty), mask=kv_mask)  # fmt: skip
    tl.store(dV + batch * stride_dvb + kv_head * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :],
             dv.to(dV.dtype.element_ty), mask=kv_mask)  # fmt: skip


@triton.jit
def attn_bwd_dq_tile(
    dq, q, do, lse, delta, rows, k_src, v_src, kpad, start_n, offs_n, offs_d,
    stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
):  # fmt: skip
    """Accumulate one key tile's contribution to dQ of a query tile (``kpad``: the tile's padding bytes)."""
    cols = start_n + offs_n
    k = load_row_tile(k_src, start_n, cols, offs_d, stride_kn, seq_k, HEAD_DIM, BLOCK_D, True)
    v = load_row_tile(v_src, start_n, cols, offs_d, stride_vn, seq_k, HEAD_DIM, BLOCK_D, True)
    s = tl.dot(q, tl.trans(k))
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    keep = cols[None, :] < seq_k
    if MASK_CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
    if HAS_KEY_PADDING:
        keep = keep & (kpad[None, :] != 0)
    p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def attn_bwd_dq_range(
    dq, q, do, lse, delta, rows, k_src, v_src, kpad_base, lo, hi, offs_n, offs_d,
    stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_CAUSAL: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
):  # fmt: skip
    """Key tiles ``[lo, hi)`` of dQ, padding bytes loaded a tile ahead (see the forward's ``key_padding_tile``)."""
    kpad_next = key_padding_tile(kpad_base, lo, offs_n, seq_k, HAS_KEY_PADDING)
    for start_n in tl.range(lo, hi, BLOCK_N):
        kpad = kpad_next
        kpad_next = key_padding_tile(kpad_base, start_n + BLOCK_N, offs_n, seq_k, HAS_KEY_PADDING)
        dq = attn_bwd_dq_tile(dq, q, do, lse, delta, rows, k_src, v_src, kpad, start_n, offs_n, offs_d,
                              stride_kn, stride_vn, seq_k, causal_offset, qk_scale, HEAD_DIM, BLOCK_D, MASK_CAUSAL,
                              HAS_KEY_PADDING)  # fmt: skip
    return dq


@triton.jit(do_not_specialize=["section_heads"])  # as the forward's
def _dense_bwd_dq_kernel(
    Q, K, V, KPAD, dOut, LSE, Delta, dQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_kpad_b,
    num_q_heads, group_size, seq_q, seq_k, scale,
    section_heads,  # schedule_tile's sections of the batch * num_q_heads heads
    seq_k_bucket, tma_ok,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    num_tiles = tl.cdiv(seq_q, BLOCK_M)
    rank, bh = schedule_tile(num_tiles, section_heads)
    start_m = (num_tiles - 1 - rank) * BLOCK_M  # late query tiles see the most keys: they are the heavy ranks
    batch = bh // num_q_heads
    q_head = bh % num_q_heads
    kv_head = q_head // group_size

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    load_mask = (rows[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + batch * stride_qb + q_head * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=load_mask, other=0.0)  # fmt: skip
    do = tl.load(dOut + batch * stride_dob + q_head * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=load_mask, other=0.0)  # fmt: skip
    lse, delta = _load_row_stats(LSE, Delta, bh * seq_q, rows, seq_q)

    k_src = row_tile_source(K + batch * stride_kb + kv_head * stride_kh, seq_k, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D,
                            USE_TMA)  # fmt: skip
    v_src = row_tile_source(V + batch * stride_vb + kv_head * stride_vh, seq_k, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D,
                            USE_TMA)  # fmt: skip
    kpad_base = KPAD + batch * stride_kpad_b
    qk_scale = scale * 1.4426950408889634
    causal_offset = seq_k - seq_q
    full_hi, hi = attn_fwd_key_range(start_m, seq_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = attn_bwd_dq_range(dq, q, do, lse, delta, rows, k_src, v_src, kpad_base, 0, full_hi, offs_n, offs_d,
                           stride_kn, stride_vn, seq_k, causal_offset, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, False,
                           HAS_KEY_PADDING)  # fmt: skip
    dq = attn_bwd_dq_range(dq, q, do, lse, delta, rows, k_src, v_src, kpad_base, full_hi, hi, offs_n, offs_d,
                           stride_kn, stride_vn, seq_k, causal_offset, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL,
                           HAS_KEY_PADDING)  # fmt: skip
    dq = dq * scale
    tl.store(dQ + batch * stride_dqb + q_head * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(dQ.dtype.element_ty), mask=load_mask)  # fmt: skip
