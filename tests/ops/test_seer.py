"""SeerAttention (``hf_fastattn.ops.seer``): the block-sparse kernel, the block-target kernel and the selection rules.

Everything the package computes is checked against a second, independent reading written here:

* the block-sparse kernel against plain softmax attention over an element mask built from the block mask by
  blowing every block up to ``block_size x block_size`` elements (:func:`expected_keys`), and against the package's
  reference ``block_sparse_attention_reference``, which is itself checked against the same element mask;
* the block-target kernel against full fp32 softmax probabilities, max-pooled over each (query block, key block) pair
  with explicit loops (:func:`expected_target`);
* the block geometry (visible / full blocks), the always-kept blocks and the threshold / top-k / sparsity rules against
  element-level visibility and Python loops over rows (:func:`block_geometry`, :func:`expected_forced`,
  :func:`expected_ranked_selection`);
* the FlexAttention export against FlexAttention itself (eager, with the block structure spelled out as a
  ``mask_mod``, and compiled, where the block sparsity is honoured by the fused kernel).

Output tolerances follow ``tests/ops/test_dense.py``: the kernel's error against an fp32 computation may be at most
twice the error PyTorch makes computing the same thing in the inputs' low precision, plus a rounding floor.
Under the interpreter (no GPU) shapes are tiny and the block size is 16; on CUDA block size 64 is drawn too.
"""

from __future__ import annotations

import math
import shutil
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dense import assert_lse_close, assert_within_rule, make_key_padding, make_qkv, max_err

