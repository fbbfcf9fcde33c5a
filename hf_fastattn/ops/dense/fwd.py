"""FlashAttention-2 style forward kernel: the skeleton every block-sparse kernel in hf_fastattn shares.

Layout is HF's: q ``(B, H_q, S_q, D)``, k/v ``(B, H_kv, S_kv, D)``, any strides with a unit last-dim stride.

The work for one query tile is split into three reusable pieces:

* :func:`attn_fwd_tile` folds one key tile into the running softmax state ``(acc, m_i, l_i)``. Sparse kernels call it
  for the key tiles they select; the dense kernel calls it for every tile through :func:`attn_fwd_tile_range`. It is
  :func:`attn_fwd_scores` (``Q K^T`` with the mask) followed by :func:`attn_fwd_update` (online softmax, V load and
  ``P V``), so a kernel can decide on the scores before paying for V (BSFA).
* :func:`attn_fwd_tile_ranges` runs a key range in two parts, unmasked tiles then masked ones (decode reuses it).
* :func:`attn_fwd_key_range` gives the key tiles a query tile may see: the fully visible ones (no element masking) and
  the tail that needs the causal / sequence-end mask.
* :func:`attn_fwd_finish` normalises the accumulator and returns the log-sum-exp.
* :func:`schedule_tile` gives a program of a 1-D grid its tile and head (the order balances causal work).

K and V are read through a *tile source*: the head's base pointer, or a TMA tensor descriptor over the head's
``(S_kv, D)`` rows (:func:`row_tile_source`, Hopper and newer), so every kernel on the skeleton gets the TMA path by
building its sources with ``USE_TMA``. ``FAST_EXP`` moves part of the softmax exponentials from the MUFU unit to the FMA
units (:func:`exp2_fma`).

Scores live in log2 units (``qk_scale = scale * log2(e)``) so the exponential is a single ``exp2``. Causality is aligned
bottom-right: query row ``i`` sees key ``j`` iff ``j <= i + (S_kv - S_q)``. A query row that sees no key returns zeros
and ``lse = -inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# 2**f on [-0.5, 0.5] to 7.5e-5 relative error: a degree-3 polynomial fitted for minimax relative error (Lawson's
# iteration), rounded to fp32. Degree 2 would miss the 1e-3 bound (about 1.7e-3).
_EXP2_C0 = tl.constexpr(0.9999281167984009)
_EXP2_C1 = tl.constexpr(0.6932609677314758)
_EXP2_C2 = tl.constexpr(0.24261054396629333)
_EXP2_C3 = tl.constexpr(0.05517132207751274)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer held in the low mantissa bits
_EXP2_FLOOR = tl.constexpr(-125.0)  # below it the exponent field would underflow; exp2 there is taken as exactly 0


@triton.jit
def exp2_fma(x):
    """``2**x`` on the FMA/ALU pipes instead of the MUFU unit (VEXP / FlashAttention-4 style).

    ``x = j + f`` with ``j`` the nearest integer (magic-number rounding, no conversion instruction) and ``|f| <= 0.5``;
    ``2**f`` is a Horner polynomial, and ``j`` goes straight into the exponent bits with an integer add. Inputs below
    -125 (masked scores, ``-inf``) give exactly 0, so empty rows still sum to 0.
    """
    clamped = tl.maximum(x, _EXP2_FLOOR)
    rounded = clamped + _ROUND_MAGIC
    frac = clamped - (rounded - _ROUND_MAGIC)
    poly = _EXP2_C3 * frac + _EXP2_C2
    poly = poly * frac + _EXP2_C1
    poly = poly * frac + _EXP2_C0
    # The magic constant's own bits shift out past bit 31, leaving j << 23 (two's complement for negative j).
    exponent = rounded.to(tl.int32, bitcast=True) << 23
    result = (poly.to(tl.int32, bitcast=True) + exponent).to(tl.float32, bitcast=True)
    return tl.where(x < _EXP2_FLOOR, 0.0, result)


@triton.jit
def softmax_exp2(x, FAST_EXP: tl.constexpr):
    """The softmax numerator ``exp2(x)`` of a score tile. ``FAST_EXP``: 0 = all on MUFU (``tl.math.exp2``);
    1 = every other column on the FMA units (:func:`exp2_fma`) so both pipes work at once; 2 = all on the FMA units."""
    if FAST_EXP == 0:
        return tl.math.exp2(x)
    elif FAST_EXP == 1:
        # Adjacent columns sit in one thread's registers in the MMA layout, so the split and join move no data.
        even, odd = tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))
        return tl.reshape(tl.join(tl.math.exp2(even), exp2_fma(odd)), [x.shape[0], x.shape[1]])
    else:
        return exp2_fma(x)


@triton.jit
def row_tile_source(base, seq_k, stride_n, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_TMA: tl.constexpr):  # fmt: skip
    """What the tile functions read one head's K or V (or, in the backward, Q or dO) through: with ``USE_TMA``
    (Hopper and newer) a TMA descriptor over its ``(seq_k, HEAD_DIM)`` rows, which zero-fills out-of-range rows and
    columns; else the base pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(
            base, shape=[seq_k, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, BLOCK_D]
        )
    else:
        return base


