"""The mask builder registered for every hf_fastattn method, and the classifier for what the attention function gets.

transformers calls a method's mask builder (``AttentionMaskInterface``) once per forward. For the plain patterns our
kernels handle natively (causal aligned bottom-right, or bidirectional, each with optional padding) the builder returns
the ``(B, S_kv)`` key-padding mask, or ``None`` when nothing is padded (an all-ones mask is dropped, one host sync per
forward as in transformers' SDPA mask), so nothing ``S_q x S_kv``-sized is materialised.
A single causal query (a decode step) needs no alignment: it sees every key up to its own position, so a static cache
(keys run to ``max_cache_len``, past the query) also gets a ``(B, S_kv)`` mask, its unfilled slots hidden; with the
cache's tensor offset that costs no host sync, so decode stays CUDA-graph friendly. Several causal queries against a
static cache (its prefill) get a key mask *shorter* than the keys: only the filled slots, up to the last query (a
1-D mask of that length when nothing is padded, so the kernels mask no key). The attention function then drops the
unfilled tail (:func:`drop_unfilled_cache_slots`, views), which makes the alignment bottom-right again; reading the
filled length costs one host sync per forward, so under torch.compile this case is
materialised instead. Anything else (sliding windows, packed sequences, custom ``or``/``and`` mask functions) is
materialised as SDPA's 4-D boolean mask, which the kernels decline and route to the fallback: never silently dropped.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

from .capabilities import (
    MASK_ADDITIVE_4D,
    MASK_BLOCK_MASK,
    MASK_BOOL_4D,
    MASK_KEY_PADDING,
    MASK_NONE,
    MASK_OTHER,
)


def fastattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask builder with transformers' ``AttentionMaskInterface`` signature."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
        # This builder's own filled-slots mask (below), handed back: generate() builds a static cache's mask before
        # the forward, and the forward builds it again from that. It means nothing is padded.
        attention_mask = None
    # Offsets given as tensors (StaticCache) would need a host sync to compare; such caches hold unfilled slots past
    # the queries anyway, so they take the materialised mask.
    static_offsets = isinstance(q_offset, int) and isinstance(kv_offset, int)
    causal_bottom_right = (
        mask_function is causal_mask_function and static_offsets and q_offset + q_length == kv_offset + kv_length
    )
    if causal_bottom_right or mask_function is bidirectional_mask_function:
        if attention_mask is None:
            return None
        return _unless_all_visible(_key_padding(attention_mask, kv_length, kv_offset))
    if mask_function is causal_mask_function and q_length == 1:
        return _keys_up_to(
            q_offset, batch_size, kv_length, kv_offset, attention_mask, _mask_device(q_offset, attention_mask, kwargs)
        )
    static_cache_prefill = mask_function is causal_mask_function and isinstance(kv_offset, int) and kv_offset == 0
    if static_cache_prefill and not torch.compiler.is_compiling():
        filled = int(q_offset) + q_length  # a 0-d tensor offset (StaticCache): one host sync, once per forward
        if filled < kv_length:
            key_mask = None if attention_mask is None else _unless_all_visible(_key_padding(attention_mask, filled, 0))
            if key_mask is None:  # nothing padded: only the number of filled slots, so the kernels mask no key
                return torch.ones(filled, dtype=torch.bool, device=_mask_device(q_offset, attention_mask, kwargs))
            return key_mask
    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("allow_is_bidirectional_skip", None)  # defaults to False: always materialise
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def _key_padding(attention_mask: torch.Tensor, kv_length: int, kv_offset: int) -> torch.Tensor:
    """The ``(B, kv_length)`` bool slice of a 2-D padding mask covering keys ``[kv_offset, kv_offset + kv_length)``."""
    mask = attention_mask.bool()
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:  # a cache longer than the mask: positions past the mask are not attended
        mask = torch.nn.functional.pad(mask, (0, missing), value=False)
    return mask[:, kv_offset : kv_offset + kv_length]


def _unless_all_visible(key_mask: torch.Tensor) -> torch.Tensor | None:
    """``None`` for a key mask that hides nothing (a tokenizer's mask without padding), so the kernels take their path
    without per-key masking. Deciding that costs one host sync per forward, as transformers' own SDPA mask does; under
    torch.compile the mask is kept instead."""
    if torch.compiler.is_compiling() or not bool(key_mask.all()):
        return key_mask
    return None


def _mask_device(q_offset, attention_mask, kwargs) -> torch.device | None:
    """Where a key mask goes: with the cache's tensor offset, else the padding mask, else the builder's ``device``."""
    if isinstance(q_offset, torch.Tensor):
        return q_offset.device
    if attention_mask is not None:
        return attention_mask.device
    return kwargs.get("device")


def _keys_up_to(q_offset, batch_size: int, kv_length: int, kv_offset: int, attention_mask, device) -> torch.Tensor:
    """``(B, kv_length)``: the keys at or before position ``q_offset`` (an int, or a 0-d tensor: compared on the
    device), and not padding."""
    visible = torch.arange(kv_offset, kv_offset + kv_length, device=device) <= q_offset
    if attention_mask is None:
        return visible.expand(batch_size, kv_length)
    return visible & _key_padding(attention_mask, kv_length, kv_offset).to(device)


def classify_mask(attention_mask, batch_size: int, kv_length: int) -> str:
    """Which kind of mask the attention function received (the kinds listed in hf_fastattn.capabilities)."""
    if attention_mask is None:
        return MASK_NONE
    if not isinstance(attention_mask, torch.Tensor):
        return MASK_BLOCK_MASK if type(attention_mask).__name__ == "BlockMask" else MASK_OTHER
    if attention_mask.dim() == 2 and attention_mask.shape == (batch_size, kv_length):
        return MASK_KEY_PADDING
    if attention_mask.dim() == 4:
        return MASK_BOOL_4D if attention_mask.dtype == torch.bool else MASK_ADDITIVE_4D
    return MASK_OTHER


def drop_unfilled_cache_slots(attention_mask, key: torch.Tensor, value: torch.Tensor):
    """``(attention_mask, key, value)`` without the unfilled static-cache tail that :func:`fastattn_mask` marks for a
    prefill: a ``(B, filled)`` key mask shorter than the keys stays the mask; a 1-D ``(filled,)`` mask (the filled
    slots, nothing padded) becomes no mask. Keys and values become views of the cache's filled slots; anything else
    passes unchanged."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() in (1, 2):
        filled = attention_mask.shape[-1]
        if filled < key.shape[2]:
            kept_mask = attention_mask if attention_mask.dim() == 2 else None
            return kept_mask, key[:, :, :filled], value[:, :, :filled]
    return attention_mask, key, value
