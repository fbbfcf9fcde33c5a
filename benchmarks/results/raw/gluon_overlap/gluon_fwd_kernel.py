"""Hopper forward with the softmax overlapped with the tensor cores (FlashAttention-3's intra-warpgroup pipelining).

Written in Gluon, Triton's explicit-layout dialect, because Triton's automatic pipeliner cannot express the overlap:
it waits for a ``tl.dot`` right after issuing it whenever its result is used in the same loop iteration, so the
softmax of a tile never runs while the tensor cores work (benchmarks/NOTES.md). Here each iteration

1. refills the K and V ring slots freed by the previous iteration with TMA loads ``NUM_STAGES`` tiles ahead,
2. issues ``S_{j+1} = Q K_{j+1}^T`` as an asynchronous warpgroup MMA,
3. computes the softmax of tile ``j`` (whose scores the previous iteration left) while that product runs,
4. issues ``O += P_j V_j`` and waits for both products.

Same contract as ``hf_fastattn.ops.dense.fwd._dense_fwd_kernel`` (HF layout, bottom-right causality, empty rows give
zeros and ``lse = -inf``), for 16-bit inputs without key padding. An experiment, not wired into the library: correct
on the H100 but no faster than the Triton forward at d128 and slower at d64 (benchmarks/NOTES.md, "Softmax overlapped
with the tensor cores, in Gluon"); check_gluon_fwd.py beside it is the run.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _schedule_tile(num_tiles, section_heads):
    """``(rank, head)`` of this program, the order of :func:`~.fwd.schedule_tile` (rank 0 = heaviest tile)."""
    pid = gl.program_id(0)
    section_programs = section_heads * num_tiles
    local = pid % section_programs
    return local // section_heads, pid // section_programs * section_heads + local % section_heads


@gluon.jit
def _head_descriptor(base, seq, stride_row, BLOCK_ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    """A TMA descriptor over one head's ``(seq, HEAD_DIM)`` rows: out-of-range rows load as zeros, stores drop them."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_ROWS, HEAD_DIM], base.dtype.element_ty)
    return tma.make_tensor_descriptor(
        base, shape=[seq, HEAD_DIM], strides=[stride_row, 1], block_shape=[BLOCK_ROWS, HEAD_DIM], layout=layout
    )


@gluon.jit
def _issue_kv_load(desc, tile, n_tiles, bars, smem, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Start loading key tile ``tile`` into its ring slot (nothing past the last tile)."""
    slot = tile % NUM_STAGES
    pred = tile < n_tiles
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [tile * BLOCK_N, 0], bars.index(slot), smem.index(slot), pred=pred)


@gluon.jit
def _wait_kv(bars, tile, NUM_STAGES: gl.constexpr):
    """Wait for key tile ``tile``'s load; slot ``s`` holds tiles ``s, s + NUM_STAGES, ...``, one barrier phase each."""
    mbarrier.wait(bars.index(tile % NUM_STAGES), (tile // NUM_STAGES) & 1)


@gluon.jit
def _masked_scores(s, start_m, start_n, seq_k, causal_offset, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr):  # fmt: skip
    """Scores with the keys past ``seq_k`` (and, when ``CAUSAL``, those after each row's position) at ``-inf``."""
    cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
    keep = gl.expand_dims(cols < seq_k, 0)
    if CAUSAL:
        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s.type.layout))
        keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1) + causal_offset)
    return gl.where(keep, s, float("-inf"))


