"""Dense Triton attention against its plain-PyTorch reference.

Tolerances follow flash-attention's rule: the kernel's error against the fp32 reference may be at most a small multiple
(2x for the output, 3x for gradients) of the error that the *same reference computed in the inputs' low precision*
makes, plus an absolute floor of twice the rounding noise at the values' size (flash-attention's ``x + 0.3 - 0.3 - x``).
The rule adapts to the dtype, the head dim and the sequence length without a hand-tuned tolerance per case. Two terms
are added where the tiny CPU shapes make the max-of-a-few-elements statistic noisy, both derived, not tuned: the
gradient error FlashAttention-2 makes by design (``delta`` from the stored, rounded output; see ``fa2_delta_error``).
Under the interpreter, ``hf_fastattn.ops._runtime.patch_interpreter_low_precision`` makes bf16 dots and casts round as on a GPU.

Without a GPU (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``) the very same kernels run in Triton's CPU
interpreter, so every shape here is small; the ``gpu``-marked tests cover realistic shapes on CUDA.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from hf_fastattn.ops.dense import SUPPORTED_HEAD_DIMS, dense_attention, dense_attention_reference
from hf_fastattn.ops.dense import attention as dense_module
from hf_fastattn.ops.dense.attention import section_budget_bytes, section_heads
from hf_fastattn.ops.dense.fwd import schedule_tile

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def make_key_padding(kind: str, batch: int, seq_k: int, *, n: int = 3, seed: int = 0, holes=None, device=DEVICE):
    """A ``(B, S_kv)`` keep-mask (True = attend), or None.

    ``left``: the first ``n`` keys of row 0 masked; ``right``: the last ``n`` keys of the last row masked;
    ``full``: every key of row 0 masked (that row sees nothing); ``holes``: random holes (``holes`` = flat list of
    keep flags, else drawn from ``seed``).
    """
    if kind == "none":
        return None
    keep = torch.ones(batch, seq_k, dtype=torch.bool)
    if kind == "left":
        keep[0, : min(n, seq_k)] = False
    elif kind == "right":
        keep[-1, seq_k - min(n, seq_k) :] = False
    elif kind == "full":
        keep[0] = False
    elif kind == "holes":
        if holes is None:
            gen = torch.Generator().manual_seed(seed)
            keep = torch.rand(batch, seq_k, generator=gen) > 0.3
        else:
            keep = torch.tensor(holes, dtype=torch.bool).reshape(batch, seq_k)
    else:
        raise ValueError(kind)
    return keep.to(device)


def make_qkv(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, dtype, *, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq_q, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen)
    dout = torch.randn(batch, q_heads, seq_q, head_dim, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """flash-attention's absolute floor: twice the rounding noise of a value of ``ref``'s size in ``dtype``.

    ``(x + 0.3 - 0.3 - x)`` evaluated in ``dtype`` is the rounding error of numbers around ``|x| + 0.3``. With tiny
    tensors the low-precision reference can get lucky (a few elements, all rounded well); this keeps the rule sane."""
    if not ref.numel() or dtype == torch.float32:
        return 0.0
    low = ref.to(dtype)
    return 2 * (low + 0.3 - 0.3 - low).abs().max().item()


def assert_within_rule(
    name: str, got: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, factor: float, extra: float = 0.0
) -> None:
    """``max|got - ref| <= factor * max|pt - ref| + atol``, ``ref`` fp32, ``pt`` the reference in low precision."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the kernel's result"
    err, pt_err = max_err(got, ref), max_err(pt, ref)
    magnitude = ref.abs().max().item() if ref.numel() else 0.0
    # 1e-5 covers the corner cases where both errors are ~0 (one key: dq = 0 exactly, the kernel leaves ~1e-7).
    atol = 1e-5 * max(1.0, magnitude) + rounding_floor(ref, got.dtype) + extra
    assert err <= factor * pt_err + atol, (
        f"{name}: kernel error {err:.3e} > {factor} x low-precision reference error {pt_err:.3e} + {atol:.2e}"
    )


