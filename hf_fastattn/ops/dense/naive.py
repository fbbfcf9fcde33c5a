"""Plain-PyTorch reference for dense attention: the same function as the Triton kernel, chunked over query rows.

Semantics shared with the kernel: GQA by broadcasting (K/V are never repeated), bottom-right causal alignment
(query ``i`` sees key ``j`` iff ``j <= i + S_kv - S_q``), an optional ``(B, S_kv)`` key-padding mask (True = keep), and
rows that see no key return zeros with ``lse = -inf``. Differentiable through autograd, without NaN on empty rows.
"""

from __future__ import annotations

import functools

import torch

# Score elements materialised per chunk (fp32): 2^26 elements = 256 MiB.
CHUNK_ELEMENTS = 1 << 26


def visible_keys(
    rows: torch.Tensor, seq_q: int, seq_k: int, causal: bool, key_padding: torch.Tensor | None
) -> torch.Tensor | None:
    """Bool ``(B or 1, 1, 1, len(rows), S_kv)`` mask of the keys each query row sees, or None if it sees all of them."""
    keep = None
    if causal:
        cols = torch.arange(seq_k, device=rows.device)
        keep = (cols[None, :] <= rows[:, None] + (seq_k - seq_q))[None, None, None]
    if key_padding is not None:
        pad = key_padding.bool()[:, None, None, None, :]
        keep = pad if keep is None else keep & pad
    return keep


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, lse)`` over the last dim with only ``keep`` visible; rows with nothing visible give zero
    probabilities and ``lse = -inf``, without NaN in values or gradients."""
    empty = ~keep.any(dim=-1)
    # Empty rows get finite scores for the LSE, then zero probabilities.
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(empty[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).masked_fill(~keep, 0.0)
    return probs, lse.masked_fill(empty, float("-inf"))


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention in ``compute_dtype`` (fp32 by default), returned in ``q.dtype``; LSE (natural log) in fp32."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale

    q5 = q.to(compute_dtype).reshape(batch, num_kv_heads, group, seq_q, head_dim)
    k4 = k.to(compute_dtype)[:, :, None]
    v4 = v.to(compute_dtype)[:, :, None]
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, batch * num_q_heads * seq_k))

    outs, lses = [], []
    for start in range(0, seq_q, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, seq_q), device=q.device)
        scores = torch.matmul(q5[:, :, :, start : start + len(rows)], k4.transpose(-1, -2)) * scale
        keep = visible_keys(rows, seq_q, seq_k, causal, key_padding)
        if keep is None:
            lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse[..., None])
        else:
            probs, lse = masked_softmax(scores, keep.expand_as(scores))
        outs.append(torch.matmul(probs, v4))
        lses.append(lse)

    out = torch.cat(outs, dim=3).reshape(batch, num_q_heads, seq_q, head_dim).to(q.dtype)
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=3).reshape(batch, num_q_heads, seq_q).float()


FP8_MAX = 448.0  # the largest finite e4m3 value


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The e4m3 scale of values whose largest magnitude is ``amax`` (1 where they are all zero)."""
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


