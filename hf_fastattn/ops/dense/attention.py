"""Launchers for the dense kernels, and the ``hf_fastattn::dense_fwd`` / ``dense_bwd`` custom ops with autograd.

The ops are opaque to ``torch.compile`` (no graph break, no retracing of the kernels), carry fake implementations
for tracing, and never synchronise with the host.
"""

from __future__ import annotations

import functools

import torch
import triton

from .._runtime import (
    autotune_enabled,
    ensure_triton_allocator,
    interpreter_enabled,
    key_padding_bytes,
    next_power_of_2,
    patch_interpreter_low_precision,
    tma_usable,
)
from .bwd import _bwd_preprocess_kernel, _dense_bwd_dkdv_kernel, _dense_bwd_dq_kernel
from .fwd import _dense_fwd_kernel

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# The interpreter runs one program at a time in NumPy: the smallest tiles tl.dot accepts keep CI fast.
_INTERPRETER_BLOCK = 16
if interpreter_enabled():
    patch_interpreter_low_precision()


# Tiles as (BLOCK_M, BLOCK_N, num_warps, num_stages): the measured H100 winners (bf16, d64/d128, N 1k-32k) plus
# smaller ones for short sequences and head dim 256.


def _with_tma_twins(tiles, *, tma_first: bool) -> list[tuple]:
    """Each tile twice, with a 5th element ``USE_TMA``: the tiles a kernel streams are read through TMA descriptors or
    plain loads, the autotuner picks (TMA only where ``tma_ok``). The first allowed tile is the default when
    autotuning is off, so ``tma_first`` chooses that default."""
    return [(*tile, use_tma) for use_tma in ((True, False) if tma_first else (False, True)) for tile in tiles]


# The forward streams K/V: TMA is faster at d128 non-causal, slower at d64 (benchmarks/NOTES.md).
_FWD_TILES = _with_tma_twins(
    [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4)],
    tma_first=False,
)
# The backward streams Q/dO (dK/dV) and K/V (dQ): as plain loads Triton 3.6 does not pipeline them.
_DKDV_TILES = _with_tma_twins(
    [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2)],
    tma_first=True,
)
_DQ_TILES = _with_tma_twins(
    [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (128, 128, 8, 2), (128, 64, 8, 2)],
    tma_first=True,
)
_LARGE_HEAD_DIM_MAX_TILE = 64 * 64  # BLOCK_M * BLOCK_N that still fits shared memory at head dim 256
_AUTOTUNE_KEY = ["seq_k_bucket", "HEAD_DIM", "CAUSAL", "HAS_KEY_PADDING", "tma_ok"]


def _allowed_tiles(tiles, block_d: int, tma_ok: bool) -> list[tuple]:
    """The tiles that fit the head dim; TMA tiles (5th element) only where ``tma_ok``."""
    fitting = tiles if block_d <= 128 else [t for t in tiles if t[0] * t[1] <= _LARGE_HEAD_DIM_MAX_TILE]
    return [t for t in fitting if tma_ok or not t[4]]


def _autotuned(kernel, tiles, key=_AUTOTUNE_KEY):
    def config(m, n, warps, stages, use_tma):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "USE_TMA": use_tma}, num_warps=warps, num_stages=stages)

    def tile_of(config) -> tuple:
        kwargs = config.kwargs
        return kwargs["BLOCK_M"], kwargs["BLOCK_N"], config.num_warps, config.num_stages, kwargs["USE_TMA"]

    def prune(configs, named_args, **kwargs):
        allowed = _allowed_tiles(tiles, kwargs.get("BLOCK_D", named_args.get("BLOCK_D")), bool(named_args["tma_ok"]))
        return [c for c in configs if tile_of(c) in allowed]

    configs = [config(*tile) for tile in tiles]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


_fwd_tuned = _autotuned(_dense_fwd_kernel, _FWD_TILES, [*_AUTOTUNE_KEY, "FAST_EXP"])
_dkdv_tuned = _autotuned(_dense_bwd_dkdv_kernel, _DKDV_TILES)
_dq_tuned = _autotuned(_dense_bwd_dq_kernel, _DQ_TILES)