@triton.jit
def load_row_tile(source, start_n, cols, offs_d, stride_n, seq_k, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASK_SEQ_END: tl.constexpr):  # fmt: skip
    """The ``(BLOCK_N, BLOCK_D)`` tile of rows ``cols = start_n + arange(BLOCK_N)`` from a tile source, zeros outside."""
    if isinstance(source, tl.tensor_descriptor):
        return source.load([start_n, 0])
    else:
        ptrs = source + cols[:, None] * stride_n + offs_d[None, :]
        if MASK_SEQ_END and BLOCK_D != HEAD_DIM:
            return tl.load(ptrs, mask=(cols[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif MASK_SEQ_END:
            return tl.load(ptrs, mask=cols[:, None] < seq_k, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def key_padding_tile(kpad_base, start_n, offs_n, seq_k, HAS_KEY_PADDING: tl.constexpr):
    """The key-padding bytes of key tile ``[start_n, start_n + BLOCK_N)`` (0 past the keys), or 0 without padding.

    Tile loops load the *next* tile's bytes one iteration ahead and pass each iteration the bytes loaded in the one
    before: Triton's pipeliner prefetches only the loads that feed a dot, so a load used in its own iteration waits a
    full memory latency every tile (loaded ahead, the padded forward took 14-22% less time at 8k on the H100)."""
    if HAS_KEY_PADDING:
        cols = start_n + offs_n
        return tl.load(kpad_base + cols, mask=cols < seq_k, other=0)
    else:
        return 0


@triton.jit
def attn_fwd_scores(
    q,
    k_base,
    kpad,
    start_n,
    offs_m,
    offs_n,
    offs_d,
    stride_kn,
    seq_k,
    causal_offset,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_SEQ_END: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
):
    """Raw scores ``Q K^T`` of key tile ``[start_n, start_n + BLOCK_N)`` (fp32, unscaled), invisible keys at ``-inf``.
    ``k_base`` is a tile source (:func:`row_tile_source`); ``kpad`` the tile's :func:`key_padding_tile`."""
    cols = start_n + offs_n
    k = tl.trans(load_row_tile(k_base, start_n, cols, offs_d, stride_kn, seq_k, HEAD_DIM, BLOCK_D, MASK_SEQ_END))
    s = tl.dot(q, k)
    if MASK_CAUSAL or MASK_SEQ_END or HAS_KEY_PADDING:
        keep = cols[None, :] < seq_k
        if MASK_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + causal_offset)
        if HAS_KEY_PADDING:
            keep = keep & (kpad[None, :] != 0)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def attn_fwd_update(
    acc,
    m_i,
    l_i,
    s,
    v_base,
    start_n,
    offs_n,
    offs_d,
    stride_vn,
    seq_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_SEQ_END: tl.constexpr,
    MAY_HAVE_EMPTY_ROWS: tl.constexpr,
    FAST_EXP: tl.constexpr = 0,
    P_GAIN_LOG2: tl.constexpr = 0,
    V_TRANSPOSED: tl.constexpr = False,
):
    """Fold the scores ``s`` of one key tile (from :func:`attn_fwd_scores`) and its V tile into ``(acc, m_i, l_i)``.

    FP8 kernels set ``P_GAIN_LOG2`` (P, and so ``l_i``, come out ``2**P_GAIN_LOG2`` times larger, so that small
    probabilities survive the cast to e4m3; the gain cancels in ``acc / l_i``) and ``V_TRANSPOSED`` (``v_base`` is a
    descriptor over ``V^T``, the K-major operand Hopper's FP8 MMA needs)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MAY_HAVE_EMPTY_ROWS:
        # Rows with nothing visible yet keep m = -inf; shift them by 0 so exp2 yields 0 rather than NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    if P_GAIN_LOG2 != 0:
        p = softmax_exp2(s * qk_scale - (m_shift - P_GAIN_LOG2)[:, None], FAST_EXP)
    else:
        p = softmax_exp2(s * qk_scale - m_shift[:, None], FAST_EXP)
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]

    if V_TRANSPOSED:
        v = tl.trans(v_base.load([0, start_n]))
    else:
        v = load_row_tile(v_base, start_n, start_n + offs_n, offs_d, stride_vn, seq_k, HEAD_DIM, BLOCK_D, MASK_SEQ_END)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def attn_fwd_tile(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    kpad,
    start_n,
    offs_m,
    offs_n,
    offs_d,
    stride_kn,
    stride_vn,
    seq_k,
    causal_offset,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_SEQ_END: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    FAST_EXP: tl.constexpr = 0,
):
    """Fold key tile ``[start_n, start_n + BLOCK_N)`` (its padding bytes ``kpad``, from :func:`key_padding_tile`) into
    the online-softmax state of one query tile."""
    s = attn_fwd_scores(
        q, k_base, kpad, start_n, offs_m, offs_n, offs_d, stride_kn, seq_k, causal_offset,
        HEAD_DIM, BLOCK_D, MASK_CAUSAL, MASK_SEQ_END, HAS_KEY_PADDING,
    )  # fmt: skip
    return attn_fwd_update(
        acc, m_i, l_i, s, v_base, start_n, offs_n, offs_d, stride_vn, seq_k, qk_scale,
        HEAD_DIM, BLOCK_D, MASK_SEQ_END, MASK_CAUSAL or MASK_SEQ_END or HAS_KEY_PADDING, FAST_EXP,
    )  # fmt: skip


@triton.jit
def attn_fwd_tile_range(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    kpad_base,
    lo,
    hi,
    offs_m,
    offs_n,
    offs_d,
    stride_kn,
    stride_vn,
    seq_k,
    causal_offset,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_SEQ_END: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    FAST_EXP: tl.constexpr = 0,
):
    """Every key tile in ``[lo, hi)`` (multiples of ``BLOCK_N``), in order; padding bytes loaded a tile ahead."""
    kpad_next = key_padding_tile(kpad_base, lo, offs_n, seq_k, HAS_KEY_PADDING)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kpad = kpad_next
        kpad_next = key_padding_tile(kpad_base, start_n + BLOCK_N, offs_n, seq_k, HAS_KEY_PADDING)
        acc, m_i, l_i = attn_fwd_tile(
            acc, m_i, l_i, q, k_base, v_base, kpad, start_n, offs_m, offs_n, offs_d,
            stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
            HEAD_DIM, BLOCK_D, MASK_CAUSAL, MASK_SEQ_END, HAS_KEY_PADDING, FAST_EXP,
        )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def attn_fwd_tile_ranges(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    kpad_base,
    lo,
    unmasked_hi,
    hi,
    offs_m,
    offs_n,
    offs_d,
    stride_kn,
    stride_vn,
    seq_k,
    causal_offset,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    FAST_EXP: tl.constexpr = 0,
):
    """Key tiles ``[lo, hi)``: those before ``unmasked_hi`` without element masks (every row sees all their keys),
    the rest with the causal (when ``CAUSAL``) and sequence-end masks."""
    acc, m_i, l_i = attn_fwd_tile_range(
        acc, m_i, l_i, q, k_base, v_base, kpad_base, lo, unmasked_hi, offs_m, offs_n, offs_d,
        stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, False, False, HAS_KEY_PADDING, FAST_EXP,
    )  # fmt: skip
    return attn_fwd_tile_range(
        acc, m_i, l_i, q, k_base, v_base, kpad_base, unmasked_hi, hi, offs_m, offs_n, offs_d,
        stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, True, HAS_KEY_PADDING, FAST_EXP,
    )  # fmt: skip


@triton.jit
def attn_fwd_key_range(
    start_m, seq_k, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """Key tiles a query tile starting at ``start_m`` visits: ``[0, full_hi)`` need no element mask, ``[full_hi, hi)`` do."""
    if CAUSAL:
        # The last row of the tile sees keys <= start_m + BLOCK_M - 1 + offset; the first row sees <= start_m + offset.
        hi = tl.minimum(seq_k, start_m + BLOCK_M + causal_offset)
        full_hi = tl.minimum(seq_k, start_m + causal_offset + 1)
    else:
        hi = seq_k
        full_hi = seq_k
    hi = tl.maximum(hi, 0)
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    return full_hi, hi


@triton.jit
def attn_fwd_finish(acc, m_i, l_i):
    """Normalise the accumulator; returns the output tile (fp32) and the natural-log LSE (``-inf`` for empty rows)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    return out, lse


@triton.jit
def schedule_tile(num_tiles, section_heads):
    """``(rank, head)`` of this program in a 1-D grid of ``num_tiles * num_heads`` programs; rank 0 is the heaviest
    tile (each kernel maps ranks to its tiles).

    Heads are cut into consecutive sections of ``section_heads`` (a divisor of the head count). Inside a section the
    programs are rank-major: rank 0 of every head of the section, then rank 1, ... A causal section so starts all its
    heavy tiles before any light one, instead of the last head's heavy tiles starting at the end of the grid and
    running alone. ``section_heads = 1`` is the head-major order ``rank = pid % num_tiles, head = pid // num_tiles``.
    """
    pid = tl.program_id(0)
    section_programs = section_heads * num_tiles
    local = pid % section_programs
    return local // section_heads, pid // section_programs * section_heads + local % section_heads


# The section size changes with the shape (1 for the head-major order): not specialised, so no recompile for it.
@triton.jit(do_not_specialize=["section_heads"])
def _dense_fwd_kernel(
    Q, K, V, KPAD, Out, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_kpad_b,
    num_q_heads, group_size, seq_q, seq_k, scale,
    section_heads,  # schedule_tile's sections of the batch * num_q_heads heads
    seq_k_bucket, tma_ok,  # autotune keys only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    USE_TMA: tl.constexpr,
    FAST_EXP: tl.constexpr,
):  # fmt: skip
    num_tiles = tl.cdiv(seq_q, BLOCK_M)
    rank, bh = schedule_tile(num_tiles, section_heads)
    start_m = (num_tiles - 1 - rank) * BLOCK_M  # late query tiles see the most keys: they are the heavy ranks
    batch = bh // num_q_heads
    q_head = bh % num_q_heads
    kv_head = q_head // group_size

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + batch * stride_qb + q_head * stride_qh
    k_src = row_tile_source(K + batch * stride_kb + kv_head * stride_kh, seq_k, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D,
                            USE_TMA)  # fmt: skip
    v_src = row_tile_source(V + batch * stride_vb + kv_head * stride_vh, seq_k, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D,
                            USE_TMA)  # fmt: skip
    kpad_base = KPAD + batch * stride_kpad_b

    row_mask = offs_m < seq_q
    if BLOCK_D != HEAD_DIM:
        q_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        q_mask = row_mask[:, None]
    q_src = row_tile_source(q_base, seq_q, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    q = load_row_tile(q_src, start_m, offs_m, offs_d, stride_qm, seq_q, HEAD_DIM, BLOCK_D, True)

    qk_scale = scale * 1.4426950408889634
    causal_offset = seq_k - seq_q
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_hi, hi = attn_fwd_key_range(start_m, seq_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = attn_fwd_tile_ranges(
        acc, m_i, l_i, q, k_src, v_src, kpad_base, 0, full_hi, hi, offs_m, offs_n, offs_d,
        stride_kn, stride_vn, seq_k, causal_offset, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, HAS_KEY_PADDING, FAST_EXP,
    )  # fmt: skip

    out, lse = attn_fwd_finish(acc, m_i, l_i)
    o_base = Out + batch * stride_ob + q_head * stride_oh
    if USE_TMA:
        o_desc = row_tile_source(o_base, seq_q, stride_om, HEAD_DIM, BLOCK_M, BLOCK_D, True)
        o_desc.store([start_m, 0], out.to(Out.dtype.element_ty))  # TMA drops rows and columns out of range
    else:
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * seq_q + offs_m, lse, mask=row_mask)
