"""End-to-end equivalence of ``fastattn_dense`` with transformers' eager attention on tiny random models.

Six architectures (Llama with GQA, GPT-2, ViT, RoBERTa, BERT, DINOv2) are built from random configs (no downloads),
once with ``attn_implementation="eager"`` and once with ``"fastattn_dense"``, sharing weights through
``load_state_dict``. Everything runs in fp32 on the CPU; with ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` when
there is no GPU) the real Triton kernels run through Triton's interpreter, so shapes are kept tiny.

Every comparison also checks, through a spy on the kernel launchers, that the fast path really ran (the Triton kernel
in the interpreter, the PyTorch reference otherwise) and that nothing silently fell back to SDPA.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    Dinov2Config,
    DynamicCache,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
    StaticCache,
    ViTConfig,
)

import hf_fastattn
import hf_fastattn.dispatch
import hf_fastattn.methods.dense
import hf_fastattn.ops.decode.attention
import hf_fastattn.ops.dense.attention
from hf_fastattn._compat import cache_argument
from hf_fastattn.ops._runtime import interpreter_enabled

# transformers' own fp32 tolerances for attention-implementation equivalence tests.
ATOL, RTOL = 1e-5, 1e-4
VOCAB = 97
PAD_ID = 0
SEQ = 13  # odd, and not a multiple of the interpreter's 16-wide tiles
IMAGE, PATCH = 32, 8  # 16 patches + CLS = 17 tokens
FAST = "fastattn_dense"


# --------------------------------------------------------------------------------------------------------------------
# Tiny architectures
# --------------------------------------------------------------------------------------------------------------------


def _llama_config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per KV head
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def _gpt2_config():
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        initializer_range=0.2,  # a less degenerate random LM: greedy decoding does not repeat one token
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
    )


def _vit_config():
    return ViTConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )


def _roberta_config():
    return RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=1,  # RoBERTa derives position ids from the padding index
    )


def _bert_config():
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
    )


def _dinov2_config():
    return Dinov2Config(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
    )


@dataclass(frozen=True)
class Arch:
    name: str
    make_config: object
    auto_class: object
    kind: str  # "causal", "encoder" or "vision"
    num_layers: int = 2

    @property
    def is_text(self) -> bool:
        return self.kind != "vision"


ARCHS = {
    "llama": Arch("llama", _llama_config, AutoModelForCausalLM, "causal"),
    "gpt2": Arch("gpt2", _gpt2_config, AutoModelForCausalLM, "causal"),
    "vit": Arch("vit", _vit_config, AutoModel, "vision"),
    "roberta": Arch("roberta", _roberta_config, AutoModelForMaskedLM, "encoder"),
    "bert": Arch("bert", _bert_config, AutoModel, "encoder"),
    "dinov2": Arch("dinov2", _dinov2_config, AutoModel, "vision"),
}
TEXT = [name for name, arch in ARCHS.items() if arch.is_text]
CAUSAL = [name for name, arch in ARCHS.items() if arch.kind == "causal"]


def build_pair(arch: Arch, seed: int = 0):
    """(eager model, fastattn model) with identical weights, both in eval mode, each from its own config copy."""
    config = arch.make_config()
    torch.manual_seed(seed)
    eager = arch.auto_class.from_config(copy.deepcopy(config), attn_implementation="eager")
    fast = arch.auto_class.from_config(copy.deepcopy(config), attn_implementation=FAST)
    missing, unexpected = fast.load_state_dict(eager.state_dict(), strict=True)
    assert not missing and not unexpected
    eager.eval()
    fast.eval()
    assert eager is not fast and eager.config is not fast.config
    assert eager.config._attn_implementation == "eager"
    assert fast.config._attn_implementation == FAST
    assert len(hf_fastattn.attention_modules(fast)) == arch.num_layers
    return eager, fast


def make_inputs(arch: Arch, padding: str | None = None, batch: int = 3, seq: int = SEQ, seed: int = 1):
    """Random inputs; for text, a batch of 3 with row 1 padded by 4 tokens and row 2 by 3 (on ``padding``'s side).

    Without padding no attention mask is passed at all (the kernels' mask-free path).
    """
    generator = torch.Generator().manual_seed(seed)
    if not arch.is_text:
        return {"pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=generator)}
    config = arch.make_config()
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding is not None:
        for row, count in ((1, 4), (2, 3)):
            pad = slice(0, count) if padding == "left" else slice(seq - count, seq)
            mask[row, pad] = 0
            input_ids[row, pad] = config.pad_token_id
    else:
        return {"input_ids": input_ids}
    return {"input_ids": input_ids, "attention_mask": mask}


def valid_positions(inputs) -> torch.Tensor | None:
    mask = inputs.get("attention_mask")
    return None if mask is None else mask.bool()


def primary_output(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def assert_close_valid(actual, expected, valid, *, atol=ATOL, rtol=RTOL, what=""):
    """Compare ``(B, S, ...)`` tensors on the non-padded positions only."""
    assert actual.shape == expected.shape, what
    if valid is not None:
        actual, expected = actual[valid], expected[valid]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------------------
# Spy: proves the fast path ran and that nothing fell back to SDPA
# --------------------------------------------------------------------------------------------------------------------


class AttentionSpy:
    def __init__(self, monkeypatch):
        self.kernel_fwd: list[tuple] = []  # (q shape, k shape, has key padding, causal), decode kernels included
        self.decode: list[str] = []  # the strategy of every decode-kernel launch
        self.kernel_bwd = 0
        self.reference = 0
        self.fallbacks = 0
        attention = hf_fastattn.ops.dense.attention
        methods = hf_fastattn.methods.dense
        dispatch = hf_fastattn.dispatch
        fwd, bwd, ref, fallback = (
            attention.dense_fwd,
            attention.dense_bwd,
            methods.dense_attention_reference,
            dispatch.sdpa_fallback,
        )
        decode_attention_module = hf_fastattn.ops.decode.attention
        decode_fwd = decode_attention_module.decode_fwd

        def spy_fwd(q, k, v, key_padding, causal, scale, fast_exp=0):
            self.kernel_fwd.append((tuple(q.shape), tuple(k.shape), key_padding is not None, causal))
            return fwd(q, k, v, key_padding, causal, scale, fast_exp)

        def spy_decode(q, k, v, key_padding, scale, plan):
            self.kernel_fwd.append((tuple(q.shape), tuple(k.shape), key_padding is not None, True))
            self.decode.append(plan.strategy)
            return decode_fwd(q, k, v, key_padding, scale, plan)

        def spy_bwd(*args, **kwargs):
            self.kernel_bwd += 1
            return bwd(*args, **kwargs)

        def spy_ref(*args, **kwargs):
            self.reference += 1
            return ref(*args, **kwargs)

        def spy_fallback(*args, **kwargs):
            self.fallbacks += 1
            return fallback(*args, **kwargs)

        monkeypatch.setattr(attention, "dense_fwd", spy_fwd)
        monkeypatch.setattr(attention, "dense_bwd", spy_bwd)
        monkeypatch.setattr(decode_attention_module, "decode_fwd", spy_decode)
        monkeypatch.setattr(methods, "dense_attention_reference", spy_ref)
        monkeypatch.setattr(dispatch, "sdpa_fallback", spy_fallback)

    def reset(self):
        self.kernel_fwd.clear()
        self.decode.clear()
        self.kernel_bwd = self.reference = self.fallbacks = 0

    def fast_calls(self) -> int:
        return len(self.kernel_fwd) if interpreter_enabled() else self.reference

    def assert_fast_path(self, min_calls: int, *, backward: bool = False):
        assert self.fallbacks == 0, "a call fell back to SDPA"
        assert self.fast_calls() >= min_calls, (len(self.kernel_fwd), self.reference)
        if interpreter_enabled():
            assert self.reference == 0, "the PyTorch reference ran although TRITON_INTERPRET=1"
            if backward:
                assert self.kernel_bwd >= min_calls


@pytest.fixture
def spy(monkeypatch):
    return AttentionSpy(monkeypatch)


def test_interpreter_is_on_without_gpu():
    """The point of this module: without a GPU the suite runs the real Triton kernels (conftest sets the flag)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: CPU tensors run the PyTorch reference")
    if os.environ.get("TRITON_INTERPRET") == "0":
        pytest.skip("TRITON_INTERPRET=0 set explicitly: the PyTorch reference runs instead of the kernels")
    assert interpreter_enabled()


# --------------------------------------------------------------------------------------------------------------------
# Forward: logits / last hidden state and every hidden state
# --------------------------------------------------------------------------------------------------------------------

FORWARD_CASES = [(name, None) for name in ARCHS] + [(name, side) for name in TEXT for side in ("right", "left")]


@pytest.mark.parametrize(("arch_name", "padding"), FORWARD_CASES, ids=lambda v: str(v))
def test_forward_matches_eager(arch_name, padding, spy):
    arch = ARCHS[arch_name]
    eager, fast = build_pair(arch)
    inputs = make_inputs(arch, padding)
    valid = valid_positions(inputs)

    with torch.no_grad():
        expected = eager(**inputs, output_hidden_states=True)
        spy.reset()
        actual = fast(**inputs, output_hidden_states=True)
    spy.assert_fast_path(arch.num_layers)
    if interpreter_enabled():
        assert all(has_padding == (padding is not None) for _, _, has_padding, _ in spy.kernel_fwd)
        assert all(causal == (arch.kind == "causal") for *_, causal in spy.kernel_fwd)

    assert_close_valid(primary_output(actual), primary_output(expected), valid, what="output")
    if getattr(expected, "last_hidden_state", None) is not None:
        assert_close_valid(actual.last_hidden_state, expected.last_hidden_state, valid, what="last_hidden_state")
    assert len(actual.hidden_states) == len(expected.hidden_states) == arch.num_layers + 1
    for index, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert_close_valid(a, e, valid, what=f"hidden_states[{index}]")


def test_gpt2_per_layer_scaling(spy):
    """GPT-2's ``scale_attn_by_inverse_layer_idx`` gives each layer its own softmax scale: it must reach the kernel."""

    def config():
        return GPT2Config(**{**_gpt2_config().to_dict(), "scale_attn_by_inverse_layer_idx": True})

    arch = Arch("gpt2-scaled", config, AutoModelForCausalLM, "causal")
    eager, fast = build_pair(arch)
    inputs = make_inputs(arch, "left")
    with torch.no_grad():
        expected = eager(**inputs).logits
        spy.reset()
        actual = fast(**inputs).logits
    spy.assert_fast_path(arch.num_layers)
    assert_close_valid(actual, expected, valid_positions(inputs), what="logits")


def test_padding_is_not_ignored(spy):
    """Guard against a mask builder that drops padding: padded and unpadded batches must differ where it matters."""
    arch = ARCHS["bert"]
    _, fast = build_pair(arch)
    inputs = make_inputs(arch, "right")
    unpadded = {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["attention_mask"])}
    with torch.no_grad():
        padded_out = fast(**inputs).last_hidden_state
        unpadded_out = fast(**unpadded).last_hidden_state
    # Row 0 has no padding: identical. Row 1's valid tokens must not see its 4 padded keys: different.
    torch.testing.assert_close(padded_out[0], unpadded_out[0], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(padded_out[1, :-4], unpadded_out[1, :-4], atol=1e-3)
    spy.assert_fast_path(4)


# --------------------------------------------------------------------------------------------------------------------
# Backward: gradients of every parameter
# --------------------------------------------------------------------------------------------------------------------

GRAD_CASES = [(name, None) for name in ARCHS] + [(name, side) for name in TEXT for side in ("right", "left")]


def scalar_loss(output, inputs, weight: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the main output, summed over the non-padded positions only."""
    out = primary_output(output)
    per_position = (out * weight).sum(-1)
    valid = valid_positions(inputs)
    if valid is not None:
        per_position = per_position * valid
    return per_position.sum() / per_position.numel()


@pytest.mark.parametrize(("arch_name", "padding"), GRAD_CASES, ids=lambda v: str(v))
def test_gradients_match_eager(arch_name, padding, spy):
    arch = ARCHS[arch_name]
    eager, fast = build_pair(arch)
    inputs = make_inputs(arch, padding)
    generator = torch.Generator().manual_seed(2)

    with torch.no_grad():
        width = primary_output(eager(**inputs)).shape[-1]
    weight = torch.randn(width, generator=generator)

    scalar_loss(eager(**inputs), inputs, weight).backward()
    spy.reset()
    loss = scalar_loss(fast(**inputs), inputs, weight)
    loss.backward()
    spy.assert_fast_path(arch.num_layers, backward=True)

    eager_params = dict(eager.named_parameters())
    compared = 0
    for name, param in fast.named_parameters():
        reference = eager_params[name].grad
        if reference is None:
            assert param.grad is None, f"{name}: gradient only with {FAST}"
            continue
        assert param.grad is not None, f"{name}: no gradient with {FAST}"
        scale = reference.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(
            param.grad, reference, atol=1e-5 * scale.item(), rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}"
        )
        compared += 1
    # Every attention projection got a gradient through the kernel's backward.
    assert compared >= 0.8 * len(eager_params), (compared, len(eager_params))


# --------------------------------------------------------------------------------------------------------------------
# set_attn_implementation on an eager-built model
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_set_attn_implementation_switch(arch_name, spy):
    arch = ARCHS[arch_name]
    config = arch.make_config()
    torch.manual_seed(0)
    eager = arch.auto_class.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    switched = arch.auto_class.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    switched.load_state_dict(eager.state_dict())
    assert switched.config._attn_implementation == "eager"

    switched.set_attn_implementation(FAST)
    assert switched.config._attn_implementation == FAST
    assert eager.config._attn_implementation == "eager"
    for module in switched.modules():  # every sub-config that a layer reads switched too
        module_config = getattr(module, "config", None)
        if module_config is not None and hasattr(module_config, "_attn_implementation"):
            assert module_config._attn_implementation == FAST, type(module).__name__

    inputs = make_inputs(arch, "right" if arch.is_text else None)
    valid = valid_positions(inputs)
    with torch.no_grad():
        expected = primary_output(eager(**inputs))
        spy.reset()
        actual = primary_output(switched(**inputs))
    spy.assert_fast_path(arch.num_layers)
    assert_close_valid(actual, expected, valid, what="output after set_attn_implementation")

    # And back: no hf_fastattn call any more.
    switched.set_attn_implementation("eager")
    spy.reset()
    with torch.no_grad():
        back = primary_output(switched(**inputs))
    assert spy.fast_calls() == 0 and spy.fallbacks == 0
    assert_close_valid(back, expected, valid, what="output after switching back to eager")


# --------------------------------------------------------------------------------------------------------------------
# Cached generation (causal LMs, DynamicCache, left padding)
# --------------------------------------------------------------------------------------------------------------------

PROMPT = 9


def left_padded_prompt(arch: Arch):
    inputs = make_inputs(arch, "left", seq=PROMPT, seed=3)
    return inputs["input_ids"], inputs["attention_mask"]


@pytest.mark.parametrize("arch_name", CAUSAL)
def test_greedy_generate_matches_eager(arch_name, spy):
    arch = ARCHS[arch_name]
    eager, fast = build_pair(arch)
    input_ids, mask = left_padded_prompt(arch)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "max_new_tokens": 6,
        "min_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": PAD_ID,
        "return_dict_in_generate": True,
        "output_logits": True,
    }

    expected = eager.generate(**kwargs, **cache_argument(eager, DynamicCache(config=eager.config)))
    spy.reset()
    fast_cache = DynamicCache(config=fast.config)
    actual = fast.generate(**kwargs, **cache_argument(fast, fast_cache))

    assert actual.sequences.shape == (3, PROMPT + 6)
    torch.testing.assert_close(actual.sequences, expected.sequences, atol=0, rtol=0)
    new_tokens = actual.sequences[:, PROMPT:]
    assert len(set(new_tokens.flatten().tolist())) > 1, "degenerate model: the test would prove little"
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    assert fast_cache.get_seq_length() >= PROMPT + 5  # the cache was used, not recomputed from scratch

    # The fast path ran for the prefill and for every single-token decode step, with the padding mask.
    spy.assert_fast_path(arch.num_layers * 6)
    if interpreter_enabled():
        decode_calls = [call for call in spy.kernel_fwd if call[0][2] == 1]
        assert len(decode_calls) == arch.num_layers * 5
        assert len(spy.decode) == arch.num_layers * 5, "decode steps must run the shared decode kernels"
        assert all(has_padding and causal for _, _, has_padding, causal in spy.kernel_fwd)


def assert_generates_like_eager(arch: Arch, eager, fast, spy, padding: str | None = "left", **fast_cache) -> None:
    """4 greedy tokens from a 40-token prompt, left-padded by default (decode over several key tiles): ``fast`` with
    ``fast_cache`` (the cache arguments of ``generate``) gives eager's tokens and logits. The spy counts only
    ``fast``'s calls."""
    inputs = make_inputs(arch, padding, seq=40, seed=5)
    kwargs = {
        **inputs, "max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": PAD_ID,
        "return_dict_in_generate": True, "output_logits": True,
    }  # fmt: skip
    expected = eager.generate(**kwargs, **cache_argument(eager, DynamicCache(config=eager.config)))
    spy.reset()
    actual = fast.generate(**kwargs, **fast_cache)
    torch.testing.assert_close(actual.sequences, expected.sequences, atol=0, rtol=0)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize(
    ("method", "decode"), [("dense", "off"), ("dense", "single"), ("dense", "split"), ("lean", None), ("bsfa", None)]
)
def test_greedy_generate_per_decode_strategy(method, decode, spy):
    """Every decode strategy, and every causal method's default, generates eager's tokens from a left-padded batch
    whose cache spans several key tiles (so split-KV and stream-K really split)."""
    arch = ARCHS["llama"]
    eager, fast = build_pair(arch)
    config = {"thresholds": float("-inf"), "block_m": 16, "block_n": 16} if method == "bsfa" else {}
    if decode is not None:
        config["decode"] = decode
    hf_fastattn.patch(fast, method, **config)
    assert_generates_like_eager(arch, eager, fast, spy, **cache_argument(fast, DynamicCache(config=fast.config)))
    if interpreter_enabled():
        expected_strategy = {"off": None, None: "streamk" if method == "lean" else "single"}.get(decode, decode)
        steps = arch.num_layers * 3
        assert spy.decode == ([] if expected_strategy is None else [expected_strategy] * steps)


@pytest.mark.parametrize("method", ["dense", "lean"])
def test_greedy_generate_with_static_cache(method, spy):
    """A StaticCache (what compiled generation uses): its keys run past the query to max_cache_len. The prefill runs
    the kernels on the filled slots only (the unfilled tail dropped, so causality is bottom-right); every decode step
    runs the shared decode kernels on the whole cache with the unfilled slots masked. Tokens equal eager's with a
    DynamicCache, from a left-padded batch, and nothing falls back."""
    arch = ARCHS["llama"]
    eager, fast = build_pair(arch)
    hf_fastattn.patch(fast, method)
    assert_generates_like_eager(arch, eager, fast, spy, cache_implementation="static")
    assert spy.fallbacks == 0
    if interpreter_enabled():
        prefill = [call for call in spy.kernel_fwd if call[0][2] > 1]
        assert {(q_shape[2], k_shape[2]) for q_shape, k_shape, _, _ in prefill} == {(40, 40)}
        decode_keys = {k_shape[2] for q_shape, k_shape, _, _ in spy.kernel_fwd if q_shape[2] == 1}
        # Every step gets the whole cache: at least the 43 positions the last step fills, 2 of them empty at the first.
        assert len(decode_keys) == 1 and decode_keys.pop() >= 40 + 3, decode_keys
        assert len(prefill) == arch.num_layers and len(spy.decode) == arch.num_layers * 3
        assert all(has_padding for _, _, has_padding, _ in spy.kernel_fwd)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_without_padding_masks_no_key(cache, spy):
    """Unpadded prompts: generate() passes an all-ones mask, which the mask builder drops, so the prefill runs the
    kernels without per-key masking (with a StaticCache, on the filled slots only); eager's tokens, no fallback."""
    arch = ARCHS["llama"]
    eager, fast = build_pair(arch)
    hf_fastattn.patch(fast, "dense")
    fast_cache = (
        {"cache_implementation": "static"}
        if cache == "static"
        else cache_argument(fast, DynamicCache(config=fast.config))
    )
    assert_generates_like_eager(arch, eager, fast, spy, padding=None, **fast_cache)
    assert spy.fallbacks == 0
    if interpreter_enabled():
        prefill = [call for call in spy.kernel_fwd if call[0][2] > 1]
        assert len(prefill) == arch.num_layers
        assert {(q_shape[2], k_shape[2], has_padding) for q_shape, k_shape, has_padding, _ in prefill} == {
            (40, 40, False)
        }


def test_static_cache_decode_compiles_fullgraph(spy):
    """Decode steps against a StaticCache compile as one graph (no break, no host sync: the cache's position stays a
    device tensor) and generate eager's greedy tokens; dynamo has nothing to warn about in hf_fastattn."""
    arch = ARCHS["llama"]
    eager, fast = build_pair(arch)
    hf_fastattn.patch(fast, "lean")
    inputs = make_inputs(arch, "left", seq=20, seed=5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new_tokens = 4
    expected = eager.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID
    )[:, ids.shape[1] :]

    cache = StaticCache(config=fast.config, max_cache_len=ids.shape[1] + new_tokens)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    torch._dynamo.reset()
    decode_step = torch.compile(fast.forward, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = fast(input_ids=ids, attention_mask=mask, **cache_argument(fast, cache), position_ids=positions).logits
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        spy.reset()
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
            positions = positions[:, -1:] + 1
            logits = decode_step(
                input_ids=tokens[-1], attention_mask=mask, **cache_argument(fast, cache), position_ids=positions
            ).logits
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    torch.testing.assert_close(torch.cat(tokens, dim=1), expected, atol=0, rtol=0)
    assert spy.fallbacks == 0
    assert not [w for w in caught if "hf_fastattn" in str(w.filename) or "hf_fastattn" in str(w.message)]


@pytest.mark.parametrize("arch_name", CAUSAL)
def test_cached_decode_matches_full_forward(arch_name, spy):
    """Feed continuation chunks (single tokens and a multi-token chunk) through a DynamicCache: each chunk's logits
    equal those of one uncached forward over the whole prefix with the same padded mask, and eager's cached logits."""
    arch = ARCHS[arch_name]
    eager, fast = build_pair(arch)
    input_ids, mask = left_padded_prompt(arch)
    generator = torch.Generator().manual_seed(4)
    chunks = (1, 1, 3, 1, 2)
    continuation = torch.randint(3, VOCAB, (3, sum(chunks)), generator=generator)

    caches = {"fast": DynamicCache(config=fast.config), "eager": DynamicCache(config=eager.config)}
    models = {"fast": fast, "eager": eager}
    ids, attention = input_ids, mask
    with torch.no_grad():
        step_logits = {
            key: models[key](
                input_ids=ids, attention_mask=attention, **cache_argument(models[key], caches[key]), use_cache=True
            ).logits
            for key in models
        }
        valid = mask.bool()  # prefill: the padded query rows see no key, their outputs are unspecified
        torch.testing.assert_close(step_logits["fast"][valid], step_logits["eager"][valid], atol=1e-4, rtol=1e-4)
        start = 0
        for size in chunks:
            chunk = continuation[:, start : start + size]
            start += size
            ids = torch.cat([ids, chunk], dim=1)
            attention = torch.cat([attention, torch.ones_like(chunk)], dim=1)
            spy.reset()
            step_logits = {
                key: models[key](
                    input_ids=chunk,
                    attention_mask=attention,
                    **cache_argument(models[key], caches[key]),
                    use_cache=True,
                ).logits
                for key in models
            }
            spy.assert_fast_path(arch.num_layers)
            if interpreter_enabled():
                assert {call[0][2] for call in spy.kernel_fwd} == {size}
                assert {call[1][2] for call in spy.kernel_fwd} == {ids.shape[1]}
            full = fast(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, -size:]
            assert caches["fast"].get_seq_length() == ids.shape[1]
            torch.testing.assert_close(
                step_logits["fast"], full, atol=1e-4, rtol=1e-4, msg=lambda m, n=ids.shape[1]: f"len {n} vs full: {m}"
            )
            torch.testing.assert_close(
                step_logits["fast"],
                step_logits["eager"],
                atol=1e-4,
                rtol=1e-4,
                msg=lambda m, n=ids.shape[1]: f"len {n} vs eager: {m}",
            )


# --------------------------------------------------------------------------------------------------------------------
# hf_fastattn.patch with a per-layer assignment, and hf_fastattn.use
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch_name", "padding"), [("llama", "left"), ("bert", "right"), ("vit", None)])
def test_patch_mixed_layers_matches_eager(arch_name, padding, spy, caplog):
    """Layer 0 left on SDPA, layer 1 on the dense kernel: still eager's answer, and no fallback warning."""
    arch = ARCHS[arch_name]
    eager, _ = build_pair(arch)
    torch.manual_seed(0)
    model = arch.auto_class.from_config(copy.deepcopy(arch.make_config()), attn_implementation="eager").eval()
    model.load_state_dict(eager.state_dict())
    hf_fastattn.patch(model, "dense", layers={0: "sdpa"})
    assert model.config._attn_implementation == FAST
    assert [(s.layer_index, s.method) for s in hf_fastattn.layer_states(model)] == [(0, "sdpa"), (1, "dense")]

    inputs = make_inputs(arch, padding)
    valid = valid_positions(inputs)
    hf_fastattn.dispatch.reset_warnings()
    with torch.no_grad(), caplog.at_level("WARNING", logger="hf_fastattn"):
        expected = eager(**inputs, output_hidden_states=True)
        spy.reset()
        actual = model(**inputs, output_hidden_states=True)
    assert spy.fallbacks == 1 and spy.fast_calls() == 1  # one SDPA layer (by request), one kernel layer
    if interpreter_enabled():
        assert not [r for r in caplog.records if r.name == "hf_fastattn"], "an explicit 'sdpa' layer must not warn"
    for index, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert_close_valid(a, e, valid, what=f"hidden_states[{index}]")

    hf_fastattn.unpatch(model)
    assert model.config._attn_implementation == "eager"
    assert hf_fastattn.layer_states(model) == []


@pytest.mark.parametrize("arch_name", ["gpt2", "dinov2"])
def test_use_context_manager(arch_name, spy):
    arch = ARCHS[arch_name]
    eager, _ = build_pair(arch)
    inputs = make_inputs(arch, "right" if arch.is_text else None)
    valid = valid_positions(inputs)
    with torch.no_grad():
        expected = primary_output(eager(**inputs))
        with hf_fastattn.use(eager, "dense") as patched:
            assert patched is eager and eager.config._attn_implementation == FAST
            spy.reset()
            actual = primary_output(eager(**inputs))
            spy.assert_fast_path(arch.num_layers)
        assert eager.config._attn_implementation == "eager"
        assert hf_fastattn.layer_states(eager) == []
        spy.reset()
        after = primary_output(eager(**inputs))
        assert spy.fast_calls() == 0
    assert_close_valid(actual, expected, valid, what="inside use()")
    assert_close_valid(after, expected, valid, what="after use()")
