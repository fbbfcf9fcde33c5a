"""FP8 (e4m3) attention forward, FlashAttention-3 style: both matrix products on the FP8 tensor cores.

Scaling (all scales fp32, ``scale = amax / 448`` so each block uses e4m3's full range):

* Q per block of :data:`FP8_BLOCK` rows of one head, K the same: a (query tile, key tile) pair of the kernel, whose
  tiles are those blocks, folds both scales into the softmax scale, so the inner loop pays nothing for them.
* V per channel (``d``) of one head, over the whole sequence: the scale factors out of ``P V`` and is applied once to
  the output. V is stored transposed, ``(B, H, D, S)``, because Hopper's FP8 MMA reads both operands K-major.
* K is first centred: its fp32 mean over the key sequence (per batch and KV head) is subtracted (SageAttention's
  smoothing). Every score of a query row drops by the same ``q · mean``, which softmax ignores under any mask, so the
  result is unchanged, while K's rounding error now follows how much the keys vary, not their common offset.
* Q and K are then multiplied by a ±1 Hadamard matrix (incoherent processing) when the head dim is a power of two;
  the softmax scale absorbs its factor ``D``.
* Optionally (``smooth_q``) Q is then smoothed per block (SageAttention2): each block's mean row is subtracted, so
  only the rows' deviations are rounded, and the mean row's fp32 scores against every key are added back to the
  block's scores in the kernel (one bias vector per Q block, read once per key tile).
* P is cast to e4m3 with a gain of ``2**8`` (P in ``[0, 256]``), so probabilities down to ``2**-17`` of the row
  maximum survive instead of flushing below e4m3's smallest subnormal ``2**-9``.

Forward only (no autograd), and only where TMA is available (Hopper and newer, or the interpreter when tests force it).
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from .._runtime import ensure_triton_allocator, interpreter_enabled, key_padding_bytes, next_power_of_2, tma_usable
from .attention import check_attention_inputs, empty_hf_output, key_padding_arg, unit_last_stride
from .fwd import (
    LOG2E,
    attn_fwd_finish,
    attn_fwd_key_range,
    attn_fwd_scores,
    attn_fwd_update,
    key_padding_tile,
    row_tile_source,
)
from .naive import fp8_scale, hadamard_matrix

logger = logging.getLogger("hf_fastattn")

FP8_DTYPE = torch.float8_e4m3fn
FP8_BLOCK = 128  # rows per Q/K scale block, and the kernel's query and key tile
_P_GAIN_LOG2 = tl.constexpr(8)
_INTERPRETER_BLOCK = 16


@triton.jit
def _load_head_rows(X, stride_xb, stride_xh, stride_xs, num_heads, seq, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """This program's ``BLOCK_S`` rows of one head of ``X (B, H, S, D)`` (zeros outside), with their row indices,
    channel offsets, in-range mask and flat ``batch * H + head`` index."""
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seq) & (offs_d[None, :] < HEAD_DIM)
    base = X + (bh // num_heads) * stride_xb + (bh % num_heads) * stride_xh
    x = tl.load(base + rows[:, None] * stride_xs + offs_d[None, :], mask=mask, other=0.0)
    return x, rows, offs_d, mask, bh


@triton.jit
def _quantize_rows_kernel(X, Xq, Scale, Rotation, Mean, BlockMean, stride_xb, stride_xh, stride_xs, num_heads, seq,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                          ROTATE: tl.constexpr, SUBTRACT_MEAN: tl.constexpr,
                          SUBTRACT_BLOCK_MEAN: tl.constexpr):  # fmt: skip
    """One block of ``BLOCK_S`` rows of one head, less the head's fp32 per-channel ``Mean`` when ``SUBTRACT_MEAN``,
    times the ±1 ``Rotation`` when ``ROTATE``: its amax scale, and the rows in e4m3 (contiguous output). With
    ``SUBTRACT_BLOCK_MEAN`` the block's own mean row (after those steps) is subtracted too and stored to
    ``BlockMean`` (fp32, one row per block)."""
    x, rows, offs_d, mask, bh = _load_head_rows(
        X, stride_xb, stride_xh, stride_xs, num_heads, seq, HEAD_DIM, BLOCK_D, BLOCK_S
    )
    if ROTATE:
        rotation = tl.load(Rotation + offs_d[:, None] * BLOCK_D + offs_d[None, :])
        # ±1 entries are exact in bf16/fp16, and the products accumulate in fp32.
        x = tl.dot(x, rotation.to(x.dtype))
    else:
        x = x.to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(Mean + bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        if ROTATE:
            # (x - mean) H as x H - mean H, all in fp32: the dot above keeps its exact 16-bit operands, where an fp32
            # x - mean would be rounded to tf32 by the tensor cores.
            mean = tl.sum(mean[:, None] * rotation, 0)
        x = tl.where(mask, x - mean[None, :], 0.0)  # rows past the sequence stay out of the block's amax
    if SUBTRACT_BLOCK_MEAN:
        block_mean = tl.sum(x, 0) / tl.minimum(seq - tl.program_id(0) * BLOCK_S, BLOCK_S)  # rows past seq are 0
        tl.store(BlockMean + (bh * tl.num_programs(0) + tl.program_id(0)) * HEAD_DIM + offs_d, block_mean,
                 mask=offs_d < HEAD_DIM)  # fmt: skip
        x = tl.where(mask, x - block_mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.where(amax > 0.0, amax / 448.0, 1.0)
    tl.store(Xq + (bh * seq + rows[:, None]) * HEAD_DIM + offs_d[None, :], (x / scale).to(Xq.dtype.element_ty),
             mask=mask)  # fmt: skip
    tl.store(Scale + bh * tl.num_programs(0) + tl.program_id(0), scale)


@triton.jit
def _quantize_transposed_kernel(X, Xq, Scale, stride_xb, stride_xh, stride_xs, num_heads, seq, seq_padded,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """``BLOCK_S`` rows of one head divided by the head's per-channel ``Scale``, written transposed to ``(D, S)``."""
    x, rows, offs_d, mask, bh = _load_head_rows(
        X, stride_xb, stride_xh, stride_xs, num_heads, seq, HEAD_DIM, BLOCK_D, BLOCK_S
    )
    scale = tl.load(Scale + bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=1.0)
    xq = (x.to(tl.float32) / scale[None, :]).to(Xq.dtype.element_ty)
    tl.store(Xq + (bh * HEAD_DIM + offs_d[None, :]) * seq_padded + rows[:, None], xq, mask=mask)


