"""Plain-PyTorch references for decode attention.

:func:`decode_attention_reference` is the function the kernels compute: causal (bottom-right) attention of ``S_q``
queries against ``S_kv`` keys with an optional key-padding mask, i.e. the dense reference with ``causal=True``.
:func:`split_decode_reference` computes the same thing the way the kernels do, from partial softmax states over
arbitrary (unequal) key ranges merged with the associative rescale, so a test can check that claim on its own.
"""

from __future__ import annotations

import itertools

import torch

from ..dense.naive import dense_attention_reference, visible_keys


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention in fp32, returned in ``q.dtype``."""
    return dense_attention_reference(q, k, v, causal=True, scale=scale, key_padding=key_padding)


def split_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boundaries: list[int],
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention from partials over key ranges ``[b_i, b_{i+1})`` (``boundaries`` from 0 to ``S_kv``)."""
    batch, q_heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = q_heads // kv_heads
    qf = q.float().reshape(batch, kv_heads, group, seq_q, head_dim)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    keep = visible_keys(torch.arange(seq_q, device=q.device), seq_q, seq_k, True, key_padding)
    scores = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~keep.expand(batch, kv_heads, group, -1, -1), -torch.inf)

    acc = torch.zeros(batch, kv_heads, group, seq_q, head_dim)
    running_max = torch.full((batch, kv_heads, group, seq_q), -torch.inf)
    denominator = torch.zeros(batch, kv_heads, group, seq_q)
    for lo, hi in itertools.pairwise(boundaries):
        part_max = scores[..., lo:hi].amax(dim=-1) if hi > lo else torch.full_like(running_max, -torch.inf)
        part_shift = part_max.nan_to_num(neginf=0.0)
        probs = torch.exp(scores[..., lo:hi] - part_shift[..., None])
        part_acc, part_den = probs @ vf[..., lo:hi, :], probs.sum(-1)
        new_max = torch.maximum(running_max, part_max)
        shift = new_max.nan_to_num(neginf=0.0)
        old_weight, part_weight = torch.exp(running_max - shift), torch.exp(part_max - shift)
        acc = acc * old_weight[..., None] + part_acc * part_weight[..., None]
        denominator = denominator * old_weight + part_den * part_weight
        running_max = new_max
    out = acc / denominator.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    return out.reshape(batch, q_heads, seq_q, head_dim).to(q.dtype)