def _launch(kernel, tuned, tiles, grid, *args, tma_ok: bool, **meta):
    """Autotuned on a GPU (unless HF_FASTATTN_AUTOTUNE=0: the first fitting tile); the smallest tile when interpreted.
    ``tma_ok``: whether these tensors allow the TMA tiles (``USE_TMA``)."""
    if interpreter_enabled():
        blocks = {"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK, "USE_TMA": tma_ok}
        kernel[grid(blocks)](*args, **meta, **blocks)
    elif autotune_enabled():
        tuned[grid](*args, **meta)
    else:
        block_m, block_n, warps, stages, use_tma = _allowed_tiles(tiles, meta["BLOCK_D"], tma_ok)[0]
        blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_TMA": use_tma}
        kernel[grid(blocks)](*args, **meta, **blocks, num_warps=warps, num_stages=stages)


@functools.cache
def _cuda_l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def section_budget_bytes(device: torch.device) -> int:
    """Bytes that the heads of one schedule section may stream together (:func:`section_heads`): half the L2 cache,
    so that they stay cached while the section runs, with room for everything else passing through. 0 off CUDA."""
    if device.type != "cuda":
        return 0
    return _cuda_l2_bytes(device.index if device.index is not None else torch.cuda.current_device()) // 2


def section_heads(num_heads: int, bytes_per_head: int, budget_bytes: int) -> int:
    """:func:`~.fwd.schedule_tile`'s section size: every head in one section when what they all read again and again
    (``bytes_per_head`` each: K/V in the forward) fits the budget, else one head per section, the head-major order.

    Nothing in between: on the H100, forwards cut into several sections (d128, N = 4k-16k) measured from 4% faster to
    4% slower than the head-major order, while one section of SmolLM2's 9 heads (d64, N = 2k-8k) was 2-12% faster
    (benchmarks/NOTES.md, "Causal schedule")."""
    return num_heads if num_heads * bytes_per_head <= budget_bytes else 1


def _schedule(device: torch.device, causal: bool, num_heads: int, bytes_per_head: int) -> int:
    """A kernel's section size: non-causal tiles all cost the same, so those keep the head-major order."""
    return section_heads(num_heads, bytes_per_head, section_budget_bytes(device)) if causal else 1


def _kv_bytes_per_query_head(k: torch.Tensor, group_size: int) -> int:
    """The K/V bytes a query head's programs stream (forward, dQ): its KV head's, shared by the adjacent query heads of
    its GQA group."""
    return 2 * k.shape[2] * k.shape[3] * k.element_size() // group_size


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def empty_hf_output(q: torch.Tensor) -> torch.Tensor:
    """An output like ``q`` ``(B, H_q, S_q, D)``, allocated as ``(B, S_q, H_q, D)`` so that HF's
    ``transpose(1, 2).contiguous()`` afterwards is free."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    return q.new_empty(batch, seq_q, num_q_heads, head_dim).transpose(1, 2)


def key_padding_arg(key_padding: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer tensor, batch stride); a 1-element dummy when there is no padding mask."""
    if key_padding is None:
        return like.new_empty(1, dtype=torch.uint8), 0
    return key_padding, key_padding.stride(0)


def dense_fwd(q, k, v, key_padding, causal: bool, scale: float, fast_exp: int = 0):
    """Launch the forward kernel; returns ``out`` (same layout as HF's ``(B, S_q, H_q, D)`` buffer) and fp32 LSE.
    ``fast_exp`` is the kernel's ``FAST_EXP`` (see :func:`~hf_fastattn.ops.dense.fwd.softmax_exp2`)."""
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    out = empty_hf_output(q)
    lse = torch.empty(batch, num_q_heads, seq_q, device=q.device, dtype=torch.float32)
    kpad, stride_kpad = key_padding_arg(key_padding, q)
    tma_ok = tma_usable(q, k, v, out)
    if tma_ok:
        ensure_triton_allocator()

    group_size = num_q_heads // num_kv_heads
    fwd_section_heads = _schedule(q.device, causal, batch * num_q_heads, _kv_bytes_per_query_head(k, group_size))

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]) * batch * num_q_heads,)

    _launch(
        _dense_fwd_kernel, _fwd_tuned, _FWD_TILES, grid,
        q, k, v, kpad, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_kpad,
        num_q_heads, group_size, seq_q, seq_k, scale, fwd_section_heads,
        min(next_power_of_2(seq_k), 1 << 16), int(tma_ok), tma_ok=tma_ok,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), CAUSAL=causal, HAS_KEY_PADDING=key_padding is not None,
        FAST_EXP=fast_exp,
    )  # fmt: skip
    return out, lse