def quantize_blocks(
    x: torch.Tensor,
    block: int = FP8_BLOCK,
    rotation: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    block_means: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``x (B, H, S, D)`` -> e4m3 ``(B, H, S, D)`` (contiguous) and fp32 scales ``(B, H, ceil(S / block))``, one per
    block of ``block`` rows: ``x ≈ x_fp8 * scale`` row-block-wise. With ``mean`` (fp32 ``(B, H, D)``) ``x - mean``,
    computed in fp32, is what gets quantised; with ``rotation`` (a ``(D, D)`` ±1 matrix, see
    :func:`~hf_fastattn.ops.dense.naive.hadamard_matrix`) ``(x - mean) @ rotation``. ``block_means`` also takes each
    block's mean row out before quantising and returns them third (fp32 ``(B, H, ceil(S / block), D)``)."""
    batch, heads, seq, head_dim = x.shape
    x = unit_last_stride(x)
    out = torch.empty(batch, heads, seq, head_dim, device=x.device, dtype=FP8_DTYPE)
    scales = torch.empty(batch, heads, triton.cdiv(seq, block), device=x.device, dtype=torch.float32)
    means = torch.empty(*scales.shape, head_dim, device=x.device, dtype=torch.float32) if block_means else scales
    _quantize_rows_kernel[(scales.shape[2], batch * heads)](
        x, out, scales, scales if rotation is None else rotation.contiguous(),
        scales if mean is None else mean.contiguous(), means,
        x.stride(0), x.stride(1), x.stride(2), heads, seq,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_S=block, ROTATE=rotation is not None,
        SUBTRACT_MEAN=mean is not None, SUBTRACT_BLOCK_MEAN=block_means,
    )  # fmt: skip
    return (out, scales, means) if block_means else (out, scales)


def quantize_channels_transposed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, H, S, D)`` -> e4m3 ``x^T (B, H, D, S_pad)`` (``S`` padded to 16 for TMA's stride alignment; the padding
    is never read) and fp32 per-channel scales ``(B, H, D)``: ``x[..., s, d] ≈ x_fp8[..., d, s] * scale[..., d]``."""
    batch, heads, seq, head_dim = x.shape
    x = unit_last_stride(x)
    scales = fp8_scale(x.abs().amax(dim=2).float()).contiguous()
    seq_padded = triton.cdiv(seq, 16) * 16
    out = torch.empty(batch, heads, head_dim, seq_padded, device=x.device, dtype=FP8_DTYPE)
    block = _INTERPRETER_BLOCK if interpreter_enabled() else 64
    _quantize_transposed_kernel[(triton.cdiv(seq, block), batch * heads)](
        x, out, scales, x.stride(0), x.stride(1), x.stride(2), heads, seq, seq_padded,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_S=block,
    )  # fmt: skip
    return out, scales


@triton.jit
def _q_bias_tile(bias_row, start_n, offs_n, seq_k, HAS_Q_BIAS: tl.constexpr):
    """The Q block's mean-row scores for key tile ``start_n`` (0 past the keys), or 0 without Q smoothing."""
    if HAS_Q_BIAS:
        cols = start_n + offs_n
        return tl.load(bias_row + cols, mask=cols < seq_k, other=0.0)
    else:
        return 0.0


