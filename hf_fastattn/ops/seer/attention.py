"""Launchers for SeerAttention's kernels: the block-sparse forward and the ground-truth (block target) forward.

The block size is part of the method's semantics (gates score blocks of that size), so it is an argument, never
autotuned; only warps and pipeline stages are. Both kernels are forward only.
"""

from __future__ import annotations

import torch
import triton

from .._runtime import (
    autotune_enabled,
    check_tile_size,
    interpreter_enabled,
    key_padding_bytes,
    next_power_of_2,
    patch_interpreter_low_precision,
)
from ..dense.attention import check_attention_inputs, empty_hf_output, key_padding_arg, unit_last_stride
from .blocks import BlockSelection, num_blocks
from .fwd import _block_sparse_fwd_kernel, _block_target_kernel

DEFAULT_BLOCK_SIZE = 64
# (num_warps, num_stages). Measured on the H100 at 32k causal, d128, two heads per 128-row tile, 50% of the blocks:
# 4 warps / 2 stages 8.3 ms, 8 warps / 3-5 stages 9.9-10.5 ms, 4 warps / 3-4 stages 12-13 ms (3 stages of 128-row
# tiles leave too little shared memory and registers). The first is the default when autotuning is off.
_LAUNCH_CONFIGS = [(4, 2), (4, 3), (8, 3), (8, 5)]
_AUTOTUNE_KEY = ["seq_bucket", "HEAD_DIM", "BLOCK", "CAUSAL", "HAS_KEY_PADDING"]
if interpreter_enabled():
    patch_interpreter_low_precision()


def _tuned(kernel, key):
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in _LAUNCH_CONFIGS]
    return triton.autotune(configs, key=key)(kernel)


_sparse_tuned = _tuned(_block_sparse_fwd_kernel, [*_AUTOTUNE_KEY, "HEADS_PER_PROGRAM"])
_target_tuned = _tuned(_block_target_kernel, _AUTOTUNE_KEY)


def _launch(kernel, tuned, grid, args, meta, seq_k):
    if autotune_enabled() and not interpreter_enabled():
        tuned[grid](*args, **meta, seq_bucket=min(next_power_of_2(seq_k), 1 << 16))
    else:
        warps, stages = _LAUNCH_CONFIGS[0]
        kernel[grid](*args, **meta, seq_bucket=0, num_warps=warps, num_stages=stages)


def _common(q, k, v, key_padding, scale, block_size, caller):
    key_padding, scale = check_attention_inputs(q, k, v, key_padding, scale, caller)
    check_tile_size("block_size", block_size)
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    kpad = key_padding_bytes(key_padding)
    return q, k, v, kpad, scale


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    return_lse: bool = False,
    heads_per_program: int | None = None,
):
    """Attention over the selected key blocks only, ``(B, H_q, S_q, D)`` in and out (forward only).

    ``selection`` (:func:`~hf_fastattn.ops.seer.blocks.selection_from_mask`) has one mask head per KV head or per
    query head. Rows that see no selected key give zeros (LSE ``-inf``). ``heads_per_program`` query heads sharing
    a selection run as one tile (default: 2 when the selection is shared by an even number of heads and
    ``D <= 128``, else 1).
    """
    q, k, v, kpad, scale = _common(q, k, v, key_padding, scale, selection.block_size, "block_sparse_attention")
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    block = selection.block_size
    expected = (batch, num_blocks(seq_q, block), num_blocks(seq_k, block))
    mask_heads = selection.shape[1]
    if (selection.shape[0], *selection.shape[2:]) != expected or num_q_heads % mask_heads or mask_heads % num_kv_heads:
        raise ValueError(
            f"selection of shape {selection.shape} does not fit q {tuple(q.shape)} / k {tuple(k.shape)} with block "
            f"{block}: expected (B, H_kv or H_q, NQ, NK) = ({batch}, {num_kv_heads} or {num_q_heads}, "
            f"{expected[1]}, {expected[2]})"
        )
    shared = num_q_heads // mask_heads
    if heads_per_program is None:
        heads_per_program = 2 if shared % 2 == 0 and head_dim <= 128 else 1
    if shared % heads_per_program:
        raise ValueError(f"heads_per_program={heads_per_program} must divide the {shared} heads sharing a selection")
    full_count, full_index, partial_count, partial_index = (
        t.to(device=q.device, dtype=torch.int32).contiguous() for t in selection[:4]
    )
    out = empty_hf_output(q)
    lse = torch.empty(batch, num_q_heads, seq_q, device=q.device, dtype=torch.float32)
    kpad_arg, stride_kpad = key_padding_arg(kpad, q)
    args = (
        q, k, v, kpad_arg, out, lse, full_count, full_index, partial_count, partial_index,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_kpad,
        full_count.stride(0), full_count.stride(1),
        full_index.stride(0), full_index.stride(1), full_index.stride(2),
        num_q_heads, num_q_heads // num_kv_heads, num_q_heads // mask_heads, seq_q, seq_k, scale,
    )  # fmt: skip
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": next_power_of_2(head_dim),
        "BLOCK": block,
        "HEADS_PER_PROGRAM": heads_per_program,
        "CAUSAL": bool(causal),
        "HAS_KEY_PADDING": kpad is not None,
    }
    grid = (expected[1], batch * num_q_heads // heads_per_program)
    _launch(_block_sparse_fwd_kernel, _sparse_tuned, grid, args, meta, seq_k)
    return (out, lse) if return_lse else out


def attention_with_block_target(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention and SeerAttention's ground truth in one kernel (forward only).

    Returns ``out`` ``(B, H_q, S_q, D)`` and ``target`` ``(B, H_q, NQ, NK)`` fp32: for each (query block, key block)
    the largest attention probability of any row of the query block on any key of the key block (0 where nothing is
    visible). Rows are not normalised (see :func:`normalise_target`).
    """
    q, k, v, kpad, scale = _common(q, k, v, key_padding, scale, block_size, "attention_with_block_target")
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    nq, nk = num_blocks(seq_q, block_size), num_blocks(seq_k, block_size)
    out = empty_hf_output(q)
    lse = torch.empty(batch, num_q_heads, seq_q, device=q.device, dtype=torch.float32)
    target = torch.zeros(batch, num_q_heads, nq, nk, device=q.device, dtype=torch.float32)
    kpad_arg, stride_kpad = key_padding_arg(kpad, q)
    args = (
        q, k, v, kpad_arg, out, lse, target,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_kpad,
        num_q_heads, num_q_heads // num_kv_heads, seq_q, seq_k, scale, nk,
    )  # fmt: skip
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": next_power_of_2(head_dim),
        "BLOCK": block_size,
        "CAUSAL": bool(causal),
        "HAS_KEY_PADDING": kpad is not None,
    }
    _launch(_block_target_kernel, _target_tuned, (nq, batch * num_q_heads), args, meta, seq_k)
    return out, target


def normalise_target(target: torch.Tensor, num_kv_heads: int | None = None) -> torch.Tensor:
    """Row-normalised target distribution over key blocks; with ``num_kv_heads``, first max-pooled over each GQA
    group's query heads (one target per KV head). Rows with no visible block stay all zero."""
    if num_kv_heads is not None and num_kv_heads != target.shape[1]:
        batch, heads, nq, nk = target.shape
        target = target.view(batch, num_kv_heads, heads // num_kv_heads, nq, nk).amax(dim=2)
    total = target.sum(-1, keepdim=True)
    return target / total.clamp(min=torch.finfo(target.dtype).tiny)
