"""BSFA Triton kernel against the keep/skip rule, the package's PyTorch reference and the dense kernel.

The rule (``hf_fastattn/ops/bsfa/fwd.py``) is written out once more here, tile by tile with plain loops
(:func:`expected_bsfa`), so that both the kernel and ``bsfa_attention_reference`` are checked against an independent
reading of it. Thresholds are drawn away from every tile maximum (midpoints between distinct maxima, or +-inf), so the
keep/skip decisions are well defined despite rounding, and the counts must match exactly.

Output tolerances follow ``tests/ops/test_dense.py``: the kernel's error against an fp32 computation of the same kept
keys may be at most twice the error PyTorch makes computing it in the inputs' low precision, plus a rounding floor.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dense import make_key_padding, make_qkv

from hf_fastattn.ops.bsfa import bsfa_attention, bsfa_attention_reference
from hf_fastattn.ops.dense import dense_attention

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NEG_INF, POS_INF = float("-inf"), float("inf")


# --------------------------------------------------------------------------------------------------------------------
# The rule, independently
# --------------------------------------------------------------------------------------------------------------------


def expected_bsfa(q, k, thresholds, *, causal, key_padding, block_m, block_n, scale=None):
    """The rule of ``fwd.py`` tile by tile, in fp32: ``(tile_max (B,H,M,N), stats (B,H,M,3), keys, always_keys)``.

    ``keys`` (B, H, S_q, S_kv) marks the keys that enter each row's softmax (visible and in a kept tile);
    ``always_keys`` those visible keys that lie in always-kept tiles (the first tile, the query tile's own diagonal).
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    offset = seq_k - seq_q  # bottom-right alignment: row i's own key is i + offset
    scores = q.float() @ k.float().repeat_interleave(heads // k.shape[1], dim=1).transpose(-1, -2) * scale
    rows, cols = torch.arange(seq_q)[:, None], torch.arange(seq_k)[None, :]
    visible = (cols <= rows + offset) if causal else torch.ones(seq_q, seq_k, dtype=torch.bool)
    visible = visible.to(q.device).expand(batch, heads, seq_q, seq_k)
    if key_padding is not None:
        visible = visible & key_padding.bool()[:, None, None, :]
    scores = scores.masked_fill(~visible, NEG_INF)
    thresholds = thresholds.float().to(q.device)

    num_m, num_n = math.ceil(seq_q / block_m), math.ceil(seq_k / block_n)
    tile_max = torch.full((batch, heads, num_m, num_n), NEG_INF, device=q.device)
    stats = torch.zeros(batch, heads, num_m, 3, dtype=torch.int32, device=q.device)
    keys = torch.zeros(batch, heads, seq_q, seq_k, dtype=torch.bool, device=q.device)
    always_keys = torch.zeros_like(keys)
    for m in range(num_m):
        r0, r1 = m * block_m, min((m + 1) * block_m, seq_q)
        position = min(max(r0 + offset, 0) // block_m, thresholds.shape[1] - 1)
        tau = thresholds[:, position][None, :]  # (1, H)
        for n in range(num_n):
            c0, c1 = n * block_n, min((n + 1) * block_n, seq_k)
            if causal and c0 > r1 - 1 + offset:  # no key of the tile is causally visible to any of the rows
                continue
            diagonal = max(c0, r0 + offset) < min(c1, r1 + offset)  # holds one of the rows' own keys
            always = n == 0 or diagonal
            tile = scores[:, :, r0:r1, c0:c1].amax(dim=(-2, -1))  # (B, H)
            tile_max[:, :, m, n] = tile
            kept = torch.ones_like(tile, dtype=torch.bool) if always else tile >= tau
            stats[:, :, m, 0] += 1
            if not always:
                stats[:, :, m, 1] += 1
                stats[:, :, m, 2] += (~kept).int()
            keys[:, :, r0:r1, c0:c1] |= kept[:, :, None, None]
            always_keys[:, :, r0:r1, c0:c1] = always
    return tile_max, stats, keys & visible, always_keys & visible


def masked_attention(q, k, v, keys, *, scale=None, dtype=torch.float32):
    """Softmax attention over the ``keys`` mask computed in ``dtype``; rows without keys give zeros and LSE ``-inf``."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(dtype), k.repeat_interleave(group, dim=1).to(dtype), v.repeat_interleave(group, dim=1).to(dtype)
    empty = ~keys.any(dim=-1)
    scores = (qc @ kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keys, NEG_INF).masked_fill(empty[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).masked_fill(~keys, 0.0)
    return probs @ vc, lse.float().masked_fill(empty, NEG_INF)


# --------------------------------------------------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------------------------------------------------


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the rounding noise of values of ``ref``'s size in ``dtype`` (flash-attention's ``x + 0.3 - 0.3 - x``)."""
    if not ref.numel():
        return 0.0
    low = ref.to(dtype)
    return 2 * (low + 0.3 - 0.3 - low).abs().max().item()


def assert_within_rule(name, got, ref, low, factor=2.0):
    """``max|got - ref| <= factor * max|low - ref| + atol``: ``ref`` in fp32, ``low`` in the inputs' precision."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if not ref.numel():
        return
    err, low_err = (got.float() - ref).abs().max().item(), (low.float() - ref).abs().max().item()
    atol = 1e-5 * max(1.0, ref.abs().max().item()) + rounding_floor(ref, got.dtype)
    assert err <= factor * low_err + atol, f"{name}: error {err:.3e} > {factor} x {low_err:.3e} + {atol:.2e}"


def assert_lse_close(name, lse, ref_lse, atol=1e-3):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any(), f"{name}: NaN or +inf"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{name}: rows with LSE -inf differ"
    if (~empty).any():
        err = (lse[~empty] - ref_lse[~empty]).abs().max().item()
        assert err <= atol, f"{name}: LSE error {err:.3e} > {atol:.1e}"


def check_bsfa(q, k, v, thresholds, *, causal, key_padding, block_m, block_n, scale=None):
    """Kernel and reference against the independent rule: exact counts, tile maxima, output, LSE, empty rows."""
    kw = {"causal": causal, "key_padding": key_padding, "block_m": block_m, "block_n": block_n, "scale": scale}
    got = bsfa_attention(q, k, v, thresholds, record_tile_max=True, **kw)
    ref = bsfa_attention_reference(q, k, v, thresholds, record_tile_max=True, **kw)
    tile_max, stats, keys, _ = expected_bsfa(
        q, k, thresholds, causal=causal, key_padding=key_padding, block_m=block_m, block_n=block_n, scale=scale
    )

    # The package's reference implements the rule.
    assert torch.equal(ref.stats, stats), f"reference counts\n{ref.stats}\n!= rule\n{stats}"
    torch.testing.assert_close(ref.tile_max, tile_max, rtol=1e-5, atol=1e-5)
    # The kernel implements it: exact counts, the tile maxima it decided on.
    assert got.stats.dtype == torch.int32 and got.stats.shape == stats.shape
    assert torch.equal(got.stats, ref.stats), f"kernel counts\n{got.stats}\n!= reference\n{ref.stats}"
    torch.testing.assert_close(got.tile_max, ref.tile_max, rtol=1e-3, atol=1e-4)

    out32, lse32 = masked_attention(q, k, v, keys, scale=scale)
    out_low, _ = masked_attention(q, k, v, keys, scale=scale, dtype=q.dtype)
    assert got.out.dtype == q.dtype and got.out.shape == q.shape
    assert not torch.isnan(got.out).any()
    assert_within_rule("kernel out", got.out, out32, out_low)
    assert_within_rule("reference out", ref.out, out32, out_low)
    assert_lse_close("kernel", got.lse, lse32)
    assert_lse_close("reference", ref.lse, lse32)
    empty = ~keys.any(dim=-1)  # rows that keep nothing visible
    assert (got.out[empty] == 0).all(), "rows that keep no visible key must be zeros"
    return got, keys, empty


def tile_threshold_candidates(maxima: torch.Tensor) -> list[float]:
    """Thresholds that sit well away from every one of ``maxima`` (one head's tile maxima): below all, between two
    distinct ones (a relative margin of 1e-3 on each side), above all."""
    values = sorted(set(maxima[torch.isfinite(maxima)].tolist()))
    if not values:
        return [0.0]
    candidates = [values[0] - 1.0]
    for low, high in itertools.pairwise(values):
        if high - low > 2e-3 * max(1.0, abs(low), abs(high)):
            candidates.append((low + high) / 2)
    return candidates + [values[-1] + 1.0]


# --------------------------------------------------------------------------------------------------------------------
# Property-based: the kernel equals the rule
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def bsfa_problems(draw):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    max_seq = 72 if batch * kv_heads * group <= 4 else 40  # bounds the interpreter's time
    seq_k = draw(st.integers(1, max_seq))
    # Both S_q <= S_kv (prefill, chunked prefill) and S_q > S_kv (causal rows that see nothing).
    seq_q = draw(st.one_of(st.integers(1, seq_k), st.integers(seq_k, max_seq)))
    pad = draw(st.sampled_from(["none", "left", "left", "right", "holes"]))
    return {
        "batch": batch, "kv_heads": kv_heads, "q_heads": kv_heads * group, "seq_q": seq_q, "seq_k": seq_k,
        "head_dim": draw(st.sampled_from([16, 32, 64])), "causal": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.bfloat16, torch.float16])), "pad": pad,
        "pad_n": draw(st.integers(1, seq_k)), "block_m": draw(st.sampled_from([16, 32])),
        "block_n": draw(st.sampled_from([16, 32])), "scale": draw(st.sampled_from([None, None, 0.3])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }  # fmt: skip


def problem_inputs(p):
    q, k, v, _ = make_qkv(
        p["batch"], p["q_heads"], p["kv_heads"], p["seq_q"], p["seq_k"], p["head_dim"], p["dtype"], seed=p["seed"]
    )
    key_padding = make_key_padding(p["pad"], p["batch"], p["seq_k"], n=p["pad_n"], seed=p["seed"])
    kw = {"causal": p["causal"], "key_padding": key_padding, "block_m": p["block_m"], "block_n": p["block_n"]}
    return q, k, v, kw


def draw_thresholds(data, q, k, kw, scale):
    """``(H_q, P)`` thresholds: per (head, position) -inf (keep all), +inf (skip every skippable tile) or a midpoint
    between two distinct tile maxima of that head. P may be shorter than the positions used (the last column is
    reused) or longer."""
    maxima = bsfa_attention_reference(q, k, q.new_zeros(k.shape), NEG_INF, record_tile_max=True, scale=scale, **kw)
    tile_max = maxima.tile_max.transpose(0, 1).flatten(1)  # (H, B * M * N)
    heads = q.shape[1]
    positions = math.ceil(k.shape[2] / kw["block_m"])
    num = data.draw(st.integers(1, positions + 1), label="positions")
    choices = data.draw(
        st.lists(
            st.tuples(st.sampled_from(["-inf", "+inf", "mid", "mid"]), st.integers(0, 10**6)),
            min_size=heads * num,
            max_size=heads * num,
        ),
        label="thresholds",
    )
    thresholds = torch.empty(heads, num)
    for index, (kind, pick) in enumerate(choices):
        head, position = divmod(index, num)
        if kind == "-inf":
            thresholds[head, position] = NEG_INF
        elif kind == "+inf":
            thresholds[head, position] = POS_INF
        else:
            candidates = tile_threshold_candidates(tile_max[head])
            thresholds[head, position] = candidates[pick % len(candidates)]
    return thresholds.to(DEVICE)


@settings(max_examples=16)
@given(problem=bsfa_problems(), data=st.data())
def test_bsfa_kernel_matches_rule_hypothesis(problem, data):
    q, k, v, kw = problem_inputs(problem)
    thresholds = draw_thresholds(data, q, k, kw, problem["scale"])
    check_bsfa(q, k, v, thresholds, scale=problem["scale"], **kw)


def check_equals_dense(q, k, v, *, causal, key_padding, block_m, block_n, scale=None):
    """Thresholds at -inf keep every tile: nothing skipped, and the output is ``fastattn_dense``'s. Bit for bit with the
    dense kernel's own (interpreter) 16 x 16 tiles; with other tiles both are equally accurate flash-attention results
    (P is rounded to the inputs' precision against a different running maximum, so they may differ by a few ulps)."""
    got = bsfa_attention(
        q, k, v, NEG_INF, causal=causal, key_padding=key_padding, block_m=block_m, block_n=block_n, scale=scale
    )
    out, lse = dense_attention(q, k, v, causal=causal, key_padding=key_padding, scale=scale, return_lse=True)
    _, stats, keys, _ = expected_bsfa(
        q, k, torch.full((q.shape[1], 1), NEG_INF), causal=causal, key_padding=key_padding, block_m=block_m,
        block_n=block_n, scale=scale,
    )  # fmt: skip
    assert torch.equal(got.stats, stats) and (got.stats[..., 2] == 0).all() and got.tile_max is None
    if block_m == block_n == 16 and not HAS_CUDA:
        assert torch.equal(got.out, out), "BSFA at -inf differs from the dense kernel on the same tiles"
    out32, _ = masked_attention(q, k, v, keys, scale=scale)
    out_low, _ = masked_attention(q, k, v, keys, scale=scale, dtype=q.dtype)
    assert_within_rule("bsfa out", got.out, out32, out_low)
    assert_within_rule("dense out", out, out32, out_low)
    assert_lse_close("lse", got.lse, lse, atol=1e-5)
    return got


@settings(max_examples=8)
@given(problem=bsfa_problems())
def test_bsfa_minus_inf_equals_dense_hypothesis(problem):
    q, k, v, kw = problem_inputs(problem)
    check_equals_dense(q, k, v, scale=problem["scale"], **kw)


# --------------------------------------------------------------------------------------------------------------------
# Chosen cases
# --------------------------------------------------------------------------------------------------------------------


def midpoint_thresholds(q, k, kw, *, positions=None, seed=0):
    """Deterministic mixed thresholds: a random choice of tile-maximum midpoints, -inf and +inf per (head, position)."""
    maxima = bsfa_attention_reference(q, k, q.new_zeros(k.shape), NEG_INF, record_tile_max=True, **kw)
    tile_max = maxima.tile_max.transpose(0, 1).flatten(1)
    positions = positions or math.ceil(k.shape[2] / kw["block_m"])
    gen = torch.Generator().manual_seed(seed)
    thresholds = torch.empty(q.shape[1], positions)
    for head in range(q.shape[1]):
        candidates = tile_threshold_candidates(tile_max[head]) + [NEG_INF, POS_INF]
        picks = torch.randint(0, len(candidates), (positions,), generator=gen)
        thresholds[head] = torch.tensor([candidates[i] for i in picks])
    return thresholds.to(DEVICE)


# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, padding, dtype, block_m, block_n)
CASES = [
    (2, 2, 1, 45, 45, 80, True, "left", torch.bfloat16, 16, 16),  # head dim not a power of two
    (1, 2, 1, 77, 77, 32, True, "none", torch.float16, 16, 32),
    (1, 3, 1, 61, 61, 32, True, "none", torch.float16, 16, 16),
    (2, 2, 2, 37, 53, 16, False, "right", torch.bfloat16, 32, 16),  # bidirectional, S_q < S_kv
    (1, 4, 2, 19, 67, 64, True, "holes", torch.float16, 16, 16),  # chunked prefill
    (2, 2, 1, 70, 40, 32, True, "none", torch.bfloat16, 16, 16),  # S_q > S_kv: the first rows see nothing
]


def case_id(case):
    b, hq, hkv, sq, sk, d, causal, pad, dtype, bm, bn = case
    mode = "causal" if causal else "bidir"
    return f"B{b}-Hq{hq}-Hkv{hkv}-Sq{sq}-Sk{sk}-D{d}-{mode}-{pad}-{str(dtype)[6:]}-{bm}x{bn}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_bsfa_kernel_matches_rule(case):
    batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, pad, dtype, block_m, block_n = case
    q, k, v, _ = make_qkv(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, dtype, seed=seq_q)
    key_padding = make_key_padding(pad, batch, seq_k, n=20, seed=seq_k)
    kw = {"causal": causal, "key_padding": key_padding, "block_m": block_m, "block_n": block_n}
    got, _, empty = check_bsfa(q, k, v, midpoint_thresholds(q, k, kw, seed=seq_k), **kw)
    assert (got.stats[..., 2] > 0).any(), "the case should skip some tiles"
    if causal and seq_q > seq_k:
        hidden = seq_q - seq_k
        assert empty[:, :, :hidden].all() and torch.isneginf(got.lse[:, :, :hidden]).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_bsfa_plus_inf_keeps_only_always_kept_tiles(causal):
    """+inf skips every skippable tile: only the first tile and the diagonal remain. With left padding over the first
    key tile and more, the first rows of a bidirectional batch keep no visible key: zeros and LSE -inf, no NaN."""
    batch, seq, block = 2, 53, 16
    q, k, v, _ = make_qkv(batch, 2, 1, seq, seq, 32, torch.bfloat16, seed=5)
    key_padding = make_key_padding("left", batch, seq, n=20)
    kw = {"causal": causal, "key_padding": key_padding, "block_m": block, "block_n": block}
    got, keys, empty = check_bsfa(q, k, v, torch.full((2, 3), POS_INF, device=DEVICE), **kw)
    _, _, _, always_keys = expected_bsfa(q, k, torch.full((2, 1), POS_INF), **kw)
    assert torch.equal(keys, always_keys)
    assert torch.equal(got.stats[..., 2], got.stats[..., 1]) and (got.stats[..., 1] > 0).any()
    out, _ = masked_attention(q, k, v, always_keys)
    out_low, _ = masked_attention(q, k, v, always_keys, dtype=q.dtype)
    assert_within_rule("out", got.out, out, out_low)
    # The same through the scalar form of the thresholds (one for every head and position).
    again = bsfa_attention(q, k, v, POS_INF, **kw)
    assert torch.equal(again.out, got.out) and torch.equal(again.stats, got.stats)
    if not causal:
        # Row 0 of the batch: keys 0-19 padded, tile 0 (always kept) is empty, tiles 1-3 skipped: rows 0-15 are empty.
        assert empty[0, :, :16].all() and not empty[1].any()
        assert torch.isneginf(got.lse[0, :, :16]).all() and (got.out[0, :, :16] == 0).all()
        assert not bsfa_attention(q, k, v, NEG_INF, **kw).lse.isneginf().any()


def test_bsfa_chunked_prefill_reads_absolute_positions():
    """A chunk of the last queries against the whole cache reads the thresholds of its absolute query-tile positions:
    with a tile-aligned chunk its counts and output are the full prefill's last tiles'."""
    seq, chunk, block = 64, 32, 16
    q, k, v, _ = make_qkv(1, 2, 1, seq, seq, 32, torch.float16, seed=9)
    kw = {"causal": True, "key_padding": None, "block_m": block, "block_n": block}
    thresholds = midpoint_thresholds(q, k, kw, positions=seq // block, seed=1)
    full = bsfa_attention(q, k, v, thresholds, **kw)
    part = bsfa_attention(q[:, :, -chunk:], k, v, thresholds, **kw)
    assert torch.equal(part.stats, full.stats[:, :, -chunk // block :])
    assert (full.stats[:, :, -chunk // block :, 2] > 0).any(), "the chunk's tiles should skip something"
    torch.testing.assert_close(part.out, full.out[:, :, -chunk:], atol=0, rtol=0)
    # Positions past the table's end reuse its last column.
    short = bsfa_attention(q, k, v, thresholds[:, :2], **kw)
    padded = torch.cat([thresholds[:, :2], thresholds[:, 1:2].expand(-1, 5)], dim=1)
    assert torch.equal(short.stats, bsfa_attention(q, k, v, padded, **kw).stats)


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32), (32, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsfa_minus_inf_equals_dense(blocks):
    q, k, v, _ = make_qkv(2, 2, 1, 41, 41, 32, torch.bfloat16, seed=2)
    key_padding = make_key_padding("left", 2, 41, n=7)
    got = check_equals_dense(q, k, v, causal=True, key_padding=key_padding, block_m=blocks[0], block_n=blocks[1])
    assert got.stats.shape == (2, 2, math.ceil(41 / blocks[0]), 3)


# --------------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thresholds": torch.zeros(3, 2)}, r"thresholds must be \(query heads, query-tile positions\)"),
        ({"thresholds": torch.zeros(2, 0)}, r"thresholds must be \(query heads"),
        ({"thresholds": torch.zeros(2, 2, 2)}, r"thresholds must be \(query heads"),
        ({"thresholds": torch.zeros(5)}, r"thresholds must be \(query heads"),
        ({"block_m": 24}, "block_m must be a power of two >= 16, got 24"),
        ({"block_n": 8}, "block_n must be a power of two >= 16, got 8"),
        ({"key_padding": torch.ones(1, 19, dtype=torch.bool)}, r"key_padding must be \(B, S_kv\)"),
        ({"key_padding": torch.ones(2, 20, dtype=torch.bool)}, r"key_padding must be \(B, S_kv\)"),
        ({"scale": 0.0}, "positive softmax scale"),
        ({"scale": -0.5}, "positive softmax scale"),
        ({"v": "short"}, "expected q"),
        ({"q_heads": 3, "kv_heads": 2}, "multiple of key/value heads"),
    ],
    ids=lambda x: str(x)[:40],
)
@pytest.mark.parametrize("function", [bsfa_attention, bsfa_attention_reference], ids=["kernel", "reference"])
def test_bsfa_input_validation(function, change, message):
    change = dict(change)
    q, k, v, _ = make_qkv(1, change.pop("q_heads", 2), change.pop("kv_heads", 1), 20, 20, 16, torch.float16)
    if change.pop("v", None):
        v = v[:, :, :7]
    kwargs = {"thresholds": torch.zeros(2, 2), "causal": True, "block_m": 16, "block_n": 16, **change}
    if "key_padding" in kwargs:
        kwargs["key_padding"] = kwargs["key_padding"].to(DEVICE)
    with pytest.raises(ValueError, match=message):
        function(q, k, v, **kwargs)