def dense_bwd(dout, q, k, v, out, lse, key_padding, causal: bool, scale: float):
    """Launch the three backward kernels; returns dq, dk, dv in the inputs' dtype."""
    dout, q, k, v, out = (unit_last_stride(t) for t in (dout, q, k, v, out))
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    block_d = next_power_of_2(head_dim)
    kpad, stride_kpad = key_padding_arg(key_padding, q)
    seq_k_bucket = min(next_power_of_2(seq_k), 1 << 16)
    meta = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "CAUSAL": causal, "HAS_KEY_PADDING": key_padding is not None}
    # At head dim 256 the pipelined TMA buffers of the streamed tiles do not fit shared memory.
    tma_ok = block_d <= 128 and tma_usable(q, k, v, dout)
    if tma_ok:
        ensure_triton_allocator()

    delta = torch.empty_like(lse)
    pre_block = _INTERPRETER_BLOCK if interpreter_enabled() else 128
    _bwd_preprocess_kernel[(triton.cdiv(seq_q, pre_block), batch * num_q_heads)](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        num_q_heads, seq_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_block,
    )  # fmt: skip

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    group_size = num_q_heads // num_kv_heads
    # A dK/dV program streams Q and dO of every query head of its KV head's group; a dQ program K and V.
    qdo_bytes = 2 * group_size * seq_q * head_dim * q.element_size()
    dkdv_section_heads = _schedule(q.device, causal, batch * num_kv_heads, qdo_bytes)
    dq_section_heads = _schedule(q.device, causal, batch * num_q_heads, _kv_bytes_per_query_head(k, group_size))

    def dkdv_grid(meta):
        return (triton.cdiv(seq_k, meta["BLOCK_N"]) * batch * num_kv_heads,)

    def dq_grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]) * batch * num_q_heads,)

    _launch(
        _dense_bwd_dkdv_kernel, _dkdv_tuned, _DKDV_TILES, dkdv_grid,
        q, k, v, kpad, dout, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_kpad,
        num_q_heads, num_kv_heads, group_size, seq_q, seq_k, scale, dkdv_section_heads, seq_k_bucket, int(tma_ok),
        tma_ok=tma_ok, **meta,
    )  # fmt: skip
    _launch(
        _dense_bwd_dq_kernel, _dq_tuned, _DQ_TILES, dq_grid,
        q, k, v, kpad, dout, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_kpad,
        num_q_heads, group_size, seq_q, seq_k, scale, dq_section_heads, seq_k_bucket, int(tma_ok), tma_ok=tma_ok, **meta,
    )  # fmt: skip
    return dq, dk, dv


@torch.library.custom_op("hf_fastattn::dense_fwd", mutates_args=())
def _dense_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    causal: bool,
    scale: float,
    fast_exp: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return dense_fwd(q, k, v, key_padding, causal, scale, fast_exp)


@_dense_fwd_op.register_fake
def _(q, k, v, key_padding, causal, scale, fast_exp=0):
    batch, num_q_heads, seq_q, _ = q.shape
    return empty_hf_output(q), q.new_empty(batch, num_q_heads, seq_q, dtype=torch.float32)


@torch.library.custom_op("hf_fastattn::dense_bwd", mutates_args=())
def _dense_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dense_bwd(dout, q, k, v, out, lse, key_padding, causal, scale)


@_dense_bwd_op.register_fake
def _(dout, q, k, v, out, lse, key_padding, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding, causal, scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding = ctx.saved_tensors
    # The backward recomputes P with the exact exponential, also after a fast-exp forward.
    dq, dk, dv = _dense_bwd_op(dout, q, k, v, out, lse, key_padding, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


_dense_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# fast_exp settings -> the kernels' FAST_EXP: off; half of each tile's exponentials on the FMA units; all of them.
FAST_EXP_MODES = {False: 0, "off": 0, True: 1, "half": 1, "all": 2}


def fast_exp_mode(setting: bool | str) -> int:
    """The kernels' ``FAST_EXP`` for a user's ``fast_exp`` setting; raises ValueError on an unknown one."""
    if isinstance(setting, bool) or setting in FAST_EXP_MODES:
        return FAST_EXP_MODES[setting]
    raise ValueError(f"fast_exp must be one of {list(FAST_EXP_MODES)}, got {setting!r}")


def check_attention_inputs(q, k, v, key_padding, scale, caller: str) -> tuple[torch.Tensor | None, float]:
    """Shared input checks of the attention ops: shapes, GQA, a ``(B, S_kv)`` key-padding mask (returned as a
    contiguous bool tensor) and a positive softmax scale (default ``D ** -0.5``); raises ValueError."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"expected q (B, Hq, Sq, D) and k, v (B, Hkv, Skv, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if key_padding is not None:
        if key_padding.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding must be (B, S_kv) = {(k.shape[0], k.shape[2])}, got {tuple(key_padding.shape)}"
            )
        key_padding = (key_padding if key_padding.dtype == torch.bool else key_padding != 0).contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0.0:
        # The kernels take the row maximum before scaling (max(s) * scale), which holds only for a positive scale.
        raise ValueError(f"{caller} needs a positive softmax scale, got {scale}")
    return key_padding, scale


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    return_lse: bool = False,
    fast_exp: bool | str = False,
):
    """Dense attention on the Triton kernels, ``(B, H_q, S_q, D)`` in and out; differentiable.

    ``key_padding`` is an optional ``(B, S_kv)`` mask, True/non-zero = attend. ``causal`` is bottom-right aligned.
    Rows that see no key give zeros (LSE ``-inf``). ``fast_exp`` (see :data:`FAST_EXP_MODES`) computes part or all of
    the softmax exponentials on the FMA units (max relative error 7.5e-5 on the exponential).
    """
    key_padding, scale = check_attention_inputs(q, k, v, key_padding, scale, "dense_attention")
    key_padding = key_padding_bytes(key_padding)
    out, lse = _dense_fwd_op(q, k, v, key_padding, bool(causal), scale, fast_exp_mode(fast_exp))
    return (out, lse) if return_lse else out
