"""Decode attention kernels: short causal queries (1 to 16 rows) against a long KV cache.

Decode is memory-bound: every K/V byte must be read once, and at batch 1 there are far fewer (batch, KV head) pairs
than SMs. The kernels therefore:

* **pack a GQA group** into one query tile: row ``r`` of the tile is query head ``kv_head * group + r // S_q`` at
  position ``r % S_q``, so each K/V tile is loaded once for the whole group;
* **split the key sequence** across programs. A *segment* is the work of one query tile: (batch, KV head, row tile)
  over all ``T = cdiv(S_kv, BLOCK_N)`` key tiles. Partial results ``(acc, m, l)`` (unnormalised accumulator, running
  max in log2 units, denominator) of any key ranges merge exactly with the associative online-softmax rescale
  (``_combine_kernel``), whatever the split sizes.

Three schedules share one inner loop (:func:`segment_partial`, the dense skeleton's tile loop):

* ``single``: one program per segment, which normalises and writes the output (``_split_kv_kernel`` with one split);
* ``split``: FlashDecoding's split-KV, ``num_splits`` equal key chunks per segment, partials to scratch, then
  ``_combine_kernel`` merges them;
* ``streamk`` (LeanAttention): a persistent grid of ``G`` programs (one per SM by default) splits the flat list of all
  segments' key tiles into ``G`` contiguous ranges that differ by at most one tile, crossing segment boundaries
  freely. A segment covered by one program is finished in place; the others' partials are merged by the same
  ``_combine_kernel``, which derives each segment's contributors from the schedule.

LeanAttention merges inside the persistent kernel (a host block spins on flags set by the others). Here the merge is a
second launch: nobody waits on anybody, so correctness needs no co-residency and the interpreter (which runs programs
one after another) executes the same code; one program per row loads a whole chunk of partials at once. In-kernel
last-arriver merges were tried and measured slower (benchmarks/NOTES.md): one partial at a time, and also with every
row's loads in flight at once (~2.5 us more than the second launch at batch 1). On Hopper both launches use
programmatic dependent launch (``USE_PDL``): the merge kernel is launched while the partials are computed and waits
for them in-kernel.

Causality is bottom-right: query position ``i`` sees keys ``j <= i + S_kv - S_q``; ``S_q <= S_kv`` is required.
An optional ``(B, S_kv)`` key-padding mask (non-zero = attend) covers left-padded batches; a row that sees no key
returns zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..dense.fwd import attn_fwd_finish, attn_fwd_tile_ranges, row_tile_source


@triton.jit
def wait_for_previous_grid():
    """Programmatic dependent launch (Hopper), for a partial kernel that a merge kernel follows: this grid may start
    while the previous kernel in the stream still runs. Let the merge launch now, so its start-up overlaps this
    kernel, and wait for the previous kernel's writes before reading or writing anything."""
    tl.extra.cuda.gdc_launch_dependents()
    tl.extra.cuda.gdc_wait()