def fa2_delta_error(q, k, v, dout, out, out_ref, *, causal, key_padding, scale):
    """The gradient error FlashAttention-2's backward makes by design, which the PyTorch reference does not.

    ``delta_i = sum_d dO_id * O_id`` is computed from the *stored* output, rounded to fp16/bf16. With
    ``ddelta = rowsum(dO * (O_stored - O_exact))``, ``dS`` moves by ``-P * ddelta`` to first order, hence
    ``dq`` by ``-scale * ddelta * (P K)`` and ``dk`` by ``-scale * (P * ddelta)^T Q``. Negligible on large tensors (the
    low-precision reference errs more), it dominates on the tiny ones the interpreter affords. Returns the max of each.
    """
    from hf_fastattn.ops.dense.naive import visible_keys

    batch, q_heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if batch * q_heads * seq_q * seq_k > 1 << 24:  # realistic (GPU) shapes: negligible, and P would be gigabytes
        return {"q": 0.0, "k": 0.0, "v": 0.0}
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    qf, kf = q.float(), k.float().repeat_interleave(group, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale
    keep = visible_keys(torch.arange(seq_q, device=q.device), seq_q, seq_k, causal, key_padding)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, 0], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    ddelta = ((out.float() - out_ref.float()) * dout.float()).sum(-1, keepdim=True)
    ddq = scale * ddelta * (probs @ kf)
    ddk = scale * ((probs * ddelta).transpose(-1, -2) @ qf).reshape(batch, kv_heads, group, seq_k, head_dim).sum(2)
    return {"q": ddq.abs().max().item(), "k": ddk.abs().max().item(), "v": 0.0}


def assert_lse_close(lse: torch.Tensor, ref_lse: torch.Tensor, atol: float) -> None:
    assert lse.dtype == torch.float32
    assert lse.shape == ref_lse.shape
    assert not torch.isnan(lse).any(), "NaN in the kernel's LSE"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows with LSE = -inf differ from the reference's empty rows"
    assert not torch.isposinf(lse).any()
    if (~empty).any():
        err = (lse[~empty] - ref_lse[~empty]).abs().max().item()
        assert err <= atol, f"lse: max error {err:.3e} > {atol:.1e}"


