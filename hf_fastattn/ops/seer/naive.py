"""Plain-PyTorch references for SeerAttention's kernels, chunked over query blocks so memory stays bounded.

Same semantics as the kernels (:mod:`hf_fastattn.ops.seer.fwd`): blocks counted from row 0 and key 0, bottom-right
causal, optional ``(B, S_kv)`` key padding, rows that see nothing give zeros.
"""

from __future__ import annotations

import torch

from ..dense.naive import CHUNK_ELEMENTS, masked_softmax, visible_keys


def _query_chunks(batch: int, heads: int, seq_q: int, seq_k: int, block_size: int):
    """Row ranges that start on query-block boundaries and keep a chunk's scores under ``CHUNK_ELEMENTS``."""
    rows = max(block_size, CHUNK_ELEMENTS // max(1, batch * heads * seq_k) // block_size * block_size)
    return [(start, min(start + rows, seq_q)) for start in range(0, seq_q, rows)]


def _scores(q, k, start, stop, causal, key_padding, scale):
    """Scaled fp32 scores ``(B, H_kv, G, rows, S_kv)`` with the element mask (or None when everything is visible)."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    q5 = q[:, :, start:stop].float().reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, stop - start, head_dim)
    scores = torch.matmul(q5, k.float()[:, :, None].transpose(-1, -2)) * scale
    keep = visible_keys(torch.arange(start, stop, device=q.device), seq_q, seq_k, causal, key_padding)
    return scores, keep


def _expand_heads(per_head: torch.Tensor, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """``(B, H_mask, ...)`` to ``(B, H_kv, G, ...)`` over query heads."""
    per_head = per_head.repeat_interleave(num_q_heads // per_head.shape[1], dim=1)
    return per_head.reshape(per_head.shape[0], num_kv_heads, num_q_heads // num_kv_heads, *per_head.shape[2:])


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
    return_lse: bool = False,
):
    """Attention restricted to the key blocks set in the bool ``(B, H_kv or H_q, NQ, NK)`` ``block_mask``, in fp32."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    blocks = _expand_heads(block_mask.bool(), num_q_heads, num_kv_heads)  # (B, H_kv, G, NQ, NK)
    key_block = torch.arange(seq_k, device=q.device) // block_size
    outs, lses = [], []
    for start, stop in _query_chunks(batch, num_q_heads, seq_q, seq_k, block_size):
        scores, keep = _scores(q, k, start, stop, causal, key_padding, scale)
        row_block = torch.arange(start, stop, device=q.device) // block_size
        selected = blocks[:, :, :, row_block][..., key_block]  # (B, H_kv, G, rows, S_kv)
        keep = selected if keep is None else selected & keep
        probs, lse = masked_softmax(scores, keep.expand_as(scores))
        outs.append(torch.matmul(probs, v.float()[:, :, None]))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(batch, num_q_heads, seq_q, head_dim).to(q.dtype)
    return (out, torch.cat(lses, dim=3).reshape(batch, num_q_heads, seq_q)) if return_lse else out


def attention_with_block_target_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and the 2-D max-pooled probability map ``(B, H_q, NQ, NK)`` (see the kernel), in fp32."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    nk = -(-seq_k // block_size)
    outs, targets = [], []
    for start, stop in _query_chunks(batch, num_q_heads, seq_q, seq_k, block_size):
        scores, keep = _scores(q, k, start, stop, causal, key_padding, scale)
        keep = torch.ones_like(scores, dtype=torch.bool) if keep is None else keep.expand_as(scores)
        probs, _ = masked_softmax(scores, keep)
        outs.append(torch.matmul(probs, v.float()[:, :, None]))
        rows = stop - start
        padded = torch.nn.functional.pad(probs, (0, nk * block_size - seq_k, 0, -rows % block_size))
        pooled = padded.unflatten(-1, (nk, block_size)).amax(-1)
        targets.append(pooled.unflatten(-2, (-1, block_size)).amax(-2))
    out = torch.cat(outs, dim=3).reshape(batch, num_q_heads, seq_q, head_dim).to(q.dtype)
    target = torch.cat(targets, dim=3).reshape(batch, num_q_heads, -1, nk)
    return out, target


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotate-half convention (as Llama): ``(x1, x2) -> (-x2, x1)`` over the last dimension's halves."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def pool_blocks_reference(
    x: torch.Tensor,
    block_size: int,
    *,
    valid: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    extremes: bool = False,
) -> tuple[torch.Tensor, ...]:
    """:func:`hf_fastattn.ops.seer.pool.pool_blocks` in PyTorch (fp32)."""
    batch, heads, seq, dim = x.shape
    x = x.float()
    if cos is not None:
        cos, sin = cos[:, None].float(), sin[:, None].float()
        x = (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)
    blocks = -(-seq // block_size)
    padded = torch.nn.functional.pad(x, (0, 0, 0, blocks * block_size - seq)).view(
        batch, heads, blocks, block_size, dim
    )
    keep = torch.zeros(batch, blocks * block_size, dtype=torch.bool, device=x.device)
    keep[:, :seq] = True if valid is None else valid.bool()
    keep = keep.view(batch, 1, blocks, block_size, 1)
    average = (padded * keep).sum(3) / keep.sum(3).clamp(min=1)
    if not extremes:
        return (average,)
    any_valid = keep.any(3)
    maximum = padded.masked_fill(~keep, float("-inf")).amax(3)
    minimum = padded.masked_fill(~keep, float("inf")).amin(3)
    zero = torch.zeros_like(maximum)
    return average, torch.where(any_valid, maximum, zero), torch.where(any_valid, minimum, zero)
