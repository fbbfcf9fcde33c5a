"""Decode kernels (single-pass, split-KV, stream-K) against the plain-PyTorch reference.

Without a GPU the kernels run in Triton's interpreter with 16-wide tiles and 3 "SMs", so small caches already split
across programs and stream-K ranges cross segment boundaries. Tolerances follow test_dense's rule: at most 2x the error
of the same reference computed in the inputs' precision, plus the rounding floor.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dense import assert_within_rule, make_key_padding, make_qkv

from hf_fastattn.ops._runtime import interpreter_enabled
from hf_fastattn.ops.decode import (
    DECODE_MAX_QUERY,
    decode_attention,
    decode_attention_reference,
    plan_decode,
    split_decode_reference,
)
from hf_fastattn.ops.decode import attention as decode_module
from hf_fastattn.ops.dense import dense_attention_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNEL_STRATEGIES = ("single", "split", "streamk")


def check_decode(q, k, v, key_padding, **launch):
    out = decode_attention(q, k, v, key_padding=key_padding, **launch)
    ref = decode_attention_reference(q, k, v, key_padding=key_padding)
    low = dense_attention_reference(q, k, v, causal=True, key_padding=key_padding, compute_dtype=q.dtype)
    assert_within_rule(f"decode {launch}", out, ref.float(), low, factor=2.0)
    if key_padding is not None:
        empty = ~key_padding.bool().any(dim=1)
        assert (out[empty] == 0).all(), "a row that sees no key must return zeros"
    return out


@st.composite
def decode_problems(draw):
    seq_k = draw(st.integers(1, 90))
    kv_heads = draw(st.integers(1, 3))
    problem = {
        "batch": draw(st.integers(1, 3)),
        "kv_heads": kv_heads,
        "q_heads": kv_heads * draw(st.integers(1, 5)),
        "seq_q": draw(st.integers(1, min(seq_k, DECODE_MAX_QUERY))),
        "seq_k": seq_k,
        "head_dim": draw(st.sampled_from((16, 32, 64, 80))),
        "dtype": draw(st.sampled_from((torch.float16, torch.bfloat16) + (() if HAS_CUDA else (torch.float32,)))),
        "pad": draw(st.sampled_from(("none", "left", "full", "holes"))),
        "pad_n": draw(st.integers(1, 90)),
        "strategy": draw(st.sampled_from(KERNEL_STRATEGIES + ("auto",))),
        "num_programs": draw(st.integers(1, 9)),
        "num_splits": draw(st.integers(1, 7)),
        "seed": draw(st.integers(0, 2**16)),
    }
    return problem


@settings(max_examples=60)
@given(problem=decode_problems())
def test_decode_matches_reference_hypothesis(problem):
    p = problem
    q, k, v, _ = make_qkv(
        p["batch"], p["q_heads"], p["kv_heads"], p["seq_q"], p["seq_k"], p["head_dim"], p["dtype"], seed=p["seed"]
    )
    key_padding = make_key_padding(p["pad"], p["batch"], p["seq_k"], n=p["pad_n"], seed=p["seed"])
    launch = {key: p[key] for key in ("strategy", "num_programs", "num_splits")}
    check_decode(q, k, v, key_padding, **launch)


@pytest.mark.parametrize("strategy", KERNEL_STRATEGIES)
@pytest.mark.parametrize(("q_heads", "kv_heads", "seq_q"), [(9, 3, 1), (4, 1, 16), (2, 2, 5)])
def test_decode_gqa_and_query_lengths(strategy, q_heads, kv_heads, seq_q):
    """GQA groups packed into query tiles (9/3 is SmolLM2's), up to 16 queries (several row tiles), left padding."""
    q, k, v, _ = make_qkv(2, q_heads, kv_heads, seq_q, 77, 64, torch.bfloat16, seed=1)
    key_padding = make_key_padding("left", 2, 77, n=30)
    check_decode(q, k, v, key_padding, strategy=strategy, num_programs=7, num_splits=3)


def test_unequal_splits_merge_exactly():
    """The associativity the kernels rely on: partials over unequal key ranges merge to the unsplit attention."""
    q, k, v, _ = make_qkv(2, 6, 2, 3, 50, 32, torch.float32, seed=2, device="cpu")
    key_padding = make_key_padding("holes", 2, 50, seed=3, device="cpu")
    full = decode_attention_reference(q, k, v, key_padding=key_padding)
    for boundaries in ([0, 50], [0, 1, 50], [0, 7, 8, 30, 49, 50], [0, 0, 25, 25, 50]):
        merged = split_decode_reference(q, k, v, boundaries, key_padding=key_padding)
        torch.testing.assert_close(merged, full, atol=1e-6, rtol=1e-5)


def test_streamk_on_one_program_is_bitwise_single_pass():
    """One persistent program covers each segment whole: the same arithmetic as single-pass, bit for bit."""
    q, k, v, _ = make_qkv(2, 4, 2, 2, 70, 32, torch.bfloat16, seed=4)
    single = decode_attention(q, k, v, strategy="single")
    assert torch.equal(decode_attention(q, k, v, strategy="streamk", num_programs=1), single)
    assert torch.equal(decode_attention(q, k, v, strategy="split", num_splits=1), single)


def test_streamk_splits_segments_and_repeats_bitwise():
    """Segments shared by several programs (merged by the combine kernel) give the same bits on every launch."""
    seq_k = 90 if interpreter_enabled() else 900  # several key tiles per segment at either tile size
    q, k, v, _ = make_qkv(3, 6, 3, 1, seq_k, 32, torch.float16, seed=5)
    plan = plan_decode(3, 6, 3, 1, seq_k, 32, q.device, "streamk", num_programs=8)
    assert plan.splits_per_segment > 1, "the test must split segments across programs"
    first = decode_attention(q, k, v, strategy="streamk", num_programs=8)
    check_decode(q, k, v, None, strategy="streamk", num_programs=8)
    assert torch.equal(decode_attention(q, k, v, strategy="streamk", num_programs=8), first)


@pytest.mark.parametrize("strategy", KERNEL_STRATEGIES)
def test_tma_reads_equal_pointer_reads(strategy, monkeypatch):
    """K/V tiles through TMA descriptors (zero-filled past the cache end, here 77 keys) give the pointer path's bits;
    ``HF_FASTATTN_TMA=1`` lets the interpreter run the descriptor code."""
    if not interpreter_enabled() and not (HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9):
        pytest.skip("TMA needs Hopper or the interpreter")
    monkeypatch.setenv("HF_FASTATTN_TMA", "1")
    q, k, v, _ = make_qkv(2, 6, 2, 3, 77, 64, torch.bfloat16, seed=6)
    key_padding = make_key_padding("left", 2, 77, n=20)
    launch = {"strategy": strategy, "num_programs": 5, "num_splits": 3}
    with_tma = check_decode(q, k, v, key_padding, tma=True, **launch)
    assert torch.equal(with_tma, decode_attention(q, k, v, key_padding=key_padding, tma=False, **launch))


def test_launch_flags_travel_through_the_custom_op():
    assert decode_module._tuning_values({"tma": True, "pdl": False, "num_splits": 4}) == [0, 0, 0, 0, 4, 0, 1, -1]
    plan = decode_module._plan(1, 4, 1, 1, 500, 64, torch.device(DEVICE), "split", 0, 0, 0, 0, 0, 0, -1, 0)
    assert plan == plan_decode(1, 4, 1, 1, 500, 64, DEVICE, "split", tma=False)
    assert not plan.config.tma
    plan = decode_module._plan(1, 4, 1, 1, 500, 64, torch.device(DEVICE), "split", 0, 0, 0, 0, 0, 0, 1, 0)
    assert plan == plan_decode(1, 4, 1, 1, 500, 64, DEVICE, "split", tma=True)
    assert plan.config.tma


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9, reason="checks the refusal off Hopper")
def test_pdl_needs_hopper():
    with pytest.raises(ValueError, match="pdl=True.*compute capability 9.0"):
        plan_decode(1, 4, 1, 1, 500, 64, DEVICE, "split", pdl=True)