@gluon.jit
def _softmax_tile(s, m_i, l_i, qk_scale, p_layout: gl.constexpr, dtype: gl.constexpr):
    """Online-softmax step for a score tile: ``(P in the MMA operand layout, m_new, l_new, alpha)``."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    # Rows with nothing visible yet keep m = -inf; shift them by 0 so exp2 yields 0 rather than NaN.
    m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_shift, 1))
    alpha = gl.exp2(m_i - m_shift)
    l_new = l_i * alpha + gl.sum(p, 1)
    return gl.convert_layout(p.to(dtype), p_layout), m_new, l_new, alpha


@gluon.jit(do_not_specialize=["section_heads"])
def _dense_fwd_wgmma_kernel(
    Q, K, V, Out, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_q_heads, group_size, seq_q, seq_k, scale,
    section_heads,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    num_warps: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    num_tiles = gl.cdiv(seq_q, BLOCK_M)
    rank, bh = _schedule_tile(num_tiles, section_heads)
    start_m = (num_tiles - 1 - rank) * BLOCK_M  # late query tiles see the most keys: they are the heavy ranks
    batch = bh // num_q_heads
    q_head = bh % num_q_heads
    kv_head = q_head // group_size

    q_desc = _head_descriptor(Q + batch * stride_qb + q_head * stride_qh, seq_q, stride_qm, BLOCK_M, HEAD_DIM)
    k_desc = _head_descriptor(K + batch * stride_kb + kv_head * stride_kh, seq_k, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = _head_descriptor(V + batch * stride_vb + kv_head * stride_vh, seq_k, stride_vn, BLOCK_N, HEAD_DIM)
    o_desc = _head_descriptor(Out + batch * stride_ob + q_head * stride_oh, seq_q, stride_om, BLOCK_M, HEAD_DIM)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    causal_offset = seq_k - seq_q
    if CAUSAL:
        hi = gl.minimum(seq_k, start_m + BLOCK_M + causal_offset)
        # Tiles from here on hold keys that some row of this tile must not see (or keys past the end).
        mask_from = gl.minimum(gl.maximum(start_m + causal_offset + 1, 0), seq_k) // BLOCK_N * BLOCK_N
    else:
        hi = seq_k
        mask_from = seq_k // BLOCK_N * BLOCK_N
    n_tiles = gl.cdiv(gl.maximum(hi, 0), BLOCK_N)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [start_m, 0], q_bar, q_smem)
    for i in gl.static_range(NUM_STAGES):
        _issue_kv_load(k_desc, i, n_tiles, k_bars, k_smem, BLOCK_N, NUM_STAGES)
        _issue_kv_load(v_desc, i, n_tiles, v_bars, v_smem, BLOCK_N, NUM_STAGES)

    qk_scale = scale * LOG2E
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)

    if n_tiles > 0:
        _wait_kv(k_bars, 0, NUM_STAGES)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        for j in range(n_tiles - 1):
            # Every product of the previous iteration is done: refill the K slot of tile j and the V slot of j - 1.
            _issue_kv_load(k_desc, j + NUM_STAGES, n_tiles, k_bars, k_smem, BLOCK_N, NUM_STAGES)
            if j > 0:
                _issue_kv_load(v_desc, j - 1 + NUM_STAGES, n_tiles, v_bars, v_smem, BLOCK_N, NUM_STAGES)
            _wait_kv(k_bars, j + 1, NUM_STAGES)
            s_token = warpgroup_mma(q_smem, k_smem.index((j + 1) % NUM_STAGES).permute((1, 0)), s_zero,
                                    use_acc=False, is_async=True)  # fmt: skip
            # Tile j's softmax runs while the tensor cores compute tile j + 1's scores.
            if j * BLOCK_N >= mask_from:
                s = _masked_scores(s, start_m, j * BLOCK_N, seq_k, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, p_layout, dtype)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            _wait_kv(v_bars, j, NUM_STAGES)
            o_token = warpgroup_mma(p, v_smem.index(j % NUM_STAGES), acc, is_async=True)
            # A single wait for both products. ptxas hoists a wait above independent arithmetic (a separate wait for
            # the scores alone ended up above the softmax); this one follows P V, which needs the softmax's P.
            s, acc, p = warpgroup_mma_wait(0, deps=(s_token, o_token, p))

        last = n_tiles - 1
        if last * BLOCK_N >= mask_from:
            s = _masked_scores(s, start_m, last * BLOCK_N, seq_k, causal_offset, CAUSAL, BLOCK_M, BLOCK_N)
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, p_layout, dtype)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        _wait_kv(v_bars, last, NUM_STAGES)
        acc = warpgroup_mma(p, v_smem.index(last % NUM_STAGES), acc, is_async=True)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
    # Q's buffer is free now: the output tile leaves through it.
    q_smem.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [start_m, 0], q_smem)

    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) / LOG2E)
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + bh * seq_q + offs_m, lse, mask=offs_m < seq_q)
    tma.store_wait(pendings=0)