@triton.jit
def _fp8_tile_range(acc, m_i, l_i, q, k_src, v_src, kpad_base, KScale, bias_row, lo, hi, offs_m, offs_n, offs_d,
                    seq_k, causal_offset, q_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, MASK_CAUSAL: tl.constexpr, MASK_SEQ_END: tl.constexpr,
                    HAS_KEY_PADDING: tl.constexpr, HAS_Q_BIAS: tl.constexpr):  # fmt: skip
    """Key tiles ``[lo, hi)`` of the skeleton's loop, each with its own softmax scale (Q and K block scales folded).
    With ``HAS_Q_BIAS`` the scores of the Q block's mean row (fp32, already in log2 softmax units) are added back.
    The per-tile vectors that feed no dot (padding, bias) are loaded a tile ahead, as in the bf16 loop
    (:func:`~hf_fastattn.ops.dense.fwd.key_padding_tile`): 5-8% faster with the bias on the H100. The K scale stays a
    load in its own iteration: loaded ahead too, the default FP8 kernel was 4-5% slower."""
    kpad_next = key_padding_tile(kpad_base, lo, offs_n, seq_k, HAS_KEY_PADDING)
    bias_next = _q_bias_tile(bias_row, lo, offs_n, seq_k, HAS_Q_BIAS)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kpad, bias = kpad_next, bias_next
        kpad_next = key_padding_tile(kpad_base, start_n + BLOCK_N, offs_n, seq_k, HAS_KEY_PADDING)
        bias_next = _q_bias_tile(bias_row, start_n + BLOCK_N, offs_n, seq_k, HAS_Q_BIAS)
        s = attn_fwd_scores(
            q, k_src, kpad, start_n, offs_m, offs_n, offs_d, 0, seq_k, causal_offset,
            HEAD_DIM, BLOCK_D, MASK_CAUSAL, MASK_SEQ_END, HAS_KEY_PADDING,
        )  # fmt: skip
        tile_scale = q_scale * tl.load(KScale + start_n // BLOCK_N)
        if HAS_Q_BIAS:
            s = s + (bias * (1.0 / tile_scale))[None, :]  # masked scores stay -inf; one division per tile
        acc, m_i, l_i = attn_fwd_update(
            acc, m_i, l_i, s, v_src, start_n, offs_n, offs_d, 0, seq_k, tile_scale,
            HEAD_DIM, BLOCK_D, MASK_SEQ_END, MASK_CAUSAL or MASK_SEQ_END or HAS_KEY_PADDING, 0, _P_GAIN_LOG2, True,
        )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _dense_fwd_fp8_kernel(
    Q8, K8, Vt8, QScale, KScale, VScale, QBias, KPAD, Out, LSE,
    stride_ob, stride_oh, stride_om,
    stride_kpad_b,
    num_q_heads, num_kv_heads, group_size, seq_q, seq_k, seq_k_padded, scale,
    seq_k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    HAS_Q_BIAS: tl.constexpr,
):  # fmt: skip
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heavy causal tiles first, as the bf16 kernel
    bh = tl.program_id(1)
    batch = bh // num_q_heads
    q_head = bh % num_q_heads
    kv_bh = batch * num_kv_heads + q_head // group_size

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_src = row_tile_source(Q8 + bh * seq_q * HEAD_DIM, seq_q, HEAD_DIM, HEAD_DIM, BLOCK_M, BLOCK_D, True)
    k_src = row_tile_source(K8 + kv_bh * seq_k * HEAD_DIM, seq_k, HEAD_DIM, HEAD_DIM, BLOCK_N, BLOCK_D, True)
    v_src = tl.make_tensor_descriptor(
        Vt8 + kv_bh * HEAD_DIM * seq_k_padded, shape=[HEAD_DIM, seq_k], strides=[seq_k_padded, 1],
        block_shape=[BLOCK_D, BLOCK_N],
    )  # fmt: skip
    q = q_src.load([start_m, 0])
    q_scale = tl.load(QScale + bh * tl.num_programs(0) + start_m // BLOCK_M) * scale * 1.4426950408889634
    k_scale_base = KScale + kv_bh * tl.cdiv(seq_k, BLOCK_N)
    bias_row = QBias + (bh * tl.num_programs(0) + start_m // BLOCK_M).to(tl.int64) * seq_k
    kpad_base = KPAD + batch * stride_kpad_b

    causal_offset = seq_k - seq_q
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_hi, hi = attn_fwd_key_range(start_m, seq_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fp8_tile_range(
        acc, m_i, l_i, q, k_src, v_src, kpad_base, k_scale_base, bias_row, 0, full_hi, offs_m, offs_n, offs_d, seq_k,
        causal_offset, q_scale, HEAD_DIM, BLOCK_N, BLOCK_D, False, False, HAS_KEY_PADDING, HAS_Q_BIAS,
    )  # fmt: skip
    acc, m_i, l_i = _fp8_tile_range(
        acc, m_i, l_i, q, k_src, v_src, kpad_base, k_scale_base, bias_row, full_hi, hi, offs_m, offs_n, offs_d, seq_k,
        causal_offset, q_scale, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, True, HAS_KEY_PADDING, HAS_Q_BIAS,
    )  # fmt: skip

    out, lse = attn_fwd_finish(acc, m_i, l_i)
    out = out * tl.load(VScale + kv_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)[None, :]
    lse = lse - _P_GAIN_LOG2 * 0.6931471805599453  # undo P's gain
    o_desc = row_tile_source(Out + batch * stride_ob + q_head * stride_oh, seq_q, stride_om, HEAD_DIM, BLOCK_M, BLOCK_D,
                             True)  # fmt: skip
    o_desc.store([start_m, 0], out.to(Out.dtype.element_ty))
    tl.store(LSE + bh * seq_q + offs_m, lse, mask=offs_m < seq_q)


# The tiles are the scale blocks (FP8_BLOCK); warps and pipeline depth are tuned per shape bucket.
_fp8_tuned = triton.autotune(
    [triton.Config({}, num_warps=warps, num_stages=stages) for warps in (4, 8) for stages in (2, 3, 4)],
    key=["seq_k_bucket", "HEAD_DIM", "CAUSAL", "HAS_KEY_PADDING", "HAS_Q_BIAS"],
)(_dense_fwd_fp8_kernel)


# Q smoothing's bias holds one fp32 score per (Q block, key): 1 GiB is 32 heads at 32k tokens.
_Q_BIAS_MAX_BYTES = 1 << 30


@functools.cache
def _warn_bias_too_large() -> None:
    logger.warning(
        "FP8 attention: the Q-smoothing bias would exceed %d MiB at this length; Q is quantised without smoothing "
        "(lower accuracy)",
        _Q_BIAS_MAX_BYTES >> 20,
    )


def _unrotated(rows: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Rows the quantiser multiplied by the ±1 Hadamard ``rotation`` (``H H^T = D I``), back in the input's basis."""
    return rows if rotation is None else rows @ rotation.T.float() / rows.shape[-1]


@triton.jit
def _block_mean_scores_kernel(MeansHead, MeansRest, K, Scores, stride_kb, stride_kh, stride_kn, num_kv_heads,
                              rows_per_kv_head, seq_k, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One ``(BLOCK_R, BLOCK_N)`` tile of ``Scores = (MeansHead + MeansRest) K^T`` for one (batch, KV head): both
    products on the tensor cores, accumulated in fp32."""
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    bkv = tl.program_id(2)
    row_offsets = (bkv * rows_per_kv_head + rows)[:, None].to(tl.int64)
    mean_mask = (rows[:, None] < rows_per_kv_head) & (offs_d[None, :] < HEAD_DIM)
    head = tl.load(MeansHead + row_offsets * HEAD_DIM + offs_d[None, :], mask=mean_mask, other=0.0)
    rest = tl.load(MeansRest + row_offsets * HEAD_DIM + offs_d[None, :], mask=mean_mask, other=0.0)
    k_base = K + (bkv // num_kv_heads).to(tl.int64) * stride_kb + (bkv % num_kv_heads) * stride_kh
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :],
                mask=(cols[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # fmt: skip
    scores = tl.dot(rest, tl.trans(k), tl.dot(head, tl.trans(k)))
    tl.store(Scores + row_offsets * seq_k + cols[None, :], scores,
             mask=(rows[:, None] < rows_per_kv_head) & (cols[None, :] < seq_k))  # fmt: skip


def _block_mean_scores(q_block_means: torch.Tensor, k: torch.Tensor, log2_scale: float) -> torch.Tensor:
    """``(B, H_q, Q blocks, S_k)`` fp32: each Q block's mean row (fp32, unrotated) against every raw key, times
    ``log2_scale``. These scores stand for the block's largest shared part, so they are kept to ~fp32 accuracy: the
    mean is split into a head in K's 16-bit dtype and the rest, both multiplied with the (exact) 16-bit keys on the
    tensor cores and accumulated in fp32."""
    batch, num_q_heads, q_blocks, head_dim = q_block_means.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    means = (q_block_means * log2_scale).contiguous()
    head = means.to(k.dtype)
    rest = (means - head.float()).to(k.dtype)
    k = unit_last_stride(k)
    scores = torch.empty(batch, num_q_heads, q_blocks, seq_k, device=k.device, dtype=torch.float32)
    rows_per_kv_head = num_q_heads // num_kv_heads * q_blocks  # a KV head's query heads are consecutive
    block_r, block_n = (16, 16) if interpreter_enabled() else (64, 128)
    grid = (triton.cdiv(seq_k, block_n), triton.cdiv(rows_per_kv_head, block_r), batch * num_kv_heads)
    _block_mean_scores_kernel[grid](
        head, rest, k, scores, k.stride(0), k.stride(1), k.stride(2), num_kv_heads, rows_per_kv_head, seq_k,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_R=block_r, BLOCK_N=block_n,
    )  # fmt: skip
    return scores


def dense_attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    return_lse: bool = False,
    rotate_qk: bool | None = None,
    smooth_k: bool = True,
    smooth_q: bool = False,
):
    """Dense attention with e4m3 inputs and probabilities (see the module docstring); bf16/fp16 in and out, no grad.

    ``rotate_qk`` (default: whenever the head dim is a power of two) multiplies Q and K by a Hadamard matrix before
    quantising, FlashAttention-3's incoherent processing: ``Q K^T`` is unchanged, but outlier channels are spread over
    all channels, so their rounding error no longer dominates the scores (SmolLM2: benchmarks/NOTES.md).
    ``smooth_k`` subtracts K's mean over the key sequence first (per batch and KV head, in fp32; SageAttention's
    smoothing): softmax is unchanged, and K's rounding error follows how much the keys vary, not their common offset;
    the LSE gets each row's shift ``q · mean`` added back.
    ``smooth_q`` subtracts each 128-row block's mean from Q before quantising (SageAttention2), so only the rows'
    deviations are rounded, and adds the mean row's scores ``mean_b · k_j`` back to every row of the block (an fp32
    bias of ``(B, H_q, S_q / 128, S_k)``, computed here). Without it Q's rounding dominates the FP8 error; with it the
    forward loses about what FP8 gains (benchmarks/NOTES.md), so it is off by default. It is skipped, with a
    warning, where that bias would exceed 1 GiB.
    Same contract as :func:`~hf_fastattn.ops.dense.dense_attention` otherwise. Raises RuntimeError where TMA is not
    available (before Hopper) and ValueError when a gradient is required.
    """
    key_padding, scale = check_attention_inputs(q, k, v, key_padding, scale, "dense_attention_fp8")
    if q.shape[-1] % 16:
        raise ValueError(f"the FP8 forward needs a head dim divisible by 16 (TMA row alignment), got {q.shape[-1]}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("the FP8 forward has no backward; train with fp8=False")
    out = empty_hf_output(q)
    if not tma_usable(q, k, v, out):
        raise RuntimeError("the FP8 forward needs TMA: a Hopper or newer GPU and 16-byte aligned inputs")
    ensure_triton_allocator()
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    if rotate_qk is None:
        rotate_qk = head_dim & (head_dim - 1) == 0
    rotation = hadamard_matrix(head_dim, q.device) if rotate_qk else None
    # Q H (K H)^T = D Q K^T for the ±1 Hadamard matrix H
    kernel_scale = scale / head_dim if rotate_qk else scale
    block = _INTERPRETER_BLOCK if interpreter_enabled() else FP8_BLOCK
    # q (k_j - mean) = q k_j - q mean: the same shift for every key of a query row, whatever the mask.
    k_mean = k.mean(dim=2, dtype=torch.float32) if smooth_k else None
    q_blocks = triton.cdiv(seq_q, block)
    if smooth_q and batch * num_q_heads * q_blocks * seq_k * 4 > _Q_BIAS_MAX_BYTES:
        _warn_bias_too_large()
        smooth_q = False
    if smooth_q:
        q8, q_scales, q_block_means = quantize_blocks(q, block, rotation, block_means=True)
        q_block_means = _unrotated(q_block_means, rotation)
        # Against the raw keys: with K smoothed, the kernel's scores are q k_j - (q - mean_b) k_mean, a per-row shift.
        q_bias = _block_mean_scores(q_block_means, k, scale * LOG2E)
    else:
        q8, q_scales = quantize_blocks(q, block, rotation)
        q_bias = q_scales  # never read
    k8, k_scales = quantize_blocks(k, block, rotation, k_mean)
    vt8, v_scales = quantize_channels_transposed(v)
    lse = torch.empty(batch, num_q_heads, seq_q, device=q.device, dtype=torch.float32)
    kpad, stride_kpad = key_padding_arg(key_padding_bytes(key_padding), q)
    kernel, launch = (_dense_fwd_fp8_kernel, {"num_warps": 4}) if interpreter_enabled() else (_fp8_tuned, {})
    kernel[(q_scales.shape[2], batch * num_q_heads)](
        q8, k8, vt8, q_scales, k_scales, v_scales, q_bias, kpad, out, lse,
        out.stride(0), out.stride(1), out.stride(2), stride_kpad,
        num_q_heads, num_kv_heads, num_q_heads // num_kv_heads, seq_q, seq_k, vt8.shape[3], kernel_scale,
        min(next_power_of_2(seq_k), 1 << 16),
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_M=block, BLOCK_N=block, CAUSAL=bool(causal),
        HAS_KEY_PADDING=key_padding is not None, HAS_Q_BIAS=smooth_q, **launch,
    )  # fmt: skip
    if not return_lse:
        return out
    if smooth_k:
        # The kernel's LSE is that of the shifted scores: add back each row's dropped (q - Q block mean) k_mean.
        shifted = q.float()
        if smooth_q:
            shifted = shifted - q_block_means.repeat_interleave(block, dim=2)[:, :, :seq_q]
        grouped = shifted.unflatten(1, (num_kv_heads, num_q_heads // num_kv_heads))
        lse += scale * torch.matmul(grouped, k_mean[:, :, None, :, None]).reshape(batch, num_q_heads, seq_q)
    return out, lse