def test_auto_plan_follows_the_documented_rule():
    """Segments (batch x KV heads x row tiles) against SMs: single-pass from 0.8 x SMs (or a cache of a tile or two),
    stream-K from a quarter of the SMs, split-KV below. One KV head per batch row makes the segment count the batch."""
    sms = decode_module.sm_count(DEVICE)
    for batch in sorted({1, max(1, sms // 8), max(1, sms // 4), max(1, sms // 2), sms}):
        plan = plan_decode(batch, 4, 1, 1, 32768, 128, DEVICE)
        expected = "single" if batch >= 0.8 * sms else "streamk" if batch >= 0.25 * sms else "split"
        assert plan.strategy == expected, (batch, sms, plan)
        if plan.strategy == "streamk":
            assert plan.grid[0] <= sms * plan.config.programs_per_sm  # persistent: never more than the GPU holds
    assert plan_decode(1, 4, 1, 1, 20, 128, DEVICE).strategy == "single"
    split = plan_decode(1, 4, 1, 1, 32768, 128, DEVICE, "split")
    assert split.grid == (split.splits_per_segment, split.segments) and split.splits_per_segment > 1


def test_packing_limits_rows_per_tile():
    plan = plan_decode(1, 64, 1, 16, 100, 64, DEVICE, "single")
    assert plan.block_m * plan.row_tiles >= 64 * 16 and plan.block_m <= 64


def test_decode_input_validation():
    q, k, v, _ = make_qkv(1, 2, 1, 3, 2, 16, torch.float16)
    with pytest.raises(ValueError, match="1 <= S_q <= S_kv"):
        decode_attention(q, k, v)
    q, k, v, _ = make_qkv(1, 2, 1, 1, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="unknown decode strategy 'lean'"):
        decode_attention(q, k, v, strategy="lean")
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        decode_attention(q, k, v, block_n=24)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        decode_attention(
            torch.zeros(1, 3, 1, 16, dtype=torch.float16, device=DEVICE), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
        )


def test_decode_custom_op_opcheck():
    q, k, v, _ = make_qkv(1, 4, 2, 1, 40, 16, torch.float16)
    args = (q, k, v, None, 0.25, "streamk", decode_module._tuning_values({"num_programs": 3, "tma": False}))
    torch.library.opcheck(torch.ops.hf_fastattn.decode_fwd.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not interpreter_enabled(), reason="checks the interpreter's small tiles")
def test_interpreter_tiles_split_small_caches():
    plan = plan_decode(1, 4, 2, 1, 70, 32, DEVICE, "streamk")
    assert plan.block_n == 16 and plan.splits_per_segment > 1


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", KERNEL_STRATEGIES + ("auto",))
@pytest.mark.parametrize(
    ("batch", "q_heads", "kv_heads", "seq_q", "seq_k", "head_dim", "pad"),
    [
        (1, 32, 8, 1, 32768, 128, "none"),
        (4, 32, 8, 1, 8193, 128, "left"),
        (2, 9, 3, 1, 16383, 64, "left"),
        (16, 32, 8, 4, 4097, 128, "holes"),
        (1, 32, 32, 16, 20000, 64, "none"),
    ],
)
def test_decode_gpu_shapes(strategy, batch, q_heads, kv_heads, seq_q, seq_k, head_dim, pad):
    q, k, v, _ = make_qkv(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, torch.bfloat16, seed=7)
    key_padding = make_key_padding(pad, batch, seq_k, n=seq_k // 3, seed=8)
    check_decode(q, k, v, key_padding, strategy=strategy)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="TMA and PDL need Hopper")
@pytest.mark.parametrize("strategy", ("split", "streamk"))
@pytest.mark.parametrize("tma", (False, True))
@pytest.mark.parametrize("pdl", (False, True))
def test_decode_gpu_launch_flags(strategy, tma, pdl):
    """Each launch flag on and off, back to back: a merge that read partials before they were all written, or a next
    step that overwrote them early, would show here."""
    q, k, v, _ = make_qkv(4, 32, 8, 2, 8193, 128, torch.bfloat16, seed=9)
    key_padding = make_key_padding("left", 4, 8193, n=3000, seed=10)
    launch = {"strategy": strategy, "tma": tma, "pdl": pdl}
    outputs = [check_decode(q, k, v, key_padding, **launch) for _ in range(3)]
    assert all(torch.equal(out, outputs[0]) for out in outputs)
