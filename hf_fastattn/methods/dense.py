"""``fastattn_dense``: exact attention on the FlashAttention-2 style Triton skeleton.

The baseline every other method is measured against, and the kernel skeleton they share. No per-layer state.
"""

from __future__ import annotations

from ..capabilities import Capabilities, MethodSpec
from ..dispatch import dispatch_attention
from ..masks import fastattn_mask
from ..ops.dense import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, dense_attention, dense_attention_reference


def _kernel(query, key, value, *, causal, scale, key_padding, state):
    return dense_attention(query, key, value, causal=causal, scale=scale, key_padding=key_padding)


def _reference(query, key, value, *, causal, scale, key_padding, state):
    return dense_attention_reference(query, key, value, causal=causal, scale=scale, key_padding=key_padding)


SPEC = MethodSpec(
    name="dense",
    description="Exact FlashAttention-2 style attention (Triton), forward and backward.",
    kernel=_kernel,
    reference=_reference,
    capabilities=Capabilities(head_dims=SUPPORTED_HEAD_DIMS, dtypes=SUPPORTED_DTYPES),
)

mask_builder = fastattn_mask


def dense_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for ``attn_implementation="fastattn_dense"``."""
    return dispatch_attention(SPEC, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
