"""Decode attention: the schedule (:func:`plan_decode`), the launchers and the ``hf_fastattn::decode_fwd`` custom op.

The schedule depends only on shapes and the GPU's SM count, never on tensor contents (padding, lengths inside the
batch), so a captured CUDA graph replays the same grid. See :mod:`.kernels` for the three strategies.

Auto-selection (``strategy="auto"``), from the measurements in ``benchmarks/results/decode_<gpu>.md``:

* ``single`` when there are enough segments (batch x KV heads x row tiles) to fill the GPU by themselves
  (``>= 0.8 x SMs``, FlashAttention's threshold for not splitting) or the cache is only a few key tiles long;
* ``streamk`` from a quarter of the SMs' worth of segments up to that: FlashAttention's split counts make whole
  waves only roughly (48 segments x 5 splits = 1.8 waves of 132 SMs), and stream-K's equal shares win at long
  contexts (1.02x vs 0.99x SDPA-flash at batch 16, 9/3 heads, 128k-512k);
* ``split`` (FlashAttention-2's split count) below that, where it measured as fast as stream-K or faster (batch 1-4:
  1.38x vs 1.34x SDPA-flash at 8k, 32/8 heads, d128), with no uneven segment ends to merge.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from .._runtime import (
    check_tile_size,
    ensure_triton_allocator,
    interpreter_enabled,
    key_padding_bytes,
    next_power_of_2,
    tma_usable,
)
from ..dense.attention import check_attention_inputs, empty_hf_output, key_padding_arg, unit_last_stride
from .kernels import _combine_kernel, _split_kv_kernel, _streamk_kernel

STRATEGIES = ("auto", "single", "split", "streamk")
# Query lengths the transformers integration sends here (decode, speculative verification); longer ones are prefill.
DECODE_MAX_QUERY = 16
# Packed GQA rows per query tile: more would cost registers without reading K/V any less often.
_MAX_BLOCK_M = 64
# Segments per SM at and above which one program per segment already fills the GPU.
_FILL_FRACTION = 0.8
# From this many segments per SM (and below the fill threshold) split-KV's whole-wave split counts leave part of the
# last wave idle at long contexts; stream-K's equal shares do not.
_STREAMK_FRACTION = 0.25
# FlashAttention's split-KV heuristic: the fewest splits whose wave efficiency is within 85% of the best.
_SPLIT_EFFICIENCY = 0.85
_MAX_SPLITS = 128
# fp32 partial elements one combine program loads at once (a chunk of partials of one row): 64 registers a thread.
_MERGE_ELEMENTS = 8192
# The interpreter runs programs one by one: small tiles and a few "SMs" keep tests fast and still cross segments.
_INTERPRETER_BLOCK = 16
_INTERPRETER_SMS = 3


@dataclass(frozen=True)
class DecodeConfig:
    """Tile configuration of the decode kernels. ``programs_per_sm`` sizes stream-K's persistent grid: one per SM by
    default, measured fastest, and always co-resident (a program that compiles fits on an SM).

    ``tma``: read K and V through TMA descriptors where the GPU and the tensors' alignment allow it
    (:func:`~hf_fastattn.ops._runtime.tma_usable`). ``pdl``: programmatic dependent launch on Hopper where a merge
    kernel follows, so the merge is launched while the partials are computed. A single-pass launch never uses it: a
    grid launched early lands on SMs still busy with the previous one, unevenly (0.91x SDPA-flash at batch 16 instead
    of 1.01x)."""

    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 1
    tma: bool = False
    pdl: bool = False


def default_config(head_dim: int, device: torch.device) -> DecodeConfig:
    """The measured defaults: one K tile plus one V tile of 32 KiB per pipeline stage at head dim 64 and 128."""
    if interpreter_enabled():
        return DecodeConfig(block_n=_INTERPRETER_BLOCK, num_warps=1, num_stages=1, programs_per_sm=1)
    block_n = max(16, min(128, 8192 // next_power_of_2(head_dim)))
    return DecodeConfig(block_n=block_n, pdl=_hopper(device))


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@dataclass(frozen=True)
class DecodePlan:
    """A concrete launch: strategy, tiles and grid. ``splits_per_segment`` is the most programs one segment's key
    tiles are spread over (1 for ``single``)."""

    strategy: str
    block_m: int
    config: DecodeConfig
    segments: int
    row_tiles: int
    tiles_per_segment: int
    splits_per_segment: int
    grid: tuple[int, ...]

    @property
    def block_n(self) -> int:
        return self.config.block_n

    @property
    def uses_pdl(self) -> bool:
        """PDL applies where a merge kernel follows the partials (see :class:`DecodeConfig`)."""
        return self.config.pdl and self.splits_per_segment > 1


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_SMS


def _split_kv_splits(segments: int, tiles_per_segment: int, sms: int) -> int:
    """FlashAttention-2's ``num_splits_heuristic``: enough equal key chunks per segment to fill whole waves."""
    if segments >= _FILL_FRACTION * sms:
        return 1
    most = min(_MAX_SPLITS, sms, tiles_per_segment)
    efficiency = []
    for splits in range(1, most + 1):
        waves = segments * splits / sms
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    return next(splits for splits, eff in enumerate(efficiency, start=1) if eff >= _SPLIT_EFFICIENCY * best)