def check_against_reference(
    batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, key_padding, dtype, *, grad=True, seed=0, scale=None
):
    """Run kernel and references on the same inputs; check output, LSE and (optionally) dq, dk, dv."""
    q, k, v, dout = make_qkv(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, dtype, seed=seed)
    kw = {"causal": causal, "scale": scale, "key_padding": key_padding}

    # Each backward runs right after its forward, so at most one reference graph is alive (GPU shapes are large).
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    out, lse = dense_attention(*leaves, return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    if grad:
        out.backward(dout)

    ref_leaves = [t.float().requires_grad_(grad) for t in (q, k, v)]
    out_ref, lse_ref = dense_attention_reference(*ref_leaves, return_lse=True, **kw)
    if grad:
        out_ref.backward(dout.float())
    low_precision = dtype != torch.float32
    if low_precision:
        pt_leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        out_pt = dense_attention_reference(*pt_leaves, compute_dtype=dtype, **kw)
        if grad:
            out_pt.backward(dout)
    else:  # fp32 (interpreter only): the reference *is* the low precision; fixed tolerance instead
        pt_leaves, out_pt = ref_leaves, out_ref.detach() + 2e-5
    out, out_ref, out_pt = out.detach(), out_ref.detach(), out_pt.detach()

    assert_within_rule("out", out, out_ref, out_pt, 2)
    assert_lse_close(lse, lse_ref, 1e-2 if low_precision else 1e-4)
    # Rows that see no key: exactly zero output.
    empty = torch.isneginf(lse_ref)
    if empty.any():
        assert (out[empty] == 0).all(), "rows that see no key must be zeros"

    if not grad:
        return out, lse, None
    grads = [t.grad for t in leaves]
    fa2 = fa2_delta_error(q, k, v, dout, out, out_ref, causal=causal, key_padding=key_padding, scale=scale)
    for name, got, ref, pt, leaf in zip(
        "qkv", grads, [t.grad for t in ref_leaves], [t.grad for t in pt_leaves], leaves
    ):
        assert got.dtype == dtype and got.shape == leaf.shape
        if low_precision:
            assert_within_rule(f"d{name}", got, ref, pt, 3, extra=2 * fa2[name])
        else:
            assert_within_rule(f"d{name}", got, ref, ref + 1e-4, 1)
    if empty.any():
        assert (grads[0][empty] == 0).all(), "dq of rows that see no key must be zero"
    return out, lse, grads


# --------------------------------------------------------------------------------------------------------------------
# Parametrized cases
# --------------------------------------------------------------------------------------------------------------------

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, padding, dtype)
CASES = [
    (1, 2, 1, 17, 17, 64, True, "none", torch.float16),
    (2, 2, 2, 33, 33, 32, False, "none", torch.bfloat16),
    (2, 3, 1, 33, 33, 64, True, "right", torch.bfloat16),  # SmolLM2's 9/3 ratio, scaled down
    (2, 3, 3, 17, 17, 16, False, "left", torch.float16),
    (2, 3, 1, 1, 40, 64, True, "left", torch.float16),  # decode step
    (1, 2, 2, 1, 33, 96, False, "none", torch.bfloat16),  # decode, bidirectional
    (1, 4, 2, 1, 33, 64, False, "none", torch.bfloat16),  # the same with GQA: dK/dV's group loop is its only loop
    (2, 2, 1, 5, 40, 80, True, "right", torch.bfloat16),  # chunked prefill against a cache
    (2, 4, 2, 5, 40, 128, False, "left", torch.float16),
    (2, 4, 2, 40, 17, 96, True, "none", torch.float16),  # Sq > Sk, causal: the first rows see nothing
    (1, 1, 1, 33, 20, 128, False, "right", torch.bfloat16),  # Sq > Sk, bidirectional
    (2, 2, 1, 17, 17, 64, True, "full", torch.float16),  # one batch row entirely masked
    (2, 2, 1, 17, 40, 32, False, "full", torch.bfloat16),
    (2, 2, 2, 1, 1, 16, True, "none", torch.float16),  # a single key
    (1, 2, 1, 48, 48, 80, True, "holes", torch.bfloat16),
    (2, 1, 1, 33, 33, 128, True, "holes", torch.float16),
    (1, 2, 1, 17, 17, 256, True, "left", torch.bfloat16),
]


def case_id(case) -> str:
    b, hq, hkv, sq, sk, d, causal, pad, dtype = case
    return f"B{b}-Hq{hq}-Hkv{hkv}-Sq{sq}-Sk{sk}-D{d}-{'causal' if causal else 'bidir'}-pad_{pad}-{DTYPE_NAMES[dtype]}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_dense_matches_reference(case):
    batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, pad, dtype = case
    key_padding = make_key_padding(pad, batch, seq_k, n=5 if pad == "right" else 3, seed=seq_k)
    out, lse, grads = check_against_reference(
        batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, key_padding, dtype
    )
    if pad == "full":  # row 0 sees nothing: zeros, -inf, zero gradients everywhere in that row
        assert (out[0] == 0).all()
        assert torch.isneginf(lse[0]).all()
        for grad in grads:
            assert (grad[0] == 0).all()
    if causal and seq_q > seq_k:
        hidden = seq_q - seq_k  # query i sees key j iff j <= i + Sk - Sq: the first Sq - Sk rows see nothing
        assert torch.isneginf(lse[:, :, :hidden]).all() and (out[:, :, :hidden] == 0).all()
        assert torch.isfinite(lse[:, :, hidden:]).all()


