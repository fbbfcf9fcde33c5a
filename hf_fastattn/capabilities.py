"""What a method can do, declared once per method, and the reason a call falls outside it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Mask kinds as the attention function receives them (see hf_fastattn.masks.classify_mask).
MASK_NONE = "none"
MASK_KEY_PADDING = "key_padding"
MASK_BOOL_4D = "bool_4d"
MASK_ADDITIVE_4D = "additive_4d"
MASK_BLOCK_MASK = "block_mask"
MASK_OTHER = "other"
# What each kind usually means, for the fallback warning.
MASK_KIND_MEANINGS = {
    MASK_NONE: "no mask",
    MASK_KEY_PADDING: "a (batch, keys) padding mask",
    MASK_BOOL_4D: (
        "a materialised mask: sliding window, packed sequences, a custom mask function, or, under torch.compile, "
        "several queries against a static cache"
    ),
    MASK_ADDITIVE_4D: "a float mask added to the scores",
    MASK_BLOCK_MASK: "a FlexAttention BlockMask",
    MASK_OTHER: "a shape no kernel reads",
}


# The per-layer ``decode`` setting every method accepts: a decode-kernel strategy, or "off" (the method's own kernel).
DECODE_SETTINGS = ("auto", "single", "split", "streamk", "off")


@dataclass(frozen=True)
class Capabilities:
    """Inputs a method's kernel computes exactly; anything else goes to the method's fallback.

    ``dtypes`` apply to CUDA tensors. On the CPU (Triton interpreter or the PyTorch reference) every floating dtype
    is accepted, because both compute in the input precision or higher.

    ``decode``: short causal queries (decode steps, up to ``hf_fastattn.ops.decode.DECODE_MAX_QUERY`` rows) run the
    shared decode kernels (single-pass, split-KV or stream-K, :mod:`hf_fastattn.ops.decode`) instead of the method's
    own kernel, with the strategy chosen per layer by the ``decode`` setting.
    """

    causal: bool = True
    bidirectional: bool = True
    gqa: bool = True
    backward: bool = True
    decode: bool = True
    dropout: bool = False
    head_dims: tuple[int, ...] = (16, 32, 64, 80, 96, 128, 256)
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    masks: tuple[str, ...] = (MASK_NONE, MASK_KEY_PADDING)

    def refusal(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        *,
        causal: bool,
        mask_kind: str,
        dropout: float,
        needs_grad: bool,
        scale: float,
    ) -> str | None:
        """The first reason this call is outside the declared capabilities, or None if the kernel can take it."""
        if not scale > 0.0:
            return f"softmax scale {scale:g} (kernels need a positive scale)"
        if mask_kind not in self.masks:
            return f"attention mask of kind '{mask_kind}' ({MASK_KIND_MEANINGS[mask_kind]})"
        if dropout > 0.0 and not self.dropout:
            return f"attention dropout {dropout:g} while training"
        if query.shape[-1] not in self.head_dims:
            return f"head dim {query.shape[-1]} (supported: {list(self.head_dims)})"
        if query.device.type == "cuda" and query.dtype not in self.dtypes:
            return f"dtype {query.dtype} on GPU (supported: {[str(d) for d in self.dtypes]})"
        if causal and not self.causal:
            return "causal attention"
        if not causal and not self.bidirectional:
            return "bidirectional attention"
        if query.shape[1] != key.shape[1] and not self.gqa:
            return "grouped-query attention"
        if needs_grad and not self.backward:
            return "backward pass"
        return None

    def describe(self) -> dict:
        return {
            "causal": self.causal,
            "bidirectional": self.bidirectional,
            "gqa": self.gqa,
            "backward": self.backward,
            "decode": self.decode,
            "dropout": self.dropout,
            "head_dims": list(self.head_dims),
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "masks": list(self.masks),
        }


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its kernel call, its CPU reference, capabilities and fallback.

    ``kernel`` and ``reference`` take ``(query, key, value, *, causal, scale, key_padding, state)`` in HF's
    ``(B, H, S, D)`` layout and return the output in the same layout.

    ``decode_strategy`` is the default ``decode`` setting of the method's layers (see :data:`DECODE_SETTINGS`).

    ``prepare(model, states)``, when given, runs at patch time for the layers assigned to this method (load
    thresholds, create gates) and raises on a bad configuration. ``statistics(state)``, when given, returns what the
    layer realised since it was patched, at least ``{"density": fraction of attention work done}`` (None until the
    layer has run); a method without it computes exact attention (density 1.0).
    """

    name: str
    description: str
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    capabilities: Capabilities = field(default_factory=Capabilities)
    fallback: str = "sdpa"
    decode_strategy: str = "auto"
    prepare: Callable[..., None] | None = None
    statistics: Callable[..., dict] | None = None
    # The kernel and reference also take ``position_ids`` (the call's, or None): gates that undo RoPE need them.
    uses_positions: bool = False
    # ``hf-fastattn selftest`` patches with this configuration, chosen so the result must equal exact attention.
    selftest_config: dict = field(default_factory=dict)

    @property
    def default_decode(self) -> str:
        """The decode setting of a layer that does not choose one (or runs without a state)."""
        return self.decode_strategy if self.capabilities.decode else "off"

    @property
    def registered_name(self) -> str:
        return f"fastattn_{self.name}"
