"""Routing of the shared attention-function body: kernel, SDPA fallback, PyTorch reference; one warning per reason."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from method_helpers import fresh_warnings, warnings_of  # noqa: F401 (autouse fixture)
from torch import nn

import hf_fastattn
from hf_fastattn import dispatch
from hf_fastattn.capabilities import MASK_ADDITIVE_4D, MASK_KEY_PADDING, MASK_NONE, Capabilities
from hf_fastattn.methods.dense import SPEC, dense_attention_forward
from hf_fastattn.ops.dense import dense_attention_reference
from hf_fastattn.state import STATE_ATTRIBUTE, LayerState

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Kernel (interpreter or GPU) against an fp32 reference on half-precision inputs; SDPA fallbacks are compared tighter.
KERNEL_TOL = {"atol": 2e-2, "rtol": 2e-2}
FALLBACK_TOL = {"atol": 1e-5, "rtol": 1e-5}


class StubAttention(nn.Module):
    """The attributes of an HF attention module that the dispatcher and transformers' SDPA read."""

    def __init__(self, is_causal: bool = True, num_key_value_groups: int = 1, training: bool = False):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = num_key_value_groups
        self.scaling = None
        self.train(training)


def qkv(batch=2, q_heads=2, kv_heads=2, seq_q=8, seq_k=8, head_dim=16, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq_q, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def sdpa(q, k, v, mask=None, *, causal=False, scale=None, dropout=0.0):
    """Plain torch SDPA in HF's output layout (B, S_q, H, D), GQA by repeating K/V."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, dropout_p=dropout)
    return out.transpose(1, 2)


def reference(q, k, v, *, causal, key_padding=None, scale=None):
    out = dense_attention_reference(q, k, v, causal=causal, key_padding=key_padding, scale=scale)
    return out.transpose(1, 2)


def call_twice(module, q, k, v, mask, **kwargs):
    out1, weights = dense_attention_forward(module, q, k, v, mask, **kwargs)
    out2, _ = dense_attention_forward(module, q, k, v, mask, **kwargs)
    assert weights is None
    assert torch.equal(out1, out2) or kwargs.get("dropout", 0.0) > 0
    return out1


# --------------------------------------------------------------------------------------------------------------------
# Fallbacks: each case its own test, one warning per (method, reason) however often it happens
# --------------------------------------------------------------------------------------------------------------------


def test_additive_4d_mask_falls_back_to_sdpa(caplog):
    q, k, v = qkv(seq_q=8, seq_k=12)
    gen = torch.Generator().manual_seed(1)
    mask = torch.randn(2, 1, 8, 12, generator=gen).to(DEVICE)  # an arbitrary bias, not a 0/-inf pattern
    mask[1, :, :, :3] = float("-inf")
    out = call_twice(StubAttention(is_causal=True), q, k, v, mask, scaling=0.3)
    # With a 4-D mask transformers' SDPA passes is_causal=False: the mask alone decides.
    torch.testing.assert_close(out, sdpa(q, k, v, mask, scale=0.3), **FALLBACK_TOL)
    [message] = warnings_of(caplog)
    assert MASK_ADDITIVE_4D in message and "sdpa" in message and "fastattn_dense" in message


def test_bool_4d_mask_falls_back_to_sdpa(caplog):
    q, k, v = qkv(q_heads=4, kv_heads=2, seq_q=8, seq_k=8)
    gen = torch.Generator().manual_seed(2)
    mask = (torch.rand(2, 1, 8, 8, generator=gen) > 0.4).to(DEVICE)
    mask[..., 0] = True  # every row sees a key
    out = call_twice(StubAttention(num_key_value_groups=2), q, k, v, mask)
    torch.testing.assert_close(out, sdpa(q, k, v, mask), **FALLBACK_TOL)
    [message] = warnings_of(caplog)
    assert "bool_4d" in message and "static cache" in message  # says what such masks usually come from


def test_dropout_while_training_falls_back(caplog):
    q, k, v = qkv()
    module = StubAttention(is_causal=True, training=True)
    torch.manual_seed(123)
    out = call_twice(module, q, k, v, None, dropout=0.5)
    torch.manual_seed(123)
    expected = sdpa(q, k, v, causal=True, dropout=0.5)
    torch.testing.assert_close(out, expected, **FALLBACK_TOL)  # same RNG draw: SDPA with dropout ran
    [message] = warnings_of(caplog)
    assert "dropout" in message and "0.5" in message


def test_no_dropout_in_eval_takes_the_kernel(caplog):
    """HF passes dropout=0 when not training: that is the kernel's path, without a warning."""
    q, k, v = qkv(dtype=torch.float16)
    out, _ = dense_attention_forward(StubAttention(training=False), q, k, v, None, dropout=0.0)
    torch.testing.assert_close(out.float(), reference(q, k, v, causal=True).float(), **KERNEL_TOL)
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("head_dim", [24, 48])
def test_unsupported_head_dim_falls_back(caplog, head_dim):
    q, k, v = qkv(q_heads=4, kv_heads=2, head_dim=head_dim)
    key_padding = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    key_padding[0, :3] = False
    out = call_twice(StubAttention(num_key_value_groups=2), q, k, v, key_padding)
    # The fallback keeps our semantics: key padding and (aligned) causality together.
    expected = reference(q, k, v, causal=True, key_padding=key_padding)
    torch.testing.assert_close(out, expected, **FALLBACK_TOL)
    [message] = warnings_of(caplog)
    assert f"head dim {head_dim}" in message


def test_fp32_on_gpu_is_refused():
    """fp32 is fine on the CPU (interpreter / reference) but outside the GPU kernels' dtypes."""
    caps = SPEC.capabilities

    def fake(device, dtype):
        return types.SimpleNamespace(shape=(1, 2, 8, 64), dtype=dtype, device=torch.device(device))

    kw = {"causal": True, "mask_kind": MASK_NONE, "dropout": 0.0, "needs_grad": False, "scale": 0.125}
    reason = caps.refusal(fake("cuda", torch.float32), fake("cuda", torch.float32), **kw)
    assert reason is not None and "float32" in reason and "GPU" in reason
    assert caps.refusal(fake("cuda", torch.bfloat16), fake("cuda", torch.bfloat16), **kw) is None
    assert caps.refusal(fake("cpu", torch.float32), fake("cpu", torch.float32), **kw) is None
    meta = torch.empty(1, 2, 8, 64, device="meta", dtype=torch.float32)
    assert caps.refusal(meta, meta, **kw) is None


@pytest.mark.gpu
def test_fp32_on_gpu_falls_back(caplog):
    q, k, v = qkv(device="cuda", dtype=torch.float32)
    out = call_twice(StubAttention(), q, k, v, None)
    torch.testing.assert_close(out, sdpa(q, k, v, causal=True), atol=1e-4, rtol=1e-4)
    [message] = warnings_of(caplog)
    assert "torch.float32" in message


def test_capability_refusals_in_order():
    """Every declared limit has its own reason (first one wins)."""
    q = torch.empty(1, 4, 8, 64, device="meta", dtype=torch.float16)
    k = torch.empty(1, 2, 8, 64, device="meta", dtype=torch.float16)
    base = {"causal": True, "mask_kind": MASK_KEY_PADDING, "dropout": 0.0, "needs_grad": True, "scale": 0.125}
    assert Capabilities().refusal(q, k, **base) is None
    assert "causal" in Capabilities(causal=False).refusal(q, k, **base)
    assert "bidirectional" in Capabilities(bidirectional=False).refusal(q, k, **{**base, "causal": False})
    assert "grouped-query" in Capabilities(gqa=False).refusal(q, k, **base)
    assert "backward" in Capabilities(backward=False).refusal(q, k, **base)
    assert "block_mask" in Capabilities().refusal(q, k, **{**base, "mask_kind": "block_mask", "dropout": 0.1})
    assert "dropout" in Capabilities().refusal(q, k, **{**base, "dropout": 0.1})
    assert Capabilities(dropout=True).refusal(q, k, **{**base, "dropout": 0.1}) is None
    assert "scale" in Capabilities().refusal(q, k, **{**base, "scale": 0.0})
    assert "scale" in Capabilities().refusal(q, k, **{**base, "scale": -0.5})


def test_cpu_without_interpreter_runs_the_reference(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_supports", lambda device: False)
    q, k, v = qkv(q_heads=4, kv_heads=2, seq_q=5, seq_k=9, dtype=torch.float32, device="cpu")
    key_padding = torch.ones(2, 9, dtype=torch.bool)
    key_padding[1, -2:] = False
    out = call_twice(StubAttention(num_key_value_groups=2), q, k, v, key_padding, scaling=0.2)
    expected = reference(q, k, v, causal=True, key_padding=key_padding, scale=0.2)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)  # the very same function
    [message] = warnings_of(caplog)
    assert "TRITON_INTERPRET" in message and "cpu" in message


def test_warning_once_per_method_and_reason(caplog):
    """Two different reasons give two warnings; repeating either gives none; reset_warnings re-arms them."""
    q, k, v = qkv()
    additive = torch.zeros(2, 1, 8, 8, device=DEVICE)
    for _ in range(3):
        dense_attention_forward(StubAttention(), q, k, v, additive)
        dense_attention_forward(StubAttention(training=True), q, k, v, None, dropout=0.1)
    assert len(warnings_of(caplog)) == 2
    dispatch.reset_warnings()
    dense_attention_forward(StubAttention(), q, k, v, additive)
    assert len(warnings_of(caplog)) == 3


# --------------------------------------------------------------------------------------------------------------------
# Causality: explicit keyword first, then the module; never inferred from the mask; bottom-right when S_q < S_kv
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module_causal, kwarg, expected", [(True, False, False), (False, True, True), (True, None, True)]
)
def test_is_causal_kwarg_overrides_module(caplog, module_causal, kwarg, expected):
    q, k, v = qkv(dtype=torch.float16)
    kwargs = {} if kwarg is None else {"is_causal": kwarg}
    out, _ = dense_attention_forward(StubAttention(is_causal=module_causal), q, k, v, None, **kwargs)
    torch.testing.assert_close(out.float(), reference(q, k, v, causal=expected).float(), **KERNEL_TOL)
    wrong = reference(q, k, v, causal=not expected).float()
    assert (out.float() - wrong).abs().max() > 0.1  # the two answers really differ
    assert warnings_of(caplog) == []