def test_dense_all_supported_head_dims_forward():
    """Forward only, every supported head dim in one go (the parametrized cases cover the backward)."""
    for head_dim in SUPPORTED_HEAD_DIMS:
        check_against_reference(1, 2, 1, 17, 17, head_dim, True, None, torch.float16, grad=False, seed=head_dim)


@pytest.mark.skipif(HAS_CUDA, reason="fp32 is a CPU-only (interpreter) dtype; on a GPU tl.dot would use TF32")
def test_dense_fp32_in_interpreter():
    key_padding = make_key_padding("left", 2, 20)
    check_against_reference(2, 2, 1, 20, 20, 32, True, key_padding, torch.float32)


def test_bf16_output_rounds_to_nearest():
    """Zero queries attend uniformly to two keys: ``out = (v0 + v1) / 2`` is exact in fp32, so the kernel's bf16 output
    must be exactly torch's round-to-nearest-even of it (ties included), as it is on a GPU."""
    q, k, v, _ = make_qkv(2, 2, 2, 16, 2, 64, torch.bfloat16, seed=2)
    out = dense_attention(torch.zeros_like(q), k, v, causal=False)
    expected = ((v[:, :, 0].float() + v[:, :, 1].float()) / 2).to(torch.bfloat16)[:, :, None].expand_as(out)
    mismatched = (out != expected).float().mean().item()
    assert mismatched == 0.0, f"{mismatched:.0%} of the outputs are not rounded to nearest"


@pytest.mark.parametrize("scale", [0.0, -0.1])
def test_dense_refuses_non_positive_scale(scale):
    """The kernel folds the scale into the row maximum (valid for scale > 0 only): other scales raise, not NaN."""
    q, k, v, _ = make_qkv(1, 1, 1, 4, 3, 16, torch.float16, seed=4)
    with pytest.raises(ValueError, match="positive softmax scale"):
        dense_attention(q, k, v, causal=False, scale=scale)


def test_dense_custom_scale_and_int_key_padding():
    """An explicit softmax scale is honoured; a non-bool (int) key-padding mask means non-zero = keep."""
    int_padding = torch.ones(2, 24, dtype=torch.long, device=DEVICE)
    int_padding[1, -7:] = 0
    q, k, v, _ = make_qkv(2, 2, 1, 24, 24, 32, torch.float16, seed=3)
    out = dense_attention(q, k, v, causal=True, scale=0.3, key_padding=int_padding)
    out_bool = dense_attention(q, k, v, causal=True, scale=0.3, key_padding=int_padding.bool())
    assert torch.equal(out, out_bool)
    check_against_reference(2, 2, 1, 24, 24, 32, True, int_padding.bool(), torch.float16, scale=0.3, seed=3)