def _streamk_split(total_tiles: int, programs: int) -> tuple[int, int]:
    """(tiles every program takes, programs that take one more)."""
    return total_tiles // programs, total_tiles % programs


def _streamk_max_sharing(tiles_per_segment: int, segments: int, programs: int) -> int:
    per_program, with_extra = _streamk_split(tiles_per_segment * segments, programs)
    long_tiles = with_extra * (per_program + 1)

    def owner(tile: int) -> int:
        return tile // (per_program + 1) if tile < long_tiles else with_extra + (tile - long_tiles) // per_program

    return max(owner((s + 1) * tiles_per_segment - 1) - owner(s * tiles_per_segment) + 1 for s in range(segments))


# Keywords that override the tuned launch (benchmarks and tests use them); None keeps the default.
TUNING_KEYS = ("block_n", "num_warps", "num_stages", "programs_per_sm", "num_splits", "num_programs", "tma", "pdl")
# The on/off keywords; they travel as 1 (on), -1 (off) or 0 (default) in the integer list the custom op takes.
_FLAG_KEYS = ("tma", "pdl")


def plan_decode(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    device: torch.device | str,
    strategy: str = "auto",
    **tuning: int | None,
) -> DecodePlan:
    """The launch for one decode call. ``tuning`` (any of :data:`TUNING_KEYS`) overrides the tuned defaults:
    ``block_n``, ``num_warps``, ``num_stages``, ``programs_per_sm``, ``tma``, ``pdl`` (True/False); ``num_splits`` for
    ``split``; ``num_programs`` for ``streamk``'s grid (default SMs x ``programs_per_sm``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown decode strategy {strategy!r}; choose from {list(STRATEGIES)}")
    return _plan(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, torch.device(device), strategy,
                 *_tuning_values(tuning))  # fmt: skip


def _tuning_values(tuning: dict) -> list[int]:
    """The tuning keywords in :data:`TUNING_KEYS` order, 0 where not given (flags: 1 on, -1 off); raises TypeError on
    an unknown keyword."""
    unknown = sorted(set(tuning) - set(TUNING_KEYS))
    if unknown:
        raise TypeError(f"unknown decode tuning keyword(s) {unknown}; valid: {list(TUNING_KEYS)}")
    values = []
    for key in TUNING_KEYS:
        value = tuning.get(key)
        if key in _FLAG_KEYS:
            values.append(0 if value is None else 1 if value else -1)
        else:
            values.append(value or 0)
    return values


def _flag(value: int, default: bool) -> bool:
    return default if value == 0 else value > 0


# Every decode step of every layer asks for the same few plans.
@functools.lru_cache(maxsize=1024)
def _plan(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    device: torch.device,
    strategy: str,
    block_n: int,
    num_warps: int,
    num_stages: int,
    programs_per_sm: int,
    num_splits: int,
    num_programs: int,
    tma: int,
    pdl: int,
) -> DecodePlan:
    """:func:`plan_decode` with :func:`_tuning_values`' integers (0 = the default)."""
    base = default_config(head_dim, device)
    config = DecodeConfig(
        block_n=block_n or base.block_n,
        num_warps=num_warps or base.num_warps,
        num_stages=num_stages or base.num_stages,
        programs_per_sm=programs_per_sm or base.programs_per_sm,
        tma=_flag(tma, base.tma),
        pdl=_flag(pdl, base.pdl),
    )
    if config.pdl and not _hopper(device):
        raise ValueError("programmatic dependent launch (pdl=True) needs a CUDA GPU of compute capability 9.0 or newer")
    check_tile_size("block_n", config.block_n)
    rows = (q_heads // kv_heads) * seq_q
    block_m = min(max(16, next_power_of_2(rows)), _INTERPRETER_BLOCK if interpreter_enabled() else _MAX_BLOCK_M)
    row_tiles = triton.cdiv(rows, block_m)
    segments = batch * kv_heads * row_tiles
    tiles_per_segment = triton.cdiv(seq_k, config.block_n)
    sms = sm_count(device)

    if strategy == "auto":
        fills_gpu = segments >= _FILL_FRACTION * sms
        if fills_gpu or tiles_per_segment <= 2:
            strategy = "single"
        else:
            strategy = "streamk" if segments >= _STREAMK_FRACTION * sms else "split"
    if strategy == "single":
        return DecodePlan(strategy, block_m, config, segments, row_tiles, tiles_per_segment, 1, (1, segments))
    if strategy == "split":
        splits = num_splits or _split_kv_splits(segments, tiles_per_segment, sms)
        splits = max(1, min(splits, tiles_per_segment))
        return DecodePlan(strategy, block_m, config, segments, row_tiles, tiles_per_segment, splits, (splits, segments))
    total_tiles = segments * tiles_per_segment
    programs = max(1, min(total_tiles, num_programs or sms * config.programs_per_sm))
    sharing = _streamk_max_sharing(tiles_per_segment, segments, programs)
    return DecodePlan(strategy, block_m, config, segments, row_tiles, tiles_per_segment, sharing, (programs,))


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    """fp32 scratch for partials, allocated per call (the caching allocator makes that cheap). Not kept between calls:
    a tensor kept alive after its first allocation inside a CUDA graph (transformers' compiled StaticCache decode)
    belongs to the graph's memory pool, and torch refuses to replay graphs with untracked live tensors."""
    return torch.empty(max(numel, 1), dtype=torch.float32, device=device)


def decode_fwd(q, k, v, key_padding, scale: float, plan: DecodePlan) -> torch.Tensor:
    """Launch ``plan``; returns the output in HF's ``(B, S_q, H_q, D)`` buffer, seen as ``(B, H_q, S_q, D)``."""
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    _, q_heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_d = next_power_of_2(head_dim)
    out = empty_hf_output(q)
    kpad, stride_kpad = key_padding_arg(key_padding, q)
    config = plan.config
    slots = {"single": 0, "split": plan.segments * plan.splits_per_segment, "streamk": 2 * plan.grid[0]}[plan.strategy]
    rows = slots * plan.block_m
    workspace = _workspace(q.device, rows * (block_d + 2))
    part_acc, part_m, part_l = workspace[: rows * block_d], workspace[-2 * rows :][:rows], workspace[-rows:]
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_kpad,
    )  # fmt: skip
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_M": plan.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_D": block_d,
        "HAS_KEY_PADDING": key_padding is not None,
        "USE_TMA": config.tma and tma_usable(k, v),
        "USE_PDL": plan.uses_pdl,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    if meta["USE_TMA"]:
        ensure_triton_allocator()
    # Only a GPU launch knows the option; the interpreter would reject it.
    pdl_launch = {"launch_pdl": True} if plan.uses_pdl else {}
    shape_args = (kv_heads, q_heads // kv_heads, plan.row_tiles, seq_q, seq_k, scale)
    chunk = max(16, min(next_power_of_2(plan.splits_per_segment), _MERGE_ELEMENTS // block_d))
    per_program = with_extra = 0
    if plan.strategy == "streamk":
        per_program, with_extra = _streamk_split(plan.segments * plan.tiles_per_segment, plan.grid[0])
        _streamk_kernel[plan.grid](
            q, k, v, kpad, out, part_acc, part_m, part_l, *strides, *shape_args,
            plan.tiles_per_segment, per_program, with_extra, **meta, **pdl_launch,
        )  # fmt: skip
    else:
        _split_kv_kernel[plan.grid](
            q, k, v, kpad, out, part_acc, part_m, part_l, *strides, *shape_args,
            triton.cdiv(plan.tiles_per_segment, plan.splits_per_segment),
            WRITE_OUTPUT=plan.splits_per_segment == 1, **meta, **pdl_launch,
        )  # fmt: skip
    if plan.splits_per_segment > 1:
        _combine_kernel[(plan.segments, plan.block_m)](
            out, part_acc, part_m, part_l, out.stride(0), out.stride(1), out.stride(2),
            kv_heads, q_heads // kv_heads, plan.row_tiles, seq_q,
            plan.splits_per_segment, plan.tiles_per_segment, per_program, with_extra,
            HEAD_DIM=head_dim, BLOCK_M=plan.block_m, BLOCK_D=block_d, CHUNK=chunk, STREAMK=plan.strategy == "streamk",
            USE_PDL=plan.uses_pdl, **pdl_launch,
        )  # fmt: skip
    return out


def _decode_fwd_op_impl(q, k, v, key_padding, scale: float, strategy: str, tuning: list[int]) -> torch.Tensor:
    """``tuning``: :func:`_tuning_values`' list (custom ops take no dicts or None items)."""
    if strategy not in STRATEGIES or len(tuning) != len(TUNING_KEYS):
        raise ValueError(f"decode_fwd needs a strategy in {STRATEGIES} and {len(TUNING_KEYS)} tuning values")
    batch, q_heads, seq_q, head_dim = q.shape
    plan = _plan(batch, q_heads, k.shape[1], seq_q, k.shape[2], head_dim, q.device, strategy, *tuning)
    return decode_fwd(q, k, v, key_padding, scale, plan)


@torch.library.custom_op("hf_fastattn::decode_fwd", mutates_args=())
def _decode_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    scale: float,
    strategy: str,
    tuning: list[int],
) -> torch.Tensor:
    return _decode_fwd_op_impl(q, k, v, key_padding, scale, strategy, tuning)


@_decode_fwd_op.register_fake
def _(q, k, v, key_padding, scale, strategy, tuning):
    return empty_hf_output(q)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    strategy: str = "auto",
    **tuning: int | None,
) -> torch.Tensor:
    """Causal attention of a few queries against a KV cache, ``(B, H_q, S_q, D)`` in and out; forward only.

    Meant for decode (``S_q`` up to :data:`DECODE_MAX_QUERY`, any ``S_q <= S_kv`` works). Causality is bottom-right:
    query ``i`` sees keys ``<= i + S_kv - S_q``. ``key_padding`` is an optional ``(B, S_kv)`` mask (True/non-zero =
    attend), e.g. a left-padded batch's. ``strategy`` is ``"auto"``, ``"single"``, ``"split"`` or ``"streamk"``;
    ``tuning`` keywords override the tuned launch (see :func:`plan_decode`).
    """
    key_padding, scale = check_attention_inputs(q, k, v, key_padding, scale, "decode_attention")
    if not 1 <= q.shape[2] <= k.shape[2]:
        raise ValueError(f"decode_attention needs 1 <= S_q <= S_kv, got S_q={q.shape[2]}, S_kv={k.shape[2]}")
    key_padding = key_padding_bytes(key_padding)
    if torch.compiler.is_compiling():
        return _decode_fwd_op(q, k, v, key_padding, scale, strategy, _tuning_values(tuning))
    # Eager decode runs once per layer and token, and its kernel takes microseconds: skip the custom op's dispatch.
    batch, q_heads, seq_q, head_dim = q.shape
    plan = plan_decode(batch, q_heads, k.shape[1], seq_q, k.shape[2], head_dim, q.device, strategy, **tuning)
    return decode_fwd(q, k, v, key_padding, scale, plan)
