"""Dense FlashAttention-2 style attention: Triton kernels (forward and backward) and a plain-PyTorch reference."""

from .attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, dense_attention
from .naive import dense_attention_reference

__all__ = ["SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "dense_attention", "dense_attention_reference"]
