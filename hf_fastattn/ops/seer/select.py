"""Block selection in one Triton kernel: block scores in, the compact :class:`BlockSelection` out.

The same function as ``selection_from_mask(select_blocks(scores, ...), ...)`` (:mod:`hf_fastattn.ops.seer.blocks`),
bit for bit on finite scores, in one launch instead of some thirty small PyTorch ops, which at long context made the
selection launch-bound. One program per (batch, mask head, query block) row:

1. visibility, the full/partial split and the always-kept blocks (sink and local) from the geometry;
2. the rule: ``threshold`` keeps scores above it; ``topk``/``sparsity`` keep the row's budget of blocks, the
   always-kept first, then the best of the rest. The budget's cut value is found by bisection on the scores' sortable
   integer keys (32 halvings), and ties at the cut go to the lowest block index, like a stable descending sort.
   ``sparsity`` with ``allocation="head"`` shares one budget among the rows of a (batch, head): its cut value is
   found beforehand by ``torch.topk`` over the head's free blocks (calibrated ``head_weights`` give each head its own
   budget), and each row gets the cut and how many blocks tied with it the row may still take (ties go to the lowest
   row-major index);
3. compaction: the selected full (then partial) blocks in ascending order, followed by the unselected ones, so each
   index row is a permutation of the key blocks, as in the PyTorch path.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._runtime import check_tile_size, next_power_of_2
from .blocks import (
    BlockSelection,
    check_head_weights,
    check_selection_rule,
    device_needs,
    free_blocks,
    head_needs,
    num_blocks,
    row_budgets,
)


@triton.jit
def _write_list(INDEX, COUNT, row_offset, count_offset, selected, in_range, blocks):
    """Store the selected blocks' indices in ascending order, then the others, and the count."""
    count = tl.sum(selected.to(tl.int32), 0)
    rest = in_range & ~selected
    position = tl.where(selected, tl.cumsum(selected.to(tl.int32), 0) - 1, count + tl.cumsum(rest.to(tl.int32), 0) - 1)
    tl.store(INDEX + row_offset + position, blocks, mask=in_range)
    tl.store(COUNT + count_offset, count)