from hf_fastattn.ops.dense import dense_attention, dense_attention_reference
from hf_fastattn.ops.seer import (
    BlockSelection,
    always_kept_blocks,
    attention_with_block_target,
    attention_with_block_target_reference,
    block_sparse_attention,
    block_sparse_attention_reference,
    normalise_target,
    select_block_lists,
    select_blocks,
    selection_density,
    selection_from_mask,
    selection_mask,
    to_block_mask,
    visible_blocks,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NEG_INF = float("-inf")
# fp32 only in the interpreter: on a GPU tl.dot would use TF32.
DTYPES = [torch.float16, torch.bfloat16] + ([] if HAS_CUDA else [torch.float32])
BLOCK_SIZES = [16, 64] if HAS_CUDA else [16]
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


# --------------------------------------------------------------------------------------------------------------------
# Independent readings
# --------------------------------------------------------------------------------------------------------------------


def element_visible(batch, seq_q, seq_k, *, causal, key_padding, device=DEVICE):
    """Bool ``(B, 1, S_q, S_kv)``: row ``i`` sees key ``j`` (bottom-right causal: ``j <= i + S_kv - S_q``; padding)."""
    rows, cols = torch.arange(seq_q, device=device)[:, None], torch.arange(seq_k, device=device)[None, :]
    visible = cols <= rows + (seq_k - seq_q) if causal else torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    visible = visible[None, None].expand(batch, 1, seq_q, seq_k)
    if key_padding is not None:
        visible = visible & key_padding.bool()[:, None, None, :]
    return visible


def expected_keys(block_mask, q_heads, seq_q, seq_k, *, causal, key_padding, block_size):
    """Bool ``(B, H_q, S_q, S_kv)``: the keys of each row's softmax. Every block of the ``(B, H_mask, NQ, NK)`` mask is
    blown up to ``block_size x block_size`` elements and cropped; mask head ``h`` serves query heads
    ``h * G .. (h + 1) * G - 1``; then intersected with the element visibility."""
    per_head = block_mask.bool().repeat_interleave(q_heads // block_mask.shape[1], dim=1)
    elements = per_head.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    elements = elements[:, :, :seq_q, :seq_k]
    return elements & element_visible(block_mask.shape[0], seq_q, seq_k, causal=causal, key_padding=key_padding)


def masked_attention(q, k, v, keys, *, scale=None, dtype=torch.float32):
    """Plain softmax attention over the ``keys`` mask, computed in ``dtype``: ``(out, lse)``; empty rows give 0, -inf."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc = q.to(dtype), k.to(dtype).repeat_interleave(group, dim=1)
    vc = v.to(dtype).repeat_interleave(group, dim=1)
    scores = (qc @ kc.transpose(-1, -2) * scale).masked_fill(~keys, NEG_INF)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows: NaN -> 0
    return probs @ vc, torch.logsumexp(scores.float(), dim=-1)


def full_probabilities(q, k, *, causal, key_padding, scale=None):
    """fp32 ``(B, H_q, S_q, S_kv)`` softmax probabilities of dense attention (0 on invisible keys and empty rows)."""
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    keys = element_visible(batch, seq_q, seq_k, causal=causal, key_padding=key_padding).expand(-1, q_heads, -1, -1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q.float() @ k.float().repeat_interleave(q_heads // k.shape[1], dim=1).transpose(-1, -2) * scale
    return torch.softmax(scores.masked_fill(~keys, NEG_INF), dim=-1).nan_to_num(0.0), keys


def expected_target(probs, keys, block_size):
    """Max pooling of ``probs`` over each (query block rows x key block keys), with loops; and which pairs hold at
    least one visible element."""
    *lead, seq_q, seq_k = probs.shape
    nq, nk = num_blocks(seq_q, block_size), num_blocks(seq_k, block_size)
    target = torch.zeros(*lead, nq, nk, device=probs.device)
    any_visible = torch.zeros(*lead, nq, nk, dtype=torch.bool, device=probs.device)
    for m in range(nq):
        rows = slice(m * block_size, min((m + 1) * block_size, seq_q))
        for n in range(nk):
            cols = slice(n * block_size, min((n + 1) * block_size, seq_k))
            target[..., m, n] = probs[..., rows, cols].amax(dim=(-2, -1))
            any_visible[..., m, n] = keys[..., rows, cols].any(dim=-1).any(dim=-1)
    return target, any_visible


def block_geometry(seq_q, seq_k, *, causal, block_size):
    """``(visible, full)`` bool ``(NQ, NK)`` from element visibility: a block is visible if any valid row sees any of
    its keys, full if every valid row sees all ``block_size`` of its keys (so a cut-off last key block is never full)."""
    nq, nk = num_blocks(seq_q, block_size), num_blocks(seq_k, block_size)
    rows = torch.arange(nq * block_size)[:, None]
    cols = torch.arange(nk * block_size)[None, :]
    elements = (cols < seq_k).expand(nq * block_size, -1)
    if causal:
        elements = elements & (cols <= rows + seq_k - seq_q)
    valid_row = (rows < seq_q).reshape(nq, block_size, 1, 1)
    blocks = elements.reshape(nq, block_size, nk, block_size)
    return (blocks & valid_row).any(dim=(1, 3)), (blocks | ~valid_row).all(dim=(1, 3))


def expected_forced(seq_q, seq_k, *, causal, block_size, sink_blocks=1, local_blocks=1):
    """Always-kept blocks, row by row: the first ``sink_blocks`` key blocks; the key block of every row's own key
    ``i + S_kv - S_q`` (clamped into the keys: the diagonal, possibly two blocks when bottom-right aligned); the
    ``local_blocks`` key blocks ending at the last row's; all restricted to visible blocks."""
    visible, _ = block_geometry(seq_q, seq_k, causal=causal, block_size=block_size)
    nq, nk = visible.shape
    forced = torch.zeros(nq, nk, dtype=torch.bool)
    forced[:, :sink_blocks] = True
    for m in range(nq):
        rows = range(m * block_size, min((m + 1) * block_size, seq_q))
        own_blocks = [min(max(i + seq_k - seq_q, 0), seq_k - 1) // block_size for i in rows]
        last = own_blocks[-1]
        forced[m, sorted(set(own_blocks) | set(range(max(0, last - local_blocks + 1), last + 1)))] = True
    return forced & visible


def expected_ranked_selection(scores, forced, visible, budget_per_row):
    """The forced blocks plus the best-scored other visible blocks, up to ``budget`` blocks per row (the forced ones
    count towards it), with Python sorting row by row."""
    nq, nk = scores.shape[-2:]
    expected = torch.zeros(scores.shape, dtype=torch.bool)
    flat_scores, flat_expected = scores.reshape(-1, nq, nk), expected.view(-1, nq, nk)
    for b in range(flat_scores.shape[0]):
        for m in range(nq):
            kept = [n for n in range(nk) if forced[m, n]]
            others = sorted(
                (n for n in range(nk) if visible[m, n] and not forced[m, n]), key=lambda n: -flat_scores[b, m, n].item()
            )
            kept += others[: max(0, budget_per_row[m] - len(kept))]
            flat_expected[b, m, kept] = True
    return expected


# --------------------------------------------------------------------------------------------------------------------
# The block-sparse kernel
# --------------------------------------------------------------------------------------------------------------------


def make_block_mask(batch, mask_heads, seq_q, seq_k, block_size, *, density, empty_rows, seed):
    """A random ``(B, H_mask, NQ, NK)`` block mask of the given density; with ``empty_rows`` about 40% of its rows
    (query blocks) select nothing at all. Invisible blocks may be set: they must be ignored."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, mask_heads, num_blocks(seq_q, block_size), num_blocks(seq_k, block_size))
    mask = torch.rand(shape, generator=gen) < density
    if empty_rows:
        mask &= ~(torch.rand(shape[:3], generator=gen) < 0.4)[..., None]
    return mask.to(DEVICE)


def check_block_sparse(q, k, v, block_mask, *, causal, key_padding, block_size, scale=None):
    """Kernel, package reference and the independent element-mask attention agree; empty rows are zeros with LSE
    -inf. Returns ``(out, lse, keys)``."""
    q_heads, seq_q = q.shape[1], q.shape[2]
    seq_k = k.shape[2]
    selection = selection_from_mask(block_mask, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size)
    kw = {"causal": causal, "key_padding": key_padding, "scale": scale}
    out, lse = block_sparse_attention(q, k, v, selection, return_lse=True, **kw)
    ref_out, ref_lse = block_sparse_attention_reference(
        q.float(), k.float(), v.float(), selection_mask(selection), block_size=block_size, return_lse=True, **kw
    )

    keys = expected_keys(
        block_mask, q_heads, seq_q, seq_k, causal=causal, key_padding=key_padding, block_size=block_size
    )
    out32, lse32 = masked_attention(q, k, v, keys, scale=scale)
    low_precision = q.dtype != torch.float32
    out_low = masked_attention(q, k, v, keys, scale=scale, dtype=q.dtype)[0] if low_precision else out32 + 2e-5

    # The package's reference is the element-mask attention.
    torch.testing.assert_close(ref_out, out32, atol=2e-5, rtol=1e-5)
    assert_lse_close(ref_lse, lse32, 1e-5)
    # The kernel equals both.
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in the kernel's output or LSE"
    assert_within_rule("kernel vs element mask", out, out32, out_low, 2)
    assert_within_rule("kernel vs package reference", out, ref_out, out_low, 2)
    assert_lse_close(lse, lse32, 1e-2 if low_precision else 1e-4)
    empty = ~keys.any(dim=-1)
    assert (out[empty] == 0).all(), "rows that select no visible key must be zeros"
    assert torch.isneginf(lse[empty]).all()
    return out, lse, keys


@st.composite
def sparse_problems(draw):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    if HAS_CUDA:
        max_seq = 400
    else:  # bounds the interpreter's time: it runs NQ * B * H_q programs one after the other
        max_seq = 80 if batch * kv_heads * group <= 2 else 48
    seq_k = draw(st.integers(1, max_seq))
    # S_q <= S_kv (prefill, chunked prefill against a cache) and S_q > S_kv (causal rows that see nothing).
    seq_q = draw(st.one_of(st.integers(1, seq_k), st.integers(seq_k, max_seq)))
    pad = draw(st.sampled_from(["none", "none", "left", "right", "holes", "full"]))
    return {
        "batch": batch, "kv_heads": kv_heads, "q_heads": kv_heads * group, "seq_q": seq_q, "seq_k": seq_k,
        "head_dim": draw(st.sampled_from([16, 32] + ([64, 128] if HAS_CUDA else []))),
        "causal": draw(st.booleans()), "dtype": draw(st.sampled_from(DTYPES)), "pad": pad,
        "pad_n": draw(st.integers(1, seq_k)), "block_size": draw(st.sampled_from(BLOCK_SIZES)),
        "mask_heads": draw(st.sampled_from(["kv", "q"])),
        "density": draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])), "empty_rows": draw(st.booleans()),
        "scale": draw(st.sampled_from([None, None, 0.3])), "seed": draw(st.integers(0, 2**31 - 1)),
    }  # fmt: skip


def problem_inputs(p):
    q, k, v, _ = make_qkv(
        p["batch"], p["q_heads"], p["kv_heads"], p["seq_q"], p["seq_k"], p["head_dim"], p["dtype"], seed=p["seed"]
    )
    key_padding = make_key_padding(p["pad"], p["batch"], p["seq_k"], n=p["pad_n"], seed=p["seed"])
    return q, k, v, key_padding


@settings(max_examples=300 if HAS_CUDA else 30)
@given(problem=sparse_problems())
def test_block_sparse_matches_references_hypothesis(problem):
    p = problem
    q, k, v, key_padding = problem_inputs(p)
    mask_heads = p["kv_heads"] if p["mask_heads"] == "kv" else p["q_heads"]
    block_mask = make_block_mask(
        p["batch"], mask_heads, p["seq_q"], p["seq_k"], p["block_size"], density=p["density"],
        empty_rows=p["empty_rows"], seed=p["seed"],
    )  # fmt: skip
    check_block_sparse(
        q, k, v, block_mask, causal=p["causal"], key_padding=key_padding, block_size=p["block_size"], scale=p["scale"]
    )


# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, padding, dtype, mask heads, density, empty rows)
SPARSE_CASES = [
    (2, 4, 2, 45, 45, 32, True, "left", torch.bfloat16, "kv", 0.5, True),  # GQA, one mask per KV head
    (1, 3, 1, 37, 70, 16, True, "none", torch.float16, "q", 0.4, False),  # chunked prefill, one mask per query head
    (2, 2, 2, 33, 50, 32, False, "holes", torch.bfloat16, "kv", 0.6, True),  # bidirectional, S_q < S_kv
    (1, 2, 1, 70, 40, 16, True, "none", torch.float16, "kv", 1.0, False),  # S_q > S_kv: the first rows see nothing
    (2, 2, 1, 40, 40, 32, True, "full", torch.float32, "q", 0.5, False),  # fp32; batch row 0 fully padded
    (1, 2, 1, 17, 81, 16, False, "right", torch.bfloat16, "kv", 0.0, False),  # nothing selected at all
]


def sparse_case_id(case):
    b, hq, hkv, sq, sk, d, causal, pad, dtype, heads, density, empty = case
    mode = "causal" if causal else "bidir"
    return f"B{b}-Hq{hq}-Hkv{hkv}-Sq{sq}-Sk{sk}-D{d}-{mode}-{pad}-{DTYPE_NAMES[dtype]}-mask_{heads}-p{density}" + (
        "-empty" if empty else ""
    )


@pytest.mark.parametrize("case", SPARSE_CASES, ids=[sparse_case_id(c) for c in SPARSE_CASES])
def test_block_sparse_matches_references(case):
    batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, pad, dtype, heads, density, empty_rows = case
    if dtype == torch.float32 and HAS_CUDA:
        pytest.skip("fp32 is an interpreter-only dtype (TF32 on a GPU)")
    block_size = 16
    q, k, v, _ = make_qkv(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, dtype, seed=seq_q)
    key_padding = make_key_padding(pad, batch, seq_k, n=20, seed=seq_k)
    mask_heads = kv_heads if heads == "kv" else q_heads
    block_mask = make_block_mask(
        batch, mask_heads, seq_q, seq_k, block_size, density=density, empty_rows=empty_rows, seed=seq_k
    )
    out, lse, keys = check_block_sparse(
        q, k, v, block_mask, causal=causal, key_padding=key_padding, block_size=block_size
    )
    empty = ~keys.any(dim=-1)
    if density == 0.0:
        assert empty.all() and (out == 0).all() and torch.isneginf(lse).all()
    elif 0.0 < density < 1.0:
        # The case is meant to be sparse, and with non-empty rows: both kinds of rows are exercised.
        assert empty.any() or not block_mask.all()
        assert not empty.all()
    if causal and seq_q > seq_k:
        hidden = seq_q - seq_k
        assert empty[:, :, :hidden].all() and torch.isneginf(lse[:, :, :hidden]).all()
    if pad == "full":
        assert empty[0].all() and (out[0] == 0).all()


def test_block_sparse_skips_unselected_blocks():
    """Dropping one block changes exactly the rows of its query block (of the heads it belongs to), and matches
    attention with those keys removed: unselected blocks are really left out, not merely down-weighted."""
    batch, q_heads, kv_heads, seq, block_size = 1, 4, 2, 48, 16
    q, k, v, _ = make_qkv(batch, q_heads, kv_heads, seq, seq, 32, torch.float16, seed=3)
    full_mask = torch.ones(batch, kv_heads, 3, 3, dtype=torch.bool, device=DEVICE)
    dropped = full_mask.clone()
    dropped[0, 1, 2, 1] = False  # KV head 1 (query heads 2, 3), query block 2 (rows 32-47), key block 1 (keys 16-31)
    out_all = check_block_sparse(q, k, v, full_mask, causal=True, key_padding=None, block_size=block_size)[0]
    out_drop = check_block_sparse(q, k, v, dropped, causal=True, key_padding=None, block_size=block_size)[0]
    changed = (out_all != out_drop).any(dim=-1)[0]  # (H_q, S_q)
    assert changed[2:, 32:].all() and not changed[:2].any() and not changed[:, :32].any()


# --------------------------------------------------------------------------------------------------------------------
# All blocks selected: the dense kernel
# --------------------------------------------------------------------------------------------------------------------


def check_all_blocks_equal_dense(q, k, v, *, causal, key_padding, block_size, mask_heads, scale=None):
    batch, seq_q, seq_k = q.shape[0], q.shape[2], k.shape[2]
    shape = (batch, mask_heads, num_blocks(seq_q, block_size), num_blocks(seq_k, block_size))
    selection = selection_from_mask(
        torch.ones(shape, dtype=torch.bool, device=DEVICE), seq_q=seq_q, seq_k=seq_k, causal=causal,
        block_size=block_size,
    )  # fmt: skip
    kw = {"causal": causal, "key_padding": key_padding, "scale": scale}
    out, lse = block_sparse_attention(q, k, v, selection, return_lse=True, **kw)
    dense_out, dense_lse = dense_attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = dense_attention_reference(q.float(), k.float(), v.float(), return_lse=True, **kw)
    if q.dtype == torch.float32:
        low = ref_out + 2e-5
    else:
        low = dense_attention_reference(q, k, v, compute_dtype=q.dtype, **kw)
    assert_within_rule("all blocks vs dense reference", out, ref_out, low, 2)
    assert_within_rule("dense kernel vs dense reference", dense_out, ref_out, low, 2)
    assert_lse_close(lse, ref_lse, 1e-2 if q.dtype != torch.float32 else 1e-4)
    assert_lse_close(lse, dense_lse, 1e-4)
    if not HAS_CUDA and block_size == 16:
        # The interpreter's dense kernel runs 16 x 16 tiles too, visiting the same tiles in the same order.
        assert torch.equal(out, dense_out), f"differs from the dense kernel by {max_err(out, dense_out):.2e}"
    else:
        # Both within the rule of the same fp32 reference; as a direct bound, a bf16-sized difference.
        scale_ = max(1.0, ref_out.abs().max().item())
        assert max_err(out, dense_out) <= 2 * max_err(low, ref_out) + 2**-7 * scale_
    return out


@pytest.mark.parametrize(
    "causal, seq_q, seq_k, pad, mask_heads, dtype",
    [
        (True, 45, 45, "left", "kv", torch.bfloat16),
        (True, 21, 60, "holes", "q", torch.bfloat16),
        (False, 50, 33, "right", "kv", torch.float16),
        (True, 60, 30, "none", "q", torch.float16),
    ],
    ids=["causal-45", "causal-21x60-holes", "bidir-50x33", "causal-60x30"],
)
def test_all_blocks_equal_dense(causal, seq_q, seq_k, pad, mask_heads, dtype):
    q, k, v, _ = make_qkv(2, 2, 1, seq_q, seq_k, 32, dtype, seed=seq_q)
    key_padding = make_key_padding(pad, 2, seq_k, n=9, seed=1)
    for block_size in BLOCK_SIZES:
        check_all_blocks_equal_dense(
            q, k, v, causal=causal, key_padding=key_padding, block_size=block_size,
            mask_heads=1 if mask_heads == "kv" else 2,
        )  # fmt: skip


@settings(max_examples=60 if HAS_CUDA else 8)
@given(problem=sparse_problems())
def test_all_blocks_equal_dense_hypothesis(problem):
    p = problem
    q, k, v, key_padding = problem_inputs(p)
    check_all_blocks_equal_dense(
        q, k, v, causal=p["causal"], key_padding=key_padding, block_size=p["block_size"], scale=p["scale"],
        mask_heads=p["kv_heads"] if p["mask_heads"] == "kv" else p["q_heads"],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# The ground-truth (block target) kernel
# --------------------------------------------------------------------------------------------------------------------


def check_block_target(q, k, v, *, causal, key_padding, block_size, scale=None):
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    kw = {"causal": causal, "key_padding": key_padding, "scale": scale}
    out, target = attention_with_block_target(q, k, v, block_size=block_size, **kw)
    ref_out, ref_target = attention_with_block_target_reference(q, k, v, block_size=block_size, **kw)

    probs, keys = full_probabilities(q, k, **kw)
    expected, any_visible = expected_target(probs, keys, block_size)
    out32, _ = masked_attention(q, k, v, keys, scale=scale)
    low_precision = q.dtype != torch.float32
    out_low = masked_attention(q, k, v, keys, scale=scale, dtype=q.dtype)[0] if low_precision else out32 + 2e-5

    assert target.dtype == torch.float32
    assert target.shape == (batch, q_heads, num_blocks(seq_q, block_size), num_blocks(seq_k, block_size))
    assert torch.isfinite(target).all() and (target >= 0).all() and (target <= 1 + 1e-6).all()
    torch.testing.assert_close(target, expected, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(ref_target, expected, atol=1e-6, rtol=1e-5)
    # Pairs without a visible element are exactly 0, the others positive.
    assert (target[~any_visible] == 0).all() and (target[any_visible] > 0).all()
    # The output is dense attention.
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_within_rule("target kernel out", out, out32, out_low, 2)
    assert_within_rule("target reference out", ref_out, out32, out_low, 2)
    empty = ~keys.any(dim=-1)
    assert (out[empty] == 0).all()
    return out, target, any_visible


# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, padding, dtype)
TARGET_CASES = [
    (2, 4, 2, 45, 45, 32, True, "left", torch.bfloat16),
    (1, 2, 1, 27, 70, 16, True, "holes", torch.float16),  # S_q < S_kv, bottom-right aligned
    (2, 2, 2, 50, 33, 32, False, "right", torch.bfloat16),
    (1, 3, 1, 70, 30, 16, True, "none", torch.float16),  # S_q > S_kv: the first query blocks see nothing
    (2, 2, 1, 40, 40, 32, True, "full", torch.float32),
]


@pytest.mark.parametrize(
    "case", TARGET_CASES, ids=lambda c: f"Sq{c[3]}-Sk{c[4]}-{'causal' if c[6] else 'bidir'}-{c[7]}-{DTYPE_NAMES[c[8]]}"
)
def test_block_target_matches_dense(case):
    batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, pad, dtype = case
    if dtype == torch.float32 and HAS_CUDA:
        pytest.skip("fp32 is an interpreter-only dtype (TF32 on a GPU)")
    q, k, v, _ = make_qkv(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, dtype, seed=seq_k)
    key_padding = make_key_padding(pad, batch, seq_k, n=11, seed=seq_q)
    _, target, any_visible = check_block_target(q, k, v, causal=causal, key_padding=key_padding, block_size=16)
    if causal:
        visible, _ = block_geometry(seq_q, seq_k, causal=True, block_size=16)
        assert (target[..., ~visible.to(DEVICE)] == 0).all(), "causally invisible blocks must have target 0"
    if causal and seq_q - seq_k >= 16:
        assert (target[:, :, 0] == 0).all()  # the first query block sees nothing

    # normalise_target on the kernel's output: rows sum to 1, or stay all zero (no NaN).
    for heads in (None, kv_heads):
        normalised = normalise_target(target, heads)
        assert normalised.shape == (batch, heads or q_heads, *target.shape[2:])
        sums = normalised.sum(-1)
        zero_rows = ~any_visible.any(-1)
        if heads is None:
            assert (normalised[zero_rows] == 0).all()
        assert torch.isfinite(normalised).all()
        assert ((sums - 1).abs() < 1e-5).logical_or(sums == 0).all()


@settings(max_examples=150 if HAS_CUDA else 15)
@given(problem=sparse_problems())
def test_block_target_matches_dense_hypothesis(problem):
    p = problem
    q, k, v, key_padding = problem_inputs(p)
    check_block_target(
        q, k, v, causal=p["causal"], key_padding=key_padding, block_size=p["block_size"], scale=p["scale"]
    )


def test_normalise_target_rows_and_gqa_max():
    gen = torch.Generator().manual_seed(0)
    batch, q_heads, kv_heads, nq, nk = 2, 6, 2, 5, 4
    target = torch.rand(batch, q_heads, nq, nk, generator=gen)
    target[0, 1, 2] = 0.0  # one all-zero row of one query head
    target[1, 2:4, 3] = 0.0  # a row that is zero in a whole GQA group... but not in head 4
    target[1, 0:3, 4] = 0.0  # a row that is zero in the whole group of KV head 0
    target[1, 1, 0, 2] = 5.0  # a large entry the group max must pick

    per_head = normalise_target(target)
    for b, h, m in [(b, h, m) for b in range(batch) for h in range(q_heads) for m in range(nq)]:
        row, total = target[b, h, m], target[b, h, m].sum()
        expected = torch.zeros(nk) if total == 0 else row / total
        torch.testing.assert_close(per_head[b, h, m], expected, atol=1e-7, rtol=1e-6)

    grouped = normalise_target(target, kv_heads)
    assert grouped.shape == (batch, kv_heads, nq, nk)
    group = q_heads // kv_heads
    for b in range(batch):
        for h in range(kv_heads):
            for m in range(nq):
                pooled = torch.stack([target[b, h * group + g, m] for g in range(group)]).amax(0)
                expected = torch.zeros(nk) if pooled.sum() == 0 else pooled / pooled.sum()
                torch.testing.assert_close(grouped[b, h, m], expected, atol=1e-7, rtol=1e-6)
    assert (grouped[1, 0, 4] == 0).all()
    assert grouped[1, 0, 0, 2] == grouped[1, 0, 0].max() and grouped[1, 0, 0, 2] > 0.5
    # num_kv_heads equal to the heads: no pooling.
    torch.testing.assert_close(normalise_target(target, q_heads), per_head, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Block geometry, selection rules and the compact layout (plain PyTorch: many examples)
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def geometries(draw):
    block_size = draw(st.sampled_from([16, 32, 64]))
    seq_k = draw(st.integers(1, 8 * block_size))
    seq_q = draw(st.one_of(st.integers(1, seq_k), st.integers(seq_k, 8 * block_size)))
    return seq_q, seq_k, draw(st.booleans()), block_size


@settings(max_examples=60)
@given(geometry=geometries())
def test_visible_and_always_kept_blocks(geometry):
    seq_q, seq_k, causal, block_size = geometry
    visible, full = visible_blocks(seq_q, seq_k, causal=causal, block_size=block_size)
    exp_visible, exp_full = block_geometry(seq_q, seq_k, causal=causal, block_size=block_size)
    assert torch.equal(visible, exp_visible) and torch.equal(full, exp_full)
    for sink, local in [(1, 1), (0, 1), (2, 1), (1, 2), (1, 3), (0, 2)]:
        kept = {"sink_blocks": sink, "local_blocks": local}
        forced = always_kept_blocks(seq_q, seq_k, causal=causal, block_size=block_size, **kept)
        expected = expected_forced(seq_q, seq_k, causal=causal, block_size=block_size, **kept)
        assert torch.equal(forced, expected), f"{kept}:\n{forced.int()}\n!= expected\n{expected.int()}"


@pytest.mark.parametrize(
    "seq_q, seq_k, causal, expected_rows",
    [
        # Rows 32-39 (query block 2) hold their own keys 32-39 in key block 2 only: block 1 is not on the diagonal.
        (40, 40, True, [[0], [0, 1], [0, 2]]),
        # Bottom-right: rows 0-15 own keys 20-35 (blocks 1, 2), rows 16-19 own keys 36-39 (block 2).
        (20, 40, True, [[0, 1, 2], [0, 2]]),
        (20, 40, False, [[0, 1, 2], [0, 2]]),
        (48, 48, True, [[0], [0, 1], [0, 2]]),
    ],
)
def test_always_kept_blocks_examples(seq_q, seq_k, causal, expected_rows):
    forced = always_kept_blocks(seq_q, seq_k, causal=causal, block_size=16)
    assert [row.nonzero().flatten().tolist() for row in forced] == expected_rows


def draw_scores(data, batch, heads, nq, nk):
    """Distinct scores (a random permutation) so the rankings have no ties."""
    seed = data.draw(st.integers(0, 2**31 - 1), label="score seed")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(batch * heads * nq * nk, generator=gen).float().reshape(batch, heads, nq, nk) / (nq * nk)


@settings(max_examples=100)
@given(geometry=geometries(), data=st.data())
def test_select_blocks_rules(geometry, data):
    seq_q, seq_k, causal, block_size = geometry
    nq, nk = num_blocks(seq_q, block_size), num_blocks(seq_k, block_size)
    batch, heads = data.draw(st.integers(1, 2), label="batch"), data.draw(st.integers(1, 3), label="heads")
    scores = draw_scores(data, batch, heads, nq, nk)
    visible, _ = block_geometry(seq_q, seq_k, causal=causal, block_size=block_size)
    forced = expected_forced(seq_q, seq_k, causal=causal, block_size=block_size)
    kw = {"seq_q": seq_q, "seq_k": seq_k, "causal": causal, "block_size": block_size}
    rule = data.draw(st.sampled_from(["threshold", "topk", "sparsity"]), label="rule")
    if rule == "threshold":
        threshold = data.draw(
            st.one_of(st.sampled_from([NEG_INF, float("inf")]), st.floats(-0.5, scores.max().item() + 0.5)),
            label="threshold",
        )
        selected = select_blocks(scores, threshold=threshold, **kw)
        expected = ((scores > threshold) | forced) & visible
    elif rule == "topk":
        topk = data.draw(st.integers(0, nk + 1), label="topk")
        selected = select_blocks(scores, topk=topk, **kw)
        expected = expected_ranked_selection(scores, forced, visible, [topk] * nq)
        counts = selected.sum(-1)
        assert (counts == torch.clamp(torch.minimum(torch.tensor(topk), visible.sum(-1)), min=forced.sum(-1))).all()
    else:
        twentieths = data.draw(st.integers(0, 19), label="sparsity / 20")
        selected = select_blocks(scores, sparsity=twentieths / 20, **kw)
        budget = [math.ceil((1 - Fraction(twentieths, 20)) * int(count)) for count in visible.sum(-1)]
        expected = expected_ranked_selection(scores, forced, visible, budget)
        assert (selected.sum(-1) == torch.clamp(torch.tensor(budget), min=forced.sum(-1))).all()
    assert selected.dtype == torch.bool and selected.shape == scores.shape
    assert torch.equal(selected, expected), f"{rule}:\n{selected.int()}\n!= expected\n{expected.int()}"
    assert not (selected & ~visible).any(), "an invisible block was selected"
    assert (selected | ~forced).all(), "a sink or diagonal block was dropped"


def expected_head_selection(scores, forced, visible, sparsity, head_weights=None, reserved=0):
    """``allocation="head"`` with Python sorting: per (batch, head), the forced blocks plus the best other visible
    blocks of any row (ties: lowest row-major index), ``ceil((1 - sparsity) * visible) - reserved`` blocks in all (at
    least the forced ones). With ``head_weights``, head ``h`` chooses ``min(free, floor(w_h * need + 1/2))`` blocks
    beyond the forced ones."""
    batch, heads, nq, nk = scores.shape
    budget = math.ceil((1 - Fraction(sparsity).limit_denominator(100)) * int(visible.sum()))
    expected = torch.zeros(scores.shape, dtype=torch.bool)
    free = [(m, n) for m in range(nq) for n in range(nk) if visible[m, n] and not forced[m, n]]
    need = min(len(free), max(0, budget - int((forced & visible).sum()) - reserved))
    for b in range(batch):
        for h in range(heads):
            head_need = need if head_weights is None else min(len(free), math.floor(head_weights[h] * need + 0.5))
            expected[b, h] = forced & visible
            ranked = sorted(free, key=lambda mn: -scores[b, h, mn[0], mn[1]].item())  # sorted() is stable
            for m, n in ranked[:head_need]:
                expected[b, h, m, n] = True
    return expected


@settings(max_examples=100)
@given(geometry=geometries(), data=st.data())
def test_select_blocks_head_allocation(geometry, data):
    """One budget per (batch, head), spent on the best blocks of any row; tied and -inf scores included."""
    seq_q, seq_k, causal, block_size = geometry
    nq, nk = num_blocks(seq_q, block_size), num_blocks(seq_k, block_size)
    batch, heads = data.draw(st.integers(1, 2), label="batch"), data.draw(st.integers(1, 3), label="heads")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    scores = torch.randint(0, 5, (batch, heads, nq, nk), generator=gen).float()  # coarse: many ties
    scores[torch.rand(scores.shape, generator=gen) < 0.2] = NEG_INF  # padded key blocks
    sparsity = data.draw(st.integers(0, 19), label="sparsity / 20") / 20
    head_weights = data.draw(st.none() | st.lists(st.sampled_from([0.0, 0.3, 1.0, 1.3, 2.7]), min_size=heads,
                                                   max_size=heads), label="head_weights")  # fmt: skip
    reserved = data.draw(st.integers(0, 4), label="reserved_blocks")
    visible, _ = block_geometry(seq_q, seq_k, causal=causal, block_size=block_size)
    forced = expected_forced(seq_q, seq_k, causal=causal, block_size=block_size)
    kw = {"seq_q": seq_q, "seq_k": seq_k, "causal": causal, "block_size": block_size, "reserved_blocks": reserved}
    selected = select_blocks(scores, sparsity=sparsity, allocation="head", head_weights=head_weights, **kw)
    expected = expected_head_selection(scores, forced, visible, sparsity, head_weights, reserved)
    assert torch.equal(selected, expected), f"{sparsity}:\n{selected.int()}\n!= expected\n{expected.int()}"


@settings(max_examples=60 if HAS_CUDA else 25, deadline=None)
@given(geometry=geometries(), data=st.data())
def test_selection_kernel_equals_reference(geometry, data):
    """``select_block_lists`` (one Triton kernel; the cut of ``allocation="head"`` from torch.topk) gives exactly
    ``selection_from_mask(select_blocks(...))``: counts and whole index rows, for every rule."""
    seq_q, seq_k, causal, block_size = geometry
    nq, nk = num_blocks(seq_q, block_size), num_blocks(seq_k, block_size)
    batch, heads = data.draw(st.integers(1, 2), label="batch"), data.draw(st.integers(1, 3), label="heads")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    rule_name = data.draw(
        st.sampled_from(["threshold", "topk", "sparsity", "sparsity-head", "sparsity-head-weighted"]), label="rule"
    )
    sink, local = data.draw(st.sampled_from([(1, 1), (0, 1), (2, 3), (0, 2)]), label="kept")
    if rule_name.startswith("sparsity-head"):  # ties and -inf: the head rule resolves them like the reference
        scores = torch.randint(0, 5, (batch, heads, nq, nk), generator=gen).float()
        scores[torch.rand(scores.shape, generator=gen) < 0.2] = NEG_INF
    else:  # the per-row kernel matches the reference on finite scores
        scores = torch.randn(batch, heads, nq, nk, generator=gen)
    rule = {
        "threshold": {"threshold": 0.3},
        "topk": {"topk": data.draw(st.integers(0, nk + 1), label="topk")},
        "sparsity": {"sparsity": data.draw(st.integers(0, 19), label="s") / 20},
        "sparsity-head": {
            "sparsity": data.draw(st.integers(0, 19), label="s") / 20,
            "allocation": "head",
            "reserved_blocks": data.draw(st.integers(0, 4), label="reserved"),
        },
        "sparsity-head-weighted": {
            "sparsity": data.draw(st.integers(0, 19), label="s") / 20,
            "allocation": "head",
            "reserved_blocks": data.draw(st.integers(0, 4), label="reserved"),
            "head_weights": data.draw(
                st.lists(st.sampled_from([0.0, 0.4, 1.0, 1.7, 4.0]), min_size=heads, max_size=heads), label="w"
            ),
        },
    }[rule_name]
    kw = {"seq_q": seq_q, "seq_k": seq_k, "causal": causal, "block_size": block_size}
    kept = {"sink_blocks": sink, "local_blocks": local}
    kernel = select_block_lists(scores.to(DEVICE), **kept, **kw, **rule)
    mask = select_blocks(scores, **kept, **kw, **rule)
    expected = selection_from_mask(mask, **kw)
    for name, got, want in zip(BlockSelection._fields, kernel, expected):
        if name != "block_size":
            assert torch.equal(got.cpu(), want), f"{rule_name} {rule}: {name}\n{got.cpu()}\n!= expected\n{want}"


@pytest.mark.parametrize("sparsity, visible_count", [(0.28, 75), (0.9, 10), (0.7, 10), (0.35, 20), (0.0, 7), (0.5, 3)])
def test_select_blocks_sparsity_budget_is_exact(sparsity, visible_count):
    """``ceil((1 - sparsity) * visible)`` blocks per row, exactly, also where float32 rounding of the product lands
    just above an integer (0.72 * 75 = 54.000004 in float32: 55 blocks would be kept)."""
    block_size = 16
    seq_k, seq_q = visible_count * block_size, block_size  # one query block that sees every key block
    scores = torch.rand(1, 1, 1, visible_count, generator=torch.Generator().manual_seed(0))
    selected = select_blocks(scores, seq_q=seq_q, seq_k=seq_k, causal=False, block_size=block_size, sparsity=sparsity)
    expected = math.ceil((1 - Fraction(str(sparsity))) * visible_count)
    assert selected.sum().item() == max(expected, 2)  # the sink and the diagonal are always kept


def test_select_blocks_rejects_bad_rules():
    scores = torch.rand(1, 1, 2, 2)
    kw = {"seq_q": 32, "seq_k": 32, "causal": True, "block_size": 16}
    with pytest.raises(ValueError, match="exactly one of threshold, topk or sparsity"):
        select_blocks(scores, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(scores, threshold=0.5, topk=1, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(scores, topk=1, sparsity=0.5, **kw)
    with pytest.raises(ValueError, match="topk must be >= 0"):
        select_blocks(scores, topk=-1, **kw)
    for sparsity in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            select_blocks(scores, sparsity=sparsity, **kw)
    with pytest.raises(ValueError, match="head_weights scale the budgets of allocation='head' only"):
        select_blocks(scores, sparsity=0.5, head_weights=[1.0], **kw)
    with pytest.raises(ValueError, match="finite and >= 0"):
        select_blocks(scores, sparsity=0.5, allocation="head", head_weights=[-1.0], **kw)
    with pytest.raises(ValueError, match="1 entries for block scores of 2 heads"):
        select_blocks(torch.rand(1, 2, 2, 2), sparsity=0.5, allocation="head", head_weights=[1.0], **kw)
    with pytest.raises(ValueError, match=r"expected \(NQ, NK\) = \(2, 2\)"):
        select_blocks(torch.rand(1, 1, 2, 3), threshold=0.5, **kw)
    with pytest.raises(ValueError, match="reserved_blocks come out of the shared budget of allocation='head' only"):
        select_blocks(scores, sparsity=0.5, reserved_blocks=1, **kw)
    with pytest.raises(ValueError, match="reserved_blocks must be >= 0"):
        select_blocks(scores, sparsity=0.5, allocation="head", reserved_blocks=-1, **kw)
    # Zero is a rule, not "no rule".
    assert select_blocks(scores, threshold=0.0, **kw).shape == scores.shape
    assert select_blocks(scores, sparsity=0.0, **kw).sum() == 3  # every visible block


@settings(max_examples=100)
@given(geometry=geometries(), data=st.data())
def test_selection_layout_round_trip(geometry, data):
    seq_q, seq_k, causal, block_size = geometry
    nq, nk = num_blocks(seq_q, block_size), num_blocks(seq_k, block_size)
    batch, heads = data.draw(st.integers(1, 2), label="batch"), data.draw(st.integers(1, 3), label="heads")
    density = data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]), label="density")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    mask = torch.rand(batch, heads, nq, nk, generator=gen) < density
    visible, full = block_geometry(seq_q, seq_k, causal=causal, block_size=block_size)

    selection = selection_from_mask(mask, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size)
    assert isinstance(selection, BlockSelection) and selection.block_size == block_size
    assert selection.shape == (batch, heads, nq, nk)
    for count, index, kind in (
        (selection.full_count, selection.full_index, mask & visible & full),
        (selection.partial_count, selection.partial_index, mask & visible & ~full),
    ):
        assert count.dtype == index.dtype == torch.int32
        assert count.shape == (batch, heads, nq) and index.shape == (batch, heads, nq, nk)
        for b in range(batch):
            for h in range(heads):
                for m in range(nq):
                    listed = index[b, h, m, : count[b, h, m]].tolist()
                    assert listed == kind[b, h, m].nonzero().flatten().tolist()  # ascending, exactly the kind's
    assert torch.equal(selection.selected_blocks(), (mask & visible).sum(-1).int())
    assert torch.equal(selection_mask(selection), mask & visible)
    density_got = selection_density(selection, seq_q=seq_q, seq_k=seq_k, causal=causal)
    expected_density = (mask & visible).sum().item() / max(1, visible.sum().item() * batch * heads)
    assert density_got.dim() == 0 and abs(density_got.item() - expected_density) < 1e-6
    # The mask's round trip is stable.
    again = selection_from_mask(
        selection_mask(selection), seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size
    )
    for a, b in zip(again[:4], selection[:4]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------------
# FlexAttention export
# --------------------------------------------------------------------------------------------------------------------


# fp32 in the interpreter; on a GPU the kernel's fp32 dots would be TF32, so fp16 there.
FLEX_DTYPE, FLEX_TOL = (torch.float16, 2e-3) if HAS_CUDA else (torch.float32, 1e-5)


def flex_inputs(seq_q, seq_k, causal, *, kv_heads=1, q_heads=2, mask_heads=1, seed=0, block_size=16):
    q, k, v, _ = make_qkv(1, q_heads, kv_heads, seq_q, seq_k, 16, FLEX_DTYPE, seed=seed)
    mask = make_block_mask(1, mask_heads, seq_q, seq_k, block_size, density=0.5, empty_rows=True, seed=seed)
    mask[0, :, 1, 0] = True  # at least one full block (query block 1 sees all of key block 0 in every case here)
    mask[0, 0, -1] = False  # at least one query block that selects nothing
    selection = selection_from_mask(mask, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size)
    block_mask = to_block_mask(selection, num_q_heads=q_heads, seq_q=seq_q, seq_k=seq_k, causal=causal)
    return q, k, v, mask, selection, block_mask


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(
    "seq_q, seq_k, causal, mask_heads",
    [(40, 40, True, 1), (40, 40, True, 2), (21, 50, True, 1), (33, 47, False, 2), (50, 30, False, 1)],
    ids=["causal-40-kv", "causal-40-q", "causal-21x50", "bidir-33x47", "bidir-50x30"],
)
def test_to_block_mask_layout_and_mask_mod(seq_q, seq_k, causal, mask_heads):
    """The exported BlockMask holds the selection per query head, and its semantics (blocks, then ``mask_mod`` on
    partial blocks) give our kernel's output. Eager FlexAttention honours only ``mask_mod`` (the block lists merely
    skip work in the fused kernel), so the eager check spells the block structure out as one more ``mask_mod``."""
    from torch.nn.attention.flex_attention import AuxRequest, BlockMask, and_masks, flex_attention

    q_heads = 2
    q, k, v, _, selection, block_mask = flex_inputs(seq_q, seq_k, causal, mask_heads=mask_heads, q_heads=q_heads)
    assert block_mask.BLOCK_SIZE == (16, 16) and tuple(block_mask.seq_lengths) == (seq_q, seq_k)
    dense = block_mask.to_dense().bool()
    assert torch.equal(dense, selection_mask(selection).repeat_interleave(q_heads // mask_heads, dim=1))

    # mask_mod: bottom-right causal element mask (or everything) on every element; True on every full block.
    rows, cols = torch.arange(seq_q, device=DEVICE)[:, None], torch.arange(seq_k, device=DEVICE)[None, :]
    zero = torch.tensor(0, device=DEVICE)
    mask_mod = block_mask.mask_mod(zero, zero, rows, cols)
    visible = element_visible(1, seq_q, seq_k, causal=causal, key_padding=None)[0, 0]
    assert torch.equal(mask_mod.expand(seq_q, seq_k), visible)
    full_blocks = selection_mask(selection._replace(partial_count=torch.zeros_like(selection.partial_count)))
    full_elements = expected_keys(full_blocks, mask_heads, seq_q, seq_k, causal=False, key_padding=None, block_size=16)
    assert full_elements.any() and visible.expand_as(full_elements)[full_elements].all(), "a full block has masked keys"

    def selected_block(batch, head, q_index, kv_index):
        return dense[batch, head, q_index // 16, kv_index // 16]

    eager_mask = BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
        BLOCK_SIZE=16, mask_mod=and_masks(block_mask.mask_mod, selected_block), seq_lengths=(seq_q, seq_k),
    )  # fmt: skip
    flex_out, flex_aux = flex_attention(
        q, k, v, block_mask=eager_mask, enable_gqa=True, return_aux=AuxRequest(lse=True)
    )
    flex_lse = flex_aux.lse
    out, lse = block_sparse_attention(q, k, v, selection, causal=causal, return_lse=True)
    torch.testing.assert_close(out, flex_out, atol=FLEX_TOL, rtol=FLEX_TOL)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(flex_lse)) and torch.isneginf(lse).any()
    finite = torch.isfinite(lse)
    torch.testing.assert_close(lse[finite], flex_lse[finite].float(), atol=FLEX_TOL, rtol=FLEX_TOL)


@pytest.mark.skipif(
    HAS_CUDA, reason="fp32 and 16-token blocks: interpreter-only for our kernel, too small for flex on a GPU"
)
@pytest.mark.skipif(shutil.which("g++") is None, reason="compiled FlexAttention on CPU needs a C++ compiler")
def test_to_block_mask_with_compiled_flex_attention():
    """Compiled FlexAttention skips the blocks the BlockMask leaves out: its output is our kernel's (causal, S_q ==
    S_kv, fp32, GQA with one selection per KV head, a query block selecting nothing). ~10 s of Inductor compilation."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, mask, selection, block_mask = flex_inputs(40, 40, True, kv_heads=1, q_heads=2, mask_heads=1, seed=5)
    torch._dynamo.reset()
    flex_out = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=block_mask, enable_gqa=True)
    out = block_sparse_attention(q, k, v, selection, causal=True)
    torch.testing.assert_close(out, flex_out, atol=FLEX_TOL, rtol=FLEX_TOL)
    keys = expected_keys(mask, 2, 40, 40, causal=True, key_padding=None, block_size=16)
    assert (~keys.any(-1)).any() and (flex_out[~keys.any(-1)] == 0).all()
    # The skipped blocks matter: dense causal attention is a different result.
    dense = dense_attention_reference(q, k, v, causal=True)
    assert max_err(flex_out, dense) > 1e-2