def test_causality_not_inferred_from_missing_mask(caplog):
    """A bidirectional module (an encoder) with no mask attends everywhere; None does not mean causal."""
    q, k, v = qkv(dtype=torch.float16)
    out, _ = dense_attention_forward(StubAttention(is_causal=False), q, k, v, None)
    torch.testing.assert_close(out.float(), reference(q, k, v, causal=False).float(), **KERNEL_TOL)
    torch.testing.assert_close(out.float(), sdpa(q.float(), k.float(), v.float()), **KERNEL_TOL)
    assert warnings_of(caplog) == []


def test_module_without_is_causal_defaults_to_causal():
    module = nn.Module()
    q, k, v = qkv(dtype=torch.float16)
    out, _ = dense_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(out.float(), reference(q, k, v, causal=True).float(), **KERNEL_TOL)


@pytest.mark.parametrize("head_dim", [16, 48], ids=["kernel", "sdpa_fallback"])
def test_bottom_right_causal_alignment(head_dim):
    """S_q < S_kv (chunked prefill against a cache): query i sees key j iff j <= i + S_kv - S_q, on every path."""
    q, k, v = qkv(seq_q=5, seq_k=12, head_dim=head_dim, dtype=torch.float16 if head_dim == 16 else torch.float32)
    out, _ = dense_attention_forward(StubAttention(is_causal=True), q, k, v, None)
    rows, cols = torch.arange(5, device=DEVICE)[:, None], torch.arange(12, device=DEVICE)[None, :]
    explicit = (cols <= rows + 12 - 5)[None, None]
    expected = sdpa(q.float(), k.float(), v.float(), explicit)
    torch.testing.assert_close(out.float(), expected, **(KERNEL_TOL if head_dim == 16 else FALLBACK_TOL))
    top_left = sdpa(q.float(), k.float(), v.float(), causal=True)  # SDPA's own is_causal is top-left
    assert (out.float() - top_left).abs().max() > 0.1


