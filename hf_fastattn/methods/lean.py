"""``fastattn_lean``: exact attention whose decode steps run LeanAttention's stream-K kernel.

Prefill runs the dense kernel. Decode steps (causal, up to ``DECODE_MAX_QUERY`` queries) run the stream-K decode
kernel of :mod:`hf_fastattn.ops.decode`: the KV sequence of every (batch, KV head) is split across all SMs in equal
shares of key tiles, GQA query heads packed so each K/V byte is read once. Every other causal method reaches the same
kernels through its ``decode`` setting (default ``"auto"``, which picks single-pass or stream-K by shape); this method
pins ``decode="streamk"`` by default. ``patch(model, "lean", decode=...)`` chooses another strategy.
"""

from __future__ import annotations

from ..capabilities import Capabilities, MethodSpec
from ..dispatch import dispatch_attention
from ..masks import fastattn_mask
from ..ops.dense import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from .dense import SPEC as DENSE_SPEC

SPEC = MethodSpec(
    name="lean",
    description="Exact attention: dense Triton prefill, stream-K (LeanAttention) decode across all SMs.",
    kernel=DENSE_SPEC.kernel,
    reference=DENSE_SPEC.reference,
    capabilities=Capabilities(head_dims=SUPPORTED_HEAD_DIMS, dtypes=SUPPORTED_DTYPES),
    decode_strategy="streamk",
    prepare=DENSE_SPEC.prepare,  # the dense kernel's options (fast_exp, fp8)
)

mask_builder = fastattn_mask


def lean_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for ``attn_implementation="fastattn_lean"``."""
    return dispatch_attention(SPEC, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