def test_dense_accepts_hf_strided_layout():
    """HF hands over ``(B, S, H, D).transpose(1, 2)`` views; k/v may even have a non-unit last stride."""
    q, k, v, _ = make_qkv(2, 4, 2, 20, 20, 32, torch.bfloat16, seed=7)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_wide = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype, device=v.device)
    v_wide[..., ::2] = v
    v_strided = v_wide[..., ::2]  # last-dim stride 2
    assert not q_strided.is_contiguous() and v_strided.stride(-1) == 2
    out = dense_attention(q_strided, k_strided, v_strided, causal=True)
    expected = dense_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, expected)
    # The output is laid out as (B, S_q, H_q, D), so HF's transpose(1, 2).contiguous() is free.
    assert out.transpose(1, 2).is_contiguous()
    # A key-padding mask sliced out of a longer one (the mask builder slices [kv_offset, kv_offset + S_kv)).
    long_mask = torch.rand(2, 30, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.3
    sliced = long_mask[:, 5:25]
    assert not sliced.is_contiguous()
    out = dense_attention(q_strided, k_strided, v_strided, causal=True, key_padding=sliced)
    assert torch.equal(out, dense_attention(q, k, v, causal=True, key_padding=sliced.contiguous()))


def test_dense_input_validation():
    q, k, v, _ = make_qkv(1, 3, 2, 8, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="multiple"):
        dense_attention(q, k, v, causal=True)
    q, k, v, _ = make_qkv(1, 2, 1, 8, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="key_padding"):
        dense_attention(q, k, v, causal=True, key_padding=torch.ones(1, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError):
        dense_attention(q, k, v[:, :, :4], causal=True)
    with pytest.raises(ValueError):
        dense_attention(q[0], k, v, causal=True)


# --------------------------------------------------------------------------------------------------------------------
# Poisoned outputs: every element the kernels return must have been written by them
# --------------------------------------------------------------------------------------------------------------------


def poison_allocations(monkeypatch) -> None:
    """Every floating-point buffer from ``torch.empty`` / ``torch.empty_like`` comes filled with NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    assert torch.isnan(torch.empty(2)).all()  # the poison is in place


@pytest.mark.parametrize(
    "causal, seq_q, seq_k, pad",
    [(True, 17, 17, "none"), (False, 33, 20, "holes"), (True, 40, 17, "full")],
    ids=["causal-17x17", "bidir-33x20-holes", "causal-40x17-fullrow"],
)
def test_dense_writes_every_output_element(monkeypatch, causal, seq_q, seq_k, pad):
    """Fill every buffer the launchers allocate with NaN: any element the kernels skip would surface as NaN."""
    poison_allocations(monkeypatch)
    key_padding = make_key_padding(pad, 2, seq_k, seed=1)
    out, lse, grads = check_against_reference(2, 2, 1, seq_q, seq_k, 32, causal, key_padding, torch.float16, seed=11)
    for t in (out, lse, *grads):
        assert not torch.isnan(t).any()


# --------------------------------------------------------------------------------------------------------------------
# Causal schedule: the 1-D grid runs heads in sections, each section's heavy tiles first (fwd.schedule_tile)
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _schedule_probe_kernel(Out, num_tiles, section_size):
    rank, head = schedule_tile(num_tiles, section_size)
    pid = tl.program_id(0)
    tl.store(Out + 2 * pid, rank)
    tl.store(Out + 2 * pid + 1, head)


def probe_schedule(num_tiles: int, num_heads: int, section_size: int) -> list[tuple]:
    """``(rank, head)`` of every program of the 1-D grid, in program order."""
    out = torch.full((num_tiles * num_heads, 2), -1, dtype=torch.int32, device=DEVICE)
    _schedule_probe_kernel[(num_tiles * num_heads,)](out, num_tiles, section_size)
    return [tuple(pair) for pair in out.tolist()]


def test_section_heads_all_or_one():
    """Every head in one section when their bytes fit the budget together, else the head-major order."""
    assert section_heads(8, 100, 800) == 8
    assert section_heads(8, 100, 799) == 1
    assert section_heads(1, 100, 100) == 1
    assert section_heads(8, 100, 0) == 1  # no budget: the head-major order
    assert section_budget_bytes(torch.device("cpu")) == 0


# (num_tiles, num_heads, section_heads): one section, several, one head each, a single tile, a single head.
SCHEDULES = [(3, 8, 8), (3, 8, 4), (5, 6, 2), (4, 6, 3), (6, 2, 1), (1, 3, 3), (4, 1, 1)]


@pytest.mark.parametrize(
    "num_tiles, num_heads, section_size", SCHEDULES, ids=["T{}-H{}-S{}".format(*s) for s in SCHEDULES]
)
def test_schedule_covers_every_tile_heavy_first(num_tiles, num_heads, section_size):
    order = probe_schedule(num_tiles, num_heads, section_size)
    assert sorted(order) == list(itertools.product(range(num_tiles), range(num_heads))), "not every (rank, head) once"
    for first_head in range(0, num_heads, section_size):
        lo = first_head * num_tiles
        section = order[lo : lo + section_size * num_tiles]
        heads = set(range(first_head, first_head + section_size))
        assert {head for _, head in section} == heads, f"section of heads {sorted(heads)}"
        ranks = [rank for rank, _ in section]
        assert ranks == sorted(ranks), f"section of heads {sorted(heads)} starts a lighter tile before a heavier one"
    if section_size == 1:  # the head-major order of the former 2-D grid, which non-causal launches keep
        assert order == [(pid % num_tiles, pid // num_tiles) for pid in range(num_tiles * num_heads)]


@pytest.mark.parametrize(
    "causal, seq_q, seq_k", [(True, 45, 45), (True, 21, 53), (False, 37, 29)],
    ids=["causal-45x45", "causal-21x53", "bidir-37x29"],
)  # fmt: skip
def test_dense_causal_sections_match_reference(monkeypatch, causal, seq_q, seq_k):
    """With a budget that holds every head (on a GPU it comes from the device; here it is 0, the head-major order,
    unless patched), every kernel runs one rank-major section and still computes every tile of every head, once."""
    batch, q_heads, kv_heads, head_dim, dtype = 2, 8, 4, 32, torch.float16
    monkeypatch.setattr(dense_module, "section_budget_bytes", lambda device: 1 << 40)
    schedules = []
    real_schedule = dense_module._schedule

    def recording_schedule(device, is_causal, num_heads, bytes_per_head):
        size = real_schedule(device, is_causal, num_heads, bytes_per_head)
        schedules.append((num_heads, size))
        return size

    monkeypatch.setattr(dense_module, "_schedule", recording_schedule)
    poison_allocations(monkeypatch)
    out, lse, grads = check_against_reference(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, None, dtype)
    for t in (out, lse, *grads):
        assert not torch.isnan(t).any()
    expected_heads = [16, 8, 16]  # forward, dK/dV, dQ
    assert schedules == [(heads, heads if causal else 1) for heads in expected_heads]


# --------------------------------------------------------------------------------------------------------------------
# torch.compile: the custom op is opaque, so fullgraph compilation must succeed (no graph break) and match eager
# --------------------------------------------------------------------------------------------------------------------


def test_dense_torch_compile_fullgraph():
    # Inductor on CPU spends ~25 s compiling C++ for the glue ops around the (opaque) kernel; aot_eager still traces
    # the op through its fake implementation and autograd registration, which is what this test is about.
    backend = "inductor" if HAS_CUDA else "aot_eager"
    torch._dynamo.reset()

    def fn(q, k, v, key_padding):
        out, lse = dense_attention(q * 1.0, k, v, causal=True, key_padding=key_padding, return_lse=True)
        return out * 2.0, lse

    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=True)
    for seq in (17, 33):  # a second shape must not break the graph either
        q, k, v, dout = make_qkv(2, 4, 2, seq, seq, 32, torch.float16, seed=seq)
        key_padding = make_key_padding("left", 2, seq)
        eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        compiled_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out_eager, lse_eager = fn(*eager_leaves, key_padding)
        out_compiled, lse_compiled = compiled(*compiled_leaves, key_padding)
        torch.testing.assert_close(out_compiled, out_eager, atol=0, rtol=0)
        torch.testing.assert_close(lse_compiled, lse_eager, atol=0, rtol=0)
        out_eager.backward(dout)
        out_compiled.backward(dout)
        for eager, comp in zip(eager_leaves, compiled_leaves):
            torch.testing.assert_close(comp.grad, eager.grad, atol=0, rtol=0)


def test_dense_custom_op_opcheck():
    """torch.library's own consistency checks of the custom op (schema, fake tensor, autograd registration)."""
    q, k, v, _ = make_qkv(1, 2, 1, 16, 16, 16, torch.float16, seed=5)
    key_padding = make_key_padding("left", 1, 16).view(torch.uint8)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), key_padding, True, 0.25)
    torch.library.opcheck(
        torch.ops.hf_fastattn.dense_fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


# --------------------------------------------------------------------------------------------------------------------
# Property-based: random shapes, masks and dtypes against the reference
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def attention_problems(draw, max_batch=2, max_kv_heads=2, max_group=3, max_seq=40, head_dims=(16, 32, 64, 80)):
    batch = draw(st.integers(1, max_batch))
    kv_heads = draw(st.integers(1, max_kv_heads))
    group = draw(st.integers(1, max_group))
    seq_q = draw(st.integers(1, max_seq))
    seq_k = draw(st.integers(1, max_seq))
    head_dim = draw(st.sampled_from(head_dims))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    pad = draw(st.sampled_from(["none", "left", "right", "holes"]))
    n = draw(st.integers(1, seq_k)) if pad in ("left", "right") else 0
    holes = None
    if pad == "holes" and batch * seq_k <= 128:  # explicit flags shrink well; long rows use a seeded pattern instead
        holes = draw(st.lists(st.booleans(), min_size=batch * seq_k, max_size=batch * seq_k))
    # Gradients on about a third of the examples keep the interpreter's time bounded.
    grad = draw(st.sampled_from([False, False, True]))
    seed = draw(st.integers(0, 2**31 - 1))
    return {
        "batch": batch, "kv_heads": kv_heads, "q_heads": kv_heads * group, "seq_q": seq_q, "seq_k": seq_k,
        "head_dim": head_dim, "causal": causal, "dtype": dtype, "pad": pad, "n": n, "holes": holes, "grad": grad,
        "seed": seed,
    }  # fmt: skip


def run_problem(p):
    key_padding = make_key_padding(p["pad"], p["batch"], p["seq_k"], n=p["n"], holes=p["holes"], seed=p["seed"])
    check_against_reference(
        p["batch"], p["q_heads"], p["kv_heads"], p["seq_q"], p["seq_k"], p["head_dim"], p["causal"], key_padding,
        p["dtype"], grad=p["grad"], seed=p["seed"],
    )  # fmt: skip


@given(problem=attention_problems())
def test_dense_matches_reference_hypothesis(problem):
    run_problem(problem)


# --------------------------------------------------------------------------------------------------------------------
# Realistic shapes on a GPU
# --------------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [
    # (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, padding, dtype)
    (2, 32, 8, 1024, 1024, 128, True, "none", torch.bfloat16),
    (2, 32, 8, 2048, 2048, 64, True, "left", torch.float16),
    (2, 32, 32, 1024, 1024, 64, False, "right", torch.bfloat16),
    (2, 32, 8, 4097, 4097, 128, True, "right", torch.bfloat16),
    (2, 32, 8, 4097, 4097, 64, False, "holes", torch.float16),
    (2, 32, 8, 1, 4097, 128, True, "left", torch.bfloat16),  # decode against a long cache
    (2, 32, 8, 511, 2048, 128, True, "none", torch.float16),  # chunked prefill
    (2, 16, 8, 1024, 1024, 256, True, "left", torch.bfloat16),
    (2, 32, 8, 1024, 1024, 80, False, "full", torch.float16),
]


@pytest.mark.gpu
class TestDenseGPU:
    @pytest.mark.parametrize("case", GPU_SHAPES, ids=[case_id(c) for c in GPU_SHAPES])
    def test_forward_backward(self, case):
        batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, pad, dtype = case
        key_padding = make_key_padding(pad, batch, seq_k, n=seq_k // 3, seed=seq_k)
        check_against_reference(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, causal, key_padding, dtype)

    def test_no_host_sync(self):
        """The op never synchronises with the host (CUDA graph friendly)."""
        q, k, v, _ = make_qkv(2, 8, 2, 256, 256, 64, torch.bfloat16)
        dense_attention(q, k, v, causal=True)  # compile/autotune outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            dense_attention(q, k, v, causal=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    # Head dims 64 and 128 only: every (head dim, causal, padding) is its own kernel compile, and 1,000 examples must
    # fit one GPU session; the other head dims run at realistic shapes in test_forward_backward.
    @given(problem=attention_problems(max_batch=2, max_kv_heads=4, max_group=4, max_seq=512, head_dims=(64, 128)))
    def test_matches_reference_hypothesis(self, problem):
        run_problem(problem)
