"""One attention-function body for every method: pick the layer's method, check capabilities, run or fall back.

Every registered ``fastattn_<method>`` function calls :func:`dispatch_attention`. The method actually run is the
per-layer one set by :func:`hf_fastattn.patch` when the module carries a state, else the registered method, so mixed
methods per layer need no extra registered name.

Routing, in order:

1. The layer is assigned ``"sdpa"``: transformers' SDPA, no warning (the user asked for it).
2. The call is outside the method's capabilities (mask kind, dropout, head dim, dtype, causality, GQA, backward): the
   method's fallback, SDPA by default, with one logged warning per (method, reason).
3. The tensors are on a device the Triton kernels cannot run on (CPU without ``TRITON_INTERPRET=1``): the method's
   plain-PyTorch reference, with one logged warning.
4. A decode step (causal, at most ``DECODE_MAX_QUERY`` queries after a cached prefix, no gradient) of a layer whose ``decode`` setting is
   not ``"off"``: the shared decode kernels (:mod:`hf_fastattn.ops.decode`), whatever the method. Decode attends to
   the whole cache, so every method's decode is exact attention.
5. Otherwise the method's Triton kernel.

Causality comes from the ``is_causal`` keyword when given, else the module's ``is_causal``; it is never inferred from a
missing mask, and is aligned bottom-right when ``S_q < S_kv``.
"""

from __future__ import annotations

import logging

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .capabilities import MASK_BOOL_4D, MASK_KEY_PADDING, MASK_NONE, MethodSpec
from .masks import classify_mask, drop_unfilled_cache_slots
from .ops._runtime import triton_supports
from .ops.decode import DECODE_MAX_QUERY, decode_attention
from .ops.dense.naive import visible_keys

logger = logging.getLogger("hf_fastattn")

_warned: set[tuple[str, str]] = set()


def warn_once(method: str, reason: str, action: str) -> None:
    if (method, reason) in _warned:
        return
    _warned.add((method, reason))
    logger.warning("hf_fastattn: fastattn_%s does not support %s; %s.", method, reason, action)


def reset_warnings() -> None:
    """Forget which warnings were logged (tests, or a long-running process that wants them again)."""
    _warned.clear()


def is_causal_call(module: torch.nn.Module, kwargs: dict) -> bool:
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    return bool(causal)


def dispatch_attention(
    spec: MethodSpec | None,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """HF attention-function body shared by all methods; returns ``(out[B, S_q, H_q, D], None)``."""
    state = getattr(module, "fastattn_state", None)
    if state is not None:
        spec = state.spec
    causal = is_causal_call(module, kwargs)
    kwargs.pop("is_causal", None)
    attention_mask, key, value = drop_unfilled_cache_slots(attention_mask, key, value)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if spec is None:
        return sdpa_fallback(module, query, key, value, attention_mask, scale, dropout, causal, **kwargs)

    mask_kind = classify_mask(attention_mask, query.shape[0], key.shape[2])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    reason = spec.capabilities.refusal(
        query, key, causal=causal, mask_kind=mask_kind, dropout=dropout, needs_grad=needs_grad, scale=scale
    )
    if reason is not None:
        warn_once(spec.name, reason, f"falling back to {spec.fallback}")
        return sdpa_fallback(module, query, key, value, attention_mask, scale, dropout, causal, **kwargs)

    key_padding = attention_mask if mask_kind == MASK_KEY_PADDING else None
    if triton_supports(query.device):
        strategy = state.decode if state is not None else spec.default_decode
        decode_step = query.shape[2] <= DECODE_MAX_QUERY and query.shape[2] < key.shape[2]
        if causal and decode_step and strategy != "off" and not needs_grad:
            out = decode_attention(query, key, value, scale=scale, key_padding=key_padding, strategy=strategy)
            return out.transpose(1, 2).contiguous(), None
        run = spec.kernel
    else:
        warn_once(
            spec.name,
            f"{query.device.type} tensors without TRITON_INTERPRET=1",
            "running its plain-PyTorch reference (set TRITON_INTERPRET=1 to interpret the Triton kernels)",
        )
        run = spec.reference
    extra = {"position_ids": kwargs.get("position_ids")} if spec.uses_positions else {}
    out = run(query, key, value, causal=causal, scale=scale, key_padding=key_padding, state=state, **extra)
    return out.transpose(1, 2).contiguous(), None


def sdpa_fallback(module, query, key, value, attention_mask, scale, dropout, causal, **kwargs):
    """transformers' SDPA with the same semantics as our kernels: bottom-right causality, empty rows give zeros."""
    batch, seq_q, seq_k = query.shape[0], query.shape[2], key.shape[2]
    mask_kind = classify_mask(attention_mask, batch, seq_k)
    if mask_kind == MASK_KEY_PADDING or (mask_kind == MASK_NONE and causal and seq_q != seq_k):
        rows = torch.arange(seq_q, device=query.device)
        key_padding = attention_mask if mask_kind == MASK_KEY_PADDING else None
        attention_mask = visible_keys(rows, seq_q, seq_k, causal, key_padding)[:, 0]  # (B or 1, 1, S_q, S_kv)
        mask_kind = MASK_BOOL_4D
    out, weights = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scale, is_causal=causal, **kwargs
    )
    if mask_kind == MASK_BOOL_4D:
        # SDPA leaves NaN in rows that see no key; our contract is zeros.
        seen = attention_mask.any(dim=-1).transpose(1, 2)[..., None]  # (B, S_q, 1, 1) against out (B, S_q, H, D)
        out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, weights
