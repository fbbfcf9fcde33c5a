"""SeerAttention: a block-sparse kernel over compact block selections, and the ground-truth kernel gates learn from."""

from .attention import (
    DEFAULT_BLOCK_SIZE,
    attention_with_block_target,
    block_sparse_attention,
    normalise_target,
)
from .blocks import (
    ALLOCATIONS,
    BlockSelection,
    always_kept_blocks,
    select_blocks,
    selection_density,
    selection_from_mask,
    selection_mask,
    to_block_mask,
    visible_blocks,
)
from .naive import attention_with_block_target_reference, block_sparse_attention_reference, pool_blocks_reference
from .pool import pool_blocks
from .select import select_block_lists

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_BLOCK_SIZE",
    "BlockSelection",
    "always_kept_blocks",
    "attention_with_block_target",
    "attention_with_block_target_reference",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "normalise_target",
    "pool_blocks",
    "pool_blocks_reference",
    "select_block_lists",
    "select_blocks",
    "selection_density",
    "selection_from_mask",
    "selection_mask",
    "to_block_mask",
    "visible_blocks",
]
