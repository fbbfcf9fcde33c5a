"""Plain-PyTorch reference for BSFA: the same keep/skip rule as the Triton kernel, chunked over query tiles.

Scores are computed in fp32 from the inputs; a key tile of a query tile is kept when it is always kept (the first
tile, or a tile overlapping the query tile's own bottom-right aligned key positions) or when its maximum scaled score
over the query tile's rows and visible keys is ``>= tau``. Skipped tiles leave the softmax entirely. See
:mod:`hf_fastattn.ops.bsfa.fwd` for the rule and :class:`~hf_fastattn.ops.bsfa.attention.BsfaResult` for outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dense.naive import CHUNK_ELEMENTS, visible_keys
from .attention import DEFAULT_BLOCK_M, DEFAULT_BLOCK_N, BsfaResult, check_bsfa_inputs


def tile_geometry(
    query_tiles: torch.Tensor, num_key_tiles: int, seq_q: int, seq_k: int, block_m: int, block_n: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(len(query_tiles), num_key_tiles)`` masks: the key tiles the kernel visits for each query tile (causal:
    up to its last row's diagonal), and those always kept (the first tile, and tiles overlapping the query tile's own
    bottom-right aligned key positions)."""
    offset = seq_k - seq_q
    key_start = torch.arange(num_key_tiles, device=query_tiles.device)[None, :] * block_n
    tile_start = query_tiles[:, None] * block_m
    last_row = torch.clamp(tile_start + block_m, max=seq_q) - 1
    hi = torch.clamp(tile_start + block_m + offset, min=0, max=seq_k) if causal else torch.full_like(tile_start, seq_k)
    visited = key_start < hi
    diagonal = (key_start + block_n > tile_start + offset) & (key_start <= last_row + offset)
    return visited, diagonal | (key_start == 0)


def bsfa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thresholds: torch.Tensor | float,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    record_tile_max: bool = False,
) -> BsfaResult:
    """BSFA in fp32, returned like :func:`~hf_fastattn.ops.bsfa.bsfa_attention` (output in ``q.dtype``)."""
    thresholds, key_padding, scale = check_bsfa_inputs(q, k, v, thresholds, key_padding, scale, block_m, block_n)
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    num_m_tiles, num_n_tiles = -(-seq_q // block_m), -(-seq_k // block_n)
    offset = seq_k - seq_q
    device = q.device

    q5 = q.float().reshape(batch, num_kv_heads, group, seq_q, head_dim)
    k4, v4 = k.float()[:, :, None], v.float()[:, :, None]
    tau = thresholds.reshape(num_kv_heads, group, -1)
    tiles_per_chunk = max(1, CHUNK_ELEMENTS // max(1, batch * num_q_heads * seq_k * block_m))

    outs, lses, stats, tile_maxima = [], [], [], []
    for first_tile in range(0, num_m_tiles, tiles_per_chunk):
        tiles = torch.arange(first_tile, min(first_tile + tiles_per_chunk, num_m_tiles), device=device)
        start, end = int(tiles[0]) * block_m, min(int(tiles[-1] + 1) * block_m, seq_q)
        rows = torch.arange(start, end, device=device)
        scores = torch.matmul(q5[:, :, :, start:end], k4.transpose(-1, -2)) * scale  # (B, Hkv, G, R, S_kv)
        keep = visible_keys(rows, seq_q, seq_k, causal, key_padding)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))

        # Maximum per (query tile, key tile); rows and keys past the end pad with -inf.
        padded = F.pad(
            scores, (0, num_n_tiles * block_n - seq_k, 0, len(tiles) * block_m - len(rows)), value=float("-inf")
        )
        tile_max = padded.unflatten(-1, (num_n_tiles, block_n)).unflatten(-3, (len(tiles), block_m)).amax(dim=(-3, -1))

        visited, always = tile_geometry(tiles, num_n_tiles, seq_q, seq_k, block_m, block_n, causal)
        position = torch.clamp(torch.clamp(tiles * block_m + offset, min=0) // block_m, max=tau.shape[-1] - 1)
        tile_tau = tau[:, :, position]  # (Hkv, G, T)
        kept = visited & (always | (tile_max >= tile_tau[..., None]))

        gateable = visited & ~always
        counts = torch.stack(
            [visited.expand_as(kept).sum(-1), gateable.expand_as(kept).sum(-1), (gateable & ~kept).sum(-1)], dim=-1
        )
        stats.append(counts.to(torch.int32))
        tile_maxima.append(tile_max.masked_fill(~visited, float("-inf")))

        kept_keys = kept.repeat_interleave(block_m, dim=-2)[..., : len(rows), :]
        kept_keys = kept_keys.repeat_interleave(block_n, dim=-1)[..., :seq_k]
        scores = scores.masked_fill(~kept_keys, float("-inf"))
        empty = torch.isneginf(scores).all(dim=-1)
        lse = torch.logsumexp(scores.masked_fill(empty[..., None], 0.0), dim=-1)
        probs = torch.exp(scores - lse[..., None]).masked_fill(empty[..., None], 0.0)
        outs.append(torch.matmul(probs, v4))
        lses.append(lse.masked_fill(empty, float("-inf")))

    def heads(tensors, dim):
        joined = torch.cat(tensors, dim=dim)
        return joined.reshape(batch, num_q_heads, *joined.shape[3:])

    out = heads(outs, 3).to(q.dtype)
    tile_max = heads(tile_maxima, 3) if record_tile_max else None
    return BsfaResult(out, heads(lses, 3), heads(stats, 3), tile_max)
