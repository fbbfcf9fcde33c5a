"""Launcher for the BSFA forward kernel and the ``hf_fastattn::bsfa_fwd`` custom op (forward only, prefill).

The tile shape is part of BSFA's semantics: one keep/skip decision per ``BLOCK_M x BLOCK_N`` tile, and thresholds
calibrated per query-tile position. It is therefore an argument (calibration and inference must agree), never
autotuned; only warps and pipeline stages are.
"""

from __future__ import annotations

from typing import NamedTuple

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
from ..dense.attention import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    check_attention_inputs,
    empty_hf_output,
    key_padding_arg,
    unit_last_stride,
)
from .fwd import _bsfa_fwd_kernel

DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 64
# (num_warps, num_stages); the first is the default when autotuning is off.
_LAUNCH_CONFIGS = [(8, 3), (4, 3), (8, 2), (4, 2)]
if interpreter_enabled():
    patch_interpreter_low_precision()

__all__ = [
    "DEFAULT_BLOCK_M",
    "DEFAULT_BLOCK_N",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "BsfaResult",
    "bsfa_attention",
]


class BsfaResult(NamedTuple):
    """``out`` (B, H_q, S_q, D); ``lse`` (B, H_q, S_q) fp32, natural log; ``stats`` (B, H_q, M, 3) int32 counts of key
    tiles visited, skippable (visited minus always-kept) and skipped per query tile; ``tile_max`` (B, H_q, M, N) fp32
    maximum scaled score of every visited tile (``-inf`` for tiles not visited), or None when not recorded."""

    out: torch.Tensor
    lse: torch.Tensor
    stats: torch.Tensor
    tile_max: torch.Tensor | None


_tuned = triton.autotune(
    [triton.Config({}, num_warps=w, num_stages=s) for w, s in _LAUNCH_CONFIGS],
    key=["seq_k_bucket", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL", "HAS_KEY_PADDING", "RECORD_TILE_MAX"],
)(_bsfa_fwd_kernel)


def bsfa_fwd(q, k, v, key_padding, thresholds, causal: bool, scale: float, block_m: int, block_n: int, record: bool):
    """Launch the kernel; see :class:`BsfaResult`. ``tile_max`` is an empty tensor when ``record`` is False."""
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    num_m_tiles, num_n_tiles = triton.cdiv(seq_q, block_m), triton.cdiv(seq_k, block_n)
    out = empty_hf_output(q)
    lse = torch.empty(batch, num_q_heads, seq_q, device=q.device, dtype=torch.float32)
    stats = torch.empty(batch, num_q_heads, num_m_tiles, 3, device=q.device, dtype=torch.int32)
    if record:
        tile_max = torch.full(
            (batch, num_q_heads, num_m_tiles, num_n_tiles), float("-inf"), device=q.device, dtype=torch.float32
        )
    else:
        tile_max = torch.empty(0, device=q.device, dtype=torch.float32)
    kpad, stride_kpad = key_padding_arg(key_padding, q)
    thresholds = thresholds.to(device=q.device, dtype=torch.float32).contiguous()

    args = (
        q, k, v, kpad, out, lse, thresholds, stats, tile_max,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_kpad, thresholds.stride(0),
        num_q_heads, num_q_heads // num_kv_heads, seq_q, seq_k, scale,
        thresholds.shape[1], num_m_tiles, num_n_tiles,
        min(next_power_of_2(seq_k), 1 << 16),
    )  # fmt: skip
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": next_power_of_2(head_dim),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "CAUSAL": causal,
        "HAS_KEY_PADDING": key_padding is not None,
        "RECORD_TILE_MAX": record,
    }
    grid = (num_m_tiles, batch * num_q_heads)
    if autotune_enabled() and not interpreter_enabled():
        _tuned[grid](*args, **meta)
    else:
        warps, stages = _LAUNCH_CONFIGS[0]
        _bsfa_fwd_kernel[grid](*args, **meta, num_warps=warps, num_stages=stages)
    return out, lse, stats, tile_max


@torch.library.custom_op("hf_fastattn::bsfa_fwd", mutates_args=())
def _bsfa_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    thresholds: torch.Tensor,
    causal: bool,
    scale: float,
    block_m: int,
    block_n: int,
    record: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return bsfa_fwd(q, k, v, key_padding, thresholds, causal, scale, block_m, block_n, record)


@_bsfa_fwd_op.register_fake
def _(q, k, v, key_padding, thresholds, causal, scale, block_m, block_n, record):
    batch, num_q_heads, seq_q, _ = q.shape
    num_m_tiles = -(-seq_q // block_m)
    out = empty_hf_output(q)
    lse = q.new_empty(batch, num_q_heads, seq_q, dtype=torch.float32)
    stats = q.new_empty(batch, num_q_heads, num_m_tiles, 3, dtype=torch.int32)
    shape = (batch, num_q_heads, num_m_tiles, -(-k.shape[2] // block_n)) if record else (0,)
    return out, lse, stats, q.new_empty(shape, dtype=torch.float32)


def check_bsfa_inputs(q, k, v, thresholds, key_padding, scale, block_m, block_n):
    """Validated ``(thresholds (H_q, P) fp32, key_padding (B, S_kv) bool or None, scale)``; raises ValueError."""
    key_padding, scale = check_attention_inputs(q, k, v, key_padding, scale, "BSFA")
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=q.device)
    if thresholds.dim() == 0:
        thresholds = thresholds.expand(q.shape[1], 1)
    elif thresholds.dim() == 1:
        thresholds = thresholds[:, None]
    if thresholds.dim() != 2 or thresholds.shape[0] != q.shape[1] or thresholds.shape[1] == 0:
        raise ValueError(
            f"thresholds must be (query heads, query-tile positions) = ({q.shape[1]}, P >= 1); "
            f"got {tuple(thresholds.shape)}"
        )
    check_tile_size("block_m", block_m)
    check_tile_size("block_n", block_n)
    return thresholds, key_padding, scale


def bsfa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thresholds: torch.Tensor | float,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    record_tile_max: bool = False,
) -> BsfaResult:
    """Block-sparse FlashAttention forward on the Triton kernel, ``(B, H_q, S_q, D)`` in and out (no backward).

    ``thresholds`` is ``(H_q, P)`` in natural-log units of scaled scores, indexed by absolute query-tile position
    (positions ``>= P`` use the last column); a scalar or ``(H_q,)`` tensor is one threshold for every position.
    ``-inf`` keeps every tile (dense attention); ``+inf`` keeps only the diagonal tiles and the first tile.
    """
    thresholds, key_padding, scale = check_bsfa_inputs(q, k, v, thresholds, key_padding, scale, block_m, block_n)
    kpad = key_padding_bytes(key_padding)
    out, lse, stats, tile_max = _bsfa_fwd_op(
        q, k, v, kpad, thresholds, bool(causal), scale, int(block_m), int(block_n), bool(record_tile_max)
    )
    return BsfaResult(out, lse, stats, tile_max if record_tile_max else None)
