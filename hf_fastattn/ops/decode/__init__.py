"""Decode attention (a few queries against a long KV cache): single-pass, split-KV and stream-K (LeanAttention)
Triton kernels with shape-driven auto-selection, and plain-PyTorch references."""

from .attention import DECODE_MAX_QUERY, STRATEGIES, DecodeConfig, DecodePlan, decode_attention, plan_decode
from .naive import decode_attention_reference, split_decode_reference

__all__ = [
    "DECODE_MAX_QUERY",
    "STRATEGIES",
    "DecodeConfig",
    "DecodePlan",
    "decode_attention",
    "decode_attention_reference",
    "plan_decode",
    "split_decode_reference",
]
