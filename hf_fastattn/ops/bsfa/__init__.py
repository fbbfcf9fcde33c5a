"""BSFA (block-sparse FlashAttention with calibrated thresholds): Triton forward kernel and a plain-PyTorch reference."""

from .attention import (
    DEFAULT_BLOCK_M,
    DEFAULT_BLOCK_N,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    BsfaResult,
    bsfa_attention,
)
from .naive import bsfa_attention_reference

__all__ = [
    "DEFAULT_BLOCK_M",
    "DEFAULT_BLOCK_N",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "BsfaResult",
    "bsfa_attention",
    "bsfa_attention_reference",
]