@triton.jit
def segment_coordinates(segment, num_kv_heads, row_tiles):
    """(batch, KV head, row tile) of a segment; segments are numbered batch-major, row tiles innermost. The batch
    and head come back as int64: a cache of 16 x 512k tokens puts element offsets past 2^31."""
    row_tile = segment % row_tiles
    batch_head = (segment // row_tiles).to(tl.int64)
    return batch_head // num_kv_heads, batch_head % num_kv_heads, row_tile


@triton.jit
def packed_rows(row_tile, group_size, seq_q, BLOCK_M: tl.constexpr):
    """Query head, query position and validity of each row of a packed GQA query tile."""
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows // seq_q, rows % seq_q, rows < group_size * seq_q


@triton.jit
def packed_row_pointers(base, batch, kv_head, head_in_group, positions, stride_b, stride_h, stride_m, group_size):
    """Row start of packed query rows (query head ``kv_head * group + head_in_group`` at ``positions``) in a
    ``(B, H_q, S_q, D)`` tensor; works for one row (scalars) or a tile of rows (vectors)."""
    return base + batch * stride_b + (kv_head * group_size + head_in_group) * stride_h + positions * stride_m


@triton.jit
def segment_partial(
    Q, K, V, KPAD, segment, lo, hi,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_kpad_b,
    num_kv_heads, group_size, row_tiles, seq_q, seq_k, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """Partial ``(acc, m, l)`` of a segment's packed query tile over key tiles ``[lo, hi)`` (multiples of
    ``BLOCK_N``), and the tile's row coordinates ``(batch, kv_head, head_in_group, positions, valid)``. K and V are
    read through TMA descriptors with ``USE_TMA``."""
    batch, kv_head, row_tile = segment_coordinates(segment, num_kv_heads, row_tiles)
    head_in_group, positions, valid = packed_rows(row_tile, group_size, seq_q, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = packed_row_pointers(
        Q, batch, kv_head, head_in_group, positions, stride_qb, stride_qh, stride_qm, group_size
    )
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    causal_offset = seq_k - seq_q
    # Keys [0, causal_offset] are visible to every query position: their tiles need no causal or sequence-end mask.
    unmasked_hi = tl.minimum(tl.maximum((causal_offset + 1) // BLOCK_N * BLOCK_N, lo), hi)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_src = row_tile_source(K + batch * stride_kb + kv_head * stride_kh, seq_k, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D,
                            USE_TMA)  # fmt: skip
    v_src = row_tile_source(V + batch * stride_vb + kv_head * stride_vh, seq_k, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D,
                            USE_TMA)  # fmt: skip
    acc, m_i, l_i = attn_fwd_tile_ranges(
        acc, m_i, l_i, q, k_src, v_src,
        KPAD + batch * stride_kpad_b, lo, unmasked_hi, hi, positions, tl.arange(0, BLOCK_N), offs_d,
        stride_kn, stride_vn, seq_k, causal_offset, scale * 1.4426950408889634,
        HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_KEY_PADDING,
    )  # fmt: skip
    return acc, m_i, l_i, batch, kv_head, head_in_group, positions, valid


@triton.jit
def finish_segment(
    Out, acc, m_i, l_i, batch, kv_head, head_in_group, positions, valid,
    stride_ob, stride_oh, stride_om, group_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Normalise a segment's complete ``(acc, m, l)`` and write its packed rows."""
    out, _ = attn_fwd_finish(acc, m_i, l_i)
    offs_d = tl.arange(0, BLOCK_D)
    rows = packed_row_pointers(
        Out, batch, kv_head, head_in_group, positions, stride_ob, stride_oh, stride_om, group_size
    )
    tl.store(rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=valid[:, None] & (offs_d < HEAD_DIM))


@triton.jit
def store_partial(PartAcc, PartM, PartL, slot, acc, m_i, l_i, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    tile = slot * BLOCK_M * BLOCK_D + rows[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(PartAcc + tile, acc)
    tl.store(PartM + slot * BLOCK_M + rows, m_i)
    tl.store(PartL + slot * BLOCK_M + rows, l_i)


@triton.jit
def _split_kv_kernel(
    Q, K, V, KPAD, Out, PartAcc, PartM, PartL,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_kpad_b,
    num_kv_heads, group_size, row_tiles, seq_q, seq_k, scale, tiles_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, WRITE_OUTPUT: tl.constexpr, USE_TMA: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (split, segment): key tiles ``[split * tiles_per_split, ...)`` of one segment. With one split per
    segment (``WRITE_OUTPUT``) it writes the output; otherwise its partial goes to slot ``segment * splits + split``."""
    if USE_PDL:
        wait_for_previous_grid()
    split = tl.program_id(0)
    segment = tl.program_id(1)
    num_tiles = tl.cdiv(seq_k, BLOCK_N)
    acc, m_i, l_i, batch, kv_head, head_in_group, positions, valid = segment_partial(
        Q, K, V, KPAD, segment,
        tl.minimum(split * tiles_per_split, num_tiles) * BLOCK_N,
        tl.minimum((split + 1) * tiles_per_split, num_tiles) * BLOCK_N,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_kpad_b, num_kv_heads, group_size, row_tiles, seq_q, seq_k, scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_KEY_PADDING, USE_TMA,
    )  # fmt: skip
    if WRITE_OUTPUT:
        finish_segment(
            Out, acc, m_i, l_i, batch, kv_head, head_in_group, positions, valid,
            stride_ob, stride_oh, stride_om, group_size, HEAD_DIM, BLOCK_D,
        )  # fmt: skip
    else:
        store_partial(PartAcc, PartM, PartL, segment * tl.num_programs(0) + split, acc, m_i, l_i, BLOCK_M, BLOCK_D)


@triton.jit
def streamk_range_start(program, tiles_per_program, programs_with_extra):
    """First flat tile of a program: the first ``programs_with_extra`` programs take one tile more than the rest."""
    return program * tiles_per_program + tl.minimum(program, programs_with_extra)


@triton.jit
def streamk_owner(tile, tiles_per_program, programs_with_extra):
    """The program whose range holds a flat tile (inverse of :func:`streamk_range_start`)."""
    long_tiles = programs_with_extra * (tiles_per_program + 1)
    return tl.where(
        tile < long_tiles,
        tile // (tiles_per_program + 1),
        programs_with_extra + (tile - long_tiles) // tl.maximum(tiles_per_program, 1),
    )


@triton.jit
def streamk_slot(program, segment, tiles_per_segment, tiles_per_program, programs_with_extra):
    """Scratch slot of ``program``'s partial of ``segment``: 2 per program, for the first and the last segment of its
    range (a segment strictly inside a range is finished in place and needs none)."""
    first_segment = streamk_range_start(program, tiles_per_program, programs_with_extra) // tiles_per_segment
    return 2 * program + (segment != first_segment).to(tl.int32)


# Schedule integers are never specialised: a value of 1 (e.g. a cache of one key tile) folded into the IR made Triton
# 3.6's coalesce pass fail an assertion.
@triton.jit(do_not_specialize=["tiles_per_segment", "tiles_per_program", "programs_with_extra"])
def _streamk_kernel(
    Q, K, V, KPAD, Out, PartAcc, PartM, PartL,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_kpad_b,
    num_kv_heads, group_size, row_tiles, seq_q, seq_k, scale,
    tiles_per_segment, tiles_per_program, programs_with_extra,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, USE_TMA: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Persistent stream-K decode: this program's contiguous range of flat key tiles, segment by segment."""
    if USE_PDL:
        wait_for_previous_grid()
    program = tl.program_id(0)
    tile = streamk_range_start(program, tiles_per_program, programs_with_extra)
    end = tile + tiles_per_program + (program < programs_with_extra).to(tl.int32)
    while tile < end:
        segment = tile // tiles_per_segment
        segment_start = segment * tiles_per_segment
        stop = tl.minimum(segment_start + tiles_per_segment, end)
        acc, m_i, l_i, batch, kv_head, head_in_group, positions, valid = segment_partial(
            Q, K, V, KPAD, segment, (tile - segment_start) * BLOCK_N, (stop - segment_start) * BLOCK_N,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_kpad_b, num_kv_heads, group_size, row_tiles, seq_q, seq_k, scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_KEY_PADDING, USE_TMA,
        )  # fmt: skip
        first_owner = streamk_owner(segment_start, tiles_per_program, programs_with_extra)
        last_owner = streamk_owner(segment_start + tiles_per_segment - 1, tiles_per_program, programs_with_extra)
        if first_owner == last_owner:
            finish_segment(
                Out, acc, m_i, l_i, batch, kv_head, head_in_group, positions, valid,
                stride_ob, stride_oh, stride_om, group_size, HEAD_DIM, BLOCK_D,
            )  # fmt: skip
        else:
            slot = streamk_slot(program, segment, tiles_per_segment, tiles_per_program, programs_with_extra)
            store_partial(PartAcc, PartM, PartL, slot, acc, m_i, l_i, BLOCK_M, BLOCK_D)
        tile = stop


@triton.jit
def _combine_kernel(
    Out, PartAcc, PartM, PartL,
    stride_ob, stride_oh, stride_om,
    num_kv_heads, group_size, row_tiles, seq_q,
    num_splits, tiles_per_segment, tiles_per_program, programs_with_extra,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    STREAMK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (segment, row): merge the row's partials and write its output.

    Split-KV partials of a segment sit in slots ``segment * num_splits + split``. Stream-K's contributors are the
    programs owning the segment's first to last key tile (a segment one program finished is skipped here). One row
    per program, ``CHUNK`` partials per load, so every partial's read is in flight at once instead of one memory
    latency per partial.
    """
    segment = tl.program_id(0)
    row = tl.program_id(1)
    if STREAMK:
        segment_start = segment * tiles_per_segment
        first = streamk_owner(segment_start, tiles_per_program, programs_with_extra)
        count = streamk_owner(segment_start + tiles_per_segment - 1, tiles_per_program, programs_with_extra) - first + 1
    else:
        first = segment * num_splits
        count = num_splits
    batch, kv_head, row_tile = segment_coordinates(segment, num_kv_heads, row_tiles)
    packed_row = row_tile * BLOCK_M + row
    if USE_PDL:
        # Launched while the partial kernel still runs: the partials are complete and visible only after this.
        tl.extra.cuda.gdc_wait()
    if (count > 1) & (packed_row < group_size * seq_q):
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        m_i = tl.max(tl.full([CHUNK], float("-inf"), dtype=tl.float32), 0)
        l_i = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
        for start in range(0, count, CHUNK):
            index = start + tl.arange(0, CHUNK)
            if STREAMK:
                slots = streamk_slot(first + index, segment, tiles_per_segment, tiles_per_program, programs_with_extra)
            else:
                slots = first + index
            present = index < count
            # .cg reads from L2: the partials were written by other programs, possibly on other SMs.
            m_parts = tl.load(PartM + slots * BLOCK_M + row, mask=present, other=float("-inf"), cache_modifier=".cg")
            l_parts = tl.load(PartL + slots * BLOCK_M + row, mask=present, other=0.0, cache_modifier=".cg")
            acc_ptrs = PartAcc + (slots[:, None] * BLOCK_M + row) * BLOCK_D + offs_d[None, :]
            acc_parts = tl.load(acc_ptrs, mask=present[:, None], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_i, tl.max(m_parts, 0))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_shift)
            weights = tl.math.exp2(m_parts - m_shift)
            acc = acc * alpha + tl.sum(acc_parts * weights[:, None], 0)
            l_i = l_i * alpha + tl.sum(l_parts * weights, 0)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)
        row_start = packed_row_pointers(
            Out, batch, kv_head, packed_row // seq_q, packed_row % seq_q, stride_ob, stride_oh, stride_om, group_size
        )
        tl.store(row_start + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
