"""``fastattn_dense``: exact attention on the FlashAttention-2 style Triton skeleton.

The baseline every other method is measured against, and the kernel skeleton they share. Per-layer options:

* ``fast_exp``: ``False`` (default), ``"half"``/``True`` or ``"all"``: that share of the softmax exponentials on the
  FMA units instead of the MUFU unit (VEXP style; 7.5e-5 relative error on the exponential). Measured slower on the
  H100 (benchmarks/NOTES.md), so it stays off by default.
* ``fp8``: ``True`` runs the FP8 (e4m3) forward (Hopper and newer; inference only, no backward); ``"accurate"`` adds
  its Q smoothing, which brings SmolLM2's perplexity cost under 0.4% but costs about what FP8 saves (0.80-1.05x the
  bf16 forward at d128; benchmarks/NOTES.md).
"""

from __future__ import annotations

from ..capabilities import Capabilities, MethodSpec
from ..dispatch import dispatch_attention
from ..masks import fastattn_mask
from ..ops.dense import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, dense_attention, dense_attention_reference
from ..ops.dense.attention import fast_exp_mode
from ..ops.dense.fp8 import dense_attention_fp8
from ..ops.dense.naive import dense_attention_fp8_reference

OPTIONS = ("fast_exp", "fp8")
FP8_MODES = (False, True, "accurate")


def _fp8_options(config) -> dict:
    return {"smooth_q": config.get("fp8") == "accurate"}


def _kernel(query, key, value, *, causal, scale, key_padding, state):
    config = state.config if state is not None else {}
    if config.get("fp8"):
        return dense_attention_fp8(
            query, key, value, causal=causal, scale=scale, key_padding=key_padding, **_fp8_options(config)
        )
    fast_exp = config.get("fast_exp", False)
    return dense_attention(query, key, value, causal=causal, scale=scale, key_padding=key_padding, fast_exp=fast_exp)


def _reference(query, key, value, *, causal, scale, key_padding, state):
    if state is not None and state.config.get("fp8"):
        return dense_attention_fp8_reference(
            query, key, value, causal=causal, scale=scale, key_padding=key_padding, **_fp8_options(state.config)
        )
    return dense_attention_reference(query, key, value, causal=causal, scale=scale, key_padding=key_padding)


def _prepare(model, states) -> None:
    for state in states:
        unknown = sorted(set(state.config) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown fastattn_{state.spec.name} options {unknown}; it takes {list(OPTIONS)}")
        fast_exp = fast_exp_mode(state.config.get("fast_exp", False))
        if state.config.get("fp8", False) not in FP8_MODES:
            raise ValueError(f"fp8 must be one of {list(FP8_MODES)}, got {state.config['fp8']!r}")
        if state.config.get("fp8") and fast_exp:
            raise ValueError("fp8=True runs its own kernel without fast_exp; choose one")


SPEC = MethodSpec(
    name="dense",
    description="Exact FlashAttention-2 style attention (Triton), forward and backward.",
    kernel=_kernel,
    reference=_reference,
    capabilities=Capabilities(head_dims=SUPPORTED_HEAD_DIMS, dtypes=SUPPORTED_DTYPES),
    prepare=_prepare,
)

mask_builder = fastattn_mask


def dense_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for ``attn_implementation="fastattn_dense"``."""
    return dispatch_attention(SPEC, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