# --------------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------------


def test_block_sparse_input_validation():
    q, k, v, _ = make_qkv(2, 4, 2, 40, 40, 16, torch.float16)

    def selection_for(batch=2, heads=2, seq_q=40, seq_k=40, block_size=16):
        mask = torch.ones(batch, heads, num_blocks(seq_q, block_size), num_blocks(seq_k, block_size), dtype=torch.bool)
        return selection_from_mask(mask.to(DEVICE), seq_q=seq_q, seq_k=seq_k, causal=True, block_size=block_size)

    message = r"selection of shape .* does not fit q \(2, 4, 40, 16\) / k \(2, 2, 40, 16\) with block 16"
    for bad in (
        selection_for(seq_q=56),  # one query block too many
        selection_for(seq_k=20),  # one key block too few
        selection_for(batch=1),
        selection_for(heads=3),  # neither H_kv nor a divisor of H_q that H_kv divides
        selection_for(heads=1),  # fewer mask heads than KV heads
        selection_for(heads=8),
    ):
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(q, k, v, bad, causal=True)
    with pytest.raises(ValueError, match=r"expected \(B, H_kv or H_q, NQ, NK\) = \(2, 2 or 4, 3, 3\)"):
        block_sparse_attention(q, k, v, selection_for(seq_q=56), causal=True)
    for block_size in (24, 8, 0):
        with pytest.raises(ValueError, match=f"block_size must be a power of two >= 16, got {block_size}"):
            block_sparse_attention(q, k, v, selection_for()._replace(block_size=block_size), causal=True)
        with pytest.raises(ValueError, match=f"block_size must be a power of two >= 16, got {block_size}"):
            attention_with_block_target(q, k, v, causal=True, block_size=block_size)
    with pytest.raises(ValueError, match="positive softmax scale"):
        block_sparse_attention(q, k, v, selection_for(), causal=True, scale=0.0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention_with_block_target(q[:, :3], k, v, causal=True, block_size=16)
    # Both shapes that are allowed run.
    block_sparse_attention(q, k, v, selection_for(heads=4), causal=True)
    block_sparse_attention(q, k, v, selection_for(heads=2), causal=True)


def test_selection_from_mask_validation():
    with pytest.raises(ValueError, match=r"block mask must be \(B, H, NQ, NK\), got \(3, 3\)"):
        selection_from_mask(torch.ones(3, 3, dtype=torch.bool), seq_q=40, seq_k=40, causal=True, block_size=16)
    with pytest.raises(ValueError, match=r"block mask ends in \(3, 2\), expected \(NQ, NK\) = \(3, 3\) for S_q=40"):
        selection_from_mask(torch.ones(1, 1, 3, 2, dtype=torch.bool), seq_q=40, seq_k=40, causal=True, block_size=16)


# --------------------------------------------------------------------------------------------------------------------
# Realistic shapes on a GPU
# --------------------------------------------------------------------------------------------------------------------

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, padding)
GPU_CASES = [
    (1, 8, 2, 1000, 1000, 64, True, "none"),
    (1, 8, 2, 2100, 2100, 128, True, "left"),
    (1, 8, 8, 1500, 2048, 128, True, "holes"),
    (1, 8, 2, 2048, 2048, 64, False, "right"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"H{c[1]}-{c[2]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-{c[7]}")
def test_seer_gpu_shapes(case):
    batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, pad = case
    block_size = 64
    q, k, v, _ = make_qkv(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, torch.bfloat16, seed=seq_q)
    key_padding = make_key_padding(pad, batch, seq_k, n=seq_k // 3, seed=seq_k)
    # Scores from the ground truth: the blocks a 50% sparsity rule keeps, one selection per KV head.
    _, target = attention_with_block_target_reference(
        q, k, v, causal=causal, key_padding=key_padding, block_size=block_size
    )
    scores = normalise_target(target, kv_heads)
    block_mask = select_blocks(scores, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size, sparsity=0.5)
    selection = selection_from_mask(block_mask, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size)
    assert 0.49 < selection_density(selection, seq_q=seq_q, seq_k=seq_k, causal=causal).item() < 0.75
    check_block_sparse(q, k, v, block_mask, causal=causal, key_padding=key_padding, block_size=block_size)
    # A random mask with empty rows.
    random_mask = make_block_mask(batch, q_heads, seq_q, seq_k, block_size, density=0.3, empty_rows=True, seed=1)
    check_block_sparse(q, k, v, random_mask, causal=causal, key_padding=key_padding, block_size=block_size)
    # The ground-truth kernel against its reference, and all blocks against the dense kernel.
    out, got_target = attention_with_block_target(
        q, k, v, causal=causal, key_padding=key_padding, block_size=block_size
    )
    torch.testing.assert_close(got_target, target, atol=2e-6, rtol=1e-3)
    ref_out = dense_attention_reference(q.float(), k.float(), v.float(), causal=causal, key_padding=key_padding)
    low = dense_attention_reference(q, k, v, causal=causal, key_padding=key_padding, compute_dtype=q.dtype)
    assert_within_rule("target kernel out", out, ref_out, low, 2)
    check_all_blocks_equal_dense(
        q, k, v, causal=causal, key_padding=key_padding, block_size=block_size, mask_heads=kv_heads
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(
    "rule",
    [{}, {"allocation": "head"}, {"allocation": "head", "head_weights": (0.2, 0.6, 1.4, 1.8)}],
    ids=["row", "head", "head-weighted"],
)
def test_selection_is_graph_capturable_without_host_sync(rule):
    """The method's selection runs inside a CUDA graph: no host sync (sync debug mode raises on one) and the replay
    on new scores equals an eager call on them."""
    seq, block_size = 4096, 64
    nb = seq // block_size
    kw = {"seq_q": seq, "seq_k": seq, "causal": True, "block_size": block_size, "sparsity": 0.8, **rule}
    scores = torch.randn(1, 4, nb, nb, device="cuda")
    select_block_lists(scores, **kw)  # warm-up: Triton compilation and the cached geometry
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        select_block_lists(scores, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = select_block_lists(scores, **kw)
    scores.copy_(torch.randn_like(scores))
    graph.replay()
    expected = select_block_lists(scores, **kw)
    for name, got, want in zip(BlockSelection._fields, captured, expected):
        if name != "block_size":
            assert torch.equal(got, want), name