@functools.cache
def hadamard_matrix(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``size x size`` Sylvester Hadamard matrix of ±1 (``H @ H.T == size * I``); ``size`` a power of two.
    Cached per (size, device): every FP8 call of a model uses the same one. Do not modify it."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two size, got {size}")
    matrix = torch.ones(1, 1, device=device)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` quantised to e4m3 with ``scale`` (broadcast against ``x``) and back, in fp32."""
    return (x.float() / scale).to(torch.float8_e4m3fn).float() * scale


def dense_attention_fp8_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block: int = 128,
    rounded: tuple[str, ...] = ("qk", "v", "p"),
    rotate_qk: bool | None = None,
    smooth_k: bool = True,
    smooth_q: bool = False,
) -> torch.Tensor:
    """What the FP8 forward computes, in fp32: Q and K quantised per ``block`` rows, V per channel, P (with the
    kernel's gain of 2**8) per element before ``P V``. The kernel rounds P against its running row maximum rather than
    the final one, so it agrees with this to within e4m3 rounding, not bit for bit. ``rounded`` names the operands
    that go through e4m3 (all of them, as in the kernel, by default); a subset attributes the kernel's error.
    ``rotate_qk``: Q and K are multiplied by a Hadamard matrix before rounding (FlashAttention-3's incoherent
    processing: ``Q H (K H)^T = D Q K^T``, with outlier channels spread over all of them); by default, as the kernel
    does, whenever the head dim is a power of two. ``smooth_k``: K's fp32 mean over the key sequence (per batch and KV
    head) is subtracted before that, as the kernel does; it shifts every score of a query row by the same ``q · mean``,
    so only the rounding changes. ``smooth_q``: each ``block`` of Q rows (after the rotation) has its mean row taken
    out before rounding, and that row's exact fp32 scores added back, as the kernel does."""

    def per_block(x):
        rows = x.shape[2]
        padded = torch.nn.functional.pad(x.float().abs(), (0, 0, 0, -rows % block))
        scales = fp8_scale(padded.unflatten(2, (-1, block)).amax(dim=(-1, -2)))
        return fp8_round_trip(x, scales.repeat_interleave(block, dim=2)[:, :, :rows, None])

    v_scale = fp8_scale(v.float().abs().amax(dim=2, keepdim=True))
    if rotate_qk is None:
        rotate_qk = q.shape[-1] & (q.shape[-1] - 1) == 0
    rotation = hadamard_matrix(q.shape[-1], q.device) if rotate_qk else None
    if smooth_k:
        k = k - k.mean(dim=2, keepdim=True, dtype=torch.float32)  # fp32, as the kernel's mean and subtraction
    if rotation is not None:
        q, k = q.float() @ rotation, k.float() @ rotation
    q, k = q.float(), k.float()
    q_block_means = None
    if smooth_q:
        rows = q.shape[2]
        padded = torch.nn.functional.pad(q, (0, 0, 0, -rows % block)).unflatten(2, (-1, block))
        counts = (rows - block * torch.arange(padded.shape[2], device=q.device)).clamp(max=block)
        q_block_means = (padded.sum(dim=3) / counts[:, None]).repeat_interleave(block, dim=2)[:, :, :rows]
        q = q - q_block_means
    qd = per_block(q) if "qk" in rounded else q
    kd = per_block(k) if "qk" in rounded else k
    vd = fp8_round_trip(v, v_scale) if "v" in rounded else v.float()

    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if rotation is not None:
        scale = scale / head_dim

    def grouped_scores(queries, keys):
        return torch.matmul(queries.reshape(batch, num_kv_heads, group, seq_q, head_dim), keys[:, :, None].mT)

    scores = grouped_scores(qd, kd)
    if q_block_means is not None:
        scores += grouped_scores(q_block_means, k)  # with the unrounded keys, as the kernel's fp32 bias

    keep = visible_keys(torch.arange(seq_q, device=q.device), seq_q, seq_k, causal, key_padding)
    keep = torch.ones_like(scores, dtype=torch.bool) if keep is None else keep.expand_as(scores)
    probs, _ = masked_softmax(scores * scale, keep)
    if "p" not in rounded:
        return torch.matmul(probs, vd[:, :, None]).reshape(batch, num_q_heads, seq_q, head_dim).to(v.dtype)
    row_max = probs.amax(dim=-1, keepdim=True)
    gain = 256.0 / torch.where(row_max > 0, row_max, 1.0)  # the kernel's P is exp2(s - m + 8): 256 at the row max
    probs_fp8 = (probs * gain).to(torch.float8_e4m3fn).float() / gain
    out = torch.matmul(probs_fp8, vd[:, :, None])
    return out.reshape(batch, num_q_heads, seq_q, head_dim).to(v.dtype)