def test_decode_single_query_sees_every_key():
    q, k, v = qkv(q_heads=4, kv_heads=2, seq_q=1, seq_k=12, dtype=torch.float16)
    out, _ = dense_attention_forward(StubAttention(is_causal=True, num_key_value_groups=2), q, k, v, None)
    torch.testing.assert_close(out.float(), sdpa(q.float(), k.float(), v.float()), **KERNEL_TOL)


def test_key_padding_mask_takes_the_kernel(caplog):
    q, k, v = qkv(q_heads=4, kv_heads=2, seq_q=8, seq_k=8, dtype=torch.bfloat16)
    key_padding = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    key_padding[0, :3] = False
    out, _ = dense_attention_forward(StubAttention(num_key_value_groups=2), q, k, v, key_padding)
    expected = reference(q, k, v, causal=True, key_padding=key_padding)
    torch.testing.assert_close(out.float(), expected.float(), **KERNEL_TOL)
    assert out.is_contiguous() and out.shape == (2, 8, 4, 16)
    assert warnings_of(caplog) == []


# --------------------------------------------------------------------------------------------------------------------
# Layers left on SDPA, and the fallback's empty rows
# --------------------------------------------------------------------------------------------------------------------


def test_layer_state_sdpa_runs_sdpa_without_warning(caplog):
    """A layer assigned "sdpa" (LayerState with no spec) takes SDPA even for inputs dense would decline, silently."""
    module = StubAttention(is_causal=False)
    setattr(module, STATE_ATTRIBUTE, LayerState(0, None, {}))
    q, k, v = qkv(head_dim=48)
    additive = torch.randn(2, 1, 8, 8, device=DEVICE)
    out = call_twice(module, q, k, v, additive)
    torch.testing.assert_close(out, sdpa(q, k, v, additive), **FALLBACK_TOL)
    assert warnings_of(caplog) == []


