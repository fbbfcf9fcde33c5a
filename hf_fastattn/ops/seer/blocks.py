"""Block selections: from block scores to the compact per-row key-block lists the block-sparse kernel walks.

Geometry. Query block ``m`` holds query rows ``[m*B, (m+1)*B)`` and key block ``n`` keys ``[n*B, (n+1)*B)``, counted
from row 0 and key 0 (``B`` = ``block_size``). Causality is bottom-right aligned, element by element: row ``i`` sees
key ``j`` iff ``j <= i + S_kv - S_q``. A key block is *visible* to a query block when any of its keys is visible to any
row, and *full* when every row sees every one of its keys (so the kernel needs no element mask there).

Layout (:class:`BlockSelection`), FlexAttention's ``BlockMask`` layout: per (batch, mask head, query block), a count
and an ascending list of key-block indices, kept separately for *full* blocks and *partial* blocks (visible but not
full: the causal diagonal and the sequence-end block). ``index`` tensors are ``(B, H_mask, NQ, NK)`` int32 where only
the first ``count`` entries of a row are meaningful. ``H_mask`` is the number of KV heads (one selection shared by the
query heads of a GQA group) or of query heads. Everything is computed on the device without a host synchronisation.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch


class BlockSelection(NamedTuple):
    """Selected key blocks per (batch, mask head, query block); see the module docstring."""

    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    block_size: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H_mask, NQ, NK)``."""
        return tuple(self.full_index.shape)

    def selected_blocks(self) -> torch.Tensor:
        """``(B, H_mask, NQ)`` number of key blocks computed per query block."""
        return self.full_count + self.partial_count


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def visible_blocks(
    seq_q: int, seq_k: int, *, causal: bool, block_size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(visible, full)`` bool ``(NQ, NK)``: key blocks any row of a query block sees, and those every row fully sees.

    The tensors are cached per geometry and device (every layer of every call asks for the same ones): read-only.
    """
    return _visible_blocks(seq_q, seq_k, causal, block_size, str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _visible_blocks(seq_q: int, seq_k: int, causal: bool, block_size: int, device: str):
    first_row = torch.arange(num_blocks(seq_q, block_size), device=device)[:, None] * block_size
    last_row = torch.clamp(first_row + block_size, max=seq_q) - 1
    first_key = torch.arange(num_blocks(seq_k, block_size), device=device)[None, :] * block_size
    last_key = first_key + block_size - 1
    whole = last_key < seq_k
    if not causal:
        return torch.ones_like(first_row + first_key, dtype=torch.bool), whole.expand(first_row.shape[0], -1)
    offset = seq_k - seq_q
    visible = first_key <= last_row + offset
    full = whole & (last_key <= first_row + offset)
    return visible, full


def always_kept_blocks(
    seq_q: int, seq_k: int, *, causal: bool, block_size: int, sink_blocks: int = 1, local_blocks: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """Bool ``(NQ, NK)``: the first ``sink_blocks`` key blocks (attention sinks) and, for each query block, the
    ``local_blocks`` key blocks ending at the one holding its last row's own key (bottom-right aligned): the diagonal
    when ``local_blocks=1``. Every valid row therefore keeps at least its own key."""
    visible, _ = visible_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=device)
    nq, nk = visible.shape
    key_block = torch.arange(nk, device=device)[None, :]
    last_row = torch.clamp(torch.arange(nq, device=device)[:, None] * block_size + block_size, max=seq_q) - 1
    own = torch.clamp((last_row + seq_k - seq_q) // block_size, min=0, max=nk - 1)
    local = (key_block <= own) & (key_block > own - local_blocks)
    # The diagonal of a bottom-right aligned query block may span two key blocks: keep both.
    first_row = torch.arange(nq, device=device)[:, None] * block_size
    first_own = torch.clamp((first_row + seq_k - seq_q) // block_size, min=0)
    local |= (key_block >= first_own) & (key_block <= own)
    return ((key_block < sink_blocks) | local) & visible


ALLOCATIONS = ("row", "head")


def free_blocks(
    seq_q: int, seq_k: int, *, causal: bool, block_size: int, sink_blocks: int, local_blocks: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """Bool ``(NQ, NK)``: the visible blocks a rule chooses among (not always kept). Cached, read-only."""
    return _free_blocks(seq_q, seq_k, causal, block_size, sink_blocks, local_blocks, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _free_blocks(seq_q, seq_k, causal, block_size, sink_blocks, local_blocks, device) -> torch.Tensor:
    visible, _ = visible_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=device)
    forced = always_kept_blocks(
        seq_q, seq_k, causal=causal, block_size=block_size, sink_blocks=sink_blocks, local_blocks=local_blocks,
        device=device,
    )  # fmt: skip
    return visible & ~forced


def check_selection_rule(
    threshold: float | None,
    topk: int | None,
    sparsity: float | None,
    allocation: str = "row",
    head_weights=None,
    reserved_blocks: int = 0,
) -> None:
    """Exactly one rule, with a valid value; raises ValueError."""
    rules = [
        name for name, value in (("threshold", threshold), ("topk", topk), ("sparsity", sparsity)) if value is not None
    ]
    if len(rules) != 1:
        raise ValueError(f"choose exactly one of threshold, topk or sparsity (got {rules or 'none'})")
    if topk is not None and topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation != "row" and sparsity is None:
        raise ValueError(f"allocation={allocation!r} applies to the sparsity rule only")
    if head_weights is not None:
        if allocation != "head":
            raise ValueError("head_weights scale the budgets of allocation='head' only")
        if not all(math.isfinite(weight) and weight >= 0 for weight in head_weights):
            raise ValueError(f"head_weights must be finite and >= 0, got {list(head_weights)}")
    if reserved_blocks < 0:
        raise ValueError(f"reserved_blocks must be >= 0, got {reserved_blocks}")
    if reserved_blocks and allocation != "head":
        raise ValueError("reserved_blocks come out of the shared budget of allocation='head' only")


def check_head_weights(head_weights, heads: int) -> None:
    if head_weights is not None and len(head_weights) != heads:
        raise ValueError(f"head_weights has {len(head_weights)} entries for block scores of {heads} heads")


def row_budgets(
    seq_q: int, seq_k: int, *, causal: bool, block_size: int, topk: int | None = None, sparsity: float | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """Blocks each query block keeps under the ``topk`` or ``sparsity`` rule, ``(NQ,)`` int32 (cached, read-only)."""
    return _row_budgets(seq_q, seq_k, causal, block_size, topk, sparsity, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _row_budgets(seq_q, seq_k, causal, block_size, topk, sparsity, device) -> torch.Tensor:
    visible, _ = visible_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=device)
    if topk is not None:
        return torch.full(visible.shape[:1], topk, dtype=torch.int32, device=device)
    # float64: in float32 the product can land an ulp (> 1e-6) above an integer (0.72 * 75) and keep one more.
    return torch.ceil((1.0 - sparsity) * visible.sum(-1).double() - 1e-6).to(torch.int32)


def select_blocks(
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
) -> torch.Tensor:
    """Bool ``(B, H, NQ, NK)`` block mask from block scores (gate probabilities or a ground-truth map).

    Exactly one rule: ``threshold`` keeps blocks whose score exceeds it; ``topk`` keeps the ``topk`` best blocks of
    each row; ``sparsity`` keeps ``1 - sparsity`` of the visible blocks. With ``allocation="row"`` every query block
    keeps ``ceil((1 - sparsity) * visible)`` of its own blocks (short and long rows drop the same fraction); with
    ``allocation="head"`` the budget ``ceil((1 - sparsity) * visible)`` is counted over all query blocks of a
    (batch, head) and goes to the best blocks of any row, so rows whose attention is spread keep more than rows
    whose attention is concentrated. Scores must then be comparable across rows (row-normalised probabilities or
    log-probabilities). The sink and local blocks (:func:`always_kept_blocks`) are always kept and count towards
    the budget; invisible blocks are never selected. Ties at the cut go to the lowest block index (row-major for
    ``"head"``). ``head_weights`` (one per head, ``"head"`` only) scale each head's share of the budget beyond the
    always-kept blocks (:func:`head_needs`): calibrated budgets give heads with spread-out attention more blocks.
    ``reserved_blocks`` (``"head"`` only) are taken off every head's budget: blocks' worth of work done outside the
    selection (``fastattn_seer``'s exact tail rows).
    """
    check_selection_rule(threshold, topk, sparsity, allocation, head_weights, reserved_blocks)
    check_head_weights(head_weights, scores.shape[1])
    device = scores.device
    visible, _ = visible_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=device)
    if scores.shape[-2:] != visible.shape:
        raise ValueError(f"block scores end in {tuple(scores.shape[-2:])}, expected (NQ, NK) = {tuple(visible.shape)}")
    kept = {"sink_blocks": sink_blocks, "local_blocks": local_blocks}
    forced = always_kept_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=device, **kept)
    if threshold is not None:
        return ((scores > threshold) | forced) & visible
    if allocation == "head":
        free = free_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=device, **kept).flatten()
        needs = head_needs(seq_q, seq_k, causal=causal, block_size=block_size, sparsity=sparsity, **kept,
                           heads=scores.shape[1], head_weights=head_weights, reserved_blocks=reserved_blocks)  # fmt: skip
        ranked = scores.float().flatten(-2).masked_fill(~free, float("-inf"))
        # Best score first, ties by block index (stable); then, stably, every free block before the others.
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        order = order.gather(-1, (~free[order]).to(torch.uint8).argsort(dim=-1, stable=True))
        position = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=device).expand_as(order)
        )
        taken = position < device_needs(needs, str(device))[:, None]
        return (taken.view(scores.shape) & visible) | forced
    ranked = scores.float().masked_fill(~visible, float("-inf")).masked_fill(forced, float("inf"))
    budget = row_budgets(
        seq_q, seq_k, causal=causal, block_size=block_size, topk=topk, sparsity=sparsity, device=device
    )[:, None]
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=device).expand_as(order))
    return ((rank < budget) | forced) & visible


def head_needs(
    seq_q: int, seq_k: int, *, causal: bool, block_size: int, sparsity: float, sink_blocks: int, local_blocks: int,
    heads: int, head_weights=None, reserved_blocks: int = 0,
) -> tuple[int, ...]:  # fmt: skip
    """Blocks each (batch, head) chooses beyond the always-kept ones under ``sparsity`` with ``allocation="head"``:
    the budget ``ceil((1 - sparsity) * visible)`` less the always-kept and the ``reserved_blocks`` (work done outside
    the selection), at most the blocks left to choose.
    Calibrated ``head_weights`` (one per head, mean 1 over all heads of all layers:
    :mod:`hf_fastattn.calibration.seer_budgets`) scale that share, rounded half up and capped at the free blocks, so
    the model's average density stays the requested one. From the geometry on the CPU (cached, no device sync)."""
    weights = None if head_weights is None else tuple(map(float, head_weights))
    return _head_needs(
        seq_q, seq_k, causal, block_size, sparsity, sink_blocks, local_blocks, heads, weights, reserved_blocks,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _head_needs(seq_q, seq_k, causal, block_size, sparsity, sink_blocks, local_blocks, heads, weights, reserved):
    visible, _ = visible_blocks(seq_q, seq_k, causal=causal, block_size=block_size)
    free = int(_free_blocks(seq_q, seq_k, causal, block_size, sink_blocks, local_blocks, "cpu").sum())
    budget = math.ceil((1.0 - sparsity) * int(visible.sum()) - 1e-6)
    need = max(0, min(budget - (int(visible.sum()) - free) - reserved, free))
    if weights is None:
        return (need,) * heads
    return tuple(min(free, math.floor(weight * need + 0.5)) for weight in weights)


@functools.lru_cache(maxsize=256)
def device_needs(needs: tuple[int, ...], device: str) -> torch.Tensor:
    """:func:`head_needs` as a cached int32 device tensor (read-only): one copy per geometry, not one per call."""
    return torch.tensor(needs, dtype=torch.int32, device=device)


def selection_from_mask(
    block_mask: torch.Tensor, *, seq_q: int, seq_k: int, causal: bool, block_size: int
) -> BlockSelection:
    """The compact :class:`BlockSelection` of a bool ``(B, H_mask, NQ, NK)`` block mask (invisible blocks dropped)."""
    if block_mask.dim() != 4:
        raise ValueError(f"block mask must be (B, H, NQ, NK), got {tuple(block_mask.shape)}")
    visible, full = visible_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=block_mask.device)
    if block_mask.shape[-2:] != visible.shape:
        raise ValueError(
            f"block mask ends in {tuple(block_mask.shape[-2:])}, expected (NQ, NK) = {tuple(visible.shape)} for "
            f"S_q={seq_q}, S_kv={seq_k}, block {block_size}"
        )
    selected = block_mask.bool() & visible
    full_mask, partial_mask = selected & full, selected & ~full
    return BlockSelection(*_compact(full_mask), *_compact(partial_mask), block_size)


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask.sum(-1, dtype=torch.int32)
    # A stable sort of "not selected" lists the selected indices first, in ascending order.
    index = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return counts.contiguous(), index.contiguous()


def selection_mask(selection: BlockSelection) -> torch.Tensor:
    """The bool ``(B, H_mask, NQ, NK)`` block mask a selection encodes."""
    nk = selection.shape[-1]
    position = torch.arange(nk, device=selection.full_index.device)
    mask = torch.zeros(selection.shape, dtype=torch.bool, device=selection.full_index.device)
    for count, index in (
        (selection.full_count, selection.full_index),
        (selection.partial_count, selection.partial_index),
    ):
        # Each index row is a permutation of the key blocks, so the scatter writes every position once.
        mask |= torch.zeros_like(mask).scatter(-1, index.long(), position < count[..., None])
    return mask


def selection_density(selection: BlockSelection, *, seq_q: int, seq_k: int, causal: bool) -> torch.Tensor:
    """Fraction of visible key blocks the selection computes, as a 0-d device tensor (no host synchronisation)."""
    visible, _ = visible_blocks(
        seq_q, seq_k, causal=causal, block_size=selection.block_size, device=selection.full_count.device
    )
    batch, heads = selection.shape[:2]
    total = visible.sum() * batch * heads
    return selection.selected_blocks().sum() / total.clamp(min=1)


def to_block_mask(selection: BlockSelection, *, num_q_heads: int, seq_q: int, seq_k: int, causal: bool):
    """The same selection as a FlexAttention ``BlockMask`` (bottom-right causal ``mask_mod`` on partial blocks).

    FlexAttention wants one mask per query head, so a per-KV-head selection is repeated over its group.
    """
    from torch.nn.attention.flex_attention import BlockMask

    repeats = num_q_heads // selection.shape[1]

    def per_query_head(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(repeats, dim=1) if repeats > 1 else tensor

    offset = seq_k - seq_q

    def bottom_right_causal(batch, head, q_index, kv_index):
        return kv_index <= q_index + offset

    return BlockMask.from_kv_blocks(
        per_query_head(selection.partial_count),
        per_query_head(selection.partial_index),
        per_query_head(selection.full_count),
        per_query_head(selection.full_index),
        BLOCK_SIZE=selection.block_size,
        mask_mod=bottom_right_causal if causal else None,
        seq_lengths=(seq_q, seq_k),
    )