@triton.jit
def _select_kernel(
    SCORES, BUDGET, CUT, TIE_ROOM, FULL_COUNT, FULL_INDEX, PARTIAL_COUNT, PARTIAL_INDEX,
    stride_sb, stride_sh, stride_sm,
    num_heads, num_query_blocks, num_key_blocks, seq_q, seq_k, threshold, sink_blocks, local_blocks,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
    HEAD_CUT: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    bh = tl.program_id(1)
    batch = bh // num_heads
    head = bh % num_heads
    blocks = tl.arange(0, BLOCK_K)
    in_range = blocks < num_key_blocks
    scores = tl.load(
        SCORES + batch * stride_sb + head * stride_sh + m * stride_sm + blocks, mask=in_range, other=float("-inf")
    ).to(tl.float32)

    offset = seq_k - seq_q
    first_row = m * BLOCK
    last_row = tl.minimum(first_row + BLOCK, seq_q) - 1
    first_key = blocks * BLOCK
    last_key = first_key + BLOCK - 1
    whole = last_key < seq_k
    if CAUSAL:
        visible = in_range & (first_key <= last_row + offset)
        full = whole & (last_key <= first_row + offset)
    else:
        visible = in_range
        full = whole
    # The local blocks end at the one holding the last row's own key; the diagonal may span two key blocks. Clamped
    # at 0 first, so truncating and flooring division agree.
    own = tl.minimum(tl.maximum(last_row + offset, 0) // BLOCK, num_key_blocks - 1)
    first_own = tl.maximum(first_row + offset, 0) // BLOCK
    local = ((blocks <= own) & (blocks > own - local_blocks)) | ((blocks >= first_own) & (blocks <= own))
    forced = ((blocks < sink_blocks) | local) & visible

    row = bh * num_query_blocks + m
    free = visible & ~forced
    if USE_THRESHOLD:
        keep = forced | (free & (scores > threshold))
    elif HEAD_CUT:
        cut = tl.load(CUT + bh)
        ties = free & (scores == cut)
        keep = forced | (free & (scores > cut)) | (ties & (tl.cumsum(ties.to(tl.int32), 0) <= tl.load(TIE_ROOM + row)))
    else:
        need = tl.load(BUDGET + m) - tl.sum(forced.to(tl.int32), 0)
        need = tl.minimum(tl.maximum(need, 0), tl.sum(free.to(tl.int32), 0))
        # Sortable keys: IEEE bits, with the magnitude bits of negative numbers flipped, order like the floats.
        bits = scores.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        lo = tl.full([], -2147483648, tl.int64)  # count(key >= lo) = every free block >= need
        hi = tl.full([], 2147483648, tl.int64)  # count(key >= hi) = 0 < need (when need > 0)
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            enough = tl.sum((free & (key >= mid)).to(tl.int32), 0) >= need
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        above = free & (key > lo)
        ties = free & (key == lo)
        room = need - tl.sum(above.to(tl.int32), 0)
        take = ties & (tl.cumsum(ties.to(tl.int32), 0) <= room)
        keep = forced | above | take

    _write_list(FULL_INDEX, FULL_COUNT, row * num_key_blocks, row, keep & full, in_range, blocks)
    _write_list(PARTIAL_INDEX, PARTIAL_COUNT, row * num_key_blocks, row, keep & ~full, in_range, blocks)


def select_block_lists(
    scores: torch.Tensor,
    *,
    seq_q: int,
    seq_k: int,
    causal: bool,
    block_size: int,
    threshold: float | None = None,
    topk: int | None = None,
    sparsity: float | None = None,
    sink_blocks: int = 1,
    local_blocks: int = 1,
    allocation: str = "row",
    head_weights: tuple[float, ...] | None = None,
    reserved_blocks: int = 0,
) -> BlockSelection:
    """:func:`~hf_fastattn.ops.seer.blocks.select_blocks` followed by ``selection_from_mask``, in one kernel.

    ``scores`` ``(B, H, NQ, NK)`` ranks blocks (probabilities, log-probabilities or a ground-truth map: any monotone
    score; ``threshold`` is in the same units).
    """
    check_selection_rule(threshold, topk, sparsity, allocation, head_weights, reserved_blocks)
    check_tile_size("block_size", block_size)
    batch, heads, nq, nk = scores.shape
    check_head_weights(head_weights, heads)
    if (nq, nk) != (num_blocks(seq_q, block_size), num_blocks(seq_k, block_size)):
        raise ValueError(f"block scores end in {(nq, nk)}, expected (NQ, NK) for S_q={seq_q}, S_kv={seq_k}")
    device = scores.device
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    head_cut = allocation == "head"
    cut = tie_room = budget = torch.empty(1, dtype=torch.int32, device=device)
    if head_cut:
        kept = {"sink_blocks": sink_blocks, "local_blocks": local_blocks}
        needs = head_needs(seq_q, seq_k, causal=causal, block_size=block_size, sparsity=sparsity, **kept, heads=heads,
                           head_weights=head_weights, reserved_blocks=reserved_blocks)  # fmt: skip
        free = free_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=device, **kept)
        cut, tie_room = _head_cuts(scores, free, needs)
    elif threshold is None:
        budget = row_budgets(
            seq_q, seq_k, causal=causal, block_size=block_size, topk=topk, sparsity=sparsity, device=device
        )
    full_count = torch.empty(batch, heads, nq, dtype=torch.int32, device=device)
    partial_count = torch.empty_like(full_count)
    full_index = torch.empty(batch, heads, nq, nk, dtype=torch.int32, device=device)
    partial_index = torch.empty_like(full_index)
    _select_kernel[(nq, batch * heads)](
        scores, budget, cut, tie_room, full_count, full_index, partial_count, partial_index,
        scores.stride(0), scores.stride(1), scores.stride(2),
        heads, nq, nk, seq_q, seq_k, math.inf if threshold is None else float(threshold), sink_blocks, local_blocks,
        BLOCK=block_size, BLOCK_K=max(16, next_power_of_2(nk)), CAUSAL=bool(causal), USE_THRESHOLD=threshold is not None,
        HEAD_CUT=head_cut,
    )  # fmt: skip
    return BlockSelection(full_count, full_index, partial_count, partial_index, block_size)


def _head_cuts(scores: torch.Tensor, free: torch.Tensor, needs: tuple[int, ...]):
    """Per (batch, head) ``(B, H)``: the cut score (the head's ``need``-th best ``free`` block's, float32); per row
    ``(B, H, NQ)``: how many free blocks scoring exactly the cut the row may take, so that the head takes ``need`` in
    row-major order. ``needs`` (:func:`~hf_fastattn.ops.seer.blocks.head_needs`) holds one count per head."""
    batch, heads = scores.shape[:2]
    ranked = scores.float().masked_fill(~free, float("-inf"))
    if max(needs) == 0:
        cut = torch.full((batch, heads), float("inf"), device=scores.device)
    else:
        flat = ranked.flatten(-2)
        if len(set(needs)) > 1:
            # The need_h-th best of head h is the k-th best once k - need_h entries of +inf are added to its blocks
            # (k = the largest need): one unsorted top-k for every head, as with a shared need.
            flat = torch.cat([flat, _cut_padding(needs, str(scores.device)).expand(batch, -1, -1)], -1)
        cut = flat.topk(max(needs), dim=-1, sorted=False).values.amin(-1)
    above = (ranked > cut[..., None, None]).sum((-2, -1), dtype=torch.int32)
    ties = ((ranked == cut[..., None, None]) & free).sum(-1, dtype=torch.int32)
    tie_room = (device_needs(needs, str(scores.device)) - above)[..., None] - (
        ties.cumsum(-1, dtype=torch.int32) - ties
    )
    return cut.contiguous(), tie_room.clamp(min=0).contiguous()


@functools.lru_cache(maxsize=64)
def _cut_padding(needs: tuple[int, ...], device: str) -> torch.Tensor:
    """``(H, max(needs))`` fp32: ``max(needs) - need_h`` entries of +inf, then -inf (cached, read-only)."""
    width = max(needs)
    return torch.where(
        torch.arange(width, device=device) < torch.tensor([width - n for n in needs], device=device)[:, None],
        float("inf"),
        float("-inf"),
    )