def test_no_spec_dispatch_is_sdpa(caplog):
    q, k, v = qkv(seq_q=4, seq_k=8)
    out, _ = dispatch.dispatch_attention(None, StubAttention(is_causal=True), q, k, v, None)
    rows, cols = torch.arange(4, device=DEVICE)[:, None], torch.arange(8, device=DEVICE)[None, :]
    torch.testing.assert_close(out, sdpa(q, k, v, (cols <= rows + 4)[None, None]), **FALLBACK_TOL)
    assert warnings_of(caplog) == []


def test_patched_model_layers_on_sdpa_match_sdpa_without_warning(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (2, 7))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[0, :2] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention_mask).logits
        hf_fastattn.patch(model, "dense", layers={0: "sdpa", 1: "sdpa"})
        assert [s.method for s in hf_fastattn.layer_states(model)] == ["sdpa", "sdpa"]
        got = model(input_ids=ids, attention_mask=attention_mask).logits
    # Padded query rows differ between mask builders (SDPA's vs ours), so compare the real tokens only.
    keep = attention_mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert warnings_of(caplog) == []


def _nan_on_empty_rows_sdpa(real_sdpa):
    """torch's CPU SDPA already returns zeros for rows that see no key; CUDA backends have returned NaN: emulate."""

    def wrapped(query, key, value, attn_mask=None, *args, **kwargs):
        out = real_sdpa(query, key, value, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            empty = ~attn_mask.any(dim=-1, keepdim=True)  # (B or 1, 1, S_q, 1)
            out = out.masked_fill(empty, float("nan"))
        return out

    return wrapped


@pytest.mark.parametrize("nan_backend", [False, True], ids=["torch_sdpa", "nan_emulating_sdpa"])
def test_sdpa_fallback_zeros_for_fully_masked_rows(monkeypatch, nan_backend):
    if nan_backend:
        monkeypatch.setattr(F, "scaled_dot_product_attention", _nan_on_empty_rows_sdpa(F.scaled_dot_product_attention))
    q, k, v = qkv(head_dim=48)  # head dim 48: always the SDPA fallback
    # A 4-D bool mask with one row of batch 1 seeing nothing.
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool, device=DEVICE)
    mask[1, :, 3] = False
    out, _ = dense_attention_forward(StubAttention(is_causal=False), q, k, v, mask)
    assert not torch.isnan(out).any()
    assert (out[1, 3] == 0).all()
    # Key padding that hides every key of batch row 0: the whole row is zeros.
    key_padding = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    key_padding[0] = False
    out, _ = dense_attention_forward(StubAttention(is_causal=True), q, k, v, key_padding)
    assert not torch.isnan(out).any()
    assert (out[0] == 0).all()
    torch.testing.assert_close(out, reference(q, k, v, causal=True, key_padding=key_padding), **FALLBACK_TOL)
    # Causal with S_q > S_kv: the first S_q - S_kv rows see nothing.
    q, k, v = qkv(seq_q=8, seq_k=5, head_dim=48)
    out, _ = dense_attention_forward(StubAttention(is_causal=True), q, k, v, None)
    assert not torch.isnan(out).any()
    assert (out[:, :3] == 0).all()
    torch.testing.assert_close(out, reference(q, k, v, causal=True), **FALLBACK_TOL)


def test_kernel_path_zeros_for_fully_masked_rows():
    q, k, v = qkv(dtype=torch.float16)
    key_padding = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    key_padding[1] = False
    out, _ = dense_attention_forward(StubAttention(), q, k, v, key_padding)
    assert not torch.isnan(out).any() and (out[1] == 0).all()


def test_zero_scale_falls_back_to_uniform_attention(caplog):
    """scale = 0 is outside the kernels (they need a positive scale): SDPA computes it, with one warning."""
    q, k, v = qkv()
    out = call_twice(StubAttention(is_causal=False), q, k, v, None, scaling=0.0)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=0.0), atol=1e-5, rtol=1e-5)
    [message] = warnings_of(caplog)
    assert "scale" in message
